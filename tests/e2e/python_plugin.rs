//! The example plugin written in Python (`examples/python-plugin/`, grpcio from PyPI) passes
//! the conformance suite for what it declares, started by the suite itself (the managed
//! shape, so the faults tier runs too).
//!
//! Without python3 or the plugin's requirements the test says why and passes, unless
//! `KILN_REQUIRE_PYTHON_PLUGIN=1` (set by CI), where that is a failure.

use std::process::Command;

use crate::support::{conformance_bin, repo_root};

/// Why the Python plugin cannot run here, if it cannot.
pub(crate) fn python_missing() -> Option<String> {
    let probe = "import grpc, grpc_tools, grpc_health.v1, grpc_status, google.protobuf";
    match Command::new("python3").args(["-c", probe]).output() {
        Err(e) => Some(format!("python3 cannot be run: {e}")),
        Ok(out) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Some(format!(
                "python3 lacks the plugin's requirements (pip install -r \
                 examples/python-plugin/requirements.txt): {}",
                stderr.lines().last().unwrap_or("import failed")
            ))
        }
        Ok(_) => None,
    }
}

/// Quotes a word for the suite's `--command` splitter (sh-like).
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn python_plugin_passes_conformance() {
    if !crate::support::prerequisite(
        "python_plugin_passes_conformance",
        "python-plugin",
        python_missing(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let plugin = repo_root().join("examples/python-plugin/plugin.py");
    let command = format!(
        "python3 {} --root {}",
        sq(&plugin.to_string_lossy()),
        sq(&dir.path().join("envs").to_string_lossy())
    );
    // The first start may generate the stubs; allow for a slow machine.
    let out = Command::new(conformance_bin())
        .args(["--command", &command, "--ready-timeout", "60", "--junit"])
        .arg(&junit)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance of the python plugin failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    // What it declares is exercised, not skipped.
    for case in [
        "protocol/capabilities/version-mismatch",
        "protocol/exec/id-reuse",
        "semantics/exec/stdin",
        "semantics/exec/staged-and-collected-files",
        "semantics/exec/timeout",
        "semantics/cancel/disconnect",
        "semantics/copy/traversal",
        "faults/plugin/killed-mid-exec",
        "faults/plugin/stdin-eof-exit",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with("PASS") && l.contains(case)),
            "{case} did not pass:\n{stdout}"
        );
    }
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("<testsuite"), "{xml}");
}
