//! The runner's identity: a stable runner id and a boot id new at each start (rule 9).

use std::path::PathBuf;

/// Who this kiln process is, for labelling everything plugins create.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Stable across restarts: from `.runner` in daemon mode, from the state directory in
    /// exec mode.
    pub runner_id: String,
    /// New at every start.
    pub boot_id: String,
    /// Held (flock) for the life of the process, so another kiln process with the same runner id
    /// can tell a live boot from a dead one before collecting its leftovers.
    _liveness: Option<std::sync::Arc<nix::fcntl::Flock<std::fs::File>>>,
}

impl Identity {
    /// An identity with the given runner id and a fresh boot id, announced as alive in the
    /// state directory.
    pub fn new(runner_id: &str) -> Identity {
        let boot_id = short_nonce();
        let liveness = hold_boot_lock(&boot_id).map(std::sync::Arc::new);
        Identity { runner_id: runner_id.to_owned(), boot_id, _liveness: liveness }
    }

    /// The exec-mode identity: a runner id kept in the user's state directory (created on first
    /// use), and a fresh boot id.
    pub fn for_exec() -> Identity {
        let dir = state_dir();
        let file = dir.join("runner-id");
        let id = std::fs::read_to_string(&file).ok().map(|s| s.trim().to_owned()).filter(|s| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        let id = id.unwrap_or_else(|| {
            let id = format!("exec-{}", short_nonce());
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(&file, &id);
            id
        });
        Identity::new(&id)
    }
}

/// 12 random hex characters.
pub fn short_nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// `$XDG_STATE_HOME/kiln`, else `~/.local/state/kiln`, else a directory in /tmp.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kiln");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/kiln");
    }
    std::env::temp_dir().join("kiln-state")
}

fn boot_lock_path(boot_id: &str) -> PathBuf {
    state_dir().join("boots").join(format!("{boot_id}.lock"))
}

/// Creates and locks this boot's liveness file; `None` when the state directory is unusable
/// (then other processes treat this boot as dead only once its resources expire).
fn hold_boot_lock(boot_id: &str) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let path = boot_lock_path(boot_id);
    std::fs::create_dir_all(path.parent()?).ok()?;
    let file = std::fs::File::create(&path).ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

/// Whether the kiln process of `boot_id` (sharing this state directory) is still running: its
/// liveness file exists and is locked. A dead boot's file is removed.
pub fn boot_alive(boot_id: &str) -> bool {
    if boot_id.is_empty() || !boot_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return false;
    }
    let path = boot_lock_path(boot_id);
    let Ok(file) = std::fs::File::open(&path) else { return false };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_lock) => {
            let _ = std::fs::remove_file(&path);
            false
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_boot_is_alive_and_a_dropped_one_is_not() {
        let identity = Identity::new("test-runner");
        assert!(boot_alive(&identity.boot_id));
        let boot = identity.boot_id.clone();
        drop(identity);
        assert!(!boot_alive(&boot));
        assert!(!boot_alive("never-existed"));
        assert!(!boot_alive("../../etc/passwd"));
    }
}
