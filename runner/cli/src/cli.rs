//! Command-line syntax (clap derive only; no logic).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// kiln: a Forgejo/Gitea Actions runner whose backends are plugins.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    /// More logging on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a workflow locally (like act).
    Exec(Box<ExecArgs>),
    /// Check workflow files without running them: the YAML, every key, every `${{ }}` and
    /// `if:` (syntax, and contexts where GitHub makes them available); every error is printed
    /// as `file:line:col`; exit 2 when a file is invalid.
    Validate(ValidateArgs),
    /// Register this runner with a Forgejo/Gitea instance (writes the .runner file).
    Register(RegisterArgs),
    /// Write the .runner file from a shared secret (forgejo-cli actions register --secret).
    CreateRunnerFile(CreateRunnerFileArgs),
    /// Poll the instance for jobs and run them.
    Daemon(DaemonArgs),
    /// Fetch one job, run it and exit (ephemeral or autoscaled runners).
    OneJob(OneJobArgs),
    /// Print a commented example configuration file.
    GenerateConfig,
    /// Serve the actions/cache protocol for several runners (their cache.external_server).
    CacheServer(CacheServerArgs),
    /// Serve a first-party plugin (used by kiln itself for managed plugins).
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum PluginCommand {
    /// The host backend: steps run as processes on this machine.
    Host(kiln_plugin_host::Args),
    /// The reference test backend with fault injection.
    Test(kiln_plugin_test::Args),
    /// The Docker backend: jobs in containers on a Docker engine.
    Docker(kiln_plugin_docker::Args),
    /// The LXC backend: each job in an LXC system container (labels lxc://DISTRO:RELEASE).
    Lxc(kiln_plugin_lxc::Args),
    /// The QEMU backend: each job in its own VM, its containers inside it.
    Qemu(kiln_plugin_qemu::Args),
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Event that triggers the workflow (push, pull_request, workflow_dispatch, …).
    #[arg(default_value = "push")]
    pub(crate) event: String,
    /// Workflow file or directory (default: .forgejo/workflows, then .github/workflows).
    #[arg(short = 'W', long = "workflows")]
    pub(crate) workflows: Option<PathBuf>,
    /// Run only this job (and the jobs it needs).
    #[arg(short, long)]
    pub(crate) job: Vec<String>,
    /// Event payload (JSON file) for the github.event context.
    #[arg(short = 'e', long = "eventpath")]
    pub(crate) event_path: Option<PathBuf>,
    /// A secret, NAME=VALUE (or NAME to read it from the environment).
    #[arg(short, long = "secret")]
    pub(crate) secrets: Vec<String>,
    /// A configuration variable, NAME=VALUE.
    #[arg(long = "var")]
    pub(crate) vars: Vec<String>,
    /// An environment variable for every step, NAME=VALUE.
    #[arg(long = "env")]
    pub(crate) env: Vec<String>,
    /// A workflow_dispatch / workflow_call input, NAME=VALUE.
    #[arg(short, long = "input")]
    pub(crate) inputs: Vec<String>,
    /// Map a runs-on label to a backend: LABEL=host, LABEL=docker://IMAGE, LABEL=PLUGIN[:ARGS].
    #[arg(short = 'P', long = "platform")]
    pub(crate) platforms: Vec<String>,
    /// A plugin kiln starts itself: NAME=COMMAND (the command is split on spaces).
    #[arg(long = "plugin")]
    pub(crate) plugins: Vec<String>,
    /// A standalone plugin: NAME=unix:///path.sock (or http://… with --insecure-plugins).
    #[arg(long = "plugin-endpoint")]
    pub(crate) plugin_endpoints: Vec<String>,
    /// Allow plaintext TCP plugin endpoints (tests only).
    #[arg(long)]
    pub(crate) insecure_plugins: bool,
    /// Run only matrix combinations with this value, KEY:VALUE.
    #[arg(long = "matrix")]
    pub(crate) matrix: Vec<String>,
    /// The directory copied into the workspace (default: the repository root).
    #[arg(short = 'C', long = "directory")]
    pub(crate) directory: Option<PathBuf>,
    /// The github.actor of the run (default: git's user.name, else "kiln").
    #[arg(long)]
    pub(crate) actor: Option<String>,
    /// List the jobs and exit.
    #[arg(short, long)]
    pub(crate) list: bool,
    /// Show the job graph and exit.
    #[arg(short, long)]
    pub(crate) graph: bool,
    /// Show ::debug:: lines.
    #[arg(long)]
    pub(crate) debug: bool,
    /// Do not set ACT=true (kiln sets it by default, like act, so scripts can detect local runs).
    #[arg(long)]
    pub(crate) no_act_env: bool,
    /// Base URL of remote actions and reusable workflows (owner/repo@ref).
    #[arg(long, default_value = kiln_runner::actions::DEFAULT_BASE_URL)]
    pub(crate) actions_url: String,
    /// The action cache (default: actions/ in kiln's state directory).
    #[arg(long)]
    pub(crate) action_cache_dir: Option<PathBuf>,
    /// Use only cached actions; never fetch (act's --action-offline-mode).
    #[arg(long)]
    pub(crate) action_offline_mode: bool,
    /// Use a local directory for an action: owner/repo@ref=DIR, or owner/repo=DIR for every ref.
    #[arg(long = "local-repository")]
    pub(crate) local_repositories: Vec<String>,
    /// Do not start the cache server (actions/cache then finds no ACTIONS_CACHE_URL).
    #[arg(long)]
    pub(crate) no_cache_server: bool,
    /// Where the cache server keeps its entries (default: cache/ in kiln's state directory).
    #[arg(long)]
    pub(crate) cache_server_path: Option<PathBuf>,
    /// The address the job services listen on (default: the docker bridge's gateway when a
    /// docker backend is in use, else 127.0.0.1).
    #[arg(long)]
    pub(crate) cache_server_addr: Option<std::net::IpAddr>,
    /// The port the job services listen on (default: any free port).
    #[arg(long, default_value_t = 0)]
    pub(crate) cache_server_port: u16,
    /// The jobs' ACTIONS_CACHE_MODE: write, read or none (pull requests from forks: at most read).
    #[arg(long, value_parser = ["write", "read", "none"])]
    pub(crate) cache_mode: Option<String>,
    /// Where uploaded artifacts go (default: artifacts/ in kiln's state directory; each run
    /// in a directory of its own).
    #[arg(long)]
    pub(crate) artifact_server_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// Workflow files or directories.
    #[arg(required = true)]
    pub(crate) paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// The config file (for runner.file, where the .runner file goes).
    #[arg(short, long)]
    pub(crate) config: Option<PathBuf>,
    /// The instance URL, e.g. https://forgejo.example.
    #[arg(long)]
    pub(crate) instance: Option<String>,
    /// The registration token (Site, organisation or repository settings → Actions → Runners).
    #[arg(long, env = "KILN_REGISTRATION_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The runner's name (default: the host name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Labels, comma-separated: linux:host, ubuntu-latest:docker://IMAGE, vm:PLUGIN.
    #[arg(long, value_delimiter = ',')]
    pub(crate) labels: Vec<String>,
    /// Never prompt (kiln never prompts; kept for Forgejo Runner's command lines).
    #[arg(long)]
    pub(crate) no_interactive: bool,
    /// Register an ephemeral runner (one job, then the server deletes it).
    #[arg(long)]
    pub(crate) ephemeral: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CreateRunnerFileArgs {
    /// The config file (for runner.file).
    #[arg(short, long)]
    pub(crate) config: Option<PathBuf>,
    /// The instance URL.
    #[arg(long)]
    pub(crate) instance: String,
    /// The 40-hex shared secret given to forgejo-cli actions register --secret.
    #[arg(long, env = "KILN_RUNNER_SECRET", hide_env_values = true)]
    pub(crate) secret: String,
    /// The runner's name.
    #[arg(long, default_value = "kiln")]
    pub(crate) name: String,
    /// Labels, comma-separated (stored in the file; the config's runner.labels win).
    #[arg(long, value_delimiter = ',')]
    pub(crate) labels: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CacheServerArgs {
    /// The address to listen on, e.g. 10.0.0.5:8088 (an address the runners' jobs reach).
    #[arg(long)]
    pub(crate) listen: std::net::SocketAddr,
    /// A file holding the shared secret (the runners' cache.secret); 16 bytes at least.
    #[arg(long)]
    pub(crate) secret_file: PathBuf,
    /// Where entries are kept (default: cache/ in kiln's state directory).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// The total size of all entries in bytes; least recently used entries go beyond it.
    #[arg(long, default_value_t = 10 << 30)]
    pub(crate) max_size: u64,
    /// Also serve artifacts (v4) from this directory (benchmarks and tests; `kiln exec` has
    /// its own).
    #[arg(long)]
    pub(crate) artifacts: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    /// The config file (see kiln generate-config); without one, the defaults.
    #[arg(short, long)]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct OneJobArgs {
    /// The config file.
    #[arg(short, long)]
    pub(crate) config: Option<PathBuf>,
    /// The handle of the job to run (Forgejo >= 15); without it, any job for this runner.
    #[arg(long)]
    pub(crate) handle: Option<String>,
}
