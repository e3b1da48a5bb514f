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
//! A violation (`--violate NAME`, repeatable) breaks one rule of the protocol on purpose:
//! each is a mutant the conformance suite must catch, naming the rule (see [`Violation`]
//! for the list and `tests/e2e/mutants.rs` for the test that runs the suite against each).
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
    /// Break one rule of the protocol on purpose (repeatable): a mutant the conformance
    /// suite must catch.
    #[arg(long = "violate", value_name = "RULE", value_enum)]
    pub violate: Vec<Violation>,
}

/// A rule the test plugin breaks on purpose, and the conformance case that must catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Violation {
    /// No `kiln-instance-id` response header (§2.3).
    OmitInstanceId,
    /// Any `kiln-protocol-version` request header accepted (§2.3).
    IgnoreVersionHeader,
    /// Errors without `ErrorDetail` (§7.2).
    NoErrorDetail,
    /// No grpc.health.v1 service (§1.5).
    NoHealth,
    /// A 4 MiB receive limit while 16 MiB is announced (§1.6).
    SmallReceiveLimit,
    /// The unix socket created 0777 (§1.4).
    WorldWritableSocket,
    /// SIGTERM ignored (§1.3).
    IgnoreSigterm,
    /// `--exit-on-stdin-eof` ignored (§1.3).
    IgnoreStdinEof,
    /// Remove ends process groups only: a `setsid` process survives (§5.12).
    RemoveKillsGroupsOnly,
    /// Exec ids forgotten when the plugin restarts (§4.6).
    ForgetExecIdsOnRestart,
    /// Exec ids never remembered: a replay runs again (§4.6).
    ReplayExecIds,
    /// `tty = true` silently ignored (§3.3).
    IgnoreTty,
    /// Two `Exited` frames (§5.6.1).
    DoubleExited,
    /// A missing program exits 1 instead of 127 (§5.6.2).
    MissingProgramExits1,
    /// No keepalives on a silent exec (§5.6.1).
    NoKeepalive,
    /// Staged files written through symlinks (§5.6.5).
    StageThroughSymlinks,
    /// Collected files read through symlinks (§5.6.6).
    CollectThroughSymlinks,
    /// A replayed create with another spec returns the existing environment (§4.4).
    ReplayIgnoresSpec,
    /// Ids outside the grammar accepted (§4.1).
    AcceptBadIds,
    /// Remove of something absent answers NOT_FOUND (§4.5).
    RemoveNotIdempotent,
    /// A variable added to every exec's environment (§5.6.3).
    AddEnvVariable,
    /// Every non-zero exit code reported as 1 (§7.3).
    SquashExitCodes,
    /// Output held back until the process exits (§5.6.1).
    BufferOutput,
    /// `timeout_ms` ignored (§5.6.7).
    IgnoreTimeout,
    /// SignalExec never escalates to SIGKILL (§5.7).
    NoKillEscalation,
    /// ListEnvironments ignores its selector (§5.13.1).
    ListIgnoresSelector,
    /// NOT_FOUND answered as INTERNAL (§5.5).
    NotFoundAsInternal,
}

impl Violation {
    /// The conformance case that must fail for this mutant.
    pub fn caught_by(self) -> &'static str {
        use Violation as V;
        match self {
            V::OmitInstanceId => "protocol/metadata/instance-id",
            V::IgnoreVersionHeader => "protocol/metadata/version-refused",
            V::NoErrorDetail => "protocol/errors/error-detail",
            V::NoHealth => "protocol/health/serving",
            V::SmallReceiveLimit => "protocol/limits/message-size",
            V::WorldWritableSocket => "protocol/transport/socket-mode",
            V::IgnoreSigterm => "faults/plugin/sigterm-exit",
            V::IgnoreStdinEof => "faults/plugin/stdin-eof-exit",
            V::RemoveKillsGroupsOnly => "semantics/remove/ends-every-process",
            V::ForgetExecIdsOnRestart => "faults/plugin/exec-ids-survive-restart",
            V::ReplayExecIds => "protocol/exec/id-reuse",
            V::IgnoreTty => "semantics/exec/tty-undeclared",
            V::DoubleExited => "semantics/exec/stream-grammar",
            V::MissingProgramExits1 => "semantics/exec/missing-program",
            V::NoKeepalive => "semantics/exec/keepalive",
            V::StageThroughSymlinks => "semantics/files/symlink-staging",
            V::CollectThroughSymlinks => "semantics/files/symlink-collection",
            V::ReplayIgnoresSpec => "protocol/environment/replay",
            V::AcceptBadIds => "protocol/environment/invalid-ids",
            V::RemoveNotIdempotent => "protocol/remove/idempotent",
            V::AddEnvVariable => "semantics/exec/env-exact",
            V::SquashExitCodes => "semantics/exec/output-and-exit-codes",
            V::BufferOutput => "semantics/exec/streaming",
            V::IgnoreTimeout => "semantics/exec/timeout",
            V::NoKillEscalation => "semantics/signal/kill-escalation",
            V::ListIgnoresSelector => "protocol/list/selectors",
            V::NotFoundAsInternal => "protocol/errors/not-found",
        }
    }

    /// Every violation.
    pub fn all() -> Vec<Violation> {
        Violation::value_variants().to_vec()
    }

    /// Its `--violate` spelling.
    pub fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
    }
}

impl Faults {
    fn refuses(&self, c: Capability) -> bool {
        self.refuse.contains(&c)
    }

    fn violates(&self, v: Violation) -> bool {
        self.violate.contains(&v)
    }

    /// The server-side violations among these.
    pub fn server_violations(&self) -> kiln_plugin_sdk::server::Violations {
        kiln_plugin_sdk::server::Violations {
            omit_instance_id: self.violates(Violation::OmitInstanceId),
            ignore_version_header: self.violates(Violation::IgnoreVersionHeader),
            no_error_detail: self.violates(Violation::NoErrorDetail),
            no_health: self.violates(Violation::NoHealth),
            max_receive_bytes: self
                .violates(Violation::SmallReceiveLimit)
                .then_some(4 * 1024 * 1024),
            socket_mode: self.violates(Violation::WorldWritableSocket).then_some(0o777),
            ignore_sigterm: self.violates(Violation::IgnoreSigterm),
        }
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
    /// This process's nonce (mutants that forget exec ids on restart).
    instance: String,
    /// The first create request of each id (mutant `replay-ignores-spec`).
    first_creates: Mutex<HashMap<String, EnvironmentRequest>>,
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
            instance: format!("{:04x}", std::process::id() % 0x10000),
            first_creates: Mutex::new(HashMap::new()),
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

impl TestBackend {
    /// The exec id the host backend sees (mutants that forget or never remember ids).
    fn exec_id(&self, id: &str) -> String {
        if self.faults.violates(Violation::ReplayExecIds) {
            let n = self.execs.load(Ordering::SeqCst);
            return kiln_plugin_sdk::ids::make_id(&[id, &format!("r{n}")]);
        }
        if self.faults.violates(Violation::ForgetExecIdsOnRestart) {
            return kiln_plugin_sdk::ids::make_id(&[id, &self.instance]);
        }
        id.to_owned()
    }

    /// The environment id the host backend sees (mutant `accept-bad-ids`).
    fn env_id(&self, id: &str) -> String {
        if self.faults.violates(Violation::AcceptBadIds)
            && kiln_plugin_sdk::ids::validate_id(id, "environment_id").is_err()
        {
            return kiln_plugin_sdk::ids::make_id(&["bad", id]);
        }
        id.to_owned()
    }

    fn not_found_as_internal<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Err(e)
                if e.code == kiln_plugin_sdk::Code::NotFound
                    && self.faults.violates(Violation::NotFoundAsInternal) =>
            {
                Err(Error::internal(format!("mutant: {}", e.message)))
            }
            r => r,
        }
    }
}

impl TestBackend {
    /// The stream mutants: frames dropped, doubled, held back or rewritten.
    fn mutate_stream(
        &self,
        stream: ExecStream,
        naive_collect: Option<(Vec<String>, u64)>,
    ) -> ExecStream {
        let v = |x| self.faults.violates(x);
        let mut stream = stream;
        if v(Violation::NoKeepalive) {
            stream = Box::pin(
                stream.filter(|e| futures::future::ready(!matches!(e, Ok(ExecEvent::Keepalive)))),
            );
        }
        let squash = v(Violation::SquashExitCodes);
        let missing1 = v(Violation::MissingProgramExits1);
        if squash || missing1 || naive_collect.is_some() {
            stream = Box::pin(stream.map(move |e| match e {
                Ok(ExecEvent::Exited(mut x)) => {
                    if let kiln_plugin_sdk::ExitStatus::Code(c) = x.status
                        && ((squash && c != 0) || (missing1 && c == 127))
                    {
                        x.status = kiln_plugin_sdk::ExitStatus::Code(1);
                    }
                    if let Some((paths, limit)) = &naive_collect {
                        x.files = collect_naively(paths, *limit);
                    }
                    Ok(ExecEvent::Exited(x))
                }
                other => other,
            }));
        }
        if v(Violation::DoubleExited) {
            stream = Box::pin(stream.flat_map(|e| {
                let events = match &e {
                    Ok(ExecEvent::Exited(x)) => vec![e.clone(), Ok(ExecEvent::Exited(x.clone()))],
                    _ => vec![e],
                };
                futures::stream::iter(events)
            }));
        }
        if v(Violation::BufferOutput) {
            // Everything held until the stream ends.
            stream = Box::pin(
                futures::stream::once(async move { stream.collect::<Vec<_>>().await })
                    .flat_map(futures::stream::iter),
            );
        }
        stream
    }
}

/// Writes staged files the naive way, following symlinks (mutant).
fn stage_naively(files: &[kiln_plugin_sdk::StagedFile]) {
    for f in files {
        let path = std::path::Path::new(&f.path);
        // Only absolute paths: a relative one would land in the plugin's working directory.
        if !path.is_absolute() {
            continue;
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(path, &f.content);
    }
}

/// Reads collected files the naive way, following symlinks (mutant).
fn collect_naively(paths: &[String], limit: u64) -> Vec<kiln_plugin_sdk::CollectedFile> {
    let limit = if limit == 0 { 1024 * 1024 } else { limit };
    paths
        .iter()
        .map(|p| match std::fs::read(p) {
            Ok(mut data) => {
                let truncated = data.len() as u64 > limit;
                data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                kiln_plugin_sdk::CollectedFile {
                    path: p.clone(),
                    content: data.into(),
                    truncated,
                    missing: false,
                }
            }
            Err(_) => kiln_plugin_sdk::CollectedFile {
                path: p.clone(),
                missing: true,
                ..Default::default()
            },
        })
        .collect()
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
        let mut request = request;
        request.environment_id = self.env_id(&request.environment_id);
        if self.faults.violates(Violation::ReplayIgnoresSpec) {
            let mut first = self.first_creates.lock().unwrap_or_else(PoisonError::into_inner);
            match first.get(&request.environment_id) {
                Some(f) => request = f.clone(),
                None => {
                    first.insert(request.environment_id.clone(), request.clone());
                }
            }
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
        let r = self.host.inspect(target).await;
        self.not_found_as_internal(r)
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        self.check_refusals(&request)?;
        let mut request = request;
        let v = |x| self.faults.violates(x);
        request.exec_id = self.exec_id(&request.exec_id);
        request.environment_id = self.env_id(&request.environment_id);
        if v(Violation::IgnoreTty) {
            request.tty = false;
        }
        if v(Violation::AddEnvVariable) {
            request.env.push(kiln_plugin_sdk::EnvVar::new("KILN_MUTANT", "1"));
        }
        if v(Violation::IgnoreTimeout) {
            request.timeout = None;
        }
        if v(Violation::StageThroughSymlinks) {
            stage_naively(&std::mem::take(&mut request.files));
        }
        let naive_collect = v(Violation::CollectThroughSymlinks)
            .then(|| (std::mem::take(&mut request.collect), request.collect_limit_bytes));
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
        let stream = self.host.exec(request).await;
        let stream = self.not_found_as_internal(stream)?;
        let stream = self.mutate_stream(stream, naive_collect);
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
        let mut request = request;
        request.exec_id = self.exec_id(&request.exec_id);
        if self.faults.violates(Violation::NoKillEscalation) && request.signal != 9 {
            request.grace = Duration::from_secs(3600);
        }
        let r = self.host.signal_exec(request).await;
        self.not_found_as_internal(r)
    }

    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        if self.faults.refuses(Capability::Stdin) {
            return Err(refused("stdin"));
        }
        self.host.write_stdin(self.exec_id(&exec_id), data).await
    }

    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        if target.local_path.is_some() && self.faults.refuses(Capability::LocalCopy) {
            return Err(refused("local_copy"));
        }
        let r = self.host.copy_in(target, data).await;
        self.not_found_as_internal(r)
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        let r = self.host.copy_out(source).await;
        self.not_found_as_internal(r)
    }

    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let mut request = request;
        request.environment_id = self.env_id(&request.environment_id);
        let whole = request.container_id.is_none();
        let id = request.environment_id.clone();
        let existed = self.host.remove(request).await?;
        if !existed && self.faults.violates(Violation::RemoveNotIdempotent) {
            return Err(Error::not_found(format!("mutant: environment {id:?} does not exist")));
        }
        if whole {
            self.env_faults.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        }
        Ok(existed)
    }

    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        let mut selector = selector;
        if self.faults.violates(Violation::ListIgnoresSelector) {
            selector.labels.clear();
        }
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
    let mut args = args;
    let violations = args.faults.server_violations();
    if args.faults.violates(Violation::IgnoreStdinEof) {
        args.serve.exit_on_stdin_eof = false;
    }
    let mut config = args.host.config("test");
    if args.faults.violates(Violation::RemoveKillsGroupsOnly) {
        config.containment = kiln_plugin_host::ContainmentMode::Groups;
    }
    let backend = TestBackend::new(config, args.faults)?;
    tracing::info!(root = %backend.host().root().display(), faults = ?backend.faults(), "test backend ready");
    let host = backend.host().clone();
    let served = kiln_plugin_sdk::server::run_with(backend, &args.serve, violations).await;
    host.drain_removals().await;
    served
}

/// The binary's entry point: logging, flags from the command line, [`run`].
pub async fn main() -> anyhow::Result<()> {
    kiln_plugin_sdk::server::init_logging();
    run(Args::parse()).await
}
