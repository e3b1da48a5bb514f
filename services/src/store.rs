//! The store behind both servers: named blobs, written through uploads that become visible only
//! by an atomic commit. [`LocalStore`] keeps them in a directory; an object store can implement
//! the same trait later.
//!
//! Names are made by the servers (numeric ids, run ids, validated artifact names), never taken
//! from a request unchecked: [`check_name`] allows `/`-separated segments of
//! `[A-Za-z0-9._-]`, none of them `.` or `..`, so nothing escapes the store's root.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt};

/// A request body as a stream of chunks.
pub type ByteStream =
    std::pin::Pin<Box<dyn Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send>>;

/// A blob opened for reading, with its size.
pub type Reader = (Box<dyn AsyncRead + Send + Unpin>, u64);

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name or upload id outside the grammar.
    #[error("invalid name {0:?}: only [A-Za-z0-9._-] segments, no `.` or `..`")]
    BadName(String),
    /// No such blob or upload.
    #[error("{0} not found")]
    NotFound(String),
    /// The body was shorter or longer than announced.
    #[error("body has {got} bytes where {want} were announced")]
    Length {
        /// Bytes announced.
        want: u64,
        /// Bytes received (at least; reading stops past `want`).
        got: u64,
    },
    /// The client's stream failed.
    #[error("reading the request body: {0}")]
    Body(std::io::Error),
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// Where blobs live. Uploads are private until [`Store::commit`] makes them a named blob in one
/// step; an upload that is never committed is removed by [`Store::abort`] or [`Store::sweep`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Starts an empty upload.
    async fn create_upload(&self, upload: &str) -> Result<()>;
    /// Writes exactly `len` bytes of `body` at `offset` of an upload.
    async fn write_at(&self, upload: &str, offset: u64, len: u64, body: ByteStream) -> Result<()>;
    /// Appends all of `body` (at most `limit` bytes) to an upload; returns the bytes written.
    async fn append(&self, upload: &str, limit: u64, body: ByteStream) -> Result<u64>;
    /// Appends the content of other uploads, in order, to `upload`, and removes them.
    async fn concat(&self, upload: &str, parts: &[String]) -> Result<u64>;
    /// The current size of an upload.
    async fn upload_size(&self, upload: &str) -> Result<u64>;
    /// Makes an upload the blob `name` (replacing any), atomically.
    async fn commit(&self, upload: &str, name: &str) -> Result<u64>;
    /// Removes an upload (no error if absent).
    async fn abort(&self, upload: &str);
    /// Removes every upload (at start: nothing from a previous process is ever committed).
    async fn sweep(&self);
    /// Opens a blob.
    async fn open(&self, name: &str) -> Result<Reader>;
    /// Removes a blob (no error if absent).
    async fn remove(&self, name: &str);
    /// The blob's path on the local file system, if it has one (for the run summary).
    fn local_path(&self, name: &str) -> Option<PathBuf>;
}

/// Checks a store name: `/`-separated segments of `[A-Za-z0-9._-]`, none `.`/`..`, at most
/// 255 bytes each.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg.len() <= 255
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok { Ok(()) } else { Err(StoreError::BadName(name.into())) }
}

/// Blobs in `<root>/blobs/<name>`, uploads in `<root>/uploads/<id>`, on one file system so a
/// commit is a `rename`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store in `root` (created if missing).
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("uploads"))?;
        Ok(LocalStore { root: root.to_path_buf() })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn upload_path(&self, upload: &str) -> Result<PathBuf> {
        check_name(upload)?;
        if upload.contains('/') {
            return Err(StoreError::BadName(upload.into()));
        }
        Ok(self.root.join("uploads").join(upload))
    }

    fn blob_path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join("blobs").join(name))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Copies the stream into `file`, stopping with an error past `limit` bytes.
async fn copy_stream(
    file: &mut tokio::fs::File,
    path: &Path,
    limit: u64,
    mut body: ByteStream,
) -> Result<u64> {
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(StoreError::Body)?;
        n += chunk.len() as u64;
        if n > limit {
            return Err(StoreError::Length { want: limit, got: n });
        }
        file.write_all(&chunk).await.map_err(io(path))?;
    }
    Ok(n)
}

#[async_trait]
impl Store for LocalStore {
    async fn create_upload(&self, upload: &str) -> Result<()> {
        let path = self.upload_path(upload)?;
        tokio::fs::File::create(&path).await.map_err(io(&path))?;
        Ok(())
    }

    async fn write_at(&self, upload: &str, offset: u64, len: u64, body: ByteStream) -> Result<()> {
        let path = self.upload_path(upload)?;
        let mut file =
            tokio::fs::OpenOptions::new().write(true).open(&path).await.map_err(|e| {
                match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        StoreError::NotFound(format!("upload {upload}"))
                    }
                    _ => StoreError::Io { path: path.clone(), source: e },
                }
            })?;
        file.seek(SeekFrom::Start(offset)).await.map_err(io(&path))?;
        let n = copy_stream(&mut file, &path, len, body).await?;
        if n != len {
            return Err(StoreError::Length { want: len, got: n });
        }
        file.flush().await.map_err(io(&path))?;
        Ok(())
    }

    async fn append(&self, upload: &str, limit: u64, body: ByteStream) -> Result<u64> {
        let path = self.upload_path(upload)?;
        let mut file =
            tokio::fs::OpenOptions::new().append(true).open(&path).await.map_err(|e| {
                match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        StoreError::NotFound(format!("upload {upload}"))
                    }
                    _ => StoreError::Io { path: path.clone(), source: e },
                }
            })?;
        let n = copy_stream(&mut file, &path, limit, body).await?;
        file.flush().await.map_err(io(&path))?;
        Ok(n)
    }

    async fn concat(&self, upload: &str, parts: &[String]) -> Result<u64> {
        let path = self.upload_path(upload)?;
        let part_paths = parts.iter().map(|p| self.upload_path(p)).collect::<Result<Vec<_>>>()?;
        // std::io::copy between files is copy_file_range on Linux: the kernel moves the bytes.
        let out_path = path.clone();
        let total = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut out =
                std::fs::OpenOptions::new().append(true).open(&out_path).map_err(io(&out_path))?;
            let mut total = 0;
            for p in &part_paths {
                let mut f = std::fs::File::open(p)
                    .map_err(|_| StoreError::NotFound(format!("block {}", p.display())))?;
                total += std::io::copy(&mut f, &mut out).map_err(io(&out_path))?;
            }
            Ok(total)
        })
        .await
        .map_err(|e| StoreError::Io { path: path.clone(), source: std::io::Error::other(e) })??;
        for part in parts {
            self.abort(part).await;
        }
        Ok(total)
    }

    async fn upload_size(&self, upload: &str) -> Result<u64> {
        let path = self.upload_path(upload)?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|_| StoreError::NotFound(format!("upload {upload}")))?;
        Ok(meta.len())
    }

    async fn commit(&self, upload: &str, name: &str) -> Result<u64> {
        let from = self.upload_path(upload)?;
        let to = self.blob_path(name)?;
        if let Some(dir) = to.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        }
        let file = tokio::fs::File::open(&from)
            .await
            .map_err(|_| StoreError::NotFound(format!("upload {upload}")))?;
        // The data reaches the disk before the name does: a crash leaves no partial blob.
        file.sync_all().await.map_err(io(&from))?;
        let size = file.metadata().await.map_err(io(&from))?.len();
        tokio::fs::rename(&from, &to).await.map_err(io(&to))?;
        Ok(size)
    }

    async fn abort(&self, upload: &str) {
        if let Ok(path) = self.upload_path(upload) {
            let _ = tokio::fs::remove_file(&path).await;
        }
    }

    async fn sweep(&self) {
        let dir = self.root.join("uploads");
        if let Ok(mut rd) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
    }

    async fn open(&self, name: &str) -> Result<Reader> {
        let path = self.blob_path(name)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| StoreError::NotFound(format!("blob {name}")))?;
        let size = file.metadata().await.map_err(io(&path))?.len();
        Ok((Box::new(file), size))
    }

    async fn remove(&self, name: &str) {
        if let Ok(path) = self.blob_path(name) {
            let _ = tokio::fs::remove_file(&path).await;
        }
    }

    fn local_path(&self, name: &str) -> Option<PathBuf> {
        self.blob_path(name).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["1", "run-1/name.zip", "a_b.c"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "a/../b", "/a", "a//b", "a\\b", "a b", "a\0", "./a"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
