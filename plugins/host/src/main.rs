//! kiln-plugin-host: the host backend plugin binary (see the `kiln_plugin_host` library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_plugin_host::main().await
}
