//! A plugin process the suite starts itself (the managed shape of rule 13): a private unix
//! socket, stdin kept as a pipe (`--exit-on-stdin-eof`), readiness by answering
//! Capabilities, and kill / restart for the faults tier.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, ChildStdin, Command};

use crate::backend::{Backend, CapabilitiesRequest, PROTOCOL_VERSION};
use crate::client::{Endpoint, connect};
use crate::error::{Error, Result};

use super::PluginControl;

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// A plugin process started by the suite on a private unix socket. Implements
/// [`PluginControl`]; the process is killed when this is dropped.
pub struct ManagedPlugin {
    argv: Vec<String>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    ready_timeout: Duration,
    running: tokio::sync::Mutex<Option<Running>>,
}

impl ManagedPlugin {
    /// Starts `argv` with `--listen unix://<private dir>/p.sock --exit-on-stdin-eof` appended,
    /// its stdin a pipe, and waits up to `ready_timeout` for it to answer Capabilities. The
    /// plugin's stdout and stderr are appended to `log` (a file in the private directory when
    /// `None`).
    pub async fn start(
        argv: Vec<String>,
        log: Option<PathBuf>,
        ready_timeout: Duration,
    ) -> Result<(ManagedPlugin, Arc<dyn Backend>)> {
        if argv.is_empty() {
            return Err(Error::invalid_argument("the plugin command is empty"));
        }
        let dir = tempfile::Builder::new()
            .prefix("kiln-conformance-")
            .tempdir()
            .map_err(|e| Error::io("creating a private socket directory", &e))?;
        let socket = dir.path().join("p.sock");
        let log = log.unwrap_or_else(|| dir.path().join("plugin.log"));
        let plugin = ManagedPlugin {
            argv,
            dir,
            socket,
            log,
            ready_timeout,
            running: tokio::sync::Mutex::new(None),
        };
        let backend = plugin.spawn().await?;
        Ok((plugin, backend))
    }

    /// Where the plugin listens.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    /// The file holding the plugin's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The private directory (socket and default log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the plugin's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn spawn(&self) -> Result<Arc<dyn Backend>> {
        let open = || {
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).map_err(|e| {
                Error::io(format!("opening the plugin log {}", self.log.display()), &e)
            })
        };
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .arg("--listen")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--exit-on-stdin-eof")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(open()?))
            .stderr(Stdio::from(open()?))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting the plugin {:?}", self.argv.join(" ")), &e))?;
        let stdin = child.stdin.take();
        *self.running.lock().await = Some(Running { child, stdin });

        let deadline = Instant::now() + self.ready_timeout;
        let mut last = String::from("the socket did not appear");
        loop {
            {
                let mut guard = self.running.lock().await;
                if let Some(r) = guard.as_mut()
                    && let Ok(Some(status)) = r.child.try_wait()
                {
                    *guard = None;
                    return Err(Error::unavailable(format!(
                        "the plugin {:?} exited ({status}) before answering; its log:\n{}",
                        self.argv.join(" "),
                        self.log_tail(20)
                    )));
                }
            }
            if self.socket.exists() {
                match self.probe().await {
                    Ok(backend) => return Ok(backend),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                self.kill_now().await;
                return Err(Error::unavailable(format!(
                    "the plugin {:?} did not answer Capabilities within {:?} ({last}); its log:\n{}",
                    self.argv.join(" "),
                    self.ready_timeout,
                    self.log_tail(20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn probe(&self) -> Result<Arc<dyn Backend>> {
        let backend = connect(&self.endpoint(), "plugin", Duration::from_secs(2)).await?;
        let request = CapabilitiesRequest {
            client_name: "kiln-conformance".to_owned(),
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_versions: vec![PROTOCOL_VERSION],
        };
        match tokio::time::timeout(Duration::from_secs(2), backend.capabilities(request)).await {
            Ok(Ok(_)) => Ok(Arc::new(backend)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::unavailable("capabilities did not answer within 2s")),
        }
    }

    async fn kill_now(&self) {
        if let Some(mut r) = self.running.lock().await.take() {
            let _ = r.child.start_kill();
            let _ = r.child.wait().await;
        }
    }

    /// Closes the plugin's stdin (it should exit), waits up to five seconds, then kills it.
    pub async fn shutdown(&self) {
        let taken = self.running.lock().await.take();
        if let Some(mut r) = taken {
            drop(r.stdin.take());
            if tokio::time::timeout(Duration::from_secs(5), r.child.wait()).await.is_err() {
                let _ = r.child.start_kill();
                let _ = r.child.wait().await;
            }
        }
    }
}

#[async_trait::async_trait]
impl PluginControl for ManagedPlugin {
    async fn kill(&self) -> Result<()> {
        let mut guard = self.running.lock().await;
        let Some(r) = guard.as_mut() else {
            return Err(Error::failed_precondition("the plugin is not running"));
        };
        r.child.start_kill().map_err(|e| Error::io("killing the plugin", &e))?;
        r.child.wait().await.map_err(|e| Error::io("waiting for the plugin", &e))?;
        *guard = None;
        Ok(())
    }

    async fn restart(&self) -> Result<Arc<dyn Backend>> {
        self.kill_now().await;
        self.spawn().await
    }

    async fn terminate(&self, within: Duration) -> Result<bool> {
        let taken = self.running.lock().await.take();
        let Some(mut r) = taken else {
            return Err(Error::failed_precondition("the plugin is not running"));
        };
        if let Some(pid) = r.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let exited = tokio::time::timeout(within, r.child.wait()).await.is_ok();
        if !exited {
            let _ = r.child.start_kill();
            let _ = r.child.wait().await;
        }
        Ok(exited)
    }

    async fn close_stdin(&self, within: Duration) -> Result<bool> {
        let taken = self.running.lock().await.take();
        let Some(mut r) = taken else {
            return Err(Error::failed_precondition("the plugin is not running"));
        };
        drop(r.stdin.take());
        let exited = tokio::time::timeout(within, r.child.wait()).await.is_ok();
        if !exited {
            let _ = r.child.start_kill();
            let _ = r.child.wait().await;
        }
        Ok(exited)
    }
}
