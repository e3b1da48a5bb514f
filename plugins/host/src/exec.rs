//! Exec, the hot path: stage files, spawn one process in a new process group, stream its
//! output as it arrives, and end with exactly one `Exited` frame.
//!
//! The exec is finished when its main process exits (rule 6). Output is then drained while
//! it keeps coming, at most [`DRAIN_MAX`]; processes the step left in the background keep
//! running (their output is read and discarded, so they never get SIGPIPE) until the
//! environment is removed. Timeout and a dropped stream both mean SIGTERM to the group, the
//! grace period, then SIGKILL.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_plugin_sdk::{
    CollectedFile, Error, ExecEvent, ExecRequest, ExecStream, ExitStatus, Exited, OutputStream,
    Result,
};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, watch};

use crate::env::{Env, Group};
use crate::procs;

/// Size of the read buffer per output stream; one read is one `Output` frame.
const CHUNK: usize = 64 * 1024;
/// A quiet stream gets a keepalive this often.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// After the main process exits, output is drained until it has been quiet this long…
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// …but never longer than this.
const DRAIN_MAX: Duration = Duration::from_millis(500);
/// Grace between SIGTERM and SIGKILL when a request says 0.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// Bound per collected file when the request says 0.
const DEFAULT_COLLECT_LIMIT: u64 = 1024 * 1024;
/// Bound on all collected files of one exec, to keep the terminal frame under the gRPC
/// message limit.
const COLLECT_BUDGET: u64 = 8 * 1024 * 1024;
/// Events buffered between the exec task and the gRPC stream.
const CHANNEL: usize = 32;

/// A running or finished exec, reachable by id from any connection.
pub(crate) struct ExecHandle {
    pub(crate) env_id: String,
    pub(crate) pgid: i32,
    done: watch::Sender<bool>,
    /// The write end of stdin, with `ExecRequest::stdin`.
    pub(crate) stdin: Option<tokio::sync::Mutex<Option<ChildStdin>>>,
}

impl ExecHandle {
    /// Whether the main process has exited.
    pub(crate) fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    fn mark_done(&self) {
        self.done.send_replace(true);
    }

    /// Waits at most `within` for the main process to exit; returns whether it did.
    pub(crate) async fn wait_done(&self, within: Duration) -> bool {
        let mut rx = self.done.subscribe();
        matches!(tokio::time::timeout(within, rx.wait_for(|d| *d)).await, Ok(Ok(_)))
    }
}

/// The grace a request asked for, or the default when it said 0.
pub(crate) fn grace_or_default(grace: Duration) -> Duration {
    if grace.is_zero() { DEFAULT_GRACE } else { grace }
}

/// SIGTERM to the group now; SIGKILL to the group after `grace` if the main process still
/// runs, or if other members are still there then (timeout and cancellation end the whole
/// step).
pub(crate) fn terminate(handle: &Arc<ExecHandle>, grace: Duration) {
    procs::signal_group(handle.pgid, Signal::SIGTERM);
    let handle = Arc::clone(handle);
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        if !handle.wait_done(grace).await {
            procs::signal_group(handle.pgid, Signal::SIGKILL);
            return;
        }
        tokio::time::sleep_until(start + grace).await;
        if procs::group_alive(handle.pgid) {
            procs::signal_group(handle.pgid, Signal::SIGKILL);
        }
    });
}

/// Checks that `path` is absolute, has no `..` and lies inside `dir` (lexically: the host
/// backend runs the workflow's own code as this user, so it is no boundary against it).
pub(crate) fn inside(dir: &Path, path: &str, field: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid_argument(format!("{field} {path:?} is not an absolute path"))
            .field(field));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid_argument(format!("{field} {path:?} contains '..'")).field(field));
    }
    if !p.starts_with(dir) {
        return Err(Error::permission_denied(format!(
            "{field} {path:?} is outside the environment's directory {}",
            dir.display()
        ))
        .field(field));
    }
    Ok(p.to_path_buf())
}

/// Everything the exec task needs after the spawn.
struct Plan {
    /// The environment's directory: staged and collected files stay beneath it.
    dir: PathBuf,
    collect: Vec<PathBuf>,
    collect_names: Vec<String>,
    collect_limit: u64,
    timeout: Option<Duration>,
    grace: Duration,
    started: Instant,
}

/// Validates the request against the environment, stages files, spawns the process and
/// starts the task that streams it. The exec id is reserved by the caller.
pub(crate) fn start(
    env: &Arc<Env>,
    req: ExecRequest,
    kernel_boot: &str,
    containment: &procs::Containment,
) -> Result<(Arc<ExecHandle>, ExecStream)> {
    if req.tty {
        // The host plugin does not declare `tty` (§3.3: refused, never ignored).
        return Err(Error::unimplemented(
            "tty = true: the host backend does not allocate pseudo-terminals (feature tty is not \
             declared)",
        )
        .fault(kiln_plugin_sdk::Fault::Config)
        .field("tty"));
    }
    let Some(program) = req.argv.first() else {
        return Err(Error::invalid_argument(
            "argv is empty: the host backend has no entrypoint to run",
        )
        .field("argv"));
    };
    let cwd = if req.working_dir.is_empty() {
        PathBuf::from(&env.meta.paths.workspace)
    } else {
        let p = PathBuf::from(&req.working_dir);
        if !p.is_absolute() {
            return Err(Error::invalid_argument(format!(
                "working_dir {:?} is not an absolute path",
                req.working_dir
            ))
            .field("working_dir"));
        }
        p
    };
    let mut collect = Vec::with_capacity(req.collect.len());
    for (i, c) in req.collect.iter().enumerate() {
        collect.push(inside(&env.dir, c, &format!("collect[{i}]"))?);
    }
    for (i, f) in req.files.iter().enumerate() {
        let path = inside(&env.dir, &f.path, &format!("files[{i}].path"))?;
        stage(&env.dir, &path, &f.content, f.mode).map_err(|e| {
            let field = format!("files[{i}].path");
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Error::permission_denied(format!("staging {}: {e}", path.display())).field(field)
            } else {
                Error::io(format!("staging {}", path.display()), &e).field(field)
            }
        })?;
    }

    let mut path = None;
    for v in &req.env {
        if v.name == "PATH" {
            path = Some(prepend_path(&req.path_prepend, &v.value));
        }
    }
    if path.is_none() && !req.path_prepend.is_empty() {
        path = Some(prepend_path(&req.path_prepend, ""));
    }
    // The program is looked up here, in the step's PATH, so that the child is started with
    // posix_spawn (vfork) instead of fork + execvp.
    let mut cmd = match path.as_deref().and_then(|p| lookup(program, p, &cwd)) {
        Some(found) => {
            let mut cmd = tokio::process::Command::new(found);
            cmd.arg0(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    };
    cmd.args(&req.argv[1..]).env_clear();
    for v in &req.env {
        if v.name != "PATH" {
            cmd.env(&v.name, &v.value);
        }
    }
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    cmd.current_dir(&cwd)
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);

    let plan = Plan {
        dir: env.dir.clone(),
        collect_names: req.collect.clone(),
        collect,
        collect_limit: if req.collect_limit_bytes == 0 {
            DEFAULT_COLLECT_LIMIT
        } else {
            req.collect_limit_bytes
        },
        timeout: req.timeout.filter(|t| !t.is_zero()),
        grace: grace_or_default(req.grace),
        started: Instant::now(),
    };

    let (tx, rx) = mpsc::channel(CHANNEL);
    let spawned = {
        let mut st = crate::lock(&env.state);
        if st.removed {
            return Err(Error::not_found(format!("environment {:?} was removed", env.id))
                .field("environment_id"));
        }
        match containment.spawn_in(&env.id, &env.dir, || cmd.spawn(), tokio::process::Child::id) {
            Ok(mut child) => {
                let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
                let start = procs::start_time(u32::try_from(pgid).unwrap_or(0));
                let handle = Arc::new(ExecHandle {
                    env_id: env.id.clone(),
                    pgid,
                    done: watch::Sender::new(false),
                    stdin: req.stdin.then(|| tokio::sync::Mutex::new(child.stdin.take())),
                });
                env.log_group(&mut st, pgid, start, kernel_boot, &req.exec_id);
                st.groups.push(Group { pgid, start, exec: Some(Arc::clone(&handle)) });
                Ok((child, handle))
            }
            Err(e) => Err(e),
        }
    };
    let _ = tx.try_send(Ok(ExecEvent::Started));
    let handle = match spawned {
        Ok((mut child, handle)) => {
            let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
                return Err(Error::internal("the child's output pipes are missing"));
            };
            tokio::spawn(drive(child, out, err, tx, Arc::clone(&handle), plan, Arc::clone(env)));
            handle
        }
        Err(e) => return spawn_failed(e, program, &cwd, tx, rx, plan, &env.id),
    };
    Ok((handle, Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
}

/// A process that could not start: like a shell, 127 when the program or the working
/// directory does not exist and 126 when it cannot be executed. Other failures (out of
/// processes or memory) are the infrastructure's.
fn spawn_failed(
    e: std::io::Error,
    program: &str,
    cwd: &Path,
    tx: mpsc::Sender<Result<ExecEvent>>,
    rx: mpsc::Receiver<Result<ExecEvent>>,
    plan: Plan,
    env_id: &str,
) -> Result<(Arc<ExecHandle>, ExecStream)> {
    let (code, message) = match e.kind() {
        std::io::ErrorKind::NotFound if !cwd.is_dir() => {
            (127, format!("kiln-host: working directory {} does not exist\n", cwd.display()))
        }
        std::io::ErrorKind::NotFound => (127, format!("kiln-host: {program}: command not found\n")),
        std::io::ErrorKind::PermissionDenied => {
            (126, format!("kiln-host: {program}: permission denied\n"))
        }
        _ => {
            return Err(Error::unavailable(format!("cannot start {program}: {e}")));
        }
    };
    let _ = tx.try_send(Ok(ExecEvent::Output {
        stream: OutputStream::Stderr,
        data: Bytes::from(message),
    }));
    let files = collect_files(&plan);
    let _ = tx.try_send(Ok(ExecEvent::Exited(Exited {
        status: ExitStatus::Code(code),
        oom_killed: false,
        timed_out: false,
        files,
        duration: plan.started.elapsed(),
    })));
    let (done, _) = watch::channel(true);
    let handle = Arc::new(ExecHandle { env_id: env_id.to_owned(), pgid: 0, done, stdin: None });
    Ok((handle, Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
}

fn prepend_path(prepend: &[String], path: &str) -> String {
    let mut out = prepend.join(":");
    if !path.is_empty() {
        if !out.is_empty() {
            out.push(':');
        }
        out.push_str(path);
    }
    out
}

/// The first executable regular file named `program` in `path`, as `execvp` would find it;
/// `None` when `program` holds a slash or is not found (the spawn then reports it). An empty
/// entry of `path` is the working directory.
fn lookup(program: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    if program.contains('/') || program.is_empty() {
        return None;
    }
    path.split(':').find_map(|dir| {
        let candidate =
            if dir.is_empty() { cwd.join(program) } else { Path::new(dir).join(program) };
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// Writes a staged file with exactly `mode` (0 = 0644), creating its parent directories,
/// never through a symlink (`kiln_plugin_sdk::beneath`: a link in a parent position is
/// refused, one at the path itself replaced).
///
/// An existing file (the runner stages the same paths step after step) is overwritten in
/// place and then cut to length, not truncated first: freeing its block and allocating a new
/// one each step costs more than the step's own process on some filesystems (ext4 with
/// `discard`).
fn stage(dir: &Path, path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
    kiln_plugin_sdk::beneath::write_file(dir, path, content, mode)
}

/// Reads the files to collect, each bounded by the request's limit and all by
/// [`COLLECT_BUDGET`].
fn collect_files(plan: &Plan) -> Vec<CollectedFile> {
    let mut budget = COLLECT_BUDGET;
    let mut out = Vec::with_capacity(plan.collect.len());
    for (path, name) in plan.collect.iter().zip(&plan.collect_names) {
        let limit = plan.collect_limit.min(budget);
        let mut file = CollectedFile { path: name.clone(), ..CollectedFile::default() };
        // Never through a symlink: a step that linked its GITHUB_ENV to a file outside the
        // environment gets it back missing.
        match kiln_plugin_sdk::beneath::read_file(&plan.dir, path, limit) {
            Ok(Some(mut buf)) => {
                if buf.len() as u64 > limit {
                    buf.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                    file.truncated = true;
                }
                budget -= buf.len() as u64;
                file.content = Bytes::from(buf);
            }
            Ok(None) => file.missing = true,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read collected file");
                file.missing = true;
            }
        }
        out.push(file);
    }
    out
}

/// Streams one process: output as it arrives, keepalives, timeout and cancellation, then the
/// terminal frame.
async fn drive(
    mut child: Child,
    mut out: ChildStdout,
    mut err: ChildStderr,
    tx: mpsc::Sender<Result<ExecEvent>>,
    handle: Arc<ExecHandle>,
    plan: Plan,
    env: Arc<Env>,
) {
    use tokio::time::Instant as TInstant;

    let mut obuf = vec![0u8; CHUNK];
    let mut ebuf = vec![0u8; CHUNK];
    let (mut out_open, mut err_open) = (true, true);
    let mut status: Option<std::process::ExitStatus> = None;
    let mut ended_at = plan.started;
    let mut pending: Option<ExecEvent> = None;
    let mut cancelled = false;
    let mut timed_out = false;
    let mut wait_error: Option<std::io::Error> = None;

    let now = TInstant::now();
    let far = now + Duration::from_secs(100 * 365 * 24 * 3600);
    let timeout = tokio::time::sleep_until(plan.timeout.map_or(far, |t| now + t));
    let keepalive = tokio::time::sleep_until(now + KEEPALIVE);
    let drain = tokio::time::sleep_until(far);
    tokio::pin!(timeout, keepalive, drain);
    let mut timeout_armed = plan.timeout.is_some();
    let mut drain_cap = far;
    let mut last_activity = now;

    loop {
        if (status.is_some() || wait_error.is_some()) && !out_open && !err_open && pending.is_none()
        {
            break;
        }
        // One output chunk becomes an event; a full channel parks it in `pending`, which
        // pauses reading (backpressure) without blocking the timers.
        let emit = |stream: OutputStream,
                    data: &[u8],
                    pending: &mut Option<ExecEvent>,
                    cancelled: bool| {
            if cancelled {
                return;
            }
            let ev = ExecEvent::Output { stream, data: Bytes::copy_from_slice(data) };
            // A closed channel is noticed by the `tx.closed()` branch, which terminates.
            if let Err(mpsc::error::TrySendError::Full(ev)) = tx.try_send(Ok(ev)) {
                *pending = ev.ok();
            }
        };
        tokio::select! {
            biased;
            res = child.wait(), if status.is_none() && wait_error.is_none() => {
                ended_at = Instant::now();
                handle.mark_done();
                match res {
                    Ok(s) => status = Some(s),
                    Err(e) => wait_error = Some(e),
                }
                if cancelled {
                    break;
                }
                let t = TInstant::now();
                drain_cap = t + DRAIN_MAX;
                drain.as_mut().reset((t + DRAIN_QUIET).min(drain_cap));
            }
            _ = tx.closed(), if !cancelled => {
                cancelled = true;
                pending = None;
                if status.is_some() {
                    break;
                }
                tracing::debug!(pgid = handle.pgid, "exec stream dropped: terminating the process group");
                terminate(&handle, plan.grace);
            }
            permit = tx.reserve(), if pending.is_some() && !cancelled => {
                if let (Ok(permit), Some(ev)) = (permit, pending.take()) {
                    permit.send(Ok(ev));
                }
            }
            r = out.read(&mut obuf), if out_open && pending.is_none() => {
                match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => emit(OutputStream::Stdout, &obuf[..n], &mut pending, cancelled),
                }
                last_activity = TInstant::now();
                if status.is_some() {
                    drain.as_mut().reset((last_activity + DRAIN_QUIET).min(drain_cap));
                }
            }
            r = err.read(&mut ebuf), if err_open && pending.is_none() => {
                match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => emit(OutputStream::Stderr, &ebuf[..n], &mut pending, cancelled),
                }
                last_activity = TInstant::now();
                if status.is_some() {
                    drain.as_mut().reset((last_activity + DRAIN_QUIET).min(drain_cap));
                }
            }
            () = &mut timeout, if timeout_armed && status.is_none() => {
                timeout_armed = false;
                timed_out = true;
                tracing::debug!(pgid = handle.pgid, "exec timed out: terminating the process group");
                terminate(&handle, plan.grace);
            }
            () = &mut keepalive => {
                let t = TInstant::now();
                if t >= last_activity + KEEPALIVE {
                    if pending.is_none() && !cancelled {
                        let _ = tx.try_send(Ok(ExecEvent::Keepalive));
                    }
                    last_activity = t;
                }
                keepalive.as_mut().reset(last_activity + KEEPALIVE);
            }
            () = &mut drain, if status.is_some() || wait_error.is_some() => break,
        }
    }

    if !cancelled {
        let event = match (status, wait_error) {
            (Some(s), _) => {
                let status = match (s.code(), s.signal()) {
                    (Some(c), _) => ExitStatus::Code(c),
                    (None, Some(sig)) => ExitStatus::Signal(sig),
                    (None, None) => ExitStatus::Code(-1),
                };
                Ok(ExecEvent::Exited(Exited {
                    status,
                    oom_killed: false,
                    timed_out,
                    files: collect_files(&plan),
                    duration: ended_at.duration_since(plan.started),
                }))
            }
            (None, Some(e)) => Err(Error::internal(format!("waiting for the process: {e}"))),
            (None, None) => Err(Error::internal("the process ended without a status")),
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
    if out_open || err_open {
        // Background processes still hold the pipes: keep reading so they never get SIGPIPE.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = out.read(&mut obuf), if out_open => if matches!(r, Ok(0) | Err(_)) { out_open = false },
                    r = err.read(&mut ebuf), if err_open => if matches!(r, Ok(0) | Err(_)) { err_open = false },
                    else => break,
                }
            }
            if !procs::group_alive(handle.pgid) {
                env.forget_group(handle.pgid);
            }
        });
    } else if !procs::group_alive(handle.pgid) {
        env.forget_group(handle.pgid);
    }
}
