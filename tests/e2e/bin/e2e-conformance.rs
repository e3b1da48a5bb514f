//! Shim of the `kiln-conformance` binary for the e2e tests.

fn main() -> std::process::ExitCode {
    kiln_plugin_sdk::conformance::main()
}
