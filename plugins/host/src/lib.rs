//! The kiln host backend: runs steps directly on this machine, each job in a private work
//! directory (act's "host mode", with the protocol's guarantees).
//!
//! - The root is marked a top directory (`chattr +T`, best effort), so ext4 puts each
//!   environment's directory in another block group than the ones recently freed (see
//!   `kiln_plugin_sdk::dirs`).
//! - An environment is `root/<id>/` (0700) with `workspace/`, `temp/`, `tool-cache/` (or a
//!   shared tool cache, `--tool-cache`), `runner/`, and `env.json` holding the owner labels,
//!   the spec hash (replayed creates are idempotent, a different spec is ALREADY_EXISTS) and
//!   the paths. HOME is the real user's HOME, as in act's host mode.
//! - The primary container id is `"host"`: the environment's own process space. There are no
//!   other containers. The three container layers are unsupported, or, with `--delegate NAME`
//!   (kiln adds `--delegate docker` to its embedded host plugin when a docker plugin is
//!   configured), delegated to the plugin the runner calls NAME: every environment then
//!   returns `delegation {backend: NAME, options: {"host_dir": "<the environment's
//!   directory>"}}`, and the runner creates `container:`, `services:` and docker steps in an
//!   environment of that plugin which bind-mounts the directory at the same path (the docker
//!   plugin's `host_dir` option), so workspace and runner files are shared. Each
//!   `--delegate-option KEY=VALUE` is added to those options, e.g. `docker_host=tcp://…` when
//!   the docker plugin reaches this machine's daemon over the network.
//! - Each exec is one process in a new process group, with exactly the requested environment
//!   (plus `path_prepend`). The groups are recorded in memory and in `root/<id>/pgids`, so
//!   Remove kills them even after a plugin restart — after checking in `/proc` that each group
//!   still belongs to the environment (see `procs`).
//! - Remove of an environment kills its process groups, renames its directory into
//!   `root/.removed/` (no id can name it, so it is never listed) and answers; the tree is
//!   deleted in the background (on ext4 with `discard`, deleting a job's workspace takes
//!   longer than a short job). The plugin waits for those deletions and deletes
//!   `root/.removed/` before it exits; one that was killed first leaves them to the next start.
//! - Remove of a container id (even `"host"`) removes nothing and returns `existed = false`:
//!   the primary container lives exactly as long as its environment, so only removing the
//!   environment ends it. This keeps a generic "remove the containers, then the environment"
//!   cleanup path working.
//! - Staged and collected files must lie inside the environment's directory (a lexical
//!   check: the host backend runs the workflow's own code as this user, so it is no security
//!   boundary against the workflow); copies are checked with symlinks resolved.
//! - The end of a WriteStdin stream closes the process's stdin.

mod backend;
mod copy;
mod env;
mod exec;
mod procs;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use clap::Parser;

pub use backend::HostBackend;
pub use procs::ContainmentMode;

/// Configuration of a [`HostBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Where environments live (created 0700).
    pub root: PathBuf,
    /// A tool cache shared by all environments (`RUNNER_TOOL_CACHE`), so tools set up by one
    /// job are reused by the next; `None` gives each environment its own `tool-cache/`.
    pub tool_cache: Option<PathBuf>,
    /// The backend (the runner's name for another plugin) that container layers are delegated
    /// to; `None` leaves them unsupported.
    pub delegate: Option<String>,
    /// Options added to the delegation's (`host_dir` is always there).
    pub delegate_options: Vec<(String, String)>,
    /// How each environment's processes are held so that Remove ends all of them.
    pub containment: ContainmentMode,
}

impl HostConfig {
    /// A configuration with environments under `root` and per-environment tool caches.
    pub fn new(root: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            root: root.into(),
            tool_cache: None,
            delegate: None,
            delegate_options: Vec::new(),
            containment: ContainmentMode::Auto,
        }
    }

    /// The default root of a plugin called `name`: `$XDG_STATE_HOME/kiln/<name>`, else
    /// `~/.local/state/kiln/<name>`, else `/tmp/kiln-<name>-<uid>`.
    pub fn default_root(name: &str) -> PathBuf {
        let abs = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
        if let Some(state) = std::env::var_os("XDG_STATE_HOME").and_then(abs) {
            return state.join("kiln").join(name);
        }
        if let Some(home) = std::env::var_os("HOME").and_then(abs) {
            return home.join(".local/state/kiln").join(name);
        }
        PathBuf::from(format!("/tmp/kiln-{name}-{}", nix::unistd::getuid()))
    }
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig::new(HostConfig::default_root("host"))
    }
}

/// The host backend's own flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HostArgs {
    /// Directory the environments live in (default: `$XDG_STATE_HOME/kiln/<plugin>`, else
    /// `~/.local/state/kiln/<plugin>`).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// A tool cache shared by all jobs (default: one per environment).
    #[arg(long)]
    pub tool_cache: Option<PathBuf>,
    /// Delegate container:, services: and docker steps to the plugin the runner calls NAME
    /// (e.g. docker), which must accept the option host_dir (the environment's directory,
    /// mounted at the same path).
    #[arg(long, value_name = "NAME")]
    pub delegate: Option<String>,
    /// An option added to the delegation (repeatable), e.g. docker_host=tcp://10.0.0.2:2376
    /// when the delegate reaches this machine's docker daemon over the network.
    #[arg(long = "delegate-option", value_name = "KEY=VALUE", value_parser = parse_option)]
    pub delegate_options: Vec<(String, String)>,
    /// How an environment's processes are held so that Remove ends every one of them, also
    /// those that called setsid or double-forked: `auto` (a cgroup v2 per environment when
    /// the cgroup filesystem is writable, else `subreaper`), `subreaper` (the plugin adopts
    /// orphans; Remove also ends processes that work inside or name the environment's
    /// directory), `groups` (process groups only; for testing the conformance suite).
    #[arg(long, value_enum, default_value_t = ContainmentMode::Auto)]
    pub containment: ContainmentMode,
}

/// Parses `KEY=VALUE` (a non-empty key other than `host_dir`).
fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("host_dir", _)) => {
            Err("host_dir is set by the plugin (the environment's directory)".to_owned())
        }
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected KEY=VALUE, e.g. docker_host=tcp://10.0.0.2:2376")),
    }
}

impl HostArgs {
    /// The configuration these flags describe, defaulting the root for a plugin called `name`.
    pub fn config(&self, name: &str) -> HostConfig {
        HostConfig {
            root: self.root.clone().unwrap_or_else(|| HostConfig::default_root(name)),
            tool_cache: self.tool_cache.clone(),
            delegate: self.delegate.clone(),
            delegate_options: self.delegate_options.clone(),
            containment: self.containment,
        }
    }
}

/// The command line of `kiln-plugin-host` (also usable as a subcommand's arguments).
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-plugin-host", version, about = "kiln host backend plugin")]
pub struct Args {
    /// Standard plugin flags.
    #[command(flatten)]
    pub serve: kiln_plugin_sdk::server::ServeArgs,
    /// Host backend flags.
    #[command(flatten)]
    pub host: HostArgs,
}

/// Serves the host backend with the given flags until a signal (or stdin EOF when asked).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let backend = HostBackend::new(args.host.config("host"))?;
    tracing::info!(root = %backend.root().display(), "host backend ready");
    let served = kiln_plugin_sdk::server::run(backend.clone(), &args.serve).await;
    backend.drain_removals().await;
    served
}

/// The binary's entry point: logging, flags from the command line, [`run`].
pub async fn main() -> anyhow::Result<()> {
    kiln_plugin_sdk::server::init_logging();
    run(Args::parse()).await
}

/// GOOS of this machine.
pub fn go_os() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

/// GOARCH of this machine.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Locks a mutex, ignoring poisoning (the state stays consistent across a panicking holder).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
