//! Ownership labels (rule 9) on Docker objects, resource names, and the spec hash that makes
//! replayed creates idempotent.

use std::collections::{BTreeMap, HashMap};

use kiln_plugin_sdk::Owner;

/// Prefix of every label the plugin writes.
pub(crate) const PREFIX: &str = "dev.kiln.";
pub(crate) const RUNNER_ID: &str = "dev.kiln.runner-id";
pub(crate) const BOOT_ID: &str = "dev.kiln.boot-id";
pub(crate) const JOB_ID: &str = "dev.kiln.job-id";
pub(crate) const ENVIRONMENT_ID: &str = "dev.kiln.environment-id";
pub(crate) const PARENT_ENVIRONMENT_ID: &str = "dev.kiln.parent-environment-id";
pub(crate) const CREATED_AT: &str = "dev.kiln.created-at";
pub(crate) const EXPIRES_AT: &str = "dev.kiln.expires-at";
pub(crate) const SPEC_HASH: &str = "dev.kiln.spec-hash";
pub(crate) const RUNS_ON: &str = "dev.kiln.runs-on";
/// On the record: the `host_dir` option of a delegate environment.
pub(crate) const HOST_DIR: &str = "dev.kiln.host-dir";
/// On the record: `host` when the workspace is a host directory, not the workspace volume.
pub(crate) const WORKSPACE: &str = "dev.kiln.workspace";
/// On the record: the `docker_host` option of an environment on another engine.
pub(crate) const DOCKER_HOST: &str = "dev.kiln.docker-host";
/// Set on the environment's network, the record of the environment.
pub(crate) const ROLE: &str = "dev.kiln.role";
pub(crate) const CONTAINER_ID: &str = "dev.kiln.container-id";
pub(crate) const KIND: &str = "dev.kiln.kind";
pub(crate) const CONTAINER_SPEC_HASH: &str = "dev.kiln.container-spec-hash";
/// Extra owner labels are stored as `dev.kiln.label.<key>`.
pub(crate) const EXTRA: &str = "dev.kiln.label.";

/// The protocol id of the primary container.
pub(crate) const PRIMARY: &str = "primary";

/// Name of the environment's network (and the prefix of its other objects).
pub(crate) fn network_name(env: &str) -> String {
    format!("kiln_{env}")
}

/// Name of a container of the environment (`_` never occurs in ids, so names never collide).
pub(crate) fn container_name(env: &str, container: &str) -> String {
    format!("kiln_{env}_{container}")
}

/// Name of the environment's workspace volume.
pub(crate) fn workspace_volume(env: &str) -> String {
    format!("kiln_{env}_workspace")
}

/// Name of the volume mounted at `/__kiln` on an engine that does not share the plugin's
/// filesystem.
pub(crate) fn kiln_volume(env: &str) -> String {
    format!("kiln_{env}_kiln")
}

/// Name of a named volume of the workflow, scoped to the environment.
pub(crate) fn scoped_volume(env: &str, name: &str) -> String {
    format!("kiln_{env}_v_{name}")
}

pub(crate) use kiln_plugin_sdk::time::now_ms;

/// The labels of every object of an environment.
pub(crate) fn owner_labels(env: &str, owner: &Owner, spec_hash: &str) -> HashMap<String, String> {
    let mut l = HashMap::new();
    l.insert(RUNNER_ID.to_owned(), owner.runner_id.clone());
    l.insert(BOOT_ID.to_owned(), owner.boot_id.clone());
    l.insert(JOB_ID.to_owned(), owner.job_id.clone());
    l.insert(ENVIRONMENT_ID.to_owned(), env.to_owned());
    l.insert(PARENT_ENVIRONMENT_ID.to_owned(), owner.parent_environment_id.clone());
    l.insert(CREATED_AT.to_owned(), owner.created_at_unix_ms.to_string());
    l.insert(EXPIRES_AT.to_owned(), owner.expires_at_unix_ms.to_string());
    l.insert(SPEC_HASH.to_owned(), spec_hash.to_owned());
    for (k, v) in &owner.labels {
        l.insert(format!("{EXTRA}{k}"), v.clone());
    }
    l
}

/// The owner stored in an object's labels.
pub(crate) fn owner_from(labels: &HashMap<String, String>) -> Owner {
    let s = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let n = |k: &str| labels.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    let extra: BTreeMap<String, String> = labels
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(EXTRA).map(|k| (k.to_owned(), v.clone())))
        .collect();
    Owner {
        runner_id: s(RUNNER_ID),
        boot_id: s(BOOT_ID),
        job_id: s(JOB_ID),
        parent_environment_id: s(PARENT_ENVIRONMENT_ID),
        created_at_unix_ms: n(CREATED_AT),
        expires_at_unix_ms: n(EXPIRES_AT),
        labels: extra,
    }
}

/// The hash of everything a replayed environment create must repeat (rule 3).
pub(crate) use kiln_plugin_sdk::spec::{environment_spec_hash as env_spec_hash, hash_json};

/// A label filter for the engine's list calls: `dev.kiln.environment-id` (any value) or a
/// given `key=value`.
pub(crate) fn filter(pairs: &[String]) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_owned(), pairs.to_vec())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_round_trips_through_labels() {
        let owner = Owner {
            runner_id: "r".into(),
            boot_id: "b".into(),
            job_id: "j".into(),
            parent_environment_id: "p".into(),
            created_at_unix_ms: 5,
            expires_at_unix_ms: 9,
            labels: BTreeMap::from([("kiln.conformance".into(), "x".into())]),
        };
        let l = owner_labels("e", &owner, "h");
        assert_eq!(l[ENVIRONMENT_ID], "e");
        assert_eq!(l["dev.kiln.label.kiln.conformance"], "x");
        assert_eq!(owner_from(&l), owner);
        assert_eq!(container_name("a-b", "c"), "kiln_a-b_c");
        assert_ne!(container_name("a-b", "c"), container_name("a", "b-c"));
    }
}
