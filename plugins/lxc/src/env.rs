//! Environments on disk: `root/<id>/` is an LXC container (`config`, `delta0/` the overlay's
//! upper directory, `work/` its work directory, `lxc.log`) with `kiln.json` beside its config
//! (owner labels, spec hash, image) and `job/`, the directory bind-mounted at the same path
//! inside the container. `execs` logs every exec
//! id used, so an id is never run twice, even across a plugin restart.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_plugin_sdk::{
    Environment, EnvironmentRequest, EnvironmentSummary, Error, Owner, Paths, Result,
};
use serde::{Deserialize, Serialize};

pub(crate) use kiln_plugin_sdk::record::StoredOwner;

use crate::rootfs::Rootfs;

/// The owner file, beside the container's config.
pub(crate) const META_FILE: &str = "kiln.json";
/// The log of exec ids.
const EXECS_FILE: &str = "execs";
/// The id of the agent's environment (the host backend inside the container, whose root is
/// `job/`): its directory `job/env/` holds the job's work directories in either mode.
pub(crate) const AGENT_ENV: &str = "env";
/// The agent's socket, in `job/`.
pub(crate) const AGENT_SOCKET: &str = "agent.sock";
/// Where the plugin's executable is mounted in the container, to serve the agent.
pub(crate) const AGENT_EXE: &str = "/usr/local/libexec/kiln-agent";

/// The fixed id of the primary container: the LXC container itself.
pub(crate) const PRIMARY: &str = "lxc";

/// What `kiln.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EnvMeta {
    pub(crate) format: u32,
    pub(crate) id: String,
    pub(crate) spec_hash: String,
    pub(crate) label: String,
    pub(crate) image: String,
    pub(crate) owner: StoredOwner,
}

impl EnvMeta {
    pub(crate) fn new(req: &EnvironmentRequest, hash: String, image: String) -> EnvMeta {
        let o = &req.owner;
        EnvMeta {
            format: 1,
            id: req.environment_id.clone(),
            spec_hash: hash,
            label: req.label.clone(),
            image,
            owner: StoredOwner {
                runner_id: o.runner_id.clone(),
                boot_id: o.boot_id.clone(),
                job_id: o.job_id.clone(),
                parent_environment_id: o.parent_environment_id.clone(),
                created_at_unix_ms: kiln_plugin_sdk::time::now_ms(),
                expires_at_unix_ms: o.expires_at_unix_ms,
                labels: o.labels.clone(),
            },
        }
    }

    pub(crate) fn summary(&self) -> EnvironmentSummary {
        EnvironmentSummary {
            id: self.id.clone(),
            owner: Owner::from(&self.owner),
            container_ids: vec![PRIMARY.to_owned()],
        }
    }
}

/// The paths of an environment whose directory is `dir`: all inside `dir/job`, which is
/// mounted at the same path in the container.
pub(crate) fn paths(dir: &Path) -> Paths {
    let job = dir.join("job").join(AGENT_ENV);
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    Paths {
        workspace: s(job.join("workspace")),
        temp: s(job.join("temp")),
        tool_cache: s(job.join("tool-cache")),
        runner_files: s(job.join("runner")),
        home: "/root".to_owned(),
    }
}

/// The environment as returned to the runner.
pub(crate) fn environment(meta: &EnvMeta, dir: &Path) -> Environment {
    Environment {
        id: meta.id.clone(),
        primary_container_id: PRIMARY.to_owned(),
        os: "linux".to_owned(),
        arch: crate::go_arch().to_owned(),
        paths: paths(dir),
        path_variable: "PATH".to_owned(),
        path_separator: ":".to_owned(),
        delegation: None,
        owner: Owner::from(&meta.owner),
    }
}

/// The mutable part of an environment.
#[derive(Default)]
pub(crate) struct EnvState {
    /// Set by Remove: no new exec may start.
    pub(crate) removed: bool,
    /// Every exec id used in the environment (never reusable).
    pub(crate) exec_ids: HashSet<String>,
    /// The open `execs` log.
    log: Option<fs::File>,
    /// The container's root, while it runs.
    pub(crate) rootfs: Option<Arc<Rootfs>>,
    /// The agent inside the container, once connected.
    pub(crate) agent: Option<kiln_plugin_sdk::client::GrpcBackend>,
}

/// An environment known to this plugin process.
pub(crate) struct Env {
    pub(crate) id: String,
    /// `root/<id>`.
    pub(crate) dir: PathBuf,
    pub(crate) meta: EnvMeta,
    pub(crate) state: Mutex<EnvState>,
    /// Serializes starting the container.
    pub(crate) starting: tokio::sync::Mutex<()>,
}

impl Env {
    pub(crate) fn new(dir: PathBuf, meta: EnvMeta) -> Env {
        let exec_ids = read_execs(&dir);
        Env {
            id: meta.id.clone(),
            dir,
            meta,
            state: Mutex::new(EnvState { exec_ids, ..EnvState::default() }),
            starting: tokio::sync::Mutex::new(()),
        }
    }

    /// `job/` (bind-mounted at the same path in the container).
    pub(crate) fn job_dir(&self) -> PathBuf {
        self.dir.join("job")
    }

    /// Records an exec id. Called with the state locked.
    pub(crate) fn log_exec(&self, state: &mut EnvState, exec_id: &str) {
        state.exec_ids.insert(exec_id.to_owned());
        if state.log.is_none() {
            let path = self.dir.join(EXECS_FILE);
            match fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path) {
                Ok(f) => state.log = Some(f),
                Err(e) => {
                    tracing::warn!(env = %self.id, error = %e, "cannot open the exec log");
                    return;
                }
            }
        }
        if let Some(f) = state.log.as_mut()
            && let Err(e) = f.write_all(format!("{exec_id}\n").as_bytes())
        {
            tracing::warn!(env = %self.id, error = %e, "cannot write the exec log");
        }
    }
}

fn read_execs(dir: &Path) -> HashSet<String> {
    fs::read_to_string(dir.join(EXECS_FILE))
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Creates `dir` (0700) and writes `kiln.json` into it.
pub(crate) fn create_dir(dir: &Path, meta: &EnvMeta) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), &e)),
    }
    kiln_plugin_sdk::record::write_json(dir, META_FILE, meta)
}

/// Reads `dir/kiln.json`; `None` when it does not exist.
pub(crate) fn read_meta(dir: &Path) -> Result<Option<EnvMeta>> {
    kiln_plugin_sdk::record::read_json(dir, META_FILE)
}
