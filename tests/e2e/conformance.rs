//! The conformance suite against the first-party plugins, over a unix socket, with the suite
//! starting each plugin itself (which enables the faults tier).

use crate::support::{conformance_bin, kiln_bin};

/// Runs the suite against `kiln plugin PLUGIN_ARGS`; returns its report.
fn run_suite(plugin_args: &str) -> String {
    let root = tempfile::tempdir().unwrap();
    let junit = root.path().join("junit.xml");
    let command =
        format!("{} plugin {plugin_args} --root {}/envs", kiln_bin(), root.path().display());
    let out = std::process::Command::new(conformance_bin())
        .args(["--command", &command, "--junit"])
        .arg(&junit)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("<testsuite"), "{xml}");
    stdout.into_owned()
}

#[test]
fn host_plugin_passes_conformance() {
    run_suite("host");
}

#[test]
fn a_delegating_host_plugin_passes_conformance() {
    // Its container layers are delegated: they answer UNIMPLEMENTED and every environment
    // names the delegate (no docker engine is involved).
    let report = run_suite("host --delegate docker");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("PASS") && l.contains("protocol/containers/unimplemented")),
        "{report}"
    );
}

#[test]
fn test_plugin_passes_conformance() {
    run_suite("test");
}

#[test]
fn docker_plugin_passes_conformance() {
    use crate::docker::{IMAGE, assert_nothing_left, docker_ready};
    if !docker_ready("docker_plugin_passes_conformance") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let junit = root.path().join("junit.xml");
    let namespace = format!("conformance-e2e-{}", std::process::id());
    let command =
        format!("{} plugin docker --state-dir {}/state", kiln_bin(), root.path().display());
    let out = std::process::Command::new(conformance_bin())
        .args(["--command", &command, "--namespace", &namespace])
        .args(["--option", &format!("image={IMAGE}"), "--container-image", IMAGE, "--junit"])
        .arg(&junit)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    for case in
        ["semantics/containers/job", "semantics/containers/service", "semantics/containers/step"]
    {
        assert!(
            stdout.lines().any(|l| l.starts_with("PASS") && l.contains(case)),
            "{case} did not pass:\n{stdout}"
        );
    }
    assert_nothing_left(&namespace);
}
