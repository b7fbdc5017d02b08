//! The JSON bodies of the Fly Machines API, as serde types.
//!
//! Field names and shapes follow Fly's OpenAPI spec and fly-go. Structs that Fly sends
//! back whole on update keep unknown fields in `extra`, so a read-modify-write never
//! loses configuration this crate does not model.

mod config;
mod lease;
mod machine;
mod volume;

use serde::{Deserialize, Serialize};

pub use config::{
    parse_go_duration, Autostop, Check, DurationError, Guest, MachineConfig, Mount, Port,
    RestartPolicy, Service, StopConfig,
};
pub use lease::{Lease, LeaseData, LeaseRequest};
pub use machine::{
    CheckState, CheckStatus, CreateMachineRequest, Machine, MachineEvent, MachineState,
    StartResponse, StopRequest, UpdateMachineRequest, WaitResponse, WaitState,
};
pub use volume::{CreateVolumeRequest, Volume};

/// Fly's error body: `{"error": "<code>: <text>"}`, sometimes with `status` and `message`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// gRPC-style `"<code>: <text>"`.
    #[serde(default)]
    pub error: String,
    /// `unknown`, `insufficient_capacity`, `name_taken`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// A message fly-go prefers over `error` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The body of `POST /v1/apps`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateAppRequest {
    /// The app name (the docs also write it `name`).
    #[serde(alias = "name")]
    pub app_name: String,
    /// The organization.
    #[serde(default)]
    pub org_slug: String,
    /// A custom private network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// The answer to `POST /v1/apps`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct App {
    /// App id.
    pub id: String,
    /// App name.
    #[serde(default)]
    pub name: String,
    /// Creation time in Unix milliseconds.
    #[serde(default)]
    pub created_at: i64,
}
