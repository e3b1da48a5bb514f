//! The `kiln-conformance` command line: runs the black-box conformance suite against a backend plugin, either
//! at an endpoint (`--endpoint unix:///…|https://…`) or started by the suite itself
//! (`--command "plugin args…"`, which the faults tier needs). Prints a report on stdout,
//! optionally writes JUnit XML, and exits 1 when a case failed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::{ManagedPlugin, PluginControl, SuiteConfig, Tier, run_suite, split_command};
use crate::Backend;
use crate::client::{Endpoint, connect};
use crate::server::TlsFiles;
use anyhow::Context;
use clap::Parser;

/// Black-box conformance suite for kiln backend plugins.
#[derive(Debug, Parser)]
#[command(name = "kiln-conformance", version)]
#[command(group(clap::ArgGroup::new("target").args(["endpoint", "command"])))]
struct Args {
    /// The plugin's endpoint: unix:///path.sock, https://host:port (with --tls-*), or
    /// http://host:port (with --insecure).
    #[arg(long)]
    endpoint: Option<String>,
    /// Start the plugin with this command line; the suite appends `--listen unix://<tmp>/p.sock
    /// --exit-on-stdin-eof`, keeps its stdin as a pipe and kills it at the end. Enables the
    /// faults tier.
    #[arg(long)]
    command: Option<String>,
    /// CA certificate that signed the plugin's certificate (PEM), for https.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Our client certificate (PEM), for https.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Our client key (PEM), for https.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Allow a plaintext http:// endpoint.
    #[arg(long)]
    insecure: bool,
    /// Tiers to run, comma-separated: protocol, semantics, faults.
    #[arg(long, value_delimiter = ',', default_value = "protocol,semantics,faults")]
    tier: Vec<Tier>,
    /// Only cases whose name contains this substring.
    #[arg(long)]
    filter: Option<String>,
    /// Write a JUnit XML report to this file.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// An environment option, `key=value` (the value is parsed as JSON when it parses, else
    /// taken as a string). Repeatable.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// The runs-on label passed to create_environment.
    #[arg(long, default_value = "conformance")]
    label: String,
    /// The label namespace (Owner.runner_id of everything created); default
    /// `conformance-<random>`.
    #[arg(long)]
    namespace: Option<String>,
    /// Image for the job, service and step container cases; without it they are skipped.
    #[arg(long)]
    container_image: Option<String>,
    /// Bound on one case, in seconds.
    #[arg(long, default_value_t = 300)]
    case_timeout: u64,
    /// With --command: append the plugin's stdout and stderr to this file (default: a file in
    /// the suite's private directory, shown when the plugin fails to start).
    #[arg(long)]
    plugin_log: Option<PathBuf>,
    /// With --command: seconds to wait for the plugin to answer Capabilities.
    #[arg(long, default_value_t = 10)]
    ready_timeout: u64,
    /// List the cases (with the spec sections each checks) and exit.
    #[arg(long)]
    list: bool,
}

fn parse_option(s: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let (k, v) =
        s.split_once('=').with_context(|| format!("--option {s:?}: expected key=value"))?;
    anyhow::ensure!(!k.is_empty(), "--option {s:?}: empty key");
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
    Ok((k.to_owned(), value))
}

/// Writes the report to stdout: the binary is a CLI whose output is the report.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).context("writing the report")?;
    out.flush().context("writing the report")
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.list {
        let mut text = String::new();
        let rules: std::collections::HashMap<_, _> = super::case_rules().into_iter().collect();
        for (tier, name) in super::case_names() {
            let rule = rules.get(name).copied().unwrap_or_default();
            text.push_str(&format!("{tier:<10} {name:<46} {rule}\n"));
        }
        emit(&text)?;
        return Ok(true);
    }
    let mut config = SuiteConfig::new();
    config.tiers = args.tier.clone();
    config.filter = args.filter.clone();
    config.label = args.label.clone();
    config.container_image = args.container_image.clone();
    config.case_timeout = Duration::from_secs(args.case_timeout);
    if let Some(ns) = &args.namespace {
        config.namespace = ns.clone();
    }
    for o in &args.options {
        let (k, v) = parse_option(o)?;
        config.env_options.insert(k, v);
    }

    let mut managed = None;
    let backend: Arc<dyn Backend> = match (&args.endpoint, &args.command) {
        (Some(endpoint), _) => {
            let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
                (Some(ca), Some(cert), Some(key)) => {
                    Some(TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
                }
                _ => None,
            };
            let endpoint = Endpoint::parse(endpoint, tls, args.insecure)?;
            config.endpoint = Some(endpoint.clone());
            Arc::new(connect(&endpoint, "plugin", Duration::from_secs(10)).await?)
        }
        (None, Some(command)) => {
            let argv = split_command(command).map_err(|e| anyhow::anyhow!("--command: {e}"))?;
            let (plugin, backend) = ManagedPlugin::start(
                argv,
                args.plugin_log.clone(),
                Duration::from_secs(args.ready_timeout),
            )
            .await?;
            config.endpoint = Some(plugin.endpoint());
            managed = Some(plugin);
            backend
        }
        (None, None) => {
            anyhow::bail!("give the plugin: --endpoint URL or --command \"plugin args…\"")
        }
    };

    let control = managed.as_ref().map(|m| m as &dyn PluginControl);
    let report = run_suite(backend, &config, control).await;
    if let Some(plugin) = &managed {
        plugin.shutdown().await;
    }
    let mut text = format!("namespace: {}\n", config.namespace);
    text.push_str(&report.render_text());
    if !report.passed()
        && let Some(plugin) = &managed
        && args.plugin_log.is_none()
    {
        let tail = plugin.log_tail(30);
        if !tail.is_empty() {
            text.push_str("\nlast lines of the plugin's log:\n");
            text.push_str(&tail);
            text.push('\n');
        }
    }
    emit(&text)?;
    if let Some(path) = &args.junit {
        std::fs::write(path, report.render_junit())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.passed())
}

/// Entry point of the `kiln-conformance` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kiln-conformance: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kiln-conformance: {e:#}");
            ExitCode::from(2)
        }
    }
}
