//! The plugins a runner talks to: managed ones it starts as child processes on a private unix
//! socket, and standalone ones it connects to. Each is reached through the SDK's gRPC client and
//! handshaken (protocol version, capabilities) before any job runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_plugin_sdk::client::{self, Endpoint, GrpcBackend};
use kiln_plugin_sdk::{Backend, Capabilities, CapabilitiesRequest, PROTOCOL_VERSION};

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
    /// The client.
    pub backend: Arc<GrpcBackend>,
    /// What it declared at the handshake.
    pub capabilities: Capabilities,
    child: Option<tokio::process::Child>,
}

/// All plugins of a runner, by name.
pub struct Backends {
    plugins: BTreeMap<String, Plugin>,
    socket_dir: Option<tempfile::TempDir>,
}

/// The command of the embedded host plugin: this executable's `plugin host` subcommand.
pub fn embedded_host() -> anyhow::Result<PluginSpec> {
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    Ok(PluginSpec::Managed {
        command: vec![exe.to_string_lossy().into_owned(), "plugin".into(), "host".into()],
        env: BTreeMap::new(),
    })
}

impl Backends {
    /// Starts or connects every plugin and handshakes with it. Fails, naming the plugin, when
    /// one cannot be reached or speaks another protocol version.
    pub async fn start(specs: BTreeMap<String, PluginSpec>) -> anyhow::Result<Backends> {
        let mut backends = Backends { plugins: BTreeMap::new(), socket_dir: None };
        let mut starts = Vec::new();
        for (name, spec) in specs {
            let socket = match &spec {
                PluginSpec::Managed { .. } => Some(backends.socket_path(&name)?),
                PluginSpec::Standalone { .. } => None,
            };
            starts.push(async move {
                let r = start_one(&name, &spec, socket).await;
                (name, r)
            });
        }
        for (name, result) in futures::future::join_all(starts).await {
            let plugin = result.with_context(|| format!("starting plugin {name:?}"))?;
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
        self.plugins.get(name)
    }

    /// Names of all plugins.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    /// Stops managed plugins: closes their stdin (they exit by themselves), then kills what is
    /// left after a short grace.
    pub async fn shutdown(mut self) {
        for plugin in self.plugins.values_mut() {
            if let Some(mut child) = plugin.child.take() {
                drop(child.stdin.take());
                if tokio::time::timeout(Duration::from_secs(3), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

async fn start_one(
    name: &str,
    spec: &PluginSpec,
    socket: Option<PathBuf>,
) -> anyhow::Result<Plugin> {
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
            (Endpoint::Unix(socket), Some(child))
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
    Ok(Plugin { name: name.to_owned(), backend: Arc::new(backend), capabilities: caps, child })
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
        if let Endpoint::Unix(path) = endpoint
            && !path.exists()
            && child.is_some()
        {
            // Not bound yet.
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
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
