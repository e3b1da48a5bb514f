//! Docker steps: `uses: docker://IMAGE` and docker actions (`runs.using: docker`). Each runs
//! in a step container of its own: `CreateStepContainer` (image, or a Dockerfile build), one
//! `Exec` with an empty `argv` — the container's entrypoint, with the same output, env files
//! and cancellation as a `run:` step —, then `Remove` of the container.
//!
//! What the container gets, as GitHub does it: the workspace mounted at the environment's
//! workspace path (also its working directory) and the runner's files at theirs, so
//! `GITHUB_OUTPUT`, `GITHUB_ENV` and the other env files work; GitHub's default variables, the
//! workflow, job and step `env`, the action's `runs.env`, and each input as `INPUT_<NAME>`;
//! `runs.entrypoint` (or `with.entrypoint`) and `runs.args` (or `with.args`, split like a
//! command line) interpolated with the `inputs` context. It does not get the environment's own
//! image variables (`PATH`, `HOME`): those are the step image's.
//!
//! `pre-entrypoint` runs right before the main entrypoint, in its own container (the action is
//! resolved when its step runs, so there is no earlier point); `post-entrypoint` is registered
//! like a node action's `post` and runs after the main steps (`run_post`). State saved with
//! `GITHUB_STATE` by one is `STATE_<name>` in the later ones.
//!
//! Where step containers are created is [`StepContainerHost`]: the job's own backend when its
//! `step_containers` layer is native, the delegate when it is delegated (`job.rs`).

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use kiln_plugin_sdk::{
    Backend, ContainerKind, ContainerRequest, ContainerSpec, Environment, EnvironmentRequest,
    ImageBuild, RemoveRequest,
};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::job::{JobState, eval_env};
use super::step::{ExecPlan, Frame, PostStep, StepContext, StepHost, UsesStep, exec_command};
use crate::expr::{self, JobStatus, Scope};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{self, DockerRuns, Step};

/// The result of a docker step: outcome, outputs and an error message, for `finish_step`.
pub(crate) type StepResult = (Outcome, Map<String, Value>, Option<String>);

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
    async fn ready(&self) -> Result<(), String> {
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

/// A registered `post-entrypoint`: the container to run after the main steps.
#[derive(Debug, Clone)]
pub(crate) struct DockerPost {
    pub(crate) spec: ContainerSpec,
    /// `INPUT_*`, `runs.env` and `STATE_*`.
    pub(crate) extra_env: IndexMap<String, String>,
}

/// Runs a `uses: docker://IMAGE` step: `with.entrypoint` and `with.args` (split like a command
/// line) override the image's; every `with` entry is also `INPUT_<NAME>`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_docker_uri(
    cx: &StepContext,
    state: &mut JobState,
    contexts: &mut Map<String, Value>,
    index: usize,
    step: &Step,
    uses: &str,
    job_cancel: &CancellationToken,
    u: &UsesStep<'_>,
) -> StepResult {
    let field = |k: &str| format!("jobs.{}.steps[{index}].with.{k}", cx.job_id);
    let image = uses.trim_start_matches("docker://").trim();
    if image.is_empty() {
        return fail(format!(
            "jobs.{}.steps[{index}].uses: {uses:?} names no image; write docker://IMAGE[:TAG]",
            cx.job_id
        ));
    }
    let host = StepHost {
        status: if u.cancelled { JobStatus::Cancelled } else { state.status },
        workspace: cx.hash_root.as_deref(),
    };
    let mut inputs = Map::new();
    {
        let scope = Scope { contexts, host: &host };
        for (name, value) in &step.with {
            match expr::interpolate(value, &scope) {
                Ok(v) => {
                    inputs.insert(name.to_lowercase(), Value::String(v));
                }
                Err(e) => return fail(format!("{}: {e}", field(name))),
            }
        }
    }
    let text = |k: &str| inputs.get(k).map(expr::to_string).filter(|s| !s.trim().is_empty());
    let entrypoint = text("entrypoint").map(|e| vec![e]).unwrap_or_default();
    let cmd = match text("args").map(|a| kiln_plugin_sdk::words::split_command(&a)) {
        None => Vec::new(),
        Some(Ok(words)) => words,
        Some(Err(e)) => return fail(format!("{}: {e}", field("args"))),
    };
    let spec = ContainerSpec { image: image.to_owned(), entrypoint, cmd, ..step_spec(cx) };
    let extra: IndexMap<String, String> = super::action::input_env(&inputs);
    let mut env_ctx = u.env_ctx.clone();
    env_ctx.extend(u.step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let (outcome, outputs, _, message) =
        run_container(cx, state, index, u.key, u.name, spec, env_ctx, extra, u, job_cancel).await;
    (outcome, outputs, message)
}

/// Runs a docker action found in `action_dir` (a directory inside the environment) with its
/// evaluated `inputs`: `pre-entrypoint` (when its `pre-if` holds), the main entrypoint, and
/// `post-entrypoint` registered for after the main steps.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_docker_action(
    cx: &StepContext,
    _frame: &Frame,
    state: &mut JobState,
    contexts: &mut Map<String, Value>,
    index: usize,
    uses: &str,
    action_dir: &str,
    action: &workflow::Action,
    inputs: &Map<String, Value>,
    job_cancel: &CancellationToken,
    u: &UsesStep<'_>,
) -> StepResult {
    let workflow::Runs::Docker(runs) = &action.runs else {
        return fail(format!("uses: {uses}: not a docker action (runs.using is not docker)"));
    };
    let manifest = format!("{uses}/action.yml");
    let mut base = step_spec(cx);
    match runs.image.strip_prefix("docker://") {
        Some(image) => base.image = image.trim().to_owned(),
        None => {
            let Some(target) = &cx.step_containers else {
                return fail(no_step_containers(cx, &format!("uses: {uses}")));
            };
            if !target.image_build {
                return fail(format!(
                    "uses: {uses}: the action's image is built from {:?}, and backend {:?} does \
                     not build images (feature image_build); use a backend that does, or an \
                     action with image: docker://IMAGE",
                    runs.image, target.plugin
                ));
            }
            base.build = Some(ImageBuild {
                context_dir: action_dir.trim_end_matches('/').to_owned(),
                dockerfile: runs.image.trim_start_matches("./").to_owned(),
            });
        }
    }

    // args, env and the entrypoints see the `inputs` context.
    let saved_inputs = contexts.insert("inputs".into(), Value::Object(inputs.clone()));
    let evaluated = evaluate_runs(runs, contexts, state, cx, u, &manifest);
    match saved_inputs {
        Some(v) => contexts.insert("inputs".into(), v),
        None => contexts.remove("inputs"),
    };
    let (args, runs_env) = match evaluated {
        Ok(x) => x,
        Err(message) => return fail(message),
    };
    base.cmd = args;
    let mut extra: IndexMap<String, String> = super::action::input_env(inputs);
    extra.extend(runs_env);
    let mut env_ctx = u.env_ctx.clone();
    env_ctx.extend(u.step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let with_entrypoint = |e: &Option<String>| ContainerSpec {
        entrypoint: vec![e.clone().unwrap_or_default()],
        ..base.clone()
    };

    let mut saved_state = IndexMap::new();
    if runs.pre_entrypoint.as_deref().is_some_and(|e| !e.trim().is_empty()) {
        let condition = runs.pre_if.as_deref().unwrap_or("always()");
        let run_it = {
            let host = StepHost { status: state.status, workspace: cx.hash_root.as_deref() };
            expr::evaluate_if(condition, &Scope { contexts, host: &host })
        };
        match run_it {
            Err(e) => return fail(format!("{manifest}: runs.pre-if: {e}")),
            Ok(false) => {}
            Ok(true) => {
                line(cx, index, format!("running the pre-entrypoint of {uses}"));
                let spec = with_entrypoint(&runs.pre_entrypoint);
                let (outcome, _, saved, message) = run_container(
                    cx,
                    state,
                    index,
                    u.key,
                    u.name,
                    spec,
                    env_ctx.clone(),
                    extra.clone(),
                    u,
                    job_cancel,
                )
                .await;
                if outcome != Outcome::Success {
                    let message =
                        message.unwrap_or_else(|| format!("the pre-entrypoint of {uses} failed"));
                    return (outcome, Map::new(), Some(message));
                }
                saved_state = saved;
            }
        }
    }

    let main = match &runs.entrypoint {
        Some(e) if !e.trim().is_empty() => with_entrypoint(&runs.entrypoint),
        _ => base.clone(),
    };
    let mut main_extra = extra.clone();
    main_extra.extend(saved_state.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
    let (outcome, outputs, saved, message) = run_container(
        cx,
        state,
        index,
        u.key,
        u.name,
        main,
        env_ctx.clone(),
        main_extra,
        u,
        job_cancel,
    )
    .await;
    saved_state.extend(saved);

    if runs.post_entrypoint.as_deref().is_some_and(|e| !e.trim().is_empty()) {
        let mut post_extra = extra;
        post_extra.extend(saved_state.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
        state.posts.push(PostStep {
            name: format!("Post {}", u.name),
            condition: runs.post_if.clone().unwrap_or_else(|| "always()".into()),
            argv: Vec::new(),
            env: env_ctx,
            container: Some(Box::new(DockerPost {
                spec: with_entrypoint(&runs.post_entrypoint),
                extra_env: post_extra,
            })),
        });
    }
    (outcome, outputs, message)
}

/// Runs a registered `post-entrypoint` (from `run_posts`); returns the outcome and a message.
pub(crate) async fn run_post(
    cx: &StepContext,
    state: &mut JobState,
    index: usize,
    post: &PostStep,
    docker: &DockerPost,
    job_cancel: &CancellationToken,
    cancelled: bool,
) -> (Outcome, Option<String>) {
    let u = UsesStep {
        key: "post",
        name: &post.name,
        timer: &super::Timer::start(),
        env_ctx: &post.env,
        step_env: &IndexMap::new(),
        continue_on_error: false,
        timeout: None,
        cancelled,
    };
    let (outcome, _, _, message) = run_container(
        cx,
        state,
        index,
        "post",
        &post.name,
        docker.spec.clone(),
        post.env.clone(),
        docker.extra_env.clone(),
        &u,
        job_cancel,
    )
    .await;
    (outcome, message)
}

/// Evaluates `runs.args` and `runs.env` (with `inputs` in the contexts).
fn evaluate_runs(
    runs: &DockerRuns,
    contexts: &Map<String, Value>,
    state: &JobState,
    cx: &StepContext,
    u: &UsesStep<'_>,
    manifest: &str,
) -> Result<(Vec<String>, IndexMap<String, String>), String> {
    let host = StepHost {
        status: if u.cancelled { JobStatus::Cancelled } else { state.status },
        workspace: cx.hash_root.as_deref(),
    };
    let scope = Scope { contexts, host: &host };
    let mut args = Vec::with_capacity(runs.args.len());
    for (i, a) in runs.args.iter().enumerate() {
        args.push(
            expr::interpolate(a, &scope).map_err(|e| format!("{manifest}: runs.args[{i}]: {e}"))?,
        );
    }
    let env =
        eval_env(&runs.env, contexts, &host).map_err(|e| format!("{manifest}: runs.env: {e}"))?;
    Ok((args, env))
}

/// The parts of a step container's spec every docker step shares: the workspace and the
/// runner's files mounted at their paths, the workspace as working directory.
fn step_spec(cx: &StepContext) -> ContainerSpec {
    ContainerSpec {
        mount_workspace: true,
        working_dir: cx.env.paths.workspace.clone(),
        ..ContainerSpec::default()
    }
}

fn fail(message: String) -> StepResult {
    (Outcome::Failure, Map::new(), Some(message))
}

fn line(cx: &StepContext, index: usize, text: String) {
    cx.shared.sink.event(Event::Line {
        job: cx.job_name.clone(),
        step: Some(index),
        text,
        kind: LineKind::Runner,
    });
}

/// The error of a docker step on a job whose backend has no step containers; `what` names it.
fn no_step_containers(cx: &StepContext, what: &str) -> String {
    format!(
        "{what}: docker steps need step containers, which backend {:?} does not support; \
         run the job on a docker label (-P LABEL=docker://IMAGE) or configure a docker plugin",
        cx.plugin
    )
}

/// Creates one step container, runs its main process as the step's exec, and removes it.
/// Returns the outcome, outputs, saved state and message of `exec_command`.
#[allow(clippy::too_many_arguments)]
async fn run_container(
    cx: &StepContext,
    state: &mut JobState,
    index: usize,
    key: &str,
    name: &str,
    spec: ContainerSpec,
    env_ctx: IndexMap<String, String>,
    extra_env: IndexMap<String, String>,
    u: &UsesStep<'_>,
    job_cancel: &CancellationToken,
) -> (Outcome, Map<String, Value>, IndexMap<String, String>, Option<String>) {
    let Some(target) = &cx.step_containers else {
        return (
            Outcome::Failure,
            Map::new(),
            IndexMap::new(),
            Some(no_step_containers(cx, &format!("step {name:?}"))),
        );
    };
    let container_id = kiln_plugin_sdk::ids::make_id(&[
        "step",
        &index.to_string(),
        &crate::identity::short_nonce(),
    ]);
    let what = match &spec.build {
        Some(b) => format!("an image built from {}/{}", b.context_dir, b.dockerfile),
        None => spec.image.clone(),
    };
    let request = ContainerRequest {
        environment_id: target.env.id.clone(),
        container_id: container_id.clone(),
        spec,
    };
    // The step's token, as exec_command chooses it.
    let token = if u.cancelled { cx.shared.force.clone() } else { job_cancel.clone() };
    let create = async {
        target.ready().await?;
        target
            .backend
            .create_container(ContainerKind::Step, request)
            .await
            .map_err(|e| e.to_string())
    };
    let created = tokio::select! {
        r = create => r,
        _ = token.cancelled() => Err("cancelled while creating the step container".to_owned()),
    };
    let result = match created {
        Err(e) => (
            if token.is_cancelled() { Outcome::Cancelled } else { Outcome::Failure },
            Map::new(),
            IndexMap::new(),
            Some(format!(
                "creating the step container ({what}) on backend {:?}: {e}",
                target.plugin
            )),
        ),
        Ok(_) => {
            let scx = container_context(cx, target, &container_id);
            let plan = ExecPlan {
                argv: Vec::new(),
                script: None,
                env_ctx,
                extra_env,
                working_dir: cx.env.paths.workspace.clone(),
                timeout: u.timeout,
            };
            exec_command(&scx, state, index, key, name, plan, job_cancel, u.cancelled).await
        }
    };
    let removed = target
        .backend
        .remove(RemoveRequest {
            environment_id: target.env.id.clone(),
            container_id: Some(container_id.clone()),
            grace: Duration::from_secs(2),
        })
        .await;
    if let Err(e) = removed {
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: format!(
                "could not remove step container {container_id} on backend {:?}: {e} (it goes \
                 with the environment)",
                target.plugin
            ),
            kind: LineKind::RunnerError,
        });
    }
    result
}

/// The step context of one step container: its backend, environment and container, and a base
/// environment of GitHub's variables only (the image brings its own `PATH` and `HOME`).
fn container_context(cx: &StepContext, target: &StepContainerHost, container: &str) -> StepContext {
    let extra = &cx.shared.opts.extra_env;
    let base_env = cx
        .base_env
        .iter()
        .filter(|(k, _)| {
            k.starts_with("GITHUB_")
                || k.starts_with("RUNNER_")
                || k.starts_with("ACTIONS_")
                || ["CI", "GITEA_ACTIONS", "FORGEJO_ACTIONS", "ACT"].contains(&k.as_str())
                || extra.contains_key(*k)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    StepContext {
        shared: cx.shared.clone(),
        job_name: cx.job_name.clone(),
        job_id: cx.job_id.clone(),
        backend: target.backend.clone(),
        plugin: target.plugin.clone(),
        env: target.env.clone(),
        container_id: container.to_owned(),
        job_context: cx.job_context.clone(),
        base_env,
        env_ctx: cx.env_ctx.clone(),
        bash_available: cx.bash_available,
        hash_root: cx.hash_root.clone(),
        workflow_defaults: cx.workflow_defaults.clone(),
        job_defaults: cx.job_defaults.clone(),
        step_containers: None,
    }
}

/// What a job's steps need of step containers, as far as can be known before the job starts:
/// `docker://` steps, and local docker actions whose `action.yml` is in the local workspace.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DockerNeeds {
    /// The first step that needs a step container (its `uses`).
    pub(crate) step_containers: Option<String>,
    /// The first local action built from a Dockerfile.
    pub(crate) image_build: Option<String>,
}

/// Scans a job's steps for docker steps (see [`DockerNeeds`]).
pub(crate) fn needs(steps: &[Step], workspace: Option<&std::path::Path>) -> DockerNeeds {
    let mut needs = DockerNeeds::default();
    for uses in steps.iter().filter_map(|s| s.uses.as_deref()) {
        if uses.starts_with("docker://") {
            needs.step_containers.get_or_insert_with(|| uses.to_owned());
            continue;
        }
        let (Some(rel), Some(ws)) = (uses.strip_prefix("./"), workspace) else { continue };
        let dir = ws.join(rel.trim_end_matches('/'));
        let Some((file, text)) = ["action.yml", "action.yaml"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok().map(|t| (f, t)))
        else {
            continue;
        };
        let Ok(action) = workflow::parse_action(&text, &format!("{uses}/{file}")) else { continue };
        if let workflow::Runs::Docker(d) = &action.runs {
            needs.step_containers.get_or_insert_with(|| uses.to_owned());
            if !d.image.starts_with("docker://") {
                needs.image_build.get_or_insert_with(|| uses.to_owned());
            }
        }
    }
    needs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_finds_docker_uri_steps_and_local_docker_actions() {
        let ws = std::env::temp_dir().join(format!("kiln-docker-needs-{}", std::process::id()));
        let action = |dir: &str, image: &str| {
            let d = ws.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            let text = format!("name: a\nruns:\n  using: docker\n  image: {image}\n");
            std::fs::write(d.join("action.yml"), text).unwrap();
        };
        action("pulled", "docker://kiln-test/busybox:1");
        action("built", "Dockerfile");
        let wf = workflow::parse_workflow(
            "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: a\n      - uses: ./pulled\n      - uses: ./built\n      - uses: docker://x\n      - uses: ./missing\n",
            "w.yml",
        )
        .unwrap();
        let steps = wf.jobs["a"].steps.clone().unwrap_or_default();
        let found = needs(&steps, Some(&ws));
        assert_eq!(
            found,
            DockerNeeds {
                step_containers: Some("./pulled".into()),
                image_build: Some("./built".into())
            }
        );
        // Without the local workspace, only docker:// steps are known.
        let found = needs(&steps, None);
        assert_eq!(found.step_containers.as_deref(), Some("docker://x"));
        assert_eq!(found.image_build, None);
        let _ = std::fs::remove_dir_all(&ws);
    }
}
