//! Action manifests: composite, node, docker, and errors.

use expect_test::expect;

use super::check_action;

#[test]
fn node_action() {
    check_action(
        "name: 'Hello World'\ndescription: 'Greet'\nauthor: me\ninputs:\n  who-to-greet:\n    description: 'Who to greet'\n    required: true\n    default: 'World'\noutputs:\n  time:\n    description: 'The time'\nruns:\n  using: 'node12'\n  main: 'dist/index.js'\n",
        expect![[r#"
            name: "Hello World"
            description: "Greet"
            author: "me"
            input who-to-greet: ActionInput { description: Some("Who to greet"), required: true, default: Some("World"), deprecation_message: None }
            output time: ActionOutput { description: Some("The time"), value: None }
            runs NodeRuns { using: "node12", main: "dist/index.js", pre: None, pre_if: None, post: None, post_if: None }
        "#]],
    );
}

#[test]
fn node_versions_and_pre_post() {
    check_action(
        "name: x\nruns:\n  using: node20\n  pre: pre.js\n  pre-if: runner.os == 'Linux'\n  main: main.js\n  post: post.js\n  post-if: always()\n",
        expect![[r#"
            name: "x"
            runs NodeRuns { using: "node20", main: "main.js", pre: Some("pre.js"), pre_if: Some("runner.os == 'Linux'"), post: Some("post.js"), post_if: Some("always()") }
        "#]],
    );
}

#[test]
fn node24() {
    check_action(
        "runs:\n  using: node24\n  main: m.js\n",
        expect![[r#"
        runs NodeRuns { using: "node24", main: "m.js", pre: None, pre_if: None, post: None, post_if: None }
    "#]],
    );
}

#[test]
fn node_without_main() {
    check_action(
        "runs:\n  using: node16\n",
        expect![[r#"
        error: action.yml:2:3: runs: missing `main`; add `main: <script.js>`
    "#]],
    );
}

#[test]
fn composite_action() {
    check_action(
        r#"name: c
inputs:
  flag:
    default: true
  num:
    default: 3
  legacy:
    deprecationMessage: use flag
    type: string
outputs:
  out:
    description: o
    value: ${{ steps.s.outputs.v }}
runs:
  using: composite
  steps:
    - id: s
      run: echo "v=1" >> $GITHUB_OUTPUT
      shell: bash
    - uses: ./other
      with:
        a: 1
branding:
  icon: box
  color: blue
"#,
        expect![[r#"
            name: "c"
            input flag: ActionInput { description: None, required: false, default: Some("true"), deprecation_message: None }
            input num: ActionInput { description: None, required: false, default: Some("3"), deprecation_message: None }
            input legacy: ActionInput { description: None, required: false, default: None, deprecation_message: Some("use flag") }
            output out: ActionOutput { description: Some("o"), value: Some("${{ steps.s.outputs.v }}") }
            runs composite
            - step @17
              id: "s"
              run: "echo \"v=1\" >> $GITHUB_OUTPUT"
              shell: "bash"
            - step @20
              uses: "./other"
              with: {"a": "1"}
        "#]],
    );
}

#[test]
fn composite_run_without_shell() {
    check_action(
        "runs:\n  using: composite\n  steps:\n    - run: echo\n      shell: sh\n    - run: exit 1\n",
        expect![[r#"
        error: action.yml:6:7: runs.steps[1]: step 1 of the composite action runs a script without `shell`; add `shell: bash` (or another shell)
    "#]],
    );
}

#[test]
fn composite_without_steps() {
    check_action(
        "runs:\n  using: composite\n",
        expect![[r#"
        error: action.yml:2:3: runs: missing `steps`; a composite action needs `steps:`
    "#]],
    );
}

#[test]
fn composite_step_run_and_uses() {
    check_action(
        "runs:\n  using: composite\n  steps:\n    - run: a\n      uses: b/c@d\n      shell: bash\n",
        expect![[r#"
        error: action.yml:4:7: runs.steps[0]: step 0 of the composite action has both `run` and `uses`; keep only one
    "#]],
    );
}

#[test]
fn composite_unknown_runs_key() {
    check_action(
        "runs:\n  using: composite\n  main: x\n  steps: []\n",
        expect![[r#"
        error: action.yml:3:3: runs.main: unknown key `main` in composite `runs`; remove it or use one of: using, steps
    "#]],
    );
}

#[test]
fn docker_action() {
    check_action(
        r#"name: d
runs:
  using: docker
  image: Dockerfile
  entrypoint: /entry.sh
  pre-entrypoint: /pre.sh
  post-entrypoint: /post.sh
  args:
    - ${{ inputs.who }}
    - 2
  env:
    A: 1
"#,
        expect![[r#"
            name: "d"
            runs DockerRuns { image: "Dockerfile", entrypoint: Some("/entry.sh"), args: ["${{ inputs.who }}", "2"], env: Map({"A": "1"}), pre_entrypoint: Some("/pre.sh"), post_entrypoint: Some("/post.sh"), pre_if: None, post_if: None }
        "#]],
    );
}

#[test]
fn docker_image_ref_and_single_arg() {
    check_action(
        "runs:\n  using: 'docker'\n  image: 'docker://alpine:3.19'\n  args: single\n",
        expect![[r#"
        runs DockerRuns { image: "docker://alpine:3.19", entrypoint: None, args: ["single"], env: Map({}), pre_entrypoint: None, post_entrypoint: None, pre_if: None, post_if: None }
    "#]],
    );
}

#[test]
fn docker_without_image() {
    check_action(
        "runs:\n  using: docker\n",
        expect![[r#"
        error: action.yml:2:3: runs: missing `image`; add `image: Dockerfile` or `image: docker://<image>`
    "#]],
    );
}

#[test]
fn unknown_using() {
    check_action(
        "runs:\n  using: node8\n  main: x.js\n",
        expect![[r#"
        error: action.yml:2:10: runs.using: unknown `using: node8`; use one of: composite, node12, node16, node20, node24, docker
    "#]],
    );
}

#[test]
fn missing_using() {
    check_action(
        "runs:\n  main: x.js\n",
        expect![[r#"
        error: action.yml:2:3: runs: missing `using`; add `using:` with one of: composite, node12, node16, node20, node24, docker
    "#]],
    );
}

#[test]
fn missing_runs() {
    check_action(
        "name: x\n",
        expect![[r#"
        error: action.yml:1:1: missing `runs`; add `runs:` with `using`
    "#]],
    );
}

#[test]
fn unknown_top_level_key() {
    check_action(
        "name: x\nrun:\n  using: node20\n",
        expect![[r#"
        error: action.yml:2:1: run: unknown key `run` in an action; remove it or use one of: name, description, author, inputs, outputs, runs, branding
    "#]],
    );
}

#[test]
fn empty_manifest() {
    check_action(
        "",
        expect![[r#"
        error: action.yml:1:1: the action manifest is empty; add `name` and `runs`
    "#]],
    );
}

#[test]
fn invalid_yaml() {
    check_action(
        "name: [x\n",
        expect![[r#"
        error: action.yml:1:7: invalid yaml: unclosed bracket '['; fix the yaml syntax
    "#]],
    );
}

#[test]
fn input_required_as_string() {
    check_action(
        "inputs:\n  a:\n    required: 'false'\nruns:\n  using: node20\n  main: a.js\n",
        expect![[r#"
        input a: ActionInput { description: None, required: false, default: None, deprecation_message: None }
        runs NodeRuns { using: "node20", main: "a.js", pre: None, pre_if: None, post: None, post_if: None }
    "#]],
    );
}

#[test]
fn input_required_is_informational() {
    check_action(
        "inputs:\n  a:\n    required: sometimes\nruns:\n  using: node20\n  main: a.js\n",
        expect![[r#"
        input a: ActionInput { description: None, required: false, default: None, deprecation_message: None }
        runs NodeRuns { using: "node20", main: "a.js", pre: None, pre_if: None, post: None, post_if: None }
    "#]],
    );
}

#[test]
fn null_input_and_output() {
    check_action(
        "inputs:\n  a:\noutputs:\n  b:\nruns:\n  using: node20\n  main: a.js\n",
        expect![[r#"
        input a: ActionInput { description: None, required: false, default: None, deprecation_message: None }
        output b: ActionOutput { description: None, value: None }
        runs NodeRuns { using: "node20", main: "a.js", pre: None, pre_if: None, post: None, post_if: None }
    "#]],
    );
}
