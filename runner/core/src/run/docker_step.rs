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

use std::time::Duration;

use indexmap::IndexMap;
use kiln_plugin_sdk::{ContainerKind, ContainerRequest, ContainerSpec, ImageBuild, RemoveRequest};
use serde_json::{Map, Value};

use super::exec::exec_command;
use super::state::{
    DockerPost, ExecPlan, JobProgress, PostStep, StepContainerHost, StepContext, StepOutcome,
    StepRef, UsesStep, eval_env, input_env,
};
use crate::expr::{self, Scope};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{self, DockerRuns, Step};

/// A docker action found for a `uses:` step.
pub(crate) struct DockerAction<'a> {
    pub(crate) uses: &'a str,
    /// The action's directory inside the environment (the build context of a Dockerfile).
    pub(crate) dir: &'a str,
    pub(crate) action: &'a workflow::Action,
    /// Its inputs, evaluated.
    pub(crate) inputs: &'a Map<String, Value>,
}

/// Runs a `uses: docker://IMAGE` step: `with.entrypoint` and `with.args` (split like a command
/// line) override the image's; every `with` entry is also `INPUT_<NAME>`.
pub(crate) async fn run_docker_uri(
    cx: &StepContext,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    step: &Step,
    uses: &str,
    u: &UsesStep<'_>,
) -> StepOutcome {
    let index = u.at.index;
    let field = |k: &str| format!("jobs.{}.steps[{index}].with.{k}", cx.job_id);
    let image = uses.trim_start_matches("docker://").trim();
    if image.is_empty() {
        return StepOutcome::failed(format!(
            "jobs.{}.steps[{index}].uses: {uses:?} names no image; write docker://IMAGE[:TAG]",
            cx.job_id
        ));
    }
    let host = cx.host(state.status, u.at.cancelled);
    let mut inputs = Map::new();
    {
        let scope = Scope { contexts, host: &host };
        for (name, value) in &step.with {
            match expr::interpolate(value, &scope) {
                Ok(v) => {
                    inputs.insert(name.to_lowercase(), Value::String(v));
                }
                Err(e) => return StepOutcome::failed(format!("{}: {e}", field(name))),
            }
        }
    }
    let text = |k: &str| inputs.get(k).map(expr::to_string).filter(|s| !s.trim().is_empty());
    let entrypoint = text("entrypoint").map(|e| vec![e]).unwrap_or_default();
    let cmd = match text("args").map(|a| kiln_plugin_sdk::words::split_command(&a)) {
        None => Vec::new(),
        Some(Ok(words)) => words,
        Some(Err(e)) => return StepOutcome::failed(format!("{}: {e}", field("args"))),
    };
    let spec = ContainerSpec { image: image.to_owned(), entrypoint, cmd, ..step_spec(cx) };
    let extra: IndexMap<String, String> = input_env(&inputs);
    let mut ended = run_container(cx, state, &u.at, spec, u.full_env(), extra, u.timeout).await;
    ended.saved_state.clear();
    ended
}

/// Runs a docker action with its evaluated inputs: `pre-entrypoint` (when its `pre-if`
/// holds), the main entrypoint, and `post-entrypoint` registered for after the main steps.
pub(crate) async fn run_docker_action(
    cx: &StepContext,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    found: DockerAction<'_>,
    u: &UsesStep<'_>,
) -> StepOutcome {
    let uses = found.uses;
    let workflow::Runs::Docker(runs) = &found.action.runs else {
        return StepOutcome::failed(format!(
            "uses: {uses}: not a docker action (runs.using is not docker)"
        ));
    };
    let manifest = format!("{uses}/action.yml");
    let mut base = match action_image(cx, &found, runs) {
        Ok(spec) => spec,
        Err(message) => return StepOutcome::failed(message),
    };
    // args, env and the entrypoints see the `inputs` context.
    let saved_inputs = contexts.insert("inputs".into(), Value::Object(found.inputs.clone()));
    let evaluated = evaluate_runs(runs, contexts, state, cx, u, &manifest);
    match saved_inputs {
        Some(v) => contexts.insert("inputs".into(), v),
        None => contexts.remove("inputs"),
    };
    let (args, runs_env) = match evaluated {
        Ok(x) => x,
        Err(message) => return StepOutcome::failed(message),
    };
    base.cmd = args;
    let mut extra: IndexMap<String, String> = input_env(found.inputs);
    extra.extend(runs_env);
    let env_ctx = u.full_env();
    let with_entrypoint = |e: &Option<String>| ContainerSpec {
        entrypoint: vec![e.clone().unwrap_or_default()],
        ..base.clone()
    };
    let state_env = |saved: &IndexMap<String, String>| {
        let mut env = extra.clone();
        env.extend(saved.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())));
        env
    };

    let mut saved_state = IndexMap::new();
    if runs.pre_entrypoint.as_deref().is_some_and(|e| !e.trim().is_empty()) {
        let condition = runs.pre_if.as_deref().unwrap_or("always()");
        let host = cx.host(state.status, false);
        match expr::evaluate_if(condition, &Scope { contexts, host: &host }) {
            Err(e) => return StepOutcome::failed(format!("{manifest}: runs.pre-if: {e}")),
            Ok(false) => {}
            Ok(true) => {
                line(cx, u.at.index, format!("running the pre-entrypoint of {uses}"));
                let spec = with_entrypoint(&runs.pre_entrypoint);
                let pre = run_container(
                    cx,
                    state,
                    &u.at,
                    spec,
                    env_ctx.clone(),
                    extra.clone(),
                    u.timeout,
                )
                .await;
                if pre.outcome != Outcome::Success {
                    let message = pre
                        .message
                        .unwrap_or_else(|| format!("the pre-entrypoint of {uses} failed"));
                    return StepOutcome { message: Some(message), ..StepOutcome::of(pre.outcome) };
                }
                saved_state = pre.saved_state;
            }
        }
    }

    let main = match &runs.entrypoint {
        Some(e) if !e.trim().is_empty() => with_entrypoint(&runs.entrypoint),
        _ => base.clone(),
    };
    let main_extra = state_env(&saved_state);
    let mut ended =
        run_container(cx, state, &u.at, main, env_ctx.clone(), main_extra, u.timeout).await;
    saved_state.extend(std::mem::take(&mut ended.saved_state));

    if runs.post_entrypoint.as_deref().is_some_and(|e| !e.trim().is_empty()) {
        state.posts.push(PostStep {
            name: format!("Post {}", u.at.name),
            condition: runs.post_if.clone().unwrap_or_else(|| "always()".into()),
            argv: Vec::new(),
            env: env_ctx,
            container: Some(Box::new(DockerPost {
                spec: with_entrypoint(&runs.post_entrypoint),
                extra_env: state_env(&saved_state),
            })),
        });
    }
    ended
}

/// The image of a docker action: `docker://IMAGE`, or a Dockerfile built by the step
/// containers' backend (which must declare the feature `image_build`).
fn action_image(
    cx: &StepContext,
    found: &DockerAction<'_>,
    runs: &DockerRuns,
) -> Result<ContainerSpec, String> {
    let uses = found.uses;
    let mut base = step_spec(cx);
    if let Some(image) = runs.image.strip_prefix("docker://") {
        base.image = image.trim().to_owned();
        return Ok(base);
    }
    let Some(target) = &cx.step_containers else {
        return Err(no_step_containers(cx, &format!("uses: {uses}")));
    };
    if !target.image_build {
        return Err(format!(
            "uses: {uses}: the action's image is built from {:?}, and backend {:?} does not \
             build images (feature image_build); use a backend that does, or an action with \
             image: docker://IMAGE",
            runs.image, target.plugin
        ));
    }
    base.build = Some(ImageBuild {
        context_dir: found.dir.trim_end_matches('/').to_owned(),
        dockerfile: runs.image.trim_start_matches("./").to_owned(),
    });
    Ok(base)
}

/// Runs a registered `post-entrypoint` (from `run_posts`).
pub(crate) async fn run_post(
    cx: &StepContext,
    state: &mut JobProgress,
    at: &StepRef<'_>,
    docker: &DockerPost,
    env: &IndexMap<String, String>,
) -> StepOutcome {
    let (spec, extra) = (docker.spec.clone(), docker.extra_env.clone());
    run_container(cx, state, at, spec, env.clone(), extra, None).await
}

/// Evaluates `runs.args` and `runs.env` (with `inputs` in the contexts).
fn evaluate_runs(
    runs: &DockerRuns,
    contexts: &Map<String, Value>,
    state: &JobProgress,
    cx: &StepContext,
    u: &UsesStep<'_>,
    manifest: &str,
) -> Result<(Vec<String>, IndexMap<String, String>), String> {
    let host = cx.host(state.status, u.at.cancelled);
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
async fn run_container(
    cx: &StepContext,
    state: &mut JobProgress,
    at: &StepRef<'_>,
    spec: ContainerSpec,
    env_ctx: IndexMap<String, String>,
    extra_env: IndexMap<String, String>,
    timeout: Option<Duration>,
) -> StepOutcome {
    let Some(target) = &cx.step_containers else {
        return StepOutcome::failed(no_step_containers(cx, &format!("step {:?}", at.name)));
    };
    let container_id = kiln_plugin_sdk::ids::make_id(&[
        "step",
        &at.index.to_string(),
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
    let token = at.token(cx);
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
    let ended = match created {
        Err(e) => StepOutcome {
            message: Some(format!(
                "creating the step container ({what}) on backend {:?}: {e}",
                target.plugin
            )),
            ..StepOutcome::of(if token.is_cancelled() {
                Outcome::Cancelled
            } else {
                Outcome::Failure
            })
        },
        Ok(_) => {
            let scx = container_context(cx, target, &container_id);
            let plan = ExecPlan {
                argv: Vec::new(),
                script: None,
                env_ctx,
                extra_env,
                working_dir: cx.env.paths.workspace.clone(),
                timeout,
            };
            exec_command(&scx, state, at, plan).await
        }
    };
    remove_container(cx, target, &container_id, at.index).await;
    ended
}

/// Removes a step container; what fails goes with the environment.
async fn remove_container(
    cx: &StepContext,
    target: &StepContainerHost,
    container_id: &str,
    index: usize,
) {
    let removed = target
        .backend
        .remove(RemoveRequest {
            environment_id: target.env.id.clone(),
            container_id: Some(container_id.to_owned()),
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
}

/// The step context of one step container: its backend, environment and container, and a base
/// environment of GitHub's variables only (the image brings its own `PATH` and `HOME`).
fn container_context(cx: &StepContext, target: &StepContainerHost, container: &str) -> StepContext {
    let extra = &cx.extra_env;
    let base_env = cx
        .base_env
        .iter()
        .filter(|(k, _)| {
            k.starts_with("GITHUB_")
                || k.starts_with("RUNNER_")
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
        extra_env: cx.extra_env.clone(),
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
        let rel = uses.strip_prefix("./").or_else(|| uses.strip_prefix("$/"));
        let (Some(rel), Some(ws)) = (rel, workspace) else { continue };
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
