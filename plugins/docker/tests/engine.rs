//! The docker backend in-process against a real engine: a service container reached by its
//! alias once its health check passes, a job container sharing the workspace, the policy
//! refusing a volume before anything is created, and everything gone after Remove.
//!
//! Needs the local image `kiln-test/busybox:1` (`tests/docker/setup.sh`). Without an engine
//! the tests do not run and say why (`tests/run` lists them), unless `KILN_REQUIRE_DOCKER=1`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_plugin_docker::{DockerBackend, DockerConfig};
use kiln_plugin_sdk::{
    Backend, Code, ContainerKind, ContainerRef, ContainerRequest, ContainerSpec, ContainerState,
    Environment, EnvironmentHints, EnvironmentRequest, ExecEvent, ExecRequest, ExitStatus, Health,
    Owner, RemoveRequest, Selector,
};

const IMAGE: &str = "kiln-test/busybox:1";

async fn backend(test: &str, state: &std::path::Path) -> Option<DockerBackend> {
    let required = std::env::var("KILN_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let problem = match DockerBackend::connect(DockerConfig::new(state)).await {
        Ok(b) => match b.docker().inspect_image(IMAGE).await {
            Ok(_) => return Some(b),
            Err(e) => format!("image {IMAGE} is missing (run tests/docker/setup.sh): {e}"),
        },
        Err(e) => format!("no docker engine: {e:#}"),
    };
    assert!(!required, "{test}: KILN_REQUIRE_DOCKER=1 but {problem}");
    // Not run: said here, and listed by `tests/run` at the end of the run.
    tracing::warn!("skipping {test}: {problem}");
    if let Some(dir) = std::env::var_os("KILN_SKIPPED_DIR") {
        let _ = std::fs::create_dir_all(&dir);
        let _ =
            std::fs::write(std::path::Path::new(&dir).join(test), format!("docker: {problem}\n"));
    }
    None
}

fn owner(runner: &str) -> Owner {
    Owner {
        runner_id: runner.to_owned(),
        boot_id: "boot".to_owned(),
        job_id: "job".to_owned(),
        expires_at_unix_ms: i64::MAX,
        ..Owner::default()
    }
}

async fn env(b: &DockerBackend, id: &str, runner: &str, job_container: bool) -> Environment {
    let mut options = serde_json::Map::new();
    options.insert("image".into(), IMAGE.into());
    b.create_environment(EnvironmentRequest {
        environment_id: id.to_owned(),
        owner: owner(runner),
        label: "ubuntu-latest".to_owned(),
        options,
        hints: EnvironmentHints { job_container, ..EnvironmentHints::default() },
    })
    .await
    .expect("create_environment")
}

/// Runs `sh -c script` in a container; returns status and stdout.
async fn sh(
    b: &DockerBackend,
    env: &str,
    container: &str,
    id: &str,
    script: &str,
) -> (ExitStatus, String) {
    let mut s = b
        .exec(ExecRequest {
            exec_id: id.to_owned(),
            environment_id: env.to_owned(),
            container_id: container.to_owned(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![kiln_plugin_sdk::EnvVar::new("PATH", "/usr/bin:/bin")],
            ..ExecRequest::default()
        })
        .await
        .expect("exec");
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        match ev.expect("exec event") {
            ExecEvent::Output { data, .. } => out.extend_from_slice(&data),
            ExecEvent::Exited(x) => return (x.status, String::from_utf8_lossy(&out).into_owned()),
            _ => {}
        }
    }
    panic!("the exec stream ended without Exited");
}

fn left(runner: &str) -> Vec<String> {
    let filter = format!("label=dev.kiln.runner-id={runner}");
    let mut out = Vec::new();
    for what in [vec!["ps", "-aq"], vec!["network", "ls", "-q"], vec!["volume", "ls", "-q"]] {
        let o = std::process::Command::new("docker")
            .args(&what)
            .args(["--filter", &filter])
            .output()
            .expect("docker");
        out.extend(String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned));
    }
    out
}

#[tokio::test]
async fn service_is_reached_by_alias_after_its_health_check() {
    let state = tempfile::tempdir().unwrap();
    let Some(b) = backend("service_is_reached_by_alias_after_its_health_check", state.path()).await
    else {
        return;
    };
    let runner = format!("engine-test-svc-{}", std::process::id());
    let e = env(&b, &format!("svc-{}", std::process::id()), &runner, true).await;
    assert!(e.primary_container_id.is_empty(), "a job container hint skips the primary");

    // A small HTTP server that only becomes healthy after it wrote its page.
    let svc = ContainerSpec {
        image: IMAGE.to_owned(),
        entrypoint: vec!["sh".into(), "-c".into()],
        cmd: vec![
            "sleep 1; mkdir -p /www && echo hello-from-service > /www/index.html && \
                   exec httpd -f -p 8080 -h /www"
                .into(),
        ],
        network_aliases: vec!["web".into()],
        options: "--health-cmd 'test -f /www/index.html' --health-interval 1s --health-retries 30"
            .into(),
        ..ContainerSpec::default()
    };
    let req = ContainerRequest {
        environment_id: e.id.clone(),
        container_id: "svc-web".into(),
        spec: svc,
    };
    b.create_container(ContainerKind::Service, req).await.expect("create service");
    let svc_ref = ContainerRef { environment_id: e.id.clone(), container_id: "svc-web".into() };
    b.start_container(svc_ref.clone()).await.expect("start service");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut saw_starting = false;
    loop {
        let st = b.inspect(svc_ref.clone()).await.expect("inspect service");
        assert_eq!(st.state, ContainerState::Running, "service: {st:?}");
        match st.health {
            Health::Healthy => break,
            Health::Starting => saw_starting = true,
            other => panic!("unexpected health {other:?}: {st:?}"),
        }
        assert!(Instant::now() < deadline, "the service never became healthy: {st:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(saw_starting, "the health check was never reported as starting");

    // The job container shares the workspace with the environment and reaches the service.
    let job = ContainerSpec {
        image: IMAGE.to_owned(),
        entrypoint: vec!["sleep".into()],
        cmd: vec!["3600".into()],
        mount_workspace: true,
        ..ContainerSpec::default()
    };
    let req =
        ContainerRequest { environment_id: e.id.clone(), container_id: "job".into(), spec: job };
    b.create_container(ContainerKind::Job, req).await.expect("create job container");
    b.start_container(ContainerRef { environment_id: e.id.clone(), container_id: "job".into() })
        .await
        .expect("start job container");
    let (status, out) = sh(&b, &e.id, "job", "x1", "wget -qO- http://web:8080/ && pwd").await;
    assert_eq!(status, ExitStatus::Code(0), "{out}");
    assert_eq!(out, format!("hello-from-service\n{}\n", e.paths.workspace));

    // A host path outside the allowlist is refused before anything is created.
    let refused = ContainerSpec {
        image: IMAGE.to_owned(),
        volumes: vec!["/etc:/host-etc".into()],
        ..ContainerSpec::default()
    };
    let req = ContainerRequest {
        environment_id: e.id.clone(),
        container_id: "bad".into(),
        spec: refused,
    };
    let err = b.create_container(ContainerKind::Service, req).await.unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied, "{err}");
    assert_eq!(err.field.as_deref(), Some("spec.volumes[0]"), "{err}");
    assert!(err.message.contains("--valid-volume"), "{err}");

    let listed = b
        .list_environments(Selector { runner_id: runner.clone(), ..Selector::default() })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].container_ids, ["job", "svc-web"], "{listed:?}");
    let existed = b
        .remove(RemoveRequest {
            environment_id: e.id.clone(),
            container_id: None,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert!(existed);
    assert_eq!(left(&runner), Vec::<String>::new(), "objects left behind");
}

#[tokio::test]
async fn a_restarted_plugin_lists_and_removes_what_the_previous_one_created() {
    let state = tempfile::tempdir().unwrap();
    let test = "a_restarted_plugin_lists_and_removes_what_the_previous_one_created";
    let Some(first) = backend(test, state.path()).await else {
        return;
    };
    let runner = format!("engine-test-restart-{}", std::process::id());
    let e = env(&first, &format!("restart-{}", std::process::id()), &runner, false).await;
    let (status, _) =
        sh(&first, &e.id, &e.primary_container_id, "bg", "sleep 600 >/dev/null 2>&1 &").await;
    assert_eq!(status, ExitStatus::Code(0));
    drop(first);

    // A new plugin process: only the engine's labels and the state directory are shared.
    let second = backend(test, state.path()).await.expect("the engine went away");
    let listed = second
        .list_environments(Selector { runner_id: runner.clone(), ..Selector::default() })
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), [e.id.as_str()]);
    assert_eq!(listed[0].owner.job_id, "job");
    assert!(listed[0].owner.created_at_unix_ms > 0);
    let again = second
        .exec(ExecRequest {
            exec_id: "bg".into(),
            environment_id: e.id.clone(),
            container_id: e.primary_container_id.clone(),
            argv: vec!["true".into()],
            ..ExecRequest::default()
        })
        .await;
    assert_eq!(
        again.err().map(|e| e.code),
        Some(Code::AlreadyExists),
        "exec ids survive a restart"
    );
    let existed = second
        .remove(RemoveRequest {
            environment_id: e.id.clone(),
            container_id: None,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert!(existed);
    let again = second
        .remove(RemoveRequest {
            environment_id: e.id.clone(),
            container_id: None,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert!(!again, "a second remove found something");
    assert_eq!(left(&runner), Vec::<String>::new(), "objects left behind");
}

fn tar_of(files: &[(&str, u32, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, mode, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, body.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test]
async fn a_dockerfile_action_is_built_and_run_with_inputs_and_outputs() {
    let state = tempfile::tempdir().unwrap();
    let test = "a_dockerfile_action_is_built_and_run_with_inputs_and_outputs";
    let Some(b) = backend(test, state.path()).await else {
        return;
    };
    let runner = format!("engine-test-build-{}", std::process::id());
    let e = env(&b, &format!("build-{}", std::process::id()), &runner, false).await;
    let action = format!("{}/action", e.paths.workspace);
    let tar = tar_of(&[
        (
            "Dockerfile",
            0o644,
            &format!("FROM {IMAGE}\nCOPY entry.sh /entry.sh\nENTRYPOINT [\"/entry.sh\"]\n"),
        ),
        (
            "entry.sh",
            0o755,
            "#!/bin/sh\necho \"hello $INPUT_WHO from $PWD\"\necho \"greeting=hi-$INPUT_WHO\" >> \"$GITHUB_OUTPUT\"\n",
        ),
    ]);
    let target = kiln_plugin_sdk::CopyInTarget {
        environment_id: e.id.clone(),
        container_id: e.primary_container_id.clone(),
        dest_path: action.clone(),
        local_path: None,
    };
    let data: kiln_plugin_sdk::ByteStream =
        Box::pin(futures::stream::iter([Ok(bytes::Bytes::from(tar))]));
    b.copy_in(target, data).await.expect("copy_in of the action");

    let spec = ContainerSpec {
        build: Some(kiln_plugin_sdk::ImageBuild { context_dir: action, dockerfile: String::new() }),
        ..ContainerSpec::default()
    };
    let req =
        ContainerRequest { environment_id: e.id.clone(), container_id: "step-1".into(), spec };
    b.create_container(ContainerKind::Step, req).await.expect("create the step container");
    let out_file = format!("{}/step-1-output", e.paths.runner_files);
    let mut s = b
        .exec(ExecRequest {
            exec_id: "step-1-main".into(),
            environment_id: e.id.clone(),
            container_id: "step-1".into(),
            env: vec![
                kiln_plugin_sdk::EnvVar::new("INPUT_WHO", "kiln"),
                kiln_plugin_sdk::EnvVar::new("GITHUB_OUTPUT", out_file.clone()),
            ],
            files: vec![kiln_plugin_sdk::StagedFile {
                path: out_file.clone(),
                content: bytes::Bytes::new(),
                mode: 0o666,
            }],
            collect: vec![out_file],
            ..ExecRequest::default()
        })
        .await
        .expect("exec of the step container");
    let mut out = Vec::new();
    let mut exited = None;
    while let Some(ev) = s.next().await {
        match ev.expect("event") {
            ExecEvent::Output { data, .. } => out.extend_from_slice(&data),
            ExecEvent::Exited(x) => exited = Some(x),
            _ => {}
        }
    }
    let x = exited.expect("Exited");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(x.status, ExitStatus::Code(0), "{out}");
    assert_eq!(out, format!("hello kiln from {}\n", e.paths.workspace));
    assert_eq!(x.files[0].content.as_ref(), b"greeting=hi-kiln\n");
    let existed = b
        .remove(RemoveRequest {
            environment_id: e.id.clone(),
            container_id: None,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert!(existed);
    assert_eq!(left(&runner), Vec::<String>::new(), "objects left behind");
}

#[tokio::test]
async fn an_unhinted_service_joins_the_primary_on_a_network_created_on_demand() {
    let state = tempfile::tempdir().unwrap();
    let test = "an_unhinted_service_joins_the_primary_on_a_network_created_on_demand";
    let Some(b) = backend(test, state.path()).await else {
        return;
    };
    let runner = format!("engine-test-lazy-{}", std::process::id());
    let e = env(&b, &format!("lazy-{}", std::process::id()), &runner, false).await;
    let (status, _) = sh(&b, &e.id, &e.primary_container_id, "before", "true").await;
    assert_eq!(status, ExitStatus::Code(0));
    let svc = ContainerSpec {
        image: IMAGE.to_owned(),
        entrypoint: vec!["sh".into(), "-c".into()],
        cmd: vec![
            "mkdir -p /www && echo lazy-ok > /www/index.html && exec httpd -f -p 80 -h /www".into(),
        ],
        network_aliases: vec!["db".into()],
        ..ContainerSpec::default()
    };
    let req =
        ContainerRequest { environment_id: e.id.clone(), container_id: "svc-db".into(), spec: svc };
    b.create_container(ContainerKind::Service, req).await.expect("create service");
    b.start_container(ContainerRef { environment_id: e.id.clone(), container_id: "svc-db".into() })
        .await
        .expect("start service");
    let script =
        "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://db/ && exit 0; sleep 0.3; done; exit 1";
    let (status, out) = sh(&b, &e.id, &e.primary_container_id, "after", script).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Code(0), "lazy-ok\n"));
    b.remove(RemoveRequest {
        environment_id: e.id.clone(),
        container_id: None,
        grace: Duration::ZERO,
    })
    .await
    .unwrap();
    assert_eq!(left(&runner), Vec::<String>::new(), "objects left behind");
}

#[tokio::test]
async fn environment_options_are_checked_before_anything_is_created() {
    let state = tempfile::tempdir().unwrap();
    let Some(_) = backend("environment_options_are_checked", state.path()).await else { return };
    let mut config = DockerConfig::new(state.path());
    config.allowed_docker_hosts = vec!["tcp://10.0.*".to_owned()];
    let b = DockerBackend::connect(config).await.unwrap();
    let runner = "options-check";
    // (options as JSON, code, field, words of the message)
    let cases: &[(&str, Code, &str, &str)] = &[
        (
            r#"{"docker_host": "tcp://192.168.1.9:2376"}"#,
            Code::PermissionDenied,
            "options.docker_host",
            "--allow-docker-host",
        ),
        (
            r#"{"docker_host": "ssh://10.0.0.2"}"#,
            Code::InvalidArgument,
            "options.docker_host",
            "expected unix:///path",
        ),
        (
            r#"{"docker_host": 2376}"#,
            Code::InvalidArgument,
            "options.docker_host",
            "must be a string",
        ),
        (
            r#"{"docker_tls_dir": "/etc/kiln/tls"}"#,
            Code::InvalidArgument,
            "options.docker_tls_dir",
            "without options.docker_host",
        ),
        (
            r#"{"docker_host": "tcp://10.0.0.2:2376", "docker_tls_dir": "tls"}"#,
            Code::InvalidArgument,
            "options.docker_tls_dir",
            "absolute path",
        ),
        (
            r#"{"host_dir": "/srv/../etc"}"#,
            Code::InvalidArgument,
            "options.host_dir",
            "without '..'",
        ),
        (
            r#"{"host_dir": "/srv/jobs"}"#,
            Code::PermissionDenied,
            "options.host_dir",
            "--valid-volume",
        ),
        (r#"{"image": ""}"#, Code::InvalidArgument, "options.image", "non-empty string"),
        (r#"{"memory": "4G"}"#, Code::InvalidArgument, "options.memory", "docker_host"),
    ];
    for (i, (options, code, field, words)) in cases.iter().enumerate() {
        let options: serde_json::Value = serde_json::from_str(options).unwrap();
        let serde_json::Value::Object(mut options) = options else { unreachable!() };
        options.entry("image").or_insert_with(|| IMAGE.into());
        let e = b
            .create_environment(EnvironmentRequest {
                environment_id: format!("options-check-{i}"),
                owner: owner(runner),
                label: "ubuntu-latest".to_owned(),
                options,
                hints: EnvironmentHints::default(),
            })
            .await
            .expect_err(&format!("case {i} was accepted"));
        assert_eq!((e.code, e.field.as_deref()), (*code, Some(*field)), "case {i}: {e}");
        assert!(e.message.contains(words), "case {i}: {:?} lacks {words:?}", e.message);
    }
    assert_eq!(left(runner), Vec::<String>::new());
    assert!(!state.path().join("endpoints.json").exists(), "a refused endpoint was remembered");
}
