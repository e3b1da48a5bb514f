//! The kiln reference plugin for CI: the host backend (real semantics) plus fault injection.
//!
//! With no fault set it behaves exactly like the host plugin, except that it is called
//! `"test"` and keeps its environments under its own root. Faults come from flags (see
//! [`Faults`]) or from the `options` of `CreateExecutionEnvironment`, key `fault`:
//!
//! | option                                         | effect                                         |
//! |------------------------------------------------|------------------------------------------------|
//! | `{"fault": "fail-create"}`                     | the create fails UNAVAILABLE (retryable)       |
//! | `{"fault": "crash-on-exec", "n": N}`           | the process exits (101) ~300 ms after the Nth exec *of this environment* started |
//! | `{"fault": "drop-stream-on-exec", "n": N}`     | the Nth exec of this environment ends without its `Exited` frame |
//! | `{"fault": "exec-delay-ms", "ms": D}`          | every exec of this environment starts D ms late |
//!
//! `n` defaults to 1. Flag counts (`--crash-on-exec`, `--drop-stream-on-exec`) are over all
//! execs of the plugin process, 1-based. Environment faults live in memory only: after the
//! injected crash the restarted plugin has forgotten them (no crash loop).
//!
//! A refused capability (`--refuse-capability NAME`) is declared unsupported or false, and
//! the calls that would need it fail UNIMPLEMENTED, so a runner that ignores a declaration
//! is caught: `environment` (create), `stdin` (WriteStdin, exec with stdin), `local_copy`
//! (CopyIn with a local path), `exec_files` (exec with files or collect), `exec_timeout`
//! (exec with a timeout).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use kiln_plugin_host::{HostArgs, HostBackend, HostConfig};
use kiln_plugin_sdk::{
    Backend, ByteStream, Capabilities, CapabilitiesRequest, Container, ContainerKind, ContainerRef,
    ContainerRequest, ContainerStatus, CopyInTarget, CopyOutSource, CopyStats, Environment,
    EnvironmentRequest, EnvironmentSummary, Error, ExecEvent, ExecRequest, ExecStream, Fault,
    LayerSupport, RemoveRequest, Result, Selector, SignalRequest,
};

/// How long after the crashing exec started the process exits (so the step has started and
/// printed something: a crash mid-step).
pub const CRASH_DELAY: Duration = Duration::from_millis(300);
/// The exit status of an injected crash.
pub const CRASH_EXIT_CODE: i32 = 101;

/// A capability `--refuse-capability` can take away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Capability {
    /// The `runs-on` layer.
    #[value(name = "environment")]
    Environment,
    /// `container:`.
    #[value(name = "job_container", alias = "job-container")]
    JobContainer,
    /// `services:`.
    #[value(name = "service_containers", alias = "service-containers")]
    ServiceContainers,
    /// Docker steps.
    #[value(name = "step_containers", alias = "step-containers")]
    StepContainers,
    /// Feature `stdin`.
    #[value(name = "stdin")]
    Stdin,
    /// Feature `tty`.
    #[value(name = "tty")]
    Tty,
    /// Feature `local_copy`.
    #[value(name = "local_copy", alias = "local-copy")]
    LocalCopy,
    /// Feature `image_build`.
    #[value(name = "image_build", alias = "image-build")]
    ImageBuild,
    /// Feature `exec_files`.
    #[value(name = "exec_files", alias = "exec-files")]
    ExecFiles,
    /// Feature `exec_timeout`.
    #[value(name = "exec_timeout", alias = "exec-timeout")]
    ExecTimeout,
    /// Feature `health`.
    #[value(name = "health")]
    Health,
}

/// The faults to inject (also the binary's fault flags).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Faults {
    /// Exit abruptly (status 101) ~300 ms after the Nth exec (1-based, over all environments; only execs that start count)
    /// has started: a plugin crash in the middle of a step.
    #[arg(long, value_name = "N")]
    pub crash_on_exec: Option<u64>,
    /// Wait this many milliseconds before starting each exec.
    #[arg(long, value_name = "MS")]
    pub exec_delay_ms: Option<u64>,
    /// End the Nth exec's stream (1-based, over all environments) after its output but
    /// without the terminal `Exited` frame.
    #[arg(long, value_name = "N")]
    pub drop_stream_on_exec: Option<u64>,
    /// Declare a layer unsupported or a feature absent (repeatable).
    #[arg(long = "refuse-capability", value_name = "NAME")]
    pub refuse: Vec<Capability>,
    /// Fail every CreateExecutionEnvironment with UNAVAILABLE (infrastructure, retryable).
    #[arg(long)]
    pub fail_create: bool,
    /// Advertise this protocol version instead of the SDK's.
    #[arg(long, value_name = "V")]
    pub protocol_version: Option<u32>,
}

impl Faults {
    fn refuses(&self, c: Capability) -> bool {
        self.refuse.contains(&c)
    }
}

/// A fault set by an environment's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvFaultKind {
    CrashOnExec(u64),
    DropStreamOnExec(u64),
    ExecDelay(Duration),
}

struct EnvFault {
    kind: EnvFaultKind,
    execs: AtomicU64,
}

/// The test backend: a [`HostBackend`] with faults.
pub struct TestBackend {
    host: HostBackend,
    faults: Faults,
    execs: AtomicU64,
    env_faults: Mutex<HashMap<String, Arc<EnvFault>>>,
}

impl std::fmt::Debug for TestBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBackend")
            .field("host", &self.host)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

fn refused(what: &str) -> Error {
    Error::unimplemented(format!("{what} was refused by --refuse-capability"))
}

/// Reads the `fault` option of a create request.
fn option_fault(
    options: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<OptionFault>> {
    let Some(fault) = options.get("fault") else {
        return Ok(None);
    };
    let number = |key: &str, default: u64| -> Result<u64> {
        match options.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "option {key:?} of the test plugin must be a number"
                ))
                .fault(Fault::Config)
                .field(format!("options.{key}"))
            }),
        }
    };
    let kind = match fault.as_str() {
        Some("fail-create") => return Ok(Some(OptionFault::FailCreate)),
        Some("crash-on-exec") => EnvFaultKind::CrashOnExec(number("n", 1)?),
        Some("drop-stream-on-exec") => EnvFaultKind::DropStreamOnExec(number("n", 1)?),
        Some("exec-delay-ms") => {
            EnvFaultKind::ExecDelay(Duration::from_millis(number("ms", number("n", 0)?)?))
        }
        _ => {
            return Err(Error::invalid_argument(format!(
                "unknown fault {fault}: use \"fail-create\", \"crash-on-exec\", \
                 \"drop-stream-on-exec\" or \"exec-delay-ms\""
            ))
            .fault(Fault::Config)
            .field("options.fault"));
        }
    };
    Ok(Some(OptionFault::Env(kind)))
}

enum OptionFault {
    FailCreate,
    Env(EnvFaultKind),
}

impl TestBackend {
    /// A test backend with environments under `config.root`.
    pub fn new(config: HostConfig, faults: Faults) -> anyhow::Result<TestBackend> {
        Ok(TestBackend::with_host(HostBackend::new(config)?, faults))
    }

    /// A test backend around an existing host backend.
    pub fn with_host(host: HostBackend, faults: Faults) -> TestBackend {
        TestBackend {
            host,
            faults,
            execs: AtomicU64::new(0),
            env_faults: Mutex::new(HashMap::new()),
        }
    }

    /// The faults set by flags.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The host backend underneath.
    pub fn host(&self) -> &HostBackend {
        &self.host
    }

    fn env_fault(&self, id: &str) -> Option<Arc<EnvFault>> {
        self.env_faults.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    fn check_refusals(&self, req: &ExecRequest) -> Result<()> {
        if req.stdin && self.faults.refuses(Capability::Stdin) {
            return Err(refused("stdin"));
        }
        if (!req.files.is_empty() || !req.collect.is_empty())
            && self.faults.refuses(Capability::ExecFiles)
        {
            return Err(refused("exec_files"));
        }
        if req.timeout.is_some() && self.faults.refuses(Capability::ExecTimeout) {
            return Err(refused("exec_timeout"));
        }
        Ok(())
    }
}

fn crash() -> ! {
    tracing::error!("injected fault: crashing mid-exec (exit {CRASH_EXIT_CODE})");
    std::process::exit(CRASH_EXIT_CODE)
}

#[async_trait::async_trait]
impl Backend for TestBackend {
    async fn capabilities(&self, request: CapabilitiesRequest) -> Result<Capabilities> {
        let mut caps = self.host.capabilities(request).await?;
        caps.plugin_name = "test".to_owned();
        caps.plugin_version = env!("CARGO_PKG_VERSION").to_owned();
        for &c in &self.faults.refuse {
            let name = c.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
            let off =
                || LayerSupport::Unsupported(format!("refused by --refuse-capability {name}"));
            let f = &mut caps.features;
            match c {
                Capability::Environment => caps.environment = off(),
                Capability::JobContainer => caps.job_container = off(),
                Capability::ServiceContainers => caps.service_containers = off(),
                Capability::StepContainers => caps.step_containers = off(),
                Capability::Stdin => f.stdin = false,
                Capability::Tty => f.tty = false,
                Capability::LocalCopy => f.local_copy = false,
                Capability::ImageBuild => f.image_build = false,
                Capability::ExecFiles => f.exec_files = false,
                Capability::ExecTimeout => f.exec_timeout = false,
                Capability::Health => f.health = false,
            }
        }
        if let Some(v) = self.faults.protocol_version {
            caps.protocol_version = v;
        }
        Ok(caps)
    }

    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        if self.faults.refuses(Capability::Environment) {
            return Err(refused("environment"));
        }
        if self.faults.fail_create {
            return Err(Error::unavailable("injected fault: --fail-create"));
        }
        let fault = option_fault(&request.options)?;
        let kind = match fault {
            Some(OptionFault::FailCreate) => {
                return Err(Error::unavailable("injected fault: option fail-create"));
            }
            Some(OptionFault::Env(kind)) => Some(kind),
            None => None,
        };
        let id = request.environment_id.clone();
        let env = self.host.create_environment(request).await?;
        if let Some(kind) = kind {
            let mut faults = self.env_faults.lock().unwrap_or_else(PoisonError::into_inner);
            faults
                .entry(id)
                .or_insert_with(|| Arc::new(EnvFault { kind, execs: AtomicU64::new(0) }));
        }
        Ok(env)
    }

    async fn create_container(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        self.host.create_container(kind, request).await
    }

    async fn start_container(&self, target: ContainerRef) -> Result<Container> {
        self.host.start_container(target).await
    }

    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        self.host.inspect(target).await
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        self.check_refusals(&request)?;
        let env_fault = self.env_fault(&request.environment_id);
        let env_kind = env_fault.as_ref().map(|f| f.kind);

        let mut delay = Duration::from_millis(self.faults.exec_delay_ms.unwrap_or(0));
        if let Some(EnvFaultKind::ExecDelay(d)) = env_kind {
            delay += d;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // Only execs that really start count, so refused requests do not use up a fault.
        let stream = self.host.exec(request).await?;
        let n = self.execs.fetch_add(1, Ordering::SeqCst) + 1;
        let env_n = env_fault.as_ref().map(|f| f.execs.fetch_add(1, Ordering::SeqCst) + 1);
        let crash_now = self.faults.crash_on_exec == Some(n)
            || matches!(env_kind, Some(EnvFaultKind::CrashOnExec(k)) if env_n == Some(k));
        let drop_frame = self.faults.drop_stream_on_exec == Some(n)
            || matches!(env_kind, Some(EnvFaultKind::DropStreamOnExec(k)) if env_n == Some(k));
        if crash_now {
            tokio::spawn(async {
                tokio::time::sleep(CRASH_DELAY).await;
                crash();
            });
        }
        if drop_frame {
            tracing::warn!("injected fault: ending exec {n} without its terminal frame");
            let cut = stream
                .take_while(|e| futures::future::ready(!matches!(e, Ok(ExecEvent::Exited(_)))));
            return Ok(Box::pin(cut));
        }
        Ok(stream)
    }

    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        self.host.signal_exec(request).await
    }

    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        if self.faults.refuses(Capability::Stdin) {
            return Err(refused("stdin"));
        }
        self.host.write_stdin(exec_id, data).await
    }

    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        if target.local_path.is_some() && self.faults.refuses(Capability::LocalCopy) {
            return Err(refused("local_copy"));
        }
        self.host.copy_in(target, data).await
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        self.host.copy_out(source).await
    }

    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let whole = request.container_id.is_none();
        let id = request.environment_id.clone();
        let existed = self.host.remove(request).await?;
        if whole {
            self.env_faults.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        }
        Ok(existed)
    }

    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        self.host.list_environments(selector).await
    }
}

/// The command line of `kiln-plugin-test` (also usable as a subcommand's arguments).
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-plugin-test", version, about = "kiln reference plugin with fault injection")]
pub struct Args {
    /// Standard plugin flags.
    #[command(flatten)]
    pub serve: kiln_plugin_sdk::server::ServeArgs,
    /// Host backend flags (the root defaults to …/kiln/test).
    #[command(flatten)]
    pub host: HostArgs,
    /// Faults to inject.
    #[command(flatten)]
    pub faults: Faults,
}

/// Serves the test backend with the given flags until a signal (or stdin EOF when asked).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let backend = TestBackend::new(args.host.config("test"), args.faults)?;
    tracing::info!(root = %backend.host().root().display(), faults = ?backend.faults(), "test backend ready");
    let host = backend.host().clone();
    let served = kiln_plugin_sdk::server::run(backend, &args.serve).await;
    host.drain_removals().await;
    served
}

/// The binary's entry point: logging, flags from the command line, [`run`].
pub async fn main() -> anyhow::Result<()> {
    kiln_plugin_sdk::server::init_logging();
    run(Args::parse()).await
}
