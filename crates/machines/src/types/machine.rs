//! Machines: the object, its states, events and checks, and the create/update/stop bodies.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::{MachineConfig, StopConfig};

/// A Fly Machine as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// 14-hex machine id.
    pub id: String,
    /// Name, unique in the app.
    #[serde(default)]
    pub name: String,
    /// Current state.
    pub state: MachineState,
    /// Region code.
    #[serde(default)]
    pub region: String,
    /// The current version: a 26-character ULID that changes on every update.
    #[serde(default)]
    pub instance_id: String,
    /// The machine's private address (an IPv6 6PN address on Fly, 127.x.y.z in the emulator).
    #[serde(default)]
    pub private_ip: String,
    /// The configuration of the current version.
    #[serde(default)]
    pub config: MachineConfig,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created_at: String,
    /// RFC 3339 time of the last change.
    #[serde(default)]
    pub updated_at: String,
    /// Recent lifecycle events, newest first.
    #[serde(default)]
    pub events: Vec<MachineEvent>,
    /// Health check results.
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
    /// Lease nonce, present when the machine was created with `lease_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Every other field (`image_ref`, `host_status`, ...), kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Machine {
    /// The first service's internal port, Fly's default 8080 when there is none.
    pub fn internal_port(&self) -> u16 {
        self.config.services.iter().find_map(|s| s.internal_port).unwrap_or(8080)
    }

    /// The machine's events of the given type (`launch`, `start`, `exit`, ...).
    pub fn events_of(&self, kind: &str) -> impl Iterator<Item = &MachineEvent> {
        let kind = kind.to_owned();
        self.events.iter().filter(move |e| e.kind == kind)
    }
}

/// A machine state, as in <https://fly.io/docs/machines/machine-states/>.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Being created.
    Creating,
    /// Created, not yet started.
    Created,
    /// Booting.
    Starting,
    /// Running.
    Started,
    /// Being stopped.
    Stopping,
    /// Stopped.
    Stopped,
    /// Being suspended.
    Suspending,
    /// Suspended (memory snapshot kept).
    Suspended,
    /// Restarting.
    Restarting,
    /// Being updated in place.
    Updating,
    /// Being replaced by a new version.
    Replacing,
    /// An old version that was replaced.
    Replaced,
    /// Being destroyed.
    Destroying,
    /// Destroyed.
    Destroyed,
    /// Failed to boot or crashed.
    Failed,
    /// Failed to launch (then destroyed).
    LaunchFailed,
    /// Moved to another host.
    Migrated,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

impl MachineState {
    /// The name Fly uses in JSON and in query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Creating => "creating",
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Suspending => "suspending",
            MachineState::Suspended => "suspended",
            MachineState::Restarting => "restarting",
            MachineState::Updating => "updating",
            MachineState::Replacing => "replacing",
            MachineState::Replaced => "replaced",
            MachineState::Destroying => "destroying",
            MachineState::Destroyed => "destroyed",
            MachineState::Failed => "failed",
            MachineState::LaunchFailed => "launch_failed",
            MachineState::Migrated => "migrated",
            MachineState::Unknown => "unknown",
        }
    }

    /// Whether the machine is on its way somewhere else (Fly's "transient" states).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            MachineState::Creating
                | MachineState::Starting
                | MachineState::Stopping
                | MachineState::Suspending
                | MachineState::Restarting
                | MachineState::Updating
                | MachineState::Replacing
                | MachineState::Destroying
                | MachineState::LaunchFailed
        )
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state `wait` can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitState {
    /// `started`.
    Started,
    /// `stopped` (needs the version).
    Stopped,
    /// `suspended`.
    Suspended,
    /// `destroyed`.
    Destroyed,
    /// `failed`.
    Failed,
    /// Any non-transient state.
    Settled,
}

impl WaitState {
    /// The name Fly uses in the `state` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitState::Started => "started",
            WaitState::Stopped => "stopped",
            WaitState::Suspended => "suspended",
            WaitState::Destroyed => "destroyed",
            WaitState::Failed => "failed",
            WaitState::Settled => "settled",
        }
    }

    /// Parses a `state` query value.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "started" => WaitState::Started,
            "stopped" => WaitState::Stopped,
            "suspended" => WaitState::Suspended,
            "destroyed" => WaitState::Destroyed,
            "failed" => WaitState::Failed,
            "settled" => WaitState::Settled,
            _ => return None,
        })
    }

    /// Whether a machine in `state` satisfies this wait.
    pub fn is_reached_by(self, state: MachineState) -> bool {
        match self {
            WaitState::Settled => !state.is_transient(),
            WaitState::Started => state == MachineState::Started,
            WaitState::Stopped => state == MachineState::Stopped,
            WaitState::Suspended => state == MachineState::Suspended,
            WaitState::Destroyed => state == MachineState::Destroyed,
            WaitState::Failed => state == MachineState::Failed,
        }
    }
}

impl fmt::Display for WaitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a machine's `events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineEvent {
    /// Event id (a ULID).
    #[serde(default)]
    pub id: String,
    /// `launch`, `start`, `stop`, `suspend`, `exit`, `update`, `destroy`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The state the event led to (`created`, `started`, ...).
    pub status: String,
    /// `user` or `flyd`.
    #[serde(default)]
    pub source: String,
    /// Unix time in milliseconds.
    #[serde(default)]
    pub timestamp: i64,
    /// Details, e.g. `{"exit_event": {"exit_code": 1, ...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
}

/// A health check's last result, in a machine's `checks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// The check's name (its key in `config.checks`).
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: CheckState,
    /// What the check saw.
    #[serde(default)]
    pub output: String,
    /// RFC 3339 time of the result.
    #[serde(default)]
    pub updated_at: String,
}

/// A health check status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    /// The check succeeds.
    Passing,
    /// Not failing yet, not passing either.
    Warning,
    /// The check fails.
    Critical,
}

/// The body of `POST /v1/apps/{app}/machines`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateMachineRequest {
    /// Name; Fly makes one up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Region code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The configuration.
    pub config: MachineConfig,
    /// Create without booting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_launch: bool,
    /// Create without registering services (cordoned).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_service_registration: bool,
    /// Create already leased for this many seconds; the nonce is in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
}

/// The body of `POST /v1/apps/{app}/machines/{id}`: the whole new config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateMachineRequest {
    /// The new configuration, replacing the old one whole.
    pub config: MachineConfig,
    /// The `instance_id` the caller read; a different current version rejects the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Leave the new version stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_launch: bool,
    /// Update without touching service registration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_service_registration: bool,
}

/// The body of a stop call: the signal and how long to wait before SIGKILL.
pub type StopRequest = StopConfig;

/// The answer to `start`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartResponse {
    /// The state the machine was in.
    #[serde(default)]
    pub previous_state: String,
    /// Whether the machine moved host.
    #[serde(default)]
    pub migrated: bool,
    /// The new host, if it moved.
    #[serde(default)]
    pub new_host: String,
}

/// The answer to `wait`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaitResponse {
    /// Always true on 200.
    #[serde(default)]
    pub ok: bool,
    /// The state reached.
    #[serde(default)]
    pub state: String,
    /// The machine version the wait was about.
    #[serde(default)]
    pub version: String,
    /// The event that satisfied the wait.
    #[serde(default)]
    pub event_id: String,
}
