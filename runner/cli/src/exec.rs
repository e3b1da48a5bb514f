//! `kiln exec` and `kiln validate`: find and parse workflows, build the github context from the
//! local checkout, start the plugins (the embedded host plugin by default), run, and print.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use indexmap::IndexMap;
use kiln_runner::backends::{Backends, PluginSpec, embedded_host};
use kiln_runner::identity::Identity;
use kiln_runner::labels;
use kiln_runner::output::{ConsolePrinter, Outcome};
use kiln_runner::run::{RunOptions, run_workflow};
use kiln_runner::workflow::{self, Workflow};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::cli::{ExecArgs, ValidateArgs};

/// Workflow files under a path: the file itself, or the `*.yml`/`*.yaml` directly in a
/// directory, sorted.
fn workflow_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path)
        .with_context(|| format!("reading workflow directory {}", path.display()))?;
    for entry in entries {
        let p = entry?.path();
        if p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

fn load(path: &Path) -> anyhow::Result<Workflow> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The linter: the model, every expression and the semantic checks, all errors at once.
    workflow::check_workflow(&text, &path.display().to_string()).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", text.join("\n"))
    })
}

/// `kiln validate`: exit 0 when every file is valid, 2 when one is not (invalid input).
pub(crate) fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut out = std::io::stdout().lock();
    for path in &args.paths {
        for file in workflow_files(path)? {
            match load(&file) {
                Ok(wf) => writeln!(out, "ok      {} ({} jobs)", file.display(), wf.jobs.len())?,
                Err(e) => {
                    failed = true;
                    writeln!(out, "invalid {}\n{e:#}", file.display())?;
                }
            }
        }
    }
    Ok(if failed { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `owner/name` from a remote URL (`https://host/owner/name.git`, `git@host:owner/name`).
fn repo_from_url(url: &str) -> Option<String> {
    let url = url.trim_end_matches('/').trim_end_matches(".git");
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1.to_owned(),
        None => url.split_once(':')?.1.to_owned(),
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    (parts.len() >= 2).then(|| format!("{}/{}", parts[parts.len() - 2], parts[parts.len() - 1]))
}

fn parse_kv(
    items: &[String],
    what: &str,
    from_env: bool,
) -> anyhow::Result<IndexMap<String, String>> {
    let mut out = IndexMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_owned(), v.to_owned());
            }
            None if from_env && !item.is_empty() => {
                let v = std::env::var(item).with_context(|| {
                    format!("{what} {item}: no value given and ${item} is not set")
                })?;
                out.insert(item.clone(), v);
            }
            _ => bail!("{what} {item:?}: expected NAME=VALUE"),
        }
    }
    Ok(out)
}

fn github_context(
    root: &Path,
    wf: &Workflow,
    event_name: &str,
    event: Value,
    actor: Option<&str>,
) -> Map<String, Value> {
    // The git queries are independent processes: run them side by side.
    let [sha, branch, tag, remote, user] = std::thread::scope(|s| {
        let queries: [&[&str]; 5] = [
            &["rev-parse", "HEAD"],
            &["symbolic-ref", "--short", "-q", "HEAD"],
            &["describe", "--tags", "--exact-match", "HEAD"],
            &["remote", "get-url", "origin"],
            if actor.is_none() { &["config", "user.name"] } else { &[] },
        ];
        queries
            .map(|q| s.spawn(move || if q.is_empty() { None } else { git(root, q) }))
            .map(|h| h.join().ok().flatten())
    });
    let from_event = EventRefs::of(event_name, &event);
    let sha = from_event.sha.clone().or(sha).unwrap_or_else(|| "0".repeat(40));
    let git_ref = match (branch, tag) {
        (Some(b), _) => format!("refs/heads/{b}"),
        (None, Some(t)) => format!("refs/tags/{t}"),
        (None, None) => "refs/heads/main".to_owned(),
    };
    let r#ref = from_event.git_ref.clone().unwrap_or(git_ref);
    let (ref_name, ref_type) = ref_name_and_type(&r#ref);
    let repository = remote.as_deref().and_then(repo_from_url).unwrap_or_else(|| {
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("local/{name}")
    });
    let owner = repository.split('/').next().unwrap_or("").to_owned();
    let actor = actor.map(str::to_owned).or(user).unwrap_or_else(|| "kiln".into());
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let head_ref = from_event.head_ref.unwrap_or_default();
    let base_ref = from_event.base_ref.unwrap_or_default();
    let workflow_name = wf.name.clone().unwrap_or_else(|| wf.file.clone());
    let mut c = Map::new();
    for (k, v) in [
        ("event_name", json!(event_name)),
        ("event", event),
        ("repository", json!(repository)),
        ("repository_owner", json!(owner)),
        ("repositoryUrl", json!(format!("https://github.com/{repository}.git"))),
        ("sha", json!(sha)),
        ("ref", json!(r#ref)),
        ("ref_name", json!(ref_name)),
        ("ref_type", json!(ref_type)),
        ("ref_protected", json!(false)),
        ("head_ref", json!(head_ref)),
        ("base_ref", json!(base_ref)),
        ("actor", json!(actor)),
        ("triggering_actor", json!(actor)),
        ("run_id", json!(run_id.to_string())),
        ("run_number", json!("1")),
        ("run_attempt", json!("1")),
        ("retention_days", json!("0")),
        ("workflow", json!(workflow_name)),
        ("server_url", json!("https://github.com")),
        ("api_url", json!("https://api.github.com")),
        ("graphql_url", json!("https://api.github.com/graphql")),
        ("token", json!("")),
        ("secret_source", json!("None")),
        ("action_path", json!("")),
        ("action_ref", json!("")),
        ("action_repository", json!("")),
    ] {
        c.insert(k.into(), v);
    }
    c
}

/// What an event payload (`-e event.json`) says about the ref and commit, as act reads it;
/// `None` where the payload says nothing, and local git is asked instead.
#[derive(Debug, Default, PartialEq)]
struct EventRefs {
    git_ref: Option<String>,
    sha: Option<String>,
    head_ref: Option<String>,
    base_ref: Option<String>,
}

impl EventRefs {
    fn of(event_name: &str, event: &Value) -> EventRefs {
        let text = |p: &str| {
            event.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        let head_ref = text("/pull_request/head/ref");
        let base_ref = text("/pull_request/base/ref");
        let git_ref = match event_name {
            "pull_request_target" => base_ref.as_ref().map(|b| format!("refs/heads/{b}")),
            "pull_request" | "pull_request_review" | "pull_request_review_comment" => event
                .get("number")
                .or_else(|| event.pointer("/pull_request/number"))
                .and_then(Value::as_u64)
                .map(|n| format!("refs/pull/{n}/merge")),
            "deployment" | "deployment_status" => text("/deployment/ref"),
            "release" => text("/release/tag_name").map(|t| format!("refs/tags/{t}")),
            _ => None,
        }
        .or_else(|| text("/ref"))
        .or_else(|| text("/repository/default_branch").map(|b| format!("refs/heads/{b}")));
        // A short `ref` (`v1.2.3`, `main`), as some hand-written payloads have it.
        let git_ref = git_ref.map(|r| match (r.starts_with("refs/"), event.get("ref_type")) {
            (false, Some(Value::String(t))) if t == "tag" => format!("refs/tags/{r}"),
            (false, _) => format!("refs/heads/{r}"),
            (true, _) => r,
        });
        let zero = |s: &String| s.bytes().all(|b| b == b'0');
        let sha = match event_name {
            "pull_request_target" => text("/pull_request/base/sha"),
            "deployment" | "deployment_status" => text("/deployment/sha"),
            "pull_request" | "pull_request_review" | "pull_request_review_comment" => None,
            _ => text("/after").filter(|s| !zero(s)),
        };
        EventRefs { git_ref, sha, head_ref, base_ref }
    }
}

/// `github.ref_name` and `github.ref_type` of a full ref.
fn ref_name_and_type(r: &str) -> (String, &'static str) {
    if let Some(t) = r.strip_prefix("refs/tags/") {
        (t.to_owned(), "tag")
    } else if let Some(b) = r.strip_prefix("refs/heads/") {
        (b.to_owned(), "branch")
    } else {
        (
            r.strip_prefix("refs/pull/")
                .or_else(|| r.strip_prefix("refs/"))
                .unwrap_or(r)
                .to_owned(),
            "branch",
        )
    }
}

/// The inputs of a workflow_dispatch / workflow_call run: declared defaults, overridden by the
/// event's `inputs`, then by `--input`; typed by their declaration (`inputs` is typed, unlike
/// `github.event.inputs`).
fn inputs(
    wf: &Workflow,
    event_name: &str,
    given: &IndexMap<String, String>,
    event: &Value,
) -> Map<String, Value> {
    let decl = wf.on.as_ref().and_then(|on| on.events.get(event_name));
    let typed = |name: &str, v: &Value| -> Value {
        let s = match v {
            Value::String(s) => s.clone(),
            other => return other.clone(),
        };
        match decl.and_then(|d| d.inputs.get(name)).map(|i| &i.type_) {
            Some(workflow::InputType::Boolean) => json!(s == "true"),
            Some(workflow::InputType::Number) => {
                s.parse::<f64>().map(|n| json!(n)).unwrap_or(json!(s))
            }
            _ => json!(s),
        }
    };
    let mut out = Map::new();
    if let Some(d) = decl {
        for (name, input) in &d.inputs {
            if let Some(default) = &input.default {
                out.insert(name.clone(), typed(name, default));
            }
        }
    }
    if let Some(Value::Object(ev_inputs)) = event.get("inputs") {
        for (k, v) in ev_inputs {
            out.insert(k.clone(), typed(k, v));
        }
    }
    for (name, v) in given {
        out.insert(name.clone(), typed(name, &json!(v)));
    }
    out
}

fn listens_to(wf: &Workflow, event: &str) -> bool {
    wf.on.as_ref().is_some_and(|on| on.events.contains_key(event))
}

/// `kiln exec`.
pub(crate) async fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let root = match &args.directory {
        Some(d) => d.clone(),
        None => git(&cwd, &["rev-parse", "--show-toplevel"])
            .map(PathBuf::from)
            .unwrap_or_else(|| cwd.clone()),
    };
    let wf_path = match &args.workflows {
        Some(p) => p.clone(),
        None => [".forgejo/workflows", ".gitea/workflows", ".github/workflows"]
            .iter()
            .map(|d| root.join(d))
            .find(|d| d.is_dir())
            .with_context(|| {
                format!(
                    "no workflows found: {} has no .forgejo/workflows or .github/workflows; pass \
                     one with -W path/to/workflow.yml",
                    root.display()
                )
            })?,
    };
    let files = workflow_files(&wf_path)?;
    if files.is_empty() {
        bail!("no *.yml or *.yaml workflow files in {}", wf_path.display());
    }
    let mut workflows = Vec::new();
    for f in &files {
        workflows.push(load(f)?);
    }

    if args.list || args.graph {
        print_plan(&workflows, args.graph)?;
        return Ok(ExitCode::SUCCESS);
    }

    let single_file = wf_path.is_file();
    let selected: Vec<Workflow> = workflows
        .into_iter()
        .filter(|wf| {
            let jobs_match =
                args.job.is_empty() || args.job.iter().any(|j| wf.jobs.contains_key(j));
            jobs_match && (listens_to(wf, &args.event) || (single_file && !args.job.is_empty()))
        })
        .collect();
    if selected.is_empty() {
        if !args.job.is_empty() {
            bail!(
                "no workflow triggered by {:?} has job {:?} (see kiln exec --list)",
                args.event,
                args.job
            );
        }
        bail!(
            "no workflow in {} is triggered by the event {:?}; pass the event as the first argument, \
             e.g. kiln exec workflow_dispatch",
            wf_path.display(),
            args.event
        );
    }

    let event = match &args.event_path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading event file {}", p.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{}: not valid JSON", p.display()))?
        }
        None => json!({}),
    };
    let secrets = parse_kv(&args.secrets, "--secret", true)?;
    let vars = parse_kv(&args.vars, "--var", false)?;
    let extra_env = parse_kv(&args.env, "--env", false)?;
    let given_inputs = parse_kv(&args.inputs, "--input", false)?;
    // --input values also appear in github.event.inputs (as strings), as on GitHub.
    let mut event = event;
    if !given_inputs.is_empty()
        && let Value::Object(ev) = &mut event
    {
        let entry = ev.entry("inputs").or_insert_with(|| json!({}));
        if let Value::Object(ev_inputs) = entry {
            for (k, v) in &given_inputs {
                ev_inputs.insert(k.clone(), json!(v));
            }
        }
    }
    let mut label_configs = Vec::new();
    for p in &args.platforms {
        label_configs.push(labels::parse_platform(p)?);
    }
    let matrix_filter = args
        .matrix
        .iter()
        .map(|m| {
            m.split_once(':')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--matrix {m:?}: expected KEY:VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut source = kiln_runner::actions::ActionSource::new(
        args.action_cache_dir
            .clone()
            .unwrap_or_else(|| kiln_runner::identity::state_dir().join("actions")),
    );
    source.base_url = args.actions_url.trim_end_matches('/').to_owned();
    source.offline = args.action_offline_mode;
    for o in &args.local_repositories {
        let (name, dir) = kiln_runner::actions::ActionSource::parse_override(o)
            .map_err(|e| anyhow::anyhow!("--local-repository: {e}"))?;
        let dir = std::fs::canonicalize(&dir)
            .with_context(|| format!("--local-repository {o:?}: {}", dir.display()))?;
        source.overrides.push((name, dir));
    }
    let actions = Arc::new(kiln_runner::actions::Resolver::new(source));

    // Plugins: the embedded host plugin, plus what the command line names.
    let mut specs = BTreeMap::new();
    specs.insert("host".to_owned(), embedded_host()?);
    for p in &args.plugins {
        let (name, command) =
            p.split_once('=').with_context(|| format!("--plugin {p:?}: expected NAME=COMMAND"))?;
        let command: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        specs.insert(name.to_owned(), PluginSpec::Managed { command, env: BTreeMap::new() });
    }
    for p in &args.plugin_endpoints {
        let (name, endpoint) = p
            .split_once('=')
            .with_context(|| format!("--plugin-endpoint {p:?}: expected NAME=ENDPOINT"))?;
        let endpoint =
            kiln_plugin_sdk::client::Endpoint::parse(endpoint, None, args.insecure_plugins)
                .map_err(|e| anyhow::anyhow!("--plugin-endpoint {name}: {e}"))?;
        specs.insert(name.to_owned(), PluginSpec::Standalone { endpoint });
    }
    // docker://IMAGE needs no --plugin: kiln serves its docker plugin itself.
    if !specs.contains_key("docker") && label_configs.iter().any(|l| l.backend == "docker") {
        specs.insert("docker".to_owned(), kiln_runner::backends::embedded_plugin("docker")?);
    }
    // lxc://DISTRO:RELEASE needs no --plugin either.
    if !specs.contains_key("lxc") && label_configs.iter().any(|l| l.backend == "lxc") {
        specs.insert("lxc".to_owned(), kiln_runner::backends::embedded_plugin("lxc")?);
    }
    for l in &label_configs {
        if l.backend != labels::SKIP && !specs.contains_key(&l.backend) {
            bail!(
                "-P {}: backend {:?} is not configured; start it with --plugin {}=COMMAND or \
                 --plugin-endpoint {}=unix:///path.sock",
                l.name,
                l.backend,
                l.backend,
                l.backend
            );
        }
    }
    let docker = specs.contains_key("docker");
    crate::wire_delegation(&mut specs)?;
    let identity = Identity::for_exec();
    let backends = Arc::new(Backends::start(specs, &identity).await?);
    backends.check_labels(&label_configs)?;
    // What an earlier, killed kiln exec left behind, and what expired, goes first.
    let removed = backends.collect_garbage(&identity).await;
    if removed > 0 {
        tracing::info!(removed, "removed leftover environments of an earlier run");
    }

    let cancel = CancellationToken::new();
    let force = CancellationToken::new();
    // First Ctrl-C or SIGTERM: cancel (running steps are stopped, `always()` steps and cleanup
    // run). Second: force (stop everything). Third: exit now.
    let signals = crate::signals::watch(
        cancel.clone(),
        force.clone(),
        crate::signals::Messages {
            first: "interrupted: cancelling the run (press Ctrl-C again to force)",
            second: "interrupted again: stopping everything",
        },
    );

    // The job services: the cache server and the artifact server, for every job of this exec.
    let state = kiln_runner::identity::state_dir();
    let bind = std::net::SocketAddr::new(
        args.cache_server_addr.unwrap_or_else(|| crate::services::default_bind(docker)),
        args.cache_server_port,
    );
    let (services, services_url) = crate::services::start(crate::services::Embedded {
        bind,
        cache_dir: (!args.no_cache_server)
            .then(|| args.cache_server_path.clone().unwrap_or_else(|| state.join("cache"))),
        artifact_dir: Some(
            args.artifact_server_path.clone().unwrap_or_else(|| state.join("artifacts")),
        ),
        secret: None,
    })
    .await?;
    let cache_mode = args.cache_mode.as_deref().and_then(kiln_services::token::CacheMode::parse);
    let hook = crate::services::hook_for(&services, &services_url, services.signer(), cache_mode);

    let printer = Arc::new(ConsolePrinter::new(args.debug));
    let started = Instant::now();
    let mut overall = Outcome::Success;
    for wf in selected {
        let wf = Arc::new(wf);
        let opts = RunOptions {
            github: github_context(&root, &wf, &args.event, event.clone(), args.actor.as_deref()),
            inputs: inputs(&wf, &args.event, &given_inputs, &event),
            workflow: wf.clone(),
            secrets: secrets.clone(),
            vars: vars.clone(),
            extra_env: extra_env.clone(),
            labels: label_configs.clone(),
            default_backend: Some("host".into()),
            only_jobs: (!args.job.is_empty()).then(|| args.job.clone()),
            workspace: Some(root.clone()),
            identity: identity.clone(),
            max_job_time: None,
            act_compat: !args.no_act_env,
            matrix_filter: matrix_filter.clone(),
            skip_local_checkout: true,
            external_needs: Map::new(),
            actions: actions.clone(),
            job_env: vec![hook.clone()],
        };
        let run_id = opts.github.get("run_id").and_then(Value::as_str).unwrap_or("0").to_owned();
        let result =
            run_workflow(opts, backends.clone(), printer.clone(), cancel.clone(), force.clone())
                .await;
        overall = match (overall, result.result) {
            (Outcome::Cancelled, _) | (_, Outcome::Cancelled) => Outcome::Cancelled,
            (Outcome::Failure, _) | (_, Outcome::Failure) => Outcome::Failure,
            _ => Outcome::Success,
        };
        if let Some(art) = services.artifacts() {
            let list = art.list_run(&run_id);
            if !list.is_empty() {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "Artifacts of run {run_id}:");
                for a in list {
                    let _ = writeln!(
                        out,
                        "  {} ({}, {} bytes): {}",
                        a.name,
                        a.job,
                        a.size,
                        a.path.display()
                    );
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    signals.abort();
    services.stop().await;
    printer.summary(overall, started.elapsed());
    if let Ok(b) = Arc::try_unwrap(backends) {
        b.shutdown().await;
    }
    Ok(match overall {
        Outcome::Success | Outcome::Skipped => ExitCode::SUCCESS,
        Outcome::Failure => ExitCode::FAILURE,
        Outcome::Cancelled => ExitCode::from(130),
    })
}

fn print_plan(workflows: &[Workflow], graph: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if !graph {
        writeln!(
            out,
            "{:<6} {:<30} {:<30} {:<40} Events",
            "Stage", "Job ID", "Job name", "Workflow file"
        )?;
    }
    for wf in workflows {
        let stages = workflow::needs_order(wf).map_err(|e| anyhow::anyhow!("{e}"))?;
        let events: Vec<&str> = wf
            .on
            .as_ref()
            .map(|o| o.events.keys().map(String::as_str).collect())
            .unwrap_or_default();
        if graph {
            writeln!(out, "{} ({})", wf.name.as_deref().unwrap_or(&wf.file), wf.file)?;
            for (i, stage) in stages.iter().enumerate() {
                let mut parts = Vec::new();
                for id in stage {
                    let needs = &wf.jobs[id.as_str()].needs;
                    if needs.is_empty() {
                        parts.push(id.clone());
                    } else {
                        parts.push(format!("{id} <- [{}]", needs.join(", ")));
                    }
                }
                writeln!(out, "  {}{}", if i == 0 { "" } else { "↓ " }, parts.join("   "))?;
            }
            continue;
        }
        for (i, stage) in stages.iter().enumerate() {
            for id in stage {
                let name = wf.jobs[id.as_str()].name.clone().unwrap_or_else(|| id.clone());
                writeln!(
                    out,
                    "{:<6} {:<30} {:<30} {:<40} {}",
                    i,
                    id,
                    name,
                    wf.file,
                    events.join(",")
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use serde_json::json;

    use super::{EventRefs, ref_name_and_type};

    fn check(event_name: &str, event: serde_json::Value, expect: Expect) {
        let r = EventRefs::of(event_name, &event);
        let (name, kind) = r.git_ref.as_deref().map(ref_name_and_type).unzip();
        expect.assert_eq(&format!(
            "ref={:?} ref_name={:?} ref_type={:?} sha={:?} head_ref={:?} base_ref={:?}\n",
            r.git_ref, name, kind, r.sha, r.head_ref, r.base_ref
        ));
    }

    #[test]
    fn refs_come_from_the_payload_when_it_has_them() {
        check(
            "push",
            json!({}),
            expect![[r#"
            ref=None ref_name=None ref_type=None sha=None head_ref=None base_ref=None
        "#]],
        );
        check(
            "push",
            json!({"ref": "refs/tags/v1.2.3"}),
            expect![[r#"
            ref=Some("refs/tags/v1.2.3") ref_name=Some("v1.2.3") ref_type=Some("tag") sha=None head_ref=None base_ref=None
        "#]],
        );
        check(
            "push",
            json!({"ref": "refs/heads/feature/x", "after": "abc123", "before": "0"}),
            expect![[r#"
            ref=Some("refs/heads/feature/x") ref_name=Some("feature/x") ref_type=Some("branch") sha=Some("abc123") head_ref=None base_ref=None
        "#]],
        );
        // A branch deletion: `after` is all zeros, so the sha comes from git.
        check(
            "push",
            json!({"ref": "refs/heads/gone", "after": "0000000000000000000000000000000000000000"}),
            expect![[r#"
            ref=Some("refs/heads/gone") ref_name=Some("gone") ref_type=Some("branch") sha=None head_ref=None base_ref=None
        "#]],
        );
        check(
            "create",
            json!({"ref": "v2", "ref_type": "tag"}),
            expect![[r#"
            ref=Some("refs/tags/v2") ref_name=Some("v2") ref_type=Some("tag") sha=None head_ref=None base_ref=None
        "#]],
        );
        check(
            "pull_request",
            json!({"number": 7, "pull_request": {"head": {"ref": "fix", "sha": "h1"}, "base": {"ref": "main", "sha": "b1"}}}),
            expect![[r#"
            ref=Some("refs/pull/7/merge") ref_name=Some("7/merge") ref_type=Some("branch") sha=None head_ref=Some("fix") base_ref=Some("main")
        "#]],
        );
        check(
            "pull_request_target",
            json!({"number": 7, "pull_request": {"head": {"ref": "fix", "sha": "h1"}, "base": {"ref": "main", "sha": "b1"}}}),
            expect![[r#"
            ref=Some("refs/heads/main") ref_name=Some("main") ref_type=Some("branch") sha=Some("b1") head_ref=Some("fix") base_ref=Some("main")
        "#]],
        );
        check(
            "release",
            json!({"release": {"tag_name": "v3.0.0"}}),
            expect![[r#"
            ref=Some("refs/tags/v3.0.0") ref_name=Some("v3.0.0") ref_type=Some("tag") sha=None head_ref=None base_ref=None
        "#]],
        );
        check(
            "deployment",
            json!({"deployment": {"ref": "refs/heads/prod", "sha": "d1"}}),
            expect![[r#"
            ref=Some("refs/heads/prod") ref_name=Some("prod") ref_type=Some("branch") sha=Some("d1") head_ref=None base_ref=None
        "#]],
        );
        check(
            "issues",
            json!({"repository": {"default_branch": "trunk"}}),
            expect![[r#"
            ref=Some("refs/heads/trunk") ref_name=Some("trunk") ref_type=Some("branch") sha=None head_ref=None base_ref=None
        "#]],
        );
    }
}
