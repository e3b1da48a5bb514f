//! Matrix expansion against GitHub's documented behaviour.

use expect_test::{Expect, expect};
use serde_json::{Value, json};

use super::super::expand_matrix;

fn check(matrix: Value, expect: Expect) {
    let actual = match expand_matrix(&matrix) {
        Ok(combos) => {
            combos.iter().map(|c| format!("{}\n", serde_json::to_string(c).unwrap())).collect()
        }
        Err(e) => format!("error: {e}\n"),
    };
    expect.assert_eq(&actual);
}

/// A matrix written in workflow YAML, as the parser stores it.
fn from_yaml(yaml: &str) -> Value {
    let text = format!(
        "on: push\njobs:\n  j:\n    runs-on: x\n    steps: [run: a]\n    strategy:\n      matrix:\n{}",
        indent(yaml)
    );
    let wf = super::super::parse_workflow(&text, "m.yml").unwrap();
    wf.jobs["j"].strategy.as_ref().unwrap().matrix.clone().unwrap()
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("        {l}\n")).collect()
}

#[test]
fn single_vector() {
    check(
        json!({"node": [14, 16, 18]}),
        expect![[r#"
        {"node":14}
        {"node":16}
        {"node":18}
    "#]],
    );
}

#[test]
fn docs_two_vectors_first_varies_slowest() {
    // docs: "Using a matrix strategy": version [10, 12, 14] x os [ubuntu-latest, windows-latest]
    check(
        json!({"version": [10, 12, 14], "os": ["ubuntu-latest", "windows-latest"]}),
        expect![[r#"
        {"version":10,"os":"ubuntu-latest"}
        {"version":10,"os":"windows-latest"}
        {"version":12,"os":"ubuntu-latest"}
        {"version":12,"os":"windows-latest"}
        {"version":14,"os":"ubuntu-latest"}
        {"version":14,"os":"windows-latest"}
    "#]],
    );
}

#[test]
fn three_vectors() {
    check(
        json!({"a": [1, 2], "b": ["x", "y"], "c": [true, false]}),
        expect![[r#"
        {"a":1,"b":"x","c":true}
        {"a":1,"b":"x","c":false}
        {"a":1,"b":"y","c":true}
        {"a":1,"b":"y","c":false}
        {"a":2,"b":"x","c":true}
        {"a":2,"b":"x","c":false}
        {"a":2,"b":"y","c":true}
        {"a":2,"b":"y","c":false}
    "#]],
    );
}

#[test]
fn docs_expanding_or_adding_configurations() {
    // docs: "Example: Expanding configurations"
    check(
        from_yaml(
            "fruit: [apple, pear]\nanimal: [cat, dog]\ninclude:\n  - color: green\n  - color: pink\n    animal: cat\n  - fruit: apple\n    shape: circle\n  - fruit: banana\n  - fruit: banana\n    animal: cat\n",
        ),
        expect![[r#"
            {"fruit":"apple","animal":"cat","color":"pink","shape":"circle"}
            {"fruit":"apple","animal":"dog","color":"green","shape":"circle"}
            {"fruit":"pear","animal":"cat","color":"pink"}
            {"fruit":"pear","animal":"dog","color":"green"}
            {"fruit":"banana"}
            {"fruit":"banana","animal":"cat"}
        "#]],
    );
}

#[test]
fn docs_adding_configurations() {
    // docs: "Example: Adding configurations" — only windows/node 16 gets npm 6.
    check(
        from_yaml(
            "os: [windows-latest, ubuntu-latest]\nnode: [14, 16]\ninclude:\n  - os: windows-latest\n    node: 16\n    npm: 6\n",
        ),
        expect![[r#"
            {"os":"windows-latest","node":14}
            {"os":"windows-latest","node":16,"npm":6}
            {"os":"ubuntu-latest","node":14}
            {"os":"ubuntu-latest","node":16}
        "#]],
    );
}

#[test]
fn docs_include_adds_to_all() {
    // docs: an include with only new keys is added to every combination
    check(
        from_yaml("os: [ubuntu, windows]\ninclude:\n  - experimental: false\n"),
        expect![[r#"
        {"os":"ubuntu","experimental":false}
        {"os":"windows","experimental":false}
    "#]],
    );
}

#[test]
fn docs_only_include() {
    // docs: "Example: Adding configurations" with no vectors
    check(
        from_yaml(
            "include:\n  - site: production\n    datacenter: site-a\n  - site: staging\n    datacenter: site-b\n",
        ),
        expect![[r#"
            {"site":"production","datacenter":"site-a"}
            {"site":"staging","datacenter":"site-b"}
        "#]],
    );
}

#[test]
fn docs_excluding_matrix_configurations() {
    // docs: "Excluding matrix configurations": 12 - 1 - 2 = 9 jobs
    check(
        from_yaml(
            "os: [macos-latest, windows-latest]\nversion: [12, 14, 16]\nenvironment: [staging, production]\nexclude:\n  - os: macos-latest\n    version: 12\n    environment: production\n  - os: windows-latest\n    version: 16\n",
        ),
        expect![[r#"
            {"os":"macos-latest","version":12,"environment":"staging"}
            {"os":"macos-latest","version":14,"environment":"staging"}
            {"os":"macos-latest","version":14,"environment":"production"}
            {"os":"macos-latest","version":16,"environment":"staging"}
            {"os":"macos-latest","version":16,"environment":"production"}
            {"os":"windows-latest","version":12,"environment":"staging"}
            {"os":"windows-latest","version":12,"environment":"production"}
            {"os":"windows-latest","version":14,"environment":"staging"}
            {"os":"windows-latest","version":14,"environment":"production"}
        "#]],
    );
}

#[test]
fn act_matrix_include_exclude_corpus_case() {
    check(
        from_yaml(
            "os: [ubuntu-18.04, macos-latest]\nnode: [4, 6, 8, 10]\nexclude:\n  - os: macos-latest\n    node: 4\ninclude:\n  - os: ubuntu-16.04\n    node: 10\n",
        ),
        expect![[r#"
            {"os":"ubuntu-18.04","node":4}
            {"os":"ubuntu-18.04","node":6}
            {"os":"ubuntu-18.04","node":8}
            {"os":"ubuntu-18.04","node":10}
            {"os":"macos-latest","node":6}
            {"os":"macos-latest","node":8}
            {"os":"macos-latest","node":10}
            {"os":"ubuntu-16.04","node":10}
        "#]],
    );
}

#[test]
fn yaml_numbers_keep_type() {
    check(
        from_yaml("node: [8.x, 10, 12.0, '14']\n"),
        expect![[r#"
        {"node":"8.x"}
        {"node":10}
        {"node":12.0}
        {"node":"14"}
    "#]],
    );
}

#[test]
fn exclude_partial_match() {
    check(
        json!({"a": [1, 2], "b": [1, 2], "exclude": [{"a": 1}]}),
        expect![[r#"
        {"a":2,"b":1}
        {"a":2,"b":2}
    "#]],
    );
}

#[test]
fn exclude_no_match_keeps_all() {
    check(
        json!({"a": [1, 2], "exclude": [{"a": 3}]}),
        expect![[r#"
        {"a":1}
        {"a":2}
    "#]],
    );
}

#[test]
fn exclude_deep_equality_of_objects() {
    check(
        json!({"cfg": [{"os": "linux", "v": 1}, {"os": "mac", "v": 2}], "exclude": [{"cfg": {"os": "mac", "v": 2}}]}),
        expect![[r#"
            {"cfg":{"os":"linux","v":1}}
        "#]],
    );
}

#[test]
fn exclude_object_is_not_partial_inside_values() {
    check(
        json!({"cfg": [{"os": "linux", "v": 1}], "exclude": [{"cfg": {"os": "linux"}}]}),
        expect![[r#"
        {"cfg":{"os":"linux","v":1}}
    "#]],
    );
}

#[test]
fn exclude_arrays_compared_deeply() {
    check(
        json!({"v": [[1, 2], [2, 1]], "exclude": [{"v": [2, 1]}]}),
        expect![[r#"
        {"v":[1,2]}
    "#]],
    );
}

#[test]
fn exclude_type_sensitive() {
    check(
        json!({"v": [1, "1"], "exclude": [{"v": "1"}]}),
        expect![[r#"
        {"v":1}
    "#]],
    );
}

#[test]
fn exclude_unknown_key_is_error() {
    check(
        json!({"a": [1, 2], "exclude": [{"b": 1}]}),
        expect![[r#"
        error: matrix exclude entry 0 names `b`, which is not a matrix key; remove it or add `b` to the matrix
    "#]],
    );
}

#[test]
fn exclude_everything_is_error() {
    check(
        json!({"a": [1], "exclude": [{"a": 1}]}),
        expect![[r#"
        error: matrix produced no jobs; check that `exclude` does not remove every combination, or add vectors or `include` entries
    "#]],
    );
}

#[test]
fn exclude_everything_then_include() {
    check(
        json!({"a": [1], "exclude": [{"a": 1}], "include": [{"a": 1, "b": 2}]}),
        expect![[r#"
        {"a":1,"b":2}
    "#]],
    );
}

#[test]
fn exclude_before_include() {
    // an include matching an excluded combination does not bring it back as an extension:
    // it matches nothing that remains and becomes a new combination
    check(
        json!({"a": [1, 2], "exclude": [{"a": 1}], "include": [{"a": 1, "x": true}]}),
        expect![[r#"
        {"a":2}
        {"a":1,"x":true}
    "#]],
    );
}

#[test]
fn include_cannot_overwrite_original_value() {
    check(
        json!({"os": ["linux"], "include": [{"os": "mac", "extra": 1}]}),
        expect![[r#"
        {"os":"linux"}
        {"os":"mac","extra":1}
    "#]],
    );
}

#[test]
fn include_can_overwrite_added_value() {
    check(
        json!({"os": ["linux", "mac"], "include": [{"color": "red"}, {"os": "mac", "color": "blue"}]}),
        expect![[r#"
        {"os":"linux","color":"red"}
        {"os":"mac","color":"blue"}
    "#]],
    );
}

#[test]
fn include_new_combinations_are_not_extended_by_later_includes() {
    check(
        json!({"a": [1], "include": [{"a": 2}, {"a": 2, "b": 3}]}),
        expect![[r#"
        {"a":1}
        {"a":2}
        {"a":2,"b":3}
    "#]],
    );
}

#[test]
fn include_added_keys_order() {
    check(
        json!({"z": [1], "a": [2], "include": [{"m": 0, "a": 2}]}),
        expect![[r#"
        {"z":1,"a":2,"m":0}
    "#]],
    );
}

#[test]
fn include_object_values() {
    check(
        json!({"os": ["linux"], "include": [{"os": "linux", "env": {"key1": "val1", "key2": "val2"}}]}),
        expect![[r#"
            {"os":"linux","env":{"key1":"val1","key2":"val2"}}
        "#]],
    );
}

#[test]
fn include_duplicate_entries() {
    check(
        json!({"include": [{"a": 1}, {"a": 1}]}),
        expect![[r#"
        {"a":1}
        {"a":1}
    "#]],
    );
}

#[test]
fn include_empty_entry_matches_everything() {
    check(
        json!({"a": [1, 2], "include": [{}]}),
        expect![[r#"
        {"a":1}
        {"a":2}
    "#]],
    );
}

#[test]
fn include_null_is_none() {
    check(
        json!({"a": [1], "include": null, "exclude": null}),
        expect![[r#"
        {"a":1}
    "#]],
    );
}

#[test]
fn include_single_map_accepted() {
    check(
        json!({"a": [1], "include": {"b": 2}}),
        expect![[r#"
        {"a":1,"b":2}
    "#]],
    );
}

#[test]
fn include_entry_not_a_map() {
    check(
        json!({"a": [1], "include": ["b"]}),
        expect![[r#"
        error: matrix include entry 0 must be a map, found a string; write `- key: value`
    "#]],
    );
}

#[test]
fn include_not_a_list() {
    check(
        json!({"a": [1], "include": "b"}),
        expect![[r#"
        error: matrix `include` must be a list of maps, found a string; write `include:` followed by `- key: value` entries
    "#]],
    );
}

#[test]
fn exclude_entry_not_a_map() {
    check(
        json!({"a": [1], "exclude": [1]}),
        expect![[r#"
        error: matrix exclude entry 0 must be a map, found a number; write `- key: value`
    "#]],
    );
}

#[test]
fn object_and_array_values() {
    check(
        json!({"cfg": [{"a": 1}, [1, 2], null, 1.5]}),
        expect![[r#"
        {"cfg":{"a":1}}
        {"cfg":[1,2]}
        {"cfg":null}
        {"cfg":1.5}
    "#]],
    );
}

#[test]
fn empty_matrix_is_error() {
    check(
        json!({}),
        expect![[r#"
        error: matrix produced no jobs; check that `exclude` does not remove every combination, or add vectors or `include` entries
    "#]],
    );
}

#[test]
fn empty_vector_is_error() {
    check(
        json!({"a": []}),
        expect![[r#"
        error: matrix vector `a` has no values; add values or remove the key
    "#]],
    );
}

#[test]
fn scalar_vector_is_error() {
    check(
        json!({"a": "x"}),
        expect![[r#"
        error: matrix vector `a` must be a list, found a string; write `a: ["x"]`
    "#]],
    );
}

#[test]
fn not_an_object_is_error() {
    check(
        json!("${{ fromJSON(x) }}"),
        expect![[r#"
        error: matrix must be a map of vectors, found a string; write `key: [values]` or use `${{ fromJSON(...) }}` returning an object
    "#]],
    );
}

#[test]
fn only_exclude_is_error() {
    check(
        json!({"exclude": [{"a": 1}]}),
        expect![[r#"
        error: matrix exclude entry 0 names `a`, which is not a matrix key; remove it or add `a` to the matrix
    "#]],
    );
}

#[test]
fn large_product_count() {
    let m = json!({"a": [1, 2, 3, 4], "b": [1, 2, 3], "c": [1, 2], "exclude": [{"a": 1, "b": 1}]});
    let n = expand_matrix(&m).map(|c| c.len());
    expect![[r#"
        Ok(
            22,
        )
    "#]]
    .assert_debug_eq(&n);
}
