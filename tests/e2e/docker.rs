//! `kiln exec` on the Docker backend (`kiln plugin docker`) against a real engine, with the
//! local test image `kiln-test/busybox:1` that `tests/docker/setup.sh` builds.
//!
//! Without a usable engine the tests do not run and say why (`tests/run` lists them at the
//! end), unless `KILN_REQUIRE_DOCKER=1` (set by `.ci/run`), which makes a missing engine a
//! failure. Every test checks that nothing
//! labelled with its runner id (`dev.kiln.runner-id`) is left: containers, networks, volumes.

use std::process::Command;

use crate::support::{Repo, kiln_bin};

/// The test image.
pub(crate) const IMAGE: &str = "kiln-test/busybox:1";

/// Whether the engine and the test image are there; panics when they are not and
/// `KILN_REQUIRE_DOCKER=1`, else records the test as not run (`support::prerequisite`).
pub(crate) fn docker_ready(test: &str) -> bool {
    let problem = match Command::new("docker").args(["image", "inspect", IMAGE]).output() {
        Err(e) => Some(format!("the docker client cannot run: {e}")),
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "docker cannot inspect {IMAGE} (run tests/docker/setup.sh): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    };
    crate::support::prerequisite(test, "docker", problem)
}

/// Panics when any container, network or volume carries `dev.kiln.runner-id=<runner_id>`.
pub(crate) fn assert_nothing_left(runner_id: &str) {
    let filter = format!("label=dev.kiln.runner-id={runner_id}");
    for what in [
        vec!["ps", "-aq", "--filter", &filter],
        vec!["network", "ls", "-q", "--filter", &filter],
        vec!["volume", "ls", "-q", "--filter", &filter],
    ] {
        let out = Command::new("docker").args(&what).output().expect("running docker");
        assert!(out.status.success(), "docker {what:?} failed");
        let left = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(left.is_empty(), "docker {} left behind for runner {runner_id}: {left}", what[0]);
    }
}

/// The runner id `kiln exec` used in `repo`'s private state directory.
pub(crate) fn runner_id(repo: &Repo) -> String {
    let file = repo.state.path().join("kiln/runner-id");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
        .trim()
        .to_owned()
}

fn exec_on_docker(repo: &Repo) -> crate::support::Run {
    let plugin = format!("docker={} plugin docker", kiln_bin());
    repo.exec(&["-P", &format!("ubuntu-latest=docker://{IMAGE}"), "--plugin", &plugin])
}

const RUN_ONLY: &str = r#"
name: docker
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - id: one
        run: |
          test -x /bin/busybox && echo "in-busybox-image"
          echo "workspace=$PWD"
          echo "v=42" >> "$GITHUB_OUTPUT"
          echo "FOO=bar" >> "$GITHUB_ENV"
          mkdir -p "$RUNNER_TEMP/tools" && printf '#!/bin/sh\necho tool-ran\n' > "$RUNNER_TEMP/tools/kiln-tool"
          chmod +x "$RUNNER_TEMP/tools/kiln-tool" && echo "$RUNNER_TEMP/tools" >> "$GITHUB_PATH"
      - run: echo "got ${{ steps.one.outputs.v }} FOO=$FOO" && kiln-tool
      - run: exit 3
        continue-on-error: true
      - name: a step past its timeout is stopped with its background children
        run: |
          sleep 300 &
          echo $! > "$RUNNER_TEMP/bg.pid"
          sleep 300
        timeout-minutes: 0.05
        continue-on-error: true
      - run: |
          pid=$(cat "$RUNNER_TEMP/bg.pid")
          if kill -0 "$pid" 2>/dev/null; then echo "still-alive $pid"; exit 1; fi
          echo "tree-gone"
"#;

#[test]
fn run_only_workflow_runs_in_a_docker_image() {
    if !docker_ready("run_only_workflow_runs_in_a_docker_image") {
        return;
    }
    let repo = Repo::with_workflow("docker.yml", RUN_ONLY);
    let run = exec_on_docker(&repo);
    run.assert_code(0).assert_stdout(&[
        "in-busybox-image",
        "workspace=/github/workspace",
        "got 42 FOO=bar",
        "tool-ran",
        "tree-gone",
        "Workflow success",
    ]);
    assert_nothing_left(&runner_id(&repo));
}

const FAILING: &str = r#"
name: docker-failure
on: push
jobs:
  fail:
    runs-on: ubuntu-latest
    steps:
      - run: |
          sleep 300 &
          echo "leaving a background process"
      - run: echo "about to fail" && exit 7
      - run: echo "never-$((40 + 2))"
"#;

#[test]
fn a_failing_job_on_docker_fails_and_leaves_nothing() {
    if !docker_ready("a_failing_job_on_docker_fails_and_leaves_nothing") {
        return;
    }
    let repo = Repo::with_workflow("fail.yml", FAILING);
    let run = exec_on_docker(&repo);
    run.assert_code(1)
        .assert_stdout(&["leaving a background process", "about to fail"])
        .assert_no_stdout(&["never-42"]);
    assert_nothing_left(&runner_id(&repo));
}

#[test]
fn a_missing_image_is_a_clear_error() {
    if !docker_ready("a_missing_image_is_a_clear_error") {
        return;
    }
    let repo = Repo::with_workflow(
        "missing.yml",
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo hi\n",
    );
    let plugin = format!("docker={} plugin docker", kiln_bin());
    let run = repo.exec(&[
        "-P",
        "ubuntu-latest=docker://kiln-test/does-not-exist:0",
        "--plugin",
        &plugin,
    ]);
    assert_ne!(run.code, Some(0), "{}", run.show());
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("kiln-test/does-not-exist:0"), "the error names no image\n{}", run.show());
    assert_nothing_left(&runner_id(&repo));
}

const JOB_CONTAINER_AND_SERVICE: &str = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    container:
      image: kiln-test/busybox:1
      env:
        FROM_CONTAINER: yes-${{ github.event_name }}
    services:
      web:
        image: kiln-test/httpd:1
        ports: ["8080"]
    steps:
      - run: echo "service says $(wget -q -O- http://web:8080/)"
      - run: echo "published ${{ job.services.web.ports['8080'] }} container ${{ job.container.id }}"
      - run: echo "env $FROM_CONTAINER in $PWD"
"#;

#[test]
fn job_container_reaches_a_healthy_service_by_its_alias() {
    if !docker_ready("job_container_reaches_a_healthy_service_by_its_alias") {
        return;
    }
    let repo = Repo::with_workflow("svc.yml", JOB_CONTAINER_AND_SERVICE);
    let run = exec_on_docker(&repo);
    run.assert_code(0).assert_stdout(&[
        "starting service web (kiln-test/httpd:1)",
        "service says service-ok",
        "env yes-push in /github/workspace",
    ]);
    let published = run
        .stdout
        .lines()
        .find_map(|l| l.split("  published ").nth(1))
        .unwrap_or_default()
        .to_owned();
    let port = published.split_whitespace().next().unwrap_or("");
    assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "no published port: {}", run.show());
    assert_nothing_left(&runner_id(&repo));
}

const DOCKER_URI_STEP: &str = r#"
on: push
jobs:
  d:
    runs-on: ubuntu-latest
    env:
      JOB_VAR: job-level
    steps:
      - id: uri
        uses: docker://kiln-test/busybox:1
        env:
          STEP_VAR: step-level
        with:
          entrypoint: /bin/sh
          args: -c "echo \"uri-args $JOB_VAR $STEP_VAR $INPUT_GREETING in $PWD\"; echo from_uri=yes >> $GITHUB_OUTPUT; echo URI_ENV=carried >> $GITHUB_ENV"
          greeting: hello
      - uses: docker://kiln-test/busybox:1
        with:
          args: echo image-default-entrypoint "two words"
      - run: echo "uri output ${{ steps.uri.outputs.from_uri }} env $URI_ENV"
"#;

#[test]
fn a_docker_uri_step_runs_its_image_with_args_env_and_env_files() {
    if !docker_ready("a_docker_uri_step_runs_its_image_with_args_env_and_env_files") {
        return;
    }
    let repo = Repo::with_workflow("uri.yml", DOCKER_URI_STEP);
    let run = exec_on_docker(&repo);
    run.assert_code(0).assert_stdout(&[
        "uri-args job-level step-level hello in /github/workspace",
        "image-default-entrypoint two words",
        "uri output yes env carried",
        "Workflow success",
    ]);
    assert_nothing_left(&runner_id(&repo));
}

const DOCKER_ACTION_WORKFLOW: &str = r#"
on: push
jobs:
  d:
    runs-on: ubuntu-latest
    steps:
      - id: greet
        uses: ./.github/actions/greet
        with:
          who: world
      - run: echo "got ${{ steps.greet.outputs.greeting }} and $FROM_ACTION"
      - run: echo "last main step"
"#;

const GREET_ACTION: &str = r#"
name: greet
inputs:
  who:
    required: true
  punctuation:
    default: "!"
outputs:
  greeting:
    description: the greeting
runs:
  using: docker
  image: Dockerfile
  args:
    - ${{ inputs.who }}
  env:
    FROM_RUNS_ENV: runs-env-${{ inputs.who }}
  pre-entrypoint: /pre.sh
  post-entrypoint: /post.sh
"#;

/// Writes the files of a local Dockerfile action under `dir` (executables 0755).
fn write_action(dir: &std::path::Path, files: &[(&str, &str)]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        if name.ends_with(".sh") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

#[test]
fn a_local_dockerfile_action_gets_inputs_and_sets_outputs_with_pre_and_post() {
    if !docker_ready("a_local_dockerfile_action_gets_inputs_and_sets_outputs_with_pre_and_post") {
        return;
    }
    let repo = Repo::with_workflow("action.yml", DOCKER_ACTION_WORKFLOW);
    write_action(
        &repo.path().join(".github/actions/greet"),
        &[
            ("action.yml", GREET_ACTION),
            (
                "Dockerfile",
                "FROM kiln-test/busybox:1\nCOPY *.sh /\nENTRYPOINT [\"/entrypoint.sh\"]\n",
            ),
            (
                "entrypoint.sh",
                "#!/bin/sh\necho \"main arg=$1 input=$INPUT_WHO punct=$INPUT_PUNCTUATION \
                 env=$FROM_RUNS_ENV state=$STATE_phase ws=$PWD\"\n\
                 echo \"greeting=hello $1$INPUT_PUNCTUATION\" >> \"$GITHUB_OUTPUT\"\n\
                 echo FROM_ACTION=set-by-action >> \"$GITHUB_ENV\"\n\
                 echo main=main-done >> \"$GITHUB_STATE\"\n",
            ),
            ("pre.sh", "#!/bin/sh\necho \"pre ran\"\necho phase=pre-done >> \"$GITHUB_STATE\"\n"),
            ("post.sh", "#!/bin/sh\necho \"post ran state=$STATE_phase main=$STATE_main\"\n"),
        ],
    );
    let run = exec_on_docker(&repo);
    run.assert_code(0).assert_stdout(&[
        "pre ran",
        "main arg=world input=world punct=! env=runs-env-world state=pre-done ws=/github/workspace",
        "got hello world! and set-by-action",
        "post ran state=pre-done main=main-done",
        "Workflow success",
    ]);
    let at = |needle: &str| run.stdout.find(needle).unwrap_or(usize::MAX);
    assert!(
        at("last main step") < at("post ran"),
        "the post ran before the main steps\n{}",
        run.show()
    );
    assert_nothing_left(&runner_id(&repo));
}

#[test]
fn a_docker_step_on_a_backend_without_step_containers_fails_before_anything_runs() {
    let repo = Repo::with_workflow(
        "host.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo never-ran\n      - uses: docker://kiln-test/busybox:1\n",
    );
    let run = repo.exec(&[]);
    run.assert_code(1).assert_no_stdout(&["never-ran"]);
    assert!(
        run.stdout.contains("step containers (uses: docker://kiln-test/busybox:1)")
            && run.stdout.contains("backend \"host\" does not support"),
        "the preflight error names neither the capability nor the backend\n{}",
        run.show()
    );
}

/// Starts `kiln exec ARGS…` in `repo`, kills it (SIGKILL) once a step printed
/// `step-started`, checks that the run's containers are still there, and returns the runner id.
fn kill_mid_step(repo: &Repo, args: &[&str]) -> String {
    let mut child =
        repo.kiln().arg("exec").args(args).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let started = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .any(|l| l.contains("step-started"));
    assert!(started, "the step never started");
    child.kill().unwrap();
    let _ = child.wait();
    let id = runner_id(repo);
    let filter = format!("label=dev.kiln.runner-id={id}");
    let left = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "the killed run's containers should still be there"
    );
    id
}

#[test]
fn a_killed_kiln_leaves_no_docker_resources_after_the_next_run() {
    if !docker_ready("a_killed_kiln_leaves_no_docker_resources_after_the_next_run") {
        return;
    }
    let repo = Repo::with_workflow(
        "kill.yml",
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    services:
      web:
        image: kiln-test/httpd:1
    steps:
      - uses: docker://kiln-test/busybox:1
        with:
          entrypoint: /bin/sh
          args: -c "echo step-started; exec sleep 300"
"#,
    );
    let plugin = format!("docker={} plugin docker", kiln_bin());
    let label = format!("ubuntu-latest=docker://{IMAGE}");
    let id = kill_mid_step(&repo, &["-P", &label, "--plugin", &plugin]);
    // The next run of the same runner (same state directory) removes what the dead one left.
    let repo2 = Repo::next_run(
        repo,
        "ok.yml",
        "on: push\njobs:\n  ok:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo fine\n",
    );
    repo2.exec(&["-P", &label, "--plugin", &plugin]).assert_code(0).assert_stdout(&["fine"]);
    assert_nothing_left(&id);
}

const HOST_WITH_CONTAINERS: &str = r#"
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
      - id: d
        uses: docker://kiln-test/busybox:1
        with:
          entrypoint: /bin/sh
          args: -c "echo docker step sees $(cat made-in-container.txt); echo out=ok >> $GITHUB_OUTPUT"
      - run: echo "docker step output ${{ steps.d.outputs.out }}"
"#;

#[test]
fn a_host_job_delegates_its_container_services_and_docker_steps_to_the_docker_plugin() {
    if !docker_ready(
        "a_host_job_delegates_its_container_services_and_docker_steps_to_the_docker_plugin",
    ) {
        return;
    }
    let repo = Repo::with_workflow("delegated.yml", HOST_WITH_CONTAINERS);
    // No -P: ubuntu-latest is a host label; the configured docker plugin takes its containers.
    let plugin = format!("docker={} plugin docker", kiln_bin());
    let run = repo.exec(&["--plugin", &plugin]);
    let host_root = repo.state.path().join("kiln/host");
    run.assert_code(0).assert_stdout(&[
        "in the job container, ws=",
        "service says service-ok",
        "docker step sees made",
        "docker step output ok",
        "Workflow success",
    ]);
    let ws = run
        .stdout
        .lines()
        .find_map(|l| l.split("in the job container, ws=/").nth(1))
        .map(|s| format!("/{s}"))
        .unwrap_or_default();
    assert!(
        ws.starts_with(&*std::fs::canonicalize(&host_root).unwrap().to_string_lossy()),
        "the job container's workspace is not the host environment's ({ws})\n{}",
        run.show()
    );
    assert_nothing_left(&runner_id(&repo));
    let left: Vec<_> =
        std::fs::read_dir(&host_root).map(|d| d.flatten().count()).into_iter().collect();
    assert_eq!(left, vec![0], "host environments left behind\n{}", run.show());
}

#[test]
fn a_host_job_with_a_container_fails_preflight_without_a_docker_plugin() {
    let repo = Repo::with_workflow(
        "nodocker.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    container: kiln-test/busybox:1\n    steps:\n      - run: echo never-ran\n",
    );
    let run = repo.exec(&[]);
    run.assert_code(1).assert_no_stdout(&["never-ran"]);
    assert!(
        run.stdout.contains("job containers (container:)")
            && run.stdout.contains("backend \"host\" does not support")
            && run.stdout.contains("configure a docker plugin"),
        "the preflight error names neither the capability nor the backend\n{}",
        run.show()
    );
}

const HOST_WITH_A_LATE_DOCKER_ACTION: &str = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: |
          mkdir -p .github/actions/late
          printf 'name: late\ninputs:\n  word: {}\nruns:\n  using: docker\n  image: docker://kiln-test/busybox:1\n  entrypoint: /bin/sh\n  args: ["-c", "echo late action says $INPUT_WORD"]\n' > .github/actions/late/action.yml
      - uses: ./.github/actions/late
        with:
          word: hello
"#;

#[test]
fn a_docker_action_unknown_before_a_host_job_starts_gets_its_delegate_on_first_use() {
    if !docker_ready(
        "a_docker_action_unknown_before_a_host_job_starts_gets_its_delegate_on_first_use",
    ) {
        return;
    }
    // The action only exists once the first step wrote it: preflight cannot see it, so the
    // delegate environment is created by the docker step itself.
    let repo = Repo::with_workflow("late.yml", HOST_WITH_A_LATE_DOCKER_ACTION);
    let plugin = format!("docker={} plugin docker", kiln_bin());
    repo.exec(&["--plugin", &plugin])
        .assert_code(0)
        .assert_stdout(&["late action says hello", "Workflow success"]);
    assert_nothing_left(&runner_id(&repo));
}

/// A docker daemon the plugin reaches over TCP: a listener on 127.0.0.1 forwarding every
/// connection to the local engine's unix socket. For the plugin it is a remote engine (a
/// `tcp://` endpoint shares no files with it), so `/__kiln` is a volume there and staged and
/// collected files, pid files and build contexts all go through the engine's API.
pub(crate) struct TcpEngine {
    pub(crate) url: String,
    pub(crate) connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TcpEngine {
    /// Panics when nothing connected to the endpoint during `run`.
    pub(crate) fn assert_used(&self, run: &crate::support::Run) {
        let n = self.connections.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n > 0, "the docker plugin never used {}\n{}", self.url, run.show());
    }
}

/// The local engine's socket: `DOCKER_HOST` when it is a unix socket (Podman), else Docker's.
fn engine_socket() -> std::path::PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => h.trim_start_matches("unix://").into(),
        _ => "/var/run/docker.sock".into(),
    }
}

/// Starts a [`TcpEngine`]; it forwards until the test process exits.
pub(crate) fn tcp_engine() -> TcpEngine {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a TCP port");
    let url = format!("tcp://{}", listener.local_addr().expect("local address"));
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&connections);
    let socket = engine_socket();
    // One direction of a connection; the end of one side half-closes the other.
    fn pump(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        done();
    }
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let Ok(unix) = UnixStream::connect(&socket) else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (tcp2, unix2) = (tcp.try_clone().expect("clone"), unix.try_clone().expect("clone"));
            let (tcp3, unix3) = (tcp.try_clone().expect("clone"), unix.try_clone().expect("clone"));
            std::thread::spawn(move || {
                pump(&tcp, &unix, move || {
                    let _ = unix3.shutdown(Shutdown::Write);
                })
            });
            std::thread::spawn(move || {
                pump(&unix2, &tcp2, move || {
                    let _ = TcpStream::shutdown(&tcp3, Shutdown::Write);
                })
            });
        }
    });
    TcpEngine { url, connections }
}

/// A docker daemon the plugin reaches over TCP with mutual TLS: like [`tcp_engine`], with a
/// TLS server in front (its certificate for 127.0.0.1, client certificates required from
/// the test CA). The directory holds what the plugin needs: `ca.pem`, `cert.pem`, `key.pem`.
pub(crate) fn tls_engine() -> (TcpEngine, tempfile::TempDir) {
    use rcgen::ExtendedKeyUsagePurpose as Usage;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, issuer) = crate::tls::new_ca("docker e2e ca");
    let (server_cert, server_key) =
        crate::tls::issue(&issuer, "dockerd", &["localhost", "127.0.0.1"], Usage::ServerAuth);
    let (client_cert, client_key) =
        crate::tls::issue(&issuer, "kiln docker plugin", &[], Usage::ClientAuth);
    for (name, pem) in [("ca.pem", &ca), ("cert.pem", &client_cert), ("key.pem", &client_key)] {
        std::fs::write(dir.path().join(name), pem).expect("write pem");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("ca cert");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .expect("client verifier");
    let certs: Vec<_> = CertificateDer::pem_slice_iter(server_cert.as_bytes())
        .map(|c| c.expect("server pem"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(server_key.as_bytes()).expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a TCP port");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("tcp://{}", listener.local_addr().expect("local address"));
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    let socket = engine_socket();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, socket, count) =
                    (acceptor.clone(), socket.clone(), Arc::clone(&count));
                tokio::spawn(async move {
                    // A client the TLS server refuses reaches nothing.
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut unix).await;
                });
            }
        });
    });
    (TcpEngine { url, connections }, dir)
}

/// `--plugin` values for a host plugin delegating to a docker plugin that reaches the engine
/// at `engine` (its `docker_host` option) and may mount the host plugin's directories.
fn over_tcp(repo: &Repo, engine: &TcpEngine) -> [String; 2] {
    let state = std::fs::canonicalize(repo.state.path()).expect("state dir");
    [
        format!(
            "host={} plugin host --delegate docker --delegate-option docker_host={}",
            kiln_bin(),
            engine.url
        ),
        format!(
            "docker={} plugin docker --allow-docker-host tcp://127.0.0.1:* --valid-volume {}/kiln/host/*",
            kiln_bin(),
            state.display()
        ),
    ]
}

/// The endpoints the docker plugin of `repo`'s state directory remembers.
fn remembered_endpoints(repo: &Repo) -> String {
    std::fs::read_to_string(repo.state.path().join("kiln/docker/endpoints.json"))
        .unwrap_or_default()
}

const OVER_TCP: &str = r#"
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
      - id: one
        run: |
          echo "in the job container, ws=$PWD"
          echo made > made-in-container.txt
          echo "service says $(wget -q -O- http://web:8080/)"
          echo "v=42" >> "$GITHUB_OUTPUT"
          echo "FOO=bar" >> "$GITHUB_ENV"
      - run: echo "got ${{ steps.one.outputs.v }} FOO=$FOO"
      - id: d
        uses: docker://kiln-test/busybox:1
        with:
          entrypoint: /bin/sh
          args: -c "echo docker step sees $(cat made-in-container.txt); echo out=ok >> $GITHUB_OUTPUT"
      - run: echo "docker step output ${{ steps.d.outputs.out }}"
      - name: a step past its timeout is stopped with its background children
        run: |
          sleep 300 &
          echo $! > bg.pid
          sleep 300
        timeout-minutes: 0.05
        continue-on-error: true
      - run: |
          pid=$(cat bg.pid)
          if kill -0 "$pid" 2>/dev/null; then echo "still-alive $pid"; exit 1; fi
          echo "tree-gone"
"#;

#[test]
fn a_host_job_delegates_to_a_docker_daemon_reached_over_tcp() {
    if !docker_ready("a_host_job_delegates_to_a_docker_daemon_reached_over_tcp") {
        return;
    }
    let engine = tcp_engine();
    let repo = Repo::with_workflow("tcp.yml", OVER_TCP);
    let [host, docker] = over_tcp(&repo, &engine);
    let run = repo.exec(&["--plugin", &host, "--plugin", &docker]);
    run.assert_code(0).assert_stdout(&[
        "in the job container, ws=",
        "service says service-ok",
        "got 42 FOO=bar",
        "docker step sees made",
        "docker step output ok",
        "tree-gone",
        "Workflow success",
    ]);
    engine.assert_used(&run);
    assert_nothing_left(&runner_id(&repo));
    assert_eq!(remembered_endpoints(&repo).trim(), "", "the endpoint is not forgotten");
}

#[test]
fn a_killed_kiln_leaves_nothing_on_a_docker_daemon_reached_over_tcp_after_the_next_run() {
    if !docker_ready(
        "a_killed_kiln_leaves_nothing_on_a_docker_daemon_reached_over_tcp_after_the_next_run",
    ) {
        return;
    }
    let engine = tcp_engine();
    let repo = Repo::with_workflow(
        "kill.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    container: kiln-test/busybox:1\n    steps:\n      - run: echo step-started; exec sleep 300\n",
    );
    let [host, docker] = over_tcp(&repo, &engine);
    let id = kill_mid_step(&repo, &["--plugin", &host, "--plugin", &docker]);
    assert!(remembered_endpoints(&repo).contains(&engine.url), "the endpoint is not remembered");
    // The next run's docker plugin finds the endpoint in its state directory and removes
    // what the killed run left there.
    let repo2 = Repo::next_run(
        repo,
        "ok.yml",
        "on: push\njobs:\n  ok:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo fine\n",
    );
    let run = repo2.exec(&["--plugin", &host, "--plugin", &docker]);
    run.assert_code(0).assert_stdout(&["fine"]);
    assert_nothing_left(&id);
    assert_eq!(
        remembered_endpoints(&repo2).trim(),
        "",
        "the endpoint is not forgotten\n{}",
        run.show()
    );
}

#[test]
fn a_host_job_delegates_to_a_docker_daemon_over_tcp_with_mutual_tls() {
    if !docker_ready("a_host_job_delegates_to_a_docker_daemon_over_tcp_with_mutual_tls") {
        return;
    }
    let (engine, tls) = tls_engine();
    let repo = Repo::with_workflow(
        "tls.yml",
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    container: kiln-test/busybox:1
    steps:
      - run: echo "in the job container" && echo made > made.txt
      - id: d
        uses: docker://kiln-test/busybox:1
        with:
          entrypoint: /bin/sh
          args: -c "echo docker step sees $(cat made.txt); echo out=ok >> $GITHUB_OUTPUT"
      - run: echo "docker step output ${{ steps.d.outputs.out }}"
"#,
    );
    let [host, docker] = over_tcp(&repo, &engine);
    let host = format!("{host} --delegate-option docker_tls_dir={}", tls.path().display());
    let run = repo.exec(&["--plugin", &host, "--plugin", &docker]);
    run.assert_code(0).assert_stdout(&[
        "in the job container",
        "docker step sees made",
        "docker step output ok",
        "Workflow success",
    ]);
    engine.assert_used(&run);
    assert_nothing_left(&runner_id(&repo));

    // A certificate of another CA is refused by the daemon: a clear error naming the
    // endpoint, and nothing created.
    let (_other, other_tls) = tls_engine();
    let host = format!(
        "{} --delegate-option docker_tls_dir={}",
        over_tcp(&repo, &engine)[0],
        other_tls.path().display()
    );
    let repo2 = Repo::next_run(
        repo,
        "tls.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    container: kiln-test/busybox:1\n    steps:\n      - run: echo never-ran\n",
    );
    let run = repo2.exec(&["--plugin", &host, "--plugin", &docker]);
    assert_ne!(run.code, Some(0), "{}", run.show());
    run.assert_no_stdout(&["never-ran"]);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains(&engine.url), "the error does not name the endpoint\n{}", run.show());
    assert_nothing_left(&runner_id(&repo2));
}
