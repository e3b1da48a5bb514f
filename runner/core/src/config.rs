//! The daemon's configuration file: raw serde structs that mirror the YAML (unknown keys are
//! errors), parsed in [`parse`], then validated into [`Config`] with errors that name the file
//! and the key. Forgejo Runner's keys are kept where they mean the same thing; `plugins:` and
//! structured labels are kiln's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;

use crate::backends::PluginSpec;
use crate::labels::{self, LabelConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    runner: RawRunner,
    #[serde(default)]
    plugins: IndexMap<String, RawPlugin>,
    /// Forgejo Runner's `container:` section, mapped to the managed docker plugin's flags.
    container: Option<RawContainer>,
    /// Where remote actions come from (kiln's own section).
    #[serde(default)]
    actions: RawActions,
    /// Forgejo Runner's `host:` section (the embedded host plugin).
    host: Option<RawHost>,
    /// kiln's own: the daemon's HTTP endpoint for `/healthz` and `/metrics`.
    metrics: Option<RawMetrics>,
    /// Forgejo Runner's `cache:` section: the cache server for `actions/cache`.
    #[serde(default)]
    cache: RawCache,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    workdir_parent: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// `ADDR:PORT` to listen on, e.g. `127.0.0.1:9101`.
    listen: Option<String>,
}

/// `cache:`, with Forgejo Runner's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    enabled: Option<bool>,
    dir: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    proxy_port: Option<u16>,
    external_server: Option<String>,
    secret: Option<String>,
    actions_cache_url_override: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActions {
    cache_dir: Option<PathBuf>,
    #[serde(default)]
    offline: bool,
    #[serde(default)]
    local_repositories: IndexMap<String, PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContainer {
    network: Option<String>,
    enable_ipv6: Option<bool>,
    privileged: Option<bool>,
    options: Option<String>,
    workdir_parent: Option<String>,
    valid_volumes: Option<Vec<String>>,
    docker_host: Option<String>,
    force_pull: Option<bool>,
    force_rebuild: Option<bool>,
}

impl RawContainer {
    /// The docker plugin's flags for this section, with Forgejo Runner's meaning of each key,
    /// or an error naming a key kiln cannot honour and why.
    fn plugin_args(&self, file: &str) -> anyhow::Result<Vec<String>> {
        fn set(v: &Option<String>) -> Option<&str> {
            v.as_deref().map(str::trim).filter(|s| !s.is_empty())
        }
        let mut args = Vec::new();
        if let Some(parent) = set(&self.workdir_parent) {
            bail!(
                "{file}: container.workdir_parent: {parent:?} cannot be honoured: kiln's docker \
                 plugin keeps the job's workspace at /github/workspace (as GitHub does) and \
                 runner files under /__kiln; remove the key"
            );
        }
        // "" = a network per job (the plugin's own); host, bridge or a named network.
        if let Some(network) = set(&self.network) {
            args.extend(["--network".to_owned(), network.to_owned()]);
        }
        if self.enable_ipv6 == Some(true) {
            if set(&self.network).is_some() {
                bail!(
                    "{file}: container.enable_ipv6: only applies to the network kiln creates for \
                     each job (container.network: \"\"), not to {:?}; remove one of them",
                    self.network.as_deref().unwrap_or("")
                );
            }
            args.push("--enable-ipv6".to_owned());
        }
        if self.privileged == Some(true) {
            args.push("--privileged".to_owned());
        }
        if let Some(options) = set(&self.options) {
            args.extend(["--container-options".to_owned(), options.to_owned()]);
        }
        for v in self.valid_volumes.iter().flatten() {
            args.push("--valid-volume".to_owned());
            args.push(v.clone());
        }
        match self.docker_host.as_deref().map(str::trim) {
            None | Some("" | "-") => {}
            Some("automount") => args.push("--mount-docker-socket".to_owned()),
            Some(url) => {
                if !url.starts_with("unix://") {
                    bail!(
                        "{file}: container.docker_host: {url:?} cannot be mounted into job \
                         containers: only a unix:// socket can; use \"automount\", a unix:// \
                         URL, or \"-\" and configure plugins.docker for a remote engine"
                    );
                }
                args.extend(["--docker-host".to_owned(), url.to_owned()]);
                args.push("--mount-docker-socket".to_owned());
            }
        }
        if self.force_pull == Some(true) {
            args.push("--force-pull".to_owned());
        }
        if self.force_rebuild == Some(true) {
            args.push("--force-rebuild".to_owned());
        }
        Ok(args)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    /// What runner messages go into the job's log on the instance.
    job_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunner {
    file: Option<PathBuf>,
    capacity: Option<i64>,
    #[serde(default)]
    envs: IndexMap<String, String>,
    env_file: Option<PathBuf>,
    timeout: Option<Value>,
    shutdown_timeout: Option<Value>,
    fetch_timeout: Option<Value>,
    fetch_interval: Option<Value>,
    report_interval: Option<Value>,
    labels: Option<Vec<Value>>,
    /// Skip verifying the instance's TLS certificate.
    insecure: Option<bool>,
    report_retry: Option<RawReportRetry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReportRetry {
    max_retries: Option<u32>,
    initial_delay: Option<Value>,
    max_delay: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    command: Option<Value>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    endpoint: Option<String>,
    tls: Option<RawTls>,
    #[serde(default)]
    insecure: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `log.level`: a tracing filter (`info`, `debug`, …).
    pub log_level: String,
    /// `log.job_level`: which of kiln's own messages go into the job's log on the instance.
    pub job_level: JobLevel,
    /// `metrics.listen`: the daemon's `/healthz` and `/metrics` endpoint, when set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `runner.*`.
    pub runner: RunnerConfig,
    /// `plugins.*`; `host` is the embedded host plugin unless configured.
    pub plugins: BTreeMap<String, PluginSpec>,
    /// `actions.*`: the action cache, offline mode, local overrides. The base URL comes from
    /// each task (the instance's default actions URL).
    pub actions: crate::actions::ActionSource,
    /// `cache.*`: the cache server for `actions/cache`.
    pub cache: CacheConfig,
}

/// `cache.*` (Forgejo Runner's keys; see `docs/job-services.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// `enabled` (default true): give jobs `ACTIONS_CACHE_URL`.
    pub enabled: bool,
    /// `dir`: the embedded server's storage (default `cache/` in kiln's state directory).
    pub dir: Option<PathBuf>,
    /// `host`: the address the embedded server listens on and jobs reach it at (default: the
    /// docker bridge's gateway when a docker plugin is configured, else 127.0.0.1).
    pub host: Option<std::net::IpAddr>,
    /// `port` (0: any free port); `proxy_port` when `port` is unset (kiln has no separate
    /// proxy: per-job tokens do its work on the one listener).
    pub port: u16,
    /// `external_server`: the base URL of a shared `kiln cache-server`; nothing embedded.
    pub external_server: Option<String>,
    /// `secret`: signs the jobs' tokens; required with `external_server` (the same secret as
    /// the server's `--secret-file`).
    pub secret: Option<String>,
    /// `actions_cache_url_override`: the base URL jobs are given instead of the server's own
    /// (behind a proxy); the job's token path is appended to it.
    pub url_override: Option<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            dir: None,
            host: None,
            port: 0,
            external_server: None,
            secret: None,
            url_override: None,
        }
    }
}

/// `runner.*`.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The `.runner` file (relative paths are relative to the working directory, as in Forgejo
    /// Runner).
    pub file: PathBuf,
    /// Jobs at once.
    pub capacity: usize,
    /// `envs` and the contents of `env_file`, added to every step.
    pub envs: IndexMap<String, String>,
    /// The longest a job may run.
    pub timeout: Duration,
    /// How long a stop waits for running jobs.
    pub shutdown_timeout: Duration,
    /// The limit of one fetch.
    pub fetch_timeout: Duration,
    /// Time between fetches.
    pub fetch_interval: Duration,
    /// Time between reports of a running job.
    pub report_interval: Duration,
    /// Label configurations; `None` = take them from the `.runner` file.
    pub labels: Option<Vec<LabelConfig>>,
    /// `runner.insecure`: skip verifying the instance's TLS certificate.
    pub insecure: bool,
}

/// `log.job_level`: Forgejo Runner's levels, applied to kiln's own messages in a job's log
/// (the job's output is always sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum JobLevel {
    /// `trace`, `debug`: also the `::debug::` lines of the steps.
    Debug,
    /// `info` (the default): kiln's progress messages and errors.
    #[default]
    Info,
    /// `warn`, `error`, `fatal`: only kiln's error messages.
    Error,
}

impl JobLevel {
    fn parse(s: &str) -> Option<JobLevel> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "trace" | "debug" => JobLevel::Debug,
            "info" => JobLevel::Info,
            "warn" | "warning" | "error" | "fatal" | "panic" => JobLevel::Error,
            _ => return None,
        })
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            log_level: "info".into(),
            job_level: JobLevel::Info,
            metrics_listen: None,
            runner: RunnerConfig {
                file: PathBuf::from(".runner"),
                capacity: 1,
                envs: IndexMap::new(),
                timeout: Duration::from_secs(3 * 3600),
                shutdown_timeout: Duration::from_secs(3 * 3600),
                fetch_timeout: Duration::from_secs(5),
                fetch_interval: Duration::from_secs(2),
                report_interval: Duration::from_secs(1),
                labels: None,
                insecure: false,
            },
            plugins: BTreeMap::new(),
            actions: crate::actions::ActionSource::new(
                crate::identity::state_dir().join("actions"),
            ),
            cache: CacheConfig::default(),
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    parse(&text, path)
}

/// Parses and validates config text; `path` names the file in errors and anchors `env_file`.
pub fn parse(text: &str, path: &Path) -> anyhow::Result<Config> {
    let file = path.display();
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?
    };
    let mut config = Config::default();
    const LEVELS: &str = "trace, debug, info, warn, error or fatal";
    if let Some(level) = raw.log.level {
        config.log_level = level;
    }
    if let Some(level) = raw.log.job_level {
        config.job_level = JobLevel::parse(&level)
            .with_context(|| format!("{file}: log.job_level: {level:?} is not one of {LEVELS}"))?;
    }
    if let Some(m) = raw.metrics
        && let Some(listen) = m.listen.filter(|l| !l.trim().is_empty())
    {
        config.metrics_listen = Some(listen.trim().parse().with_context(|| {
            format!("{file}: metrics.listen: {listen:?} is not ADDR:PORT, e.g. 127.0.0.1:9101")
        })?);
    }
    let r = raw.runner;
    let c = &mut config.runner;
    if let Some(f) = r.file {
        c.file = f;
    }
    if let Some(n) = r.capacity {
        if n < 1 {
            bail!("{file}: runner.capacity: must be at least 1, got {n}");
        }
        c.capacity = usize::try_from(n).unwrap_or(usize::MAX);
    }
    let durations = [
        ("timeout", r.timeout, &mut c.timeout),
        ("shutdown_timeout", r.shutdown_timeout, &mut c.shutdown_timeout),
        ("fetch_timeout", r.fetch_timeout, &mut c.fetch_timeout),
        ("fetch_interval", r.fetch_interval, &mut c.fetch_interval),
        ("report_interval", r.report_interval, &mut c.report_interval),
    ];
    for (key, value, slot) in durations {
        if let Some(v) = value {
            *slot = duration_value(&v).with_context(|| {
                format!("{file}: runner.{key}: expected a duration like 2s, 3h or 1m30s")
            })?;
        }
    }
    c.insecure = r.insecure.unwrap_or(false);
    if let Some(rr) = r.report_retry
        && (rr.max_retries.is_some() || rr.initial_delay.is_some() || rr.max_delay.is_some())
    {
        bail!(
            "{file}: runner.report_retry: cannot be honoured: kiln retries the final log and state \
             reports with its own backoff (100ms doubling to 5s, for up to 10 minutes, stopped \
             early by a second SIGTERM); remove the key"
        );
    }
    if c.report_interval.is_zero() || c.fetch_interval.is_zero() {
        bail!("{file}: runner.fetch_interval and runner.report_interval must be above 0s");
    }
    if let Some(env_file) = r.env_file {
        let full = if env_file.is_absolute() {
            env_file.clone()
        } else {
            path.parent().unwrap_or(Path::new(".")).join(&env_file)
        };
        // Forgejo Runner ignores a missing env_file.
        if let Ok(text) = std::fs::read_to_string(&full) {
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((k, v)) = line.split_once('=') else {
                    bail!("{}:{}: runner.env_file: expected NAME=VALUE", full.display(), i + 1);
                };
                c.envs.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
    }
    c.envs.extend(r.envs);

    for (name, p) in raw.plugins {
        let key = format!("plugins.{name}");
        let spec = match (p.command, p.endpoint) {
            (Some(_), Some(_)) => {
                bail!(
                    "{file}: {key}: give either command (kiln starts it) or endpoint (it runs on its own), not both"
                )
            }
            (None, None) => bail!(
                "{file}: {key}: needs command: [program, args…] or endpoint: unix:///path.sock"
            ),
            (Some(command), None) => {
                let command: Vec<String> = match command {
                    Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
                    Value::Array(items) => items
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => Ok(s.clone()),
                            other => Ok(other.to_string()),
                        })
                        .collect::<anyhow::Result<_>>()?,
                    _ => bail!("{file}: {key}.command: expected a list of strings"),
                };
                if command.is_empty() {
                    bail!("{file}: {key}.command: is empty");
                }
                PluginSpec::Managed { command, env: p.env }
            }
            (None, Some(endpoint)) => {
                let tls = p.tls.map(|t| kiln_plugin_sdk::server::TlsFiles {
                    ca: t.ca,
                    cert: t.cert,
                    key: t.key,
                });
                let endpoint = kiln_plugin_sdk::client::Endpoint::parse(&endpoint, tls, p.insecure)
                    .map_err(|e| anyhow::anyhow!("{file}: {key}.endpoint: {e}"))?;
                PluginSpec::Standalone { endpoint }
            }
        };
        config.plugins.insert(name, spec);
    }

    // `container:` configures the managed docker plugin (kiln's own, unless plugins.docker
    // names another command).
    if let Some(container) = &raw.container {
        let args = container.plugin_args(&file.to_string())?;
        match config.plugins.get_mut("docker") {
            Some(PluginSpec::Managed { command, .. }) => command.extend(args),
            Some(PluginSpec::Standalone { .. }) if !args.is_empty() => bail!(
                "{file}: container: configures kiln's managed docker plugin, but plugins.docker is \
                 a standalone endpoint: configure that server's policy there instead"
            ),
            Some(PluginSpec::Standalone { .. }) => {}
            // Forgejo Runner's defaults ask nothing of the plugin: it starts when a label uses
            // it, as without the section.
            None if args.is_empty() => {}
            None => {
                let mut spec = crate::backends::embedded_plugin("docker")?;
                if let PluginSpec::Managed { command, .. } = &mut spec {
                    command.extend(args);
                }
                config.plugins.insert("docker".into(), spec);
            }
        }
    }

    // `host.workdir_parent`: where the embedded host plugin puts each job's directories.
    if let Some(parent) = raw.host.and_then(|h| h.workdir_parent).filter(|p| !p.trim().is_empty()) {
        let parent = parent.trim();
        if !Path::new(parent).is_absolute() {
            bail!("{file}: host.workdir_parent: {parent:?} must be an absolute path");
        }
        match config.plugins.get_mut("host") {
            Some(PluginSpec::Managed { command, .. }) => {
                command.extend(["--root".to_owned(), parent.to_owned()]);
            }
            Some(PluginSpec::Standalone { .. }) => bail!(
                "{file}: host.workdir_parent: configures kiln's embedded host plugin, but \
                 plugins.host is a standalone endpoint: set that server's --root instead"
            ),
            None => {
                let mut spec = crate::backends::embedded_host()?;
                if let PluginSpec::Managed { command, .. } = &mut spec {
                    command.extend(["--root".to_owned(), parent.to_owned()]);
                }
                config.plugins.insert("host".into(), spec);
            }
        }
    }

    let a = raw.actions;
    let anchor = |p: PathBuf| {
        if p.is_absolute() { p } else { path.parent().unwrap_or(Path::new(".")).join(p) }
    };
    if let Some(dir) = a.cache_dir {
        config.actions.cache_dir = anchor(dir);
    }
    config.actions.offline = a.offline;
    for (name, dir) in a.local_repositories {
        let text = format!("{name}={}", dir.display());
        let (name, dir) = crate::actions::ActionSource::parse_override(&text)
            .map_err(|e| anyhow::anyhow!("{file}: actions.local_repositories: {e}"))?;
        config.actions.overrides.push((name, anchor(dir)));
    }

    let c = raw.cache;
    let slash = |key: &str, u: String| -> anyhow::Result<String> {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("{file}: cache.{key}: {u:?} is not an http:// or https:// URL");
        }
        Ok(if u.ends_with('/') { u } else { format!("{u}/") })
    };
    config.cache = CacheConfig {
        enabled: c.enabled.unwrap_or(true),
        dir: c.dir.filter(|d| !d.as_os_str().is_empty()).map(anchor),
        host: match c.host.as_deref() {
            None | Some("") => None,
            Some(h) => Some(h.parse().map_err(|_| {
                anyhow::anyhow!("{file}: cache.host: {h:?} is not an IP address (kiln binds it)")
            })?),
        },
        port: c.port.filter(|p| *p != 0).or(c.proxy_port).unwrap_or(0),
        external_server: c
            .external_server
            .filter(|u| !u.is_empty())
            .map(|u| slash("external_server", u))
            .transpose()?,
        secret: c.secret.filter(|s| !s.is_empty()),
        url_override: c
            .actions_cache_url_override
            .filter(|u| !u.is_empty())
            .map(|u| slash("actions_cache_url_override", u))
            .transpose()?,
    };
    if config.cache.external_server.is_some() && config.cache.secret.is_none() {
        bail!(
            "{file}: cache.external_server needs cache.secret: the shared secret the cache \
             server was started with (kiln cache-server --secret-file)"
        );
    }

    // An empty list means "the labels of the .runner file", as in Forgejo Runner.
    if let Some(items) = r.labels.filter(|l| !l.is_empty()) {
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let key = format!("runner.labels[{i}]");
            let label = label_value(item).map_err(|e| anyhow::anyhow!("{file}: {key}: {e:#}"))?;
            out.push(label);
        }
        config.runner.labels = Some(out);
    }
    if let Some(labels) = &config.runner.labels {
        check_labels(labels, &config.plugins).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    }
    Ok(config)
}

/// Checks that every label's backend is configured (`host`, `docker` and `lxc` always are).
pub fn check_labels(
    labels: &[LabelConfig],
    plugins: &BTreeMap<String, PluginSpec>,
) -> anyhow::Result<()> {
    for l in labels {
        let b = l.backend.as_str();
        // host, docker and lxc are first-party: kiln serves them itself when not configured.
        if b.is_empty()
            || b == "host"
            || b == "docker"
            || b == "lxc"
            || b == labels::SKIP
            || plugins.contains_key(b)
        {
            continue;
        }
        bail!(
            "runner.labels: label {:?} uses backend {b:?}, which is not configured; add plugins.{b} \
             with command: or endpoint:",
            l.name
        );
    }
    Ok(())
}

fn label_value(v: &Value) -> anyhow::Result<LabelConfig> {
    match v {
        Value::String(s) => labels::parse_label(s),
        Value::Object(m) => {
            for k in m.keys() {
                if !matches!(k.as_str(), "name" | "backend" | "options") {
                    bail!("unknown key {k:?}; a label has name, backend and options");
                }
            }
            let name = m.get("name").and_then(Value::as_str).context("name: missing")?;
            let backend = m.get("backend").and_then(Value::as_str).context("backend: missing")?;
            let mut label = labels::parse_label(&format!("{name}:{backend}"))?;
            match m.get("options") {
                None | Some(Value::Null) => {}
                Some(Value::Object(o)) => label.options.extend(o.clone()),
                Some(_) => bail!("options: expected a mapping"),
            }
            Ok(label)
        }
        _ => bail!("expected \"name:backend\" or {{name, backend, options}}"),
    }
}

fn duration_value(v: &Value) -> anyhow::Result<Duration> {
    match v {
        Value::Number(n) => {
            let secs = n.as_f64().filter(|s| *s >= 0.0).context("a negative number")?;
            Ok(Duration::from_secs_f64(secs))
        }
        Value::String(s) => parse_duration(s),
        _ => bail!("not a duration"),
    }
}

/// Parses a Go duration: `300ms`, `2s`, `1m30s`, `3h`, `0`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0.0f64;
    let mut rest = s;
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let Ok(value) = num.parse::<f64>() else {
            bail!("{s:?} is not a number followed by a unit");
        };
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => bail!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)"),
        };
        total += value * scale;
        rest = tail;
    }
    Ok(Duration::from_secs_f64(total))
}

/// The commented example printed by `kiln generate-config`.
pub const EXAMPLE: &str = include_str!("../../../examples/config.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!("{:#}", parse(text, Path::new("c.yaml")).unwrap_err())
    }

    #[test]
    fn cache_section_takes_forgejo_runners_keys() {
        let c = parse("cache: {}\n", Path::new("/etc/kiln/c.yaml")).unwrap().cache;
        assert_eq!(c, CacheConfig::default());
        let text = "cache:\n  enabled: true\n  dir: cache\n  host: 172.17.0.1\n  proxy_port: 8089\n  \
                    external_server: http://10.0.0.5:8088\n  secret: s3cret\n  \
                    actions_cache_url_override: https://cache.example\n";
        let c = parse(text, Path::new("/etc/kiln/c.yaml")).unwrap().cache;
        assert_eq!(c.dir.as_deref(), Some(Path::new("/etc/kiln/cache")));
        assert_eq!(c.host, Some("172.17.0.1".parse().unwrap()));
        assert_eq!(c.port, 8089);
        assert_eq!(c.external_server.as_deref(), Some("http://10.0.0.5:8088/"));
        assert_eq!(c.url_override.as_deref(), Some("https://cache.example/"));
        let off = parse("cache:\n  enabled: false\n", Path::new("c.yaml")).unwrap().cache;
        assert!(!off.enabled);
        assert!(err("cache:\n  external_server: http://x/\n").contains("needs cache.secret"));
        assert!(err("cache:\n  host: cache.local\n").contains("cache.host"));
        assert!(
            err("cache:\n  external_server: x\n  secret: s\n").contains("cache.external_server")
        );
        assert!(err("cache:\n  colour: red\n").contains("colour"));
    }

    #[test]
    fn the_example_is_valid() {
        let c = parse(EXAMPLE, Path::new("examples/config.yaml")).unwrap();
        assert_eq!(c.runner.capacity, 2);
        assert!(c.runner.labels.is_some());
    }

    #[test]
    fn keys_and_values() {
        let c = parse(
            "log: {level: debug}\nrunner:\n  capacity: 4\n  timeout: 1h30m\n  fetch_interval: 500ms\n  envs: {A: b}\n  labels:\n    - linux:host\n    - name: vm\n      backend: qemu\n      options: {memory: 4G}\nplugins:\n  qemu: {endpoint: unix:///run/q.sock}\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.runner.capacity, 4);
        assert_eq!(c.runner.timeout, Duration::from_secs(5400));
        assert_eq!(c.runner.fetch_interval, Duration::from_millis(500));
        let labels = c.runner.labels.unwrap();
        assert_eq!(labels[0].backend, "host");
        assert_eq!(
            (labels[1].backend.as_str(), labels[1].options["memory"].as_str()),
            ("qemu", Some("4G"))
        );
        assert_eq!(c.runner.envs["A"], "b");
    }

    #[test]
    fn container_section_configures_the_docker_plugin() {
        let c = parse(
            "container:\n  network: \"\"\n  privileged: false\n  valid_volumes: [\"/srv/cache/**\"]\n  docker_host: unix:///run/docker.sock\n  force_pull: false\nrunner:\n  labels: [\"ubuntu:docker://debian:12\"]\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let Some(PluginSpec::Managed { command, .. }) = c.plugins.get("docker") else {
            panic!("no managed docker plugin: {:?}", c.plugins);
        };
        assert_eq!(
            command[1..],
            [
                "plugin",
                "docker",
                "--valid-volume",
                "/srv/cache/**",
                "--docker-host",
                "unix:///run/docker.sock",
                "--mount-docker-socket"
            ]
        );
        assert!(err("container:\n  colour: red\n").contains("unknown field `colour`"));
        // docker:// labels need no plugins.docker: kiln serves its own.
        assert!(parse("runner:\n  labels: [\"u:docker://img\"]\n", Path::new("c.yaml")).is_ok());
    }

    /// Forgejo Runner's example configuration, every key, as Forgejo Runner ships it.
    const FORGEJO_EXAMPLE: &str = include_str!("../../../tests/forgejo-runner/config.example.yaml");

    #[test]
    fn forgejo_runners_example_is_taken_unchanged() {
        let c = parse(FORGEJO_EXAMPLE, Path::new("config.example.yaml")).unwrap();
        assert_eq!(c.job_level, JobLevel::Info);
        assert_eq!(c.runner.capacity, 1);
        assert_eq!(c.runner.envs["A_TEST_ENV_NAME_1"], "a_test_env_value_1");
        assert!(!c.runner.insecure);
        // `labels: []`: the .runner file's labels.
        assert!(c.runner.labels.is_none());
        assert!(c.cache.enabled);
        // Forgejo's defaults ask nothing of the plugins: none is configured.
        assert!(c.plugins.is_empty(), "{:?}", c.plugins);
    }

    fn docker_args(container: &str) -> String {
        match parse(&format!("container:\n{container}"), Path::new("c.yaml")) {
            Ok(c) => match c.plugins.get("docker") {
                None => String::new(),
                Some(PluginSpec::Managed { command, .. }) => command[3..].join(" "),
                other => format!("{other:?}"),
            },
            Err(e) => format!("error: {e:#}"),
        }
    }

    #[test]
    fn container_keys_map_onto_the_docker_plugins_flags() {
        let cases = [
            ("  network: \"\"\n", ""),
            ("  network: host\n", "--network host"),
            ("  network: bridge\n", "--network bridge"),
            ("  network: my-net\n", "--network my-net"),
            ("  enable_ipv6: true\n", "--enable-ipv6"),
            ("  privileged: true\n", "--privileged"),
            ("  options: --cpus 2 --memory 1g\n", "--container-options --cpus 2 --memory 1g"),
            (
                "  valid_volumes: [data, /etc/ssl/certs]\n",
                "--valid-volume data --valid-volume /etc/ssl/certs",
            ),
            ("  docker_host: \"-\"\n", ""),
            ("  docker_host: \"\"\n", ""),
            ("  docker_host: automount\n", "--mount-docker-socket"),
            (
                "  docker_host: unix:///run/docker.sock\n",
                "--docker-host unix:///run/docker.sock --mount-docker-socket",
            ),
            ("  force_pull: true\n", "--force-pull"),
            ("  force_rebuild: true\n", "--force-rebuild"),
            ("  workdir_parent: \"\"\n", ""),
        ];
        for (yaml, want) in cases {
            assert_eq!(docker_args(yaml), want, "{yaml}");
        }
        assert_eq!(
            docker_args("  workdir_parent: /srv/work\n"),
            "error: c.yaml: container.workdir_parent: \"/srv/work\" cannot be honoured: kiln's docker plugin keeps the job's workspace at /github/workspace (as GitHub does) and runner files under /__kiln; remove the key"
        );
        assert_eq!(
            docker_args("  docker_host: ssh://user@host\n"),
            "error: c.yaml: container.docker_host: \"ssh://user@host\" cannot be mounted into job containers: only a unix:// socket can; use \"automount\", a unix:// URL, or \"-\" and configure plugins.docker for a remote engine"
        );
        assert_eq!(
            docker_args("  network: host\n  enable_ipv6: true\n"),
            "error: c.yaml: container.enable_ipv6: only applies to the network kiln creates for each job (container.network: \"\"), not to \"host\"; remove one of them"
        );
    }

    #[test]
    fn log_runner_host_and_metrics_keys() {
        let c = parse(
            "log: {level: warn, job_level: debug}\nrunner:\n  insecure: true\n  report_retry: {}\nhost:\n  workdir_parent: /srv/kiln\nmetrics:\n  listen: 127.0.0.1:9101\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(c.job_level, JobLevel::Debug);
        assert!(c.runner.insecure);
        assert!(
            err("runner:\n  report_retry:\n    max_retries: 3\n")
                .starts_with("c.yaml: runner.report_retry: cannot be honoured")
        );
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
        let Some(PluginSpec::Managed { command, .. }) = c.plugins.get("host") else {
            panic!("no host plugin: {:?}", c.plugins);
        };
        assert!(command.ends_with(&["--root".to_owned(), "/srv/kiln".to_owned()]), "{command:?}");
        assert_eq!(
            err("log:\n  job_level: loud\n"),
            "c.yaml: log.job_level: \"loud\" is not one of trace, debug, info, warn, error or fatal"
        );
        assert_eq!(
            err("host:\n  workdir_parent: work\n"),
            "c.yaml: host.workdir_parent: \"work\" must be an absolute path"
        );
        assert!(err("host:\n  workdir: /x\n").contains("unknown field `workdir`"));
        assert!(err("cache:\n  enable: true\n").contains("unknown field `enable`"));
        assert_eq!(
            err("metrics:\n  listen: everywhere\n"),
            "c.yaml: metrics.listen: \"everywhere\" is not ADDR:PORT, e.g. 127.0.0.1:9101: invalid socket address syntax"
        );
    }

    #[test]
    fn actions_section() {
        let c = parse(
            "actions:\n  cache_dir: cache\n  offline: true\n  local_repositories:\n    acme/tool@v1: /srv/mirror/tool\n",
            Path::new("/etc/kiln/c.yaml"),
        )
        .unwrap();
        assert_eq!(c.actions.cache_dir, Path::new("/etc/kiln/cache"));
        assert!(c.actions.offline);
        assert_eq!(c.actions.overrides, [("acme/tool@v1".to_owned(), "/srv/mirror/tool".into())]);
        assert!(!parse("", Path::new("c.yaml")).unwrap().actions.offline);
        assert_eq!(
            err("actions:\n  local_repositories:\n    tool: /x\n"),
            "c.yaml: actions.local_repositories: action override \"tool=/x\": expected owner/repo@ref=DIR (or owner/repo=DIR)"
        );
        assert!(err("actions:\n  ofline: true\n").contains("unknown field `ofline`"));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        assert!(
            err("runner:\n  capcity: 2\n").contains("unknown field `capcity`"),
            "{}",
            err("runner:\n  capcity: 2\n")
        );
        assert!(err("runner:\n  capcity: 2\n").starts_with("c.yaml: "));
        assert_eq!(
            err("runner:\n  timeout: soon\n"),
            "c.yaml: runner.timeout: expected a duration like 2s, 3h or 1m30s: \"soon\" is not a number followed by a unit"
        );
        assert_eq!(
            err("runner:\n  capacity: 0\n"),
            "c.yaml: runner.capacity: must be at least 1, got 0"
        );
        assert_eq!(
            err("runner:\n  labels: [a:qemu]\n"),
            "c.yaml: runner.labels: label \"a\" uses backend \"qemu\", which is not configured; add plugins.qemu with command: or endpoint:"
        );
        assert_eq!(
            err("runner:\n  labels: [{name: a, backend: host, color: red}]\n"),
            "c.yaml: runner.labels[0]: unknown key \"color\"; a label has name, backend and options"
        );
        assert_eq!(
            err("plugins:\n  d: {}\n"),
            "c.yaml: plugins.d: needs command: [program, args…] or endpoint: unix:///path.sock"
        );
    }

    #[test]
    fn lxc_labels_need_no_plugins_entry() {
        // Forgejo Runner's form; kiln serves its lxc plugin itself, like docker.
        let c = parse(
            "runner:\n  labels: [\"ubuntu-latest:lxc://debian:bookworm\"]\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let labels = c.runner.labels.unwrap();
        assert_eq!(labels[0].backend, "lxc");
        assert_eq!(labels[0].options.get("args").and_then(|v| v.as_str()), Some("debian:bookworm"));
        assert_eq!(labels[0].to_string(), "ubuntu-latest:lxc://debian:bookworm");
    }
}
