//! Daemon mode against the strict fake Forgejo server: register, then `kiln daemon` runs queued
//! jobs on the host plugin and reports every row, step state and output; failures, cancelling
//! from the server, capacity, SIGTERM draining, a server outage, and a standalone plugin
//! (`endpoint: unix://…`) restarted between jobs, reconnected without restarting the daemon.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fake_forgejo::{FakeForgejo, JobSpec, REGISTRATION_TOKEN};
use crate::support::{kiln_bin, processes_with, wait_for};

/// A registered runner in a temporary directory, with its config.
struct Runner {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Runner {
    /// Writes a config (`extra` is added under `runner:`) and registers with `kiln register`.
    fn register(fake: &FakeForgejo, extra: &str) -> Runner {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("config.yaml");
        let text = format!(
            "runner:\n  file: {}\n  fetch_interval: 200ms\n  report_interval: 300ms\n  labels: [ubuntu-latest:host]\n{extra}",
            dir.path().join(".runner").display()
        );
        std::fs::write(&config, text).expect("write config");
        let runner = Runner { dir, config };
        let out = runner
            .kiln()
            .args(["register", "--instance", fake.url(), "--token", REGISTRATION_TOKEN])
            .args(["--name", "e2e-runner", "--labels", "ubuntu-latest:host", "--no-interactive"])
            .arg("-c")
            .arg(&runner.config)
            .output()
            .expect("kiln register");
        assert!(out.status.success(), "register failed: {}", String::from_utf8_lossy(&out.stderr));
        runner
    }

    fn kiln(&self) -> Command {
        let mut cmd = Command::new(kiln_bin());
        cmd.current_dir(self.dir.path())
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("KILN_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `kiln daemon -c config`, its stderr in `daemon.log`.
    fn daemon(&self) -> Daemon {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).expect("log file");
        let child = self
            .kiln()
            .arg("daemon")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kiln daemon");
        Daemon { child: Some(child), log: self.dir.path().join("daemon.log") }
    }
}

struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().map(|c| c.id()).expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    /// Waits up to `secs` for the daemon to exit; its exit code.
    fn wait(&mut self, secs: u64) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not exit within {secs}s\n{}", self.log());
    }

    fn stop(&mut self) {
        if self.child.is_some() {
            self.signal(nix::sys::signal::Signal::SIGTERM);
            let code = self.wait(30);
            assert_eq!(code, Some(0), "daemon exit\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const HAPPY: &str = r#"
name: ci
on: push
jobs:
  build:
    name: build
    runs-on: ubuntu-latest
    needs: [setup]
    outputs:
      greeting: ${{ steps.g.outputs.greeting }}
    steps:
      - name: hello
        run: |
          echo "hello from step 0"
          echo "::group::details"
          echo "inside the group"
          echo "::endgroup::"
      - id: g
        run: echo "greeting=hi there" >> "$GITHUB_OUTPUT"
      - run: echo "token=${{ secrets.GITHUB_TOKEN }} secret=$MY_SECRET"
        env:
          MY_SECRET: ${{ secrets.MY_SECRET }}
      - if: failure()
        run: echo never
      - run: echo "needs=${{ needs.setup.outputs.v }}/${{ needs.setup.result }} var=${{ vars.COLOR }} gitea=$GITEA_ACTIONS forgejo=$FORGEJO_ACTIONS runtime=$ACTIONS_RUNTIME_URL repo=${{ github.repository }}"
"#;

#[test]
fn daemon_runs_a_job_and_reports_rows_steps_and_outputs() {
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let runners = fake.runners();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].labels, ["ubuntu-latest"]);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runner.dir.path().join(".runner")).unwrap())
            .unwrap();
    assert_eq!(file["uuid"], json!(runners[0].uuid));
    assert_eq!(file["address"], json!(fake.url()));

    let mut spec = JobSpec::new(HAPPY, 5);
    spec.secrets.insert("MY_SECRET".into(), "s3cr3t-value".into());
    spec.vars.insert("COLOR".into(), "blue".into());
    spec.needs = json!({"setup": {"outputs": {"v": "42"}, "result": "RESULT_SUCCESS"}});
    let job = fake.enqueue(spec);
    let mut daemon = runner.daemon();
    let task = fake.wait_finished(job, 60);
    assert!(fake.runners()[0].declared, "the daemon declares itself");
    assert_eq!(fake.calls("Declare"), 1);

    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    assert_eq!(task.step_results(), ["success", "success", "success", "skipped", "success"]);
    assert!(task.rows[0].contains("received task"), "{}", task.log());
    assert_eq!(
        task.step_rows(0),
        ["hello from step 0", "##[group]details", "inside the group", "##[endgroup]"],
        "{task:#?}"
    );
    let step2 = task.step_rows(2).join("\n");
    assert!(step2.contains("token=*** secret=***"), "{step2}");
    assert!(!task.log().contains(&task.token) && !task.log().contains("s3cr3t-value"));
    let step4 = task.step_rows(4).join("\n");
    let expected = format!(
        "needs=42/success var=blue gitea=true forgejo=true runtime={}/api/actions_pipeline/ repo=acme/widgets",
        fake.url()
    );
    assert!(step4.contains(&expected), "{step4}\nwanted {expected}");
    assert_eq!(task.step_rows(3), Vec::<String>::new());
    assert_eq!(task.outputs, [("greeting".to_owned(), "hi there".to_owned())]);
    assert!(task.archived && task.stopped.is_some() && task.started.is_some());
    assert_eq!(task.rows.last().map(String::as_str), Some("Job succeeded"));
    // Step ranges are contiguous and in order.
    let mut next = 0;
    for s in &task.steps {
        assert!(s.log_index >= next, "{task:#?}");
        next = s.log_index + s.log_length;
    }
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn daemon_reports_a_failing_job() {
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let job = fake.enqueue(JobSpec::new(
        r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    outputs:
      x: never-sent
    steps:
      - run: echo "first"
      - run: |
          echo "about to fail"
          exit 3
      - if: failure()
        run: echo "failure handler ran"
      - run: echo "must not run"
"#,
        4,
    ));
    let mut daemon = runner.daemon();
    let task = fake.wait_finished(job, 60);
    assert_eq!(task.short_result(), "failure", "{}", task.log());
    assert_eq!(task.step_results(), ["success", "failure", "success", "skipped"]);
    assert!(task.step_rows(1).iter().any(|r| r == "about to fail"));
    assert!(task.step_rows(2).iter().any(|r| r == "failure handler ran"));
    assert!(!task.log().contains("must not run"));
    assert!(task.outputs.is_empty());
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn daemon_cancels_a_job_the_server_cancelled() {
    let marker = format!("kiln-e2e-daemon-cancel-{}", std::process::id());
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let job = fake.enqueue(JobSpec::new(
        &format!(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "step started"
          exec -a {marker} sleep 300
      - if: always()
        run: echo "cleanup ran"
      - run: echo "must not run"
"#
        ),
        3,
    ));
    let mut daemon = runner.daemon();
    fake.wait_row(job, "step started", 60);
    let cancelled_at = Instant::now();
    fake.cancel(job);
    let task = fake.wait_finished(job, 60);
    assert!(cancelled_at.elapsed() < Duration::from_secs(30), "cancelling took too long");
    assert_eq!(task.short_result(), "cancelled");
    assert!(task.rows.iter().any(|r| r == "cleanup ran"), "{}", task.log());
    assert!(!task.log().contains("must not run"));
    assert!(
        wait_for(10, || processes_with(&marker).is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    // The daemon carries on: the next job runs.
    let next = fake.enqueue(JobSpec::new(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo next\n",
        1,
    ));
    assert_eq!(fake.wait_finished(next, 60).short_result(), "success", "{}", daemon.log());
    daemon.stop();
}

#[test]
fn daemon_runs_eight_jobs_four_at_a_time() {
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "  capacity: 4\n");
    let jobs: Vec<i64> = (0..8)
        .map(|i| {
            fake.enqueue(JobSpec::new(
                &format!(
                    "on: push\njobs:\n  j{i}:\n    runs-on: ubuntu-latest\n    steps:\n      - run: sleep 1\n      - run: echo job-{i}\n"
                ),
                2,
            ))
        })
        .collect();
    let mut daemon = runner.daemon();
    for (i, job) in jobs.iter().enumerate() {
        let task = fake.wait_finished(*job, 120);
        assert_eq!(task.short_result(), "success", "{}", task.log());
        assert_eq!(task.step_rows(1), [format!("job-{i}")]);
    }
    let peak = fake.peak_running();
    assert!((2..=4).contains(&peak), "peak concurrency {peak}, wanted 2..=4");
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn sigterm_lets_the_running_job_finish_and_report() {
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "  shutdown_timeout: 60s\n");
    let job = fake.enqueue(JobSpec::new(
        r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "working"
          sleep 2
          echo "done working"
"#,
        1,
    ));
    let mut daemon = runner.daemon();
    fake.wait_row(job, "working", 60);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    // Queued after the signal: must not be taken.
    let late = fake.enqueue(JobSpec::new(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo late\n",
        1,
    ));
    let code = daemon.wait(60);
    assert_eq!(code, Some(0), "{}", daemon.log());
    let task = fake.task_of(job).expect("task");
    assert!(task.finished(), "{task:#?}");
    assert_eq!(task.short_result(), "success", "{}", task.log());
    assert!(task.rows.iter().any(|r| r == "done working"));
    assert!(fake.task_of(late).is_none(), "a job was taken after SIGTERM");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn a_server_outage_mid_job_loses_nothing() {
    // The server is away for 30 s (refused connections): the job finishes meanwhile, its logs,
    // steps and outputs wait, and all arrive once the server is back.
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let job = fake.enqueue(JobSpec::new(
        r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    outputs:
      n: ${{ steps.count.outputs.n }}
    steps:
      - id: count
        run: |
          for i in $(seq 1 30); do echo "line $i"; sleep 0.2; done
          echo "n=30" >> "$GITHUB_OUTPUT"
      - run: echo "after the outage"
"#,
        2,
    ));
    let mut daemon = runner.daemon();
    fake.wait_row(job, "line 2", 60);
    fake.set_down(true);
    std::thread::sleep(Duration::from_secs(30));
    fake.set_down(false);
    let task = fake.wait_finished(job, 120);
    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    let expected: Vec<String> = (1..=30).map(|i| format!("line {i}")).collect();
    assert_eq!(task.step_rows(0), expected);
    assert_eq!(task.step_rows(1), ["after the outage"]);
    assert_eq!(task.outputs, [("n".to_owned(), "30".to_owned())]);
    assert!(daemon.log().contains("failed"), "the outage was not noticed:\n{}", daemon.log());
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn create_runner_file_and_generate_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, format!("runner:\n  file: {}\n", dir.path().join("r.json").display()))
        .unwrap();
    let out = Command::new(kiln_bin())
        .args(["create-runner-file", "--instance", "https://f.example/", "--name", "n"])
        .args(["--secret", "0123456789abcdef0123456789abcdef01234567", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(file["uuid"], "30313233-3435-3637-3839-616263646566");
    assert_eq!(file["address"], "https://f.example");
    let out = Command::new(kiln_bin()).arg("generate-config").output().unwrap();
    assert!(out.status.success());
    let generated = dir.path().join("generated.yaml");
    std::fs::write(&generated, &out.stdout).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("capacity:"));
    // An unknown key is an error naming it.
    std::fs::write(&config, "runner:\n  capacty: 2\n").unwrap();
    let out = Command::new(kiln_bin()).args(["daemon", "-c"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("c.yaml") && err.contains("capacty"), "{err}");
}

#[test]
fn the_fake_server_is_strict_and_the_client_speaks_its_protocol() {
    use kiln_runner::forgejo::client::Client;
    use kiln_runner::forgejo::types::{self, *};
    let fake = FakeForgejo::start();
    let secs = Duration::from_secs(5);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let job = rt.block_on(async {
        let anon = Client::new(fake.url(), "", "", secs).unwrap();
        assert_eq!(anon.ping("kiln").await.unwrap().data, "Hello, kiln!");
        let bad = RegisterRequest { name: "r".into(), token: "nope".into(), ..Default::default() };
        let err = anon.register(&bad).await.unwrap_err();
        assert_eq!(err.code(), "invalid_argument", "{err}");
        let good = RegisterRequest {
            name: "r".into(),
            token: REGISTRATION_TOKEN.into(),
            labels: vec!["ubuntu-latest".into()],
            ..Default::default()
        };
        let runner = anon.register(&good).await.unwrap().runner.unwrap();
        let err = anon.declare(&DeclareRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), "unauthenticated");
        let c = Client::new(fake.url(), &runner.uuid, &runner.token, secs).unwrap();
        let fetch = |v: i64| FetchTaskRequest { tasks_version: v, task_capacity: Some(2) };

        // The tasks_version gate.
        let r = c.fetch_task(&fetch(0), "k1", secs).await.unwrap();
        assert!(r.task.is_none());
        assert_eq!(r.tasks_version, 1);
        let job = fake.enqueue(JobSpec::new(
            "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n",
            1,
        ));
        let r = c.fetch_task(&fetch(2), "k2", secs).await.unwrap();
        assert!(r.task.is_none(), "a runner at the latest version gets no task");
        assert_eq!(r.tasks_version, 2);
        let r = c.fetch_task(&fetch(1), "k3", secs).await.unwrap();
        let task = r.task.expect("a task");
        assert!(r.additional_tasks.is_empty());
        assert_eq!(task.workflow_payload.first(), Some(&b'o'));
        let again = c.fetch_task(&fetch(1), "k3", secs).await.unwrap();
        assert_eq!((again.task.map(|t| t.id), again.tasks_version), (Some(task.id), 0));

        // The ack arithmetic.
        let log = |index: i64, rows: &[&str], no_more: bool| UpdateLogRequest {
            task_id: task.id,
            index,
            rows: rows
                .iter()
                .map(|s| LogRow { time: types::now(), content: (*s).to_owned() })
                .collect(),
            no_more,
        };
        let ack = |r: UpdateLogResponse| r.ack_index;
        assert_eq!(ack(c.update_log(&log(0, &["a", "b"], false)).await.unwrap()), 2);
        assert_eq!(ack(c.update_log(&log(1, &["b", "c"], false)).await.unwrap()), 3);
        assert_eq!(ack(c.update_log(&log(5, &["gap"], false)).await.unwrap()), 3);
        assert_eq!(ack(c.update_log(&log(0, &["a"], true)).await.unwrap()), 3, "no archive");
        assert_eq!(ack(c.update_log(&log(3, &["d"], true)).await.unwrap()), 4);
        let err = c.update_log(&log(4, &["e"], false)).await.unwrap_err();
        assert_eq!(err.code(), "already_exists");

        // Outputs: first value wins; a done task ignores updates.
        let update = |result: TaskResult, k: &str, v: &str| UpdateTaskRequest {
            state: TaskState {
                id: task.id,
                result,
                stopped_at: (result != TaskResult::Unspecified).then(types::now),
                ..TaskState::default()
            },
            outputs: [(k.to_owned(), v.to_owned())].into(),
        };
        let r = c.update_task(&update(TaskResult::Unspecified, "k", "1")).await.unwrap();
        assert_eq!(r.sent_outputs, ["k"]);
        assert_eq!(r.state.map(|s| s.result), Some(TaskResult::Unspecified));
        c.update_task(&update(TaskResult::Unspecified, "k", "2")).await.unwrap();
        let r = c.update_task(&update(TaskResult::Failure, "x", "1")).await.unwrap();
        assert_eq!(r.state.map(|s| s.result), Some(TaskResult::Failure));
        let r = c.update_task(&update(TaskResult::Success, "y", "1")).await.unwrap();
        assert_eq!(r.state.map(|s| s.result), Some(TaskResult::Failure), "done tasks stay done");

        // Another runner cannot touch the task.
        let other = anon.register(&good).await.unwrap().runner.unwrap();
        let o = Client::new(fake.url(), &other.uuid, &other.token, secs).unwrap();
        let err = o.update_log(&log(4, &["e"], false)).await.unwrap_err();
        assert_eq!(err.code(), "internal");
        job
    });
    let t = fake.task_of(job).unwrap();
    assert_eq!(t.rows, ["a", "b", "c", "d"]);
    assert_eq!(t.outputs, [("k".to_owned(), "1".to_owned()), ("x".to_owned(), "1".to_owned())]);
    assert_eq!(t.short_result(), "failure");
    assert!(t.archived);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn a_job_over_runner_timeout_is_cancelled_with_forgejo_runners_last_line() {
    let marker = format!("kiln-e2e-daemon-timeout-{}", std::process::id());
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "  timeout: 2s\n");
    let job = fake.enqueue(JobSpec::new(
        &format!(
            "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: exec -a {marker} sleep 300\n      - run: echo never\n"
        ),
        2,
    ));
    let mut daemon = runner.daemon();
    let task = fake.wait_finished(job, 60);
    assert_eq!(task.short_result(), "cancelled", "{}", task.log());
    assert_eq!(task.step_results(), ["cancelled", "skipped"]);
    assert_eq!(
        task.rows.last().map(String::as_str),
        Some("The runner cancelled the job because it exceeds the maximum run time")
    );
    assert!(wait_for(10, || processes_with(&marker).is_empty()), "{:?}", processes_with(&marker));
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn one_job_runs_one_task_and_exits() {
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let first = fake.enqueue(JobSpec::new(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo one\n",
        1,
    ));
    let second = fake.enqueue(JobSpec::new(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo two\n",
        1,
    ));
    // A server older than Declare: kiln carries on.
    fake.set_old_server(true);
    let out = runner.kiln().args(["one-job", "-c"]).arg(&runner.config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "job success\n");
    let task = fake.task_of(first).expect("the first job was taken");
    assert!(task.finished() && task.rows.iter().any(|r| r == "one"), "{task:#?}");
    assert!(fake.task_of(second).is_none(), "one-job took a second job");
    assert!(!fake.runners()[0].declared && fake.calls("Declare") == 1);
    // A server without FetchSingleTask: --handle fails with a clear message.
    let out = runner
        .kiln()
        .args(["one-job", "--handle", "abc", "-c"])
        .arg(&runner.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no FetchSingleTask"), "{stderr}");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

/// `kiln plugin host` run by the test itself on a unix socket (the standalone shape); killed
/// by its PID when dropped.
struct StandalonePlugin {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
    log: PathBuf,
}

impl StandalonePlugin {
    /// Starts the plugin on `socket` with `root`, its stderr appended to `log`, and waits for
    /// the socket to appear.
    fn start(socket: PathBuf, root: PathBuf, log: PathBuf) -> StandalonePlugin {
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("plugin log");
        let child = Command::new(kiln_bin())
            .args(["plugin", "host", "--root"])
            .arg(&root)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .env("KILN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("kiln plugin host");
        let plugin = StandalonePlugin { child, socket, root, log };
        assert!(
            wait_for(20, || std::os::unix::net::UnixStream::connect(&plugin.socket).is_ok()),
            "the standalone plugin does not listen on {}:\n{}",
            plugin.socket.display(),
            plugin.log()
        );
        plugin
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL by PID, then reaps it.
    fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the plugin");
        let _ = self.child.wait();
    }

    /// Kills this instance and starts another on the same socket and root.
    fn restart(mut self) -> StandalonePlugin {
        self.kill();
        let (socket, root, log) = (self.socket.clone(), self.root.clone(), self.log.clone());
        drop(self);
        StandalonePlugin::start(socket, root, log)
    }
}

impl Drop for StandalonePlugin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

#[test]
fn a_standalone_plugin_restarted_between_jobs_is_reconnected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("envs");
    let plugin = StandalonePlugin::start(
        tmp.path().join("p.sock"),
        root.clone(),
        tmp.path().join("plugin.log"),
    );
    let fake = FakeForgejo::start();
    // `ubuntu-latest:host`, with `host` being this standalone plugin instead of the embedded one.
    let runner = Runner::register(
        &fake,
        &format!("plugins:\n  host:\n    endpoint: unix://{}\n", plugin.socket.display()),
    );
    let job = |n: u32| {
        JobSpec::new(
            &format!(
                "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo \"job-{n} in $PWD\"\n"
            ),
            1,
        )
    };
    let mut daemon = runner.daemon();
    let root = root.display().to_string();

    let first = fake.wait_finished(fake.enqueue(job(1)), 60);
    assert_eq!(first.short_result(), "success", "{}\n{}", first.log(), daemon.log());
    let row = first.step_rows(0).join("\n");
    assert!(row.contains(&format!("job-1 in {root}")), "not run by the standalone plugin: {row}");

    let plugin = plugin.restart();
    let second = fake.wait_finished(fake.enqueue(job(2)), 60);
    assert_eq!(
        second.short_result(),
        "success",
        "{}\n--- daemon\n{}\n--- plugin\n{}",
        second.log(),
        daemon.log(),
        plugin.log()
    );
    let row = second.step_rows(0).join("\n");
    assert!(row.contains(&format!("job-2 in {root}")), "not run by the standalone plugin: {row}");

    // The same daemon process served both: it noticed the new instance id and carried on.
    let child = daemon.child.as_mut().expect("the daemon handle");
    assert!(child.try_wait().unwrap().is_none(), "the daemon exited\n{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("plugin restarted"), "the instance-id change was not noticed:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn daemon_runs_actions_checkout_as_a_real_action_from_the_default_actions_url() {
    // A stand-in for actions/checkout, served by a local git server at the task's default
    // actions URL: in daemon mode the action really runs (no local-checkout shortcut).
    let server = crate::actions::GitServer::start();
    server.publish(
        "actions/checkout",
        &[
            (
                "action.yml",
                "name: checkout\ninputs:\n  ref:\n    default: ${{ github.sha }}\nruns:\n  using: node20\n  main: index.js\n",
            ),
            (
                "index.js",
                "console.log(`stand-in checkout of ${process.env.GITHUB_REPOSITORY} at ${process.env.INPUT_REF}`);\nrequire('fs').writeFileSync(process.env.GITHUB_WORKSPACE + '/checked-out', 'yes');\n",
            ),
        ],
        "v4",
    );
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let wf = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n      - run: cat checked-out\n";
    let mut spec = JobSpec::new(wf, 2);
    spec.actions_url = server.url();
    let job = fake.enqueue(spec);
    let mut daemon = runner.daemon();
    let task = fake.wait_finished(job, 60);
    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    let step0 = task.step_rows(0).join("\n");
    assert!(
        step0.contains(
            "stand-in checkout of acme/widgets at 0123456789abcdef0123456789abcdef01234567"
        ),
        "{step0}"
    );
    assert_eq!(task.step_rows(1), ["yes"], "{}", task.log());
    daemon.stop();
}

#[test]
fn daemon_runs_a_local_reusable_workflow_from_the_repository_at_the_runs_commit() {
    // The run's repository (acme/widgets) is served by a local git server standing in for the
    // instance: the called workflow is read at the run's commit, not from any workspace.
    let server = crate::actions::GitServer::start();
    let sha = server.publish(
        "acme/widgets",
        &[(".github/workflows/called.yml", crate::actions::CALLED)],
        "main",
    );
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let wf = "on: push\njobs:\n  call:\n    uses: ./.github/workflows/called.yml\n    with:\n      name: daemon\n    secrets:\n      token: s3cr3t-value\n";
    let mut spec = JobSpec::new(wf, 0);
    spec.repository_at = Some((server.url(), sha));
    let job = fake.enqueue(spec);
    let mut daemon = runner.daemon();
    let task = fake.wait_finished(job, 60);
    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    let log = task.log();
    assert!(log.contains("called with daemon loud=false count=2 event=push"), "{log}");
    assert!(log.contains("token is ***") && !log.contains("s3cr3t-value"), "{log}");
    assert_eq!(
        task.outputs,
        [
            ("result".to_owned(), "success".to_owned()),
            ("shout".to_owned(), "HELLO-daemon".to_owned())
        ]
    );
    daemon.stop();
}

/// Forgejo Runner's own config.example.yaml, unchanged, and a `.runner` in Forgejo Runner's
/// format (its key order, indent and warning text): `kiln daemon` takes both as they are and
/// runs a job with the config's `envs` and `env_file`.
#[test]
fn forgejo_runners_example_config_and_runner_file_drive_the_daemon() {
    let fake = FakeForgejo::start();
    // Credentials from the fake, then the file rewritten as forgejo-runner writes it.
    let registered = Runner::register(&fake, "");
    let reg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(registered.dir.path().join(".runner")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runner_file = format!(
        "{{\n  \"WARNING\": \"This file is automatically generated by forgejo-runner. Do not edit it manually unless you know what you are doing. Removing this file will cause act runner to re-register as a new runner.\",\n  \"id\": {},\n  \"uuid\": {},\n  \"name\": \"forgejo-runner-1\",\n  \"token\": {},\n  \"address\": \"{}/\",\n  \"labels\": [\n    \"ubuntu-latest:host\"\n  ]\n}}\n",
        reg["id"],
        reg["uuid"],
        reg["token"],
        fake.url().trim_end_matches('/'),
    );
    std::fs::write(dir.path().join(".runner"), &runner_file).unwrap();
    let example = crate::support::repo_root().join("tests/forgejo-runner/config.example.yaml");
    std::fs::copy(&example, dir.path().join("config.yaml")).unwrap();
    std::fs::write(dir.path().join(".env"), "FROM_ENV_FILE=from-the-env-file\n").unwrap();
    let runner = Runner { config: dir.path().join("config.yaml"), dir };
    let job = fake.enqueue(JobSpec::new(
        r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: echo "envs $A_TEST_ENV_NAME_1 $A_TEST_ENV_NAME_2 $FROM_ENV_FILE"
"#,
        1,
    ));
    let mut daemon = runner.daemon();
    let task = fake.wait_finished(job, 60);
    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    assert!(
        task.step_rows(0)
            .iter()
            .any(|r| r == "envs a_test_env_value_1 a_test_env_value_2 from-the-env-file"),
        "{}",
        task.log()
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
    // The file is left as forgejo-runner wrote it.
    assert_eq!(std::fs::read_to_string(runner.dir.path().join(".runner")).unwrap(), runner_file);
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn daemon_serves_healthz_and_prometheus_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, &format!("metrics:\n  listen: 127.0.0.1:{port}\n"));
    let ok = fake.enqueue(JobSpec::new(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo fine\n",
        1,
    ));
    let bad = fake.enqueue(JobSpec::new(
        "on: push\njobs:\n  b:\n    runs-on: ubuntu-latest\n    steps:\n      - run: exit 1\n",
        1,
    ));
    let mut daemon = runner.daemon();
    fake.wait_finished(ok, 60);
    fake.wait_finished(bad, 60);
    assert!(
        wait_for(10, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "{}",
        daemon.log()
    );
    let health = http_get(port, "/healthz");
    assert!(health.starts_with("HTTP/1.0 200") && health.ends_with("ok\n"), "{health}");
    // The finished counters are updated after the final report: wait for both.
    let mut metrics = String::new();
    let counted = wait_for(10, || {
        metrics = http_get(port, "/metrics");
        metrics.contains("kiln_jobs_finished_total{result=\"failure\"} 1")
            && metrics.contains("kiln_jobs_finished_total{result=\"success\"} 1")
    });
    assert!(counted, "{metrics}");
    for needle in [
        "kiln_jobs_running 0",
        "kiln_capacity 1",
        "kiln_job_duration_seconds_count 2",
        "kiln_step_duration_seconds_count",
        "kiln_fetch_errors_total 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    assert!(http_get(port, "/nope").starts_with("HTTP/1.0 404"));
    daemon.stop();
}

/// The probe job of the cache test: the bundled `@actions/cache` client as a local action,
/// written into the workspace by a `run:` step (the host backend sees the host's files).
fn cache_job(bundle: &std::path::Path, op: &str) -> String {
    format!(
        r#"on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "cache-url=${{ACTIONS_CACHE_URL:+set}} mode=$ACTIONS_CACHE_MODE"
          mkdir -p .github/actions/probe
          cp {bundle} .github/actions/probe/index.mjs
          printf 'name: probe\nruns:\n  using: node20\n  main: index.mjs\n' > .github/actions/probe/action.yml
      - uses: ./.github/actions/probe
        env:
          INPUT_OP: {op}
          INPUT_KEY: daemon-key
          INPUT_CONTENT: from-the-first-job
"#,
        bundle = bundle.display()
    )
}

#[test]
fn daemon_gives_jobs_a_cache_and_a_second_job_hits_the_first_jobs_entry() {
    let Some(bundle) = crate::services::probe_bundle("daemon::daemon_gives_jobs_a_cache") else {
        return;
    };
    let fake = FakeForgejo::start();
    let runner = Runner::register(&fake, "");
    let mut daemon = runner.daemon();
    let first = fake.enqueue(JobSpec::new(&cache_job(&bundle, "cache-save"), 2));
    let task = fake.wait_finished(first, 120);
    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    assert!(task.log().contains("cache-url=set mode=write"), "{}", task.log());
    assert!(task.log().contains("Cache saved successfully"), "{}", task.log());
    let second = fake.enqueue(JobSpec::new(&cache_job(&bundle, "cache-restore"), 2));
    let task = fake.wait_finished(second, 120);
    assert_eq!(task.short_result(), "success", "{}\n{}", task.log(), daemon.log());
    assert!(
        task.log().contains("restored: daemon-key content: from-the-first-job"),
        "{}",
        task.log()
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    daemon.stop();
}

#[test]
fn two_runners_share_one_kiln_cache_server() {
    let Some(bundle) =
        crate::services::probe_bundle("daemon::two_runners_share_one_kiln_cache_server")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let secret = "a-shared-secret-of-32-characters";
    std::fs::write(tmp.path().join("secret"), secret).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = crate::services::CacheServer::start(
        &tmp.path().join("cache"),
        &tmp.path().join("secret"),
        port,
    );
    let cache = format!("cache:\n  external_server: http://127.0.0.1:{port}\n  secret: {secret}\n");
    let fake = FakeForgejo::start();
    let (a, b) = (Runner::register(&fake, &cache), Runner::register(&fake, &cache));
    let mut daemon = a.daemon();
    let first = fake.enqueue(JobSpec::new(&cache_job(&bundle, "cache-save"), 2));
    let task = fake.wait_finished(first, 120);
    assert!(task.log().contains("Cache saved successfully"), "{}\n{}", task.log(), daemon.log());
    daemon.stop();
    let mut daemon = b.daemon();
    let second = fake.enqueue(JobSpec::new(&cache_job(&bundle, "cache-restore"), 2));
    let task = fake.wait_finished(second, 120);
    assert!(
        task.log().contains("restored: daemon-key content: from-the-first-job"),
        "{}\n{}",
        task.log(),
        daemon.log()
    );
    daemon.stop();
}
