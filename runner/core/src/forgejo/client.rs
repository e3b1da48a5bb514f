//! The Connect client for `runner.v1.RunnerService` and `ping.v1.PingService`: unary calls as
//! HTTP/1.1 POSTs of Connect JSON under `<instance>/api/actions/`, the runner headers, Connect
//! errors as typed errors, a per-call timeout, and retries with backoff for transient failures.
//!
//! Responses are never compressed: kiln does not send `Accept-Encoding`, so a connect-go server
//! answers uncompressed; a compressed answer is reported as an error.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::types::*;

/// kiln's version, as sent to the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a Connect error.
    #[error("{method}: the server answered {code}: {message}")]
    Connect {
        /// The procedure.
        method: &'static str,
        /// The Connect code (`unauthenticated`, `unimplemented`, `internal`, …).
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server could not be reached (refused, reset, DNS, TLS).
    #[error("{method}: cannot reach {url}: {detail}")]
    Transport {
        /// The procedure.
        method: &'static str,
        /// The URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// No answer in time.
    #[error("{method}: no answer from {url} within {timeout:?}")]
    Timeout {
        /// The procedure.
        method: &'static str,
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer was not what the protocol says.
    #[error("{method}: unexpected answer: {detail}")]
    Decode {
        /// The procedure.
        method: &'static str,
        /// What was wrong with it.
        detail: String,
    },
}

impl Error {
    /// The Connect code, or `unavailable` for transport failures and timeouts.
    pub fn code(&self) -> &str {
        match self {
            Error::Connect { code, .. } => code,
            Error::Transport { .. } => "unavailable",
            Error::Timeout { .. } => "deadline_exceeded",
            Error::Decode { .. } => "unknown",
        }
    }

    /// Whether trying again later may succeed: the server is down, overloaded, or failed
    /// internally ("request key is currently locked; retry soon" is `internal`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code(),
            "unavailable"
                | "deadline_exceeded"
                | "internal"
                | "unknown"
                | "resource_exhausted"
                | "aborted"
        )
    }

    /// The server does not know the procedure (an older server).
    pub fn is_unimplemented(&self) -> bool {
        self.code() == "unimplemented"
    }
}

enum Http {
    Plain(HyperClient<HttpConnector, Full<Bytes>>),
    Tls(HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>),
}

/// A client for one Forgejo instance, with or without runner credentials.
pub struct Client {
    instance: String,
    base: String,
    uuid: String,
    token: String,
    timeout: Duration,
    http: Http,
}

impl Client {
    /// A client for `instance` (`https://forgejo.example/`); `uuid` and `token` may be empty
    /// before registration. `timeout` bounds every call (Forgejo Runner's default is 60 s).
    pub fn new(
        instance: &str,
        uuid: &str,
        token: &str,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        Client::with_tls(instance, uuid, token, timeout, false)
    }

    /// As [`Client::new`]; with `insecure` (config `runner.insecure`), the instance's TLS
    /// certificate is not verified, as Forgejo Runner does.
    pub fn with_tls(
        instance: &str,
        uuid: &str,
        token: &str,
        timeout: Duration,
        insecure: bool,
    ) -> anyhow::Result<Client> {
        let instance = instance.trim_end_matches('/').to_owned();
        let http = if instance.starts_with("https://") && insecure {
            tracing::warn!(%instance, "runner.insecure: the instance's TLS certificate is not verified");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| anyhow::anyhow!("configuring TLS for {instance}: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build();
            Http::Tls(HyperClient::builder(TokioExecutor::new()).build(connector))
        } else if instance.starts_with("https://") {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_native_roots()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "loading the system's CA certificates for {instance}: {e}; install the \
                         ca-certificates package"
                    )
                })?
                .https_or_http()
                .enable_http1()
                .build();
            Http::Tls(HyperClient::builder(TokioExecutor::new()).build(connector))
        } else if instance.starts_with("http://") {
            Http::Plain(HyperClient::builder(TokioExecutor::new()).build_http())
        } else {
            anyhow::bail!(
                "instance {instance:?}: expected an http:// or https:// URL, e.g. \
                 https://forgejo.example"
            );
        };
        Ok(Client {
            base: format!("{instance}/api/actions"),
            instance,
            uuid: uuid.to_owned(),
            token: token.to_owned(),
            timeout,
            http,
        })
    }

    /// The instance URL without a trailing `/`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The runner token (for masking).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `ping.v1.PingService/Ping`.
    pub async fn ping(&self, data: &str) -> Result<PingResponse, Error> {
        let req = PingRequest { data: data.to_owned() };
        self.call("ping.v1.PingService", "Ping", &req, None, None).await
    }

    /// `Register`.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RunnerResponse, Error> {
        self.runner_call("Register", req, None, None).await
    }

    /// `Declare`.
    pub async fn declare(&self, req: &DeclareRequest) -> Result<RunnerResponse, Error> {
        self.runner_call("Declare", req, None, None).await
    }

    /// `FetchTask`, with the request key and a shorter timeout (`runner.fetch_timeout`).
    pub async fn fetch_task(
        &self,
        req: &FetchTaskRequest,
        request_key: &str,
        timeout: Duration,
    ) -> Result<FetchTaskResponse, Error> {
        self.runner_call("FetchTask", req, Some(request_key), Some(timeout)).await
    }

    /// `FetchSingleTask` (Forgejo >= 15).
    pub async fn fetch_single_task(
        &self,
        req: &FetchSingleTaskRequest,
        request_key: &str,
        timeout: Duration,
    ) -> Result<FetchSingleTaskResponse, Error> {
        self.runner_call("FetchSingleTask", req, Some(request_key), Some(timeout)).await
    }

    /// `UpdateTask`.
    pub async fn update_task(&self, req: &UpdateTaskRequest) -> Result<UpdateTaskResponse, Error> {
        self.runner_call("UpdateTask", req, None, None).await
    }

    /// `UpdateLog`.
    pub async fn update_log(&self, req: &UpdateLogRequest) -> Result<UpdateLogResponse, Error> {
        self.runner_call("UpdateLog", req, None, None).await
    }

    async fn runner_call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &'static str,
        req: &Req,
        request_key: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Resp, Error> {
        self.call("runner.v1.RunnerService", method, req, request_key, timeout).await
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        service: &str,
        method: &'static str,
        req: &Req,
        request_key: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Resp, Error> {
        let url = format!("{}/{service}/{method}", self.base);
        let body = serde_json::to_vec(req)
            .map_err(|e| Error::Decode { method, detail: format!("encoding the request: {e}") })?;
        let mut builder = hyper::Request::post(&url)
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .header("user-agent", concat!("kiln/", env!("CARGO_PKG_VERSION")));
        if !self.uuid.is_empty() {
            builder = builder.header("x-runner-uuid", &self.uuid);
        }
        if !self.token.is_empty() {
            builder = builder.header("x-runner-token", &self.token);
        }
        if let Some(key) = request_key {
            builder = builder.header("x-runner-request-key", key);
        }
        let timeout = timeout.unwrap_or(self.timeout).min(self.timeout);
        builder = builder.header("connect-timeout-ms", timeout.as_millis().to_string());
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::Decode { method, detail: format!("building the request: {e}") })?;
        let exchange = async {
            let response = match &self.http {
                Http::Plain(c) => c.request(request).await,
                Http::Tls(c) => c.request(request).await,
            };
            let response = response.map_err(|e| Error::Transport {
                method,
                url: url.clone(),
                detail: error_chain(&e),
            })?;
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| Error::Transport {
                    method,
                    url: url.clone(),
                    detail: error_chain(&e),
                })?
                .to_bytes();
            Ok::<_, Error>((parts, bytes))
        };
        let (parts, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout { method, url: url.clone(), timeout })??;
        if let Some(enc) = parts.headers.get("content-encoding")
            && enc.as_bytes() != b"identity"
        {
            return Err(Error::Decode {
                method,
                detail: format!(
                    "the answer is compressed ({}) although kiln asked for none",
                    String::from_utf8_lossy(enc.as_bytes())
                ),
            });
        }
        if parts.status == hyper::StatusCode::OK {
            return serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
                method,
                detail: format!(
                    "{e} in {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            });
        }
        #[derive(serde::Deserialize)]
        struct ConnectError {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let (code, message) = match serde_json::from_slice::<ConnectError>(&bytes) {
            Ok(e) if !e.code.is_empty() => (e.code, e.message),
            _ => (
                code_for_status(parts.status.as_u16()).to_owned(),
                format!(
                    "HTTP {}: {}",
                    parts.status,
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).trim()
                ),
            ),
        };
        Err(Error::Connect { method, code, message })
    }
}

/// Connect's mapping of HTTP statuses to codes, for answers that are not Connect errors.
fn code_for_status(status: u16) -> &'static str {
    match status {
        400 => "internal",
        401 => "unauthenticated",
        403 => "permission_denied",
        404 => "unimplemented",
        429 | 502 | 503 | 504 => "unavailable",
        _ => "unknown",
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// How to retry transient failures.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Give up after this long in total.
    pub give_up_after: Duration,
}

impl Backoff {
    /// Forgejo Runner's `report_retry` starts at 100 ms and doubles; kiln keeps going for up to
    /// 10 minutes (the server's zombie-task timeout) so an outage of minutes loses nothing.
    pub const REPORT: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
        give_up_after: Duration::from_secs(600),
    };

    /// Calls `f` until it succeeds, fails with a permanent error, `give_up_after` passes or
    /// `stop` is cancelled (then the last error is returned).
    pub async fn retry<T, F, Fut>(
        self,
        what: &str,
        stop: &CancellationToken,
        mut f: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let started = std::time::Instant::now();
        let mut delay = self.initial;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() || started.elapsed() >= self.give_up_after => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "{what} failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return Err(e),
                    }
                    delay = (delay * 2).min(self.max);
                }
            }
        }
    }
}

/// `runner.insecure`: accepts any server certificate (signatures are still checked to be
/// well-formed for the handshake).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
