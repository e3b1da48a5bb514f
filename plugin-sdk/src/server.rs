//! Serving a [`Backend`] over gRPC: the adapter from the generated service to the trait,
//! version checks, `instance_id` metadata, grpc.health, listeners and graceful shutdown.
//!
//! A plugin's `main` is `kiln_plugin_sdk::server::main(MyBackend::new(cfg)?)`, which parses the
//! standard flags (`--listen`, `--tls-*`, `--insecure`, `--exit-on-stdin-eof`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{self, Backend, ContainerKind, PROTOCOL_VERSION};
use crate::error::Error;
use crate::pb;
use crate::pb::backend_server::BackendServer;

/// Request metadata key carrying the client's protocol version (rule 1).
pub const PROTOCOL_VERSION_HEADER: &str = "kiln-protocol-version";
/// Response metadata key carrying the plugin's instance id (rule 1).
pub const INSTANCE_ID_HEADER: &str = "kiln-instance-id";
/// The gRPC service name, as grpc.health knows it.
pub const SERVICE_NAME: &str = "kiln.backend.v1.Backend";
/// Largest gRPC message the SDK sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Where a plugin listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A unix socket path (created 0600).
    Unix(PathBuf),
    /// TCP with mutual TLS.
    Tls {
        /// Address to bind.
        addr: SocketAddr,
        /// Server identity and the CA clients must be signed by.
        tls: TlsFiles,
    },
    /// Plaintext TCP: only behind an explicit `--insecure`.
    InsecureTcp(SocketAddr),
}

/// PEM files for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA that signed the peer's certificate.
    pub ca: PathBuf,
    /// Our certificate.
    pub cert: PathBuf,
    /// Our key.
    pub key: PathBuf,
}

/// Deliberate violations of the protocol by the server side, for the test plugin's mutants
/// (`kiln plugin test --violate …`): the conformance suite must catch each. A real plugin
/// never sets them; [`Violations::default`] is the conformant server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Violations {
    /// Send no `kiln-instance-id` response header (§2.3).
    pub omit_instance_id: bool,
    /// Accept any `kiln-protocol-version` request header (§2.3).
    pub ignore_version_header: bool,
    /// Errors without the `google.rpc.Status`/`ErrorDetail` trailer (§7.2).
    pub no_error_detail: bool,
    /// Do not serve `grpc.health.v1.Health` (§1.5).
    pub no_health: bool,
    /// Accept messages only up to this size while announcing 16 MiB (§1.6).
    pub max_receive_bytes: Option<usize>,
    /// Create the unix socket with this mode instead of 0600 (§1.4).
    pub socket_mode: Option<u32>,
    /// Keep running on SIGTERM and SIGINT (§1.3).
    pub ignore_sigterm: bool,
}

/// The adapter from the generated gRPC service to a [`Backend`].
struct Adapter<B> {
    backend: Arc<B>,
    instance_id: String,
    /// The protocol version the backend speaks, learnt once at start.
    version: u32,
    violations: Violations,
}

/// An error as a status: with its `ErrorDetail`, unless a mutant drops it.
fn to_status(e: Error, violations: Violations) -> Status {
    if violations.no_error_detail {
        let s = Status::from(e);
        return Status::new(s.code(), s.message());
    }
    Status::from(e)
}

impl<B> Adapter<B> {
    fn status(&self, e: Error) -> Status {
        to_status(e, self.violations)
    }

    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.violations.ignore_version_header {
            return Ok(());
        }
        let Some(v) = request.metadata().get(PROTOCOL_VERSION_HEADER) else {
            return Ok(());
        };
        let v = v.to_str().unwrap_or("");
        if v.split(',').any(|v| v.trim() == self.version.to_string()) {
            return Ok(());
        }
        Err(self.status(
            Error::failed_precondition(format!(
                "protocol version mismatch: the client speaks {v}, this plugin speaks {}",
                self.version
            ))
            .fault(crate::Fault::Config),
        ))
    }

    fn respond<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if self.violations.omit_instance_id {
            return response;
        }
        if let Ok(v) = self.instance_id.parse() {
            response.metadata_mut().insert(INSTANCE_ID_HEADER, v);
        }
        response
    }

    async fn create_container(
        &self,
        kind: ContainerKind,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status>
    where
        B: Backend,
    {
        self.check(&request)?;
        let c = self
            .backend
            .create_container(kind, request.into_inner().into())
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.respond(c.into()))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[async_trait::async_trait]
impl<B: Backend> pb::backend_server::Backend for Adapter<B> {
    async fn capabilities(
        &self,
        request: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        let request: backend::CapabilitiesRequest = request.into_inner().into();
        let offered = request.protocol_versions.clone();
        let mut caps = self.backend.capabilities(request).await.map_err(|e| self.status(e))?;
        if !offered.is_empty() && !offered.contains(&caps.protocol_version) {
            return Err(self.status(
                Error::failed_precondition(format!(
                    "protocol version mismatch: the client speaks {offered:?}, plugin {:?} \
                     speaks {}",
                    caps.plugin_name, caps.protocol_version
                ))
                .fault(crate::Fault::Config),
            ));
        }
        caps.instance_id = self.instance_id.clone();
        if caps.max_message_bytes == 0 {
            caps.max_message_bytes = MAX_MESSAGE_BYTES as u64;
        }
        Ok(self.respond(caps.into()))
    }

    async fn create_execution_environment(
        &self,
        request: Request<pb::CreateEnvironmentRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        self.check(&request)?;
        let env = self
            .backend
            .create_environment(request.into_inner().into())
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.respond(env.into()))
    }

    async fn create_job_container(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        self.create_container(ContainerKind::Job, request).await
    }

    async fn create_service_container(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        self.create_container(ContainerKind::Service, request).await
    }

    async fn create_step_container(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        self.create_container(ContainerKind::Step, request).await
    }

    async fn start_container(
        &self,
        request: Request<pb::ContainerRef>,
    ) -> Result<Response<pb::Container>, Status> {
        self.check(&request)?;
        let c = self
            .backend
            .start_container(request.into_inner().into())
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.respond(c.into()))
    }

    async fn inspect(
        &self,
        request: Request<pb::ContainerRef>,
    ) -> Result<Response<pb::ContainerStatus>, Status> {
        self.check(&request)?;
        let s =
            self.backend.inspect(request.into_inner().into()).await.map_err(|e| self.status(e))?;
        Ok(self.respond(s.into()))
    }

    type ExecStream = BoxStream<pb::ExecEvent>;

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        self.check(&request)?;
        let stream =
            self.backend.exec(request.into_inner().into()).await.map_err(|e| self.status(e))?;
        let v = self.violations;
        let stream = stream.map(move |e| e.map(Into::into).map_err(|e| to_status(e, v)));
        Ok(self.respond(Box::pin(stream) as Self::ExecStream))
    }

    async fn signal_exec(
        &self,
        request: Request<pb::SignalExecRequest>,
    ) -> Result<Response<pb::SignalExecResponse>, Status> {
        self.check(&request)?;
        let delivered = self
            .backend
            .signal_exec(request.into_inner().into())
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.respond(pb::SignalExecResponse { delivered }))
    }

    async fn write_stdin(
        &self,
        request: Request<Streaming<pb::StdinChunk>>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        self.check(&request)?;
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            self.status(Error::invalid_argument("empty stdin stream").field("exec_id"))
        })?;
        if first.exec_id.is_empty() {
            return Err(self.status(
                Error::invalid_argument("the first stdin chunk must name the exec")
                    .field("exec_id"),
            ));
        }
        let head = futures::stream::iter([Ok(bytes::Bytes::from(first.data))]);
        let rest = stream.map(|c| c.map(|c| bytes::Bytes::from(c.data)).map_err(Error::from));
        let data = Box::pin(head.chain(rest));
        let bytes =
            self.backend.write_stdin(first.exec_id, data).await.map_err(|e| self.status(e))?;
        Ok(self.respond(pb::WriteStdinResponse { bytes }))
    }

    async fn copy_in(
        &self,
        request: Request<Streaming<pb::CopyInChunk>>,
    ) -> Result<Response<pb::CopyInResponse>, Status> {
        self.check(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::CopyInChunk { chunk: Some(pb::copy_in_chunk::Chunk::Header(h)) }) => h,
            _ => {
                return Err(self.status(
                    Error::invalid_argument("the first CopyIn frame must be the header")
                        .field("header"),
                ));
            }
        };
        let data = stream.map(|c| match c {
            Ok(pb::CopyInChunk { chunk: Some(pb::copy_in_chunk::Chunk::Data(d)) }) => {
                Ok(bytes::Bytes::from(d))
            }
            Ok(_) => {
                Err(Error::invalid_argument("only data frames may follow the header").field("data"))
            }
            Err(e) => Err(Error::from(e)),
        });
        let stats = self
            .backend
            .copy_in(header.into(), Box::pin(data))
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.respond(pb::CopyInResponse { entries: stats.entries, bytes: stats.bytes }))
    }

    type CopyOutStream = BoxStream<pb::CopyOutChunk>;

    async fn copy_out(
        &self,
        request: Request<pb::CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        self.check(&request)?;
        let stream =
            self.backend.copy_out(request.into_inner().into()).await.map_err(|e| self.status(e))?;
        let v = self.violations;
        let stream = stream.map(move |c| {
            c.map(|data| pb::CopyOutChunk { data: data.into() }).map_err(|e| to_status(e, v))
        });
        Ok(self.respond(Box::pin(stream) as Self::CopyOutStream))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        self.check(&request)?;
        let existed =
            self.backend.remove(request.into_inner().into()).await.map_err(|e| self.status(e))?;
        Ok(self.respond(pb::RemoveResponse { existed }))
    }

    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        self.check(&request)?;
        let envs = self
            .backend
            .list_environments(request.into_inner().into())
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.respond(pb::ListEnvironmentsResponse {
            environments: envs.into_iter().map(Into::into).collect(),
        }))
    }
}

/// A new random instance id.
pub fn new_instance_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Serves `backend` on `listen` until `shutdown` is cancelled.
pub async fn serve(
    backend: impl Backend,
    listen: Listen,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(backend, listen, shutdown, Violations::default()).await
}

/// [`serve`] with deliberate protocol violations (the test plugin's mutants).
pub async fn serve_with(
    backend: impl Backend,
    listen: Listen,
    shutdown: CancellationToken,
    violations: Violations,
) -> anyhow::Result<()> {
    let version = backend
        .capabilities(backend::CapabilitiesRequest::default())
        .await
        .map(|c| c.protocol_version)
        .unwrap_or(PROTOCOL_VERSION);
    let adapter =
        Adapter { backend: Arc::new(backend), instance_id: new_instance_id(), version, violations };
    let service = BackendServer::new(adapter)
        .max_decoding_message_size(violations.max_receive_bytes.unwrap_or(MAX_MESSAGE_BYTES))
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let health_service = (!violations.no_health).then_some(health_service);

    let mut builder = tonic::transport::Server::builder();
    match listen {
        Listen::Unix(path) => {
            let listener = bind_unix_mode(&path, violations.socket_mode.unwrap_or(0o600))?;
            tracing::info!(socket = %path.display(), "serving on unix socket");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = builder
                .add_optional_service(health_service)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Listen::Tls { addr, tls } => {
            let config = crate::tls::server_config(&tls)?;
            builder = builder.tls_config(config)?;
            tracing::info!(%addr, "serving on tcp with mutual tls");
            builder
                .add_optional_service(health_service)
                .add_service(service)
                .serve_with_shutdown(addr, shutdown.cancelled_owned())
                .await?;
        }
        Listen::InsecureTcp(addr) => {
            tracing::warn!(%addr, "serving plaintext tcp without authentication (--insecure)");
            builder
                .add_optional_service(health_service)
                .add_service(service)
                .serve_with_shutdown(addr, shutdown.cancelled_owned())
                .await?;
        }
    }
    Ok(())
}

/// Binds a unix socket readable and writable by the owner only, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    bind_unix_mode(path, 0o600)
}

/// [`bind_unix`] with another mode (0660 for a plugin serving the runners of one group).
pub fn bind_unix_mode(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {}", parent.display()))?;
    }
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding unix socket {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("restricting permissions of {}", path.display()))?;
    Ok(listener)
}

/// A token cancelled on SIGTERM or SIGINT, and, when `watch_stdin` is set, when stdin reaches
/// EOF (the managed shape: the runner holds the pipe, so the plugin never outlives it).
pub fn shutdown_token(watch_stdin: bool) -> CancellationToken {
    shutdown_token_with(watch_stdin, false)
}

fn shutdown_token_with(watch_stdin: bool, ignore_signals: bool) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if ignore_signals {
            // A mutant: SIGTERM and SIGINT are caught and ignored.
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::warn!("ignoring SIGTERM (--violate ignore-sigterm)"),
                    _ = tokio::signal::ctrl_c() => {}
                    _ = t.cancelled() => return,
                }
            }
        }
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = t.cancelled() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    if watch_stdin {
        // A plain thread, not tokio's stdin (a blocking-pool task): a runtime being dropped
        // waits for its blocking tasks, and a read of a pipe the runner still holds never
        // returns, so a plugin told to stop by SIGTERM would hang on its way out.
        let t = token.clone();
        let spawned = std::thread::Builder::new().name("stdin-eof".to_owned()).spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                    Ok(_) => {}
                }
            }
            tracing::info!("stdin closed: the runner is gone, shutting down");
            t.cancel();
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch stdin");
        }
    }
    token
}

/// The standard flags of a plugin binary.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where to listen: a unix socket path (`unix:///run/kiln/p.sock` or a plain path) or
    /// `tcp://ADDR:PORT` (mutual TLS unless --insecure).
    #[arg(long, env = "KILN_PLUGIN_LISTEN")]
    pub listen: String,
    /// CA certificate that signed the clients' certificates (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This plugin's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This plugin's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Allow plaintext TCP without authentication (tests only).
    #[arg(long)]
    pub insecure: bool,
    /// Exit when standard input closes (set by the runner for managed plugins).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

impl ServeArgs {
    /// Turns the flags into a [`Listen`].
    pub fn listen(&self) -> anyhow::Result<Listen> {
        if let Some(addr) = self.listen.strip_prefix("tcp://") {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| anyhow::anyhow!("--listen {}: bad address: {e}", self.listen))?;
            return match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
                (Some(ca), Some(cert), Some(key)) => Ok(Listen::Tls {
                    addr,
                    tls: TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() },
                }),
                _ if self.insecure => Ok(Listen::InsecureTcp(addr)),
                _ => anyhow::bail!(
                    "--listen {}: tcp needs --tls-ca, --tls-cert and --tls-key (mutual TLS), or \
                     --insecure for plaintext in tests",
                    self.listen
                ),
            };
        }
        let path = self.listen.strip_prefix("unix://").unwrap_or(&self.listen);
        Ok(Listen::Unix(PathBuf::from(path)))
    }
}

/// Serves `backend` with the standard flags until a signal (or stdin EOF when asked).
pub async fn run(backend: impl Backend, args: &ServeArgs) -> anyhow::Result<()> {
    run_with(backend, args, Violations::default()).await
}

/// [`run`] with deliberate protocol violations (the test plugin's mutants).
pub async fn run_with(
    backend: impl Backend,
    args: &ServeArgs,
    violations: Violations,
) -> anyhow::Result<()> {
    let listen = args.listen()?;
    let token = shutdown_token_with(args.exit_on_stdin_eof, violations.ignore_sigterm);
    serve_with(backend, listen, token, violations).await
}

/// Initializes logging for a plugin binary: to stderr, `RUST_LOG` or `info`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
