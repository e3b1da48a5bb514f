//! Spec hashes: what makes two `CreateExecutionEnvironment` requests (or two container specs)
//! the same request, so a plugin can answer a replayed Create idempotently and refuse a
//! different one under the same id (protocol spec §5.2). SHA-256 of canonical JSON (object
//! keys sorted), hex; stored on the resource, so the value must not change between releases.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::EnvironmentRequest;

/// The hash of an environment request: label, options, hints and owner (not the id, not the
/// creation time).
pub fn environment_spec_hash(req: &EnvironmentRequest) -> String {
    let o = &req.owner;
    let spec = json!({
        "label": req.label,
        "options": canonical(&Value::Object(req.options.clone())),
        "hints": [req.hints.job_container, req.hints.service_containers, req.hints.step_containers],
        "owner": {
            "runner_id": o.runner_id,
            "boot_id": o.boot_id,
            "job_id": o.job_id,
            "parent_environment_id": o.parent_environment_id,
            "expires_at_unix_ms": o.expires_at_unix_ms,
            "labels": o.labels,
        },
    });
    hash_json(&spec)
}

/// SHA-256 of a JSON value as serialized (keys in the value's order), hex.
pub fn hash_json(v: &Value) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// A JSON value with object keys sorted, so key order does not change a hash.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_ignores_option_key_order_and_is_stable() {
        let mut a = EnvironmentRequest { label: "l".into(), ..EnvironmentRequest::default() };
        let mut b = a.clone();
        a.options.insert("x".into(), json!(1));
        a.options.insert("y".into(), json!({"b": 1, "a": 2}));
        b.options.insert("y".into(), json!({"a": 2, "b": 1}));
        b.options.insert("x".into(), json!(1));
        assert_eq!(environment_spec_hash(&a), environment_spec_hash(&b));
        b.owner.job_id = "other".into();
        assert_ne!(environment_spec_hash(&a), environment_spec_hash(&b));
        // Stored on resources: the value of a fixed request must never change.
        let fixed = EnvironmentRequest { label: "l".into(), ..EnvironmentRequest::default() };
        expect_test::expect!["3935f6befbcb6547210f48232531170c8bddfe642fd18e0fb046f8b3c93afab0"]
            .assert_eq(&environment_spec_hash(&fixed));
    }
}
