//! Files inside a directory that never follow a symlink out of it: the staging and
//! collection of an exec's files (§5.6.5, §5.6.6), one copy for every plugin that writes
//! them on a local filesystem.
//!
//! A path is walked one component at a time from a directory descriptor of the root, each
//! opened with `O_NOFOLLOW`: a symlink in a parent position is refused (a job that replaced
//! its runner directory with a link to `/etc` gets a PERMISSION_DENIED, not a write in
//! `/etc`), a symlink at the final component is replaced when writing and reported missing
//! when reading (a `GITHUB_ENV` linked to `/etc/shadow` collects as missing). Reads open only
//! regular files (`O_NONBLOCK`, so a FIFO can never hang the plugin).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn refused(what: &str, path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} {what}: a symlink or a non-directory in a parent position", path.display()),
    )
}

/// The components of `path` below `root` (both absolute, `path` lexically inside `root`,
/// no `..`), or an InvalidInput error.
fn relative<'p>(root: &Path, path: &'p Path) -> io::Result<Vec<&'p std::ffi::OsStr>> {
    let rest = path.strip_prefix(root).map_err(|_| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is outside {}", path.display(), root.display()),
        )
    })?;
    let mut parts = Vec::new();
    for c in rest.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has a '..' or a root component", path.display()),
                ));
            }
        }
    }
    if parts.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names the directory itself, not a file in it", path.display()),
        ));
    }
    Ok(parts)
}

fn open_dir_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the parent directory of `parts` below `root`, never through a symlink; creates
/// missing directories (mode 0755) when `create` is set.
fn parent(
    root: &Path,
    path: &Path,
    parts: &[&std::ffi::OsStr],
    create: bool,
) -> io::Result<OwnedFd> {
    let mut dir = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    for name in &parts[..parts.len() - 1] {
        dir = match open_dir_at(&dir, name) {
            Ok(d) => d,
            Err(Errno::ENOENT) if create => {
                match mkdirat(&dir, *name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io_err(e)),
                }
                open_dir_at(&dir, name).map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => refused("cannot be reached", path),
                    e => io_err(e),
                })?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(refused("cannot be reached", path)),
            Err(e) => return Err(io_err(e)),
        };
    }
    Ok(dir)
}

/// Writes `content` to `path` (inside `root`) with exactly the permission bits `mode`,
/// creating parent directories, replacing a symlink at `path` itself, refusing one in a
/// parent position (PermissionDenied). An existing regular file is overwritten in place and
/// cut to length.
pub fn write_file(root: &Path, path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let parts = relative(root, path)?;
    let dir = parent(root, path, &parts, true)?;
    let name = parts[parts.len() - 1];
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let perm = Mode::from_bits_truncate(mode & 0o7777);
    let fd = match openat(&dir, name, flags, perm) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => {
            // A symlink at the final path: replaced by the file, never followed.
            unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).map_err(io_err)?;
            openat(&dir, name, flags | OFlag::O_EXCL, perm).map_err(io_err)?
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut f = File::from(fd);
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} exists and is not a regular file", path.display()),
        ));
    }
    f.write_all(content)?;
    if meta.len() != content.len() as u64 {
        f.set_len(content.len() as u64)?;
    }
    if meta.permissions().mode() & 0o7777 != mode & 0o7777 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    Ok(())
}

/// Opens the regular file `path` (inside `root`) for reading; `None` when it does not exist, is
/// a symlink, lies behind one, or is not a regular file.
pub fn open_file(root: &Path, path: &Path) -> io::Result<Option<File>> {
    let parts = relative(root, path)?;
    let dir = match parent(root, path, &parts, false) {
        Ok(d) => d,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let name = parts[parts.len() - 1];
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = match openat(&dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let f = File::from(fd);
    Ok(f.metadata()?.is_file().then_some(f))
}

/// Reads at most `limit + 1` bytes of the regular file `path` (inside `root`); `None` as for
/// [`open_file`].
pub fn read_file(root: &Path, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let Some(f) = open_file(root, path)? else { return Ok(None) };
    let mut buf = Vec::new();
    f.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(outside.path().join("secret"), b"s3cret").unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), r.join("file")).unwrap();

        let e = write_file(r, &r.join("dir/x"), b"pwned", 0o644).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(!outside.path().join("x").exists());
        write_file(r, &r.join("file"), b"mine", 0o600).unwrap();
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"s3cret");
        assert_eq!(std::fs::read(r.join("file")).unwrap(), b"mine");

        std::os::unix::fs::symlink(outside.path().join("secret"), r.join("env")).unwrap();
        assert_eq!(read_file(r, &r.join("env"), 100).unwrap(), None);
        assert_eq!(read_file(r, &r.join("dir/secret"), 100).unwrap(), None);
        assert_eq!(read_file(r, &r.join("file"), 100).unwrap(), Some(b"mine".to_vec()));
        assert_eq!(read_file(r, &r.join("missing"), 100).unwrap(), None);

        write_file(r, &r.join("a/b/c"), b"deep", 0o755).unwrap();
        assert_eq!(read_file(r, &r.join("a/b/c"), 2).unwrap(), Some(b"dee".to_vec()));
        assert!(write_file(r, Path::new("/etc/x"), b"", 0).is_err());
    }
}
