//! The local workspace copied into each job: in a git checkout, the files git knows about or
//! would not ignore (plus `.git` itself), like act's `.gitignore`-aware copy; elsewhere the whole
//! directory. Streamed as a tar archive, never held in memory whole.

use std::path::{Path, PathBuf};

use kiln_plugin_sdk::ByteStream;
use kiln_plugin_sdk::archive::ChunkWriter;

/// The files to copy, relative to `dir`, or `None` for "everything".
fn git_file_list(dir: &Path) -> Option<Vec<PathBuf>> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut files: Vec<PathBuf> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
        .collect();
    files.sort();
    files.dedup();
    Some(files)
}

fn write_tar(dir: &Path, out: ChunkWriter, git_aware: bool) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    match git_aware.then(|| git_file_list(dir)).flatten() {
        Some(files) => {
            let git = dir.join(".git");
            if git.exists() {
                builder.append_dir_all(".git", &git)?;
            }
            for f in files {
                let full = dir.join(&f);
                // Deleted but still in the index: skip.
                let Ok(meta) = std::fs::symlink_metadata(&full) else { continue };
                if meta.is_dir() {
                    // A submodule or nested repository: copy it whole.
                    builder.append_dir_all(&f, &full)?;
                } else {
                    builder.append_path_with_name(&full, &f)?;
                }
            }
        }
        None => builder.append_dir_all(".", dir)?,
    }
    builder.finish()
}

/// A tar stream of the workspace at `dir`, produced on a blocking thread.
pub fn tar_stream(dir: PathBuf) -> ByteStream {
    stream(dir, true)
}

/// A tar stream of everything under `dir` (a fetched action), produced on a blocking thread.
pub fn dir_tar_stream(dir: PathBuf) -> ByteStream {
    stream(dir, false)
}

fn stream(dir: PathBuf, git_aware: bool) -> ByteStream {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        if let Err(e) = write_tar(&dir, ChunkWriter::new(tx), git_aware) {
            let _ = err_tx.blocking_send(Err(kiln_plugin_sdk::Error::io(
                format!("archiving {}", dir.display()),
                &e,
            )));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
