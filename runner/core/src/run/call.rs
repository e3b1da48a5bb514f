//! Reusable workflows: a job with `uses:` runs another workflow's jobs as a nested run, with
//! the `workflow_call` inputs, secrets (`secrets: inherit` or a map) and outputs. The called
//! workflow comes from the workspace (`./.github/workflows/x.yml`; in daemon mode from the
//! repository at the run's commit) or from another repository (`owner/repo/path@ref`), fetched
//! like a remote action. Nested jobs show as `caller / job`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::{Map, Value, json};

use super::job::JobRun;
use super::{ComboResult, RunOptions, Shared, StaticHost, Timer, job_level_contexts};
use crate::actions::RemoteRef;
use crate::expr::{self, JobStatus, Scope};
use crate::output::{Event, EventSink, LineKind, Outcome};
use crate::workflow::{self, InputType, JobSecrets, Workflow};

/// GitHub's limit on nested reusable workflows: the top-level caller and up to nine levels
/// below it.
pub(crate) const MAX_DEPTH: usize = 10;

/// Runs one combination of a job that calls a reusable workflow.
pub(crate) fn run_call(
    shared: Arc<Shared>,
    run: JobRun,
) -> Pin<Box<dyn Future<Output = ComboResult> + Send>> {
    Box::pin(async move {
        let timer = Timer::start();
        let name = run.display_name.clone();
        let uses = shared.opts.workflow.jobs[run.job_id.as_str()].uses.clone().unwrap_or_default();
        shared.sink.event(Event::JobStarted { job: name.clone(), runs_on: uses });
        let result = match call(&shared, &run).await {
            Ok(r) => r,
            Err(message) => {
                shared.sink.event(Event::Line {
                    job: name.clone(),
                    step: None,
                    text: message,
                    kind: LineKind::RunnerError,
                });
                ComboResult { result: Outcome::Failure, outputs: Map::new() }
            }
        };
        shared.sink.event(Event::JobFinished {
            job: name,
            result: result.result,
            duration: timer.elapsed(),
        });
        result
    })
}

async fn call(shared: &Arc<Shared>, run: &JobRun) -> Result<ComboResult, String> {
    let opts = &shared.opts;
    let file = &opts.workflow.file;
    let job = &opts.workflow.jobs[run.job_id.as_str()];
    let uses = job.uses.as_deref().unwrap_or("").trim();
    let at = format!("{file}: jobs.{}.uses", run.job_id);
    if shared.depth + 1 >= MAX_DEPTH {
        return Err(format!(
            "{at}: reusable workflows nest deeper than {MAX_DEPTH} levels (GitHub's limit)"
        ));
    }
    let called = Arc::new(load(opts, uses).await.map_err(|e| format!("{at}: {e}"))?);
    let Some(decl) = called.on.as_ref().and_then(|on| on.events.get("workflow_call")) else {
        return Err(format!(
            "{at}: {} is not a reusable workflow: add `on: workflow_call` to it",
            called.file
        ));
    };

    let mut contexts = job_level_contexts(opts, run.needs.clone(), run.matrix.clone());
    contexts.insert("strategy".into(), run.strategy.clone());
    let host = StaticHost(JobStatus::Success);
    let scope = Scope { contexts: &contexts, host: &host };

    // Inputs: `with:` evaluated here, typed as declared, defaults for the rest.
    let mut inputs = Map::new();
    for (name, value) in &job.with {
        let Some(input) = decl.inputs.get(name) else {
            return Err(format!(
                "{file}: jobs.{}.with.{name}: {} has no input {name:?} under on.workflow_call.inputs",
                run.job_id, called.file
            ));
        };
        let v = expr::interpolate_value(value, &scope)
            .map_err(|e| format!("{file}: jobs.{}.with.{name}: {e}", run.job_id))?;
        let v = typed(input.type_, v)
            .map_err(|e| format!("{file}: jobs.{}.with.{name}: {e}", run.job_id))?;
        inputs.insert(name.clone(), v);
    }
    let mut called_contexts = job_level_contexts(opts, Map::new(), Map::new());
    for (name, input) in &decl.inputs {
        if inputs.contains_key(name) {
            continue;
        }
        match &input.default {
            Some(d) => {
                let scope = Scope { contexts: &called_contexts, host: &host };
                let v = expr::interpolate_value(d, &scope).map_err(|e| {
                    format!("{}: on.workflow_call.inputs.{name}.default: {e}", called.file)
                })?;
                let v = typed(input.type_, v).map_err(|e| {
                    format!("{}: on.workflow_call.inputs.{name}.default: {e}", called.file)
                })?;
                inputs.insert(name.clone(), v);
            }
            None if input.required => {
                return Err(format!(
                    "{file}: jobs.{}.with: the required input {name:?} of {} is missing",
                    run.job_id, called.file
                ));
            }
            None => {
                let empty = match input.type_ {
                    InputType::Boolean => json!(false),
                    InputType::Number => json!(0),
                    _ => json!(""),
                };
                inputs.insert(name.clone(), empty);
            }
        }
    }

    // Secrets: all of the caller's with `inherit`, else the mapped ones.
    let mut secrets: IndexMap<String, String> = IndexMap::new();
    match &job.secrets {
        Some(JobSecrets::Inherit) => secrets = opts.secrets.clone(),
        Some(JobSecrets::Map(map)) => {
            for (name, value) in map {
                let v = expr::interpolate(value, &scope)
                    .map_err(|e| format!("{file}: jobs.{}.secrets.{name}: {e}", run.job_id))?;
                secrets.insert(name.clone(), v);
            }
        }
        None => {}
    }
    for (name, secret) in &decl.secrets {
        if secret.required && secrets.get(name).is_none_or(|v| v.is_empty()) {
            return Err(format!(
                "{file}: jobs.{}.secrets: the required secret {name:?} of {} is not passed; add \
                 it under secrets: (or use secrets: inherit)",
                run.job_id, called.file
            ));
        }
    }
    // The token is always there, as on GitHub.
    for k in ["GITHUB_TOKEN", "GITEA_TOKEN", "FORGEJO_TOKEN"] {
        if let Some(v) = opts.secrets.get(k) {
            secrets.entry(k.to_owned()).or_insert_with(|| v.clone());
        }
    }

    let prefix = run.display_name.clone();
    let child = RunOptions {
        workflow: called.clone(),
        github: opts.github.clone(),
        secrets,
        vars: opts.vars.clone(),
        inputs: inputs.clone(),
        extra_env: opts.extra_env.clone(),
        labels: opts.labels.clone(),
        default_backend: opts.default_backend.clone(),
        only_jobs: None,
        workspace: opts.workspace.clone(),
        identity: opts.identity.clone(),
        max_job_time: opts.max_job_time,
        act_compat: opts.act_compat,
        skip_local_checkout: opts.skip_local_checkout,
        matrix_filter: Vec::new(),
        external_needs: Map::new(),
        actions: opts.actions.clone(),
        job_env: opts.job_env.clone(),
    };
    let sink: Arc<dyn EventSink> =
        Arc::new(Prefixed { inner: shared.sink.clone(), prefix: prefix.clone() });
    let result = super::run_nested(
        child,
        shared.backends.clone(),
        sink,
        run.cancel.clone(),
        shared.force.clone(),
        shared.depth + 1,
    )
    .await;

    // Outputs: `on.workflow_call.outputs.*.value` with the called jobs' results and outputs.
    let mut jobs = Map::new();
    for (id, outcome) in &result.jobs {
        let outputs = result.outputs.get(id).cloned().unwrap_or_default();
        jobs.insert(id.clone(), json!({ "result": outcome.as_str(), "outputs": outputs }));
    }
    called_contexts.insert("jobs".into(), Value::Object(jobs));
    called_contexts.insert("inputs".into(), Value::Object(inputs));
    let mut outputs = Map::new();
    let mut failed = false;
    let status = match result.result {
        Outcome::Failure => JobStatus::Failure,
        Outcome::Cancelled => JobStatus::Cancelled,
        _ => JobStatus::Success,
    };
    let host = StaticHost(status);
    for (name, out) in &decl.outputs {
        match expr::interpolate(&out.value, &Scope { contexts: &called_contexts, host: &host }) {
            Ok(v) => {
                outputs.insert(name.clone(), Value::String(v));
            }
            Err(e) => {
                failed = true;
                shared.sink.event(Event::Line {
                    job: prefix.clone(),
                    step: None,
                    text: format!("{}: on.workflow_call.outputs.{name}.value: {e}", called.file),
                    kind: LineKind::RunnerError,
                });
            }
        }
    }
    let result = match result.result {
        Outcome::Success if failed => Outcome::Failure,
        Outcome::Skipped => Outcome::Success,
        other => other,
    };
    Ok(ComboResult { result, outputs })
}

/// Types a `with:` value as the input declares: booleans and numbers from their string forms.
fn typed(type_: InputType, v: Value) -> Result<Value, String> {
    match (type_, v) {
        (InputType::Boolean, Value::Bool(b)) => Ok(Value::Bool(b)),
        (InputType::Boolean, Value::String(s)) if s == "true" || s == "false" => {
            Ok(Value::Bool(s == "true"))
        }
        (InputType::Boolean, other) => {
            Err(format!("expected a boolean, got {}", expr::to_string(&other)))
        }
        (InputType::Number, Value::Number(n)) => Ok(Value::Number(n)),
        (InputType::Number, Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(n) => Ok(json!(n)),
            Err(_) => Err(format!("expected a number, got {s:?}")),
        },
        (InputType::Number, other) => {
            Err(format!("expected a number, got {}", expr::to_string(&other)))
        }
        (_, Value::String(s)) => Ok(Value::String(s)),
        (_, other) => Ok(Value::String(expr::to_string(&other))),
    }
}

/// Reads and validates the called workflow.
async fn load(opts: &RunOptions, uses: &str) -> Result<Workflow, String> {
    let (text, file) = if let Some(rel) = uses.strip_prefix("./") {
        match &opts.workspace {
            Some(root) => {
                let path = root.join(rel);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                (text, rel.to_owned())
            }
            None => {
                // Daemon mode: the repository of the run, at its commit.
                let gh = |k: &str| opts.github.get(k).map(expr::to_string).unwrap_or_default();
                let r = RemoteRef {
                    url: format!("{}/{}", gh("server_url").trim_end_matches('/'), gh("repository")),
                    repo: gh("repository"),
                    path: rel.to_owned(),
                    git_ref: gh("sha"),
                };
                read_remote(opts, &r).await?
            }
        }
    } else {
        let r = opts.actions.parse(uses)?;
        if r.path.is_empty() {
            return Err(format!(
                "{uses}: name the workflow file: {{owner}}/{{repo}}/.github/workflows/<file>@{{ref}}"
            ));
        }
        read_remote(opts, &r).await?
    };
    let wf = workflow::parse_workflow(&text, &file).map_err(|e| e.to_string())?;
    if let Err(errors) = workflow::validate(&wf) {
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(all.join("\n"));
    }
    Ok(wf)
}

async fn read_remote(opts: &RunOptions, r: &RemoteRef) -> Result<(String, String), String> {
    let fetched = opts.actions.fetch(r).await?;
    let path = fetched.dir.join(&r.path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{r}: reading {} of {} at {}: {e}", r.path, r.url, r.git_ref))?;
    Ok((text, r.to_string()))
}

/// Prefixes the job names of a nested run with the calling job's name (`caller / job`).
struct Prefixed {
    inner: Arc<dyn EventSink>,
    prefix: String,
}

impl EventSink for Prefixed {
    fn event(&self, mut event: Event) {
        let job = match &mut event {
            Event::JobStarted { job, .. }
            | Event::StepStarted { job, .. }
            | Event::Line { job, .. }
            | Event::StepFinished { job, .. }
            | Event::JobFinished { job, .. } => job,
        };
        *job = format!("{} / {job}", self.prefix);
        self.inner.event(event);
    }

    fn output(&self, job: &str, step: usize, lines: &str) {
        self.inner.output(&format!("{} / {job}", self.prefix), step, lines);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}
