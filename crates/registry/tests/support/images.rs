//! Small OCI image layouts built byte for byte the same on every run: tar layers with
//! fixed metadata, gzip without a timestamp, JSON written in a fixed order.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

/// One layer: files (path, contents) in the order given.
pub struct LayerSpec {
    pub files: Vec<(String, Vec<u8>)>,
}

impl LayerSpec {
    /// A layer with one file of `size` pseudo-random (incompressible) bytes from `seed`.
    pub fn noise(name: &str, size: usize, seed: u64) -> Self {
        Self { files: vec![(name.to_owned(), noise(size, seed))] }
    }

    /// A layer with one small text file.
    pub fn text(name: &str, text: &str) -> Self {
        Self { files: vec![(name.to_owned(), text.as_bytes().to_vec())] }
    }
}

/// Deterministic bytes that gzip cannot shrink (xorshift64).
pub fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// A written layout and the digests in it.
pub struct BuiltImage {
    pub dir: PathBuf,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Layer digests and sizes, bottom first.
    pub layers: Vec<(String, u64)>,
}

/// Writes an OCI layout with `layers` to `dir` (created), tagged `tag` in `index.json`.
pub fn build_layout(dir: &Path, tag: &str, layers: &[LayerSpec]) -> BuiltImage {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create blobs dir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");

    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for spec in layers {
        let tar = tar_bytes(spec);
        diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        let gz = gzip(&tar);
        let digest = write_blob(&blobs, &gz);
        layer_descs.push((digest, gz.len() as u64));
    }

    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/true"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let config_digest = write_blob(&blobs, &config_bytes);

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layer_descs.iter().map(|(digest, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = write_blob(&blobs, &manifest_bytes);

    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).expect("index json"))
        .expect("index.json");

    BuiltImage { dir: dir.to_owned(), manifest_digest, config_digest, layers: layer_descs }
}

fn tar_bytes(spec: &LayerSpec) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in &spec.files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, contents.as_slice()).expect("tar entry");
    }
    builder.into_inner().expect("tar finish")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzBuilder::new().mtime(0).write(Vec::new(), Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip finish")
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> String {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(blobs.join(&hex), bytes).expect("write blob");
    format!("sha256:{hex}")
}
