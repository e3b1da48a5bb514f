//! `strategy.matrix` expansion, following GitHub's algorithm (product, exclude, include).

use indexmap::IndexMap;
use serde_json::Value;

use super::error::Error;

/// One matrix combination: key → value, original keys first in matrix order.
pub type Combination = IndexMap<String, Value>;

/// Expands an already evaluated matrix (a JSON object) into job combinations.
///
/// 1. The cartesian product of the vectors (all keys but `include`/`exclude`), in key order
///    then value order: the first key varies slowest.
/// 2. `exclude` drops each combination that matches all keys of an exclude entry (deep
///    equality); an exclude key that is not a vector is an error.
/// 3. Each `include` entry, in order, is merged into every product combination whose original
///    values it would not change (values added by earlier includes may be overwritten); an
///    entry that fits no combination is appended as a new combination.
///
/// No resulting combination is an error, as on GitHub.
pub fn expand(matrix: &Value) -> Result<Vec<Combination>, Error> {
    let Value::Object(map) = matrix else {
        return Err(Error::msg(format!(
            "matrix must be a map of vectors, found {}; write `key: [values]` or use `${{{{ fromJSON(...) }}}}` returning an object",
            type_name(matrix)
        )));
    };
    let mut vectors: Vec<(&String, &Vec<Value>)> = Vec::new();
    for (key, value) in map {
        if key == "include" || key == "exclude" {
            continue;
        }
        match value {
            Value::Array(values) if values.is_empty() => {
                return Err(Error::msg(format!(
                    "matrix vector `{key}` has no values; add values or remove the key"
                )));
            }
            Value::Array(values) => vectors.push((key, values)),
            other => {
                return Err(Error::msg(format!(
                    "matrix vector `{key}` must be a list, found {}; write `{key}: [{}]`",
                    type_name(other),
                    other
                )));
            }
        }
    }
    let include = entries(map.get("include"), "include")?;
    let exclude = entries(map.get("exclude"), "exclude")?;

    let mut combos: Vec<Combination> =
        if vectors.is_empty() { Vec::new() } else { vec![IndexMap::new()] };
    for (key, values) in &vectors {
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for combo in &combos {
            for v in values.iter() {
                let mut c = combo.clone();
                c.insert((*key).clone(), v.clone());
                next.push(c);
            }
        }
        combos = next;
    }

    for (i, ex) in exclude.iter().enumerate() {
        if let Some(k) = ex.keys().find(|k| !vectors.iter().any(|(vk, _)| vk == k)) {
            return Err(Error::msg(format!(
                "matrix exclude entry {i} names `{k}`, which is not a matrix key; remove it or add `{k}` to the matrix"
            )));
        }
        combos.retain(|c| !ex.iter().all(|(k, v)| c.get(k) == Some(v)));
    }

    let original: Vec<&String> = vectors.iter().map(|(k, _)| *k).collect();
    let mut added: Vec<Combination> = Vec::new();
    for inc in &include {
        let mut matched = false;
        for combo in &mut combos {
            let fits = inc.iter().all(|(k, v)| !original.contains(&k) || combo.get(k) == Some(v));
            if fits {
                matched = true;
                for (k, v) in inc.iter() {
                    combo.insert(k.clone(), v.clone());
                }
            }
        }
        if !matched {
            added.push(inc.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        }
    }
    combos.extend(added);
    if combos.is_empty() {
        return Err(Error::msg(
            "matrix produced no jobs; check that `exclude` does not remove every combination, or add vectors or `include` entries",
        ));
    }
    Ok(combos)
}

fn entries<'a>(
    value: Option<&'a Value>,
    key: &str,
) -> Result<Vec<&'a serde_json::Map<String, Value>>, Error> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(m) => Ok(m),
                other => Err(Error::msg(format!(
                    "matrix {key} entry {i} must be a map, found {}; write `- key: value`",
                    type_name(other)
                ))),
            })
            .collect(),
        Some(Value::Object(m)) => Ok(vec![m]),
        Some(other) => Err(Error::msg(format!(
            "matrix `{key}` must be a list of maps, found {}; write `{key}:` followed by `- key: value` entries",
            type_name(other)
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}
