//! The example plugin written in Node.js (`examples/node-plugin/`, @grpc/grpc-js and
//! @grpc/proto-loader from npm) passes the conformance suite for what it declares, started by
//! the suite itself (the managed shape, so the faults tier runs too). The test installs the
//! plugin's npm dependencies itself (`npm ci`, from its `package-lock.json`) when they are
//! missing.
//!
//! Without node or npm, or when the install fails, the test is recorded as not run (listed by
//! `tests/run`), unless
//! `KILN_REQUIRE_NODE_PLUGIN=1` (set by CI), where that is a failure.

use std::process::Command;

use crate::support::{conformance_bin, repo_root};

/// Installs the plugin's dependencies when missing; why the plugin cannot run, if it cannot.
fn node_missing() -> Option<String> {
    match Command::new("node").arg("--version").output() {
        Err(e) => return Some(format!("node cannot be run: {e}")),
        Ok(out) if !out.status.success() => return Some("node --version failed".to_owned()),
        Ok(_) => {}
    }
    let dir = repo_root().join("examples/node-plugin");
    if dir.join("node_modules/@grpc/grpc-js").is_dir()
        && dir.join("node_modules/@grpc/proto-loader").is_dir()
    {
        return None;
    }
    match Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
    {
        Err(e) => Some(format!("npm cannot be run: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "npm ci in examples/node-plugin failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no output")
        )),
        Ok(_) => None,
    }
}

/// Quotes a word for the suite's `--command` splitter (sh-like).
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn node_plugin_passes_conformance() {
    if !crate::support::prerequisite(
        "node_plugin_passes_conformance",
        "node-plugin",
        node_missing(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let plugin = repo_root().join("examples/node-plugin/plugin.js");
    let command = format!(
        "node {} --root {}",
        sq(&plugin.to_string_lossy()),
        sq(&dir.path().join("envs").to_string_lossy())
    );
    let out = Command::new(conformance_bin())
        .args(["--command", &command, "--ready-timeout", "30", "--junit"])
        .arg(&junit)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance of the node plugin failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    // What it declares is exercised, not skipped.
    for case in [
        "protocol/metadata/instance-id",
        "protocol/errors/error-detail",
        "protocol/health/serving",
        "protocol/limits/message-size",
        "semantics/exec/stream-grammar",
        "semantics/exec/missing-program",
        "semantics/exec/keepalive",
        "semantics/remove/ends-every-process",
        "semantics/copy/traversal",
        "faults/plugin/remove-after-restart",
        "faults/plugin/exec-ids-survive-restart",
        "faults/plugin/sigterm-exit",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with("PASS") && l.contains(case)),
            "{case} did not pass:\n{stdout}"
        );
    }
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("<testsuite"), "{xml}");
}
