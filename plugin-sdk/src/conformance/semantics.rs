//! Semantics tier: what processes see and how they end (output, exit status, env, working
//! directory, staged and collected files, signals, cancellation, timeouts, "finished"), copies
//! and their traversal rules, stdin, and the container layers.
//!
//! Processes use only POSIX `sh` and a few ubiquitous tools (`cat`, `sleep`, `kill`,
//! `printf`, `mkdir`, `chmod`, `env`), so the cases run on a host directory and in a minimal
//! Linux container alike. Whether a process is gone is checked from inside the environment
//! with a second exec (`kill -0` on a pid file; zombies count as gone).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::*;
use crate::error::Code;

use super::harness::*;
use super::protocol::{copy_out_all, list};

/// The primary container of a fresh environment is running.
pub(crate) async fn inspect_primary(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let st = within(
        "inspect",
        RPC_TIMEOUT,
        ctx.backend().inspect(ContainerRef {
            environment_id: env.id.clone(),
            container_id: env.primary_container_id.clone(),
        }),
    )
    .await?
    .or_fail("inspect of the primary container")?;
    ensure!(
        st.state == ContainerState::Running,
        "the primary container {} is {:?}, expected Running",
        env.primary_container_id,
        st.state
    );
    ensure!(
        st.id == env.primary_container_id,
        "inspect answered for container {:?}, asked for {:?}",
        st.id,
        env.primary_container_id
    );
    Ok(())
}

/// stdout and stderr are separate; exit codes 0, 3 and 255; argv is passed as is.
pub(crate) async fn output_and_codes(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let w = ctx
        .run(ctx.sh_request(&env, "printf 'out1\\n'; printf 'err1\\n' >&2; printf 'out2\\n'"))
        .await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "expected exit code 0, got {}", x.status);
    ensure!(
        w.stdout == b"out1\nout2\n",
        "stdout is {}, expected \"out1\\nout2\\n\"",
        shorten(&w.stdout)
    );
    ensure!(w.stderr == b"err1\n", "stderr is {}, expected \"err1\\n\"", shorten(&w.stderr));
    ensure!(
        w.kinds.contains(&Kind::Stdout) && w.kinds.contains(&Kind::Stderr),
        "expected output frames on both streams; events: {}",
        w.kinds_text()
    );

    for code in [3, 255, 1] {
        let w = ctx.run(ctx.sh_request(&env, &format!("echo before-exit; exit {code}"))).await?;
        let x = w.exited()?;
        ensure!(x.status == ExitStatus::Code(code), "`exit {code}` reported {}", x.status);
        ensure!(
            w.stdout == b"before-exit\n",
            "output before exit {code} was {}",
            shorten(&w.stdout)
        );
    }

    let w = ctx.run(ctx.exec_request(&env, &["echo", "a  b", "$HOME", "c"])).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "`echo` ended with {}", x.status);
    ensure!(
        w.stdout == b"a  b $HOME c\n",
        "argv [echo, \"a  b\", \"$HOME\", c] printed {}: arguments must be passed without a shell",
        shorten(&w.stdout)
    );
    Ok(())
}

/// A process killed by a signal is reported as that signal (or 128+n).
pub(crate) async fn killed_by_signal(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    for sig in [15, 9] {
        let w = ctx.run(ctx.sh_request(&env, &format!("kill -{sig} $$; sleep 5"))).await?;
        let x = w.exited()?;
        ensure!(
            x.status == ExitStatus::Signal(sig) || x.status == ExitStatus::Code(128 + sig),
            "a shell that killed itself with signal {sig} was reported as {}, expected signal {sig}",
            x.status
        );
    }
    Ok(())
}

const LINE: usize = 1024;
const LINES: usize = 8192;

/// 8 MiB of numbered lines arrive complete, in order, in several frames.
pub(crate) async fn large_output(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    // 8192 lines of 1024 bytes: an 8-digit index, 1015 'x', a newline.
    let script = "p=x; i=0; while [ $i -lt 10 ]; do p=$p$p; i=$((i+1)); done; p=${p%?????????}; \
                  i=0; while [ $i -lt 8192 ]; do printf '%08d%s\\n' $i \"$p\"; i=$((i+1)); done; \
                  echo done >&2";
    let mut w = ctx.start(ctx.sh_request(&env, script)).await?;
    w.finish(Duration::from_secs(180)).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "the writer ended with {}", x.status);
    ensure!(w.stderr == b"done\n", "stderr is {}, expected \"done\\n\"", shorten(&w.stderr));
    ensure!(
        w.stdout.len() == LINE * LINES,
        "received {} bytes of stdout, expected {} (8 MiB)",
        w.stdout.len(),
        LINE * LINES
    );
    for (i, line) in w.stdout.chunks(LINE).enumerate() {
        let want = format!("{i:08}");
        ensure!(
            line.starts_with(want.as_bytes())
                && line[8..LINE - 1].iter().all(|b| *b == b'x')
                && line[LINE - 1] == b'\n',
            "line {i} of the output is wrong or out of order: {}",
            shorten(&line[..line.len().min(40)])
        );
    }
    ensure!(
        w.output_frames > 1,
        "8 MiB of output came in {} frame(s): output must be chunked, never buffered whole",
        w.output_frames
    );
    Ok(())
}

/// Output is forwarded while the process runs, not when it ends.
pub(crate) async fn streaming(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let mut w = ctx.start(ctx.sh_request(&env, "echo first; sleep 2; echo second")).await?;
    w.finish(Duration::from_secs(30)).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "ended with {}", x.status);
    ensure!(w.stdout == b"first\nsecond\n", "stdout is {}", shorten(&w.stdout));
    let (Some(first), Some(exit)) = (w.first_output_at, w.exited_at) else {
        fail!("no output or exit time recorded");
    };
    let gap = exit.saturating_duration_since(first);
    ensure!(
        gap >= Duration::from_millis(1000),
        "the first line arrived only {gap:?} before Exited, though the process slept 2 s after \
         printing it: output must stream while the process runs"
    );
    Ok(())
}

/// The process sees exactly the requested variables (plus PATH and what `sh` itself sets).
pub(crate) async fn env_exact(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let vars: Vec<(&str, &str, bool)> = vec![
        ("KILN_A", "plain", false),
        ("KILN_SPACES", "  two  spaces  ", false),
        ("KILN_EMPTY", "", false),
        ("KILN_MULTI", "line1\n line2", false),
        ("KILN_QUOTES", "it's \"quoted\" $HOME `x` \\n", false),
        ("KILN_UNICODE", "grüße ✓", false),
        ("KILN_EQ", "a=b=c", false),
        ("KILN_SECRET", "s3cr3t-value", true),
    ];
    let refs: Vec<String> = vars.iter().map(|(n, _, _)| format!("\"${n}\"")).collect();
    let script = format!("printf '%s\\0' {} \"${{KILN_EMPTY+set}}\"; env >&2", refs.join(" "));
    let mut req = ctx.sh_request(&env, &script);
    req.env = vars
        .iter()
        .map(|(n, v, secret)| EnvVar {
            name: (*n).to_owned(),
            value: (*v).to_owned(),
            secret: *secret,
        })
        .collect();
    let w = ctx.run(req).await?;
    let x = w.exited()?;
    ensure!(
        x.status == ExitStatus::Code(0),
        "ended with {} (stderr {})",
        x.status,
        shorten(&w.stderr)
    );
    let values: Vec<&[u8]> = w.stdout.split(|b| *b == 0).collect();
    ensure!(
        values.len() == vars.len() + 2,
        "expected {} NUL-separated values, got {}",
        vars.len() + 1,
        values.len().saturating_sub(1)
    );
    for (i, (name, value, secret)) in vars.iter().enumerate() {
        if values[i] != value.as_bytes() {
            let got = if *secret { "(secret, not shown)".to_owned() } else { shorten(values[i]) };
            fail!("${name} is {got}, expected {value:?}");
        }
    }
    ensure!(
        values[vars.len()] == b"set",
        "KILN_EMPTY (set to the empty string) is unset in the process"
    );
    let allowed = ["PATH", "PWD", "OLDPWD", "SHLVL", "_"];
    let mut leaked = Vec::new();
    for line in String::from_utf8_lossy(&w.stderr).lines() {
        let Some((name, _)) = line.split_once('=') else { continue };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid || allowed.contains(&name) || vars.iter().any(|v| v.0 == name) {
            continue;
        }
        leaked.push(name.to_owned());
    }
    ensure!(
        leaked.is_empty(),
        "the process has variables nobody asked for: {} (ExecRequest.env is the complete \
         environment; only path_prepend may be added)",
        leaked.join(", ")
    );
    Ok(())
}

/// `path_prepend` entries come first in PATH, in order, and are searched: in front of the
/// PATH the request carries (as the runner sends it, from the primary container's image
/// environment), and in front of the container's own search path when it carries none.
pub(crate) async fn path_prepend(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let n = nonce(6);
    let bin = join(&env.paths.workspace, &format!("kiln-bin-{n}"));
    let tool = format!("kiln-hello-{n}");
    ctx.sh_ok(
        &env,
        &format!(
            "mkdir -p {b} && printf '#!/bin/sh\\necho hello-from-path\\n' > {t} && chmod 755 {t}",
            b = sq(&bin),
            t = sq(&join(&bin, &tool))
        ),
    )
    .await?;
    let status = within(
        "inspect",
        RPC_TIMEOUT,
        ctx.backend().inspect(ContainerRef {
            environment_id: env.id.clone(),
            container_id: env.primary_container_id.clone(),
        }),
    )
    .await?
    .or_fail("inspect of the primary container")?;
    let var = if env.path_variable.is_empty() { "PATH" } else { env.path_variable.as_str() };
    let image_path = status
        .image_env
        .iter()
        .find_map(|e| e.strip_prefix(&format!("{var}=")).map(str::to_owned))
        .unwrap_or_else(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
        });
    let sep = if env.path_separator.is_empty() { ":" } else { env.path_separator.as_str() };
    let other = format!("/kiln-nonexistent-{n}");
    let prefix = format!("{bin}{sep}{other}");
    let script = format!("printf '%s\\n' \"${var}\"; {tool}");

    for given in [Some(image_path.clone()), None] {
        let mut req = match given {
            Some(_) => ctx.sh_request(&env, &script),
            // Without a PATH the shell itself is named by its absolute path.
            None => ctx.exec_request(&env, &["/bin/sh", "-c", &script]),
        };
        if let Some(p) = &given {
            req.env = vec![EnvVar::new(var, p.clone())];
        }
        req.path_prepend = vec![bin.clone(), other.clone()];
        let w = ctx.run(req).await?;
        let x = w.exited()?;
        let out = String::from_utf8_lossy(&w.stdout).into_owned();
        let mut lines = out.lines();
        let path = lines.next().unwrap_or("");
        let how = match &given {
            Some(p) => format!("with {var}={p:?} in the request"),
            None => format!("with no {var} in the request"),
        };
        match &given {
            Some(p) => ensure!(
                path == format!("{prefix}{sep}{p}"),
                "{how}, {var} is {path:?}, expected {:?} ({}; stderr {})",
                format!("{prefix}{sep}{p}"),
                x.status,
                shorten(&w.stderr)
            ),
            None => ensure!(
                path == prefix || path.starts_with(&format!("{prefix}{sep}")),
                "{how}, {var} is {path:?}, expected it to start with {prefix:?} ({}; stderr {})",
                x.status,
                shorten(&w.stderr)
            ),
        }
        ensure!(
            x.status == ExitStatus::Code(0) && lines.next() == Some("hello-from-path"),
            "{how}, a program in a path_prepend directory was not found by name ({}; stderr {})",
            x.status,
            shorten(&w.stderr)
        );
    }
    Ok(())
}

/// `working_dir` is honoured; empty means the workspace.
pub(crate) async fn working_dir(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let spaced = join(&env.paths.workspace, &format!("dir with space {}", nonce(4)));
    ctx.sh_ok(&env, &format!("mkdir -p {}", sq(&spaced))).await?;
    for (asked, expected) in [
        ("", env.paths.workspace.as_str()),
        (env.paths.temp.as_str(), env.paths.temp.as_str()),
        (spaced.as_str(), spaced.as_str()),
    ] {
        let mut req = ctx.sh_request(&env, &format!("pwd -P; cd {} && pwd -P", sq(expected)));
        req.working_dir = asked.to_owned();
        let w = ctx.run(req).await?;
        let x = w.exited()?;
        ensure!(
            x.status == ExitStatus::Code(0),
            "ended with {} (stderr {})",
            x.status,
            shorten(&w.stderr)
        );
        let out = String::from_utf8_lossy(&w.stdout).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        ensure!(
            lines.len() == 2 && lines[0] == lines[1],
            "with working_dir {asked:?} the process ran in {:?}, expected {expected:?}",
            lines.first().copied().unwrap_or("")
        );
    }
    Ok(())
}

/// Staged files are written with their modes before the process starts; collected files come
/// back in `Exited.files` in request order, with `missing` and `truncated`.
pub(crate) async fn staged_files(ctx: &Ctx<'_>) -> Check {
    ctx.require_feature("exec_files", ctx.caps.features.exec_files)?;
    let env = ctx.env().await?;
    let n = nonce(6);
    let rf = &env.paths.runner_files;
    let script = join(rf, &format!("kiln-step-{n}.sh"));
    let env_file = join(rf, &format!("kiln-env-{n}"));
    let data = join(rf, &format!("kiln-data-{n}"));
    let big = join(rf, &format!("kiln-big-{n}"));
    let missing = join(rf, &format!("kiln-missing-{n}"));
    let body = format!(
        "#!/bin/sh\necho \"staged-ok $1\"\nprintf 'K=V\\n' >> \"$KILN_ENV_FILE\"\n\
         printf '%0100d' 0 > {big}\n[ -x {data} ] && echo data-is-executable\nexit 0\n",
        big = sq(&big),
        data = sq(&data),
    );
    let mut req = ctx.exec_request(&env, &[&script, "arg1"]);
    req.env = vec![EnvVar::new("KILN_ENV_FILE", env_file.clone())];
    req.files = vec![
        StagedFile { path: script.clone(), content: Bytes::from(body), mode: 0o755 },
        StagedFile { path: env_file.clone(), content: Bytes::new(), mode: 0 },
        StagedFile { path: data.clone(), content: Bytes::from_static(b"data"), mode: 0o600 },
    ];
    req.collect = vec![env_file.clone(), missing.clone(), big.clone(), data.clone()];
    req.collect_limit_bytes = 64;
    let w = ctx.run(req).await?;
    let x = w.exited()?;
    ensure!(
        x.status == ExitStatus::Code(0),
        "the staged script ended with {} (stderr {})",
        x.status,
        shorten(&w.stderr)
    );
    ensure!(
        w.stdout == b"staged-ok arg1\n",
        "the staged script printed {}, expected \"staged-ok arg1\\n\" (a file staged with mode \
         0600 must not be executable)",
        shorten(&w.stdout)
    );
    let paths: Vec<&str> = x.files.iter().map(|f| f.path.as_str()).collect();
    let want = [env_file.as_str(), missing.as_str(), big.as_str(), data.as_str()];
    ensure!(paths == want, "collected files {paths:?}, expected {want:?} in request order");
    let f = &x.files;
    ensure!(
        f[0].content.as_ref() == b"K=V\n" && !f[0].missing && !f[0].truncated,
        "collected env file: content {}, missing {}, truncated {}; expected \"K=V\\n\"",
        shorten(&f[0].content),
        f[0].missing,
        f[0].truncated
    );
    ensure!(
        f[1].missing && f[1].content.is_empty(),
        "a file that does not exist came back with missing={} and {} bytes",
        f[1].missing,
        f[1].content.len()
    );
    ensure!(
        f[2].truncated && f[2].content.as_ref() == [b'0'; 64].as_slice() && !f[2].missing,
        "a 100-byte file collected with a 64-byte limit came back truncated={} with {} bytes",
        f[2].truncated,
        f[2].content.len()
    );
    ensure!(
        f[3].content.as_ref() == b"data" && !f[3].truncated,
        "the staged data file came back as {}",
        shorten(&f[3].content)
    );
    Ok(())
}

/// `timeout_ms` kills the process and reports `timed_out`; the environment stays usable.
pub(crate) async fn timeout(ctx: &Ctx<'_>) -> Check {
    ctx.require_feature("exec_timeout", ctx.caps.features.exec_timeout)?;
    let env = ctx.env().await?;
    let mut req = ctx.exec_request(&env, &["sleep", "30"]);
    req.timeout = Some(Duration::from_millis(500));
    req.grace = Duration::from_millis(500);
    let limit = Duration::from_millis(500 + 500 + 2000);
    let mut w = ctx.start(req).await?;
    w.finish(Duration::from_secs(40)).await?;
    let x = w.exited()?;
    ensure!(
        x.timed_out,
        "`sleep 30` with a 500 ms timeout ended with {} and timed_out=false",
        x.status
    );
    ensure!(!x.status.success(), "a timed-out exec reported exit code 0");
    let took = w.exited_after().unwrap_or_default();
    ensure!(took <= limit, "the timed-out exec ended after {took:?}, expected within {limit:?}");
    let alive = ctx.sh_ok(&env, "echo alive").await?;
    ensure!(alive == "alive\n", "the environment is not usable after an exec timed out");
    Ok(())
}

/// An exec is done when its main process exits, even with a background child holding
/// stdout; the child keeps running until the environment is removed.
pub(crate) async fn finished_background(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let pid = join(&env.paths.workspace, &format!("bg-{}.pid", nonce(6)));
    let mut w = ctx
        .start(ctx.sh_request(&env, &format!("sleep 120 & echo $! > {}; echo started", sq(&pid))))
        .await?;
    let limit = Duration::from_secs(4);
    w.finish(Duration::from_secs(30)).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "ended with {}", x.status);
    ensure!(w.stdout == b"started\n", "stdout is {}, expected \"started\\n\"", shorten(&w.stdout));
    let took = w.exited_after().unwrap_or_default();
    ensure!(
        took <= limit,
        "Exited arrived {took:?} after the start, expected within {limit:?}: a background child \
         holding stdout must not hold the stream open"
    );
    ensure!(
        ctx.is_alive(&env, &pid).await?,
        "the background child of a finished exec is gone; it must run until the environment \
         is removed"
    );
    let existed = ctx.remove(&env.id).await?.or_fail(format!("remove {}", env.id))?;
    ensure!(existed, "remove returned existed=false");
    ctx.untrack(&env.id);
    Ok(())
}

/// WriteStdin feeds the process; EOF closes its stdin.
pub(crate) async fn stdin(ctx: &Ctx<'_>) -> Check {
    ctx.require_feature("stdin", ctx.caps.features.stdin)?;
    let env = ctx.env().await?;
    let mut req = ctx.exec_request(&env, &["cat"]);
    req.stdin = true;
    let id = req.exec_id.clone();
    let mut w = ctx.start(req).await?;
    let chunks: Vec<crate::Result<Bytes>> =
        vec![Ok(Bytes::from_static(b"hello\n")), Ok(Bytes::from_static(b"world\n"))];
    let n = within(
        "write_stdin",
        RPC_TIMEOUT,
        ctx.backend().write_stdin(id, Box::pin(futures::stream::iter(chunks))),
    )
    .await?
    .or_fail("write_stdin")?;
    ensure!(n == 12, "write_stdin reported {n} bytes written, expected 12");
    w.finish(Duration::from_secs(20)).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "`cat` ended with {}", x.status);
    ensure!(w.stdout == b"hello\nworld\n", "`cat` echoed {}", shorten(&w.stdout));
    Ok(())
}

struct Pids {
    bg: String,
    sh: String,
}

fn pid_files(env: &Environment, what: &str) -> Pids {
    let n = nonce(6);
    Pids {
        bg: join(&env.paths.workspace, &format!("{what}-bg-{n}.pid")),
        sh: join(&env.paths.workspace, &format!("{what}-sh-{n}.pid")),
    }
}

async fn signal(
    ctx: &Ctx<'_>,
    exec_id: &str,
    sig: i32,
    grace: Duration,
) -> Check<crate::Result<bool>> {
    within(
        "signal_exec",
        RPC_TIMEOUT,
        ctx.backend().signal_exec(SignalRequest {
            exec_id: exec_id.to_owned(),
            signal: sig,
            grace,
        }),
    )
    .await
}

/// SIGTERM ends the exec and its process group; a second signal is not delivered.
pub(crate) async fn signal_term(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let p = pid_files(&env, "term");
    let script = format!(
        "sleep 300 & echo $! > {}; echo $$ > {}; echo ready; sleep 300; wait",
        sq(&p.bg),
        sq(&p.sh)
    );
    let grace = Duration::from_secs(2);
    let req = ctx.sh_request(&env, &script);
    let id = req.exec_id.clone();
    let mut w = ctx.start(req).await?;
    w.until_stdout("ready", Duration::from_secs(20)).await?;
    let delivered = signal(ctx, &id, 15, grace).await?.or_fail("signal_exec SIGTERM")?;
    ensure!(delivered, "signal_exec of a running exec returned delivered=false");
    let limit = grace + Duration::from_secs(2);
    w.finish(limit).await?;
    let x = w.exited()?;
    ensure!(
        x.status == ExitStatus::Signal(15) || matches!(x.status, ExitStatus::Code(c) if c != 0),
        "after SIGTERM the exec reported {}, expected signal 15 or a non-zero code",
        x.status
    );
    ctx.wait_dead(&env, &[&p.sh, &p.bg], limit).await?;
    let again = signal(ctx, &id, 15, grace).await?.or_fail("signal_exec of an ended exec")?;
    ensure!(!again, "signal_exec of an exec that had ended returned delivered=true");
    Ok(())
}

/// A process group ignoring SIGTERM is killed with SIGKILL after the grace period.
pub(crate) async fn signal_escalation(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let p = pid_files(&env, "kill");
    let script = format!(
        "trap '' TERM; sleep 300 & echo $! > {}; echo $$ > {}; echo ready; wait",
        sq(&p.bg),
        sq(&p.sh)
    );
    let grace = Duration::from_millis(1500);
    let req = ctx.sh_request(&env, &script);
    let id = req.exec_id.clone();
    let mut w = ctx.start(req).await?;
    w.until_stdout("ready", Duration::from_secs(20)).await?;
    let sent = Instant::now();
    let delivered = signal(ctx, &id, 15, grace).await?.or_fail("signal_exec SIGTERM")?;
    ensure!(delivered, "signal_exec of a running exec returned delivered=false");
    let limit = grace + Duration::from_secs(2);
    w.finish(limit).await?;
    let x = w.exited()?;
    let after = w.exited_at.map(|t| t.saturating_duration_since(sent)).unwrap_or_default();
    ensure!(
        x.status == ExitStatus::Signal(9) || x.status == ExitStatus::Code(137),
        "a process ignoring SIGTERM was reported as {} {after:?} after the signal, expected \
         signal 9 (SIGKILL after the {grace:?} grace)",
        x.status
    );
    ensure!(
        after + Duration::from_millis(300) >= grace,
        "the process ignoring SIGTERM was killed {after:?} after the signal, before the \
         {grace:?} grace elapsed"
    );
    ctx.wait_dead(&env, &[&p.sh, &p.bg], limit).await?;
    Ok(())
}

/// Dropping the exec stream kills the process group within grace + 2 s.
pub(crate) async fn cancel_disconnect(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let p = pid_files(&env, "cancel");
    let script =
        format!("sleep 300 & echo $! > {}; echo $$ > {}; echo ready; wait", sq(&p.bg), sq(&p.sh));
    let grace = Duration::from_secs(1);
    let mut req = ctx.sh_request(&env, &script);
    req.grace = grace;
    let mut w = ctx.start(req).await?;
    w.until_stdout("ready", Duration::from_secs(20)).await?;
    w.disconnect();
    ctx.wait_dead(&env, &[&p.sh, &p.bg], grace + Duration::from_secs(2)).await
}

/// One entry of the round-trip tree: name, kind, mode, content, link target.
type Node = (&'static str, &'static str, u32, Vec<u8>, Option<&'static str>);

/// The tree the copy round trip sends and expects back.
fn tree() -> Vec<Node> {
    let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| ((i * 7) % 251) as u8).collect();
    vec![
        ("d", "dir", 0o755, Vec::new(), None),
        ("d/run.sh", "file", 0o755, b"#!/bin/sh\necho copied\n".to_vec(), None),
        ("d/secret", "file", 0o600, b"top secret\n".to_vec(), None),
        ("d/link", "symlink", 0o777, Vec::new(), Some("run.sh")),
        ("d/big.bin", "file", 0o644, big, None),
        ("d/empty", "dir", 0o700, Vec::new(), None),
    ]
}

/// CopyIn then CopyOut keeps names, modes, links and contents; exec sees the files.
pub(crate) async fn copy_round_trip(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let dest = join(&env.paths.workspace, "x");
    let mut t = TarBuilder::new();
    for (name, kind, mode, data, link) in tree() {
        match kind {
            "dir" => t.dir(name, mode)?,
            "symlink" => t.symlink(name, link.unwrap_or_default())?,
            _ => t.file(name, mode, &data)?,
        }
    }
    let target = CopyInTarget {
        environment_id: env.id.clone(),
        container_id: env.primary_container_id.clone(),
        dest_path: dest.clone(),
        local_path: None,
    };
    within(
        "copy_in",
        Duration::from_secs(120),
        ctx.backend().copy_in(target, byte_stream(t.finish()?)),
    )
    .await?
    .or_fail(format!("copy_in into {dest}"))?;

    let secret = ctx.sh_ok(&env, &format!("cat {}", sq(&join(&dest, "d/secret")))).await?;
    ensure!(secret == "top secret\n", "d/secret reads {secret:?} inside the environment");
    let ran = ctx.sh_ok(&env, &sq(&join(&dest, "d/run.sh"))).await?;
    ensure!(ran == "copied\n", "the copied 0755 script printed {ran:?}");
    let checks = format!(
        "cd {} && [ -L d/link ] && [ -d d/empty ] && [ ! -x d/secret ] && echo ok",
        sq(&dest)
    );
    let ok = ctx.sh_ok(&env, &checks).await?;
    ensure!(
        ok == "ok\n",
        "inside the environment the copied tree is wrong (link, empty dir or modes)"
    );

    let source = CopyOutSource {
        environment_id: env.id.clone(),
        container_id: env.primary_container_id.clone(),
        path: join(&dest, "d"),
    };
    let data = copy_out_all(ctx, source).await?.or_fail(format!("copy_out {dest}/d"))?;
    let got = read_tar(&data)?;
    let expected = tree();
    for (name, kind, mode, content, link) in &expected {
        let Some(e) = got.get(*name) else {
            fail!("copy_out lacks {name}; it holds {:?}", got.keys().collect::<Vec<_>>());
        };
        ensure!(e.kind == *kind, "{name} came back as a {}, expected a {kind}", e.kind);
        if *kind == "symlink" {
            ensure!(
                e.link.as_deref() == *link,
                "symlink {name} points to {:?}, expected {link:?}",
                e.link
            );
            continue;
        }
        ensure!(
            e.mode & 0o777 == *mode,
            "{name} came back with mode {:o}, expected {mode:o}",
            e.mode & 0o777
        );
        ensure!(
            e.data == *content,
            "{name} came back with {} bytes that differ from the {} copied in",
            e.data.len(),
            content.len()
        );
    }
    let extra: Vec<_> =
        got.keys().filter(|k| !expected.iter().any(|e| e.0 == k.as_str())).collect();
    ensure!(extra.is_empty(), "copy_out holds entries that were never copied in: {extra:?}");

    let source = CopyOutSource {
        environment_id: env.id.clone(),
        container_id: env.primary_container_id.clone(),
        path: join(&dest, "d/secret"),
    };
    let data = copy_out_all(ctx, source).await?.or_fail("copy_out of a single file")?;
    let got = read_tar(&data)?;
    let names: Vec<_> = got.keys().cloned().collect();
    ensure!(
        names == ["secret"],
        "copy_out of a file holds {names:?}, expected [\"secret\"] (its base name)"
    );
    ensure!(
        got["secret"].data == b"top secret\n" && got["secret"].mode & 0o777 == 0o600,
        "copy_out of a single file returned wrong content or mode {:o}",
        got["secret"].mode
    );
    Ok(())
}

/// Tar entries that would land outside the destination are refused and nothing is written
/// outside.
pub(crate) async fn copy_traversal(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let n = nonce(6);
    let ws = env.paths.workspace.clone();
    let temp = env.paths.temp.clone();
    let hl_target = join(&temp, &format!("hl-target-{n}"));
    ctx.sh_ok(&env, &format!("printf original > {}", sq(&hl_target))).await?;

    // (what, archive, dest, the path that must not exist afterwards)
    let mut attempts: Vec<(String, Vec<u8>, String, String)> = Vec::new();
    let mut add = |what: &str,
                   build: &dyn Fn(&mut TarBuilder) -> Check,
                   dest: String,
                   outside: String|
     -> Check {
        let mut t = TarBuilder::new();
        build(&mut t)?;
        attempts.push((what.to_owned(), t.finish()?, dest, outside));
        Ok(())
    };
    let evil = format!("evil-{n}");
    add(
        "an entry named ../evil",
        &|t| t.file(&format!("../{evil}"), 0o644, b"pwned"),
        join(&ws, &format!("t1-{n}")),
        join(&ws, &evil),
    )?;
    let abs = join(&temp, &format!("abs-evil-{n}"));
    add(
        "an absolute entry",
        &|t| t.file(&abs, 0o644, b"pwned"),
        join(&ws, &format!("t2-{n}")),
        abs.clone(),
    )?;
    let esc = join(&temp, &format!("esc-evil-{n}"));
    add(
        "a symlink to / followed by an entry through it",
        &|t| {
            t.symlink("esc", "/")?;
            t.file(&format!("esc{esc}"), 0o644, b"pwned")
        },
        join(&ws, &format!("t3-{n}")),
        esc.clone(),
    )?;
    let up = join(&temp, &format!("up-evil-{n}"));
    let dotdots = "../".repeat(24);
    add(
        "a relative symlink escaping upwards followed by an entry through it",
        &|t| {
            t.symlink("up", dotdots.trim_end_matches('/'))?;
            t.file(&format!("up{up}"), 0o644, b"pwned")
        },
        join(&ws, &format!("t4-{n}")),
        up.clone(),
    )?;
    let hl1 = join(&ws, &format!("t5-{n}/hl"));
    add(
        "a hard link to an absolute path outside",
        &|t| t.hardlink("hl", &hl_target),
        join(&ws, &format!("t5-{n}")),
        hl1,
    )?;
    let hl2 = join(&ws, &format!("t6-{n}/hl"));
    add(
        "a hard link with '..' in its target",
        &|t| t.hardlink("hl", &format!("../../{}", "x".repeat(3))),
        join(&ws, &format!("t6-{n}")),
        hl2,
    )?;

    let mut problems = Vec::new();
    let copy = |archive: Vec<u8>, dest: String| {
        let target = CopyInTarget {
            environment_id: env.id.clone(),
            container_id: env.primary_container_id.clone(),
            dest_path: dest,
            local_path: None,
        };
        let b = ctx.backend();
        async move { within("copy_in", RPC_TIMEOUT, b.copy_in(target, byte_stream(archive))).await }
    };
    for (what, archive, dest, outside) in attempts {
        let r = copy(archive, dest).await?;
        if let Err(Stop::Fail(m) | Stop::Skip(m)) = expect_code(
            format!("copy_in of {what}"),
            r,
            &[Code::InvalidArgument, Code::PermissionDenied],
        ) {
            problems.push(m);
        }
        let (status, _) =
            ctx.sh_status(&env, &format!("test ! -e {} && test ! -L {0}", sq(&outside))).await?;
        if status != ExitStatus::Code(0) {
            problems.push(format!("copy_in of {what} wrote {outside} outside the destination"));
        }
    }

    // A symlink already in the destination (allowed as a link) must not be written through.
    let pre_dest = join(&ws, &format!("t7-{n}"));
    let mut t = TarBuilder::new();
    t.symlink("pre", &temp)?;
    let r = copy(t.finish()?, pre_dest.clone()).await?;
    match r {
        Err(e) => problems.push(format!(
            "copy_in of an archive holding only an absolute symlink was refused ({}: {e}): \
             symlinks are kept as links",
            code_name(e.code)
        )),
        Ok(_) => {
            let through = join(&temp, &format!("pre-evil-{n}"));
            let mut t = TarBuilder::new();
            t.file(&format!("pre/pre-evil-{n}"), 0o644, b"pwned")?;
            let r = copy(t.finish()?, pre_dest).await?;
            if let Err(Stop::Fail(m) | Stop::Skip(m)) = expect_code(
                "copy_in through a symlink already in the destination",
                r,
                &[Code::InvalidArgument, Code::PermissionDenied],
            ) {
                problems.push(m);
            }
            let (status, _) = ctx.sh_status(&env, &format!("test ! -e {}", sq(&through))).await?;
            if status != ExitStatus::Code(0) {
                problems.push(format!("copy_in through an existing symlink wrote {through}"));
            }
        }
    }
    let original = ctx.sh_ok(&env, &format!("cat {}", sq(&hl_target))).await?;
    if original != "original" {
        problems.push(format!("the file outside the destination was modified: {original:?}"));
    }

    let mut t = TarBuilder::new();
    t.file("hello.txt", 0o644, b"hello\n")?;
    let r = copy(t.finish()?, format!("relative-dest-{n}")).await?;
    if let Err(Stop::Fail(m) | Stop::Skip(m)) =
        expect_code("copy_in with a relative dest_path", r, &[Code::InvalidArgument])
    {
        problems.push(m);
    }

    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// With `local_copy`, CopyIn copies a directory of the runner's filesystem.
pub(crate) async fn copy_local_path(ctx: &Ctx<'_>) -> Check {
    ctx.require_feature("local_copy", ctx.caps.features.local_copy)?;
    let env = ctx.env().await?;
    let local =
        tempfile::tempdir().map_err(|e| Stop::Fail(format!("creating a local directory: {e}")))?;
    let write = || -> std::io::Result<()> {
        std::fs::write(local.path().join("a.txt"), "local copy\n")?;
        std::fs::create_dir(local.path().join("sub"))?;
        std::fs::write(local.path().join("sub/b.sh"), "#!/bin/sh\necho b\n")?;
        std::fs::set_permissions(
            local.path().join("sub/b.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
    };
    write().map_err(|e| Stop::Fail(format!("preparing the local directory: {e}")))?;
    let dest = join(&env.paths.workspace, "local");
    let target = CopyInTarget {
        environment_id: env.id.clone(),
        container_id: env.primary_container_id.clone(),
        dest_path: dest.clone(),
        local_path: Some(local.path().to_string_lossy().into_owned()),
    };
    within("copy_in", RPC_TIMEOUT, ctx.backend().copy_in(target, byte_stream(Vec::new())))
        .await?
        .or_fail("copy_in with local_path")?;
    let out = ctx
        .sh_ok(
            &env,
            &format!("cat {} && {}", sq(&join(&dest, "a.txt")), sq(&join(&dest, "sub/b.sh"))),
        )
        .await?;
    ensure!(
        out == "local copy\nb\n",
        "after copy_in with local_path, {dest}/a.txt and sub/b.sh gave {out:?} (the directory's \
         contents go directly under dest_path, modes kept)"
    );
    Ok(())
}

fn layer_check(ctx: &Ctx<'_>, name: &str, layer: &LayerSupport) -> Check<String> {
    match layer {
        LayerSupport::Unsupported(detail) => {
            let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
            return Err(Stop::Skip(format!("layer {name} unsupported{detail}")));
        }
        LayerSupport::Delegated { backend } => {
            return Err(Stop::Skip(format!(
                "layer {name} delegated to {backend:?}: run the suite against that plugin"
            )));
        }
        LayerSupport::Native => {}
    }
    ctx.config.container_image.clone().ok_or_else(|| {
        Stop::Skip(format!(
            "layer {name} supported, but no container image given (--container-image)"
        ))
    })
}

async fn create_container(
    ctx: &Ctx<'_>,
    kind: ContainerKind,
    req: ContainerRequest,
) -> Check<crate::Result<Container>> {
    within(
        format!("create_container({kind})"),
        CREATE_TIMEOUT,
        ctx.backend().create_container(kind, req),
    )
    .await
}

async fn container_state(
    ctx: &Ctx<'_>,
    env: &str,
    id: &str,
) -> Check<crate::Result<ContainerStatus>> {
    within(
        "inspect",
        RPC_TIMEOUT,
        ctx.backend()
            .inspect(ContainerRef { environment_id: env.to_owned(), container_id: id.to_owned() }),
    )
    .await
}

async fn remove_container(ctx: &Ctx<'_>, env: &str, id: &str) -> Check<crate::Result<bool>> {
    within(
        "remove container",
        RPC_TIMEOUT,
        ctx.backend().remove(RemoveRequest {
            environment_id: env.to_owned(),
            container_id: Some(id.to_owned()),
            grace: Duration::from_secs(1),
        }),
    )
    .await
}

async fn start_container(ctx: &Ctx<'_>, env: &str, id: &str) -> Check<Container> {
    within(
        "start_container",
        CREATE_TIMEOUT,
        ctx.backend().start_container(ContainerRef {
            environment_id: env.to_owned(),
            container_id: id.to_owned(),
        }),
    )
    .await?
    .or_fail(format!("start_container {id}"))
}

/// A job container: idempotent create, start, inspect, exec with the workspace mounted,
/// listing, idempotent remove.
pub(crate) async fn job_container(ctx: &Ctx<'_>) -> Check {
    let image = layer_check(ctx, "job container", &ctx.caps.job_container)?;
    let env = ctx.env().await?;
    let id = ctx.new_id();
    let req = ContainerRequest {
        environment_id: env.id.clone(),
        container_id: id.clone(),
        spec: ContainerSpec {
            image,
            entrypoint: vec!["sleep".to_owned()],
            cmd: vec!["3600".to_owned()],
            mount_workspace: true,
            ..ContainerSpec::default()
        },
    };
    let c = create_container(ctx, ContainerKind::Job, req.clone())
        .await?
        .or_fail("create_container(job)")?;
    ensure!(c.id == id, "the job container came back with id {:?}, requested {id:?}", c.id);
    let again = create_container(ctx, ContainerKind::Job, req.clone())
        .await?
        .or_fail("replayed create_container(job)")?;
    ensure!(again.id == id, "the replayed create returned container {:?}", again.id);
    let mut other = req.clone();
    other.spec.cmd = vec!["3601".to_owned()];
    let r = create_container(ctx, ContainerKind::Job, other).await?;
    expect_code(
        "create_container(job) with the same id and another spec",
        r,
        &[Code::AlreadyExists],
    )?;
    let started = start_container(ctx, &env.id, &id).await?;
    ensure!(
        started.state == ContainerState::Running,
        "after start the job container is {:?}",
        started.state
    );
    let again = start_container(ctx, &env.id, &id).await?;
    ensure!(
        again.state == ContainerState::Running,
        "a second start left the container {:?}",
        again.state
    );
    let st = container_state(ctx, &env.id, &id).await?.or_fail("inspect of the job container")?;
    ensure!(
        st.state == ContainerState::Running,
        "inspect reports the job container {:?}",
        st.state
    );

    let file = join(&env.paths.workspace, &format!("job-{}", nonce(6)));
    ctx.sh_ok(&env, &format!("printf from-primary > {}", sq(&file))).await?;
    let mut req = ctx.sh_request(&env, &format!("cat {}", sq(&file)));
    req.container_id = id.clone();
    let w = ctx.run(req).await?;
    let x = w.exited()?;
    ensure!(
        x.status == ExitStatus::Code(0) && w.stdout == b"from-primary",
        "in the job container (mount_workspace) the workspace file reads {} ({})",
        shorten(&w.stdout),
        x.status
    );
    let listed =
        list(ctx, Selector { runner_id: ctx.config.namespace.clone(), labels: BTreeMap::new() })
            .await?;
    let summary = listed.iter().find(|e| e.id == env.id);
    ensure!(
        summary.is_some_and(|s| s.container_ids.contains(&id)),
        "the environment's summary does not list the job container {id}: {summary:?}"
    );
    let existed =
        remove_container(ctx, &env.id, &id).await?.or_fail("remove of the job container")?;
    ensure!(existed, "removing the job container returned existed=false");
    let existed =
        remove_container(ctx, &env.id, &id).await?.or_fail("second remove of the job container")?;
    ensure!(!existed, "removing the job container twice returned existed=true");
    let r = container_state(ctx, &env.id, &id).await?;
    expect_code("inspect of a removed container", r, &[Code::NotFound])?;
    Ok(())
}

/// A service container: create, start, inspect running, remove.
pub(crate) async fn service_container(ctx: &Ctx<'_>) -> Check {
    let image = layer_check(ctx, "service containers", &ctx.caps.service_containers)?;
    let env = ctx.env().await?;
    let id = ctx.new_id();
    let req = ContainerRequest {
        environment_id: env.id.clone(),
        container_id: id.clone(),
        spec: ContainerSpec {
            image,
            entrypoint: vec!["sleep".to_owned()],
            cmd: vec!["3600".to_owned()],
            network_aliases: vec![format!("svc-{}", nonce(4))],
            ..ContainerSpec::default()
        },
    };
    let c = create_container(ctx, ContainerKind::Service, req)
        .await?
        .or_fail("create_container(service)")?;
    ensure!(c.id == id, "the service container came back with id {:?}", c.id);
    start_container(ctx, &env.id, &id).await?;
    let st =
        container_state(ctx, &env.id, &id).await?.or_fail("inspect of the service container")?;
    ensure!(
        st.state == ContainerState::Running,
        "inspect reports the service container {:?}",
        st.state
    );
    let existed =
        remove_container(ctx, &env.id, &id).await?.or_fail("remove of the service container")?;
    ensure!(existed, "removing the service container returned existed=false");
    Ok(())
}

/// A step container's entrypoint runs through Exec with an empty argv.
pub(crate) async fn step_container(ctx: &Ctx<'_>) -> Check {
    let image = layer_check(ctx, "step containers", &ctx.caps.step_containers)?;
    let env = ctx.env().await?;
    let id = ctx.new_id();
    let req = ContainerRequest {
        environment_id: env.id.clone(),
        container_id: id.clone(),
        spec: ContainerSpec {
            image,
            entrypoint: vec!["sh".to_owned(), "-c".to_owned()],
            cmd: vec!["echo step-ok; exit 3".to_owned()],
            ..ContainerSpec::default()
        },
    };
    create_container(ctx, ContainerKind::Step, req).await?.or_fail("create_container(step)")?;
    let mut req = ctx.exec_request(&env, &[]);
    req.container_id = id.clone();
    let w = ctx.run(req).await?;
    let x = w.exited()?;
    ensure!(
        x.status == ExitStatus::Code(3) && w.stdout == b"step-ok\n",
        "the step container's entrypoint gave {} with stdout {}, expected exit code 3 and \"step-ok\\n\"",
        x.status,
        shorten(&w.stdout)
    );
    Ok(())
}

/// Starts an exec whose call may be refused; returns the refusal or the finished watch.
async fn try_run(ctx: &Ctx<'_>, req: ExecRequest) -> Check<Result<Watch, crate::Error>> {
    let id = req.exec_id.clone();
    let started = within(format!("exec {id}"), RPC_TIMEOUT, ctx.backend().exec(req)).await?;
    match started {
        Err(e) => Ok(Err(e)),
        Ok(stream) => {
            let mut w = Watch::new(id, stream);
            w.finish(EXEC_TIMEOUT).await?;
            match w.error.take() {
                Some(e) if w.exited.is_none() => Ok(Err(e)),
                _ => Ok(Ok(w)),
            }
        }
    }
}

/// A program or working directory that does not exist ends the exec with exit code 127, a
/// file that cannot be executed with 126 — `Exited`, never an error status.
pub(crate) async fn missing_program(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let ws = &env.paths.workspace;
    let n = nonce(6);
    let plain = join(ws, &format!("not-executable-{n}"));
    ctx.sh_ok(&env, &format!("printf '#!/bin/sh\\necho ran\\n' > {0}; chmod 644 {0}", sq(&plain)))
        .await?;
    let program = format!("kiln-no-such-program-{n}");
    let mut missing_dir = ctx.exec_request(&env, &["sh", "-c", "echo ran"]);
    missing_dir.working_dir = join(ws, &format!("missing-dir-{n}"));
    for (what, req, want) in [
        (
            format!("argv [{program:?}] (not in the search path)"),
            ctx.exec_request(&env, &[&program]),
            127,
        ),
        (
            format!("argv [{plain:?}] (a file without execute permission)"),
            ctx.exec_request(&env, &[&plain]),
            126,
        ),
        (format!("working_dir {:?} (does not exist)", missing_dir.working_dir), missing_dir, 127),
    ] {
        match try_run(ctx, req).await? {
            Err(e) => fail!(
                "{what}: the exec failed with {} ({e}); it must end with Exited exit_code {want} \
                 (the user's problem, reported as a shell would)",
                code_name(e.code)
            ),
            Ok(w) => {
                let x = w.exited()?;
                ensure!(
                    x.status == ExitStatus::Code(want),
                    "{what}: ended with {}, expected exit code {want} (stdout {}, stderr {})",
                    x.status,
                    shorten(&w.stdout),
                    shorten(&w.stderr)
                );
            }
        }
    }
    Ok(())
}

/// `tty = true` on a plugin that does not declare `tty` is refused UNIMPLEMENTED and runs
/// nothing.
pub(crate) async fn tty_undeclared(ctx: &Ctx<'_>) -> Check {
    if ctx.caps.features.tty {
        return Err(Stop::Skip("feature tty declared".to_owned()));
    }
    let env = ctx.env().await?;
    let mut req = ctx.sh_request(&env, "echo should-not-run");
    req.tty = true;
    let r = ctx.exec_error(req).await?;
    expect_code("exec with tty = true on a plugin not declaring tty", r, &[Code::Unimplemented])?;
    Ok(())
}

/// A process silent for 17 s gets at least one `Keepalive` frame (one at the latest after
/// 15 s without a frame).
pub(crate) async fn keepalive(ctx: &Ctx<'_>) -> Check {
    let env = ctx.env().await?;
    let mut w = ctx.start(ctx.exec_request(&env, &["sleep", "17"])).await?;
    w.finish(Duration::from_secs(60)).await?;
    let x = w.exited()?;
    ensure!(x.status == ExitStatus::Code(0), "`sleep 17` ended with {}", x.status);
    ensure!(
        w.kinds.contains(&Kind::Keepalive),
        "`sleep 17` was silent for 17 s and its stream carried no Keepalive; a plugin must send \
         one whenever it has sent no frame for 15 s (frames: {})",
        w.kinds_text()
    );
    Ok(())
}

/// A directory of the suite's own machine, outside every environment, for the symlink cases.
fn outside_dir() -> Check<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("kiln-conformance-outside-")
        .tempdir()
        .map_err(|e| Stop::Fail(format!("creating a directory outside the environment: {e}")))
}

/// Staged files never follow a symlink out of the environment: a job that replaced a
/// directory or a file of its runner area with a symlink pointing outside must not make the
/// plugin write there (refusing the exec, or replacing the link, are both fine).
///
/// Observable when the suite shares a filesystem with the place the plugin stages in (a
/// host plugin, a Docker plugin staging through a host directory); elsewhere it passes.
pub(crate) async fn symlink_staging(ctx: &Ctx<'_>) -> Check {
    ctx.require_feature("exec_files", ctx.caps.features.exec_files)?;
    let outside = outside_dir()?;
    let out = outside.path().to_string_lossy().into_owned();
    let target = outside.path().join("target");
    std::fs::write(&target, b"original").map_err(|e| Stop::Fail(format!("{e}")))?;
    let env = ctx.env().await?;
    let rf = &env.paths.runner_files;
    let n = nonce(6);
    let link_dir = join(rf, &format!("evil-dir-{n}"));
    let link_file = join(rf, &format!("evil-file-{n}"));
    ctx.sh_ok(
        &env,
        &format!(
            "ln -s {} {} && ln -s {} {}",
            sq(&out),
            sq(&link_dir),
            sq(&target.to_string_lossy()),
            sq(&link_file)
        ),
    )
    .await?;
    for path in [join(&link_dir, "staged.sh"), link_file.clone()] {
        let mut req = ctx.sh_request(&env, "true");
        req.files = vec![StagedFile {
            path: path.clone(),
            content: Bytes::from_static(b"pwned"),
            mode: 0o755,
        }];
        let _ = try_run(ctx, req).await?;
        let leaked = outside.path().join("staged.sh");
        ensure!(
            !leaked.exists(),
            "staging {path:?}, whose parent {link_dir:?} is a symlink to {out:?} outside the \
             environment, wrote {}: staged files must never follow a symlink out",
            leaked.display()
        );
        let now = std::fs::read(&target).unwrap_or_default();
        ensure!(
            now == b"original",
            "staging {path:?} (a symlink to {}) changed that file outside the environment to {}: \
             a symlink at a staged path is replaced or refused, never followed",
            target.display(),
            shorten(&now)
        );
    }
    Ok(())
}

/// Collected files never follow a symlink out: a step that replaces a collected file (its
/// `GITHUB_ENV`) or a parent directory with a symlink to a file outside the environment
/// must not get that file's content back.
pub(crate) async fn symlink_collection(ctx: &Ctx<'_>) -> Check {
    ctx.require_feature("exec_files", ctx.caps.features.exec_files)?;
    let outside = outside_dir()?;
    let out = outside.path().to_string_lossy().into_owned();
    let secret = format!("kiln-secret-{}", nonce(10));
    std::fs::write(outside.path().join("secret"), secret.as_bytes())
        .map_err(|e| Stop::Fail(format!("{e}")))?;
    let env = ctx.env().await?;
    let rf = &env.paths.runner_files;
    let n = nonce(6);
    let env_file = join(rf, &format!("env-file-{n}"));
    let link_dir = join(rf, &format!("evil-dir-{n}"));
    let script = format!(
        "rm -f {ef}; ln -s {s} {ef}; ln -s {o} {d}",
        ef = sq(&env_file),
        s = sq(&format!("{out}/secret")),
        o = sq(&out),
        d = sq(&link_dir)
    );
    let mut req = ctx.sh_request(&env, &script);
    req.files = vec![StagedFile { path: env_file.clone(), content: Bytes::new(), mode: 0 }];
    let via_dir = join(&link_dir, "secret");
    req.collect = vec![env_file.clone(), via_dir.clone()];
    match try_run(ctx, req).await? {
        Err(_) => {}
        Ok(w) => {
            let x = w.exited()?;
            for f in &x.files {
                ensure!(
                    !f.content.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "collecting {:?} returned the content of {out}/secret, a file outside the \
                     environment that the step linked it to: collected files must never \
                     follow a symlink out (report them missing)",
                    f.path
                );
            }
        }
    }
    Ok(())
}

/// Remove ends every process the environment's execs started: a background one, a
/// double-forked one and one that left the process group with `setsid` (§5.12).
pub(crate) async fn remove_ends_processes(ctx: &Ctx<'_>) -> Check {
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
    let existed = ctx.remove(&env.id).await?.or_fail(format!("remove {}", env.id))?;
    ensure!(existed, "remove returned existed=false");
    ctx.untrack(&env.id);
    let probe = ctx.env().await?;
    let left = ctx.wait_unmarked(&probe, &marker, Duration::from_secs(5)).await?;
    ensure!(
        left == 0,
        "{left} of the {seen} processes started by an exec of {} (a background one, a \
         double-forked one{}) still run 5 s after Remove returned: Remove must end every \
         process the environment's execs started (a cgroup, a subreaper, or the backend's own \
         boundary), not only their process groups",
        env.id,
        if expected == 3 {
            ", one in its own session (setsid, empty environment, cwd /)"
        } else {
            ""
        }
    );
    Ok(())
}
