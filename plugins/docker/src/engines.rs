//! The Docker engines the plugin talks to: its own (`--docker-host`) and those environments
//! name with the option `docker_host`, each with its client and whether it shares the
//! plugin's filesystem, plus the file of endpoints in use, so that a restarted plugin still
//! lists and removes what it left on every one of them.
//!
//! The file is `STATE/endpoints.json`, one JSON object per line (`endpoint`, `tls_dir`,
//! `seen_at_ms`). An endpoint is written there before the first object is created on it and
//! dropped when its last environment is removed; one that has not answered for
//! [`FORGET_AFTER`] is dropped too (the machine it ran on is gone, and its objects with it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bollard::Docker;
use kiln_plugin_sdk::{Error, Fault, Result};
use serde::{Deserialize, Serialize};

use crate::lock;

/// Engine request timeout (long pulls included).
const DOCKER_TIMEOUT_SECS: u64 = 900;
/// How long connecting to (and negotiating with) an environment's engine may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a listing waits for an environment's engine before leaving it out.
pub(crate) const LIST_TIMEOUT: Duration = Duration::from_secs(3);
/// An endpoint that has not answered for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// An endpoint that did not answer is not asked again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// `seen_at_ms` is rewritten at most this often.
const SEEN_EVERY: Duration = Duration::from_secs(3600);

/// One Docker engine.
pub(crate) struct Engine {
    /// The endpoint as the environment named it; empty for the plugin's own engine.
    pub(crate) endpoint: String,
    pub(crate) docker: Docker,
    /// Containers of this engine see the plugin's files at the same paths: the environment's
    /// state directory is bind-mounted at `/__kiln`, staged and collected files are read and
    /// written on the host. Otherwise `/__kiln` is a volume and every file goes through the
    /// archive API.
    pub(crate) shares_fs: bool,
    /// GOOS and GOARCH of the engine.
    pub(crate) os: String,
    pub(crate) arch: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("endpoint", &self.endpoint)
            .field("shares_fs", &self.shares_fs)
            .finish()
    }
}

impl Engine {
    /// Connects to `endpoint` (`None`: `DOCKER_HOST` or the local socket), negotiates the
    /// API version and reads the engine's platform.
    pub(crate) async fn connect(
        endpoint: Option<&str>,
        tls_dir: Option<&Path>,
        shares_fs: bool,
    ) -> anyhow::Result<Engine> {
        let docker = connect_docker(endpoint, tls_dir)?
            .negotiate_version()
            .await
            .context("negotiating the API version with the docker daemon (is dockerd running?)")?;
        let info = docker.info().await.context("asking the docker daemon for its info")?;
        Ok(Engine {
            endpoint: endpoint.unwrap_or_default().to_owned(),
            docker,
            shares_fs,
            os: info.os_type.unwrap_or_else(|| "linux".to_owned()),
            arch: go_arch(info.architecture.as_deref().unwrap_or("x86_64")),
        })
    }

    /// The endpoint for messages.
    pub(crate) fn name(&self) -> &str {
        if self.endpoint.is_empty() { "the plugin's docker daemon" } else { &self.endpoint }
    }
}

/// GOARCH of an engine's architecture.
fn go_arch(arch: &str) -> String {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
    .to_owned()
}

/// Whether an environment's endpoint shares the plugin's filesystem: a unix socket is on
/// this machine; a tcp, http or https daemon is treated as remote.
pub(crate) fn is_local(endpoint: &str) -> bool {
    endpoint.starts_with("unix://") || endpoint.starts_with('/')
}

/// Checks the syntax of an endpoint (`field` names it in the error).
pub(crate) fn check_endpoint(endpoint: &str, field: &str) -> Result<()> {
    let ok = ["unix:///", "tcp://", "http://", "https://"]
        .iter()
        .any(|p| endpoint.len() > p.len() && endpoint.starts_with(p))
        && !endpoint.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        return Ok(());
    }
    Err(Error::invalid_argument(format!(
        "{field} {endpoint:?} is not a docker endpoint: expected unix:///path, tcp://host:port, \
         http://host:port or https://host:port"
    ))
    .field(field)
    .fault(Fault::Config))
}

/// A client for `endpoint` without negotiating.
pub(crate) fn connect_docker(
    endpoint: Option<&str>,
    tls_dir: Option<&Path>,
) -> anyhow::Result<Docker> {
    let v = bollard::API_DEFAULT_VERSION;
    let from_env = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
    let host = endpoint.map(str::to_owned).or(from_env);
    let docker = match host.as_deref() {
        None => Docker::connect_with_unix("unix:///var/run/docker.sock", DOCKER_TIMEOUT_SECS, v)
            .context(
                "connecting to the docker daemon at /var/run/docker.sock (is dockerd running? \
                 set --docker-host)",
            )?,
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, DOCKER_TIMEOUT_SECS, v)
                .with_context(|| format!("connecting to the docker daemon at {h}"))?
        }
        Some(h) if h.starts_with("tcp://") || h.starts_with("https://") => match tls_dir {
            Some(dir) => Docker::connect_with_ssl(
                h,
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                DOCKER_TIMEOUT_SECS,
                v,
            )
            .with_context(|| {
                format!("connecting to the docker daemon at {h} with TLS from {}", dir.display())
            })?,
            None if h.starts_with("tcp://") => Docker::connect_with_http(h, DOCKER_TIMEOUT_SECS, v)
                .with_context(|| format!("connecting to the docker daemon at {h}"))?,
            None => anyhow::bail!("{h}: https needs a TLS directory (--docker-tls-dir)"),
        },
        Some(h) if h.starts_with("http://") => Docker::connect_with_http(h, DOCKER_TIMEOUT_SECS, v)
            .with_context(|| format!("connecting to the docker daemon at {h}"))?,
        Some(h) => {
            anyhow::bail!("{h}: expected unix:///path, tcp://host:port or http://host:port")
        }
    };
    Ok(docker)
}

/// One line of the endpoints file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Known {
    endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_dir: Option<PathBuf>,
    #[serde(default)]
    seen_at_ms: i64,
}

/// The plugin's engines.
pub(crate) struct Engines {
    /// The plugin's own engine.
    pub(crate) default: Arc<Engine>,
    /// `STATE/endpoints.json`.
    file: PathBuf,
    /// The TLS directory of tcp endpoints named without one (`--docker-tls-dir`).
    default_tls: Option<PathBuf>,
    /// Connected environment engines, by endpoint.
    clients: tokio::sync::Mutex<HashMap<String, Arc<Engine>>>,
    /// The endpoints file's contents.
    known: Mutex<Vec<Known>>,
    /// Endpoints that did not answer, and when.
    silent_since: Mutex<HashMap<String, std::time::Instant>>,
}

impl Engines {
    /// The engines, with the endpoints file of `state_dir` read (lines that do not parse are
    /// reported and dropped).
    pub(crate) fn new(default: Engine, state_dir: &Path, default_tls: Option<PathBuf>) -> Engines {
        let file = state_dir.join("endpoints.json");
        let mut known = Vec::new();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    match serde_json::from_str::<Known>(line) {
                        Ok(k) if check_endpoint(&k.endpoint, "endpoint").is_ok() => known.push(k),
                        Ok(k) => tracing::warn!(
                            file = %file.display(), line = n + 1, endpoint = %k.endpoint,
                            "ignoring an invalid endpoint"
                        ),
                        Err(e) => tracing::warn!(
                            file = %file.display(), line = n + 1, error = %e,
                            "ignoring a line that is not an endpoint record"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read the endpoints file")
            }
        }
        Engines {
            default: Arc::new(default),
            file,
            default_tls,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            known: Mutex::new(known),
            silent_since: Mutex::new(HashMap::new()),
        }
    }

    /// The engine of `endpoint` (empty: the plugin's own), connected on first use.
    pub(crate) async fn get(&self, endpoint: &str, tls_dir: Option<&Path>) -> Result<Arc<Engine>> {
        if endpoint.is_empty() {
            return Ok(Arc::clone(&self.default));
        }
        let mut clients = self.clients.lock().await;
        if let Some(e) = clients.get(endpoint) {
            return Ok(Arc::clone(e));
        }
        let tls = tls_dir.map(Path::to_path_buf).or_else(|| self.tls_of(endpoint));
        let tls = tls.or_else(|| self.default_tls.clone());
        let connect = Engine::connect(Some(endpoint), tls.as_deref(), is_local(endpoint));
        let engine = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(e)) => Arc::new(e),
            Ok(Err(e)) => {
                return Err(Error::unavailable(format!(
                    "docker endpoint {endpoint}: {e:#}; check that its daemon runs and is \
                     reachable from the plugin"
                ))
                .field("options.docker_host"));
            }
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "docker endpoint {endpoint} did not answer within {}s; check that its \
                     daemon runs and is reachable from the plugin",
                    CONNECT_TIMEOUT.as_secs()
                ))
                .field("options.docker_host"));
            }
        };
        clients.insert(endpoint.to_owned(), Arc::clone(&engine));
        Ok(engine)
    }

    fn tls_of(&self, endpoint: &str) -> Option<PathBuf> {
        lock(&self.known).iter().find(|k| k.endpoint == endpoint).and_then(|k| k.tls_dir.clone())
    }

    /// Records `endpoint` in the endpoints file (before anything is created there).
    pub(crate) fn remember(&self, endpoint: &str, tls_dir: Option<&Path>) -> Result<()> {
        let mut known = lock(&self.known);
        let now = crate::labels::now_ms();
        if let Some(k) = known.iter_mut().find(|k| k.endpoint == endpoint) {
            let fresh = now - k.seen_at_ms < SEEN_EVERY.as_millis() as i64;
            if fresh && k.tls_dir.as_deref() == tls_dir {
                return Ok(());
            }
            k.seen_at_ms = now;
            k.tls_dir = tls_dir.map(Path::to_path_buf);
        } else {
            known.push(Known {
                endpoint: endpoint.to_owned(),
                tls_dir: tls_dir.map(Path::to_path_buf),
                seen_at_ms: now,
            });
        }
        self.write(&known)
    }

    /// Drops `endpoint` from the endpoints file.
    pub(crate) fn forget(&self, endpoint: &str) {
        let mut known = lock(&self.known);
        let before = known.len();
        known.retain(|k| k.endpoint != endpoint);
        if known.len() != before {
            if let Err(e) = self.write(&known) {
                tracing::warn!(error = %e, "cannot rewrite the endpoints file");
            }
            tracing::info!(%endpoint, "docker endpoint forgotten: no environment left on it");
        }
    }

    fn write(&self, known: &[Known]) -> Result<()> {
        let mut text = String::new();
        for k in known {
            text.push_str(&serde_json::to_string(k).unwrap_or_default());
            text.push('\n');
        }
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|e| Error::io(format!("writing {}", self.file.display()), &e))
    }

    /// The endpoints environments use besides the plugin's own.
    pub(crate) fn endpoints(&self) -> Vec<String> {
        lock(&self.known).iter().map(|k| k.endpoint.clone()).collect()
    }

    /// Every engine that answers within [`LIST_TIMEOUT`]: the plugin's own first, then those
    /// of the endpoints file (one that did not answer is asked again after [`RETRY_AFTER`]).
    /// An endpoint silent for [`FORGET_AFTER`] is forgotten.
    pub(crate) async fn reachable(&self) -> Vec<Arc<Engine>> {
        let mut out = vec![Arc::clone(&self.default)];
        let endpoints: Vec<String> = {
            let silent = lock(&self.silent_since);
            self.endpoints()
                .into_iter()
                .filter(|e| silent.get(e).is_none_or(|t| t.elapsed() >= RETRY_AFTER))
                .collect()
        };
        let probes = endpoints.iter().map(|endpoint| async move {
            let got =
                tokio::time::timeout(LIST_TIMEOUT, async {
                    let engine = self.get(endpoint, None).await?;
                    engine.docker.ping().await.map_err(|e| {
                        Error::unavailable(format!("docker endpoint {endpoint}: {e}"))
                    })?;
                    Ok::<_, Error>(engine)
                })
                .await;
            (endpoint, got)
        });
        for (endpoint, got) in futures::future::join_all(probes).await {
            match got {
                Ok(Ok(engine)) => {
                    lock(&self.silent_since).remove(endpoint.as_str());
                    self.seen(endpoint);
                    out.push(engine);
                }
                Ok(Err(e)) => self.silent(endpoint, &e.to_string()),
                Err(_) => self.silent(endpoint, "no answer"),
            }
        }
        out
    }

    /// Notes that `endpoint` answered (only when it is still in the file: a concurrent
    /// removal may have dropped it).
    fn seen(&self, endpoint: &str) {
        let mut known = lock(&self.known);
        let now = crate::labels::now_ms();
        let Some(k) = known.iter_mut().find(|k| k.endpoint == endpoint) else { return };
        if now - k.seen_at_ms < SEEN_EVERY.as_millis() as i64 {
            return;
        }
        k.seen_at_ms = now;
        if let Err(e) = self.write(&known) {
            tracing::warn!(error = %e, "cannot update the endpoints file");
        }
    }

    fn silent(&self, endpoint: &str, why: &str) {
        lock(&self.silent_since).insert(endpoint.to_owned(), std::time::Instant::now());
        let seen = lock(&self.known).iter().find(|k| k.endpoint == endpoint).map(|k| k.seen_at_ms);
        let silent_for = crate::labels::now_ms() - seen.unwrap_or(0);
        if silent_for > FORGET_AFTER.as_millis() as i64 {
            tracing::warn!(%endpoint, %why, "docker endpoint silent for a day: forgetting it");
            self.forget(endpoint);
        } else {
            tracing::warn!(%endpoint, %why, "docker endpoint not reachable: its environments are not listed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        for ok in ["unix:///run/d.sock", "tcp://10.0.0.2:2376", "http://h:2375", "https://h:1"] {
            assert!(check_endpoint(ok, "options.docker_host").is_ok(), "{ok}");
        }
        for bad in ["", "tcp://", "ssh://h", "/run/d.sock", "tcp://a b:1", "unix://"] {
            let e = check_endpoint(bad, "options.docker_host").unwrap_err();
            assert_eq!(e.field.as_deref(), Some("options.docker_host"), "{bad}");
            assert!(e.message.contains("expected unix:///path"), "{bad}: {}", e.message);
        }
        assert!(is_local("unix:///run/d.sock"));
        assert!(!is_local("tcp://127.0.0.1:2375"));
    }

    fn engine() -> Engine {
        Engine {
            endpoint: String::new(),
            docker: connect_docker(Some("http://127.0.0.1:9"), None).unwrap(),
            shares_fs: true,
            os: "linux".into(),
            arch: "amd64".into(),
        }
    }

    #[tokio::test]
    async fn a_silent_endpoint_is_left_out_asked_again_later_and_forgotten_after_a_day() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens on port 9 of 127.0.0.1: connecting is refused at once.
        let old = crate::labels::now_ms() - 2 * FORGET_AFTER.as_millis() as i64;
        let lines = format!(
            "{{\"endpoint\":\"tcp://127.0.0.1:9\",\"seen_at_ms\":{}}}\n\
             {{\"endpoint\":\"http://127.0.0.1:9\",\"seen_at_ms\":{old}}}\n",
            crate::labels::now_ms()
        );
        std::fs::write(dir.path().join("endpoints.json"), lines).unwrap();
        let engines = Engines::new(engine(), dir.path(), None);
        let reachable = engines.reachable().await;
        assert_eq!(reachable.len(), 1, "only the plugin's own engine");
        assert!(reachable[0].endpoint.is_empty());
        // The recent one stays, the one silent for two days is forgotten.
        assert_eq!(engines.endpoints(), ["tcp://127.0.0.1:9"]);
        // Asked again only after RETRY_AFTER.
        assert!(lock(&engines.silent_since).contains_key("tcp://127.0.0.1:9"));
        let started = std::time::Instant::now();
        assert_eq!(engines.reachable().await.len(), 1);
        assert!(started.elapsed() < Duration::from_millis(50), "{:?}", started.elapsed());
        let e = engines.get("tcp://127.0.0.1:9", None).await.unwrap_err();
        assert!(e.message.contains("tcp://127.0.0.1:9"), "{}", e.message);
    }

    #[tokio::test]
    async fn the_endpoints_file_survives_a_restart_and_drops_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let a = Engines::new(engine(), dir.path(), None);
        a.remember("tcp://10.0.0.2:2376", Some(Path::new("/etc/kiln/vm-tls"))).unwrap();
        a.remember("unix:///run/other.sock", None).unwrap();
        a.remember("tcp://10.0.0.2:2376", Some(Path::new("/etc/kiln/vm-tls"))).unwrap();
        let file = dir.path().join("endpoints.json");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("not json\n{\"endpoint\": \"ssh://x\"}\n");
        std::fs::write(&file, text).unwrap();

        let b = Engines::new(engine(), dir.path(), None);
        assert_eq!(b.endpoints(), ["tcp://10.0.0.2:2376", "unix:///run/other.sock"]);
        assert_eq!(b.tls_of("tcp://10.0.0.2:2376").as_deref(), Some(Path::new("/etc/kiln/vm-tls")));
        b.forget("tcp://10.0.0.2:2376");
        let c = Engines::new(engine(), dir.path(), None);
        assert_eq!(c.endpoints(), ["unix:///run/other.sock"]);
    }
}
