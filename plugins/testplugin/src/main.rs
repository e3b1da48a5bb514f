//! kiln-plugin-test: the fault-injecting reference plugin binary (see the `kiln_plugin_test`
//! library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_plugin_test::main().await
}
