//! One step of a job, as a sequence of phases: its environment (`env` context and the step's
//! own `env`), its name, its `if:`, its limits (`continue-on-error`, `timeout-minutes`), then
//! either a `run:` script (shell, working directory: one Exec, see [`super::exec`]) or a `uses:`
//! step — a `docker://` image or docker action ([`super::docker_step`]), a node or composite
//! action ([`super::action`] finds it) — and finally its record in the `steps` context.
//! Also the `post:` steps actions registered, run after the main steps.

use std::time::Duration;

use indexmap::IndexMap;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::action;
use super::context::{Timer, to_obj};
use super::docker_step;
use super::exec::exec_command;
use super::report::{announce, report_finished};
use super::state::{
    ExecPlan, Frame, JobProgress, MAX_COMPOSITE_DEPTH, PostStep, StepContext, StepHost,
    StepOutcome, StepRef, UsesStep, eval_env, input_env,
};
use crate::expr::{self, JobStatus, Scope};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{self, BoolOrExpr, NumberOrExpr, Runs, Step};

/// Runs one step and records it in `state` and the `steps` context.
pub(crate) fn run_step<'a>(
    cx: &'a StepContext,
    state: &'a mut JobProgress,
    contexts: &'a mut Map<String, Value>,
    index: usize,
    step: &'a Step,
    job_cancel: &'a CancellationToken,
    frame: &'a Frame,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    let span = tracing::info_span!(
        "step",
        index,
        position = %frame.position_of(index),
        step = %step_display_name(step, index),
    );
    Box::pin(run_step_inner(cx, state, contexts, index, step, job_cancel, frame).instrument(span))
}

/// The phases of one step; each failure before the step's process ends the step with a
/// message naming the step's key (`file: jobs.<id>.steps[i].<key>: …`).
async fn run_step_inner(
    cx: &StepContext,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    index: usize,
    step: &Step,
    job_cancel: &CancellationToken,
    frame: &Frame,
) {
    let mut run = StepRun::new(cx, frame, index, step, state, job_cancel);
    let env = match run.environment(state, contexts, step) {
        Ok(env) => env,
        Err(message) => return run.fail(state, message),
    };
    run.interpolate_name(step, contexts);
    match run.condition(step, contexts) {
        Ok(true) => {}
        Ok(false) => return run.skip(state),
        Err(message) => return run.fail(state, message),
    }
    run.announce();
    let timeout = match run.limits(step, contexts) {
        Ok(timeout) => timeout,
        Err(message) => return run.fail(state, message),
    };
    tracing::debug!(uses = step.uses.as_deref(), "step started");
    let outcome = match &step.run {
        Some(script) => match run.script_plan(step, script, contexts, env.full, timeout) {
            Ok(plan) => exec_command(cx, state, &run.at(), plan).await,
            Err(message) => return run.fail(state, message),
        },
        None => {
            let u = UsesStep { at: run.at(), env_ctx: &env.before, step_env: &env.own, timeout };
            run_uses(&run, state, contexts, step, &u).await
        }
    };
    run.finish(state, outcome);
}

/// The `env` context of a step: before its own `env`, its own, and both.
struct StepEnv {
    before: IndexMap<String, String>,
    own: IndexMap<String, String>,
    full: IndexMap<String, String>,
}

/// A step being run: who it is, where it shows, and how it ends.
struct StepRun<'a> {
    cx: &'a StepContext,
    frame: &'a Frame,
    index: usize,
    /// Its key in the `steps` context: `id`, else `__<index>`.
    key: String,
    name: String,
    timer: Timer,
    job_cancel: &'a CancellationToken,
    /// The job was cancelled before this step started.
    cancelled: bool,
    /// The job's status as the step's expressions see it.
    status: JobStatus,
    announced: bool,
    continue_on_error: bool,
}

impl<'a> StepRun<'a> {
    fn new(
        cx: &'a StepContext,
        frame: &'a Frame,
        index: usize,
        step: &Step,
        state: &JobProgress,
        job_cancel: &'a CancellationToken,
    ) -> StepRun<'a> {
        let cancelled = job_cancel.is_cancelled();
        StepRun {
            cx,
            frame,
            index,
            key: step.id.clone().unwrap_or_else(|| format!("__{index}")),
            name: step_display_name(step, index),
            timer: Timer::start(),
            job_cancel,
            cancelled,
            status: if cancelled { JobStatus::Cancelled } else { state.status },
            announced: false,
            continue_on_error: false,
        }
    }

    fn host(&self) -> StepHost<'a> {
        StepHost { status: self.status, workspace: self.cx.hash_root.as_deref() }
    }

    fn at(&self) -> StepRef<'_> {
        StepRef {
            index: self.index,
            key: &self.key,
            name: &self.name,
            job_cancel: self.job_cancel,
            cancelled: self.cancelled,
        }
    }

    /// `file: jobs.<id>.steps[i].<key>: <error>`.
    fn error(&self, key: &str, e: impl std::fmt::Display) -> String {
        let file = &self.cx.shared.opts.workflow.file;
        format!("{file}: jobs.{}.steps[{}].{key}: {e}", self.cx.job_id, self.index)
    }

    /// Phase 1: the `steps` and `job` contexts, and the `env` context (workflow and job env,
    /// GITHUB_ENV, the enclosing steps' env, then the step's own).
    fn environment(
        &self,
        state: &JobProgress,
        contexts: &mut Map<String, Value>,
        step: &Step,
    ) -> Result<StepEnv, String> {
        let cx = self.cx;
        sync_steps(contexts, &state.steps);
        let status = match self.status {
            JobStatus::Success => "success",
            JobStatus::Failure => "failure",
            JobStatus::Cancelled => "cancelled",
        };
        contexts.insert(
            "job".into(),
            json!({
                "status": status,
                "container": cx.job_context.get("container"),
                "services": cx.job_context.get("services"),
            }),
        );
        let mut before = cx.env_ctx.clone();
        before.extend(state.env_accum.iter().map(|(k, v)| (k.clone(), v.clone())));
        before.extend(self.frame.parent_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        contexts.insert("env".into(), to_obj(&before));
        let own = eval_env(&step.env, contexts, &self.host()).map_err(|e| self.error("env", e))?;
        let mut full = before.clone();
        full.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        contexts.insert("env".into(), to_obj(&full));
        Ok(StepEnv { before, own, full })
    }

    /// Phase 2: a `name:` with expressions, evaluated (kept as written when it fails).
    fn interpolate_name(&mut self, step: &Step, contexts: &Map<String, Value>) {
        if let Some(n) = &step.name
            && expr::contains_expression(n)
            && let Ok(s) = expr::interpolate(n, &Scope { contexts, host: &self.host() })
        {
            self.name = s;
        }
    }

    /// Phase 3: the step's `if:`.
    fn condition(&self, step: &Step, contexts: &Map<String, Value>) -> Result<bool, String> {
        let cond = step.if_.as_deref().unwrap_or("");
        expr::evaluate_if(cond, &Scope { contexts, host: &self.host() })
            .map_err(|e| self.error("if", e))
    }

    /// Phase 4: `continue-on-error` (kept for [`StepRun::finish`]) and `timeout-minutes`.
    fn limits(
        &mut self,
        step: &Step,
        contexts: &Map<String, Value>,
    ) -> Result<Option<Duration>, String> {
        let host = self.host();
        let scope = Scope { contexts, host: &host };
        self.continue_on_error = match &step.continue_on_error {
            None => false,
            Some(BoolOrExpr::Bool(b)) => *b,
            Some(BoolOrExpr::Expr(e)) => {
                expr::interpolate(e, &scope).map_err(|e| self.error("continue-on-error", e))?
                    == "true"
            }
        };
        let minutes = match &step.timeout_minutes {
            None => None,
            Some(NumberOrExpr::Number(n)) => Some(*n),
            Some(NumberOrExpr::Expr(e)) => expr::interpolate(e, &scope)
                .map_err(|e| self.error("timeout-minutes", e))?
                .trim()
                .parse::<f64>()
                .ok(),
        };
        Ok(minutes.map(|m| Duration::from_secs_f64((m * 60.0).clamp(0.0, 1.0e9))))
    }

    /// Phase 5 of a `run:` step: the script, its shell and working directory.
    fn script_plan(
        &self,
        step: &Step,
        script: &str,
        contexts: &Map<String, Value>,
        env_ctx: IndexMap<String, String>,
        timeout: Option<Duration>,
    ) -> Result<ExecPlan, String> {
        let cx = self.cx;
        let host = self.host();
        let scope = Scope { contexts, host: &host };
        let script = expr::interpolate(script, &scope).map_err(|e| self.error("run", e))?;
        let defaults = |pick: fn(&workflow::RunDefaults) -> Option<String>| {
            [&cx.job_defaults, &cx.workflow_defaults]
                .into_iter()
                .find_map(|d| d.as_ref().and_then(|d| d.run.as_ref()).and_then(pick))
        };
        let shell = step.shell.clone().or_else(|| defaults(|r| r.shell.clone()));
        let shell = match shell {
            Some(s) if expr::contains_expression(&s) => {
                Some(expr::interpolate(&s, &scope).map_err(|e| self.error("shell", e))?)
            }
            s => s,
        };
        let spec = workflow::shell_command(shell.as_deref(), cx.bash_available)
            .map_err(|e| self.error("shell", e))?;
        let working_dir =
            step.working_directory.clone().or_else(|| defaults(|r| r.working_directory.clone()));
        let workspace = &cx.env.paths.workspace;
        let working_dir = match working_dir {
            Some(w) => match expr::interpolate(&w, &scope) {
                Ok(w) if w.starts_with('/') => w,
                Ok(w) => {
                    format!("{}/{}", workspace.trim_end_matches('/'), w.trim_start_matches("./"))
                }
                Err(e) => return Err(self.error("working-directory", e)),
            },
            None => workspace.clone(),
        };
        Ok(ExecPlan {
            argv: spec.argv.clone(),
            script: Some((spec.extension, script)),
            env_ctx,
            extra_env: IndexMap::new(),
            working_dir,
            timeout,
        })
    }

    fn announce(&mut self) {
        if !self.announced {
            announce(self.cx, self.frame, self.index, &self.name);
            self.announced = true;
        }
    }

    /// A step whose `if:` is false.
    fn skip(&self, state: &mut JobProgress) {
        state.steps.insert(
            self.key.clone(),
            json!({ "outputs": {}, "outcome": "skipped", "conclusion": "skipped" }),
        );
        let skipped = Outcome::Skipped;
        report_finished(
            self.cx,
            self.frame,
            self.index,
            &self.name,
            skipped,
            skipped,
            Duration::ZERO,
        );
    }

    /// A step that failed before its process ran (announced first).
    fn fail(mut self, state: &mut JobProgress, message: String) {
        self.announce();
        self.continue_on_error = false;
        self.finish(state, StepOutcome::failed(message));
    }

    /// The last phase: the message logged, the conclusion (`continue-on-error`), the job's
    /// status, the `steps` context, the report.
    fn finish(&self, state: &mut JobProgress, ended: StepOutcome) {
        let cx = self.cx;
        if let Some(message) = ended.message {
            let text = state.masker.mask(&message).into_owned();
            cx.shared.sink.event(Event::Line {
                job: cx.job_name.clone(),
                step: Some(self.index),
                text,
                kind: LineKind::RunnerError,
            });
        }
        let outcome = ended.outcome;
        let conclusion = if outcome == Outcome::Failure && self.continue_on_error {
            Outcome::Success
        } else {
            outcome
        };
        match conclusion {
            Outcome::Failure => state.status = JobStatus::Failure,
            Outcome::Cancelled if state.status == JobStatus::Success => {
                state.status = JobStatus::Cancelled
            }
            _ => {}
        }
        tracing::debug!(outcome = %outcome, conclusion = %conclusion, "step finished");
        state.steps.insert(
            self.key.clone(),
            json!({
                "outputs": ended.outputs,
                "outcome": outcome.as_str(),
                "conclusion": conclusion.as_str(),
            }),
        );
        let elapsed = self.timer.elapsed();
        report_finished(cx, self.frame, self.index, &self.name, outcome, conclusion, elapsed);
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

/// Runs a `uses:` step: a local (`./path`) or remote (`owner/repo@ref`) action (composite,
/// node or docker), a `docker://` image, or the local checkout.
async fn run_uses(
    run: &StepRun<'_>,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    step: &Step,
    u: &UsesStep<'_>,
) -> StepOutcome {
    let cx = run.cx;
    let uses = step.uses.as_deref().unwrap_or("");
    if uses.starts_with("docker://") {
        return docker_step::run_docker_uri(cx, state, contexts, step, uses, u).await;
    }
    // actions/checkout of the repository being run: the workspace already holds the local
    // checkout (act does the same).
    if action::is_local_checkout(cx, step, contexts) {
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(run.index),
            text: "the workspace is the local checkout: actions/checkout skipped".into(),
            kind: LineKind::Runner,
        });
        return StepOutcome::of(Outcome::Success);
    }
    let located = match action::locate(cx, state, uses).await {
        Ok(l) => l,
        Err(e) => return StepOutcome::failed(e),
    };
    let inputs = match action::action_inputs(
        step,
        &located.action,
        &located.manifest,
        &Scope { contexts, host: &run.host() },
        &format!("jobs.{}.steps[{}]", cx.job_id, run.index),
    ) {
        Ok(i) => i,
        Err(e) => return StepOutcome::failed(e),
    };
    match &located.action.runs {
        Runs::Node(node) => run_node(run, state, node, &located.dir, &inputs, u).await,
        Runs::Composite { steps } => {
            let action = Composite { uses, located: &located, steps, inputs };
            run_composite(run, state, contexts, action, u).await
        }
        Runs::Docker(_) => {
            let action = docker_step::DockerAction {
                uses,
                dir: &located.dir,
                action: &located.action,
                inputs: &inputs,
            };
            docker_step::run_docker_action(cx, state, contexts, action, u).await
        }
    }
}

/// A node action: `node main` with `INPUT_*`, `GITHUB_ACTION_PATH` and what its `pre:` saved;
/// its `post:` registered for after the main steps with what the main step saved.
async fn run_node(
    run: &StepRun<'_>,
    state: &mut JobProgress,
    node: &workflow::NodeRuns,
    action_path: &str,
    inputs: &Map<String, Value>,
    u: &UsesStep<'_>,
) -> StepOutcome {
    let cx = run.cx;
    let mut extra = input_env(inputs);
    extra.insert("GITHUB_ACTION_PATH".into(), action_path.to_owned());
    // What the action's `pre:` saved (GITHUB_STATE) reaches its main step.
    if let Some(saved) = state.pre_state.get(&run.frame.position_of(run.index)) {
        extra.extend(saved.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
    }
    let env_ctx = u.full_env();
    let plan = ExecPlan {
        argv: vec!["node".into(), format!("{action_path}/{}", node.main)],
        script: None,
        env_ctx: env_ctx.clone(),
        extra_env: extra.clone(),
        working_dir: cx.env.paths.workspace.clone(),
        timeout: u.timeout,
    };
    let ended = exec_command(cx, state, &u.at, plan).await;
    if let Some(post) = &node.post {
        let mut env = env_ctx;
        env.extend(extra);
        env.extend(ended.saved_state.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
        state.posts.push(PostStep {
            name: format!("Post {}", run.name),
            condition: node.post_if.clone().unwrap_or_else(|| "always()".into()),
            argv: vec!["node".into(), format!("{action_path}/{post}")],
            env,
            container: None,
        });
    }
    ended
}

/// A composite action to run: its steps and evaluated inputs.
struct Composite<'a> {
    uses: &'a str,
    located: &'a super::state::LocatedAction,
    steps: &'a [Step],
    inputs: Map<String, Value>,
}

/// A composite action: its steps in a nested frame with their own `steps` context, status,
/// `inputs` and `github.action_path`; then its outputs, evaluated with those.
async fn run_composite(
    run: &StepRun<'_>,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    action: Composite<'_>,
    u: &UsesStep<'_>,
) -> StepOutcome {
    let (cx, frame) = (run.cx, run.frame);
    if frame.depth >= MAX_COMPOSITE_DEPTH {
        return StepOutcome::failed(format!(
            "uses: {}: composite actions nest deeper than {MAX_COMPOSITE_DEPTH}",
            action.uses
        ));
    }
    let action_path = &action.located.dir;
    let mut inner = Frame {
        nested: true,
        parent_env: frame.parent_env.clone(),
        depth: frame.depth + 1,
        position: String::new(),
    };
    let here = frame.position_of(run.index);
    inner.parent_env.extend(u.step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    inner.parent_env.insert("GITHUB_ACTION_PATH".into(), action_path.clone());
    let saved_steps = std::mem::take(&mut state.steps);
    let saved_status = std::mem::replace(&mut state.status, JobStatus::Success);
    let saved_inputs = contexts.insert("inputs".into(), Value::Object(action.inputs));
    let saved_action_path = set_github_key(contexts, "action_path", action_path);
    for (i, s) in action.steps.iter().enumerate() {
        inner.position = format!("{here}/{i}");
        run_step(cx, state, contexts, run.index, s, run.job_cancel, &inner).await;
    }
    let inner_steps = std::mem::replace(&mut state.steps, saved_steps);
    let inner_status = std::mem::replace(&mut state.status, saved_status);
    // Outputs are evaluated with the composite's own steps and inputs.
    contexts.insert("steps".into(), Value::Object(inner_steps));
    let mut ended = StepOutcome::of(Outcome::Success);
    {
        let host = StepHost { status: inner_status, workspace: cx.hash_root.as_deref() };
        let scope = Scope { contexts, host: &host };
        for (name, out) in &action.located.action.outputs {
            let Some(value) = &out.value else { continue };
            match expr::interpolate(value, &scope) {
                Ok(v) => {
                    ended.outputs.insert(name.clone(), Value::String(v));
                }
                Err(e) => {
                    let manifest = &action.located.manifest;
                    ended.message = Some(format!("{manifest}: outputs.{name}.value: {e}"))
                }
            }
        }
    }
    match saved_inputs {
        Some(v) => contexts.insert("inputs".into(), v),
        None => contexts.remove("inputs"),
    };
    set_github_key(contexts, "action_path", &saved_action_path);
    ended.outcome = match inner_status {
        JobStatus::Success if ended.message.is_none() => Outcome::Success,
        JobStatus::Cancelled => Outcome::Cancelled,
        _ => Outcome::Failure,
    };
    ended
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
    state: &mut JobProgress,
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
        let span = tracing::info_span!("step", index, step = %post.name);
        run_post(cx, state, contexts, &frame, index, &post, job_cancel).instrument(span).await;
    }
}

/// One post step: its `post-if`, then its process (or container).
async fn run_post(
    cx: &StepContext,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    frame: &Frame,
    index: usize,
    post: &PostStep,
    job_cancel: &CancellationToken,
) {
    let timer = Timer::start();
    let cancelled = job_cancel.is_cancelled();
    contexts.insert("steps".into(), Value::Object(state.steps.clone()));
    let host = cx.host(state.status, cancelled);
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
            return;
        }
    };
    if !run_it {
        let skipped = Outcome::Skipped;
        report_finished(cx, frame, index, &post.name, skipped, skipped, Duration::ZERO);
        return;
    }
    announce(cx, frame, index, &post.name);
    let at = StepRef { index, key: "post", name: &post.name, job_cancel, cancelled };
    let ended = if let Some(docker) = &post.container {
        docker_step::run_post(cx, state, &at, docker, &post.env).await
    } else {
        let plan = ExecPlan {
            argv: post.argv.clone(),
            script: None,
            env_ctx: post.env.clone(),
            extra_env: IndexMap::new(),
            working_dir: cx.env.paths.workspace.clone(),
            timeout: None,
        };
        exec_command(cx, state, &at, plan).await
    };
    if let Some(message) = ended.message {
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: message,
            kind: LineKind::RunnerError,
        });
    }
    if ended.outcome == Outcome::Failure {
        state.status = JobStatus::Failure;
    }
    report_finished(cx, frame, index, &post.name, ended.outcome, ended.outcome, timer.elapsed());
}
