//! Export of an OCI layout to a `docker-archive` tarball, the format `docker load` reads.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::oci::{self, Index, Manifest};
use crate::tarball::{write_file, Owner, TarWriter};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest<'a> {
    config: String,
    repo_tags: [&'a str; 1],
    layers: Vec<String>,
}

/// Writes the manifest tagged `tag` (or the only one) of `layout` as a docker-archive at
/// `out`, tagged `repo_tag` (`name:tag`). Deterministic like the layers; all or nothing.
pub fn export(
    layout: &Path,
    tag: Option<&str>,
    repo_tag: &str,
    out: &Path,
    epoch: u64,
) -> Result<()> {
    if out.symlink_metadata().is_ok() {
        return Err(Error::OutputExists { path: out.into() });
    }
    let manifest = read_manifest(layout, tag)?;
    let blob_name = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let docker = DockerManifest {
        config: blob_name(&manifest.config.digest),
        repo_tags: [repo_tag],
        layers: manifest.layers.iter().map(|l| blob_name(&l.digest)).collect(),
    };
    let docker_json = serde_json::to_vec(&[docker]).expect("a docker manifest serialises");

    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging =
        tempfile::Builder::new().prefix(".docker-archive-").tempfile_in(parent).writing(parent)?;
    let file = staging.reopen().writing(staging.path())?;
    let mut tar = TarWriter::new(BufWriter::new(file), epoch);
    let written = |e| Error::Write { path: out.into(), source: e };

    // Blobs first (sorted, each once), then the manifest that names them.
    let mut blobs: Vec<&str> = std::iter::once(manifest.config.digest.as_str())
        .chain(manifest.layers.iter().map(|l| l.digest.as_str()))
        .collect();
    blobs.sort();
    blobs.dedup();
    for dir in ["blobs", "blobs/sha256"] {
        tar.dir(dir.as_bytes(), 0o755, Owner::default()).map_err(written)?;
    }
    for digest in blobs {
        let name = blob_name(digest);
        write_file(&mut tar, &layout.join(&name), name.as_bytes(), 0o644, Owner::default())?;
    }
    let size = docker_json.len() as u64;
    tar.file(b"manifest.json", 0o644, Owner::default(), size, docker_json.as_slice())
        .map_err(written)?;

    let mut writer = tar.finish().map_err(written)?;
    writer.flush().map_err(written)?;
    staging.persist(out).map_err(|e| Error::Write { path: out.into(), source: e.error })?;
    Ok(())
}

/// The manifest of `layout` tagged `tag`, or its only manifest when `tag` is `None`.
pub fn read_manifest(layout: &Path, tag: Option<&str>) -> Result<Manifest> {
    let index_path = layout.join("index.json");
    let index_bytes = fs::read(&index_path).reading(&index_path)?;
    let index: Index = serde_json::from_slice(&index_bytes)
        .map_err(|source| Error::ParseJson { path: index_path.clone(), source })?;
    let found = match tag {
        Some(tag) => index
            .manifests
            .iter()
            .find(|d| d.annotations.get(oci::ANNOTATION_REF_NAME).map(String::as_str) == Some(tag)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => None,
    };
    let no_tag =
        || Error::NoSuchTag { path: layout.into(), tag: tag.unwrap_or_default().to_owned() };
    let descriptor = found.ok_or_else(no_tag)?;

    let path = layout.join("blobs/sha256").join(descriptor.digest.trim_start_matches("sha256:"));
    let bytes = fs::read(&path).reading(&path)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::ParseJson { path, source })
}
