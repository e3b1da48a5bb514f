//! Parsing workflows: every key form and alternative type, and parse errors.

use expect_test::expect;

use super::check;

const MIN: &str =
    "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n";

#[test]
fn minimal() {
    check(
        MIN,
        expect![[r#"
        on push
        job j @3
          runs-on: Labels(["ubuntu-latest"])
          steps:
          - step @6
            run: "echo"
    "#]],
    );
}

#[test]
fn on_is_a_string_key_not_a_boolean() {
    check(
        "on: push\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on push
        job j @2
          runs-on: Labels(["x"])
          steps:
          - step @2
            run: "a"
    "#]],
    );
}

#[test]
fn on_list() {
    check(
        "on: [push, pull_request]\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on push
        on pull_request
        job j @2
          runs-on: Labels(["x"])
          steps:
          - step @2
            run: "a"
    "#]],
    );
}

#[test]
fn on_block_list() {
    check(
        "on:\n  - push\n  - workflow_dispatch\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on push
        on workflow_dispatch
        job j @4
          runs-on: Labels(["x"])
          steps:
          - step @4
            run: "a"
    "#]],
    );
}

#[test]
fn on_map_with_filters_and_nulls() {
    check(
        r#"on:
  push:
    branches: [main, 'releases/**']
    paths-ignore: ['docs/**']
  pull_request:
    types: [opened, synchronize]
  schedule:
    - cron: '0 0 * * *'
  issues:
jobs: {j: {runs-on: x, steps: [run: a]}}
"#,
        expect![[r#"
            on push {"branches":["main","releases/**"],"paths-ignore":["docs/**"]}
            on pull_request {"types":["opened","synchronize"]}
            on schedule [{"cron":"0 0 * * *"}]
            on issues
            job j @10
              runs-on: Labels(["x"])
              steps:
              - step @10
                run: "a"
        "#]],
    );
}

#[test]
fn workflow_dispatch_inputs_typed() {
    check(
        r#"on:
  workflow_dispatch:
    inputs:
      name:
        description: who
        required: true
        default: world
      flag:
        type: boolean
        default: false
      count:
        type: number
        default: 3
      level:
        type: choice
        options: [info, warning, debug]
        default: info
      env:
        type: environment
      bare:
jobs: {j: {runs-on: x, steps: [run: a]}}
"#,
        expect![[r#"
            on workflow_dispatch {"inputs":{"name":{"description":"who","required":true,"default":"world"},"flag":{"type":"boolean","default":false},"count":{"type":"number","default":3},"level":{"type":"choice","options":["info","warning","debug"],"default":"info"},"env":{"type":"environment"},"bare":null}}
              input name: Input { description: Some("who"), type_: String, required: true, default: Some(String("world")), options: [] }
              input flag: Input { description: None, type_: Boolean, required: false, default: Some(Bool(false)), options: [] }
              input count: Input { description: None, type_: Number, required: false, default: Some(Number(3)), options: [] }
              input level: Input { description: None, type_: Choice, required: false, default: Some(String("info")), options: ["info", "warning", "debug"] }
              input env: Input { description: None, type_: Environment, required: false, default: None, options: [] }
              input bare: Input { description: None, type_: String, required: false, default: None, options: [] }
            job j @21
              runs-on: Labels(["x"])
              steps:
              - step @21
                run: "a"
        "#]],
    );
}

#[test]
fn workflow_dispatch_without_inputs_mapping() {
    check(
        "on:\n  workflow_dispatch:\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on workflow_dispatch
        job j @3
          runs-on: Labels(["x"])
          steps:
          - step @3
            run: "a"
    "#]],
    );
}

#[test]
fn workflow_call_inputs_outputs_secrets() {
    check(
        r#"on:
  workflow_call:
    inputs:
      config:
        type: string
        required: true
      verbose:
        type: boolean
        required: false
        default: ${{ github.event_name == 'push' }}
    outputs:
      result:
        description: the result
        value: ${{ jobs.j.outputs.r }}
    secrets:
      token:
        required: true
      other:
jobs: {j: {runs-on: x, steps: [run: a]}}
"#,
        expect![[r#"
            on workflow_call {"inputs":{"config":{"type":"string","required":true},"verbose":{"type":"boolean","required":false,"default":"${{ github.event_name == 'push' }}"}},"outputs":{"result":{"description":"the result","value":"${{ jobs.j.outputs.r }}"}},"secrets":{"token":{"required":true},"other":null}}
              input config: Input { description: None, type_: String, required: true, default: None, options: [] }
              input verbose: Input { description: None, type_: Boolean, required: false, default: Some(String("${{ github.event_name == 'push' }}")), options: [] }
              output result: CallOutput { description: Some("the result"), value: "${{ jobs.j.outputs.r }}" }
              secret token: CallSecret { description: None, required: true }
              secret other: CallSecret { description: None, required: false }
            job j @19
              runs-on: Labels(["x"])
              steps:
              - step @19
                run: "a"
        "#]],
    );
}

#[test]
fn workflow_call_output_without_value() {
    check(
        "on:\n  workflow_call:\n    outputs:\n      r:\n        description: x\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
            error: wf.yml:5:9: on.workflow_call.outputs.r: missing `value`; add `value: ${{ jobs.<id>.outputs.<name> }}`
        "#]],
    );
}

#[test]
fn input_with_unknown_type() {
    check(
        "on:\n  workflow_dispatch:\n    inputs:\n      a:\n        type: text\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
            error: wf.yml:5:15: on.workflow_dispatch.inputs.a.type: unknown input type `text`; use one of: string, boolean, number, choice, environment
        "#]],
    );
}

#[test]
fn input_with_unknown_key() {
    check(
        "on:\n  workflow_dispatch:\n    inputs:\n      a:\n        typo: 1\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
            error: wf.yml:5:9: on.workflow_dispatch.inputs.a.typo: unknown key `typo` in an input; remove it or use one of: description, type, required, default, options
        "#]],
    );
}

#[test]
fn workflow_dispatch_unknown_key() {
    check(
        "on:\n  workflow_dispatch:\n    input: {}\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:3:5: on.workflow_dispatch.input: unknown key `input` in `workflow_dispatch`; remove it or use one of: inputs
    "#]],
    );
}

#[test]
fn on_must_not_be_a_number() {
    check(
        "on: 1\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:1:5: on: expected an event name, a list or a map, found a number; write e.g. `on: push`
    "#]],
    );
}

#[test]
fn missing_on_parses() {
    check(
        "jobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on: <missing>
        job j @1
          runs-on: Labels(["x"])
          steps:
          - step @1
            run: "a"
    "#]],
    );
}

#[test]
fn name_and_run_name() {
    check(
        "name: CI\nrun-name: Deploy by @${{ github.actor }}\non: push\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
            name: "CI"
            run-name: "Deploy by @${{ github.actor }}"
            on push
            job j @4
              runs-on: Labels(["x"])
              steps:
              - step @4
                run: "a"
        "#]],
    );
}

#[test]
fn env_scalars_become_strings() {
    check(
        r#"on: push
env:
  S: text
  B: true
  F: false
  I: 1
  D: 1.50
  H: 0x1F
  E: 1e3
  N:
  T: ~
  Y: yes
  O: on
  Q: "quoted"
  M: |
    multi
    line
jobs: {j: {runs-on: x, steps: [run: a]}}
"#,
        expect![[r#"
            on push
            env: {"S": "text", "B": "true", "F": "false", "I": "1", "D": "1.50", "H": "0x1F", "E": "1e3", "N": "", "T": "", "Y": "yes", "O": "on", "Q": "quoted", "M": "multi\nline\n"}
            job j @18
              runs-on: Labels(["x"])
              steps:
              - step @18
                run: "a"
        "#]],
    );
}

#[test]
fn env_as_expression() {
    check(
        "on: push\nenv: ${{ fromJSON(vars.ENV) }}\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on push
        env: expr "${{ fromJSON(vars.ENV) }}"
        job j @3
          runs-on: Labels(["x"])
          steps:
          - step @3
            run: "a"
    "#]],
    );
}

#[test]
fn env_value_must_be_scalar() {
    check(
        "on: push\nenv:\n  A: [1, 2]\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:3:6: env.A: expected a scalar value, found a sequence; change the value
    "#]],
    );
}

#[test]
fn env_must_be_map() {
    check(
        "on: push\nenv: [A, B]\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:2:6: env: expected a map of variables or a `${{ }}` expression, found a sequence; write `NAME: value` lines
    "#]],
    );
}

#[test]
fn defaults_run() {
    check(
        "on: push\ndefaults:\n  run:\n    shell: sh\n    working-directory: ./src\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
            on push
            defaults: Defaults { run: Some(RunDefaults { shell: Some("sh"), working_directory: Some("./src") }) }
            job j @6
              runs-on: Labels(["x"])
              steps:
              - step @6
                run: "a"
        "#]],
    );
}

#[test]
fn defaults_unknown_key() {
    check(
        "on: push\ndefaults:\n  run:\n    shel: sh\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:4:5: defaults.run.shel: unknown key `shel` in `defaults.run`; remove it or use one of: shell, working-directory
    "#]],
    );
}

#[test]
fn concurrency_forms() {
    check(
        r#"on: push
concurrency: ci-${{ github.ref }}
jobs:
  a:
    runs-on: x
    concurrency:
      group: ${{ github.workflow }}
      cancel-in-progress: true
    steps: [run: a]
  b:
    runs-on: x
    concurrency:
      group: g
      cancel-in-progress: ${{ github.ref != 'refs/heads/main' }}
    steps: [run: a]
"#,
        expect![[r#"
            on push
            concurrency: Concurrency { group: "ci-${{ github.ref }}", cancel_in_progress: None }
            job a @4
              runs-on: Labels(["x"])
              concurrency: Concurrency { group: "${{ github.workflow }}", cancel_in_progress: Some(Bool(true)) }
              steps:
              - step @9
                run: "a"
            job b @10
              runs-on: Labels(["x"])
              concurrency: Concurrency { group: "g", cancel_in_progress: Some(Expr("${{ github.ref != 'refs/heads/main' }}")) }
              steps:
              - step @15
                run: "a"
        "#]],
    );
}

#[test]
fn concurrency_without_group() {
    check(
        "on: push\nconcurrency:\n  cancel-in-progress: true\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:3:3: concurrency: missing `group`; add `group: <name>`
    "#]],
    );
}

#[test]
fn permissions_forms() {
    check(
        r#"on: push
permissions: read-all
jobs:
  a:
    runs-on: x
    permissions:
      contents: read
      id-token: write
    steps: [run: a]
  b:
    runs-on: x
    permissions: {}
    steps: [run: a]
"#,
        expect![[r#"
            on push
            permissions: All("read-all")
            job a @4
              runs-on: Labels(["x"])
              permissions: Map({"contents": "read", "id-token": "write"})
              steps:
              - step @9
                run: "a"
            job b @10
              runs-on: Labels(["x"])
              permissions: Map({})
              steps:
              - step @13
                run: "a"
        "#]],
    );
}

#[test]
fn unknown_top_level_key() {
    check(
        "on: push\nenvs: {}\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
            error: wf.yml:2:1: envs: unknown key `envs` in a workflow; remove it or use one of: name, description, enable-email-notifications, run-name, on, env, defaults, concurrency, permissions, jobs
        "#]],
    );
}

#[test]
fn missing_jobs() {
    check(
        "on: push\n",
        expect![[r#"
        error: wf.yml:1:1: missing `jobs`; add a `jobs:` map with at least one job
    "#]],
    );
}

#[test]
fn empty_jobs() {
    check(
        "on: push\njobs:\n",
        expect![[r#"
        error: wf.yml:2:5: jobs: `jobs` is empty; add at least one job
    "#]],
    );
}

#[test]
fn empty_document() {
    check(
        "",
        expect![[r#"
        error: wf.yml:1:1: the workflow is empty; add `on:` and `jobs:`
    "#]],
    );
}

#[test]
fn comment_only_document() {
    check(
        "# nothing\n",
        expect![[r#"
        error: wf.yml:2:1: the workflow is empty; add `on:` and `jobs:`
    "#]],
    );
}

#[test]
fn document_is_a_list() {
    check(
        "- a\n- b\n",
        expect![[r#"
        error: wf.yml:1:1: expected a map, found a sequence; change the value
    "#]],
    );
}

#[test]
fn document_is_a_string() {
    check(
        "hello\n",
        expect![[r#"
        error: wf.yml:1:1: expected a map, found a string; change the value
    "#]],
    );
}

#[test]
fn invalid_yaml_unclosed_bracket() {
    check(
        "on: push\njobs: [\n",
        expect![[r#"
        error: wf.yml:2:7: invalid yaml: unclosed bracket '['; fix the yaml syntax
    "#]],
    );
}

#[test]
fn invalid_yaml_bad_indentation() {
    check(
        "on: push\njobs:\n  j:\n    runs-on: x\n   steps: []\n",
        expect![[r#"
        error: wf.yml:5:4: invalid yaml: while parsing a block mapping, did not find expected key; fix the yaml syntax
    "#]],
    );
}

#[test]
fn invalid_yaml_tab_indentation() {
    check(
        "on: push\njobs:\n\tj: {}\n",
        expect![[r#"
        error: wf.yml:3:2: invalid yaml: tabs disallowed within this context (block indentation); fix the yaml syntax
    "#]],
    );
}

#[test]
fn invalid_yaml_duplicate_key() {
    check(
        "on: push\non: pull_request\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        error: wf.yml:2:1: invalid yaml: duplicate key `on`; remove one of them
    "#]],
    );
}

#[test]
fn invalid_yaml_unterminated_quote() {
    check(
        "on: push\nname: \"abc\njobs: {}\n",
        expect![[r#"
        error: wf.yml:2:7: invalid yaml: unclosed quote; fix the yaml syntax
    "#]],
    );
}

#[test]
fn multiple_documents() {
    check(
        "on: push\n---\non: pull_request\n",
        expect![[r#"
        error: wf.yml:3:1: invalid yaml: more than one yaml document (`---`); keep a single document
    "#]],
    );
}

#[test]
fn bom_is_skipped() {
    check(
        "\u{feff}on: push\njobs: {j: {runs-on: x, steps: [run: a]}}\n",
        expect![[r#"
        on push
        job j @2
          runs-on: Labels(["x"])
          steps:
          - step @2
            run: "a"
    "#]],
    );
}

#[test]
fn crlf_line_ends() {
    check(
        "on: push\r\njobs:\r\n  j:\r\n    runs-on: x\r\n    steps:\r\n      - run: a\r\n",
        expect![[r#"
        on push
        job j @3
          runs-on: Labels(["x"])
          steps:
          - step @6
            run: "a"
    "#]],
    );
}

#[test]
fn anchors_and_aliases() {
    check(
        r#"on: push
jobs:
  a:
    runs-on: x
    env: &e
      A: 1
    steps: [run: a]
  b:
    runs-on: x
    env: *e
    steps: [run: b]
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              env: {"A": "1"}
              steps:
              - step @7
                run: "a"
            job b @8
              runs-on: Labels(["x"])
              env: {"A": "1"}
              steps:
              - step @11
                run: "b"
        "#]],
    );
}

#[test]
fn jobs_keep_source_order() {
    check(
        "on: push\njobs:\n  zeta: {runs-on: x, steps: [run: a]}\n  alpha: {runs-on: x, steps: [run: a]}\n  mid: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            on push
            job zeta @3
              runs-on: Labels(["x"])
              steps:
              - step @3
                run: "a"
            job alpha @4
              runs-on: Labels(["x"])
              steps:
              - step @4
                run: "a"
            job mid @5
              runs-on: Labels(["x"])
              steps:
              - step @5
                run: "a"
        "#]],
    );
}

#[test]
fn needs_string_and_list() {
    check(
        r#"on: push
jobs:
  a: {runs-on: x, steps: [run: a]}
  b: {runs-on: x, needs: a, steps: [run: a]}
  c: {runs-on: x, needs: [a, b], steps: [run: a]}
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              steps:
              - step @3
                run: "a"
            job b @4
              needs: ["a"]
              runs-on: Labels(["x"])
              steps:
              - step @4
                run: "a"
            job c @5
              needs: ["a", "b"]
              runs-on: Labels(["x"])
              steps:
              - step @5
                run: "a"
        "#]],
    );
}

#[test]
fn needs_must_be_strings() {
    check(
        "on: push\njobs:\n  a: {runs-on: x, needs: [{b: c}], steps: [run: a]}\n",
        expect![[r#"
        error: wf.yml:3:27: jobs.a.needs[0]: expected a string, found a map; change the value
    "#]],
    );
}

#[test]
fn job_if_forms() {
    check(
        r#"on: push
jobs:
  a: {runs-on: x, if: true, steps: [run: a]}
  b: {runs-on: x, if: false, steps: [run: a]}
  c: {runs-on: x, if: "${{ always() }}", steps: [run: a]}
  d: {runs-on: x, if: github.event_name == 'push', steps: [run: a]}
"#,
        expect![[r#"
            on push
            job a @3
              if: "true"
              runs-on: Labels(["x"])
              steps:
              - step @3
                run: "a"
            job b @4
              if: "false"
              runs-on: Labels(["x"])
              steps:
              - step @4
                run: "a"
            job c @5
              if: "${{ always() }}"
              runs-on: Labels(["x"])
              steps:
              - step @5
                run: "a"
            job d @6
              if: "github.event_name == 'push'"
              runs-on: Labels(["x"])
              steps:
              - step @6
                run: "a"
        "#]],
    );
}

#[test]
fn runs_on_forms() {
    check(
        r#"on: push
jobs:
  a: {runs-on: ubuntu-latest, steps: [run: a]}
  b: {runs-on: [self-hosted, linux], steps: [run: a]}
  c:
    runs-on:
      group: big
      labels: [linux, x64]
    steps: [run: a]
  d:
    runs-on:
      group: only
    steps: [run: a]
  e: {runs-on: "${{ matrix.os }}", steps: [run: a]}
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["ubuntu-latest"])
              steps:
              - step @3
                run: "a"
            job b @4
              runs-on: Labels(["self-hosted", "linux"])
              steps:
              - step @4
                run: "a"
            job c @5
              runs-on: Group { group: Some("big"), labels: ["linux", "x64"] }
              steps:
              - step @9
                run: "a"
            job d @10
              runs-on: Group { group: Some("only"), labels: [] }
              steps:
              - step @13
                run: "a"
            job e @14
              runs-on: Labels(["${{ matrix.os }}"])
              steps:
              - step @14
                run: "a"
        "#]],
    );
}

#[test]
fn runs_on_unknown_key() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: {labels: x, size: big}\n    steps: [run: a]\n",
        expect![[r#"
        error: wf.yml:4:26: jobs.a.runs-on.size: unknown key `size` in `runs-on`; remove it or use one of: group, labels
    "#]],
    );
}

#[test]
fn environment_forms() {
    check(
        r#"on: push
jobs:
  a: {runs-on: x, environment: production, steps: [run: a]}
  b:
    runs-on: x
    environment:
      name: staging
      url: https://staging.example.com
    steps: [run: a]
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              environment: Environment { name: "production", url: None }
              steps:
              - step @3
                run: "a"
            job b @4
              runs-on: Labels(["x"])
              environment: Environment { name: "staging", url: Some("https://staging.example.com") }
              steps:
              - step @9
                run: "a"
        "#]],
    );
}

#[test]
fn environment_map_needs_name() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    environment: {url: u}\n    steps: [run: a]\n",
        expect![[r#"
        error: wf.yml:5:18: jobs.a.environment: missing `name`; add `name: <environment>`
    "#]],
    );
}

#[test]
fn job_outputs() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    outputs:\n      o1: ${{ steps.s.outputs.v }}\n      o2: literal\n    steps: [run: a]\n",
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              outputs: {"o1": "${{ steps.s.outputs.v }}", "o2": "literal"}
              steps:
              - step @8
                run: "a"
        "#]],
    );
}

#[test]
fn job_timeout_forms() {
    check(
        r#"on: push
jobs:
  a: {runs-on: x, timeout-minutes: 5, steps: [run: a]}
  b: {runs-on: x, timeout-minutes: 2.5, steps: [run: a]}
  c: {runs-on: x, timeout-minutes: "${{ inputs.t }}", steps: [run: a]}
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              timeout-minutes: Number(5.0)
              steps:
              - step @3
                run: "a"
            job b @4
              runs-on: Labels(["x"])
              timeout-minutes: Number(2.5)
              steps:
              - step @4
                run: "a"
            job c @5
              runs-on: Labels(["x"])
              timeout-minutes: Expr("${{ inputs.t }}")
              steps:
              - step @5
                run: "a"
        "#]],
    );
}

#[test]
fn job_timeout_must_be_number() {
    check(
        "on: push\njobs:\n  a: {runs-on: x, timeout-minutes: soon, steps: [run: a]}\n",
        expect![[r#"
        error: wf.yml:3:36: jobs.a.timeout-minutes: expected a number or a `${{ }}` expression, found a string; change the value
    "#]],
    );
}

#[test]
fn continue_on_error_forms() {
    check(
        r#"on: push
jobs:
  a: {runs-on: x, continue-on-error: true, steps: [run: a]}
  b: {runs-on: x, continue-on-error: "${{ matrix.experimental }}", steps: [run: a]}
  c: {runs-on: x, continue-on-error: "false", steps: [run: a]}
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              continue-on-error: Bool(true)
              steps:
              - step @3
                run: "a"
            job b @4
              runs-on: Labels(["x"])
              continue-on-error: Expr("${{ matrix.experimental }}")
              steps:
              - step @4
                run: "a"
            job c @5
              runs-on: Labels(["x"])
              continue-on-error: Bool(false)
              steps:
              - step @5
                run: "a"
        "#]],
    );
}

#[test]
fn continue_on_error_rejects_other_strings() {
    check(
        "on: push\njobs:\n  a: {runs-on: x, continue-on-error: maybe, steps: [run: a]}\n",
        expect![[r#"
        error: wf.yml:3:38: jobs.a.continue-on-error: expected `true`, `false` or a `${{ }}` expression, found a string; change the value
    "#]],
    );
}

#[test]
fn strategy_forms() {
    check(
        r#"on: push
jobs:
  a:
    runs-on: x
    strategy:
      fail-fast: false
      max-parallel: 2
      matrix:
        os: [ubuntu, windows]
        node: [14, 16]
        include:
          - os: ubuntu
            experimental: true
        exclude:
          - os: windows
            node: 14
    steps: [run: a]
  b:
    runs-on: x
    strategy:
      matrix: ${{ fromJSON(needs.a.outputs.matrix) }}
    steps: [run: a]
  c:
    runs-on: x
    strategy:
      fail-fast: ${{ github.ref == 'main' }}
      matrix:
        cfg: [{a: 1}, {a: 2}]
    steps: [run: a]
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              matrix: "{\"os\":[\"ubuntu\",\"windows\"],\"node\":[14,16],\"include\":[{\"os\":\"ubuntu\",\"experimental\":true}],\"exclude\":[{\"os\":\"windows\",\"node\":14}]}"
              fail-fast: Bool(false)
              max-parallel: Number(2.0)
              steps:
              - step @17
                run: "a"
            job b @18
              runs-on: Labels(["x"])
              matrix: "\"${{ fromJSON(needs.a.outputs.matrix) }}\""
              steps:
              - step @22
                run: "a"
            job c @23
              runs-on: Labels(["x"])
              matrix: "{\"cfg\":[{\"a\":1},{\"a\":2}]}"
              fail-fast: Expr("${{ github.ref == 'main' }}")
              steps:
              - step @29
                run: "a"
        "#]],
    );
}

#[test]
fn strategy_matrix_must_be_map() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    strategy:\n      matrix: [1, 2]\n    steps: [run: a]\n",
        expect![[r#"
        error: wf.yml:6:15: jobs.a.strategy.matrix: expected a map or a `${{ fromJSON(...) }}` expression, found a sequence; write `key: [values]`
    "#]],
    );
}

#[test]
fn strategy_unknown_key() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    strategy:\n      failfast: true\n    steps: [run: a]\n",
        expect![[r#"
        error: wf.yml:6:7: jobs.a.strategy.failfast: unknown key `failfast` in `strategy`; remove it or use one of: matrix, fail-fast, max-parallel
    "#]],
    );
}

#[test]
fn container_forms() {
    check(
        r#"on: push
jobs:
  a: {runs-on: x, container: node:18, steps: [run: a]}
  b:
    runs-on: x
    container:
      image: ghcr.io/o/i:1
      credentials:
        username: ${{ github.actor }}
        password: ${{ secrets.TOKEN }}
      env:
        NODE_ENV: development
      ports: [80, "8080:80"]
      volumes: [my_docker_volume:/volume_mount]
      options: --cpus 1
    steps: [run: a]
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              container: Container { image: "node:18", credentials: None, env: Map({}), ports: [], volumes: [], options: None, cmd: [] }
              steps:
              - step @3
                run: "a"
            job b @4
              runs-on: Labels(["x"])
              container: Container { image: "ghcr.io/o/i:1", credentials: Some(Credentials { username: Some("${{ github.actor }}"), password: Some("${{ secrets.TOKEN }}") }), env: Map({"NODE_ENV": "development"}), ports: ["80", "8080:80"], volumes: ["my_docker_volume:/volume_mount"], options: Some("--cpus 1"), cmd: [] }
              steps:
              - step @16
                run: "a"
        "#]],
    );
}

#[test]
fn container_unknown_key() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    container:\n      img: x\n    steps: [run: a]\n",
        expect![[r#"
            error: wf.yml:6:7: jobs.a.container.img: unknown key `img` in a container; remove it or use one of: image, credentials, env, ports, volumes, options, cmd
        "#]],
    );
}

#[test]
fn services() {
    check(
        r#"on: push
jobs:
  a:
    runs-on: x
    services:
      redis: redis:7
      postgres:
        image: postgres
        env:
          POSTGRES_PASSWORD: pw
        ports:
          - 5432:5432
        options: >-
          --health-cmd pg_isready
          --health-interval 10s
    steps: [run: a]
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              services: {"redis": Container { image: "redis:7", credentials: None, env: Map({}), ports: [], volumes: [], options: None, cmd: [] }, "postgres": Container { image: "postgres", credentials: None, env: Map({"POSTGRES_PASSWORD": "pw"}), ports: ["5432:5432"], volumes: [], options: Some("--health-cmd pg_isready --health-interval 10s"), cmd: [] }}
              steps:
              - step @16
                run: "a"
        "#]],
    );
}

#[test]
fn reusable_workflow_job() {
    check(
        r#"on: push
jobs:
  call:
    uses: ./.github/workflows/reuse.yml
    with:
      s: text
      b: true
      n: 3
      e: ${{ github.sha }}
    secrets: inherit
  call2:
    uses: octo/repo/.github/workflows/w.yml@v1
    secrets:
      token: ${{ secrets.T }}
"#,
        expect![[r#"
            on push
            job call @3
              uses: "./.github/workflows/reuse.yml"
              with: {"s": String("text"), "b": Bool(true), "n": Number(3), "e": String("${{ github.sha }}")}
              secrets: Inherit
            job call2 @11
              uses: "octo/repo/.github/workflows/w.yml@v1"
              secrets: Map({"token": "${{ secrets.T }}"})
        "#]],
    );
}

#[test]
fn job_secrets_bad_string() {
    check(
        "on: push\njobs:\n  a:\n    uses: ./w.yml\n    secrets: all\n",
        expect![[r#"
        error: wf.yml:5:14: jobs.a.secrets: expected `inherit` or a map of secrets; change the value
    "#]],
    );
}

#[test]
fn unknown_job_key() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    step: []\n",
        expect![[r#"
            error: wf.yml:5:5: jobs.a.step: unknown key `step` in a job; remove it or use one of: name, needs, permissions, if, runs-on, environment, concurrency, outputs, env, defaults, steps, timeout-minutes, cancel-timeout-minutes, strategy, continue-on-error, container, services, uses, with, secrets
        "#]],
    );
}

#[test]
fn job_is_null() {
    check(
        "on: push\njobs:\n  a:\n",
        expect![[r#"
        error: wf.yml:3:4: jobs.a: job `a` is empty; add `runs-on` and `steps`
    "#]],
    );
}

#[test]
fn job_is_a_string() {
    check(
        "on: push\njobs:\n  a: build\n",
        expect![[r#"
        error: wf.yml:3:6: jobs.a: expected a map, found a string; change the value
    "#]],
    );
}

#[test]
fn step_all_keys() {
    check(
        r#"on: push
jobs:
  a:
    runs-on: x
    steps:
      - id: s1
        if: success()
        name: Build
        run: make
        shell: bash
        working-directory: ./src
        env:
          A: 1
        continue-on-error: true
        timeout-minutes: 10
      - uses: actions/setup-node@v4
        with:
          node-version: 18
          cache: npm
          check-latest: false
          version: 1.50
"#,
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              steps:
              - step @6
                id: "s1"
                if: "success()"
                name: "Build"
                run: "make"
                shell: "bash"
                working-directory: "./src"
                env: {"A": "1"}
                continue-on-error: Bool(true)
                timeout-minutes: Number(10.0)
              - step @16
                uses: "actions/setup-node@v4"
                with: {"node-version": "18", "cache": "npm", "check-latest": "false", "version": "1.50"}
        "#]],
    );
}

#[test]
fn step_line_numbers() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n    - run: one\n\n    - name: two\n      run: two\n    - {run: three}\n",
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              steps:
              - step @6
                run: "one"
              - step @8
                name: "two"
                run: "two"
              - step @10
                run: "three"
        "#]],
    );
}

#[test]
fn step_if_boolean_becomes_string() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - if: false\n        run: a\n",
        expect![[r#"
        on push
        job a @3
          runs-on: Labels(["x"])
          steps:
          - step @6
            if: "false"
            run: "a"
    "#]],
    );
}

#[test]
fn step_run_number_becomes_string() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: 42\n",
        expect![[r#"
        on push
        job a @3
          runs-on: Labels(["x"])
          steps:
          - step @6
            run: "42"
    "#]],
    );
}

#[test]
fn step_with_and_run() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - name: Test\n        run: echo\n        uses: actions/checkout@v2\n",
        expect![[r#"
            error: wf.yml:6:9: jobs.test.steps[0]: step 0 ("Test") of job `test` has both `run` and `uses`; keep only one
        "#]],
    );
}

#[test]
fn step_without_run_or_uses() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - run: ok\n      - name: empty\n",
        expect![[r#"
        error: wf.yml:7:9: jobs.test.steps[1]: step 1 ("empty") of job `test` has neither `run` nor `uses`; add one of them
    "#]],
    );
}

#[test]
fn step_without_name_neither() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - id: x\n",
        expect![[r#"
        error: wf.yml:6:9: jobs.test.steps[0]: step 0 of job `test` has neither `run` nor `uses`; add one of them
    "#]],
    );
}

#[test]
fn step_is_null() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n    -\n    - run: exit 0\n",
        expect![[r#"
        error: wf.yml:6:6: jobs.test.steps[0]: step 0 of job `test` is null instead of a map; write it as `- run: ...` or `- uses: ...`
    "#]],
    );
}

#[test]
fn step_is_a_string() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - echo hi\n",
        expect![[r#"
        error: wf.yml:6:9: jobs.test.steps[0]: step 0 of job `test` is a string instead of a map; write it as `- run: ...` or `- uses: ...`
    "#]],
    );
}

#[test]
fn steps_is_a_map() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      run: echo\n",
        expect![[r#"
        error: wf.yml:6:7: jobs.test.steps: expected a list of steps, found a map; write each step as `- run: ...` or `- uses: ...`
    "#]],
    );
}

#[test]
fn step_unknown_key() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - run: a\n        working_directory: x\n",
        expect![[r#"
        error: wf.yml:7:9: jobs.test.steps[0].working_directory: unknown key `working_directory` in a step; remove it or use one of: id, if, name, uses, run, shell, working-directory, env, with, continue-on-error, timeout-minutes
    "#]],
    );
}

#[test]
fn step_with_value_must_be_scalar() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - uses: a/b@v1\n        with:\n          list: [1, 2]\n",
        expect![[r#"
            error: wf.yml:8:17: jobs.test.steps[0].with.list: expected a scalar value, found a sequence; change the value
        "#]],
    );
}

#[test]
fn step_env_expression() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - run: a\n        env: ${{ matrix.env }}\n",
        expect![[r#"
        on push
        job test @3
          runs-on: Labels(["x"])
          steps:
          - step @6
            run: "a"
            env: expr "${{ matrix.env }}"
    "#]],
    );
}

#[test]
fn step_timeout_expression() {
    check(
        "on: push\njobs:\n  test:\n    runs-on: x\n    steps:\n      - run: a\n        timeout-minutes: ${{ inputs.t }}\n",
        expect![[r#"
            on push
            job test @3
              runs-on: Labels(["x"])
              steps:
              - step @6
                run: "a"
                timeout-minutes: Expr("${{ inputs.t }}")
        "#]],
    );
}

#[test]
fn job_id_needing_quotes_in_path() {
    check(
        "on: push\njobs:\n  \"my job\":\n    runs-on: x\n    foo: 1\n",
        expect![[r#"
            error: wf.yml:5:5: jobs["my job"].foo: unknown key `foo` in a job; remove it or use one of: name, needs, permissions, if, runs-on, environment, concurrency, outputs, env, defaults, steps, timeout-minutes, cancel-timeout-minutes, strategy, continue-on-error, container, services, uses, with, secrets
        "#]],
    );
}

#[test]
fn key_that_is_a_map_is_rejected() {
    check(
        "on: push\njobs:\n  ? {a: 1}\n  : {runs-on: x}\n",
        expect![[r#"
        error: wf.yml:3:5: jobs: map keys must be scalars; use a plain string key
    "#]],
    );
}

#[test]
fn error_display_has_file_line_column_and_path() {
    let e = super::super::parse_workflow(
        "on: push\njobs:\n  a:\n    runs-on: x\n    stepz: []\n",
        "ci/build.yml",
    )
    .err()
    .map(|e| (e.file.clone(), e.line, e.column, e.path.clone(), e.to_string()));
    expect![[r#"
        Some(
            (
                "ci/build.yml",
                Some(
                    5,
                ),
                Some(
                    5,
                ),
                "jobs.a.stepz",
                "ci/build.yml:5:5: jobs.a.stepz: unknown key `stepz` in a job; remove it or use one of: name, needs, permissions, if, runs-on, environment, concurrency, outputs, env, defaults, steps, timeout-minutes, cancel-timeout-minutes, strategy, continue-on-error, container, services, uses, with, secrets",
            ),
        )
    "#]].assert_debug_eq(&e);
}

#[test]
fn never_panics_on_odd_inputs() {
    let deep = format!("on: push\njobs: {}{}\n", "[".repeat(5000), "]".repeat(5000));
    let inputs = [
        "",
        "~",
        "[]",
        "{}",
        "on:\njobs:\n",
        "on: {push: [1]}\njobs: {a: {steps: [{}]}}",
        "jobs: {a: {runs-on: {group: [1]}, steps: 1}}",
        "on: push\njobs:\n  a:\n    strategy: 1\n    runs-on: x\n    steps: []\n",
        "on: push\njobs:\n  a:\n    services: [a]\n",
        "on: push\njobs:\n  a:\n    container: [a]\n",
        "on: push\njobs:\n  a:\n    outputs: [a]\n",
        "on: push\njobs:\n  a:\n    with: 1\n",
        "on:\n  workflow_call: [1]\n",
        "on:\n  workflow_dispatch:\n    inputs: [1]\n",
        "a: &a [*a]\n",
        "a: !!binary aGVsbG8=\n",
        "a: !custom x\n",
        "\u{0}\u{1}",
        "on: 'push\n",
        "ö: ü\non: push\njobs: {é: {runs-on: x, steps: [run: ✅]}}\n",
        &deep,
    ];
    for input in inputs {
        let _ = super::super::parse_workflow(input, "f.yml").map(|wf| super::super::validate(&wf));
        let _ = super::super::parse_action(input, "a.yml");
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("on: push\njobs: {}{}\n", "[".repeat(5000), "]".repeat(5000));
    let e = super::super::parse_workflow(&deep, "f.yml").err().map(|e| e.to_string());
    expect![[r#"
        Some(
            "f.yml:2:262: invalid yaml: recursion limit exceeded; fix the yaml syntax",
        )
    "#]]
    .assert_debug_eq(&e);
}
