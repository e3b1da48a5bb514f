//! Protocol tier: negotiation, caller-chosen ids, idempotent create and remove, exec ids,
//! listing by owner, and every documented error code.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::backend::*;
use crate::error::Code;

use super::harness::*;

fn caps_request(versions: Vec<u32>) -> CapabilitiesRequest {
    CapabilitiesRequest {
        client_name: "kiln-conformance".to_owned(),
        client_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_versions: versions,
    }
}

/// Negotiates version 1; name, version and instance id are set; the instance id is stable.
pub(crate) async fn negotiate(ctx: &Ctx<'_>) -> Check {
    let b = ctx.backend();
    let caps = within("capabilities", RPC_TIMEOUT, b.capabilities(caps_request(vec![1])))
        .await?
        .or_fail("capabilities offering [1]")?;
    ensure!(
        caps.protocol_version == 1,
        "protocol_version is {}, expected 1",
        caps.protocol_version
    );
    ensure!(!caps.plugin_name.is_empty(), "plugin_name is empty");
    ensure!(!caps.plugin_version.is_empty(), "plugin_version is empty");
    ensure!(!caps.instance_id.is_empty(), "instance_id is empty");
    ensure!(
        caps.instance_id == ctx.caps.instance_id,
        "instance_id changed between two calls without a restart ({:?} then {:?})",
        ctx.caps.instance_id,
        caps.instance_id
    );
    ensure!(
        caps.environment.is_supported(),
        "the environment layer is unsupported: every backend must create environments"
    );
    for (name, layer) in [
        ("environment", &caps.environment),
        ("job_container", &caps.job_container),
        ("service_containers", &caps.service_containers),
        ("step_containers", &caps.step_containers),
    ] {
        if let LayerSupport::Delegated { backend } = layer {
            ensure!(!backend.is_empty(), "layer {name} is delegated but names no backend");
        }
    }
    ensure!(caps.max_message_bytes > 0, "max_message_bytes is 0");
    let both = within("capabilities", RPC_TIMEOUT, b.capabilities(caps_request(vec![999, 1])))
        .await?
        .or_fail("capabilities offering [999, 1]")?;
    ensure!(
        both.protocol_version == 1,
        "offered [999, 1], the plugin chose {} instead of 1",
        both.protocol_version
    );
    Ok(())
}

/// Offering only an unknown version fails FAILED_PRECONDITION naming both versions.
pub(crate) async fn version_mismatch(ctx: &Ctx<'_>) -> Check {
    let b = ctx.backend();
    let r = within("capabilities", RPC_TIMEOUT, b.capabilities(caps_request(vec![999]))).await?;
    let e = expect_code("capabilities offering only [999]", r, &[Code::FailedPrecondition])?;
    let numbers: Vec<&str> =
        e.message.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).collect();
    ensure!(
        numbers.contains(&"999") && numbers.contains(&"1"),
        "the version mismatch error must name both versions (999 and 1): {:?}",
        e.message
    );
    Ok(())
}

fn is_absolute(p: &str) -> bool {
    let b = p.as_bytes();
    p.starts_with('/')
        || (b.len() > 2
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && (b[2] == b'\\' || b[2] == b'/'))
}

/// Create returns the id, a primary container, absolute existing paths and the owner.
pub(crate) async fn create_environment(ctx: &Ctx<'_>) -> Check {
    let req = ctx.env_request();
    let env = ctx.create(req.clone()).await?;
    ensure!(
        env.id == req.environment_id,
        "the environment came back with id {:?}, requested {:?}",
        env.id,
        req.environment_id
    );
    let p = &env.paths;
    for (name, path, required) in [
        ("workspace", &p.workspace, true),
        ("temp", &p.temp, true),
        ("runner_files", &p.runner_files, true),
        ("tool_cache", &p.tool_cache, false),
        ("home", &p.home, false),
    ] {
        if path.is_empty() {
            ensure!(!required, "paths.{name} is empty");
            continue;
        }
        ensure!(is_absolute(path), "paths.{name} {path:?} is not absolute");
    }
    ensure!(p.workspace != p.temp, "paths.workspace and paths.temp are the same directory");
    ensure!(!env.path_variable.is_empty(), "path_variable is empty (expected e.g. \"PATH\")");
    ensure!(!env.path_separator.is_empty(), "path_separator is empty (expected e.g. \":\")");
    if !ctx.caps.os.is_empty() {
        ensure!(
            env.os == ctx.caps.os,
            "environment os {:?}, capabilities say {:?}",
            env.os,
            ctx.caps.os
        );
    }
    if !ctx.caps.arch.is_empty() {
        ensure!(
            env.arch == ctx.caps.arch,
            "environment arch {:?}, capabilities say {:?}",
            env.arch,
            ctx.caps.arch
        );
    }
    ensure!(
        env.owner.runner_id == req.owner.runner_id,
        "the environment's owner.runner_id is {:?}, requested {:?}",
        env.owner.runner_id,
        req.owner.runner_id
    );
    for (k, v) in &req.owner.labels {
        ensure!(
            env.owner.labels.get(k) == Some(v),
            "the environment's owner lacks label {k}={v} (labels {:?})",
            env.owner.labels
        );
    }
    for (name, path) in
        [("workspace", &p.workspace), ("temp", &p.temp), ("runner_files", &p.runner_files)]
    {
        let (status, _) =
            ctx.sh_status(&env, &format!("test -d {0} && test -w {0}", sq(path))).await?;
        ensure!(
            status == ExitStatus::Code(0),
            "paths.{name} {path:?} is not a writable directory inside the environment ({status})"
        );
    }
    Ok(())
}

/// Same id and spec returns the same environment; a different spec is ALREADY_EXISTS.
pub(crate) async fn replay(ctx: &Ctx<'_>) -> Check {
    let req = ctx.env_request();
    let first = ctx.create(req.clone()).await?;
    let again = ctx.create(req.clone()).await?;
    let same = |a: &Environment, b: &Environment| {
        a.id == b.id
            && a.primary_container_id == b.primary_container_id
            && a.paths == b.paths
            && a.os == b.os
            && a.arch == b.arch
    };
    ensure!(
        same(&first, &again),
        "replaying the same create returned another environment: {first:?} then {again:?}"
    );
    let mut other_label = req.clone();
    other_label.label = format!("{}-other", req.label);
    let r = ctx.try_create(other_label).await?;
    expect_code("create with the same id and another runs-on label", r, &[Code::AlreadyExists])?;
    let mut other_owner = req.clone();
    other_owner.owner.job_id = format!("{}-other", req.owner.job_id);
    let r = ctx.try_create(other_owner).await?;
    expect_code("create with the same id and another owner.job_id", r, &[Code::AlreadyExists])?;
    let third = ctx.create(req.clone()).await?;
    ensure!(
        same(&first, &third),
        "after refused conflicting creates, the original spec returned another environment: \
         {first:?} then {third:?}"
    );
    let listed = within(
        "list_environments",
        RPC_TIMEOUT,
        ctx.backend().list_environments(Selector {
            runner_id: ctx.config.namespace.clone(),
            labels: BTreeMap::new(),
        }),
    )
    .await?
    .or_fail("list_environments")?;
    let n = listed.iter().filter(|e| e.id == first.id).count();
    ensure!(n == 1, "environment {} is listed {n} times after replays, expected once", first.id);
    Ok(())
}

/// Invalid ids are INVALID_ARGUMENT; a 63-character id is fine.
pub(crate) async fn invalid_ids(ctx: &Ctx<'_>) -> Check {
    let long = "a".repeat(64);
    for bad in ["Bad_ID", "", long.as_str(), "-lead", "trail-", "dot.ted", "sp ace"] {
        let mut req = ctx.env_request();
        req.environment_id = bad.to_owned();
        let r = within(
            format!("create_environment {bad:?}"),
            CREATE_TIMEOUT,
            ctx.backend().create_environment(req),
        )
        .await?;
        if r.is_ok() {
            ctx.track(bad);
        }
        expect_code(format!("create_environment with id {bad:?}"), r, &[Code::InvalidArgument])?;
    }
    let base = ctx.new_id();
    let id63 = format!("{base}{}", "0".repeat(63 - base.len().min(63)));
    let mut req = ctx.env_request();
    req.environment_id = id63.clone();
    let env = ctx.create(req).await?;
    ensure!(env.id == id63, "63-character id came back as {:?}", env.id);
    for bad in ["Bad_ID", long.as_str()] {
        let mut req = ctx.sh_request(&env, "echo should-not-run");
        req.exec_id = bad.to_owned();
        let r = ctx.exec_error(req).await?;
        expect_code(format!("exec with exec_id {bad:?}"), r, &[Code::InvalidArgument])?;
    }
    Ok(())
}

/// The result of a CopyOut, whether the call or the stream carries the error.
pub(crate) async fn copy_out_all(
    ctx: &Ctx<'_>,
    source: CopyOutSource,
) -> Check<crate::Result<Vec<u8>>> {
    let what = format!("copy_out {}", source.path);
    let started = within(&what, RPC_TIMEOUT, ctx.backend().copy_out(source)).await?;
    match started {
        Err(e) => Ok(Err(e)),
        Ok(stream) => collect_bytes(&what, stream, Duration::from_secs(120)).await,
    }
}

fn tiny_tar() -> Check<Vec<u8>> {
    let mut t = TarBuilder::new();
    t.file("hello.txt", 0o644, b"hello\n")?;
    t.finish()
}

/// Unknown environments, containers and execs are NOT_FOUND.
pub(crate) async fn not_found(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let ghost_env = ctx.new_id();
    let ghost_container = ctx.new_id();
    let b = ctx.backend();

    let mut req = ctx.sh_request(&env, "echo should-not-run");
    req.environment_id = ghost_env.clone();
    let r = ctx.exec_error(req).await?;
    expect_code("exec in an unknown environment", r, &[Code::NotFound])?;

    let mut req = ctx.sh_request(&env, "echo should-not-run");
    req.container_id = ghost_container.clone();
    let r = ctx.exec_error(req).await?;
    expect_code("exec in an unknown container of a live environment", r, &[Code::NotFound])?;

    let target = |e: &str, c: &str| ContainerRef {
        environment_id: e.to_owned(),
        container_id: c.to_owned(),
    };
    let r =
        within("inspect", RPC_TIMEOUT, b.inspect(target(&ghost_env, &env.primary_container_id)))
            .await?;
    expect_code("inspect in an unknown environment", r, &[Code::NotFound])?;
    let r = within("inspect", RPC_TIMEOUT, b.inspect(target(&env.id, &ghost_container))).await?;
    expect_code("inspect of an unknown container", r, &[Code::NotFound])?;

    let source = |e: &str, c: &str, p: &str| CopyOutSource {
        environment_id: e.to_owned(),
        container_id: c.to_owned(),
        path: p.to_owned(),
    };
    let ws = env.paths.workspace.clone();
    let r = copy_out_all(ctx, source(&ghost_env, &env.primary_container_id, &ws)).await?;
    expect_code("copy_out from an unknown environment", r, &[Code::NotFound])?;
    let r = copy_out_all(ctx, source(&env.id, &ghost_container, &ws)).await?;
    expect_code("copy_out from an unknown container", r, &[Code::NotFound])?;
    let missing = join(&ws, &format!("kiln-missing-{}", nonce(6)));
    let r = copy_out_all(ctx, source(&env.id, &env.primary_container_id, &missing)).await?;
    expect_code("copy_out of a path that does not exist", r, &[Code::NotFound])?;

    for (what, e, c) in [
        (
            "copy_in into an unknown environment",
            ghost_env.as_str(),
            env.primary_container_id.as_str(),
        ),
        ("copy_in into an unknown container", env.id.as_str(), ghost_container.as_str()),
    ] {
        let target = CopyInTarget {
            environment_id: e.to_owned(),
            container_id: c.to_owned(),
            dest_path: join(&ws, "never"),
            local_path: None,
        };
        let r = within(what, RPC_TIMEOUT, b.copy_in(target, byte_stream(tiny_tar()?))).await?;
        expect_code(what, r, &[Code::NotFound])?;
    }

    let r = within(
        "signal_exec",
        RPC_TIMEOUT,
        b.signal_exec(SignalRequest {
            exec_id: ctx.exec_id(),
            signal: 15,
            grace: Duration::from_secs(1),
        }),
    )
    .await?;
    expect_code("signal_exec of an unknown exec", r, &[Code::NotFound])?;
    Ok(())
}

/// Remove twice, remove of a never-created id, and what a removed environment answers.
pub(crate) async fn remove_idempotent(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let first = ctx.remove(&env.id).await?.or_fail(format!("remove {}", env.id))?;
    ensure!(first, "the first remove of {} returned existed=false", env.id);
    let second = ctx.remove(&env.id).await?.or_fail(format!("second remove of {}", env.id))?;
    ensure!(!second, "the second remove of {} returned existed=true", env.id);
    ctx.untrack(&env.id);
    let ghost = ctx.new_id();
    let r = ctx.remove(&ghost).await?.or_fail(format!("remove of never-created {ghost}"))?;
    ensure!(!r, "removing the never-created {ghost} returned existed=true");

    let r = ctx.exec_error(ctx.sh_request(&env, "echo should-not-run")).await?;
    expect_code("exec in a removed environment", r, &[Code::NotFound])?;
    let r = within(
        "inspect",
        RPC_TIMEOUT,
        ctx.backend().inspect(ContainerRef {
            environment_id: env.id.clone(),
            container_id: env.primary_container_id.clone(),
        }),
    )
    .await?;
    expect_code("inspect in a removed environment", r, &[Code::NotFound])?;
    let listed =
        list(ctx, Selector { runner_id: ctx.config.namespace.clone(), labels: BTreeMap::new() })
            .await?;
    ensure!(
        !listed.iter().any(|e| e.id == env.id),
        "the removed environment {} is still listed",
        env.id
    );

    let live = ctx.env().await?;
    let ghost_container = ctx.new_id();
    let r = within(
        "remove container",
        RPC_TIMEOUT,
        ctx.backend().remove(RemoveRequest {
            environment_id: live.id.clone(),
            container_id: Some(ghost_container.clone()),
            grace: Duration::from_secs(1),
        }),
    )
    .await?
    .or_fail(format!(
        "remove of the never-created container {ghost_container} of a live environment"
    ))?;
    ensure!(!r, "removing the never-created container {ghost_container} returned existed=true");
    let still = ctx.sh_ok(&live, "echo alive").await?;
    ensure!(still == "alive\n", "the environment is not usable after removing a missing container");
    Ok(())
}

/// A used exec id is ALREADY_EXISTS, never a re-run, whether the first exec ended or runs.
pub(crate) async fn exec_id_reuse(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let marker = join(&env.paths.workspace, &format!("reuse-{}", nonce(6)));
    let req = ctx.sh_request(&env, &format!("printf x >> {}", sq(&marker)));
    let w = ctx.run(req.clone()).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "the first exec ended with {}", x.status);
    let r = ctx.exec_error(req.clone()).await?;
    expect_code("a second exec with a used (finished) exec_id", r, &[Code::AlreadyExists])?;

    let running = ctx.sh_request(&env, "echo ready; sleep 30");
    let mut w = ctx.start(running.clone()).await?;
    w.until_stdout("ready", Duration::from_secs(20)).await?;
    let mut reuse = ctx.sh_request(&env, &format!("printf y >> {}", sq(&marker)));
    reuse.exec_id = running.exec_id.clone();
    let r = ctx.exec_error(reuse).await?;
    let refused =
        expect_code("an exec reusing the id of a running exec", r, &[Code::AlreadyExists]);
    let _ = within(
        "signal_exec",
        RPC_TIMEOUT,
        ctx.backend().signal_exec(SignalRequest {
            exec_id: running.exec_id.clone(),
            signal: 9,
            grace: Duration::ZERO,
        }),
    )
    .await;
    w.finish(Duration::from_secs(10)).await?;
    refused?;
    let x = w.exited()?;
    ensure!(
        !x.status.success(),
        "the exec killed with SIGKILL reported {} (expected signal 9 or a non-zero code)",
        x.status
    );
    let content = ctx.sh_ok(&env, &format!("cat {}", sq(&marker))).await?;
    ensure!(
        content == "x",
        "the side effect file holds {content:?}, expected \"x\": a reused exec id ran again"
    );
    Ok(())
}

pub(crate) async fn list(ctx: &Ctx<'_>, selector: Selector) -> Check<Vec<EnvironmentSummary>> {
    let what = format!("list_environments {selector:?}");
    within(&what, RPC_TIMEOUT, ctx.backend().list_environments(selector)).await?.or_fail(&what)
}

/// A created environment is listed with its owner labels and disappears after remove.
pub(crate) async fn list_owner_labels(ctx: &Ctx<'_>) -> Check {
    let before = now_ms();
    let mut req = ctx.env_request();
    req.owner.labels.insert("kiln.case".to_owned(), "list".to_owned());
    let env = ctx.create(req.clone()).await?;
    let after = now_ms();
    let by_runner = Selector { runner_id: ctx.config.namespace.clone(), labels: BTreeMap::new() };
    let listed = list(ctx, by_runner.clone()).await?;
    let Some(found) = listed.iter().find(|e| e.id == env.id) else {
        fail!(
            "environment {} is not listed by runner id {} (listed: {:?})",
            env.id,
            ctx.config.namespace,
            listed.iter().map(|e| &e.id).collect::<Vec<_>>()
        );
    };
    let o = &found.owner;
    let want = &req.owner;
    ensure!(
        o.runner_id == want.runner_id,
        "listed runner_id {:?}, created with {:?}",
        o.runner_id,
        want.runner_id
    );
    ensure!(
        o.boot_id == want.boot_id,
        "listed boot_id {:?}, created with {:?}",
        o.boot_id,
        want.boot_id
    );
    ensure!(
        o.job_id == want.job_id,
        "listed job_id {:?}, created with {:?}",
        o.job_id,
        want.job_id
    );
    ensure!(
        o.expires_at_unix_ms == want.expires_at_unix_ms,
        "listed expires_at_unix_ms {}, created with {}",
        o.expires_at_unix_ms,
        want.expires_at_unix_ms
    );
    ensure!(
        o.parent_environment_id.is_empty(),
        "listed parent_environment_id {:?}, created with none",
        o.parent_environment_id
    );
    for (k, v) in &want.labels {
        ensure!(o.labels.get(k) == Some(v), "listed labels {:?} lack {k}={v}", o.labels);
    }
    let slack = 5 * 60 * 1000;
    ensure!(
        o.created_at_unix_ms >= before - slack && o.created_at_unix_ms <= after + slack,
        "listed created_at_unix_ms {} is not the creation time (between {before} and {after}, \
         5 minutes of clock skew allowed)",
        o.created_at_unix_ms
    );
    let removed = ctx.remove(&env.id).await?.or_fail(format!("remove {}", env.id))?;
    ensure!(removed, "remove of {} returned existed=false", env.id);
    ctx.untrack(&env.id);
    let listed = list(ctx, by_runner).await?;
    ensure!(
        !listed.iter().any(|e| e.id == env.id),
        "environment {} is still listed after remove",
        env.id
    );
    Ok(())
}

/// Selectors: runner id and labels narrow the list; all labels must match.
pub(crate) async fn list_selectors(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let ns = ctx.config.namespace.clone();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };
    let other_runner = format!("other-{}", ctx.nonce);
    let cases = [
        ("its runner id", Selector { runner_id: ns.clone(), labels: BTreeMap::new() }, true),
        (
            "its runner id and label",
            Selector { runner_id: ns.clone(), labels: labels(&[(LABEL, &ctx.nonce)]) },
            true,
        ),
        (
            "its label only",
            Selector { runner_id: String::new(), labels: labels(&[(LABEL, &ctx.nonce)]) },
            true,
        ),
        ("an empty selector (all)", Selector::default(), true),
        ("another runner id", Selector { runner_id: other_runner, labels: BTreeMap::new() }, false),
        (
            "its runner id and another label value",
            Selector { runner_id: ns.clone(), labels: labels(&[(LABEL, "other")]) },
            false,
        ),
        (
            "its label and a label it lacks",
            Selector {
                runner_id: String::new(),
                labels: labels(&[(LABEL, &ctx.nonce), ("kiln.absent", "x")]),
            },
            false,
        ),
    ];
    for (what, selector, expected) in cases {
        let listed = list(ctx, selector).await?;
        let found = listed.iter().any(|e| e.id == env.id);
        ensure!(
            found == expected,
            "a selector with {what} {} environment {}",
            if expected { "does not list" } else { "lists" },
            env.id
        );
    }
    Ok(())
}

/// Every container layer declared unsupported or delegated answers UNIMPLEMENTED (§3.3); with
/// delegated layers, they name one backend and environments carry that delegation (§3.5).
pub(crate) async fn unimplemented_layers(ctx: &Ctx<'_>) -> Check {
    let layers = [
        (ContainerKind::Job, &ctx.caps.job_container),
        (ContainerKind::Service, &ctx.caps.service_containers),
        (ContainerKind::Step, &ctx.caps.step_containers),
    ];
    let not_native: Vec<_> =
        layers.iter().filter(|l| *l.1 != LayerSupport::Native).map(|l| l.0).collect();
    if not_native.is_empty() {
        return Err(Stop::Skip("every container layer is native".to_owned()));
    }
    let env = ctx.env().await?;
    let delegates: BTreeSet<&str> = layers
        .iter()
        .filter_map(|l| match l.1 {
            LayerSupport::Delegated { backend } => Some(backend.as_str()),
            _ => None,
        })
        .collect();
    ensure!(
        delegates.len() <= 1,
        "delegated layers name different backends {delegates:?}; v1 allows one delegate"
    );
    if let Some(backend) = delegates.first() {
        let named = env.delegation.as_ref().map(|d| d.backend.as_str());
        ensure!(
            named == Some(*backend),
            "layers are delegated to {backend:?}, but the created environment's delegation \
             names {named:?}"
        );
    }
    for kind in not_native {
        let req = ContainerRequest {
            environment_id: env.id.clone(),
            container_id: ctx.new_id(),
            spec: ContainerSpec {
                image: ctx.config.container_image.clone().unwrap_or_else(|| "busybox".to_owned()),
                ..ContainerSpec::default()
            },
        };
        let what = format!(
            "create_container({kind}) on a backend declaring the {kind} layer unsupported or \
             delegated"
        );
        let r = within(&what, CREATE_TIMEOUT, ctx.backend().create_container(kind, req)).await?;
        expect_code(what, r, &[Code::Unimplemented])?;
    }
    Ok(())
}

/// WriteStdin answers UNIMPLEMENTED when the stdin feature is not declared.
pub(crate) async fn stdin_undeclared(ctx: &Ctx<'_>) -> Check {
    if ctx.caps.features.stdin {
        return Err(Stop::Skip("feature stdin declared (see semantics/exec/stdin)".to_owned()));
    }
    let r = within(
        "write_stdin",
        RPC_TIMEOUT,
        ctx.backend().write_stdin(ctx.exec_id(), byte_stream(b"x".to_vec())),
    )
    .await?;
    expect_code("write_stdin on a plugin not declaring stdin", r, &[Code::Unimplemented])?;
    Ok(())
}

/// Nothing created by the suite is left: listing by its namespace and its label is empty.
pub(crate) async fn nothing_left_behind(ctx: &Ctx<'_>) -> Check {
    let mut left =
        list(ctx, Selector { runner_id: ctx.config.namespace.clone(), labels: BTreeMap::new() })
            .await?;
    let by_label = list(
        ctx,
        Selector {
            runner_id: String::new(),
            labels: BTreeMap::from([(LABEL.to_owned(), ctx.nonce.clone())]),
        },
    )
    .await?;
    for e in by_label {
        if !left.iter().any(|l| l.id == e.id) {
            left.push(e);
        }
    }
    if left.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = left.iter().map(|e| e.id.clone()).collect();
    // Do not leak ourselves: remove what is left, then report it.
    for id in &ids {
        ctx.track(id);
    }
    fail!("left behind after every case removed what it created: {}", ids.join(", "))
}
