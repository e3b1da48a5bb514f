//! [`LxcBackend`]: the [`Backend`] implementation of the LXC plugin.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use kiln_plugin_sdk::child::ExecHandle;
use kiln_plugin_sdk::client::GrpcBackend;
use kiln_plugin_sdk::ids::validate_id;
use kiln_plugin_sdk::{
    Backend, ByteStream, Capabilities, CapabilitiesRequest, ContainerRef, ContainerState,
    ContainerStatus, CopyInTarget, CopyOutSource, CopyStats, Delegation, Environment,
    EnvironmentRequest, EnvironmentSummary, Error, ExecRequest, ExecStream, Features, Health,
    LayerSupport, PROTOCOL_VERSION, RemoveRequest, Result, Selector, SignalRequest,
};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::env::{self, Env, EnvMeta, PRIMARY};
use crate::image::{self, Image};
use crate::rootfs::Rootfs;
use crate::{LxcConfig, lxc};

/// Why the container layers are unsupported without `--delegate`.
const NO_CONTAINERS: &str = "the lxc backend runs steps in an LXC system container; configure a \
                             docker plugin (and start this plugin with --delegate docker) for \
                             container:, services: and docker steps";

/// The image environment of every job container.
const IMAGE_ENV: &[&str] =
    &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"];

/// The LXC backend: each environment is an LXC container under [`LxcConfig::root`], an
/// overlay clone of a cached base.
#[derive(Clone)]
pub struct LxcBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// Canonical directory of the job containers (their lxcpath).
    root: PathBuf,
    /// Canonical directory of the base containers.
    base_dir: PathBuf,
    default_image: Image,
    /// Debian mirror and security mirror for debootstrap.
    mirrors: (String, String),
    network: crate::Network,
    delegate: Option<String>,
    /// The executable mounted into each container to serve the agent, and its arguments
    /// before the host backend's flags; `None` without the agent.
    agent: Option<(PathBuf, Vec<String>)>,
    envs: Mutex<HashMap<String, Arc<Env>>>,
    /// Execs run by an agent: where to send their signals and stdin.
    agent_execs: Mutex<HashMap<String, GrpcBackend>>,
    execs: Mutex<HashMap<String, Arc<ExecHandle>>>,
    /// One build per base at a time in this process (the `flock` guards across processes).
    builds: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for LxcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LxcBackend").field("root", &self.inner.root).finish_non_exhaustive()
    }
}

/// This executable and how it serves the host backend: `kiln-plugin-lxc agent …` or
/// `kiln plugin host …`.
fn agent_command() -> Option<(PathBuf, Vec<String>)> {
    let exe = std::env::current_exe().ok()?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let name = exe.file_name()?.to_string_lossy().into_owned();
    let args = if name.starts_with("kiln-plugin-lxc") {
        vec!["agent".to_owned()]
    } else {
        vec!["plugin".to_owned(), "host".to_owned()]
    };
    Some((exe, args))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connects to an agent's socket and handshakes.
async fn connect_agent(socket: &Path) -> Result<GrpcBackend> {
    let endpoint = kiln_plugin_sdk::client::Endpoint::Unix(socket.to_path_buf());
    let agent =
        kiln_plugin_sdk::client::connect(&endpoint, "lxc-agent", Duration::from_secs(2)).await?;
    agent
        .capabilities(CapabilitiesRequest {
            client_name: "kiln-plugin-lxc".to_owned(),
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_versions: vec![PROTOCOL_VERSION],
        })
        .await?;
    Ok(agent)
}

impl LxcBackend {
    /// Checks that LXC is installed and usable (the error names the Debian package) and
    /// creates the directories.
    pub fn new(config: LxcConfig) -> anyhow::Result<LxcBackend> {
        lxc::preflight()?;
        let make = |dir: &Path, mode: u32| -> anyhow::Result<PathBuf> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))
        };
        let root = make(&config.root, 0o700)?;
        let base_dir = make(&config.base_dir, 0o755)?;
        let mirrors = match &config.mirror {
            Some(m) => (m.clone(), image::apt_mirrors().1),
            None => image::apt_mirrors(),
        };
        Ok(LxcBackend {
            inner: Arc::new(Inner {
                root,
                base_dir,
                default_image: config.default_image,
                mirrors,
                network: config.network,
                delegate: config.delegate,
                agent: if config.agent { agent_command() } else { None },
                envs: Mutex::new(HashMap::new()),
                agent_execs: Mutex::new(HashMap::new()),
                execs: Mutex::new(HashMap::new()),
                builds: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The (canonical) directory job containers live in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The base container of `image`, built (once, cached) when missing.
    pub async fn base(&self, image: &Image) -> Result<PathBuf> {
        let template = image.check(Path::new(lxc::DEBOOTSTRAP_SCRIPTS))?;
        let name = image.base_name(template);
        if let Some(dir) = image::finished(&self.inner.base_dir, &name) {
            return Ok(dir);
        }
        let _one = self.inner.builds.lock().await;
        let base_dir = self.inner.base_dir.clone();
        let image = image.clone();
        let mirrors = self.inner.mirrors.clone();
        tokio::task::spawn_blocking(move || {
            // Another kiln may be building the same base: wait for it.
            let lock_path = base_dir.join(format!("{name}.lock"));
            let file = std::fs::File::create(&lock_path)
                .map_err(|e| Error::io(format!("creating {}", lock_path.display()), &e))?;
            let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| {
                    Error::unavailable(format!("locking {}: {e}", lock_path.display()))
                })?;
            image::build(&base_dir, &name, &image, template, (&mirrors.0, &mirrors.1))
        })
        .await
        .map_err(|e| Error::internal(format!("the build task failed: {e}")))?
    }

    fn capabilities_now(&self) -> Capabilities {
        let layer = match &self.inner.delegate {
            Some(backend) => LayerSupport::Delegated { backend: backend.clone() },
            None => LayerSupport::Unsupported(NO_CONTAINERS.to_owned()),
        };
        Capabilities {
            plugin_name: "lxc".to_owned(),
            plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            instance_id: String::new(),
            environment: LayerSupport::Native,
            job_container: layer.clone(),
            service_containers: layer.clone(),
            step_containers: layer,
            features: Features {
                stdin: true,
                tty: false,
                local_copy: false,
                image_build: false,
                exec_files: true,
                exec_timeout: true,
                health: false,
            },
            os: "linux".to_owned(),
            arch: crate::go_arch().to_owned(),
            max_message_bytes: 0,
        }
    }

    /// The environment as returned, with the delegation: the delegate mounts `job/` at the
    /// same path.
    fn returned(&self, env: &Env) -> Environment {
        let mut environment = env::environment(&env.meta, &env.dir);
        if let Some(backend) = &self.inner.delegate {
            let mut options = serde_json::Map::new();
            options.insert("host_dir".into(), env.job_dir().to_string_lossy().into_owned().into());
            environment.delegation = Some(Delegation { backend: backend.clone(), options });
        }
        environment
    }

    /// The environment `id`, from memory or (after a restart) from its directory.
    fn env(&self, id: &str) -> Result<Option<Arc<Env>>> {
        let mut envs = lock(&self.inner.envs);
        if let Some(e) = envs.get(id) {
            return Ok(Some(Arc::clone(e)));
        }
        let dir = self.inner.root.join(id);
        let Some(meta) = env::read_meta(&dir)? else {
            return Ok(None);
        };
        let env = Arc::new(Env::new(dir, meta));
        envs.insert(id.to_owned(), Arc::clone(&env));
        Ok(Some(env))
    }

    /// Like [`Self::env`], NOT_FOUND when missing or being removed.
    fn live_env(&self, id: &str) -> Result<Arc<Env>> {
        validate_id(id, "environment_id")?;
        match self.env(id)? {
            Some(env) if !lock(&env.state).removed => Ok(env),
            _ => Err(Error::not_found(format!("environment {id:?} does not exist"))
                .field("environment_id")),
        }
    }

    fn check_container(env: &Env, container_id: &str) -> Result<()> {
        validate_id(container_id, "container_id")?;
        if container_id != PRIMARY {
            return Err(Error::not_found(format!(
                "container {container_id:?} does not exist in environment {:?}: the lxc backend \
                 has only its primary container {PRIMARY:?}",
                env.id
            ))
            .field("container_id"));
        }
        Ok(())
    }

    /// The container's root, starting the container when it is not running (after a reboot,
    /// or when a previous plugin process was killed during the create).
    async fn running(&self, env: &Env) -> Result<Arc<Rootfs>> {
        if let Some(r) = lock(&env.state).rootfs.clone() {
            return Ok(r);
        }
        let _starting = env.starting.lock().await;
        if let Some(r) = lock(&env.state).rootfs.clone() {
            return Ok(r);
        }
        let root = &self.inner.root;
        let pid = match lxc::init_pid(root, &env.id).await? {
            Some(pid) => pid,
            None => lxc::start(root, &env.id, &env.dir).await?,
        };
        let rootfs = Arc::new(Rootfs::open(pid).map_err(|e| {
            Error::unavailable(format!("opening the root of container {}: {e}", env.id))
        })?);
        // The agent of a container started by a previous plugin process.
        let socket = env.job_dir().join(env::AGENT_SOCKET);
        let agent = if self.inner.agent.is_some() && socket.exists() {
            connect_agent(&socket).await.ok()
        } else {
            None
        };
        let mut st = lock(&env.state);
        st.rootfs = Some(Arc::clone(&rootfs));
        if st.agent.is_none() {
            st.agent = agent;
        }
        Ok(rootfs)
    }

    /// Starts the agent in the container (the host backend, as `lxc-attach` runs it: in the
    /// container's namespaces, cgroup and capabilities), connects, and creates its
    /// environment `job/env/`. `None` when it does not come up (a libc this executable cannot
    /// run on, …): execs then use `lxc-attach` each.
    async fn start_agent(&self, env: &Env, req: &EnvironmentRequest) -> Option<GrpcBackend> {
        let (_, args) = self.inner.agent.as_ref()?;
        let job = env.job_dir();
        let socket = job.join(env::AGENT_SOCKET);
        let log = std::fs::File::create(env.dir.join("agent.log")).ok()?;
        let mut cmd = tokio::process::Command::new("lxc-attach");
        cmd.arg("-P")
            .arg(&self.inner.root)
            .args(["-n", &env.id, "--clear-env"])
            .args(["-v", "HOME=/root", "-v", "KILN_LOG=warn"])
            .args(["-v", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
            .args(["--", env::AGENT_EXE])
            .args(args)
            .arg("--root")
            .arg(&job)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(env = %env.id, error = %e, "cannot start the agent");
                return None;
            }
        };
        // Reaped when the container stops (the agent with it).
        let died = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&died);
        tokio::spawn(async move {
            let _ = child.wait().await;
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            if died.load(std::sync::atomic::Ordering::Relaxed)
                || tokio::time::Instant::now() > deadline
            {
                let tail = image::tail(&env.dir.join("agent.log"), 5);
                tracing::warn!(env = %env.id, log = %tail, "the agent did not come up: execs use lxc-attach");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let agent = match connect_agent(&socket).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(env = %env.id, error = %e.message, "cannot reach the agent");
                return None;
            }
        };
        let inner = EnvironmentRequest {
            environment_id: env::AGENT_ENV.to_owned(),
            owner: req.owner.clone(),
            label: req.label.clone(),
            options: serde_json::Map::new(),
            hints: Default::default(),
        };
        match agent.create_environment(inner).await {
            Ok(_) => Some(agent),
            Err(e) => {
                tracing::warn!(env = %env.id, error = %e.message, "the agent refused its environment");
                None
            }
        }
    }

    /// The image an environment request names: `args` (from a label `lxc://DISTRO:RELEASE`)
    /// or `image`, else the default.
    fn image_of(&self, req: &EnvironmentRequest) -> Result<Image> {
        let mut image = None;
        for (k, v) in &req.options {
            match (k.as_str(), v.as_str()) {
                ("args" | "image", Some(s)) => {
                    image = Some(s.parse::<Image>().map_err(|e| {
                        Error::invalid_argument(format!("options.{k}: {e}"))
                            .field(format!("options.{k}"))
                    })?);
                }
                ("args" | "image", None) => {
                    return Err(Error::invalid_argument(format!(
                        "options.{k} must be a string like \"debian:bookworm\""
                    ))
                    .field(format!("options.{k}")));
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown option {k:?}: the lxc backend takes image (DISTRO:RELEASE, \
                         also given as the label's lxc://DISTRO:RELEASE)"
                    ))
                    .field(format!("options.{k}")));
                }
            }
        }
        Ok(image.unwrap_or_else(|| self.inner.default_image.clone()))
    }

    /// Creates and starts a new environment; on failure nothing of it is left.
    async fn create_new(&self, req: &EnvironmentRequest, hash: String) -> Result<Arc<Env>> {
        let image = self.image_of(req)?;
        let base = self.base(&image).await?;
        let id = &req.environment_id;
        let dir = self.inner.root.join(id);
        let meta = EnvMeta::new(req, hash, image.to_string());
        // kiln.json first: an interrupted create is still listed and collected.
        env::create_dir(&dir, &meta)?;
        let env = Arc::new(Env::new(dir.clone(), meta));
        let made = async {
            let work = env.job_dir();
            let p = env::paths(&dir);
            for d in [
                dir.join("delta0"),
                PathBuf::from(&p.workspace),
                PathBuf::from(&p.temp),
                PathBuf::from(&p.tool_cache),
                PathBuf::from(&p.runner_files),
            ] {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&d)
                    .map_err(|e| Error::io(format!("creating {}", d.display()), &e))?;
            }
            let exe = self.inner.agent.as_ref().map(|(e, _)| e.as_path());
            let config = lxc::config(id, &base, &dir, &work, &self.inner.network, exe);
            std::fs::write(dir.join("config"), config)
                .map_err(|e| Error::io(format!("writing {}/config", dir.display()), &e))?;
            let rootfs = self.running(&env).await?;
            if lock(&env.state).agent.is_none() {
                let agent = self.start_agent(&env, req).await;
                lock(&env.state).agent = agent;
            }
            Ok::<_, Error>(rootfs)
        }
        .await;
        if let Err(e) = made {
            let _ = self.destroy(&env.id, &dir).await;
            return Err(e);
        }
        Ok(env)
    }

    /// Stops the container and deletes its directory.
    async fn destroy(&self, id: &str, dir: &Path) -> Result<()> {
        if dir.join("config").is_file() {
            lxc::stop(&self.inner.root, id).await?;
        }
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", dir.display()), &e)),
        })
        .await
        .map_err(|e| Error::internal(format!("the removal task failed: {e}")))?
    }

    fn exec_handle(&self, exec_id: &str) -> Result<Option<Arc<ExecHandle>>> {
        validate_id(exec_id, "exec_id")?;
        if let Some(h) = lock(&self.inner.execs).get(exec_id) {
            return Ok(Some(Arc::clone(h)));
        }
        let envs: Vec<Arc<Env>> = lock(&self.inner.envs).values().cloned().collect();
        if envs.iter().any(|e| lock(&e.state).exec_ids.contains(exec_id)) {
            return Ok(None);
        }
        Err(Error::not_found(format!("exec {exec_id:?} does not exist")).field("exec_id"))
    }
}

#[async_trait::async_trait]
impl Backend for LxcBackend {
    async fn capabilities(&self, _request: CapabilitiesRequest) -> Result<Capabilities> {
        Ok(self.capabilities_now())
    }

    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        validate_id(&request.environment_id, "environment_id")?;
        let id = request.environment_id.clone();
        let hash = kiln_plugin_sdk::spec::environment_spec_hash(&request);
        if let Some(env) = self.env(&id)? {
            if lock(&env.state).removed {
                return Err(Error::unavailable(format!(
                    "environment {id:?} is being removed; retry the create"
                )));
            }
            if env.meta.spec_hash != hash {
                return Err(Error::already_exists(format!(
                    "environment {id:?} exists with a different spec"
                ))
                .field("environment_id"));
            }
            self.running(&env).await?;
            return Ok(self.returned(&env));
        }
        let started = std::time::Instant::now();
        let env = self.create_new(&request, hash).await?;
        let environment = self.returned(&env);
        lock(&self.inner.envs).insert(id.clone(), env);
        // The job start (clone + start; bench/lxc.py reads it).
        let start_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(env = %id, runner = %request.owner.runner_id, job = %request.owner.job_id, start_ms, "environment created");
        Ok(environment)
    }

    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        let env = self.live_env(&target.environment_id)?;
        Self::check_container(&env, &target.container_id)?;
        let running = matches!(lxc::init_pid(&self.inner.root, &env.id).await, Ok(Some(_)));
        Ok(ContainerStatus {
            id: PRIMARY.to_owned(),
            state: if running { ContainerState::Running } else { ContainerState::Exited },
            health: Health::None,
            image_env: IMAGE_ENV.iter().map(|s| (*s).to_owned()).collect(),
            ..ContainerStatus::default()
        })
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        validate_id(&request.exec_id, "exec_id")?;
        if request.tty {
            // `tty` is not declared (§3.3: refused, never ignored), with or without the agent.
            return Err(Error::unimplemented(
                "tty = true: the lxc backend does not allocate pseudo-terminals (feature tty is \
                 not declared)",
            )
            .fault(kiln_plugin_sdk::Fault::Config)
            .field("tty"));
        }
        let env = self.live_env(&request.environment_id)?;
        Self::check_container(&env, &request.container_id)?;
        let exec_id = request.exec_id.clone();
        {
            // Reserve the id: an exec id is never run twice (rule 3).
            let mut st = lock(&env.state);
            if st.exec_ids.contains(&exec_id) || lock(&self.inner.execs).contains_key(&exec_id) {
                return Err(Error::already_exists(format!(
                    "exec id {exec_id:?} was used before: exec is not replayable"
                ))
                .field("exec_id"));
            }
            env.log_exec(&mut st, &exec_id);
        }
        let rootfs = self.running(&env).await?;
        let agent = lock(&env.state).agent.clone();
        if let Some(agent) = agent {
            // The agent's own environment and container; everything else as asked.
            let mut forwarded = request;
            forwarded.environment_id = env::AGENT_ENV.to_owned();
            forwarded.container_id = "host".to_owned();
            lock(&self.inner.agent_execs).insert(exec_id, agent.clone());
            return agent.exec(forwarded).await;
        }
        let (handle, stream) = crate::exec::start(&self.inner.root, &env, rootfs, request)?;
        lock(&self.inner.execs).insert(exec_id, handle);
        Ok(stream)
    }

    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        let signal = Signal::try_from(request.signal).map_err(|_| {
            Error::invalid_argument(format!("{} is not a signal number", request.signal))
                .field("signal")
        })?;
        let agent = lock(&self.inner.agent_execs).get(&request.exec_id).cloned();
        if let Some(agent) = agent {
            return agent.signal_exec(request).await;
        }
        let Some(handle) = self.exec_handle(&request.exec_id)? else {
            return Ok(false);
        };
        Ok(handle.signal(signal, request.grace))
    }

    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        let agent = lock(&self.inner.agent_execs).get(&exec_id).cloned();
        if let Some(agent) = agent {
            return agent.write_stdin(exec_id, data).await;
        }
        let handle = self.exec_handle(&exec_id)?.ok_or_else(|| {
            Error::failed_precondition(format!("exec {exec_id:?} is no longer running"))
        })?;
        handle.write_stdin(&exec_id, data).await
    }

    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        let env = self.live_env(&target.environment_id)?;
        Self::check_container(&env, &target.container_id)?;
        if target.local_path.is_some() {
            return Err(Error::unimplemented(
                "the lxc backend does not declare local_copy: send a tar stream",
            )
            .field("local_path"));
        }
        let rootfs = self.running(&env).await?;
        let dest = rootfs.dir(&target.dest_path, "dest_path")?;
        // The directory stays open (and its /proc/self/fd path valid) until the end.
        let stats = kiln_plugin_sdk::archive::unpack_stream(data, dest.path()).await;
        drop(dest);
        stats
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        let env = self.live_env(&source.environment_id)?;
        Self::check_container(&env, &source.container_id)?;
        let rootfs = self.running(&env).await?;
        crate::rootfs::components(&source.path, "path")?;
        if !rootfs.exists(&source.path) {
            return Err(Error::not_found(format!("{} does not exist", source.path)).field("path"));
        }
        let (dir, name) = rootfs.parent(&source.path, "path")?;
        let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            let src = dir.path().join(&name);
            let name = name.to_string_lossy().into_owned();
            let out = kiln_plugin_sdk::archive::ChunkWriter::new(tx.clone());
            if let Err(e) = kiln_plugin_sdk::archive::pack(&src, &name, out) {
                let _ = tx.blocking_send(Err(e));
            }
            drop(dir);
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let id = &request.environment_id;
        validate_id(id, "environment_id")?;
        if let Some(container) = &request.container_id {
            // Only the primary container exists, and it lives as long as the environment.
            validate_id(container, "container_id")?;
            return Ok(false);
        }
        let Some(env) = self.env(id)? else {
            // A directory without kiln.json: an interrupted create.
            let dir = self.inner.root.join(id);
            if dir.is_dir() {
                self.destroy(id, &dir).await?;
                return Ok(true);
            }
            return Ok(false);
        };
        {
            let mut st = lock(&env.state);
            st.removed = true;
            st.rootfs = None;
            st.agent = None;
        }
        // Stopping the container ends every process of the job (its PID namespace).
        self.destroy(id, &env.dir).await?;
        let exec_ids: Vec<String> = lock(&env.state).exec_ids.iter().cloned().collect();
        {
            let mut execs = lock(&self.inner.execs);
            let mut agent_execs = lock(&self.inner.agent_execs);
            for e in &exec_ids {
                execs.remove(e);
                agent_execs.remove(e);
            }
        }
        let mut envs = lock(&self.inner.envs);
        if envs.get(id).is_some_and(|e| Arc::ptr_eq(e, &env)) {
            envs.remove(id);
        }
        tracing::info!(env = %id, "environment removed");
        Ok(true)
    }

    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        let root = self.inner.root.clone();
        tokio::task::spawn_blocking(move || list(&root, &selector))
            .await
            .map_err(|e| Error::internal(format!("the listing task failed: {e}")))?
    }
}

fn list(root: &Path, selector: &Selector) -> Result<Vec<EnvironmentSummary>> {
    kiln_plugin_sdk::record::list_dirs(root, selector, |dir| {
        env::read_meta(dir).map(|meta| meta.map(|m| m.summary()))
    })
}
