//! One job (one matrix combination) on one backend, as a sequence of phases over [`JobCx`]:
//! **resolve** `runs-on` to a label and its plugin, **preflight** the container layers the job
//! needs against the backend's capabilities (nothing is created when one is missing),
//! **create** the environment (and the delegate's, for delegated layers), **setup** (services
//! and job container, the base environment, the workspace copy and the probe exec), **pre**
//! (fetch remote actions, their `pre:` steps), **steps**, **post** (actions' `post:` steps,
//! the job's outputs) and **remove** — also after failure, timeout, cancellation or a plugin
//! crash. A job whose task dies is cleaned up by the scheduler from its [`JobRun::leases`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indexmap::IndexMap;
use kiln_plugin_sdk::{
    Backend, ContainerRef, Environment, EnvironmentHints, EnvironmentRequest, ExecEvent,
    ExecRequest, LayerSupport, Owner, StagedFile,
};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::action;
use super::containers::{Containers, create_containers};
use super::context::{
    ComboResult, JobEnv, JobEnvRequest, JobRun, Shared, StaticHost, Timer, to_obj,
};
use super::docker_step;
use super::environment::{
    Delegated, EnvError, Layer, create_delegate, create_with_retry, delegate_request, layer_plugin,
    remove_env,
};
use super::exec::exec_id;
use super::state::{Frame, JobProgress, PendingEnv, StepContainerHost, StepContext, eval_env};
use super::step;
use crate::backends::Plugin;
use crate::expr::{self, JobStatus, Scope};
use crate::labels::{self, LabelConfig};
use crate::output::{Event, LineKind, Outcome};
use crate::workflow::{Job, NumberOrExpr, RunsOn};

/// Runs one combination; a failure becomes a success for the workflow, `needs` and fail-fast
/// when the job has `continue-on-error: true` (the job itself is still reported as failed).
/// Everything it logs is inside a `job` span (job id, name, backend, environment id).
pub(crate) async fn run_job(shared: Arc<Shared>, run: JobRun) -> ComboResult {
    let span = tracing::info_span!(
        "job",
        job = %run.job_id,
        name = %run.display_name,
        backend = tracing::field::Empty,
        env = tracing::field::Empty,
    );
    async move {
        let continue_on_error = continue_on_error(&shared, &run);
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
        tracing::debug!(result = %result.result, "job finished");
        result
    }
    .instrument(span)
    .await
}

/// The job's `continue-on-error`, evaluated at job level.
fn continue_on_error(shared: &Shared, run: &JobRun) -> bool {
    let job = &shared.opts.workflow.jobs[run.job_id.as_str()];
    let contexts = run.contexts(&shared.opts);
    let host = StaticHost(JobStatus::Success);
    match &job.continue_on_error {
        None => false,
        Some(crate::workflow::BoolOrExpr::Bool(b)) => *b,
        Some(crate::workflow::BoolOrExpr::Expr(e)) => {
            expr::interpolate(e, &Scope { contexts: &contexts, host: &host })
                .is_ok_and(|s| s == "true")
        }
    }
}

/// The phases, in order. Whatever was created is removed before the job is reported finished.
async fn run_job_inner(shared: Arc<Shared>, run: JobRun) -> ComboResult {
    let job = JobCx { contexts: run.contexts(&shared.opts), shared, run, timer: Timer::start() };
    let label = match job.resolve() {
        Ok(label) => label,
        Err(message) => return job.fail_early(message),
    };
    if label.backend == labels::SKIP {
        return job.skip(&label);
    }
    job.shared.sink.event(Event::JobStarted { job: job.name().into(), runs_on: label.to_string() });
    let result = async {
        let plugin = job.plugin(&label)?;
        tracing::Span::current().record("backend", plugin.name.as_str());
        let needs = job.preflight(plugin)?;
        let envs = job.create(&label, plugin, &needs).await?;
        tracing::Span::current().record("env", envs.own.env.id.as_str());
        let result = job.in_environment(&envs, &needs).await;
        job.remove(&envs).await;
        Ok::<_, JobEnd>(result)
    }
    .await;
    match result {
        Ok(result) => job.finish(JobEnd { result: result.result, message: None }, result.outputs),
        Err(end) => job.finish(end, Map::new()),
    }
}

/// The job being run; the phases are its methods.
struct JobCx {
    shared: Arc<Shared>,
    run: JobRun,
    timer: Timer,
    /// The job-level contexts (github, vars, secrets, inputs, needs, matrix, strategy).
    contexts: Map<String, Value>,
}

/// How a job (or a phase of it) ends early: its result and why.
struct JobEnd {
    result: Outcome,
    message: Option<String>,
}

impl JobEnd {
    fn failed(message: String) -> JobEnd {
        JobEnd { result: Outcome::Failure, message: Some(message) }
    }

    /// A failure, or a cancellation when `cancel` fired (the failure was its consequence).
    fn failed_unless(cancel: &CancellationToken, message: String) -> JobEnd {
        let result = if cancel.is_cancelled() { Outcome::Cancelled } else { Outcome::Failure };
        JobEnd { result, message: Some(message) }
    }
}

/// What preflight found the job needs of container layers.
struct Needs<'a> {
    /// The services whose image is not empty.
    services: Vec<String>,
    /// The job has docker steps (known before it starts).
    docker_steps: bool,
    /// The delegate that holds the job's delegated container layers.
    delegate: Option<&'a Plugin>,
}

/// The environments of a job: its own, the delegate's, and one a first docker step may create.
struct Envs<'a> {
    own: Delegated<'a>,
    /// The delegate environment created at job start.
    inner: Option<Delegated<'a>>,
    /// A delegated step layer the job was not known to need (a docker action found only when
    /// its step runs): its environment is created by the first docker step, if any.
    lazy_steps: Option<(&'a Plugin, EnvironmentRequest)>,
    /// The id of the delegate environment (created now, later, or never).
    inner_id: String,
    /// A random part of this job's ids (containers, environments).
    nonce: String,
    /// The job's time limit.
    timeout: Duration,
}

/// A job in its environment, between setup and the end of its steps.
struct Running {
    cx: StepContext,
    state: JobProgress,
    contexts: Map<String, Value>,
}

impl JobCx {
    fn job(&self) -> &Job {
        &self.shared.opts.workflow.jobs[self.run.job_id.as_str()]
    }

    fn name(&self) -> &str {
        &self.run.display_name
    }

    fn log(&self, text: String, kind: LineKind) {
        self.shared.sink.event(Event::Line { job: self.name().to_owned(), step: None, text, kind });
    }

    /// `file: jobs.<id>.<key>: <error>`.
    fn error(&self, key: &str, e: impl std::fmt::Display) -> String {
        format!("{}: jobs.{}.{key}: {e}", self.shared.opts.workflow.file, self.run.job_id)
    }

    /// Reports the job finished (with a message first).
    fn finish(&self, end: JobEnd, outputs: Map<String, Value>) -> ComboResult {
        if let Some(message) = end.message {
            self.log(message, LineKind::RunnerError);
        }
        self.shared.sink.event(Event::JobFinished {
            job: self.name().to_owned(),
            result: end.result,
            duration: self.timer.elapsed(),
        });
        ComboResult { result: end.result, outputs }
    }

    /// A job that fails before it has a label: reported started, then failed.
    fn fail_early(&self, message: String) -> ComboResult {
        self.shared
            .sink
            .event(Event::JobStarted { job: self.name().to_owned(), runs_on: "-".into() });
        self.finish(JobEnd::failed(message), Map::new())
    }

    /// A job whose label maps to no platform.
    fn skip(&self, label: &LabelConfig) -> ComboResult {
        let text = format!("skipped: the label {:?} maps to no platform", label.name);
        self.log(text, LineKind::Runner);
        self.shared.sink.event(Event::JobFinished {
            job: self.name().to_owned(),
            result: Outcome::Skipped,
            duration: self.timer.elapsed(),
        });
        ComboResult::bare(Outcome::Skipped)
    }

    /// Phase **resolve**: `runs-on`, evaluated, to a label configuration.
    fn resolve(&self) -> Result<LabelConfig, String> {
        let host = StaticHost(JobStatus::Success);
        let runs_on = eval_runs_on(self.job().runs_on.as_ref(), &self.contexts, &host)
            .map_err(|e| self.error("runs-on", e))?;
        resolve_label(&self.shared, &runs_on).map_err(|e| self.error("runs-on", e))
    }

    /// The plugin of the label's backend.
    fn plugin(&self, label: &LabelConfig) -> Result<&Plugin, JobEnd> {
        self.shared.backends.get(&label.backend).ok_or_else(|| {
            let configured: Vec<&str> = self.shared.backends.names().collect();
            JobEnd::failed(format!(
                "label {:?} uses backend {:?}, which is not configured (configured: {}); add it \
                 under plugins: in the config file",
                label.name,
                label.backend,
                configured.join(", ")
            ))
        })
    }

    /// Phase **preflight**: nothing is created when the backend (or its delegate) lacks a
    /// layer the job needs.
    fn preflight<'a>(&'a self, plugin: &'a Plugin) -> Result<Needs<'a>, JobEnd> {
        let job = self.job();
        let host = StaticHost(JobStatus::Success);
        // Services whose image evaluates to nothing are left out (as act and GitHub do).
        let services: Vec<String> = job
            .services
            .iter()
            .filter(|(_, svc)| {
                let scope = Scope { contexts: &self.contexts, host: &host };
                let image =
                    expr::interpolate(&svc.image, &scope).unwrap_or_else(|_| svc.image.clone());
                !image.trim().is_empty()
            })
            .map(|(id, _)| id.clone())
            .collect();
        let docker_needs = docker_step::needs(
            job.steps.as_deref().unwrap_or(&[]),
            self.shared.opts.workspace.as_deref(),
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
        let mut delegate = None;
        for (needed, what, layer) in layers {
            if !needed {
                continue;
            }
            let p = layer_plugin(&self.shared, plugin, layer, what)
                .map_err(|e| JobEnd::failed(e.to_string()))?;
            if p.name != plugin.name {
                delegate = Some(p);
            }
        }
        if let Some(uses) = &docker_needs.image_build {
            let builder = layer_plugin(&self.shared, plugin, |c| &c.step_containers, &step_what)
                .unwrap_or(plugin);
            if !builder.capabilities.features.image_build {
                return Err(JobEnd::failed(format!(
                    "the job needs image builds (uses: {uses} is built from a Dockerfile), which \
                     backend {:?} does not support: it does not declare the feature image_build",
                    builder.name
                )));
            }
        }
        Ok(Needs { services, docker_steps, delegate })
    }

    /// Phase **create**: the job's environment, then the delegate's (parent = the job's). What
    /// a failed or cancelled create may have left is removed here.
    async fn create<'a>(
        &'a self,
        label: &LabelConfig,
        plugin: &'a Plugin,
        needs: &Needs<'a>,
    ) -> Result<Envs<'a>, JobEnd> {
        let (request, nonce, timeout) = self.environment_request(label, needs);
        let env_id = request.environment_id.clone();
        let base_request = request.clone();
        let cancel = &self.run.cancel;
        self.run.leases.take(&self.shared.backends, &plugin.name, &env_id);
        let created = tokio::select! {
            r = create_with_retry(plugin, request) => r.map_err(|e| e.to_string()),
            _ = cancel.cancelled() => Err("cancelled".into()),
        };
        let env = match created {
            Ok(env) => env,
            Err(e) => {
                // A create that failed half-way (or was cancelled) may have left something:
                // remove is safe after a failed create.
                self.remove_one(plugin, &env_id).await;
                if cancel.is_cancelled() {
                    return Err(JobEnd { result: Outcome::Cancelled, message: None });
                }
                return Err(JobEnd::failed(format!(
                    "creating the environment on backend {:?}: {e}",
                    plugin.name
                )));
            }
        };
        tracing::debug!(env = %env.id, "environment created");
        // The client after the create: a restarted plugin has a new one.
        let own = Delegated { plugin, backend: plugin.client(), env };
        let identity = &self.shared.opts.identity;
        let inner_id = kiln_plugin_sdk::ids::make_id(&[
            &identity.runner_id,
            &self.run.job_id,
            &self.run.index.to_string(),
            &format!("{nonce}-d"),
        ]);
        let lazy_steps = match (needs.delegate, &plugin.capabilities.step_containers) {
            (None, LayerSupport::Delegated { .. }) => {
                layer_plugin(&self.shared, plugin, |c| &c.step_containers, "step containers")
                    .ok()
                    .and_then(|dp| {
                        Some((dp, delegate_request(dp, &own.env, &base_request, &inner_id).ok()?))
                    })
            }
            _ => None,
        };
        if let Some((dp, _)) = &lazy_steps {
            self.run.leases.take(&self.shared.backends, &dp.name, &inner_id);
        }
        let mut envs = Envs { own, inner: None, lazy_steps, inner_id, nonce, timeout };
        if let Some(dp) = needs.delegate {
            match self.create_inner(dp, &envs, &base_request).await {
                Ok(inner) => envs.inner = Some(inner),
                Err(e) => {
                    self.remove_one(dp, &envs.inner_id).await;
                    self.remove(&envs).await;
                    return Err(JobEnd::failed_unless(
                        cancel,
                        format!(
                            "creating the environment of backend {:?}'s delegated layers on \
                             backend {:?}: {e}",
                            plugin.name, dp.name
                        ),
                    ));
                }
            }
        }
        Ok(envs)
    }

    /// The request of the job's environment, with its nonce and the job's time limit (the
    /// environment expires ten minutes after it).
    fn environment_request(
        &self,
        label: &LabelConfig,
        needs: &Needs<'_>,
    ) -> (EnvironmentRequest, String, Duration) {
        let identity = &self.shared.opts.identity;
        let nonce = crate::identity::short_nonce()[..8].to_owned();
        let env_id = kiln_plugin_sdk::ids::make_id(&[
            &identity.runner_id,
            &self.run.job_id,
            &self.run.index.to_string(),
            &nonce,
        ]);
        let host = StaticHost(JobStatus::Success);
        let timeout = job_timeout(self.job(), &self.contexts, &host, self.shared.opts.max_job_time);
        let lifetime = i64::try_from((timeout + Duration::from_secs(600)).as_millis());
        let request = EnvironmentRequest {
            environment_id: env_id,
            owner: Owner {
                runner_id: identity.runner_id.clone(),
                boot_id: identity.boot_id.clone(),
                job_id: self.run.job_id.clone(),
                parent_environment_id: String::new(),
                created_at_unix_ms: 0,
                expires_at_unix_ms: kiln_plugin_sdk::time::now_ms() + lifetime.unwrap_or(0),
                labels: Default::default(),
            },
            label: label.name.clone(),
            options: label.options.clone(),
            hints: EnvironmentHints {
                job_container: self.job().container.is_some(),
                service_containers: u32::try_from(needs.services.len()).unwrap_or(u32::MAX),
                step_containers: needs.docker_steps,
            },
        };
        (request, nonce, timeout)
    }

    /// The delegate environment created at job start.
    async fn create_inner<'a>(
        &self,
        dp: &'a Plugin,
        envs: &Envs<'a>,
        base_request: &EnvironmentRequest,
    ) -> Result<Delegated<'a>, EnvError> {
        self.run.leases.take(&self.shared.backends, &dp.name, &envs.inner_id);
        let created = tokio::select! {
            r = create_delegate(dp, &envs.own.env, base_request, &envs.inner_id) => r,
            _ = self.run.cancel.cancelled() => Err(EnvError::Cancelled),
        };
        Ok(Delegated { plugin: dp, backend: dp.client(), env: created? })
    }

    /// Phase **remove**: the delegate's environment first (it goes with its parent anyway;
    /// removing one a lazy step layer never created is a no-op), then the job's.
    async fn remove(&self, envs: &Envs<'_>) {
        if let Some(d) = &envs.inner {
            self.remove_one(d.plugin, &d.env.id).await;
        }
        if let Some((dp, _)) = &envs.lazy_steps {
            self.remove_one(dp, &envs.inner_id).await;
        }
        self.remove_one(envs.own.plugin, &envs.own.env.id).await;
    }

    async fn remove_one(&self, plugin: &Plugin, env_id: &str) {
        remove_env(plugin, env_id, &|text, kind| self.log(text, kind)).await;
        self.run.leases.give_back(&self.shared.backends, env_id);
        tracing::debug!(env = env_id, plugin = %plugin.name, "environment removed");
    }

    /// Everything between create and remove: containers, setup, pre, steps, post.
    async fn in_environment(&self, envs: &Envs<'_>, needs: &Needs<'_>) -> ComboResult {
        let caps = &envs.own.plugin.capabilities;
        let delegated = |l: &LayerSupport| matches!(l, LayerSupport::Delegated { .. });
        let containers_on = match &envs.inner {
            Some(d) if delegated(&caps.job_container) || delegated(&caps.service_containers) => d,
            _ => &envs.own,
        };
        let containers = match self.containers(containers_on, envs, needs).await {
            Ok(c) => c,
            Err(e) => {
                let text = format!("on backend {:?}: {e}", containers_on.plugin.name);
                self.log(text, LineKind::RunnerError);
                return ComboResult::bare(JobEnd::failed_unless(&self.run.cancel, e).result);
            }
        };
        // Steps run in the job container where it is, else in this environment's primary.
        let steps_on = if self.job().container.is_some() { containers_on } else { &envs.own };
        let clock = JobClock::start(&self.run.cancel, envs.timeout);
        let step_host = self.step_host(envs);
        match self.setup(steps_on, containers, step_host, &clock.cancel).await {
            Ok(mut running) => {
                self.pre_and_steps(&mut running, &clock.cancel).await;
                step::run_posts(
                    &running.cx,
                    &mut running.state,
                    &mut running.contexts,
                    &clock.cancel,
                )
                .await;
                clock.stop();
                self.outputs(running, &clock)
            }
            Err(end) => {
                if let Some(message) = end.message {
                    self.log(message, LineKind::RunnerError);
                }
                ComboResult::bare(end.result)
            }
        }
    }

    /// Services and the job container, on the environment that holds those layers.
    async fn containers(
        &self,
        on: &Delegated<'_>,
        envs: &Envs<'_>,
        needs: &Needs<'_>,
    ) -> Result<Containers, String> {
        let log = |text, kind| self.log(text, kind);
        tokio::select! {
            r = create_containers(
                &on.backend,
                &on.env,
                &envs.own.env.primary_container_id,
                self.job(),
                &needs.services,
                &self.contexts,
                &envs.nonce,
                &log,
            ) => r,
            _ = self.run.cancel.cancelled() => Err("cancelled while creating containers".into()),
        }
    }

    /// Where the job's docker steps create their containers.
    fn step_host(&self, envs: &Envs<'_>) -> Option<StepContainerHost> {
        let (plugin, own) = (envs.own.plugin, &envs.own);
        let on = match (&plugin.capabilities.step_containers, &envs.inner, &envs.lazy_steps) {
            (LayerSupport::Native, _, _) => {
                Some((plugin, own.backend.clone() as Arc<dyn Backend>, own.env.clone(), None))
            }
            (LayerSupport::Delegated { .. }, Some(d), _) => {
                Some((d.plugin, d.backend.clone(), d.env.clone(), None))
            }
            (LayerSupport::Delegated { .. }, None, Some((dp, request))) => {
                let inner_env = Environment {
                    id: envs.inner_id.clone(),
                    paths: own.env.paths.clone(),
                    ..Environment::default()
                };
                let mut request = request.clone();
                request.hints.step_containers = true;
                let pending = PendingEnv::new(request);
                Some((*dp, dp.client() as Arc<dyn Backend>, inner_env, Some(pending)))
            }
            _ => None,
        };
        on.map(|(p, backend, env, pending)| StepContainerHost {
            backend,
            plugin: p.name.clone(),
            env,
            image_build: p.capabilities.features.image_build,
            pending,
        })
    }

    /// Phase **setup**: the `github`, `runner` and `job` contexts, the base environment (the
    /// primary container's own, GitHub's defaults, the run's extra variables), the workflow's
    /// and job's `env`, then the workspace copy and the probe exec.
    async fn setup(
        &self,
        on: &Delegated<'_>,
        containers: Containers,
        step_containers: Option<StepContainerHost>,
        job_cancel: &CancellationToken,
    ) -> Result<Running, JobEnd> {
        let (env, plugin) = (&on.env, on.plugin.name.as_str());
        let mut contexts = self.contexts.clone();
        let runner = runner_context(&mut contexts, self, env, plugin, &containers);
        let JobEnv { vars: extra_env, mask } = self.extra_env(plugin, env);
        let base_env =
            self.base_env(on, &containers.target, &contexts, &runner, &extra_env).await?;
        let env_ctx = self.env_context(&mut contexts, &extra_env)?;
        let path = base_env.get("PATH").cloned().unwrap_or_default();
        let setup = setup_environment(&self.shared, &on.backend, env, &containers.target, &path);
        let bash = tokio::select! {
            r = setup => r,
            _ = job_cancel.cancelled() => Err("cancelled".into()),
        }
        .map_err(|e| {
            let message = format!("setting up the environment on backend {plugin:?}: {e}");
            JobEnd::failed_unless(job_cancel, message)
        })?;
        let opts = &self.shared.opts;
        let hash_root = match self.shared.backends.get(plugin) {
            Some(p) if p.capabilities.features.local_copy => {
                Some(std::path::PathBuf::from(&env.paths.workspace))
            }
            _ => opts.workspace.clone(),
        };
        let cx = StepContext {
            shared: self.shared.clone(),
            job_name: self.name().to_owned(),
            job_id: self.run.job_id.clone(),
            backend: on.backend.clone(),
            plugin: plugin.to_owned(),
            env: env.clone(),
            container_id: containers.target,
            job_context: containers.job_context,
            base_env,
            extra_env,
            env_ctx,
            bash_available: bash,
            hash_root,
            workflow_defaults: opts.workflow.defaults.clone(),
            job_defaults: self.job().defaults.clone(),
            step_containers,
        };
        let mut state = JobProgress::new(&opts.secrets);
        for value in &mask {
            state.masker.add(value);
        }
        Ok(Running { cx, state, contexts })
    }

    /// `RunOptions::extra_env` and what the run's `JobEnvProvider`s add for this job.
    fn extra_env(&self, plugin: &str, env: &Environment) -> JobEnv {
        let opts = &self.shared.opts;
        let mut extra = JobEnv { vars: opts.extra_env.clone(), mask: Vec::new() };
        let request = JobEnvRequest {
            job_id: &self.run.job_id,
            display_name: self.name(),
            index: self.run.index,
            backend: plugin,
            environment_id: &env.id,
            github: &opts.github,
        };
        for provider in &opts.job_env {
            let JobEnv { vars, mask } = provider.job_env(&request);
            extra.vars.extend(vars);
            extra.mask.extend(mask);
        }
        extra
    }

    /// The base environment of every step: the primary container's own (from Inspect), then
    /// GitHub's default variables, then the extra variables.
    async fn base_env(
        &self,
        on: &Delegated<'_>,
        primary: &str,
        contexts: &Map<String, Value>,
        runner: &RunnerInfo,
        extra_env: &IndexMap<String, String>,
    ) -> Result<IndexMap<String, String>, JobEnd> {
        let env = &on.env;
        let status = on
            .backend
            .inspect(ContainerRef { environment_id: env.id.clone(), container_id: primary.into() })
            .await
            .map_err(|e| {
                let plugin = &on.plugin.name;
                JobEnd::failed(format!("inspecting the environment on backend {plugin:?}: {e}"))
            })?;
        let mut base_env: IndexMap<String, String> = status
            .image_env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if !base_env.contains_key("PATH") {
            base_env.insert(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            );
        }
        let github = contexts.get("github").and_then(Value::as_object);
        let gh = |k: &str| github.and_then(|g| g.get(k)).map(expr::to_string).unwrap_or_default();
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
            ("GITHUB_EVENT_PATH", gh("event_path")),
            ("GITHUB_JOB", self.run.job_id.clone()),
            ("GITHUB_RUN_ID", gh("run_id")),
            ("GITHUB_RUN_NUMBER", gh("run_number")),
            ("GITHUB_RUN_ATTEMPT", gh("run_attempt")),
            ("GITHUB_ACTOR", gh("actor")),
            ("GITHUB_WORKFLOW", gh("workflow")),
            ("GITHUB_SERVER_URL", gh("server_url")),
            ("GITHUB_API_URL", gh("api_url")),
            ("RUNNER_OS", runner.os.clone()),
            ("RUNNER_ARCH", runner.arch.clone()),
            ("RUNNER_TEMP", env.paths.temp.clone()),
        ];
        for (k, v) in defaults {
            base_env.insert(k.into(), v);
        }
        base_env.insert("RUNNER_TOOL_CACHE".into(), env.paths.tool_cache.clone());
        base_env.insert("GITHUB_GRAPHQL_URL".into(), gh("graphql_url"));
        if self.shared.opts.act_compat {
            base_env.insert("ACT".into(), "true".into());
        }
        base_env.extend(extra_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(base_env)
    }

    /// The `env` context at job level: `ACT`, the extra variables, then the workflow's and
    /// the job's `env` (expressions allowed).
    fn env_context(
        &self,
        contexts: &mut Map<String, Value>,
        extra_env: &IndexMap<String, String>,
    ) -> Result<IndexMap<String, String>, JobEnd> {
        let wf = &self.shared.opts.workflow;
        let mut env_ctx: IndexMap<String, String> = IndexMap::new();
        if self.shared.opts.act_compat {
            env_ctx.insert("ACT".into(), "true".into());
        }
        env_ctx.extend(extra_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let host = StaticHost(JobStatus::Success);
        let job_key = format!("jobs.{}.env", self.run.job_id);
        for (what, block) in [("env", &wf.env), (job_key.as_str(), &self.job().env)] {
            contexts.insert("env".into(), to_obj(&env_ctx));
            let evaluated = eval_env(block, contexts, &host)
                .map_err(|e| JobEnd::failed(format!("{}: {what}: {e}", wf.file)))?;
            env_ctx.extend(evaluated);
        }
        contexts.insert("env".into(), to_obj(&env_ctx));
        Ok(env_ctx)
    }

    /// Phases **pre** (remote actions fetched, their `pre:` steps) and **steps**.
    async fn pre_and_steps(&self, r: &mut Running, job_cancel: &CancellationToken) {
        let steps = self.job().steps.as_deref().unwrap_or(&[]);
        let set_up =
            action::run_pres(&r.cx, &mut r.state, &mut r.contexts, steps, job_cancel).await;
        if !set_up {
            if r.state.status == JobStatus::Success {
                r.state.status = JobStatus::Failure;
            }
            return;
        }
        panic_for_tests(&self.run.job_id);
        let frame = Frame::default();
        for (index, s) in steps.iter().enumerate() {
            if job_cancel.is_cancelled() && r.state.status == JobStatus::Success {
                r.state.status = JobStatus::Cancelled;
            }
            step::run_step(&r.cx, &mut r.state, &mut r.contexts, index, s, job_cancel, &frame)
                .await;
        }
    }

    /// The end of phase **post**: the time limit, the step summary, the job's outputs and
    /// result.
    fn outputs(&self, mut r: Running, clock: &JobClock) -> ComboResult {
        let timed_out = clock.timed_out();
        if timed_out {
            self.log(
                format!(
                    "the job exceeded its maximum execution time of {}",
                    crate::output::fmt_duration(clock.timeout)
                ),
                LineKind::RunnerError,
            );
            r.state.status = JobStatus::Failure;
        }
        if !r.state.summary.is_empty() {
            self.log("Step summary:".into(), LineKind::Runner);
            for line in r.state.summary.lines() {
                self.log(r.state.masker.mask(line).into_owned(), LineKind::Output);
            }
        }
        let mut outputs = Map::new();
        let host = StaticHost(r.state.status);
        r.contexts.insert("steps".into(), Value::Object(std::mem::take(&mut r.state.steps)));
        for (k, v) in &self.job().outputs {
            match expr::interpolate(v, &Scope { contexts: &r.contexts, host: &host }) {
                Ok(s) => {
                    outputs.insert(k.clone(), Value::String(s));
                }
                Err(e) => self.log(self.error(&format!("outputs.{k}"), e), LineKind::RunnerError),
            }
        }
        let result = match r.state.status {
            JobStatus::Success => Outcome::Success,
            JobStatus::Failure => Outcome::Failure,
            JobStatus::Cancelled if timed_out => Outcome::Failure,
            JobStatus::Cancelled => Outcome::Cancelled,
        };
        ComboResult { result, outputs }
    }
}

/// A job's cancellation: the scheduler's token (fail-fast, Ctrl-C) or its time limit. The
/// timer stops when the clock is dropped.
struct JobClock {
    cancel: CancellationToken,
    timeout: Duration,
    timed_out: Arc<AtomicBool>,
    timer: tokio::task::JoinHandle<()>,
}

impl JobClock {
    fn start(parent: &CancellationToken, timeout: Duration) -> JobClock {
        let cancel = parent.child_token();
        let timed_out = Arc::new(AtomicBool::new(false));
        let timer = {
            let (cancel, timed_out) = (cancel.clone(), timed_out.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(timeout) => {
                        timed_out.store(true, Ordering::SeqCst);
                        cancel.cancel();
                    }
                    _ = cancel.cancelled() => {}
                }
            })
        };
        JobClock { cancel, timeout, timed_out, timer }
    }

    fn stop(&self) {
        self.timer.abort();
    }

    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }
}

impl Drop for JobClock {
    fn drop(&mut self) {
        self.timer.abort();
    }
}

/// `runner.os` and `runner.arch` as GitHub spells them.
struct RunnerInfo {
    os: String,
    arch: String,
}

/// Puts the per-job `github` keys, the `runner` context and the `job` context in `contexts`.
fn runner_context(
    contexts: &mut Map<String, Value>,
    job: &JobCx,
    env: &Environment,
    plugin: &str,
    containers: &Containers,
) -> RunnerInfo {
    let mut github = job.shared.opts.github.clone();
    github.insert("job".into(), job.run.job_id.clone().into());
    github.insert("workspace".into(), env.paths.workspace.clone().into());
    github.insert("action".into(), "".into());
    let event_path = format!("{}/event.json", env.paths.runner_files.trim_end_matches('/'));
    github.insert("event_path".into(), event_path.into());
    contexts.insert("github".into(), Value::Object(github));
    let os = match env.os.as_str() {
        "linux" => "Linux",
        "darwin" => "macOS",
        "windows" => "Windows",
        other => other,
    }
    .to_owned();
    let arch = match env.arch.as_str() {
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
            "os": os,
            "arch": arch,
            "temp": env.paths.temp,
            "tool_cache": env.paths.tool_cache,
            "debug": "",
            "environment": "self-hosted",
        }),
    );
    contexts.insert(
        "job".into(),
        json!({
            "status": "success",
            "container": containers.job_context.get("container"),
            "services": containers.job_context.get("services"),
        }),
    );
    RunnerInfo { os, arch }
}

/// A test hook (debug builds only): `KILN_TEST_PANIC_IN_JOB=<job id>` makes that job's task
/// panic on the runner's side after setup, so the tests can show a panicking job is reported
/// failed and its environment removed.
fn panic_for_tests(job_id: &str) {
    if cfg!(debug_assertions)
        && std::env::var("KILN_TEST_PANIC_IN_JOB").is_ok_and(|j| !j.is_empty() && j == job_id)
    {
        panic!("KILN_TEST_PANIC_IN_JOB: job {job_id} panics on purpose");
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

/// Copies the workspace in and, at the same time, runs one probe exec that also writes the
/// event file. Returns whether `bash` is on the environment's PATH.
async fn setup_environment(
    shared: &Arc<Shared>,
    backend: &Arc<dyn Backend>,
    env: &Environment,
    container: &str,
    path: &str,
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
    let ((), bash) = tokio::try_join!(copy, probe_shell(shared, backend, env, container, path))?;
    Ok(bash)
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
        exec_id: exec_id(),
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
