//! kiln-plugin-lxc: the LXC backend plugin binary (see the `kiln_plugin_lxc` library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_plugin_lxc::main().await
}
