//! `kiln exec` on the QEMU backend (`kiln plugin qemu`): real VMs (TCG here), the guest image
//! that `tests/qemu/setup.sh` builds, the job's containers on the guest's dockerd with the
//! images copied from the host engine (`tests/docker/setup.sh`'s test images).
//!
//! Few VM boots, because TCG is slow: one run with a container job (one VM with dockerd), one
//! kill-and-restart run of a run-only job (one VM), and a conformance subset (one VM per case, named
//! in [`CONFORMANCE_CASES`]). Without QEMU or the image the tests print why and pass, unless
//! `KILN_REQUIRE_QEMU=1` (set by `.ci/run`). After each test no qemu process, overlay or
//! certificate of the test is left, and the host engine never saw a container of the test.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::docker::{assert_nothing_left, docker_ready, runner_id};
use crate::support::{Repo, conformance_bin, kiln_bin, processes_with, wait_for};

/// The image directory the setup script fills.
const IMAGE_DIR: &str = "/var/cache/kiln/qemu/images";

/// Whether QEMU and the guest image are there ([`crate::support::prerequisite`]: a failure
/// under `KILN_REQUIRE_QEMU=1`, else the test is recorded as not run).
fn qemu_ready(test: &str) -> bool {
    let problem = if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        Some("qemu-system-x86_64 is missing (run tests/qemu/setup.sh)".to_owned())
    } else if !std::path::Path::new(IMAGE_DIR).join("debian-bookworm/disk.qcow2").is_file() {
        Some(format!("no debian-bookworm image in {IMAGE_DIR} (run tests/qemu/setup.sh)"))
    } else {
        None
    };
    crate::support::prerequisite(test, "qemu", problem)
}

/// The qemu plugin's command line, with its state under the repository's state directory.
fn plugin(repo: &Repo, extra: &str) -> String {
    format!("qemu={} plugin qemu --root {}{extra}", kiln_bin(), qemu_root(repo).display())
}

fn qemu_root(repo: &Repo) -> std::path::PathBuf {
    repo.state.path().join("qemu")
}

/// No QEMU of `root` runs and no VM directory (overlay, certificates, config drive) is left.
fn assert_no_vm_left(root: &std::path::Path) {
    let marker = root.to_string_lossy().into_owned();
    assert!(
        wait_for(15, || processes_with(&marker).iter().all(|p| !p.contains("qemu-system"))),
        "qemu processes left: {:?}",
        processes_with(&marker)
    );
    let left: Vec<_> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM state left in {}: {left:?}", root.display());
}

/// Kills the QEMU processes of a test's VMs when the test ends, also when it fails: a failed
/// test must not leave VMs running on a shared machine.
struct Reaper(std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for p in processes_with(&self.0.to_string_lossy()) {
            if p.contains("qemu-system")
                && let Some(pid) = p.split(':').next().and_then(|p| p.parse().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Watches the host engine while a run goes: sets the flag when any container of the runner
/// appears there (the VM's containers must not).
fn watch_host_engine(
    repo: &Repo,
) -> (Arc<AtomicBool>, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let file = repo.state.path().join("kiln/runner-id");
    let (s, t) = (Arc::clone(&seen), Arc::clone(&stop));
    let watcher = std::thread::spawn(move || {
        while !t.load(Ordering::Relaxed) {
            if let Ok(id) = std::fs::read_to_string(&file) {
                let filter = format!("label=dev.kiln.runner-id={}", id.trim());
                if let Ok(out) =
                    Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output()
                    && !String::from_utf8_lossy(&out.stdout).trim().is_empty()
                {
                    s.store(true, Ordering::Relaxed);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    });
    (seen, stop, watcher)
}

const VM_WORKFLOW: &str = r#"
on: push
jobs:
  containers:
    runs-on: vm
    container:
      image: kiln-test/busybox:1
    services:
      web:
        image: kiln-test/httpd:1
    steps:
      - run: echo "service says $(wget -q -O- http://web:8080/)"
      - run: test -f README.md && echo "workspace has README.md"
      - uses: docker://kiln-test/busybox:1
        with:
          args: sh -c "echo docker step says hi"
"#;

#[test]
fn a_vm_runs_steps_a_job_container_a_healthy_service_and_a_docker_step() {
    let test = "a_vm_runs_steps_a_job_container_a_healthy_service_and_a_docker_step";
    if !qemu_ready(test) || !docker_ready(test) {
        return;
    }
    let repo = Repo::with_workflow("vm.yml", VM_WORKFLOW);
    let _reaper = Reaper(qemu_root(&repo));
    std::fs::write(repo.path().join("README.md"), "hello\n").unwrap();
    let (seen, stop, watcher) = watch_host_engine(&repo);
    let run = repo.exec(&["-P", "vm=qemu", "--plugin", &plugin(&repo, "")]);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    run.assert_code(0).assert_stdout(&[
        "workspace has README.md",
        "starting service web (kiln-test/httpd:1)",
        "service says service-ok",
        "docker step says hi",
    ]);
    assert!(
        !seen.load(Ordering::Relaxed),
        "the host engine saw a container of the run\n{}",
        run.show()
    );
    assert_nothing_left(&runner_id(&repo));
    assert_no_vm_left(&qemu_root(&repo));
}

#[test]
fn a_killed_qemu_plugin_fails_the_job_and_leaves_no_vm_after_a_restart() {
    let test = "a_killed_qemu_plugin_fails_the_job_and_leaves_no_vm_after_a_restart";
    if !qemu_ready(test) {
        return;
    }
    let repo = Repo::with_workflow(
        "kill.yml",
        "on: push\njobs:\n  j:\n    runs-on: vm\n    steps:\n      - run: echo \"step-started on $(hostname) as $(id -un)\"; sleep 300\n",
    );
    // No containers: no dockerd in the VM, no docker plugin needed.
    let plugin = plugin(&repo, " --delegate none");
    let mut child = repo
        .kiln()
        .args(["exec", "-P", "vm=qemu", "--plugin", &plugin])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    assert!(
        lines.by_ref().map_while(Result::ok).any(|l| l.contains("step-started on kiln-vm as root")),
        "the step never started in the VM"
    );
    let root = qemu_root(&repo);
    let _reaper = Reaper(root.clone());
    // The plugin itself, not the kiln exec whose --plugin flag names the same command line.
    let marker = format!("{} plugin qemu --root {}", kiln_bin(), root.display());
    let plugins: Vec<String> =
        processes_with(&marker).into_iter().filter(|p| !p.contains(" exec ")).collect();
    assert_eq!(plugins.len(), 1, "{plugins:?}");
    let pid: i32 = plugins[0].split(':').next().unwrap().parse().unwrap();
    let killed = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let rest = rest.join("\n");
    assert!(!status.success(), "the job should fail\n{rest}");
    assert!(rest.contains("qemu"), "the failure should name the plugin\n{rest}");
    println!("kiln exited {:.1}s after the kill", killed.elapsed().as_secs_f64());
    // The next run of the same runner removes what is left (the restarted plugin finds the
    // VM by its state directory).
    let repo2 = Repo::next_run(
        repo,
        "ok.yml",
        "on: push\njobs:\n  ok:\n    runs-on: local\n    steps:\n      - run: echo fine\n",
    );
    repo2
        .exec(&["-P", "local=host", "-P", "vm=qemu", "--plugin", &plugin])
        .assert_code(0)
        .assert_stdout(&["fine"]);
    assert_no_vm_left(&root);
}

/// The conformance cases run against the qemu plugin in CI: one VM each under TCG (about
/// 30 s), so three; the whole suite passes too (docs/vm-backend.md gives its figures).
const CONFORMANCE_CASES: [&str; 3] = [
    "protocol/environment/replay",
    "semantics/exec/output-and-exit-codes",
    "semantics/copy/round-trip",
];

#[test]
fn qemu_plugin_passes_conformance_cases() {
    if !qemu_ready("qemu_plugin_passes_conformance_cases") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let _reaper = Reaper(root.path().join("vms"));
    let command =
        format!("{} plugin qemu --root {}/vms --delegate none", kiln_bin(), root.path().display());
    for case in CONFORMANCE_CASES {
        let out = Command::new(conformance_bin())
            .args(["--command", &command, "--filter", case, "--case-timeout", "240"])
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
        assert!(stdout.contains(&format!("PASS  {case}")), "{case} did not pass:\n{stdout}");
    }
    assert_no_vm_left(&root.path().join("vms"));
}
