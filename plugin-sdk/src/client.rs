//! The runner's side of the wire: [`GrpcBackend`] implements [`Backend`] over a gRPC channel
//! (unix socket, TCP with mutual TLS, or plaintext TCP when explicitly allowed).
//!
//! It adds the protocol version to every request, watches the `instance_id` of every response
//! (a change means the plugin restarted), and turns an exec stream that ends without its
//! terminal frame into an error: never exit 0 (rule 4).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tonic::codegen::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

use crate::backend::*;
use crate::error::{Error, Result};
use crate::pb;
use crate::pb::backend_client::BackendClient;
use crate::server::{INSTANCE_ID_HEADER, MAX_MESSAGE_BYTES, PROTOCOL_VERSION_HEADER, TlsFiles};

/// Where a plugin listens, from the runner's point of view.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `unix:///path/to.sock`.
    Unix(PathBuf),
    /// `https://host:port` with mutual TLS.
    Tls {
        /// The URI.
        uri: String,
        /// Our identity and the CA the plugin's certificate must chain to.
        tls: TlsFiles,
        /// The name the plugin's certificate must carry (defaults to the URI's host).
        domain: Option<String>,
    },
    /// `http://host:port`, plaintext: only with an explicit insecure flag.
    Insecure(String),
}

impl Endpoint {
    /// Parses `unix:///path`, `unix:path` or a bare absolute path; `http://…` needs
    /// `insecure`; `https://…` needs TLS files.
    pub fn parse(s: &str, tls: Option<TlsFiles>, insecure: bool) -> Result<Endpoint> {
        if let Some(path) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        if s.starts_with("https://") {
            let tls = tls.ok_or_else(|| {
                Error::invalid_argument(format!(
                    "endpoint {s}: https needs a CA, a certificate and a key (mutual TLS)"
                ))
                .fault(crate::Fault::Config)
            })?;
            return Ok(Endpoint::Tls { uri: s.to_owned(), tls, domain: None });
        }
        if s.starts_with("http://") {
            if !insecure {
                return Err(Error::invalid_argument(format!(
                    "endpoint {s}: plaintext tcp is refused; use https:// with mutual TLS, or set \
                     insecure: true for tests"
                ))
                .fault(crate::Fault::Config));
            }
            return Ok(Endpoint::Insecure(s.to_owned()));
        }
        Err(Error::invalid_argument(format!(
            "endpoint {s:?}: use unix:///path.sock, https://host:port or http://host:port"
        ))
        .fault(crate::Fault::Config))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tls { uri, .. } | Endpoint::Insecure(uri) => f.write_str(uri),
        }
    }
}

#[derive(Clone)]
struct VersionHeader;

impl Interceptor for VersionHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(
            PROTOCOL_VERSION_HEADER,
            tonic::metadata::MetadataValue::from(PROTOCOL_VERSION),
        );
        Ok(request)
    }
}

type Client = BackendClient<InterceptedService<Channel, VersionHeader>>;

/// A plugin reached over gRPC.
#[derive(Clone)]
pub struct GrpcBackend {
    client: Client,
    name: String,
    instance: Arc<Mutex<InstanceState>>,
}

#[derive(Default)]
struct InstanceState {
    id: Option<String>,
    restarted: bool,
}

/// Opens a channel to `endpoint`, waiting at most `timeout` for the connection.
pub async fn connect(endpoint: &Endpoint, name: &str, timeout: Duration) -> Result<GrpcBackend> {
    Ok(GrpcBackend::new(channel(endpoint, name, timeout).await?, name))
}

/// Opens a raw gRPC channel to `endpoint` (unix socket, mutual TLS or plaintext), waiting at
/// most `timeout`: for clients that speak to the wire directly (the conformance suite's
/// metadata and error-encoding checks, grpc.health).
pub async fn channel(endpoint: &Endpoint, name: &str, timeout: Duration) -> Result<Channel> {
    let unavailable = |e: &dyn std::fmt::Display| {
        Error::unavailable(format!("connecting to plugin {name:?} at {endpoint}: {e}"))
    };
    let channel = match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            TonicEndpoint::from_static("http://kiln.plugin")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| unavailable(&e))?
        }
        Endpoint::Tls { uri, tls, domain } => {
            let host = uri
                .parse::<Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned))
                .unwrap_or_default();
            let domain = domain.clone().unwrap_or(host);
            let config = crate::tls::client_config(tls, &domain).map_err(|e| {
                Error::invalid_argument(format!("{e:#}")).fault(crate::Fault::Config)
            })?;
            TonicEndpoint::from_shared(uri.clone())
                .map_err(|e| unavailable(&e))?
                .connect_timeout(timeout)
                .tls_config(config)
                .map_err(|e| unavailable(&e))?
                .connect()
                .await
                .map_err(|e| unavailable(&e))?
        }
        Endpoint::Insecure(uri) => TonicEndpoint::from_shared(uri.clone())
            .map_err(|e| unavailable(&e))?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| unavailable(&e))?,
    };
    Ok(channel)
}

impl GrpcBackend {
    /// Wraps an open channel.
    pub fn new(channel: Channel, name: &str) -> GrpcBackend {
        let client = BackendClient::with_interceptor(channel, VersionHeader)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        GrpcBackend { client, name: name.to_owned(), instance: Arc::default() }
    }

    /// The plugin's name in the runner's configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instance id seen at the last handshake.
    pub fn instance_id(&self) -> Option<String> {
        self.instance.lock().ok().and_then(|s| s.id.clone())
    }

    /// Whether a response carried another instance id than the handshake (the plugin
    /// restarted); clears the flag.
    pub fn take_restarted(&self) -> bool {
        self.instance.lock().map(|mut s| std::mem::take(&mut s.restarted)).unwrap_or(false)
    }

    fn observe(&self, metadata: &tonic::metadata::MetadataMap) {
        let Some(id) = metadata.get(INSTANCE_ID_HEADER).and_then(|v| v.to_str().ok()) else {
            return;
        };
        if let Ok(mut state) = self.instance.lock() {
            match &state.id {
                Some(known) if known != id => {
                    tracing::warn!(plugin = %self.name, old = %known, new = %id, "plugin restarted");
                    state.restarted = true;
                    state.id = Some(id.to_owned());
                }
                Some(_) => {}
                None => state.id = Some(id.to_owned()),
            }
        }
    }

    fn err(&self, status: tonic::Status) -> Error {
        // A connection that broke mid-call (the plugin died) reaches us as UNKNOWN or INTERNAL
        // with a local source error ("h2 protocol error: …", "transport error"): the plugin
        // never sent that status. Rule 14 says UNAVAILABLE.
        let broken = matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
        ) && (std::error::Error::source(&status).is_some()
            || status.message().starts_with("h2 protocol error")
            || status.message().starts_with("transport error"));
        let mut e = Error::from(status);
        if broken {
            e = Error::unavailable(e.message);
        }
        if e.code == crate::Code::Unavailable {
            e.message = format!("plugin {:?} is unavailable: {}", self.name, e.message);
        }
        e
    }

    async fn unary<T>(&self, response: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
        let response = response.map_err(|s| self.err(s))?;
        self.observe(response.metadata());
        Ok(response.into_inner())
    }
}

#[async_trait::async_trait]
impl Backend for GrpcBackend {
    async fn capabilities(&self, request: CapabilitiesRequest) -> Result<Capabilities> {
        let response =
            self.client.clone().capabilities(pb::CapabilitiesRequest::from(request)).await;
        let caps: Capabilities = self.unary(response).await?.into();
        if let Ok(mut state) = self.instance.lock() {
            if state.id.as_deref().is_some_and(|id| id != caps.instance_id) {
                state.restarted = true;
            }
            state.id = Some(caps.instance_id.clone());
        }
        Ok(caps)
    }

    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        let response = self
            .client
            .clone()
            .create_execution_environment(pb::CreateEnvironmentRequest::from(request))
            .await;
        Ok(self.unary(response).await?.into())
    }

    async fn create_container(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        let request = pb::CreateContainerRequest::from(request);
        let mut client = self.client.clone();
        let response = match kind {
            ContainerKind::Job => client.create_job_container(request).await,
            ContainerKind::Service => client.create_service_container(request).await,
            ContainerKind::Step => client.create_step_container(request).await,
        };
        Ok(self.unary(response).await?.into())
    }

    async fn start_container(&self, target: ContainerRef) -> Result<Container> {
        let response = self.client.clone().start_container(pb::ContainerRef::from(target)).await;
        Ok(self.unary(response).await?.into())
    }

    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        let response = self.client.clone().inspect(pb::ContainerRef::from(target)).await;
        Ok(self.unary(response).await?.into())
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        let exec_id = request.exec_id.clone();
        let response = self.client.clone().exec(pb::ExecRequest::from(request)).await;
        let stream = self.unary(response).await?;
        let this = self.clone();
        let name = self.name.clone();
        // Enforce the terminal-frame rule: after Exited nothing more; a stream that ends
        // without Exited is an infrastructure failure.
        let stream = futures::stream::unfold((stream, false), move |(mut stream, done)| {
            let this = this.clone();
            let name = name.clone();
            let exec_id = exec_id.clone();
            async move {
                if done {
                    return None;
                }
                match stream.message().await {
                    Ok(Some(event)) => match ExecEvent::try_from(event) {
                        Ok(e @ ExecEvent::Exited(_)) => Some((Ok(e), (stream, true))),
                        Ok(e) => Some((Ok(e), (stream, false))),
                        Err(e) => Some((Err(e), (stream, true))),
                    },
                    Ok(None) => Some((
                        Err(Error::unavailable(format!(
                            "plugin {name:?} ended exec {exec_id} without an exit status \
                                 (the plugin may have crashed)"
                        ))),
                        (stream, true),
                    )),
                    Err(status) => Some((Err(this.err(status)), (stream, true))),
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        let response = self.client.clone().signal_exec(pb::SignalExecRequest::from(request)).await;
        Ok(self.unary(response).await?.delivered)
    }

    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(forward(
            data,
            tx,
            Some(pb::StdinChunk { exec_id, data: Vec::new(), eof: false }),
            |d| pb::StdinChunk { exec_id: String::new(), data: d.into(), eof: false },
            Some(pb::StdinChunk { exec_id: String::new(), data: Vec::new(), eof: true }),
        ));
        let response =
            self.client.clone().write_stdin(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        Ok(self.unary(response).await?.bytes)
    }

    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        use pb::copy_in_chunk::Chunk;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // A read error of the local data ends the stream early; the plugin then sees a short
        // tar and fails the call.
        tokio::spawn(forward(
            data,
            tx,
            Some(pb::CopyInChunk { chunk: Some(Chunk::Header(pb::CopyInHeader::from(target))) }),
            |d| pb::CopyInChunk { chunk: Some(Chunk::Data(d.into())) },
            None,
        ));
        let response =
            self.client.clone().copy_in(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let r = self.unary(response).await?;
        Ok(CopyStats { entries: r.entries, bytes: r.bytes })
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        let response = self.client.clone().copy_out(pb::CopyOutRequest::from(source)).await;
        let stream = self.unary(response).await?;
        let this = self.clone();
        Ok(Box::pin(
            stream.map(move |c| c.map(|c| bytes::Bytes::from(c.data)).map_err(|s| this.err(s))),
        ))
    }

    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let response = self.client.clone().remove(pb::RemoveRequest::from(request)).await;
        Ok(self.unary(response).await?.existed)
    }

    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        let response = self
            .client
            .clone()
            .list_environments(pb::ListEnvironmentsRequest::from(selector))
            .await;
        Ok(self.unary(response).await?.environments.into_iter().map(Into::into).collect())
    }
}

/// Feeds a client-streaming call from a byte stream: an optional head message, one message
/// per chunk, an optional tail message. Stops at the first read error.
async fn forward<T>(
    mut data: ByteStream,
    tx: tokio::sync::mpsc::Sender<T>,
    head: Option<T>,
    wrap: fn(bytes::Bytes) -> T,
    tail: Option<T>,
) {
    if let Some(head) = head
        && tx.send(head).await.is_err()
    {
        return;
    }
    while let Some(chunk) = data.next().await {
        let Ok(chunk) = chunk else { return };
        if tx.send(wrap(chunk)).await.is_err() {
            return;
        }
    }
    if let Some(tail) = tail {
        let _ = tx.send(tail).await;
    }
}
