//! Running one task: the single-job `workflow_payload` with the task's context, secrets, vars
//! and `needs` becomes a [`RunOptions`]; the run reports through a [`Reporter`]; a run over
//! `runner.timeout` is cancelled with Forgejo Runner's last line.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::client::{Client, VERSION};
use super::reporter::{Ending, Reporter};
use super::types::{Task, TaskResult};
use crate::backends::Backends;
use crate::identity::Identity;
use crate::labels::LabelConfig;
use crate::run::{RunOptions, run_workflow};
use crate::workflow::{self, Workflow};

/// What every task of a runner shares.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The runner's name (for the first log row).
    pub name: String,
    /// Label configurations.
    pub labels: Vec<LabelConfig>,
    /// The backend of labels with no backend (`host`).
    pub default_backend: String,
    /// `runner.envs` and `runner.env_file`, added to every step.
    pub envs: IndexMap<String, String>,
    /// `runner.timeout`.
    pub timeout: Duration,
    /// `runner.report_interval`.
    pub report_interval: Duration,
    /// `log.job_level`.
    pub job_level: crate::config::JobLevel,
    /// Who we are (labels on everything plugins create).
    pub identity: Identity,
    /// Where actions come from; each task's default actions URL replaces `base_url`.
    pub actions: crate::actions::ActionSource,
    /// Each job's variables from the job services (the cache server).
    pub job_env: Vec<Arc<dyn crate::run::JobEnvProvider>>,
}

/// A task turned into a run.
pub struct Prepared {
    /// The options of `run_workflow`.
    pub options: RunOptions,
    /// The job's id.
    pub job_id: String,
    /// How many steps the job has (the server's step records).
    pub steps: usize,
    /// Values to mask in every row.
    pub secrets: Vec<String>,
    /// `ACTIONS_STEP_DEBUG=true`.
    pub debug: bool,
}

fn context_str<'a>(ctx: &'a Map<String, Value>, key: &str) -> &'a str {
    ctx.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The first non-empty value among `keys` of the context.
fn first_of<'a>(ctx: &'a Map<String, Value>, keys: &[&str]) -> &'a str {
    keys.iter().map(|k| context_str(ctx, k)).find(|v| !v.is_empty()).unwrap_or("")
}

/// Parses the payload (it must hold exactly one job) and builds the run. The error is the text
/// of the task's last log row.
pub fn prepare(task: &Task, instance: &str, settings: &RunnerSettings) -> Result<Prepared, String> {
    let ctx = &task.context;
    let text = String::from_utf8_lossy(&task.workflow_payload).into_owned();
    let file = match context_str(ctx, "workflow") {
        "" => format!("task {}", task.id),
        w => format!("{w} (task {})", task.id),
    };
    let wf = workflow::parse_workflow(&text, &file).map_err(|e| unusable(&text, &e.to_string()))?;
    if wf.jobs.len() != 1 {
        return Err(unusable(
            &text,
            &format!("the payload has {} jobs; a task holds exactly one", wf.jobs.len()),
        ));
    }
    let Some((job_id, job)) = wf.jobs.iter().next() else {
        return Err(unusable(&text, "the payload has no job"));
    };
    let job_id = job_id.clone();
    let steps = job.steps.as_ref().map_or(0, Vec::len);
    // The jobs it needs ran elsewhere: validate without them, and pass their results in.
    let mut checked: Workflow = wf.clone();
    for j in checked.jobs.values_mut() {
        j.needs.retain(|n| !task.needs.contains_key(n));
    }
    if let Err(errors) = workflow::validate(&checked) {
        let text_errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(unusable(&text, &text_errors.join("\n")));
    }
    let mut external_needs = Map::new();
    for (id, need) in &task.needs {
        external_needs.insert(
            id.clone(),
            json!({ "result": need.result.as_context(), "outputs": need.outputs }),
        );
    }

    // Secrets, with the token entries.
    let mut secrets: IndexMap<String, String> =
        task.secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let token = ["FORGEJO_TOKEN", "GITEA_TOKEN", "GITHUB_TOKEN"]
        .iter()
        .filter_map(|k| secrets.get(*k))
        .find(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| context_str(ctx, "token").to_owned());
    for k in ["GITHUB_TOKEN", "GITEA_TOKEN", "FORGEJO_TOKEN"] {
        if !token.is_empty() {
            secrets.entry(k.to_owned()).or_insert_with(|| token.clone());
        }
    }
    let runtime_token = match first_of(ctx, &["forgejo_runtime_token", "gitea_runtime_token"]) {
        "" => token.clone(),
        t => t.to_owned(),
    };

    // The github context: the standard keys of the task's context.
    let mut github = Map::new();
    for (k, v) in ctx {
        if k.starts_with("gitea_") || k.starts_with("forgejo_") || k.starts_with("actions_id_") {
            continue;
        }
        github.insert(k.clone(), v.clone());
    }
    github.insert("token".into(), json!(token));
    let inputs = match (context_str(ctx, "event_name"), ctx.get("event")) {
        ("workflow_dispatch" | "workflow_call", Some(event)) => {
            event.get("inputs").and_then(Value::as_object).cloned().unwrap_or_default()
        }
        _ => Map::new(),
    };

    // The environment the Go runner sets.
    let mut env = settings.envs.clone();
    let instance = instance.trim_end_matches('/');
    let vars = [
        ("ACTIONS_RUNTIME_URL", format!("{instance}/api/actions_pipeline/")),
        ("ACTIONS_RUNTIME_TOKEN", runtime_token.clone()),
        ("ACTIONS_RESULTS_URL", instance.to_owned()),
        ("GITHUB_SERVER_URL", instance.to_owned()),
        ("GITEA_ACTIONS", "true".to_owned()),
        ("GITEA_ACTIONS_RUNNER_VERSION", VERSION.to_owned()),
        ("FORGEJO_ACTIONS", "true".to_owned()),
        ("FORGEJO_ACTIONS_RUNNER_VERSION", VERSION.to_owned()),
    ];
    for (k, v) in vars {
        env.insert(k.to_owned(), v);
    }
    let oidc_token = first_of(
        ctx,
        &["forgejo_actions_id_token_request_token", "actions_id_token_request_token"],
    );
    let oidc_url =
        first_of(ctx, &["forgejo_actions_id_token_request_url", "actions_id_token_request_url"]);
    if !oidc_url.is_empty() {
        env.insert("ACTIONS_ID_TOKEN_REQUEST_URL".into(), oidc_url.to_owned());
        env.insert("ACTIONS_ID_TOKEN_REQUEST_TOKEN".into(), oidc_token.to_owned());
    }

    let debug = secrets.get("ACTIONS_STEP_DEBUG").is_some_and(|v| v == "true");
    let mut mask: Vec<String> = secrets.values().cloned().collect();
    mask.extend([runtime_token, oidc_token.to_owned()]);
    // Remote actions: from the instance's default actions URL (Forgejo's, else Gitea's).
    let mut source = settings.actions.clone();
    match first_of(ctx, &["forgejo_default_actions_url", "gitea_default_actions_url"]) {
        "" => {}
        url => source.base_url = url.trim_end_matches('/').to_owned(),
    }
    // The instance's own repositories (a local reusable workflow, private actions) need the
    // task's token; no other host ever sees it.
    if !token.is_empty() && !instance.is_empty() {
        source.credentials.push((format!("{}/", instance.trim_end_matches('/')), token.clone()));
    }
    let actions = Arc::new(crate::actions::Resolver::new(source));
    let options = RunOptions {
        workflow: Arc::new(wf),
        github,
        secrets,
        vars: task.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inputs,
        extra_env: env,
        labels: settings.labels.clone(),
        default_backend: Some(settings.default_backend.clone()),
        only_jobs: None,
        workspace: None,
        identity: settings.identity.clone(),
        max_job_time: None,
        act_compat: false,
        skip_local_checkout: false,
        matrix_filter: Vec::new(),
        external_needs,
        actions,
        job_env: settings.job_env.clone(),
    };
    Ok(Prepared { options, job_id, steps, secrets: mask, debug })
}

/// The payload, numbered, and why it cannot be run.
fn unusable(text: &str, why: &str) -> String {
    let mut out = String::from("the workflow payload of this task:\n");
    for (i, line) in text.lines().enumerate() {
        out.push_str(&format!("{:>4} {line}\n", i + 1));
    }
    out.push_str(&format!("{why}\nthe workflow file is not usable"));
    out
}

/// Runs one task to the end and reports it. `cancel` stops the job (shutdown, or the server
/// cancelling it); `force` stops everything, including the final reports' retries.
#[tracing::instrument(name = "task", skip_all, fields(task = task.id))]
pub async fn run_task(
    client: Arc<Client>,
    task: Task,
    settings: Arc<RunnerSettings>,
    backends: Arc<Backends>,
    cancel: CancellationToken,
    force: CancellationToken,
) -> TaskResult {
    let task_id = task.id;
    let started = std::time::Instant::now();
    crate::metrics::global().jobs_running.inc();
    let job = context_str(&task.context, "job").to_owned();
    let event = context_str(&task.context, "event_name").to_owned();
    tracing::info!(task = task_id, job = %job, "task received");
    let prepared = prepare(&task, client.instance(), &settings);
    let (steps, secrets, debug) = match &prepared {
        Ok(p) => (p.steps, p.secrets.clone(), p.debug),
        Err(_) => (0, task.secrets.values().cloned().collect(), false),
    };
    let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let reporter = Reporter::new(client, task_id, steps, &secret_refs, debug, cancel.clone());
    reporter.set_job_level(settings.job_level);
    reporter.log(&format!(
        "{}(version:{VERSION}) received task {task_id} of job {job}, be triggered by event: {event}",
        settings.name
    ));
    let ticker = reporter.spawn_loop(settings.report_interval);
    let ending = match prepared {
        Err(e) => Ending::Error(e),
        Ok(p) => {
            let run =
                run_workflow(p.options, backends, reporter.clone(), cancel.clone(), force.clone());
            tokio::pin!(run);
            let mut deadline = false;
            let result = tokio::select! {
                r = &mut run => r,
                _ = tokio::time::sleep(settings.timeout) => {
                    deadline = true;
                    tracing::warn!(task = task_id, timeout = ?settings.timeout, "the job exceeds runner.timeout; cancelling it");
                    cancel.cancel();
                    run.await
                }
            };
            if let Some(outputs) = result.outputs.get(&p.job_id)
                && result.result == crate::output::Outcome::Success
            {
                reporter.set_outputs(outputs.iter().map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                }));
            }
            if deadline { Ending::DeadlineExceeded } else { Ending::Finished(result.result.into()) }
        }
    };
    let result = match &ending {
        Ending::Finished(r) => *r,
        Ending::DeadlineExceeded => TaskResult::Cancelled,
        Ending::Error(_) => TaskResult::Failure,
    };
    if let Err(e) = reporter.close(ending, &force).await {
        tracing::error!(task = task_id, error = %e, "the final report of the task was not delivered");
    }
    ticker.abort();
    tracing::info!(task = task_id, result = result.name(), "task finished");
    let metrics = crate::metrics::global();
    metrics.jobs_running.dec();
    let word = result.name().trim_start_matches("RESULT_").to_ascii_lowercase();
    metrics.job_finished(&word, started.elapsed());
    result
}
