//! kiln-plugin-docker: the Docker backend plugin binary (see the `kiln_plugin_docker` library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_plugin_docker::main().await
}
