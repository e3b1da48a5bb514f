//! What a run shares with every job, and a queued job combination: the run's options and
//! result, [`Shared`], [`JobRun`], the job-level contexts and the small helpers every level of
//! `run/` uses. A leaf: it imports no other module of `run/`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::backends::Backends;
use crate::expr::{self, JobStatus, Scope};
use crate::identity::Identity;
use crate::labels::LabelConfig;
use crate::output::{EventSink, Outcome};
use crate::workflow::Workflow;

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
    /// Environment added to each job's steps by services of the run (cache, artifacts), asked
    /// once per job; it sits with `extra_env` (later providers win over earlier ones and over
    /// `extra_env`).
    pub job_env: Vec<Arc<dyn JobEnvProvider>>,
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
}

/// A source of per-job environment variables (`RunOptions::job_env`), e.g. a cache server
/// handing each job its `ACTIONS_CACHE_URL` and a token.
pub trait JobEnvProvider: Send + Sync + std::fmt::Debug {
    /// The variables for one job combination, asked when its environment exists, before its
    /// setup exec. They are below the workflow's and the job's `env`, like
    /// `RunOptions::extra_env`.
    fn job_env(&self, job: &JobEnvRequest<'_>) -> JobEnv;
}

/// What a [`JobEnvProvider`] gives one job.
#[derive(Debug, Clone, Default)]
pub struct JobEnv {
    /// Variables added to every step's environment.
    pub vars: IndexMap<String, String>,
    /// Values masked in the job's log, as secrets are (the job's tokens).
    pub mask: Vec<String>,
}

/// What a [`JobEnvProvider`] is told about the job.
#[derive(Debug)]
pub struct JobEnvRequest<'a> {
    /// The job's id in the workflow (`jobs.<id>`).
    pub job_id: &'a str,
    /// The combination's display name (`build (linux)`).
    pub display_name: &'a str,
    /// The combination's index in its matrix (0 without one).
    pub index: usize,
    /// The backend (plugin name) the job's steps run on.
    pub backend: &'a str,
    /// The job's environment id on that backend.
    pub environment_id: &'a str,
    /// The run's `github` context (`run_id`, `repository`, …).
    pub github: &'a Map<String, Value>,
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

impl ComboResult {
    /// A result without outputs.
    pub(crate) fn bare(result: Outcome) -> ComboResult {
        ComboResult { result, outputs: Map::new() }
    }
}

/// One queued combination of a job.
pub(crate) struct JobRun {
    pub(crate) job_id: String,
    pub(crate) index: usize,
    pub(crate) matrix: Map<String, Value>,
    pub(crate) strategy: Value,
    pub(crate) needs: Map<String, Value>,
    pub(crate) display_name: String,
    pub(crate) cancel: CancellationToken,
    /// The environments this combination holds, known outside its task: when the task dies
    /// the scheduler removes them.
    pub(crate) leases: Leases,
}

impl JobRun {
    pub(crate) fn new(
        shared: &Arc<Shared>,
        job_id: &str,
        index: usize,
        combo: IndexMap<String, Value>,
        strategy: Value,
        needs: Map<String, Value>,
        cancel: CancellationToken,
    ) -> JobRun {
        let matrix: Map<String, Value> = combo.into_iter().collect();
        let job = &shared.opts.workflow.jobs[job_id];
        let contexts = job_level_contexts(&shared.opts, needs.clone(), matrix.clone());
        let display_name = job_display_name(job_id, job.name.as_deref(), &matrix, &contexts);
        JobRun {
            job_id: job_id.to_owned(),
            index,
            matrix,
            strategy,
            needs,
            display_name,
            cancel,
            leases: Leases::default(),
        }
    }

    /// The job-level contexts of this combination (with its `strategy`).
    pub(crate) fn contexts(&self, opts: &RunOptions) -> Map<String, Value> {
        let mut contexts = job_level_contexts(opts, self.needs.clone(), self.matrix.clone());
        contexts.insert("strategy".into(), self.strategy.clone());
        contexts
    }
}

/// An environment a job created (or is creating): which plugin holds it, and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) plugin: String,
    pub(crate) environment_id: String,
}

/// The environments a job holds, in creation order; shared between the job's task and the
/// scheduler so a job whose task panicked still has its environments removed. Each lease is
/// also a claim in [`Backends`] (the garbage collector leaves it alone).
#[derive(Debug, Clone, Default)]
pub(crate) struct Leases(Arc<Mutex<Vec<Lease>>>);

impl Leases {
    /// Records (and claims) an environment about to be created.
    pub(crate) fn take(&self, backends: &Backends, plugin: &str, environment_id: &str) {
        backends.claim(environment_id);
        let lease = Lease { plugin: plugin.to_owned(), environment_id: environment_id.to_owned() };
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(lease);
    }

    /// Forgets (and releases the claim on) an environment that was removed.
    pub(crate) fn give_back(&self, backends: &Backends, environment_id: &str) {
        backends.release(environment_id);
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|l| l.environment_id != environment_id);
    }

    /// The environments still held, newest first (children before their parents).
    pub(crate) fn held(&self) -> Vec<Lease> {
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        held.reverse();
        held
    }
}

/// `name` interpolated with the matrix, or `id (v1, v2)` for a matrix job without a name.
pub(crate) fn job_display_name(
    job_id: &str,
    name: Option<&str>,
    matrix: &Map<String, Value>,
    contexts: &Map<String, Value>,
) -> String {
    if let Some(name) = name {
        let host = StaticHost(JobStatus::Success);
        if let Ok(s) = expr::interpolate(name, &Scope { contexts, host: &host }) {
            return s;
        }
        return name.to_owned();
    }
    if matrix.is_empty() {
        return job_id.to_owned();
    }
    let values: Vec<String> = matrix
        .values()
        .map(|v| match v {
            Value::Object(_) | Value::Array(_) => v.to_string(),
            _ => expr::to_string(v),
        })
        .collect();
    format!("{job_id} ({})", values.join(", "))
}

/// A status host for job-level expressions (`if`, `strategy`, `runs-on`).
pub(crate) struct StaticHost(pub(crate) JobStatus);

impl expr::Host for StaticHost {
    fn job_status(&self) -> JobStatus {
        self.0
    }
    fn hash_files(&self, _: &[String]) -> Result<String, String> {
        Err("hashFiles is only available in steps".into())
    }
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

/// A string map as a JSON object.
pub(crate) fn to_obj(m: &IndexMap<String, String>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
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
