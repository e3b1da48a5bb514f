//! `kiln exec` on the embedded host backend: examples, the DAG, outputs, matrices, workflow
//! commands, masking, and clear errors for bad input.

use crate::support::{Repo, kiln_bin, repo_root};

#[test]
fn example_workflow_runs_on_the_embedded_host_backend() {
    let root = repo_root();
    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(kiln_bin())
        .current_dir(&root)
        .env("XDG_STATE_HOME", state.path())
        .env("NO_COLOR", "1")
        .args(["exec", "-W", "examples/workflows/hello.yml"])
        .output()
        .unwrap();
    let run = crate::support::Run::from(out);
    run.assert_code(0).assert_stdout(&[
        "version 1.2.42, kind release",
        "testing 1.2.42 (0/4)",
        "testing 1.2.42 (3/4)",
        "build=success test=success",
        "Workflow success",
    ]);
    // Every environment was removed.
    let left: Vec<_> = std::fs::read_dir(state.path().join("kiln/host"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "environments left behind: {left:?}");
}

const DAG: &str = r#"
name: dag
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    outputs:
      value: ${{ steps.s.outputs.v }}
    steps:
      - id: s
        run: |
          echo "v=from-a" >> "$GITHUB_OUTPUT"
          echo "a done"
  b:
    needs: a
    runs-on: ubuntu-latest
    strategy:
      matrix:
        os: [x, y]
        n: [1, 2]
        exclude:
          - os: y
            n: 2
        include:
          - os: z
            n: 9
    steps:
      - run: echo "b ${{ matrix.os }}-${{ matrix.n }} got ${{ needs.a.outputs.value }}"
  c:
    needs: [a]
    if: needs.a.outputs.value == 'nope'
    runs-on: ubuntu-latest
    steps:
      - run: echo "c must not run"
  d:
    needs: [b, c]
    if: always()
    runs-on: ubuntu-latest
    steps:
      - run: echo "d sees b=${{ needs.b.result }} c=${{ needs.c.result }}"
  e:
    needs: c
    runs-on: ubuntu-latest
    steps:
      - run: echo "e must be skipped with c"
"#;

#[test]
fn needs_outputs_and_matrix() {
    let repo = Repo::with_workflow("dag.yml", DAG);
    let run = repo.exec(&[]);
    run.assert_code(0)
        .assert_stdout(&[
            "b x-1 got from-a",
            "b x-2 got from-a",
            "b y-1 got from-a",
            "b z-9 got from-a",
            "d sees b=success c=skipped",
        ])
        .assert_no_stdout(&["b y-2", "c must not run", "e must be skipped"]);
}

#[test]
fn list_and_graph() {
    let repo = Repo::with_workflow("dag.yml", DAG);
    let out = repo.kiln().args(["exec", "--list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for job in ["a", "b", "c", "d", "e"] {
        assert!(list.lines().any(|l| l.split_whitespace().nth(1) == Some(job)), "{list}");
    }
    let out = repo.kiln().args(["exec", "--graph"]).output().unwrap();
    let graph = String::from_utf8_lossy(&out.stdout);
    assert!(graph.contains("d <- [b, c]"), "{graph}");
}

#[test]
fn only_selected_job_and_its_needs_run() {
    let repo = Repo::with_workflow("dag.yml", DAG);
    repo.exec(&["-j", "b"])
        .assert_code(0)
        .assert_stdout(&["a done", "b x-1 got from-a"])
        .assert_no_stdout(&["d sees"]);
}

#[test]
fn fail_fast_cancels_matrix_siblings() {
    let repo = Repo::with_workflow(
        "ff.yml",
        r#"
on: push
jobs:
  m:
    runs-on: ubuntu-latest
    strategy:
      max-parallel: 1
      matrix:
        n: [1, 2, 3]
    steps:
      - run: |
          echo "running ${{ matrix.n }}"
          [ "${{ matrix.n }}" != 1 ]
"#,
    );
    repo.exec(&[])
        .assert_code(1)
        .assert_stdout(&["running 1", "m (2) (cancelled)", "m (3) (cancelled)"])
        .assert_no_stdout(&["running 2", "running 3"]);
}

#[test]
fn env_files_commands_and_masking() {
    let repo = Repo::with_workflow(
        "cmd.yml",
        r#"
on: push
env:
  LEVEL: workflow
jobs:
  j:
    runs-on: ubuntu-latest
    env:
      LEVEL: job
    steps:
      - run: |
          echo "MULTI<<EOF" >> "$GITHUB_ENV"
          echo "line 1" >> "$GITHUB_ENV"
          echo "line 2" >> "$GITHUB_ENV"
          echo "EOF" >> "$GITHUB_ENV"
          mkdir -p "$RUNNER_TEMP/bin"
          printf '#!/bin/sh\necho tool-ran\n' > "$RUNNER_TEMP/bin/mytool"
          chmod +x "$RUNNER_TEMP/bin/mytool"
          echo "$RUNNER_TEMP/bin" >> "$GITHUB_PATH"
      - env:
          LEVEL: step
        run: |
          echo "level=$LEVEL multi=$(echo "$MULTI" | tr '\n' '+')"
          mytool
          echo "the secret is ${{ secrets.TOKEN }}"
          echo "::add-mask::hunter2-dynamic"
          echo "dynamic hunter2-dynamic"
          echo "::warning file=src/app.rs,line=7::check this"
          echo "::set-env name=BAD::1"
          echo "::stop-commands::pause123"
          echo "::warning::not a command while stopped"
          echo "::pause123::"
      - run: echo "BAD=${BAD:-unset} level=$LEVEL"
"#,
    );
    let run = repo.exec(&["--secret", "TOKEN=s3cr3t-value"]);
    run.assert_code(0)
        .assert_stdout(&[
            "level=step multi=line 1+line 2+",
            "tool-ran",
            "the secret is ***",
            "dynamic ***",
            "warning src/app.rs:7: check this",
            "the set-env command is disabled",
            "::warning::not a command while stopped",
            "BAD=unset level=job",
            "Annotations:",
        ])
        .assert_no_stdout(&["s3cr3t-value", "hunter2-dynamic"]);
}

#[test]
fn step_failure_continue_on_error_and_exit_code() {
    let repo = Repo::with_workflow(
        "f.yml",
        r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - id: soft
        continue-on-error: true
        run: exit 3
      - run: echo "outcome=${{ steps.soft.outcome }} conclusion=${{ steps.soft.conclusion }}"
      - run: exit 4
      - if: failure()
        run: echo "cleanup after failure"
      - run: echo "must be skipped"
"#,
    );
    repo.exec(&[])
        .assert_code(1)
        .assert_stdout(&[
            "outcome=failure conclusion=success",
            "the process exited with code 4",
            "cleanup after failure",
            "Workflow failure",
        ])
        .assert_no_stdout(&["must be skipped\n"]);
}

#[test]
fn shells_and_working_directory() {
    let repo = Repo::with_workflow(
        "sh.yml",
        r#"
on: push
defaults:
  run:
    working-directory: sub
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - working-directory: .
        run: mkdir -p sub/deeper
      - run: echo "in $(basename "$PWD")"
      - shell: python3 {0}
        working-directory: sub/deeper
        run: |
          import os
          print("python in", os.path.basename(os.getcwd()))
      - shell: sh
        run: echo "sh says $0"
"#,
    );
    repo.exec(&[]).assert_code(0).assert_stdout(&["in sub", "python in deeper", "sh says"]);
}

#[test]
fn bad_workflow_names_file_line_and_key() {
    let repo = Repo::with_workflow(
        "bad.yml",
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n        uses: actions/checkout@v4\n",
    );
    let run = repo.exec(&[]);
    run.assert_code(2);
    assert!(run.stderr.contains("bad.yml:6"), "{}", run.show());
    assert!(run.stderr.contains("jobs.j.steps[0]"), "{}", run.show());
}

#[test]
fn unknown_event_is_a_clear_error() {
    let repo = Repo::with_workflow("dag.yml", DAG);
    let run = repo.exec(&["workflow_dispatch"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("is triggered by the event \"workflow_dispatch\""),
        "{}",
        run.show()
    );
}

#[test]
fn job_continue_on_error_lets_the_workflow_succeed() {
    let repo = Repo::with_workflow(
        "coe.yml",
        r#"
on: push
jobs:
  flaky:
    runs-on: ubuntu-latest
    continue-on-error: ${{ matrix.experimental }}
    strategy:
      matrix:
        experimental: [true]
    steps:
      - run: exit 1
  after:
    needs: flaky
    runs-on: ubuntu-latest
    steps:
      - run: echo "after sees ${{ needs.flaky.result }}"
"#,
    );
    repo.exec(&[])
        .assert_code(0)
        .assert_stdout(&["continue-on-error lets the workflow go on", "after sees success"]);
}

#[test]
fn validate_lints_expressions_and_exits_2_and_exec_refuses_before_starting() {
    let bad = "on: push\njobs:\n  a:\n    if: github.repository == \"x\"\n    runs-on: ubuntu-latest\n    strategy:\n      matrix:\n        k: ${{ fromJSON(secrets.K) }}\n    steps:\n      - run: echo ${{ github.sha ) }} > started\n";
    let repo = Repo::with_workflow("bad.yml", bad);
    let out = repo.kiln().args(["validate", ".github/workflows"]).output().unwrap();
    let run = crate::support::Run::from(out);
    run.assert_code(2).assert_stdout(&[
        "invalid .github/workflows/bad.yml",
        ".github/workflows/bad.yml:4:30: jobs.a.if: invalid expression `github.repository == \"x\"`",
        ".github/workflows/bad.yml:8:25: jobs.a.strategy.matrix.k: context `secrets` is not available in `jobs.<job_id>.strategy`",
        ".github/workflows/bad.yml:10:34: jobs.a.steps[0].run: invalid expression `github.sha )`",
    ]);
    // `kiln exec` reports the same errors and runs nothing.
    let run = repo.exec(&[]);
    run.assert_code(2);
    assert!(run.stderr.contains("bad.yml:8:25: jobs.a.strategy.matrix.k"), "{}", run.show());
    assert!(!repo.path().join("started").exists());
    // A valid file: exit 0.
    let good = Repo::with_workflow(
        "ok.yml",
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: echo ${{ github.sha }}\n",
    );
    let out = good.kiln().args(["validate", ".github/workflows/ok.yml"]).output().unwrap();
    crate::support::Run::from(out)
        .assert_code(0)
        .assert_stdout(&["ok      .github/workflows/ok.yml (1 jobs)"]);
}

#[test]
fn event_payload_ref_and_sha_win_over_local_git() {
    let wf = "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo \"ref=${{ github.ref }} name=${{ github.ref_name }} type=${{ github.ref_type }} sha=${{ github.sha }} env=$GITHUB_REF_NAME forge=${{ forge.ref_name }} forgejo=${{ forgejo.ref_type }}\"\n";
    let repo = Repo::with_workflow("tag.yml", wf);
    let event = repo.path().join("event.json");
    std::fs::write(
        &event,
        r#"{"ref": "refs/tags/v1.2.3", "after": "1234567890abcdef1234567890abcdef12345678"}"#,
    )
    .unwrap();
    repo.exec(&["-e", event.to_str().unwrap()]).assert_code(0).assert_stdout(&[
        "ref=refs/tags/v1.2.3 name=v1.2.3 type=tag sha=1234567890abcdef1234567890abcdef12345678 env=v1.2.3 forge=v1.2.3 forgejo=tag",
    ]);
    // Without a payload ref: local git.
    std::fs::write(&event, "{}").unwrap();
    repo.exec(&["-e", event.to_str().unwrap()]).assert_code(0).assert_no_stdout(&["v1.2.3"]);
}
