//! Image builds for Dockerfile actions (feature `image_build`): the context directory is read
//! from the environment (the host directory under `/__kiln`, else through the archive API of
//! the primary or job container), and built by the engine. The image is tagged by the hash
//! of its context and Dockerfile (`kiln-build:<hash>`), so an unchanged action is built once
//! and reused by later jobs; build output goes to the plugin's log. Built images carry the
//! label `dev.kiln.role=build-cache`; after each build the cache keeps the
//! [`BUILD_CACHE_KEEP`] newest and removes the rest (an image a container still uses stays).

use std::io::Read;
use std::path::{Component, Path};

use bollard::query_parameters::{
    BuildImageOptions, DownloadFromContainerOptions, ListImagesOptions, RemoveImageOptions,
};
use bytes::Bytes;
use futures::StreamExt;
use kiln_plugin_sdk::{Error, Fault, ImageBuild, Result};
use sha2::{Digest, Sha256};

use crate::backend::{EnvInfo, docker_err};
use crate::exec::{check_path, host_path};

/// Largest build context read into memory.
const MAX_CONTEXT: usize = 256 * 1024 * 1024;

/// How many built action images the cache keeps.
pub(crate) const BUILD_CACHE_KEEP: usize = 20;

/// The label value of built images (under [`labels::ROLE`](crate::labels::ROLE)).
const BUILD_CACHE_ROLE: &str = "build-cache";

/// Builds (or finds in the cache) the image of `build`; returns its tag.
pub(crate) async fn build(
    env: &EnvInfo,
    source_container: Option<String>,
    build: &ImageBuild,
    force: bool,
) -> Result<String> {
    check_path(&build.context_dir, "spec.build.context_dir")?;
    let dockerfile = if build.dockerfile.is_empty() { "Dockerfile" } else { &build.dockerfile };
    let df = Path::new(dockerfile);
    if df.is_absolute() || df.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid_argument(format!(
            "spec.build.dockerfile {dockerfile:?} must be a path inside the context"
        ))
        .field("spec.build.dockerfile"));
    }
    let context = match host_path(env, &build.context_dir) {
        Some(dir) if dir.is_dir() => tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            kiln_plugin_sdk::archive::pack(&dir, "", &mut out).map(|()| out)
        })
        .await
        .map_err(|e| Error::internal(format!("the packing task failed: {e}")))??,
        _ => {
            let Some(container) = source_container else {
                return Err(Error::failed_precondition(
                    "no running container to read the build context from: create the job \
                     container (or use an environment with a primary container) first",
                ));
            };
            read_context(&env.engine.docker, &container, &build.context_dir).await?
        }
    };
    let mut hash = Sha256::new();
    hash.update(dockerfile.as_bytes());
    hash.update([0]);
    hash.update(&context);
    let tag = format!("kiln-build:{}", &hex::encode(hash.finalize())[..24]);
    let docker = &env.engine.docker;
    if !force && docker.inspect_image(&tag).await.is_ok() {
        tracing::debug!(%tag, "build cache hit");
        return Ok(tag);
    }
    tracing::info!(%tag, context = %build.context_dir, "building image");
    let options = BuildImageOptions {
        dockerfile: dockerfile.to_owned(),
        t: Some(tag.clone()),
        rm: true,
        forcerm: true,
        labels: Some([(crate::labels::ROLE.to_owned(), BUILD_CACHE_ROLE.to_owned())].into()),
        ..Default::default()
    };
    let mut stream =
        docker.build_image(options, None, Some(bollard::body_full(Bytes::from(context))));
    let mut log: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(line) = info.stream {
                    let line = line.trim_end().to_owned();
                    if !line.is_empty() {
                        tracing::debug!(%tag, "build: {line}");
                        log.push(line);
                    }
                }
                if let Some(err) = info.error_detail.and_then(|d| d.message) {
                    let tail = log.iter().rev().take(10).rev().cloned().collect::<Vec<_>>();
                    return Err(Error::invalid_argument(format!(
                        "building the image of {}/{dockerfile} failed: {err}\n{}",
                        build.context_dir,
                        tail.join("\n")
                    ))
                    .field("spec.build")
                    .fault(Fault::User));
                }
            }
            Err(e) => {
                return Err(docker_err(format!("building {}/{dockerfile}", build.context_dir), e));
            }
        }
    }
    prune_cache(docker, &tag).await;
    Ok(tag)
}

/// Removes built images beyond the [`BUILD_CACHE_KEEP`] newest (never `keep`, the one just
/// built). Failures are logged: an image in use stays until a later prune.
async fn prune_cache(docker: &bollard::Docker, keep: &str) {
    let filter = crate::labels::filter(&[format!("{}={BUILD_CACHE_ROLE}", crate::labels::ROLE)]);
    let images = match docker
        .list_images(Some(ListImagesOptions { filters: Some(filter), ..Default::default() }))
        .await
    {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "listing the build cache failed");
            return;
        }
    };
    for image in stale(images, keep) {
        let options = RemoveImageOptions { force: false, ..Default::default() };
        if let Err(e) = docker.remove_image(&image, Some(options), None).await {
            tracing::debug!(%image, error = %e, "a cached build image stays");
        }
    }
}

/// The tags to remove: all but the newest [`BUILD_CACHE_KEEP`], never `keep`.
fn stale(mut images: Vec<bollard::models::ImageSummary>, keep: &str) -> Vec<String> {
    images.sort_by_key(|i| std::cmp::Reverse(i.created));
    images
        .into_iter()
        .skip(BUILD_CACHE_KEEP)
        .flat_map(|i| i.repo_tags)
        .filter(|t| t.starts_with("kiln-build:") && t != keep)
        .collect()
}

/// The context directory as a tar with its contents at the root, through the archive API
/// (which puts them under the directory's base name).
async fn read_context(docker: &bollard::Docker, container: &str, dir: &str) -> Result<Vec<u8>> {
    let mut stream = docker.download_from_container(
        container,
        Some(DownloadFromContainerOptions { path: dir.to_owned() }),
    );
    let mut tar = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| docker_err(format!("reading the build context {dir}"), e))?;
        tar.extend_from_slice(&chunk);
        if tar.len() > MAX_CONTEXT {
            return Err(Error::resource_exhausted(format!(
                "the build context {dir} is larger than {MAX_CONTEXT} bytes"
            )));
        }
    }
    tokio::task::spawn_blocking(move || strip_first(&tar))
        .await
        .map_err(|e| Error::internal(format!("the context task failed: {e}")))?
}

/// Re-archives `tar` without the first path component of each entry.
fn strip_first(tar: &[u8]) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::io("re-archiving the build context", &e);
    let mut archive = tar::Archive::new(tar);
    let mut out = tar::Builder::new(Vec::new());
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let path = entry.path().map_err(io)?.into_owned();
        let rest: std::path::PathBuf = path.components().skip(1).collect();
        if rest.as_os_str().is_empty() {
            continue;
        }
        let mut header = entry.header().clone();
        match entry.header().entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry.link_name().map_err(io)?.unwrap_or_default().into_owned();
                let target = if entry.header().entry_type() == tar::EntryType::Link {
                    target.components().skip(1).collect()
                } else {
                    target
                };
                out.append_link(&mut header, &rest, &target).map_err(io)?;
            }
            _ => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(io)?;
                out.append_data(&mut header, &rest, &data[..]).map_err(io)?;
            }
        }
    }
    out.into_inner().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(tag: &str, created: i64) -> bollard::models::ImageSummary {
        bollard::models::ImageSummary {
            repo_tags: vec![tag.to_owned()],
            created,
            ..Default::default()
        }
    }

    #[test]
    fn the_cache_keeps_the_newest_and_the_one_just_built() {
        let n = BUILD_CACHE_KEEP as i64;
        let mut images: Vec<_> = (0..n + 3).map(|i| image(&format!("kiln-build:{i}"), i)).collect();
        // The image just built was a cache hit long ago: it is the oldest, and it stays.
        images.push(image("kiln-build:hit", -1));
        images.push(image("other:tag", -2));
        let stale = stale(images, "kiln-build:hit");
        assert_eq!(stale, ["kiln-build:2", "kiln-build:1", "kiln-build:0"]);
    }
}
