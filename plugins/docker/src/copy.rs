//! CopyIn and CopyOut through the engine's archive API, with the protocol's traversal rules
//! checked by the plugin before anything reaches the engine.
//!
//! Into the environment's host directories (see the crate docs) CopyIn extracts on the host.
//! Elsewhere it first runs one exec in the container (`mkdir -p DEST && find DEST -type l`) to
//! create the destination and learn the symlinks already in it, then re-streams the caller's
//! archive entry by entry: paths pass `archive::safe_relative`, hard-link targets too, no
//! entry may be written through a symlink (already there or created by an earlier entry),
//! device nodes are refused, FIFOs skipped. The checked stream is uploaded as it is produced;
//! a refused entry aborts the upload (entries before it may remain, as §5.9 allows).

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use bytes::Bytes;
use futures::StreamExt;
use kiln_plugin_sdk::archive::{ChannelReader, ChunkWriter, safe_relative};
use kiln_plugin_sdk::{ByteStream, CopyInTarget, CopyOutSource, CopyStats, Error, Result};

use crate::backend::{DockerBackend, docker_err};
use crate::exec::{check_path, host_path};

/// Quotes a string for `sh`.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub(crate) async fn copy_in(
    backend: &DockerBackend,
    target: CopyInTarget,
    mut data: ByteStream,
) -> Result<CopyStats> {
    let env = backend.live_env(&target.environment_id).await?;
    let (container, inspect) = backend.container(&env, &target.container_id).await?;
    if target.local_path.is_some() {
        return Err(Error::unimplemented(
            "the docker plugin does not copy local paths (feature local_copy); send tar data",
        )
        .field("local_path"));
    }
    check_path(&target.dest_path, "dest_path")?;
    let dest = target.dest_path.trim_end_matches('/').to_owned();
    let dest = if dest.is_empty() { "/".to_owned() } else { dest };
    // Into the environment's own directories, in a container that mounts them (the primary,
    // a job container with the workspace, a step container): extracted here, on the host,
    // without an exec or the engine's archive call.
    let binds = inspect.host_config.as_ref().and_then(|h| h.binds.clone()).unwrap_or_default();
    let mounted = DockerBackend::env_binds(&env).iter().all(|b| binds.contains(b));
    if let (true, Some(host)) = (mounted, host_path(&env, &dest)) {
        return kiln_plugin_sdk::archive::unpack_stream(data, host).await;
    }
    let docker = env.engine.docker.clone();
    let running = inspect.state.and_then(|s| s.running).unwrap_or(false);
    let mut links = HashSet::new();
    if running {
        let script = format!("mkdir -p {d} && cd {d} && find . -type l", d = sq(&dest));
        let (code, out, err) = crate::exec::run_simple(
            &docker,
            &container,
            vec!["/bin/sh".to_owned(), "-c".to_owned(), script],
        )
        .await?;
        if code != 0 {
            return Err(Error::invalid_argument(format!(
                "cannot create the destination {dest}: {}",
                String::from_utf8_lossy(&err).trim()
            ))
            .field("dest_path"));
        }
        for line in String::from_utf8_lossy(&out).lines() {
            if let Ok(rel) = safe_relative(Path::new(line)) {
                links.insert(rel);
            }
        }
    }

    // Caller's chunks → blocking checker → checked tar chunks → engine upload.
    let (raw_tx, raw_rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(8);
    let checker = tokio::task::spawn_blocking(move || {
        let writer = ChunkWriter::new(out_tx.clone());
        let result = recheck(ChannelReader::new(raw_rx), writer, links);
        if let Err(e) = &result {
            let _ = out_tx.blocking_send(Err(e.clone()));
        }
        result
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(out_rx)
        .map(|r| r.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.message)));
    let upload = docker.upload_to_container(
        &container,
        Some(UploadToContainerOptions { path: dest.clone(), ..Default::default() }),
        bollard::body_try_stream(body),
    );
    let feed = async move {
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            if raw_tx.send(chunk).await.is_err() {
                break;
            }
        }
        Ok::<(), Error>(())
    };
    let (uploaded, fed) = tokio::join!(upload, feed);
    let checked =
        checker.await.map_err(|e| Error::internal(format!("the archive check failed: {e}")))?;
    let stats = checked?;
    fed?;
    uploaded.map_err(|e| docker_err(format!("extracting into {dest}"), e))?;
    Ok(stats)
}

/// Reads a tar stream, checks every entry and writes the accepted ones to `out`.
fn recheck(input: impl Read, out: ChunkWriter, mut links: HashSet<PathBuf>) -> Result<CopyStats> {
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
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
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            prefix.push(c);
            if links.contains(&prefix) {
                return Err(Error::invalid_argument(format!(
                    "tar entry {:?} would be written through the symlink {:?}: writes through \
                     symlinks are refused",
                    rel.display(),
                    prefix.display()
                ))
                .field("data"));
            }
        }
        let kind = entry.header().entry_type();
        let mut header = entry.header().clone();
        let io = |e: std::io::Error| Error::io("re-archiving a checked entry", &e);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                links.remove(&rel);
                header.set_entry_type(tar::EntryType::Regular);
                stats.bytes += header.size().unwrap_or(0);
                builder.append_data(&mut header, &rel, &mut entry).map_err(io)?;
            }
            tar::EntryType::Directory => {
                links.remove(&rel);
                header.set_size(0);
                builder.append_data(&mut header, &rel, std::io::empty()).map_err(io)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| Error::invalid_argument(format!("tar symlink: {e}")))?
                    .unwrap_or_default()
                    .into_owned();
                header.set_size(0);
                builder.append_link(&mut header, &rel, &target).map_err(io)?;
                links.insert(rel.clone());
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| Error::invalid_argument(format!("tar hard link: {e}")))?
                    .unwrap_or_default()
                    .into_owned();
                let target = safe_relative(&target)?;
                header.set_size(0);
                builder.append_link(&mut header, &rel, &target).map_err(io)?;
                links.remove(&rel);
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(Error::invalid_argument(format!(
                    "tar entry {:?} is a device node: device nodes are never created",
                    rel.display()
                ))
                .field("data"));
            }
            // FIFOs and anything unknown are skipped.
            _ => continue,
        }
        stats.entries += 1;
    }
    builder.finish().map_err(|e| Error::io("finishing the checked tar stream", &e))?;
    Ok(stats)
}

pub(crate) async fn copy_out(backend: &DockerBackend, source: CopyOutSource) -> Result<ByteStream> {
    let env = backend.live_env(&source.environment_id).await?;
    let (container, _) = backend.container(&env, &source.container_id).await?;
    check_path(&source.path, "path")?;
    let path = source.path.clone();
    let mut stream = env
        .engine
        .docker
        .download_from_container(
            &container,
            Some(DownloadFromContainerOptions { path: path.clone() }),
        )
        .peekable();
    // Surface a missing path as the call's error rather than mid-stream.
    if let Some(Err(_)) = std::pin::Pin::new(&mut stream).peek().await
        && let Some(Err(e)) = stream.next().await
    {
        return Err(docker_err(format!("copying {path} out"), e).field("path"));
    }
    Ok(Box::pin(stream.map(move |c| c.map_err(|e| docker_err("copying out", e)))))
}
