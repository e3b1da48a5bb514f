//! Exec, the hot path: one Docker exec running the `sh` wrapper described in the crate docs,
//! its output streamed as it arrives, the end decided by the exec's main process, and one
//! `Exited` frame; signals through a second exec (`kill -SIG -PGID`).
//!
//! A step container's main process (empty `argv`) is run by attaching to the container,
//! starting it and waiting for it; it is signalled with the engine's kill.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    AttachContainerOptions, DownloadFromContainerOptions, KillContainerOptions,
    UploadToContainerOptions,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_plugin_sdk::ids::validate_id;
use kiln_plugin_sdk::{
    CollectedFile, Error, ExecEvent, ExecRequest, ExecStream, ExitStatus, Exited, OutputStream,
    Result, SignalRequest, StagedFile,
};
use tokio::sync::{mpsc, watch};

use crate::backend::{DockerBackend, EnvInfo, KILN_MOUNT, docker_err};
use crate::lock;

/// The wrapper: `sh -c WRAPPER kiln PIDFILE WORKDIR NAME=VALUE… ARGV…`.
const WRAPPER: &str = "p=$1; d=$2; shift 2; echo $$ > \"$p\"; \
    cd \"$d\" 2>/dev/null || { echo \"kiln-docker: working directory $d does not exist\" >&2; exit 127; }; \
    exec env -i \"$@\"";
/// Where pid files live inside containers.
const EXECS_DIR: &str = "/__kiln/execs";
/// A quiet stream gets a keepalive this often.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How often a running exec is asked whether its main process still runs (background
/// processes may hold the output open after it exited).
const POLL: Duration = Duration::from_millis(250);
/// After the main process exits, output is drained at most this long.
const DRAIN_MAX: Duration = Duration::from_millis(500);
/// Grace between SIGTERM and SIGKILL when a request says 0.
const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// Bound per collected file when the request says 0.
const DEFAULT_COLLECT_LIMIT: u64 = 1024 * 1024;
/// Bound on all collected files of one exec.
const COLLECT_BUDGET: u64 = 8 * 1024 * 1024;
/// Events buffered between the exec task and the gRPC stream.
const CHANNEL: usize = 32;

/// How an exec's processes are reached.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A Docker exec in a running container; its process group is in the pid file.
    Exec { container: String, pidfile: PidFile },
    /// The main process of a step container.
    Container { container: String },
}

/// A running or finished exec, reachable by id from any connection.
pub(crate) struct ExecHandle {
    pub(crate) env_id: String,
    target: Target,
    docker: Docker,
    done: watch::Sender<bool>,
    /// Signals the plugin sent, to report a death by them as a signal.
    sent: Mutex<Vec<i32>>,
    /// The write half of the exec's attached stdin, with `ExecRequest::stdin`.
    stdin: Option<tokio::sync::Mutex<Option<Stdin>>>,
}

/// Where an exec's pid file is read.
#[derive(Debug, Clone)]
pub(crate) enum PidFile {
    /// On the host (an engine sharing the plugin's filesystem).
    Host(PathBuf),
    /// In the container, through the archive API.
    Engine(String),
}

/// The write end of an exec's standard input.
type Stdin = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

impl ExecHandle {
    fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    async fn wait_done(&self, within: Duration) -> bool {
        let mut rx = self.done.subscribe();
        matches!(tokio::time::timeout(within, rx.wait_for(|d| *d)).await, Ok(Ok(_)))
    }

    /// The exec's process group, from the wrapper's pid file (it may take a moment to appear).
    async fn pgid(&self, container: &str, pidfile: &PidFile) -> Option<i32> {
        for _ in 0..50 {
            let text = match pidfile {
                PidFile::Host(path) => tokio::fs::read_to_string(path).await.ok(),
                PidFile::Engine(path) => read_engine(&self.docker, container, path, 64)
                    .await
                    .map(|(b, _)| String::from_utf8_lossy(&b).into_owned()),
            };
            if let Some(s) = text
                && let Ok(p) = s.trim().parse::<i32>()
                && p > 1
            {
                return Some(p);
            }
            if self.is_done() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Sends `sig` to the exec's process group (or the step container).
    async fn send(&self, sig: i32) {
        lock(&self.sent).push(sig);
        match &self.target {
            Target::Exec { container, pidfile } => {
                let Some(pgid) = self.pgid(container, pidfile).await else { return };
                let script = format!(
                    "kill -{sig} -{pgid} 2>/dev/null || kill -{sig} {pgid} 2>/dev/null; true"
                );
                if let Err(e) = run_detached(&self.docker, container, &script).await {
                    tracing::warn!(env = %self.env_id, error = %e, "signalling an exec failed");
                }
            }
            Target::Container { container } => {
                let options = KillContainerOptions { signal: sig.to_string() };
                if let Err(e) = self.docker.kill_container(container, Some(options)).await {
                    tracing::debug!(error = %e, "signalling a step container failed");
                }
            }
        }
    }

    /// The kill sequence: `sig` now, SIGKILL after `grace` if the main process (or, for the
    /// timeout and cancellation, any member of the group) may still be there.
    fn terminate(self: &Arc<Self>, sig: i32, grace: Duration, whole_group: bool) {
        let h = Arc::clone(self);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            h.send(sig).await;
            if sig == 9 {
                return;
            }
            if !h.wait_done(grace).await {
                h.send(9).await;
                return;
            }
            if whole_group {
                tokio::time::sleep_until(start + grace).await;
                if matches!(h.target, Target::Exec { .. }) {
                    h.send(9).await;
                }
            }
        });
    }
}

/// Runs `sh -c script` in a container without waiting for it.
async fn run_detached(docker: &Docker, container: &str, script: &str) -> Result<()> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                cmd: Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()]),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| docker_err("creating a signal exec", e))?;
    docker
        .start_exec(&exec.id, Some(StartExecOptions { detach: true, ..Default::default() }))
        .await
        .map_err(|e| docker_err("starting a signal exec", e))?;
    Ok(())
}

/// Runs `argv` in a container to its end; returns exit code, stdout and stderr.
pub(crate) async fn run_simple(
    docker: &Docker,
    container: &str,
    argv: Vec<String>,
) -> Result<(i64, Vec<u8>, Vec<u8>)> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                cmd: Some(argv),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| docker_err("creating a helper exec", e))?;
    let started = docker
        .start_exec(&exec.id, None)
        .await
        .map_err(|e| docker_err("starting a helper exec", e))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    if let StartExecResults::Attached { mut output, .. } = started {
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdOut { message }) => out.extend_from_slice(&message),
                Ok(LogOutput::StdErr { message }) => err.extend_from_slice(&message),
                Ok(_) => {}
                Err(e) => return Err(docker_err("reading a helper exec", e)),
            }
        }
    }
    let code = exit_code(docker, &exec.id).await?;
    Ok((code, out, err))
}

/// The exit code of a finished Docker exec (waits, bounded, for the engine to record it).
async fn exit_code(docker: &Docker, exec_id: &str) -> Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i =
            docker.inspect_exec(exec_id).await.map_err(|e| docker_err("inspecting an exec", e))?;
        if !i.running.unwrap_or(false) {
            return Ok(i.exit_code.unwrap_or(-1));
        }
        if Instant::now() >= deadline {
            return Err(Error::internal("the engine did not record the exit of a helper exec"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checks an absolute path without `..`.
pub(crate) fn check_path(path: &str, field: &str) -> Result<()> {
    kiln_plugin_sdk::paths::absolute_without_dotdot(path, field).map(|_| ())
}

/// The host path of a container path under `/__kiln`, the workspace (when it is a host
/// directory) or a delegate environment's `host_dir`, when no component on the host is a
/// symlink (a container may plant symlinks there; those paths go through the engine, which
/// resolves them inside the container).
pub(crate) fn host_path(env: &EnvInfo, path: &str) -> Option<PathBuf> {
    use crate::backend::{HOST_WORKSPACE, WORKSPACE};
    if !env.engine.shares_fs {
        return None;
    }
    let path = Path::new(path);
    let (mut cur, rel) =
        if let (true, Ok(rel)) = (env.workspace_on_host, path.strip_prefix(WORKSPACE)) {
            (env.dir.join(HOST_WORKSPACE), rel)
        } else if let Ok(rel) = path.strip_prefix(KILN_MOUNT) {
            (env.dir.clone(), rel)
        } else if let Some(d) = &env.host_dir {
            // A delegate environment's host directory is mounted at its own path.
            (d.clone(), path.strip_prefix(d).ok()?)
        } else {
            return None;
        };
    for comp in rel.components() {
        let Component::Normal(c) = comp else { return None };
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return None,
            _ => {}
        }
    }
    Some(cur)
}

/// Writes the staged files: directly in the host directory under `/__kiln`, the others in
/// one archive through the engine.
async fn stage(env: &EnvInfo, container: &str, files: &[StagedFile]) -> Result<()> {
    let mut tar: Option<tar::Builder<Vec<u8>>> = None;
    for (i, f) in files.iter().enumerate() {
        check_path(&f.path, &format!("files[{i}].path"))?;
        let mode = if f.mode == 0 { 0o644 } else { f.mode & 0o7777 };
        if let Some(host) = host_path(env, &f.path) {
            let content = f.content.clone();
            tokio::task::spawn_blocking(move || write_file(&host, &content, mode))
                .await
                .map_err(|e| Error::internal(format!("the staging task failed: {e}")))?
                .map_err(|e| {
                    Error::io(format!("staging {}", f.path), &e).field(format!("files[{i}]"))
                })?;
            continue;
        }
        let b = tar.get_or_insert_with(|| tar::Builder::new(Vec::new()));
        let mut h = tar::Header::new_gnu();
        h.set_size(f.content.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mtime(crate::labels::now_ms() as u64 / 1000);
        b.append_data(&mut h, f.path.trim_start_matches('/'), &f.content[..])
            .map_err(|e| Error::io("archiving a staged file", &e).field(format!("files[{i}]")))?;
    }
    let Some(b) = tar else { return Ok(()) };
    let tar = b.into_inner().map_err(|e| Error::io("archiving the staged files", &e))?;
    env.engine
        .docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions { path: "/".to_owned(), ..Default::default() }),
            bollard::body_full(Bytes::from(tar)),
        )
        .await
        .map_err(|e| docker_err("staging the exec's files", e).field("files"))
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
    };
    let mut f = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o777).create(parent)?;
            }
            open()?
        }
        Err(e) => return Err(e),
    };
    f.write_all(content)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Reads the files to collect, each bounded by `limit` and all by [`COLLECT_BUDGET`].
async fn collect(
    env: &EnvInfo,
    container: &str,
    paths: &[String],
    limit: u64,
) -> Vec<CollectedFile> {
    let mut budget = COLLECT_BUDGET;
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let limit = limit.min(budget);
        let mut file = CollectedFile { path: path.clone(), ..CollectedFile::default() };
        let read = match host_path(env, path) {
            Some(host) => {
                tokio::task::spawn_blocking(move || read_host(&host, limit)).await.unwrap_or(None)
            }
            None => read_engine(&env.engine.docker, container, path, limit).await,
        };
        match read {
            Some((content, truncated)) => {
                budget -= content.len() as u64;
                file.content = Bytes::from(content);
                file.truncated = truncated;
            }
            None => file.missing = true,
        }
        out.push(file);
    }
    out
}

fn read_host(path: &Path, limit: u64) -> Option<(Vec<u8>, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).ok()?;
    let truncated = buf.len() as u64 > limit;
    buf.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Some((buf, truncated))
}

/// Reads one file through the archive API.
async fn read_engine(
    docker: &Docker,
    container: &str,
    path: &str,
    limit: u64,
) -> Option<(Vec<u8>, bool)> {
    let mut stream = docker.download_from_container(
        container,
        Some(DownloadFromContainerOptions { path: path.to_owned() }),
    );
    let mut tar = Vec::new();
    while let Some(chunk) = stream.next().await {
        tar.extend_from_slice(&chunk.ok()?);
        if tar.len() as u64 > limit + 1024 * 1024 {
            break;
        }
    }
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entries = archive.entries().ok()?;
    let entry = entries.next()?.ok()?;
    if !entry.header().entry_type().is_file() {
        return None;
    }
    let mut buf = Vec::new();
    let _ = entry.take(limit + 1).read_to_end(&mut buf);
    let truncated = buf.len() as u64 > limit;
    buf.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Some((buf, truncated))
}

/// What the exec task needs after the start.
struct Plan {
    collect: Vec<String>,
    collect_limit: u64,
    timeout: Option<Duration>,
    grace: Duration,
    started: Instant,
}

/// Validates, stages, starts the exec and the task that streams it.
pub(crate) async fn start(backend: &DockerBackend, req: ExecRequest) -> Result<ExecStream> {
    validate_id(&req.exec_id, "exec_id")?;
    if req.tty {
        return Err(Error::unimplemented("the docker plugin does not support tty").field("tty"));
    }
    let env = backend.live_env(&req.environment_id).await?;
    // A step container's main process: created now, with the exec's env (see PendingStep).
    let with_env =
        req.argv.is_empty() && backend.materialize(&env, &req.container_id, &req.env).await?;
    // A container found before needs no inspect for a command: an exec there fails when it
    // is not running (or gone), which says the same.
    let (container, inspect): (String, Option<_>) = match backend.verified(&env, &req.container_id)
    {
        Some(name) if !req.argv.is_empty() => (name, None),
        _ => {
            let (name, inspect) = backend.container(&env, &req.container_id).await?;
            (name, Some(inspect))
        }
    };
    if !req.working_dir.is_empty() {
        check_path(&req.working_dir, "working_dir")?;
    }
    for (i, c) in req.collect.iter().enumerate() {
        check_path(c, &format!("collect[{i}]"))?;
    }
    let pidfile_rel = format!("{EXECS_DIR}/{}.pid", req.exec_id);
    let pidfile = if env.engine.shares_fs {
        PidFile::Host(env.dir.join("execs").join(format!("{}.pid", req.exec_id)))
    } else {
        PidFile::Engine(pidfile_rel.clone())
    };
    // On a remote engine the pid file of an exec started by a previous instance of this
    // plugin is only in the engine: one small archive read for an id this process has not
    // seen (§4.6: remembered as long as the environment exists, across restarts).
    let used_remotely = match &pidfile {
        PidFile::Engine(path) if !lock(&backend.inner.exec_ids).contains(&req.exec_id) => {
            read_engine(&env.engine.docker, &container, path, 64).await.is_some()
        }
        _ => false,
    };
    {
        // Reserve the id: an exec id is never run twice (rule 3), also across restarts (the
        // pid files stay with the environment).
        let mut ids = lock(&backend.inner.exec_ids);
        let used = used_remotely || matches!(&pidfile, PidFile::Host(p) if p.exists());
        if ids.contains(&req.exec_id) || used {
            return Err(Error::already_exists(format!(
                "exec id {:?} was used before: exec is not replayable",
                req.exec_id
            ))
            .field("exec_id"));
        }
        ids.insert(req.exec_id.clone());
    }
    let inspected = inspect.is_some();
    let running =
        inspect.as_ref().is_none_or(|i| i.state.as_ref().and_then(|s| s.running) == Some(true));
    let plan = Plan {
        collect: req.collect.clone(),
        collect_limit: if req.collect_limit_bytes == 0 {
            DEFAULT_COLLECT_LIMIT
        } else {
            req.collect_limit_bytes
        },
        timeout: req.timeout.filter(|t| !t.is_zero()),
        grace: if req.grace.is_zero() { DEFAULT_GRACE } else { req.grace },
        started: Instant::now(),
    };
    if let (true, Some(inspect)) = (req.argv.is_empty(), inspect) {
        let is_step = inspect
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(crate::labels::KIND))
            .is_some_and(|k| k == "step");
        if !is_step {
            return Err(Error::invalid_argument(
                "argv is empty: only a step container's main process runs without argv",
            )
            .field("argv"));
        }
        if req.stdin {
            return Err(Error::invalid_argument(
                "stdin is not supported for a step container's main process",
            )
            .field("stdin"));
        }
        return start_step(backend, env, container, inspect, req, plan, with_env).await;
    }
    if !running {
        return Err(Error::failed_precondition(format!(
            "container {:?} is not running",
            req.container_id
        )));
    }
    stage(&env, &container, &req.files).await?;
    // Exactly the requested environment, with path_prepend in front of PATH.
    let mut vars: Vec<String> = Vec::with_capacity(req.env.len() + 1);
    let mut path_seen = false;
    for v in &req.env {
        if v.name == "PATH" {
            path_seen = true;
            vars.push(format!("PATH={}", prepend(&req.path_prepend, &v.value)));
        } else {
            vars.push(format!("{}={}", v.name, v.value));
        }
    }
    if !path_seen && !req.path_prepend.is_empty() {
        vars.push(format!("PATH={}", prepend(&req.path_prepend, "")));
    }
    let workdir = if req.working_dir.is_empty() {
        crate::backend::WORKSPACE.to_owned()
    } else {
        req.working_dir.clone()
    };
    let mut cmd = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        WRAPPER.to_owned(),
        "kiln".to_owned(),
        pidfile_rel,
        workdir,
    ];
    cmd.extend(vars);
    cmd.extend(req.argv.iter().cloned());
    let docker = env.engine.docker.clone();
    let exec = docker
        .create_exec(
            &container,
            CreateExecOptions::<String> {
                cmd: Some(cmd),
                attach_stdin: Some(req.stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await;
    let exec = match exec {
        Ok(exec) => exec,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, message }) => {
            return Err(Error::failed_precondition(format!(
                "container {:?} is not running: {message}",
                req.container_id
            )));
        }
        Err(e) if !inspected => {
            // Not inspected first: say what the container's state says (engines differ in
            // how they refuse an exec into a stopped or removed container).
            let (_, inspect) = backend.container(&env, &req.container_id).await?;
            if inspect.state.as_ref().and_then(|s| s.running) != Some(true) {
                return Err(Error::failed_precondition(format!(
                    "container {:?} is not running",
                    req.container_id
                )));
            }
            return Err(docker_err("creating the exec", e));
        }
        Err(e) => return Err(docker_err("creating the exec", e)),
    };
    let started = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions { output_capacity: Some(64 * 1024), ..Default::default() }),
        )
        .await
        .map_err(|e| docker_err("starting the exec", e))?;
    let StartExecResults::Attached { output, input } = started else {
        return Err(Error::internal("the engine started the exec detached"));
    };
    let handle = Arc::new(ExecHandle {
        env_id: env.id.clone(),
        target: Target::Exec { container: container.clone(), pidfile },
        docker: docker.clone(),
        done: watch::Sender::new(false),
        sent: Mutex::new(Vec::new()),
        stdin: req.stdin.then(|| tokio::sync::Mutex::new(Some(input))),
    });
    lock(&backend.inner.execs).insert(req.exec_id.clone(), Arc::clone(&handle));
    let (tx, rx) = mpsc::channel(CHANNEL);
    let _ = tx.try_send(Ok(ExecEvent::Started));
    let exec_id = exec.id.clone();
    let poll = move || {
        let docker = docker.clone();
        let id = exec_id.clone();
        async move {
            match docker.inspect_exec(&id).await {
                Ok(i) if i.running.unwrap_or(false) => Ok(None),
                Ok(i) => Ok(Some((i.exit_code.unwrap_or(-1), false))),
                Err(e) => Err(docker_err("inspecting the exec", e)),
            }
        }
    };
    tokio::spawn(drive(env, container, output, poll, tx, handle, plan));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn prepend(prepend: &[String], path: &str) -> String {
    let mut out = prepend.join(":");
    if !path.is_empty() {
        if !out.is_empty() {
            out.push(':');
        }
        out.push_str(path);
    }
    out
}

/// Runs a step container's main process: attach, start, stream, wait.
#[allow(clippy::too_many_arguments)]
async fn start_step(
    backend: &DockerBackend,
    env: Arc<EnvInfo>,
    mut container: String,
    inspect: bollard::models::ContainerInspectResponse,
    req: ExecRequest,
    plan: Plan,
    with_env: bool,
) -> Result<ExecStream> {
    let docker = env.engine.docker.clone();
    let state = inspect.state.as_ref().and_then(|s| s.status);
    if state != Some(bollard::models::ContainerStateStatusEnum::CREATED) {
        return Err(Error::failed_precondition(format!(
            "step container {:?} was already started; create a new one per step",
            req.container_id
        )));
    }
    // A container created before this exec (by another plugin process) gets the env by
    // being created again.
    if !req.env.is_empty() && !with_env {
        container = recreate_with_env(&env.engine.docker, &container, inspect, &req).await?;
    }
    stage(&env, &container, &req.files).await?;
    // Attached before the start, the stream sees all output; asking for the logs too can
    // deliver early output twice (the engine replays the log while the stream already
    // carries it).
    let attached = docker
        .attach_container(
            &container,
            Some(AttachContainerOptions {
                stream: true,
                stdout: true,
                stderr: true,
                logs: false,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| docker_err("attaching to the step container", e))?;
    docker
        .start_container(&container, None)
        .await
        .map_err(|e| docker_err(format!("starting step container {:?}", req.container_id), e))?;
    let handle = Arc::new(ExecHandle {
        env_id: env.id.clone(),
        target: Target::Container { container: container.clone() },
        docker: docker.clone(),
        done: watch::Sender::new(false),
        sent: Mutex::new(Vec::new()),
        stdin: None,
    });
    lock(&backend.inner.execs).insert(req.exec_id.clone(), Arc::clone(&handle));
    let (tx, rx) = mpsc::channel(CHANNEL);
    let _ = tx.try_send(Ok(ExecEvent::Started));
    let name = container.clone();
    let poll = move || {
        let docker = docker.clone();
        let name = name.clone();
        async move {
            match crate::compat::inspect_container(&docker, &name).await {
                Ok(c) => {
                    let st = c.state.unwrap_or_default();
                    if st.running.unwrap_or(false)
                        || st.status == Some(bollard::models::ContainerStateStatusEnum::CREATED)
                    {
                        Ok(None)
                    } else {
                        Ok(Some((st.exit_code.unwrap_or(-1), st.oom_killed.unwrap_or(false))))
                    }
                }
                Err(e) => Err(docker_err("inspecting the step container", e)),
            }
        }
    };
    tokio::spawn(drive(env, container, attached.output, poll, tx, handle, plan));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Re-creates a (never started) step container with the exec's env added to its own.
async fn recreate_with_env(
    docker: &Docker,
    name: &str,
    inspect: bollard::models::ContainerInspectResponse,
    req: &ExecRequest,
) -> Result<String> {
    let config = inspect.config.unwrap_or_default();
    let mut env = config.env.clone().unwrap_or_default();
    for v in &req.env {
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(v.name.as_str()));
        env.push(format!("{}={}", v.name, v.value));
    }
    let net = inspect
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            (k, bollard::models::EndpointSettings { aliases: v.aliases, ..Default::default() })
        })
        .collect();
    let body = bollard::models::ContainerCreateBody {
        hostname: None,
        user: config.user,
        env: Some(env),
        cmd: config.cmd,
        healthcheck: config.healthcheck,
        image: config.image,
        working_dir: config.working_dir,
        entrypoint: config.entrypoint,
        labels: config.labels,
        exposed_ports: config.exposed_ports,
        host_config: inspect.host_config.map(|mut h| {
            // Podman's inspect names ulimits `RLIMIT_NOFILE` but its create accepts only
            // `nofile` (Docker's spelling, unchanged by this).
            for u in h.ulimits.iter_mut().flatten() {
                if let Some(name) = &mut u.name
                    && let Some(short) = name.strip_prefix("RLIMIT_")
                {
                    *name = short.to_lowercase();
                }
            }
            h
        }),
        networking_config: Some(bollard::models::NetworkingConfig { endpoints_config: Some(net) }),
        ..Default::default()
    };
    docker
        .remove_container(name, None::<bollard::query_parameters::RemoveContainerOptions>)
        .await
        .map_err(|e| docker_err("replacing the step container", e))?;
    docker
        .create_container(
            Some(bollard::query_parameters::CreateContainerOptions {
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| docker_err("re-creating the step container with the step's env", e))?;
    Ok(name.to_owned())
}

/// Streams one exec: output as it arrives, keepalives, timeout and cancellation, the end of
/// the main process (`poll`), a bounded drain, collected files, the terminal frame.
#[allow(clippy::too_many_arguments)]
async fn drive<S, P, F>(
    env: Arc<EnvInfo>,
    container: String,
    mut output: S,
    poll: P,
    tx: mpsc::Sender<Result<ExecEvent>>,
    handle: Arc<ExecHandle>,
    plan: Plan,
) where
    S: Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>>
        + Unpin
        + Send
        + 'static,
    P: Fn() -> F + Send,
    F: std::future::Future<Output = Result<Option<(i64, bool)>>> + Send,
{
    use tokio::time::Instant as TInstant;
    let now = TInstant::now();
    let far = now + Duration::from_secs(100 * 365 * 24 * 3600);
    let timeout = tokio::time::sleep_until(plan.timeout.map_or(far, |t| now + t));
    let keepalive = tokio::time::sleep_until(now + KEEPALIVE);
    let poll_timer = tokio::time::sleep_until(now + POLL);
    let drain = tokio::time::sleep_until(far);
    tokio::pin!(timeout, keepalive, poll_timer, drain);
    let mut timeout_armed = plan.timeout.is_some();
    let mut output_open = true;
    let mut status: Option<(i64, bool)> = None;
    let mut ended_at = plan.started;
    let mut timed_out = false;
    let mut failure: Option<Error> = None;
    let mut cancelled = false;
    let mut fast_polls = 0u32;

    loop {
        if status.is_some() && !output_open {
            break;
        }
        tokio::select! {
            item = output.next(), if output_open => match item {
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    if !message.is_empty() && tx.send(Ok(ExecEvent::Output { stream: OutputStream::Stdout, data: message })).await.is_err() {
                        cancelled = true;
                        break;
                    }
                    keepalive.as_mut().reset(TInstant::now() + KEEPALIVE);
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    if !message.is_empty() && tx.send(Ok(ExecEvent::Output { stream: OutputStream::Stderr, data: message })).await.is_err() {
                        cancelled = true;
                        break;
                    }
                    keepalive.as_mut().reset(TInstant::now() + KEEPALIVE);
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "exec output stream failed");
                    output_open = false;
                    if status.is_none() {
                        poll_timer.as_mut().reset(TInstant::now());
                    }
                }
                None => {
                    // The output closed: the main process has (almost certainly) exited.
                    output_open = false;
                    if status.is_none() {
                        poll_timer.as_mut().reset(TInstant::now());
                    }
                }
            },
            () = &mut poll_timer, if status.is_none() => {
                match poll().await {
                    Ok(Some(s)) => {
                        status = Some(s);
                        ended_at = Instant::now();
                        handle.done.send_replace(true);
                        drain.as_mut().reset(TInstant::now() + DRAIN_MAX);
                    }
                    Ok(None) => {
                        // Just after the output closed, the engine may not have recorded the
                        // exit yet: ask again soon.
                        let next = if !output_open && fast_polls < 40 {
                            fast_polls += 1;
                            Duration::from_millis(5)
                        } else {
                            POLL
                        };
                        poll_timer.as_mut().reset(TInstant::now() + next);
                    }
                    Err(e) => { failure = Some(e); break; }
                }
            }
            () = &mut timeout, if timeout_armed && status.is_none() => {
                timeout_armed = false;
                timed_out = true;
                handle.terminate(15, plan.grace, true);
            }
            () = &mut keepalive => {
                if tx.send(Ok(ExecEvent::Keepalive)).await.is_err() {
                    cancelled = true;
                    break;
                }
                keepalive.as_mut().reset(TInstant::now() + KEEPALIVE);
            }
            () = tx.closed() => {
                cancelled = true;
                break;
            }
            () = &mut drain, if status.is_some() => break,
        }
    }

    if cancelled {
        if status.is_none() {
            tracing::debug!(env = %env.id, "exec stream dropped: running the kill sequence");
            handle.terminate(15, plan.grace, true);
        }
    } else {
        let event = match (status, failure) {
            (Some((code, oom)), _) => {
                let sent = lock(&handle.sent).clone();
                let code = i32::try_from(code).unwrap_or(-1);
                let status = match sent.iter().rev().find(|s| code == 128 + **s) {
                    Some(sig) => ExitStatus::Signal(*sig),
                    None => ExitStatus::Code(code),
                };
                let files = collect(&env, &container, &plan.collect, plan.collect_limit).await;
                Ok(ExecEvent::Exited(Exited {
                    status,
                    oom_killed: oom,
                    timed_out,
                    files,
                    duration: ended_at.duration_since(plan.started),
                }))
            }
            (None, Some(e)) => Err(e),
            (None, None) => Err(Error::internal("the exec ended without a status")),
        };
        let _ = tx.send(event).await;
    }
    drop(tx);
    // Stdin of a finished process is of no use; free it unless a writer holds it.
    if let Some(stdin) = &handle.stdin
        && let Ok(mut s) = stdin.try_lock()
    {
        s.take();
    }
    if output_open {
        // Background processes still write: keep reading so they never block or get SIGPIPE.
        tokio::spawn(async move { while output.next().await.is_some() {} });
    }
}

/// SignalExec: the signal to the group now; SIGKILL after the grace if the main process still
/// runs.
pub(crate) async fn signal(backend: &DockerBackend, req: SignalRequest) -> Result<bool> {
    validate_id(&req.exec_id, "exec_id")?;
    if !(1..=64).contains(&req.signal) {
        return Err(Error::invalid_argument(format!("{} is not a signal number", req.signal))
            .field("signal"));
    }
    let handle = lock(&backend.inner.execs).get(&req.exec_id).cloned();
    let Some(handle) = handle else {
        if lock(&backend.inner.exec_ids).contains(&req.exec_id) {
            return Ok(false);
        }
        return Err(
            Error::not_found(format!("exec {:?} does not exist", req.exec_id)).field("exec_id")
        );
    };
    if handle.is_done() {
        return Ok(false);
    }
    let grace = if req.grace.is_zero() { DEFAULT_GRACE } else { req.grace };
    // Deliver before answering, then escalate in the background.
    handle.send(req.signal).await;
    if req.signal != 9 {
        let h = Arc::clone(&handle);
        tokio::spawn(async move {
            if !h.wait_done(grace).await {
                h.send(9).await;
            }
        });
    }
    Ok(true)
}

/// WriteStdin: copies the stream into the exec's stdin; its end closes stdin.
pub(crate) async fn write_stdin(
    backend: &DockerBackend,
    exec_id: String,
    mut data: kiln_plugin_sdk::ByteStream,
) -> Result<u64> {
    use tokio::io::AsyncWriteExt;
    validate_id(&exec_id, "exec_id")?;
    let handle = lock(&backend.inner.execs).get(&exec_id).cloned();
    let Some(handle) = handle else {
        if lock(&backend.inner.exec_ids).contains(&exec_id) {
            return Err(Error::failed_precondition(format!(
                "exec {exec_id:?} is no longer running"
            )));
        }
        return Err(Error::not_found(format!("exec {exec_id:?} does not exist")).field("exec_id"));
    };
    let Some(stdin) = &handle.stdin else {
        return Err(Error::failed_precondition(format!(
            "exec {exec_id:?} was not started with stdin"
        ))
        .field("exec_id"));
    };
    let mut guard = stdin.lock().await;
    let Some(pipe) = guard.as_mut() else {
        return Err(Error::failed_precondition(format!("the stdin of exec {exec_id:?} is closed")));
    };
    let mut written = 0u64;
    while let Some(chunk) = data.next().await {
        let chunk = chunk?;
        pipe.write_all(&chunk).await.map_err(|e| {
            Error::failed_precondition(format!("writing the stdin of exec {exec_id:?}: {e}"))
        })?;
        written += chunk.len() as u64;
    }
    let _ = pipe.flush().await;
    let _ = pipe.shutdown().await;
    guard.take();
    Ok(written)
}
