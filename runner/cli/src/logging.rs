//! Logging of the `kiln` binary: tracing to stderr, filtered by `KILN_LOG` / `RUST_LOG`; stdout
//! stays for the run's output.

/// `config_level` is the config file's `log.level`, used when `-v` is not given.
pub(crate) fn init(verbose: u8, config_level: Option<&str>) {
    let default = match verbose {
        0 => config_level.unwrap_or("warn"),
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
