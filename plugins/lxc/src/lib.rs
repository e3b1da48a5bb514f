//! The kiln LXC backend: each job runs in its own LXC system container, an ephemeral
//! copy-on-write clone of a base container that is built once per image and cached. Labels
//! take Forgejo Runner's form, `ubuntu-latest:lxc://debian:bookworm`.
//!
//! - LXC is driven through Debian's `lxc` 5.0 command-line tools (`lxc-create`, `lxc-start`,
//!   `lxc-attach`, `lxc-stop`, `lxc-destroy`, `lxc-info`), not liblxc: the only Rust
//!   bindings are unmaintained unsafe C bindings, and the tools are the stable interface
//!   (see ARCHITECTURE.md).
//! - **Images** (`image`): `DISTRO:RELEASE`, for now `debian:<any release debootstrap knows>`.
//!   The base container of an image is made once by Debian's `debian` template (debootstrap
//!   from the mirror apt uses) with what jobs need (bash, git, nodejs, python3,
//!   ca-certificates, procps, util-linux), under `--base-dir` (default `/var/cache/kiln/lxc`), named by a
//!   hash of its recipe: a changed recipe builds a new base, and a build interrupted half-way
//!   is never used (a marker file is written last). One build at a time per image (`flock`).
//! - **Environments** (`container`): `--root/<id>/` is an LXC container whose rootfs is an
//!   overlay of the base's rootfs (read-only, shared) and its own `delta0/`; its config is
//!   written by the plugin (what `lxc-copy -s -B overlayfs` writes, without the fork). The
//!   container runs a tiny shell loop as PID 1 (no systemd boot), so create + start takes
//!   well under a second. `<id>/kiln.json` holds the owner labels and spec hash (written
//!   first: an interrupted create is still listed and collected); `<id>/job/` is
//!   bind-mounted at the same path inside the container; `job/env/` holds `workspace/`,
//!   `temp/`, `tool-cache/` and `runner/`, so the paths the runner sees are the same inside
//!   and out.
//! - **Networking**: none by default (`lxc.net.0.type = empty`: loopback only; Debian's
//!   default config names an `lxcbr0` bridge most machines lack); `--network bridge:NAME`
//!   gives each container a veth on the bridge the admin made (addresses are the admin's
//!   business: DHCP on the bridge, or none).
//! - **Exec** goes through an **agent** inside the container: the plugin's own executable,
//!   bind-mounted read-only at `/usr/local/libexec/kiln-agent` and started once per job with
//!   `lxc-attach`, serves the host backend on `job/agent.sock` (`kiln plugin host`, or
//!   `kiln-plugin-lxc agent`); Exec, SignalExec and WriteStdin are forwarded to its
//!   environment `env` (`job/env/` holds the job's directories). A step then costs what it
//!   costs on the host plugin. Without the agent (`--no-agent`, or when it does not come up),
//!   each exec is `lxc-attach` with exactly the requested environment; inside, a small `sh`
//!   wrapper enters the working directory and `exec setsid`s the program, so each exec is its
//!   own process group (its id, seen from the host, is the pid of `lxc-attach`'s child);
//!   signals, timeouts and cancellation go to that group, and the output is streamed by the
//!   SDK's `child` module, like the host plugin's.
//! - **Files**: CopyIn and CopyOut (and, without the agent, staged and collected step files)
//!   go through the container's root as the host sees it (`/proc/<init>/root`), every path
//!   resolved with `openat2(RESOLVE_IN_ROOT)`: a symlink inside the container can never lead
//!   out of it.
//!   Tar streams use the SDK's traversal rules; nothing goes through `lxc-attach`.
//! - **Container layers** (`container:`, `services:`, docker steps) are DELEGATED to the
//!   plugin named by `--delegate` (kiln's docker plugin): the delegation's `host_dir` is the
//!   environment's `job/`, mounted at the same path in the inner containers. Docker nested
//!   inside the LXC container is not offered: see docs/lxc.md for why.
//! - **Remove** stops the container (`lxc-stop -k`: its PID namespace ends, and every process
//!   of the job with it) and deletes its directory. `ListEnvironments` reads the `kiln.json`
//!   files, so a restarted plugin (or kiln's GC) finds and removes what a killed one left.

mod backend;
mod env;
mod exec;
mod image;
mod lxc;
mod rootfs;

use std::path::PathBuf;

use clap::Parser;

pub use backend::LxcBackend;
pub use image::Image;

/// How job containers are networked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// Loopback only (`lxc.net.0.type = empty`).
    #[default]
    None,
    /// A veth on this existing bridge.
    Bridge(String),
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        match s.split_once(':') {
            _ if s == "none" || s.is_empty() => Ok(Network::None),
            Some(("bridge", name))
                if !name.is_empty()
                    && name.len() <= 15
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                Ok(Network::Bridge(name.to_owned()))
            }
            _ => Err(format!(
                "{s:?}: expected none or bridge:NAME (an existing bridge, at most 15 characters \
                 of [A-Za-z0-9._-])"
            )),
        }
    }
}

/// The default directory of the job containers.
pub const DEFAULT_ROOT: &str = "/var/lib/kiln/lxc";

/// The default directory of the base containers.
pub const DEFAULT_BASE_DIR: &str = "/var/cache/kiln/lxc";

/// Whether the base container of `image` is built under `base_dir` with this plugin's
/// recipe (so a job on it starts without a build).
pub fn base_ready(base_dir: &std::path::Path, image: &Image) -> bool {
    image
        .check(std::path::Path::new(lxc::DEBOOTSTRAP_SCRIPTS))
        .is_ok_and(|t| image::finished(base_dir, &image.base_name(t)).is_some())
}

/// Configuration of an [`LxcBackend`].
#[derive(Debug, Clone)]
pub struct LxcConfig {
    /// Where job containers live (the `lxcpath` of the environments).
    pub root: PathBuf,
    /// Where base containers are built and cached.
    pub base_dir: PathBuf,
    /// The image of an environment that names none.
    pub default_image: Image,
    /// The Debian mirror debootstrap uses (default: the one apt uses).
    pub mirror: Option<String>,
    /// Networking of job containers.
    pub network: Network,
    /// The backend container layers are delegated to.
    pub delegate: Option<String>,
    /// Run execs through an agent inside each container (else `lxc-attach` per exec).
    pub agent: bool,
}

/// The LXC backend's own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LxcArgs {
    /// Directory the job containers live in (an LXC lxcpath).
    #[arg(long, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Directory base containers are built and cached in, one per image and recipe.
    #[arg(long, default_value = DEFAULT_BASE_DIR)]
    pub base_dir: PathBuf,
    /// The image of a label with no arguments.
    #[arg(long, default_value = "debian:bookworm")]
    pub default_image: Image,
    /// The Debian mirror for debootstrap (default: the first one apt's sources name).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Networking of job containers: none (loopback only) or bridge:NAME (a veth on an
    /// existing bridge).
    #[arg(long, default_value = "none")]
    pub network: Network,
    /// Delegate container:, services: and docker steps to the plugin the runner calls NAME
    /// (e.g. docker), which must accept the option host_dir.
    #[arg(long, value_name = "NAME")]
    pub delegate: Option<String>,
    /// Run every exec with its own lxc-attach instead of through the agent inside the
    /// container (slower; for images whose libc cannot run this executable).
    #[arg(long)]
    pub no_agent: bool,
}

impl LxcArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> LxcConfig {
        LxcConfig {
            root: self.root.clone(),
            base_dir: self.base_dir.clone(),
            default_image: self.default_image.clone(),
            mirror: self.mirror.clone(),
            network: self.network.clone(),
            delegate: self.delegate.clone(),
            agent: !self.no_agent,
        }
    }
}

/// The command line of `kiln-plugin-lxc` (also usable as a subcommand's arguments).
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-plugin-lxc", version, about = "kiln LXC backend plugin")]
pub struct Args {
    /// Standard plugin flags.
    #[command(flatten)]
    pub serve: kiln_plugin_sdk::server::ServeArgs,
    /// LXC backend flags.
    #[command(flatten)]
    pub lxc: LxcArgs,
}

/// `kiln-plugin-lxc prepare IMAGE…`: builds the base containers of images (what the first job
/// on an image would do), for setup scripts.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kiln-plugin-lxc prepare",
    about = "build and cache the base containers of images"
)]
pub struct PrepareArgs {
    /// Images, e.g. debian:bookworm.
    #[arg(required = true)]
    pub images: Vec<Image>,
    /// LXC backend flags.
    #[command(flatten)]
    pub lxc: LxcArgs,
}

/// Serves the LXC backend with the given flags until a signal (or stdin EOF when asked).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let backend = LxcBackend::new(args.lxc.config())?;
    tracing::info!(root = %args.lxc.root.display(), "lxc backend ready");
    kiln_plugin_sdk::server::run(backend, &args.serve).await
}

/// Builds the base containers of `args.images`.
pub async fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let backend = LxcBackend::new(args.lxc.config())?;
    for image in &args.images {
        let started = std::time::Instant::now();
        let base = backend.base(image).await.map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
        tracing::info!(%image, base = %base.display(), elapsed = ?started.elapsed(), "base ready");
    }
    Ok(())
}

/// The binary's entry point: logging, then `prepare IMAGE…` or the server.
pub async fn main() -> anyhow::Result<()> {
    kiln_plugin_sdk::server::init_logging();
    let mut argv = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "agent") {
        // The agent inside a job container: the host backend (see `backend`).
        let program = argv.next().unwrap_or_default();
        let args = kiln_plugin_host::Args::parse_from(std::iter::once(program).chain(argv.skip(1)));
        return kiln_plugin_host::run(args).await;
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "prepare") {
        let program = argv.next().unwrap_or_default();
        return prepare(PrepareArgs::parse_from(std::iter::once(program).chain(argv.skip(1))))
            .await;
    }
    run(Args::parse()).await
}

/// GOARCH of this machine.
pub(crate) fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
