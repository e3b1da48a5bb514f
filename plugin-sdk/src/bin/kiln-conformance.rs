//! `kiln-conformance`: the conformance suite's binary (its code is `kiln_plugin_sdk::conformance`).

fn main() -> std::process::ExitCode {
    kiln_plugin_sdk::conformance::main()
}
