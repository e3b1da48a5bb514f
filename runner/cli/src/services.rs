//! Starting the job services (`kiln-services`) for `kiln exec`, `kiln daemon` and `kiln
//! cache-server`, and the [`JobEnvProvider`] that gives each job its URLs and token.
//!
//! Address: job processes on the host and job containers on the local Docker engine must both
//! reach the server, and nothing else should. With a docker plugin configured and a `docker0`
//! bridge present, the server binds the bridge's gateway address (the host's side of the
//! bridge: host processes reach it too); otherwise `127.0.0.1`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use kiln_runner::run::{JobEnv, JobEnvProvider, JobEnvRequest};
use kiln_services::token::{CacheMode, CacheScope, Signer};
use kiln_services::{JobInfo, Services};
use serde_json::{Map, Value};

/// The IPv4 address of `docker0`, if the host has that bridge.
pub(crate) fn docker_bridge_addr() -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        if ifa.interface_name != "docker0" {
            return None;
        }
        ifa.address?.as_sockaddr_in().map(|a| a.ip())
    })
}

/// The default listen address: the docker bridge when jobs may run in local containers.
pub(crate) fn default_bind(docker: bool) -> IpAddr {
    match docker.then(docker_bridge_addr).flatten() {
        Some(a) => IpAddr::V4(a),
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// Where a job's cache lives: the URL, and who signs the tokens.
#[derive(Debug, Clone)]
pub(crate) enum CacheTarget {
    /// No cache.
    Off,
    /// A server at `url` (embedded or external) trusting tokens of `signer`.
    On {
        /// Base URL, ending in `/`.
        url: String,
        /// Signs the job tokens.
        signer: Signer,
    },
}

/// The hook of a run: which variables each job gets.
#[derive(Debug)]
pub(crate) struct ServicesHook {
    /// The cache.
    pub(crate) cache: CacheTarget,
    /// The artifact server (`kiln exec`): its URL and signer.
    pub(crate) artifacts: Option<(String, Signer)>,
    /// `ACTIONS_CACHE_MODE` asked for (default `write`; pull requests from forks get `read`).
    pub(crate) mode: Option<CacheMode>,
    /// Set `ACTIONS_CACHE_URL` to this instead of the server's URL (Forgejo Runner's
    /// `actions_cache_url_override`).
    pub(crate) url_override: Option<String>,
}

fn s<'a>(v: &'a Map<String, Value>, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Whether the event is a pull request from a fork (untrusted code).
fn from_fork(event: &Value) -> bool {
    let head = event.pointer("/pull_request/head/repo/full_name").and_then(Value::as_str);
    let base = event.pointer("/pull_request/base/repo/full_name").and_then(Value::as_str);
    event.pointer("/pull_request/head/repo/fork").and_then(Value::as_bool).unwrap_or(false)
        || matches!((head, base), (Some(h), Some(b)) if h != b)
}

/// The cache scope of a job of the run with this `github` context.
pub(crate) fn scope_of(github: &Map<String, Value>, mode: Option<CacheMode>) -> CacheScope {
    let event = github.get("event").cloned().unwrap_or(Value::Null);
    let default_branch =
        event.pointer("/repository/default_branch").and_then(Value::as_str).unwrap_or("main");
    let event_name = s(github, "event_name");
    let pr_number = event.pointer("/pull_request/number").and_then(Value::as_u64);
    let git_ref = match (s(github, "ref"), pr_number) {
        // A pull request writes to its own merge ref, never to the branch it targets.
        (r, Some(n)) if event_name.starts_with("pull_request") && !r.starts_with("refs/pull/") => {
            format!("refs/pull/{n}/merge")
        }
        ("", _) => format!("refs/heads/{default_branch}"),
        (r, _) => r.to_string(),
    };
    CacheScope {
        repo: s(github, "repository").to_string(),
        write_ref: git_ref,
        read_refs: vec![format!("refs/heads/{default_branch}")],
        mode: kiln_services::cache_mode_for(event_name, from_fork(&event), mode),
    }
}

impl JobEnvProvider for ServicesHook {
    fn job_env(&self, job: &JobEnvRequest<'_>) -> JobEnv {
        self.env_for(job.github, job.job_id)
    }
}

impl ServicesHook {
    /// The variables of job `job_id` of the run with this `github` context, and the values to
    /// mask (the token). The runner's hook trait is a thin adapter over this.
    pub(crate) fn env_for(&self, github: &Map<String, Value>, job_id: &str) -> JobEnv {
        let run = match s(github, "run_id") {
            "" => "0",
            r => r,
        };
        let scope = scope_of(github, self.mode);
        let mut out = JobEnv::default();
        if let CacheTarget::On { url, signer } = &self.cache {
            let info = JobInfo { run: run.into(), job: job_id.into(), cache: Some(scope) };
            let token = signer.job_token(
                &info.run,
                &info.job,
                info.cache.clone(),
                std::time::Duration::from_secs(24 * 3600),
            );
            let cache_url = match &self.url_override {
                Some(u) => u.clone(),
                None => format!("{url}c/{token}/"),
            };
            out.vars.insert("ACTIONS_CACHE_URL".into(), cache_url);
            out.vars.insert(
                "ACTIONS_CACHE_MODE".into(),
                info.cache.as_ref().map_or("write", |c| c.mode.as_str()).into(),
            );
            out.mask.push(token);
        }
        if let Some((url, signer)) = &self.artifacts {
            let info = JobInfo { run: run.into(), job: job_id.into(), cache: None };
            let env = kiln_services::job_env(signer, url, false, true, &info);
            for (k, v) in env {
                if k == "ACTIONS_RUNTIME_TOKEN" {
                    out.mask.push(v.clone());
                }
                out.vars.insert(k, v);
            }
        }
        out
    }
}

/// Options of the embedded servers.
#[derive(Debug, Clone)]
pub(crate) struct Embedded {
    pub(crate) bind: SocketAddr,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) artifact_dir: Option<PathBuf>,
    pub(crate) secret: Option<Vec<u8>>,
}

/// Starts the embedded servers; returns them and their base URL.
pub(crate) async fn start(e: Embedded) -> anyhow::Result<(Services, String)> {
    let services = Services::start(kiln_services::Config {
        bind: e.bind,
        cache: e.cache_dir.map(|d| (d, kiln_services::cache::CacheLimits::default())),
        artifacts: e.artifact_dir,
        secret: e.secret,
    })
    .await
    .context("starting the job services (cache and artifact servers)")?;
    let url = format!("http://{}/", services.addr());
    Ok((services, url))
}

/// The hook for servers started by [`start`].
pub(crate) fn hook_for(
    services: &Services,
    url: &str,
    signer: &Signer,
    mode: Option<CacheMode>,
) -> Arc<ServicesHook> {
    Arc::new(ServicesHook {
        cache: if services.cache().is_some() {
            CacheTarget::On { url: url.to_string(), signer: signer.clone() }
        } else {
            CacheTarget::Off
        },
        artifacts: services.artifacts().map(|_| (url.to_string(), signer.clone())),
        mode,
        url_override: None,
    })
}

/// The cache of `kiln daemon` from the config's `cache:` section: an embedded server, an
/// external one (`external_server`, tokens signed with `secret`), or none.
pub(crate) async fn for_daemon(
    cfg: &kiln_runner::config::CacheConfig,
    docker: bool,
) -> anyhow::Result<(Option<Services>, Option<Arc<dyn JobEnvProvider>>)> {
    if !cfg.enabled {
        return Ok((None, None));
    }
    let secret = cfg.secret.as_ref().map(|s| s.as_bytes().to_vec());
    if let Some(url) = &cfg.external_server {
        let signer = Signer::new(secret.as_deref().unwrap_or_default());
        let hook = ServicesHook {
            cache: CacheTarget::On { url: url.clone(), signer },
            artifacts: None,
            mode: None,
            url_override: cfg.url_override.clone(),
        };
        return Ok((None, Some(Arc::new(hook))));
    }
    let bind = SocketAddr::new(cfg.host.unwrap_or_else(|| default_bind(docker)), cfg.port);
    let dir = cfg.dir.clone().unwrap_or_else(|| kiln_runner::identity::state_dir().join("cache"));
    let (services, url) =
        start(Embedded { bind, cache_dir: Some(dir), artifact_dir: None, secret }).await?;
    let hook = ServicesHook {
        cache: CacheTarget::On { url, signer: services.signer().clone() },
        artifacts: None,
        mode: None,
        url_override: cfg.url_override.clone(),
    };
    Ok((Some(services), Some(Arc::new(hook))))
}

/// `kiln cache-server`: a cache server of its own, shared by several runners (their
/// `cache.external_server`), trusting the tokens signed with the shared secret.
pub(crate) async fn cache_server(
    args: crate::cli::CacheServerArgs,
) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write as _;
    let secret = std::fs::read(&args.secret_file)
        .with_context(|| format!("reading the shared secret {}", args.secret_file.display()))?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        anyhow::bail!(
            "{}: the shared secret is shorter than 16 bytes; write a long random one, e.g. \
             openssl rand -hex 32 > {}",
            args.secret_file.display(),
            args.secret_file.display()
        );
    }
    let dir = args.dir.unwrap_or_else(|| kiln_runner::identity::state_dir().join("cache"));
    let limits = kiln_services::cache::CacheLimits { total: args.max_size, ..Default::default() };
    let services = Services::start(kiln_services::Config {
        bind: args.listen,
        cache: Some((dir, limits)),
        artifacts: args.artifacts,
        secret: Some(secret),
    })
    .await
    .context("starting the cache server")?;
    writeln!(std::io::stdout().lock(), "cache server listening on http://{}/", services.addr())?;
    let stop = tokio_util::sync::CancellationToken::new();
    let force = tokio_util::sync::CancellationToken::new();
    let signals = crate::signals::watch(
        stop.clone(),
        force,
        crate::signals::Messages { first: "stopping the cache server", second: "stopping now" },
    );
    stop.cancelled().await;
    signals.abort();
    services.stop().await;
    Ok(std::process::ExitCode::SUCCESS)
}
