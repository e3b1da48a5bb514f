//! The [`Machine`] of the QEMU plugin: one VM per environment, in its state directory
//! `ROOT/<environment id>/`:
//!
//! - `meta.json`: the owner labels, the spec hash, image, accelerator and forwarded ports,
//!   written before QEMU starts (so a plugin killed during a boot leaves a record to reap);
//! - `overlay.qcow2`: the job's disk, a copy-on-write overlay of the image (never written);
//! - `config.img`: the read-only config drive (ext4 by `mkfs.ext4 -d`, no loop mount): the
//!   kiln binary the agent runs, `config.env`, the guest's certificates;
//! - `tls/`: the client pair and CA of this VM (`ca.pem`, `cert.pem`, `key.pem`: the names the
//!   docker plugin's `docker_tls_dir` wants);
//! - `qemu.pid`, `console.log` (the serial console), `qemu.log` (QEMU's own stderr).
//!
//! Remove (destroy) stops QEMU and deletes the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_plugin_sdk::backend::{
    Backend, Capabilities, CapabilitiesRequest, EnvironmentRequest, EnvironmentSummary, Features,
    LayerSupport, PROTOCOL_VERSION, Selector,
};
use kiln_plugin_sdk::client::{Endpoint, GrpcBackend};
use kiln_plugin_sdk::forward::{Machine, Provisioned};
use kiln_plugin_sdk::record::StoredOwner;
use kiln_plugin_sdk::server::TlsFiles;
use kiln_plugin_sdk::{Error, Fault, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::vm::{self, Accel, Launch};
use crate::{QemuConfig, certs};

/// Lines of the console log an error shows.
const CONSOLE_LINES: usize = 25;

/// The record of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    spec_hash: String,
    image: String,
    accel: String,
    agent_port: u16,
    docker_port: u16,
    owner: StoredOwner,
}

/// Why a boot failed, and whether QEMU crashed (died by a signal) doing it.
struct BootFailure {
    error: Error,
    crashed: bool,
}

/// A VM's options, validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VmOptions {
    pub(crate) image: String,
    pub(crate) cpus: u32,
    pub(crate) memory_mb: u32,
    pub(crate) disk_gb: u32,
    pub(crate) boot_timeout: Duration,
}

fn int_option(
    value: &serde_json::Value,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u32> {
    let field = format!("options.{key}");
    let n = value.as_u64().or_else(|| value.as_str().and_then(|s| s.parse().ok()));
    match n {
        Some(n) if range.contains(&n) => Ok(n as u32),
        _ => Err(Error::invalid_argument(format!(
            "{field} must be an integer from {} to {}, got {value}",
            range.start(),
            range.end()
        ))
        .field(field)),
    }
}

/// Parses the label's options: `image` (or the label's `qemu://IMAGE` args), `cpus` (1–64),
/// `memory_mb` (256–262144), `disk_gb` (0 = the image's size, else at least it, to 4096),
/// `boot_timeout_secs` (5–3600).
pub(crate) fn parse_options(
    options: &serde_json::Map<String, serde_json::Value>,
    defaults: &QemuConfig,
) -> Result<VmOptions> {
    let mut o = VmOptions {
        image: vm::DEFAULT_IMAGE.to_owned(),
        cpus: defaults.cpus,
        memory_mb: defaults.memory_mb,
        disk_gb: 0,
        boot_timeout: defaults.boot_timeout,
    };
    for (key, value) in options {
        match key.as_str() {
            "image" | "args" => match value.as_str() {
                Some(s) if !s.is_empty() => o.image = s.to_owned(),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "options.{key} must name an image, e.g. \"debian-bookworm\""
                    ))
                    .field(format!("options.{key}")));
                }
            },
            "cpus" => o.cpus = int_option(value, key, 1..=64)?,
            "memory_mb" => o.memory_mb = int_option(value, key, 256..=262_144)?,
            "disk_gb" => o.disk_gb = int_option(value, key, 0..=4096)?,
            "boot_timeout_secs" => {
                o.boot_timeout = Duration::from_secs(int_option(value, key, 5..=3600)?.into())
            }
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unknown option {key:?}; the qemu plugin takes image, cpus, memory_mb, \
                     disk_gb and boot_timeout_secs"
                ))
                .field(format!("options.{key}")));
            }
        }
    }
    Ok(o)
}

fn spec_hash(request: &EnvironmentRequest, options: &VmOptions) -> String {
    let o = &request.owner;
    let spec = serde_json::json!({
        "label": request.label,
        "options": [options.image, options.cpus, options.memory_mb, options.disk_gb],
        "owner": [o.runner_id, o.boot_id, o.job_id, o.parent_environment_id, o.expires_at_unix_ms, o.labels],
    });
    hex::encode(Sha256::digest(serde_json::to_vec(&spec).unwrap_or_default()))
}

/// The QEMU machine plugin.
pub struct QemuMachine {
    config: QemuConfig,
    /// Why VMs cannot start here (QEMU missing…); checked at start.
    preflight: Option<String>,
    accel: OnceCell<Accel>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::io(what, &e)
}

/// A free loopback port (bound and released: QEMU binds it right after).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| io("finding a free loopback port", e))?;
    l.local_addr().map(|a| a.port()).map_err(|e| io("finding a free loopback port", e))
}

impl QemuMachine {
    /// A machine plugin with `config`; checks that QEMU and its tools are installed.
    pub fn new(config: QemuConfig) -> anyhow::Result<QemuMachine> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.root)
            .with_context(|| format!("creating the state directory {}", config.root.display()))?;
        let mut missing = Vec::new();
        if vm::which(&config.qemu).is_none() {
            missing.push(format!("{} (Debian package qemu-system-x86)", config.qemu));
        }
        for (tool, package) in [("qemu-img", "qemu-utils"), ("mkfs.ext4", "e2fsprogs")] {
            if vm::which(tool).is_none() {
                missing.push(format!("{tool} (Debian package {package})"));
            }
        }
        let preflight = (!missing.is_empty()).then(|| {
            format!(
                "the qemu plugin cannot start VMs: {} not found; install with apt-get install \
                 --no-install-recommends qemu-system-x86 qemu-utils",
                missing.join(", ")
            )
        });
        if let Some(p) = &preflight {
            tracing::error!("{p}");
        }
        Ok(QemuMachine { config, preflight, accel: OnceCell::new() })
    }

    /// The accelerator, probed once (a real short test boot).
    pub(crate) async fn accel(&self) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                let (accel, why) = match self.config.accel.as_str() {
                    "tcg" => (Accel::Tcg, "--accel tcg".to_owned()),
                    _ => {
                        let kernel = vm::known_images(&self.config.image_dir)
                            .first()
                            .map(|n| self.config.image_dir.join(n).join("vmlinuz"));
                        let qemu = vm::which(&self.config.qemu).unwrap_or_default();
                        vm::probe_accel(&qemu, kernel.as_deref()).await
                    }
                };
                if accel == Accel::Tcg {
                    tracing::warn!(reason = %why, "KVM unusable: VMs run under TCG (slow emulation)");
                } else {
                    tracing::info!(reason = %why, "VMs run under KVM");
                }
                accel
            })
            .await
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.config.root.join(id)
    }

    fn read_meta(dir: &Path) -> Option<Meta> {
        let bytes = std::fs::read(dir.join("meta.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn tls(dir: &Path) -> TlsFiles {
        let tls = dir.join("tls");
        TlsFiles { ca: tls.join("ca.pem"), cert: tls.join("cert.pem"), key: tls.join("key.pem") }
    }

    /// Connects to the agent of the VM in `dir` and asks for its capabilities.
    async fn connect_agent(dir: &Path, port: u16, timeout: Duration) -> Result<GrpcBackend> {
        let endpoint = Endpoint::Tls {
            uri: format!("https://127.0.0.1:{port}"),
            tls: Self::tls(dir),
            domain: Some(certs::AGENT_NAME.to_owned()),
        };
        // The whole connection is bounded: QEMU's user-mode network accepts a TCP connection
        // before the guest listens, and a TLS handshake on it would wait forever.
        let agent = match tokio::time::timeout(
            timeout,
            kiln_plugin_sdk::client::connect(&endpoint, "qemu-agent", timeout),
        )
        .await
        {
            Ok(agent) => agent?,
            Err(_) => return Err(Error::unavailable("the agent did not answer")),
        };
        let request = CapabilitiesRequest {
            client_name: "kiln-plugin-qemu".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            protocol_versions: vec![PROTOCOL_VERSION],
        };
        match tokio::time::timeout(timeout, agent.capabilities(request)).await {
            Ok(Ok(_)) => Ok(agent),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::unavailable("the agent did not answer")),
        }
    }

    fn delegation_options(
        &self,
        dir: &Path,
        meta: &Meta,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut o = serde_json::Map::new();
        if self.config.delegate.is_some() {
            o.insert("docker_host".into(), format!("tcp://127.0.0.1:{}", meta.docker_port).into());
            o.insert(
                "docker_tls_dir".into(),
                dir.join("tls").to_string_lossy().into_owned().into(),
            );
        }
        o
    }

    fn agent_request(request: &EnvironmentRequest) -> EnvironmentRequest {
        EnvironmentRequest { options: serde_json::Map::new(), ..request.clone() }
    }

    /// Writes the config drive of `dir`: the agent binary, `config.env`, the guest's
    /// certificates, as an ext4 image made by `mkfs.ext4 -d` (no loop mount).
    async fn make_config_drive(
        &self,
        dir: &Path,
        vm_certs: &certs::VmCerts,
        hints: &kiln_plugin_sdk::EnvironmentHints,
    ) -> Result<()> {
        let stage = dir.join("config");
        let tls = stage.join("tls");
        std::fs::create_dir_all(&tls).map_err(|e| io("creating the config drive's tree", e))?;
        let agent = stage.join("kiln");
        if std::fs::hard_link(&self.config.agent_bin, &agent).is_err() {
            std::fs::copy(&self.config.agent_bin, &agent).map_err(|e| {
                io(format!("copying the agent binary {}", self.config.agent_bin.display()), e)
            })?;
        }
        let extra = match &self.config.delegate {
            Some(name) => format!("--delegate {name}"),
            None => String::new(),
        };
        let env = format!(
            "AGENT_PORT={}\nDOCKER_PORT={}\nWAIT_DOCKER={}\nAGENT_ARGS='{}'\nAGENT_EXTRA='{extra}'\n",
            vm::GUEST_AGENT_PORT,
            if self.config.delegate.is_some() { vm::GUEST_DOCKER_PORT } else { 0 },
            u8::from(hints.job_container || hints.service_containers > 0 || hints.step_containers),
            self.config.agent_args,
        );
        let files = [
            (stage.join("config.env"), env.as_str()),
            (tls.join("ca.pem"), vm_certs.ca.as_str()),
            (tls.join("server.pem"), vm_certs.server_cert.as_str()),
            (tls.join("server-key.pem"), vm_certs.server_key.as_str()),
        ];
        for (path, content) in files {
            std::fs::write(&path, content)
                .map_err(|e| io(format!("writing {}", path.display()), e))?;
        }
        let size = std::fs::metadata(&agent).map(|m| m.len()).unwrap_or(0) / (1 << 20) + 32;
        let image = Launch::config_drive(dir);
        let out = tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "kiln-config", "-E", "root_owner=0:0", "-d"])
            .arg(&stage)
            .arg(&image)
            .arg(format!("{size}M"))
            .output()
            .await
            .map_err(|e| io("running mkfs.ext4 (package e2fsprogs)", e))?;
        let _ = std::fs::remove_dir_all(&stage);
        if !out.status.success() {
            return Err(Error::internal(format!(
                "mkfs.ext4 -d for the config drive failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Creates the overlay of `image` in `dir`, `disk_gb` large (0: the image's size).
    async fn make_overlay(dir: &Path, image: &vm::Image, disk_gb: u32) -> Result<()> {
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.disk())
            .arg(Launch::overlay(dir));
        if disk_gb > 0 {
            cmd.arg(format!("{disk_gb}G"));
        }
        let out = cmd.output().await.map_err(|e| io("running qemu-img (package qemu-utils)", e))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            let field = if why.contains("smaller") || why.contains("shrink") {
                "options.disk_gb"
            } else {
                ""
            };
            let e = Error::invalid_argument(format!(
                "creating the job's disk (qemu-img create -b {}): {}",
                image.disk().display(),
                why.trim()
            ));
            return Err(if field.is_empty() {
                e.fault(Fault::Infrastructure)
            } else {
                e.field(field)
            });
        }
        Ok(())
    }

    /// Boots a VM for `request` in `dir`; on any error the caller destroys the directory.
    async fn boot(
        &self,
        request: &EnvironmentRequest,
        o: &VmOptions,
        dir: &Path,
    ) -> std::result::Result<(Meta, GrpcBackend), BootFailure> {
        self.try_boot(request, o, dir)
            .await
            .map_err(|error| BootFailure { error, crashed: false })?
    }

    /// [`Self::boot`]; the outer error is one before QEMU ran, the inner one QEMU's.
    async fn try_boot(
        &self,
        request: &EnvironmentRequest,
        o: &VmOptions,
        dir: &Path,
    ) -> Result<std::result::Result<(Meta, GrpcBackend), BootFailure>> {
        let started = Instant::now();
        let image = vm::find_image(&self.config.image_dir, &o.image, "options.image")?;
        let accel = self.accel().await;
        let meta = Meta {
            id: request.environment_id.clone(),
            spec_hash: spec_hash(request, o),
            image: o.image.clone(),
            accel: accel.to_string(),
            agent_port: free_port()?,
            docker_port: if self.config.delegate.is_some() { free_port()? } else { 0 },
            owner: {
                let mut owner = StoredOwner::from(&request.owner);
                owner.created_at_unix_ms = now_ms();
                owner
            },
        };
        // The record first: a plugin killed from here on leaves something ListEnvironments finds.
        std::fs::create_dir_all(dir.join("tls"))
            .map_err(|e| io(format!("creating {}", dir.display()), e))?;
        let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        std::fs::write(dir.join("meta.json"), json).map_err(|e| io("writing meta.json", e))?;
        let vm_certs = certs::mint(&request.environment_id)
            .map_err(|e| Error::internal(format!("minting the VM's certificates: {e}")))?;
        let tls = Self::tls(dir);
        for (path, pem) in [
            (&tls.ca, &vm_certs.ca),
            (&tls.cert, &vm_certs.client_cert),
            (&tls.key, &vm_certs.client_key),
        ] {
            std::fs::write(path, pem).map_err(|e| io(format!("writing {}", path.display()), e))?;
        }
        let (overlay, drive) = tokio::join!(
            Self::make_overlay(dir, &image, o.disk_gb),
            self.make_config_drive(dir, &vm_certs, &request.hints)
        );
        overlay?;
        drive?;
        let launch = Launch {
            name: &request.environment_id,
            image: &image,
            accel,
            cpus: o.cpus,
            memory_mb: o.memory_mb,
            dir,
            agent_port: meta.agent_port,
            docker_port: meta.docker_port,
        };
        let log =
            std::fs::File::create(dir.join("qemu.log")).map_err(|e| io("creating qemu.log", e))?;
        let mut child = tokio::process::Command::new(&self.config.qemu)
            .args(launch.args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| io(format!("starting {}", self.config.qemu), e))?;
        tracing::info!(env = %meta.id, %accel, image = %image.name, agent_port = meta.agent_port, "VM starting");
        // Waiting for the agent: QEMU's user-mode network accepts on the forwarded port
        // before the guest listens, so "answers" means a TLS handshake and a Capabilities call.
        let deadline = started + o.boot_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let qemu_log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                use std::os::unix::process::ExitStatusExt;
                let crashed = status.signal().is_some();
                let error = Error::unavailable(format!(
                    "the VM of environment {:?} stopped while booting ({status}); qemu: {}; console:\n{}",
                    meta.id,
                    qemu_log.trim(),
                    vm::console_tail(dir, CONSOLE_LINES)
                ))
                .fault(Fault::Infrastructure);
                return Ok(Err(BootFailure { error, crashed }));
            }
            if let Ok(agent) =
                Self::connect_agent(dir, meta.agent_port, Duration::from_secs(2)).await
            {
                tracing::info!(env = %meta.id, %accel, boot_ms = started.elapsed().as_millis() as u64, "VM up: the agent answers");
                // The child is reaped in the background (QEMU outlives no plugin restart:
                // a restarted plugin finds it by its pid file).
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                return Ok(Ok((meta, agent)));
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Ok(Err(BootFailure {
                    crashed: false,
                    error: Error::unavailable(format!(
                        "the VM of environment {:?} did not start its agent within {}s ({accel}); \
                     raise options.boot_timeout_secs if the machine is slow; console:\n{}",
                        meta.id,
                        o.boot_timeout.as_secs(),
                        vm::console_tail(dir, CONSOLE_LINES)
                    ))
                    .field("options.boot_timeout_secs")
                    .fault(Fault::Infrastructure),
                }));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[async_trait::async_trait]
impl Machine for QemuMachine {
    async fn capabilities(&self, _request: CapabilitiesRequest) -> Result<Capabilities> {
        let layer = match (&self.preflight, &self.config.delegate) {
            (None, Some(name)) => LayerSupport::Delegated { backend: name.clone() },
            _ => LayerSupport::Unsupported(
                "the qemu plugin runs containers only with --delegate docker (dockerd in the VM)"
                    .into(),
            ),
        };
        Ok(Capabilities {
            plugin_name: "qemu".into(),
            plugin_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            instance_id: String::new(),
            environment: match &self.preflight {
                None => LayerSupport::Native,
                Some(why) => LayerSupport::Unsupported(why.clone()),
            },
            job_container: layer.clone(),
            service_containers: layer.clone(),
            step_containers: layer,
            // The agent's (kiln's host plugin), minus local_copy: the guest does not see the
            // runner's files.
            features: Features {
                stdin: true,
                tty: false,
                local_copy: false,
                image_build: false,
                exec_files: true,
                exec_timeout: true,
                health: false,
            },
            os: "linux".into(),
            arch: "amd64".into(),
            max_message_bytes: 0,
        })
    }

    async fn provision(&self, request: &EnvironmentRequest) -> Result<Provisioned> {
        if let Some(why) = &self.preflight {
            return Err(Error::failed_precondition(why.clone()).fault(Fault::Config));
        }
        let o = parse_options(&request.options, &self.config)?;
        let id = &request.environment_id;
        let dir = self.dir(id);
        if let Some(meta) = Self::read_meta(&dir) {
            if meta.spec_hash != spec_hash(request, &o) {
                return Err(Error::already_exists(format!(
                    "environment {id:?} exists with a different spec"
                ))
                .field("environment_id"));
            }
            let agent = match self.reconnect(id).await? {
                Some(a) => a,
                None => {
                    return Err(Error::unavailable(format!(
                        "the VM of environment {id:?} is no longer running; remove the environment"
                    )));
                }
            };
            let delegation_options = self.delegation_options(&dir, &meta);
            return Ok(Provisioned {
                agent,
                agent_request: Self::agent_request(request),
                delegation_options,
                fresh: false,
            });
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.boot(request, &o, &dir).await {
                Ok((meta, agent)) => {
                    return Ok(Provisioned {
                        agent: Arc::new(agent),
                        agent_request: Self::agent_request(request),
                        delegation_options: self.delegation_options(&dir, &meta),
                        fresh: true,
                    });
                }
                Err(failure) => {
                    vm::stop(&dir, Duration::ZERO).await;
                    let _ = std::fs::remove_dir_all(&dir);
                    // QEMU 7.2's TCG crashes now and then during a boot (about one boot in
                    // thirty here): such a boot is tried once more, from scratch.
                    if failure.crashed && attempt == 1 {
                        tracing::warn!(env = %id, error = %failure.error.message, "QEMU crashed while booting; booting again");
                        continue;
                    }
                    return Err(failure.error);
                }
            }
        }
    }

    async fn reconnect(&self, environment_id: &str) -> Result<Option<Arc<dyn Backend>>> {
        if kiln_plugin_sdk::ids::validate_id(environment_id, "environment_id").is_err() {
            return Ok(None);
        }
        let dir = self.dir(environment_id);
        let Some(meta) = Self::read_meta(&dir) else { return Ok(None) };
        if vm::running_pid(&dir).is_none() {
            return Ok(None);
        }
        match Self::connect_agent(&dir, meta.agent_port, Duration::from_secs(3)).await {
            Ok(agent) => Ok(Some(Arc::new(agent))),
            Err(e) => Err(Error::unavailable(format!(
                "the agent of environment {environment_id:?} does not answer: {}",
                e.message
            ))),
        }
    }

    async fn destroy(&self, environment_id: &str, grace: Duration) -> Result<bool> {
        let dir = self.dir(environment_id);
        if !dir.exists() {
            return Ok(false);
        }
        let started = Instant::now();
        let ran = vm::stop(&dir, grace.min(Duration::from_secs(10))).await;
        std::fs::remove_dir_all(&dir).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(io(format!("deleting {}", dir.display()), e)),
        })?;
        tracing::info!(
            env = environment_id,
            was_running = ran,
            ms = started.elapsed().as_millis() as u64,
            "VM removed"
        );
        Ok(true)
    }

    async fn list(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        kiln_plugin_sdk::record::list_dirs(&self.config.root, &selector, |dir| {
            Ok(Self::read_meta(dir).map(|meta| EnvironmentSummary {
                id: meta.id,
                owner: meta.owner.into(),
                container_ids: Vec::new(),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn options_out_of_range_name_their_field() {
        let config = QemuConfig::for_tests();
        let ok = parse_options(
            &opts(serde_json::json!({"args": "img", "cpus": 4, "memory_mb": "512"})),
            &config,
        )
        .unwrap();
        assert_eq!((ok.image.as_str(), ok.cpus, ok.memory_mb), ("img", 4, 512));
        for (bad, field) in [
            (serde_json::json!({"cpus": 0}), "options.cpus"),
            (serde_json::json!({"memory_mb": 100}), "options.memory_mb"),
            (serde_json::json!({"disk_gb": -1}), "options.disk_gb"),
            (serde_json::json!({"boot_timeout_secs": 1}), "options.boot_timeout_secs"),
            (serde_json::json!({"image": 3}), "options.image"),
            (serde_json::json!({"gpus": 1}), "options.gpus"),
        ] {
            let e = parse_options(&opts(bad.clone()), &config).unwrap_err();
            assert_eq!(e.code, kiln_plugin_sdk::Code::InvalidArgument, "{bad}");
            assert_eq!(e.field.as_deref(), Some(field), "{bad}");
        }
    }
}
