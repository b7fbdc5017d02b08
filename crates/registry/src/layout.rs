//! Reading an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`).
//!
//! Manifests are small and read whole (their exact bytes are what gets pushed); layers
//! are only named here, by path and size, and streamed from disk by the uploader.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::Error;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The annotation that names a manifest of `index.json` (what a tag is in a layout).
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor: what is stored, how big it is, and under which digest.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A manifest (or index) ready to push: its exact bytes, and what it refers to.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub descriptor: Descriptor,
    /// The media type the registry must be told (`mediaType` of the document).
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// Config and layers of an image manifest, in manifest order.
    pub blobs: Vec<Descriptor>,
    /// The manifests an index lists, pushed (by digest) before the index.
    pub children: Vec<Manifest>,
}

/// An opened layout directory.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

impl Layout {
    /// Opens `root`, checking `oci-layout` and reading `index.json`.
    pub fn open(root: &Path) -> Result<Self, Error> {
        let layout_file = read(&root.join("oci-layout"), "oci-layout")?;
        let marker: serde_json::Value = parse_json(root, &layout_file, "oci-layout")?;
        if marker.get("imageLayoutVersion").and_then(|v| v.as_str()).is_none() {
            return Err(layout_error(root, "oci-layout has no imageLayoutVersion"));
        }

        let index_bytes = read(&root.join("index.json"), "index.json")?;
        let index: Document = parse_json(root, &index_bytes, "index.json")?;
        if index.manifests.is_empty() {
            return Err(layout_error(root, "index.json lists no manifest"));
        }
        Ok(Self { root: root.to_owned(), manifests: index.manifests })
    }

    /// The manifest to push: the only one of `index.json`, or the one whose ref name
    /// annotation is `name`.
    pub fn select(&self, name: Option<&str>) -> Result<&Descriptor, Error> {
        if let Some(name) = name {
            let named = self
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == name));
            return named.ok_or_else(|| {
                layout_error(&self.root, &format!("no manifest named {name:?} in index.json"))
            });
        }
        match self.manifests.as_slice() {
            [only] => Ok(only),
            many => {
                let names: Vec<&str> = many
                    .iter()
                    .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                    .collect();
                Err(layout_error(
                    &self.root,
                    &format!("index.json lists {} manifests; name one of {names:?}", many.len()),
                ))
            }
        }
    }

    /// Reads the manifest `descriptor` and, for an index, every manifest it lists.
    pub fn load(&self, descriptor: &Descriptor) -> Result<Manifest, Error> {
        let path = self.blob_path(&descriptor.digest)?;
        let bytes = read(&path, &format!("manifest {}", descriptor.digest))?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != descriptor.digest {
            return Err(layout_error(
                &self.root,
                &format!("manifest {} hashes to {actual}", descriptor.digest),
            ));
        }

        let document: Document = parse_json(&self.root, &bytes, &descriptor.digest)?;
        let media_type = document
            .media_type
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| descriptor.media_type.clone());
        match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let config = document.config.ok_or_else(|| {
                    layout_error(
                        &self.root,
                        &format!("manifest {} has no config", descriptor.digest),
                    )
                })?;
                let blobs = std::iter::once(config).chain(document.layers).collect();
                Ok(Manifest {
                    descriptor: descriptor.clone(),
                    media_type,
                    bytes,
                    blobs,
                    children: vec![],
                })
            }
            OCI_INDEX | DOCKER_LIST => {
                let children = document
                    .manifests
                    .iter()
                    .map(|child| self.load(child))
                    .collect::<Result<_, _>>()?;
                Ok(Manifest {
                    descriptor: descriptor.clone(),
                    media_type,
                    bytes,
                    blobs: vec![],
                    children,
                })
            }
            other => Err(layout_error(
                &self.root,
                &format!("manifest {} has unsupported media type {other:?}", descriptor.digest),
            )),
        }
    }

    /// Where the blob `digest` lives; the digest must be `alg:hex` with a plain hex part.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let Some((alg, hex_part)) = digest.split_once(':') else {
            return Err(layout_error(&self.root, &format!("malformed digest {digest:?}")));
        };
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !plain(alg) || !plain(hex_part) {
            return Err(layout_error(&self.root, &format!("malformed digest {digest:?}")));
        }
        Ok(self.root.join("blobs").join(alg).join(hex_part))
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what: what.to_owned(),
        path: path.to_owned(),
        source,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(
    root: &Path,
    bytes: &[u8],
    what: &str,
) -> Result<T, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| layout_error(root, &format!("{what} is not valid: {e}")))
}

fn layout_error(root: &Path, reason: &str) -> Error {
    Error::Layout { path: root.to_owned(), reason: reason.to_owned() }
}
