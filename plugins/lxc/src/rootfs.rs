//! A running container's root filesystem as the host sees it (`/proc/<init>/root`), with
//! every path resolved by `openat2(RESOLVE_IN_ROOT)`: `..` and symlinks (absolute ones too)
//! are resolved as inside the container, so no path can lead out of it, whatever the job
//! put there. Used for staged and collected step files, CopyIn and CopyOut.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use kiln_plugin_sdk::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

/// A container's root directory, opened.
#[derive(Debug)]
pub(crate) struct Rootfs {
    root: OwnedFd,
}

/// A directory inside the container, opened (`O_PATH`), usable as a host path through
/// `/proc/self/fd`.
pub(crate) struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// A host path naming this directory while it is open.
    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// Checks that `path` is absolute without `..`; returns its components below `/`.
pub(crate) fn components<'a>(path: &'a str, field: &str) -> Result<Vec<&'a std::ffi::OsStr>> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid_argument(format!("{field} {path:?} is not an absolute path"))
            .field(field));
    }
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                return Err(
                    Error::invalid_argument(format!("{field} {path:?} contains '..'")).field(field)
                );
            }
            _ => {}
        }
    }
    Ok(out)
}

impl Rootfs {
    /// The root of the process `pid` (the container's init).
    pub(crate) fn open(pid: i32) -> std::io::Result<Rootfs> {
        let root = File::open(format!("/proc/{pid}/root"))?;
        Ok(Rootfs { root: root.into() })
    }

    fn open_at(&self, rel: &Path, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let how =
            OpenHow::new().flags(flags | OFlag::O_CLOEXEC).mode(mode).resolve(resolve_flags());
        openat2(&self.root, rel, how)
    }

    /// Opens the directory `path`, creating what is missing of it (0755).
    pub(crate) fn dir(&self, path: &str, field: &str) -> Result<Dir> {
        let comps = components(path, field)?;
        let mut rel = PathBuf::new();
        let mut fd = self
            .open_at(&rel, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
            .map_err(|e| Error::unavailable(format!("opening the container's root: {e}")))?;
        for c in comps {
            rel.push(c);
            fd = match self.open_at(&rel, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(&fd, c, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io(path, field, e)),
                    }
                    self.open_at(&rel, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
                        .map_err(|e| io(path, field, e))?
                }
                Err(e) => return Err(io(path, field, e)),
            };
        }
        Ok(Dir { fd })
    }

    /// The parent directory of `path` (created when missing) and its last component.
    pub(crate) fn parent(&self, path: &str, field: &str) -> Result<(Dir, std::ffi::OsString)> {
        let comps = components(path, field)?;
        let Some((last, _)) = comps.split_last() else {
            return Err(
                Error::invalid_argument(format!("{field} {path:?} names the root")).field(field)
            );
        };
        let parent: PathBuf = comps[..comps.len() - 1].iter().collect();
        let dir = self.dir(&format!("/{}", parent.display()), field)?;
        Ok((dir, last.to_os_string()))
    }

    /// Opens the file `path` for reading; `None` when it does not exist.
    pub(crate) fn read(&self, path: &str) -> Option<File> {
        let comps = components(path, "path").ok()?;
        let rel: PathBuf = comps.iter().collect();
        self.open_at(&rel, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK, Mode::empty())
            .ok()
            .map(File::from)
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
    }

    /// Writes a staged file with exactly `mode` (0 = 0644), creating its parent directories; a
    /// symlink in its place is an error, never followed.
    pub(crate) fn write(&self, path: &str, content: &[u8], mode: u32, field: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
        let (dir, name) = self.parent(path, field)?;
        let fd = nix::fcntl::openat(
            &dir.fd,
            name.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| io(path, field, e))?;
        let mut f = File::from(fd);
        let mut write = || -> std::io::Result<()> {
            f.write_all(content)?;
            let meta = f.metadata()?;
            if meta.len() != content.len() as u64 {
                f.set_len(content.len() as u64)?;
            }
            if meta.permissions().mode() & 0o7777 != mode {
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            Ok(())
        };
        write().map_err(|e| Error::io(format!("staging {path}"), &e).field(field))
    }

    /// Whether `path` exists (without following its last component).
    pub(crate) fn exists(&self, path: &str) -> bool {
        let Ok(comps) = components(path, "path") else { return false };
        let rel: PathBuf = comps.iter().collect();
        self.open_at(&rel, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty()).is_ok()
    }
}

fn io(path: &str, field: &str, e: Errno) -> Error {
    let msg = match e {
        Errno::ENOTDIR => format!("{field} {path:?}: a component is not a directory"),
        Errno::ELOOP => format!("{field} {path:?}: a symlink is in the way"),
        Errno::EXDEV => format!("{field} {path:?} would leave the container"),
        e => format!("{field} {path:?}: {}", e.desc()),
    };
    match e {
        Errno::EACCES | Errno::EPERM | Errno::EXDEV => Error::permission_denied(msg),
        Errno::ENOSPC | Errno::EIO | Errno::EROFS => Error::unavailable(msg),
        _ => Error::invalid_argument(msg),
    }
    .field(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `RESOLVE_IN_ROOT` keeps an absolute symlink inside the root (a directory of the test
    /// standing in for a container's root).
    #[test]
    fn symlinks_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("etc-link")).unwrap();
        let r = Rootfs { root: File::open(t.path()).unwrap().into() };
        // The absolute link resolves inside the root, where the path does not exist.
        assert!(r.read("/escape/secret").is_none());
        // Writing through it: the link dangles inside the root, as `mkdir -p` would find it.
        assert!(r.write("/escape/new", b"x", 0, "files[0]").is_err());
        assert!(!outside.path().join("new").exists());
        // A relative link that climbs above the root stays at the root.
        std::os::unix::fs::symlink("../../../..", t.path().join("up")).unwrap();
        r.write("/up/new", b"x", 0, "files[0]").unwrap();
        assert!(t.path().join("new").exists());
        // A symlink as the last component is never written through.
        std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("f")).unwrap();
        let e = r.write("/f", b"x", 0, "files[0]").unwrap_err();
        assert!(e.message.contains("symlink"), "{}", e.message);
        assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "host");
        r.write("/a/b/c", b"hello", 0o600, "files[0]").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut r.read("/a/b/c").unwrap(), &mut s).unwrap();
        assert_eq!(s, "hello");
        assert!(r.exists("/etc-link"));
    }
}
