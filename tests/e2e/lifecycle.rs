//! Lifecycle under stress: step timeouts, Ctrl-C, and a plugin that crashes mid-step. Each test
//! checks that no process of the job is left behind.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{Repo, Run, kiln_bin, processes_with, wait_for};

#[test]
fn step_timeout_kills_the_process_tree_and_failure_steps_still_run() {
    let marker = format!("kiln-e2e-timeout-{}", std::process::id());
    let repo = Repo::with_workflow(
        "t.yml",
        &format!(
            r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - timeout-minutes: 0.02
        run: |
          sh -c 'exec -a {marker}-child sleep 300' &
          exec -a {marker}-main sleep 300
      - if: failure()
        run: echo "after the timeout"
"#
        ),
    );
    let run = repo.exec(&[]);
    run.assert_code(1).assert_stdout(&["exceeded its timeout", "after the timeout"]);
    assert!(
        wait_for(5, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn ctrl_c_cancels_the_run_and_leaves_no_process() {
    let marker = format!("kiln-e2e-cancel-{}", std::process::id());
    let repo = Repo::with_workflow(
        "c.yml",
        &format!(
            r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: |
          sh -c 'exec -a {marker}-bg sleep 300' &
          echo "step started"
          exec -a {marker}-fg sleep 300
      - if: always()
        run: echo "always step ran"
      - run: echo "normal step" "must not run"
"#
        ),
    );
    let mut child = repo.kiln().arg("exec").stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let started = line.contains("step started");
            seen.push(line);
            if started {
                break;
            }
        }
    }
    assert!(seen.iter().any(|l| l.contains("step started")), "{seen:#?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "kiln did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    seen.extend(rx.try_iter());
    assert_eq!(status.code(), Some(130), "{seen:#?}");
    let text = seen.join("\n");
    assert!(text.contains("always step ran"), "{text}");
    assert!(!text.contains("normal step must not run"), "{text}");
    assert!(
        wait_for(5, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn plugin_crash_mid_step_fails_the_job_quickly_naming_the_plugin() {
    let marker = format!("kiln-e2e-crash-{}", std::process::id());
    let repo = Repo::with_workflow(
        "crash.yml",
        &format!(
            r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: echo "first step ok"
      - run: |
          echo "second step started"
          exec -a {marker} sleep 300
      - if: always()
        run: echo "cleanup step"
"#
        ),
    );
    let root = tempfile::tempdir().unwrap();
    // The setup probe is exec 1, the first step exec 2: crash while the second step runs.
    let plugin = format!(
        "test={} plugin test --root {} --crash-on-exec 3",
        kiln_bin(),
        root.path().display()
    );
    let start = Instant::now();
    let run = repo.exec(&["--plugin", &plugin, "-P", "ubuntu-latest=test"]);
    let took = start.elapsed();
    run.assert_code(1).assert_stdout(&["first step ok", "backend \"test\" failed"]);
    assert!(took < Duration::from_secs(15), "took {took:?}\n{}", run.show());
    // The step that was running when the plugin died failed within 5 s.
    let step_line = run
        .stdout
        .lines()
        .find(|l| l.contains("✗ Run echo \"second step started\""))
        .unwrap_or_else(|| panic!("no failed step line\n{}", run.show()));
    let took = step_duration(step_line);
    assert!(took < Duration::from_secs(5), "{step_line}");
}

/// A workflow whose first job runs a `sleep` named `marker` (to be killed with its plugin) and
/// whose second job, `if: always()`, echoes `second`.
fn two_jobs_first_killed(marker: &str, second: &str) -> String {
    format!(
        r#"
on: push
jobs:
  first:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "first job running"
          exec -a {marker} sleep 300
  second:
    needs: first
    if: always()
    runs-on: ubuntu-latest
    steps:
      - run: echo "{second}"
"#
    )
}

/// The names in a directory (none when it is missing).
fn entries(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default()
}

/// The duration printed at the end of a step line: `[12ms]`, `[1.52s]`.
fn step_duration(line: &str) -> Duration {
    let inner = line.rsplit('[').next().and_then(|s| s.split(']').next()).unwrap_or("");
    if let Some(ms) = inner.strip_suffix("ms") {
        return Duration::from_millis(ms.parse().unwrap_or(u64::MAX));
    }
    if let Some(s) = inner.strip_suffix('s') {
        return Duration::from_secs_f64(s.parse().unwrap_or(f64::MAX));
    }
    Duration::MAX
}

#[test]
fn job_timeout_stops_the_job_and_always_steps_run() {
    let marker = format!("kiln-e2e-jobtimeout-{}", std::process::id());
    let repo = Repo::with_workflow(
        "jt.yml",
        &format!(
            r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    timeout-minutes: 0.02
    steps:
      - run: exec -a {marker} sleep 300
      - run: echo "must not run"
      - if: always()
        run: echo "always after job timeout"
"#
        ),
    );
    repo.exec(&[])
        .assert_code(1)
        .assert_stdout(&["exceeded its maximum execution time", "always after job timeout"])
        .assert_no_stdout(&["  must not run"]);
    assert!(
        wait_for(5, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn hash_files_sees_the_job_workspace() {
    let repo = Repo::with_workflow(
        "h.yml",
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: echo "before=${{ hashFiles('made-in-job.txt') }}"
      - run: echo content > made-in-job.txt
      - run: echo "after=${{ hashFiles('made-in-job.txt') }}"
"#,
    );
    let run = repo.exec(&[]);
    run.assert_code(0).assert_stdout(&["before=\n", "after="]);
    let after = run.stdout.lines().find_map(|l| l.strip_prefix("[j]   after=")).unwrap_or_default();
    assert_eq!(after.len(), 64, "{}", run.show());
}

#[test]
fn a_crashed_managed_plugin_is_restarted_and_the_dead_job_leaves_nothing() {
    let marker = format!("kiln-e2e-restart-{}", std::process::id());
    let repo = Repo::with_workflow(
        "restart.yml",
        &two_jobs_first_killed(&marker, "second job on the restarted plugin"),
    );
    let root = tempfile::tempdir().unwrap();
    // Exec 1 is the first job's setup probe, exec 2 its step: the plugin dies mid-step.
    let plugin = format!(
        "test={} plugin test --root {} --crash-on-exec 2",
        kiln_bin(),
        root.path().display()
    );
    let run = repo.exec(&["--plugin", &plugin, "-P", "ubuntu-latest=test"]);
    run.assert_code(1).assert_stdout(&[
        "first job running",
        "backend \"test\" failed",
        "second job on the restarted plugin",
        "✓ second (success)",
    ]);
    let left = entries(root.path());
    assert!(left.is_empty(), "environments left behind: {left:?}\n{}", run.show());
    assert!(
        wait_for(5, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn a_killed_kiln_leaves_nothing_after_the_next_run() {
    let marker = format!("kiln-e2e-sigkill-{}", std::process::id());
    let repo = Repo::with_workflow(
        "k.yml",
        &format!(
            r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "step started"
          exec -a {marker} sleep 300
"#
        ),
    );
    let root = tempfile::tempdir().unwrap();
    let plugin = format!("test={} plugin test --root {}", kiln_bin(), root.path().display());
    let mut child = repo
        .kiln()
        .args(["exec", "--plugin", &plugin, "-P", "ubuntu-latest=test"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("step started"));
    assert!(started);
    child.kill().unwrap();
    let _ = child.wait();
    // The managed plugin notices its stdin closing and exits; the environment stays on disk.
    let envs = || entries(root.path());
    assert!(!envs().is_empty(), "the killed run's environment should still be there");
    // The next run of the same runner removes what the dead one left.
    let repo2 = Repo::next_run(
        repo,
        "ok.yml",
        "on: push\njobs:\n  ok:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo fine\n",
    );
    repo2.exec(&["--plugin", &plugin, "-P", "ubuntu-latest=test"]).assert_code(0);
    assert!(envs().is_empty(), "left behind: {:?}", envs());
    assert!(
        wait_for(5, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn a_plugin_speaking_another_protocol_version_is_refused_at_start() {
    let repo = Repo::with_workflow(
        "v.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo never\n",
    );
    let root = tempfile::tempdir().unwrap();
    let plugin = format!(
        "test={} plugin test --root {} --protocol-version 2",
        kiln_bin(),
        root.path().display()
    );
    let run = repo.exec(&["--plugin", &plugin, "-P", "ubuntu-latest=test"]);
    run.assert_code(2).assert_no_stdout(&["never"]);
    assert!(run.stderr.contains("plugin \"test\""), "{}", run.show());
    assert!(run.stderr.contains("[1]") && run.stderr.contains("speaks 2"), "{}", run.show());
}

#[test]
fn a_plugin_lacking_a_capability_a_label_needs_is_refused_at_start() {
    let repo = Repo::with_workflow(
        "cap.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo never\n",
    );
    let root = tempfile::tempdir().unwrap();
    let plugin = format!(
        "test={} plugin test --root {} --refuse-capability environment",
        kiln_bin(),
        root.path().display()
    );
    let run = repo.exec(&["--plugin", &plugin, "-P", "ubuntu-latest=test"]);
    run.assert_code(2).assert_no_stdout(&["never"]);
    assert!(run.stderr.contains("capability `environment`"), "{}", run.show());
}

#[test]
fn a_managed_plugin_killed_with_sigkill_mid_step_fails_the_job_and_is_replaced() {
    let marker = format!("kiln-e2e-sigkill-plugin-{}", std::process::id());
    let repo = Repo::with_workflow(
        "kill.yml",
        &two_jobs_first_killed(&marker, "second job after the kill"),
    );
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().display().to_string();
    let plugin = format!("test={} plugin test --root {root_arg}", kiln_bin());
    let mut child = repo
        .kiln()
        .args(["exec", "--plugin", &plugin, "-P", "ubuntu-latest=test"])
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let started = line.ends_with("]   first job running");
            seen.push(line);
            if started {
                break;
            }
        }
    }
    // The plugin is the process serving `plugin test --root <our root> … --listen …` (kiln's
    // own command line names it too, after --plugin).
    let plugin_pids: Vec<i32> = processes_with(&format!("plugin test --root {root_arg} --listen"))
        .iter()
        .filter(|p| !p.contains(" exec "))
        .filter_map(|p| p.split(':').next().and_then(|pid| pid.parse().ok()))
        .collect();
    assert_eq!(plugin_pids.len(), 1, "{plugin_pids:?}\n{seen:#?}");
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(plugin_pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut failed_at = None;
    for line in rx.iter() {
        if failed_at.is_none() && line.contains("backend \"test\" failed") {
            failed_at = Some(killed_at.elapsed());
        }
        seen.push(line);
    }
    let _ = reader.join();
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    let failed_after =
        failed_at.unwrap_or_else(|| panic!("the job did not fail naming the plugin:\n{text}"));
    assert!(failed_after < Duration::from_secs(5), "failed after {failed_after:?}\n{text}");
    assert!(text.contains("second job after the kill"), "{text}");
    assert!(text.contains("✓ second (success)"), "{text}");
    let left = entries(root.path());
    assert!(left.is_empty(), "environments left behind: {left:?}\n{text}");
    assert!(
        wait_for(5, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
}

#[test]
fn a_job_whose_task_panics_fails_releases_its_slot_and_its_environment_is_removed() {
    // Both combinations panic on the runner's side after setup (the debug-build hook
    // KILN_TEST_PANIC_IN_JOB): the second only starts when the first's slot (max-parallel 1)
    // is released; the job after them sees the failure.
    let repo = Repo::with_workflow(
        "panic.yml",
        r#"
on: push
jobs:
  boom:
    runs-on: ubuntu-latest
    strategy:
      max-parallel: 1
      fail-fast: false
      matrix:
        n: [1, 2]
    steps:
      - run: echo "a step of a panicking job must not run"
  after:
    needs: boom
    if: always()
    runs-on: ubuntu-latest
    steps:
      - run: echo "after ran, boom was ${{ needs.boom.result }}"
"#,
    );
    let root = tempfile::tempdir().unwrap();
    let plugin = format!("test={} plugin test --root {}", kiln_bin(), root.path().display());
    let out = repo
        .kiln()
        .args(["exec", "--plugin", &plugin, "-P", "ubuntu-latest=test"])
        .env("KILN_TEST_PANIC_IN_JOB", "boom")
        .output()
        .unwrap();
    let run = Run::from(out);
    run.assert_code(1)
        .assert_stdout(&[
            "boom (1)",
            "boom (2)",
            "kiln panicked while running this job: KILN_TEST_PANIC_IN_JOB: job boom panics",
            "after ran, boom was failure",
        ])
        .assert_no_stdout(&["a step of a panicking job must not run"]);
    let panics = run.stdout.matches("kiln panicked while running this job").count();
    assert_eq!(panics, 2, "{}", run.show());
    let failed = run.stdout.lines().filter(|l| l.contains("boom (") && l.contains("(failure)"));
    assert_eq!(failed.count(), 2, "{}", run.show());
    // The environments were removed by this run (nothing collects them at its end).
    let left = entries(root.path());
    assert!(left.is_empty(), "environments left behind: {left:?}\n{}", run.show());
}
