//! Job services: the HTTP servers a job's actions talk to.
//!
//! - [`cache`]: the v1 cache protocol of `@actions/cache` (`ACTIONS_CACHE_URL`).
//! - [`artifact`]: the v4 artifact protocol of `@actions/artifact` 2.x+ (twirp
//!   `ArtifactService` and the blob calls it signs; `ACTIONS_RESULTS_URL`).
//! - [`token`]: the per-job `ACTIONS_RUNTIME_TOKEN`, an HS256 JWT.
//! - [`store`]: the [`store::Store`] trait both keep their blobs behind, and
//!   [`store::LocalStore`], a directory.
//!
//! [`Services`] serves both on one listener (axum over hyper), and [`Services::job_env`] gives
//! the variables of one job. Nothing here buffers a whole body: uploads stream into the store,
//! downloads stream out of it.

pub mod artifact;
pub mod cache;
pub mod store;
pub mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde_json::json;

use crate::store::{LocalStore, StoreError};
use crate::token::{CacheMode, CacheScope, Signer};

/// An error answered as `{"message": …}` with a 4xx/5xx status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    pub(crate) fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub(crate) fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, m)
    }
    pub(crate) fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub(crate) fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub(crate) fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    pub(crate) fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
    pub(crate) fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::BadName(_) | StoreError::Length { .. } | StoreError::Body(_) => {
                Self::bad_request(e.to_string())
            }
            StoreError::NotFound(_) => Self::not_found(e.to_string()),
            StoreError::Io { .. } => {
                tracing::warn!("store: {e}");
                Self::internal(e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"message": self.message}))).into_response()
    }
}

/// The bearer token of a request (401 when absent).
pub(crate) fn bearer(h: &HeaderMap) -> Result<&str, ApiError> {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token (ACTIONS_RUNTIME_TOKEN)"))
}

/// `http://<Host>/`: URLs handed back to a client use the address it reached us by, so the same
/// server serves host jobs and container jobs.
pub(crate) fn base_url(h: &HeaderMap) -> String {
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
    format!("http://{host}/")
}

pub(crate) fn body_stream(body: Body) -> store::ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

pub(crate) fn reader_body(
    reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    size: u64,
    content_type: &str,
) -> Response {
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, size)
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// What to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (port 0: any).
    pub bind: SocketAddr,
    /// The cache's directory and limits, if the cache is served.
    pub cache: Option<(PathBuf, cache::CacheLimits)>,
    /// The artifact directory, if artifacts are served.
    pub artifacts: Option<PathBuf>,
    /// The token secret; `None`: a random one (only this process signs tokens).
    pub secret: Option<Vec<u8>>,
}

/// Running servers.
#[derive(Debug)]
pub struct Services {
    addr: SocketAddr,
    signer: Signer,
    cache: Option<Arc<cache::CacheServer>>,
    artifacts: Option<Arc<artifact::ArtifactServer>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Errors starting the servers.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listener could not be bound.
    #[error("binding {addr}: {source} (set another address or port)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A storage directory could not be prepared.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a job is, for its token and variables.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// The run's id (`github.run_id`).
    pub run: String,
    /// The job's id, unique within the run.
    pub job: String,
    /// The cache scope, if the job may use the cache.
    pub cache: Option<CacheScope>,
}

impl Services {
    /// Binds and starts serving.
    pub async fn start(cfg: Config) -> Result<Services, StartError> {
        let signer = match &cfg.secret {
            Some(s) => Signer::new(s),
            None => Signer::random(),
        };
        let mut app = axum::Router::new();
        let mut cache = None;
        if let Some((dir, limits)) = &cfg.cache {
            let d = |source| StartError::Dir { path: dir.clone(), source };
            let store = LocalStore::new(dir).map_err(d)?;
            let srv = cache::CacheServer::new(
                Arc::new(store),
                signer.clone(),
                limits.clone(),
                dir.join("index.json"),
            )
            .await
            .map_err(d)?;
            app = app.merge(srv.router());
            cache = Some(srv);
        }
        let mut artifacts = None;
        if let Some(dir) = &cfg.artifacts {
            let srv = artifact::ArtifactServer::new(dir, signer.clone())
                .await
                .map_err(|source| StartError::Dir { path: dir.clone(), source })?;
            app = app.merge(srv.router());
            artifacts = Some(srv);
        }
        let app = app.fallback(not_found);
        let listener = tokio::net::TcpListener::bind(cfg.bind)
            .await
            .map_err(|source| StartError::Bind { addr: cfg.bind, source })?;
        let addr =
            listener.local_addr().map_err(|source| StartError::Bind { addr: cfg.bind, source })?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::warn!("job services stopped: {e}");
            }
        });
        tracing::info!(%addr, cache = cache.is_some(), artifacts = artifacts.is_some(), "job services listening");
        Ok(Services { addr, signer, cache, artifacts, stop, task })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The signer of the job tokens.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The cache server, if served.
    pub fn cache(&self) -> Option<&Arc<cache::CacheServer>> {
        self.cache.as_ref()
    }

    /// The artifact server, if served.
    pub fn artifacts(&self) -> Option<&Arc<artifact::ArtifactServer>> {
        self.artifacts.as_ref()
    }

    /// The variables of one job, with `url` the base URL the job reaches the servers at
    /// (ending in `/`).
    pub fn job_env(&self, url: &str, job: &JobInfo) -> Vec<(String, String)> {
        job_env(&self.signer, url, self.cache.is_some(), self.artifacts.is_some(), job)
    }

    /// Stops serving (in-flight requests finish).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// The variables of one job for servers signing with `signer` at `url`: `ACTIONS_CACHE_URL`
/// and `ACTIONS_CACHE_MODE` (cache), `ACTIONS_RESULTS_URL` (artifacts) and the job's
/// `ACTIONS_RUNTIME_TOKEN`. Also used for an external cache server sharing the secret.
pub fn job_env(
    signer: &Signer,
    url: &str,
    cache: bool,
    artifacts: bool,
    job: &JobInfo,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let scope = job.cache.clone().filter(|_| cache);
    if let Some(s) = &scope {
        env.push(("ACTIONS_CACHE_URL".into(), url.to_string()));
        env.push(("ACTIONS_CACHE_MODE".into(), s.mode.as_str().to_string()));
    }
    if artifacts {
        env.push(("ACTIONS_RESULTS_URL".into(), url.to_string()));
        env.push(("ACTIONS_RUNTIME_URL".into(), url.to_string()));
    }
    if scope.is_some() || artifacts {
        let token = signer.job_token(&job.run, &job.job, scope, Duration::from_secs(24 * 3600));
        env.push(("ACTIONS_RUNTIME_TOKEN".into(), token));
    }
    env
}

/// The cache mode of an event: read-only for pull requests from forks (untrusted code), else
/// `requested` (default `write`).
pub fn cache_mode_for(
    event_name: &str,
    from_fork: bool,
    requested: Option<CacheMode>,
) -> CacheMode {
    let base = requested.unwrap_or(CacheMode::Write);
    let untrusted = from_fork
        && matches!(
            event_name,
            "pull_request"
                | "pull_request_target"
                | "pull_request_review"
                | "pull_request_review_comment"
        );
    if untrusted && base == CacheMode::Write { CacheMode::Read } else { base }
}
