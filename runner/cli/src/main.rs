//! The `kiln` binary: a thin shell over `kiln_cli::main`.

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
