//! Validation: job ids, needs, cycles, job shape, step uses, shells; and the needs graph.

use expect_test::{Expect, expect};

use super::super::{job_graph, needs_order, parse_workflow};
use super::check_valid;

fn order(yaml: &str, expect: Expect) {
    let wf = parse_workflow(yaml, "wf.yml").unwrap();
    let actual = match needs_order(&wf) {
        Ok(stages) => format!("{stages:?}\n{:?}\n", job_graph(&wf)),
        Err(e) => format!("error: {e}\n"),
    };
    expect.assert_eq(&actual);
}

#[test]
fn valid_workflow() {
    check_valid(
        "on: push\njobs:\n  a: {runs-on: x, steps: [run: a]}\n  b: {runs-on: x, needs: a, steps: [run: a]}\n",
        expect![[r#"
        ok
    "#]],
    );
}

#[test]
fn missing_on() {
    check_valid(
        "jobs:\n  a: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
        wf.yml:1: on: missing `on`; add the events that trigger the workflow, e.g. `on: push`
    "#]],
    );
}

#[test]
fn empty_on_list() {
    check_valid(
        "on: []\njobs:\n  a: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
        wf.yml:1: on: no events in `on`; add at least one event, e.g. `on: push`
    "#]],
    );
}

#[test]
fn bad_job_ids() {
    check_valid(
        "on: push\njobs:\n  1build: {runs-on: x, steps: [run: a]}\n  my.job: {runs-on: x, steps: [run: a]}\n  -x: {runs-on: x, steps: [run: a]}\n  _ok-1: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            wf.yml:3: jobs.1build: invalid job id `1build`; job ids must start with a letter or `_` and contain only letters, digits, `-` and `_`
            wf.yml:4: jobs["my.job"]: invalid job id `my.job`; job ids must start with a letter or `_` and contain only letters, digits, `-` and `_`
            wf.yml:5: jobs.-x: invalid job id `-x`; job ids must start with a letter or `_` and contain only letters, digits, `-` and `_`
        "#]],
    );
}

#[test]
fn needs_missing_job() {
    check_valid(
        "on: push\njobs:\n  second:\n    runs-on: x\n    needs: first\n    steps: [run: a]\n",
        expect![[r#"
            wf.yml:5:12: jobs.second.needs: job `second` needs `first`, which does not exist; fix the name or add the job
        "#]],
    );
}

#[test]
fn needs_self() {
    check_valid(
        "on: push\njobs:\n  a: {runs-on: x, needs: a, steps: [run: a]}\n",
        expect![[r#"
        wf.yml:3: jobs.a.needs: jobs form a dependency cycle: a -> a (each needs the next); remove one of these `needs`
    "#]],
    );
}

#[test]
fn needs_cycle_of_three() {
    check_valid(
        "on: push\njobs:\n  a: {runs-on: x, needs: c, steps: [run: a]}\n  b: {runs-on: x, needs: a, steps: [run: a]}\n  c: {runs-on: x, needs: b, steps: [run: a]}\n  d: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            wf.yml:3: jobs.a.needs: jobs form a dependency cycle: a -> c -> b -> a (each needs the next); remove one of these `needs`
        "#]],
    );
}

#[test]
fn needs_cycle_behind_a_ready_job() {
    check_valid(
        "on: push\njobs:\n  root: {runs-on: x, steps: [run: a]}\n  x: {runs-on: x, needs: [root, y], steps: [run: a]}\n  y: {runs-on: x, needs: x, steps: [run: a]}\n",
        expect![[r#"
            wf.yml:4: jobs.x.needs: jobs form a dependency cycle: x -> y -> x (each needs the next); remove one of these `needs`
        "#]],
    );
}

#[test]
fn steps_and_uses() {
    check_valid(
        "on: push\njobs:\n  a:\n    uses: ./w.yml\n    steps: [run: a]\n",
        expect![[r#"
        wf.yml:3: jobs.a: job `a` has both `steps` and `uses`; a job either runs steps or calls a reusable workflow
    "#]],
    );
}

#[test]
fn neither_steps_nor_uses() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n",
        expect![[r#"
        wf.yml:3: jobs.a: job `a` has neither `steps` nor `uses`; add `steps:`
    "#]],
    );
}

#[test]
fn runs_on_missing() {
    check_valid(
        "on: push\njobs:\n  a:\n    steps: [run: a]\n",
        expect![[r#"
        wf.yml:3: jobs.a.runs-on: job `a` has no `runs-on`; add e.g. `runs-on: ubuntu-latest`
    "#]],
    );
}

#[test]
fn reusable_job_with_runner_keys() {
    check_valid(
        "on: push\njobs:\n  a:\n    uses: o/r/.github/workflows/w.yml@main\n    runs-on: x\n    env: {A: 1}\n    timeout-minutes: 3\n",
        expect![[r#"
            wf.yml:3: jobs.a.runs-on: job `a` calls a reusable workflow and cannot set `runs-on`; remove it or move it into the called workflow
            wf.yml:3: jobs.a.env: job `a` calls a reusable workflow and cannot set `env`; remove it or move it into the called workflow
            wf.yml:3: jobs.a.timeout-minutes: job `a` calls a reusable workflow and cannot set `timeout-minutes`; remove it or move it into the called workflow
        "#]],
    );
}

#[test]
fn reusable_job_ok() {
    check_valid(
        "on: push\njobs:\n  a:\n    uses: o/r/.github/workflows/w.yml@main\n    with: {x: 1}\n    secrets: inherit\n    needs: b\n  b: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            ok
        "#]],
    );
}

#[test]
fn with_and_secrets_without_uses() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    with: {x: 1}\n    secrets: inherit\n    steps: [run: a]\n",
        expect![[r#"
        wf.yml:3: jobs.a.with: job `a` has `with` but no `uses`; `with` is for reusable workflow calls
        wf.yml:3: jobs.a.secrets: job `a` has `secrets` but no `uses`; `secrets` is for reusable workflow calls
    "#]],
    );
}

#[test]
fn step_uses_forms() {
    check_valid(
        r#"on: push
jobs:
  a:
    runs-on: x
    steps:
      - uses: actions/checkout@v4
      - uses: actions/aws/ec2@main
      - uses: ./local/action
      - uses: docker://alpine:3
      - uses: https://code.forgejo.org/actions/checkout@v4
      - uses: ${{ matrix.action }}
      - uses: actions/checkout
      - uses: actions@v1
      - uses: actions/checkout@
      - uses: a//b@v1
      - uses: https://example.com/x
"#,
        expect![[r#"
            wf.yml:12:15: jobs.a.steps[6].uses: invalid `uses: actions/checkout`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:13:15: jobs.a.steps[7].uses: invalid `uses: actions@v1`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:14:15: jobs.a.steps[8].uses: invalid `uses: actions/checkout@`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:15:15: jobs.a.steps[9].uses: invalid `uses: a//b@v1`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:16:15: jobs.a.steps[10].uses: invalid `uses: https://example.com/x`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
        "#]],
    );
}

#[test]
fn duplicate_step_ids() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - {id: s, run: a}\n      - {id: t, run: a}\n      - {id: s, run: a}\n",
        expect![[r#"
            wf.yml:8: jobs.a.steps[2].id: step id `s` is used twice in job `a`; give each step a unique id
        "#]],
    );
}

#[test]
fn custom_shell_without_placeholder() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: a\n        shell: node\n",
        expect![[r#"
        wf.yml:6: jobs.a.steps[0].shell: step 0 of job `a`: custom shell `node` has no `{0}` placeholder for the script path; write e.g. `node {0}` or use bash, sh, python, pwsh, powershell or cmd
    "#]],
    );
}

#[test]
fn default_shell_without_placeholder() {
    check_valid(
        "on: push\ndefaults:\n  run:\n    shell: perl\njobs:\n  a:\n    runs-on: x\n    steps: [run: a]\n",
        expect![[r#"
        wf.yml: defaults.run.shell: custom shell `perl` has no `{0}` placeholder for the script path; write e.g. `perl {0}` or use bash, sh, python, pwsh, powershell or cmd
    "#]],
    );
}

#[test]
fn custom_shell_with_placeholder_is_fine() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: a\n        shell: cp {0} action.yml\n",
        expect![[r#"
        ok
    "#]],
    );
}

#[test]
fn many_errors_are_all_reported() {
    check_valid(
        "jobs:\n  9a:\n    needs: [nope]\n    steps: [{uses: foo}]\n  b:\n    runs-on: x\n",
        expect![[r#"
            wf.yml:1: on: missing `on`; add the events that trigger the workflow, e.g. `on: push`
            wf.yml:2: jobs.9a: invalid job id `9a`; job ids must start with a letter or `_` and contain only letters, digits, `-` and `_`
            wf.yml:3:13: jobs.9a.needs: job `9a` needs `nope`, which does not exist; fix the name or add the job
            wf.yml:2: jobs.9a.runs-on: job `9a` has no `runs-on`; add e.g. `runs-on: ubuntu-latest`
            wf.yml:4:20: jobs.9a.steps[0].uses: invalid `uses: foo`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:5: jobs.b: job `b` has neither `steps` nor `uses`; add `steps:`
        "#]],
    );
}

#[test]
fn order_linear() {
    order(
        "on: push\njobs:\n  c: {runs-on: x, needs: b, steps: [run: a]}\n  b: {runs-on: x, needs: a, steps: [run: a]}\n  a: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            [["a"], ["b"], ["c"]]
            JobGraph { dependencies: {"c": ["b"], "b": ["a"], "a": []}, dependents: {"c": [], "b": ["c"], "a": ["b"]} }
        "#]],
    );
}

#[test]
fn order_diamond() {
    order(
        "on: push\njobs:\n  top: {runs-on: x, steps: [run: a]}\n  left: {runs-on: x, needs: top, steps: [run: a]}\n  right: {runs-on: x, needs: [top], steps: [run: a]}\n  bottom: {runs-on: x, needs: [left, right], steps: [run: a]}\n  alone: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            [["top", "alone"], ["left", "right"], ["bottom"]]
            JobGraph { dependencies: {"top": [], "left": ["top"], "right": ["top"], "bottom": ["left", "right"], "alone": []}, dependents: {"top": ["left", "right"], "left": ["bottom"], "right": ["bottom"], "bottom": [], "alone": []} }
        "#]],
    );
}

#[test]
fn order_duplicate_needs_counted_once() {
    order(
        "on: push\njobs:\n  a: {runs-on: x, steps: [run: a]}\n  b: {runs-on: x, needs: [a, a], steps: [run: a]}\n",
        expect![[r#"
        [["a"], ["b"]]
        JobGraph { dependencies: {"a": [], "b": ["a"]}, dependents: {"a": ["b"], "b": []} }
    "#]],
    );
}

#[test]
fn order_missing() {
    order(
        "on: push\njobs:\n  b: {runs-on: x, needs: zz, steps: [run: a]}\n",
        expect![[r#"
        error: wf.yml:3: jobs.b.needs: job `b` needs `zz`, which does not exist; fix the name or add the job
    "#]],
    );
}

#[test]
fn order_cycle() {
    order(
        "on: push\njobs:\n  a: {runs-on: x, needs: b, steps: [run: a]}\n  b: {runs-on: x, needs: a, steps: [run: a]}\n",
        expect![[r#"
        error: wf.yml:3: jobs.a.needs: jobs form a dependency cycle: a -> b -> a (each needs the next); remove one of these `needs`
    "#]],
    );
}

#[test]
fn cycle_reported_alongside_missing_needs() {
    check_valid(
        "on: push\njobs:\n  a: {runs-on: x, needs: [b, ghost], steps: [run: a]}\n  b: {runs-on: x, needs: a, steps: [run: a]}\n",
        expect![[r#"
            wf.yml:3:30: jobs.a.needs: job `a` needs `ghost`, which does not exist; fix the name or add the job
            wf.yml:3: jobs.a.needs: jobs form a dependency cycle: a -> b -> a (each needs the next); remove one of these `needs`
        "#]],
    );
}
