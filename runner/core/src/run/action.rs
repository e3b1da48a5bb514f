//! Finding the action a `uses:` step names and putting it where the step runs: local actions
//! (`./path`) are read from the environment's workspace, remote ones (`owner/repo[/path]@ref`)
//! are fetched by the run's [`Resolver`](crate::actions::Resolver) and copied into the
//! environment once per job. Also the `pre:` steps of remote node actions, run before the main
//! steps as GitHub does ("Set up job" fetches every remote action first).

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::context::Timer;
use super::exec::{copy_out_file, exec_command};
use super::report::{announce, report_finished};
use super::state::{
    ExecPlan, Frame, JobProgress, LocatedAction, MAX_COMPOSITE_DEPTH, StepContext, StepRef,
    eval_env, input_env,
};
use crate::expr::{self, JobStatus, Scope};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{self, Action, Runs, Step};

/// Whether a `uses:` names a remote action (neither local nor `docker://`).
pub(crate) fn is_remote(uses: &str) -> bool {
    !uses.starts_with("./") && !uses.starts_with("$/") && !uses.starts_with("docker://")
}

/// Finds (and for remote actions, fetches and copies in) the action of a `uses:` step.
pub(crate) async fn locate(
    cx: &StepContext,
    state: &mut JobProgress,
    uses: &str,
) -> Result<LocatedAction, String> {
    if let Some(rel) = uses.strip_prefix("./") {
        return locate_local(cx, uses, rel).await;
    }
    if let Some(rel) = uses.strip_prefix("$/") {
        // The workflow's own repository at the run's commit: the workspace copy is that
        // commit when running locally; in daemon mode it is fetched like a remote action.
        if cx.shared.opts.workspace.is_some() {
            return locate_local(cx, uses, rel).await;
        }
        let gh =
            |k: &str| cx.shared.opts.github.get(k).map(crate::expr::to_string).unwrap_or_default();
        let remote = format!(
            "{}/{}/{}@{}",
            gh("server_url").trim_end_matches('/'),
            gh("repository"),
            rel.trim_matches('/'),
            gh("sha")
        );
        if let Some(found) = state.actions.get(&remote) {
            return Ok(found.clone());
        }
        let found = locate_remote(cx, state, &remote).await?;
        state.actions.insert(remote, found.clone());
        return Ok(found);
    }
    if let Some(found) = state.actions.get(uses) {
        return Ok(found.clone());
    }
    let found = locate_remote(cx, state, uses).await?;
    state.actions.insert(uses.to_owned(), found.clone());
    Ok(found)
}

/// A local action is read from the environment's workspace, where earlier steps may have
/// created or changed it.
async fn locate_local(cx: &StepContext, uses: &str, rel: &str) -> Result<LocatedAction, String> {
    let rel = rel.trim_end_matches('/');
    let base = format!("{}/{rel}", cx.env.paths.workspace.trim_end_matches('/'));
    let base = base.trim_end_matches("/.").trim_end_matches('/').to_owned();
    for f in ["action.yml", "action.yaml"] {
        let path = format!("{base}/{f}");
        if let Ok(data) = copy_out_file(cx, &path).await {
            let manifest = format!("{uses}/{f}");
            let text = String::from_utf8_lossy(&data);
            let action = workflow::parse_action(&text, &manifest).map_err(|e| e.to_string())?;
            return Ok(LocatedAction { dir: base, manifest, action: Arc::new(action) });
        }
    }
    Err(format!("uses: {uses}: no action.yml or action.yaml in {base}"))
}

/// A remote action: fetched on this machine (or found in the cache), its manifest read here,
/// its files copied into the environment under the runner's file area.
async fn locate_remote(
    cx: &StepContext,
    state: &mut JobProgress,
    uses: &str,
) -> Result<LocatedAction, String> {
    let resolver = &cx.shared.opts.actions;
    let r = resolver.parse(uses).map_err(|e| e.to_string())?;
    let fetched = resolver.fetch(&r).await.map_err(|e| e.to_string())?;
    let local_dir = fetched.dir.join(&r.path);
    let (file, text) = ["action.yml", "action.yaml"]
        .iter()
        .find_map(|f| std::fs::read_to_string(local_dir.join(f)).ok().map(|t| (*f, t)))
        .ok_or_else(|| {
            format!(
                "action {r}: no action.yml or action.yaml in {} of {} at {}",
                if r.path.is_empty() { "the repository root" } else { &r.path },
                r.url,
                r.git_ref
            )
        })?;
    let manifest = format!("{r}/{file}");
    let action = workflow::parse_action(&text, &manifest).map_err(|e| e.to_string())?;
    let root =
        format!("{}/actions/{}", cx.env.paths.runner_files.trim_end_matches('/'), fetched.key);
    if !state.copied_actions.contains(&fetched.key) {
        copy_dir_in(cx, &fetched.dir, &root)
            .await
            .map_err(|e| format!("action {r}: copying it into the environment: {e}"))?;
        state.copied_actions.insert(fetched.key.clone());
    }
    let dir = if r.path.is_empty() { root } else { format!("{root}/{}", r.path) };
    Ok(LocatedAction { dir, manifest, action: Arc::new(action) })
}

/// Copies a local directory into the environment: by path when the plugin shares our
/// filesystem (feature `local_copy`), else as a tar stream.
async fn copy_dir_in(cx: &StepContext, dir: &std::path::Path, dest: &str) -> Result<(), String> {
    let local =
        cx.shared.backends.get(&cx.plugin).is_some_and(|p| p.capabilities.features.local_copy);
    let target = kiln_plugin_sdk::CopyInTarget {
        environment_id: cx.env.id.clone(),
        container_id: cx.container_id.clone(),
        dest_path: dest.to_owned(),
        local_path: local.then(|| dir.to_string_lossy().into_owned()),
    };
    let data: kiln_plugin_sdk::ByteStream = if local {
        Box::pin(futures::stream::empty())
    } else {
        crate::workspace::dir_tar_stream(dir.to_owned())
    };
    cx.backend.copy_in(target, data).await.map(|_| ()).map_err(|e| e.to_string())
}

/// The inputs of an action: `with:` (interpolated), else the declared default (interpolated).
/// Keys are lower case.
pub(crate) fn action_inputs(
    step: &Step,
    action: &Action,
    manifest: &str,
    scope: &Scope<'_>,
    where_: &str,
) -> Result<Map<String, Value>, String> {
    let mut inputs = Map::new();
    for (name, value) in &step.with {
        let v =
            expr::interpolate(value, scope).map_err(|e| format!("{where_}.with.{name}: {e}"))?;
        inputs.insert(name.to_lowercase(), Value::String(v));
    }
    for (name, input) in &action.inputs {
        let key = name.to_lowercase();
        if inputs.contains_key(&key) {
            continue;
        }
        let value = match &input.default {
            Some(d) => expr::interpolate(d, scope)
                .map_err(|e| format!("{manifest}: inputs.{name}.default: {e}"))?,
            None => String::new(),
        };
        inputs.insert(key, Value::String(value));
    }
    Ok(inputs)
}

/// "Set up job" for actions: fetches every remote action of the job's steps (so a missing one
/// fails the job before any step runs) and runs the `pre:` of remote node actions, in step
/// order, each with its `pre-if` (default `always()`); for a remote composite action, the
/// `pre:` of the remote actions inside it, with the composite's inputs (as GitHub does). Returns
/// false when the job cannot go on.
pub(crate) async fn run_pres(
    cx: &StepContext,
    state: &mut JobProgress,
    contexts: &mut Map<String, Value>,
    steps: &[Step],
    job_cancel: &CancellationToken,
) -> bool {
    for (index, s) in steps.iter().enumerate() {
        let pre = Pre { index, position: index.to_string(), depth: 0 };
        if !run_pre(cx, state, contexts, s, pre, job_cancel).await {
            return false;
        }
    }
    true
}

/// Where a step whose `pre:` may run is.
struct Pre {
    /// The job's step (the server's step index).
    index: usize,
    /// [`Frame::position_of`] of the step.
    position: String,
    /// How many composite actions enclose it.
    depth: usize,
}

fn run_pre<'a>(
    cx: &'a StepContext,
    state: &'a mut JobProgress,
    contexts: &'a mut Map<String, Value>,
    s: &'a Step,
    at: Pre,
    job_cancel: &'a CancellationToken,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
    Box::pin(async move {
        let log = |text: String, kind: LineKind| {
            cx.shared.sink.event(Event::Line { job: cx.job_name.clone(), step: None, text, kind });
        };
        let Some(uses) = s.uses.as_deref().filter(|u| is_remote(u)) else { return true };
        if at.depth == 0 && is_local_checkout(cx, s, contexts) {
            return true;
        }
        let located = match locate(cx, state, uses).await {
            Ok(l) => l,
            Err(e) => {
                log(format!("jobs.{}.steps[{}]: {e}", cx.job_id, at.index), LineKind::RunnerError);
                return false;
            }
        };
        let host = cx.host(state.status, false);
        let where_ = format!("jobs.{}.steps[{}]", cx.job_id, at.index);
        let inputs = match action_inputs(
            s,
            &located.action,
            &located.manifest,
            &Scope { contexts, host: &host },
            &where_,
        ) {
            Ok(i) => i,
            Err(e) => {
                log(e, LineKind::RunnerError);
                return false;
            }
        };
        match &located.action.runs {
            Runs::Composite { steps } if at.depth < MAX_COMPOSITE_DEPTH => {
                let saved = contexts.insert("inputs".into(), Value::Object(inputs));
                let mut ok = true;
                for (i, inner) in steps.iter().enumerate() {
                    let pre = Pre {
                        index: at.index,
                        position: format!("{}/{i}", at.position),
                        depth: at.depth + 1,
                    };
                    if !run_pre(cx, state, contexts, inner, pre, job_cancel).await {
                        ok = false;
                        break;
                    }
                }
                match saved {
                    Some(v) => contexts.insert("inputs".into(), v),
                    None => contexts.remove("inputs"),
                };
                ok
            }
            Runs::Node(node) if node.pre.is_some() => {
                if job_cancel.is_cancelled() {
                    return false;
                }
                let pre = node.pre.as_deref().unwrap_or_default();
                let name = format!("Pre {}", step_name(s, uses));
                let frame = Frame { nested: true, ..Frame::default() };
                let cond = node.pre_if.as_deref().unwrap_or("always()");
                match expr::evaluate_if(cond, &Scope { contexts, host: &host }) {
                    Ok(true) => {}
                    Ok(false) => {
                        report_finished(
                            cx,
                            &frame,
                            at.index,
                            &name,
                            Outcome::Skipped,
                            Outcome::Skipped,
                            std::time::Duration::ZERO,
                        );
                        return true;
                    }
                    Err(e) => {
                        log(
                            format!("{}: runs.pre-if: {e}", located.manifest),
                            LineKind::RunnerError,
                        );
                        return false;
                    }
                }
                let mut env_ctx = cx.env_ctx.clone();
                if let Ok(step_env) = eval_env(&s.env, contexts, &host) {
                    env_ctx.extend(step_env);
                }
                let mut extra = input_env(&inputs);
                extra.insert("GITHUB_ACTION_PATH".into(), located.dir.clone());
                let timer = Timer::start();
                announce(cx, &frame, at.index, &name);
                let plan = ExecPlan {
                    argv: vec!["node".into(), format!("{}/{pre}", located.dir)],
                    script: None,
                    env_ctx,
                    extra_env: extra,
                    working_dir: cx.env.paths.workspace.clone(),
                    timeout: None,
                };
                let key = s.id.clone().unwrap_or_else(|| format!("__{}", at.index));
                let step = StepRef {
                    index: at.index,
                    key: &key,
                    name: &name,
                    job_cancel,
                    cancelled: false,
                };
                let ended = exec_command(cx, state, &step, plan).await;
                if let Some(message) = ended.message {
                    log(message, LineKind::RunnerError);
                }
                let (outcome, saved) = (ended.outcome, ended.saved_state);
                state.pre_state.insert(at.position, saved);
                report_finished(cx, &frame, at.index, &name, outcome, outcome, timer.elapsed());
                match outcome {
                    Outcome::Success => true,
                    Outcome::Cancelled => {
                        state.status = JobStatus::Cancelled;
                        false
                    }
                    _ => {
                        state.status = JobStatus::Failure;
                        false
                    }
                }
            }
            _ => true,
        }
    })
}

fn step_name(s: &Step, uses: &str) -> String {
    s.name.clone().unwrap_or_else(|| format!("Run {uses}"))
}

/// `actions/checkout` of the repository being run, in a local run: the workspace already holds
/// the checkout (act does the same).
pub(crate) fn is_local_checkout(
    cx: &StepContext,
    step: &Step,
    contexts: &Map<String, Value>,
) -> bool {
    let Some(uses) = step.uses.as_deref() else { return false };
    if !cx.shared.opts.skip_local_checkout
        || !uses.split('@').next().is_some_and(|a| a.eq_ignore_ascii_case("actions/checkout"))
    {
        return false;
    }
    let repo = step.with.get("repository").map(String::as_str).unwrap_or("");
    let ours = contexts
        .get("github")
        .and_then(|g| g.get("repository"))
        .and_then(Value::as_str)
        .unwrap_or("");
    repo.is_empty() || repo.contains("${{") || repo == ours
}
