//! What a plugin keeps on disk about its environments, in one form for every plugin that keeps
//! a directory per environment (host, lxc, qemu): the [`Owner`] as stored (rule 9: state that
//! must survive a restart lives with the resource), and the listing of such a directory for
//! `ListEnvironments`.

use std::collections::BTreeMap;
use std::path::Path;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{EnvironmentSummary, Error, Owner, Result, Selector, ids};

/// [`Owner`] as stored beside an environment (JSON). The field names are a file format: they
/// must not change between releases.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StoredOwner {
    /// [`Owner::runner_id`].
    pub runner_id: String,
    /// [`Owner::boot_id`].
    pub boot_id: String,
    /// [`Owner::job_id`].
    pub job_id: String,
    /// [`Owner::parent_environment_id`].
    pub parent_environment_id: String,
    /// [`Owner::created_at_unix_ms`].
    pub created_at_unix_ms: i64,
    /// [`Owner::expires_at_unix_ms`].
    pub expires_at_unix_ms: i64,
    /// [`Owner::labels`].
    pub labels: BTreeMap<String, String>,
}

impl From<&Owner> for StoredOwner {
    fn from(o: &Owner) -> StoredOwner {
        StoredOwner {
            runner_id: o.runner_id.clone(),
            boot_id: o.boot_id.clone(),
            job_id: o.job_id.clone(),
            parent_environment_id: o.parent_environment_id.clone(),
            created_at_unix_ms: o.created_at_unix_ms,
            expires_at_unix_ms: o.expires_at_unix_ms,
            labels: o.labels.clone(),
        }
    }
}

impl From<&StoredOwner> for Owner {
    fn from(o: &StoredOwner) -> Owner {
        Owner {
            runner_id: o.runner_id.clone(),
            boot_id: o.boot_id.clone(),
            job_id: o.job_id.clone(),
            parent_environment_id: o.parent_environment_id.clone(),
            created_at_unix_ms: o.created_at_unix_ms,
            expires_at_unix_ms: o.expires_at_unix_ms,
            labels: o.labels.clone(),
        }
    }
}

impl From<StoredOwner> for Owner {
    fn from(o: StoredOwner) -> Owner {
        Owner::from(&o)
    }
}

/// The environments kept as directories of `root`, one per environment id, that `selector`
/// chooses, sorted by id. `read` gives a directory's summary (`None`: not an environment, or
/// one half-created); an entry whose name is no valid id is passed over, and one that cannot
/// be read is logged and passed over, so one corrupt record never hides the others.
pub fn list_dirs(
    root: &Path,
    selector: &Selector,
    read: impl Fn(&Path) -> Result<Option<EnvironmentSummary>>,
) -> Result<Vec<EnvironmentSummary>> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| Error::io(format!("reading {}", root.display()), &e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if ids::validate_id(name, "environment_id").is_err() {
            continue;
        }
        match read(&entry.path()) {
            Ok(Some(summary)) if selector.matches(&summary.owner) => out.push(summary),
            Ok(_) => {}
            Err(e) => tracing::warn!(env = name, error = %e, "skipping an unreadable environment"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Writes `dir/name` as pretty JSON, mode 0600, through a temporary file renamed into place, so
/// a reader (or a plugin restarted after a crash) sees the old record or the new, never half.
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<()> {
    let data = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal(format!("encoding {name}: {e}")))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::io(format!("writing {}", path.display()), &e))
}

/// Reads `dir/name` as JSON; `None` when it does not exist.
pub fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>> {
    let path = dir.join(name);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), &e)),
    };
    serde_json::from_slice(&data)
        .map(Some)
        .map_err(|e| Error::internal(format!("{} is corrupt: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str, runner: &str, labels: &[(&str, &str)]) -> EnvironmentSummary {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        EnvironmentSummary {
            id: id.to_owned(),
            owner: Owner { runner_id: runner.to_owned(), labels, ..Owner::default() },
            container_ids: Vec::new(),
        }
    }

    #[test]
    fn lists_what_the_selector_chooses_sorted_and_skips_the_rest() {
        let root = tempfile::tempdir().unwrap();
        for name in ["b-env", "a-env", "c-env", "Not_An_Id", "corrupt"] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        let read = |dir: &Path| -> Result<Option<EnvironmentSummary>> {
            match dir.file_name().and_then(|n| n.to_str()).unwrap() {
                "a-env" => Ok(Some(summary("a-env", "r1", &[("k", "v")]))),
                "b-env" => Ok(Some(summary("b-env", "r1", &[]))),
                "c-env" => Ok(Some(summary("c-env", "r2", &[("k", "v")]))),
                "corrupt" => Err(Error::internal("corrupt record")),
                other => panic!("{other} is no environment id and must not be read"),
            }
        };
        let ids = |s: &Selector| -> Vec<String> {
            list_dirs(root.path(), s, read).unwrap().into_iter().map(|e| e.id).collect()
        };
        assert_eq!(ids(&Selector::default()), ["a-env", "b-env", "c-env"]);
        let mine = Selector { runner_id: "r1".into(), ..Selector::default() };
        assert_eq!(ids(&mine), ["a-env", "b-env"]);
        let labelled = Selector {
            runner_id: String::new(),
            labels: [("k".to_owned(), "v".to_owned())].into(),
        };
        assert_eq!(ids(&labelled), ["a-env", "c-env"]);
    }

    #[test]
    fn the_stored_owner_is_a_stable_file_format() {
        let owner = Owner {
            runner_id: "r".into(),
            boot_id: "b".into(),
            job_id: "j".into(),
            parent_environment_id: "p".into(),
            created_at_unix_ms: 1,
            expires_at_unix_ms: 2,
            labels: [("k".to_owned(), "v".to_owned())].into(),
        };
        let text = serde_json::to_string(&StoredOwner::from(&owner)).unwrap();
        assert_eq!(
            text,
            r#"{"runner_id":"r","boot_id":"b","job_id":"j","parent_environment_id":"p","created_at_unix_ms":1,"expires_at_unix_ms":2,"labels":{"k":"v"}}"#
        );
        let back: StoredOwner = serde_json::from_str(&text).unwrap();
        assert_eq!(Owner::from(back), owner);
    }
}
