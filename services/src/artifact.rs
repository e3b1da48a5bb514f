//! The artifact server: the v4 protocol of `@actions/artifact` 2.x+ (`upload-artifact@v4`,
//! `download-artifact@v4`), for `kiln exec`.
//!
//! - twirp JSON at `/twirp/github.actions.results.api.v1.ArtifactService/<Method>`:
//!   `CreateArtifact` (answers a signed upload URL), `FinalizeArtifact` (size must match),
//!   `ListArtifacts`, `GetSignedArtifactURL`, `DeleteArtifact`. The caller's token must name
//!   the run in its `Actions.Results:<run>:<job>` scope, so a job sees its own run's artifacts
//!   only, and every job of the run sees them all.
//! - the blob calls the client makes to the signed URL, as Azure Blob Storage answers them:
//!   `PUT ?comp=block&blockid=…` (a block, any order), `PUT ?comp=blocklist` (the XML list
//!   that orders them), `PUT` with `x-ms-blob-type` (a whole blob, or an empty append blob),
//!   `PUT ?comp=appendblock`, and `GET` (the download).
//!
//! An artifact exists once finalized: its upload is renamed to `<dir>/blobs/<run>/<id>-<name>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::store::{LocalStore, Store, StoreError, check_name};
use crate::token::Signer;
use crate::{base_url, bearer, body_stream, reader_body};

const SERVICE: &str = "github.actions.results.api.v1.ArtifactService";
/// Largest artifact.
const MAX_SIZE: u64 = 10 << 30;

/// One artifact, as the index keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Artifact {
    id: u64,
    run: String,
    job: String,
    name: String,
    mime: String,
    size: u64,
    finalized: bool,
    #[serde(default)]
    digest: Option<String>,
    created_secs: u64,
}

impl Artifact {
    fn upload(&self) -> String {
        format!("artifact-{}", self.id)
    }
    fn blob(&self) -> String {
        let safe: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
            .collect();
        let ext = if self.mime == "application/zip" { ".zip" } else { "" };
        format!("{}/{}-{safe}{ext}", self.run, self.id)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    next_id: u64,
    artifacts: BTreeMap<u64, Artifact>,
}

/// A finalized artifact, for the run summary.
#[derive(Debug, Clone)]
pub struct ArtifactInfo {
    /// Its name.
    pub name: String,
    /// The job that uploaded it.
    pub job: String,
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// The artifact server's state.
pub struct ArtifactServer {
    store: Arc<LocalStore>,
    signer: Signer,
    index_path: PathBuf,
    index: Mutex<Index>,
}

impl std::fmt::Debug for ArtifactServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactServer").field("index", &self.index_path).finish_non_exhaustive()
    }
}

/// A twirp error: `{"code", "msg"}` with the matching status.
#[derive(Debug)]
struct TwirpError {
    code: &'static str,
    msg: String,
}

impl TwirpError {
    fn new(code: &'static str, msg: impl Into<String>) -> Self {
        TwirpError { code, msg: msg.into() }
    }
    fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => Self::new("not_found", e.to_string()),
            StoreError::Io { .. } => Self::new("internal", e.to_string()),
            _ => Self::new("invalid_argument", e.to_string()),
        }
    }
}

impl IntoResponse for TwirpError {
    fn into_response(self) -> Response {
        let status = match self.code {
            "invalid_argument" | "malformed" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" | "bad_route" => StatusCode::NOT_FOUND,
            "already_exists" => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({"code": self.code, "msg": self.msg, "message": self.msg})))
            .into_response()
    }
}

/// Checks an artifact name as the client does: printable, none of `" : < > | * ? \ /`.
fn check_artifact_name(name: &str) -> Result<(), TwirpError> {
    let bad = name.is_empty()
        || name.len() > 256
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_control() || "\":<>|*?\\/".contains(c));
    if bad {
        return Err(TwirpError::new(
            "invalid_argument",
            format!(
                "invalid artifact name {name:?}: 1 to 256 characters, none of \" : < > | * ? \\ / or control characters"
            ),
        ));
    }
    Ok(())
}

fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// An int64 as protojson writes it: a string, or a number.
fn int_field(v: &Value, k: &str) -> Option<u64> {
    match v.get(k)? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A `google.protobuf.*Value` wrapper: the bare value in JSON (or `{"value": …}`).
fn wrapper(v: &Value, k: &str) -> Option<Value> {
    match v.get(k)? {
        Value::Object(o) => o.get("value").cloned(),
        Value::Null => None,
        other => Some(other.clone()),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl ArtifactServer {
    /// An artifact server keeping its artifacts in `dir`.
    pub async fn new(dir: &Path, signer: Signer) -> std::io::Result<Arc<Self>> {
        let store = LocalStore::new(dir)?;
        store.sweep().await;
        let index_path = dir.join("index.json");
        let mut index = match tokio::fs::read(&index_path).await {
            Ok(b) => serde_json::from_slice::<Index>(&b).unwrap_or_default(),
            Err(_) => Index::default(),
        };
        // Artifacts never finalized died with their uploads.
        index.artifacts.retain(|_, a| a.finalized);
        Ok(Arc::new(ArtifactServer {
            store: Arc::new(store),
            signer,
            index_path,
            index: Mutex::new(index),
        }))
    }

    /// The routes.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(&format!("/twirp/{SERVICE}/{{method}}"), post(twirp))
            .route("/_kiln/artifact/upload/{id}", axum::routing::put(blob_put))
            .route("/_kiln/artifact/download/{id}", get(blob_get))
            .with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn persist(&self) {
        let bytes = serde_json::to_vec(&*self.lock()).unwrap_or_default();
        let tmp = self.index_path.with_extension("json.tmp");
        let res = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &self.index_path).await
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(path = %self.index_path.display(), "writing the artifact index: {e}");
        }
    }

    /// The finalized artifacts of a run, in upload order.
    pub fn list_run(&self, run: &str) -> Vec<ArtifactInfo> {
        self.lock()
            .artifacts
            .values()
            .filter(|a| a.run == run && a.finalized)
            .map(|a| ArtifactInfo {
                name: a.name.clone(),
                job: a.job.clone(),
                path: self.store.local_path(&a.blob()).unwrap_or_default(),
                size: a.size,
            })
            .collect()
    }
}

async fn twirp(
    State(srv): State<Arc<ArtifactServer>>,
    UrlPath(method): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, TwirpError> {
    let token =
        bearer(&headers).map_err(|_| TwirpError::new("unauthenticated", "missing bearer token"))?;
    let claims =
        srv.signer.verify(token).map_err(|e| TwirpError::new("unauthenticated", e.to_string()))?;
    let (run, job) =
        claims.results().map(|(r, j)| (r.to_string(), j.to_string())).ok_or_else(|| {
            TwirpError::new("permission_denied", "the token has no Actions.Results scope")
        })?;
    let req: Value = serde_json::from_slice(&body)
        .map_err(|e| TwirpError::new("malformed", format!("request body: {e}")))?;
    if str_field(&req, "workflow_run_backend_id") != run {
        return Err(TwirpError::new(
            "permission_denied",
            "workflow_run_backend_id is not the token's run",
        ));
    }
    check_name(&run).map_err(|e| TwirpError::new("invalid_argument", e.to_string()))?;
    let base = base_url(&headers);
    let out = match method.as_str() {
        "CreateArtifact" => create(&srv, &run, &job, &req, &base).await?,
        "FinalizeArtifact" => finalize(&srv, &run, &req).await?,
        "ListArtifacts" => list(&srv, &run, &req),
        "GetSignedArtifactURL" => signed_url(&srv, &run, &req, &base)?,
        "DeleteArtifact" => delete(&srv, &run, &req).await?,
        other => return Err(TwirpError::new("bad_route", format!("no method {other}"))),
    };
    Ok(Json(out).into_response())
}

async fn create(
    srv: &ArtifactServer,
    run: &str,
    job: &str,
    req: &Value,
    base: &str,
) -> Result<Value, TwirpError> {
    let name = str_field(req, "name");
    check_artifact_name(name)?;
    let mime = wrapper(req, "mime_type")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "application/zip".into());
    let art = {
        let mut ix = srv.lock();
        if ix.artifacts.values().any(|a| a.run == run && a.name == name && a.finalized) {
            return Err(TwirpError::new(
                "already_exists",
                format!(
                    "an artifact named {name:?} already exists in this run (delete it first, or use overwrite: true)"
                ),
            ));
        }
        // A new upload of the same name replaces an unfinished one.
        ix.artifacts.retain(|_, a| !(a.run == run && a.name == name));
        ix.next_id += 1;
        let art = Artifact {
            id: ix.next_id,
            run: run.into(),
            job: job.into(),
            name: name.into(),
            mime,
            size: 0,
            finalized: false,
            digest: None,
            created_secs: crate::token::now_secs(),
        };
        ix.artifacts.insert(art.id, art.clone());
        art
    };
    srv.store.create_upload(&art.upload()).await.map_err(TwirpError::from_store)?;
    let sig = srv.signer.blob_grant(&format!("upload:{}", art.id), Duration::from_secs(6 * 3600));
    Ok(
        json!({"ok": true, "signed_upload_url": format!("{base}_kiln/artifact/upload/{}?sig={sig}", art.id)}),
    )
}

async fn finalize(srv: &ArtifactServer, run: &str, req: &Value) -> Result<Value, TwirpError> {
    let name = str_field(req, "name");
    let size = int_field(req, "size")
        .ok_or_else(|| TwirpError::new("invalid_argument", "size missing"))?;
    let art = srv
        .lock()
        .artifacts
        .values()
        .find(|a| a.run == run && a.name == name && !a.finalized)
        .cloned()
        .ok_or_else(|| {
            TwirpError::new("not_found", format!("no artifact {name:?} being uploaded in this run"))
        })?;
    let have = srv.store.upload_size(&art.upload()).await.map_err(TwirpError::from_store)?;
    if have != size {
        return Err(TwirpError::new(
            "invalid_argument",
            format!("artifact {name:?}: {have} bytes uploaded but the finalize says {size}"),
        ));
    }
    srv.store.commit(&art.upload(), &art.blob()).await.map_err(TwirpError::from_store)?;
    let digest = wrapper(req, "hash").and_then(|v| v.as_str().map(str::to_string));
    if let Some(a) = srv.lock().artifacts.get_mut(&art.id) {
        a.finalized = true;
        a.size = size;
        a.digest = digest;
    }
    srv.persist().await;
    Ok(json!({"ok": true, "artifact_id": art.id.to_string()}))
}

fn list(srv: &ArtifactServer, run: &str, req: &Value) -> Value {
    let name = wrapper(req, "name_filter").and_then(|v| v.as_str().map(str::to_string));
    let id = wrapper(req, "id_filter").and_then(|v| match v {
        Value::String(s) => s.parse::<u64>().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    });
    let ix = srv.lock();
    let items: Vec<Value> = ix
        .artifacts
        .values()
        .filter(|a| a.run == run && a.finalized)
        .filter(|a| name.as_ref().is_none_or(|n| *n == a.name) && id.is_none_or(|i| i == a.id))
        .map(|a| {
            let mut v = json!({
                "workflow_run_backend_id": a.run,
                "workflow_job_run_backend_id": a.job,
                "database_id": a.id.to_string(),
                "name": a.name,
                "size": a.size.to_string(),
                "created_at": rfc3339(a.created_secs),
            });
            if let Some(d) = &a.digest {
                v["digest"] = json!(d);
            }
            v
        })
        .collect();
    json!({"artifacts": items})
}

fn signed_url(
    srv: &ArtifactServer,
    run: &str,
    req: &Value,
    base: &str,
) -> Result<Value, TwirpError> {
    let name = str_field(req, "name");
    let id = srv
        .lock()
        .artifacts
        .values()
        .find(|a| a.run == run && a.name == name && a.finalized)
        .map(|a| a.id)
        .ok_or_else(|| TwirpError::new("not_found", format!("no artifact {name:?} in this run")))?;
    let sig = srv.signer.blob_grant(&format!("download:{id}"), Duration::from_secs(3600));
    Ok(json!({"signed_url": format!("{base}_kiln/artifact/download/{id}?sig={sig}")}))
}

async fn delete(srv: &ArtifactServer, run: &str, req: &Value) -> Result<Value, TwirpError> {
    let name = str_field(req, "name");
    let art = {
        let mut ix = srv.lock();
        let id = ix
            .artifacts
            .values()
            .find(|a| a.run == run && a.name == name && a.finalized)
            .map(|a| a.id)
            .ok_or_else(|| {
                TwirpError::new("not_found", format!("no artifact {name:?} in this run"))
            })?;
        ix.artifacts.remove(&id).expect("found above")
    };
    srv.store.remove(&art.blob()).await;
    srv.persist().await;
    Ok(json!({"ok": true, "artifact_id": art.id.to_string()}))
}

#[derive(Deserialize)]
struct BlobQuery {
    sig: String,
    #[serde(default)]
    comp: Option<String>,
    #[serde(default)]
    blockid: Option<String>,
}

fn grant(srv: &ArtifactServer, sig: &str, want: &str) -> Result<(), TwirpError> {
    let claims =
        srv.signer.verify(sig).map_err(|e| TwirpError::new("unauthenticated", e.to_string()))?;
    if claims.kiln_blob.as_deref() != Some(want) {
        return Err(TwirpError::new("permission_denied", "this signature is for another blob"));
    }
    Ok(())
}

fn parse_id(s: &str) -> Result<u64, TwirpError> {
    s.parse().map_err(|_| TwirpError::new("invalid_argument", format!("invalid artifact id {s:?}")))
}

fn block_upload(id: u64, block: &str) -> Result<String, TwirpError> {
    if block.is_empty() || block.len() > 128 {
        return Err(TwirpError::new("invalid_argument", "block id: 1 to 128 characters"));
    }
    Ok(format!("artifact-{id}-block-{}", hex::encode(block)))
}

/// The block ids of a `<BlockList>` body, in order.
fn block_list(xml: &[u8]) -> Result<Vec<String>, TwirpError> {
    use quick_xml::events::Event;
    let bad = |m: String| TwirpError::new("invalid_argument", format!("block list: {m}"));
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut ids = Vec::new();
    let mut inside = false;
    loop {
        match reader.read_event().map_err(|e| bad(e.to_string()))? {
            Event::Start(e) => {
                inside = matches!(e.name().as_ref(), b"Latest" | b"Uncommitted" | b"Committed");
            }
            Event::Text(t) if inside => {
                let s = t.decode().map_err(|e| bad(e.to_string()))?;
                ids.push(s.trim().to_string());
            }
            Event::End(_) => inside = false,
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(ids)
}

async fn blob_put(
    State(srv): State<Arc<ArtifactServer>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<BlobQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, TwirpError> {
    let id = parse_id(&id)?;
    grant(&srv, &q.sig, &format!("upload:{id}"))?;
    let upload = {
        let ix = srv.lock();
        let a = ix
            .artifacts
            .get(&id)
            .filter(|a| !a.finalized)
            .ok_or_else(|| TwirpError::new("not_found", format!("no artifact upload {id}")))?;
        a.upload()
    };
    match q.comp.as_deref() {
        Some("block") => {
            let block = block_upload(id, q.blockid.as_deref().unwrap_or(""))?;
            srv.store.create_upload(&block).await.map_err(TwirpError::from_store)?;
            srv.store
                .append(&block, MAX_SIZE, body_stream(body))
                .await
                .map_err(TwirpError::from_store)?;
        }
        Some("blocklist") => {
            let xml = axum::body::to_bytes(body, 8 << 20)
                .await
                .map_err(|e| TwirpError::new("invalid_argument", format!("block list: {e}")))?;
            let parts = block_list(&xml)?
                .iter()
                .map(|b| block_upload(id, b))
                .collect::<Result<Vec<_>, _>>()?;
            srv.store.create_upload(&upload).await.map_err(TwirpError::from_store)?;
            srv.store.concat(&upload, &parts).await.map_err(TwirpError::from_store)?;
        }
        Some("appendblock") => {
            let have = srv.store.upload_size(&upload).await.map_err(TwirpError::from_store)?;
            srv.store
                .append(&upload, MAX_SIZE.saturating_sub(have), body_stream(body))
                .await
                .map_err(TwirpError::from_store)?;
        }
        Some(other) => {
            return Err(TwirpError::new(
                "invalid_argument",
                format!("comp={other} is not supported"),
            ));
        }
        None => {
            // Put Blob: a whole block blob, or an empty append blob.
            srv.store.create_upload(&upload).await.map_err(TwirpError::from_store)?;
            let append = headers.get("x-ms-blob-type").is_some_and(|v| v == "AppendBlob");
            if !append {
                srv.store
                    .append(&upload, MAX_SIZE, body_stream(body))
                    .await
                    .map_err(TwirpError::from_store)?;
            }
        }
    }
    Ok((StatusCode::CREATED, [("x-ms-request-id", uuid::Uuid::new_v4().to_string())])
        .into_response())
}

async fn blob_get(
    State(srv): State<Arc<ArtifactServer>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<BlobQuery>,
) -> Result<Response, TwirpError> {
    let id = parse_id(&id)?;
    grant(&srv, &q.sig, &format!("download:{id}"))?;
    let art = srv
        .lock()
        .artifacts
        .get(&id)
        .filter(|a| a.finalized)
        .cloned()
        .ok_or_else(|| TwirpError::new("not_found", format!("no artifact {id}")))?;
    let (reader, size) = srv.store.open(&art.blob()).await.map_err(TwirpError::from_store)?;
    Ok(reader_body(reader, size, &art.mime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn block_lists() {
        let xml = br#"<?xml version="1.0" encoding="utf-8"?><BlockList><Latest>AAA=</Latest><Latest>AAE=</Latest></BlockList>"#;
        assert_eq!(block_list(xml).unwrap(), ["AAA=", "AAE="]);
    }
}
