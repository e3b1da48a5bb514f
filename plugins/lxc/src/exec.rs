//! Exec through `lxc-attach`: stage files through the rootfs, attach with exactly the
//! requested environment, run the program in a new session (its own process group) inside
//! the container, and stream it with the SDK's `child` module.
//!
//! The process group: `lxc-attach`'s child is the program (after `setsid`), so seen from the
//! host the group id is that child's pid, found in `/proc` when a signal is first sent (a
//! process group is one across PID namespaces). `lxc-attach` itself stays outside the group:
//! a signal to the step never ends the front-end before the step, and it reports the step's
//! exit (a signalled process as `128 + n`, reported as the signal when kiln sent it).

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kiln_plugin_sdk::child::{self, ExecHandle, Plan, ProcessTree};
use kiln_plugin_sdk::{Error, ExecRequest, ExecStream, Result};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::env::Env;
use crate::rootfs::Rootfs;

/// The search path of a request that names none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs inside the container: `$1` is the working directory, the rest the program and its
/// arguments.
const WRAPPER: &str = "cd -- \"$1\" 2>/dev/null || { printf 'kiln-lxc: working directory %s \
                       does not exist\\n' \"$1\" >&2; exit 127; }; shift; exec setsid -- \"$@\"";

/// The processes of one exec: `lxc-attach` (on the host) and the group its child leads.
pub(crate) struct AttachTree {
    attach: i32,
    group: OnceLock<i32>,
}

impl AttachTree {
    /// The group of the program: `lxc-attach`'s child, once it has called `setsid`. Waits a
    /// little for it right after the start.
    fn group(&self) -> Option<i32> {
        if let Some(g) = self.group.get() {
            return Some(*g);
        }
        for _ in 0..50 {
            let procs = scan();
            if let Some(p) = procs.iter().find(|p| p.ppid == self.attach && p.pgrp == p.pid) {
                let _ = self.group.set(p.pid);
                return Some(p.pid);
            }
            if !procs.iter().any(|p| p.pid == self.attach && p.state != 'Z') {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

impl ProcessTree for AttachTree {
    fn signal(&self, signal: Signal) -> bool {
        match self.group() {
            Some(g) => killpg(Pid::from_raw(g), signal).is_ok(),
            // No program (yet): the front-end itself.
            None => kill(Pid::from_raw(self.attach), signal).is_ok(),
        }
    }

    fn alive(&self) -> bool {
        let Some(g) = self.group.get().copied() else { return false };
        killpg(Pid::from_raw(g), None).is_ok()
            && scan().iter().any(|p| p.pgrp == g && p.state != 'Z')
    }
}

/// One line of `/proc/<pid>/stat`, the fields used.
struct Proc {
    pid: i32,
    state: char,
    ppid: i32,
    pgrp: i32,
}

/// Every process of this machine.
fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut f = rest.split_whitespace();
        let (Some(state), Some(ppid), Some(pgrp)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        out.push(Proc {
            pid,
            state: state.chars().next().unwrap_or('?'),
            ppid: ppid.parse().unwrap_or(0),
            pgrp: pgrp.parse().unwrap_or(0),
        });
    }
    out
}

/// Validates the request, stages its files, starts `lxc-attach` and returns the handle and
/// the stream. The exec id is reserved by the caller; the container runs (`rootfs`).
pub(crate) fn start(
    root: &Path,
    env: &Arc<Env>,
    rootfs: Arc<Rootfs>,
    req: ExecRequest,
) -> Result<(Arc<ExecHandle>, ExecStream)> {
    let started = Instant::now();
    if req.argv.is_empty() {
        return Err(Error::invalid_argument(
            "argv is empty: the lxc backend has no entrypoint to run",
        )
        .field("argv"));
    }
    let cwd = if req.working_dir.is_empty() {
        crate::env::paths(&env.dir).workspace
    } else {
        crate::rootfs::components(&req.working_dir, "working_dir")?;
        req.working_dir.clone()
    };
    for (i, c) in req.collect.iter().enumerate() {
        crate::rootfs::components(c, &format!("collect[{i}]"))?;
    }
    for (i, f) in req.files.iter().enumerate() {
        rootfs.write(&f.path, &f.content, f.mode, &format!("files[{i}].path"))?;
    }

    let mut path = None;
    for v in &req.env {
        if v.name == "PATH" {
            path = Some(prepend_path(&req.path_prepend, &v.value));
        }
    }
    let path = path.unwrap_or_else(|| prepend_path(&req.path_prepend, DEFAULT_PATH));
    let mut script = String::new();
    if !req.env.iter().any(|v| v.name == "container") {
        // lxc-attach adds container=lxc; the request's env is the complete environment.
        script.push_str("unset container; ");
    }
    script.push_str(WRAPPER);

    let mut cmd = tokio::process::Command::new("lxc-attach");
    cmd.arg("-P")
        .arg(root)
        .args(["-n", &env.id, "--keep-env", "--", "/bin/sh", "-c", &script, "kiln-lxc", &cwd])
        .args(&req.argv)
        .env_clear();
    for v in &req.env {
        if v.name != "PATH" {
            cmd.env(&v.name, &v.value);
        }
    }
    cmd.env("PATH", path)
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);

    let collect_limit = child::collect_limit_or_default(req.collect_limit_bytes);
    let names = req.collect.clone();
    let collect_root = Arc::clone(&rootfs);
    let collect: child::Collector = Box::new(move || {
        let files = names.into_iter().map(|n| {
            let f = collect_root.read(&n);
            (n, f)
        });
        child::collect_files(files, collect_limit)
    });
    let plan = Plan {
        timeout: req.timeout.filter(|t| !t.is_zero()),
        grace: child::grace_or_default(req.grace),
        started,
        collect,
        fold_signal_codes: true,
        on_tree_gone: None,
    };
    let mut spawned =
        cmd.spawn().map_err(|e| Error::unavailable(format!("cannot run lxc-attach: {e}")))?;
    let attach = spawned.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let tree = Arc::new(AttachTree { attach, group: OnceLock::new() });
    let handle = ExecHandle::new(tree, spawned.stdin.take());
    let stream = child::stream(spawned, Arc::clone(&handle), plan)?;
    Ok((handle, stream))
}

fn prepend_path(prepend: &[String], path: &str) -> String {
    let mut out = prepend.join(":");
    if !path.is_empty() {
        if !out.is_empty() {
            out.push(':');
        }
        out.push_str(path);
    }
    out
}
