//! Forgejo's and today's GitHub's workflow syntax: every key of Forgejo Runner's workflow
//! schema is accepted, and the Forgejo-only keys and `$/` self-repository references parse
//! to the model.

use expect_test::expect;

use super::{check, check_valid};

/// The keys of Forgejo Runner's workflow schema (`act/schema/workflow_schema.json`, v12):
/// the workflow root, a job that runs steps, a job that calls a reusable workflow, a
/// container mapping, a `run` step and a `uses` step, each key once.
const EVERY_KEY: &str = r#"
name: every key
description: a workflow using each documented key
enable-email-notifications: true
run-name: run ${{ github.ref }}
on: push
defaults:
  run:
    shell: bash
    working-directory: ./scripts
env:
  A: 1
permissions: read-all
concurrency:
  group: g-${{ github.ref }}
  cancel-in-progress: true
jobs:
  build:
    name: build ${{ matrix.os }}
    needs: []
    if: ${{ !cancelled() }}
    strategy:
      matrix:
        os: [a, b]
      fail-fast: false
      max-parallel: 2
    runs-on: docker
    timeout-minutes: 30
    cancel-timeout-minutes: 5
    continue-on-error: false
    container:
      image: node:22
      options: --cpus 1
      cmd: [sleep, infinity]
      env:
        B: 2
      ports: ["80"]
      volumes: ["/data"]
      credentials:
        username: u
        password: ${{ secrets.P }}
    services:
      db:
        image: postgres:16
        cmd: [postgres, -c, fsync=off]
    env:
      C: 3
    environment:
      name: staging
      url: https://example.test
    permissions:
      contents: read
    concurrency: build-${{ matrix.os }}
    outputs:
      o: ${{ steps.s.outputs.o }}
    defaults:
      run:
        shell: sh
    steps:
      - name: run step
        id: s
        if: success()
        timeout-minutes: 1
        run: echo o=1 >> "$FORGEJO_OUTPUT"
        continue-on-error: true
        env:
          D: 4
        working-directory: .
        shell: bash
      - name: uses step
        id: u
        if: always()
        continue-on-error: false
        timeout-minutes: 2
        uses: actions/checkout@v4
        with:
          fetch-depth: 0
        env:
          E: 5
  call:
    name: call
    uses: ./.forgejo/workflows/reusable.yml
    with:
      x: 1
    secrets: inherit
    needs: build
    if: always()
    permissions: read-all
    concurrency: call
    strategy:
      matrix:
        v: [1]
"#;

#[test]
fn every_documented_key_is_accepted() {
    check_valid(
        EVERY_KEY,
        expect![[r#"
            ok
        "#]],
    );
}

#[test]
fn forgejo_top_level_keys() {
    check(
        "name: n\ndescription: what it does\nenable-email-notifications: true\non: push\njobs:\n  a: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            name: "n"
            description: "what it does"
            enable-email-notifications: true
            on push
            job a @6
              runs-on: Labels(["x"])
              steps:
              - step @6
                run: "a"
        "#]],
    );
    check(
        "enable-email-notifications: maybe\non: push\njobs:\n  a: {runs-on: x, steps: [run: a]}\n",
        expect![[r#"
            error: wf.yml:1:29: enable-email-notifications: expected `true` or `false`, found a string; change the value
        "#]],
    );
}

#[test]
fn container_and_service_cmd() {
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    container: {image: alpine, cmd: [sh, -c, 'sleep 1']}\n    services:\n      db: {image: redis, cmd: redis-server}\n    steps: [run: a]\n",
        expect![[r#"
            on push
            job a @3
              runs-on: Labels(["x"])
              container: Container { image: "alpine", credentials: None, env: Map({}), ports: [], volumes: [], options: None, cmd: ["sh", "-c", "sleep 1"] }
              services: {"db": Container { image: "redis", credentials: None, env: Map({}), ports: [], volumes: [], options: None, cmd: ["redis-server"] }}
              steps:
              - step @8
                run: "a"
        "#]],
    );
    check(
        "on: push\njobs:\n  a:\n    runs-on: x\n    container: {image: alpine, cmd: {a: b}}\n    steps: [run: a]\n",
        expect![[r#"
            error: wf.yml:5:37: jobs.a.container.cmd: expected a string, found a map; change the value
        "#]],
    );
}

#[test]
fn self_repository_uses() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - uses: $/.github/actions/x\n      - uses: $/.forgejo/actions/y/\n  b:\n    uses: $/.github/workflows/reusable.yml\n",
        expect![[r#"
            ok
        "#]],
    );
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - name: pinned\n        uses: $/.github/actions/x@v1\n  b:\n    uses: $/.github/workflows/r.yml@main\n  c:\n    uses: $/\n",
        expect![[r#"
            wf.yml:7:15: jobs.a.steps[0].uses: invalid `uses: $/.github/actions/x@v1`; `$/` names a path of this repository at this commit, so it takes no `@ref`: write `$/path/to/action`
            wf.yml:9:11: jobs.b.uses: invalid `uses: $/.github/workflows/r.yml@main`; `$/` names a file of this repository at this commit, so it takes no `@ref`: write `$/.github/workflows/<file>.yml`
            wf.yml:11:11: jobs.c.uses: invalid `uses: $/`; `$/` names a file of this repository at this commit, so it takes no `@ref`: write `$/.github/workflows/<file>.yml`
        "#]],
    );
}

#[test]
fn needs_and_uses_errors_point_at_the_value() {
    check_valid(
        "on: push\njobs:\n  a:\n    runs-on: x\n    needs:\n      - b\n      - nope\n    steps:\n      - name: s\n        run: a\n      - name: t\n        uses: not-a-ref\n  b:\n    runs-on: x\n    needs: [a2]\n    steps: [run: a]\n",
        expect![[r#"
            wf.yml:7:9: jobs.a.needs: job `a` needs `nope`, which does not exist; fix the name or add the job
            wf.yml:12:15: jobs.a.steps[1].uses: invalid `uses: not-a-ref`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
            wf.yml:15:13: jobs.b.needs: job `b` needs `a2`, which does not exist; fix the name or add the job
        "#]],
    );
}
