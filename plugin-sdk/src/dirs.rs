//! Directory hints for plugins that create and delete many job directories under one root.
//!
//! On ext4 without a journal, a new inode is not taken from those deleted in the last 30 s
//! (`recently_deleted` in the kernel's inode allocator): a root whose jobs each write and
//! delete thousands of files makes every next job scan past them, so a job's workspace copy
//! gets slower run after run. Marking the root a "top directory" (`chattr +T`,
//! `FS_TOPDIR_FL`) makes ext4 spread its subdirectories over the block groups as it does for
//! the top of a filesystem, so a new job directory starts in another group than the one the
//! last job freed. Elsewhere the flag is ignored or refused; either is fine.
//!
//! The workspace denies `unsafe_code`; this module is the one exception (two ioctls).
#![allow(unsafe_code)]

use std::path::Path;

/// `FS_TOPDIR_FL` of `linux/fs.h`.
const FS_TOPDIR_FL: libc::c_long = 0x0002_0000;

/// The two ioctls, private to this module.
mod ioctl {
    nix::ioctl_read! {
        /// `FS_IOC_GETFLAGS`.
        get_flags, b'f', 1, libc::c_long
    }
    nix::ioctl_write_ptr! {
        /// `FS_IOC_SETFLAGS`.
        set_flags, b'f', 2, libc::c_long
    }
}

/// Marks `dir` as a top directory (best effort): says whether the flag is now set.
pub fn spread_subdirectories(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
    else {
        return false;
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long through the valid pointer, on an open fd.
    if unsafe { ioctl::get_flags(f.as_raw_fd(), &mut flags) }.is_err() {
        return false;
    }
    if flags & FS_TOPDIR_FL != 0 {
        return true;
    }
    flags |= FS_TOPDIR_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one long through the valid pointer, on an open fd.
    unsafe { ioctl::set_flags(f.as_raw_fd(), &flags) }.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marking_is_best_effort_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let first = spread_subdirectories(dir.path());
        assert_eq!(spread_subdirectories(dir.path()), first);
        assert!(!spread_subdirectories(&dir.path().join("missing")));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(!spread_subdirectories(&file), "a file is not a directory");
    }
}
