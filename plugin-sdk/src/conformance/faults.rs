//! Faults tier: the plugin process killed mid-exec and restarted (rules 1, 4, 9, 14), and a
//! managed plugin exiting when its stdin closes (rule 13). Needs a
//! [`super::PluginControl`]; skipped otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backend::*;
use crate::error::Code;

use super::harness::*;
use super::protocol::list;

async fn handshake(ctx: &Ctx<'_>) -> Check<Capabilities> {
    let request = CapabilitiesRequest {
        client_name: "kiln-conformance".to_owned(),
        client_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_versions: vec![PROTOCOL_VERSION],
    };
    within("capabilities", RPC_TIMEOUT, ctx.backend().capabilities(request))
        .await?
        .or_fail("capabilities")
}

/// Kill the plugin during an exec: the stream fails UNAVAILABLE (never an exit status), the
/// restarted plugin has a new instance id, and the environment survives and can be removed.
pub(crate) async fn killed_mid_exec(ctx: &Ctx<'_>) -> Check {
    let control = ctx.control()?;
    let before = handshake(ctx).await?;
    let env = ctx.env().await?;
    let mut w = ctx.start(ctx.sh_request(&env, "echo ready; sleep 30")).await?;
    w.until_stdout("ready", Duration::from_secs(20)).await?;
    within("killing the plugin", Duration::from_secs(20), control.kill())
        .await?
        .or_fail("killing the plugin")?;
    // Restart before judging, so a failure here does not take the later cases down too.
    let ended = w.finish(Duration::from_secs(10)).await;
    let restarted = within("restarting the plugin", Duration::from_secs(60), control.restart())
        .await?
        .or_fail("restarting the plugin")?;
    ctx.set_backend(restarted);
    ended?;
    if let Some(x) = &w.exited {
        fail!(
            "after the plugin was killed the exec stream reported {} (an exit status from a dead \
             plugin); it must fail UNAVAILABLE",
            x.status
        );
    }
    match &w.error {
        Some(e) if e.code == Code::Unavailable => {}
        Some(e) => fail!(
            "after the plugin was killed the exec stream failed with {}: {e}; expected UNAVAILABLE",
            code_name(e.code)
        ),
        None => fail!("after the plugin was killed the exec stream ended without an error"),
    }
    let after = handshake(ctx).await?;
    ensure!(
        after.instance_id != before.instance_id,
        "the restarted plugin reports the same instance_id {:?}",
        after.instance_id
    );
    let listed =
        list(ctx, Selector { runner_id: ctx.config.namespace.clone(), labels: BTreeMap::new() })
            .await?;
    ensure!(
        listed.iter().any(|e| e.id == env.id),
        "environment {} created before the restart is not listed after it: state that must \
         survive a restart lives in the resources, not in memory",
        env.id
    );
    let existed =
        ctx.remove(&env.id).await?.or_fail(format!("remove {} after the restart", env.id))?;
    ensure!(existed, "removing {} after the restart returned existed=false", env.id);
    ctx.untrack(&env.id);
    Ok(())
}

/// A managed plugin exits when its stdin closes; it is started again afterwards.
pub(crate) async fn stdin_eof_exit(ctx: &Ctx<'_>) -> Check {
    let control = ctx.control()?;
    let limit = Duration::from_secs(5);
    let exited =
        match within("closing the plugin's stdin", limit * 2, control.close_stdin(limit)).await? {
            Ok(exited) => exited,
            Err(e) if e.code == Code::Unimplemented => {
                return Err(Stop::Skip(format!("the plugin control cannot close stdin: {e}")));
            }
            Err(e) => fail!("closing the plugin's stdin: {e}"),
        };
    let restarted = within("restarting the plugin", Duration::from_secs(60), control.restart())
        .await?
        .or_fail("restarting the plugin")?;
    ctx.set_backend(restarted);
    ensure!(
        exited,
        "the plugin started with --exit-on-stdin-eof still runs {limit:?} after its stdin closed"
    );
    handshake(ctx).await?;
    Ok(())
}

/// Kills the plugin and starts it again; the case goes on with the new instance.
async fn kill_and_restart(ctx: &Ctx<'_>) -> Check {
    let control = ctx.control()?;
    within("killing the plugin", Duration::from_secs(20), control.kill())
        .await?
        .or_fail("killing the plugin")?;
    let restarted = within("restarting the plugin", Duration::from_secs(60), control.restart())
        .await?
        .or_fail("restarting the plugin")?;
    ctx.set_backend(restarted);
    Ok(())
}

/// An exec id used before the plugin was killed is still ALREADY_EXISTS after its restart,
/// and nothing runs (§4.6: remembered as long as the environment exists, across restarts).
pub(crate) async fn exec_ids_survive_restart(ctx: &Ctx<'_>) -> Check {
    ctx.control()?;
    let env = ctx.env().await?;
    let marker = join(&env.paths.workspace, &format!("reuse-{}", nonce(6)));
    let req = ctx.sh_request(&env, &format!("printf x >> {}", sq(&marker)));
    let w = ctx.run(req.clone()).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "the first exec ended with {}", x.status);
    kill_and_restart(ctx).await?;
    let r = ctx.exec_error(req.clone()).await?;
    expect_code(
        format!("exec {} again after the plugin restarted", req.exec_id),
        r,
        &[Code::AlreadyExists],
    )?;
    let content = ctx.sh_ok(&env, &format!("cat {}", sq(&marker))).await?;
    ensure!(
        content == "x",
        "the marker written by the exec holds {content:?} after its id was replayed across a \
         restart, expected \"x\": the exec ran twice"
    );
    Ok(())
}

/// Processes started through a previous instance of the plugin (also a `setsid` one) end
/// with `Remove` after a restart (§5.12, §6.3).
pub(crate) async fn remove_after_restart(ctx: &Ctx<'_>) -> Check {
    ctx.control()?;
    let env = ctx.env().await?;
    let marker = format!("kiln-escapee-{}", nonce(10));
    let out = ctx.sh_ok(&env, &escapees(&marker)).await?;
    let expected = if out.contains("setsid") { 3 } else { 2 };
    let mut seen = 0;
    for _ in 0..20 {
        seen = ctx.count_marked(&env, &marker).await?;
        if seen >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if seen == 0 {
        return Err(Stop::Skip(
            "processes cannot be observed from inside the environment (no /proc)".to_owned(),
        ));
    }
    kill_and_restart(ctx).await?;
    let existed =
        ctx.remove(&env.id).await?.or_fail(format!("remove {} after the restart", env.id))?;
    ensure!(existed, "removing {} after the restart returned existed=false", env.id);
    ctx.untrack(&env.id);
    let probe = ctx.env().await?;
    let left = ctx.wait_unmarked(&probe, &marker, Duration::from_secs(5)).await?;
    ensure!(
        left == 0,
        "{left} of the {seen} processes started by an exec of {} before the plugin was killed \
         and restarted still run 5 s after Remove returned: Remove must end the processes a \
         previous instance started too",
        env.id
    );
    Ok(())
}

/// A plugin exits on SIGTERM (§1.3); it is started again afterwards.
pub(crate) async fn sigterm_exit(ctx: &Ctx<'_>) -> Check {
    let control = ctx.control()?;
    let limit = Duration::from_secs(5);
    let exited = match within("sending SIGTERM", limit * 2, control.terminate(limit)).await? {
        Ok(exited) => exited,
        Err(e) if e.code == Code::Unimplemented => {
            return Err(Stop::Skip(format!("the plugin control cannot signal the plugin: {e}")));
        }
        Err(e) => fail!("sending SIGTERM to the plugin: {e}"),
    };
    let restarted = within("restarting the plugin", Duration::from_secs(60), control.restart())
        .await?
        .or_fail("restarting the plugin")?;
    ctx.set_backend(restarted);
    ensure!(exited, "the plugin still runs {limit:?} after SIGTERM; it must shut down");
    handshake(ctx).await?;
    Ok(())
}
