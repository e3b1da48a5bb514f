//! [`DockerBackend`]: environments, containers, inspection, removal and listing on a Docker
//! engine. Exec lives in `exec`, copies in `copy`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, EndpointSettings, HealthStatusEnum, HostConfig,
    NetworkCreateRequest, NetworkingConfig, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectNetworkOptions, ListContainersOptions,
    ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
};
use futures::StreamExt;
use kiln_plugin_sdk::ids::validate_id;
use kiln_plugin_sdk::{
    Backend, Capabilities, CapabilitiesRequest, Container, ContainerKind, ContainerRef,
    ContainerRequest, ContainerSpec, ContainerState, ContainerStatus, CopyInTarget, CopyOutSource,
    CopyStats, Environment, EnvironmentRequest, EnvironmentSummary, Error, ExecRequest, ExecStream,
    Fault, Features, Health, LayerSupport, Owner, PROTOCOL_VERSION, Paths, PortBinding,
    RemoveRequest, Result, Selector, SignalRequest,
};

use crate::engines::{Engine, Engines};
use crate::exec::ExecHandle;
use crate::labels::{self, PRIMARY};
use crate::{DockerConfig, lock, spec};

/// Where the environment's host directory is mounted in its containers.
pub(crate) const KILN_MOUNT: &str = "/__kiln";
/// `paths.workspace`: the workspace volume's mount point.
pub(crate) const WORKSPACE: &str = "/github/workspace";
const RUNNER_FILES: &str = "/__kiln/runner";
const TEMP: &str = "/__kiln/temp";
const TOOL_CACHE: &str = "/__kiln/tool-cache";
/// Subdirectories of the host directory, created 0777 so that an image's non-root user can
/// write them.
const HOST_DIRS: &[&str] = &["runner", "temp", "tool-cache", "execs"];
/// The subdirectory of the host directory that is the workspace (on an engine sharing the
/// plugin's files), mounted at [`WORKSPACE`].
pub(crate) const HOST_WORKSPACE: &str = "workspace";
/// The keep-alive main process of primary containers: needs only `sh` and `sleep`.
const KEEPALIVE: &str = "trap 'exit 0' TERM; while :; do sleep 86400 & wait $!; done";

/// The Docker backend.
#[derive(Clone)]
pub struct DockerBackend {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The plugin's own engine and those environments name (option `docker_host`).
    pub(crate) engines: Engines,
    /// The path of the plugin's own engine's unix socket, when `--mount-docker-socket`.
    socket: Option<String>,
    pub(crate) state_dir: PathBuf,
    config: DockerConfig,
    /// The plugin runs as root: it can delete whatever containers write into `/__kiln`.
    is_root: bool,
    /// Environments being created on each endpoint other than the plugin's own (an endpoint
    /// is not forgotten while one is).
    creating: Mutex<HashMap<String, usize>>,
    envs: Mutex<HashMap<String, Arc<EnvInfo>>>,
    /// Environments being removed: new execs there are NOT_FOUND.
    removing: Mutex<HashSet<String>>,
    /// Every exec id used by this plugin process.
    pub(crate) exec_ids: Mutex<HashSet<String>>,
    pub(crate) execs: Mutex<HashMap<String, Arc<ExecHandle>>>,
    /// Step containers whose creation waits for their start, by engine name (see
    /// [`DockerBackend::materialize`]).
    pending_steps: Mutex<HashMap<String, PendingStep>>,
    /// Engine names of containers found to belong to their environment: an exec there needs
    /// no inspect first (the engine's answer to a container inspect lists every exec id the
    /// container ever had, so it grows with each step of a long job).
    verified: Mutex<HashSet<String>>,
    /// When each container was first seen `starting` (see [`crate::compat::overdue_health`]).
    starting_since: Mutex<HashMap<String, std::time::Instant>>,
}

/// What the plugin knows about an environment (all of it also in the network's labels).
#[derive(Debug)]
pub(crate) struct EnvInfo {
    pub(crate) id: String,
    pub(crate) owner: Owner,
    pub(crate) spec_hash: String,
    pub(crate) has_primary: bool,
    /// The engine the environment lives on.
    pub(crate) engine: Arc<Engine>,
    /// The host directory bind-mounted at [`KILN_MOUNT`] (when the engine shares the
    /// plugin's filesystem; else `/__kiln` is the volume [`labels::kiln_volume`]).
    pub(crate) dir: PathBuf,
    /// Option `host_dir` (a delegate environment): a host directory mounted at the same path.
    pub(crate) host_dir: Option<PathBuf>,
    /// The workspace is `dir/workspace` on the host (bind-mounted at [`WORKSPACE`]), not the
    /// workspace volume: copies into it are extracted by the plugin, without the engine.
    pub(crate) workspace_on_host: bool,
}

/// A step container asked for and not created yet: a step container's env is only known when
/// its main process starts (the exec's env), and the engine cannot add env to a container, so
/// creating it then saves creating it twice.
struct PendingStep {
    env_id: String,
    spec_hash: String,
    body: ContainerCreateBody,
}

/// The options of an environment request.
#[derive(Debug, Default)]
struct EnvOptions {
    image: Option<String>,
    host_dir: Option<String>,
    docker_host: Option<String>,
    docker_tls_dir: Option<PathBuf>,
}

impl std::fmt::Debug for DockerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerBackend").field("state_dir", &self.inner.state_dir).finish()
    }
}

/// Maps an engine error to the protocol's codes; `what` says what was being done.
pub(crate) fn docker_err(what: impl std::fmt::Display, e: bollard::errors::Error) -> Error {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError { status_code, message } => {
            let msg = format!("{what}: {}", message.trim());
            match status_code {
                404 => Error::not_found(msg),
                409 => Error::failed_precondition(msg),
                400 => Error::invalid_argument(msg),
                403 => Error::permission_denied(msg),
                _ => Error::internal(msg),
            }
        }
        E::DockerContainerWaitError { error, code } => {
            Error::internal(format!("{what}: the container ended with {code}: {error}"))
        }
        other => Error::unavailable(format!(
            "{what}: the docker daemon is not reachable ({other}); check that dockerd runs and \
             --docker-host"
        )),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

fn is_conflict(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 409, .. })
}

impl DockerBackend {
    /// Connects to the daemon (negotiating the API version) and prepares the state directory.
    pub async fn connect(config: DockerConfig) -> anyhow::Result<DockerBackend> {
        let engine = Engine::connect(
            config.docker_host.as_deref(),
            config.tls_dir.as_deref(),
            !config.remote_daemon,
        )
        .await?;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let state_dir = std::fs::canonicalize(&config.state_dir)
            .with_context(|| format!("resolving {}", config.state_dir.display()))?;
        kiln_plugin_sdk::dirs::spread_subdirectories(&state_dir);
        let socket = if config.mount_docker_socket {
            let endpoint = config
                .docker_host
                .clone()
                .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
                .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned());
            let Some(path) = endpoint
                .strip_prefix("unix://")
                .or_else(|| endpoint.starts_with('/').then_some(endpoint.as_str()))
            else {
                anyhow::bail!(
                    "--mount-docker-socket: the engine {endpoint:?} is not a unix socket, so it \
                     cannot be mounted into job containers"
                );
            };
            Some(path.to_owned())
        } else {
            None
        };
        if !config.container_options.trim().is_empty() {
            // Held to the policy at startup, so a bad option is an error before any job.
            let policy = spec::Policy {
                valid_volumes: &config.valid_volumes,
                allowed_options: &config.allowed_options,
            };
            let probe = ContainerSpec {
                options: config.container_options.clone(),
                ..ContainerSpec::default()
            };
            spec::parse("startup", &probe, &policy)
                .map_err(|e| anyhow::anyhow!("--container-options: {e}"))?;
        }
        Ok(DockerBackend {
            inner: Arc::new(Inner {
                socket,
                engines: Engines::new(engine, &state_dir, config.tls_dir.clone()),
                state_dir,
                config,
                is_root: nix::unistd::geteuid().is_root(),
                creating: Mutex::new(HashMap::new()),
                envs: Mutex::new(HashMap::new()),
                removing: Mutex::new(HashSet::new()),
                exec_ids: Mutex::new(HashSet::new()),
                execs: Mutex::new(HashMap::new()),
                pending_steps: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashSet::new()),
                starting_since: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The (canonical) directory of per-environment host files.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The client of the plugin's own engine.
    pub fn docker(&self) -> &Docker {
        &self.inner.engines.default.docker
    }

    fn caps(&self) -> Capabilities {
        Capabilities {
            plugin_name: "docker".to_owned(),
            plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            instance_id: String::new(),
            environment: LayerSupport::Native,
            job_container: LayerSupport::Native,
            service_containers: LayerSupport::Native,
            step_containers: LayerSupport::Native,
            features: Features {
                stdin: true,
                tty: false,
                local_copy: false,
                image_build: true,
                exec_files: true,
                exec_timeout: true,
                health: true,
            },
            os: self.inner.engines.default.os.clone(),
            arch: self.inner.engines.default.arch.clone(),
            max_message_bytes: 0,
        }
    }

    fn environment(&self, info: &EnvInfo) -> Environment {
        Environment {
            id: info.id.clone(),
            primary_container_id: if info.has_primary { PRIMARY.to_owned() } else { String::new() },
            os: info.engine.os.clone(),
            arch: info.engine.arch.clone(),
            paths: Paths {
                workspace: WORKSPACE.to_owned(),
                temp: TEMP.to_owned(),
                tool_cache: TOOL_CACHE.to_owned(),
                runner_files: RUNNER_FILES.to_owned(),
                home: String::new(),
            },
            path_variable: "PATH".to_owned(),
            path_separator: ":".to_owned(),
            delegation: None,
            owner: info.owner.clone(),
        }
    }

    /// The environment `id` from memory or the engines (its workspace volume's labels): the
    /// plugin's own engine first, then every reachable endpoint of the endpoints file.
    pub(crate) async fn find_env(&self, id: &str) -> Result<Option<Arc<EnvInfo>>> {
        if let Some(e) = lock(&self.inner.envs).get(id) {
            return Ok(Some(Arc::clone(e)));
        }
        let engines = &self.inner.engines;
        if let Some(info) = self.find_env_on(&engines.default, id).await? {
            return Ok(Some(info));
        }
        if engines.endpoints().is_empty() {
            return Ok(None);
        }
        for engine in engines.reachable().await.into_iter().skip(1) {
            if let Some(info) = self.find_env_on(&engine, id).await? {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    /// The environment `id` on one engine.
    async fn find_env_on(&self, engine: &Arc<Engine>, id: &str) -> Result<Option<Arc<EnvInfo>>> {
        let record = match engine.docker.inspect_volume(&labels::workspace_volume(id)).await {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(docker_err(format!("inspecting environment {id:?}"), e)),
        };
        let l = record.labels;
        if l.get(labels::ENVIRONMENT_ID).map(String::as_str) != Some(id)
            || l.get(labels::ROLE).map(String::as_str) != Some("environment")
        {
            return Ok(None);
        }
        // The same daemon may be reachable under two names (its socket, and tcp): the
        // environment belongs to the endpoint it was created through, when that answers.
        let mut engine = Arc::clone(engine);
        if let Some(named) = l.get(labels::DOCKER_HOST).filter(|h| **h != engine.endpoint)
            && self.docker_host_allowed(named)
            && let Ok(Ok(other)) = tokio::time::timeout(
                crate::engines::LIST_TIMEOUT,
                self.inner.engines.get(named, None),
            )
            .await
        {
            engine = other;
        }
        let info = Arc::new(EnvInfo {
            id: id.to_owned(),
            owner: labels::owner_from(&l),
            spec_hash: l.get(labels::SPEC_HASH).cloned().unwrap_or_default(),
            has_primary: l.get(labels::KIND).map(String::as_str) == Some("with-primary"),
            dir: self.inner.state_dir.join(id),
            host_dir: l.get(labels::HOST_DIR).filter(|d| !d.is_empty()).map(PathBuf::from),
            workspace_on_host: engine.shares_fs
                && l.get(labels::WORKSPACE).map(String::as_str) == Some("host"),
            engine,
        });
        lock(&self.inner.envs).insert(id.to_owned(), Arc::clone(&info));
        Ok(Some(info))
    }

    /// A live environment, or NOT_FOUND.
    pub(crate) async fn live_env(&self, id: &str) -> Result<Arc<EnvInfo>> {
        validate_id(id, "environment_id")?;
        if lock(&self.inner.removing).contains(id) {
            return Err(Error::not_found(format!("environment {id:?} is being removed"))
                .field("environment_id"));
        }
        self.find_env(id).await?.ok_or_else(|| {
            Error::not_found(format!("environment {id:?} does not exist")).field("environment_id")
        })
    }

    /// The engine name of a container of a live environment, after checking it exists there.
    pub(crate) async fn container(
        &self,
        env: &EnvInfo,
        container_id: &str,
    ) -> Result<(String, bollard::models::ContainerInspectResponse)> {
        validate_id(container_id, "container_id")?;
        self.materialize(env, container_id, &[]).await?;
        let name = labels::container_name(&env.id, container_id);
        match crate::compat::inspect_container(&env.engine.docker, &name).await {
            Ok(c) => {
                let owner = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.as_ref())
                    .and_then(|l| l.get(labels::ENVIRONMENT_ID).cloned());
                if owner.as_deref() != Some(env.id.as_str()) {
                    return Err(self.no_container(env, container_id));
                }
                lock(&self.inner.verified).insert(name.clone());
                Ok((name, c))
            }
            Err(e) if is_not_found(&e) => Err(self.no_container(env, container_id)),
            Err(e) => Err(docker_err(format!("inspecting container {container_id:?}"), e)),
        }
    }

    /// The engine name of a container already found in `env` (see `Inner::verified`).
    pub(crate) fn verified(&self, env: &EnvInfo, container_id: &str) -> Option<String> {
        let name = labels::container_name(&env.id, container_id);
        lock(&self.inner.verified).contains(&name).then_some(name)
    }

    /// Creates a pending step container (see [`PendingStep`]) with `extra` added to its env;
    /// says whether there was one.
    pub(crate) async fn materialize(
        &self,
        env: &EnvInfo,
        container_id: &str,
        extra: &[kiln_plugin_sdk::EnvVar],
    ) -> Result<bool> {
        let name = labels::container_name(&env.id, container_id);
        let Some(p) = lock(&self.inner.pending_steps).remove(&name) else { return Ok(false) };
        let mut body = p.body;
        if !extra.is_empty() {
            let mut vars = body.env.take().unwrap_or_default();
            for v in extra {
                vars.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(v.name.as_str()));
                vars.push(format!("{}={}", v.name, v.value));
            }
            body.env = Some(vars);
        }
        let image = body.image.clone().unwrap_or_default();
        let options = CreateContainerOptions { name: Some(name), ..Default::default() };
        env.engine
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| docker_err(format!("creating step container from image {image:?}"), e))?;
        Ok(true)
    }

    fn no_container(&self, env: &EnvInfo, container_id: &str) -> Error {
        Error::not_found(format!(
            "container {container_id:?} does not exist in environment {:?}",
            env.id
        ))
        .field("container_id")
    }

    /// With `--copy-missing-images`, copies `image` from the plugin's own engine to `engine`
    /// (another one) when the own engine has it: the engine API's export streamed into its
    /// load. Returns whether it was copied.
    async fn copy_from_own_engine(&self, engine: &Engine, image: &str) -> Result<bool> {
        let own = &self.inner.engines.default;
        if !self.inner.config.copy_missing_images || engine.endpoint.is_empty() {
            return Ok(false);
        }
        if own.docker.inspect_image(image).await.is_err() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let export = own.docker.export_image(image);
        let options =
            bollard::query_parameters::ImportImageOptionsBuilder::default().quiet(true).build();
        let mut load = engine.docker.import_image_stream(options, export, None);
        while let Some(item) = load.next().await {
            let info = item.map_err(|e| {
                docker_err(format!("copying image {image:?} to {}", engine.endpoint), e)
            })?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(Error::unavailable(format!(
                    "copying image {image:?} to {}: {detail}",
                    engine.endpoint
                )));
            }
        }
        tracing::info!(%image, to = %engine.endpoint, ms = started.elapsed().as_millis() as u64, "image copied from the plugin's engine");
        Ok(true)
    }

    /// Makes sure `image` is present: pulled when missing or when `force`.
    async fn ensure_image(
        &self,
        engine: &Engine,
        image: &str,
        force: bool,
        credentials: Option<&kiln_plugin_sdk::RegistryCredentials>,
        field: &str,
    ) -> Result<()> {
        let docker = &engine.docker;
        let present = match docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e)
                if matches!(
                    e,
                    bollard::errors::Error::DockerResponseServerError { status_code: 400, .. }
                ) =>
            {
                return Err(Error::invalid_argument(format!(
                    "image {image:?} is not a valid image reference: {e}"
                ))
                .field(field));
            }
            Err(e) => return Err(docker_err(format!("inspecting image {image:?}"), e)),
        };
        if present && !force {
            return Ok(());
        }
        if !present && self.copy_from_own_engine(engine, image).await? {
            return Ok(());
        }
        tracing::info!(%image, "pulling image");
        let auth = credentials.map(|c| bollard::auth::DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.clone()),
            ..Default::default()
        });
        let options =
            CreateImageOptions { from_image: Some(image.to_owned()), ..Default::default() };
        let mut pull = docker.create_image(Some(options), None, auth);
        let mut failure = None;
        while let Some(item) = pull.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                        failure = Some(detail);
                    }
                }
                Err(e) => {
                    failure = Some(match e {
                        bollard::errors::Error::DockerResponseServerError { message, .. } => {
                            message
                        }
                        other => other.to_string(),
                    });
                    break;
                }
            }
        }
        let Some(why) = failure else { return Ok(()) };
        if present {
            tracing::warn!(%image, error = %why, "pull failed; using the local image");
            return Ok(());
        }
        let lower = why.to_ascii_lowercase();
        let unresolved = ["not found", "manifest unknown", "does not exist", "invalid reference"]
            .iter()
            .any(|s| lower.contains(s));
        let message = format!(
            "image {image:?} is not present on the docker daemon and pulling it failed: {}; \
             build or load it locally (docker build -t {image} …, docker load), or make its \
             registry reachable",
            why.trim()
        );
        if lower.contains("unauthorized") || lower.contains("denied") {
            return Err(Error::permission_denied(message).field(field));
        }
        if unresolved {
            return Err(Error::invalid_argument(message).field(field));
        }
        Err(Error::unavailable(message).fault(Fault::User).retryable(false).field(field))
    }

    /// Creates the host directory of an environment.
    fn make_host_dir(dir: &Path) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), &e))?;
        for sub in HOST_DIRS.iter().chain([&HOST_WORKSPACE]) {
            let d = dir.join(sub);
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(&d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), &e))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| Error::io(format!("opening up {}", d.display()), &e))?;
        }
        Ok(())
    }

    /// Mounts every container of the environment gets (`mount_workspace` and the primary).
    pub(crate) fn env_binds(env: &EnvInfo) -> Vec<String> {
        let kiln = if env.engine.shares_fs {
            env.dir.display().to_string()
        } else {
            labels::kiln_volume(&env.id)
        };
        let workspace = if env.workspace_on_host {
            env.dir.join(HOST_WORKSPACE).display().to_string()
        } else {
            labels::workspace_volume(&env.id)
        };
        let mut binds = vec![format!("{workspace}:{WORKSPACE}"), format!("{kiln}:{KILN_MOUNT}")];
        if let Some(d) = &env.host_dir {
            binds.push(format!("{0}:{0}", d.display()));
        }
        binds
    }

    async fn network_exists(&self, env: &EnvInfo) -> Result<bool> {
        match env
            .engine
            .docker
            .inspect_network(&labels::network_name(&env.id), None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(docker_err("inspecting the environment's network", e)),
        }
    }

    /// The configured network (`--network`) for an environment on the plugin's own engine.
    fn configured_network(&self, env: &EnvInfo) -> Option<&str> {
        self.inner.config.network.as_deref().filter(|_| env.engine.endpoint.is_empty())
    }

    /// The engine socket to bind at /var/run/docker.sock in a job or step container
    /// (`--mount-docker-socket`), for environments on the plugin's own engine.
    fn socket_to_mount(&self, env: &EnvInfo, kind: ContainerKind) -> Option<String> {
        if !self.inner.config.mount_docker_socket
            || kind == ContainerKind::Service
            || !env.engine.endpoint.is_empty()
        {
            return None;
        }
        self.inner.socket.clone()
    }

    /// Creates the environment's network when missing and connects the primary container to
    /// it, so inner containers and the primary reach each other by name.
    pub(crate) async fn ensure_network(&self, env: &EnvInfo) -> Result<String> {
        // A configured network (host, bridge or a named one) is used as it is, on the
        // plugin's own engine; environments on other engines get their own network.
        if let Some(net) = self.configured_network(env) {
            return Ok(net.to_owned());
        }
        let name = labels::network_name(&env.id);
        if self.network_exists(env).await? {
            return Ok(name);
        }
        let docker = &env.engine.docker;
        let create = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            enable_ipv6: self.inner.config.enable_ipv6.then_some(true),
            labels: Some(labels::owner_labels(&env.id, &env.owner, &env.spec_hash)),
            ..Default::default()
        };
        match docker.create_network(create).await {
            Ok(_) => {}
            Err(e) if is_conflict(&e) => return Ok(name),
            Err(e) => return Err(docker_err(format!("creating the network of {:?}", env.id), e)),
        }
        if env.has_primary {
            let connect = bollard::models::NetworkConnectRequest {
                container: labels::container_name(&env.id, PRIMARY),
                ..Default::default()
            };
            match docker.connect_network(&name, connect).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                    if message.contains("already exists") => {}
                Err(e) => {
                    return Err(docker_err("connecting the primary container to the network", e));
                }
            }
        }
        Ok(name)
    }

    /// Creates and starts the primary container (replays find it and make sure it runs).
    async fn ensure_primary(
        &self,
        env: &EnvInfo,
        image: &str,
        base_labels: &HashMap<String, String>,
    ) -> Result<()> {
        let docker = &env.engine.docker;
        let name = labels::container_name(&env.id, PRIMARY);
        let exists = match crate::compat::inspect_container(docker, &name).await {
            Ok(c) => Some(c.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(docker_err("inspecting the primary container", e)),
        };
        if exists.is_none() {
            let mut l = base_labels.clone();
            l.insert(labels::CONTAINER_ID.to_owned(), PRIMARY.to_owned());
            l.insert(labels::KIND.to_owned(), "primary".to_owned());
            // On the environment's network when it has one, else on the default bridge (the
            // network is created, and the primary connected to it, with the first inner
            // container).
            let net = if let Some(net) = self.configured_network(env) {
                Some(net.to_owned())
            } else if self.network_exists(env).await? {
                Some(labels::network_name(&env.id))
            } else {
                // The engine's default network ("bridge" on Docker, "podman" on Podman).
                None
            };
            // The primary is the job's container (a `docker://` label): the configured
            // options, privileges and engine socket apply to it as to a job container.
            let config = &self.inner.config;
            let mut parsed = if config.container_options.trim().is_empty() {
                spec::Parsed::default()
            } else {
                let policy = spec::Policy {
                    valid_volumes: &config.valid_volumes,
                    allowed_options: &config.allowed_options,
                };
                let probe = ContainerSpec {
                    options: config.container_options.clone(),
                    ..ContainerSpec::default()
                };
                spec::parse(&env.id, &probe, &policy)?
            };
            let mut binds = Self::env_binds(env);
            binds.extend(parsed.host.binds.take().unwrap_or_default());
            if let Some(socket) = self.socket_to_mount(env, ContainerKind::Job) {
                binds.push(format!("{socket}:/var/run/docker.sock"));
            }
            let mut env_vars = parsed.env;
            env_vars.sort();
            let body = ContainerCreateBody {
                image: Some(image.to_owned()),
                entrypoint: Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]),
                cmd: Some(vec![KEEPALIVE.to_owned()]),
                working_dir: Some(WORKSPACE.to_owned()),
                labels: Some(l),
                env: (!env_vars.is_empty()).then_some(env_vars),
                host_config: Some(HostConfig {
                    init: Some(true),
                    network_mode: net.clone(),
                    binds: Some(binds),
                    privileged: config.privileged.then_some(true).or(parsed.host.privileged),
                    ..parsed.host
                }),
                networking_config: net.filter(|n| n != "host").map(|net| NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(net, EndpointSettings::default())])),
                }),
                ..Default::default()
            };
            let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
            match docker.create_container(Some(options), body).await {
                Ok(_) if !env.engine.shares_fs => self.init_kiln_volume(env, &name).await?,
                Ok(_) => {}
                Err(e) if is_conflict(&e) => {}
                Err(e) => {
                    return Err(docker_err(
                        format!("creating the primary container from image {image:?}"),
                        e,
                    ));
                }
            }
        }
        if exists != Some(true) {
            docker.start_container(&name, None).await.map_err(|e| {
                docker_err(format!("starting the primary container from image {image:?}"), e)
            })?;
        }
        Ok(())
    }

    /// Removes every engine object labelled with the environment and the host directory, then
    /// the workspace volume (the environment's record, last so an interrupted removal stays
    /// listed).
    async fn remove_env(&self, engine: &Engine, id: &str, grace: Duration) -> Result<bool> {
        let docker = &engine.docker;
        let filter = labels::filter(&[format!("{}={id}", labels::ENVIRONMENT_ID)]);
        let containers = crate::compat::list_containers(
            docker,
            ListContainersOptions {
                all: true,
                filters: Some(filter.clone()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| docker_err("listing the environment's containers", e))?;
        let dir = self.inner.state_dir.join(id);
        let mut existed = !containers.is_empty() || dir.exists();
        // Background processes and in-flight execs die with their containers.
        self.fail_execs(id);
        lock(&self.inner.pending_steps).retain(|_, p| p.env_id != id);
        let prefix = labels::container_name(id, "");
        lock(&self.inner.verified).retain(|name| !name.starts_with(&prefix));
        if !self.inner.is_root && engine.shares_fs && dir.exists() {
            self.empty_from_inside(engine, id, grace).await;
        }
        let removals = containers.iter().filter_map(|c| c.id.clone()).map(|cid| async move {
            match docker
                .remove_container(
                    &cid,
                    Some(RemoveContainerOptions { force: true, v: true, ..Default::default() }),
                )
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                // Already being removed by a concurrent call.
                Err(e) if is_conflict(&e) => Ok(()),
                Err(e) => Err(docker_err(format!("removing container {cid}"), e)),
            }
        });
        for r in futures::future::join_all(removals).await {
            r?;
        }
        let volumes = docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(filter.clone()) }))
            .await
            .map_err(|e| docker_err("listing the environment's volumes", e))?;
        let record = labels::workspace_volume(id);
        let mut volumes: Vec<String> =
            volumes.volumes.unwrap_or_default().into_iter().map(|v| v.name).collect();
        existed |= !volumes.is_empty();
        let has_record = volumes.contains(&record);
        volumes.retain(|v| *v != record);
        let remove_volume = |name: String| async move {
            match docker.remove_volume(&name, Some(RemoveVolumeOptions { force: true })).await {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(docker_err(format!("removing volume {name}"), e)),
            }
        };
        let d = dir.clone();
        let dir_removal = async move {
            if !d.exists() {
                return Ok(());
            }
            let path = d.clone();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&path))
                .await
                .map_err(|e| Error::internal(format!("the removal task failed: {e}")))?
                .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                .map_err(|e| Error::io(format!("removing {}", d.display()), &e))
        };
        let network_removal = async {
            match docker.remove_network(&labels::network_name(id)).await {
                Ok(()) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err(docker_err(format!("removing the network of {id:?}"), e)),
            }
        };
        let (volumes_removed, dir_removed, network_removed) = tokio::join!(
            futures::future::join_all(volumes.into_iter().map(remove_volume)),
            dir_removal,
            network_removal
        );
        for r in volumes_removed {
            r?;
        }
        dir_removed?;
        existed |= network_removed?;
        // The record last, so an interrupted removal stays listed (and is retried).
        if has_record {
            remove_volume(record).await?;
        }
        Ok(existed)
    }

    /// As a non-root plugin, empties `/__kiln` from inside the primary container (files
    /// written there by root in a container are not deletable from outside).
    async fn empty_from_inside(&self, engine: &Engine, id: &str, grace: Duration) {
        let name = labels::container_name(id, PRIMARY);
        let script = format!("rm -rf {KILN_MOUNT}/* {KILN_MOUNT}/.[!.]* 2>/dev/null; true");
        let run = crate::exec::run_simple(
            &engine.docker,
            &name,
            vec!["/bin/sh".to_owned(), "-c".to_owned(), script],
        );
        if tokio::time::timeout(grace.max(Duration::from_secs(5)), run).await.is_err() {
            tracing::warn!(env = %id, "emptying the environment's directory from inside timed out");
        }
    }

    /// Forgets the execs of an environment (their processes die with its containers).
    fn fail_execs(&self, env_id: &str) {
        let mut execs = lock(&self.inner.execs);
        execs.retain(|_, h| h.env_id != env_id);
    }

    /// A running container of the environment that sees its workspace: the primary
    /// container, else the job container.
    async fn context_source(&self, env: &EnvInfo) -> Result<Option<String>> {
        if env.has_primary {
            return Ok(Some(labels::container_name(&env.id, PRIMARY)));
        }
        let jobs = crate::compat::list_containers(
            &env.engine.docker,
            ListContainersOptions {
                filters: Some(labels::filter(&[
                    format!("{}={}", labels::ENVIRONMENT_ID, env.id),
                    format!("{}=job", labels::KIND),
                ])),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| docker_err("listing job containers", e))?;
        Ok(jobs.into_iter().find_map(|c| c.id))
    }

    /// The options of an environment request, checked against the plugin's policy.
    fn env_options(&self, request: &EnvironmentRequest) -> Result<EnvOptions> {
        let mut o = EnvOptions::default();
        let absolute = |s: &str| {
            Path::new(s).is_absolute()
                && !Path::new(s).components().any(|c| c == std::path::Component::ParentDir)
        };
        for (k, v) in &request.options {
            match (k.as_str(), v) {
                ("image", serde_json::Value::String(s)) if !s.is_empty() => {
                    o.image = Some(s.clone())
                }
                ("host_dir", serde_json::Value::String(s)) if absolute(s) => {
                    o.host_dir = Some(s.clone())
                }
                ("docker_host", serde_json::Value::String(s)) => {
                    crate::engines::check_endpoint(s, "options.docker_host")?;
                    o.docker_host = Some(s.clone());
                }
                ("docker_tls_dir", serde_json::Value::String(s)) if absolute(s) => {
                    o.docker_tls_dir = Some(PathBuf::from(s))
                }
                ("host_dir", _) => {
                    return Err(Error::invalid_argument(
                        "options.host_dir must be an absolute path without '..' (the delegating \
                         environment's directory)",
                    )
                    .field("options.host_dir")
                    .fault(Fault::Config));
                }
                ("docker_tls_dir", _) => {
                    return Err(Error::invalid_argument(
                        "options.docker_tls_dir must be an absolute path without '..' (a \
                         directory of the plugin's machine with ca.pem, cert.pem and key.pem)",
                    )
                    .field("options.docker_tls_dir")
                    .fault(Fault::Config));
                }
                ("image", _) => {
                    return Err(Error::invalid_argument(
                        "options.image must be a non-empty string, e.g. {\"image\": \"debian:12\"}",
                    )
                    .field("options.image")
                    .fault(Fault::Config));
                }
                ("docker_host", _) => {
                    return Err(Error::invalid_argument(
                        "options.docker_host must be a string, e.g. \"tcp://10.0.0.2:2376\"",
                    )
                    .field("options.docker_host")
                    .fault(Fault::Config));
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown option {k:?} for the docker backend: it takes \"image\", \
                         \"host_dir\", \"docker_host\" and \"docker_tls_dir\""
                    ))
                    .field(format!("options.{k}"))
                    .fault(Fault::Config));
                }
            }
        }
        if o.docker_tls_dir.is_some() && o.docker_host.is_none() {
            return Err(Error::invalid_argument(
                "options.docker_tls_dir is given without options.docker_host; the plugin's own \
                 daemon takes its TLS directory from --docker-tls-dir",
            )
            .field("options.docker_tls_dir")
            .fault(Fault::Config));
        }
        if let Some(h) = &o.docker_host
            && !self.docker_host_allowed(h)
        {
            return Err(Error::permission_denied(format!(
                "options.docker_host {h:?} is refused by the docker plugin's policy; an operator \
                 may allow it with --allow-docker-host GLOB (e.g. 'tcp://10.0.*')"
            ))
            .field("options.docker_host")
            .fault(Fault::Config));
        }
        if let Some(d) = &o.host_dir {
            let policy = spec::Policy {
                valid_volumes: &self.inner.config.valid_volumes,
                allowed_options: &self.inner.config.allowed_options,
            };
            if !policy.volume_allowed(d) {
                return Err(Error::permission_denied(format!(
                    "options.host_dir {d:?} is refused by the docker plugin's policy; an operator \
                     may allow it with --valid-volume (kiln does so for its embedded host \
                     plugin's directory)"
                ))
                .field("options.host_dir")
                .fault(Fault::Config));
            }
        }
        Ok(o)
    }

    /// Whether the policy lets environments name the endpoint `h` (`--allow-docker-host`).
    fn docker_host_allowed(&self, h: &str) -> bool {
        let globs = &self.inner.config.allowed_docker_hosts;
        globs.iter().any(|g| glob::Pattern::new(g).is_ok_and(|p| p.matches(h)))
    }

    /// Creates (or finds again) the environment of a checked request on its engine.
    async fn create_env_on(
        &self,
        request: EnvironmentRequest,
        options: EnvOptions,
    ) -> Result<Environment> {
        let id = request.environment_id.clone();
        let EnvOptions { image, host_dir, docker_host, docker_tls_dir } = options;
        // A delegate environment (host_dir) without an image has no primary container: its
        // jobs run in the delegating environment, only inner containers are created here.
        let with_primary = !request.hints.job_container && (image.is_some() || host_dir.is_none());
        if with_primary && image.is_none() {
            return Err(Error::invalid_argument(format!(
                "label {:?} has no image: map it like {0}=docker://IMAGE",
                request.label
            ))
            .field("options.image")
            .fault(Fault::Config));
        }
        if lock(&self.inner.removing).contains(&id) {
            return Err(Error::unavailable(format!("environment {id:?} is being removed; retry")));
        }
        let hash = labels::env_spec_hash(&request);
        let dir = self.inner.state_dir.join(&id);
        // A replay finds the environment in memory or on its engine (the endpoint is part of
        // the spec: no other engine needs asking).
        let endpoint = docker_host.unwrap_or_default();
        let engine = self.inner.engines.get(&endpoint, docker_tls_dir.as_deref()).await?;
        let known = lock(&self.inner.envs).get(&id).cloned();
        let existing = match known {
            Some(e) => Some(e),
            None => self.find_env_on(&engine, &id).await?,
        };
        if let Some(existing) = existing {
            if existing.spec_hash != hash {
                return Err(Error::already_exists(format!(
                    "environment {id:?} exists with a different spec"
                ))
                .field("environment_id"));
            }
            if existing.engine.shares_fs {
                Self::make_host_dir(&dir)?;
            }
            if let (true, Some(image)) = (existing.has_primary, &image) {
                let l = labels::owner_labels(&id, &existing.owner, &hash);
                self.ensure_primary(&existing, image, &l).await?;
            }
            return Ok(self.environment(&existing));
        }
        if !endpoint.is_empty() {
            // Before anything exists there, so that a restarted plugin looks there.
            self.inner.engines.remember(&endpoint, docker_tls_dir.as_deref())?;
        }
        if let Some(image) = &image {
            self.ensure_image(&engine, image, self.inner.config.force_pull, None, "options.image")
                .await?;
        }
        let mut owner = request.owner.clone();
        owner.created_at_unix_ms = labels::now_ms();
        let base = labels::owner_labels(&id, &owner, &hash);
        let docker = &engine.docker;
        // The workspace volume first: it is the environment's record.
        let mut record_labels = base.clone();
        record_labels.insert(labels::ROLE.to_owned(), "environment".to_owned());
        record_labels.insert(labels::RUNS_ON.to_owned(), request.label.clone());
        if let Some(d) = &host_dir {
            record_labels.insert(labels::HOST_DIR.to_owned(), d.clone());
        }
        if !endpoint.is_empty() {
            record_labels.insert(labels::DOCKER_HOST.to_owned(), endpoint.clone());
        }
        if engine.shares_fs {
            record_labels.insert(labels::WORKSPACE.to_owned(), "host".to_owned());
        }
        record_labels.insert(
            labels::KIND.to_owned(),
            if with_primary { "with-primary" } else { "without-primary" }.to_owned(),
        );
        let volume = VolumeCreateRequest {
            name: Some(labels::workspace_volume(&id)),
            labels: Some(record_labels),
            ..Default::default()
        };
        // Creating an existing volume returns it: a concurrent create of the same id shows in
        // its labels.
        let record = docker
            .create_volume(volume)
            .await
            .map_err(|e| docker_err("creating the workspace volume", e))?;
        if record.labels.get(labels::SPEC_HASH) != Some(&hash) {
            return Err(Error::already_exists(format!(
                "environment {id:?} exists with a different spec"
            ))
            .field("environment_id"));
        }
        let info = Arc::new(EnvInfo {
            id: id.clone(),
            owner: labels::owner_from(&record.labels),
            spec_hash: hash,
            has_primary: with_primary,
            engine: Arc::clone(&engine),
            dir: dir.clone(),
            host_dir: host_dir.map(PathBuf::from),
            workspace_on_host: engine.shares_fs
                && record.labels.get(labels::WORKSPACE).map(String::as_str) == Some("host"),
        });
        if engine.shares_fs {
            Self::make_host_dir(&dir)?;
        } else {
            // `/__kiln` is a volume of the engine, filled by the first container mounting it.
            let create = VolumeCreateRequest {
                name: Some(labels::kiln_volume(&id)),
                labels: Some(base.clone()),
                ..Default::default()
            };
            docker
                .create_volume(create)
                .await
                .map_err(|e| docker_err("creating the environment's /__kiln volume", e))?;
        }
        let hints = &request.hints;
        if hints.job_container || hints.service_containers > 0 || hints.step_containers {
            self.ensure_network(&info).await?;
        }
        if let (true, Some(image)) = (with_primary, &image) {
            self.ensure_primary(&info, image, &base).await?;
        }
        lock(&self.inner.envs).insert(id.clone(), Arc::clone(&info));
        tracing::info!(
            env = %id,
            image = image.as_deref().unwrap_or(""),
            engine = engine.name(),
            "environment created"
        );
        Ok(self.environment(&info))
    }

    /// Drops an environment's endpoint from the endpoints file when no environment is left
    /// on it (none being created, none in memory, no record on the engine).
    async fn forget_if_unused(&self, engine: &Engine) {
        let endpoint = &engine.endpoint;
        let busy = lock(&self.inner.creating).contains_key(endpoint)
            || lock(&self.inner.envs).values().any(|e| e.engine.endpoint == *endpoint);
        if busy {
            return;
        }
        // Records made through this endpoint (other runners' environments on the same
        // daemon are not this plugin's concern).
        let filter = labels::filter(&[format!("{}={endpoint}", labels::DOCKER_HOST)]);
        let records = engine
            .docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(filter) }))
            .await
            .map(|v| v.volumes.unwrap_or_default());
        let any = match records {
            // Podman ORs filters: check the labels here too.
            Ok(v) => v.iter().any(|v| {
                v.labels.get(labels::ROLE).map(String::as_str) == Some("environment")
                    && v.labels.get(labels::DOCKER_HOST) == Some(endpoint)
            }),
            Err(_) => true,
        };
        let busy = lock(&self.inner.creating).contains_key(endpoint)
            || lock(&self.inner.envs).values().any(|e| e.engine.endpoint == *endpoint);
        if !any && !busy {
            self.inner.engines.forget(endpoint);
        }
    }

    /// Creates `/__kiln`'s directories in a remote environment's volume, through `container`
    /// (created, not necessarily started).
    async fn init_kiln_volume(&self, env: &EnvInfo, container: &str) -> Result<()> {
        let mut b = tar::Builder::new(Vec::new());
        for sub in HOST_DIRS {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o777);
            h.set_size(0);
            h.set_mtime(labels::now_ms() as u64 / 1000);
            b.append_data(&mut h, format!("{}/{sub}/", &KILN_MOUNT[1..]), std::io::empty())
                .map_err(|e| Error::io("archiving /__kiln's directories", &e))?;
        }
        let tar = b.into_inner().map_err(|e| Error::io("archiving /__kiln's directories", &e))?;
        env.engine
            .docker
            .upload_to_container(
                container,
                Some(bollard::query_parameters::UploadToContainerOptions {
                    path: "/".to_owned(),
                    ..Default::default()
                }),
                bollard::body_full(bytes::Bytes::from(tar)),
            )
            .await
            .map_err(|e| docker_err("creating /__kiln's directories", e))
    }

    async fn create_container_inner(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        let env = self.live_env(&request.environment_id).await?;
        validate_id(&request.container_id, "container_id")?;
        if request.container_id == PRIMARY {
            return Err(Error::already_exists(format!(
                "container id {PRIMARY:?} is the environment's primary container"
            ))
            .field("container_id"));
        }
        let spec = &request.spec;
        if spec.build.is_some() != spec.image.is_empty() {
            return Err(Error::invalid_argument(
                "exactly one of spec.image and spec.build must be set",
            )
            .field("spec.image"));
        }
        // Policy first: nothing is created or pulled for a refused spec.
        let policy = spec::Policy {
            valid_volumes: &self.inner.config.valid_volumes,
            allowed_options: &self.inner.config.allowed_options,
        };
        let mut parsed =
            if kind == ContainerKind::Job && !self.inner.config.container_options.is_empty() {
                // The configured options first, the workflow's after them (a later flag wins).
                let merged = ContainerSpec {
                    options: format!("{} {}", self.inner.config.container_options, spec.options),
                    ..spec.clone()
                };
                spec::parse(&env.id, &merged, &policy)?
            } else {
                spec::parse(&env.id, spec, &policy)?
            };
        if self.inner.config.privileged {
            parsed.host.privileged = Some(true);
        }
        let hash = container_spec_hash(kind, spec);
        let name = labels::container_name(&env.id, &request.container_id);
        let docker = &env.engine.docker;
        if let Some(p) = lock(&self.inner.pending_steps).get(&name) {
            if p.spec_hash != hash || p.env_id != env.id {
                return Err(Error::already_exists(format!(
                    "container {:?} exists with a different spec",
                    request.container_id
                ))
                .field("container_id"));
            }
            return Ok(Container {
                id: request.container_id,
                environment_id: env.id.clone(),
                state: ContainerState::Created,
                ports: Vec::new(),
            });
        }
        match crate::compat::inspect_container(docker, &name).await {
            Ok(c) => {
                let l = c.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
                if l.get(labels::CONTAINER_SPEC_HASH) != Some(&hash)
                    || l.get(labels::ENVIRONMENT_ID) != Some(&env.id)
                {
                    return Err(Error::already_exists(format!(
                        "container {:?} exists with a different spec",
                        request.container_id
                    ))
                    .field("container_id"));
                }
                return Ok(container_of(&request.container_id, &env.id, &c));
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(docker_err("inspecting the container", e)),
        }
        if kind == ContainerKind::Job {
            let others = crate::compat::list_containers(
                docker,
                ListContainersOptions {
                    all: true,
                    filters: Some(labels::filter(&[
                        format!("{}={}", labels::ENVIRONMENT_ID, env.id),
                        format!("{}=job", labels::KIND),
                    ])),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| docker_err("listing job containers", e))?;
            if !others.is_empty() {
                return Err(Error::failed_precondition(format!(
                    "environment {:?} already has a job container",
                    env.id
                )));
            }
        }
        let image = match &spec.build {
            Some(b) => {
                let source = self.context_source(&env).await?;
                crate::build::build(&env, source, b, self.inner.config.force_rebuild).await?
            }
            None => {
                self.ensure_image(
                    &env.engine,
                    &spec.image,
                    spec.force_pull || self.inner.config.force_pull,
                    spec.credentials.as_ref(),
                    "spec.image",
                )
                .await?;
                spec.image.clone()
            }
        };

        let mut l = labels::owner_labels(&env.id, &env.owner, &env.spec_hash);
        l.extend(parsed.labels.clone());
        l.insert(labels::CONTAINER_ID.to_owned(), request.container_id.clone());
        l.insert(labels::KIND.to_owned(), kind.to_string());
        l.insert(labels::CONTAINER_SPEC_HASH.to_owned(), hash.clone());
        for v in &parsed.named_volumes {
            let create = VolumeCreateRequest {
                name: Some(v.clone()),
                labels: Some(labels::owner_labels(&env.id, &env.owner, &env.spec_hash)),
                ..Default::default()
            };
            docker
                .create_volume(create)
                .await
                .map_err(|e| docker_err(format!("creating volume {v}"), e))?;
        }
        let net = self.ensure_network(&env).await?;
        let mut host = parsed.host;
        let mut binds = host.binds.take().unwrap_or_default();
        if spec.mount_workspace || kind == ContainerKind::Step {
            binds.extend(Self::env_binds(&env));
        }
        if let Some(socket) = self.socket_to_mount(&env, kind) {
            binds.push(format!("{socket}:/var/run/docker.sock"));
        }
        host.binds = (!binds.is_empty()).then_some(binds);
        host.network_mode = Some(net.clone());
        // Network-scoped aliases exist on user-defined networks only.
        let aliases = (!spec.network_aliases.is_empty()
            && !matches!(net.as_str(), "host" | "bridge"))
        .then(|| spec.network_aliases.clone());
        if host.init.is_none() && kind != ContainerKind::Step {
            host.init = Some(true);
        }
        let mut env_vars: Vec<String> =
            spec.env.iter().map(|v| format!("{}={}", v.name, v.value)).collect();
        env_vars.extend(parsed.env);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: parsed
                .entrypoint
                .or_else(|| (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone())),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            env: (!env_vars.is_empty()).then_some(env_vars),
            working_dir: (!spec.working_dir.is_empty())
                .then(|| spec.working_dir.clone())
                .or(parsed.working_dir)
                .or_else(|| (kind == ContainerKind::Step).then(|| WORKSPACE.to_owned())),
            user: (!spec.user.is_empty()).then(|| spec.user.clone()).or(parsed.user),
            hostname: parsed.hostname,
            exposed_ports: (!parsed.exposed.is_empty()).then_some(parsed.exposed),
            healthcheck: parsed.healthcheck,
            labels: Some(l),
            host_config: Some(host),
            networking_config: (net != "host").then(|| NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    net,
                    EndpointSettings { aliases, ..Default::default() },
                )])),
            }),
            ..Default::default()
        };
        if kind == ContainerKind::Step {
            let pending = PendingStep { env_id: env.id.clone(), spec_hash: hash, body };
            lock(&self.inner.pending_steps).insert(name, pending);
        } else {
            let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
            docker.create_container(Some(options), body).await.map_err(|e| {
                docker_err(format!("creating {kind} container from image {image:?}"), e)
            })?;
            if kind == ContainerKind::Job && spec.mount_workspace && !env.engine.shares_fs {
                // Without a primary container, the job container is the first to mount
                // `/__kiln`.
                self.init_kiln_volume(&env, &name).await?;
            }
        }
        tracing::info!(env = %env.id, container = %request.container_id, %kind, %image, "container created");
        Ok(Container {
            id: request.container_id,
            environment_id: env.id.clone(),
            state: ContainerState::Created,
            ports: Vec::new(),
        })
    }
}

/// The hash of a container spec, for idempotent creates (the password is left out).
fn container_spec_hash(kind: ContainerKind, s: &ContainerSpec) -> String {
    let env: Vec<(String, String)> =
        s.env.iter().map(|v| (v.name.clone(), v.value.clone())).collect();
    labels::hash_json(&serde_json::json!({
        "kind": kind.to_string(),
        "image": s.image,
        "build": s.build.as_ref().map(|b| (b.context_dir.clone(), b.dockerfile.clone())),
        "entrypoint": s.entrypoint,
        "cmd": s.cmd,
        "env": env,
        "working_dir": s.working_dir,
        "volumes": s.volumes,
        "ports": s.ports,
        "aliases": s.network_aliases,
        "options": s.options,
        "user": s.user,
        "mount_workspace": s.mount_workspace,
        "username": s.credentials.as_ref().map(|c| c.username.clone()),
    }))
}

fn state_of(c: &bollard::models::ContainerInspectResponse) -> ContainerState {
    match c.state.as_ref().and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING)
        | Some(ContainerStateStatusEnum::RESTARTING)
        | Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Running,
        Some(_) => ContainerState::Exited,
        None => ContainerState::Unspecified,
    }
}

fn ports_of(c: &bollard::models::ContainerInspectResponse) -> Vec<PortBinding> {
    let mut out = Vec::new();
    let ports = c.network_settings.as_ref().and_then(|n| n.ports.clone()).unwrap_or_default();
    for (container_port, bindings) in ports {
        for b in bindings.unwrap_or_default() {
            out.push(PortBinding {
                container_port: container_port.clone(),
                host_ip: b.host_ip.unwrap_or_default(),
                host_port: b.host_port.and_then(|p| p.parse().ok()).unwrap_or(0),
            });
        }
    }
    out.sort_by(|a, b| (&a.container_port, &a.host_ip).cmp(&(&b.container_port, &b.host_ip)));
    out
}

fn container_of(id: &str, env: &str, c: &bollard::models::ContainerInspectResponse) -> Container {
    Container {
        id: id.to_owned(),
        environment_id: env.to_owned(),
        state: state_of(c),
        ports: ports_of(c),
    }
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    async fn capabilities(&self, _request: CapabilitiesRequest) -> Result<Capabilities> {
        Ok(self.caps())
    }

    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        let id = request.environment_id.clone();
        validate_id(&id, "environment_id")?;
        let options = self.env_options(&request)?;
        let endpoint = options.docker_host.clone().unwrap_or_default();
        if endpoint.is_empty() {
            return self.create_env_on(request, options).await;
        }
        // An endpoint is not forgotten while an environment is being created on it.
        *lock(&self.inner.creating).entry(endpoint.clone()).or_default() += 1;
        let result = self.create_env_on(request, options).await;
        let mut creating = lock(&self.inner.creating);
        if let Some(n) = creating.get_mut(&endpoint) {
            *n -= 1;
            if *n == 0 {
                creating.remove(&endpoint);
            }
        }
        result
    }

    async fn create_container(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        self.create_container_inner(kind, request).await
    }

    async fn start_container(&self, target: ContainerRef) -> Result<Container> {
        let env = self.live_env(&target.environment_id).await?;
        let (name, c) = self.container(&env, &target.container_id).await?;
        match state_of(&c) {
            ContainerState::Running => return Ok(container_of(&target.container_id, &env.id, &c)),
            ContainerState::Exited => {
                let st = c.state.clone().unwrap_or_default();
                return Err(Error::failed_precondition(format!(
                    "container {:?} has exited (code {}{}); it is not restarted",
                    target.container_id,
                    st.exit_code.unwrap_or(0),
                    st.error
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ))
                .fault(Fault::User));
            }
            _ => {}
        }
        let docker = &env.engine.docker;
        match docker.start_container(&name, None).await {
            Ok(()) => {}
            // 304: already started.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => {}
            Err(e) => {
                return Err(docker_err(format!("starting container {:?}", target.container_id), e));
            }
        }
        let c = crate::compat::inspect_container(docker, &name)
            .await
            .map_err(|e| docker_err("inspecting the started container", e))?;
        Ok(container_of(&target.container_id, &env.id, &c))
    }

    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        let env = self.live_env(&target.environment_id).await?;
        let (name, c) = self.container(&env, &target.container_id).await?;
        let st = c.state.clone().unwrap_or_default();
        let mut status = st.health.as_ref().and_then(|h| h.status);
        if status == Some(HealthStatusEnum::STARTING) {
            let first_seen = {
                let mut since = lock(&self.inner.starting_since);
                // Containers removed while starting are forgotten after an hour.
                since.retain(|_, t| t.elapsed() < std::time::Duration::from_secs(3600));
                *since.entry(name.clone()).or_insert_with(std::time::Instant::now)
            };
            status = Some(
                crate::compat::overdue_health(&env.engine.docker, &name, &c, first_seen).await,
            );
        }
        if status != Some(HealthStatusEnum::STARTING) {
            lock(&self.inner.starting_since).remove(&name);
        }
        let health = match status {
            Some(HealthStatusEnum::STARTING) => Health::Starting,
            Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
            Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
            _ => Health::None,
        };
        let config = c.config.clone().unwrap_or_default();
        let mut image_env = config.env.clone().unwrap_or_default();
        let user = config.user.clone().unwrap_or_default();
        if !image_env.iter().any(|e| e.starts_with("HOME="))
            && (user.is_empty() || user == "root" || user == "0" || user.starts_with("0:"))
        {
            // Docker gives root's execs HOME=/root; `env -i` drops it, so report it here.
            image_env.push("HOME=/root".to_owned());
        }
        let net = labels::network_name(&env.id);
        let ip = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|n| n.get(&net))
            .and_then(|e| e.ip_address.clone())
            .unwrap_or_default();
        let detail = match (&st.health, &st.error) {
            (_, Some(err)) if !err.is_empty() => err.clone(),
            (Some(h), _) => h
                .log
                .as_ref()
                .and_then(|l| l.last())
                .and_then(|r| r.output.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        Ok(ContainerStatus {
            id: target.container_id.clone(),
            state: state_of(&c),
            health,
            exit_code: st.exit_code.unwrap_or(0) as i32,
            oom_killed: st.oom_killed.unwrap_or(false),
            ports: ports_of(&c),
            image_env,
            ip_address: ip,
            detail: detail.trim().to_owned(),
        })
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        crate::exec::start(self, request).await
    }

    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        crate::exec::signal(self, request).await
    }

    async fn write_stdin(&self, exec_id: String, data: kiln_plugin_sdk::ByteStream) -> Result<u64> {
        crate::exec::write_stdin(self, exec_id, data).await
    }

    async fn copy_in(
        &self,
        target: CopyInTarget,
        data: kiln_plugin_sdk::ByteStream,
    ) -> Result<CopyStats> {
        crate::copy::copy_in(self, target, data).await
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<kiln_plugin_sdk::ByteStream> {
        crate::copy::copy_out(self, source).await
    }

    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let id = request.environment_id.clone();
        validate_id(&id, "environment_id")?;
        let grace = if request.grace.is_zero() { Duration::from_secs(2) } else { request.grace };
        if let Some(container) = &request.container_id {
            validate_id(container, "container_id")?;
            if container == PRIMARY {
                // The primary container lives exactly as long as its environment.
                return Ok(false);
            }
            let name = labels::container_name(&id, container);
            lock(&self.inner.verified).remove(&name);
            if lock(&self.inner.pending_steps).remove(&name).is_some() {
                return Ok(true);
            }
            let engine = match self.find_env(&id).await? {
                Some(env) => Arc::clone(&env.engine),
                None => Arc::clone(&self.inner.engines.default),
            };
            let docker = &engine.docker;
            let c = match crate::compat::inspect_container(docker, &name).await {
                Ok(c) => c,
                Err(e) if is_not_found(&e) => return Ok(false),
                Err(e) => return Err(docker_err("inspecting the container", e)),
            };
            let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
            if labels.get(labels::ENVIRONMENT_ID) != Some(&id) {
                return Ok(false);
            }
            if c.state.and_then(|s| s.running).unwrap_or(false) {
                let secs = i32::try_from(grace.as_secs().max(1)).unwrap_or(i32::MAX);
                let stop =
                    bollard::query_parameters::StopContainerOptions { t: Some(secs), signal: None };
                let _ = docker.stop_container(&name, Some(stop)).await;
            }
            return match docker
                .remove_container(
                    &name,
                    Some(RemoveContainerOptions { force: true, v: true, ..Default::default() }),
                )
                .await
            {
                Ok(()) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err(docker_err(format!("removing container {container:?}"), e)),
            };
        }
        // Found before it is marked: a live environment's engine (what is left of a partly
        // created one is on the plugin's own engine, or unreachable).
        let engine = match self.find_env(&id).await? {
            Some(env) => Arc::clone(&env.engine),
            None => Arc::clone(&self.inner.engines.default),
        };
        lock(&self.inner.removing).insert(id.clone());
        let result = self.remove_env(&engine, &id, grace).await;
        lock(&self.inner.envs).remove(&id);
        lock(&self.inner.removing).remove(&id);
        if let Ok(true) = result {
            tracing::info!(env = %id, engine = engine.name(), "environment removed");
        }
        if result.is_ok() && !engine.endpoint.is_empty() {
            self.forget_if_unused(&engine).await;
        }
        result
    }

    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        let mut pairs = vec![format!("{}=environment", labels::ROLE)];
        if !selector.runner_id.is_empty() {
            pairs.push(format!("{}={}", labels::RUNNER_ID, selector.runner_id));
        }
        for (k, v) in &selector.labels {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
            {
                return Err(Error::invalid_argument(format!("label key {k:?} is not [a-z0-9.-]"))
                    .field("labels"));
            }
            pairs.push(format!("{}{k}={v}", labels::EXTRA));
        }
        let engines = &self.inner.engines;
        let mut out = self.list_on(&engines.default, &pairs).await?;
        if !engines.endpoints().is_empty() {
            for engine in engines.reachable().await.into_iter().skip(1) {
                match self.list_on(&engine, &pairs).await {
                    Ok(more) => out.extend(more),
                    Err(e) => tracing::warn!(
                        endpoint = %engine.endpoint, error = %e,
                        "listing a docker endpoint's environments failed; left out"
                    ),
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        // One daemon reachable under two endpoints lists its environments twice.
        out.dedup_by(|a, b| a.id == b.id);
        Ok(out)
    }
}

impl DockerBackend {
    /// The environments of one engine matching every label pair.
    async fn list_on(&self, engine: &Engine, pairs: &[String]) -> Result<Vec<EnvironmentSummary>> {
        let docker = &engine.docker;
        let records = docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(labels::filter(pairs)) }))
            .await
            .map_err(|e| docker_err("listing environments", e))?
            .volumes
            .unwrap_or_default();
        let containers = crate::compat::list_containers(
            docker,
            ListContainersOptions {
                all: true,
                filters: Some(labels::filter(&[labels::ENVIRONMENT_ID.to_owned()])),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| docker_err("listing containers", e))?;
        let mut by_env: HashMap<String, Vec<String>> = HashMap::new();
        for c in containers {
            let l = c.labels.unwrap_or_default();
            if let (Some(e), Some(id)) =
                (l.get(labels::ENVIRONMENT_ID), l.get(labels::CONTAINER_ID))
            {
                by_env.entry(e.clone()).or_default().push(id.clone());
            }
        }
        let removing = lock(&self.inner.removing).clone();
        let mut out = Vec::new();
        // The engine ANDs the label filters; Podman's compatible API (4.3) ORs them for
        // volumes: check every pair here too.
        let selected = |l: &HashMap<String, String>| {
            pairs
                .iter()
                .all(|p| p.split_once('=').is_some_and(|(k, v)| l.get(k).is_some_and(|x| x == v)))
        };
        for v in records.into_iter().filter(|v| selected(&v.labels)) {
            let l = v.labels;
            let Some(id) = l.get(labels::ENVIRONMENT_ID).cloned() else { continue };
            if removing.contains(&id) {
                continue;
            }
            let mut container_ids = by_env.remove(&id).unwrap_or_default();
            container_ids.sort();
            out.push(EnvironmentSummary { id, owner: labels::owner_from(&l), container_ids });
        }
        Ok(out)
    }
}
