//! The LXC backend with real LXC containers: workflows on `lxc://debian:bookworm` (env files,
//! outputs, a step timeout whose process tree is gone), a job with `container:` and a service
//! (delegated to the docker plugin), the plugin SIGKILLed mid-step, bad input. Every test
//! checks that none of its containers is left. Needs root, Debian's lxc and the base of
//! debian:bookworm (`tests/lxc/setup.sh`); `KILN_REQUIRE_LXC=1` makes a missing one a failure.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::docker::{assert_nothing_left, docker_ready, runner_id};
use crate::support::{self, Repo, kiln_bin, processes_with, wait_for};

/// The image every test uses.
pub(crate) const LXC_IMAGE: &str = "debian:bookworm";

/// Whether LXC and the base of [`LXC_IMAGE`] are there ([`support::prerequisite`](crate::support::prerequisite): a failure
/// under `KILN_REQUIRE_LXC=1`, else the test is recorded as not run).
pub(crate) fn lxc_ready(test: &str) -> bool {
    let image: kiln_plugin_lxc::Image = LXC_IMAGE.parse().unwrap();
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("LXC system containers need root".to_owned())
    } else if Command::new("lxc-start").arg("--version").output().is_err() {
        Some("lxc is not installed (run tests/lxc/setup.sh)".to_owned())
    } else if !kiln_plugin_lxc::base_ready(Path::new(kiln_plugin_lxc::DEFAULT_BASE_DIR), &image) {
        Some(format!("the base container of {LXC_IMAGE} is not built (run tests/lxc/setup.sh)"))
    } else {
        None
    };
    support::prerequisite(test, "lxc", problem)
}

/// Panics unless no job container is left under `root`: no directory, nothing running.
pub(crate) fn assert_no_container_left(root: &Path) {
    let left: Vec<String> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "job containers left under {}: {left:?}", root.display());
    let out = Command::new("lxc-ls").arg("-P").arg(root).arg("--running").output().unwrap();
    let running = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(running.is_empty(), "containers still running: {running}");
}

/// `--plugin lxc=…` with its own root.
fn plugin(root: &Path) -> String {
    format!("lxc={} plugin lxc --root {}", kiln_bin(), root.display())
}

fn exec_on_lxc(repo: &Repo, root: &Path, extra: &[&str]) -> crate::support::Run {
    let label = format!("ubuntu-latest=lxc://{LXC_IMAGE}");
    let plugin = plugin(root);
    let mut args = vec!["-P", &label, "--plugin", &plugin];
    args.extend_from_slice(extra);
    repo.exec(&args)
}

fn run_only(marker: &str) -> String {
    format!(
        r#"
name: lxc
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - id: one
        run: |
          echo "debian $(cut -d. -f1 /etc/debian_version), $(node --version | cut -c1-3), $(python3 -c 'print(6*7)'), git $(git --version | cut -d' ' -f3 | cut -d. -f1)"
          echo "workspace=$PWD"
          echo "started by $(tr '\0' ' ' < /proc/$PPID/cmdline | cut -d' ' -f1)"
          echo "v=42" >> "$GITHUB_OUTPUT"
          echo "FOO=bar" >> "$GITHUB_ENV"
          mkdir -p "$RUNNER_TEMP/tools" && printf '#!/bin/sh\necho tool-ran\n' > "$RUNNER_TEMP/tools/kiln-tool"
          chmod +x "$RUNNER_TEMP/tools/kiln-tool" && echo "$RUNNER_TEMP/tools" >> "$GITHUB_PATH"
      - run: echo "got ${{{{ steps.one.outputs.v }}}} FOO=$FOO" && kiln-tool
      - run: exit 3
        continue-on-error: true
      - name: a step past its timeout is stopped with its background children
        run: |
          sh -c 'exec -a {marker}-child sleep 300' &
          echo $! > "$RUNNER_TEMP/bg.pid"
          exec -a {marker}-main sleep 300
        timeout-minutes: 0.05
        continue-on-error: true
      - run: |
          pid=$(cat "$RUNNER_TEMP/bg.pid")
          if kill -0 "$pid" 2>/dev/null; then echo "still-alive $pid"; exit 1; fi
          echo "tree-gone"
"#
    )
}

#[test]
fn a_workflow_runs_in_an_lxc_container_and_leaves_nothing() {
    if !lxc_ready("a_workflow_runs_in_an_lxc_container_and_leaves_nothing") {
        return;
    }
    let marker = format!("kiln-e2e-lxc-timeout-{}", std::process::id());
    let root = tempfile::tempdir().unwrap();
    let repo = Repo::with_workflow("lxc.yml", &run_only(&marker));
    let run = exec_on_lxc(&repo, root.path(), &[]);
    let ws = format!("workspace={}", std::fs::canonicalize(root.path()).unwrap().display());
    run.assert_code(0).assert_stdout(&[
        "debian 12, v18, 42, git 2",
        &ws,
        // The agent inside the container runs the steps, not one lxc-attach each.
        "started by /usr/local/libexec/kiln-agent",
        "got 42 FOO=bar",
        "tool-ran",
        "exceeded its timeout",
        "tree-gone",
        "Workflow success",
    ]);
    // The timed-out step's processes (seen from the host: a container shares the kernel).
    assert!(processes_with(&marker).is_empty(), "left: {:?}", processes_with(&marker));
    assert_no_container_left(root.path());
}

#[test]
fn an_unknown_lxc_release_is_a_clear_error() {
    if !lxc_ready("an_unknown_lxc_release_is_a_clear_error") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let repo = Repo::with_workflow(
        "bad.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo never-ran\n",
    );
    let plugin = plugin(root.path());
    let run = repo.exec(&["-P", "ubuntu-latest=lxc://debian:nosuch", "--plugin", &plugin]);
    run.assert_code(1).assert_no_stdout(&["never-ran"]);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("unknown debian release \"nosuch\"") && all.contains("bookworm"),
        "the error names neither the release nor the known ones\n{}",
        run.show()
    );
    let run = repo.exec(&["-P", "ubuntu-latest=lxc://centos:7", "--plugin", &plugin]);
    run.assert_code(1);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("unknown distribution \"centos\""), "{}", run.show());
    assert_no_container_left(root.path());
}

const WITH_CONTAINERS: &str = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    container:
      image: kiln-test/busybox:1
    services:
      web:
        image: kiln-test/httpd:1
    steps:
      - run: |
          test -x /bin/busybox && echo "in the job container, ws=$PWD"
          echo made > made-in-container.txt
          echo "service says $(wget -q -O- http://web:8080/)"
  after:
    runs-on: ubuntu-latest
    steps:
      - run: echo "back in lxc $(cut -d. -f1 /etc/debian_version)"
"#;

#[test]
fn container_and_services_of_an_lxc_job_are_delegated_to_the_docker_plugin() {
    let test = "container_and_services_of_an_lxc_job_are_delegated_to_the_docker_plugin";
    if !lxc_ready(test) || !docker_ready(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let repo = Repo::with_workflow("delegated.yml", WITH_CONTAINERS);
    let docker = format!("docker={} plugin docker", kiln_bin());
    let run = exec_on_lxc(&repo, root.path(), &["--plugin", &docker]);
    let ws = format!("ws={}", std::fs::canonicalize(root.path()).unwrap().display());
    run.assert_code(0).assert_stdout(&[
        "in the job container, ",
        &ws,
        "service says service-ok",
        "back in lxc 12",
        "Workflow success",
    ]);
    assert_nothing_left(&runner_id(&repo));
    assert_no_container_left(root.path());
}

#[test]
fn the_lxc_plugin_killed_mid_step_leaves_no_container() {
    if !lxc_ready("the_lxc_plugin_killed_mid_step_leaves_no_container") {
        return;
    }
    let marker = format!("kiln-e2e-lxc-sigkill-{}", std::process::id());
    let root = tempfile::tempdir().unwrap();
    let repo = Repo::with_workflow(
        "kill.yml",
        &format!(
            "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: |\n          \
             sh -c 'exec -a {marker}-bg sleep 300' &\n          echo step-running\n          \
             exec -a {marker}-fg sleep 300\n"
        ),
    );
    let label = format!("ubuntu-latest=lxc://{LXC_IMAGE}");
    let plugin = plugin(root.path());
    let mut child = repo
        .kiln()
        .args(["exec", "-P", &label, "--plugin", &plugin])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let started = line.ends_with("step-running");
            seen.push(line);
            if started {
                break;
            }
        }
    }
    let served = format!("plugin lxc --root {} --listen", root.path().display());
    let pids: Vec<i32> = processes_with(&served)
        .iter()
        .filter(|p| !p.contains(" exec "))
        .filter_map(|p| p.split(':').next().and_then(|pid| pid.parse().ok()))
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}\n{seen:#?}");
    assert!(!processes_with(&marker).is_empty(), "the step is not running\n{seen:#?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    // kiln fails the job, restarts the plugin, and the job's Remove goes through the new one.
    let status = child.wait().unwrap();
    let _ = reader.join();
    seen.extend(rx.try_iter());
    assert_eq!(status.code(), Some(1), "{seen:#?}");
    assert!(
        wait_for(10, || processes_with(&marker).is_empty()),
        "the step's processes outlived the plugin: {:?}\n{seen:#?}",
        processes_with(&marker)
    );
    assert_no_container_left(root.path());
}

#[test]
fn a_failed_base_build_shows_the_tail_of_its_log() {
    if !lxc_ready("a_failed_base_build_shows_the_tail_of_its_log") {
        return;
    }
    // A new base directory (nothing cached) and a mirror nobody serves (loopback, port 9).
    let root = tempfile::tempdir().unwrap();
    let bases = tempfile::tempdir().unwrap();
    let repo = Repo::with_workflow(
        "nomirror.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo never-ran\n",
    );
    let plugin = format!(
        "lxc={} plugin lxc --root {} --base-dir {} --mirror http://127.0.0.1:9/debian",
        kiln_bin(),
        root.path().display(),
        bases.path().display()
    );
    let label = format!("ubuntu-latest=lxc://{LXC_IMAGE}");
    let run = repo.exec(&["-P", &label, "--plugin", &plugin]);
    run.assert_code(1).assert_no_stdout(&["never-ran"]);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("building the lxc image debian:bookworm")
            && all.contains("the last lines of")
            && all.contains("not found in mirror"),
        "the error does not show the build log's tail\n{}",
        run.show()
    );
    // The failed build left no base behind, and no job container.
    let left: Vec<_> = std::fs::read_dir(bases.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_no_container_left(root.path());
}

#[test]
fn without_lxc_the_plugin_names_the_package_to_install() {
    // No LXC tools on PATH: the plugin does not start, and says what to install.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("p.sock");
    let out = Command::new(kiln_bin())
        .args(["plugin", "lxc", "--root"])
        .arg(dir.path().join("envs"))
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .env("PATH", dir.path())
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("LXC is not installed (lxc-start, ")
            && stderr.contains("install Debian's lxc package"),
        "{stderr}"
    );
}
