//! Streaming one local child process as an `Exec`: output as it arrives, keepalives, the
//! timeout and a dropped stream (SIGTERM to the process tree, the grace period, SIGKILL), a
//! bounded drain after the main process exits, then exactly one `Exited` frame.
//!
//! For plugins whose exec is a process of this machine: the host plugin's own process, or a
//! front-end that enters a sandbox (`lxc-attach`, `nsenter`, …). How the process tree is
//! signalled is the plugin's business ([`ProcessTree`]): a process group of this machine, or
//! a group inside a container found through the front-end process.
//!
//! The exec is finished when the main process exits (rule 6). Output is then drained while it
//! keeps coming, at most [`DRAIN_MAX`]; processes the step left in the background keep running
//! (their output is read and discarded, so they never get SIGPIPE) until the environment is
//! removed.

use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, watch};

use crate::{
    ByteStream, CollectedFile, Error, ExecEvent, ExecStream, ExitStatus, Exited, OutputStream,
    Result,
};

/// Size of the read buffer per output stream; one read is one `Output` frame.
pub const CHUNK: usize = 64 * 1024;
/// A quiet stream gets a keepalive this often.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// After the main process exits, output is drained until it has been quiet this long…
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// …but never longer than this.
pub const DRAIN_MAX: Duration = Duration::from_millis(500);
/// Grace between SIGTERM and SIGKILL when a request says 0.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// Bound per collected file when the request says 0.
pub const DEFAULT_COLLECT_LIMIT: u64 = 1024 * 1024;
/// Bound on all collected files of one exec, to keep the terminal frame under the gRPC message
/// limit.
pub const COLLECT_BUDGET: u64 = 8 * 1024 * 1024;
/// Events buffered between the exec task and the gRPC stream.
const CHANNEL: usize = 32;

/// The grace a request asked for, or [`DEFAULT_GRACE`] when it said 0.
pub fn grace_or_default(grace: Duration) -> Duration {
    if grace.is_zero() { DEFAULT_GRACE } else { grace }
}

/// The per-file bound a request asked for, or [`DEFAULT_COLLECT_LIMIT`] when it said 0.
pub fn collect_limit_or_default(limit: u64) -> u64 {
    if limit == 0 { DEFAULT_COLLECT_LIMIT } else { limit }
}

/// The processes of one exec, as the plugin signals them.
pub trait ProcessTree: Send + Sync + 'static {
    /// Sends `signal` to every process of the tree; whether any received it.
    fn signal(&self, signal: Signal) -> bool;
    /// Whether a process of the tree is still alive (zombies do not count).
    fn alive(&self) -> bool;
}

/// A running or finished exec, reachable by id from any connection.
pub struct ExecHandle {
    tree: Arc<dyn ProcessTree>,
    done: watch::Sender<bool>,
    /// Signals sent to the tree, so `128 + n` exit codes can be reported as signal `n`.
    sent: Mutex<Vec<i32>>,
    /// The write end of stdin, with `ExecRequest::stdin`.
    stdin: Option<tokio::sync::Mutex<Option<ChildStdin>>>,
}

impl std::fmt::Debug for ExecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHandle").field("done", &self.is_done()).finish_non_exhaustive()
    }
}

impl ExecHandle {
    /// A handle for a process tree; `stdin` is the child's stdin when the request asked for it.
    pub fn new(tree: Arc<dyn ProcessTree>, stdin: Option<ChildStdin>) -> Arc<ExecHandle> {
        Arc::new(ExecHandle {
            tree,
            done: watch::Sender::new(false),
            sent: Mutex::new(Vec::new()),
            stdin: stdin.map(|s| tokio::sync::Mutex::new(Some(s))),
        })
    }

    /// A handle of an exec whose process never started (already done).
    pub fn finished(tree: Arc<dyn ProcessTree>) -> Arc<ExecHandle> {
        let h = ExecHandle::new(tree, None);
        h.mark_done();
        h
    }

    /// The process tree.
    pub fn tree(&self) -> &Arc<dyn ProcessTree> {
        &self.tree
    }

    /// Whether the main process has exited.
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    fn mark_done(&self) {
        self.done.send_replace(true);
    }

    /// Waits at most `within` for the main process to exit; returns whether it did.
    pub async fn wait_done(&self, within: Duration) -> bool {
        let mut rx = self.done.subscribe();
        matches!(tokio::time::timeout(within, rx.wait_for(|d| *d)).await, Ok(Ok(_)))
    }

    fn send(&self, signal: Signal) -> bool {
        self.sent.lock().unwrap_or_else(PoisonError::into_inner).push(signal as i32);
        self.tree.signal(signal)
    }

    /// `SignalExec`: `signal` to the tree now and, unless it is SIGKILL, SIGKILL after `grace`
    /// if the main process still runs. Returns whether it was delivered (false once the
    /// main process has exited).
    pub fn signal(self: &Arc<Self>, signal: Signal, grace: Duration) -> bool {
        if self.is_done() || !self.send(signal) {
            return false;
        }
        if signal != Signal::SIGKILL {
            let handle = Arc::clone(self);
            let grace = grace_or_default(grace);
            tokio::spawn(async move {
                if !handle.wait_done(grace).await {
                    handle.send(Signal::SIGKILL);
                }
            });
        }
        true
    }

    /// Timeout and cancellation: SIGTERM to the tree now; SIGKILL after `grace` if the main
    /// process still runs, or if other members are still there then (they end the whole step).
    pub fn terminate(self: &Arc<Self>, grace: Duration) {
        self.send(Signal::SIGTERM);
        let handle = Arc::clone(self);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            if !handle.wait_done(grace).await {
                handle.send(Signal::SIGKILL);
                return;
            }
            tokio::time::sleep_until(start + grace).await;
            if handle.tree.alive() {
                handle.send(Signal::SIGKILL);
            }
        });
    }

    /// `WriteStdin`: copies `data` to the process's stdin, then closes it.
    pub async fn write_stdin(&self, exec_id: &str, mut data: ByteStream) -> Result<u64> {
        let Some(stdin) = &self.stdin else {
            return Err(Error::failed_precondition(format!(
                "exec {exec_id:?} was not started with stdin"
            ))
            .field("exec_id"));
        };
        let mut guard = stdin.lock().await;
        let Some(pipe) = guard.as_mut() else {
            return Err(Error::failed_precondition(format!(
                "the stdin of exec {exec_id:?} is closed"
            )));
        };
        let mut written = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            pipe.write_all(&chunk).await.map_err(|e| {
                Error::failed_precondition(format!("writing the stdin of exec {exec_id:?}: {e}"))
            })?;
            written += chunk.len() as u64;
        }
        // The end of the stream is the end of input (the client's `eof` frame ends it).
        let _ = pipe.shutdown().await;
        guard.take();
        Ok(written)
    }

    /// The status to report for a process that ended with `status`: with `fold`, an exit code
    /// `128 + n` after this plugin sent signal `n` is reported as that signal (front-ends such
    /// as `lxc-attach` or `docker exec` report a signalled process that way).
    fn status(&self, status: std::process::ExitStatus, fold: bool) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) if fold => {
                let sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
                match sent.iter().rev().find(|s| c == 128 + **s) {
                    Some(s) => ExitStatus::Signal(*s),
                    None => ExitStatus::Code(c),
                }
            }
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(-1),
        }
    }
}

/// Reads up to `limit` bytes of `file`; whether it was longer.
pub fn read_bounded(file: impl Read, limit: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    file.take(limit + 1).read_to_end(&mut buf)?;
    let truncated = buf.len() as u64 > limit;
    if truncated {
        buf.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    Ok((buf, truncated))
}

/// Collected files from opened files (`None` = missing), each bounded by `limit` and all by
/// [`COLLECT_BUDGET`], in the request's order.
pub fn collect_files(
    files: impl IntoIterator<Item = (String, Option<std::fs::File>)>,
    limit: u64,
) -> Vec<CollectedFile> {
    let mut budget = COLLECT_BUDGET;
    let mut out = Vec::new();
    for (name, file) in files {
        let mut c = CollectedFile { path: name, ..CollectedFile::default() };
        match file.map(|f| read_bounded(f, limit.min(budget))) {
            Some(Ok((content, truncated))) => {
                budget -= content.len() as u64;
                c.truncated = truncated;
                c.content = Bytes::from(content);
            }
            Some(Err(e)) => {
                tracing::warn!(path = %c.path, error = %e, "cannot read collected file");
                c.missing = true;
            }
            None => c.missing = true,
        }
        out.push(c);
    }
    out
}

/// Reads the files to collect once the main process has exited.
pub type Collector = Box<dyn FnOnce() -> Vec<CollectedFile> + Send>;

/// How to drive one spawned child.
pub struct Plan {
    /// Kill the tree after this long (`None`: never).
    pub timeout: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// When the exec started (for `Exited::duration`).
    pub started: Instant,
    /// The collected files of the terminal frame.
    pub collect: Collector,
    /// Report `128 + n` after a sent signal `n` as that signal (see [`ExecHandle`]).
    pub fold_signal_codes: bool,
    /// Called once the tree is gone after the exec ended (when it is still there at the end,
    /// after the background processes closed their output).
    pub on_tree_gone: Option<Box<dyn FnOnce() + Send>>,
}

/// Streams `child` (spawned with piped stdout and stderr) under `handle`: sends `Started` and
/// starts the task that drives it. The stream ends with exactly one `Exited` frame or an
/// error, unless it was dropped (then the tree is terminated).
pub fn stream(mut child: Child, handle: Arc<ExecHandle>, plan: Plan) -> Result<ExecStream> {
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::internal("the child's output pipes are missing"));
    };
    let (tx, rx) = mpsc::channel(CHANNEL);
    let _ = tx.try_send(Ok(ExecEvent::Started));
    tokio::spawn(drive(child, out, err, tx, handle, plan));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// A stream of an exec whose process could not start: `message` on stderr, then `Exited` with
/// `code` (127 or 126, as a shell reports them) and the collected files.
pub fn not_started(code: i32, message: String, collect: Collector, started: Instant) -> ExecStream {
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.try_send(Ok(ExecEvent::Started));
    let _ =
        tx.try_send(Ok(ExecEvent::Output { stream: OutputStream::Stderr, data: message.into() }));
    let _ = tx.try_send(Ok(ExecEvent::Exited(Exited {
        status: ExitStatus::Code(code),
        oom_killed: false,
        timed_out: false,
        files: collect(),
        duration: started.elapsed(),
    })));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
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
                tracing::debug!("exec stream dropped: terminating the process tree");
                handle.terminate(plan.grace);
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
                tracing::debug!("exec timed out: terminating the process tree");
                handle.terminate(plan.grace);
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
            (Some(s), _) => Ok(ExecEvent::Exited(Exited {
                status: handle.status(s, plan.fold_signal_codes),
                oom_killed: false,
                timed_out,
                files: (plan.collect)(),
                duration: ended_at.duration_since(plan.started),
            })),
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
    let gone = plan.on_tree_gone;
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
            if let Some(gone) = gone
                && !handle.tree.alive()
            {
                gone();
            }
        });
    } else if let Some(gone) = gone
        && !handle.tree.alive()
    {
        gone();
    }
}
