//! The cache and artifact protocols over a real socket: every bad input of issue 12 answered
//! with a 4xx JSON error and nothing stored, concurrent reserves, LRU eviction, a server killed
//! mid-upload, and the scope rules (a pull request never writes the default branch's entries).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_services::cache::CacheLimits;
use kiln_services::token::{CacheMode, CacheScope, Signer};
use kiln_services::{Config, Services};
use serde_json::{Value, json};

const SECRET: &[u8] = b"protocol-test-secret";

struct Server {
    services: Services,
    base: String,
}

async fn start(dir: &Path, limits: CacheLimits) -> Server {
    let services = Services::start(Config {
        bind: "127.0.0.1:0".parse().unwrap(),
        cache: Some((dir.join("cache"), limits)),
        artifacts: Some(dir.join("artifacts")),
        secret: Some(SECRET.to_vec()),
    })
    .await
    .unwrap();
    let base = format!("http://{}", services.addr());
    Server { services, base }
}

fn scope(git_ref: &str, mode: CacheMode) -> CacheScope {
    CacheScope {
        repo: "acme/app".into(),
        write_ref: git_ref.into(),
        read_refs: vec!["refs/heads/main".into()],
        mode,
    }
}

fn token(s: CacheScope) -> String {
    Signer::new(SECRET).job_token("7", "build", Some(s), Duration::from_secs(600))
}

fn main_token() -> String {
    token(scope("refs/heads/main", CacheMode::Write))
}

/// One request; returns the status and the body (JSON when it parses, else a string).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::new(body.into())).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

fn api(s: &Server, rest: &str) -> String {
    format!("{}/_apis/artifactcache/{rest}", s.base)
}

async fn reserve(s: &Server, t: &str, key: &str, size: Option<u64>) -> (StatusCode, Value) {
    let body = json!({"key": key, "version": "v1", "cacheSize": size});
    call(
        Method::POST,
        &api(s, "caches"),
        Some(t),
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

async fn chunk(
    s: &Server,
    t: &str,
    id: u64,
    start: u64,
    data: &'static [u8],
) -> (StatusCode, Value) {
    let range = format!("bytes {start}-{}/*", start + data.len() as u64 - 1);
    call(
        Method::PATCH,
        &api(s, &format!("caches/{id}")),
        Some(t),
        &[("content-range", &range)],
        data,
    )
    .await
}

async fn commit(s: &Server, t: &str, id: u64, size: u64) -> (StatusCode, Value) {
    let body = json!({"size": size}).to_string();
    call(
        Method::POST,
        &api(s, &format!("caches/{id}")),
        Some(t),
        &[("content-type", "application/json")],
        body,
    )
    .await
}

async fn lookup(s: &Server, t: &str, keys: &str) -> (StatusCode, Value) {
    call(Method::GET, &api(s, &format!("cache?keys={keys}&version=v1")), Some(t), &[], "").await
}

/// Saves `data` under `key`; returns the id.
async fn save(s: &Server, t: &str, key: &str, data: &'static [u8]) -> u64 {
    let (st, v) = reserve(s, t, key, Some(data.len() as u64)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["cacheId"].as_u64().unwrap();
    assert_eq!(chunk(s, t, id, 0, data).await.0, StatusCode::NO_CONTENT);
    assert_eq!(commit(s, t, id, data.len() as u64).await.0, StatusCode::NO_CONTENT);
    id
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

#[track_caller]
fn assert_error(got: (StatusCode, Value), status: StatusCode, needle: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    let msg = got.1["message"].as_str().unwrap_or_else(|| panic!("no JSON message in {}", got.1));
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

#[tokio::test]
async fn save_lookup_download_with_prefix_and_chunks_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits::default()).await;
    let t = main_token();
    let (_, v) = reserve(&s, &t, "deps-linux-abc", Some(10)).await;
    let id = v["cacheId"].as_u64().unwrap();
    assert_eq!(chunk(&s, &t, id, 5, b"56789").await.0, StatusCode::NO_CONTENT);
    assert_eq!(chunk(&s, &t, id, 0, b"01234").await.0, StatusCode::NO_CONTENT);
    // Not visible before the commit.
    assert_eq!(lookup(&s, &t, "deps-linux-abc").await.0, StatusCode::NO_CONTENT);
    assert_eq!(commit(&s, &t, id, 10).await.0, StatusCode::NO_CONTENT);
    let (st, v) = lookup(&s, &t, "deps-linux-xyz,deps-linux-").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["cacheKey"], "deps-linux-abc");
    let (st, body) = call(Method::GET, v["archiveLocation"].as_str().unwrap(), None, &[], "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, json!("0123456789"), "the chunks in order");
    // The download URL is signed for that entry only.
    let loc =
        v["archiveLocation"].as_str().unwrap().replace(&format!("artifacts/{id}"), "artifacts/99");
    assert_error(
        call(Method::GET, &loc, None, &[], "").await,
        StatusCode::FORBIDDEN,
        "another entry",
    );
    // The token may also be in the path (the form kiln hands out).
    let (st, _) = call(
        Method::GET,
        &format!("{}/c/{t}/_apis/artifactcache/cache?keys=deps-&version=v1", s.base),
        None,
        &[],
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    // The newest of several prefix matches wins.
    save(&s, &t, "deps-linux-def", b"x").await;
    let (_, v) = lookup(&s, &t, "deps-linux-").await;
    assert_eq!(v["cacheKey"], "deps-linux-def");
    // An exact match beats a newer prefix match.
    let (_, v) = lookup(&s, &t, "deps-linux-abc").await;
    assert_eq!(v["cacheKey"], "deps-linux-abc");
    s.services.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_4xx_json_error_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits { total: 1 << 20, entry: 100, ..CacheLimits::default() })
        .await;
    let t = main_token();
    let long = "k".repeat(513);
    assert_error(reserve(&s, &t, &long, Some(1)).await, StatusCode::BAD_REQUEST, "512");
    assert_error(reserve(&s, &t, "a\u{7}b", Some(1)).await, StatusCode::BAD_REQUEST, "control");
    assert_error(
        reserve(&s, &t, "big", Some(101)).await,
        StatusCode::BAD_REQUEST,
        "over the limit",
    );
    let (_, v) = reserve(&s, &t, "k", Some(10)).await;
    let id = v["cacheId"].as_u64().unwrap();
    assert_error(
        chunk(&s, &t, id, 8, b"abc").await,
        StatusCode::BAD_REQUEST,
        "beyond the reserved size",
    );
    assert_eq!(chunk(&s, &t, id, 0, b"abcd").await.0, StatusCode::NO_CONTENT);
    assert_error(chunk(&s, &t, id, 2, b"xy").await, StatusCode::BAD_REQUEST, "overlaps");
    // A body longer than its Content-Range.
    let url = api(&s, &format!("caches/{id}"));
    assert_error(
        call(Method::PATCH, &url, Some(&t), &[("content-range", "bytes 4-5/*")], &b"toolong"[..])
            .await,
        StatusCode::BAD_REQUEST,
        "announced",
    );
    assert_error(
        call(Method::PATCH, &url, Some(&t), &[("content-range", "bytes=4-5")], &b"xx"[..]).await,
        StatusCode::BAD_REQUEST,
        "Content-Range",
    );
    assert_error(commit(&s, &t, id, 10).await, StatusCode::BAD_REQUEST, "missing chunk");
    assert_error(commit(&s, &t, id, 4).await, StatusCode::BAD_REQUEST, "reserved size");
    // Ids are numbers: separators and `..` never reach the store.
    for bad in ["..", "1..2", "%2e%2e", "..%2F1", "1%2F2"] {
        let got = call(
            Method::PATCH,
            &api(&s, &format!("caches/{bad}")),
            Some(&t),
            &[("content-range", "bytes 0-0/*")],
            &b"x"[..],
        )
        .await;
        assert_error(got, StatusCode::BAD_REQUEST, "invalid cache id");
    }
    let got = call(Method::GET, &api(&s, "caches/../../etc/passwd"), Some(&t), &[], "").await;
    assert!(got.0.is_client_error(), "{got:?}");
    // Tokens: missing, another secret's, another scope's, expired.
    assert_error(lookup(&s, "", "k").await, StatusCode::UNAUTHORIZED, "bearer");
    let foreign = Signer::new(b"another secret").job_token(
        "7",
        "b",
        Some(scope("refs/heads/main", CacheMode::Write)),
        Duration::from_secs(60),
    );
    assert_error(lookup(&s, &foreign, "k").await, StatusCode::UNAUTHORIZED, "invalid token");
    let other_ref = token(scope("refs/heads/feature", CacheMode::Write));
    assert_error(chunk(&s, &other_ref, id, 4, b"ef").await, StatusCode::FORBIDDEN, "another scope");
    assert_error(commit(&s, &other_ref, id, 4).await, StatusCode::FORBIDDEN, "another scope");
    let no_cache = Signer::new(SECRET).job_token("7", "b", None, Duration::from_secs(60));
    assert_error(lookup(&s, &no_cache, "k").await, StatusCode::FORBIDDEN, "no cache scope");
    // Nothing was stored.
    assert_eq!(s.services.cache().unwrap().entry_count(), 0);
    assert_eq!(files_in(&dir.path().join("cache/blobs")), 0);
    assert_eq!(lookup(&s, &t, "k").await.0, StatusCode::NO_CONTENT);
    s.services.stop().await;
}

#[tokio::test]
async fn concurrent_reserves_of_one_key_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits::default()).await;
    let t = main_token();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (url, t) = (api(&s, "caches"), t.clone());
            tokio::spawn(async move {
                let body = json!({"key": "same", "version": "v1", "cacheSize": 3}).to_string();
                call(Method::POST, &url, Some(&t), &[("content-type", "application/json")], body)
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        let (st, v) = task.await.unwrap();
        match st {
            StatusCode::CREATED => won += 1,
            StatusCode::CONFLICT => {
                assert!(v["message"].as_str().unwrap().contains("another job"), "{v}")
            }
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(won, 1);
    s.services.stop().await;
}

#[tokio::test]
async fn eviction_is_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits { total: 25, entry: 10, ..CacheLimits::default() }).await;
    let t = main_token();
    save(&s, &t, "a", b"0123456789").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    save(&s, &t, "b", b"0123456789").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(lookup(&s, &t, "a").await.0, StatusCode::OK, "a is now used more recently than b");
    tokio::time::sleep(Duration::from_millis(5)).await;
    save(&s, &t, "c", b"0123456789").await;
    assert_eq!(lookup(&s, &t, "b").await.0, StatusCode::NO_CONTENT, "b was evicted");
    assert_eq!(lookup(&s, &t, "a").await.0, StatusCode::OK);
    assert_eq!(lookup(&s, &t, "c").await.0, StatusCode::OK);
    assert_eq!(s.services.cache().unwrap().total_size(), 20);
    assert_eq!(files_in(&dir.path().join("cache/blobs")), 2);
    s.services.stop().await;
}

#[tokio::test]
async fn a_server_killed_mid_upload_leaves_no_entry_and_its_upload_is_swept() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits::default()).await;
    let t = main_token();
    save(&s, &t, "kept", b"abc").await;
    let (_, v) = reserve(&s, &t, "half", Some(6)).await;
    let id = v["cacheId"].as_u64().unwrap();
    assert_eq!(chunk(&s, &t, id, 0, b"abc").await.0, StatusCode::NO_CONTENT);
    assert_eq!(files_in(&dir.path().join("cache/uploads")), 1);
    // The "kill": the server goes away between two chunks, without a commit.
    drop(s);
    let s = start(dir.path(), CacheLimits::default()).await;
    assert_eq!(files_in(&dir.path().join("cache/uploads")), 0, "the upload was swept");
    assert_eq!(lookup(&s, &t, "half").await.0, StatusCode::NO_CONTENT);
    assert_eq!(lookup(&s, &t, "kept").await.0, StatusCode::OK, "committed entries survive");
    assert_error(chunk(&s, &t, id, 3, b"def").await, StatusCode::NOT_FOUND, "no upload");
    s.services.stop().await;
}

#[tokio::test]
async fn a_pull_request_reads_main_but_never_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits::default()).await;
    let main = main_token();
    save(&s, &main, "deps", b"main").await;
    let pr = token(scope("refs/pull/1/merge", CacheMode::Write));
    // The pull request reads the default branch's entry...
    let (st, v) = lookup(&s, &pr, "deps").await;
    assert_eq!((st, v["scope"].as_str()), (StatusCode::OK, Some("refs/heads/main")));
    // ...and its own save lands in its own ref only.
    let (_, v) = reserve(&s, &pr, "deps", Some(2)).await;
    let id = v["cacheId"].as_u64().unwrap();
    assert_eq!(chunk(&s, &pr, id, 0, b"pr").await.0, StatusCode::NO_CONTENT);
    assert_eq!(commit(&s, &pr, id, 2).await.0, StatusCode::NO_CONTENT);
    let (_, v) = lookup(&s, &main, "deps").await;
    assert_eq!(v["scope"], "refs/heads/main");
    let (_, body) = call(Method::GET, v["archiveLocation"].as_str().unwrap(), None, &[], "").await;
    assert_eq!(body, json!("main"));
    // A fork's pull request is read-only; mode none reads nothing.
    let fork = token(scope("refs/pull/2/merge", CacheMode::Read));
    assert_error(
        reserve(&s, &fork, "deps", Some(1)).await,
        StatusCode::FORBIDDEN,
        "cache write denied:",
    );
    assert_eq!(lookup(&s, &fork, "deps").await.0, StatusCode::OK);
    let none = token(scope("refs/heads/main", CacheMode::None));
    assert_error(lookup(&s, &none, "deps").await, StatusCode::FORBIDDEN, "cache read denied:");
    // Another repository sees nothing.
    let other =
        token(CacheScope { repo: "evil/app".into(), ..scope("refs/heads/main", CacheMode::Write) });
    assert_eq!(lookup(&s, &other, "deps").await.0, StatusCode::NO_CONTENT);
    s.services.stop().await;
}

fn twirp(s: &Server, method: &str) -> String {
    format!("{}/twirp/github.actions.results.api.v1.ArtifactService/{method}", s.base)
}

#[tokio::test]
async fn artifacts_bad_input_and_foreign_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), CacheLimits::default()).await;
    let t = Signer::new(SECRET).job_token("7", "build", None, Duration::from_secs(600));
    let json_ct = [("content-type", "application/json")];
    let create = |name: &str, run: &str| {
        json!({"workflow_run_backend_id": run, "workflow_job_run_backend_id": "build", "name": name, "version": 7}).to_string()
    };
    let (st, v) =
        call(Method::POST, &twirp(&s, "CreateArtifact"), None, &json_ct, create("a", "7")).await;
    assert_eq!((st, v["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthenticated")));
    let (st, v) =
        call(Method::POST, &twirp(&s, "CreateArtifact"), Some(&t), &json_ct, create("a", "8"))
            .await;
    assert_eq!((st, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("permission_denied")));
    for bad in ["../x", "a/b", "a\\b", "a:b", ""] {
        let (st, v) =
            call(Method::POST, &twirp(&s, "CreateArtifact"), Some(&t), &json_ct, create(bad, "7"))
                .await;
        assert_eq!(
            (st, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_argument")),
            "{bad}"
        );
    }
    // A whole upload: two blocks out of order, the block list, finalize with the right size.
    let (st, v) =
        call(Method::POST, &twirp(&s, "CreateArtifact"), Some(&t), &json_ct, create("a", "7"))
            .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let url = v["signed_upload_url"].as_str().unwrap().to_string();
    assert_eq!(
        call(Method::PUT, &format!("{url}&comp=block&blockid=Yg=="), None, &[], "world").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        call(Method::PUT, &format!("{url}&comp=block&blockid=YQ=="), None, &[], "hello ").await.0,
        StatusCode::CREATED
    );
    let list =
        "<?xml version=\"1.0\"?><BlockList><Latest>YQ==</Latest><Latest>Yg==</Latest></BlockList>";
    assert_eq!(
        call(Method::PUT, &format!("{url}&comp=blocklist"), None, &[], list).await.0,
        StatusCode::CREATED
    );
    let fin = |size: u64| {
        json!({"workflow_run_backend_id": "7", "workflow_job_run_backend_id": "build", "name": "a", "size": size.to_string()}).to_string()
    };
    let (st, v) =
        call(Method::POST, &twirp(&s, "FinalizeArtifact"), Some(&t), &json_ct, fin(5)).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_argument")),
        "wrong size"
    );
    let (st, v) =
        call(Method::POST, &twirp(&s, "FinalizeArtifact"), Some(&t), &json_ct, fin(11)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // A forged upload URL is refused.
    let forged = url.replace("upload/1?", "upload/2?");
    assert_eq!(call(Method::PUT, &forged, None, &[], "x").await.0, StatusCode::FORBIDDEN);
    // Another run's token lists nothing; this run's lists it and downloads it.
    let other = Signer::new(SECRET).job_token("8", "build", None, Duration::from_secs(600));
    let (_, v) = call(
        Method::POST,
        &twirp(&s, "ListArtifacts"),
        Some(&other),
        &json_ct,
        json!({"workflow_run_backend_id": "8"}).to_string(),
    )
    .await;
    assert_eq!(v["artifacts"], json!([]));
    let (_, v) = call(
        Method::POST,
        &twirp(&s, "GetSignedArtifactURL"),
        Some(&t),
        &json_ct,
        json!({"workflow_run_backend_id": "7", "name": "a"}).to_string(),
    )
    .await;
    let (st, body) = call(Method::GET, v["signed_url"].as_str().unwrap(), None, &[], "").await;
    assert_eq!((st, body), (StatusCode::OK, json!("hello world")));
    let infos = s.services.artifacts().unwrap().list_run("7");
    assert_eq!(infos.len(), 1);
    assert_eq!(std::fs::read_to_string(&infos[0].path).unwrap(), "hello world");
    s.services.stop().await;
}
