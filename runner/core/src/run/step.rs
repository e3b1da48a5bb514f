//! One `run:` step: its `if`, env, shell and script, executed as ONE Exec that stages the script
//! and the empty environment files and brings their contents back in the terminal frame
//! (rule 7). Output is split into lines, workflow commands are interpreted, secrets masked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use indexmap::IndexMap;
use kiln_plugin_sdk::{
    Backend, CollectedFile, EnvVar, Environment, ExecEvent, ExecRequest, ExitStatus, Exited,
    OutputStream, StagedFile,
};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::job::{JobState, eval_env};
use super::{Shared, Timer, to_obj};
use crate::expr::{self, JobStatus, Scope};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{
    self, AnnotationLevel, BoolOrExpr, CommandProcessor, Defaults, NumberOrExpr, Step,
};

/// Bound on each collected env file returned inline; longer ones are fetched with CopyOut.
const COLLECT_LIMIT: u64 = 1024 * 1024;

/// What every step of a job shares.
pub(crate) struct StepContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) job_name: String,
    pub(crate) job_id: String,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) plugin: String,
    pub(crate) env: Environment,
    pub(crate) container_id: String,
    /// The container's own environment plus GitHub's default variables.
    pub(crate) base_env: IndexMap<String, String>,
    /// Workflow and job `env`, evaluated.
    pub(crate) env_ctx: IndexMap<String, String>,
    pub(crate) bash_available: bool,
    /// Where `hashFiles` looks: the environment's workspace when the plugin shares our
    /// filesystem (feature local_copy), else the local source of the workspace.
    pub(crate) hash_root: Option<std::path::PathBuf>,
    pub(crate) workflow_defaults: Option<Defaults>,
    pub(crate) job_defaults: Option<Defaults>,
}

static EXEC_COUNTER: AtomicU64 = AtomicU64::new(0);
static EXEC_NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A new exec id, unique for this runner process (and, by its random part, across runners).
pub(crate) fn exec_id() -> String {
    let nonce = EXEC_NONCE.get_or_init(crate::identity::short_nonce);
    format!("x{nonce}-{}", EXEC_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A status host for step expressions.
struct StepHost<'a> {
    status: JobStatus,
    workspace: Option<&'a std::path::Path>,
}

impl expr::Host for StepHost<'_> {
    fn job_status(&self) -> JobStatus {
        self.status
    }
    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        match self.workspace {
            Some(w) => expr::hash_files_in(w, patterns),
            None => Err("hashFiles needs a local workspace".into()),
        }
    }
}

fn step_display_name(step: &Step, index: usize) -> String {
    if let Some(name) = &step.name {
        return name.clone();
    }
    if let Some(run) = &step.run {
        let first = run.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return format!("Run {first}");
    }
    if let Some(uses) = &step.uses {
        return format!("Run {uses}");
    }
    format!("step {}", index + 1)
}

/// Runs one step and records it in `state` and the `steps` context.
pub(crate) async fn run_step(
    cx: &StepContext,
    state: &mut JobState,
    contexts: &mut Map<String, Value>,
    index: usize,
    step: &Step,
    job_cancel: &CancellationToken,
) {
    let timer = Timer::start();
    let sink = &cx.shared.sink;
    let wf_file = &cx.shared.opts.workflow.file;
    let key = step.id.clone().unwrap_or_else(|| format!("__{index}"));
    let mut name = step_display_name(step, index);
    let cancelled = job_cancel.is_cancelled();
    let status = if cancelled { JobStatus::Cancelled } else { state.status };
    let workspace_local = cx.hash_root.as_deref();
    let host = StepHost { status, workspace: workspace_local };

    contexts.insert("steps".into(), Value::Object(state.steps.clone()));
    contexts.insert(
        "job".into(),
        json!({ "status": match status { JobStatus::Success => "success", JobStatus::Failure => "failure", JobStatus::Cancelled => "cancelled" }, "container": {}, "services": {} }),
    );
    // env context: workflow + job env, GITHUB_ENV, then the step's own.
    let mut env_ctx = cx.env_ctx.clone();
    env_ctx.extend(state.env_accum.iter().map(|(k, v)| (k.clone(), v.clone())));
    contexts.insert("env".into(), to_obj(&env_ctx));
    let step_env = match eval_env(&step.env, contexts, &host) {
        Ok(m) => m,
        Err(e) => {
            return fail_step(
                cx,
                state,
                index,
                &key,
                &name,
                &timer,
                format!("{wf_file}: jobs.{}.steps[{index}].env: {e}", cx.job_id),
            );
        }
    };
    env_ctx.extend(step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    contexts.insert("env".into(), to_obj(&env_ctx));
    if let Some(n) = &step.name
        && expr::contains_expression(n)
        && let Ok(s) = expr::interpolate(n, &Scope { contexts, host: &host })
    {
        name = s;
    }

    // if.
    let cond = step.if_.as_deref().unwrap_or("");
    let run_it = match expr::evaluate_if(cond, &Scope { contexts, host: &host }) {
        Ok(b) => b,
        Err(e) => {
            return fail_step(
                cx,
                state,
                index,
                &key,
                &name,
                &timer,
                format!("{wf_file}: jobs.{}.steps[{index}].if: {e}", cx.job_id),
            );
        }
    };
    if !run_it {
        state
            .steps
            .insert(key, json!({ "outputs": {}, "outcome": "skipped", "conclusion": "skipped" }));
        sink.event(Event::StepFinished {
            job: cx.job_name.clone(),
            index,
            name,
            outcome: Outcome::Skipped,
            conclusion: Outcome::Skipped,
            duration: Duration::ZERO,
        });
        return;
    }
    sink.event(Event::StepStarted { job: cx.job_name.clone(), index, name: name.clone() });

    let scope = Scope { contexts, host: &host };
    let continue_on_error = match &step.continue_on_error {
        None => false,
        Some(BoolOrExpr::Bool(b)) => *b,
        Some(BoolOrExpr::Expr(e)) => match expr::interpolate(e, &scope) {
            Ok(s) => s == "true",
            Err(e) => {
                return fail_step(
                    cx,
                    state,
                    index,
                    &key,
                    &name,
                    &timer,
                    format!("{wf_file}: jobs.{}.steps[{index}].continue-on-error: {e}", cx.job_id),
                );
            }
        },
    };
    let timeout = match &step.timeout_minutes {
        None => None,
        Some(NumberOrExpr::Number(n)) => Some(*n),
        Some(NumberOrExpr::Expr(e)) => match expr::interpolate(e, &scope) {
            Ok(s) => s.trim().parse::<f64>().ok(),
            Err(e) => {
                return fail_step(
                    cx,
                    state,
                    index,
                    &key,
                    &name,
                    &timer,
                    format!("{wf_file}: jobs.{}.steps[{index}].timeout-minutes: {e}", cx.job_id),
                );
            }
        },
    }
    .map(|m| Duration::from_secs_f64((m * 60.0).clamp(0.0, 1.0e9)));

    let Some(script) = &step.run else {
        let uses = step.uses.as_deref().unwrap_or("");
        return finish_step(
            cx,
            state,
            index,
            &key,
            &name,
            &timer,
            Outcome::Failure,
            continue_on_error,
            Map::new(),
            Some(format!("uses: {uses}: actions are not supported by this build of kiln yet")),
        );
    };
    let script = match expr::interpolate(script, &scope) {
        Ok(s) => s,
        Err(e) => {
            return fail_step(
                cx,
                state,
                index,
                &key,
                &name,
                &timer,
                format!("{wf_file}: jobs.{}.steps[{index}].run: {e}", cx.job_id),
            );
        }
    };
    let shell = step
        .shell
        .clone()
        .or_else(|| {
            cx.job_defaults.as_ref().and_then(|d| d.run.as_ref()).and_then(|r| r.shell.clone())
        })
        .or_else(|| {
            cx.workflow_defaults.as_ref().and_then(|d| d.run.as_ref()).and_then(|r| r.shell.clone())
        });
    let shell = match shell {
        Some(s) if expr::contains_expression(&s) => match expr::interpolate(&s, &scope) {
            Ok(s) => Some(s),
            Err(e) => {
                return fail_step(
                    cx,
                    state,
                    index,
                    &key,
                    &name,
                    &timer,
                    format!("{wf_file}: jobs.{}.steps[{index}].shell: {e}", cx.job_id),
                );
            }
        },
        s => s,
    };
    let spec = match workflow::shell_command(shell.as_deref(), cx.bash_available) {
        Ok(s) => s,
        Err(e) => {
            return fail_step(
                cx,
                state,
                index,
                &key,
                &name,
                &timer,
                format!("{wf_file}: jobs.{}.steps[{index}].shell: {e}", cx.job_id),
            );
        }
    };
    let working_dir = step
        .working_directory
        .clone()
        .or_else(|| {
            cx.job_defaults
                .as_ref()
                .and_then(|d| d.run.as_ref())
                .and_then(|r| r.working_directory.clone())
        })
        .or_else(|| {
            cx.workflow_defaults
                .as_ref()
                .and_then(|d| d.run.as_ref())
                .and_then(|r| r.working_directory.clone())
        });
    let working_dir = match working_dir {
        Some(w) => match expr::interpolate(&w, &scope) {
            Ok(w) if w.starts_with('/') => w,
            Ok(w) => format!(
                "{}/{}",
                cx.env.paths.workspace.trim_end_matches('/'),
                w.trim_start_matches("./")
            ),
            Err(e) => {
                return fail_step(
                    cx,
                    state,
                    index,
                    &key,
                    &name,
                    &timer,
                    format!("{wf_file}: jobs.{}.steps[{index}].working-directory: {e}", cx.job_id),
                );
            }
        },
        None => cx.env.paths.workspace.clone(),
    };

    // Files of this step: the script and fresh, empty environment files.
    let dir = format!("{}/steps/{index}", cx.env.paths.runner_files.trim_end_matches('/'));
    let script_path = format!("{dir}/script{}", spec.extension);
    let files = ["env", "output", "path", "state", "summary"].map(|f| format!("{dir}/{f}"));
    let mut staged = vec![StagedFile {
        path: script_path.clone(),
        content: Bytes::from(script.into_bytes()),
        mode: 0o755,
    }];
    staged.extend(files.iter().map(|f| StagedFile {
        path: f.clone(),
        content: Bytes::new(),
        mode: 0o644,
    }));

    let mut env = cx.base_env.clone();
    env.extend(env_ctx.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (k, f) in [
        ("GITHUB_ENV", &files[0]),
        ("GITHUB_OUTPUT", &files[1]),
        ("GITHUB_PATH", &files[2]),
        ("GITHUB_STATE", &files[3]),
        ("GITHUB_STEP_SUMMARY", &files[4]),
    ] {
        env.insert(k.into(), f.clone());
    }
    env.insert("GITHUB_ACTION".into(), key.clone());
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
        argv: spec.command(&script_path),
        env: env_vars,
        path_prepend: state.path_accum.clone(),
        working_dir,
        files: staged,
        collect: files.to_vec(),
        collect_limit_bytes: COLLECT_LIMIT,
        stdin: false,
        tty: false,
        timeout,
        grace: Duration::from_secs(5),
    };
    let exec_id = request.exec_id.clone();
    let mut lines = LineHandler {
        cx,
        index,
        processor: CommandProcessor::new(),
        allow_unsecure,
        echo: false,
        outputs: Map::new(),
        state,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };

    // The step's token: cancelled with the job, unless the job was already cancelled (then this
    // is an always()/cancelled() step, stopped only by the second interrupt).
    let token = if cancelled { cx.shared.force.clone() } else { job_cancel.clone() };
    let outcome = execute(cx, request, &mut lines, &token, timeout).await;
    lines.flush_partial();
    let mut outputs = std::mem::take(&mut lines.outputs);
    let (outcome, message) = match outcome {
        Ok(exited) => {
            let message =
                collect_env_files(cx, lines.state, &files, exited.files, &mut outputs).await;
            let outcome = match (exited.status, exited.timed_out) {
                (_, true) => {
                    lines.state_log(format!(
                        "the step exceeded its timeout of {} and was stopped",
                        crate::output::fmt_duration(timeout.unwrap_or_default())
                    ));
                    Outcome::Failure
                }
                (ExitStatus::Code(0), _) if message.is_none() => Outcome::Success,
                (ExitStatus::Code(0), _) => Outcome::Failure,
                (ExitStatus::Code(c), _) => {
                    lines.state_log(format!("the process exited with code {c}"));
                    Outcome::Failure
                }
                (ExitStatus::Signal(s), _) => {
                    lines.state_log(format!("the process was killed by signal {s}"));
                    Outcome::Failure
                }
            };
            (outcome, message)
        }
        Err(StepError::Cancelled) => {
            (Outcome::Cancelled, Some(format!("step cancelled (exec {exec_id})")))
        }
        Err(StepError::Backend(e)) => (
            Outcome::Failure,
            Some(format!("backend {:?} failed while running step {name:?}: {e}", cx.plugin)),
        ),
    };
    drop(lines);
    finish_step(
        cx,
        state,
        index,
        &key,
        &name,
        &timer,
        outcome,
        continue_on_error,
        outputs,
        message,
    );
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
    loop {
        let next = tokio::select! {
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
        };
        match next {
            Some(Ok(ExecEvent::Output { stream, data })) => {
                lines.feed(stream, &data);
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
    state: &mut JobState,
    paths: &[String; 5],
    files: Vec<CollectedFile>,
    outputs: &mut Map<String, Value>,
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

async fn copy_out_file(cx: &StepContext, path: &str) -> Result<Vec<u8>, String> {
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

#[allow(clippy::too_many_arguments)]
fn finish_step(
    cx: &StepContext,
    state: &mut JobState,
    index: usize,
    key: &str,
    name: &str,
    timer: &Timer,
    outcome: Outcome,
    continue_on_error: bool,
    outputs: Map<String, Value>,
    message: Option<String>,
) {
    if let Some(message) = message {
        let text = state.masker.mask(&message).into_owned();
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text,
            kind: LineKind::RunnerError,
        });
    }
    let conclusion =
        if outcome == Outcome::Failure && continue_on_error { Outcome::Success } else { outcome };
    match conclusion {
        Outcome::Failure => state.status = JobStatus::Failure,
        Outcome::Cancelled if state.status == JobStatus::Success => {
            state.status = JobStatus::Cancelled
        }
        _ => {}
    }
    state.steps.insert(
        key.to_owned(),
        json!({ "outputs": outputs, "outcome": outcome.as_str(), "conclusion": conclusion.as_str() }),
    );
    cx.shared.sink.event(Event::StepFinished {
        job: cx.job_name.clone(),
        index,
        name: name.to_owned(),
        outcome,
        conclusion,
        duration: timer.elapsed(),
    });
}

fn fail_step(
    cx: &StepContext,
    state: &mut JobState,
    index: usize,
    key: &str,
    name: &str,
    timer: &Timer,
    message: String,
) {
    cx.shared.sink.event(Event::StepStarted {
        job: cx.job_name.clone(),
        index,
        name: name.to_owned(),
    });
    finish_step(
        cx,
        state,
        index,
        key,
        name,
        timer,
        Outcome::Failure,
        false,
        Map::new(),
        Some(message),
    );
}

/// Splits output into lines and interprets each: workflow commands, masking, groups.
struct LineHandler<'a> {
    cx: &'a StepContext,
    index: usize,
    processor: CommandProcessor,
    allow_unsecure: bool,
    echo: bool,
    outputs: Map<String, Value>,
    state: &'a mut JobState,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl LineHandler<'_> {
    fn feed(&mut self, stream: OutputStream, data: &[u8]) {
        let mut buf = std::mem::take(match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        });
        let mut rest = data;
        if !buf.is_empty() {
            match memchr(rest) {
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
        while let Some(i) = memchr(rest) {
            self.line(&rest[..i]);
            rest = &rest[i + 1..];
        }
        buf.extend_from_slice(rest);
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
    }

    fn emit(&self, text: &str, kind: LineKind) {
        let text = self.state.masker.mask(text).into_owned();
        self.cx.shared.sink.event(Event::Line {
            job: self.cx.job_name.clone(),
            step: Some(self.index),
            text,
            kind,
        });
    }

    fn state_log(&self, text: String) {
        self.emit(&text, LineKind::RunnerError);
    }

    fn line(&mut self, raw: &[u8]) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = String::from_utf8_lossy(raw);
        // Fast path: a line with no "::" and no "##[" cannot be a command.
        if !text.contains("::") && !text.contains("##[") {
            self.emit(&text, LineKind::Output);
            return;
        }
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
            workflow::LineKind::SaveState { .. } => {}
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

fn memchr(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}
