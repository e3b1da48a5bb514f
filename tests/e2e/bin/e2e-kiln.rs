//! Shim of the `kiln` binary for the e2e tests.

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
