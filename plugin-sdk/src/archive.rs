//! Tar helpers with the protocol's traversal rules (rule 8): modes kept, symlinks kept as
//! links, and no entry may land outside the destination.
//!
//! Used by plugins that work on a local filesystem (host, test, docker for its host
//! directories) and by the runner to pack the workspace. Blocking, except [`unpack_stream`],
//! which runs [`unpack`] on the blocking pool: call the others from `spawn_blocking`.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::backend::CopyStats;
use crate::error::{Error, Result};

/// Size of the data chunks the SDK sends for tar streams.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// Checks an entry path of an archive and returns it as a relative path. Rejects absolute
/// paths and `..`; `.` components are dropped.
pub fn safe_relative(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(Error::invalid_argument(format!(
                    "tar entry {:?} contains '..': entries must stay inside the destination",
                    path.display()
                ))
                .field("data"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::invalid_argument(format!(
                    "tar entry {:?} is absolute: entries must be relative to the destination",
                    path.display()
                ))
                .field("data"));
            }
        }
    }
    Ok(out)
}

/// Makes sure no existing directory between `dest` and `dest/rel` is a symlink, so a write
/// cannot escape through one. The last component may be a link: it is replaced, not followed.
fn check_no_symlink_parents(dest: &Path, rel: &Path) -> Result<()> {
    let mut cur = dest.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for comp in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::invalid_argument(format!(
                    "tar entry {:?} would be written through the symlink {:?}: writes through \
                     symlinks are refused",
                    rel.display(),
                    cur.strip_prefix(dest).unwrap_or(&cur).display()
                ))
                .field("data"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("checking {}", cur.display()), &e)),
        }
    }
    Ok(())
}

/// Extracts a tar archive into `dest` (created when missing), refusing any entry that would
/// land outside it. Stops at the first bad entry; entries before it stay written.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<CopyStats> {
    fs::create_dir_all(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), &e))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut stats = CopyStats::default();
    let entries = archive
        .entries()
        .map_err(|e| Error::invalid_argument(format!("reading tar stream: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Error::invalid_argument(format!("reading tar entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| Error::invalid_argument(format!("tar entry with a bad path: {e}")))?
            .into_owned();
        let rel = safe_relative(&path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| Error::invalid_argument(format!("tar hard link: {e}")))?
                .unwrap_or_default();
            safe_relative(&target)?;
        }
        check_no_symlink_parents(dest, &rel)?;
        let full = dest.join(&rel);
        if let Ok(meta) = fs::symlink_metadata(&full)
            && meta.file_type().is_symlink()
        {
            fs::remove_file(&full)
                .map_err(|e| Error::io(format!("replacing {}", full.display()), &e))?;
        }
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating {}", parent.display()), &e))?;
        }
        stats.bytes += entry.header().size().unwrap_or(0);
        let unpacked = if kind.is_hard_link() {
            // tar resolves hard links relative to the current directory; resolve them ourselves.
            let target = safe_relative(
                &entry.link_name().ok().flatten().map(|p| p.into_owned()).unwrap_or_default(),
            )?;
            let _ = fs::remove_file(&full);
            fs::hard_link(dest.join(target), &full)
        } else {
            entry.unpack(&full).map(|_| ())
        };
        unpacked.map_err(|e| Error::io(format!("writing {}", rel.display()), &e))?;
        stats.entries += 1;
    }
    Ok(stats)
}

/// Writes a tar archive of `src` to `out`: a directory's contents go under `name/` (or at the
/// archive root when `name` is empty); a file goes in as `name`. Symlinks are archived as
/// links, never followed.
pub fn pack(src: &Path, name: &str, out: impl Write) -> Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let meta = fs::symlink_metadata(src)
        .map_err(|e| Error::io(format!("reading {}", src.display()), &e))?;
    let result = if meta.is_dir() {
        let name = if name.is_empty() { "." } else { name };
        builder.append_dir_all(name, src)
    } else {
        let name = if name.is_empty() {
            src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            name.to_owned()
        };
        builder.append_path_with_name(src, name)
    };
    result.map_err(|e| Error::io(format!("archiving {}", src.display()), &e))?;
    builder.finish().map_err(|e| Error::io("finishing the tar stream", &e))?;
    Ok(())
}

/// A `Write` that sends fixed-size chunks into a tokio channel, for producing an async stream
/// from a blocking tar writer.
pub struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    /// Sends chunks of [`CHUNK_SIZE`] to `tx`.
    pub fn new(tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes>>) -> ChunkWriter {
        ChunkWriter { tx, buf: Vec::with_capacity(CHUNK_SIZE) }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk =
            bytes::Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "receiver gone"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_SIZE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

/// A blocking `Read` over a bounded tokio channel of chunks, for a blocking tar reader fed by
/// an async stream (the channel's bound carries backpressure to the stream).
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl ChannelReader {
    /// Reads what arrives on `rx` until it closes.
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> ChannelReader {
        ChannelReader { rx, current: bytes::Bytes::new() }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// [`unpack`] of a CopyIn stream into `dest`, on the blocking pool. An error of the stream
/// wins over the unpacker's (which then only saw the stream end early).
pub async fn unpack_stream(mut data: crate::ByteStream, dest: PathBuf) -> Result<CopyStats> {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let task = tokio::task::spawn_blocking(move || unpack(ChannelReader::new(rx), &dest));
    let mut feed_error = None;
    while let Some(item) = data.next().await {
        match item {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break; // the unpacker stopped: its result says why
                }
            }
            Err(e) => {
                feed_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let result = task.await.map_err(|e| Error::internal(format!("the unpack task failed: {e}")))?;
    match feed_error {
        Some(e) => Err(e.context("reading the CopyIn stream")),
        None => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses '..', so write the raw name.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn round_trip_keeps_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("d")).unwrap();
        fs::write(src.path().join("d/x.sh"), "echo hi").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut fs::metadata(src.path().join("d/x.sh")).unwrap().permissions(),
            0o755,
        );
        fs::set_permissions(
            src.path().join("d/x.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("d/link")).unwrap();
        let mut buf = Vec::new();
        pack(src.path(), "", &mut buf).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let stats = unpack(&buf[..], dst.path()).unwrap();
        assert!(stats.entries >= 3);
        let meta = fs::metadata(dst.path().join("d/x.sh")).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o755);
        assert_eq!(fs::read_link(dst.path().join("d/link")).unwrap(), Path::new("/etc/passwd"));
    }

    #[test]
    fn traversal_is_refused() {
        let dst = tempfile::tempdir().unwrap();
        for bad in ["../evil", "a/../../evil", "/abs"] {
            let err = unpack(&tar_with(&[(bad, b"x")])[..], dst.path()).unwrap_err();
            assert_eq!(err.code, crate::Code::InvalidArgument, "{bad}: {err}");
        }
    }

    #[test]
    fn writes_through_symlinks_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dst.path().join("esc")).unwrap();
        let err = unpack(&tar_with(&[("esc/pwned", b"x")])[..], dst.path()).unwrap_err();
        assert!(err.message.contains("symlink"), "{err}");
        assert!(!outside.path().join("pwned").exists());
    }
}
