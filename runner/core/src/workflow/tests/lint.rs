//! The linter: expressions parsed at load time, contexts and functions checked against where
//! they are available, every error of a file reported at once at its line and column.

use expect_test::{Expect, expect};

use super::super::check_workflow;

fn lint(yaml: &str, expect: Expect) {
    let actual = match check_workflow(yaml, "wf.yml") {
        Ok(_) => "ok\n".to_owned(),
        Err(errs) => errs.iter().map(|e| format!("{e}\n")).collect(),
    };
    expect.assert_eq(&actual);
}

/// A workflow with one job whose single step runs `run`, and `extra` job keys.
fn step(run: &str) -> String {
    format!("on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: {run}\n")
}

#[test]
fn good_expressions() {
    for run in [
        "echo ${{ github.sha }}",
        "echo ${{ github.event.head_commit.message || 'none' }}",
        "echo ${{ format('{0}-{1}', matrix.os, steps.x.outputs.y) }}",
        "echo ${{ hashFiles('**/Cargo.lock') }} ${{ runner.os }} ${{ job.status }}",
        "echo ${{ toJSON(secrets) }} ${{ env.A }} ${{ vars.B }} ${{ inputs.c }} ${{ needs.x.result }}",
        "echo ${{ fromJSON('[1,2]')[0] }} ${{ github['ref'] }} ${{ github.event.commits.*.id }}",
        "echo ${{ strategy.job-index }} ${{ contains(github.ref, 'tags') && 'tag' || 'branch' }}",
        "echo '${{ GITHUB.SHA }}'",
    ] {
        lint(
            &step(&format!("\"{run}\"")),
            expect![[r#"
            ok
        "#]],
        );
    }
}

#[test]
fn malformed_expressions() {
    lint(
        &step("echo ${{ github.sha ) }}"),
        expect![[r#"
            wf.yml:6:34: jobs.a.steps[0].run: invalid expression `github.sha )`: unexpected token ')' (column 12); fix the expression
        "#]],
    );
    lint(
        &step("echo ${{ github.sha"),
        expect![[r#"
            wf.yml:6:19: jobs.a.steps[0].run: invalid expression `echo ${{ github.sha`: unclosed expression: missing '}}' (column 1); fix the expression
        "#]],
    );
    lint(
        &step("echo ${{ }}"),
        expect![[r#"
            wf.yml:6:23: jobs.a.steps[0].run: invalid expression ``: empty expression (column 1); fix the expression
        "#]],
    );
    lint(
        &step("echo ${{ nosuch(1) }}"),
        expect![[r#"
            wf.yml:6:23: jobs.a.steps[0].run: invalid expression `nosuch(1)`: unrecognized function: 'nosuch' (column 1); fix the expression
        "#]],
    );
    lint(
        &step("echo ${{ contains('a') }}"),
        expect![[r#"
            wf.yml:6:23: jobs.a.steps[0].run: invalid expression `contains('a')`: too few arguments to function 'contains': expected 2, got 1 (column 1); fix the expression
        "#]],
    );
    lint(
        &step("echo ${{ 1 == }}"),
        expect![[r#"
            wf.yml:6:27: jobs.a.steps[0].run: invalid expression `1 ==`: unexpected end of expression (column 5); fix the expression
        "#]],
    );
}

#[test]
fn conditions_are_expressions_without_braces() {
    lint(
        "on: push\njobs:\n  a:\n    if: github.repository == \"x\"\n    runs-on: x\n    steps:\n      - run: a\n        if: github.ref == 'refs/heads/main' &&\n",
        expect![[r#"
            wf.yml:4:30: jobs.a.if: invalid expression `github.repository == "x"`: unexpected symbol '"' (column 22); fix the expression
            wf.yml:8:47: jobs.a.steps[0].if: invalid expression `github.ref == 'refs/heads/main' &&`: unexpected end of expression (column 35); fix the expression
        "#]],
    );
    lint(
        "on: push\njobs:\n  a:\n    if: ${{ always() }}\n    runs-on: x\n    steps:\n      - run: a\n        if: ${{ failure() || cancelled() }}\n      - run: b\n        if: true\n      - run: c\n        if: success() && hashFiles('x') != ''\n",
        expect![[r#"
            ok
        "#]],
    );
}

#[test]
fn unknown_contexts() {
    lint(
        &step("echo ${{ gihub.sha }} ${{ foo }}"),
        expect![[r#"
            wf.yml:6:23: jobs.a.steps[0].run: unknown context `gihub` in `gihub.sha`; available here: github, inputs, vars, needs, strategy, matrix, job, runner, env, secrets, steps
            wf.yml:6:40: jobs.a.steps[0].run: unknown context `foo` in `foo`; available here: github, inputs, vars, needs, strategy, matrix, job, runner, env, secrets, steps
        "#]],
    );
}

#[test]
fn contexts_in_the_wrong_place() {
    lint(
        r#"on: push
run-name: ${{ env.X }} by ${{ github.actor }}
env:
  A: ${{ secrets.S }}
  B: ${{ matrix.os }}
concurrency: ${{ steps.x.outputs.y }}
jobs:
  a:
    name: ${{ matrix.os }} ${{ secrets.S }}
    if: env.DEPLOY == 'yes' && matrix.os
    runs-on: ${{ matrix.os }}-${{ steps.a.outputs.b }}
    strategy:
      matrix:
        os: ${{ fromJSON(secrets.OSES) }}
        v: ${{ matrix.x }}
    timeout-minutes: ${{ env.T }}
    env:
      C: ${{ secrets.S }} ${{ steps.a.outputs.b }}
    environment:
      name: ${{ env.E }}
      url: ${{ steps.a.outputs.url }}
    container:
      image: ${{ env.IMAGE }}
      credentials:
        password: ${{ secrets.P }}
      env:
        D: ${{ env.X }} ${{ runner.os }}
    services:
      db:
        image: ${{ secrets.IMAGE }}
    outputs:
      o: ${{ steps.a.outputs.o }} ${{ job.status }}
    steps:
      - run: echo ${{ jobs.x.result }}
        env:
          E: ${{ steps.a.outputs.b }}
"#,
        expect![[r#"
            wf.yml:2:15: run-name: context `env` is not available in `run-name`; available there: github, inputs, vars
            wf.yml:5:10: env.B: context `matrix` is not available in `env`; available there: github, inputs, vars, secrets
            wf.yml:6:18: concurrency: context `steps` is not available in `concurrency`; available there: github, inputs, vars
            wf.yml:9:32: jobs.a.name: context `secrets` is not available in `jobs.<job_id>.name`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:10:9: jobs.a.if: context `env` is not available in `jobs.<job_id>.if`; available there: github, inputs, vars, needs
            wf.yml:10:32: jobs.a.if: context `matrix` is not available in `jobs.<job_id>.if`; available there: github, inputs, vars, needs
            wf.yml:11:35: jobs.a.runs-on: context `steps` is not available in `jobs.<job_id>.runs-on`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:14:26: jobs.a.strategy.matrix.os: context `secrets` is not available in `jobs.<job_id>.strategy`; available there: github, inputs, vars, needs
            wf.yml:15:16: jobs.a.strategy.matrix.v: context `matrix` is not available in `jobs.<job_id>.strategy`; available there: github, inputs, vars, needs
            wf.yml:16:26: jobs.a.timeout-minutes: context `env` is not available in `jobs.<job_id>.timeout-minutes`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:18:31: jobs.a.env.C: context `steps` is not available in `jobs.<job_id>.env`; available there: github, inputs, vars, needs, strategy, matrix, secrets
            wf.yml:20:17: jobs.a.environment.name: context `env` is not available in `jobs.<job_id>.environment`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:23:18: jobs.a.container.image: context `env` is not available in `jobs.<job_id>.container`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:30:20: jobs.a.services.db.image: context `secrets` is not available in `jobs.<job_id>.services`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:34:23: jobs.a.steps[0].run: context `jobs` is not available in `jobs.<job_id>.steps`; available there: github, inputs, vars, needs, strategy, matrix, job, runner, env, secrets, steps
        "#]],
    );
}

#[test]
fn functions_in_the_wrong_place() {
    lint(
        "on: push\nenv:\n  K: ${{ hashFiles('x') }}\njobs:\n  a:\n    name: ${{ always() }}\n    runs-on: x\n    outputs:\n      o: ${{ hashFiles('y') }}\n    steps:\n      - run: echo ${{ success() }} ${{ hashFiles('z') }}\n",
        expect![[r#"
            wf.yml:3:10: env.K: function `hashFiles()` is only available in steps and step conditions, not in `env`
            wf.yml:6:15: jobs.a.name: function `always()` is only available in `if:` conditions, not in `jobs.<job_id>.name`
            wf.yml:9:14: jobs.a.outputs.o: function `hashFiles()` is only available in steps and step conditions, not in `jobs.<job_id>.outputs`
            wf.yml:11:23: jobs.a.steps[0].run: function `success()` is only available in `if:` conditions, not in `jobs.<job_id>.steps`
        "#]],
    );
}

#[test]
fn reusable_workflow_places() {
    lint(
        r#"on:
  workflow_call:
    inputs:
      a:
        type: string
        default: ${{ github.ref }} ${{ secrets.X }}
    outputs:
      o:
        value: ${{ jobs.b.outputs.o }} ${{ steps.x.outputs.y }}
jobs:
  b:
    uses: ./.github/workflows/x.yml
    with:
      p: ${{ matrix.v }} ${{ secrets.X }}
    secrets:
      s: ${{ secrets.X }} ${{ env.Y }}
"#,
        expect![[r#"
            wf.yml:6:40: on.workflow_call.inputs.a.default: context `secrets` is not available in `on.workflow_call.inputs.<inputs_id>.default`; available there: github, inputs, vars
            wf.yml:9:44: on.workflow_call.outputs.o.value: context `steps` is not available in `on.workflow_call.outputs.<output_id>.value`; available there: github, inputs, vars, jobs
            wf.yml:14:30: jobs.b.with.p: context `secrets` is not available in `jobs.<job_id>.with`; available there: github, inputs, vars, needs, strategy, matrix
            wf.yml:16:31: jobs.b.secrets.s: context `env` is not available in `jobs.<job_id>.secrets`; available there: github, inputs, vars, needs, strategy, matrix, secrets
        "#]],
    );
}

#[test]
fn multi_line_scripts_are_located_line_by_line() {
    lint(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: |\n          echo one\n          echo ${{ github.sha }} ${{ matrx.os }}\n          echo ${{ oops ) }}\n",
        expect![[r#"
            wf.yml:8:38: jobs.a.steps[0].run: unknown context `matrx` in `matrx.os`; available here: github, inputs, vars, needs, strategy, matrix, job, runner, env, secrets, steps
            wf.yml:9:25: jobs.a.steps[0].run: invalid expression `oops )`: unexpected token ')' (column 6); fix the expression
        "#]],
    );
}

#[test]
fn every_error_of_a_file_in_one_pass() {
    // A model error (unknown key), a semantic error (missing needs), a bad `uses`, and
    // expression errors: all reported, in file order.
    lint(
        "on: push\njobs:\n  a:\n    runs-on: x\n    needs: [ghost]\n    steps:\n      - run: echo ${{ github.sha ) }}\n      - uses: not-a-ref\n  b:\n    runs-on: x\n    stepz: []\n    if: env.X\n",
        expect![[r#"
            wf.yml:5:13: jobs.a.needs: job `a` needs `ghost`, which does not exist; fix the name or add the job
            wf.yml:7:34: jobs.a.steps[0].run: invalid expression `github.sha )`: unexpected token ')' (column 12); fix the expression
            wf.yml:8:15: jobs.a.steps[1].uses: invalid `uses: not-a-ref`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:9: jobs.b: job `b` has neither `steps` nor `uses`; add `steps:`
            wf.yml:11:5: jobs.b.stepz: unknown key `stepz` in a job; remove it or use one of: name, needs, permissions, if, runs-on, environment, concurrency, outputs, env, defaults, steps, timeout-minutes, cancel-timeout-minutes, strategy, continue-on-error, container, services, uses, with, secrets
            wf.yml:12:9: jobs.b.if: context `env` is not available in `jobs.<job_id>.if`; available there: github, inputs, vars, needs
        "#]],
    );
}

#[test]
fn text_that_is_never_evaluated_is_not_checked() {
    lint(
        "name: ${{ not checked }}\non:\n  push:\n    branches: ['${{ x }}']\njobs:\n  a:\n    runs-on: x\n    steps:\n      - id: ${{ y }}\n        run: echo '$' '{{ not an expression }}'\n",
        expect![[r#"
            ok
        "#]],
    );
}

#[test]
fn forgejo_names_of_the_github_context() {
    lint(
        "on: push\njobs:\n  a:\n    if: forge.repository_owner == 'root' || forgejo.ref != ''\n    runs-on: x\n    environment:\n      name: prod\n      deployment: false\n    steps:\n      - run: echo ${{ forge.sha }} ${{ FORGEJO.event.pull_request.number }}\n",
        expect![[r#"
            ok
        "#]],
    );
}
