//! The job services with the real npm clients: `@actions/cache` and `@actions/artifact`,
//! installed from the npm registry into `target/kiln-npm/` (once; later runs reuse it) and
//! bundled with esbuild into one node action (`fixtures/services-probe.mjs`), as actions ship.
//! A cache saved in one job is restored in a later one (exact key, and a restore-key prefix),
//! an artifact uploaded in one job is downloaded in a later one, on the host backend and in a
//! Docker job container; a pull request cannot overwrite the default branch's entry.
//!
//! Without npm or the registry the tests are recorded as not run, unless `KILN_REQUIRE_NPM=1` (set
//! by `.ci/run`), which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Repo, repo_root};

/// The client versions the tests pin (the current releases when written).
const PACKAGE_JSON: &str = r#"{
  "name": "kiln-services-probe",
  "private": true,
  "dependencies": {
    "@actions/artifact": "6.2.1",
    "@actions/cache": "6.3.0",
    "esbuild": "0.25.12"
  }
}
"#;

/// The bundled probe action (`index.mjs`), built once per checkout; `None` when npm or the
/// registry is missing ([`crate::support::prerequisite`]: a failure under `KILN_REQUIRE_NPM=1`,
/// else the test is recorded as not run).
pub(crate) fn probe_bundle(test: &str) -> Option<PathBuf> {
    match build_probe() {
        Ok(p) => Some(p),
        Err(why) => {
            crate::support::prerequisite(test, "npm", Some(why));
            None
        }
    }
}

fn build_probe() -> Result<PathBuf, String> {
    let dir = repo_root().join("target/kiln-npm");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // One build at a time: nextest runs tests as parallel processes.
    let lock = std::fs::File::create(dir.join(".lock")).map_err(|e| e.to_string())?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("locking {}: {e}", dir.display()))?;
    let source = repo_root().join("tests/e2e/fixtures/services-probe.mjs");
    let src = std::fs::read_to_string(&source).map_err(|e| e.to_string())?;
    let bundle = dir.join("index.mjs");
    let stamp = dir.join("stamp");
    let want = format!("{PACKAGE_JSON}{src}");
    if bundle.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(bundle);
    }
    std::fs::write(dir.join("package.json"), PACKAGE_JSON).map_err(|e| e.to_string())?;
    let npm = Command::new("npm")
        .current_dir(&dir)
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .output()
        .map_err(|e| format!("npm is not installed ({e}); apt-get install npm"))?;
    if !npm.status.success() {
        return Err(format!(
            "npm install failed (is the npm registry reachable?): {}",
            String::from_utf8_lossy(&npm.stderr).trim()
        ));
    }
    std::fs::copy(&source, dir.join("probe.mjs")).map_err(|e| e.to_string())?;
    let esbuild = Command::new(dir.join("node_modules/.bin/esbuild"))
        .current_dir(&dir)
        .args([
            "probe.mjs",
            "--bundle",
            "--platform=node",
            "--format=esm",
            "--log-level=error",
            "--outfile=index.mjs",
            "--banner:js=import { createRequire as __cr } from 'module'; const require = __cr(import.meta.url);",
        ])
        .output()
        .map_err(|e| format!("esbuild: {e}"))?;
    if !esbuild.status.success() {
        return Err(format!("esbuild failed: {}", String::from_utf8_lossy(&esbuild.stderr)));
    }
    std::fs::write(&stamp, want).map_err(|e| e.to_string())?;
    Ok(bundle)
}

const ACTION_YML: &str = "name: probe
inputs:
  op: {required: true}
  key: {required: false}
  restore-keys: {required: false}
  path: {required: false}
  content: {required: false}
  name: {required: false}
runs:
  using: node20
  main: index.mjs
";

/// A repository with `workflow` and the probe action in `.github/actions/probe`.
fn repo_with_probe(bundle: &Path, workflow: &str) -> Repo {
    let repo = Repo::with_workflow("ci.yml", workflow);
    add_probe(&repo, bundle);
    repo
}

fn add_probe(repo: &Repo, bundle: &Path) {
    let action = repo.path().join(".github/actions/probe");
    std::fs::create_dir_all(&action).unwrap();
    std::fs::copy(bundle, action.join("index.mjs")).unwrap();
    std::fs::write(action.join("action.yml"), ACTION_YML).unwrap();
}

const SAVE_THEN_RESTORE: &str = "on: push
jobs:
  save:
    runs-on: ubuntu-latest
    steps:
      - uses: ./.github/actions/probe
        with: {op: cache-save, key: deps-v1-abc, content: hello-cache}
      - uses: ./.github/actions/probe
        with: {op: artifact-upload, name: my-art, content: hello-artifact}
  restore:
    needs: save
    runs-on: ubuntu-latest
    steps:
      - uses: ./.github/actions/probe
        with: {op: cache-restore, key: deps-v1-abc}
      - uses: ./.github/actions/probe
        with: {op: cache-restore, key: deps-v2-nothing, restore-keys: deps-v1-}
      - uses: ./.github/actions/probe
        with: {op: artifact-download, name: my-art}
";

fn assert_saved_and_restored(run: &crate::support::Run) {
    run.assert_code(0).assert_stdout(&[
        "[save]   Cache saved successfully",
        "[save]   uploaded: 1",
        "[restore]   restored: deps-v1-abc content: hello-cache",
        "[restore]   downloaded: hello-artifact",
        "Artifacts of run",
        "my-art (save, ",
    ]);
    // Both restores hit: the exact key, then through the restore-key prefix.
    assert_eq!(
        run.stdout.matches("restored: deps-v1-abc content: hello-cache").count(),
        2,
        "{}",
        run.show()
    );
}

#[test]
fn a_cache_and_an_artifact_pass_between_jobs_with_the_real_npm_clients() {
    let Some(bundle) = probe_bundle("services::a_cache_and_an_artifact_pass_between_jobs") else {
        return;
    };
    let repo = repo_with_probe(&bundle, SAVE_THEN_RESTORE);
    let run = repo.exec(&["-P", "ubuntu-latest=host"]);
    assert_saved_and_restored(&run);
    // The token never shows in the log.
    assert!(!run.stdout.contains("eyJ"), "a token leaked: {}", run.show());
    // The artifact is where the summary says, under the state directory.
    let line = run.stdout.lines().find(|l| l.contains("my-art (save, ")).unwrap();
    let path = line.rsplit(": ").next().unwrap();
    assert!(Path::new(path).starts_with(repo.state.path()), "{path}");
    assert!(std::fs::metadata(path).unwrap().len() > 0);
}

#[test]
fn a_pull_request_cannot_overwrite_the_default_branch_entry() {
    let Some(bundle) = probe_bundle("services::a_pull_request_cannot_overwrite") else {
        return;
    };
    let save = |content: &str| {
        format!(
            "on: [push, pull_request]\njobs:\n  save:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: ./.github/actions/probe\n        with: {{op: cache-save, key: shared-key, content: {content}}}\n      - uses: ./.github/actions/probe\n        with: {{op: cache-restore, key: shared-key}}\n"
        )
    };
    let repo = repo_with_probe(&bundle, &save("from-main"));
    repo.exec(&["-P", "ubuntu-latest=host"])
        .assert_code(0)
        .assert_stdout(&["restored: shared-key content: from-main"]);
    // A pull request from the same repository saves under its own ref...
    let event = repo.path().join("pr.json");
    std::fs::write(&event, r#"{"pull_request": {"number": 5, "head": {"ref": "topic", "repo": {"full_name": "acme/widgets"}}, "base": {"ref": "main", "repo": {"full_name": "acme/widgets"}}}, "repository": {"default_branch": "main"}}"#).unwrap();
    std::fs::write(repo.path().join(".github/workflows/ci.yml"), save("from-pr")).unwrap();
    let ev = event.to_str().unwrap();
    repo.exec(&["pull_request", "-e", ev, "-P", "ubuntu-latest=host"])
        .assert_code(0)
        .assert_stdout(&[
            "[save]   Cache saved successfully",
            "restored: shared-key content: from-pr",
        ]);
    // ...a fork's pull request may not save at all...
    let fork = repo.path().join("fork.json");
    std::fs::write(&fork, r#"{"pull_request": {"number": 6, "head": {"ref": "topic", "repo": {"full_name": "evil/widgets", "fork": true}}, "base": {"ref": "main", "repo": {"full_name": "acme/widgets"}}}, "repository": {"default_branch": "main"}}"#).unwrap();
    let run =
        repo.exec(&["pull_request", "-e", fork.to_str().unwrap(), "-P", "ubuntu-latest=host"]);
    run.assert_code(0).assert_stdout(&["restored: shared-key content: from-main"]);
    assert!(!run.stdout.contains("Cache saved successfully"), "{}", run.show());
    // ...and the default branch still restores its own entry.
    std::fs::write(repo.path().join(".github/workflows/ci.yml"), save("again")).unwrap();
    repo.exec(&["-P", "ubuntu-latest=host"])
        .assert_code(0)
        .assert_stdout(&["restored: shared-key content: from-main"]);
}

#[test]
fn a_cache_and_an_artifact_pass_between_docker_job_containers() {
    let Some(bundle) = probe_bundle("services::docker") else {
        return;
    };
    if !crate::docker::docker_ready(
        "services::a_cache_and_an_artifact_pass_between_docker_job_containers",
    ) {
        return;
    }
    let ok = Command::new("bash")
        .arg(repo_root().join("tests/docker/node-image.sh"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "tests/docker/node-image.sh failed");
    let repo = repo_with_probe(&bundle, SAVE_THEN_RESTORE);
    let run = repo.exec(&["-P", "ubuntu-latest=docker://kiln-test/node:2"]);
    assert_saved_and_restored(&run);
}

/// `kiln cache-server` on a free port with a secret file; killed by PID when dropped.
pub(crate) struct CacheServer {
    child: std::process::Child,
}

impl CacheServer {
    pub(crate) fn start(dir: &Path, secret: &Path, port: u16) -> CacheServer {
        let child = Command::new(crate::support::kiln_bin())
            .args(["cache-server", "--listen", &format!("127.0.0.1:{port}"), "--secret-file"])
            .arg(secret)
            .arg("--dir")
            .arg(dir)
            .env("KILN_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("kiln cache-server");
        assert!(
            crate::support::wait_for(20, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "kiln cache-server does not listen on {port}"
        );
        CacheServer { child }
    }

    fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One raw HTTP/1.1 request (fault injection: `body` may be shorter than `length`); the status
/// line and body of the answer, unless `hang_up`.
fn raw(port: u16, head: &str, length: usize, body: &[u8], hang_up: bool) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{head}\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.write_all(body).unwrap();
    if hang_up {
        std::thread::sleep(std::time::Duration::from_millis(300));
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn a_cache_server_killed_mid_upload_keeps_no_partial_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tmp.path().join("cache");
    let mut server = CacheServer::start(&dir, &secret, port);
    let signer = kiln_services::token::Signer::new(b"0123456789abcdef0123456789abcdef");
    let scope = kiln_services::token::CacheScope {
        repo: "acme/widgets".into(),
        write_ref: "refs/heads/main".into(),
        read_refs: vec![],
        mode: kiln_services::token::CacheMode::Write,
    };
    let token = signer.job_token("1", "j", Some(scope), std::time::Duration::from_secs(600));
    let api = format!("/c/{token}/_apis/artifactcache");
    let reserve = r#"{"key":"big","version":"v1","cacheSize":1000000}"#;
    let answer = raw(
        port,
        &format!("POST {api}/caches HTTP/1.1\r\nContent-Type: application/json"),
        reserve.len(),
        reserve.as_bytes(),
        false,
    );
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    // Half a chunk, then the server is SIGKILLed while it waits for the rest.
    raw(
        port,
        &format!("PATCH {api}/caches/1 HTTP/1.1\r\nContent-Range: bytes 0-999999/*"),
        1_000_000,
        &[7u8; 300_000],
        true,
    );
    assert_eq!(std::fs::read_dir(dir.join("uploads")).unwrap().count(), 1);
    server.kill();
    let _server = CacheServer::start(&dir, &secret, port);
    assert_eq!(std::fs::read_dir(dir.join("uploads")).unwrap().count(), 0, "the upload was swept");
    assert_eq!(std::fs::read_dir(dir.join("blobs")).unwrap().count(), 0);
    let answer = raw(port, &format!("GET {api}/cache?keys=big&version=v1 HTTP/1.1"), 0, b"", false);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    // A token signed with another secret is refused.
    let other = kiln_services::token::Signer::new(b"another secret, not the server's").job_token(
        "1",
        "j",
        None,
        std::time::Duration::from_secs(60),
    );
    let answer = raw(
        port,
        &format!("GET /c/{other}/_apis/artifactcache/cache?keys=big&version=v1 HTTP/1.1"),
        0,
        b"",
        false,
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}
