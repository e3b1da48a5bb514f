//! Data-driven tests of the expression language: each table evaluates many expressions and
//! compares one snapshot line per case (`expression => value or error`).

use expect_test::{Expect, expect};
use serde_json::{Map, json};

use super::*;

/// A host with a fixed status whose `hashFiles` echoes its patterns.
struct TestHost(JobStatus);

impl Host for TestHost {
    fn job_status(&self) -> JobStatus {
        self.0
    }

    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        if patterns.iter().any(|p| p == "fail") {
            return Err("cannot read files".into());
        }
        Ok(format!("hash:{}", patterns.join("|")))
    }
}

fn contexts() -> Map<String, Value> {
    let v = json!({
        "github": {
            "event_name": "push",
            "ref": "refs/heads/main",
            "repository": "owner/repo",
            "run_number": 42,
            "event": {
                "commits": [
                    {"message": "first", "author": {"name": "ann"}},
                    {"message": "second", "author": {"name": "bob"}},
                    {"id": 3}
                ],
                "pull_request": null,
                "forced": false,
                "labels": ["bug", "Help Wanted"]
            }
        },
        "env": {"FOO": "bar", "EMPTY": "", "NUM": "42", "Mixed_Case": "mc"},
        "vars": {"LEVEL": "3"},
        "secrets": {"TOKEN": "s3cr3t"},
        "matrix": {"os": "ubuntu-latest", "node": [14, 16, 18]},
        "steps": {
            "my-step": {"outputs": {"x": "1", "json": "{\"a\": [1, 2]}"}, "outcome": "success"},
            "other_step": {"outputs": {}, "outcome": "failure"}
        },
        "needs": {
            "build": {"result": "success", "outputs": {"v": "1.2"}},
            "test": {"result": "failure", "outputs": {"v": "2"}}
        },
        "inputs": {"flag": true, "count": 3, "ratio": 0.5, "name": ""},
        "job": {"status": "success"},
        "runner": {"os": "Linux", "temp": "/tmp"},
        "strategy": {"fail-fast": true},
        "obj": {"a": {"b": 1}, "c": {"b": 2}, "d": {"x": 3}},
        "arr": [1, "two", true, null, {"k": "v"}, [1, 2]],
        "nested": [[1, 2], [3], {"z": 9}],
        "empty_arr": [],
        "empty_obj": {},
        "float": 1.0
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Evaluates one expression; the value as compact JSON or the error text.
fn run(src: &str, ctx: &Map<String, Value>, status: JobStatus) -> String {
    let host = TestHost(status);
    let scope = Scope { contexts: ctx, host: &host };
    match evaluate_str(src, &scope) {
        Ok(v) => v.to_string(),
        Err(e) => format!("error: {e}"),
    }
}

/// One case with explicit contexts.
fn check(src: &str, contexts_json: Value, expect: Expect) {
    let ctx = match contexts_json {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    expect.assert_eq(&run(src, &ctx, JobStatus::Success));
}

/// Shows control characters of a case visibly so each case stays on one line.
fn show(src: &str) -> String {
    src.replace('\n', "\\n").replace('\t', "\\t").replace('\r', "\\r")
}

/// A table of expressions against the fixture contexts, one line per case.
fn table(cases: &[&str], expect: Expect) {
    let ctx = contexts();
    let mut out = String::new();
    for src in cases {
        out.push_str(&format!("{}  =>  {}\n", show(src), run(src, &ctx, JobStatus::Success)));
    }
    expect.assert_eq(&out);
}

/// A table of templates for `interpolate`, one line per case.
fn interpolate_table(cases: &[&str], expect: Expect) {
    let ctx = contexts();
    let host = TestHost(JobStatus::Success);
    let scope = Scope { contexts: &ctx, host: &host };
    let mut out = String::new();
    for src in cases {
        let result = match interpolate(src, &scope) {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("error: {e}"),
        };
        out.push_str(&format!("{}  =>  {result}\n", show(src)));
    }
    expect.assert_eq(&out);
}

/// A table of `if:` conditions evaluated under each job status.
fn if_table(cases: &[&str], expect: Expect) {
    let ctx = contexts();
    let mut out = String::new();
    for src in cases {
        let mut results = Vec::new();
        for status in [JobStatus::Success, JobStatus::Failure, JobStatus::Cancelled] {
            let host = TestHost(status);
            let scope = Scope { contexts: &ctx, host: &host };
            results.push(match evaluate_if(src, &scope) {
                Ok(b) => b.to_string(),
                Err(e) => format!("error: {e}"),
            });
        }
        out.push_str(&format!("{}  =>  {}\n", show(src), results.join(" / ")));
    }
    expect.assert_eq(&out);
}

#[test]
fn literals() {
    table(
        &[
            "null",
            "true",
            "false",
            "0",
            "1",
            "-1",
            "42",
            "1.5",
            "-2.25",
            ".5",
            "-.5",
            "0.1",
            "1e3",
            "1E3",
            "-2.5e-3",
            "1e+2",
            "0x1F",
            "0xff",
            "0X10",
            "-0x10",
            "007",
            "1.0",
            "9007199254740993",
            "1e21",
            "Infinity",
            "-Infinity",
            "NaN",
            "''",
            "'hello'",
            "'it''s'",
            "''''",
            "'a''''b'",
            "'multi word string'",
            "'ünïcödé ✓'",
            "'}}'",
            "'${{ x }}'",
            "  'padded'  ",
            "\t\n1\n",
        ],
        expect![[r#"
            null  =>  null
            true  =>  true
            false  =>  false
            0  =>  0
            1  =>  1
            -1  =>  -1
            42  =>  42
            1.5  =>  1.5
            -2.25  =>  -2.25
            .5  =>  0.5
            -.5  =>  -0.5
            0.1  =>  0.1
            1e3  =>  1000
            1E3  =>  1000
            -2.5e-3  =>  -0.0025
            1e+2  =>  100
            0x1F  =>  31
            0xff  =>  255
            0X10  =>  16
            -0x10  =>  -16
            007  =>  7
            1.0  =>  1
            9007199254740993  =>  9007199254740992
            1e21  =>  1e+21
            Infinity  =>  "Infinity"
            -Infinity  =>  "-Infinity"
            NaN  =>  "NaN"
            ''  =>  ""
            'hello'  =>  "hello"
            'it''s'  =>  "it's"
            ''''  =>  "'"
            'a''''b'  =>  "a''b"
            'multi word string'  =>  "multi word string"
            'ünïcödé ✓'  =>  "ünïcödé ✓"
            '}}'  =>  "}}"
            '${{ x }}'  =>  "${{ x }}"
              'padded'    =>  "padded"
            \t\n1\n  =>  1
        "#]],
    );
}

#[test]
fn precedence_and_associativity() {
    table(
        &[
            "true || false && false",
            "(true || false) && false",
            "false && true || true",
            "false && (true || true)",
            "!true == false",
            "!(true == false)",
            "!false && false",
            "1 < 2 == true",
            "1 == 1 == 1",
            "2 == 2 == 2",
            "1 < 2 < 3",
            "3 > 2 > 1",
            "1 == 2 || 3 == 3",
            "1 == 1 && 2 != 2",
            "!!1",
            "!!''",
            "!!!0",
            "!null",
            "!'false'",
            "!github.event.pull_request",
            "!github.event.forced",
            "!github",
            "!empty_arr",
            "((((1))))",
            "(1 < 2) && (2 < 3)",
            "'a' == 'A' && 'b' == 'B'",
            "true && 'x' == 'x' || 'fallback'",
            "1 != 1 || 2 != 2 || 3 != 3",
            "1 < 2 && 2 <= 2 && 3 > 2 && 3 >= 3",
            "!1 < 2",
        ],
        expect![[r#"
            true || false && false  =>  true
            (true || false) && false  =>  false
            false && true || true  =>  true
            false && (true || true)  =>  false
            !true == false  =>  true
            !(true == false)  =>  true
            !false && false  =>  false
            1 < 2 == true  =>  true
            1 == 1 == 1  =>  true
            2 == 2 == 2  =>  false
            1 < 2 < 3  =>  true
            3 > 2 > 1  =>  false
            1 == 2 || 3 == 3  =>  true
            1 == 1 && 2 != 2  =>  false
            !!1  =>  true
            !!''  =>  false
            !!!0  =>  true
            !null  =>  true
            !'false'  =>  false
            !github.event.pull_request  =>  true
            !github.event.forced  =>  true
            !github  =>  false
            !empty_arr  =>  false
            ((((1))))  =>  1
            (1 < 2) && (2 < 3)  =>  true
            'a' == 'A' && 'b' == 'B'  =>  true
            true && 'x' == 'x' || 'fallback'  =>  true
            1 != 1 || 2 != 2 || 3 != 3  =>  false
            1 < 2 && 2 <= 2 && 3 > 2 && 3 >= 3  =>  true
            !1 < 2  =>  true
        "#]],
    );
}

#[test]
fn logical_operators_return_operands() {
    table(
        &[
            "true && 'yes'",
            "false && 'yes'",
            "null && 'yes'",
            "'' && 'yes'",
            "0 && 'yes'",
            "1 && 'yes'",
            "'a' && 'b' && 'c'",
            "'a' && 0 && 'c'",
            "'' || 'default'",
            "null || 'default'",
            "0 || false",
            "false || 0",
            "'value' || 'default'",
            "env.EMPTY || 'fallback'",
            "env.FOO || 'fallback'",
            "env.MISSING || 'fallback'",
            "github.event.pull_request || 'no pr'",
            "inputs.count || 7",
            "inputs.name || 'anonymous'",
            "NaN || 'nan is falsy'",
            "-0 || 'negative zero is falsy'",
            "empty_arr || 'empty arrays are truthy'",
            "empty_obj && 'empty objects are truthy'",
            "github.event_name == 'push' && 'on push' || 'other'",
            "github.event_name == 'pull_request' && 'on pr' || 'other'",
            "false || null || '' || 0",
            "matrix.node && matrix.os",
            "fromJSON('[]') || 'x'",
            "1 || undefined_context",
            "0 && undefined_context",
            "0 || undefined_context",
            "false && fromJSON('not json')",
            "true || fromJSON('not json')",
            "true && fromJSON('not json')",
        ],
        expect![[r#"
            true && 'yes'  =>  "yes"
            false && 'yes'  =>  false
            null && 'yes'  =>  null
            '' && 'yes'  =>  ""
            0 && 'yes'  =>  0
            1 && 'yes'  =>  "yes"
            'a' && 'b' && 'c'  =>  "c"
            'a' && 0 && 'c'  =>  0
            '' || 'default'  =>  "default"
            null || 'default'  =>  "default"
            0 || false  =>  false
            false || 0  =>  0
            'value' || 'default'  =>  "value"
            env.EMPTY || 'fallback'  =>  "fallback"
            env.FOO || 'fallback'  =>  "bar"
            env.MISSING || 'fallback'  =>  "fallback"
            github.event.pull_request || 'no pr'  =>  "no pr"
            inputs.count || 7  =>  3
            inputs.name || 'anonymous'  =>  "anonymous"
            NaN || 'nan is falsy'  =>  "nan is falsy"
            -0 || 'negative zero is falsy'  =>  "negative zero is falsy"
            empty_arr || 'empty arrays are truthy'  =>  []
            empty_obj && 'empty objects are truthy'  =>  "empty objects are truthy"
            github.event_name == 'push' && 'on push' || 'other'  =>  "on push"
            github.event_name == 'pull_request' && 'on pr' || 'other'  =>  "other"
            false || null || '' || 0  =>  0
            matrix.node && matrix.os  =>  "ubuntu-latest"
            fromJSON('[]') || 'x'  =>  []
            1 || undefined_context  =>  error: unrecognized named-value: 'undefined_context' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 6 in expression: '1 || undefined_context'
            0 && undefined_context  =>  error: unrecognized named-value: 'undefined_context' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 6 in expression: '0 && undefined_context'
            0 || undefined_context  =>  error: unrecognized named-value: 'undefined_context' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 6 in expression: '0 || undefined_context'
            false && fromJSON('not json')  =>  false
            true || fromJSON('not json')  =>  true
            true && fromJSON('not json')  =>  error: invalid JSON in fromJSON('not json'): expected ident (line 1, column 2) at column 9 in expression: 'true && fromJSON('not json')'
        "#]],
    );
}

#[test]
fn loose_equality() {
    table(
        &[
            "null == null",
            "null == 0",
            "null == false",
            "null == ''",
            "null == 'null'",
            "null != 1",
            "true == 1",
            "false == 0",
            "true == 2",
            "true == 'true'",
            "true == '1'",
            "false == ''",
            "false == 'false'",
            "1 == '1'",
            "1 == ' 1 '",
            "1 == '1.0'",
            "0 == ''",
            "0 == ' '",
            "16 == '0x10'",
            "1000 == '1e3'",
            "1 == 'one'",
            "'abc' == 'ABC'",
            "'abc' != 'abd'",
            "'Straße' == 'STRASSE'",
            "'ÄÖÜ' == 'äöü'",
            "1 == 1.0",
            "0.1 == 0.1",
            "-0 == 0",
            "NaN == NaN",
            "NaN != NaN",
            "Infinity == Infinity",
            "Infinity == 'Infinity'",
            "-Infinity == '-Infinity'",
            "'NaN' == NaN",
            "github == github",
            "github.event == github.event",
            "github.event.commits == github.event.commits",
            "github == env",
            "fromJSON('{}') == fromJSON('{}')",
            "fromJSON('[]') == fromJSON('[]')",
            "empty_arr == 0",
            "empty_arr == ''",
            "empty_obj == 'Object'",
            "arr == 'Array'",
            "empty_arr == null",
            "obj.*.b == obj.*.b",
            "github.event_name == 'PUSH'",
            "github.run_number == '42'",
            "vars.LEVEL == 3",
            "inputs.flag == true",
            "inputs.flag == 'true'",
            "inputs.flag == 1",
            "inputs.count == '3'",
            "float == 1",
            "env.NUM == 42",
            "env.EMPTY == false",
            "env.EMPTY == null",
            "env.MISSING == null",
            "env.MISSING == ''",
        ],
        expect![[r#"
            null == null  =>  true
            null == 0  =>  true
            null == false  =>  true
            null == ''  =>  true
            null == 'null'  =>  false
            null != 1  =>  true
            true == 1  =>  true
            false == 0  =>  true
            true == 2  =>  false
            true == 'true'  =>  false
            true == '1'  =>  true
            false == ''  =>  true
            false == 'false'  =>  false
            1 == '1'  =>  true
            1 == ' 1 '  =>  true
            1 == '1.0'  =>  true
            0 == ''  =>  true
            0 == ' '  =>  true
            16 == '0x10'  =>  true
            1000 == '1e3'  =>  true
            1 == 'one'  =>  false
            'abc' == 'ABC'  =>  true
            'abc' != 'abd'  =>  true
            'Straße' == 'STRASSE'  =>  false
            'ÄÖÜ' == 'äöü'  =>  true
            1 == 1.0  =>  true
            0.1 == 0.1  =>  true
            -0 == 0  =>  true
            NaN == NaN  =>  false
            NaN != NaN  =>  true
            Infinity == Infinity  =>  true
            Infinity == 'Infinity'  =>  true
            -Infinity == '-Infinity'  =>  true
            'NaN' == NaN  =>  false
            github == github  =>  true
            github.event == github.event  =>  true
            github.event.commits == github.event.commits  =>  true
            github == env  =>  false
            fromJSON('{}') == fromJSON('{}')  =>  false
            fromJSON('[]') == fromJSON('[]')  =>  false
            empty_arr == 0  =>  false
            empty_arr == ''  =>  false
            empty_obj == 'Object'  =>  false
            arr == 'Array'  =>  false
            empty_arr == null  =>  false
            obj.*.b == obj.*.b  =>  false
            github.event_name == 'PUSH'  =>  true
            github.run_number == '42'  =>  true
            vars.LEVEL == 3  =>  true
            inputs.flag == true  =>  true
            inputs.flag == 'true'  =>  false
            inputs.flag == 1  =>  true
            inputs.count == '3'  =>  true
            float == 1  =>  true
            env.NUM == 42  =>  true
            env.EMPTY == false  =>  true
            env.EMPTY == null  =>  true
            env.MISSING == null  =>  true
            env.MISSING == ''  =>  true
        "#]],
    );
}

#[test]
fn comparisons() {
    table(
        &[
            "1 < 2",
            "2 < 1",
            "1 <= 1",
            "1 >= 2",
            "-1 < 0",
            "1.5 > 1.25",
            "'a' < 'b'",
            "'B' > 'a'",
            "'a' < 'B'",
            "'abc' < 'abd'",
            "'abc' <= 'ABC'",
            "'abc' >= 'ABC'",
            "'ab' < 'abc'",
            "'' < 'a'",
            "'10' < '9'",
            "'10' < 9",
            "10 < '9'",
            "'x' < 1",
            "'x' > 1",
            "'x' >= 'x'",
            "null < 1",
            "null > -1",
            "null <= null",
            "null >= null",
            "null < null",
            "false < true",
            "true > false",
            "true <= true",
            "true > 0",
            "false < 1",
            "true < 2",
            "null < true",
            "'' < 1",
            "NaN < 1",
            "NaN > 1",
            "NaN <= NaN",
            "Infinity > 1e308",
            "-Infinity < -1e308",
            "empty_arr < 1",
            "empty_arr > 1",
            "empty_arr <= empty_arr",
            "github <= github",
            "github < env",
            "github.run_number > 40",
            "github.run_number >= '42'",
            "vars.LEVEL > 2",
            "needs.build.outputs.v < '1.10'",
            "needs.build.outputs.v < 1.10",
            "inputs.ratio < 1",
            "env.MISSING < 1",
        ],
        expect![[r#"
            1 < 2  =>  true
            2 < 1  =>  false
            1 <= 1  =>  true
            1 >= 2  =>  false
            -1 < 0  =>  true
            1.5 > 1.25  =>  true
            'a' < 'b'  =>  true
            'B' > 'a'  =>  true
            'a' < 'B'  =>  true
            'abc' < 'abd'  =>  true
            'abc' <= 'ABC'  =>  true
            'abc' >= 'ABC'  =>  true
            'ab' < 'abc'  =>  true
            '' < 'a'  =>  true
            '10' < '9'  =>  true
            '10' < 9  =>  false
            10 < '9'  =>  false
            'x' < 1  =>  false
            'x' > 1  =>  false
            'x' >= 'x'  =>  true
            null < 1  =>  true
            null > -1  =>  true
            null <= null  =>  true
            null >= null  =>  true
            null < null  =>  false
            false < true  =>  true
            true > false  =>  true
            true <= true  =>  true
            true > 0  =>  true
            false < 1  =>  true
            true < 2  =>  true
            null < true  =>  true
            '' < 1  =>  true
            NaN < 1  =>  false
            NaN > 1  =>  false
            NaN <= NaN  =>  false
            Infinity > 1e308  =>  true
            -Infinity < -1e308  =>  true
            empty_arr < 1  =>  false
            empty_arr > 1  =>  false
            empty_arr <= empty_arr  =>  true
            github <= github  =>  true
            github < env  =>  false
            github.run_number > 40  =>  true
            github.run_number >= '42'  =>  true
            vars.LEVEL > 2  =>  true
            needs.build.outputs.v < '1.10'  =>  false
            needs.build.outputs.v < 1.10  =>  false
            inputs.ratio < 1  =>  true
            env.MISSING < 1  =>  true
        "#]],
    );
}

#[test]
fn case_insensitivity() {
    table(
        &[
            "GitHub.Event_Name",
            "GITHUB.EVENT_NAME",
            "github.EVENT_NAME == 'push'",
            "Env.foo",
            "env.mixed_case",
            "env['MIXED_CASE']",
            "env['mixed_case']",
            "STEPS.MY-STEP.OUTPUTS.X",
            "Steps['My-Step'].Outputs['X']",
            "CONTAINS('ABC', 'b')",
            "StartsWith('Hello', 'HE')",
            "endswith('Hello', 'LO')",
            "FORMAT('{0}', 1)",
            "Join(matrix.node, '-')",
            "tojson(1)",
            "FROMjson('true')",
            "SUCCESS()",
            "Always()",
            "hashfiles('a')",
        ],
        expect![[r#"
            GitHub.Event_Name  =>  "push"
            GITHUB.EVENT_NAME  =>  "push"
            github.EVENT_NAME == 'push'  =>  true
            Env.foo  =>  "bar"
            env.mixed_case  =>  "mc"
            env['MIXED_CASE']  =>  "mc"
            env['mixed_case']  =>  "mc"
            STEPS.MY-STEP.OUTPUTS.X  =>  "1"
            Steps['My-Step'].Outputs['X']  =>  "1"
            CONTAINS('ABC', 'b')  =>  true
            StartsWith('Hello', 'HE')  =>  true
            endswith('Hello', 'LO')  =>  true
            FORMAT('{0}', 1)  =>  "1"
            Join(matrix.node, '-')  =>  "14-16-18"
            tojson(1)  =>  "1"
            FROMjson('true')  =>  true
            SUCCESS()  =>  true
            Always()  =>  true
            hashfiles('a')  =>  "hash:a"
        "#]],
    );
}

#[test]
fn property_and_index_access() {
    table(
        &[
            "github.event_name",
            "github.ref",
            "github['ref']",
            "github[\"ref\"]",
            "github['event']['commits'][0]['message']",
            "github.event.commits[1].author.name",
            "github.event.commits[2].author.name",
            "github.event.commits[3]",
            "github.event.commits[-1]",
            "github.event.commits[1.7].message",
            "github.event.commits['1'].message",
            "github.event.commits['x']",
            "github.event.commits[true]",
            "github.event.commits[null]",
            "github.event.commits.length",
            "github.event.missing",
            "github.event.missing.deeper.still",
            "github.event.pull_request.number",
            "github.event.forced.value",
            "github.ref.length",
            "github.ref[0]",
            "steps.my-step.outputs.x",
            "steps.my-step.outcome",
            "steps.other_step.outputs.x",
            "steps.missing-step.outputs.x",
            "steps['my-step']['outputs']['x']",
            "needs.build.result",
            "needs['build'].outputs.v",
            "matrix.node[0]",
            "matrix.node[1 + 1]",
            "matrix.node[inputs.count - 1]",
            "matrix['node'][inputs.count]",
            "matrix.node[github.event.missing]",
            "arr[0]",
            "arr[1]",
            "arr[3]",
            "arr[4].k",
            "arr[5][1]",
            "arr[5][2]",
            "obj[arr[1]]",
            "obj['a'].b",
            "obj[obj.a.b]",
            "github[github]",
            "obj[matrix.node]",
            "fromJSON('{\"a\":{\"b\":[10,20]}}').a.b[1]",
            "fromJSON(steps.my-step.outputs.json).a[0]",
            "fromJSON('[1,2,3]')[2]",
            "('abc').length",
            "runner.os",
            "strategy.fail-fast",
            "job.status",
            "secrets.TOKEN",
            "secrets.MISSING",
            "vars.LEVEL",
            "inputs.flag",
            "float",
        ],
        expect![[r#"
            github.event_name  =>  "push"
            github.ref  =>  "refs/heads/main"
            github['ref']  =>  "refs/heads/main"
            github["ref"]  =>  error: unexpected symbol '"' at column 8 in expression: 'github["ref"]'
            github['event']['commits'][0]['message']  =>  "first"
            github.event.commits[1].author.name  =>  "bob"
            github.event.commits[2].author.name  =>  null
            github.event.commits[3]  =>  null
            github.event.commits[-1]  =>  null
            github.event.commits[1.7].message  =>  "second"
            github.event.commits['1'].message  =>  "second"
            github.event.commits['x']  =>  null
            github.event.commits[true]  =>  {"message":"second","author":{"name":"bob"}}
            github.event.commits[null]  =>  {"message":"first","author":{"name":"ann"}}
            github.event.commits.length  =>  null
            github.event.missing  =>  null
            github.event.missing.deeper.still  =>  null
            github.event.pull_request.number  =>  null
            github.event.forced.value  =>  null
            github.ref.length  =>  null
            github.ref[0]  =>  null
            steps.my-step.outputs.x  =>  "1"
            steps.my-step.outcome  =>  "success"
            steps.other_step.outputs.x  =>  null
            steps.missing-step.outputs.x  =>  null
            steps['my-step']['outputs']['x']  =>  "1"
            needs.build.result  =>  "success"
            needs['build'].outputs.v  =>  "1.2"
            matrix.node[0]  =>  14
            matrix.node[1 + 1]  =>  error: unexpected symbol '+' at column 15 in expression: 'matrix.node[1 + 1]'
            matrix.node[inputs.count - 1]  =>  error: unexpected symbol '-' at column 26 in expression: 'matrix.node[inputs.count - 1]'
            matrix['node'][inputs.count]  =>  null
            matrix.node[github.event.missing]  =>  14
            arr[0]  =>  1
            arr[1]  =>  "two"
            arr[3]  =>  null
            arr[4].k  =>  "v"
            arr[5][1]  =>  2
            arr[5][2]  =>  null
            obj[arr[1]]  =>  null
            obj['a'].b  =>  1
            obj[obj.a.b]  =>  null
            github[github]  =>  null
            obj[matrix.node]  =>  null
            fromJSON('{"a":{"b":[10,20]}}').a.b[1]  =>  20
            fromJSON(steps.my-step.outputs.json).a[0]  =>  1
            fromJSON('[1,2,3]')[2]  =>  3
            ('abc').length  =>  null
            runner.os  =>  "Linux"
            strategy.fail-fast  =>  true
            job.status  =>  "success"
            secrets.TOKEN  =>  "s3cr3t"
            secrets.MISSING  =>  null
            vars.LEVEL  =>  "3"
            inputs.flag  =>  true
            float  =>  1
        "#]],
    );
}

#[test]
fn object_filters() {
    table(
        &[
            "github.event.commits.*.message",
            "github.event.commits.*.author.name",
            "github.event.commits.*.id",
            "github.event.commits.*.nothing",
            "github.event.commits[*].message",
            "obj.*.b",
            "obj.*",
            "obj.*.*",
            "nested.*",
            "nested.*.*",
            "nested.*[0]",
            "nested.*.z",
            "matrix.node.*",
            "needs.*.result",
            "needs.*.outputs.v",
            "contains(needs.*.result, 'failure')",
            "contains(needs.*.result, 'cancelled')",
            "contains(github.event.commits.*.author.name, 'BOB')",
            "join(github.event.commits.*.message, ', ')",
            "toJSON(obj.*.b)",
            "github.ref.*",
            "github.event.missing.*",
            "empty_arr.*",
            "empty_obj.*.x",
            "obj.*.b == obj.*.b",
            "obj.* && 'truthy'",
            "fromJSON('[{\"a\":1},{\"a\":2}]').*.a",
            "fromJSON('{\"x\":{\"a\":1},\"y\":{\"b\":2}}').*.a",
        ],
        expect![[r#"
            github.event.commits.*.message  =>  ["first","second"]
            github.event.commits.*.author.name  =>  ["ann","bob"]
            github.event.commits.*.id  =>  [3]
            github.event.commits.*.nothing  =>  []
            github.event.commits[*].message  =>  ["first","second"]
            obj.*.b  =>  [1,2]
            obj.*  =>  [{"b":1},{"b":2},{"x":3}]
            obj.*.*  =>  [1,2,3]
            nested.*  =>  [[1,2],[3],{"z":9}]
            nested.*.*  =>  [1,2,3,9]
            nested.*[0]  =>  [1,3]
            nested.*.z  =>  [9]
            matrix.node.*  =>  [14,16,18]
            needs.*.result  =>  ["success","failure"]
            needs.*.outputs.v  =>  ["1.2","2"]
            contains(needs.*.result, 'failure')  =>  true
            contains(needs.*.result, 'cancelled')  =>  false
            contains(github.event.commits.*.author.name, 'BOB')  =>  true
            join(github.event.commits.*.message, ', ')  =>  "first, second"
            toJSON(obj.*.b)  =>  "[\n  1,\n  2\n]"
            github.ref.*  =>  null
            github.event.missing.*  =>  null
            empty_arr.*  =>  []
            empty_obj.*.x  =>  []
            obj.*.b == obj.*.b  =>  false
            obj.* && 'truthy'  =>  "truthy"
            fromJSON('[{"a":1},{"a":2}]').*.a  =>  [1,2]
            fromJSON('{"x":{"a":1},"y":{"b":2}}').*.a  =>  [1]
        "#]],
    );
}

#[test]
fn function_contains() {
    table(
        &[
            "contains('Hello World', 'world')",
            "contains('Hello World', 'xyz')",
            "contains('abc', '')",
            "contains('', '')",
            "contains('', 'a')",
            "contains(github.event.labels, 'bug')",
            "contains(github.event.labels, 'BUG')",
            "contains(github.event.labels, 'help wanted')",
            "contains(github.event.labels, 'help')",
            "contains(matrix.node, 16)",
            "contains(matrix.node, '16')",
            "contains(matrix.node, 17)",
            "contains(arr, null)",
            "contains(arr, true)",
            "contains(arr, 1)",
            "contains(arr, 'TWO')",
            "contains(arr, arr[4])",
            "contains(empty_arr, null)",
            "contains(123, 2)",
            "contains(true, 'ru')",
            "contains(null, '')",
            "contains(1.5, '.')",
            "contains('NaN', NaN)",
            "contains(github, 'push')",
            "contains('Object', github)",
            "contains(github.event_name, 'us')",
            "contains(fromJSON('[\"a\",\"b\"]'), 'B')",
            "contains('a', 'b', 'c')",
            "contains('a')",
            "contains()",
        ],
        expect![[r#"
            contains('Hello World', 'world')  =>  true
            contains('Hello World', 'xyz')  =>  false
            contains('abc', '')  =>  true
            contains('', '')  =>  true
            contains('', 'a')  =>  false
            contains(github.event.labels, 'bug')  =>  true
            contains(github.event.labels, 'BUG')  =>  true
            contains(github.event.labels, 'help wanted')  =>  true
            contains(github.event.labels, 'help')  =>  false
            contains(matrix.node, 16)  =>  true
            contains(matrix.node, '16')  =>  true
            contains(matrix.node, 17)  =>  false
            contains(arr, null)  =>  true
            contains(arr, true)  =>  true
            contains(arr, 1)  =>  true
            contains(arr, 'TWO')  =>  true
            contains(arr, arr[4])  =>  true
            contains(empty_arr, null)  =>  false
            contains(123, 2)  =>  true
            contains(true, 'ru')  =>  true
            contains(null, '')  =>  true
            contains(1.5, '.')  =>  true
            contains('NaN', NaN)  =>  true
            contains(github, 'push')  =>  false
            contains('Object', github)  =>  false
            contains(github.event_name, 'us')  =>  true
            contains(fromJSON('["a","b"]'), 'B')  =>  true
            contains('a', 'b', 'c')  =>  error: too many arguments to function 'contains': expected 2, got 3 at column 1 in expression: 'contains('a', 'b', 'c')'
            contains('a')  =>  error: too few arguments to function 'contains': expected 2, got 1 at column 1 in expression: 'contains('a')'
            contains()  =>  error: too few arguments to function 'contains': expected 2, got 0 at column 1 in expression: 'contains()'
        "#]],
    );
}

#[test]
fn functions_starts_ends_with() {
    table(
        &[
            "startsWith('Hello', 'he')",
            "startsWith('Hello', 'lo')",
            "startsWith('Hello', '')",
            "startsWith('', 'a')",
            "startsWith(github.ref, 'refs/heads/')",
            "startsWith(github.ref, 'REFS/TAGS/')",
            "startsWith(123, 12)",
            "startsWith(true, 't')",
            "startsWith(null, '')",
            "startsWith(1.5, '1.')",
            "startsWith(matrix.node, '14')",
            "startsWith('Array', matrix.node)",
            "endsWith('Hello', 'LLO')",
            "endsWith('Hello', 'he')",
            "endsWith('Hello', '')",
            "endsWith(github.repository, '/repo')",
            "endsWith(100, 0)",
            "endsWith(false, 'SE')",
            "endsWith(github, 'ct')",
            "endsWith('a')",
            "startsWith('a', 'b', 'c')",
        ],
        expect![[r#"
            startsWith('Hello', 'he')  =>  true
            startsWith('Hello', 'lo')  =>  false
            startsWith('Hello', '')  =>  true
            startsWith('', 'a')  =>  false
            startsWith(github.ref, 'refs/heads/')  =>  true
            startsWith(github.ref, 'REFS/TAGS/')  =>  false
            startsWith(123, 12)  =>  true
            startsWith(true, 't')  =>  true
            startsWith(null, '')  =>  true
            startsWith(1.5, '1.')  =>  true
            startsWith(matrix.node, '14')  =>  false
            startsWith('Array', matrix.node)  =>  false
            endsWith('Hello', 'LLO')  =>  true
            endsWith('Hello', 'he')  =>  false
            endsWith('Hello', '')  =>  true
            endsWith(github.repository, '/repo')  =>  true
            endsWith(100, 0)  =>  true
            endsWith(false, 'SE')  =>  true
            endsWith(github, 'ct')  =>  false
            endsWith('a')  =>  error: too few arguments to function 'endsWith': expected 2, got 1 at column 1 in expression: 'endsWith('a')'
            startsWith('a', 'b', 'c')  =>  error: too many arguments to function 'startsWith': expected 2, got 3 at column 1 in expression: 'startsWith('a', 'b', 'c')'
        "#]],
    );
}

#[test]
fn function_format() {
    table(
        &[
            "format('Hello {0}', 'world')",
            "format('{0} {1} {0}', 'a', 'b')",
            "format('{1}{0}', 1, 2)",
            "format('no placeholders')",
            "format('no placeholders', 'extra')",
            "format('{{0}}', 'x')",
            "format('{{{0}}}', 'x')",
            "format('}}{{')",
            "format('{0}}}', 1)",
            "format('{0}', null)",
            "format('{0}', true)",
            "format('{0}', 1.5)",
            "format('{0}', 100)",
            "format('{0}', 1e21)",
            "format('{0}', NaN)",
            "format('{0}', -Infinity)",
            "format('{0}', github)",
            "format('{0}', matrix.node)",
            "format('{0}', github.event.commits.*.message)",
            "format('{10}', 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 'ten')",
            "format('{00}', 'zero')",
            "format('{0}-{1}', github.event_name, github.run_number)",
            "format('{1}', 'only one')",
            "format('{0')",
            "format('{', 1)",
            "format('}', 1)",
            "format('{a}', 1)",
            "format('{ 0 }', 1)",
            "format('{-1}', 1)",
            "format('{}', 1)",
            "format(123)",
            "format(null, 1)",
            "format()",
            "format('ünï {0} ✓', 'cödé')",
        ],
        expect![[r#"
            format('Hello {0}', 'world')  =>  "Hello world"
            format('{0} {1} {0}', 'a', 'b')  =>  "a b a"
            format('{1}{0}', 1, 2)  =>  "21"
            format('no placeholders')  =>  "no placeholders"
            format('no placeholders', 'extra')  =>  "no placeholders"
            format('{{0}}', 'x')  =>  "{0}"
            format('{{{0}}}', 'x')  =>  "{x}"
            format('}}{{')  =>  "}{"
            format('{0}}}', 1)  =>  "1}"
            format('{0}', null)  =>  ""
            format('{0}', true)  =>  "true"
            format('{0}', 1.5)  =>  "1.5"
            format('{0}', 100)  =>  "100"
            format('{0}', 1e21)  =>  "1000000000000000000000"
            format('{0}', NaN)  =>  "NaN"
            format('{0}', -Infinity)  =>  "-Infinity"
            format('{0}', github)  =>  "Object"
            format('{0}', matrix.node)  =>  "Array"
            format('{0}', github.event.commits.*.message)  =>  "Array"
            format('{10}', 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 'ten')  =>  "ten"
            format('{00}', 'zero')  =>  "zero"
            format('{0}-{1}', github.event_name, github.run_number)  =>  "push-42"
            format('{1}', 'only one')  =>  error: the following format string references more arguments than were supplied: '{1}' at column 1 in expression: 'format('{1}', 'only one')'
            format('{0')  =>  error: the following format string is invalid: '{0' at column 1 in expression: 'format('{0')'
            format('{', 1)  =>  error: the following format string is invalid: '{' at column 1 in expression: 'format('{', 1)'
            format('}', 1)  =>  error: the following format string is invalid: '}' at column 1 in expression: 'format('}', 1)'
            format('{a}', 1)  =>  error: the following format string is invalid: '{a}' at column 1 in expression: 'format('{a}', 1)'
            format('{ 0 }', 1)  =>  error: the following format string is invalid: '{ 0 }' at column 1 in expression: 'format('{ 0 }', 1)'
            format('{-1}', 1)  =>  error: the following format string is invalid: '{-1}' at column 1 in expression: 'format('{-1}', 1)'
            format('{}', 1)  =>  error: the following format string is invalid: '{}' at column 1 in expression: 'format('{}', 1)'
            format(123)  =>  "123"
            format(null, 1)  =>  ""
            format()  =>  error: too few arguments to function 'format': expected at least 1, got 0 at column 1 in expression: 'format()'
            format('ünï {0} ✓', 'cödé')  =>  "ünï cödé ✓"
        "#]],
    );
}

#[test]
fn function_join() {
    table(
        &[
            "join(matrix.node)",
            "join(matrix.node, ', ')",
            "join(matrix.node, '')",
            "join(github.event.labels, ' | ')",
            "join(arr)",
            "join(empty_arr, ',')",
            "join('single', ',')",
            "join(1.5)",
            "join(null)",
            "join(true, 'x')",
            "join(github, ',')",
            "join(matrix.node, 0)",
            "join(matrix.node, null)",
            "join(fromJSON('[\"a\", 1, null, true]'), '/')",
            "join(obj.*.b, '+')",
            "join()",
            "join(1, 2, 3)",
        ],
        expect![[r#"
            join(matrix.node)  =>  "14,16,18"
            join(matrix.node, ', ')  =>  "14, 16, 18"
            join(matrix.node, '')  =>  "141618"
            join(github.event.labels, ' | ')  =>  "bug | Help Wanted"
            join(arr)  =>  "1,two,true,,Object,Array"
            join(empty_arr, ',')  =>  ""
            join('single', ',')  =>  "single"
            join(1.5)  =>  "1.5"
            join(null)  =>  ""
            join(true, 'x')  =>  "true"
            join(github, ',')  =>  "Object"
            join(matrix.node, 0)  =>  "14016018"
            join(matrix.node, null)  =>  "141618"
            join(fromJSON('["a", 1, null, true]'), '/')  =>  "a/1//true"
            join(obj.*.b, '+')  =>  "1+2"
            join()  =>  error: too few arguments to function 'join': expected 1 to 2, got 0 at column 1 in expression: 'join()'
            join(1, 2, 3)  =>  error: too many arguments to function 'join': expected 1 to 2, got 3 at column 1 in expression: 'join(1, 2, 3)'
        "#]],
    );
}

#[test]
fn function_to_json() {
    table(
        &[
            "toJSON(null)",
            "toJSON(true)",
            "toJSON(1)",
            "toJSON(1.5)",
            "toJSON(float)",
            "toJSON('str')",
            "toJSON('quote\"and\\\\backslash')",
            "toJSON(NaN)",
            "toJSON(Infinity)",
            "toJSON(empty_arr)",
            "toJSON(empty_obj)",
            "toJSON(matrix.node)",
            "toJSON(matrix)",
            "toJSON(obj)",
            "toJSON(arr)",
            "toJSON(github.event.commits.*.author)",
            "toJSON(fromJSON('{\"b\":1,\"a\":[]}'))",
            "toJSON(steps.other_step)",
            "toJSON()",
            "toJSON(1, 2)",
        ],
        expect![[r#"
            toJSON(null)  =>  "null"
            toJSON(true)  =>  "true"
            toJSON(1)  =>  "1"
            toJSON(1.5)  =>  "1.5"
            toJSON(float)  =>  "1"
            toJSON('str')  =>  "\"str\""
            toJSON('quote"and\\backslash')  =>  "\"quote\\\"and\\\\\\\\backslash\""
            toJSON(NaN)  =>  "NaN"
            toJSON(Infinity)  =>  "Infinity"
            toJSON(empty_arr)  =>  "[]"
            toJSON(empty_obj)  =>  "{}"
            toJSON(matrix.node)  =>  "[\n  14,\n  16,\n  18\n]"
            toJSON(matrix)  =>  "{\n  \"os\": \"ubuntu-latest\",\n  \"node\": [\n    14,\n    16,\n    18\n  ]\n}"
            toJSON(obj)  =>  "{\n  \"a\": {\n    \"b\": 1\n  },\n  \"c\": {\n    \"b\": 2\n  },\n  \"d\": {\n    \"x\": 3\n  }\n}"
            toJSON(arr)  =>  "[\n  1,\n  \"two\",\n  true,\n  null,\n  {\n    \"k\": \"v\"\n  },\n  [\n    1,\n    2\n  ]\n]"
            toJSON(github.event.commits.*.author)  =>  "[\n  {\n    \"name\": \"ann\"\n  },\n  {\n    \"name\": \"bob\"\n  }\n]"
            toJSON(fromJSON('{"b":1,"a":[]}'))  =>  "{\n  \"b\": 1,\n  \"a\": []\n}"
            toJSON(steps.other_step)  =>  "{\n  \"outputs\": {},\n  \"outcome\": \"failure\"\n}"
            toJSON()  =>  error: too few arguments to function 'toJSON': expected 1, got 0 at column 1 in expression: 'toJSON()'
            toJSON(1, 2)  =>  error: too many arguments to function 'toJSON': expected 1, got 2 at column 1 in expression: 'toJSON(1, 2)'
        "#]],
    );
}

#[test]
fn function_from_json() {
    table(
        &[
            "fromJSON('null')",
            "fromJSON('true')",
            "fromJSON('42')",
            "fromJSON('1.50')",
            "fromJSON('\"text\"')",
            "fromJSON('[1, \"a\", null]')",
            "fromJSON('{\"k\": {\"n\": [true]}}')",
            "fromJSON('  {\"padded\": 1}  ')",
            "fromJSON('{\"a\":1}').A",
            "fromJSON(true)",
            "fromJSON(5)",
            "fromJSON(steps.my-step.outputs.json)",
            "fromJSON(toJSON(matrix)).os",
            "fromJSON('{\"include\":[{\"os\":\"linux\"}]}').include[0].os",
            "fromJSON('')",
            "fromJSON('{a: 1}')",
            "fromJSON('[1, 2')",
            "fromJSON('NaN')",
            "fromJSON('tru')",
            "fromJSON(null)",
            "fromJSON('1 2')",
            "fromJSON()",
        ],
        expect![[r#"
            fromJSON('null')  =>  null
            fromJSON('true')  =>  true
            fromJSON('42')  =>  42
            fromJSON('1.50')  =>  1.5
            fromJSON('"text"')  =>  "text"
            fromJSON('[1, "a", null]')  =>  [1,"a",null]
            fromJSON('{"k": {"n": [true]}}')  =>  {"k":{"n":[true]}}
            fromJSON('  {"padded": 1}  ')  =>  {"padded":1}
            fromJSON('{"a":1}').A  =>  1
            fromJSON(true)  =>  true
            fromJSON(5)  =>  5
            fromJSON(steps.my-step.outputs.json)  =>  {"a":[1,2]}
            fromJSON(toJSON(matrix)).os  =>  "ubuntu-latest"
            fromJSON('{"include":[{"os":"linux"}]}').include[0].os  =>  "linux"
            fromJSON('')  =>  error: invalid JSON in fromJSON(''): EOF while parsing a value (line 1, column 0) at column 1 in expression: 'fromJSON('')'
            fromJSON('{a: 1}')  =>  error: invalid JSON in fromJSON('{a: 1}'): key must be a string (line 1, column 2) at column 1 in expression: 'fromJSON('{a: 1}')'
            fromJSON('[1, 2')  =>  error: invalid JSON in fromJSON('[1, 2'): EOF while parsing a list (line 1, column 5) at column 1 in expression: 'fromJSON('[1, 2')'
            fromJSON('NaN')  =>  error: invalid JSON in fromJSON('NaN'): expected value (line 1, column 1) at column 1 in expression: 'fromJSON('NaN')'
            fromJSON('tru')  =>  error: invalid JSON in fromJSON('tru'): EOF while parsing a value (line 1, column 3) at column 1 in expression: 'fromJSON('tru')'
            fromJSON(null)  =>  error: invalid JSON in fromJSON(''): EOF while parsing a value (line 1, column 0) at column 1 in expression: 'fromJSON(null)'
            fromJSON('1 2')  =>  error: invalid JSON in fromJSON('1 2'): trailing characters (line 1, column 3) at column 1 in expression: 'fromJSON('1 2')'
            fromJSON()  =>  error: too few arguments to function 'fromJSON': expected 1, got 0 at column 1 in expression: 'fromJSON()'
        "#]],
    );
}

#[test]
fn status_and_hash_functions() {
    table(
        &[
            "success()",
            "always()",
            "failure()",
            "cancelled()",
            "success() && env.FOO",
            "!cancelled()",
            "success(1)",
            "always(true)",
            "hashFiles('**/package-lock.json')",
            "hashFiles('a', '!b', 'c')",
            "hashFiles(1, true)",
            "hashFiles('fail')",
            "hashFiles()",
        ],
        expect![[r#"
            success()  =>  true
            always()  =>  true
            failure()  =>  false
            cancelled()  =>  false
            success() && env.FOO  =>  "bar"
            !cancelled()  =>  true
            success(1)  =>  error: too many arguments to function 'success': expected 0, got 1 at column 1 in expression: 'success(1)'
            always(true)  =>  error: too many arguments to function 'always': expected 0, got 1 at column 1 in expression: 'always(true)'
            hashFiles('**/package-lock.json')  =>  "hash:**/package-lock.json"
            hashFiles('a', '!b', 'c')  =>  "hash:a|!b|c"
            hashFiles(1, true)  =>  "hash:1|true"
            hashFiles('fail')  =>  error: hashFiles failed: cannot read files at column 1 in expression: 'hashFiles('fail')'
            hashFiles()  =>  error: too few arguments to function 'hashFiles': expected at least 1, got 0 at column 1 in expression: 'hashFiles()'
        "#]],
    );
}

#[test]
fn number_to_string() {
    table(
        &[
            "format('{0}', 0)",
            "format('{0}', -0)",
            "format('{0}', 1)",
            "format('{0}', -3)",
            "format('{0}', 1.0)",
            "format('{0}', 0.1)",
            "format('{0}', 0.5)",
            "format('{0}', 1.25)",
            "format('{0}', -2.5e-3)",
            "format('{0}', 1e-7)",
            "format('{0}', 123456789)",
            "format('{0}', 1234567890123)",
            "format('{0}', 9007199254740993)",
            "format('{0}', 1e20)",
            "format('{0}', 100000000000000000000)",
            "format('{0}', 0.1e1)",
            "format('{0}', 0x10)",
            "format('{0}', 1/3)",
            "format('{0}', fromJSON('0.30000000000000004'))",
            "format('{0}', fromJSON('2.0'))",
            "format('{0}', Infinity)",
            "format('{0}', inputs.ratio)",
            "format('{0}', github.run_number)",
            "format('{0}', float)",
        ],
        expect![[r#"
            format('{0}', 0)  =>  "0"
            format('{0}', -0)  =>  "0"
            format('{0}', 1)  =>  "1"
            format('{0}', -3)  =>  "-3"
            format('{0}', 1.0)  =>  "1"
            format('{0}', 0.1)  =>  "0.1"
            format('{0}', 0.5)  =>  "0.5"
            format('{0}', 1.25)  =>  "1.25"
            format('{0}', -2.5e-3)  =>  "-0.0025"
            format('{0}', 1e-7)  =>  "0.0000001"
            format('{0}', 123456789)  =>  "123456789"
            format('{0}', 1234567890123)  =>  "1234567890123"
            format('{0}', 9007199254740993)  =>  "9007199254740992"
            format('{0}', 1e20)  =>  "100000000000000000000"
            format('{0}', 100000000000000000000)  =>  "100000000000000000000"
            format('{0}', 0.1e1)  =>  "1"
            format('{0}', 0x10)  =>  "16"
            format('{0}', 1/3)  =>  error: unexpected symbol '/' at column 16 in expression: 'format('{0}', 1/3)'
            format('{0}', fromJSON('0.30000000000000004'))  =>  "0.30000000000000004"
            format('{0}', fromJSON('2.0'))  =>  "2"
            format('{0}', Infinity)  =>  "Infinity"
            format('{0}', inputs.ratio)  =>  "0.5"
            format('{0}', github.run_number)  =>  "42"
            format('{0}', float)  =>  "1"
        "#]],
    );
}

#[test]
fn named_values() {
    table(
        &["foo", "foo.bar", "Github2.x", "success() && nope", "nope || true"],
        expect![[r#"
        foo  =>  error: unrecognized named-value: 'foo' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'foo'
        foo.bar  =>  error: unrecognized named-value: 'foo' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'foo.bar'
        Github2.x  =>  error: unrecognized named-value: 'Github2' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'Github2.x'
        success() && nope  =>  error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 14 in expression: 'success() && nope'
        nope || true  =>  error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'nope || true'
    "#]],
    );
    check(
        "x",
        json!({}),
        expect![
            "error: unrecognized named-value: 'x' (available: none) at column 1 in expression: 'x'"
        ],
    );
    check("ctx.a", json!({"CTX": {"A": 1}}), expect!["1"]);
    check(
        "custom['key with space']",
        json!({"custom": {"key with space": "v"}}),
        expect![[r#""v""#]],
    );
    check("env.A", json!({"env": {"a": 1, "A": 2}}), expect!["2"]);
    check("env.a", json!({"env": {"A": 2}}), expect!["2"]);
}

#[test]
fn parse_errors() {
    table(
        &[
            "",
            "   ",
            "a == )",
            "1 ==",
            "== 1",
            "(1",
            "1)",
            "((1)",
            "[1]",
            "a[",
            "a[1",
            "a[]",
            "a.",
            "a.1",
            "a.'x'",
            "a..b",
            "a = 1",
            "a & b",
            "a | b",
            "1 2",
            "'unterminated",
            "'it''s",
            "1 +",
            "1 + 2",
            "a - b",
            "-",
            "1.2.3",
            "1e",
            "0x",
            "0xZZ",
            "12abc",
            "foo(",
            "foo()",
            "format(",
            "format('{0}',",
            "format('{0}' 1)",
            "contains(,1)",
            "success()()",
            "{}",
            "${{ 1 }}",
            "#",
            "@x",
            "True",
            "NULL",
            "github.event_name = 'push'",
            "!",
            "!!",
            "a ! b",
            "toJSON(",
            "1 < < 2",
            "é",
            "'ok' ✓",
            "'x' == ☃",
        ],
        expect![[r#"
              =>  error: empty expression at column 1 in expression: ''
                 =>  error: empty expression at column 1 in expression: ''
            a == )  =>  error: unexpected token ')' at column 6 in expression: 'a == )'
            1 ==  =>  error: unexpected end of expression at column 5 in expression: '1 =='
            == 1  =>  error: unexpected token '==' at column 1 in expression: '== 1'
            (1  =>  error: unexpected end of expression at column 3 in expression: '(1'
            1)  =>  error: unexpected token ')' at column 2 in expression: '1)'
            ((1)  =>  error: unexpected end of expression at column 5 in expression: '((1)'
            [1]  =>  error: unexpected token '[' at column 1 in expression: '[1]'
            a[  =>  error: unexpected end of expression at column 3 in expression: 'a['
            a[1  =>  error: unexpected end of expression at column 4 in expression: 'a[1'
            a[]  =>  error: unexpected token ']' at column 3 in expression: 'a[]'
            a.  =>  error: unexpected end of expression at column 3 in expression: 'a.'
            a.1  =>  error: unexpected symbol '1' at column 3 in expression: 'a.1'
            a.'x'  =>  error: unexpected token ''x'' at column 3 in expression: 'a.'x''
            a..b  =>  error: unexpected token '.' at column 3 in expression: 'a..b'
            a = 1  =>  error: unexpected symbol '=' at column 3 in expression: 'a = 1'
            a & b  =>  error: unexpected symbol '&' at column 3 in expression: 'a & b'
            a | b  =>  error: unexpected symbol '|' at column 3 in expression: 'a | b'
            1 2  =>  error: unexpected token '2' at column 3 in expression: '1 2'
            'unterminated  =>  error: unterminated string at column 1 in expression: ''unterminated'
            'it''s  =>  error: unterminated string at column 1 in expression: ''it''s'
            1 +  =>  error: unexpected symbol '+' at column 3 in expression: '1 +'
            1 + 2  =>  error: unexpected symbol '+' at column 3 in expression: '1 + 2'
            a - b  =>  error: unexpected symbol '-' at column 3 in expression: 'a - b'
            -  =>  error: unexpected symbol '-' at column 1 in expression: '-'
            1.2.3  =>  error: invalid number '1.2.3' at column 1 in expression: '1.2.3'
            1e  =>  error: invalid number '1e' at column 1 in expression: '1e'
            0x  =>  error: invalid number '0x' at column 1 in expression: '0x'
            0xZZ  =>  error: invalid number '0xZZ' at column 1 in expression: '0xZZ'
            12abc  =>  error: invalid number '12abc' at column 1 in expression: '12abc'
            foo(  =>  error: unrecognized function: 'foo' at column 1 in expression: 'foo('
            foo()  =>  error: unrecognized function: 'foo' at column 1 in expression: 'foo()'
            format(  =>  error: unexpected end of expression at column 8 in expression: 'format('
            format('{0}',  =>  error: unexpected end of expression at column 14 in expression: 'format('{0}','
            format('{0}' 1)  =>  error: unexpected token '1' at column 14 in expression: 'format('{0}' 1)'
            contains(,1)  =>  error: unexpected token ',' at column 10 in expression: 'contains(,1)'
            success()()  =>  error: unexpected token '(' at column 10 in expression: 'success()()'
            {}  =>  error: unexpected symbol '{' at column 1 in expression: '{}'
            ${{ 1 }}  =>  error: unexpected symbol '$' at column 1 in expression: '${{ 1 }}'
            #  =>  error: unexpected symbol '#' at column 1 in expression: '#'
            @x  =>  error: unexpected symbol '@' at column 1 in expression: '@x'
            True  =>  error: unrecognized named-value: 'True' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'True'
            NULL  =>  error: unrecognized named-value: 'NULL' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'NULL'
            github.event_name = 'push'  =>  error: unexpected symbol '=' at column 19 in expression: 'github.event_name = 'push''
            !  =>  error: unexpected end of expression at column 2 in expression: '!'
            !!  =>  error: unexpected end of expression at column 3 in expression: '!!'
            a ! b  =>  error: unexpected token '!' at column 3 in expression: 'a ! b'
            toJSON(  =>  error: unexpected end of expression at column 8 in expression: 'toJSON('
            1 < < 2  =>  error: unexpected token '<' at column 5 in expression: '1 < < 2'
            é  =>  error: unexpected symbol 'é' at column 1 in expression: 'é'
            'ok' ✓  =>  error: unexpected symbol '✓' at column 6 in expression: ''ok' ✓'
            'x' == ☃  =>  error: unexpected symbol '☃' at column 8 in expression: ''x' == ☃'
        "#]],
    );
}

#[test]
fn depth_limit() {
    let ctx = contexts();
    let mut out = String::new();
    for (name, src) in [
        ("parens 99", format!("{}1{}", "(".repeat(99), ")".repeat(99))),
        ("parens 100", format!("{}1{}", "(".repeat(100), ")".repeat(100))),
        ("parens 5000", format!("{}1{}", "(".repeat(5000), ")".repeat(5000))),
        ("not 99", format!("{}true", "!".repeat(99))),
        ("not 10000", format!("{}true", "!".repeat(10000))),
        ("index 1000", format!("{}0{}", "arr[".repeat(1000), "]".repeat(1000))),
        ("calls 1000", format!("{}1{}", "toJSON(".repeat(1000), ")".repeat(1000))),
        ("eq chain 50", format!("1{}", " == 1".repeat(50))),
        ("eq chain 1000", format!("1{}", " == 1".repeat(1000))),
        ("or chain 10000", format!("false{}", " || false".repeat(10000))),
        ("and chain 10000", format!("true{}", " && true".repeat(10000))),
        ("property chain 10000", format!("github{}", ".x".repeat(10000))),
        ("unclosed 100000", "(".repeat(100_000)),
    ] {
        let result = run(&src, &ctx, JobStatus::Success);
        let short: String = result.chars().take(110).collect();
        out.push_str(&format!("{name}  =>  {short}\n"));
    }
    expect![[r#"
        parens 99  =>  1
        parens 100  =>  error: expression nesting exceeds the maximum depth of 100 at column 100 in expression: '(((((((((((((((((((((
        parens 5000  =>  error: expression nesting exceeds the maximum depth of 100 at column 100 in expression: '(((((((((((((((((((((
        not 99  =>  false
        not 10000  =>  error: expression nesting exceeds the maximum depth of 100 at column 100 in expression: '!!!!!!!!!!!!!!!!!!!!!
        index 1000  =>  error: expression nesting exceeds the maximum depth of 100 at column 400 in expression: 'arr[arr[arr[arr[arr[a
        calls 1000  =>  error: expression nesting exceeds the maximum depth of 100 at column 694 in expression: 'toJSON(toJSON(toJSON(
        eq chain 50  =>  true
        eq chain 1000  =>  error: expression nesting exceeds the maximum depth of 100 at column 498 in expression: '1 == 1 == 1 == 1 == 1
        or chain 10000  =>  false
        and chain 10000  =>  true
        property chain 10000  =>  null
        unclosed 100000  =>  error: expression nesting exceeds the maximum depth of 100 at column 100 in expression: '(((((((((((((((((((((
    "#]].assert_eq(&out);
}

#[test]
fn interpolation() {
    interpolate_table(
        &[
            "plain text",
            "",
            "${{ github.event_name }}",
            "event: ${{ github.event_name }}!",
            "${{ github.event_name }}-${{ github.ref }}",
            "${{github.event_name}}",
            "a ${{ 1 }} b ${{ 2 }} c ${{ 3 }}",
            "${{ '}}' }}",
            "${{ format('{0}}}', 1) }}",
            "${{ format('{{{0}}}', 'x') }}",
            "${{ 'it''s' }}",
            "${{ '${{' }}",
            "${{ null }}|${{ true }}|${{ 1.5 }}|${{ github }}|${{ matrix.node }}",
            "${{ NaN }} ${{ Infinity }}",
            "$ {{ not an expression }}",
            "${ { no } }",
            "$${{ 1 }}",
            "${{ 1 }}}",
            "{{ 1 }}",
            "${{ 1 }",
            "${{ 1",
            "text ${{",
            "${{ 'unterminated }}",
            "${{ }}",
            "${{ a == ) }}",
            "ok ${{ 1 }} then ${{ nope }}",
            "ünï ${{ 'cödé' }} ✓",
            "multi\nline ${{ env.FOO }}\n",
            "${{ toJSON(matrix.node) }}",
        ],
        expect![[r#"
            plain text  =>  "plain text"
              =>  ""
            ${{ github.event_name }}  =>  "push"
            event: ${{ github.event_name }}!  =>  "event: push!"
            ${{ github.event_name }}-${{ github.ref }}  =>  "push-refs/heads/main"
            ${{github.event_name}}  =>  "push"
            a ${{ 1 }} b ${{ 2 }} c ${{ 3 }}  =>  "a 1 b 2 c 3"
            ${{ '}}' }}  =>  "}}"
            ${{ format('{0}}}', 1) }}  =>  "1}"
            ${{ format('{{{0}}}', 'x') }}  =>  "{x}"
            ${{ 'it''s' }}  =>  "it's"
            ${{ '${{' }}  =>  "${{"
            ${{ null }}|${{ true }}|${{ 1.5 }}|${{ github }}|${{ matrix.node }}  =>  "|true|1.5|Object|Array"
            ${{ NaN }} ${{ Infinity }}  =>  "NaN Infinity"
            $ {{ not an expression }}  =>  "$ {{ not an expression }}"
            ${ { no } }  =>  "${ { no } }"
            $${{ 1 }}  =>  "$1"
            ${{ 1 }}}  =>  "1}"
            {{ 1 }}  =>  "{{ 1 }}"
            ${{ 1 }  =>  error: unclosed expression: missing '}}' at column 1 in expression: '${{ 1 }'
            ${{ 1  =>  error: unclosed expression: missing '}}' at column 1 in expression: '${{ 1'
            text ${{  =>  error: unclosed expression: missing '}}' at column 6 in expression: 'text ${{'
            ${{ 'unterminated }}  =>  error: unclosed expression: missing '}}' at column 1 in expression: '${{ 'unterminated }}'
            ${{ }}  =>  error: empty expression at column 1 in expression: ''
            ${{ a == ) }}  =>  error: unexpected token ')' at column 6 in expression: 'a == )'
            ok ${{ 1 }} then ${{ nope }}  =>  error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'nope'
            ünï ${{ 'cödé' }} ✓  =>  "ünï cödé ✓"
            multi\nline ${{ env.FOO }}\n  =>  "multi\nline bar\n"
            ${{ toJSON(matrix.node) }}  =>  "[\n  14,\n  16,\n  18\n]"
        "#]],
    );
}

#[test]
fn interpolate_values_keep_types() {
    let ctx = contexts();
    let host = TestHost(JobStatus::Success);
    let scope = Scope { contexts: &ctx, host: &host };
    let input = json!({
        "number": "${{ inputs.count }}",
        "padded": "  ${{ inputs.flag }}  ",
        "array": "${{ matrix.node }}",
        "object": "${{ fromJSON('{\"a\":1}') }}",
        "null": "${{ null }}",
        "nan": "${{ NaN }}",
        "mixed": "n=${{ inputs.count }}",
        "two": "${{ 1 }}${{ 2 }}",
        "plain": "no expressions",
        "${{ env.FOO }}_key": ["${{ 1 == 1 }}", 7, null, {"deep": "${{ github.ref }}"}],
        "untouched": [true, 1.5]
    });
    let out = match interpolate_value(&input, &scope) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(e) => format!("error: {e}"),
    };
    expect![[r#"
        {
          "number": 3,
          "padded": true,
          "array": [
            14,
            16,
            18
          ],
          "object": {
            "a": 1
          },
          "null": null,
          "nan": "NaN",
          "mixed": "n=3",
          "two": "12",
          "plain": "no expressions",
          "bar_key": [
            true,
            7,
            null,
            {
              "deep": "refs/heads/main"
            }
          ],
          "untouched": [
            true,
            1.5
          ]
        }"#]]
    .assert_eq(&out);
    let bad = interpolate_value(&json!({"k": ["${{ nope }}"]}), &scope);
    expect![[r#"Err(Error { message: "unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float)", column: 1, expression: "nope" })"#]].assert_eq(&format!("{bad:?}"));
    let bad_key = interpolate_value(&json!({"${{ (": 1}), &scope);
    expect![[r#"Err(Error { message: "unclosed expression: missing '}}'", column: 1, expression: "${{ (" })"#]].assert_eq(&format!("{bad_key:?}"));
}

#[test]
fn if_conditions() {
    if_table(
        &[
            "",
            "   ",
            "true",
            "false",
            "${{ true }}",
            "${{ false }}",
            "  ${{ github.event_name == 'push' }}  ",
            "github.event_name == 'push'",
            "github.event_name == 'pull_request'",
            "success()",
            "failure()",
            "cancelled()",
            "always()",
            "${{ always() }}",
            "!cancelled()",
            "success() || failure()",
            "failure() && github.event_name == 'push'",
            "always() && false",
            "contains(needs.*.result, 'failure')",
            "steps.my-step.outcome == 'success'",
            "env.EMPTY",
            "env.FOO",
            "'false'",
            "0",
            "null",
            "format('{0}', success())",
            "toJSON(always())",
            "${{ github.event_name }} == 'push'",
            "${{ false }}",
            "prefix ${{ false }}",
            "${{ false }}${{ always() }}",
            "${{ env.EMPTY }}${{ env.EMPTY }}",
            "nope",
            "always() && nope",
            "a ==",
            "${{ 1",
        ],
        expect![[r#"
              =>  true / false / false
                 =>  true / false / false
            true  =>  true / false / false
            false  =>  false / false / false
            ${{ true }}  =>  true / false / false
            ${{ false }}  =>  false / false / false
              ${{ github.event_name == 'push' }}    =>  true / false / false
            github.event_name == 'push'  =>  true / false / false
            github.event_name == 'pull_request'  =>  false / false / false
            success()  =>  true / false / false
            failure()  =>  false / true / false
            cancelled()  =>  false / false / true
            always()  =>  true / true / true
            ${{ always() }}  =>  true / true / true
            !cancelled()  =>  true / true / false
            success() || failure()  =>  true / true / false
            failure() && github.event_name == 'push'  =>  false / true / false
            always() && false  =>  false / false / false
            contains(needs.*.result, 'failure')  =>  true / false / false
            steps.my-step.outcome == 'success'  =>  true / false / false
            env.EMPTY  =>  false / false / false
            env.FOO  =>  true / false / false
            'false'  =>  true / false / false
            0  =>  false / false / false
            null  =>  false / false / false
            format('{0}', success())  =>  true / true / true
            toJSON(always())  =>  true / true / true
            ${{ github.event_name }} == 'push'  =>  true / false / false
            ${{ false }}  =>  false / false / false
            prefix ${{ false }}  =>  true / false / false
            ${{ false }}${{ always() }}  =>  true / true / true
            ${{ env.EMPTY }}${{ env.EMPTY }}  =>  false / false / false
            nope  =>  error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'nope' / error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'nope' / error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'nope'
            always() && nope  =>  error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 13 in expression: 'always() && nope' / error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 13 in expression: 'always() && nope' / error: unrecognized named-value: 'nope' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 13 in expression: 'always() && nope'
            a ==  =>  error: unexpected end of expression at column 5 in expression: 'a ==' / error: unexpected end of expression at column 5 in expression: 'a ==' / error: unexpected end of expression at column 5 in expression: 'a =='
            ${{ 1  =>  error: unclosed expression: missing '}}' at column 1 in expression: '${{ 1' / error: unclosed expression: missing '}}' at column 1 in expression: '${{ 1' / error: unclosed expression: missing '}}' at column 1 in expression: '${{ 1'
        "#]],
    );
}

#[test]
fn helpers() {
    let cases = [
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(-0.0),
        json!(3),
        json!(2.5),
        json!(1.0),
        json!(""),
        json!("x"),
        json!("false"),
        json!([]),
        json!({}),
        json!(1e300),
    ];
    let mut out = String::new();
    for v in &cases {
        out.push_str(&format!("{v}  =>  truthy={} string={:?}\n", truthy(v), to_string(v)));
    }
    expect![[r#"
        null  =>  truthy=false string=""
        true  =>  truthy=true string="true"
        false  =>  truthy=false string="false"
        0  =>  truthy=false string="0"
        -0.0  =>  truthy=false string="0"
        3  =>  truthy=true string="3"
        2.5  =>  truthy=true string="2.5"
        1.0  =>  truthy=true string="1"
        ""  =>  truthy=false string=""
        "x"  =>  truthy=true string="x"
        "false"  =>  truthy=true string="false"
        []  =>  truthy=true string="Array"
        {}  =>  truthy=true string="Object"
        1e+300  =>  truthy=true string="1000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "#]].assert_eq(&out);
    let mut out = String::new();
    for s in ["", "text", "${{", "$ {{", "a ${{ b }}", "}}"] {
        out.push_str(&format!("{s:?}  =>  {}\n", contains_expression(s)));
    }
    expect![[r#"
        ""  =>  false
        "text"  =>  false
        "${{"  =>  true
        "$ {{"  =>  false
        "a ${{ b }}"  =>  true
        "}}"  =>  false
    "#]]
    .assert_eq(&out);
}

#[test]
fn parsed_expression_api() {
    let describe = |src: &str| match parse(src) {
        Ok(e) => format!("ok source={:?} status={}", e.source(), e.uses_status_function()),
        Err(e) => format!(
            "err message={:?} column={} expression={:?}",
            e.message(),
            e.column(),
            e.expression()
        ),
    };
    let mut out = String::new();
    for src in [
        "  a.b  ",
        "success() || x",
        "format('{0}', failure())",
        "x[cancelled()]",
        "!always()",
        "'success()'",
        "success",
        " a == ) ",
    ] {
        out.push_str(&format!("{src:?}  =>  {}\n", describe(src)));
    }
    expect![[r#"
        "  a.b  "  =>  ok source="a.b" status=false
        "success() || x"  =>  ok source="success() || x" status=true
        "format('{0}', failure())"  =>  ok source="format('{0}', failure())" status=true
        "x[cancelled()]"  =>  ok source="x[cancelled()]" status=true
        "!always()"  =>  ok source="!always()" status=true
        "'success()'"  =>  ok source="'success()'" status=false
        "success"  =>  ok source="success" status=false
        " a == ) "  =>  err message="unexpected token ')'" column=6 expression="a == )"
    "#]]
    .assert_eq(&out);
}

#[test]
fn garbage_never_panics() {
    let ctx = contexts();
    let host = TestHost(JobStatus::Success);
    let scope = Scope { contexts: &ctx, host: &host };
    let alphabet: Vec<char> = "ab1.0x'(){}[]!=<>&|,*$ -_e\u{e9}\u{2603}\"\\\n".chars().collect();
    // A small deterministic generator (xorshift) so the run is reproducible.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut parsed = 0;
    for _ in 0..20_000 {
        let len = (next() % 24) as usize;
        let s: String =
            (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
        if let Ok(e) = parse(&s) {
            parsed += 1;
            let _ = evaluate(&e, &scope);
        }
        let _ = interpolate(&s, &scope);
        let _ = evaluate_if(&s, &scope);
        let _ = interpolate(&format!("x ${{{{ {s} }}}} y"), &scope);
    }
    assert!(parsed > 0, "the generator should produce some valid expressions");
    for s in
        ["'", "''", "'''", "${{", "${{ '", "${{ '' }}", "$", "${", "${{}}", "\u{0}", "\u{feff}1"]
    {
        let _ = parse(s);
        let _ = interpolate(s, &scope);
        let _ = evaluate_if(s, &scope);
    }
}

#[test]
fn hash_files_on_disk() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let root = dir.path();
    let write = |rel: &str, content: &str| {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).ok();
        }
        std::fs::write(&path, content).ok();
    };
    write("package-lock.json", "root lock");
    write("app/package-lock.json", "app lock");
    write("node_modules/dep/package-lock.json", "dep lock");
    write("src/main.rs", "fn main() {}");
    write("src/lib.rs", "");
    write(".hidden/config", "secret");
    let hash = |patterns: &[&str]| {
        let patterns: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        match hash_files_in(root, &patterns) {
            Ok(h) if h.is_empty() => "(no match)".to_string(),
            Ok(h) => h,
            Err(e) => format!("error: {e}"),
        }
    };
    // Expected value computed independently: sha256(sha256("app lock") ++ sha256("root lock")).
    let expected = {
        use sha2::{Digest, Sha256};
        let mut total = Sha256::new();
        total.update(Sha256::digest(b"app lock"));
        total.update(Sha256::digest(b"root lock"));
        hex::encode(total.finalize())
    };
    let all_locks_but_deps = hash(&["**/package-lock.json", "!node_modules/**"]);
    assert_eq!(all_locks_but_deps, expected);
    assert_eq!(hash(&["**/package-lock.json\n!**/node_modules/**"]), expected);
    assert_eq!(
        hash(&["!node_modules/**", "**/package-lock.json"]),
        hash(&["**/package-lock.json"])
    );
    assert_ne!(hash(&["**/package-lock.json"]), expected);
    assert_eq!(hash(&["**/package-lock.json", "!node_modules"]), expected);
    let single = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(Sha256::digest(b"fn main() {}")))
    };
    assert_eq!(hash(&["src/main.rs"]), single);
    assert_eq!(hash(&["./src/main.rs"]), single);
    let abs = format!("{}/src/main.rs", root.display());
    assert_eq!(hash(&[abs.as_str()]), single);
    // Deterministic across calls; a directory pattern takes the files below it.
    assert_eq!(hash(&["src/*.rs"]), hash(&["src/*.rs"]));
    assert_eq!(hash(&["src"]), hash(&["src/**"]));
    let mut out = String::new();
    for patterns in [
        &["nothing-here"][..],
        &["*.txt"],
        &[""],
        &["!**"],
        &["**", "!**"],
        &["../**"],
        &["/etc/passwd"],
        &["src/lib.rs"],
        &[".hidden/*"],
        &["[unclosed"],
    ] {
        out.push_str(&format!("{patterns:?}  =>  {}\n", hash(patterns)));
    }
    expect![[r#"
        ["nothing-here"]  =>  (no match)
        ["*.txt"]  =>  (no match)
        [""]  =>  (no match)
        ["!**"]  =>  (no match)
        ["**", "!**"]  =>  (no match)
        ["../**"]  =>  (no match)
        ["/etc/passwd"]  =>  (no match)
        ["src/lib.rs"]  =>  5df6e0e2761359d30a8275058e299fcc0381534545f55cf43e41983f5d4c9456
        [".hidden/*"]  =>  3881219d087dd9c634373fd33dfa33a2cb6bfc6c520b64b8bb60ef2ceb534ae7
        ["[unclosed"]  =>  error: invalid pattern '[unclosed': invalid range pattern
    "#]]
    .assert_eq(&out);
    let host = LocalHost { status: JobStatus::Success, workspace: root.to_path_buf() };
    let ctx = Map::new();
    let scope = Scope { contexts: &ctx, host: &host };
    let via_expression =
        evaluate_str("hashFiles('**/package-lock.json', '!node_modules/**')", &scope);
    assert_eq!(via_expression, Ok(Value::String(expected)));
}

#[test]
fn string_to_number_coercion() {
    table(
        &[
            "'0x1F' == 31",
            "'0X1f' == 31",
            "'0b101' == 5",
            "'0o17' == 15",
            "'1e3' == 1000",
            "'1E-2' == 0.01",
            "'.5' == 0.5",
            "'5.' == 5",
            "'+5' == 5",
            "'-5' == -5",
            "' \t 7 \n' == 7",
            "'Infinity' == Infinity",
            "'-Infinity' < 0",
            "'inf' == Infinity",
            "'nan' == 0",
            "'1_000' == 1000",
            "'1,5' == 1.5",
            "'12px' == 12",
            "'0x' == 0",
            "'-0x10' == -16",
            "'' == 0",
            "'   ' == 0",
            "'1 2' == 1",
            "'e5' == 0",
            "'1e' == 1",
            "'--1' == 1",
        ],
        expect![[r#"
            '0x1F' == 31  =>  true
            '0X1f' == 31  =>  true
            '0b101' == 5  =>  true
            '0o17' == 15  =>  true
            '1e3' == 1000  =>  true
            '1E-2' == 0.01  =>  true
            '.5' == 0.5  =>  true
            '5.' == 5  =>  true
            '+5' == 5  =>  true
            '-5' == -5  =>  true
            ' \t 7 \n' == 7  =>  true
            'Infinity' == Infinity  =>  true
            '-Infinity' < 0  =>  true
            'inf' == Infinity  =>  false
            'nan' == 0  =>  false
            '1_000' == 1000  =>  false
            '1,5' == 1.5  =>  false
            '12px' == 12  =>  false
            '0x' == 0  =>  false
            '-0x10' == -16  =>  false
            '' == 0  =>  true
            '   ' == 0  =>  true
            '1 2' == 1  =>  false
            'e5' == 0  =>  false
            '1e' == 1  =>  false
            '--1' == 1  =>  false
        "#]],
    );
}

#[test]
fn minus_and_identifiers() {
    table(
        &[
            "-1 == 0 - 1",
            "1 == -1",
            "-1 < 0",
            "(-1)",
            "--1",
            "- 1",
            "-a",
            "-0.0",
            "-.25",
            "a-b",
            "steps.my-step.outputs.x == 1",
            "steps.my-step-.outputs",
            "steps._x",
            "strategy.fail-fast && 'ff'",
            "matrix.os_",
            "github.event.commits.*.author.*",
            "github.event.commits.*[*]",
            "arr[5][*]",
            "1.5e2",
            "1e400",
            "-1e400",
            "0.0000001",
            "123456789012345678901234567890",
            "0x7FFFFFFFFFFFFFFF",
        ],
        expect![[r#"
            -1 == 0 - 1  =>  error: unexpected symbol '-' at column 9 in expression: '-1 == 0 - 1'
            1 == -1  =>  false
            -1 < 0  =>  true
            (-1)  =>  -1
            --1  =>  error: unexpected symbol '-' at column 1 in expression: '--1'
            - 1  =>  error: unexpected symbol '-' at column 1 in expression: '- 1'
            -a  =>  error: unexpected symbol '-' at column 1 in expression: '-a'
            -0.0  =>  0
            -.25  =>  -0.25
            a-b  =>  error: unrecognized named-value: 'a-b' (available: github, env, vars, secrets, matrix, steps, needs, inputs, job, runner, strategy, obj, arr, nested, empty_arr, empty_obj, float) at column 1 in expression: 'a-b'
            steps.my-step.outputs.x == 1  =>  true
            steps.my-step-.outputs  =>  null
            steps._x  =>  null
            strategy.fail-fast && 'ff'  =>  "ff"
            matrix.os_  =>  null
            github.event.commits.*.author.*  =>  ["ann","bob"]
            github.event.commits.*[*]  =>  ["first",{"name":"ann"},"second",{"name":"bob"},3]
            arr[5][*]  =>  [1,2]
            1.5e2  =>  150
            1e400  =>  "Infinity"
            -1e400  =>  "-Infinity"
            0.0000001  =>  1e-7
            123456789012345678901234567890  =>  1.2345678901234568e+29
            0x7FFFFFFFFFFFFFFF  =>  9.223372036854776e+18
        "#]],
    );
}
