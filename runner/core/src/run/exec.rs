//! One process of a step, run as ONE Exec: the script and the empty environment files are
//! staged by the request and come back in the terminal frame (a step is one round trip). The
//! output is split into lines, workflow commands interpreted and secrets masked
//! ([`LineHandler`]); the environment files are applied to the job's [`JobProgress`]. Below
//! `step`, `action` and `docker_step`; above `report`, `state` and `context`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use indexmap::IndexMap;
use kiln_plugin_sdk::{
    CollectedFile, EnvVar, ExecEvent, ExecRequest, ExitStatus, Exited, OutputStream, StagedFile,
};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::state::{ExecPlan, JobProgress, StepContext, StepOutcome, StepRef};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{self, AnnotationLevel, CommandProcessor};

/// Bound on each collected env file returned inline; longer ones are fetched with CopyOut.
const COLLECT_LIMIT: u64 = 1024 * 1024;
/// At most this many output frames that are already there are taken together.
const OUTPUT_BURST: usize = 64;
/// Plain output lines are sent to the sink when this many bytes are gathered (or sooner).
const BATCH_MAX: usize = 128 * 1024;

static EXEC_COUNTER: AtomicU64 = AtomicU64::new(0);
static EXEC_NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A new exec id, unique for this runner process (and, by its random part, across runners).
pub(crate) fn exec_id() -> String {
    let nonce = EXEC_NONCE.get_or_init(crate::identity::short_nonce);
    format!("x{nonce}-{}", EXEC_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Runs one exec for a step: stages the script and fresh environment files, streams and
/// interprets the output, applies the environment files.
pub(crate) async fn exec_command(
    cx: &StepContext,
    state: &mut JobProgress,
    at: &StepRef<'_>,
    plan: ExecPlan,
) -> StepOutcome {
    let staged = stage(cx, state, at, plan);
    let (exec_id, timeout) = (staged.request.exec_id.clone(), staged.request.timeout);
    let mut lines = LineHandler {
        cx,
        index: at.index,
        processor: CommandProcessor::new(),
        allow_unsecure: staged.allow_unsecure,
        echo: false,
        outputs: Map::new(),
        saved_state: IndexMap::new(),
        state,
        stdout: Vec::new(),
        stderr: Vec::new(),
        batch: String::new(),
        masked: String::new(),
    };
    let ended = execute(cx, staged.request, &mut lines, &at.token(cx), timeout).await;
    lines.flush_partial();
    let mut outputs = std::mem::take(&mut lines.outputs);
    let mut saved_state = std::mem::take(&mut lines.saved_state);
    let (outcome, message) = match ended {
        Ok(exited) => {
            let files = exited.files;
            let message = collect_env_files(
                cx,
                lines.state,
                &staged.files,
                files,
                &mut outputs,
                &mut saved_state,
            )
            .await;
            let outcome = exit_outcome(&mut lines, exited.status, exited.timed_out, timeout);
            (if message.is_some() { Outcome::Failure } else { outcome }, message)
        }
        Err(StepError::Cancelled) => {
            (Outcome::Cancelled, Some(format!("step cancelled (exec {exec_id})")))
        }
        Err(StepError::Backend(e)) => (
            Outcome::Failure,
            Some(format!("backend {:?} failed while running step {:?}: {e}", cx.plugin, at.name)),
        ),
    };
    StepOutcome { outcome, outputs, saved_state, message }
}

/// An exec request with its staged files, ready to send.
struct Staged {
    request: ExecRequest,
    /// The environment files: env, output, path, state, summary.
    files: [String; 5],
    /// `ACTIONS_ALLOW_UNSECURE_COMMANDS=true`: `set-env` and `add-path` are allowed.
    allow_unsecure: bool,
}

/// The exec request of a step's process: the script and the empty env files staged, the
/// environment (base, `env` context, extra, the env files' paths), secrets marked.
fn stage(cx: &StepContext, state: &JobProgress, at: &StepRef<'_>, plan: ExecPlan) -> Staged {
    // The same files for every step of the job (steps run one at a time): staging truncates
    // them instead of creating new ones, and a new inode per file and step was most of a
    // step's cost on the host backend (ext4 allocating inodes after many deletions).
    let dir = format!("{}/step", cx.env.paths.runner_files.trim_end_matches('/'));
    let files = ["env", "output", "path", "state", "summary"].map(|f| format!("{dir}/{f}"));
    let mut staged: Vec<StagedFile> = Vec::with_capacity(6);
    let mut argv = plan.argv;
    if let Some((extension, script)) = plan.script {
        let script_path = format!("{dir}/script{extension}");
        for a in &mut argv {
            *a = a.replace("{0}", &script_path);
        }
        staged.push(StagedFile {
            path: script_path,
            content: Bytes::from(script.into_bytes()),
            mode: 0o755,
        });
    }
    staged.extend(files.iter().map(|f| StagedFile {
        path: f.clone(),
        content: Bytes::new(),
        mode: 0o644,
    }));

    let mut env = cx.base_env.clone();
    env.extend(plan.env_ctx);
    env.extend(plan.extra_env);
    for (k, f) in [
        ("GITHUB_ENV", &files[0]),
        ("GITHUB_OUTPUT", &files[1]),
        ("GITHUB_PATH", &files[2]),
        ("GITHUB_STATE", &files[3]),
        ("GITHUB_STEP_SUMMARY", &files[4]),
    ] {
        env.insert(k.into(), f.clone());
    }
    env.insert("GITHUB_ACTION".into(), at.key.to_owned());
    let allow_unsecure = env.get("ACTIONS_ALLOW_UNSECURE_COMMANDS").is_some_and(|v| v == "true");
    let secrets = &cx.shared.opts.secrets;
    let env_vars: Vec<EnvVar> = env
        .into_iter()
        .map(|(name, value)| {
            let secret = !value.is_empty() && secrets.values().any(|s| s == &value);
            EnvVar { name, value, secret }
        })
        .collect();
    let request = ExecRequest {
        exec_id: exec_id(),
        environment_id: cx.env.id.clone(),
        container_id: cx.container_id.clone(),
        argv,
        env: env_vars,
        path_prepend: state.path_accum.clone(),
        working_dir: plan.working_dir,
        files: staged,
        collect: files.to_vec(),
        collect_limit_bytes: COLLECT_LIMIT,
        stdin: false,
        tty: false,
        timeout: plan.timeout,
        grace: Duration::from_secs(5),
    };
    Staged { request, files, allow_unsecure }
}

/// The outcome of an exited process (the env files were read fine), logged when not 0.
fn exit_outcome(
    lines: &mut LineHandler<'_>,
    status: ExitStatus,
    timed_out: bool,
    timeout: Option<Duration>,
) -> Outcome {
    match (status, timed_out) {
        (_, true) => {
            lines.state_log(format!(
                "the step exceeded its timeout of {} and was stopped",
                crate::output::fmt_duration(timeout.unwrap_or_default())
            ));
            Outcome::Failure
        }
        (ExitStatus::Code(0), _) => Outcome::Success,
        (ExitStatus::Code(c), _) => {
            lines.state_log(format!("the process exited with code {c}"));
            Outcome::Failure
        }
        (ExitStatus::Signal(s), _) => {
            lines.state_log(format!("the process was killed by signal {s}"));
            Outcome::Failure
        }
    }
}

enum StepError {
    Cancelled,
    Backend(kiln_plugin_sdk::Error),
}

/// Runs the exec and feeds its output to `lines`, until the terminal frame.
async fn execute(
    cx: &StepContext,
    request: ExecRequest,
    lines: &mut LineHandler<'_>,
    token: &CancellationToken,
    timeout: Option<Duration>,
) -> Result<Exited, StepError> {
    let exec_id = request.exec_id.clone();
    let mut stream = tokio::select! {
        s = cx.backend.exec(request) => s.map_err(StepError::Backend)?,
        _ = token.cancelled() => return Err(StepError::Cancelled),
    };
    // A runner-side bound in case the plugin does not enforce the timeout.
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t + Duration::from_secs(10));
    // An event taken from the stream while draining a burst of output, handled next.
    let mut ready = None;
    loop {
        let next = if let Some(event) = ready.take() {
            event
        } else {
            tokio::select! {
                e = stream.next() => e,
                _ = token.cancelled() => {
                    // Dropping the stream kills the process group (SIGTERM, grace, SIGKILL); say so
                    // explicitly too, from this connection.
                    let _ = cx.backend.signal_exec(kiln_plugin_sdk::SignalRequest {
                        exec_id: exec_id.clone(),
                        signal: 15,
                        grace: Duration::from_secs(2),
                    }).await;
                    return Err(StepError::Cancelled);
                }
                _ = sleep_until(deadline) => {
                    let _ = cx.backend.signal_exec(kiln_plugin_sdk::SignalRequest {
                        exec_id: exec_id.clone(),
                        signal: 9,
                        grace: Duration::ZERO,
                    }).await;
                    return Err(StepError::Backend(kiln_plugin_sdk::Error::new(
                        kiln_plugin_sdk::Code::DeadlineExceeded,
                        "the step outlived its timeout and was killed by the runner",
                    )));
                }
            }
        };
        match next {
            Some(Ok(ExecEvent::Output { stream: which, data })) => {
                lines.feed(which, &data);
                // The frames already received join this one, so a burst of output is one
                // batch for the sink and one write to the console.
                for _ in 0..OUTPUT_BURST {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(ExecEvent::Output { stream: which, data }))) => {
                            lines.feed(which, &data);
                        }
                        Some(event) => {
                            ready = Some(event);
                            break;
                        }
                        None => break,
                    }
                }
                lines.flush_batch();
                cx.shared.sink.flush();
            }
            Some(Ok(ExecEvent::Exited(exited))) => return Ok(exited),
            Some(Ok(ExecEvent::Started | ExecEvent::Keepalive)) => {}
            Some(Err(e)) => return Err(StepError::Backend(e)),
            None => {
                return Err(StepError::Backend(kiln_plugin_sdk::Error::unavailable(
                    "the exec stream ended without an exit status",
                )));
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => futures::future::pending().await,
    }
}

/// Reads the environment files back (falling back to CopyOut for truncated ones) and applies
/// them. Returns an error message when one cannot be parsed.
async fn collect_env_files(
    cx: &StepContext,
    state: &mut JobProgress,
    paths: &[String; 5],
    files: Vec<CollectedFile>,
    outputs: &mut Map<String, Value>,
    saved_state: &mut IndexMap<String, String>,
) -> Option<String> {
    let mut contents: Vec<String> = vec![String::new(); 5];
    for f in files {
        let Some(i) = paths.iter().position(|p| *p == f.path) else { continue };
        let data = if f.truncated {
            match copy_out_file(cx, &f.path).await {
                Ok(d) => d,
                Err(e) => return Some(format!("reading {}: {e}", f.path)),
            }
        } else {
            f.content.to_vec()
        };
        contents[i] = String::from_utf8_lossy(&data).into_owned();
    }
    let mut error = None;
    match workflow::parse_env_file(&contents[0]) {
        Ok(pairs) => {
            for (k, v) in pairs {
                state.env_accum.insert(k, v);
            }
        }
        Err(e) => error = Some(format!("GITHUB_ENV: {e}")),
    }
    match workflow::parse_env_file(&contents[1]) {
        Ok(pairs) => {
            for (k, v) in pairs {
                outputs.insert(k, Value::String(v));
            }
        }
        Err(e) => error = Some(format!("GITHUB_OUTPUT: {e}")),
    }
    match workflow::parse_env_file(&contents[3]) {
        Ok(pairs) => saved_state.extend(pairs),
        Err(e) => error = Some(format!("GITHUB_STATE: {e}")),
    }
    for p in workflow::parse_path_file(&contents[2]).into_iter().rev() {
        state.path_accum.insert(0, p);
    }
    if !contents[4].is_empty() {
        state.summary.push_str(&contents[4]);
        if !contents[4].ends_with('\n') {
            state.summary.push('\n');
        }
    }
    error
}

pub(crate) async fn copy_out_file(cx: &StepContext, path: &str) -> Result<Vec<u8>, String> {
    let mut stream = cx
        .backend
        .copy_out(kiln_plugin_sdk::CopyOutSource {
            environment_id: cx.env.id.clone(),
            container_id: cx.container_id.clone(),
            path: path.to_owned(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut tar_bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        tar_bytes.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut entries = archive.entries().map_err(|e| e.to_string())?;
    let mut entry = entries.next().ok_or("empty archive")?.map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut data).map_err(|e| e.to_string())?;
    Ok(data)
}

/// Splits output into lines and interprets each: workflow commands, masking, groups.
///
/// Plain output lines (the hot path) are gathered in `batch`, masked together and handed to the
/// sink as one block, with no allocation per line; any other line first sends the block, so
/// the order of lines and the masks in force for each stay as written.
struct LineHandler<'a> {
    cx: &'a StepContext,
    index: usize,
    processor: CommandProcessor,
    allow_unsecure: bool,
    echo: bool,
    outputs: Map<String, Value>,
    saved_state: IndexMap<String, String>,
    state: &'a mut JobProgress,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Plain output lines not sent yet, each ending in a line feed, not masked.
    batch: String,
    /// `batch` masked (kept for its capacity).
    masked: String,
}

impl LineHandler<'_> {
    fn feed(&mut self, stream: OutputStream, data: &[u8]) {
        let mut buf = std::mem::take(match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        });
        let mut rest = data;
        if !buf.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    buf.extend_from_slice(&rest[..i]);
                    self.line(&buf);
                    buf.clear();
                    rest = &rest[i + 1..];
                }
                None => {
                    buf.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
        let mut start = 0;
        for i in memchr::memchr_iter(b'\n', rest) {
            self.line(&rest[start..i]);
            start = i + 1;
        }
        buf.extend_from_slice(&rest[start..]);
        match stream {
            OutputStream::Stdout => self.stdout = buf,
            OutputStream::Stderr => self.stderr = buf,
        }
    }

    fn flush_partial(&mut self) {
        for buf in [std::mem::take(&mut self.stdout), std::mem::take(&mut self.stderr)] {
            if !buf.is_empty() {
                self.line(&buf);
            }
        }
        self.flush_batch();
    }

    /// Sends the gathered plain lines to the sink.
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let block = if self.state.masker.is_empty() {
            &self.batch
        } else {
            self.masked.clear();
            self.state.masker.mask_into(&self.batch, &mut self.masked);
            &self.masked
        };
        self.cx.shared.sink.output(&self.cx.job_name, self.index, block);
        self.batch.clear();
    }

    fn emit(&mut self, text: &str, kind: LineKind) {
        self.flush_batch();
        let text = self.state.masker.mask(text).into_owned();
        self.cx.shared.sink.event(Event::Line {
            job: self.cx.job_name.clone(),
            step: Some(self.index),
            text,
            kind,
        });
    }

    fn state_log(&mut self, text: String) {
        self.emit(&text, LineKind::RunnerError);
    }

    fn line(&mut self, raw: &[u8]) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        // Fast path: a line with no "::" and no "##[" cannot be a command.
        if is_plain(raw) {
            match std::str::from_utf8(raw) {
                Ok(text) => self.batch.push_str(text),
                Err(_) => self.batch.push_str(&String::from_utf8_lossy(raw)),
            }
            self.batch.push('\n');
            if self.batch.len() >= BATCH_MAX {
                self.flush_batch();
            }
            return;
        }
        // Whatever this line does (a mask, an annotation) comes after the lines before it.
        self.flush_batch();
        let text = String::from_utf8_lossy(raw);
        let kind = self.processor.process(&text);
        if self.echo && !matches!(kind, workflow::LineKind::Output(_)) {
            self.emit(&text, LineKind::Output);
        }
        match kind {
            workflow::LineKind::Output(s) => self.emit(&s, LineKind::Output),
            workflow::LineKind::AddMask(v) => self.state.masker.add(&v),
            workflow::LineKind::Group(t) => self.emit(&t, LineKind::Group),
            workflow::LineKind::EndGroup => self.emit("", LineKind::EndGroup),
            workflow::LineKind::Debug(m) => self.emit(&m, LineKind::Debug),
            workflow::LineKind::Annotation(a) => {
                let location = a.file.as_ref().map(|f| {
                    let mut l = f.clone();
                    if let Some(line) = &a.line {
                        l.push_str(&format!(":{line}"));
                        if let Some(col) = &a.col {
                            l.push_str(&format!(":{col}"));
                        }
                    }
                    l
                });
                let level: AnnotationLevel = a.level;
                let text = self.state.masker.mask(&a.message).into_owned();
                self.cx.shared.sink.event(Event::Line {
                    job: self.cx.job_name.clone(),
                    step: Some(self.index),
                    text,
                    kind: LineKind::Annotation { level, location, title: a.title.clone() },
                });
            }
            workflow::LineKind::SetOutput { name, value } => {
                self.outputs.insert(name, Value::String(value));
            }
            workflow::LineKind::SaveState { name, value } => {
                self.saved_state.insert(name, value);
            }
            workflow::LineKind::SetEnv { name, value } => {
                if self.allow_unsecure {
                    self.state.env_accum.insert(name, value);
                } else {
                    self.emit(
                        "the set-env command is disabled; write to $GITHUB_ENV, or set ACTIONS_ALLOW_UNSECURE_COMMANDS=true",
                        LineKind::RunnerError,
                    );
                }
            }
            workflow::LineKind::AddPath(p) => {
                if self.allow_unsecure {
                    self.state.path_accum.insert(0, p);
                } else {
                    self.emit(
                        "the add-path command is disabled; write to $GITHUB_PATH, or set ACTIONS_ALLOW_UNSECURE_COMMANDS=true",
                        LineKind::RunnerError,
                    );
                }
            }
            workflow::LineKind::Echo(on) => self.echo = on,
            workflow::LineKind::StopCommands(_) | workflow::LineKind::ResumeCommands => {}
            workflow::LineKind::Invalid { line, message } => {
                self.emit(&line, LineKind::Output);
                self.emit(&message, LineKind::RunnerError);
            }
        }
    }
}

/// Whether a line cannot be a workflow command: it holds neither `::` nor `##[`.
fn is_plain(line: &[u8]) -> bool {
    memchr::memchr2_iter(b':', b'#', line).all(|i| match line[i] {
        b':' => line.get(i + 1) != Some(&b':'),
        _ => !line[i + 1..].starts_with(b"#["),
    })
}
