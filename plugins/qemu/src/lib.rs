//! The kiln QEMU backend: every execution environment is its own virtual machine, and the
//! job's containers run inside it.
//!
//! - **Image**: a label names a base image in `--image-dir` (`ubuntu-latest:qemu://debian-bookworm`;
//!   built by `plugins/qemu/images/build.sh`: a directory with `disk.qcow2`, `vmlinuz`,
//!   `initrd.img`). The job's disk is a qcow2 overlay of it; the base is never written.
//! - **Options** (label options): `image`, `cpus` (1–64, default `--cpus`), `memory_mb`
//!   (256–262144, default `--memory-mb`), `disk_gb` (0 = the image's size), and
//!   `boot_timeout_secs` (5–3600). Out of range: INVALID_ARGUMENT naming the field.
//! - **Acceleration**: KVM when `/dev/kvm` opens and a real test boot finishes within 15 s,
//!   else TCG with a warning (nested KVM may hang instead of failing); logged at start.
//! - **Network**: QEMU user-mode networking; the only forwards are the agent's and dockerd's
//!   ports, bound to 127.0.0.1.
//! - **Agent**: kiln's own host plugin in the guest (`kiln plugin host --listen
//!   tcp://0.0.0.0:7000` with mutual TLS), started by the image's init. The plugin mints a CA
//!   and certificates per VM (`certs`) and hands the guest its pair, and the kiln binary
//!   itself (`--agent-bin`, default this executable), on a read-only config drive; an image
//!   needs no rebuild per kiln version. The job layer is forwarded to the agent by the SDK's
//!   [`kiln_plugin_sdk::forward::ForwardingBackend`].
//! - **Containers**: with `--delegate docker` (the default) the guest runs dockerd with mutual
//!   TLS on a forwarded port, and the container, service and step-container layers are
//!   DELEGATED to the runner's docker plugin with `docker_host`/`docker_tls_dir` naming that
//!   VM's engine in `Environment.delegation.options` (the docker plugin must allow it:
//!   `--allow-docker-host 'tcp://127.0.0.1:*'` and `--valid-volume '/var/lib/kiln/env/*'`, the
//!   agent's environments in the guest). With the docker plugin's `--copy-missing-images`, an
//!   image the guest lacks is copied from the docker plugin's own engine (the host's).
//!   `kiln` adds these flags to its managed docker plugin when a qemu plugin is configured.
//! - **Lifecycle**: see `machine` (state directory, owner labels, reaping) and `vm` (stopping).

mod certs;
mod machine;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use machine::QemuMachine;

/// The plugin's configuration.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Where VMs keep their state (one directory each).
    pub root: PathBuf,
    /// The base images.
    pub image_dir: PathBuf,
    /// The QEMU system emulator.
    pub qemu: String,
    /// `auto` (probe KVM), `kvm` or `tcg`.
    pub accel: String,
    /// The binary the guest runs as its agent, and the arguments that make it the host plugin.
    pub agent_bin: PathBuf,
    /// `plugin host` for the multi-call kiln binary, empty for kiln-plugin-host.
    pub agent_args: String,
    /// The backend container layers are delegated to (dockerd in the VM); None: no containers.
    pub delegate: Option<String>,
    /// Default vCPUs.
    pub cpus: u32,
    /// Default memory.
    pub memory_mb: u32,
    /// Default boot timeout.
    pub boot_timeout: Duration,
}

impl QemuConfig {
    #[cfg(test)]
    pub(crate) fn for_tests() -> QemuConfig {
        let args =
            Args::parse_from(["x", "--listen", "/nonexistent.sock", "--root", "/nonexistent"]);
        args.qemu.config().unwrap()
    }
}

/// The QEMU backend's own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct QemuArgs {
    /// State directory (default: `$XDG_STATE_HOME/kiln/qemu`, else `~/.local/state/kiln/qemu`).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Directory of base images (each a directory with disk.qcow2, vmlinuz, initrd.img).
    #[arg(long, env = "KILN_QEMU_IMAGE_DIR", default_value = "/var/cache/kiln/qemu/images")]
    pub image_dir: PathBuf,
    /// The QEMU system emulator.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Accelerator: auto (KVM when a test boot works, else TCG), kvm, tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// The agent binary copied into each VM (default: this executable when it is kiln, else
    /// `kiln` or `kiln-plugin-host` next to it).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Arguments that make the agent binary serve the host plugin (default: `plugin host`,
    /// empty for a kiln-plugin-host binary).
    #[arg(long)]
    pub agent_args: Option<String>,
    /// The plugin container layers are delegated to, with dockerd in the VM ("none": no
    /// containers, no dockerd).
    #[arg(long, default_value = "docker")]
    pub delegate: String,
    /// vCPUs per VM unless the label says otherwise.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Memory per VM (MiB) unless the label says otherwise.
    #[arg(long, default_value_t = 2048)]
    pub memory_mb: u32,
    /// How long a VM may take until its agent answers, unless the label says otherwise.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout_secs: u64,
}

impl QemuArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<QemuConfig> {
        let exe = std::env::current_exe().unwrap_or_default();
        let (agent_bin, default_args) = match &self.agent_bin {
            Some(bin) => {
                let host = bin
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("kiln-plugin-host"));
                (bin.clone(), if host { "" } else { "plugin host" })
            }
            None => {
                let name =
                    exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
                if !name.starts_with("kiln-plugin-") {
                    (exe.clone(), "plugin host")
                } else if dir.join("kiln").is_file() {
                    (dir.join("kiln"), "plugin host")
                } else {
                    (dir.join("kiln-plugin-host"), "")
                }
            }
        };
        let root = self.root.clone().unwrap_or_else(|| {
            let abs = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
            if let Some(s) = std::env::var_os("XDG_STATE_HOME").and_then(abs) {
                s.join("kiln/qemu")
            } else if let Some(h) = std::env::var_os("HOME").and_then(abs) {
                h.join(".local/state/kiln/qemu")
            } else {
                PathBuf::from("/tmp/kiln-qemu")
            }
        });
        Ok(QemuConfig {
            root,
            image_dir: self.image_dir.clone(),
            qemu: self.qemu.clone(),
            accel: self.accel.clone(),
            agent_bin,
            agent_args: self.agent_args.clone().unwrap_or_else(|| default_args.to_owned()),
            delegate: (self.delegate != "none").then(|| self.delegate.clone()),
            cpus: self.cpus.clamp(1, 64),
            memory_mb: self.memory_mb.clamp(256, 262_144),
            boot_timeout: Duration::from_secs(self.boot_timeout_secs.clamp(5, 3600)),
        })
    }
}

/// The command line of `kiln-plugin-qemu` (also usable as a subcommand's arguments).
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-plugin-qemu", version, about = "kiln QEMU backend plugin: a VM per job")]
pub struct Args {
    /// Standard plugin flags.
    #[command(flatten)]
    pub serve: kiln_plugin_sdk::server::ServeArgs,
    /// QEMU backend flags.
    #[command(flatten)]
    pub qemu: QemuArgs,
}

/// Serves the QEMU backend with the given flags until a signal (or stdin EOF when asked).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.qemu.config()?;
    tracing::info!(root = %config.root.display(), images = %config.image_dir.display(), agent = %config.agent_bin.display(), "qemu backend ready");
    let machine = std::sync::Arc::new(QemuMachine::new(config)?);
    // The accelerator probe (a test boot) runs once, in the background: the log says which
    // accelerator VMs use, and the first VM need not wait for it.
    let probe = std::sync::Arc::clone(&machine);
    tokio::spawn(async move { probe.accel().await });
    let backend = kiln_plugin_sdk::forward::ForwardingBackend::from_arc(machine);
    kiln_plugin_sdk::server::run(backend, &args.serve).await
}

/// The binary's entry point: logging, flags from the command line, [`run`].
pub async fn main() -> anyhow::Result<()> {
    kiln_plugin_sdk::server::init_logging();
    run(Args::parse()).await
}
