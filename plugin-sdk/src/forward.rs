//! A forwarding backend for "machine" plugins: plugins whose environment is a whole machine (a
//! VM, a remote host, a cloud instance) with an agent inside that serves the job layer.
//!
//! A machine plugin implements [`Machine`]: provision a machine for an environment and return a
//! [`Backend`] that reaches its agent (usually a [`crate::client::GrpcBackend`] over mutual
//! TLS to `kiln plugin host` running on the machine), destroy it, list what exists.
//! [`ForwardingBackend`] turns that into a whole [`Backend`]:
//!
//! - `CreateExecutionEnvironment` provisions the machine, then creates the environment on the
//!   agent with the same id and owner (so the agent's records carry the owner labels too), and
//!   adds the machine's [`Provisioned::delegation_options`] to the agent's delegation (e.g. the
//!   machine's Docker endpoint, so the container layers run inside the machine). A replay with
//!   the same id is the machine plugin's to recognise ([`Machine::provision`] is idempotent:
//!   same spec, the running machine; another spec, ALREADY_EXISTS), and the agent then answers
//!   it as any plugin does. Creations of one id are serialised. A failure after a fresh
//!   machine exists destroys it: never a half-created environment.
//! - Inspect, Exec, SignalExec, WriteStdin, CopyIn, CopyOut and the container RPCs are routed
//!   by environment id (SignalExec and WriteStdin by the exec id, remembered until the
//!   environment is removed; an exec id never seen is NOT_FOUND) and forwarded unchanged.
//! - Remove of an environment removes it on the agent (best effort, bounded), then destroys
//!   the machine; Remove of a container is forwarded.
//! - ListEnvironments is the machine plugin's own listing (its records outlive the agent).
//!
//! A restarted machine plugin finds the agents of machines that still run through
//! [`Machine::reconnect`], called for an environment id it has no route for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::backend::{
    Backend, ByteStream, Capabilities, CapabilitiesRequest, Container, ContainerKind, ContainerRef,
    ContainerRequest, ContainerStatus, CopyInTarget, CopyOutSource, CopyStats, Environment,
    EnvironmentRequest, EnvironmentSummary, ExecRequest, ExecStream, RemoveRequest, Selector,
    SignalRequest,
};
use crate::error::{Error, Result};

/// How long removing the environment on a machine's agent may take before the machine is
/// destroyed anyway (everything in it goes with it).
pub const AGENT_REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A machine provisioned for one environment.
pub struct Provisioned {
    /// Reaches the machine's agent.
    pub agent: Arc<dyn Backend>,
    /// The request to create the environment with on the agent (usually the caller's, with
    /// the machine plugin's own options taken out).
    pub agent_request: EnvironmentRequest,
    /// Options added to the agent's `Environment.delegation` (e.g. `docker_host`).
    pub delegation_options: serde_json::Map<String, serde_json::Value>,
    /// Whether the machine was made by this call (a failure then destroys it) rather than
    /// found (a replay).
    pub fresh: bool,
}

/// What a machine plugin implements; [`ForwardingBackend`] does the rest.
#[async_trait::async_trait]
pub trait Machine: Send + Sync + 'static {
    /// The plugin's capabilities (the job layer's features are the agent's, minus what a
    /// remote machine cannot do, such as `local_copy`).
    async fn capabilities(&self, request: CapabilitiesRequest) -> Result<Capabilities>;

    /// Validates the request's options and provisions a machine for it, waiting until its
    /// agent answers. On error nothing may be left behind. Idempotent: when the environment's
    /// machine exists with the same spec it is returned (`fresh: false`) without booting
    /// another; with another spec the error is ALREADY_EXISTS.
    async fn provision(&self, request: &EnvironmentRequest) -> Result<Provisioned>;

    /// The agent of a machine provisioned earlier (by this or a previous plugin process)
    /// that still runs; `None` when there is no such machine.
    async fn reconnect(&self, environment_id: &str) -> Result<Option<Arc<dyn Backend>>>;

    /// Shuts the machine down and deletes everything it had. Idempotent: returns whether
    /// something was there.
    async fn destroy(&self, environment_id: &str, grace: Duration) -> Result<bool>;

    /// The environments whose machines exist, with their owners.
    async fn list(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>>;
}

/// A [`Backend`] made of a [`Machine`] and the agents of its machines.
pub struct ForwardingBackend<M> {
    machine: Arc<M>,
    routes: Mutex<HashMap<String, Arc<dyn Backend>>>,
    /// Exec id → environment id, until the environment is removed.
    execs: Mutex<HashMap<String, String>>,
    /// One creation at a time per environment id.
    creating: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: Machine> ForwardingBackend<M> {
    /// Forwards to the agents of `machine`'s machines.
    pub fn new(machine: M) -> ForwardingBackend<M> {
        ForwardingBackend {
            machine: Arc::new(machine),
            routes: Mutex::default(),
            execs: Mutex::default(),
            creating: Mutex::default(),
        }
    }

    /// Forwards to the agents of `machine`'s machines (a machine the caller shares).
    pub fn from_arc(machine: Arc<M>) -> ForwardingBackend<M> {
        ForwardingBackend {
            machine,
            routes: Mutex::default(),
            execs: Mutex::default(),
            creating: Mutex::default(),
        }
    }

    /// The machine plugin.
    pub fn machine(&self) -> &M {
        &self.machine
    }

    /// The agent of environment `id`: known, or found again by [`Machine::reconnect`].
    async fn agent(&self, id: &str) -> Result<Arc<dyn Backend>> {
        if let Some(agent) = lock(&self.routes).get(id) {
            return Ok(Arc::clone(agent));
        }
        match self.machine.reconnect(id).await? {
            Some(agent) => {
                lock(&self.routes).insert(id.to_owned(), Arc::clone(&agent));
                Ok(agent)
            }
            None => Err(Error::not_found(format!("environment {id:?} does not exist"))
                .field("environment_id")),
        }
    }

    fn exec_env(&self, exec_id: &str) -> Option<String> {
        lock(&self.execs).get(exec_id).cloned()
    }
}

#[async_trait::async_trait]
impl<M: Machine> Backend for ForwardingBackend<M> {
    async fn capabilities(&self, request: CapabilitiesRequest) -> Result<Capabilities> {
        self.machine.capabilities(request).await
    }

    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        crate::ids::validate_id(&request.environment_id, "environment_id")?;
        let id = request.environment_id.clone();
        let gate = Arc::clone(lock(&self.creating).entry(id.clone()).or_default());
        let _held = gate.lock().await;
        // provision() is idempotent: an existing machine with the same spec is answered
        // with its agent, another spec is ALREADY_EXISTS.
        let p = self.machine.provision(&request).await?;
        match p.agent.create_environment(p.agent_request.clone()).await {
            Ok(mut env) => {
                add_delegation(&mut env, p.delegation_options);
                lock(&self.routes).insert(id.clone(), p.agent);
                lock(&self.creating).remove(&id);
                Ok(env)
            }
            Err(e) if p.fresh => {
                if let Err(d) = self.machine.destroy(&id, Duration::ZERO).await {
                    tracing::warn!(env = %id, error = %d, "destroying the machine of a failed create");
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn create_container(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        self.agent(&request.environment_id).await?.create_container(kind, request).await
    }

    async fn start_container(&self, target: ContainerRef) -> Result<Container> {
        self.agent(&target.environment_id).await?.start_container(target).await
    }

    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        self.agent(&target.environment_id).await?.inspect(target).await
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        let agent = self.agent(&request.environment_id).await?;
        // The route stays for the environment's lifetime: a signal to an exec that ended is
        // the agent's to answer (false), an id reused while running its to refuse.
        lock(&self.execs)
            .entry(request.exec_id.clone())
            .or_insert_with(|| request.environment_id.clone());
        agent.exec(request).await
    }

    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        let Some(env) = self.exec_env(&request.exec_id) else {
            return Err(Error::not_found(format!("exec {:?} does not exist", request.exec_id))
                .field("exec_id"));
        };
        self.agent(&env).await?.signal_exec(request).await
    }

    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        let Some(env) = self.exec_env(&exec_id) else {
            return Err(
                Error::not_found(format!("exec {exec_id:?} is not running")).field("exec_id")
            );
        };
        self.agent(&env).await?.write_stdin(exec_id, data).await
    }

    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        self.agent(&target.environment_id).await?.copy_in(target, data).await
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        self.agent(&source.environment_id).await?.copy_out(source).await
    }

    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let id = request.environment_id.clone();
        crate::ids::validate_id(&id, "environment_id")?;
        if request.container_id.is_some() {
            return match self.agent(&id).await {
                Ok(agent) => agent.remove(request).await,
                Err(e) if e.code == crate::Code::NotFound => Ok(false),
                Err(e) => Err(e),
            };
        }
        let agent = lock(&self.routes).remove(&id);
        lock(&self.execs).retain(|_, env| *env != id);
        let agent = match agent {
            Some(a) => Some(a),
            None => self.machine.reconnect(&id).await.unwrap_or(None),
        };
        if let Some(agent) = agent {
            // Processes in the machine are stopped with it; this is for what the agent keeps
            // outside of it (nothing, for a VM) and for a clean log. Bounded.
            match tokio::time::timeout(AGENT_REMOVE_TIMEOUT, agent.remove(request.clone())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(env = %id, error = %e, "agent remove failed"),
                Err(_) => tracing::warn!(env = %id, "agent remove timed out"),
            }
        }
        self.machine.destroy(&id, request.grace).await
    }

    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        self.machine.list(selector).await
    }
}

fn add_delegation(env: &mut Environment, options: serde_json::Map<String, serde_json::Value>) {
    if let Some(d) = env.delegation.as_mut() {
        d.options.extend(options);
    }
}
