//! Exec, the hot path: stage files, spawn one process in a new process group, and stream it
//! with the SDK's [`kiln_plugin_sdk::child`] module (output as it arrives, exactly one
//! `Exited` frame).
//!
//! The exec is finished when its main process exits (rule 6). Output is then drained while
//! it keeps coming, at most [`kiln_plugin_sdk::child::DRAIN_MAX`]; processes the step left in
//! the background keep running (their output is read and discarded, so they never get
//! SIGPIPE) until the environment is removed. Timeout and a dropped stream both mean SIGTERM
//! to the group, the grace period, then SIGKILL.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use kiln_plugin_sdk::child::{self, Plan, ProcessTree};
use kiln_plugin_sdk::{Error, ExecRequest, ExecStream, Result};
use nix::sys::signal::Signal;

use crate::env::{Env, Group};
use crate::procs;

/// A running or finished exec, reachable by id from any connection: the SDK's handle, and the
/// process group it runs in.
pub(crate) struct ExecHandle {
    pub(crate) env_id: String,
    pub(crate) pgid: i32,
    pub(crate) inner: Arc<child::ExecHandle>,
}

impl ExecHandle {
    /// Whether the main process has exited.
    pub(crate) fn is_done(&self) -> bool {
        self.inner.is_done()
    }
}

/// An exec's process tree: its process group on this machine.
struct ProcessGroup(i32);

impl ProcessTree for ProcessGroup {
    fn signal(&self, signal: Signal) -> bool {
        procs::signal_group(self.0, signal)
    }

    fn alive(&self) -> bool {
        procs::group_alive(self.0)
    }
}

/// Checks that `path` is absolute, has no `..` and lies inside `dir` (lexically: the host
/// backend runs the workflow's own code as this user, so it is no boundary against it).
pub(crate) fn inside(dir: &Path, path: &str, field: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid_argument(format!("{field} {path:?} is not an absolute path"))
            .field(field));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid_argument(format!("{field} {path:?} contains '..'")).field(field));
    }
    if !p.starts_with(dir) {
        return Err(Error::permission_denied(format!(
            "{field} {path:?} is outside the environment's directory {}",
            dir.display()
        ))
        .field(field));
    }
    Ok(p.to_path_buf())
}

/// Validates the request against the environment, stages files, spawns the process and
/// starts the task that streams it. The exec id is reserved by the caller.
pub(crate) fn start(
    env: &Arc<Env>,
    req: ExecRequest,
    kernel_boot: &str,
    containment: &procs::Containment,
) -> Result<(Arc<ExecHandle>, ExecStream)> {
    if req.tty {
        // The host plugin does not declare `tty` (§3.3: refused, never ignored).
        return Err(Error::unimplemented(
            "tty = true: the host backend does not allocate pseudo-terminals (feature tty is not \
             declared)",
        )
        .fault(kiln_plugin_sdk::Fault::Config)
        .field("tty"));
    }
    let Some(program) = req.argv.first() else {
        return Err(Error::invalid_argument(
            "argv is empty: the host backend has no entrypoint to run",
        )
        .field("argv"));
    };
    let cwd = if req.working_dir.is_empty() {
        PathBuf::from(&env.meta.paths.workspace)
    } else {
        let p = PathBuf::from(&req.working_dir);
        if !p.is_absolute() {
            return Err(Error::invalid_argument(format!(
                "working_dir {:?} is not an absolute path",
                req.working_dir
            ))
            .field("working_dir"));
        }
        p
    };
    let mut collect = Vec::with_capacity(req.collect.len());
    for (i, c) in req.collect.iter().enumerate() {
        collect.push(inside(&env.dir, c, &format!("collect[{i}]"))?);
    }
    for (i, f) in req.files.iter().enumerate() {
        let path = inside(&env.dir, &f.path, &format!("files[{i}].path"))?;
        stage(&env.dir, &path, &f.content, f.mode).map_err(|e| {
            let field = format!("files[{i}].path");
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Error::permission_denied(format!("staging {}: {e}", path.display())).field(field)
            } else {
                Error::io(format!("staging {}", path.display()), &e).field(field)
            }
        })?;
    }

    let mut path = None;
    for v in &req.env {
        if v.name == "PATH" {
            path = Some(prepend_path(&req.path_prepend, &v.value));
        }
    }
    if path.is_none() && !req.path_prepend.is_empty() {
        path = Some(prepend_path(&req.path_prepend, ""));
    }
    // The program is looked up here, in the step's PATH, so that the child is started with
    // posix_spawn (vfork) instead of fork + execvp.
    let mut cmd = match path.as_deref().and_then(|p| lookup(program, p, &cwd)) {
        Some(found) => {
            let mut cmd = tokio::process::Command::new(found);
            cmd.arg0(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    };
    cmd.args(&req.argv[1..]).env_clear();
    for v in &req.env {
        if v.name != "PATH" {
            cmd.env(&v.name, &v.value);
        }
    }
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    cmd.current_dir(&cwd)
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);

    let collect_limit = child::collect_limit_or_default(req.collect_limit_bytes);
    let names = req.collect.clone();
    let dir = env.dir.clone();
    let collector: child::Collector = Box::new(move || {
        // Never through a symlink: a step that linked its GITHUB_ENV to a file outside the
        // environment gets it back missing.
        let files = collect.into_iter().zip(names).map(|(path, name)| {
            let f = kiln_plugin_sdk::beneath::open_file(&dir, &path).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "cannot read collected file");
                None
            });
            (name, f)
        });
        child::collect_files(files, collect_limit)
    });
    let started = Instant::now();
    let spawned = {
        let mut st = crate::lock(&env.state);
        if st.removed {
            return Err(Error::not_found(format!("environment {:?} was removed", env.id))
                .field("environment_id"));
        }
        match containment.spawn_in(&env.id, &env.dir, || cmd.spawn(), tokio::process::Child::id) {
            Ok(mut child) => {
                let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
                let start = procs::start_time(u32::try_from(pgid).unwrap_or(0));
                let stdin = if req.stdin { child.stdin.take() } else { None };
                let handle = Arc::new(ExecHandle {
                    env_id: env.id.clone(),
                    pgid,
                    inner: child::ExecHandle::new(Arc::new(ProcessGroup(pgid)), stdin),
                });
                env.log_group(&mut st, pgid, start, kernel_boot, &req.exec_id);
                st.groups.push(Group { pgid, start, exec: Some(Arc::clone(&handle)) });
                Ok((child, handle))
            }
            Err(e) => Err(e),
        }
    };
    match spawned {
        Ok((process, handle)) => {
            let (env, pgid) = (Arc::clone(env), handle.pgid);
            let plan = Plan {
                timeout: req.timeout.filter(|t| !t.is_zero()),
                grace: child::grace_or_default(req.grace),
                started,
                collect: collector,
                fold_signal_codes: false,
                on_tree_gone: Some(Box::new(move || env.forget_group(pgid))),
            };
            let stream = child::stream(process, Arc::clone(&handle.inner), plan)?;
            Ok((handle, stream))
        }
        Err(e) => spawn_failed(e, program, &cwd, collector, started, &env.id),
    }
}

/// A process that could not start: like a shell, 127 when the program or the working
/// directory does not exist and 126 when it cannot be executed. Other failures (out of
/// processes or memory) are the infrastructure's.
fn spawn_failed(
    e: std::io::Error,
    program: &str,
    cwd: &Path,
    collect: child::Collector,
    started: Instant,
    env_id: &str,
) -> Result<(Arc<ExecHandle>, ExecStream)> {
    let (code, message) = match e.kind() {
        std::io::ErrorKind::NotFound if !cwd.is_dir() => {
            (127, format!("kiln-host: working directory {} does not exist\n", cwd.display()))
        }
        std::io::ErrorKind::NotFound => (127, format!("kiln-host: {program}: command not found\n")),
        std::io::ErrorKind::PermissionDenied => {
            (126, format!("kiln-host: {program}: permission denied\n"))
        }
        _ => {
            return Err(Error::unavailable(format!("cannot start {program}: {e}")));
        }
    };
    let handle = Arc::new(ExecHandle {
        env_id: env_id.to_owned(),
        pgid: 0,
        inner: child::ExecHandle::finished(Arc::new(ProcessGroup(0))),
    });
    Ok((handle, child::not_started(code, message, collect, started)))
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

/// The first executable regular file named `program` in `path`, as `execvp` would find it;
/// `None` when `program` holds a slash or is not found (the spawn then reports it). An empty
/// entry of `path` is the working directory.
fn lookup(program: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    if program.contains('/') || program.is_empty() {
        return None;
    }
    path.split(':').find_map(|dir| {
        let candidate =
            if dir.is_empty() { cwd.join(program) } else { Path::new(dir).join(program) };
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// Writes a staged file with exactly `mode` (0 = 0644), creating its parent directories,
/// never through a symlink (`kiln_plugin_sdk::beneath`: a link in a parent position is
/// refused, one at the path itself replaced).
///
/// An existing file (the runner stages the same paths step after step) is overwritten in
/// place and then cut to length, not truncated first: freeing its block and allocating a new
/// one each step costs more than the step's own process on some filesystems (ext4 with
/// `discard`).
fn stage(dir: &Path, path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
    kiln_plugin_sdk::beneath::write_file(dir, path, content, mode)
}
