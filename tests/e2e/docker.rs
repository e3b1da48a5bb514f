//! `kiln exec` on the Docker backend (`kiln plugin docker`) against a real engine, with the
//! local test image `kiln-test/busybox:1` that `tests/docker/setup.sh` builds.
//!
//! Without a usable engine the tests print why and pass, unless `KILN_REQUIRE_DOCKER=1` (set
//! by `.ci/run`), which makes a missing engine a failure. Every test checks that nothing
//! labelled with its runner id (`dev.kiln.runner-id`) is left: containers, networks, volumes.

use std::process::Command;

use crate::support::{Repo, kiln_bin};

/// The test image.
pub(crate) const IMAGE: &str = "kiln-test/busybox:1";

/// Whether the engine and the test image are there; panics when they are not and
/// `KILN_REQUIRE_DOCKER=1`, else prints why the test is skipped.
pub(crate) fn docker_ready(test: &str) -> bool {
    let required = std::env::var("KILN_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let problem = match Command::new("docker").args(["image", "inspect", IMAGE]).output() {
        Err(e) => Some(format!("the docker client cannot run: {e}")),
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "docker cannot inspect {IMAGE} (run tests/docker/setup.sh): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    };
    match problem {
        None => true,
        Some(p) if required => panic!("{test}: KILN_REQUIRE_DOCKER=1 but {p}"),
        Some(p) => {
            println!("skipping {test}: {p}");
            false
        }
    }
}

/// Panics when any container, network or volume carries `dev.kiln.runner-id=<runner_id>`.
pub(crate) fn assert_nothing_left(runner_id: &str) {
    let filter = format!("label=dev.kiln.runner-id={runner_id}");
    for what in [
        vec!["ps", "-aq", "--filter", &filter],
        vec!["network", "ls", "-q", "--filter", &filter],
        vec!["volume", "ls", "-q", "--filter", &filter],
    ] {
        let out = Command::new("docker").args(&what).output().expect("running docker");
        assert!(out.status.success(), "docker {what:?} failed");
        let left = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(left.is_empty(), "docker {} left behind for runner {runner_id}: {left}", what[0]);
    }
}

/// The runner id `kiln exec` used in `repo`'s private state directory.
pub(crate) fn runner_id(repo: &Repo) -> String {
    let file = repo.state.path().join("kiln/runner-id");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
        .trim()
        .to_owned()
}

fn exec_on_docker(repo: &Repo) -> crate::support::Run {
    let plugin = format!("docker={} plugin docker", kiln_bin());
    repo.exec(&["-P", &format!("ubuntu-latest=docker://{IMAGE}"), "--plugin", &plugin])
}

const RUN_ONLY: &str = r#"
name: docker
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - id: one
        run: |
          test -x /bin/busybox && echo "in-busybox-image"
          echo "workspace=$PWD"
          echo "v=42" >> "$GITHUB_OUTPUT"
          echo "FOO=bar" >> "$GITHUB_ENV"
          mkdir -p "$RUNNER_TEMP/tools" && printf '#!/bin/sh\necho tool-ran\n' > "$RUNNER_TEMP/tools/kiln-tool"
          chmod +x "$RUNNER_TEMP/tools/kiln-tool" && echo "$RUNNER_TEMP/tools" >> "$GITHUB_PATH"
      - run: echo "got ${{ steps.one.outputs.v }} FOO=$FOO" && kiln-tool
      - run: exit 3
        continue-on-error: true
      - name: a step past its timeout is stopped with its background children
        run: |
          sleep 300 &
          echo $! > "$RUNNER_TEMP/bg.pid"
          sleep 300
        timeout-minutes: 0.05
        continue-on-error: true
      - run: |
          pid=$(cat "$RUNNER_TEMP/bg.pid")
          if kill -0 "$pid" 2>/dev/null; then echo "still-alive $pid"; exit 1; fi
          echo "tree-gone"
"#;

#[test]
fn run_only_workflow_runs_in_a_docker_image() {
    if !docker_ready("run_only_workflow_runs_in_a_docker_image") {
        return;
    }
    let repo = Repo::with_workflow("docker.yml", RUN_ONLY);
    let run = exec_on_docker(&repo);
    run.assert_code(0).assert_stdout(&[
        "in-busybox-image",
        "workspace=/github/workspace",
        "got 42 FOO=bar",
        "tool-ran",
        "tree-gone",
        "Workflow success",
    ]);
    assert_nothing_left(&runner_id(&repo));
}

const FAILING: &str = r#"
name: docker-failure
on: push
jobs:
  fail:
    runs-on: ubuntu-latest
    steps:
      - run: |
          sleep 300 &
          echo "leaving a background process"
      - run: echo "about to fail" && exit 7
      - run: echo "never-$((40 + 2))"
"#;

#[test]
fn a_failing_job_on_docker_fails_and_leaves_nothing() {
    if !docker_ready("a_failing_job_on_docker_fails_and_leaves_nothing") {
        return;
    }
    let repo = Repo::with_workflow("fail.yml", FAILING);
    let run = exec_on_docker(&repo);
    run.assert_code(1)
        .assert_stdout(&["leaving a background process", "about to fail"])
        .assert_no_stdout(&["never-42"]);
    assert_nothing_left(&runner_id(&repo));
}

#[test]
fn a_missing_image_is_a_clear_error() {
    if !docker_ready("a_missing_image_is_a_clear_error") {
        return;
    }
    let repo = Repo::with_workflow(
        "missing.yml",
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo hi\n",
    );
    let plugin = format!("docker={} plugin docker", kiln_bin());
    let run = repo.exec(&[
        "-P",
        "ubuntu-latest=docker://kiln-test/does-not-exist:0",
        "--plugin",
        &plugin,
    ]);
    assert_ne!(run.code, Some(0), "{}", run.show());
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("kiln-test/does-not-exist:0"), "the error names no image\n{}", run.show());
    assert_nothing_left(&runner_id(&repo));
}

const JOB_CONTAINER_AND_SERVICE: &str = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    container:
      image: kiln-test/busybox:1
      env:
        FROM_CONTAINER: yes-${{ github.event_name }}
    services:
      web:
        image: kiln-test/httpd:1
        ports: ["8080"]
    steps:
      - run: echo "service says $(wget -q -O- http://web:8080/)"
      - run: echo "published ${{ job.services.web.ports['8080'] }} container ${{ job.container.id }}"
      - run: echo "env $FROM_CONTAINER in $PWD"
"#;

#[test]
fn job_container_reaches_a_healthy_service_by_its_alias() {
    if !docker_ready("job_container_reaches_a_healthy_service_by_its_alias") {
        return;
    }
    let repo = Repo::with_workflow("svc.yml", JOB_CONTAINER_AND_SERVICE);
    let run = exec_on_docker(&repo);
    run.assert_code(0).assert_stdout(&[
        "starting service web (kiln-test/httpd:1)",
        "service says service-ok",
        "env yes-push in /github/workspace",
    ]);
    let published = run
        .stdout
        .lines()
        .find_map(|l| l.split("  published ").nth(1))
        .unwrap_or_default()
        .to_owned();
    let port = published.split_whitespace().next().unwrap_or("");
    assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "no published port: {}", run.show());
    assert_nothing_left(&runner_id(&repo));
}
