//! Process groups: signalling them, and deciding whether a group recorded earlier still
//! belongs to an environment before it is killed (rule 9: never kill by PID alone).
//!
//! A group whose leader this plugin process started and has not reaped yet is certainly
//! ours. Any other recorded group (its leader exited, or it was read from the `pgids` log
//! after a restart) is killed only when `/proc` shows that it still exists and one of its
//! members either is the recorded leader (same start time) or started no earlier than the
//! leader and has its working directory inside the environment or the environment's
//! directory in its environment variables (`GITHUB_WORKSPACE`, `RUNNER_TEMP`, …). A group that
//! fails these checks is left alone and logged.
//!
//! Process groups do not hold a process that calls `setsid` or double-forks, so every
//! environment also has a **containment** ([`Containment`], §5.12 of the protocol): a cgroup
//! v2 of its own (`<own cgroup>/kiln-envs/kiln-<hash of root>-<env id>`) where the cgroup
//! filesystem is writable (the plugin moves itself into the
//! environment's cgroup around each spawn, under a lock, so the child is born there and
//! cannot fork before it is contained; Remove freezes it, sends SIGTERM to every member, waits
//! the grace, then `cgroup.kill`; the cgroup is a boundary no PID reuse can cross and it
//! survives a plugin restart), else the plugin is a child subreaper (orphans of its execs
//! are re-parented to it and reaped) and Remove also ends every process that started after
//! the environment and works inside or names its directory. Without a cgroup, a process
//! that empties its environment and leaves the directory is not found: see the protocol
//! README §5.12.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Sends `signal` to the process group `pgid`. Returns whether the group existed.
pub(crate) fn signal_group(pgid: i32, signal: Signal) -> bool {
    if pgid <= 1 {
        return false;
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(pgid, %signal, error = %e, "cannot signal process group");
            false
        }
    }
}

/// Whether the process group `pgid` may have members (zombies included): one syscall.
fn group_signallable(pgid: i32) -> bool {
    pgid > 1 && killpg(Pid::from_raw(pgid), None).is_ok()
}

/// Whether the process group `pgid` has living members. Zombies do not count: where PID 1
/// does not reap orphans, a group of zombies would otherwise look alive forever.
pub(crate) fn group_alive(pgid: i32) -> bool {
    group_signallable(pgid) && (!has_proc() || ProcTable::scan().alive(pgid))
}

/// Of `groups`, those with living members (one `/proc` scan at most).
pub(crate) fn alive_groups(groups: &[i32]) -> Vec<i32> {
    let signallable: Vec<i32> = groups.iter().copied().filter(|&g| group_signallable(g)).collect();
    if signallable.is_empty() || !has_proc() {
        return signallable;
    }
    let table = ProcTable::scan();
    signallable.into_iter().filter(|&g| table.alive(g)).collect()
}

fn has_proc() -> bool {
    Path::new("/proc/self/stat").exists()
}

/// The kernel's boot id (empty where there is no `/proc`).
pub(crate) fn kernel_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pgrp: i32,
    /// Clock ticks since boot.
    start: u64,
    zombie: bool,
}

fn stat(pid: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    // stime cutime cstime priority nice threads itrealvalue starttime …"; comm may hold spaces.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        zombie: matches!(*fields.first()?, "Z" | "X"),
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Start time of a process (clock ticks since boot), 0 when unknown.
pub(crate) fn start_time(pid: u32) -> u64 {
    stat(&pid.to_string()).map_or(0, |s| s.start)
}

/// A process of a group.
#[derive(Debug, Clone, Copy)]
struct Member {
    pid: i32,
    start: u64,
    zombie: bool,
}

/// A snapshot of the processes of this machine, by process group.
pub(crate) struct ProcTable {
    by_group: HashMap<i32, Vec<Member>>,
}

impl ProcTable {
    /// Reads `/proc`.
    pub(crate) fn scan() -> ProcTable {
        let mut by_group: HashMap<i32, Vec<Member>> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(pid) = name.parse::<i32>() else { continue };
                if let Some(s) = stat(name) {
                    by_group.entry(s.pgrp).or_default().push(Member {
                        pid,
                        start: s.start,
                        zombie: s.zombie,
                    });
                }
            }
        }
        ProcTable { by_group }
    }

    /// Every process of the snapshot.
    fn members(&self) -> impl Iterator<Item = &Member> {
        self.by_group.values().flatten()
    }

    /// Whether the group has members that are not zombies.
    fn alive(&self, pgid: i32) -> bool {
        self.by_group.get(&pgid).is_some_and(|m| m.iter().any(|m| !m.zombie))
    }

    /// Whether the group `pgid`, whose leader started at `start`, still has living members
    /// and belongs to the environment in `dir` (see the module documentation).
    pub(crate) fn belongs(&self, pgid: i32, start: u64, dir: &Path) -> bool {
        let Some(members) = self.by_group.get(&pgid) else {
            return false;
        };
        if !members.iter().any(|m| !m.zombie) {
            return false;
        }
        if start != 0 && members.iter().any(|m| m.pid == pgid && m.start == start) {
            return true;
        }
        members.iter().any(|m| !m.zombie && m.start >= start && references(m.pid, dir))
    }
}

/// Whether a process works inside `dir` or names it in its environment.
fn references(pid: i32, dir: &Path) -> bool {
    if std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
        return true;
    }
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    contains_path(&environ, dir.as_os_str().as_encoded_bytes())
}

/// Whether `hay` contains `path` as a whole path (not as the prefix of a longer name).
fn contains_path(hay: &[u8], path: &[u8]) -> bool {
    if path.is_empty() || hay.len() < path.len() {
        return false;
    }
    (0..=hay.len() - path.len()).any(|i| {
        hay[i..].starts_with(path)
            && hay.get(i + path.len()).is_none_or(|&b| matches!(b, b'/' | b'\0' | b':'))
    })
}

/// How an environment's processes are held together (`--containment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ContainmentMode {
    /// A cgroup v2 per environment when the cgroup filesystem is writable, else `subreaper`.
    #[default]
    Auto,
    /// Child subreaper and `/proc` evidence only (what `auto` falls back to).
    Subreaper,
    /// Process groups only: a process that calls `setsid` outlives its environment. For tests
    /// of the conformance suite (a mutant it must catch), never for use.
    Groups,
}

/// The containment in force.
#[derive(Debug, Clone)]
pub(crate) enum Containment {
    /// One cgroup per environment, `base/<tag>-<env id>`; `home` is the plugin's own cgroup.
    Cgroup {
        /// Where environments' cgroups are created (`<own cgroup>/kiln-envs`, shared by every
        /// plugin of this cgroup, so that any of them can sweep empty leftovers).
        base: PathBuf,
        /// This plugin's tag (a hash of its root), prefixing its environments' cgroups.
        tag: String,
        /// The cgroup the plugin returns to after each spawn.
        home: PathBuf,
    },
    /// Subreaper and evidence.
    Subreaper,
    /// Process groups only.
    Groups,
}

/// The file in an environment's directory naming its cgroup (so a plugin restarted in
/// another cgroup still finds it).
pub(crate) const CGROUP_FILE: &str = "cgroup";

impl Containment {
    /// Resolves `mode` for a plugin whose root is `root`: the cgroup base is
    /// `<own cgroup>/kiln-<hash of root>` on the cgroup v2 mount.
    pub(crate) fn new(mode: ContainmentMode, root: &Path) -> Containment {
        if mode == ContainmentMode::Groups {
            return Containment::Groups;
        }
        if mode == ContainmentMode::Auto
            && let Some((base, home, tag)) = cgroup_base(root)
        {
            tracing::debug!(base = %base.display(), "one cgroup per environment");
            sweep(&base);
            return Containment::Cgroup { base, tag, home };
        }
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper");
        }
        tracing::info!("no writable cgroup v2: environments are held by a subreaper and /proc");
        spawn_orphan_reaper();
        Containment::Subreaper
    }

    /// The environment's cgroup, created on first use and recorded in its directory.
    fn env_cgroup(base: &Path, tag: &str, env_id: &str, env_dir: &Path) -> Option<PathBuf> {
        let cg = base.join(format!("{tag}-{env_id}"));
        if !cg.is_dir() {
            if let Err(e) = std::fs::create_dir_all(&cg)
                && e.kind() != std::io::ErrorKind::AlreadyExists
            {
                tracing::warn!(cgroup = %cg.display(), error = %e, "cannot create the cgroup");
                return None;
            }
            let _ = std::fs::write(env_dir.join(CGROUP_FILE), cg.as_os_str().as_encoded_bytes());
        }
        Some(cg)
    }

    /// Runs `spawn` so that the child is born in the environment's cgroup: the plugin moves
    /// itself there (all its threads), spawns, and moves back, under a process-wide lock.
    /// Where that fails the child is moved right after the spawn instead (a process that
    /// forks within microseconds of its start could then escape; the evidence scan of
    /// [`Containment::end_all`] still finds it by its directory).
    pub(crate) fn spawn_in<T>(
        &self,
        env_id: &str,
        env_dir: &Path,
        spawn: impl FnOnce() -> std::io::Result<T>,
        pid_of: impl Fn(&T) -> Option<u32>,
    ) -> std::io::Result<T> {
        static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let Containment::Cgroup { base, tag, home } = self else { return spawn() };
        let Some(cg) = Self::env_cgroup(base, tag, env_id, env_dir) else { return spawn() };
        let me = std::process::id().to_string();
        let _guard = SPAWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut entered = std::fs::write(cg.join("cgroup.procs"), &me).is_ok();
        if !entered {
            // Swept as empty by another plugin a moment ago: made again.
            let _ = std::fs::create_dir_all(&cg);
            entered = std::fs::write(cg.join("cgroup.procs"), &me).is_ok();
        }
        let spawned = spawn();
        if entered {
            if let Err(e) = std::fs::write(home.join("cgroup.procs"), &me) {
                tracing::error!(cgroup = %home.display(), error = %e, "cannot return to the plugin's cgroup");
            }
        } else if let Ok(child) = &spawned
            && let Some(pid) = pid_of(child)
            && let Err(e) = std::fs::write(cg.join("cgroup.procs"), pid.to_string())
        {
            tracing::debug!(cgroup = %cg.display(), pid, error = %e, "cannot move into the cgroup");
        }
        spawned
    }

    /// Removes the empty environment cgroups when the plugin exits (also those of
    /// environments never removed, e.g. by tests); a cgroup with processes stays for `Remove`.
    pub(crate) fn release(&self) {
        if let Containment::Cgroup { base, .. } = self {
            sweep(base);
        }
    }

    /// Ends every process of the environment held by the containment: SIGTERM, up to `grace`,
    /// SIGKILL; then removes its cgroup. `created_ms` is the environment's creation time.
    pub(crate) async fn end_all(
        &self,
        env_id: &str,
        env_dir: &Path,
        created_ms: i64,
        grace: Duration,
    ) {
        if let Containment::Groups = self {
            return;
        }
        let recorded = std::fs::read(env_dir.join(CGROUP_FILE))
            .ok()
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).trim()));
        let mut cgroups: Vec<PathBuf> = recorded.into_iter().collect();
        if let Containment::Cgroup { base, tag, .. } = self {
            let own = base.join(format!("{tag}-{env_id}"));
            if !cgroups.contains(&own) {
                cgroups.push(own);
            }
        }
        for cg in cgroups.iter().filter(|c| c.join("cgroup.procs").is_file()) {
            end_cgroup(cg, grace).await;
        }
        // Evidence: processes started after the environment that work inside or name its
        // directory (orphans of a plugin without cgroups, or of one that was restarted).
        let since = ticks_at(created_ms);
        let me = std::process::id() as i32;
        let pids: Vec<i32> = ProcTable::scan()
            .members()
            .filter(|m| m.pid != me && !m.zombie && m.start >= since && references(m.pid, env_dir))
            .map(|m| m.pid)
            .collect();
        if !pids.is_empty() {
            tracing::debug!(env = env_id, ?pids, "ending processes that refer to the environment");
            signal_pids(&pids, nix::sys::signal::Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline && pids.iter().any(|&p| pid_alive(p)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            signal_pids(&pids, nix::sys::signal::Signal::SIGKILL);
        }
        if let Containment::Subreaper = self {
            reap_orphans();
        }
    }
}

fn signal_pids(pids: &[i32], signal: nix::sys::signal::Signal) {
    for &p in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), signal);
    }
}

fn pid_alive(pid: i32) -> bool {
    stat(&pid.to_string()).is_some_and(|s| !s.zombie)
}

/// As a subreaper, this process inherits the orphans of every exec: each is reaped when it
/// exits (on SIGCHLD), not only at Remove, so a later step never sees a zombie of an earlier one
/// as alive (`kill -0`).
fn spawn_orphan_reaper() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no runtime: orphans are reaped at Remove only");
        return;
    };
    runtime.spawn(async {
        let mut sigchld =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGCHLD: orphans are reaped at Remove only");
                    return;
                }
            };
        while sigchld.recv().await.is_some() {
            reap_orphans();
        }
    });
}

/// Reaps children that exited and that no exec waits for (orphans re-parented to this
/// subreaper). Only zombies whose parent is this process are waited for, by pid, so the
/// status of an exec's own main process is never taken from its waiter.
pub(crate) fn reap_orphans() {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(pid) = name.parse::<i32>() else { continue };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // An exec's main process leads its own group (pgid == pid): its waiter reaps it.
        if f.first() == Some(&"Z") && f.get(1) == Some(&me.as_str()) && f.get(2) != Some(&name) {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Freezes the cgroup, sends SIGTERM to every member, thaws it, waits up to `grace` for it
/// to empty, then kills what is left and removes it.
async fn end_cgroup(cg: &Path, grace: Duration) {
    let members = || -> Vec<i32> {
        std::fs::read_to_string(cg.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let freeze = cg.join("cgroup.freeze");
    let frozen = std::fs::write(&freeze, "1").is_ok();
    signal_pids(&members(), nix::sys::signal::Signal::SIGTERM);
    if frozen {
        let _ = std::fs::write(&freeze, "0");
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !members().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = members();
        if left.is_empty() {
            break;
        }
        if std::fs::write(cg.join("cgroup.kill"), "1").is_err() {
            signal_pids(&left, nix::sys::signal::Signal::SIGKILL);
        }
        if tokio::time::Instant::now() >= stop {
            tracing::warn!(cgroup = %cg.display(), ?left, "processes survived SIGKILL");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Empty once its members are reaped (zombies still count): retry briefly.
    for _ in 0..100 {
        if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
            return;
        }
        reap_orphans();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(cgroup = %cg.display(), "cannot remove the cgroup");
}

/// Removes every environment cgroup under `base` that holds no process. Always safe: an
/// environment's cgroup is made again at its next spawn (and its path stays the same).
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let cg = entry.path();
        let empty =
            std::fs::read_to_string(cg.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if empty {
            let _ = std::fs::remove_dir(&cg);
        }
    }
}

/// `<cgroup2 mount><own cgroup>/kiln-envs`, created, when writable; the own cgroup's
/// directory; and this plugin's tag (`kiln-<hash of root>`).
fn cgroup_base(root: &Path) -> Option<(PathBuf, PathBuf, String)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // "36 25 0:30 / /sys/fs/cgroup rw,… - cgroup2 cgroup2 rw,…"
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim().trim_start_matches('/');
    let tag = {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in root.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("kiln-{h:016x}")
    };
    let home = mount.join(own);
    let base = home.join("kiln-envs");
    match std::fs::create_dir(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    // Writable for real: a probe cgroup can be made and removed.
    let probe = base.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir(&probe).ok()?;
    std::fs::remove_dir(&probe).ok()?;
    (base.join("cgroup.procs").is_file() && home.join("cgroup.procs").is_file())
        .then_some((base, home, tag))
}

/// Clock ticks since boot at the Unix time `unix_ms` (0 when unknown: every process counts
/// as later).
fn ticks_at(unix_ms: i64) -> u64 {
    let Some(btime) = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<i64>().ok()))
    }) else {
        return 0;
    };
    // USER_HZ: 100 on every Linux architecture kiln runs on.
    let hz = 100;
    let since_boot_ms = unix_ms - btime * 1000;
    // One second of slack for the coarse boot time.
    u64::try_from((since_boot_ms - 1000).max(0) * hz / 1000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "4242 (a b) c) S 1 4240 4240 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 987654 \
                    1000 100";
        assert_eq!(parse_stat(line), Some(Stat { pgrp: 4240, start: 987654, zombie: false }));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn whole_paths_only() {
        let env = b"A=1\0GITHUB_WORKSPACE=/r/env-1/workspace\0";
        assert!(contains_path(env, b"/r/env-1"));
        assert!(!contains_path(env, b"/r/env"));
        assert!(contains_path(b"X=/r/env-1", b"/r/env-1"));
        assert!(!contains_path(b"X=/r/env-10", b"/r/env-1"));
    }

    #[test]
    fn own_process_is_found() {
        if !Path::new("/proc/self/stat").exists() {
            return;
        }
        let me = std::process::id();
        let start = start_time(me);
        assert!(start > 0);
        let pgid = nix::unistd::getpgrp().as_raw();
        let table = ProcTable::scan();
        let cwd = std::env::current_dir().unwrap();
        assert!(table.belongs(pgid, 0, &cwd));
        assert!(!table.belongs(pgid, u64::MAX, &cwd));
    }
}
