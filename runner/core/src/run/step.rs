//! One `run:` step: its `if`, env, shell and script, executed as ONE Exec that stages the script
//! and the empty environment files and brings their contents back in the terminal frame
//! (rule 7). Output is split into lines, workflow commands are interpreted, secrets masked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
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
/// At most this many output frames that are already there are taken together.
const OUTPUT_BURST: usize = 64;
/// Plain output lines are sent to the sink when this many bytes are gathered (or sooner).
const BATCH_MAX: usize = 128 * 1024;

/// What every step of a job shares.
pub(crate) struct StepContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) job_name: String,
    pub(crate) job_id: String,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) plugin: String,
    pub(crate) env: Environment,
    pub(crate) container_id: String,
    /// `job.container` and `job.services` of the `job` context.
    pub(crate) job_context: Map<String, Value>,
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
    /// Where docker steps create their containers; `None` when the backend has no step
    /// containers.
    pub(crate) step_containers: Option<super::docker_step::StepContainerHost>,
}

static EXEC_COUNTER: AtomicU64 = AtomicU64::new(0);
static EXEC_NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A new exec id, unique for this runner process (and, by its random part, across runners).
pub(crate) fn exec_id() -> String {
    let nonce = EXEC_NONCE.get_or_init(crate::identity::short_nonce);
    format!("x{nonce}-{}", EXEC_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A status host for step expressions.
pub(crate) struct StepHost<'a> {
    pub(crate) status: JobStatus,
    pub(crate) workspace: Option<&'a std::path::Path>,
}

impl<'a> StepHost<'a> {
    pub(crate) fn new(status: JobStatus, workspace: Option<&'a std::path::Path>) -> Self {
        StepHost { status, workspace }
    }
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

/// Where a step runs: at the top of the job, or inside a composite action.
#[derive(Debug, Clone, Default)]
pub(crate) struct Frame {
    /// Inside a composite action: lifecycle shows as lines of the enclosing step.
    pub(crate) nested: bool,
    /// The env of the enclosing `uses:` steps (and `GITHUB_ACTION_PATH`).
    pub(crate) parent_env: IndexMap<String, String>,
    /// How many composite actions enclose this step.
    pub(crate) depth: usize,
    /// Inside a composite action: where this step is (`3/1` = step 1 of the action of the job's
    /// step 3), the key of what its `pre:` saved.
    pub(crate) position: String,
}

impl Frame {
    /// The position of the step at `index` seen from this frame.
    pub(crate) fn position_of(&self, index: usize) -> String {
        if self.position.is_empty() { index.to_string() } else { self.position.clone() }
    }
}

/// GitHub's limit on nested composite actions.
pub(crate) const MAX_COMPOSITE_DEPTH: usize = 10;

/// A post step registered by a node action's `post:` (or a docker action's
/// `post-entrypoint`), run after the main steps.
#[derive(Debug, Clone)]
pub(crate) struct PostStep {
    pub(crate) name: String,
    pub(crate) condition: String,
    pub(crate) argv: Vec<String>,
    pub(crate) env: IndexMap<String, String>,
    /// A docker action's post: run in a step container instead of `argv`.
    pub(crate) container: Option<Box<super::docker_step::DockerPost>>,
}

/// Runs one step and records it in `state` and the `steps` context.
pub(crate) fn run_step<'a>(
    cx: &'a StepContext,
    state: &'a mut JobState,
    contexts: &'a mut Map<String, Value>,
    index: usize,
    step: &'a Step,
    job_cancel: &'a CancellationToken,
    frame: &'a Frame,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(run_step_inner(cx, state, contexts, index, step, job_cancel, frame))
}

async fn run_step_inner(
    cx: &StepContext,
    state: &mut JobState,
    contexts: &mut Map<String, Value>,
    index: usize,
    step: &Step,
    job_cancel: &CancellationToken,
    frame: &Frame,
) {
    let timer = Timer::start();
    let wf_file = &cx.shared.opts.workflow.file;
    let key = step.id.clone().unwrap_or_else(|| format!("__{index}"));
    let mut name = step_display_name(step, index);
    // Fails the step (announcing it first) with a message and returns.
    macro_rules! fail {
        ($message:expr) => {
            return fail_step(cx, frame, state, index, &key, &name, &timer, $message)
        };
    }
    let cancelled = job_cancel.is_cancelled();
    let status = if cancelled { JobStatus::Cancelled } else { state.status };
    let workspace_local = cx.hash_root.as_deref();
    let host = StepHost { status, workspace: workspace_local };

    sync_steps(contexts, &state.steps);
    contexts.insert(
        "job".into(),
        json!({
            "status": match status {
                JobStatus::Success => "success",
                JobStatus::Failure => "failure",
                JobStatus::Cancelled => "cancelled",
            },
            "container": cx.job_context.get("container"),
            "services": cx.job_context.get("services"),
        }),
    );
    // env context: workflow + job env, GITHUB_ENV, then the step's own.
    let mut env_ctx = cx.env_ctx.clone();
    env_ctx.extend(state.env_accum.iter().map(|(k, v)| (k.clone(), v.clone())));
    env_ctx.extend(frame.parent_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    contexts.insert("env".into(), to_obj(&env_ctx));
    let step_env = match eval_env(&step.env, contexts, &host) {
        Ok(m) => m,
        Err(e) => {
            fail!(format!("{wf_file}: jobs.{}.steps[{index}].env: {e}", cx.job_id));
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
            fail!(format!("{wf_file}: jobs.{}.steps[{index}].if: {e}", cx.job_id));
        }
    };
    if !run_it {
        state
            .steps
            .insert(key, json!({ "outputs": {}, "outcome": "skipped", "conclusion": "skipped" }));
        report_finished(
            cx,
            frame,
            index,
            &name,
            Outcome::Skipped,
            Outcome::Skipped,
            Duration::ZERO,
        );
        return;
    }
    announce(cx, frame, index, &name);

    let scope = Scope { contexts, host: &host };
    let continue_on_error = match &step.continue_on_error {
        None => false,
        Some(BoolOrExpr::Bool(b)) => *b,
        Some(BoolOrExpr::Expr(e)) => match expr::interpolate(e, &scope) {
            Ok(s) => s == "true",
            Err(e) => {
                fail!(format!(
                    "{wf_file}: jobs.{}.steps[{index}].continue-on-error: {e}",
                    cx.job_id
                ));
            }
        },
    };
    let timeout = match &step.timeout_minutes {
        None => None,
        Some(NumberOrExpr::Number(n)) => Some(*n),
        Some(NumberOrExpr::Expr(e)) => match expr::interpolate(e, &scope) {
            Ok(s) => s.trim().parse::<f64>().ok(),
            Err(e) => {
                fail!(format!("{wf_file}: jobs.{}.steps[{index}].timeout-minutes: {e}", cx.job_id));
            }
        },
    }
    .map(|m| Duration::from_secs_f64((m * 60.0).clamp(0.0, 1.0e9)));

    let Some(script) = &step.run else {
        let uses = step.uses.as_deref().unwrap_or("");
        let plan = UsesStep {
            key: &key,
            name: &name,
            timer: &timer,
            env_ctx: &env_ctx,
            step_env: &step_env,
            continue_on_error,
            timeout,
            cancelled,
        };
        return run_uses(cx, frame, state, contexts, index, step, uses, job_cancel, plan).await;
    };
    let script = match expr::interpolate(script, &scope) {
        Ok(s) => s,
        Err(e) => {
            fail!(format!("{wf_file}: jobs.{}.steps[{index}].run: {e}", cx.job_id));
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
                fail!(format!("{wf_file}: jobs.{}.steps[{index}].shell: {e}", cx.job_id));
            }
        },
        s => s,
    };
    let spec = match workflow::shell_command(shell.as_deref(), cx.bash_available) {
        Ok(s) => s,
        Err(e) => {
            fail!(format!("{wf_file}: jobs.{}.steps[{index}].shell: {e}", cx.job_id));
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
                fail!(format!(
                    "{wf_file}: jobs.{}.steps[{index}].working-directory: {e}",
                    cx.job_id
                ));
            }
        },
        None => cx.env.paths.workspace.clone(),
    };

    let plan = ExecPlan {
        argv: spec.argv.clone(),
        script: Some((spec.extension, script)),
        env_ctx,
        extra_env: IndexMap::new(),
        working_dir,
        timeout,
    };
    let (outcome, outputs, _state, message) =
        exec_command(cx, state, index, &key, &name, plan, job_cancel, cancelled).await;
    finish_step(
        cx,
        frame,
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

/// Makes the `steps` context equal to `steps` without cloning the entries it already holds:
/// a job of n steps would otherwise copy n² entries.
fn sync_steps(contexts: &mut Map<String, Value>, steps: &Map<String, Value>) {
    if let Some(Value::Object(ctx)) = contexts.get_mut("steps")
        && ctx.len() <= steps.len()
    {
        let held = ctx.len();
        let mut prefix = true;
        for ((ck, cv), (k, v)) in ctx.iter_mut().zip(steps) {
            if ck != k {
                prefix = false;
                break;
            }
            if cv != v {
                *cv = v.clone();
            }
        }
        if prefix {
            for (k, v) in steps.iter().skip(held) {
                ctx.insert(k.clone(), v.clone());
            }
            return;
        }
    }
    contexts.insert("steps".into(), Value::Object(steps.clone()));
}

/// One process of a step: the command, its script (staged with it) and environment.
pub(crate) struct ExecPlan {
    /// The command; `{0}` (the shell template's placeholder) becomes the script's path.
    pub(crate) argv: Vec<String>,
    /// The script: file extension and contents.
    pub(crate) script: Option<(&'static str, String)>,
    /// The `env` context at this step (workflow, job, GITHUB_ENV, enclosing and own step env).
    pub(crate) env_ctx: IndexMap<String, String>,
    /// More variables (INPUT_*, STATE_*, GITHUB_ACTION_PATH).
    pub(crate) extra_env: IndexMap<String, String>,
    pub(crate) working_dir: String,
    pub(crate) timeout: Option<Duration>,
}

/// Runs one exec for a step: stages the script and fresh environment files, streams and
/// interprets the output, applies the environment files. Returns the outcome, the step outputs,
/// the saved state (GITHUB_STATE) and an error message.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn exec_command(
    cx: &StepContext,
    state: &mut JobState,
    index: usize,
    key: &str,
    name: &str,
    plan: ExecPlan,
    job_cancel: &CancellationToken,
    cancelled: bool,
) -> (Outcome, Map<String, Value>, IndexMap<String, String>, Option<String>) {
    let exec_id = exec_id();
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
    env.insert("GITHUB_ACTION".into(), key.to_owned());
    let allow_unsecure = env.get("ACTIONS_ALLOW_UNSECURE_COMMANDS").is_some_and(|v| v == "true");
    let secrets = &cx.shared.opts.secrets;
    let env_vars: Vec<EnvVar> = env
        .into_iter()
        .map(|(name, value)| {
            let secret = !value.is_empty() && secrets.values().any(|s| s == &value);
            EnvVar { name, value, secret }
        })
        .collect();
    let timeout = plan.timeout;
    let request = ExecRequest {
        exec_id: exec_id.clone(),
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
        timeout,
        grace: Duration::from_secs(5),
    };
    let mut lines = LineHandler {
        cx,
        index,
        processor: CommandProcessor::new(),
        allow_unsecure,
        echo: false,
        outputs: Map::new(),
        saved_state: IndexMap::new(),
        state,
        stdout: Vec::new(),
        stderr: Vec::new(),
        batch: String::new(),
        masked: String::new(),
    };

    // The step's token: cancelled with the job, unless the job was already cancelled (then this
    // is an always()/cancelled() step, stopped only by the second interrupt).
    let token = if cancelled { cx.shared.force.clone() } else { job_cancel.clone() };
    let outcome = execute(cx, request, &mut lines, &token, timeout).await;
    lines.flush_partial();
    let mut outputs = std::mem::take(&mut lines.outputs);
    let mut saved_state = std::mem::take(&mut lines.saved_state);
    let (outcome, message) = match outcome {
        Ok(exited) => {
            let message = collect_env_files(
                cx,
                lines.state,
                &files,
                exited.files,
                &mut outputs,
                &mut saved_state,
            )
            .await;
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
    (outcome, outputs, saved_state, message)
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
    state: &mut JobState,
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

/// Announces a step: a StepStarted event at the top level, a line inside a composite action.
pub(crate) fn announce(cx: &StepContext, frame: &Frame, index: usize, name: &str) {
    if frame.nested {
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: format!("▶ {name}"),
            kind: LineKind::Runner,
        });
    } else {
        cx.shared.sink.event(Event::StepStarted {
            job: cx.job_name.clone(),
            index,
            name: name.to_owned(),
        });
    }
}

/// Reports a finished step: a StepFinished event at the top level, a line inside a composite.
pub(crate) fn report_finished(
    cx: &StepContext,
    frame: &Frame,
    index: usize,
    name: &str,
    outcome: Outcome,
    conclusion: Outcome,
    duration: Duration,
) {
    if frame.nested {
        let mark = match outcome {
            Outcome::Success => "✓",
            Outcome::Failure => "✗",
            Outcome::Cancelled => "⊘",
            Outcome::Skipped => "-",
        };
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: format!("{mark} {name} ({outcome}) [{}]", crate::output::fmt_duration(duration)),
            kind: LineKind::Runner,
        });
    } else {
        cx.shared.sink.event(Event::StepFinished {
            job: cx.job_name.clone(),
            index,
            name: name.to_owned(),
            outcome,
            conclusion,
            duration,
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn finish_step(
    cx: &StepContext,
    frame: &Frame,
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
    report_finished(cx, frame, index, name, outcome, conclusion, timer.elapsed());
}

#[allow(clippy::too_many_arguments)]
fn fail_step(
    cx: &StepContext,
    frame: &Frame,
    state: &mut JobState,
    index: usize,
    key: &str,
    name: &str,
    timer: &Timer,
    message: String,
) {
    announce(cx, frame, index, name);
    finish_step(
        cx,
        frame,
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
    state: &'a mut JobState,
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

/// What `run_uses` needs from the step being run.
pub(crate) struct UsesStep<'a> {
    pub(crate) key: &'a str,
    pub(crate) name: &'a str,
    pub(crate) timer: &'a Timer,
    pub(crate) env_ctx: &'a IndexMap<String, String>,
    pub(crate) step_env: &'a IndexMap<String, String>,
    pub(crate) continue_on_error: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) cancelled: bool,
}

/// Runs a `uses:` step: a local (`./path`) or remote (`owner/repo@ref`) action (composite,
/// node or docker), a `docker://` image, or the local checkout.
#[allow(clippy::too_many_arguments)]
async fn run_uses(
    cx: &StepContext,
    frame: &Frame,
    state: &mut JobState,
    contexts: &mut Map<String, Value>,
    index: usize,
    step: &Step,
    uses: &str,
    job_cancel: &CancellationToken,
    u: UsesStep<'_>,
) {
    let done = |state: &mut JobState,
                outcome: Outcome,
                outputs: Map<String, Value>,
                message: Option<String>| {
        finish_step(
            cx,
            frame,
            state,
            index,
            u.key,
            u.name,
            u.timer,
            outcome,
            u.continue_on_error,
            outputs,
            message,
        );
    };
    let fail = |state: &mut JobState, message: String| {
        done(state, Outcome::Failure, Map::new(), Some(message));
    };
    if uses.starts_with("docker://") {
        let (outcome, outputs, message) = super::docker_step::run_docker_uri(
            cx, state, contexts, index, step, uses, job_cancel, &u,
        )
        .await;
        return done(state, outcome, outputs, message);
    }
    // actions/checkout of the repository being run: the workspace already holds the local
    // checkout (act does the same).
    if super::action::is_local_checkout(cx, step, contexts) {
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: "the workspace is the local checkout: actions/checkout skipped".into(),
            kind: LineKind::Runner,
        });
        return done(state, Outcome::Success, Map::new(), None);
    }
    let located = match super::action::locate(cx, state, uses).await {
        Ok(l) => l,
        Err(e) => return fail(state, e),
    };
    let manifest = located.manifest.clone();
    let action = located.action.clone();
    let action_path = located.dir.clone();

    let host = StepHost {
        status: if u.cancelled { JobStatus::Cancelled } else { state.status },
        workspace: cx.hash_root.as_deref(),
    };
    let inputs = match super::action::action_inputs(
        step,
        &action,
        &manifest,
        &Scope { contexts, host: &host },
        &format!("jobs.{}.steps[{index}]", cx.job_id),
    ) {
        Ok(i) => i,
        Err(e) => return fail(state, e),
    };

    match &action.runs {
        workflow::Runs::Node(node) => {
            let mut extra = super::action::input_env(&inputs);
            extra.insert("GITHUB_ACTION_PATH".into(), action_path.clone());
            // What the action's `pre:` saved (GITHUB_STATE) reaches its main step.
            if let Some(saved) = state.pre_state.get(&frame.position_of(index)) {
                extra.extend(saved.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
            }
            let mut env_ctx = u.env_ctx.clone();
            env_ctx.extend(u.step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
            let plan = ExecPlan {
                argv: vec!["node".into(), format!("{action_path}/{}", node.main)],
                script: None,
                env_ctx: env_ctx.clone(),
                extra_env: extra.clone(),
                working_dir: cx.env.paths.workspace.clone(),
                timeout: u.timeout,
            };
            let (outcome, outputs, saved, message) =
                exec_command(cx, state, index, u.key, u.name, plan, job_cancel, u.cancelled).await;
            if let Some(post) = &node.post {
                let mut env = env_ctx;
                env.extend(extra);
                env.extend(saved.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
                state.posts.push(PostStep {
                    name: format!("Post {}", u.name),
                    condition: node.post_if.clone().unwrap_or_else(|| "always()".into()),
                    argv: vec!["node".into(), format!("{action_path}/{post}")],
                    env,
                    container: None,
                });
            }
            done(state, outcome, outputs, message);
        }
        workflow::Runs::Composite { steps } => {
            if frame.depth >= MAX_COMPOSITE_DEPTH {
                return fail(
                    state,
                    format!(
                        "uses: {uses}: composite actions nest deeper than {MAX_COMPOSITE_DEPTH}"
                    ),
                );
            }
            let mut inner = Frame {
                nested: true,
                parent_env: frame.parent_env.clone(),
                depth: frame.depth + 1,
                position: String::new(),
            };
            let here = frame.position_of(index);
            inner.parent_env.extend(u.step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
            inner.parent_env.insert("GITHUB_ACTION_PATH".into(), action_path.clone());
            let saved_steps = std::mem::take(&mut state.steps);
            let saved_status = state.status;
            state.status = JobStatus::Success;
            let saved_inputs = contexts.insert("inputs".into(), Value::Object(inputs));
            let saved_action_path = set_github_key(contexts, "action_path", &action_path);
            for (i, s) in steps.iter().enumerate() {
                inner.position = format!("{here}/{i}");
                run_step(cx, state, contexts, index, s, job_cancel, &inner).await;
            }
            let inner_steps = std::mem::replace(&mut state.steps, saved_steps);
            let inner_status = state.status;
            state.status = saved_status;
            // Outputs are evaluated with the composite's own steps and inputs.
            contexts.insert("steps".into(), Value::Object(inner_steps));
            let mut outputs = Map::new();
            let mut message = None;
            {
                let host = StepHost { status: inner_status, workspace: cx.hash_root.as_deref() };
                let scope = Scope { contexts, host: &host };
                for (name, out) in &action.outputs {
                    let Some(value) = &out.value else { continue };
                    match expr::interpolate(value, &scope) {
                        Ok(v) => {
                            outputs.insert(name.clone(), Value::String(v));
                        }
                        Err(e) => {
                            message = Some(format!("{}: outputs.{name}.value: {e}", manifest))
                        }
                    }
                }
            }
            match saved_inputs {
                Some(v) => contexts.insert("inputs".into(), v),
                None => contexts.remove("inputs"),
            };
            set_github_key(contexts, "action_path", &saved_action_path);
            let outcome = match inner_status {
                JobStatus::Success if message.is_none() => Outcome::Success,
                JobStatus::Cancelled => Outcome::Cancelled,
                _ => Outcome::Failure,
            };
            done(state, outcome, outputs, message);
        }
        workflow::Runs::Docker(_) => {
            let (outcome, outputs, message) = super::docker_step::run_docker_action(
                cx,
                frame,
                state,
                contexts,
                index,
                uses,
                &action_path,
                &action,
                &inputs,
                job_cancel,
                &u,
            )
            .await;
            done(state, outcome, outputs, message);
        }
    }
}

/// Sets `github.<key>` to a string, returning the previous value ("" when unset).
fn set_github_key(contexts: &mut Map<String, Value>, key: &str, value: &str) -> String {
    let Some(Value::Object(github)) = contexts.get_mut("github") else { return String::new() };
    github
        .insert(key.to_owned(), Value::String(value.to_owned()))
        .map(|v| expr::to_string(&v))
        .unwrap_or_default()
}

/// Runs the post steps registered by actions, in reverse order, after the main steps.
pub(crate) async fn run_posts(
    cx: &StepContext,
    state: &mut JobState,
    contexts: &mut Map<String, Value>,
    job_cancel: &CancellationToken,
) {
    let posts = std::mem::take(&mut state.posts);
    let index = cx
        .shared
        .opts
        .workflow
        .jobs
        .get(cx.job_id.as_str())
        .and_then(|j| j.steps.as_ref())
        .map_or(0, |s| s.len().saturating_sub(1));
    let frame = Frame { nested: true, ..Frame::default() };
    for post in posts.into_iter().rev() {
        let timer = Timer::start();
        let cancelled = job_cancel.is_cancelled();
        let status = if cancelled { JobStatus::Cancelled } else { state.status };
        contexts.insert("steps".into(), Value::Object(state.steps.clone()));
        let host = StepHost { status, workspace: cx.hash_root.as_deref() };
        let run_it = match expr::evaluate_if(&post.condition, &Scope { contexts, host: &host }) {
            Ok(b) => b,
            Err(e) => {
                cx.shared.sink.event(Event::Line {
                    job: cx.job_name.clone(),
                    step: None,
                    text: format!("{}: post-if: {e}", post.name),
                    kind: LineKind::RunnerError,
                });
                state.status = JobStatus::Failure;
                continue;
            }
        };
        if !run_it {
            report_finished(
                cx,
                &frame,
                index,
                &post.name,
                Outcome::Skipped,
                Outcome::Skipped,
                Duration::ZERO,
            );
            continue;
        }
        announce(cx, &frame, index, &post.name);
        let (outcome, message) = if let Some(docker) = &post.container {
            super::docker_step::run_post(cx, state, index, &post, docker, job_cancel, cancelled)
                .await
        } else {
            let plan = ExecPlan {
                argv: post.argv.clone(),
                script: None,
                env_ctx: post.env.clone(),
                extra_env: IndexMap::new(),
                working_dir: cx.env.paths.workspace.clone(),
                timeout: None,
            };
            let (outcome, _, _, message) =
                exec_command(cx, state, index, "post", &post.name, plan, job_cancel, cancelled)
                    .await;
            (outcome, message)
        };
        if let Some(message) = message {
            cx.shared.sink.event(Event::Line {
                job: cx.job_name.clone(),
                step: Some(index),
                text: message,
                kind: LineKind::RunnerError,
            });
        }
        if outcome == Outcome::Failure {
            state.status = JobStatus::Failure;
        }
        report_finished(cx, &frame, index, &post.name, outcome, outcome, timer.elapsed());
    }
}
