//! [`HostBackend`]: the [`Backend`] implementation of the host plugin.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use kiln_plugin_sdk::ids::validate_id;
use kiln_plugin_sdk::{
    Backend, ByteStream, Capabilities, CapabilitiesRequest, ContainerRef, ContainerState,
    ContainerStatus, CopyInTarget, CopyOutSource, CopyStats, Environment, EnvironmentRequest,
    EnvironmentSummary, Error, ExecRequest, ExecStream, Features, Health, LayerSupport,
    PROTOCOL_VERSION, RemoveRequest, Result, Selector, SignalRequest,
};
use nix::sys::signal::Signal;

use crate::env::{self, Env, PRIMARY};
use crate::exec::{self, ExecHandle};
use crate::{HostConfig, copy, lock, procs};

/// Why the container layers are unsupported.
const NO_CONTAINERS: &str = "the host backend runs steps directly on this machine; configure a \
                             docker plugin for container:, services: and docker steps";

/// Variables of the plugin's own environment that `inspect` reports as the primary
/// container's "image environment", so the runner can build a step's environment from them.
const BASE_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ"];

/// The host backend: environments are private directories under [`HostConfig::root`]; steps
/// run as processes of this machine, each exec in its own process group.
#[derive(Clone)]
pub struct HostBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// Canonical root directory.
    root: PathBuf,
    /// Canonical shared tool cache, when configured.
    tool_cache: Option<PathBuf>,
    /// The kernel's boot id: process groups logged under another boot are long gone.
    kernel_boot: String,
    /// The real HOME of this user.
    home: String,
    /// Where container layers are delegated.
    delegate: Option<String>,
    /// Options added to the delegation.
    delegate_options: Vec<(String, String)>,
    envs: Mutex<HashMap<String, Arc<Env>>>,
    execs: Mutex<HashMap<String, Arc<ExecHandle>>>,
    /// Deletions of removed environments' directories, renamed aside into [`REMOVED_DIR`].
    removals: Mutex<tokio::task::JoinSet<()>>,
    /// Numbers the directories renamed aside.
    removed_seq: std::sync::atomic::AtomicU64,
    /// How environments' processes are held (cgroup, subreaper, groups).
    containment: procs::Containment,
}

/// The directory under the root that Remove renames environment directories into, to delete
/// them after answering. No environment id can name it (ids never start with a dot), so
/// `ListEnvironments` never sees it; [`HostBackend::drain_removals`] empties and deletes it
/// before the plugin exits, and a plugin that was killed first finishes the job at its next
/// start.
const REMOVED_DIR: &str = ".removed";

impl std::fmt::Debug for HostBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBackend").field("root", &self.inner.root).finish_non_exhaustive()
    }
}

impl HostBackend {
    /// Creates the root directory (0700) when missing.
    pub fn new(config: HostConfig) -> anyhow::Result<HostBackend> {
        use std::os::unix::fs::PermissionsExt;
        let make = |dir: &Path| -> anyhow::Result<PathBuf> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))
        };
        let root = make(&config.root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", root.display()))?;
        // Each environment's directory in another block group than the last one deleted (see
        // `kiln_plugin_sdk::dirs`): jobs took a fraction of the time with it (bench/RESULTS.md).
        if !kiln_plugin_sdk::dirs::spread_subdirectories(&root) {
            let root = root.display();
            tracing::debug!(%root, "the filesystem does not take the top-directory hint");
        }
        let tool_cache = config.tool_cache.as_deref().map(make).transpose()?;
        let home = std::env::var("HOME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir.to_string_lossy().into_owned())
                .unwrap_or_else(|| "/".to_owned())
        });
        let containment = procs::Containment::new(config.containment, &root);
        let backend = HostBackend {
            inner: Arc::new(Inner {
                root,
                tool_cache,
                kernel_boot: procs::kernel_boot_id(),
                home,
                delegate: config.delegate.clone(),
                delegate_options: config.delegate_options.clone(),
                envs: Mutex::new(HashMap::new()),
                execs: Mutex::new(HashMap::new()),
                removals: Mutex::new(tokio::task::JoinSet::new()),
                removed_seq: std::sync::atomic::AtomicU64::new(0),
                containment,
            }),
        };
        // What a killed plugin renamed aside and did not delete.
        let removed = backend.inner.root.join(REMOVED_DIR);
        if let Ok(entries) = std::fs::read_dir(&removed) {
            for entry in entries.flatten() {
                backend.delete_later(entry.path());
            }
        }
        Ok(backend)
    }

    /// Deletes `dir` in the background (on the blocking pool), or now when there is no
    /// runtime.
    fn delete_later(&self, dir: PathBuf) {
        let delete = move || {
            if let Err(e) = delete_tree_now(&dir) {
                let dir = dir.display();
                tracing::warn!(%dir, error = %e, "cannot delete a removed environment");
            }
        };
        if tokio::runtime::Handle::try_current().is_err() {
            delete();
            return;
        }
        let mut set = lock(&self.inner.removals);
        while set.try_join_next().is_some() {}
        set.spawn_blocking(delete);
    }

    /// Deletes the directory of a removed environment: renamed aside at once (so the
    /// environment is gone when Remove answers) and deleted in the background (on a
    /// filesystem that discards freed blocks, deleting a job's tree takes longer than
    /// running a short job). A failed rename deletes in place.
    async fn delete_env_dir(&self, dir: PathBuf) -> Result<()> {
        let removed = self.inner.root.join(REMOVED_DIR);
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&removed)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            let shown = removed.display();
            tracing::debug!(dir = %shown, error = %e, "cannot create the removal directory");
            return delete_tree(dir).await;
        }
        let n = self.inner.removed_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let aside = removed.join(format!("{name}.{}.{n}", std::process::id()));
        match std::fs::rename(&dir, &aside) {
            Ok(()) => {
                self.delete_later(aside);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                let shown = dir.display();
                tracing::debug!(dir = %shown, error = %e, "cannot rename aside: deleting in place");
                delete_tree(dir).await
            }
        }
    }

    /// Waits for the background deletions of removed environments, then deletes the
    /// directory they were renamed into. Called before the plugin exits: nothing a removed
    /// environment held is left behind.
    pub async fn drain_removals(&self) {
        loop {
            let mut set = std::mem::take(&mut *lock(&self.inner.removals));
            if set.is_empty() {
                break;
            }
            while set.join_next().await.is_some() {}
        }
        let _ = std::fs::remove_dir(self.inner.root.join(REMOVED_DIR));
        self.inner.containment.release();
    }

    /// The (canonical) directory environments live in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The capabilities of the host backend, without a request.
    pub fn host_capabilities(&self) -> Capabilities {
        Capabilities {
            plugin_name: "host".to_owned(),
            plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            instance_id: String::new(),
            environment: LayerSupport::Native,
            job_container: self.container_layer(),
            service_containers: self.container_layer(),
            step_containers: self.container_layer(),
            features: Features {
                stdin: true,
                tty: false,
                local_copy: true,
                image_build: false,
                exec_files: true,
                exec_timeout: true,
                health: false,
            },
            os: crate::go_os().to_owned(),
            arch: crate::go_arch().to_owned(),
            max_message_bytes: 0,
        }
    }

    /// The support of the three container layers: delegated with `--delegate`, else none.
    fn container_layer(&self) -> LayerSupport {
        match &self.inner.delegate {
            Some(backend) => LayerSupport::Delegated { backend: backend.clone() },
            None => LayerSupport::Unsupported(NO_CONTAINERS.to_owned()),
        }
    }

    /// An environment as returned, with the delegation when container layers are delegated:
    /// the delegate mounts the environment's directory at the same path (`host_dir`).
    fn returned(&self, mut environment: Environment) -> Environment {
        if let Some(backend) = &self.inner.delegate {
            let dir = self.inner.root.join(&environment.id);
            let mut options = serde_json::Map::new();
            options.insert("host_dir".into(), dir.to_string_lossy().into_owned().into());
            for (k, v) in &self.inner.delegate_options {
                options.insert(k.clone(), v.clone().into());
            }
            environment.delegation =
                Some(kiln_plugin_sdk::Delegation { backend: backend.clone(), options });
        }
        environment
    }

    /// The environment `id`, from memory or (after a restart) from its directory.
    fn env(&self, id: &str) -> Result<Option<Arc<Env>>> {
        let mut envs = lock(&self.inner.envs);
        if let Some(e) = envs.get(id) {
            return Ok(Some(Arc::clone(e)));
        }
        let Some(env) = Env::load(&self.inner.root, id, &self.inner.kernel_boot)? else {
            return Ok(None);
        };
        let env = Arc::new(env);
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
                "container {container_id:?} does not exist in environment {:?}: the host \
                 backend has only its primary container {PRIMARY:?}",
                env.id
            ))
            .field("container_id"));
        }
        Ok(())
    }

    /// Directories copies may touch: the environment's, and the shared tool cache.
    fn copy_roots<'a>(&'a self, env: &'a Env) -> Vec<&'a Path> {
        let mut roots = vec![env.dir.as_path()];
        if let Some(tc) = &self.inner.tool_cache {
            roots.push(tc);
        }
        roots
    }

    fn exec_handle(&self, exec_id: &str) -> Result<Option<Arc<ExecHandle>>> {
        validate_id(exec_id, "exec_id")?;
        if let Some(h) = lock(&self.inner.execs).get(exec_id) {
            return Ok(Some(Arc::clone(h)));
        }
        // An exec of a previous plugin process: known, but no longer followed.
        let envs: Vec<Arc<Env>> = lock(&self.inner.envs).values().cloned().collect();
        if envs.iter().any(|e| lock(&e.state).exec_ids.contains(exec_id)) {
            return Ok(None);
        }
        Err(Error::not_found(format!("exec {exec_id:?} does not exist")).field("exec_id"))
    }

    /// Kills every process group of a removed environment: SIGTERM, up to `grace` for them to
    /// go, SIGKILL.
    async fn kill_groups(env: &Env, groups: Vec<env::Group>, grace: Duration) {
        let mut targets = Vec::new();
        let mut table = None;
        let candidates: Vec<i32> = groups.iter().map(|g| g.pgid).collect();
        let alive = procs::alive_groups(&candidates);
        for g in groups {
            if g.exec.as_ref().is_some_and(|h| !h.is_done()) {
                targets.push(g.pgid);
                continue;
            }
            if !alive.contains(&g.pgid) {
                continue;
            }
            let t = table.get_or_insert_with(procs::ProcTable::scan);
            if t.belongs(g.pgid, g.start, &env.dir) {
                targets.push(g.pgid);
            } else {
                tracing::warn!(
                    env = %env.id, pgid = g.pgid,
                    "not killing process group: it cannot be shown to belong to the environment"
                );
            }
        }
        if targets.is_empty() {
            return;
        }
        for &pg in &targets {
            procs::signal_group(pg, Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            targets = procs::alive_groups(&targets);
            if targets.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for pg in targets {
            tracing::debug!(env = %env.id, pgid = pg, "process group survived SIGTERM: killing");
            procs::signal_group(pg, Signal::SIGKILL);
        }
    }
}

/// Deletes a directory tree; processes that were just killed may still be writing, so a
/// non-empty directory is retried a few times.
async fn delete_tree(dir: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || delete_tree_now(&dir))
        .await
        .map_err(|e| Error::internal(format!("the removal task failed: {e}")))?
}

/// [`delete_tree`], blocking.
fn delete_tree_now(dir: &Path) -> Result<()> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt < 5 => {
                tracing::debug!(dir = %dir.display(), error = %e, "retrying removal");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::io(format!("removing {}", dir.display()), &e)),
        }
    }
}

#[async_trait::async_trait]
impl Backend for HostBackend {
    async fn capabilities(&self, _request: CapabilitiesRequest) -> Result<Capabilities> {
        Ok(self.host_capabilities())
    }

    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        validate_id(&request.environment_id, "environment_id")?;
        let id = request.environment_id.clone();
        let hash = env::spec_hash(&request);
        let existing = self.env(&id)?;
        let mut envs = lock(&self.inner.envs);
        if let Some(env) = existing.or_else(|| envs.get(&id).cloned()) {
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
            env.ensure_tree()?;
            return Ok(self.returned(env.meta.environment()));
        }
        let env = Env::create(
            &self.inner.root,
            &request,
            hash,
            &self.inner.home,
            self.inner.tool_cache.as_deref(),
        )?;
        let environment = self.returned(env.meta.environment());
        envs.insert(id.clone(), Arc::new(env));
        tracing::info!(env = %id, runner = %request.owner.runner_id, job = %request.owner.job_id, "environment created");
        Ok(environment)
    }

    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        let env = self.live_env(&target.environment_id)?;
        Self::check_container(&env, &target.container_id)?;
        let image_env = BASE_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
            .collect();
        Ok(ContainerStatus {
            id: PRIMARY.to_owned(),
            state: ContainerState::Running,
            health: Health::None,
            image_env,
            ..ContainerStatus::default()
        })
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        validate_id(&request.exec_id, "exec_id")?;
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
            st.exec_ids.insert(exec_id.clone());
        }
        let (handle, stream) =
            exec::start(&env, request, &self.inner.kernel_boot, &self.inner.containment)?;
        lock(&self.inner.execs).insert(exec_id, handle);
        Ok(stream)
    }

    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        let signal = Signal::try_from(request.signal).map_err(|_| {
            Error::invalid_argument(format!("{} is not a signal number", request.signal))
                .field("signal")
        })?;
        let Some(handle) = self.exec_handle(&request.exec_id)? else {
            return Ok(false);
        };
        Ok(handle.inner.signal(signal, request.grace))
    }

    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        let handle = self.exec_handle(&exec_id)?.ok_or_else(|| {
            Error::failed_precondition(format!("exec {exec_id:?} is no longer running"))
        })?;
        handle.inner.write_stdin(&exec_id, data).await
    }

    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        let env = self.live_env(&target.environment_id)?;
        Self::check_container(&env, &target.container_id)?;
        let dest = copy::resolve_inside(&self.copy_roots(&env), &target.dest_path, "dest_path")?;
        match target.local_path {
            Some(local) => {
                let src = PathBuf::from(&local);
                if !src.is_absolute() {
                    return Err(Error::invalid_argument(format!(
                        "local_path {local:?} is not an absolute path"
                    ))
                    .field("local_path"));
                }
                tokio::task::spawn_blocking(move || copy::copy_local(&src, &dest))
                    .await
                    .map_err(|e| Error::internal(format!("the copy task failed: {e}")))?
            }
            None => kiln_plugin_sdk::archive::unpack_stream(data, dest).await,
        }
    }

    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        let env = self.live_env(&source.environment_id)?;
        Self::check_container(&env, &source.container_id)?;
        let path = copy::resolve_inside(&self.copy_roots(&env), &source.path, "path")?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::not_found(format!("{} does not exist", source.path)).field("path"));
        }
        Ok(copy::pack_stream(path))
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
            // A directory without env.json is an interrupted create: remove it too.
            let dir = self.inner.root.join(id);
            if dir.is_dir() {
                self.delete_env_dir(dir).await?;
                return Ok(true);
            }
            return Ok(false);
        };
        let groups = {
            let mut st = lock(&env.state);
            st.removed = true;
            Env::close_log(&mut st);
            std::mem::take(&mut st.groups)
        };
        let grace = kiln_plugin_sdk::child::grace_or_default(request.grace);
        Self::kill_groups(&env, groups, grace).await;
        let created = env.meta.owner.created_at_unix_ms;
        self.inner.containment.end_all(&env.id, &env.dir, created, grace).await;
        self.delete_env_dir(env.dir.clone()).await?;
        let exec_ids: Vec<String> = lock(&env.state).exec_ids.iter().cloned().collect();
        {
            let mut execs = lock(&self.inner.execs);
            for e in &exec_ids {
                if execs.get(e).is_some_and(|h| h.env_id == env.id) {
                    execs.remove(e);
                }
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
