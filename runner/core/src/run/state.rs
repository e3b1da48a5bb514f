//! The state a job's steps share: [`JobProgress`] (what the steps so far changed: status,
//! `GITHUB_ENV`, `GITHUB_PATH`, the `steps` context, masks, registered post steps),
//! [`StepContext`] (what is fixed for the job: backend, environment, base env), the
//! [`Frame`] a step runs in, and the plain data the step runners pass each other
//! ([`ExecPlan`], [`StepOutcome`], [`PostStep`]). A leaf below `step`, `action`,
//! `docker_step` and `exec`; it imports only [`super::context`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use kiln_plugin_sdk::{Backend, ContainerSpec, Environment, EnvironmentRequest};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::context::Shared;
use crate::expr::{self, JobStatus, Scope};
use crate::mask::Masker;
use crate::output::Outcome;
use crate::workflow::{Action, Defaults, Env};

/// The mutable state of a running job, changed by its steps.
pub(crate) struct JobProgress {
    pub(crate) status: JobStatus,
    /// Set by GITHUB_ENV (and `set-env` when allowed).
    pub(crate) env_accum: IndexMap<String, String>,
    /// Set by GITHUB_PATH, newest first.
    pub(crate) path_accum: Vec<String>,
    /// The `steps` context.
    pub(crate) steps: Map<String, Value>,
    pub(crate) masker: Masker,
    /// Step summaries (GITHUB_STEP_SUMMARY), in order.
    pub(crate) summary: String,
    /// Post steps registered by actions, in registration order.
    pub(crate) posts: Vec<PostStep>,
    /// Remote actions found so far, by `uses:`.
    pub(crate) actions: HashMap<String, LocatedAction>,
    /// Fetched repositories already copied into the environment (by cache key).
    pub(crate) copied_actions: HashSet<String>,
    /// What each action's `pre:` saved (GITHUB_STATE), by the step's position
    /// ([`Frame::position_of`]).
    pub(crate) pre_state: HashMap<String, IndexMap<String, String>>,
}

impl JobProgress {
    /// A job before its first step, with the run's secrets masked.
    pub(crate) fn new(secrets: &IndexMap<String, String>) -> JobProgress {
        let mut masker = Masker::new();
        for v in secrets.values() {
            masker.add(v);
        }
        JobProgress {
            status: JobStatus::Success,
            env_accum: IndexMap::new(),
            path_accum: Vec::new(),
            steps: Map::new(),
            masker,
            summary: String::new(),
            posts: Vec::new(),
            actions: HashMap::new(),
            copied_actions: HashSet::new(),
            pre_state: HashMap::new(),
        }
    }
}

/// An action, parsed, and the directory that holds it inside the environment.
#[derive(Debug, Clone)]
pub(crate) struct LocatedAction {
    /// The action's directory in the environment (`github.action_path`).
    pub(crate) dir: String,
    /// `uses/action.yml`, for messages.
    pub(crate) manifest: String,
    pub(crate) action: Arc<Action>,
}

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
    /// The variables of `RunOptions::extra_env` and the job's `JobEnvProvider`s (part of
    /// `base_env`; a step container gets them too).
    pub(crate) extra_env: IndexMap<String, String>,
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
    pub(crate) step_containers: Option<StepContainerHost>,
}

impl StepContext {
    /// The status host for a step's expressions (`cancelled`: the job was cancelled before it).
    pub(crate) fn host(&self, status: JobStatus, cancelled: bool) -> StepHost<'_> {
        let status = if cancelled { JobStatus::Cancelled } else { status };
        StepHost { status, workspace: self.hash_root.as_deref() }
    }
}

/// A status host for step expressions.
pub(crate) struct StepHost<'a> {
    pub(crate) status: JobStatus,
    pub(crate) workspace: Option<&'a std::path::Path>,
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
    pub(crate) container: Option<Box<DockerPost>>,
}

/// A registered `post-entrypoint`: the container to run after the main steps.
#[derive(Debug, Clone)]
pub(crate) struct DockerPost {
    pub(crate) spec: ContainerSpec,
    /// `INPUT_*`, `runs.env` and `STATE_*`.
    pub(crate) extra_env: IndexMap<String, String>,
}

/// Where a job's step containers are created: its own backend (native layer) or the delegate
/// (delegated layer, an environment created with the job's as parent).
#[derive(Clone)]
pub(crate) struct StepContainerHost {
    pub(crate) backend: Arc<dyn Backend>,
    /// The plugin's name, for messages.
    pub(crate) plugin: String,
    /// The environment the containers go in. Its `paths` are the job's: a delegate mounts the
    /// job's workspace and runner files at the same paths.
    pub(crate) env: Environment,
    /// The plugin builds images (Dockerfile actions).
    pub(crate) image_build: bool,
    /// A delegate environment nobody created yet (the job was not known to have docker steps
    /// when it started): the first docker step creates it. `env` already holds its id and the
    /// job's paths.
    pub(crate) pending: Option<Arc<PendingEnv>>,
}

/// A delegate environment created on first use, once.
pub(crate) struct PendingEnv {
    request: EnvironmentRequest,
    created: tokio::sync::OnceCell<Result<(), String>>,
}

impl PendingEnv {
    pub(crate) fn new(request: EnvironmentRequest) -> Arc<PendingEnv> {
        Arc::new(PendingEnv { request, created: tokio::sync::OnceCell::new() })
    }
}

impl StepContainerHost {
    /// Makes sure the environment exists: creates a pending delegate environment (once).
    pub(crate) async fn ready(&self) -> Result<(), String> {
        let Some(p) = &self.pending else { return Ok(()) };
        p.created
            .get_or_init(|| async {
                self.backend.create_environment(p.request.clone()).await.map(|_| ()).map_err(|e| {
                    format!(
                        "creating the environment for docker steps on backend {:?}: {e}",
                        self.plugin
                    )
                })
            })
            .await
            .clone()
    }
}

/// Which step a process belongs to, and what may stop it.
pub(crate) struct StepRef<'a> {
    /// The job's step (the server's step index; a nested step reports as its enclosing one).
    pub(crate) index: usize,
    /// The step's key in the `steps` context (`GITHUB_ACTION`).
    pub(crate) key: &'a str,
    pub(crate) name: &'a str,
    pub(crate) job_cancel: &'a CancellationToken,
    /// The job was cancelled before the step started: an `always()`/`cancelled()` step, stopped
    /// only by the second interrupt.
    pub(crate) cancelled: bool,
}

impl StepRef<'_> {
    /// The step's token: the job's, or the force token for a step of a cancelled job.
    pub(crate) fn token(&self, cx: &StepContext) -> CancellationToken {
        if self.cancelled { cx.shared.force.clone() } else { self.job_cancel.clone() }
    }
}

/// What the runner of a `uses:` step (action or docker image) needs from the step.
pub(crate) struct UsesStep<'a> {
    pub(crate) at: StepRef<'a>,
    /// The `env` context before the step's own `env`.
    pub(crate) env_ctx: &'a IndexMap<String, String>,
    /// The step's own `env`, evaluated.
    pub(crate) step_env: &'a IndexMap<String, String>,
    pub(crate) timeout: Option<Duration>,
}

impl UsesStep<'_> {
    /// The `env` context with the step's own `env`.
    pub(crate) fn full_env(&self) -> IndexMap<String, String> {
        let mut env = self.env_ctx.clone();
        env.extend(self.step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
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

/// How one step (or one of its processes) ended.
#[derive(Debug)]
pub(crate) struct StepOutcome {
    pub(crate) outcome: Outcome,
    /// `GITHUB_OUTPUT` and `set-output`.
    pub(crate) outputs: Map<String, Value>,
    /// `GITHUB_STATE` and `save-state`: what a `pre:` or main step passes on.
    pub(crate) saved_state: IndexMap<String, String>,
    /// Why it failed (or an env file that could not be read), for the step's log.
    pub(crate) message: Option<String>,
}

impl StepOutcome {
    /// An outcome with nothing else.
    pub(crate) fn of(outcome: Outcome) -> StepOutcome {
        StepOutcome { outcome, outputs: Map::new(), saved_state: IndexMap::new(), message: None }
    }

    /// A failure with a message.
    pub(crate) fn failed(message: impl Into<String>) -> StepOutcome {
        StepOutcome { message: Some(message.into()), ..StepOutcome::of(Outcome::Failure) }
    }
}

/// Evaluates an `env` block into strings, in order, with `env` in the contexts updated as it
/// goes (later keys may use earlier ones, as GitHub allows for the levels above).
pub(crate) fn eval_env(
    env: &Env,
    contexts: &Map<String, Value>,
    host: &(dyn expr::Host + Sync),
) -> Result<IndexMap<String, String>, expr::Error> {
    let scope = Scope { contexts, host };
    match env {
        Env::Map(m) => {
            let mut out = IndexMap::new();
            for (k, v) in m {
                let v = if expr::contains_expression(v) {
                    expr::interpolate(v, &scope)?
                } else {
                    v.clone()
                };
                out.insert(k.clone(), v);
            }
            Ok(out)
        }
        Env::Expr(e) => {
            let v = expr::interpolate_value(&Value::String(e.clone()), &scope)?;
            Ok(match v {
                Value::Object(o) => {
                    o.iter().map(|(k, v)| (k.clone(), expr::to_string(v))).collect()
                }
                _ => IndexMap::new(),
            })
        }
    }
}

/// `INPUT_<NAME>`: upper case, spaces to underscores, as the actions toolkit reads them.
pub(crate) fn input_env(inputs: &Map<String, Value>) -> IndexMap<String, String> {
    inputs
        .iter()
        .map(|(k, v)| (format!("INPUT_{}", k.replace(' ', "_").to_uppercase()), expr::to_string(v)))
        .collect()
}
