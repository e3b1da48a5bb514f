//! The `Backend` trait and its domain types: what a plugin implements and what the runner calls.
//!
//! The same trait is implemented by every plugin and by [`crate::client::GrpcBackend`], the
//! runner's side of the wire, so the conformance suite runs unchanged in-process and over a
//! socket. Nothing here names a generated protobuf type.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

use crate::error::{Error, Result};

/// The protocol version this SDK speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A stream of bytes (tar data, stdin).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send + 'static>>;

/// The events of one exec: output, keepalives, then exactly one `Exited`.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecEvent>> + Send + 'static>>;

/// A backend plugin. Every method maps to one RPC of `kiln.backend.v1`.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Version negotiation and capabilities. The SDK's server fills in `instance_id` and
    /// checks `protocol_version` against the client's list.
    async fn capabilities(&self, request: CapabilitiesRequest) -> Result<Capabilities>;

    /// Creates (or, replayed with the same spec, returns) an execution environment.
    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment>;

    /// Creates a job, service or step container in an environment.
    async fn create_container(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        let _ = request;
        Err(Error::unimplemented(format!("this backend does not create {kind} containers")))
    }

    /// Starts a created container. Idempotent.
    async fn start_container(&self, target: ContainerRef) -> Result<Container> {
        let _ = target;
        Err(Error::unimplemented("this backend has no containers to start"))
    }

    /// State and health of a container.
    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus>;

    /// Runs one process; the stream ends with exactly one [`ExecEvent::Exited`]. Dropping the
    /// stream kills the process group (SIGTERM, grace, SIGKILL).
    async fn exec(&self, request: ExecRequest) -> Result<ExecStream>;

    /// Signals an exec's process group and escalates to SIGKILL after the grace period.
    /// Returns false when the exec had already ended.
    async fn signal_exec(&self, request: SignalRequest) -> Result<bool>;

    /// Feeds an exec's standard input (feature `stdin`).
    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        let _ = (exec_id, data);
        Err(Error::unimplemented("this backend does not support stdin"))
    }

    /// Extracts a tar stream into a directory of a container.
    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats>;

    /// Streams a file or directory of a container out as a tar archive.
    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream>;

    /// Removes an environment (with everything in it) or one container. Idempotent: returns
    /// whether something was there.
    async fn remove(&self, request: RemoveRequest) -> Result<bool>;

    /// Lists environments matching the selector.
    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>>;
}

/// What the client says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapabilitiesRequest {
    /// e.g. "kiln".
    pub client_name: String,
    /// e.g. "0.1.0".
    pub client_version: String,
    /// Protocol versions the client speaks.
    pub protocol_versions: Vec<u32>,
}

/// What a plugin is and can do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// The plugin's name ("host", "docker").
    pub plugin_name: String,
    /// The plugin's version.
    pub plugin_version: String,
    /// The protocol version the plugin speaks (normally [`PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// Set by the SDK's server: changes every time the plugin process starts.
    pub instance_id: String,
    /// The `runs-on` layer.
    pub environment: LayerSupport,
    /// The workflow's `container:`.
    pub job_container: LayerSupport,
    /// The workflow's `services:`.
    pub service_containers: LayerSupport,
    /// Docker actions and `docker://` steps.
    pub step_containers: LayerSupport,
    /// Optional features.
    pub features: Features,
    /// Fixed platform of the environments, when known ("linux").
    pub os: String,
    /// Fixed architecture, when known ("amd64").
    pub arch: String,
    /// Largest message the plugin sends or accepts.
    pub max_message_bytes: u64,
}

/// Support of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSupport {
    /// Not supported; the detail says why or what to configure.
    Unsupported(String),
    /// Implemented by the plugin itself.
    Native,
    /// Created on another backend.
    Delegated {
        /// The backend's name, e.g. "docker".
        backend: String,
    },
}

impl Default for LayerSupport {
    fn default() -> LayerSupport {
        LayerSupport::Unsupported(String::new())
    }
}

impl LayerSupport {
    /// Whether the layer can be used at all.
    pub fn is_supported(&self) -> bool {
        matches!(self, LayerSupport::Native | LayerSupport::Delegated { .. })
    }
}

/// Optional features a plugin declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// `write_stdin` works.
    pub stdin: bool,
    /// `ExecRequest::tty` is honoured.
    pub tty: bool,
    /// `CopyInTarget::local_path` is honoured.
    pub local_copy: bool,
    /// `ContainerSpec::build` is honoured.
    pub image_build: bool,
    /// `ExecRequest::files` and `collect` are honoured.
    pub exec_files: bool,
    /// `ExecRequest::timeout` is enforced by the plugin.
    pub exec_timeout: bool,
    /// `inspect` reports health checks.
    pub health: bool,
}

/// Who owns a resource; plugins label everything they create with it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    /// Stable runner id.
    pub runner_id: String,
    /// Id of the runner process; new at each start.
    pub boot_id: String,
    /// The job the resource serves.
    pub job_id: String,
    /// Set for resources created by delegation.
    pub parent_environment_id: String,
    /// Set by the plugin at creation, in milliseconds since the Unix epoch.
    pub created_at_unix_ms: i64,
    /// After this instant anyone may remove the resource; 0 = never expires.
    pub expires_at_unix_ms: i64,
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
}

/// What the job will ask for, so a plugin can skip work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnvironmentHints {
    /// The job has a `container:`.
    pub job_container: bool,
    /// How many `services:` the job has.
    pub service_containers: u32,
    /// The job has docker steps.
    pub step_containers: bool,
}

/// A request to create an execution environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EnvironmentRequest {
    /// Caller-chosen id (see [`crate::ids::validate_id`]).
    pub environment_id: String,
    /// Ownership labels.
    pub owner: Owner,
    /// The `runs-on` label.
    pub label: String,
    /// Backend options from the label configuration: a JSON object.
    pub options: serde_json::Map<String, serde_json::Value>,
    /// What the job needs.
    pub hints: EnvironmentHints,
}

/// Paths inside an environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Paths {
    /// GITHUB_WORKSPACE.
    pub workspace: String,
    /// RUNNER_TEMP.
    pub temp: String,
    /// RUNNER_TOOL_CACHE.
    pub tool_cache: String,
    /// The runner's own file area (scripts, env files, actions).
    pub runner_files: String,
    /// HOME.
    pub home: String,
}

/// Inner containers are created on another backend.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delegation {
    /// The backend's name.
    pub backend: String,
    /// Options to create them with.
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// A created execution environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Environment {
    /// The caller's id.
    pub id: String,
    /// Where `run:` steps execute without a job container.
    pub primary_container_id: String,
    /// "linux", "darwin", "windows".
    pub os: String,
    /// "amd64", "arm64".
    pub arch: String,
    /// Paths inside the environment.
    pub paths: Paths,
    /// Name of the search-path variable ("PATH").
    pub path_variable: String,
    /// Its separator (":").
    pub path_separator: String,
    /// Set when inner containers are created elsewhere.
    pub delegation: Option<Delegation>,
    /// The ownership labels as stored.
    pub owner: Owner,
}

/// The three kinds of inner container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerKind {
    /// The workflow's `container:`.
    Job,
    /// An entry of `services:`.
    Service,
    /// A docker action or `docker://` step.
    Step,
}

impl std::fmt::Display for ContainerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContainerKind::Job => "job",
            ContainerKind::Service => "service",
            ContainerKind::Step => "step",
        })
    }
}

/// An environment variable of a process or container.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
    /// A secret: never logged.
    pub secret: bool,
}

impl EnvVar {
    /// A plain variable.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> EnvVar {
        EnvVar { name: name.into(), value: value.into(), secret: false }
    }
}

impl std::fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = if self.secret { "***" } else { &self.value };
        write!(f, "{}={:?}", self.name, value)
    }
}

/// Registry login.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RegistryCredentials {
    /// User name.
    pub username: String,
    /// Password (secret).
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryCredentials({:?}, ***)", self.username)
    }
}

/// An image built from a context directory inside the environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageBuild {
    /// Context directory.
    pub context_dir: String,
    /// Dockerfile relative to the context.
    pub dockerfile: String,
}

/// What a container is made of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    /// Image reference.
    pub image: String,
    /// Build instead of pull.
    pub build: Option<ImageBuild>,
    /// Entrypoint; empty = the image's.
    pub entrypoint: Vec<String>,
    /// Command; empty = the image's.
    pub cmd: Vec<String>,
    /// Environment.
    pub env: Vec<EnvVar>,
    /// Working directory.
    pub working_dir: String,
    /// Volumes in docker syntax.
    pub volumes: Vec<String>,
    /// Port mappings in docker syntax.
    pub ports: Vec<String>,
    /// Network aliases.
    pub network_aliases: Vec<String>,
    /// Extra engine options in docker CLI syntax.
    pub options: String,
    /// Registry login.
    pub credentials: Option<RegistryCredentials>,
    /// User to run as.
    pub user: String,
    /// Mount the workspace and runner files at the same paths.
    pub mount_workspace: bool,
    /// Pull even when present.
    pub force_pull: bool,
}

/// A request to create an inner container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerRequest {
    /// The environment.
    pub environment_id: String,
    /// Caller-chosen container id.
    pub container_id: String,
    /// What to create.
    pub spec: ContainerSpec,
}

/// Names a container of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerRef {
    /// The environment.
    pub environment_id: String,
    /// The container.
    pub container_id: String,
}

/// Lifecycle state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContainerState {
    /// Not reported.
    #[default]
    Unspecified,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Exited,
}

/// Health of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// Not reported.
    #[default]
    Unspecified,
    /// No health check.
    None,
    /// Checks have not passed yet.
    Starting,
    /// Healthy.
    Healthy,
    /// Unhealthy.
    Unhealthy,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortBinding {
    /// "80/tcp".
    pub container_port: String,
    /// Host address.
    pub host_ip: String,
    /// Host port.
    pub host_port: u32,
}

/// A created container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Container {
    /// Its id.
    pub id: String,
    /// Its environment.
    pub environment_id: String,
    /// Its state.
    pub state: ContainerState,
    /// Published ports.
    pub ports: Vec<PortBinding>,
}

/// What `inspect` reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerStatus {
    /// The container id.
    pub id: String,
    /// State.
    pub state: ContainerState,
    /// Health.
    pub health: Health,
    /// Exit code when exited.
    pub exit_code: i32,
    /// Killed for lack of memory.
    pub oom_killed: bool,
    /// Published ports.
    pub ports: Vec<PortBinding>,
    /// The image's environment as `NAME=value`.
    pub image_env: Vec<String>,
    /// Address on the environment's network.
    pub ip_address: String,
    /// Last health output or exit reason.
    pub detail: String,
}

/// A small file written before an exec starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StagedFile {
    /// Absolute path.
    pub path: String,
    /// Contents.
    pub content: Bytes,
    /// Permission bits; 0 means 0o644.
    pub mode: u32,
}

/// One process to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Caller-chosen, never reused.
    pub exec_id: String,
    /// The environment.
    pub environment_id: String,
    /// The container to run in.
    pub container_id: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The complete environment.
    pub env: Vec<EnvVar>,
    /// Put in front of the container's search path.
    pub path_prepend: Vec<String>,
    /// Working directory; empty = the workspace.
    pub working_dir: String,
    /// Files written before start.
    pub files: Vec<StagedFile>,
    /// Files read after exit.
    pub collect: Vec<String>,
    /// Bound per collected file.
    pub collect_limit_bytes: u64,
    /// Open stdin for `write_stdin`.
    pub stdin: bool,
    /// Allocate a terminal.
    pub tty: bool,
    /// Kill after this long.
    pub timeout: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with a code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// A file read back after an exec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CollectedFile {
    /// The path as requested.
    pub path: String,
    /// Contents, possibly truncated.
    pub content: Bytes,
    /// Longer than the limit.
    pub truncated: bool,
    /// Did not exist.
    pub missing: bool,
}

/// The terminal frame of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    /// Code or signal.
    pub status: ExitStatus,
    /// Killed for lack of memory.
    pub oom_killed: bool,
    /// Killed by the plugin's timeout.
    pub timed_out: bool,
    /// Collected files, in request order.
    pub files: Vec<CollectedFile>,
    /// Wall time of the process.
    pub duration: Duration,
}

/// One event of an exec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The process started.
    Started,
    /// Output bytes.
    Output {
        /// stdout or stderr.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
    },
    /// Nothing happened for a while; the stream is alive.
    Keepalive,
    /// The process ended. Always the last event.
    Exited(Exited),
}

/// A signal for an exec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SignalRequest {
    /// The exec.
    pub exec_id: String,
    /// POSIX signal number.
    pub signal: i32,
    /// Then SIGKILL after this long.
    pub grace: Duration,
}

/// Where a CopyIn goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyInTarget {
    /// The environment.
    pub environment_id: String,
    /// The container.
    pub container_id: String,
    /// Absolute destination directory.
    pub dest_path: String,
    /// With feature `local_copy`: copy this local directory instead of the data.
    pub local_path: Option<String>,
}

/// Where a CopyOut comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyOutSource {
    /// The environment.
    pub environment_id: String,
    /// The container.
    pub container_id: String,
    /// Absolute path.
    pub path: String,
}

/// What a CopyIn wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    /// Entries extracted.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Removes an environment or a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemoveRequest {
    /// The environment.
    pub environment_id: String,
    /// A container of it; `None` = the whole environment.
    pub container_id: Option<String>,
    /// Grace for processes.
    pub grace: Duration,
}

/// Chooses environments to list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    /// Only this runner's; empty = all.
    pub runner_id: String,
    /// Only those with all of these labels.
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    /// Whether the selector chooses a resource of `owner`.
    pub fn matches(&self, owner: &Owner) -> bool {
        (self.runner_id.is_empty() || owner.runner_id == self.runner_id)
            && self.labels.iter().all(|(k, v)| owner.labels.get(k) == Some(v))
    }
}

/// One listed environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvironmentSummary {
    /// Its id.
    pub id: String,
    /// Its ownership labels.
    pub owner: Owner,
    /// Its containers.
    pub container_ids: Vec<String>,
}
