//! The cache server: the v1 protocol `@actions/cache` speaks (`_apis/artifactcache/`), as
//! Forgejo Runner and act serve it.
//!
//! - `GET cache?keys=k1,k2&version=v`: each key in order, exact match first, then as a prefix,
//!   newest first, in the job's own ref, then in the readable refs (the default branch);
//!   `version` must match. 200 with `archiveLocation` (a signed download URL), or 204.
//! - `POST caches {key, version, cacheSize}`: reserve; 201 `{cacheId}`, or 409 when the same
//!   key and version is committed or being uploaded in the same scope (one reserve wins).
//! - `PATCH caches/{id}` with `Content-Range: bytes s-e/*`: a chunk, in any order, never
//!   beyond the reserved size nor overlapping another.
//! - `POST caches/{id} {size}`: commit; the chunks must cover exactly `size` bytes. Only then
//!   does the entry exist (the upload is renamed into place), so a crash never leaves half a
//!   cache. Entries beyond the size limit are evicted, least recently used first.
//! - `GET artifacts/{id}?sig=…`: the download, streamed.
//!
//! Every call but the download carries the job's token (`Authorization: Bearer`); its
//! `kiln_cache` claim is the only scope the job reaches.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::Store;

/// Path parameters: the optional `token`, and `id`.
type Params = HashMap<String, String>;
use crate::token::{CacheMode, CacheScope, Signer};
use crate::{ApiError, base_url, bearer, body_stream, reader_body};

/// Limits of a cache server.
#[derive(Debug, Clone)]
pub struct CacheLimits {
    /// Total size of all entries; beyond it, least recently used entries are evicted.
    pub total: u64,
    /// Largest single entry.
    pub entry: u64,
    /// An upload untouched this long is removed.
    pub upload_idle: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits { total: 10 << 30, entry: 10 << 30, upload_idle: Duration::from_secs(30 * 60) }
    }
}

/// One committed entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: u64,
    key: String,
    version: String,
    repo: String,
    #[serde(rename = "ref")]
    git_ref: String,
    size: u64,
    created_ms: u64,
    used_ms: u64,
}

/// An upload between reserve and commit.
#[derive(Debug)]
struct Upload {
    key: String,
    version: String,
    repo: String,
    git_ref: String,
    size: Option<u64>,
    /// Written ranges, `[start, end)`.
    done: Vec<(u64, u64)>,
    /// Ranges being written.
    pending: Vec<(u64, u64)>,
    touched: Instant,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
    #[serde(skip)]
    uploads: HashMap<u64, Upload>,
}

/// The cache server's state.
pub struct CacheServer {
    store: Arc<dyn Store>,
    signer: Signer,
    limits: CacheLimits,
    index_path: PathBuf,
    index: Mutex<Index>,
}

impl std::fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheServer").field("index", &self.index_path).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn blob_name(id: u64) -> String {
    format!("cache-{id}")
}

fn upload_name(id: u64) -> String {
    format!("cache-{id}")
}

impl CacheServer {
    /// A cache server over `store`, its index in `index_path` (read if present). Uploads left
    /// by a previous process are removed: they were never committed.
    pub async fn new(
        store: Arc<dyn Store>,
        signer: Signer,
        limits: CacheLimits,
        index_path: PathBuf,
    ) -> std::io::Result<Arc<Self>> {
        let index = match tokio::fs::read(&index_path).await {
            Ok(b) => serde_json::from_slice::<Index>(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %index_path.display(), "cache index unreadable, starting empty: {e}");
                Index::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(e),
        };
        store.sweep().await;
        Ok(Arc::new(CacheServer { store, signer, limits, index_path, index: Mutex::new(index) }))
    }

    /// The routes: `/_apis/artifactcache/…` (bearer token) and `/c/{token}/_apis/artifactcache/…`.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        let routes = axum::Router::new()
            .route("/cache", get(lookup))
            .route("/caches", get(list).post(reserve))
            .route("/caches/{id}", post(commit).patch(upload))
            .route("/artifacts/{id}", get(download))
            .with_state(self.clone());
        axum::Router::new()
            .nest("/_apis/artifactcache", routes.clone())
            .nest("/c/{token}/_apis/artifactcache", routes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the index next to the blobs: a temporary file renamed over the old one.
    async fn persist(&self) {
        let bytes = {
            let ix = self.lock();
            serde_json::to_vec(&*ix).unwrap_or_default()
        };
        let tmp = self.index_path.with_extension("json.tmp");
        let res = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &self.index_path).await
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(path = %self.index_path.display(), "writing the cache index: {e}");
        }
    }

    /// The job's scope, from the token in the URL (`/c/<token>/…`, the form kiln hands out, so
    /// `ACTIONS_RUNTIME_TOKEN` stays free for the instance's own services) or the bearer token.
    fn scope(&self, uri: &Uri, headers: &HeaderMap) -> Result<CacheScope, ApiError> {
        let in_path = uri.path().strip_prefix("/c/").and_then(|rest| rest.split('/').next());
        let token = match in_path {
            Some(t) => t,
            None => bearer(headers)?,
        };
        let claims =
            self.signer.verify(token).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        claims.kiln_cache.ok_or_else(|| ApiError::forbidden("this token carries no cache scope"))
    }

    /// Removes uploads idle too long.
    async fn sweep_idle(&self) {
        let stale: Vec<u64> = {
            let mut ix = self.lock();
            let idle = self.limits.upload_idle;
            let ids: Vec<u64> = ix
                .uploads
                .iter()
                .filter(|(_, u)| u.pending.is_empty() && u.touched.elapsed() > idle)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                ix.uploads.remove(id);
            }
            ids
        };
        for id in stale {
            self.store.abort(&upload_name(id)).await;
        }
    }

    /// Total size of the entries.
    pub fn total_size(&self) -> u64 {
        self.lock().entries.values().map(|e| e.size).sum()
    }

    /// Number of entries.
    pub fn entry_count(&self) -> usize {
        self.lock().entries.len()
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("empty cache key"));
    }
    if key.chars().count() > 512 {
        return Err(ApiError::bad_request("cache key longer than 512 characters"));
    }
    if key.contains(',') {
        return Err(ApiError::bad_request("cache key contains a comma"));
    }
    if key.chars().any(char::is_control) {
        return Err(ApiError::bad_request("cache key contains a control character"));
    }
    Ok(())
}

fn check_version(v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 512 || v.chars().any(char::is_control) {
        return Err(ApiError::bad_request("invalid cache version: 1 to 512 printable characters"));
    }
    Ok(())
}

fn parse_id(p: &Params) -> Result<u64, ApiError> {
    let s = p.get("id").map(String::as_str).unwrap_or("");
    s.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid cache id {s:?}: a number")))
}

#[derive(Deserialize)]
struct LookupQuery {
    keys: String,
    version: String,
}

async fn lookup(
    State(srv): State<Arc<CacheServer>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<LookupQuery>,
) -> Result<Response, ApiError> {
    let scope = srv.scope(&uri, &headers)?;
    if scope.mode == CacheMode::None {
        return Err(ApiError::forbidden("cache read denied: the job's cache mode is none"));
    }
    let keys: Vec<&str> = q.keys.split(',').collect();
    if keys.len() > 10 {
        return Err(ApiError::bad_request("at most 10 keys"));
    }
    for k in &keys {
        check_key(k)?;
    }
    check_version(&q.version)?;
    let refs: Vec<&str> = std::iter::once(scope.write_ref.as_str())
        .chain(scope.read_refs.iter().map(String::as_str))
        .collect();
    let found = {
        let mut ix = srv.lock();
        let mut found = None;
        'search: for r in &refs {
            let candidates: Vec<&Entry> = ix
                .entries
                .values()
                .filter(|e| e.repo == scope.repo && e.git_ref == *r && e.version == q.version)
                .collect();
            for key in &keys {
                let newest = |pred: &dyn Fn(&Entry) -> bool| {
                    candidates
                        .iter()
                        .filter(|e| pred(e))
                        .max_by_key(|e| (e.created_ms, e.id))
                        .map(|e| e.id)
                };
                if let Some(id) =
                    newest(&|e| e.key == *key).or_else(|| newest(&|e| e.key.starts_with(key)))
                {
                    found = Some(id);
                    break 'search;
                }
            }
        }
        found.and_then(|id| {
            let e = ix.entries.get_mut(&id)?;
            e.used_ms = now_ms();
            Some(e.clone())
        })
    };
    let Some(e) = found else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let sig = srv.signer.blob_grant(&blob_name(e.id), Duration::from_secs(3600));
    let location =
        format!("{}_apis/artifactcache/artifacts/{}?sig={sig}", base_url(&headers), e.id);
    Ok(Json(json!({
        "cacheKey": e.key,
        "cacheVersion": e.version,
        "scope": e.git_ref,
        "creationTime": e.created_ms,
        "archiveLocation": location,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    key: String,
}

async fn list(
    State(srv): State<Arc<CacheServer>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let scope = srv.scope(&uri, &headers)?;
    check_key(&q.key)?;
    let ix = srv.lock();
    let items: Vec<_> = ix
        .entries
        .values()
        .filter(|e| {
            e.repo == scope.repo
                && e.key == q.key
                && (e.git_ref == scope.write_ref || scope.read_refs.contains(&e.git_ref))
        })
        .map(|e| json!({"cacheKey": e.key, "cacheVersion": e.version, "scope": e.git_ref, "creationTime": e.created_ms}))
        .collect();
    Ok(Json(json!({"totalCount": items.len(), "artifactCaches": items})).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReserveRequest {
    key: String,
    version: String,
    #[serde(default)]
    cache_size: Option<u64>,
}

async fn reserve(
    State(srv): State<Arc<CacheServer>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Result<Json<ReserveRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let scope = srv.scope(&uri, &headers)?;
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if scope.mode != CacheMode::Write {
        return Err(ApiError::forbidden(format!(
            "cache write denied: the job's cache mode is {} (pull requests from forks and \
             ACTIONS_CACHE_MODE=read may only restore)",
            scope.mode.as_str()
        )));
    }
    check_key(&req.key)?;
    check_version(&req.version)?;
    if let Some(size) = req.cache_size
        && size > srv.limits.entry
    {
        return Err(ApiError::bad_request(format!(
            "cache size of {size} B is over the limit of {} B, not saving cache",
            srv.limits.entry
        )));
    }
    srv.sweep_idle().await;
    let id = {
        let mut ix = srv.lock();
        let same = |repo: &str, r: &str, k: &str, v: &str| {
            repo == scope.repo && r == scope.write_ref && k == req.key && v == req.version
        };
        if ix.entries.values().any(|e| same(&e.repo, &e.git_ref, &e.key, &e.version)) {
            return Err(ApiError::conflict(format!("cache entry {:?} already exists", req.key)));
        }
        if ix.uploads.values().any(|u| same(&u.repo, &u.git_ref, &u.key, &u.version)) {
            return Err(ApiError::conflict(format!(
                "cache entry {:?} is being created by another job",
                req.key
            )));
        }
        ix.next_id += 1;
        let id = ix.next_id;
        ix.uploads.insert(
            id,
            Upload {
                key: req.key.clone(),
                version: req.version.clone(),
                repo: scope.repo.clone(),
                git_ref: scope.write_ref.clone(),
                size: req.cache_size,
                done: Vec::new(),
                pending: Vec::new(),
                touched: Instant::now(),
            },
        );
        id
    };
    if let Err(e) = srv.store.create_upload(&upload_name(id)).await {
        srv.lock().uploads.remove(&id);
        return Err(ApiError::internal(e.to_string()));
    }
    tracing::debug!(id, key = %req.key, "cache reserved");
    Ok((StatusCode::CREATED, Json(json!({"cacheId": id}))).into_response())
}

/// `bytes s-e/*` (or `/total`) → `[s, e+1)`.
fn parse_range(h: &HeaderMap) -> Result<(u64, u64), ApiError> {
    let bad =
        || ApiError::bad_request("missing or invalid Content-Range: expected `bytes START-END/*`");
    let v = h.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).ok_or_else(bad)?;
    let rest = v.strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, _total) = rest.split_once('/').ok_or_else(bad)?;
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let (s, e): (u64, u64) =
        (s.trim().parse().map_err(|_| bad())?, e.trim().parse().map_err(|_| bad())?);
    if e < s {
        return Err(bad());
    }
    Ok((s, e + 1))
}

fn overlaps(a: (u64, u64), b: &(u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// The owner check of an upload: 404 if absent, 403 if another scope's.
fn owned<'a>(ix: &'a mut Index, id: u64, scope: &CacheScope) -> Result<&'a mut Upload, ApiError> {
    let u = ix
        .uploads
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found(format!("no upload with cache id {id}")))?;
    if u.repo != scope.repo || u.git_ref != scope.write_ref {
        return Err(ApiError::forbidden(format!("cache id {id} belongs to another scope")));
    }
    Ok(u)
}

async fn upload(
    State(srv): State<Arc<CacheServer>>,
    OriginalUri(uri): OriginalUri,
    Path(p): Path<Params>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let scope = srv.scope(&uri, &headers)?;
    let id = parse_id(&p)?;
    let range = parse_range(&headers)?;
    {
        let mut ix = srv.lock();
        let limit = srv.limits.entry;
        let u = owned(&mut ix, id, &scope)?;
        let cap = u.size.unwrap_or(limit);
        if range.1 > cap {
            return Err(ApiError::bad_request(format!(
                "Content-Range ends at byte {} beyond the reserved size {cap}",
                range.1
            )));
        }
        if let Some(o) = u.done.iter().chain(&u.pending).find(|r| overlaps(range, r)) {
            return Err(ApiError::bad_request(format!(
                "Content-Range {}-{} overlaps the chunk {}-{}",
                range.0,
                range.1 - 1,
                o.0,
                o.1 - 1
            )));
        }
        u.pending.push(range);
        u.touched = Instant::now();
    }
    let res =
        srv.store.write_at(&upload_name(id), range.0, range.1 - range.0, body_stream(body)).await;
    let mut ix = srv.lock();
    if let Some(u) = ix.uploads.get_mut(&id) {
        u.pending.retain(|r| *r != range);
        u.touched = Instant::now();
        if res.is_ok() {
            u.done.push(range);
        }
    }
    res.map_err(ApiError::from_store)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct CommitRequest {
    size: u64,
}

async fn commit(
    State(srv): State<Arc<CacheServer>>,
    OriginalUri(uri): OriginalUri,
    Path(p): Path<Params>,
    headers: HeaderMap,
    body: Result<Json<CommitRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let scope = srv.scope(&uri, &headers)?;
    let id = parse_id(&p)?;
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let up = {
        let mut ix = srv.lock();
        let u = owned(&mut ix, id, &scope)?;
        if !u.pending.is_empty() {
            return Err(ApiError::conflict("chunks of this cache are still being uploaded"));
        }
        if let Some(reserved) = u.size
            && reserved != req.size
        {
            return Err(ApiError::bad_request(format!(
                "commit size {} differs from the reserved size {reserved}",
                req.size
            )));
        }
        u.done.sort_unstable();
        let mut next = 0;
        for r in &u.done {
            if r.0 != next {
                return Err(ApiError::bad_request(format!(
                    "missing chunk at bytes {next}-{}",
                    r.0 - 1
                )));
            }
            next = r.1;
        }
        if next < req.size {
            return Err(ApiError::bad_request(format!(
                "missing chunk at bytes {next}-{}",
                req.size - 1
            )));
        }
        if next > req.size {
            return Err(ApiError::bad_request(format!(
                "uploaded {next} bytes but the commit says {}",
                req.size
            )));
        }
        ix.uploads.remove(&id).expect("checked above")
    };
    let size =
        srv.store.commit(&upload_name(id), &blob_name(id)).await.map_err(ApiError::from_store)?;
    let now = now_ms();
    let evicted = {
        let mut ix = srv.lock();
        ix.entries.insert(
            id,
            Entry {
                id,
                key: up.key,
                version: up.version,
                repo: up.repo,
                git_ref: up.git_ref,
                size,
                created_ms: now,
                used_ms: now,
            },
        );
        let mut total: u64 = ix.entries.values().map(|e| e.size).sum();
        let mut evicted = Vec::new();
        while total > srv.limits.total {
            let Some(victim) = ix
                .entries
                .values()
                .filter(|e| e.id != id)
                .min_by_key(|e| (e.used_ms, e.id))
                .map(|e| e.id)
            else {
                break;
            };
            let e = ix.entries.remove(&victim).expect("found above");
            total -= e.size;
            evicted.push(victim);
        }
        evicted
    };
    srv.persist().await;
    for v in evicted {
        tracing::debug!(id = v, "cache entry evicted");
        srv.store.remove(&blob_name(v)).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct DownloadQuery {
    sig: String,
}

async fn download(
    State(srv): State<Arc<CacheServer>>,
    Path(p): Path<Params>,
    Query(q): Query<DownloadQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&p)?;
    let claims = srv.signer.verify(&q.sig).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    if claims.kiln_blob.as_deref() != Some(blob_name(id).as_str()) {
        return Err(ApiError::forbidden("this signature is for another entry"));
    }
    if !srv.lock().entries.contains_key(&id) {
        return Err(ApiError::not_found(format!("no cache entry {id}")));
    }
    let (reader, size) = srv.store.open(&blob_name(id)).await.map_err(ApiError::from_store)?;
    Ok(reader_body(reader, size, "application/octet-stream"))
}
