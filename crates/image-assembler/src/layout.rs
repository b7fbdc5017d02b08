//! Writing an OCI image layout directory, all or nothing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::blob::{self, Compression, LayerBlob};
use crate::error::{Error, IoContext, Result};
use crate::extra_files::{self, ExtraFile};
use crate::layering::PlannedLayer;
use crate::oci::{self, Descriptor, History, ImageConfig, Index, Manifest, RootFs};
use crate::tarball::write_store_paths;

/// A layer built earlier (a named group, its own Nix derivation): its blob file and description.
#[derive(Debug, Clone)]
pub struct PrebuiltLayer {
    pub blob: LayerBlob,
    pub path: PathBuf,
}

/// Everything an image is made of, bottom layer first.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The tag, written as `org.opencontainers.image.ref.name` in `index.json`.
    pub tag: String,
    /// OCI architecture (`amd64`).
    pub architecture: String,
    /// The OCI `config` object: Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, ...
    pub config: serde_json::Value,
    /// Seconds since the epoch for every file's mtime and the config's `created`.
    pub epoch: u64,
    pub compression: Compression,
    pub prebuilt: Vec<PrebuiltLayer>,
    pub store_layers: Vec<PlannedLayer>,
    /// The top layer, when not empty.
    pub extra_files: Vec<ExtraFile>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub manifest: Descriptor,
    pub config_digest: String,
    pub layers: Vec<LayerBlob>,
}

/// Writes the image as an OCI layout at `out`, which must not exist yet.
///
/// Everything is written into a temporary directory beside `out` and renamed at the end,
/// so an error leaves no partial output.
pub fn write_oci_layout(spec: &ImageSpec, out: &Path) -> Result<ImageSummary> {
    check_inputs(spec, out)?;
    let staging = staging_dir(out)?;
    let blobs = staging.path().join("blobs/sha256");
    fs::create_dir_all(&blobs).writing(&blobs)?;

    let layers = write_layers(spec, &blobs)?;
    let (config_digest, config_size) = write_config(spec, &layers, &blobs)?;
    let manifest = write_manifest(&layers, &config_digest, config_size, &blobs)?;
    write_index(staging.path(), &manifest, &spec.tag)?;

    let tmp = staging.keep();
    publish(&tmp, out)?;
    let annotations = BTreeMap::new();
    Ok(ImageSummary { manifest: Descriptor { annotations, ..manifest }, config_digest, layers })
}

fn check_inputs(spec: &ImageSpec, out: &Path) -> Result<()> {
    if !spec.config.is_object() {
        return Err(Error::ConfigNotObject { found: json_kind(&spec.config) });
    }
    extra_files::validate(&spec.extra_files)?;
    if out.symlink_metadata().is_ok() {
        return Err(Error::OutputExists { path: out.into() });
    }
    Ok(())
}

/// A temporary directory in the same directory as `out`, so the final rename is atomic.
pub(crate) fn staging_dir(out: &Path) -> Result<tempfile::TempDir> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tempfile::Builder::new().prefix(&format!(".{name}.tmp-")).tempdir_in(parent).writing(parent)
}

/// Makes the staged directory readable like any build output and moves it into place.
pub(crate) fn publish(staged: &Path, out: &Path) -> Result<()> {
    let result = fs::set_permissions(staged, fs::Permissions::from_mode(0o755))
        .and_then(|()| fs::rename(staged, out))
        .writing(out);
    if result.is_err() {
        let _ = fs::remove_dir_all(staged);
    }
    result
}

fn write_layers(spec: &ImageSpec, blobs: &Path) -> Result<Vec<LayerBlob>> {
    let mut layers = Vec::new();
    for prebuilt in &spec.prebuilt {
        blob::link_prebuilt(&prebuilt.path, blobs, &prebuilt.blob)?;
        layers.push(prebuilt.blob.clone());
    }
    for planned in &spec.store_layers {
        let layer = blob::write_layer(blobs, &planned.name, spec.compression, spec.epoch, |tar| {
            write_store_paths(tar, &planned.paths)
        })?;
        layers.push(layer);
    }
    if !spec.extra_files.is_empty() {
        let layer = blob::write_layer(blobs, "extra files", spec.compression, spec.epoch, |tar| {
            extra_files::write_extra_files(tar, &spec.extra_files)
        })?;
        layers.push(layer);
    }
    Ok(layers)
}

fn write_config(spec: &ImageSpec, layers: &[LayerBlob], blobs: &Path) -> Result<(String, u64)> {
    let created = oci::timestamp(spec.epoch);
    let history = layers
        .iter()
        .map(|l| History { created: &created, created_by: oci::CREATED_BY, comment: &l.name })
        .collect();
    let config = ImageConfig {
        created: &created,
        architecture: &spec.architecture,
        os: "linux",
        config: &spec.config,
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        history,
    };
    blob::write_bytes(blobs, &to_json(&config))
}

fn write_manifest(
    layers: &[LayerBlob],
    config_digest: &str,
    config_size: u64,
    blobs: &Path,
) -> Result<Descriptor> {
    let descriptor = |media_type: &str, digest: &str, size| Descriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_owned(),
        size,
        annotations: BTreeMap::new(),
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: oci::MEDIA_TYPE_MANIFEST.to_owned(),
        config: descriptor(oci::MEDIA_TYPE_CONFIG, config_digest, config_size),
        layers: layers.iter().map(|l| descriptor(&l.media_type, &l.digest, l.size)).collect(),
    };
    let (digest, size) = blob::write_bytes(blobs, &to_json(&manifest))?;
    Ok(descriptor(oci::MEDIA_TYPE_MANIFEST, &digest, size))
}

fn write_index(root: &Path, manifest: &Descriptor, tag: &str) -> Result<()> {
    let mut tagged = manifest.clone();
    tagged.annotations.insert(oci::ANNOTATION_REF_NAME.to_owned(), tag.to_owned());
    let index = Index {
        schema_version: 2,
        media_type: oci::MEDIA_TYPE_INDEX.to_owned(),
        manifests: vec![tagged],
    };
    let index_path = root.join("index.json");
    fs::write(&index_path, to_json(&index)).writing(index_path)?;
    let layout_path = root.join("oci-layout");
    fs::write(&layout_path, oci::OCI_LAYOUT).writing(layout_path)
}

fn to_json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("OCI documents always serialise")
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
