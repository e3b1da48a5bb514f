//! One job (one matrix combination) on one backend: resolve `runs-on`, preflight the backend's
//! capabilities, create the environment, copy the workspace in, run the steps, compute the
//! outputs, and remove everything — also after failure, timeout, cancellation or a crash.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use kiln_plugin_sdk::{
    Backend, Capabilities, ContainerKind, ContainerRef, ContainerRequest, ContainerSpec,
    ContainerState, Environment, EnvironmentHints, EnvironmentRequest, ExecEvent, ExecRequest,
    Health, LayerSupport, Owner, RegistryCredentials, RemoveRequest, StagedFile,
};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::step::{self, StepContext};
use super::{ComboResult, Shared, Timer, job_level_contexts, now_ms, to_obj};
use crate::expr::{self, JobStatus, Scope};
use crate::labels::{self, LabelConfig};
use crate::mask::Masker;
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{Env, Job, NumberOrExpr, RunsOn};

/// One queued combination of a job.
pub(crate) struct JobRun {
    pub(crate) job_id: String,
    pub(crate) index: usize,
    pub(crate) matrix: Map<String, Value>,
    pub(crate) strategy: Value,
    pub(crate) needs: Map<String, Value>,
    pub(crate) display_name: String,
    pub(crate) cancel: CancellationToken,
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
        let display_name = job_display_name(shared, job_id, job, &matrix, &needs);
        JobRun { job_id: job_id.to_owned(), index, matrix, strategy, needs, display_name, cancel }
    }
}

/// `name` interpolated with the matrix, or `id (v1, v2)` for a matrix job without a name.
pub(crate) fn job_display_name_of(
    job_id: &str,
    name: Option<&str>,
    matrix: &Map<String, Value>,
    contexts: &Map<String, Value>,
) -> String {
    if let Some(name) = name {
        let host = super::StaticHost(JobStatus::Success);
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

/// The display name of a job combination.
pub(crate) fn job_display_name(
    shared: &Shared,
    job_id: &str,
    job: &Job,
    matrix: &Map<String, Value>,
    needs: &Map<String, Value>,
) -> String {
    let contexts = job_level_contexts(&shared.opts, needs.clone(), matrix.clone());
    job_display_name_of(job_id, job.name.as_deref(), matrix, &contexts)
}

/// The mutable state of a running job, shared with the step runner.
pub(crate) struct JobState {
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
    pub(crate) posts: Vec<step::PostStep>,
    /// Remote actions found so far, by `uses:`.
    pub(crate) actions: std::collections::HashMap<String, super::action::LocatedAction>,
    /// Fetched repositories already copied into the environment (by cache key).
    pub(crate) copied_actions: std::collections::HashSet<String>,
    /// What each action's `pre:` saved (GITHUB_STATE), by the step's position
    /// ([`step::Frame::position_of`]).
    pub(crate) pre_state: std::collections::HashMap<String, IndexMap<String, String>>,
}

/// Runs one combination; a failure becomes a success for the workflow, `needs` and fail-fast
/// when the job has `continue-on-error: true` (the job itself is still reported as failed).
pub(crate) async fn run_job(shared: Arc<Shared>, run: JobRun) -> ComboResult {
    let continue_on_error = {
        let job = &shared.opts.workflow.jobs[run.job_id.as_str()];
        let mut contexts = job_level_contexts(&shared.opts, run.needs.clone(), run.matrix.clone());
        contexts.insert("strategy".into(), run.strategy.clone());
        let host = super::StaticHost(JobStatus::Success);
        match &job.continue_on_error {
            None => false,
            Some(crate::workflow::BoolOrExpr::Bool(b)) => *b,
            Some(crate::workflow::BoolOrExpr::Expr(e)) => {
                expr::interpolate(e, &Scope { contexts: &contexts, host: &host })
                    .is_ok_and(|s| s == "true")
            }
        }
    };
    let name = run.display_name.clone();
    let mut result = run_job_inner(shared.clone(), run).await;
    if continue_on_error && result.result == Outcome::Failure {
        shared.sink.event(Event::Line {
            job: name,
            step: None,
            text: "the job failed; continue-on-error lets the workflow go on".into(),
            kind: LineKind::Runner,
        });
        result.result = Outcome::Success;
    }
    result
}

async fn run_job_inner(shared: Arc<Shared>, run: JobRun) -> ComboResult {
    let timer = Timer::start();
    let name = run.display_name.clone();
    let sink = shared.sink.clone();
    let log = |text: String, kind: LineKind| {
        sink.event(Event::Line { job: name.clone(), step: None, text, kind });
    };
    let job = &shared.opts.workflow.jobs[run.job_id.as_str()];
    let file = shared.opts.workflow.file.clone();

    let mut contexts = job_level_contexts(&shared.opts, run.needs.clone(), run.matrix.clone());
    contexts.insert("strategy".into(), run.strategy.clone());
    let host = super::StaticHost(JobStatus::Success);

    // runs-on.
    let runs_on = match eval_runs_on(job.runs_on.as_ref(), &contexts, &host) {
        Ok(r) => r,
        Err(e) => {
            return fail_early(&shared, &name, format!("{file}: jobs.{}.runs-on: {e}", run.job_id));
        }
    };
    let label = match resolve_label(&shared, &runs_on) {
        Ok(l) => l,
        Err(e) => {
            return fail_early(&shared, &name, format!("{file}: jobs.{}.runs-on: {e}", run.job_id));
        }
    };
    if label.backend == labels::SKIP {
        log(format!("skipped: the label {:?} maps to no platform", label.name), LineKind::Runner);
        sink.event(Event::JobFinished {
            job: name.clone(),
            result: Outcome::Skipped,
            duration: timer.elapsed(),
        });
        return ComboResult { result: Outcome::Skipped, outputs: Map::new() };
    }
    sink.event(Event::JobStarted { job: name.clone(), runs_on: label.to_string() });

    let Some(plugin) = shared.backends.get(&label.backend) else {
        let configured: Vec<&str> = shared.backends.names().collect();
        return finish(
            &shared,
            &name,
            &timer,
            Outcome::Failure,
            Some(format!(
                "label {:?} uses backend {:?}, which is not configured (configured: {}); add it \
                 under plugins: in the config file",
                label.name,
                label.backend,
                configured.join(", ")
            )),
        );
    };
    let caps = &plugin.capabilities;
    // Services whose image evaluates to nothing are left out (as act and GitHub do).
    let services: Vec<String> = job
        .services
        .iter()
        .filter(|(_, svc)| {
            let image = expr::interpolate(&svc.image, &Scope { contexts: &contexts, host: &host })
                .unwrap_or_else(|_| svc.image.clone());
            !image.trim().is_empty()
        })
        .map(|(id, _)| id.clone())
        .collect();
    // Preflight: nothing is created when the backend (or its delegate) lacks a layer the job
    // needs.
    let docker_needs = super::docker_step::needs(
        job.steps.as_deref().unwrap_or(&[]),
        shared.opts.workspace.as_deref(),
    );
    let docker_steps = docker_needs.step_containers.is_some();
    let step_what = format!(
        "step containers (uses: {})",
        docker_needs.step_containers.as_deref().unwrap_or("docker://")
    );
    let layers: [(bool, &str, Layer); 3] = [
        (job.container.is_some(), "job containers (container:)", |c| &c.job_container),
        (!services.is_empty(), "service containers (services:)", |c| &c.service_containers),
        (docker_steps, &step_what, |c| &c.step_containers),
    ];
    let mut delegate: Option<&crate::backends::Plugin> = None;
    for (needed, what, layer) in layers {
        if !needed {
            continue;
        }
        match layer_plugin(&shared, plugin, layer, what) {
            Ok(p) if p.name != plugin.name => delegate = Some(p),
            Ok(_) => {}
            Err(message) => return finish(&shared, &name, &timer, Outcome::Failure, Some(message)),
        }
    }
    if let Some(uses) = &docker_needs.image_build {
        let builder =
            layer_plugin(&shared, plugin, |c| &c.step_containers, &step_what).unwrap_or(plugin);
        if !builder.capabilities.features.image_build {
            return finish(
                &shared,
                &name,
                &timer,
                Outcome::Failure,
                Some(format!(
                    "the job needs image builds (uses: {uses} is built from a Dockerfile), which \
                     backend {:?} does not support: it does not declare the feature image_build",
                    builder.name
                )),
            );
        }
    }

    let identity = &shared.opts.identity;
    let nonce = crate::identity::short_nonce();
    let env_id = kiln_plugin_sdk::ids::make_id(&[
        &identity.runner_id,
        &run.job_id,
        &run.index.to_string(),
        &nonce[..8],
    ]);
    let timeout = job_timeout(job, &contexts, &host, shared.opts.max_job_time);
    let request = EnvironmentRequest {
        environment_id: env_id.clone(),
        owner: Owner {
            runner_id: identity.runner_id.clone(),
            boot_id: identity.boot_id.clone(),
            job_id: run.job_id.clone(),
            parent_environment_id: String::new(),
            created_at_unix_ms: 0,
            expires_at_unix_ms: now_ms()
                + i64::try_from((timeout + Duration::from_secs(600)).as_millis()).unwrap_or(0),
            labels: Default::default(),
        },
        label: label.name.clone(),
        options: label.options.clone(),
        hints: EnvironmentHints {
            job_container: job.container.is_some(),
            service_containers: u32::try_from(services.len()).unwrap_or(u32::MAX),
            step_containers: docker_steps,
        },
    };
    let base_request = request.clone();
    shared.backends.claim(&env_id);
    let env = tokio::select! {
        r = create_with_retry(plugin, request) => r,
        _ = run.cancel.cancelled() => {
            // The create may have happened: remove is safe either way.
            remove_env(plugin, &env_id, &log).await;
            shared.backends.release(&env_id);
            return finish(&shared, &name, &timer, Outcome::Cancelled, None);
        }
    };
    let env = match env {
        Ok(e) => e,
        Err(e) => {
            // A create that failed half-way may have left something: remove is safe after a
            // failed create.
            remove_env(plugin, &env_id, &log).await;
            shared.backends.release(&env_id);
            return finish(
                &shared,
                &name,
                &timer,
                Outcome::Failure,
                Some(format!("creating the environment on backend {:?}: {e}", plugin.name)),
            );
        }
    };

    // The client after the create: a restarted plugin has a new one.
    let backend: Arc<dyn Backend> = plugin.client();
    // Delegated layers go in an environment of the delegate, with this one as parent.
    let inner_id = kiln_plugin_sdk::ids::make_id(&[
        &identity.runner_id,
        &run.job_id,
        &run.index.to_string(),
        &format!("{}-d", &nonce[..8]),
    ]);
    // A delegated step layer the job was not known to need (a docker action found only when
    // its step runs): its environment is created by the first docker step, if any.
    let lazy_steps = match (delegate, &caps.step_containers) {
        (None, LayerSupport::Delegated { .. }) => {
            layer_plugin(&shared, plugin, |c| &c.step_containers, "step containers").ok().and_then(
                |dp| Some((dp, delegate_request(dp, &env, &base_request, &inner_id).ok()?)),
            )
        }
        _ => None,
    };
    if lazy_steps.is_some() {
        shared.backends.claim(&inner_id);
    }
    let inner = match delegate {
        None => None,
        Some(dp) => {
            shared.backends.claim(&inner_id);
            let created = tokio::select! {
                r = create_delegate(dp, &env, &base_request, &inner_id) => r,
                _ = run.cancel.cancelled() => Err("cancelled".into()),
            };
            match created {
                Ok(e) => Some(Delegated { plugin: dp, backend: dp.client(), env: e }),
                Err(e) => {
                    remove_env(dp, &inner_id, &log).await;
                    shared.backends.release(&inner_id);
                    remove_env(plugin, &env.id, &log).await;
                    shared.backends.release(&env.id);
                    let result = if run.cancel.is_cancelled() {
                        Outcome::Cancelled
                    } else {
                        Outcome::Failure
                    };
                    let message = format!(
                        "creating the environment of backend {:?}'s delegated layers on backend \
                         {:?}: {e}",
                        plugin.name, dp.name
                    );
                    return finish(&shared, &name, &timer, result, Some(message));
                }
            }
        }
    };
    let own = Delegated { plugin, backend: backend.clone(), env: env.clone() };
    let delegated = |l: &LayerSupport| matches!(l, LayerSupport::Delegated { .. });
    let containers_on = match &inner {
        Some(d) if delegated(&caps.job_container) || delegated(&caps.service_containers) => d,
        _ => &own,
    };
    let containers = tokio::select! {
        r = create_containers(
            &containers_on.backend,
            &containers_on.env,
            &env.primary_container_id,
            job,
            &services,
            &contexts,
            &nonce[..8],
            &log,
        ) => r,
        _ = run.cancel.cancelled() => Err("cancelled while creating containers".into()),
    };
    // Steps run in the job container where it is, else in this environment's primary.
    let steps_on = if job.container.is_some() { containers_on } else { &own };
    let step_host = match (&caps.step_containers, &inner, &lazy_steps) {
        (LayerSupport::Native, _, _) => Some((plugin, backend.clone(), env.clone(), None)),
        (LayerSupport::Delegated { .. }, Some(d), _) => {
            Some((d.plugin, d.backend.clone(), d.env.clone(), None))
        }
        (LayerSupport::Delegated { .. }, None, Some((dp, request))) => {
            let inner_env = Environment {
                id: inner_id.clone(),
                paths: env.paths.clone(),
                ..Environment::default()
            };
            let mut request = request.clone();
            request.hints.step_containers = true;
            let pending = super::docker_step::PendingEnv::new(request);
            Some((*dp, dp.client() as Arc<dyn Backend>, inner_env, Some(pending)))
        }
        _ => None,
    }
    .map(|(p, backend, env, pending)| super::docker_step::StepContainerHost {
        backend,
        plugin: p.name.clone(),
        env,
        image_build: p.capabilities.features.image_build,
        pending,
    });
    let result = match containers {
        Ok(containers) => {
            run_in_env(
                &shared,
                &run,
                &name,
                job,
                &steps_on.backend,
                &steps_on.plugin.name,
                &steps_on.env,
                contexts,
                timeout,
                containers,
                step_host,
            )
            .await
        }
        Err(e) => {
            log(format!("on backend {:?}: {e}", containers_on.plugin.name), LineKind::RunnerError);
            let result =
                if run.cancel.is_cancelled() { Outcome::Cancelled } else { Outcome::Failure };
            ComboResult { result, outputs: Map::new() }
        }
    };
    // The delegate's environment goes with its parent (cascade); removing one a lazy step
    // layer never created is a no-op.
    if let Some(d) = &inner {
        remove_env(d.plugin, &d.env.id, &log).await;
        shared.backends.release(&d.env.id);
    }
    if let Some((dp, _)) = &lazy_steps {
        remove_env(dp, &inner_id, &log).await;
        shared.backends.release(&inner_id);
    }
    remove_env(plugin, &env.id, &log).await;
    shared.backends.release(&env.id);
    finish(&shared, &name, &timer, result.result, None);
    result
}

/// An environment on a plugin, as the job's steps and containers use it: the job's own, or
/// the one of its delegate.
struct Delegated<'a> {
    plugin: &'a crate::backends::Plugin,
    backend: Arc<dyn Backend>,
    /// For a delegate: its id, with the paths of the delegating environment (the delegate
    /// mounts them at the same paths).
    env: Environment,
}

/// Creates the delegate environment `id` for `env` (its parent), with the options of
/// `env.delegation`; returns it with `env`'s paths.
async fn create_delegate(
    delegate: &crate::backends::Plugin,
    env: &Environment,
    base: &EnvironmentRequest,
    id: &str,
) -> Result<Environment, String> {
    let request = delegate_request(delegate, env, base, id)?;
    let created = create_with_retry(delegate, request).await.map_err(|e| e.to_string())?;
    Ok(Environment { paths: env.paths.clone(), ..created })
}

/// The request of the delegate environment `id` for `env` (its parent): `env`'s owner with
/// the parent set, the options of `env.delegation`.
fn delegate_request(
    delegate: &crate::backends::Plugin,
    env: &Environment,
    base: &EnvironmentRequest,
    id: &str,
) -> Result<EnvironmentRequest, String> {
    let Some(d) = &env.delegation else {
        return Err(format!(
            "environment {} declares delegated layers but its Create returned no delegation",
            env.id
        ));
    };
    if d.backend != delegate.name {
        return Err(format!(
            "the environment delegates to backend {:?}, but its capabilities name {:?}",
            d.backend, delegate.name
        ));
    }
    Ok(EnvironmentRequest {
        environment_id: id.to_owned(),
        owner: Owner { parent_environment_id: env.id.clone(), ..base.owner.clone() },
        label: base.label.clone(),
        options: d.options.clone(),
        hints: base.hints,
    })
}

/// Picks one container layer's support out of capabilities.
type Layer = fn(&Capabilities) -> &LayerSupport;

/// The plugin that creates a container layer for a job on `plugin`: `plugin` itself when the
/// layer is native, its delegate when delegated (configured, and native there). The error
/// names the capability and the backend.
fn layer_plugin<'a>(
    shared: &'a Shared,
    plugin: &'a crate::backends::Plugin,
    layer: Layer,
    what: &str,
) -> Result<&'a crate::backends::Plugin, String> {
    match layer(&plugin.capabilities) {
        LayerSupport::Native => Ok(plugin),
        LayerSupport::Delegated { backend } => {
            let Some(delegate) = shared.backends.get(backend) else {
                return Err(format!(
                    "the job needs {what}, which backend {:?} delegates to backend {backend:?}, \
                     which is not configured; add it under plugins: in the config file (or \
                     --plugin {backend}=COMMAND)",
                    plugin.name
                ));
            };
            match layer(&delegate.capabilities) {
                LayerSupport::Native => Ok(delegate),
                _ => Err(format!(
                    "the job needs {what}, which backend {:?} delegates to backend {backend:?}, \
                     which does not support it natively",
                    plugin.name
                )),
            }
        }
        LayerSupport::Unsupported(detail) => {
            let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
            Err(format!(
                "the job needs {what}, which backend {:?} does not support{detail}",
                plugin.name
            ))
        }
    }
}

fn fail_early(shared: &Shared, name: &str, message: String) -> ComboResult {
    shared.sink.event(Event::JobStarted { job: name.to_owned(), runs_on: "-".into() });
    let timer = Timer::start();
    finish(shared, name, &timer, Outcome::Failure, Some(message))
}

fn finish(
    shared: &Shared,
    name: &str,
    timer: &Timer,
    result: Outcome,
    message: Option<String>,
) -> ComboResult {
    if let Some(message) = message {
        shared.sink.event(Event::Line {
            job: name.to_owned(),
            step: None,
            text: message,
            kind: LineKind::RunnerError,
        });
    }
    shared.sink.event(Event::JobFinished {
        job: name.to_owned(),
        result,
        duration: timer.elapsed(),
    });
    ComboResult { result, outputs: Map::new() }
}

/// Creates an environment; while the plugin is unavailable (a managed plugin being restarted
/// after a crash), retries through the current client for up to ten seconds.
async fn create_with_retry(
    plugin: &crate::backends::Plugin,
    request: EnvironmentRequest,
) -> kiln_plugin_sdk::Result<Environment> {
    let mut attempts = 0;
    loop {
        match plugin.client().create_environment(request.clone()).await {
            Err(e) if e.code == kiln_plugin_sdk::Code::Unavailable && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Removes an environment. When the plugin is unavailable (it crashed and is being
/// restarted), retries through the current client for a few seconds; what still fails is
/// collected later by the garbage collector.
async fn remove_env(
    plugin: &crate::backends::Plugin,
    env_id: &str,
    log: &impl Fn(String, LineKind),
) {
    let request = RemoveRequest {
        environment_id: env_id.to_owned(),
        container_id: None,
        grace: Duration::from_secs(2),
    };
    let mut attempts = 0;
    loop {
        match plugin.client().remove(request.clone()).await {
            Ok(_) => return,
            Err(e) if e.code == kiln_plugin_sdk::Code::Unavailable && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                log(
                    format!(
                        "could not remove environment {env_id} on backend {:?}: {e} (it will be collected later)",
                        plugin.name
                    ),
                    LineKind::RunnerError,
                );
                return;
            }
        }
    }
}

fn eval_runs_on(
    runs_on: Option<&RunsOn>,
    contexts: &Map<String, Value>,
    host: &(dyn expr::Host + Sync),
) -> Result<Vec<String>, String> {
    let scope = Scope { contexts, host };
    let labels = match runs_on {
        None => return Err("missing runs-on".into()),
        Some(RunsOn::Labels(l)) | Some(RunsOn::Group { labels: l, .. }) => l,
    };
    let mut out = Vec::new();
    for l in labels {
        let v = if expr::contains_expression(l) {
            expr::interpolate_value(&Value::String(l.clone()), &scope).map_err(|e| e.to_string())?
        } else {
            Value::String(l.clone())
        };
        match v {
            Value::Array(a) => out.extend(a.iter().map(expr::to_string)),
            v => out.push(expr::to_string(&v)),
        }
    }
    out.retain(|l| !l.is_empty());
    Ok(out)
}

fn resolve_label(shared: &Shared, runs_on: &[String]) -> Result<LabelConfig, String> {
    if let Some(l) = labels::pick(&shared.opts.labels, runs_on) {
        if l.backend.is_empty() {
            let mut l = l.clone();
            l.backend = shared.opts.default_backend.clone().unwrap_or_else(|| "host".into());
            return Ok(l);
        }
        return Ok(l.clone());
    }
    match (&shared.opts.default_backend, runs_on.first()) {
        (Some(backend), Some(first)) => Ok(LabelConfig {
            name: first.clone(),
            backend: backend.clone(),
            options: Default::default(),
        }),
        _ => Err(format!(
            "no configured label matches {runs_on:?}; map one with -P {}=host or in the config \
             file's runner.labels",
            runs_on.first().map_or("LABEL", String::as_str)
        )),
    }
}

fn job_timeout(
    job: &Job,
    contexts: &Map<String, Value>,
    host: &(dyn expr::Host + Sync),
    cap: Option<Duration>,
) -> Duration {
    let minutes = match &job.timeout_minutes {
        None => 360.0,
        Some(NumberOrExpr::Number(n)) => *n,
        Some(NumberOrExpr::Expr(e)) => expr::interpolate(e, &Scope { contexts, host })
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(360.0),
    };
    let t = Duration::from_secs_f64((minutes * 60.0).clamp(0.0, 1.0e9));
    cap.map_or(t, |c| t.min(c))
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

/// Where the steps run and what the `job` context says about containers.
pub(crate) struct Containers {
    /// The job container when the job has one, else the environment's primary container.
    pub(crate) target: String,
    /// `{"container": {id, network}, "services": {id: {id, ports, network}}}`.
    pub(crate) job_context: Map<String, Value>,
}

/// How long a service may take to become healthy.
const SERVICE_HEALTH_TIMEOUT: Duration = Duration::from_secs(180);

/// Creates and starts the service containers (waiting until each is healthy) and the job
/// container. Their resources belong to the environment: removing it removes them.
#[allow(clippy::too_many_arguments)]
async fn create_containers(
    backend: &Arc<dyn Backend>,
    env: &Environment,
    primary: &str,
    job: &Job,
    services: &[String],
    contexts: &Map<String, Value>,
    nonce: &str,
    log: &impl Fn(String, LineKind),
) -> Result<Containers, String> {
    let host = super::StaticHost(JobStatus::Success);
    let mut services_ctx = Map::new();
    for id in services {
        let svc = &job.services[id.as_str()];
        let mut spec =
            container_spec(svc, contexts, &host).map_err(|e| format!("services.{id}: {e}"))?;
        spec.network_aliases = vec![id.clone()];
        let container_id = kiln_plugin_sdk::ids::make_id(&["svc", id, nonce]);
        let request = ContainerRequest {
            environment_id: env.id.clone(),
            container_id: container_id.clone(),
            spec,
        };
        log(format!("starting service {id} ({})", request.spec.image), LineKind::Runner);
        backend
            .create_container(ContainerKind::Service, request)
            .await
            .map_err(|e| format!("creating service {id}: {e}"))?;
        let started = backend
            .start_container(ContainerRef {
                environment_id: env.id.clone(),
                container_id: container_id.clone(),
            })
            .await
            .map_err(|e| format!("starting service {id}: {e}"))?;
        wait_healthy(backend, env, &container_id, id).await?;
        let ports: Map<String, Value> = started
            .ports
            .iter()
            .map(|p| {
                let port =
                    p.container_port.split('/').next().unwrap_or(&p.container_port).to_owned();
                (port, Value::String(p.host_port.to_string()))
            })
            .collect();
        services_ctx
            .insert(id.clone(), json!({ "id": container_id, "ports": ports, "network": env.id }));
    }
    let mut job_context = Map::new();
    job_context.insert("services".into(), Value::Object(services_ctx));
    let Some(container) = &job.container else {
        job_context.insert("container".into(), json!({}));
        return Ok(Containers { target: primary.to_owned(), job_context });
    };
    let mut spec =
        container_spec(container, contexts, &host).map_err(|e| format!("container: {e}"))?;
    // Kept alive for the job's execs, as GitHub does.
    spec.entrypoint = vec!["tail".into()];
    spec.cmd = vec!["-f".into(), "/dev/null".into()];
    spec.mount_workspace = true;
    spec.working_dir = env.paths.workspace.clone();
    let container_id = kiln_plugin_sdk::ids::make_id(&["job", nonce]);
    log(format!("starting the job container ({})", spec.image), LineKind::Runner);
    let request = ContainerRequest {
        environment_id: env.id.clone(),
        container_id: container_id.clone(),
        spec,
    };
    backend
        .create_container(ContainerKind::Job, request)
        .await
        .map_err(|e| format!("creating the job container: {e}"))?;
    backend
        .start_container(ContainerRef {
            environment_id: env.id.clone(),
            container_id: container_id.clone(),
        })
        .await
        .map_err(|e| format!("starting the job container: {e}"))?;
    job_context.insert("container".into(), json!({ "id": container_id, "network": env.id }));
    Ok(Containers { target: container_id, job_context })
}

/// A container spec from `container:` or a `services:` entry, expressions evaluated.
fn container_spec(
    c: &crate::workflow::Container,
    contexts: &Map<String, Value>,
    host: &(dyn expr::Host + Sync),
) -> Result<ContainerSpec, String> {
    let scope = Scope { contexts, host };
    let text = |s: &str| expr::interpolate(s, &scope).map_err(|e| e.to_string());
    let env = eval_env(&c.env, contexts, host).map_err(|e| format!("env: {e}"))?;
    let credentials = match &c.credentials {
        Some(cr) => Some(RegistryCredentials {
            username: text(cr.username.as_deref().unwrap_or(""))?,
            password: text(cr.password.as_deref().unwrap_or(""))?,
        }),
        None => None,
    };
    Ok(ContainerSpec {
        image: text(&c.image)?,
        env: env.into_iter().map(|(k, v)| kiln_plugin_sdk::EnvVar::new(k, v)).collect(),
        ports: c.ports.iter().map(|p| text(p)).collect::<Result<_, _>>()?,
        volumes: c.volumes.iter().map(|v| text(v)).collect::<Result<_, _>>()?,
        options: text(c.options.as_deref().unwrap_or(""))?,
        credentials,
        ..ContainerSpec::default()
    })
}

/// Waits until a service is running and healthy (or has no health check); bounded.
async fn wait_healthy(
    backend: &Arc<dyn Backend>,
    env: &Environment,
    container_id: &str,
    id: &str,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SERVICE_HEALTH_TIMEOUT;
    loop {
        let status = backend
            .inspect(ContainerRef {
                environment_id: env.id.clone(),
                container_id: container_id.to_owned(),
            })
            .await
            .map_err(|e| format!("inspecting service {id}: {e}"))?;
        match (status.state, status.health) {
            (ContainerState::Exited, _) => {
                return Err(format!(
                    "service {id} exited (code {}): {}",
                    status.exit_code, status.detail
                ));
            }
            (_, Health::Unhealthy) => {
                return Err(format!("service {id} is unhealthy: {}", status.detail));
            }
            (ContainerState::Running, Health::Healthy | Health::None | Health::Unspecified) => {
                return Ok(());
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "service {id} did not become healthy within {}s: {}",
                SERVICE_HEALTH_TIMEOUT.as_secs(),
                status.detail
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_in_env(
    shared: &Arc<Shared>,
    run: &JobRun,
    name: &str,
    job: &Job,
    backend: &Arc<dyn Backend>,
    plugin: &str,
    env: &Environment,
    mut contexts: Map<String, Value>,
    timeout: Duration,
    containers: Containers,
    step_containers: Option<super::docker_step::StepContainerHost>,
) -> ComboResult {
    let sink = &shared.sink;
    let log = |text: String, kind: LineKind| {
        sink.event(Event::Line { job: name.to_owned(), step: None, text, kind });
    };
    let opts = &shared.opts;
    let wf = &opts.workflow;

    // The job's cancellation: the scheduler's token (fail-fast, Ctrl-C) or the job timeout.
    let job_cancel = run.cancel.child_token();
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timer_task = {
        let job_cancel = job_cancel.clone();
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                    job_cancel.cancel();
                }
                _ = job_cancel.cancelled() => {}
            }
        })
    };

    // github and runner contexts.
    let mut github = opts.github.clone();
    github.insert("job".into(), run.job_id.clone().into());
    github.insert("workspace".into(), env.paths.workspace.clone().into());
    github.insert("action".into(), "".into());
    let event_path = format!("{}/event.json", env.paths.runner_files.trim_end_matches('/'));
    github.insert("event_path".into(), event_path.clone().into());
    contexts.insert("github".into(), Value::Object(github.clone()));
    let runner_os = match env.os.as_str() {
        "linux" => "Linux",
        "darwin" => "macOS",
        "windows" => "Windows",
        other => other,
    }
    .to_owned();
    let runner_arch = match env.arch.as_str() {
        "amd64" => "X64",
        "arm64" => "ARM64",
        "386" => "X86",
        "arm" => "ARM",
        other => other,
    }
    .to_owned();
    contexts.insert(
        "runner".into(),
        json!({
            "name": format!("kiln-{plugin}"),
            "os": runner_os,
            "arch": runner_arch,
            "temp": env.paths.temp,
            "tool_cache": env.paths.tool_cache,
            "debug": "",
            "environment": "self-hosted",
        }),
    );
    contexts.insert(
        "job".into(),
        json!({ "status": "success", "container": containers.job_context.get("container"), "services": containers.job_context.get("services") }),
    );

    // Base environment: the primary container's own, then GitHub's defaults.
    let primary = containers.target.clone();
    let mut base_env: IndexMap<String, String> = IndexMap::new();
    match backend
        .inspect(ContainerRef { environment_id: env.id.clone(), container_id: primary.clone() })
        .await
    {
        Ok(status) => {
            for kv in status.image_env {
                if let Some((k, v)) = kv.split_once('=') {
                    base_env.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        Err(e) => {
            log(
                format!("inspecting the environment on backend {plugin:?}: {e}"),
                LineKind::RunnerError,
            );
            timer_task.abort();
            return ComboResult { result: Outcome::Failure, outputs: Map::new() };
        }
    }
    if !base_env.contains_key("PATH") {
        base_env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let gh = |k: &str| github.get(k).map(expr::to_string).unwrap_or_default();
    let defaults: [(&str, String); 26] = [
        ("CI", "true".into()),
        ("GITHUB_ACTIONS", "true".into()),
        ("GITEA_ACTIONS", "true".into()),
        ("FORGEJO_ACTIONS", "true".into()),
        ("GITHUB_WORKSPACE", env.paths.workspace.clone()),
        ("GITHUB_REPOSITORY", gh("repository")),
        ("GITHUB_REPOSITORY_OWNER", gh("repository_owner")),
        ("GITHUB_SHA", gh("sha")),
        ("GITHUB_REF", gh("ref")),
        ("GITHUB_REF_NAME", gh("ref_name")),
        ("GITHUB_REF_TYPE", gh("ref_type")),
        ("GITHUB_HEAD_REF", gh("head_ref")),
        ("GITHUB_BASE_REF", gh("base_ref")),
        ("GITHUB_EVENT_NAME", gh("event_name")),
        ("GITHUB_EVENT_PATH", event_path.clone()),
        ("GITHUB_JOB", run.job_id.clone()),
        ("GITHUB_RUN_ID", gh("run_id")),
        ("GITHUB_RUN_NUMBER", gh("run_number")),
        ("GITHUB_RUN_ATTEMPT", gh("run_attempt")),
        ("GITHUB_ACTOR", gh("actor")),
        ("GITHUB_WORKFLOW", gh("workflow")),
        ("GITHUB_SERVER_URL", gh("server_url")),
        ("GITHUB_API_URL", gh("api_url")),
        ("RUNNER_OS", runner_os.clone()),
        ("RUNNER_ARCH", runner_arch.clone()),
        ("RUNNER_TEMP", env.paths.temp.clone()),
    ];
    for (k, v) in defaults {
        base_env.insert(k.into(), v);
    }
    base_env.insert("RUNNER_TOOL_CACHE".into(), env.paths.tool_cache.clone());
    base_env.insert("GITHUB_GRAPHQL_URL".into(), gh("graphql_url"));
    if opts.act_compat {
        base_env.insert("ACT".into(), "true".into());
    }
    for (k, v) in &opts.extra_env {
        base_env.insert(k.clone(), v.clone());
    }
    let services =
        opts.job_env.as_ref().map(|h| h.job_env(&github, &run.job_id)).unwrap_or_default();
    base_env.extend(services.env.iter().cloned());

    // Workflow and job env (expressions allowed).
    let mut env_ctx: IndexMap<String, String> = IndexMap::new();
    if opts.act_compat {
        env_ctx.insert("ACT".into(), "true".into());
    }
    for (k, v) in &opts.extra_env {
        env_ctx.insert(k.clone(), v.clone());
    }
    let host = super::StaticHost(JobStatus::Success);
    for (what, block) in [("env", &wf.env), (&*format!("jobs.{}.env", run.job_id), &job.env)] {
        contexts.insert("env".into(), to_obj(&env_ctx));
        match eval_env(block, &contexts, &host) {
            Ok(m) => env_ctx.extend(m),
            Err(e) => {
                log(format!("{}: {what}: {e}", wf.file), LineKind::RunnerError);
                timer_task.abort();
                return ComboResult { result: Outcome::Failure, outputs: Map::new() };
            }
        }
    }
    contexts.insert("env".into(), to_obj(&env_ctx));

    let mut state = JobState {
        status: JobStatus::Success,
        env_accum: IndexMap::new(),
        path_accum: Vec::new(),
        steps: Map::new(),
        masker: Masker::new(),
        summary: String::new(),
        posts: Vec::new(),
        actions: Default::default(),
        copied_actions: Default::default(),
        pre_state: Default::default(),
    };
    for v in opts.secrets.values() {
        state.masker.add(v);
    }
    for v in &services.mask {
        state.masker.add(v);
    }

    // Set up: workspace in, event file and shell probe in one exec.
    let path = base_env.get("PATH").cloned().unwrap_or_default();
    let setup = setup_environment(shared, backend, env, &primary, &path, &job_cancel).await;
    let bash = match setup {
        Ok(b) => b,
        Err(e) => {
            log(
                format!("setting up the environment on backend {plugin:?}: {e}"),
                LineKind::RunnerError,
            );
            timer_task.abort();
            let result =
                if job_cancel.is_cancelled() { Outcome::Cancelled } else { Outcome::Failure };
            return ComboResult { result, outputs: Map::new() };
        }
    };

    let step_ctx = StepContext {
        shared: shared.clone(),
        job_name: name.to_owned(),
        job_id: run.job_id.clone(),
        backend: backend.clone(),
        plugin: plugin.to_owned(),
        env: env.clone(),
        container_id: primary.clone(),
        job_context: containers.job_context.clone(),
        base_env,
        env_ctx,
        bash_available: bash,
        hash_root: match shared.backends.get(plugin) {
            Some(p) if p.capabilities.features.local_copy => {
                Some(std::path::PathBuf::from(&env.paths.workspace))
            }
            _ => opts.workspace.clone(),
        },
        workflow_defaults: wf.defaults.clone(),
        job_defaults: job.defaults.clone(),
        step_containers,
    };
    let steps = job.steps.as_deref().unwrap_or(&[]);
    let frame = step::Frame::default();
    let set_up =
        super::action::run_pres(&step_ctx, &mut state, &mut contexts, steps, &job_cancel).await;
    if !set_up && state.status == JobStatus::Success {
        state.status = JobStatus::Failure;
    }
    for (index, s) in steps.iter().enumerate().filter(|_| set_up) {
        if job_cancel.is_cancelled() && state.status == JobStatus::Success {
            state.status = JobStatus::Cancelled;
        }
        step::run_step(&step_ctx, &mut state, &mut contexts, index, s, &job_cancel, &frame).await;
    }
    step::run_posts(&step_ctx, &mut state, &mut contexts, &job_cancel).await;
    timer_task.abort();

    if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
        log(
            format!(
                "the job exceeded its maximum execution time of {}",
                crate::output::fmt_duration(timeout)
            ),
            LineKind::RunnerError,
        );
        state.status = JobStatus::Failure;
    }
    if !state.summary.is_empty() {
        log("Step summary:".into(), LineKind::Runner);
        for line in state.summary.lines() {
            log(state.masker.mask(line).into_owned(), LineKind::Output);
        }
    }

    // Outputs.
    let mut outputs = Map::new();
    let host = super::StaticHost(state.status);
    contexts.insert("steps".into(), Value::Object(state.steps.clone()));
    for (k, v) in &job.outputs {
        match expr::interpolate(v, &Scope { contexts: &contexts, host: &host }) {
            Ok(s) => {
                outputs.insert(k.clone(), Value::String(s));
            }
            Err(e) => log(
                format!("{}: jobs.{}.outputs.{k}: {e}", wf.file, run.job_id),
                LineKind::RunnerError,
            ),
        }
    }
    let result = match state.status {
        JobStatus::Success => Outcome::Success,
        JobStatus::Failure => Outcome::Failure,
        JobStatus::Cancelled if timed_out.load(std::sync::atomic::Ordering::SeqCst) => {
            Outcome::Failure
        }
        JobStatus::Cancelled => Outcome::Cancelled,
    };
    ComboResult { result, outputs }
}

/// Copies the workspace in and, at the same time, runs one probe exec that also writes the
/// event file. Returns whether `bash` is on the environment's PATH.
async fn setup_environment(
    shared: &Arc<Shared>,
    backend: &Arc<dyn Backend>,
    env: &Environment,
    container: &str,
    path: &str,
    cancel: &CancellationToken,
) -> Result<bool, String> {
    let copy = async {
        let Some(workspace) = &shared.workspace else { return Ok(()) };
        let target = kiln_plugin_sdk::CopyInTarget {
            environment_id: env.id.clone(),
            container_id: container.to_owned(),
            dest_path: env.paths.workspace.clone(),
            local_path: None,
        };
        backend
            .copy_in(target, workspace.tar_stream())
            .await
            .map(|_| ())
            .map_err(|e| format!("copying the workspace in: {e}"))
    };
    tokio::select! {
        r = async { tokio::try_join!(copy, probe_shell(shared, backend, env, container, path)) } => {
            r.map(|((), bash)| bash)
        }
        _ = cancel.cancelled() => Err("cancelled".into()),
    }
}

/// One exec that writes the event file and tells whether `bash` is on the PATH.
async fn probe_shell(
    shared: &Arc<Shared>,
    backend: &Arc<dyn Backend>,
    env: &Environment,
    container: &str,
    path: &str,
) -> Result<bool, String> {
    let event = shared.opts.github.get("event").cloned().unwrap_or_else(|| json!({}));
    let event_json = serde_json::to_vec_pretty(&event).unwrap_or_default();
    let request = ExecRequest {
        exec_id: step::exec_id(),
        environment_id: env.id.clone(),
        container_id: container.to_owned(),
        argv: vec![
            "sh".into(),
            "-c".into(),
            "command -v bash >/dev/null 2>&1 && echo bash || echo sh".into(),
        ],
        // The probe must see the environment's real PATH.
        env: vec![kiln_plugin_sdk::EnvVar::new("PATH", path)],
        path_prepend: Vec::new(),
        working_dir: String::new(),
        files: vec![StagedFile {
            path: format!("{}/event.json", env.paths.runner_files.trim_end_matches('/')),
            content: event_json.into(),
            mode: 0o644,
        }],
        collect: Vec::new(),
        collect_limit_bytes: 0,
        stdin: false,
        tty: false,
        timeout: Some(Duration::from_secs(60)),
        grace: Duration::from_secs(1),
    };
    let mut stream = backend.exec(request).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    use futures::StreamExt;
    while let Some(event) = stream.next().await {
        match event {
            Ok(ExecEvent::Output { data, .. }) => out.extend_from_slice(&data),
            Ok(ExecEvent::Exited(_)) => return Ok(String::from_utf8_lossy(&out).trim() == "bash"),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the setup exec ended without an exit status".into())
}
