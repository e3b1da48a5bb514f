//! Running a workflow: the scheduler, an explicit event loop that starts each job as soon as
//! the jobs it `needs` are done (a true DAG, not stage barriers), expands matrices, honours
//! `max-parallel` and `fail-fast`, and collects results.

mod action;
mod call;
mod docker_step;
mod job;
mod step;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backends::Backends;
use crate::expr::{self, JobStatus, Scope};
use crate::identity::Identity;
use crate::labels::LabelConfig;
use crate::output::{Event, EventSink, LineKind, Outcome};
use crate::workflow::{self, BoolOrExpr, NumberOrExpr, Workflow};

/// Everything a run needs besides the plugins.
pub struct RunOptions {
    /// The parsed, validated workflow.
    pub workflow: Arc<Workflow>,
    /// The `github` context, without the per-job keys (`job`, `workspace`, `action`).
    pub github: Map<String, Value>,
    /// Secrets.
    pub secrets: IndexMap<String, String>,
    /// Configuration variables.
    pub vars: IndexMap<String, String>,
    /// `inputs` (workflow_dispatch / workflow_call).
    pub inputs: Map<String, Value>,
    /// Environment added to every step, below the workflow's `env`.
    pub extra_env: IndexMap<String, String>,
    /// Label configurations.
    pub labels: Vec<LabelConfig>,
    /// The backend for `runs-on` labels no configuration names (`host` in `kiln exec`).
    pub default_backend: Option<String>,
    /// Only these jobs (and what they need); `None` = all.
    pub only_jobs: Option<Vec<String>>,
    /// The directory copied into each job's workspace.
    pub workspace: Option<PathBuf>,
    /// Who we are.
    pub identity: Identity,
    /// Upper bound on any job's run time (`runner.timeout`).
    pub max_job_time: Option<Duration>,
    /// Set `ACT=true` like act does (local runs).
    pub act_compat: bool,
    /// Satisfy `actions/checkout` of the repository being run from the workspace copy (local
    /// runs, like act) instead of running the action.
    pub skip_local_checkout: bool,
    /// Extra combinations (`--matrix k:v`): only combinations matching all are run.
    pub matrix_filter: Vec<(String, String)>,
    /// `needs` entries for jobs that are not in this workflow, already finished elsewhere
    /// (daemon mode: the server sends each job alone, with the results and outputs of the jobs
    /// it needs), as `{id: {"result": "success", "outputs": {…}}}`. They count as done.
    pub external_needs: Map<String, Value>,
    /// Where remote actions and reusable workflows come from.
    pub actions: Arc<crate::actions::Resolver>,
    /// Extra variables of each job (job services: the cache and artifact servers).
    pub job_env: Option<Arc<dyn JobEnvHook>>,
}

/// Gives each job variables of its own, asked once when the job starts: the job services'
/// URLs and the job's token (`kiln-services`). Values in `mask` are masked in the job's log.
pub trait JobEnvHook: Send + Sync + std::fmt::Debug {
    /// The variables of job `job_id` of the run whose `github` context is given.
    fn job_env(&self, github: &Map<String, Value>, job_id: &str) -> JobEnv;
}

/// What a [`JobEnvHook`] gives a job.
#[derive(Debug, Clone, Default)]
pub struct JobEnv {
    /// Variables added to every step's environment (below the workflow's `env`).
    pub env: Vec<(String, String)>,
    /// Values to mask (tokens).
    pub mask: Vec<String>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The workflow's result.
    pub result: Outcome,
    /// Each job (matrix combinations merged) and its result, in workflow order.
    pub jobs: Vec<(String, Outcome)>,
    /// Outputs of each job.
    pub outputs: BTreeMap<String, Map<String, Value>>,
}

/// Shared by every job of a run.
pub(crate) struct Shared {
    pub(crate) opts: RunOptions,
    pub(crate) backends: Arc<Backends>,
    pub(crate) sink: Arc<dyn EventSink>,
    /// Cancelled on the second interrupt: stops even `always()` steps.
    pub(crate) force: CancellationToken,
    /// How many reusable-workflow calls enclose this run (0 at the top).
    pub(crate) depth: usize,
    /// The workspace copied into each job (its file list taken once).
    pub(crate) workspace: Option<Arc<crate::workspace::Workspace>>,
}

/// What a finished job (one combination) reports to the scheduler.
pub(crate) struct ComboResult {
    pub(crate) result: Outcome,
    pub(crate) outputs: Map<String, Value>,
}

enum JobState {
    Pending,
    Running {
        queue: VecDeque<job::JobRun>,
        running: usize,
        max_parallel: usize,
        fail_fast: bool,
        results: Vec<Outcome>,
        outputs: Map<String, Value>,
        token: CancellationToken,
    },
    Done {
        result: Outcome,
        outputs: Map<String, Value>,
    },
}

/// Runs a workflow to the end. `cancel` is the first interrupt (cancel jobs, run `always()`
/// steps, clean up); `force` the second.
pub async fn run_workflow(
    opts: RunOptions,
    backends: Arc<Backends>,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
    force: CancellationToken,
) -> RunResult {
    run_nested(opts, backends, sink, cancel, force, 0).await
}

/// [`run_workflow`] at a depth of reusable-workflow calls.
async fn run_nested(
    opts: RunOptions,
    backends: Arc<Backends>,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
    force: CancellationToken,
    depth: usize,
) -> RunResult {
    let wf = opts.workflow.clone();
    let selected = select_jobs(&wf, opts.only_jobs.as_deref());
    let workspace = opts.workspace.clone().map(crate::workspace::Workspace::new);
    let shared = Arc::new(Shared { opts, backends, sink, force, depth, workspace });
    let mut states: IndexMap<String, JobState> =
        selected.iter().map(|id| (id.clone(), JobState::Pending)).collect();
    let mut tasks: JoinSet<(String, ComboResult)> = JoinSet::new();

    loop {
        // Settle: finish jobs whose combinations are all done, start jobs whose needs are all
        // done, launch queued combinations; repeat until nothing changes.
        while settle(&shared, &wf, &mut states, &mut tasks, &cancel) {}
        if states.values().all(|s| matches!(s, JobState::Done { .. })) {
            break;
        }
        let Some(joined) = tasks.join_next().await else {
            // Nothing runs and nothing can start: the remaining jobs wait on each other.
            for state in states.values_mut() {
                if matches!(state, JobState::Pending) {
                    *state = JobState::Done { result: Outcome::Skipped, outputs: Map::new() };
                }
            }
            break;
        };
        let (id, combo) = match joined {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "a job task panicked");
                continue;
            }
        };
        if let Some(JobState::Running { running, fail_fast, results, outputs, token, .. }) =
            states.get_mut(&id)
        {
            *running -= 1;
            if combo.result == Outcome::Failure && *fail_fast {
                token.cancel();
            }
            results.push(combo.result);
            for (k, v) in combo.outputs {
                outputs.insert(k, v);
            }
        }
    }

    let mut jobs = Vec::new();
    let mut outputs = BTreeMap::new();
    for (id, state) in states {
        if let JobState::Done { result, outputs: o } = state {
            jobs.push((id.clone(), result));
            outputs.insert(id, o);
        }
    }
    let result = if cancel.is_cancelled() {
        Outcome::Cancelled
    } else if jobs.iter().any(|(_, r)| *r == Outcome::Failure) {
        Outcome::Failure
    } else if jobs.iter().any(|(_, r)| *r == Outcome::Cancelled) {
        Outcome::Cancelled
    } else {
        Outcome::Success
    };
    RunResult { result, jobs, outputs }
}

/// One pass of the scheduler's bookkeeping. Returns whether anything changed.
fn settle(
    shared: &Arc<Shared>,
    wf: &Workflow,
    states: &mut IndexMap<String, JobState>,
    tasks: &mut JoinSet<(String, ComboResult)>,
    cancel: &CancellationToken,
) -> bool {
    let mut changed = false;
    // Finish jobs whose combinations are all done.
    for state in states.values_mut() {
        if let JobState::Running { queue, running: 0, results, outputs, .. } = state
            && queue.is_empty()
        {
            let result = aggregate(results);
            *state = JobState::Done { result, outputs: std::mem::take(outputs) };
            changed = true;
        }
    }
    // Start every pending job whose needs are all done.
    let ids: Vec<String> = states.keys().cloned().collect();
    for id in &ids {
        if !matches!(states.get(id), Some(JobState::Pending)) {
            continue;
        }
        let job = &wf.jobs[id.as_str()];
        let needs_done =
            job.needs.iter().all(|n| matches!(states.get(n), Some(JobState::Done { .. }) | None));
        if !needs_done {
            continue;
        }
        let needs = needs_context(states, &job.needs, &shared.opts.external_needs);
        let state = start_job(shared, id, needs, cancel);
        states.insert(id.clone(), state);
        changed = true;
    }
    // Launch queued combinations up to each job's max-parallel.
    for (id, state) in states.iter_mut() {
        if let JobState::Running { queue, running, max_parallel, token, results, .. } = state {
            while *running < *max_parallel {
                let Some(run) = queue.pop_front() else { break };
                changed = true;
                if token.is_cancelled() {
                    results.push(Outcome::Cancelled);
                    shared.sink.event(Event::JobFinished {
                        job: run.display_name.clone(),
                        result: Outcome::Cancelled,
                        duration: Duration::ZERO,
                    });
                    continue;
                }
                *running += 1;
                let id = id.clone();
                let shared = shared.clone();
                if shared.opts.workflow.jobs[id.as_str()].uses.is_some() {
                    tasks.spawn(async move { (id, call::run_call(shared, run).await) });
                } else {
                    tasks.spawn(async move { (id, job::run_job(shared, run).await) });
                }
            }
        }
    }
    changed
}

/// The jobs to run: all, or the selected ones and everything they need, transitively.
fn select_jobs(wf: &Workflow, only: Option<&[String]>) -> Vec<String> {
    let Some(only) = only else { return wf.jobs.keys().cloned().collect() };
    let mut keep: std::collections::BTreeSet<String> = Default::default();
    let mut stack: Vec<String> = only.to_vec();
    while let Some(id) = stack.pop() {
        if let Some(job) = wf.jobs.get(&id)
            && keep.insert(id.clone())
        {
            stack.extend(job.needs.iter().cloned());
        }
    }
    wf.jobs.keys().filter(|id| keep.contains(*id)).cloned().collect()
}

fn aggregate(results: &[Outcome]) -> Outcome {
    if results.contains(&Outcome::Failure) {
        Outcome::Failure
    } else if results.contains(&Outcome::Cancelled) {
        Outcome::Cancelled
    } else if !results.is_empty() && results.iter().all(|r| *r == Outcome::Skipped) {
        Outcome::Skipped
    } else {
        Outcome::Success
    }
}

fn needs_context(
    states: &IndexMap<String, JobState>,
    needs: &[String],
    external: &Map<String, Value>,
) -> Map<String, Value> {
    let mut ctx = Map::new();
    for n in needs {
        let (result, outputs) = match states.get(n) {
            Some(JobState::Done { result, outputs }) => (*result, outputs.clone()),
            None if external.contains_key(n) => {
                ctx.insert(n.clone(), external[n.as_str()].clone());
                continue;
            }
            _ => (Outcome::Skipped, Map::new()),
        };
        ctx.insert(n.clone(), json!({ "result": result.as_str(), "outputs": outputs }));
    }
    ctx
}

/// A status host for job-level expressions (`if`, `strategy`, `runs-on`).
struct StaticHost(JobStatus);

impl expr::Host for StaticHost {
    fn job_status(&self) -> JobStatus {
        self.0
    }
    fn hash_files(&self, _: &[String]) -> Result<String, String> {
        Err("hashFiles is only available in steps".into())
    }
}

/// Whether a condition calls success(), failure(), cancelled() or always().
fn uses_status_function(cond: &str) -> bool {
    let c = cond.trim();
    let inner = c.strip_prefix("${{").and_then(|c| c.strip_suffix("}}")).unwrap_or(c);
    expr::parse(inner).map(|e| e.uses_status_function()).unwrap_or(false)
}

/// Decides a job's `if`, expands its matrix and queues its combinations.
fn start_job(
    shared: &Arc<Shared>,
    id: &str,
    needs: Map<String, Value>,
    cancel: &CancellationToken,
) -> JobState {
    let wf = &shared.opts.workflow;
    let job = &wf.jobs[id];
    let sink = &shared.sink;
    let finish = |result: Outcome, message: Option<String>| {
        let name = job.name.clone().unwrap_or_else(|| id.to_owned());
        if let Some(message) = message {
            sink.event(Event::Line {
                job: name.clone(),
                step: None,
                text: message,
                kind: LineKind::RunnerError,
            });
        }
        sink.event(Event::JobFinished { job: name, result, duration: Duration::ZERO });
        JobState::Done { result, outputs: Map::new() }
    };
    if cancel.is_cancelled() {
        return finish(Outcome::Cancelled, None);
    }
    let results: Vec<&str> =
        needs.values().filter_map(|n| n.get("result").and_then(Value::as_str)).collect();
    let all_ok = results.iter().all(|r| *r == "success");
    let any_failed = results.iter().any(|r| *r == "failure" || *r == "cancelled");
    let cond = job.if_.as_deref().unwrap_or("");
    if !all_ok && !uses_status_function(cond) {
        return finish(Outcome::Skipped, None);
    }
    let status = if any_failed { JobStatus::Failure } else { JobStatus::Success };
    let contexts = job_level_contexts(&shared.opts, needs.clone(), Map::new());
    let host = StaticHost(status);
    let scope = Scope { contexts: &contexts, host: &host };
    match expr::evaluate_if(cond, &scope) {
        Ok(true) => {}
        Ok(false) => return finish(Outcome::Skipped, None),
        Err(e) => {
            return finish(Outcome::Failure, Some(format!("{}: jobs.{id}.if: {e}", wf.file)));
        }
    }
    // Matrix.
    let strategy = job.strategy.as_ref();
    let combos = match strategy.and_then(|s| s.matrix.as_ref()) {
        None => vec![IndexMap::new()],
        Some(m) => {
            let evaluated = match eval_matrix(m, &scope, 0) {
                Ok(v) => v,
                Err(e) => {
                    return finish(
                        Outcome::Failure,
                        Some(format!("{}: jobs.{id}.strategy.matrix: {e}", wf.file)),
                    );
                }
            };
            match workflow::expand_matrix(&evaluated) {
                Ok(c) => c,
                Err(e) => {
                    return finish(
                        Outcome::Failure,
                        Some(format!("{}: jobs.{id}.strategy.matrix: {e}", wf.file)),
                    );
                }
            }
        }
    };
    let combos: Vec<_> = combos
        .into_iter()
        .filter(|c| {
            shared
                .opts
                .matrix_filter
                .iter()
                .all(|(k, v)| c.get(k).is_none_or(|have| expr::to_string(have) == *v))
        })
        .collect();
    let eval_bool = |v: Option<&BoolOrExpr>, default: bool| match v {
        None => Ok(default),
        Some(BoolOrExpr::Bool(b)) => Ok(*b),
        Some(BoolOrExpr::Expr(e)) => expr::interpolate(e, &scope).map(|s| s == "true"),
    };
    let fail_fast = match eval_bool(strategy.and_then(|s| s.fail_fast.as_ref()), true) {
        Ok(b) => b,
        Err(e) => {
            return finish(
                Outcome::Failure,
                Some(format!("{}: jobs.{id}.strategy.fail-fast: {e}", wf.file)),
            );
        }
    };
    let max_parallel = match strategy.and_then(|s| s.max_parallel.as_ref()) {
        None => usize::MAX,
        Some(NumberOrExpr::Number(n)) => (*n as usize).max(1),
        Some(NumberOrExpr::Expr(e)) => match expr::interpolate(e, &scope) {
            Ok(s) => s.trim().parse::<f64>().map(|n| (n as usize).max(1)).unwrap_or(usize::MAX),
            Err(e) => {
                return finish(
                    Outcome::Failure,
                    Some(format!("{}: jobs.{id}.strategy.max-parallel: {e}", wf.file)),
                );
            }
        },
    };
    let token = cancel.child_token();
    let total = combos.len();
    let queue = combos
        .into_iter()
        .enumerate()
        .map(|(index, combo)| {
            let strategy_ctx = json!({
                "fail-fast": fail_fast,
                "job-index": index,
                "job-total": total,
                "max-parallel": if max_parallel == usize::MAX { total } else { max_parallel },
            });
            job::JobRun::new(shared, id, index, combo, strategy_ctx, needs.clone(), token.clone())
        })
        .collect();
    JobState::Running {
        queue,
        running: 0,
        max_parallel,
        fail_fast,
        results: Vec::new(),
        outputs: Map::new(),
        token,
    }
}

/// Evaluates a `strategy.matrix` definition with the template rules GitHub (and act) apply:
/// expressions anywhere, an expression item of a list that yields a list is spliced into it,
/// and a `${{ insert }}` key merges its (object) value into the enclosing object.
fn eval_matrix(v: &Value, scope: &Scope<'_>, depth: usize) -> Result<Value, String> {
    if depth > 64 {
        return Err("the matrix nests too deeply".into());
    }
    match v {
        Value::String(s) if expr::contains_expression(s) => {
            expr::interpolate_value(v, scope).map_err(|e| e.to_string())
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let spliced = matches!(item, Value::String(s) if expr::contains_expression(s));
                match eval_matrix(item, scope, depth + 1)? {
                    Value::Array(inner) if spliced => out.extend(inner),
                    other => out.push(other),
                }
            }
            Ok(Value::Array(out))
        }
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, item) in map {
                let value = eval_matrix(item, scope, depth + 1)?;
                if is_insert_directive(k) {
                    match value {
                        Value::Object(inner) => out.extend(inner),
                        other => {
                            return Err(format!(
                                "${{{{ insert }}}} needs an object, got {}",
                                expr::to_string(&other)
                            ));
                        }
                    }
                    continue;
                }
                let key = if expr::contains_expression(k) {
                    expr::interpolate(k, scope).map_err(|e| e.to_string())?
                } else {
                    k.clone()
                };
                out.insert(key, value);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// Whether a key is the template directive `${{ insert }}`.
fn is_insert_directive(key: &str) -> bool {
    key.trim()
        .strip_prefix("${{")
        .and_then(|k| k.strip_suffix("}}"))
        .is_some_and(|k| k.trim().eq_ignore_ascii_case("insert"))
}

/// The contexts available at job level: github, vars, secrets, inputs, needs, matrix, env
/// (the workflow's), strategy.
pub(crate) fn job_level_contexts(
    opts: &RunOptions,
    needs: Map<String, Value>,
    matrix: Map<String, Value>,
) -> Map<String, Value> {
    let mut c = Map::new();
    c.insert("github".into(), Value::Object(opts.github.clone()));
    c.insert("vars".into(), to_obj(&opts.vars));
    c.insert("secrets".into(), to_obj(&opts.secrets));
    c.insert("inputs".into(), Value::Object(opts.inputs.clone()));
    c.insert("needs".into(), Value::Object(needs));
    c.insert("matrix".into(), Value::Object(matrix));
    c.insert("strategy".into(), Value::Object(Map::new()));
    c.insert("env".into(), Value::Object(Map::new()));
    c.insert("job".into(), Value::Object(Map::new()));
    c.insert("runner".into(), Value::Object(Map::new()));
    c.insert("steps".into(), Value::Object(Map::new()));
    c
}

pub(crate) fn to_obj(m: &IndexMap<String, String>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A monotonic start time and its duration so far.
pub(crate) struct Timer(Instant);

impl Timer {
    pub(crate) fn start() -> Timer {
        Timer(Instant::now())
    }
    pub(crate) fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Always;

    impl expr::Host for Always {
        fn job_status(&self) -> JobStatus {
            JobStatus::Success
        }
        fn hash_files(&self, _: &[String]) -> Result<String, String> {
            Ok(String::new())
        }
    }

    fn eval(matrix: Value) -> String {
        let mut contexts = Map::new();
        contexts.insert("inputs".into(), json!({ "n": 3 }));
        let scope = Scope { contexts: &contexts, host: &Always };
        match eval_matrix(&matrix, &scope, 0) {
            Ok(v) => v.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn matrix_templates() {
        let cases = [
            (json!({ "a": [1, "${{ inputs.n }}"] }), r#"{"a":[1,3]}"#),
            (json!({ "a": ["x", "${{ fromJSON('[1,2]') }}"] }), r#"{"a":["x",1,2]}"#),
            (json!({ "a": [["${{ fromJSON('[1,2]') }}"]] }), r#"{"a":[[1,2]]}"#),
            (json!({ "a": [{ "k": 1, "${{ insert }}": { "j": 2 } }] }), r#"{"a":[{"k":1,"j":2}]}"#),
            (
                json!({ "a": [{ "${{insert}}": "${{ fromJSON('{\"z\":1}') }}" }] }),
                r#"{"a":[{"z":1}]}"#,
            ),
            (json!({ "${{ insert }}": "x" }), "error: ${{ insert }} needs an object, got x"),
            (json!({ "a": "${{ fromJSON('[1]') }}" }), r#"{"a":[1]}"#),
            (json!({ "a": ["${{ nope }}"] }), "error: unrecognized named-value"),
        ];
        for (input, want) in cases {
            let got = eval(input.clone());
            assert!(got.starts_with(want), "{input}: got {got}, want {want}");
        }
    }

    #[test]
    fn status_functions_are_detected() {
        assert!(uses_status_function("${{ always() }}"));
        assert!(uses_status_function("failure() && x"));
        assert!(!uses_status_function("${{ github.ref == 'x' }}"));
        assert!(!uses_status_function(""));
    }

    #[test]
    fn selected_jobs_pull_in_their_needs() {
        let wf = workflow::parse_workflow(
            "on: push\njobs:\n  a:\n    runs-on: x\n    steps: [{run: a}]\n  b:\n    needs: a\n    runs-on: x\n    steps: [{run: b}]\n  c:\n    runs-on: x\n    steps: [{run: c}]\n",
            "w.yml",
        )
        .unwrap();
        assert_eq!(select_jobs(&wf, Some(&["b".to_owned()])), vec!["a", "b"]);
        assert_eq!(select_jobs(&wf, None), vec!["a", "b", "c"]);
    }
}
