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

use std::collections::HashMap;
use std::path::Path;

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
