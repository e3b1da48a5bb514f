//! The job's `container:` and `services:`: container specs from the workflow (expressions
//! evaluated), services started and waited on until healthy, the job container kept alive for
//! the job's execs, and what the `job` context says about them. Below `job`.

use std::sync::Arc;
use std::time::Duration;

use kiln_plugin_sdk::{
    Backend, ContainerKind, ContainerRef, ContainerRequest, ContainerSpec, ContainerState,
    Environment, Health, RegistryCredentials,
};
use serde_json::{Map, Value, json};

use super::context::StaticHost;
use super::state::eval_env;
use crate::expr::{self, JobStatus, Scope};
use crate::output::LineKind;
use crate::workflow::Job;

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
pub(crate) async fn create_containers(
    backend: &Arc<dyn Backend>,
    env: &Environment,
    primary: &str,
    job: &Job,
    services: &[String],
    contexts: &Map<String, Value>,
    nonce: &str,
    log: &impl Fn(String, LineKind),
) -> Result<Containers, String> {
    let host = StaticHost(JobStatus::Success);
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
        cmd: c.cmd.iter().map(|v| text(v)).collect::<Result<_, _>>()?,
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
