//! Volumes and their create body.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A Fly volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// `vol_...`.
    pub id: String,
    /// Name (not unique).
    #[serde(default)]
    pub name: String,
    /// `created`, `destroyed`, ...
    #[serde(default)]
    pub state: String,
    /// Size in GB.
    #[serde(default)]
    pub size_gb: u32,
    /// Region code.
    #[serde(default)]
    pub region: String,
    /// Availability zone.
    #[serde(default)]
    pub zone: String,
    /// Whether the volume is encrypted.
    #[serde(default)]
    pub encrypted: bool,
    /// The machine the volume is mounted in, if any.
    #[serde(default)]
    pub attached_machine_id: Option<String>,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created_at: String,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The body of `POST /v1/apps/{app}/volumes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateVolumeRequest {
    /// Name.
    pub name: String,
    /// Region code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Size in GB (Fly's default is 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
    /// Encrypt (Fly's default is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Refuse a zone that already holds a volume of this name (Fly's default is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_unique_zone: Option<bool>,
    /// Every other field (`snapshot_id`, `fstype`, ...), sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
