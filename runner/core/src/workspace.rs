//! The local workspace copied into each job: in a git checkout, the files git knows about or
//! would not ignore (plus `.git` itself), like act's `.gitignore`-aware copy; elsewhere the whole
//! directory. Streamed as a tar archive, never held in memory whole. The file list is taken
//! once per run ([`Workspace`]) and every job's copy packs the same list.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

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

/// A run's workspace: its directory and, once the first job asked, its file list.
#[derive(Debug)]
pub struct Workspace {
    dir: PathBuf,
    files: OnceLock<Option<Vec<PathBuf>>>,
}

impl Workspace {
    /// The workspace at `dir`; nothing is read yet.
    pub fn new(dir: PathBuf) -> Arc<Workspace> {
        Arc::new(Workspace { dir, files: OnceLock::new() })
    }

    /// A tar stream of the workspace, produced on a blocking thread (the first call lists the
    /// files).
    pub fn tar_stream(self: &Arc<Self>) -> ByteStream {
        let ws = self.clone();
        stream(move |out| {
            let files = ws.files.get_or_init(|| git_file_list(&ws.dir));
            write_tar(&ws.dir, out, files.as_deref())
                .map_err(|e| (format!("archiving the workspace {}", ws.dir.display()), e))
        })
    }
}

fn write_tar(dir: &Path, out: ChunkWriter, files: Option<&[PathBuf]>) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    match files {
        Some(files) => {
            let git = dir.join(".git");
            if git.exists() {
                builder.append_dir_all(".git", &git)?;
            }
            for f in files {
                let full = dir.join(f);
                // Deleted but still in the index: skip.
                let Ok(meta) = std::fs::symlink_metadata(&full) else { continue };
                if meta.is_dir() {
                    // A submodule or nested repository: copy it whole.
                    builder.append_dir_all(f, &full)?;
                } else {
                    builder.append_path_with_name(&full, f)?;
                }
            }
        }
        None => builder.append_dir_all(".", dir)?,
    }
    builder.finish()
}

/// A tar stream of everything under `dir` (a fetched action), produced on a blocking thread.
pub fn dir_tar_stream(dir: PathBuf) -> ByteStream {
    stream(move |out| {
        write_tar(&dir, out, None).map_err(|e| (format!("archiving {}", dir.display()), e))
    })
}

/// Runs `write` on a blocking thread into a stream of chunks; its error ends the stream.
fn stream(
    write: impl FnOnce(ChunkWriter) -> Result<(), (String, std::io::Error)> + Send + 'static,
) -> ByteStream {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        if let Err((what, e)) = write(ChunkWriter::new(tx)) {
            let _ = err_tx.blocking_send(Err(kiln_plugin_sdk::Error::io(what, &e)));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
