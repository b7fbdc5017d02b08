//! Leases, in the envelope form Fly's docs and fly-go use.

use serde::{Deserialize, Serialize};

/// A lease answer: `{"status": "success", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// `success`.
    #[serde(default)]
    pub status: String,
    /// The lease itself.
    pub data: LeaseData,
}

/// The lease held on a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseData {
    /// The secret mutating calls pass in `fly-machine-lease-nonce`.
    pub nonce: String,
    /// Unix seconds when the lease ends unless refreshed.
    pub expires_at: i64,
    /// Who holds the lease.
    #[serde(default)]
    pub owner: String,
    /// Why it is held.
    #[serde(default)]
    pub description: String,
    /// The machine version when the lease was taken.
    #[serde(default)]
    pub version: String,
}

/// The body of `POST .../lease`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Seconds the lease lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// Why it is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}
