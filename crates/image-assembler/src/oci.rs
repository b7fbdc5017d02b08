//! The OCI documents: image config, manifest, index and layout marker.
//!
//! Field order is fixed by these structs and JSON is written compact, so the same image
//! always serialises to the same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// What the image history says made each layer.
pub const CREATED_BY: &str = "matrix-image-assembler";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize)]
pub struct ImageConfig<'a> {
    pub created: &'a str,
    pub architecture: &'a str,
    pub os: &'a str,
    pub config: &'a serde_json::Value,
    pub rootfs: RootFs,
    pub history: Vec<History<'a>>,
}

#[derive(Debug, Serialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct History<'a> {
    pub created: &'a str,
    pub created_by: &'static str,
    pub comment: &'a str,
}

/// The OCI architecture of a Nix system double (`x86_64-linux` -> `amd64`).
pub fn architecture(system: &str) -> Option<&'static str> {
    Some(match system {
        "x86_64-linux" => "amd64",
        "aarch64-linux" => "arm64",
        "i686-linux" => "386",
        "armv7l-linux" => "arm",
        "riscv64-linux" => "riscv64",
        "powerpc64le-linux" => "ppc64le",
        _ => return None,
    })
}

/// RFC 3339 at second precision: `1970-01-01T00:00:01Z` for 1.
pub fn timestamp(epoch: u64) -> String {
    let time = i64::try_from(epoch).ok().and_then(|s| chrono::DateTime::from_timestamp(s, 0));
    let time = time.unwrap_or_default();
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_fixed_width_utc() {
        assert_eq!(timestamp(1), "1970-01-01T00:00:01Z");
        assert_eq!(timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
