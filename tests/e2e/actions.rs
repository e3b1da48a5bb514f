//! Actions and reusable workflows end to end: remote actions fetched by `owner/repo@ref` from a
//! real local git server (`git daemon`), then served from the cache in offline mode; a node
//! action with `pre` and `post`; composite actions with outputs nested two deep; reusable
//! workflows (local and remote) with inputs, secrets and outputs; clear errors naming the
//! action, the ref and the URL.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::{Repo, wait_for};

/// A `git daemon` serving the repositories under a temporary directory on a free local port.
pub(crate) struct GitServer {
    root: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl GitServer {
    pub(crate) fn start() -> GitServer {
        let root = tempfile::tempdir().unwrap();
        let mut server = GitServer { root, port: 0, child: None };
        server.restart();
        server
    }

    /// Starts the daemon again, on the same port once it had one (the same URL, so the same
    /// cache entries).
    fn restart(&mut self) {
        let port = match self.port {
            0 => TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
            port => port,
        };
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", self.root.path().display()))
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon (Debian's git package ships it)");
        self.port = port;
        self.child = Some(child);
        assert!(
            wait_for(10, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "git daemon did not listen on {port}"
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("git://127.0.0.1:{}", self.port)
    }

    /// Creates (or updates) repository `owner/name` with `files` and tags the commit `tag`;
    /// returns the commit's SHA.
    pub(crate) fn publish(&self, repo: &str, files: &[(&str, &str)], tag: &str) -> String {
        let dir = self.root.path().join(repo);
        std::fs::create_dir_all(&dir).unwrap();
        if !dir.join(".git").exists() {
            git(&dir, &["init", "-q", "-b", "main"]);
        }
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        git(&dir, &["add", "-A"]);
        git(&dir, &["-c", "user.name=e2e", "-c", "user.email=e2e@localhost", "commit", "-qm", tag]);
        git(&dir, &["tag", "-f", tag]);
        let out =
            Command::new("git").current_dir(&dir).args(["rev-parse", "HEAD"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "git {args:?} in {}", dir.display());
}

fn write(repo: &Repo, path: &str, text: &str) {
    let p = repo.path().join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

const NODE_ACTION_YML: &str = r#"
name: greet
inputs:
  who:
    description: whom to greet
    default: world
outputs:
  greeting:
    description: the greeting
runs:
  using: node20
  pre: pre.js
  main: main.js
  post: post.js
"#;

const PRE_JS: &str = r#"
const fs = require('fs');
console.log(`pre ran for ${process.env.INPUT_WHO}`);
fs.appendFileSync(process.env.GITHUB_STATE, 'phase=from-pre\n');
"#;

const MAIN_JS: &str = r#"
const fs = require('fs');
const who = process.env.INPUT_WHO;
console.log(`main: hello ${who}; state ${process.env.STATE_phase}; path ${process.env.GITHUB_ACTION_PATH ? 'set' : 'unset'}`);
fs.appendFileSync(process.env.GITHUB_OUTPUT, `greeting=hello-${who}\n`);
fs.appendFileSync(process.env.GITHUB_STATE, 'main=done\n');
"#;

const POST_JS: &str = r#"
console.log(`post: state ${process.env.STATE_phase}/${process.env.STATE_main}`);
"#;

/// The files of the node action `acme/greet`.
const GREET: &[(&str, &str)] = &[
    ("action.yml", NODE_ACTION_YML),
    ("pre.js", PRE_JS),
    ("main.js", MAIN_JS),
    ("post.js", POST_JS),
];

const USES_GREET: &str = r#"
name: remote
on: push
jobs:
  greet:
    runs-on: ubuntu-latest
    steps:
      - run: echo "first step"
      - id: g
        uses: acme/greet@v1
        with:
          who: kiln
      - run: echo "got ${{ steps.g.outputs.greeting }}"
"#;

#[test]
fn remote_node_action_with_pre_and_post_then_offline_from_the_cache() {
    let mut server = GitServer::start();
    server.publish("acme/greet", GREET, "v1");
    let repo = Repo::with_workflow("remote.yml", USES_GREET);
    let url = server.url();
    let run = repo.exec(&["--actions-url", &url]);
    run.assert_code(0).assert_stdout(&[
        "pre ran for kiln",
        "main: hello kiln; state from-pre; path set",
        "got hello-kiln",
        "post: state from-pre/done",
    ]);
    // pre runs before the first step, post after the last.
    let pre = run.stdout.find("pre ran for kiln").unwrap();
    let first = run.stdout.find("first step").unwrap();
    let got = run.stdout.find("got hello-kiln").unwrap();
    let post = run.stdout.find("post: state").unwrap();
    assert!(pre < first && got < post, "order of pre/main/post\n{}", run.show());

    // The server goes away: offline mode runs the action from the cache.
    server.stop();
    repo.exec(&["--actions-url", &url, "--action-offline-mode"])
        .assert_code(0)
        .assert_stdout(&["main: hello kiln; state from-pre", "got hello-kiln"]);
    // Online with the server gone, a mutable ref falls back to the cached copy too.
    repo.exec(&["--actions-url", &url]).assert_code(0).assert_stdout(&["got hello-kiln"]);

    // The tag moves on the restarted server (same URL): an online run fetches the mutable ref
    // again and sees it (the cache entry is refreshed).
    server.restart();
    server.publish(
        "acme/greet",
        &[("main.js", "console.log('main v2'); require('fs').appendFileSync(process.env.GITHUB_OUTPUT, 'greeting=v2\\n');")],
        "v1",
    );
    assert_eq!(server.url(), url);
    repo.exec(&["--actions-url", &url]).assert_code(0).assert_stdout(&["main v2", "got v2"]);
}

#[test]
fn missing_remote_actions_fail_the_job_before_any_step_naming_action_ref_and_url() {
    let server = GitServer::start();
    server.publish("acme/greet", &[("action.yml", NODE_ACTION_YML)], "v1");
    let wf = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: echo "must not run"
      - uses: acme/greet@v7
"#;
    let repo = Repo::with_workflow("w.yml", wf);
    let url = server.url();
    let run = repo.exec(&["--actions-url", &url]);
    run.assert_code(1)
        .assert_stdout(&["acme/greet@v7", "\"v7\"", &format!("{url}/acme/greet")])
        .assert_no_stdout(&["must not run"]);

    // Offline, and never fetched: says so, and names the cache.
    let wf2 = wf.replace("@v7", "@v1");
    let repo = Repo::with_workflow("w.yml", &wf2);
    repo.exec(&["--actions-url", &url, "--action-offline-mode"]).assert_code(1).assert_stdout(&[
        "acme/greet@v1",
        "offline mode is on",
        "action cache",
    ]);

    // A reference without a ref is bad input, reported before anything runs.
    let repo = Repo::with_workflow("w.yml", &wf.replace("acme/greet@v7", "acme/greet"));
    let run = repo.exec(&["--actions-url", &url]);
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(run.stderr.contains("acme/greet"), "{}", run.show());
}

#[test]
fn local_repository_overrides_replace_a_remote_action() {
    let repo = Repo::with_workflow("remote.yml", USES_GREET);
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in GREET {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let over = format!("acme/greet@v1={}", dir.path().display());
    // No server at all: the override is used, nothing is fetched.
    repo.exec(&["--actions-url", "git://127.0.0.1:1", "--local-repository", &over])
        .assert_code(0)
        .assert_stdout(&["got hello-kiln", "post: state from-pre/done"]);
}

#[test]
fn composite_actions_nested_two_deep_pass_outputs_up() {
    let wf = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - id: outer
        uses: ./actions/outer
        with:
          word: deep
      - run: echo "outer said ${{ steps.outer.outputs.result }}"
      - run: test "${{ steps.outer.outputs.result }}" = "outer(inner(deep))"
"#;
    let repo = Repo::with_workflow("w.yml", wf);
    write(
        &repo,
        "actions/outer/action.yml",
        r#"
name: outer
inputs:
  word: { required: true }
outputs:
  result:
    value: outer(${{ steps.in.outputs.result }})
runs:
  using: composite
  steps:
    - id: in
      uses: ./actions/inner
      with:
        word: ${{ inputs.word }}
    - run: echo "outer saw ${{ steps.in.outputs.result }}"
      shell: bash
"#,
    );
    write(
        &repo,
        "actions/inner/action.yml",
        r#"
name: inner
inputs:
  word: { required: true }
outputs:
  result:
    value: ${{ steps.make.outputs.v }}
runs:
  using: composite
  steps:
    - id: make
      run: echo "v=inner(${{ inputs.word }})" >> "$GITHUB_OUTPUT"
      shell: bash
"#,
    );
    repo.exec(&[]).assert_code(0).assert_stdout(&[
        "outer saw inner(deep)",
        "outer said outer(inner(deep))",
        "Workflow success",
    ]);
}

pub(crate) const CALLED: &str = r#"
name: called
on:
  workflow_call:
    inputs:
      name: { type: string, required: true }
      loud: { type: boolean, default: false }
      count: { type: number, default: 2 }
    secrets:
      token: { required: true }
    outputs:
      shout:
        value: ${{ jobs.work.outputs.shout }}
      result:
        value: ${{ jobs.work.result }}
jobs:
  work:
    runs-on: ubuntu-latest
    outputs:
      shout: ${{ steps.s.outputs.shout }}
    steps:
      - id: s
        run: |
          echo "called with ${{ inputs.name }} loud=${{ inputs.loud }} count=${{ inputs.count }} event=${{ github.event_name }}"
          echo "token is ${{ secrets.token }}"
          test "${{ secrets.token }}" = "s3cr3t-value"
          echo "shout=HELLO-${{ inputs.name }}" >> "$GITHUB_OUTPUT"
"#;

const CALLER: &str = r#"
name: caller
on: push
jobs:
  call:
    uses: ./.github/workflows/called.yml
    with:
      name: kiln
      loud: true
    secrets:
      token: ${{ secrets.TOKEN }}
  inherit:
    uses: ./.github/workflows/called.yml
    with:
      name: inherited
    secrets: inherit
  after:
    needs: [call, inherit]
    runs-on: ubuntu-latest
    steps:
      - run: echo "outputs ${{ needs.call.outputs.shout }} ${{ needs.call.outputs.result }} ${{ needs.inherit.outputs.shout }}"
"#;

#[test]
fn reusable_workflows_with_inputs_secrets_and_outputs() {
    let repo = Repo::with_workflow("caller.yml", CALLER);
    // `token` for the mapped call, `token` again for the inherited one (same name).
    write(&repo, ".github/workflows/called.yml", CALLED);
    let run = repo.exec(&[
        "-W",
        ".github/workflows/caller.yml",
        "--secret",
        "TOKEN=s3cr3t-value",
        "--secret",
        "token=s3cr3t-value",
    ]);
    run.assert_code(0)
        .assert_stdout(&[
            "[call / work]",
            "called with kiln loud=true count=2 event=push",
            "called with inherited loud=false count=2",
            "token is ***",
            "outputs HELLO-kiln success HELLO-inherited",
        ])
        .assert_no_stdout(&["s3cr3t-value"]);

    // A required secret not passed, and an undeclared input: clear errors naming them.
    let bad = CALLER.replace("      token: ${{ secrets.TOKEN }}\n", "      other: x\n");
    write(&repo, ".github/workflows/caller.yml", &bad);
    repo.exec(&["-W", ".github/workflows/caller.yml", "-j", "call"])
        .assert_code(1)
        .assert_stdout(&["required secret \"token\"", "called.yml"]);
    let bad = CALLER.replace("      loud: true\n", "      loud: true\n      nope: 1\n");
    write(&repo, ".github/workflows/caller.yml", &bad);
    repo.exec(&["-W", ".github/workflows/caller.yml", "-j", "call", "--secret", "TOKEN=x"])
        .assert_code(1)
        .assert_stdout(&["jobs.call.with.nope", "no input \"nope\""]);
}

#[test]
fn remote_reusable_workflow_from_a_git_server() {
    let server = GitServer::start();
    server.publish("acme/pipelines", &[(".github/workflows/called.yml", CALLED)], "v3");
    let wf = r#"
on: push
jobs:
  call:
    uses: acme/pipelines/.github/workflows/called.yml@v3
    with:
      name: remote
    secrets:
      token: s3cr3t-value
  show:
    needs: call
    runs-on: ubuntu-latest
    steps:
      - run: echo "remote said ${{ needs.call.outputs.shout }}"
"#;
    let repo = Repo::with_workflow("w.yml", wf);
    repo.exec(&["--actions-url", &server.url()])
        .assert_code(0)
        .assert_stdout(&["called with remote", "remote said HELLO-remote"]);
}

#[test]
fn remote_composite_and_dockerfile_actions_and_a_reusable_workflow_on_docker() {
    if !crate::docker::docker_ready(
        "remote_composite_and_dockerfile_actions_and_a_reusable_workflow_on_docker",
    ) {
        return;
    }
    let server = GitServer::start();
    server.publish(
        "acme/tools",
        &[
            (
                "say/action.yml",
                "name: say\ninputs:\n  text: { required: true }\noutputs:\n  said:\n    value: ${{ steps.s.outputs.said }}\nruns:\n  using: composite\n  steps:\n    - id: s\n      shell: sh\n      run: |\n        echo \"saying $TEXT from $GITHUB_ACTION_PATH\"\n        echo \"said=$TEXT\" >> \"$GITHUB_OUTPUT\"\n      env:\n        TEXT: ${{ inputs.text }}\n",
            ),
            (".github/workflows/called.yml", CALLED.replace("runs-on: ubuntu-latest", "runs-on: linux").as_str()),
            (
                "dock/action.yml",
                "name: dock\ninputs:\n  who: { required: true }\nruns:\n  using: docker\n  image: Dockerfile\n  args: [\"${{ inputs.who }}\"]\n",
            ),
            ("dock/Dockerfile", "FROM kiln-test/busybox:1\nCOPY entrypoint.sh /\nENTRYPOINT [\"sh\", \"/entrypoint.sh\"]\n"),
            (
                "dock/entrypoint.sh",
                "echo \"built from a remote Dockerfile: $1/$INPUT_WHO\"\necho \"v=docked-$1\" >> \"$GITHUB_OUTPUT\"\n",
            ),
        ],
        "v1",
    );
    let wf = r#"
on: push
jobs:
  j:
    runs-on: linux
    steps:
      - id: say
        uses: acme/tools/say@v1
        with:
          text: in-a-container
      - run: echo "composite said ${{ steps.say.outputs.said }}"
      - id: dock
        uses: acme/tools/dock@v1
        with:
          who: remote
      - run: echo "docker action said ${{ steps.dock.outputs.v }}"
  call:
    uses: acme/tools/.github/workflows/called.yml@v1
    with:
      name: docker
    secrets:
      token: s3cr3t-value
"#;
    let repo = Repo::with_workflow("w.yml", wf);
    let image = format!("linux=docker://{}", crate::docker::IMAGE);
    repo.exec(&["--actions-url", &server.url(), "-P", &image]).assert_code(0).assert_stdout(&[
        "saying in-a-container from /",
        "composite said in-a-container",
        "called with docker",
    ]);
    crate::docker::assert_nothing_left(&crate::docker::runner_id(&repo));
}

#[test]
fn reusable_workflows_nest_up_to_the_limit_then_fail_clearly() {
    // A workflow that calls itself: ten levels run, the eleventh is refused with a message.
    let wf = r#"
on: [push, workflow_call]
jobs:
  again:
    uses: ./.github/workflows/self.yml
"#;
    let repo = Repo::with_workflow("self.yml", wf);
    let run = repo.exec(&[]);
    run.assert_code(1).assert_stdout(&["nest deeper than 10 levels"]);
    let depth = run.stdout.lines().map(|l| l.matches("again / ").count()).max().unwrap_or(0);
    assert_eq!(depth, 9, "nested job names show the chain of callers\n{}", run.show());
}

#[test]
fn pre_and_post_of_a_node_action_inside_a_remote_composite_action() {
    let server = GitServer::start();
    server.publish("acme/greet", GREET, "v1");
    server.publish(
        "acme/wrap",
        &[(
            "action.yml",
            "name: wrap\ninputs:\n  who: { required: true }\noutputs:\n  greeting:\n    value: ${{ steps.g.outputs.greeting }}\nruns:\n  using: composite\n  steps:\n    - id: g\n      uses: acme/greet@v1\n      with:\n        who: wrapped-${{ inputs.who }}\n",
        )],
        "v1",
    );
    let wf = r#"
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: echo "first step"
      - id: w
        uses: acme/wrap@v1
        with:
          who: kiln
      - run: echo "wrapped said ${{ steps.w.outputs.greeting }}"
"#;
    let repo = Repo::with_workflow("w.yml", wf);
    let run = repo.exec(&["--actions-url", &server.url()]);
    run.assert_code(0).assert_stdout(&[
        "pre ran for wrapped-kiln",
        "main: hello wrapped-kiln; state from-pre",
        "wrapped said hello-wrapped-kiln",
        "post: state from-pre/done",
    ]);
    let pre = run.stdout.find("pre ran for").unwrap();
    let first = run.stdout.find("first step").unwrap();
    assert!(pre < first, "the nested pre runs before the job's first step\n{}", run.show());
}

#[test]
fn self_repository_uses_in_steps_and_jobs_run() {
    // `$/path`: this repository at this commit, for an action and for a reusable workflow.
    let wf = r#"
on: push
jobs:
  step:
    runs-on: ubuntu-latest
    steps:
      - id: a
        uses: $/.github/actions/hello
        with:
          who: self
      - run: test "${{ steps.a.outputs.said }}" = "hello self"
  call:
    uses: $/.github/workflows/called.yml
    with:
      name: self
    secrets:
      token: s3cr3t-value
"#;
    let repo = Repo::with_workflow("self.yml", wf);
    write(
        &repo,
        ".github/actions/hello/action.yml",
        r#"
name: hello
inputs:
  who: { required: true }
outputs:
  said:
    value: ${{ steps.s.outputs.said }}
runs:
  using: composite
  steps:
    - id: s
      run: echo "said=hello ${{ inputs.who }}" >> "$GITHUB_OUTPUT"; echo "action ran for ${{ inputs.who }}"
      shell: bash
"#,
    );
    write(&repo, ".github/workflows/called.yml", CALLED);
    repo.exec(&["-W", ".github/workflows/self.yml"]).assert_code(0).assert_stdout(&[
        "action ran for self",
        "called with self loud=false count=2",
        "Workflow success",
    ]);
}
