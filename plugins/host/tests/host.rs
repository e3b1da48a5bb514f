//! The host backend through the SDK's `Backend` trait, in-process.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use kiln_plugin_host::{HostBackend, HostConfig};
use kiln_plugin_sdk::{
    Backend, ByteStream, Code, ContainerRef, ContainerState, CopyInTarget, CopyOutSource, EnvVar,
    Environment, EnvironmentRequest, ExecEvent, ExecRequest, ExitStatus, Exited, Health,
    LayerSupport, Owner, RemoveRequest, Selector, SignalRequest, StagedFile,
};

fn backend() -> (tempfile::TempDir, HostBackend) {
    let dir = tempfile::tempdir().unwrap();
    let b = HostBackend::new(HostConfig::new(dir.path().join("root"))).unwrap();
    (dir, b)
}

fn env_request(id: &str, runner: &str) -> EnvironmentRequest {
    EnvironmentRequest {
        environment_id: id.to_owned(),
        owner: Owner {
            runner_id: runner.to_owned(),
            boot_id: "boot-1".to_owned(),
            job_id: "job-1".to_owned(),
            expires_at_unix_ms: 4_000_000_000_000,
            labels: BTreeMap::from([("suite".to_owned(), "host-tests".to_owned())]),
            ..Owner::default()
        },
        label: "self-hosted".to_owned(),
        ..EnvironmentRequest::default()
    }
}

async fn create(b: &HostBackend, id: &str) -> Environment {
    b.create_environment(env_request(id, "runner-a")).await.unwrap()
}

fn sh(env: &str, exec_id: &str, script: &str) -> ExecRequest {
    ExecRequest {
        exec_id: exec_id.to_owned(),
        environment_id: env.to_owned(),
        container_id: "host".to_owned(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![EnvVar::new("PATH", "/usr/local/bin:/usr/bin:/bin")],
        ..ExecRequest::default()
    }
}

struct Outcome {
    stdout: String,
    stderr: String,
    exited: Exited,
    events: Vec<ExecEvent>,
}

async fn run(b: &HostBackend, req: ExecRequest) -> Outcome {
    let stream = b.exec(req).await.unwrap();
    let events: Vec<ExecEvent> = stream.map(|e| e.unwrap()).collect().await;
    assert_eq!(events.first(), Some(&ExecEvent::Started), "Started comes first");
    let exits = events.iter().filter(|e| matches!(e, ExecEvent::Exited(_))).count();
    assert_eq!(exits, 1, "exactly one Exited: {events:?}");
    let Some(ExecEvent::Exited(exited)) = events.last().cloned() else {
        panic!("Exited is not last: {events:?}");
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for e in &events {
        if let ExecEvent::Output { stream, data } = e {
            match stream {
                kiln_plugin_sdk::OutputStream::Stdout => stdout.extend_from_slice(data),
                kiln_plugin_sdk::OutputStream::Stderr => stderr.extend_from_slice(data),
            }
        }
    }
    Outcome {
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
        exited,
        events,
    }
}

/// Reads stdout until the first line: the script's `echo $$`, its process group.
async fn first_line(stream: &mut kiln_plugin_sdk::ExecStream) -> i32 {
    let mut buf = String::new();
    while let Some(ev) = stream.next().await {
        if let ExecEvent::Output { data, .. } = ev.unwrap() {
            buf.push_str(std::str::from_utf8(&data).unwrap());
            if let Some(line) = buf.lines().next().filter(|_| buf.contains('\n')) {
                return line.trim().parse().unwrap();
            }
        }
    }
    panic!("no first line");
}

/// Living (non-zombie) processes of a process group, from /proc.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f[2].parse::<i32>().unwrap() == pgid && f[0] != "Z" && f[0] != "X" {
            out.push(pid);
        }
    }
    out
}

async fn wait_group_gone(pgid: i32, within: Duration) {
    let deadline = Instant::now() + within;
    while !group_members(pgid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "process group {pgid} still has {:?}",
            group_members(pgid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stream_of(data: Vec<u8>) -> ByteStream {
    Box::pin(futures::stream::iter(vec![Ok(Bytes::from(data))]))
}

#[tokio::test]
async fn capabilities() {
    let (_d, b) = backend();
    let caps = b.capabilities(Default::default()).await.unwrap();
    assert_eq!(caps.plugin_name, "host");
    assert_eq!(caps.environment, LayerSupport::Native);
    assert!(!caps.job_container.is_supported());
    assert!(!caps.service_containers.is_supported());
    assert!(!caps.step_containers.is_supported());
    assert!(caps.features.exec_files && caps.features.exec_timeout && caps.features.local_copy);
    assert!(caps.features.stdin);
    assert_eq!(caps.os, "linux");
    assert!(["amd64", "arm64"].contains(&caps.arch.as_str()) || !caps.arch.is_empty());
}

#[tokio::test]
async fn exec_streams_output_and_exit_code() {
    let (_d, b) = backend();
    let env = create(&b, "env-out").await;
    let o = run(&b, sh("env-out", "e1", "echo out; echo err >&2; pwd; exit 3")).await;
    assert_eq!(o.stdout, format!("out\n{}\n", env.paths.workspace));
    assert_eq!(o.stderr, "err\n");
    assert_eq!(o.exited.status, ExitStatus::Code(3));
    assert!(!o.exited.timed_out);
}

#[tokio::test]
async fn environment_is_exact_and_path_is_prepended() {
    let (_d, b) = backend();
    let env = create(&b, "env-vars").await;
    let mut req = sh("env-vars", "e1", "echo \"$FOO|$PATH|${HOME-unset}\"; cd /; pwd");
    req.env.push(EnvVar { name: "FOO".into(), value: "bar".into(), secret: true });
    req.path_prepend = vec!["/opt/a".into(), "/opt/b".into()];
    req.working_dir = env.paths.temp.clone();
    let o = run(&b, req).await;
    assert_eq!(o.stdout, "bar|/opt/a:/opt/b:/usr/local/bin:/usr/bin:/bin|unset\n/\n");
    assert!(Path::new(&env.paths.home).is_absolute());
}

#[tokio::test]
async fn exec_errors() {
    let (_d, b) = backend();
    create(&b, "env-err").await;
    run(&b, sh("env-err", "e1", "true")).await;
    let err = |r: kiln_plugin_sdk::Result<kiln_plugin_sdk::ExecStream>| r.err().unwrap().code;
    assert_eq!(err(b.exec(sh("env-err", "e1", "true")).await), Code::AlreadyExists);
    assert_eq!(err(b.exec(sh("nope", "e2", "true")).await), Code::NotFound);
    assert_eq!(err(b.exec(sh("env-err", "Bad_Id", "true")).await), Code::InvalidArgument);
    let mut other = sh("env-err", "e3", "true");
    other.container_id = "db".into();
    assert_eq!(err(b.exec(other).await), Code::NotFound);
    let mut empty = sh("env-err", "e4", "true");
    empty.argv.clear();
    assert_eq!(err(b.exec(empty).await), Code::InvalidArgument);
    let mut outside = sh("env-err", "e5", "true");
    outside.files = vec![StagedFile { path: "/etc/kiln-pwned".into(), ..StagedFile::default() }];
    assert_eq!(err(b.exec(outside).await), Code::PermissionDenied);
}

#[tokio::test]
async fn missing_program_is_exit_127() {
    let (_d, b) = backend();
    create(&b, "env-127").await;
    let mut req = sh("env-127", "e1", "");
    req.argv = vec!["kiln-no-such-program".into()];
    let o = run(&b, req).await;
    assert_eq!(o.exited.status, ExitStatus::Code(127));
    assert!(o.stderr.contains("not found"), "{}", o.stderr);
}

#[tokio::test]
async fn staged_and_collected_files() {
    let (_d, b) = backend();
    let env = create(&b, "env-files").await;
    let rf = &env.paths.runner_files;
    let script = format!("{rf}/steps/s1.sh");
    let out_file = format!("{rf}/output");
    let big = format!("{rf}/big");
    let mut req = sh("env-files", "e1", "");
    req.argv = vec![script.clone()];
    req.env.push(EnvVar::new("GITHUB_OUTPUT", &out_file));
    req.files = vec![
        StagedFile {
            path: script.clone(),
            content: Bytes::from(format!(
                "#!/bin/sh\necho result=42 >> \"$GITHUB_OUTPUT\"\nhead -c 5000 /dev/zero > {big}\n"
            )),
            mode: 0o750,
        },
        StagedFile { path: out_file.clone(), content: Bytes::new(), mode: 0 },
    ];
    req.collect = vec![out_file.clone(), format!("{rf}/missing"), big.clone()];
    req.collect_limit_bytes = 1000;
    let o = run(&b, req).await;
    assert_eq!(o.exited.status, ExitStatus::Code(0), "{}", o.stderr);
    let mode = std::fs::metadata(&script).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750);
    assert_eq!(std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777, 0o644);
    let f = &o.exited.files;
    assert_eq!(f.len(), 3);
    assert_eq!(f[0].path, out_file);
    assert_eq!(&f[0].content[..], b"result=42\n");
    assert!(!f[0].truncated && !f[0].missing);
    assert!(f[1].missing);
    assert!(f[2].truncated);
    assert_eq!(f[2].content.len(), 1000);
}

#[tokio::test]
async fn output_is_chunked_not_buffered() {
    let (_d, b) = backend();
    create(&b, "env-big").await;
    let o = run(&b, sh("env-big", "e1", "head -c 1000000 /dev/zero")).await;
    assert_eq!(o.stdout.len(), 1_000_000);
    let chunks = o.events.iter().filter(|e| matches!(e, ExecEvent::Output { .. })).count();
    assert!(chunks >= 16, "{chunks} chunks");
    assert!(o.events.iter().all(|e| match e {
        ExecEvent::Output { data, .. } => data.len() <= 64 * 1024,
        _ => true,
    }));
}

#[tokio::test]
async fn signal_kills_the_process_group() {
    let (_d, b) = backend();
    create(&b, "env-sig").await;
    let mut stream = b.exec(sh("env-sig", "e1", "echo $$; sleep 100 & sleep 100")).await.unwrap();
    let pgid = first_line(&mut stream).await;
    // The shell prints its pid before it has forked both sleeps: wait for them.
    let deadline = Instant::now() + Duration::from_secs(3);
    while group_members(pgid).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(group_members(pgid).len() >= 2, "{:?}", group_members(pgid));
    let signal = |sig| SignalRequest {
        exec_id: "e1".into(),
        signal: sig,
        grace: Duration::from_millis(500),
    };
    assert!(b.signal_exec(signal(15)).await.unwrap());
    let rest: Vec<ExecEvent> = stream.map(|e| e.unwrap()).collect().await;
    let Some(ExecEvent::Exited(exited)) = rest.last() else { panic!("{rest:?}") };
    assert_eq!(exited.status, ExitStatus::Signal(15));
    wait_group_gone(pgid, Duration::from_secs(3)).await;
    assert!(!b.signal_exec(signal(15)).await.unwrap(), "already ended");
    let unknown = b.signal_exec(SignalRequest { exec_id: "nope".into(), ..signal(15) }).await;
    assert_eq!(unknown.unwrap_err().code, Code::NotFound);
    let bad = b.signal_exec(SignalRequest { signal: 0, ..signal(15) }).await;
    assert_eq!(bad.unwrap_err().code, Code::InvalidArgument);
}

#[tokio::test]
async fn signal_escalates_to_sigkill() {
    let (_d, b) = backend();
    create(&b, "env-esc").await;
    let mut stream = b.exec(sh("env-esc", "e1", "trap '' TERM; echo $$; sleep 100")).await.unwrap();
    let pgid = first_line(&mut stream).await;
    let t = Instant::now();
    let req = SignalRequest { exec_id: "e1".into(), signal: 15, grace: Duration::from_millis(300) };
    assert!(b.signal_exec(req).await.unwrap());
    let rest: Vec<ExecEvent> = stream.map(|e| e.unwrap()).collect().await;
    let Some(ExecEvent::Exited(exited)) = rest.last() else { panic!("{rest:?}") };
    assert_eq!(exited.status, ExitStatus::Signal(9));
    assert!(t.elapsed() >= Duration::from_millis(250));
    wait_group_gone(pgid, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn timeout_kills_the_exec_not_the_environment() {
    let (_d, b) = backend();
    create(&b, "env-to").await;
    let t = Instant::now();
    let mut req = sh("env-to", "e1", "echo start; sleep 30");
    req.timeout = Some(Duration::from_millis(300));
    req.grace = Duration::from_millis(300);
    let o = run(&b, req).await;
    assert!(o.exited.timed_out);
    assert_eq!(o.exited.status, ExitStatus::Signal(15));
    assert_eq!(o.stdout, "start\n");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // A process that ignores SIGTERM is killed after the grace period.
    let mut req = sh("env-to", "e2", "trap '' TERM; sleep 30");
    req.timeout = Some(Duration::from_millis(200));
    req.grace = Duration::from_millis(200);
    let o = run(&b, req).await;
    assert!(o.exited.timed_out);
    assert_eq!(o.exited.status, ExitStatus::Signal(9));

    // The environment still works: the next step runs.
    let o = run(&b, sh("env-to", "e3", "echo after")).await;
    assert_eq!(o.stdout, "after\n");
}

#[tokio::test]
async fn background_children_do_not_hold_the_stream() {
    let (_d, b) = backend();
    let env = create(&b, "env-bg").await;
    let t = Instant::now();
    let o = run(&b, sh("env-bg", "e1", "echo $$; sleep 30 & echo hi")).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(o.exited.status, ExitStatus::Code(0));
    let pgid: i32 = o.stdout.lines().next().unwrap().parse().unwrap();
    assert!(o.stdout.ends_with("hi\n"));
    // The background sleep keeps running…
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(group_members(pgid).len(), 1, "the background sleep runs on");
    // …until the environment is removed.
    let removed = b
        .remove(RemoveRequest {
            environment_id: "env-bg".into(),
            container_id: None,
            grace: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert!(removed);
    wait_group_gone(pgid, Duration::from_secs(3)).await;
    assert!(!Path::new(&env.paths.workspace).exists());
}

#[tokio::test]
async fn dropping_the_stream_kills_the_group() {
    let (_d, b) = backend();
    create(&b, "env-drop").await;
    let mut stream = b.exec(sh("env-drop", "e1", "echo $$; sleep 100 & sleep 100")).await.unwrap();
    let pgid = first_line(&mut stream).await;
    drop(stream);
    wait_group_gone(pgid, Duration::from_secs(4)).await;
    // The exec has ended: signalling it delivers nothing.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let req = SignalRequest { exec_id: "e1".into(), signal: 15, grace: Duration::ZERO };
    assert!(!b.signal_exec(req).await.unwrap());

    // Also when the process is busy writing when the stream goes away.
    let mut stream =
        b.exec(sh("env-drop", "e2", "echo $$; while :; do echo spam; done")).await.unwrap();
    let pgid = first_line(&mut stream).await;
    drop(stream);
    wait_group_gone(pgid, Duration::from_secs(4)).await;
}

#[tokio::test]
async fn stdin_is_written_and_closed() {
    let (_d, b) = backend();
    create(&b, "env-in").await;
    let mut req = sh("env-in", "e1", "cat; echo done");
    req.stdin = true;
    let stream = b.exec(req).await.unwrap();
    let n = b
        .write_stdin(
            "e1".into(),
            Box::pin(futures::stream::iter(vec![
                Ok(Bytes::from_static(b"hello ")),
                Ok(Bytes::from_static(b"world\n")),
            ])),
        )
        .await
        .unwrap();
    assert_eq!(n, 12);
    let events: Vec<ExecEvent> = stream.map(|e| e.unwrap()).collect().await;
    let out: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Output { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(String::from_utf8(out).unwrap(), "hello world\ndone\n");
    let no_stdin = b.write_stdin("nope".into(), stream_of(vec![])).await;
    assert_eq!(no_stdin.unwrap_err().code, Code::NotFound);
}

#[tokio::test]
async fn create_and_remove_are_idempotent() {
    let (_d, b) = backend();
    let first = create(&b, "env-idem").await;
    let again = create(&b, "env-idem").await;
    assert_eq!(first, again);
    assert!(first.owner.created_at_unix_ms > 0);
    assert_eq!(first.primary_container_id, "host");
    let meta = std::fs::metadata(Path::new(&first.paths.workspace).parent().unwrap()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let mut other = env_request("env-idem", "runner-a");
    other.label = "different".into();
    assert_eq!(b.create_environment(other).await.unwrap_err().code, Code::AlreadyExists);
    let bad = env_request("Bad", "runner-a");
    assert_eq!(b.create_environment(bad).await.unwrap_err().code, Code::InvalidArgument);

    let status = b
        .inspect(ContainerRef { environment_id: "env-idem".into(), container_id: "host".into() })
        .await
        .unwrap();
    assert_eq!(status.state, ContainerState::Running);
    assert_eq!(status.health, Health::None);
    assert!(status.image_env.iter().any(|v| v.starts_with("PATH=")));
    let missing = b
        .inspect(ContainerRef { environment_id: "env-idem".into(), container_id: "db".into() })
        .await;
    assert_eq!(missing.unwrap_err().code, Code::NotFound);

    let rm = |c: Option<&str>| RemoveRequest {
        environment_id: "env-idem".into(),
        container_id: c.map(str::to_owned),
        grace: Duration::ZERO,
    };
    assert!(!b.remove(rm(Some("host"))).await.unwrap());
    assert!(b.remove(rm(None)).await.unwrap());
    assert!(!b.remove(rm(None)).await.unwrap());
    assert_eq!(b.exec(sh("env-idem", "e9", "true")).await.err().unwrap().code, Code::NotFound);
    // The id can be used again after removal.
    let recreated = create(&b, "env-idem").await;
    assert!(Path::new(&recreated.paths.workspace).is_dir());
}

fn evil_tar(name: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let raw = &mut h.as_old_mut().name;
    raw[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test]
async fn copy_in_refuses_traversal() {
    let (d, b) = backend();
    let env = create(&b, "env-cp").await;
    let target = |dest: &str| CopyInTarget {
        environment_id: "env-cp".into(),
        container_id: "host".into(),
        dest_path: dest.to_owned(),
        local_path: None,
    };
    let ws = env.paths.workspace.clone();
    for name in ["../evil", "a/../../evil", "/abs-evil"] {
        let err = b.copy_in(target(&ws), stream_of(evil_tar(name))).await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{name}: {err}");
    }
    assert!(!Path::new(&ws).parent().unwrap().join("evil").exists());
    let err = b.copy_in(target("/tmp/outside"), stream_of(evil_tar("x"))).await.unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
    let err = b.copy_in(target(&format!("{ws}/../..")), stream_of(vec![])).await.unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    // A symlink inside the workspace does not lead out of it.
    std::os::unix::fs::symlink(d.path(), format!("{ws}/esc")).unwrap();
    let err =
        b.copy_in(target(&format!("{ws}/esc/sub")), stream_of(evil_tar("x"))).await.unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
}

#[tokio::test]
async fn copy_round_trips_and_local_copy() {
    let (_d, b) = backend();
    let env = create(&b, "env-rt").await;
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("d")).unwrap();
    std::fs::write(src.path().join("d/run.sh"), "echo hi").unwrap();
    std::fs::set_permissions(src.path().join("d/run.sh"), PermissionsExt::from_mode(0o755))
        .unwrap();
    std::os::unix::fs::symlink("run.sh", src.path().join("d/link")).unwrap();

    // Local fast path.
    let dest = format!("{}/local", env.paths.workspace);
    let stats = b
        .copy_in(
            CopyInTarget {
                environment_id: "env-rt".into(),
                container_id: "host".into(),
                dest_path: dest.clone(),
                local_path: Some(src.path().to_string_lossy().into_owned()),
            },
            stream_of(vec![]),
        )
        .await
        .unwrap();
    assert_eq!(stats.entries, 3);
    assert_eq!(stats.bytes, 7);
    let mode = std::fs::metadata(format!("{dest}/d/run.sh")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(std::fs::read_link(format!("{dest}/d/link")).unwrap(), Path::new("run.sh"));

    // CopyOut of that directory, then CopyIn of the archive elsewhere.
    let out = b
        .copy_out(CopyOutSource {
            environment_id: "env-rt".into(),
            container_id: "host".into(),
            path: format!("{dest}/d"),
        })
        .await
        .unwrap();
    let chunks: Vec<Bytes> = out.map(|c| c.unwrap()).collect().await;
    let archive: Vec<u8> = chunks.concat();
    let dest2 = format!("{}/again", env.paths.temp);
    let data: ByteStream = Box::pin(futures::stream::iter(
        archive.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect::<Vec<_>>(),
    ));
    let target = CopyInTarget {
        environment_id: "env-rt".into(),
        container_id: "host".into(),
        dest_path: dest2.clone(),
        local_path: None,
    };
    b.copy_in(target, data).await.unwrap();
    assert_eq!(std::fs::read_to_string(format!("{dest2}/d/run.sh")).unwrap(), "echo hi");
    assert_eq!(std::fs::read_link(format!("{dest2}/d/link")).unwrap(), Path::new("run.sh"));

    let missing = b
        .copy_out(CopyOutSource {
            environment_id: "env-rt".into(),
            container_id: "host".into(),
            path: format!("{dest}/nope"),
        })
        .await;
    assert_eq!(missing.err().unwrap().code, Code::NotFound);
}

#[tokio::test]
async fn list_by_runner_and_labels() {
    let (_d, b) = backend();
    b.create_environment(env_request("env-a1", "runner-a")).await.unwrap();
    b.create_environment(env_request("env-a2", "runner-a")).await.unwrap();
    let mut other = env_request("env-b1", "runner-b");
    other.owner.labels.insert("extra".into(), "1".into());
    b.create_environment(other).await.unwrap();

    let ids = |v: Vec<kiln_plugin_sdk::EnvironmentSummary>| {
        v.into_iter().map(|s| s.id).collect::<Vec<_>>()
    };
    let all = b.list_environments(Selector::default()).await.unwrap();
    assert_eq!(all[0].owner.runner_id, "runner-a");
    assert_eq!(all[0].owner.boot_id, "boot-1");
    assert_eq!(all[0].container_ids, vec!["host".to_owned()]);
    assert_eq!(ids(all), ["env-a1", "env-a2", "env-b1"]);
    let a = b.list_environments(Selector { runner_id: "runner-a".into(), ..Selector::default() });
    assert_eq!(ids(a.await.unwrap()), ["env-a1", "env-a2"]);
    let labelled = Selector {
        runner_id: String::new(),
        labels: BTreeMap::from([("extra".to_owned(), "1".to_owned())]),
    };
    assert_eq!(ids(b.list_environments(labelled).await.unwrap()), ["env-b1"]);
}

#[tokio::test]
async fn a_restarted_plugin_still_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig::new(dir.path().join("root"));
    let first = HostBackend::new(config.clone()).unwrap();
    first.create_environment(env_request("env-rs", "runner-a")).await.unwrap();
    let o = run(&first, sh("env-rs", "e1", "echo $$; sleep 30 & echo started")).await;
    let pgid: i32 = o.stdout.lines().next().unwrap().parse().unwrap();
    drop(first); // the plugin "crashes": its memory is gone, the processes are not

    let second = HostBackend::new(config).unwrap();
    let listed = second.list_environments(Selector::default()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "env-rs");
    // Exec ids stay used across the restart.
    let replay = second.exec(sh("env-rs", "e1", "true")).await;
    assert_eq!(replay.err().unwrap().code, Code::AlreadyExists);
    assert_eq!(group_members(pgid).len(), 1);
    let req = RemoveRequest {
        environment_id: "env-rs".into(),
        container_id: None,
        grace: Duration::from_secs(1),
    };
    assert!(second.remove(req).await.unwrap());
    wait_group_gone(pgid, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn steps_get_default_signal_handling() {
    let (_d, b) = backend();
    create(&b, "env-pipe").await;
    // SIGPIPE is ignored in the plugin (Rust's runtime); a step must get the default back, or
    // `yes | head` would never end.
    let t = Instant::now();
    let o = run(&b, sh("env-pipe", "e1", "yes | head -n 1")).await;
    assert_eq!(o.stdout, "y\n");
    assert_eq!(o.exited.status, ExitStatus::Code(0));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn remove_deletes_in_the_background_and_leaves_nothing_after_the_drain() {
    let (dir, b) = backend();
    let root = dir.path().join("root");
    let env = create(&b, "env-bg").await;
    std::fs::write(Path::new(&env.paths.workspace).join("big"), vec![7u8; 1 << 20]).unwrap();
    let rm = RemoveRequest { environment_id: "env-bg".to_owned(), ..RemoveRequest::default() };
    assert!(b.remove(rm.clone()).await.unwrap());
    // Gone from its path and from the listing as soon as Remove answers.
    assert!(!root.join("env-bg").exists());
    assert!(b.list_environments(Selector::default()).await.unwrap().is_empty());
    // The same id can be created again at once.
    create(&b, "env-bg").await;
    assert!(b.remove(rm).await.unwrap());
    b.drain_removals().await;
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // What a killed plugin renamed aside is deleted by the next one.
    let aside = root.join(".removed/env-old.1.0/workspace");
    std::fs::create_dir_all(&aside).unwrap();
    std::fs::write(aside.join("f"), b"x").unwrap();
    let next = HostBackend::new(HostConfig::new(&root)).unwrap();
    next.drain_removals().await;
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Whether `pid` is a living (non-zombie) process.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with(['Z', 'X'])))
        .is_some_and(|zombie| !zombie)
}

/// Remove ends processes that left the exec's process group (`setsid`, a double fork), with
/// the cgroup where it is writable (`auto`) and with the subreaper and /proc evidence
/// (issue 17: `setsid sleep 1001 &` outlived its job).
async fn remove_ends_escaped_processes(mode: kiln_plugin_host::ContainmentMode) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HostConfig::new(dir.path().join("root"));
    config.containment = mode;
    let b = HostBackend::new(config).unwrap();
    let env = create(&b, "escapees").await;
    let script = "setsid sleep 1001 >/dev/null 2>&1 & echo $!; \
                  ( sleep 1002 >/dev/null 2>&1 & echo $! ); \
                  sleep 1003 >/dev/null 2>&1 & echo $!";
    let out = run(&b, sh(&env.id, "x-escapees-1", script)).await;
    let pids: Vec<i32> = out.stdout.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(pids.len(), 3, "{}", out.stdout);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(pids.iter().all(|&p| alive(p)), "the background processes run before Remove");
    let existed = b
        .remove(RemoveRequest {
            environment_id: env.id.clone(),
            container_id: None,
            grace: Duration::from_millis(500),
        })
        .await
        .unwrap();
    assert!(existed);
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "{mode:?}: still running after Remove: {left:?}");
    b.drain_removals().await;
}

#[tokio::test]
async fn remove_ends_escaped_processes_with_a_cgroup_or_fallback() {
    remove_ends_escaped_processes(kiln_plugin_host::ContainmentMode::Auto).await;
}

#[tokio::test]
async fn remove_ends_escaped_processes_with_the_subreaper_fallback() {
    remove_ends_escaped_processes(kiln_plugin_host::ContainmentMode::Subreaper).await;
}
