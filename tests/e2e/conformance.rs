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

/// Runs the suite against `kiln plugin docker PLUGIN_ARGS`, every environment with the
/// options `image=IMAGE` and `options`; checks that the container layers passed and that
/// nothing is left. Returns false when it did not run (no engine; see `docker_ready`).
fn docker_suite(test: &str, plugin_args: &str, options: &[String]) -> bool {
    use crate::docker::{IMAGE, assert_nothing_left, docker_ready};
    if !docker_ready(test) {
        return false;
    }
    let root = tempfile::tempdir().unwrap();
    let junit = root.path().join("junit.xml");
    let namespace = format!("conformance-e2e-{}", std::process::id());
    let command = format!(
        "{} plugin docker --state-dir {}/state {plugin_args}",
        kiln_bin(),
        root.path().display()
    );
    let mut cmd = std::process::Command::new(conformance_bin());
    cmd.args(["--command", &command, "--namespace", &namespace]).args([
        "--option",
        &format!("image={IMAGE}"),
        "--container-image",
        IMAGE,
    ]);
    for o in options {
        cmd.args(["--option", o]);
    }
    let out = cmd.arg("--junit").arg(&junit).env("KILN_LOG", "warn").output().unwrap();
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
    true
}

#[test]
fn docker_plugin_passes_conformance() {
    docker_suite("docker_plugin_passes_conformance", "", &[]);
}

#[test]
fn docker_plugin_passes_conformance_on_a_remote_daemon() {
    // The plugin's own daemon, over TCP and declared remote: /__kiln is a volume and every
    // file goes through the engine's API. (Environments naming their own daemon with the
    // option docker_host take the same path: see docker.rs.)
    let engine = crate::docker::tcp_engine();
    let ran = docker_suite(
        "docker_plugin_passes_conformance_on_a_remote_daemon",
        &format!("--docker-host {} --remote-daemon", engine.url),
        &[],
    );
    assert!(!ran || engine.connections.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

#[test]
fn lxc_plugin_passes_conformance() {
    use crate::lxc::{assert_no_container_left, lxc_ready};
    if !lxc_ready("lxc_plugin_passes_conformance") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let junit = root.path().join("junit.xml");
    let envs = root.path().join("envs");
    let command = format!("{} plugin lxc --root {}", kiln_bin(), envs.display());
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
    assert_no_container_left(&envs);
}

#[test]
fn lxc_plugin_without_its_agent_passes_conformance() {
    use crate::lxc::{assert_no_container_left, lxc_ready};
    if !lxc_ready("lxc_plugin_without_its_agent_passes_conformance") {
        return;
    }
    // Every exec through its own lxc-attach (images whose libc cannot run the agent).
    let root = tempfile::tempdir().unwrap();
    let envs = root.path().join("envs");
    let command = format!("{} plugin lxc --no-agent --root {}", kiln_bin(), envs.display());
    let out = std::process::Command::new(conformance_bin())
        .args(["--command", &command])
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
    assert_no_container_left(&envs);
}
