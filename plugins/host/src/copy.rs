//! CopyIn and CopyOut: tar streams through the SDK's traversal-checked helpers, and the
//! local-path fast path (a direct tree copy that keeps modes and symlinks).
//!
//! Destinations and sources must lie inside the environment's directory (or the shared tool
//! cache); the check resolves symlinks of the existing part of the path.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use kiln_plugin_sdk::archive;
use kiln_plugin_sdk::{ByteStream, CopyStats, Error, Result};
use tokio::sync::mpsc;

/// Resolves `path` (absolute, no `..`) and checks it lies inside one of `roots` (canonical
/// directories), following symlinks of the part that exists.
pub(crate) fn resolve_inside(roots: &[&Path], path: &str, field: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid_argument(format!("{field} {path:?} is not an absolute path"))
            .field(field));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid_argument(format!("{field} {path:?} contains '..'")).field(field));
    }
    // The deepest existing ancestor, canonical, plus the part that does not exist yet.
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    let base = loop {
        match fs::canonicalize(&existing) {
            Ok(c) => break c,
            Err(_) => {
                let Some(name) = existing.file_name().map(|n| n.to_owned()) else {
                    return Err(Error::invalid_argument(format!(
                        "{field} {path:?} cannot be resolved"
                    ))
                    .field(field));
                };
                rest.push(name);
                existing.pop();
            }
        }
    };
    let resolved = rest.iter().rev().fold(base, |acc, n| acc.join(n));
    if roots.iter().any(|r| resolved.starts_with(r)) {
        Ok(resolved)
    } else {
        Err(Error::permission_denied(format!(
            "{field} {path:?} is outside the environment's directory"
        ))
        .field(field))
    }
}

/// Streams `src` out as a tar archive holding it under its base name.
pub(crate) fn pack_stream(src: PathBuf) -> ByteStream {
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let result = archive::pack(&src, &name, archive::ChunkWriter::new(tx.clone()));
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Copies the local directory `src` into `dest` (or the file `src` to `dest/<name>`),
/// keeping modes and symlinks. Blocking.
pub(crate) fn copy_local(src: &Path, dest: &Path) -> Result<CopyStats> {
    let meta = fs::symlink_metadata(src).map_err(|e| {
        Error::invalid_argument(format!("local_path {}: {e}", src.display())).field("local_path")
    })?;
    fs::create_dir_all(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), &e))?;
    let mut stats = CopyStats::default();
    if meta.is_dir() {
        copy_dir(src, dest, &mut stats)?;
    } else {
        let name = src.file_name().ok_or_else(|| {
            Error::invalid_argument(format!("local_path {} has no name", src.display()))
        })?;
        copy_entry(src, &dest.join(name), &meta, &mut stats)?;
    }
    Ok(stats)
}

fn copy_dir(src: &Path, dest: &Path, stats: &mut CopyStats) -> Result<()> {
    let entries =
        fs::read_dir(src).map_err(|e| Error::io(format!("reading {}", src.display()), &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", src.display()), &e))?;
        let meta = entry
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", entry.path().display()), &e))?;
        copy_entry(&entry.path(), &dest.join(entry.file_name()), &meta, stats)?;
    }
    Ok(())
}

fn copy_entry(src: &Path, dst: &Path, meta: &fs::Metadata, stats: &mut CopyStats) -> Result<()> {
    let io_err = |what: &str, e: io::Error| Error::io(format!("{what} {}", dst.display()), &e);
    let existing = fs::symlink_metadata(dst).ok();
    let ft = meta.file_type();
    if ft.is_dir() {
        match existing {
            Some(m) if m.file_type().is_symlink() => {
                return Err(Error::invalid_argument(format!(
                    "{} is a symlink: writes through symlinks are refused",
                    dst.display()
                ))
                .field("dest_path"));
            }
            Some(m) if m.is_dir() => {}
            Some(_) => {
                fs::remove_file(dst).map_err(|e| io_err("replacing", e))?;
                fs::create_dir(dst).map_err(|e| io_err("creating", e))?;
            }
            None => fs::create_dir(dst).map_err(|e| io_err("creating", e))?,
        }
        copy_dir(src, dst, stats)?;
        // Modes last, so a read-only directory does not block its own contents.
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode() & 0o7777))
            .map_err(|e| io_err("setting the mode of", e))?;
    } else if ft.is_symlink() || ft.is_file() {
        match existing {
            Some(m) if m.is_dir() => {
                return Err(Error::invalid_argument(format!(
                    "{} is a directory in the destination and a file in local_path",
                    dst.display()
                ))
                .field("local_path"));
            }
            // Replace, never write through: a link in the destination is removed first.
            Some(_) => fs::remove_file(dst).map_err(|e| io_err("replacing", e))?,
            None => {}
        }
        if ft.is_symlink() {
            let target = fs::read_link(src).map_err(|e| io_err("reading the link for", e))?;
            std::os::unix::fs::symlink(target, dst).map_err(|e| io_err("creating", e))?;
        } else {
            stats.bytes += fs::copy(src, dst).map_err(|e| io_err("copying to", e))?;
        }
    } else {
        return Ok(()); // sockets, fifos and devices are not copied
    }
    stats.entries += 1;
    Ok(())
}
