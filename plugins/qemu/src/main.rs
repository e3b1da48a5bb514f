//! kiln-plugin-qemu: the QEMU backend plugin binary (see the `kiln_plugin_qemu` library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_plugin_qemu::main().await
}
