//! The kiln Docker backend: every job on a Docker engine, with the four layers of a workflow
//! native (the `runs-on` environment, `container:`, `services:` and docker steps).
//!
//! # What an environment is
//!
//! For `CreateExecutionEnvironment` with options `{"image": "IMAGE"}` the plugin creates, all
//! named after the environment id `E` and labelled (see below):
//!
//! - a volume `kiln_E_workspace`, the environment's record: the owner, the spec hash and the
//!   label live in its labels, so a restarted plugin lists, replays and removes environments
//!   from the engine alone. On a daemon that shares the plugin's files (the usual local one)
//!   the workspace (`paths.workspace`, `/github/workspace`) is the host directory
//!   `STATE/E/workspace` bind-mounted there (the record says `dev.kiln.workspace=host`), so
//!   `CopyIn` into it is extracted by the plugin itself, with the SDK's traversal rules and no
//!   exec or engine call; on a remote daemon the volume is the workspace;
//! - a bridge network `kiln_E`, when the hints announce a job container, services or docker
//!   steps, else on the first inner container (the primary container is then connected to
//!   it). A job of `run:` steps alone needs no network of its own, and creating and removing
//!   one costs about 0.4 s on a small machine; its primary container uses the default bridge;
//! - a host directory `STATE/E/` (`--state-dir`, default `$XDG_STATE_HOME/kiln/docker`,
//!   marked `chattr +T` so that ext4 spreads job directories over its block groups, see the
//!   SDK's `dirs`)
//!   bind-mounted at `/__kiln`, holding `runner/` (`paths.runner_files`, `/__kiln/runner`),
//!   `temp/` (`paths.temp`, `/__kiln/temp`), `tool-cache/` (`paths.tool_cache`) and `execs/`
//!   (one pid file per exec);
//! - unless `hints.job_container`, the primary container `kiln_E_primary` (its protocol id is
//!   `primary`) from the image, entrypoint overridden by a shell sleep loop, with
//!   `docker-init` as PID 1 so orphans are reaped.
//!
//! The image is pulled only when missing (or with `force_pull`); when it is missing and no
//! registry answers, the error names the image and says how to provide it.
//!
//! Option `{"host_dir": "/abs/dir"}` makes a **delegate environment** (the host plugin's
//! delegation names it): the directory of the daemon's host is bind-mounted at the same path
//! into every container of the environment that mounts the workspace (job and step containers,
//! the primary), so they see the delegating environment's workspace and runner files. It must
//! match a `--valid-volume` glob (PERMISSION_DENIED otherwise), is kept in the record's label
//! `dev.kiln.host-dir`, and paths under it are staged, collected and read as build contexts
//! directly on the host, like those under `/__kiln`. Without `image` such an environment has
//! no primary container. Files containers write there belong to their user (root, usually).
//!
//! # Engines: the plugin's own and one per environment
//!
//! The plugin's own daemon is `--docker-host` (unix socket, `tcp://` with `--docker-tls-dir`
//! for mutual TLS, `http://`), else `DOCKER_HOST`, else the local socket. Option
//! `{"docker_host": "tcp://10.0.0.2:2376"}` (with `"docker_tls_dir": "/abs/dir"` holding
//! `ca.pem`, `cert.pem`, `key.pem`, else `--docker-tls-dir`) puts an environment and all its
//! containers on another daemon — a VM plugin delegating to this one names its machine's
//! daemon that way. The endpoint must match an `--allow-docker-host` glob (PERMISSION_DENIED
//! otherwise); the record carries it in `dev.kiln.docker-host`. Every endpoint in use is
//! written to `STATE/endpoints.json` before anything is created there, so `ListEnvironments`
//! and `Remove` of a restarted plugin look on every such daemon (one that does not answer
//! within 3 s is left out of the listing with a warning, and forgotten after a day of
//! silence); an endpoint is dropped from the file when its last environment is removed.
//!
//! A **remote** daemon does not see the plugin's files: a `tcp://`, `http://` or `https://`
//! environment endpoint, or the plugin's own daemon with `--remote-daemon`. There `/__kiln` is
//! the volume `kiln_E_kiln` (its directories made through the archive API when the first
//! container mounting it is created), staged files go up in one archive per exec, collected
//! files, pid files and build contexts come down through the archive API, and `host_dir` names
//! a directory of the daemon's machine. A unix-socket endpoint shares the plugin's files.
//!
//! # Labels (rule 9)
//!
//! Every container, network and volume carries `dev.kiln.runner-id`, `dev.kiln.boot-id`,
//! `dev.kiln.job-id`, `dev.kiln.environment-id`, `dev.kiln.parent-environment-id`,
//! `dev.kiln.created-at` and `dev.kiln.expires-at` (milliseconds since the epoch),
//! `dev.kiln.spec-hash`, and each extra owner label `K=V` as `dev.kiln.label.K=V`. Containers
//! also carry `dev.kiln.container-id` and `dev.kiln.kind` (`primary`, `job`, `service`,
//! `step`). `ListEnvironments` reads the workspace volumes (`dev.kiln.role=environment`) and
//! the containers by these labels; `Remove` deletes whatever carries
//! `dev.kiln.environment-id=E`, the record last.
//!
//! # Exec
//!
//! Each exec is one Docker exec whose command is a small `sh` wrapper:
//! `/bin/sh -c WRAPPER kiln PIDFILE WORKDIR -- NAME=VALUE… -- ARGV…`. The wrapper writes its
//! PID to `/__kiln/execs/<exec_id>.pid`, changes to the working directory (127 with a message
//! when it is missing), and `exec`s `env -i NAME=VALUE… ARGV…`, so the process sees exactly the
//! requested environment (Docker adds the container's environment to every exec; `env -i`
//! neutralises it) and `argv[0]` is searched in the requested `PATH`. The image therefore
//! needs `/bin/sh` and `env` (busybox, Debian, Alpine, … all have them).
//!
//! Docker starts every exec as a session and process-group leader (runc calls `setsid`), so
//! the PID recorded by the wrapper is the exec's process group. **Signals**: the Docker API
//! cannot signal an exec, so `SignalExec`, a timeout and a dropped stream run a second exec,
//! `sh -c 'kill -SIG -PGID'`, in the same container; the kill sequence (SIGTERM, grace,
//! SIGKILL to the group) is the plugin's, independent of the caller. The pid file lives in
//! the environment's own container, so a recorded group can only ever name processes of that
//! container (never a process of the host, §6.3); the container survives a cancelled step.
//!
//! The exec is finished when its main process exits (Docker's exec inspect says so): the
//! output stream is drained for at most 500 ms, then `Exited` is sent; output of background
//! processes is read and discarded until they end. A process killed by a signal the plugin
//! sent is reported as that signal; otherwise Docker's exit code (128+n for signals) is
//! reported as is.
//!
//! **Stdin** (feature `stdin`): an exec asked with `stdin` is created with its standard input
//! attached; `WriteStdin` writes into the engine's hijacked connection and half-closes it at
//! the end of the stream, which the engine turns into end-of-file. Without it, stdin is empty.
//!
//! **Staged and collected files** (feature `exec_files`) inside `/__kiln` are written and read
//! directly in the host directory: a step costs one Docker exec and no archive calls. Paths
//! elsewhere, and every path on a remote daemon (see Engines), go through the archive API: the
//! staged files of an exec in one upload, each collected file in one download.
//!
//! # Copies
//!
//! `CopyIn` into the environment's own host directories (the workspace, `/__kiln`, a
//! delegate's `host_dir`), in a container that mounts them, is extracted on the host by the
//! SDK's `archive::unpack` (no entry outside the destination, none through a symlink; a
//! destination whose host path has a symlink goes through the engine instead). Elsewhere it
//! reads the tar stream, checks every entry with the SDK's rules
//! (`kiln_plugin_sdk::archive::safe_relative`, hard-link targets inside, no writes through
//! symlinks created by earlier entries or already in the destination — checked with one exec
//! listing the symlinks under the destination), re-streams the checked entries, and uploads
//! them with the archive API. `CopyOut` streams the archive API's tar (which holds the path
//! under its base name, links kept).
//!
//! # Containers
//!
//! Job, service and step containers are created on the environment's network, with the
//! network aliases asked for, published ports, env, volumes and a subset of `docker run`
//! options. Host-path volumes must match a `--valid-volume` glob; named volumes are scoped
//! to the environment (`kiln_E_v_NAME`) and removed with it; options outside the default set
//! must be allowed with `--allow-option NAME`. A refusal is PERMISSION_DENIED before anything
//! is created. `Inspect` reports Docker's health check state. Dockerfile actions (feature
//! `image_build`) are built from their context directory in the environment and cached by
//! content (`kiln-build:<hash>`, see `build`). A step container's main process
//! runs through an `Exec` with empty `argv` (attach, start, wait); the engine's container is
//! created then, with the exec's env added (the engine cannot add env to a created container),
//! so until its start a step container lives only in the plugin's memory: listed nowhere,
//! lost with the process, which leaves nothing behind.
//!
//! # Known limits
//!
//! - Removing an environment force-removes its containers (SIGKILL, no grace): every process
//!   of the job dies with them. Removing a single container stops it with the grace first.
//! - Host-side staging and collecting check that no component under `/__kiln` is a symlink
//!   and open the file with `O_NOFOLLOW`; a step racing to swap a parent directory for a
//!   symlink between the check and the open is not prevented (a later version should walk
//!   the path with `openat`).
//! - No tty or local-path copies yet, and no stdin for a step container's main process.
//! - On a remote daemon an exec id is known to be used only for the plugin process's life
//!   (on a local one the pid files under `/__kiln/execs` keep that across restarts).
//!
//! - **Podman** (4.3.1, Debian 12; `tests/docker/podman.sh` serves its Docker-compatible API
//!   and CI runs the docker e2e tests and the conformance suite on it): everything works, with
//!   three differences handled in `compat.rs` and the list: Podman's transient `stopped` state
//!   (which the engine client rejects) is read again; its health checks, scheduled by systemd,
//!   never run without systemd, so an overdue first check is run by the plugin through an exec;
//!   and its volume list ORs label filters, so listed environments are checked against every
//!   label of the selector. Podman needs `catatonit` for the containers' init process, and
//!   ulimits the machine allows in `containers.conf` (runc cannot raise them on these machines).
//!
//! When the plugin runs as a user other than root, files written by root in a container
//! into `/__kiln` cannot be deleted by the plugin; `Remove` then empties the directory from
//! inside the primary container first.

mod backend;
mod build;
mod compat;
mod copy;
mod engines;
mod exec;
mod labels;
mod spec;

use std::path::PathBuf;

use clap::Parser;

pub use backend::DockerBackend;

/// Configuration of a [`DockerBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// The daemon: `unix:///var/run/docker.sock`, `tcp://host:2376` (TLS with `tls_dir`),
    /// `http://host:2375`; `None` = `DOCKER_HOST` or the local default.
    pub docker_host: Option<String>,
    /// Directory with `ca.pem`, `cert.pem`, `key.pem` for a TLS daemon.
    pub tls_dir: Option<PathBuf>,
    /// The daemon runs on another machine: it does not see the plugin's files.
    pub remote_daemon: bool,
    /// Where per-environment host directories live (bind-mounted into containers).
    pub state_dir: PathBuf,
    /// Globs of host paths job and service containers may mount.
    pub valid_volumes: Vec<String>,
    /// `docker run` options allowed beyond the default set.
    pub allowed_options: Vec<String>,
    /// Globs of the endpoints environments may name with the option `docker_host`.
    pub allowed_docker_hosts: Vec<String>,
    /// Forgejo Runner's `container.network`: `None` = a network per environment; `host`,
    /// `bridge` or the name of an existing network for every container.
    pub network: Option<String>,
    /// Create each environment's network with IPv6 (`container.enable_ipv6`).
    pub enable_ipv6: bool,
    /// Every container privileged (`container.privileged`).
    pub privileged: bool,
    /// `docker run` options added to every job container (`container.options`), held to the
    /// same policy as a workflow's `options`.
    pub container_options: String,
    /// Bind the engine's unix socket at /var/run/docker.sock in job and step containers
    /// (`container.docker_host: automount` or a unix:// URL).
    pub mount_docker_socket: bool,
    /// Pull every image even when present (`container.force_pull`).
    pub force_pull: bool,
    /// Build action images even when a built one is cached (`container.force_rebuild`).
    pub force_rebuild: bool,
    /// An image missing on an environment's own endpoint (`docker_host`) is copied from the
    /// plugin's engine when that has it (export, then load), before any pull.
    pub copy_missing_images: bool,
}

impl DockerConfig {
    /// A configuration with the local daemon and state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> DockerConfig {
        DockerConfig {
            docker_host: None,
            tls_dir: None,
            remote_daemon: false,
            state_dir: state_dir.into(),
            valid_volumes: Vec::new(),
            allowed_options: Vec::new(),
            allowed_docker_hosts: Vec::new(),
            network: None,
            enable_ipv6: false,
            privileged: false,
            container_options: String::new(),
            mount_docker_socket: false,
            force_pull: false,
            force_rebuild: false,
            copy_missing_images: false,
        }
    }

    /// `$XDG_STATE_HOME/kiln/docker`, else `~/.local/state/kiln/docker`, else
    /// `/tmp/kiln-docker-<uid>`.
    pub fn default_state_dir() -> PathBuf {
        let abs = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
        if let Some(state) = std::env::var_os("XDG_STATE_HOME").and_then(abs) {
            return state.join("kiln/docker");
        }
        if let Some(home) = std::env::var_os("HOME").and_then(abs) {
            return home.join(".local/state/kiln/docker");
        }
        PathBuf::from(format!("/tmp/kiln-docker-{}", nix::unistd::getuid()))
    }
}

/// The Docker backend's own flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DockerArgs {
    /// Docker daemon endpoint: unix:///path, tcp://host:port (TLS with --docker-tls-dir) or
    /// http://host:port [default: $DOCKER_HOST, else the local socket].
    #[arg(long)]
    pub docker_host: Option<String>,
    /// Directory holding ca.pem, cert.pem and key.pem for a TLS daemon.
    #[arg(long)]
    pub docker_tls_dir: Option<PathBuf>,
    /// The daemon runs on another machine and does not see this one's files: /__kiln is a
    /// volume there, and staged and collected files go through the engine's API.
    #[arg(long)]
    pub remote_daemon: bool,
    /// Directory of the per-environment files bind-mounted into containers; the daemon must
    /// see it at the same path [default: $XDG_STATE_HOME/kiln/docker].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A glob of host paths containers may mount (repeatable), like Forgejo Runner's
    /// valid_volumes. Without any, host-path volumes are refused.
    #[arg(long = "valid-volume")]
    pub valid_volumes: Vec<String>,
    /// A `docker run` option allowed beyond the default set (repeatable), e.g. privileged,
    /// cap-add.
    #[arg(long = "allow-option")]
    pub allowed_options: Vec<String>,
    /// A glob of docker endpoints an environment may name with the option `docker_host`
    /// (repeatable), e.g. 'tcp://10.0.*:2376' for the daemons of a VM plugin's machines.
    /// Without any, the option is refused.
    #[arg(long = "allow-docker-host")]
    pub allowed_docker_hosts: Vec<String>,
    /// The network of every container: host, bridge or an existing network's name [default:
    /// a network per environment] (Forgejo Runner's container.network).
    #[arg(long)]
    pub network: Option<String>,
    /// Create each environment's network with IPv6 enabled.
    #[arg(long)]
    pub enable_ipv6: bool,
    /// Run every container privileged (Forgejo Runner's container.privileged).
    #[arg(long)]
    pub privileged: bool,
    /// `docker run` options for every job container, e.g. '--cpus 2' (checked against the
    /// option and volume policy at startup).
    #[arg(long, default_value = "")]
    pub container_options: String,
    /// Mount the engine's unix socket at /var/run/docker.sock in job and step containers
    /// (Forgejo Runner's container.docker_host: automount).
    #[arg(long)]
    pub mount_docker_socket: bool,
    /// Pull every image, even when present.
    #[arg(long)]
    pub force_pull: bool,
    /// Build docker action images even when a built one is cached.
    #[arg(long)]
    pub force_rebuild: bool,
    /// When an environment on another engine (`docker_host`, e.g. a VM's) lacks an image,
    /// copy it from this plugin's engine (export, then load) when that has it, before trying
    /// a pull: machines without a registry get the images the host has.
    #[arg(long)]
    pub copy_missing_images: bool,
}

impl DockerArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> DockerConfig {
        DockerConfig {
            docker_host: self.docker_host.clone(),
            tls_dir: self.docker_tls_dir.clone(),
            remote_daemon: self.remote_daemon,
            state_dir: self.state_dir.clone().unwrap_or_else(DockerConfig::default_state_dir),
            valid_volumes: self.valid_volumes.clone(),
            allowed_options: self.allowed_options.clone(),
            allowed_docker_hosts: self.allowed_docker_hosts.clone(),
            network: self.network.clone().filter(|n| !n.trim().is_empty()),
            enable_ipv6: self.enable_ipv6,
            privileged: self.privileged,
            container_options: self.container_options.clone(),
            mount_docker_socket: self.mount_docker_socket,
            force_pull: self.force_pull,
            force_rebuild: self.force_rebuild,
            copy_missing_images: self.copy_missing_images,
        }
    }
}

/// The command line of `kiln-plugin-docker` (also `kiln plugin docker`).
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-plugin-docker", version, about = "kiln Docker backend plugin")]
pub struct Args {
    /// Standard plugin flags.
    #[command(flatten)]
    pub serve: kiln_plugin_sdk::server::ServeArgs,
    /// Docker backend flags.
    #[command(flatten)]
    pub docker: DockerArgs,
}

/// Serves the Docker backend with the given flags until a signal (or stdin EOF when asked).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let backend = DockerBackend::connect(args.docker.config()).await?;
    tracing::info!(state = %backend.state_dir().display(), "docker backend ready");
    kiln_plugin_sdk::server::run(backend, &args.serve).await
}

/// The binary's entry point: logging, flags from the command line, [`run`].
pub async fn main() -> anyhow::Result<()> {
    kiln_plugin_sdk::server::init_logging();
    run(Args::parse()).await
}

/// Locks a mutex, ignoring poisoning.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
