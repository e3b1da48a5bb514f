//! Running a workflow: the scheduler, an explicit event loop that starts each job as soon as
//! the jobs it `needs` are done (a true DAG, not stage barriers), expands matrices, honours
//! `max-parallel` and `fail-fast`, and collects results.

//!
//! `run/` is layered; a module imports only modules below it (the test
//! `run_modules_import_only_downwards` keeps it so):
//!
//! ```text
//! mod (the scheduler)
//! ├── call          reusable workflows: prepare the nested run, conclude from its result
//! └── job           one combination, in phases: resolve, preflight, create, setup, pre, steps, post, remove
//!     ├── containers    services and the job container
//!     ├── environment   create / remove environments, delegation
//!     └── step          one step, in phases; composite and node actions; post steps
//!         ├── action        find an action, `pre:` steps
//!         └── docker_step   docker:// steps and docker actions
//!             └── exec          one process of a step: one Exec, its output and env files
//!                 └── report    StepStarted / StepFinished
//!                     └── state     JobProgress, StepContext, Frame, ExecPlan, StepOutcome
//!                         └── context   RunOptions, Shared, JobRun, Leases, job-level contexts
//! ```

mod action;
mod call;
mod containers;
mod context;
mod docker_step;
mod environment;
mod exec;
mod job;
mod report;
mod state;
mod step;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use indexmap::IndexMap;
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use context::{JobEnv, JobEnvProvider, JobEnvRequest, RunOptions, RunResult};

use crate::backends::Backends;
use crate::expr::{self, JobStatus, Scope};
use crate::output::{Event, EventSink, LineKind, Outcome};
use crate::workflow::{self, BoolOrExpr, NumberOrExpr, Workflow};
use context::{ComboResult, JobRun, Leases, Shared, StaticHost, Timer, job_level_contexts};

/// Where a job of the workflow is in the scheduler.
enum Scheduled {
    Pending,
    Running {
        queue: VecDeque<JobRun>,
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
    let mut states: IndexMap<String, Scheduled> =
        selected.iter().map(|id| (id.clone(), Scheduled::Pending)).collect();
    let mut tasks: JoinSet<(String, ComboResult)> = JoinSet::new();
    // The job id of each task, for a task that ends without a result.
    let mut lost: std::collections::HashMap<tokio::task::Id, String> = Default::default();

    loop {
        // Settle: finish jobs whose combinations are all done, start jobs whose needs are all
        // done, launch queued combinations; repeat until nothing changes.
        while settle(&shared, &wf, &mut states, &mut tasks, &mut lost, &cancel) {}
        if states.values().all(|s| matches!(s, Scheduled::Done { .. })) {
            break;
        }
        let Some(joined) = tasks.join_next_with_id().await else {
            // Nothing runs and nothing can start: the remaining jobs wait on each other.
            for state in states.values_mut() {
                if matches!(state, Scheduled::Pending) {
                    *state = Scheduled::Done { result: Outcome::Skipped, outputs: Map::new() };
                }
            }
            break;
        };
        let (id, combo) = match joined {
            Ok((task, r)) => {
                lost.remove(&task);
                r
            }
            Err(e) => {
                // A combination's task cannot panic (see `spawn_combination`); one that was
                // aborted or panicked anyway is counted as failed so the job can finish.
                tracing::error!(error = %e, "a job task ended without a result");
                match lost.remove(&e.id()) {
                    Some(id) => (id, ComboResult::bare(Outcome::Failure)),
                    None => continue,
                }
            }
        };
        if let Some(Scheduled::Running { running, fail_fast, results, outputs, token, .. }) =
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
        if let Scheduled::Done { result, outputs: o } = state {
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
    states: &mut IndexMap<String, Scheduled>,
    tasks: &mut JoinSet<(String, ComboResult)>,
    lost: &mut std::collections::HashMap<tokio::task::Id, String>,
    cancel: &CancellationToken,
) -> bool {
    let mut changed = false;
    // Finish jobs whose combinations are all done.
    for state in states.values_mut() {
        if let Scheduled::Running { queue, running: 0, results, outputs, .. } = state
            && queue.is_empty()
        {
            let result = aggregate(results);
            *state = Scheduled::Done { result, outputs: std::mem::take(outputs) };
            changed = true;
        }
    }
    // Start every pending job whose needs are all done.
    let ids: Vec<String> = states.keys().cloned().collect();
    for id in &ids {
        if !matches!(states.get(id), Some(Scheduled::Pending)) {
            continue;
        }
        let job = &wf.jobs[id.as_str()];
        let needs_done =
            job.needs.iter().all(|n| matches!(states.get(n), Some(Scheduled::Done { .. }) | None));
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
        if let Scheduled::Running { queue, running, max_parallel, token, results, .. } = state {
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
                let task = tasks.spawn(spawn_combination(shared.clone(), id.clone(), run));
                lost.insert(task.id(), id.clone());
            }
        }
    }
    changed
}

/// One combination's task: the job (or the reusable-workflow call) with its panic caught. A
/// job whose task panicked is a failed job: reported finished with the panic's message, its
/// environments removed (its leases live outside the job's future), and its result counted
/// like any other, which releases its slot.
async fn spawn_combination(shared: Arc<Shared>, id: String, run: JobRun) -> (String, ComboResult) {
    let timer = Timer::start();
    let leases = run.leases.clone();
    let name = run.display_name.clone();
    let ran = if shared.opts.workflow.jobs[id.as_str()].uses.is_some() {
        AssertUnwindSafe(run_call(shared.clone(), run)).catch_unwind().await
    } else {
        AssertUnwindSafe(job::run_job(shared.clone(), run)).catch_unwind().await
    };
    let result = match ran {
        Ok(result) => result,
        Err(panic) => after_panic(&shared, &id, &name, &leases, &timer, panic).await,
    };
    (id, result)
}

/// Cleans up after a combination whose task panicked: the message in the job's log, its
/// environments removed (newest first), the job reported failed.
async fn after_panic(
    shared: &Shared,
    id: &str,
    name: &str,
    leases: &Leases,
    timer: &Timer,
    panic: Box<dyn std::any::Any + Send>,
) -> ComboResult {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    tracing::error!(job = id, name, panic = %what, "a job's task panicked");
    let log = |text: String, kind: LineKind| {
        shared.sink.event(Event::Line { job: name.to_owned(), step: None, text, kind });
    };
    log(
        format!("internal error: kiln panicked while running this job: {what}"),
        LineKind::RunnerError,
    );
    for lease in leases.held() {
        if let Some(plugin) = shared.backends.get(&lease.plugin) {
            environment::remove_env(plugin, &lease.environment_id, &log).await;
        }
        leases.give_back(&shared.backends, &lease.environment_id);
    }
    shared.sink.event(Event::JobFinished {
        job: name.to_owned(),
        result: Outcome::Failure,
        duration: timer.elapsed(),
    });
    ComboResult::bare(Outcome::Failure)
}

/// One combination of a job that calls a reusable workflow: the call prepared, the called
/// workflow run by this scheduler one level deeper, the caller's result concluded from it.
fn run_call(shared: Arc<Shared>, run: JobRun) -> Pin<Box<dyn Future<Output = ComboResult> + Send>> {
    Box::pin(async move {
        let timer = Timer::start();
        let name = run.display_name.clone();
        let uses = shared.opts.workflow.jobs[run.job_id.as_str()].uses.clone().unwrap_or_default();
        shared.sink.event(Event::JobStarted { job: name.clone(), runs_on: uses });
        let result = match call::prepare(&shared, &run).await {
            Ok(prepared) => {
                let result = run_nested(
                    prepared.options,
                    shared.backends.clone(),
                    prepared.sink,
                    run.cancel.clone(),
                    shared.force.clone(),
                    shared.depth + 1,
                )
                .await;
                call::conclude(&shared, &run, prepared.called, result)
            }
            Err(message) => {
                shared.sink.event(Event::Line {
                    job: name.clone(),
                    step: None,
                    text: message,
                    kind: LineKind::RunnerError,
                });
                ComboResult::bare(Outcome::Failure)
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
    states: &IndexMap<String, Scheduled>,
    needs: &[String],
    external: &Map<String, Value>,
) -> Map<String, Value> {
    let mut ctx = Map::new();
    for n in needs {
        let (result, outputs) = match states.get(n) {
            Some(Scheduled::Done { result, outputs }) => (*result, outputs.clone()),
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
) -> Scheduled {
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
        Scheduled::Done { result, outputs: Map::new() }
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
            JobRun::new(shared, id, index, combo, strategy_ctx, needs.clone(), token.clone())
        })
        .collect();
    Scheduled::Running {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each module of `run/` and its layer: a module may use only modules of a lower layer
    /// (so the import graph has no cycle). `mod` is the scheduler in `mod.rs`.
    const LAYERS: &[(&str, u32)] = &[
        ("mod", 9),
        ("call", 8),
        ("job", 8),
        ("step", 7),
        ("action", 6),
        ("docker_step", 6),
        ("containers", 5),
        ("environment", 5),
        ("exec", 4),
        ("report", 3),
        ("state", 2),
        ("context", 1),
    ];

    /// The modules of `run/` a module's code (its tests left out) names: `super::x`,
    /// `super::{x, y}`, `crate::run::x`, and in `mod.rs` `x::`.
    fn uses(module: &str, source: &str) -> std::collections::BTreeSet<String> {
        let code = source.split("#[cfg(test)]").next().unwrap_or(source);
        let names: Vec<&str> = LAYERS.iter().map(|(n, _)| *n).collect();
        let mut found = std::collections::BTreeSet::new();
        let mut add = |path: &str| {
            let first = path.trim().split("::").next().unwrap_or("").trim();
            if first.is_empty() || first == "self" {
                return;
            }
            // `super::Item` names an item of mod.rs itself.
            let target = if names.contains(&first) { first } else { "mod" };
            found.insert(target.to_owned());
        };
        for prefix in ["super::", "crate::run::"] {
            for (at, _) in code.match_indices(prefix) {
                let rest = &code[at + prefix.len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    group[..end].split(',').for_each(&mut add);
                } else {
                    let end = rest
                        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .unwrap_or(rest.len());
                    add(&rest[..end]);
                }
            }
        }
        if module == "mod" {
            for name in &names {
                let bare = format!("{name}::");
                let named = code.match_indices(&bare).any(|(at, _)| {
                    !code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if named {
                    found.insert((*name).to_owned());
                }
            }
        }
        found.remove(module);
        found
    }

    #[test]
    fn run_modules_import_only_downwards() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/run");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".rs"))
            .collect();
        files.sort();
        let rank = |m: &str| LAYERS.iter().find(|(n, _)| *n == m).map(|(_, r)| *r);
        let mut wrong = Vec::new();
        for file in &files {
            let module = file.trim_end_matches(".rs");
            let Some(own) = rank(module) else {
                wrong.push(format!("{file}: not in LAYERS; give the new module a layer"));
                continue;
            };
            let source = std::fs::read_to_string(dir.join(file)).unwrap();
            for used in uses(module, &source) {
                if rank(&used).is_none_or(|r| r >= own) {
                    wrong.push(format!("{module} (layer {own}) uses {used} (not below it)"));
                }
            }
        }
        assert!(wrong.is_empty(), "run/ imports upwards or sideways:\n{}", wrong.join("\n"));
        // And the check sees an upward import.
        assert!(uses("state", "use super::step::x;").contains("step"));
        assert!(uses("exec", "use super::{state::A, job};").contains("job"));
        assert!(uses("step", "super::now_ms()").contains("mod"));
    }

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
