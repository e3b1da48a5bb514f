//! The plugins a runner talks to: managed ones it starts as child processes on a private unix
//! socket (and restarts with backoff when they die), and standalone ones it connects to. Each is
//! reached through the SDK's gRPC client and handshaken (protocol version, capabilities) before
//! any job runs. Also the garbage collector: what this runner owns but no longer runs, and what
//! expired, is removed at start and after a plugin restart (rule 9).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_plugin_sdk::client::{self, Endpoint, GrpcBackend};
use kiln_plugin_sdk::{
    Backend, Capabilities, CapabilitiesRequest, PROTOCOL_VERSION, RemoveRequest, Selector,
};
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;

/// Resources younger than this are never collected: their Create may still be in flight.
const GC_GRACE: Duration = Duration::from_secs(120);
/// How long a managed plugin may take to exit after its stdin closes before it is killed.
const PLUGIN_EXIT_GRACE: Duration = Duration::from_secs(30);

/// How to reach one plugin.
#[derive(Debug, Clone)]
pub enum PluginSpec {
    /// kiln starts `command` with `--listen unix://<private socket> --exit-on-stdin-eof`.
    Managed {
        /// Program and arguments.
        command: Vec<String>,
        /// Extra environment for the child.
        env: BTreeMap<String, String>,
    },
    /// A long-lived server kiln connects to.
    Standalone {
        /// Where it listens.
        endpoint: Endpoint,
    },
}

/// A connected plugin.
pub struct Plugin {
    /// Its name in the configuration.
    pub name: String,
    /// What it declared at the handshake.
    pub capabilities: Capabilities,
    client: RwLock<Arc<GrpcBackend>>,
}

impl Plugin {
    /// The current client (replaced when a managed plugin is restarted).
    pub fn client(&self) -> Arc<GrpcBackend> {
        self.client.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// All plugins of a runner, by name, and the environments its jobs are using.
pub struct Backends {
    plugins: BTreeMap<String, Arc<Plugin>>,
    socket_dir: Option<tempfile::TempDir>,
    active: Arc<Mutex<BTreeSet<String>>>,
    stop: CancellationToken,
    monitors: tokio::task::JoinSet<()>,
}

/// The command of the embedded host plugin: this executable's `plugin host` subcommand.
pub fn embedded_host() -> anyhow::Result<PluginSpec> {
    embedded_plugin("host")
}

/// A first-party plugin served by this executable (`kiln plugin <name>`: host, docker, lxc, test).
pub fn embedded_plugin(name: &str) -> anyhow::Result<PluginSpec> {
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    Ok(PluginSpec::Managed {
        command: vec![exe.to_string_lossy().into_owned(), "plugin".into(), name.into()],
        env: BTreeMap::new(),
    })
}

impl Backends {
    /// Starts or connects every plugin and handshakes with it. Fails, naming the plugin, when
    /// one cannot be reached or speaks another protocol version. Managed plugins that die later
    /// are restarted with backoff; after a restart, `identity`'s orphans are collected.
    pub async fn start(
        specs: BTreeMap<String, PluginSpec>,
        identity: &Identity,
    ) -> anyhow::Result<Backends> {
        let mut backends = Backends {
            plugins: BTreeMap::new(),
            socket_dir: None,
            active: Arc::default(),
            stop: CancellationToken::new(),
            monitors: tokio::task::JoinSet::new(),
        };
        let mut starts = Vec::new();
        for (name, spec) in specs {
            let socket = match &spec {
                PluginSpec::Managed { .. } => Some(backends.socket_path(&name)?),
                PluginSpec::Standalone { .. } => None,
            };
            starts.push(async move {
                let r = start_one(&name, &spec, socket.as_ref()).await;
                (name, spec, socket, r)
            });
        }
        for (name, spec, socket, result) in futures::future::join_all(starts).await {
            let (client, caps, child) =
                result.with_context(|| format!("starting plugin {name:?}"))?;
            let plugin = Arc::new(Plugin {
                name: name.clone(),
                capabilities: caps,
                client: RwLock::new(Arc::new(client)),
            });
            if let (Some(child), Some(socket)) = (child, socket) {
                let mut child = child;
                let stdin = child.stdin.take();
                let monitor = Monitor {
                    plugin: plugin.clone(),
                    child,
                    stdin,
                    spec,
                    socket,
                    identity: identity.clone(),
                    active: backends.active.clone(),
                    stop: backends.stop.clone(),
                };
                backends.monitors.spawn(monitor.run());
            }
            backends.plugins.insert(name, plugin);
        }
        Ok(backends)
    }

    fn socket_path(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        if self.socket_dir.is_none() {
            let dir = tempfile::Builder::new()
                .prefix("kiln-")
                .tempdir()
                .context("creating a private directory for plugin sockets")?;
            self.socket_dir = Some(dir);
        }
        let dir = self.socket_dir.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_default();
        Ok(dir.join(format!("{name}.sock")))
    }

    /// The plugin named `name`.
    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.plugins.get(name).map(|p| &**p)
    }

    /// Checks at start that every label's backend is configured and can create execution
    /// environments, so a misconfigured runner fails now, naming the label, the backend and
    /// the missing capability, rather than when its first job arrives.
    pub fn check_labels(&self, labels: &[crate::labels::LabelConfig]) -> anyhow::Result<()> {
        for l in labels {
            if l.backend == crate::labels::SKIP {
                continue;
            }
            let backend = if l.backend.is_empty() { "host" } else { l.backend.as_str() };
            let Some(plugin) = self.get(backend) else {
                bail!(
                    "label {:?}: backend {backend:?} is not configured; add it under plugins:",
                    l.name
                );
            };
            if !plugin.capabilities.environment.is_supported() {
                let detail = match &plugin.capabilities.environment {
                    kiln_plugin_sdk::LayerSupport::Unsupported(d) if !d.is_empty() => {
                        format!(": {d}")
                    }
                    _ => String::new(),
                };
                bail!(
                    "label {:?}: plugin {backend:?} does not support the capability \
                     `environment` (execution environments){detail}",
                    l.name
                );
            }
        }
        Ok(())
    }

    /// Names of all plugins.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    /// Marks an environment as in use by a job (before its Create), so garbage collection
    /// leaves it alone.
    pub fn claim(&self, environment_id: &str) {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(environment_id.to_owned());
    }

    /// The job is done with an environment (after its Remove, successful or not).
    pub fn release(&self, environment_id: &str) {
        self.active.lock().unwrap_or_else(PoisonError::into_inner).remove(environment_id);
    }

    /// Removes, on every plugin, what `identity`'s runner owns but no job of this process uses
    /// (left by a dead kiln process, or by a job whose plugin crashed), and what has expired.
    /// Returns how many environments were removed.
    pub async fn collect_garbage(&self, identity: &Identity) -> usize {
        let mut removed = 0;
        for plugin in self.plugins.values() {
            removed += collect_on(plugin, identity, &self.active).await;
        }
        removed
    }

    /// Stops managed plugins: closes their stdin (they exit by themselves, after finishing
    /// their pending deletions), then kills what is left after 30 s.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.monitors.join_next().await.is_some() {}
    }
}

async fn collect_on(
    plugin: &Plugin,
    identity: &Identity,
    active: &Mutex<BTreeSet<String>>,
) -> usize {
    let client = plugin.client();
    let now = kiln_plugin_sdk::time::now_ms();
    let grace = i64::try_from(GC_GRACE.as_millis()).unwrap_or(i64::MAX);
    let envs = match client.list_environments(Selector::default()).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(plugin = %plugin.name, error = %e, "listing environments for garbage collection");
            return 0;
        }
    };
    let mut removed = 0;
    for env in envs {
        let owner = &env.owner;
        let ours = owner.runner_id == identity.runner_id;
        let in_use = active.lock().unwrap_or_else(PoisonError::into_inner).contains(&env.id);
        let young = owner.created_at_unix_ms > 0 && now - owner.created_at_unix_ms < grace;
        let expired = owner.expires_at_unix_ms > 0 && owner.expires_at_unix_ms < now;
        let orphan = ours
            && !in_use
            && if owner.boot_id == identity.boot_id {
                // Ours, this process, no job uses it: its job's Remove failed (plugin crash).
                true
            } else {
                !crate::identity::boot_alive(&owner.boot_id)
            };
        let collect = orphan || (expired && !in_use && !young);
        if !collect {
            continue;
        }
        let request = RemoveRequest {
            environment_id: env.id.clone(),
            container_id: None,
            grace: Duration::from_secs(2),
        };
        match client.remove(request).await {
            Ok(_) => {
                removed += 1;
                tracing::info!(plugin = %plugin.name, environment = %env.id, boot = %owner.boot_id, "removed a leftover environment");
            }
            Err(e) => {
                tracing::warn!(plugin = %plugin.name, environment = %env.id, error = %e, "could not remove a leftover environment")
            }
        }
    }
    removed
}

/// Watches a managed plugin; when it dies, restarts it with backoff, swaps the client, and
/// collects what the dead instance left.
struct Monitor {
    plugin: Arc<Plugin>,
    child: tokio::process::Child,
    /// The write end of the child's stdin, held here: `Child::wait` would close it, and the
    /// plugin exits when it closes.
    stdin: Option<tokio::process::ChildStdin>,
    spec: PluginSpec,
    socket: PathBuf,
    identity: Identity,
    active: Arc<Mutex<BTreeSet<String>>>,
    stop: CancellationToken,
}

impl Monitor {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let status = tokio::select! {
                status = self.child.wait() => status,
                _ = self.stop.cancelled() => {
                    drop(self.stdin.take());
                    // A plugin finishes deleting what its Removes put out of reach before it
                    // exits (§5.12): give that time; a plugin that hangs is killed.
                    if tokio::time::timeout(PLUGIN_EXIT_GRACE, self.child.wait()).await.is_err() {
                        let _ = self.child.kill().await;
                    }
                    return;
                }
            };
            match status {
                Ok(status) => {
                    tracing::warn!(plugin = %self.plugin.name, %status, "plugin exited; restarting it")
                }
                Err(e) => {
                    tracing::warn!(plugin = %self.plugin.name, error = %e, "lost the plugin process; restarting it")
                }
            }
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                match start_one(&self.plugin.name, &self.spec, Some(&self.socket)).await {
                    Ok((client, _caps, Some(mut child))) => {
                        *self.plugin.client.write().unwrap_or_else(PoisonError::into_inner) =
                            Arc::new(client);
                        self.stdin = child.stdin.take();
                        self.child = child;
                        backoff = Duration::from_millis(100);
                        let removed = collect_on(&self.plugin, &self.identity, &self.active).await;
                        tracing::info!(plugin = %self.plugin.name, removed, "plugin restarted");
                        crate::metrics::global().plugin_restarted(&self.plugin.name);
                        break;
                    }
                    Ok((_, _, None)) => return,
                    Err(e) => {
                        tracing::warn!(plugin = %self.plugin.name, error = %format!("{e:#}"), ?backoff, "restarting the plugin failed");
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }
}

async fn start_one(
    name: &str,
    spec: &PluginSpec,
    socket: Option<&PathBuf>,
) -> anyhow::Result<(GrpcBackend, Capabilities, Option<tokio::process::Child>)> {
    let (endpoint, mut child) = match spec {
        PluginSpec::Standalone { endpoint } => (endpoint.clone(), None),
        PluginSpec::Managed { command, env } => {
            let socket = socket.context("no socket path")?;
            let Some((program, args)) = command.split_first() else {
                bail!("plugin {name:?}: the command is empty");
            };
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .arg("--listen")
                .arg(format!("unix://{}", socket.display()))
                .arg("--exit-on-stdin-eof")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true);
            if std::env::var_os("KILN_LOG").is_none() {
                cmd.env("KILN_LOG", "warn");
            }
            cmd.envs(env);
            let child = cmd.spawn().with_context(|| format!("running {}", command.join(" ")))?;
            (Endpoint::Unix(socket.clone()), Some(child))
        }
    };
    let backend = wait_connect(name, &endpoint, child.as_mut()).await?;
    let caps = backend
        .capabilities(CapabilitiesRequest {
            client_name: "kiln".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            protocol_versions: vec![PROTOCOL_VERSION],
        })
        .await
        .map_err(|e| anyhow::anyhow!("plugin {name:?} at {endpoint}: handshake failed: {e}"))?;
    if caps.protocol_version != PROTOCOL_VERSION {
        bail!(
            "plugin {name:?} speaks protocol version {}, kiln speaks {PROTOCOL_VERSION}: upgrade \
             one of them",
            caps.protocol_version
        );
    }
    tracing::debug!(plugin = %name, version = %caps.plugin_version, instance = %caps.instance_id, "plugin ready");
    Ok((backend, caps, child))
}

/// Connects, retrying while a managed plugin starts up (bounded: 15 s).
async fn wait_connect(
    name: &str,
    endpoint: &Endpoint,
    mut child: Option<&mut tokio::process::Child>,
) -> anyhow::Result<GrpcBackend> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut delay = Duration::from_millis(2);
    loop {
        let mut pause = delay;
        if let Endpoint::Unix(path) = endpoint
            && !path.exists()
            && child.is_some()
        {
            // Not bound yet: a stat is cheap, and the plugin binds within milliseconds, so look
            // again soon (a start-up is on every `kiln exec`'s critical path).
            pause = Duration::from_millis(1);
        } else {
            match client::connect(endpoint, name, Duration::from_secs(5)).await {
                Ok(b) => return Ok(b),
                Err(e) if Instant::now() > deadline => {
                    bail!("plugin {name:?} did not answer at {endpoint} within 15s: {e}")
                }
                Err(_) => {}
            }
        }
        if let Some(child) = child.as_deref_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("plugin {name:?} exited during start-up ({status}); see its messages above");
        }
        if Instant::now() > deadline {
            bail!("plugin {name:?} did not create its socket {endpoint} within 15s");
        }
        tokio::time::sleep(pause).await;
        if pause == delay {
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }
}
