//! Environments on disk: `root/<id>/` (0700) holding `env.json` (owner labels, spec hash,
//! paths), the `pgids` log of the process groups its execs created, and the work directories.
//!
//! Everything that must survive a plugin restart is in that directory: `ListEnvironments`
//! reads `env.json` files, and `Remove` after a restart finds the process groups in `pgids`.

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

use crate::exec::ExecHandle;
use crate::lock;

/// The metadata file of an environment.
pub(crate) const META_FILE: &str = "env.json";
/// The log of process groups created by the environment's execs.
pub(crate) const GROUPS_FILE: &str = "pgids";
/// The fixed id of the primary container: the environment's own process space.
pub(crate) const PRIMARY: &str = "host";

/// What `env.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EnvMeta {
    pub(crate) format: u32,
    pub(crate) id: String,
    pub(crate) spec_hash: String,
    pub(crate) label: String,
    pub(crate) owner: StoredOwner,
    pub(crate) paths: StoredPaths,
}

/// [`Paths`] as stored.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct StoredPaths {
    pub(crate) workspace: String,
    pub(crate) temp: String,
    pub(crate) tool_cache: String,
    pub(crate) runner_files: String,
    pub(crate) home: String,
}

impl EnvMeta {
    pub(crate) fn summary(&self) -> EnvironmentSummary {
        EnvironmentSummary {
            id: self.id.clone(),
            owner: Owner::from(&self.owner),
            container_ids: vec![PRIMARY.to_owned()],
        }
    }

    pub(crate) fn environment(&self) -> Environment {
        let p = &self.paths;
        Environment {
            id: self.id.clone(),
            primary_container_id: PRIMARY.to_owned(),
            os: crate::go_os().to_owned(),
            arch: crate::go_arch().to_owned(),
            paths: Paths {
                workspace: p.workspace.clone(),
                temp: p.temp.clone(),
                tool_cache: p.tool_cache.clone(),
                runner_files: p.runner_files.clone(),
                home: p.home.clone(),
            },
            path_variable: "PATH".to_owned(),
            path_separator: ":".to_owned(),
            delegation: None,
            owner: Owner::from(&self.owner),
        }
    }
}

/// The hash of everything a replayed create must repeat (rule 3). `created_at` is the
/// plugin's, so it is left out.
pub(crate) use kiln_plugin_sdk::spec::environment_spec_hash as spec_hash;

/// A process group one of the environment's execs created.
pub(crate) struct Group {
    pub(crate) pgid: i32,
    /// Start time of the group leader (clock ticks since boot, `/proc/<pid>/stat` field 22).
    pub(crate) start: u64,
    /// The exec, when it was started by this plugin process.
    pub(crate) exec: Option<Arc<ExecHandle>>,
}

/// The mutable part of an environment.
pub(crate) struct EnvState {
    /// Set by Remove: no new exec may start.
    pub(crate) removed: bool,
    /// Every exec id used in the environment (never reusable).
    pub(crate) exec_ids: HashSet<String>,
    /// Process groups that may still have members.
    pub(crate) groups: Vec<Group>,
    /// The open `pgids` log.
    log: Option<fs::File>,
}

/// An environment known to this plugin process.
pub(crate) struct Env {
    pub(crate) id: String,
    /// `root/<id>`, canonical.
    pub(crate) dir: PathBuf,
    pub(crate) meta: EnvMeta,
    pub(crate) state: Mutex<EnvState>,
}

impl Env {
    fn new(dir: PathBuf, meta: EnvMeta, exec_ids: HashSet<String>, groups: Vec<Group>) -> Env {
        Env {
            id: meta.id.clone(),
            dir,
            meta,
            state: Mutex::new(EnvState { removed: false, exec_ids, groups, log: None }),
        }
    }

    /// Creates the directory tree and `env.json` of a new environment, or finishes the tree of
    /// an existing one (a replayed create).
    pub(crate) fn create(
        root: &Path,
        req: &EnvironmentRequest,
        hash: String,
        home: &str,
        shared_tool_cache: Option<&Path>,
    ) -> Result<Env> {
        let dir = root.join(&req.environment_id);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            // A directory without env.json: an interrupted create of the same id.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), &e)),
        }
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let tool_cache =
            shared_tool_cache.map_or_else(|| dir.join("tool-cache"), Path::to_path_buf);
        let o = &req.owner;
        let meta = EnvMeta {
            format: 1,
            id: req.environment_id.clone(),
            spec_hash: hash,
            label: req.label.clone(),
            owner: StoredOwner {
                runner_id: o.runner_id.clone(),
                boot_id: o.boot_id.clone(),
                job_id: o.job_id.clone(),
                parent_environment_id: o.parent_environment_id.clone(),
                created_at_unix_ms: now_ms(),
                expires_at_unix_ms: o.expires_at_unix_ms,
                labels: o.labels.clone(),
            },
            paths: StoredPaths {
                workspace: s(dir.join("workspace")),
                temp: s(dir.join("temp")),
                tool_cache: s(tool_cache),
                runner_files: s(dir.join("runner")),
                home: home.to_owned(),
            },
        };
        // env.json first, so an interrupted create is still listed (and collected).
        write_meta(&dir, &meta)?;
        ensure_tree(&meta)?;
        Ok(Env::new(dir, meta, HashSet::new(), Vec::new()))
    }

    /// Loads an environment a previous plugin process created. `None` when there is none.
    pub(crate) fn load(root: &Path, id: &str, kernel_boot: &str) -> Result<Option<Env>> {
        let dir = root.join(id);
        let Some(meta) = read_meta(&dir)? else {
            return Ok(None);
        };
        let (exec_ids, groups) = read_groups(&dir, kernel_boot);
        Ok(Some(Env::new(dir, meta, exec_ids, groups)))
    }

    /// Makes sure the work directories exist (a replayed create repairs them).
    pub(crate) fn ensure_tree(&self) -> Result<()> {
        ensure_tree(&self.meta)
    }

    /// Appends a started process group to the `pgids` log. Called with the state locked.
    pub(crate) fn log_group(
        &self,
        state: &mut EnvState,
        pgid: i32,
        start: u64,
        kernel_boot: &str,
        exec_id: &str,
    ) {
        if state.log.is_none() {
            let path = self.dir.join(GROUPS_FILE);
            match fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path) {
                Ok(f) => state.log = Some(f),
                Err(e) => {
                    tracing::warn!(env = %self.id, error = %e, "cannot open the process group log");
                    return;
                }
            }
        }
        let line = format!("{pgid} {start} {kernel_boot} {exec_id}\n");
        if let Some(f) = state.log.as_mut()
            && let Err(e) = f.write_all(line.as_bytes())
        {
            tracing::warn!(env = %self.id, error = %e, "cannot write the process group log");
        }
    }

    /// Forgets a process group that has no members left.
    pub(crate) fn forget_group(&self, pgid: i32) {
        let mut st = lock(&self.state);
        st.groups.retain(|g| g.pgid != pgid);
    }

    /// Closes the log (before the directory is deleted).
    pub(crate) fn close_log(state: &mut EnvState) {
        state.log = None;
    }
}

fn ensure_tree(meta: &EnvMeta) -> Result<()> {
    let p = &meta.paths;
    for d in [&p.workspace, &p.temp, &p.tool_cache, &p.runner_files] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|e| Error::io(format!("creating {d}"), &e))?;
    }
    Ok(())
}

fn write_meta(dir: &Path, meta: &EnvMeta) -> Result<()> {
    kiln_plugin_sdk::record::write_json(dir, META_FILE, meta)
}

/// Reads `dir/env.json`; `None` when it does not exist.
pub(crate) fn read_meta(dir: &Path) -> Result<Option<EnvMeta>> {
    kiln_plugin_sdk::record::read_json(dir, META_FILE)
}

/// Reads the `pgids` log: every exec id it names, and the groups started since the current
/// boot (`pgid start kernel-boot-id exec-id` per line).
fn read_groups(dir: &Path, kernel_boot: &str) -> (HashSet<String>, Vec<Group>) {
    let mut ids = HashSet::new();
    let mut groups = Vec::new();
    let Ok(text) = fs::read_to_string(dir.join(GROUPS_FILE)) else {
        return (ids, groups);
    };
    for line in text.lines() {
        let mut f = line.split(' ');
        let (Some(pgid), Some(start), Some(boot), Some(exec)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        ids.insert(exec.to_owned());
        let (Ok(pgid), Ok(start)) = (pgid.parse::<i32>(), start.parse::<u64>()) else {
            continue;
        };
        if pgid > 1 && boot == kernel_boot && !kernel_boot.is_empty() {
            groups.push(Group { pgid, start, exec: None });
        }
    }
    (ids, groups)
}

pub(crate) use kiln_plugin_sdk::time::now_ms;
