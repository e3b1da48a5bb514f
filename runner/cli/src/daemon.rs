//! Daemon-mode commands: `register`, `create-runner-file`, `daemon`, `one-job` and
//! `generate-config`. The protocol, the reporter and the poll loop live in
//! `kiln_runner::forgejo`; this file loads the configuration, starts the plugins and handles
//! signals.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_runner::backends::{Backends, embedded_host};
use kiln_runner::config::{self, Config};
use kiln_runner::forgejo::client::Client;
use kiln_runner::forgejo::poller::{self, PollSettings};
use kiln_runner::forgejo::registration::{self, RunnerFile};
use kiln_runner::forgejo::task::RunnerSettings;
use kiln_runner::forgejo::types::TaskResult;
use kiln_runner::identity::Identity;
use kiln_runner::labels::{self, LabelConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::{CreateRunnerFileArgs, DaemonArgs, OneJobArgs, RegisterArgs};

/// The config file, or the defaults.
pub(crate) fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => config::load(p),
        None => Ok(Config::default()),
    }
}

/// `log.level` of the config given on the command line, for the logger (read before anything
/// else; errors are reported later by the command itself).
pub(crate) fn log_level_of(path: Option<&Path>) -> Option<String> {
    load_config(Some(path?)).ok().map(|c| c.log_level)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kiln".into())
}

/// `kiln register`.
pub(crate) async fn register(args: RegisterArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let instance = args.instance.context(
        "--instance is missing: give the instance URL, e.g. --instance https://forgejo.example \
         (kiln does not prompt)",
    )?;
    let token = args.token.context(
        "--token is missing: copy a registration token from the instance's Actions → Runners \
         settings (kiln does not prompt)",
    )?;
    if args.labels.is_empty() {
        bail!("--labels is missing: give at least one label, e.g. --labels linux:host");
    }
    for l in &args.labels {
        labels::parse_label(l).with_context(|| format!("--labels {l}"))?;
    }
    let name = args.name.unwrap_or_else(host_name);
    let stop = CancellationToken::new();
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.cancel();
            }
        })
    };
    let file =
        registration::register(&instance, &token, &name, args.labels, args.ephemeral, &stop).await;
    ctrl_c.abort();
    let file = file?;
    file.save(&config.runner.file)?;
    writeln!(
        std::io::stdout().lock(),
        "registered runner {} (id {}) with {}; wrote {}",
        file.name,
        file.id,
        file.address,
        config.runner.file.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln create-runner-file`.
pub(crate) fn create_runner_file(args: CreateRunnerFileArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    for l in &args.labels {
        labels::parse_label(l).with_context(|| format!("--labels {l}"))?;
    }
    let instance = args.instance.trim_end_matches('/');
    let file = RunnerFile::from_secret(instance, &args.secret, &args.name, args.labels)?;
    file.save(&config.runner.file)?;
    writeln!(
        std::io::stdout().lock(),
        "wrote {} for runner {} (uuid {})",
        config.runner.file.display(),
        file.name,
        file.uuid
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln generate-config`.
pub(crate) fn generate_config() -> anyhow::Result<ExitCode> {
    std::io::stdout().lock().write_all(config::EXAMPLE.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Everything `daemon` and `one-job` share.
struct Setup {
    client: Arc<Client>,
    poll: PollSettings,
    settings: Arc<RunnerSettings>,
    backends: Arc<Backends>,
    /// The embedded cache server, if any.
    services: Option<kiln_services::Services>,
}

async fn setup(path: Option<&Path>) -> anyhow::Result<Setup> {
    let config = load_config(path)?;
    let file = RunnerFile::load(&config.runner.file)?;
    let labels: Vec<LabelConfig> =
        match &config.runner.labels {
            Some(l) => l.clone(),
            None => {
                let mut out = Vec::new();
                for l in &file.labels {
                    out.push(labels::parse_label(l).with_context(|| {
                        format!("{}: labels: {l}", config.runner.file.display())
                    })?);
                }
                config::check_labels(&out, &config.plugins)
                    .with_context(|| format!("labels of {}", config.runner.file.display()))?;
                out
            }
        };
    if labels.is_empty() {
        bail!(
            "this runner has no labels, so the server will give it no jobs: add runner.labels to \
             the config file (e.g. - linux:host)"
        );
    }
    let mut specs = config.plugins.clone();
    if !specs.contains_key("host") {
        specs.insert("host".into(), embedded_host()?);
    }
    if !specs.contains_key("docker") && labels.iter().any(|l| l.backend == "docker") {
        specs.insert("docker".into(), kiln_runner::backends::embedded_plugin("docker")?);
    }
    if !specs.contains_key("lxc") && labels.iter().any(|l| l.backend == "lxc") {
        specs.insert("lxc".into(), kiln_runner::backends::embedded_plugin("lxc")?);
    }
    // Start only the plugins some label uses (host is the default backend), and a configured
    // docker plugin for the host plugin to delegate container layers to.
    let mut used: Vec<&str> = labels
        .iter()
        .map(|l| if l.backend.is_empty() { "host" } else { l.backend.as_str() })
        .collect();
    if (used.contains(&"host") || used.contains(&"lxc")) && config.plugins.contains_key("docker") {
        used.push("docker");
    }
    let mut specs: BTreeMap<_, _> =
        specs.into_iter().filter(|(name, _)| used.contains(&name.as_str())).collect();
    crate::wire_delegation(&mut specs)?;
    let docker = specs.contains_key("docker");
    let (services, job_env) = crate::services::for_daemon(&config.cache, docker).await?;
    let identity = Identity::new(&file.uuid);
    let backends = Arc::new(Backends::start(specs, &identity).await?);
    backends.check_labels(&labels)?;
    // What a previous kiln with this runner id left, and what expired, goes now, then every
    // ten minutes.
    let removed = backends.collect_garbage(&identity).await;
    if removed > 0 {
        tracing::info!(removed, "removed leftover environments");
    }
    {
        let backends = Arc::downgrade(&backends);
        let identity = identity.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(600)).await;
                let Some(backends) = backends.upgrade() else { return };
                backends.collect_garbage(&identity).await;
            }
        });
    }
    let timeout = std::env::var("FORGEJO_CLIENT_TIMEOUT")
        .ok()
        .and_then(|t| config::parse_duration(&t).ok())
        .unwrap_or(Duration::from_secs(60));
    let client = Arc::new(Client::with_tls(
        &file.address,
        &file.uuid,
        &file.token,
        timeout,
        config.runner.insecure,
    )?);
    let r = &config.runner;
    let poll = PollSettings {
        capacity: if file.ephemeral { 1 } else { r.capacity },
        fetch_interval: r.fetch_interval,
        fetch_timeout: r.fetch_timeout,
        shutdown_timeout: r.shutdown_timeout,
        labels: labels.iter().map(|l| l.name.clone()).collect(),
    };
    let settings = Arc::new(RunnerSettings {
        name: if file.name.is_empty() { "kiln".into() } else { file.name.clone() },
        labels,
        default_backend: "host".into(),
        envs: r.envs.clone(),
        timeout: r.timeout,
        report_interval: r.report_interval,
        job_level: config.job_level,
        identity,
        actions: config.actions.clone(),
        job_env: job_env.into_iter().collect(),
    });
    Ok(Setup { client, poll, settings, backends, services })
}

/// First SIGTERM or Ctrl-C: `stop` (stop fetching, drain). Second: `force`. Third: exit now.
fn watch_signals(stop: CancellationToken, force: CancellationToken) -> tokio::task::JoinHandle<()> {
    crate::signals::watch(
        stop,
        force,
        crate::signals::Messages {
            first: "stopping: no new jobs; waiting for the running ones (signal again to force)",
            second: "stopping now: cancelling the running jobs",
        },
    )
}

async fn shutdown(backends: Arc<Backends>) {
    match Arc::try_unwrap(backends) {
        Ok(b) => b.shutdown().await,
        Err(_) => tracing::debug!("plugins still referenced at exit; they stop with kiln"),
    }
}

/// `kiln daemon`.
pub(crate) async fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let Setup { client, poll, settings, backends, services } =
        setup(args.config.as_deref()).await?;
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let signals = watch_signals(stop.clone(), force.clone());
    let metrics_stop = CancellationToken::new();
    let _metrics_guard = metrics_stop.clone().drop_guard();
    if let Some(addr) = load_config(args.config.as_deref())?.metrics_listen {
        kiln_runner::metrics::serve(addr, metrics_stop).await?;
    }
    tracing::info!(instance = client.instance(), runner = %settings.name, "daemon started");
    let result = poller::run_daemon(client, poll, settings, backends.clone(), stop, force).await;
    signals.abort();
    shutdown(backends).await;
    if let Some(s) = services {
        s.stop().await;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln one-job`.
pub(crate) async fn one_job(args: OneJobArgs) -> anyhow::Result<ExitCode> {
    let Setup { client, poll, settings, backends, services } =
        setup(args.config.as_deref()).await?;
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let signals = watch_signals(stop.clone(), force.clone());
    let result =
        poller::run_one(client, args.handle, poll, settings, backends.clone(), stop, force).await;
    signals.abort();
    shutdown(backends).await;
    if let Some(s) = services {
        s.stop().await;
    }
    let code = match result? {
        None => {
            writeln!(std::io::stdout().lock(), "no job for this runner")?;
            ExitCode::SUCCESS
        }
        Some(r) => {
            writeln!(std::io::stdout().lock(), "job {}", r.as_context())?;
            match r {
                TaskResult::Success | TaskResult::Skipped => ExitCode::SUCCESS,
                TaskResult::Cancelled => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    };
    Ok(code)
}
