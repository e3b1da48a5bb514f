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
}

impl Identity {
    /// An identity with the given runner id and a fresh boot id.
    pub fn new(runner_id: &str) -> Identity {
        Identity { runner_id: runner_id.to_owned(), boot_id: short_nonce() }
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
