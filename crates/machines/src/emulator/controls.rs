//! Test-only controls under `/_emulator/`: call counts, injected faults and timings.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rate::RateLimit;

/// Timings and switches of the emulator, adjustable at run time with
/// `POST /_emulator/settings` (every field optional there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Milliseconds a new machine stays `created` before it boots (Fly: about 6 s).
    pub created_ms: u64,
    /// Milliseconds an updated machine stays `replacing` (Fly: a few seconds).
    pub replacing_ms: u64,
    /// Milliseconds a machine stays `suspending` before it is frozen.
    pub suspending_ms: u64,
    /// A process that exits within this many milliseconds of its start ends `failed`;
    /// a later exit ends `stopped`.
    pub boot_window_ms: u64,
    /// Milliseconds a destroyed machine is still answered (`state: destroyed`) before 404.
    pub destroyed_retention_ms: u64,
    /// Give a machine a new private address every time it starts (Fly's address can change
    /// across restarts).
    pub reassign_address_on_start: bool,
    /// Per-action rate limit; `None` (the default) is unlimited.
    pub rate_limit: Option<RateLimit>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            created_ms: 300,
            replacing_ms: 300,
            suspending_ms: 0,
            boot_window_ms: 1000,
            destroyed_retention_ms: 5000,
            reassign_address_on_start: false,
            rate_limit: None,
        }
    }
}

impl Settings {
    pub(crate) fn created(&self) -> Duration {
        Duration::from_millis(self.created_ms)
    }

    pub(crate) fn replacing(&self) -> Duration {
        Duration::from_millis(self.replacing_ms)
    }

    pub(crate) fn suspending(&self) -> Duration {
        Duration::from_millis(self.suspending_ms)
    }

    pub(crate) fn boot_window(&self) -> Duration {
        Duration::from_millis(self.boot_window_ms)
    }

    pub(crate) fn destroyed_retention(&self) -> Duration {
        Duration::from_millis(self.destroyed_retention_ms)
    }

    /// Applies the fields present in a `POST /_emulator/settings` body.
    pub(crate) fn apply(&mut self, patch: SettingsPatch) {
        let SettingsPatch {
            created_ms,
            replacing_ms,
            suspending_ms,
            boot_window_ms,
            destroyed_retention_ms,
            reassign_address_on_start,
            rate_limit,
        } = patch;
        self.created_ms = created_ms.unwrap_or(self.created_ms);
        self.replacing_ms = replacing_ms.unwrap_or(self.replacing_ms);
        self.suspending_ms = suspending_ms.unwrap_or(self.suspending_ms);
        self.boot_window_ms = boot_window_ms.unwrap_or(self.boot_window_ms);
        self.destroyed_retention_ms = destroyed_retention_ms.unwrap_or(self.destroyed_retention_ms);
        self.reassign_address_on_start =
            reassign_address_on_start.unwrap_or(self.reassign_address_on_start);
        if let Some(limit) = rate_limit {
            self.rate_limit = limit;
        }
    }
}

/// The body of `POST /_emulator/settings`: only the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// See [`Settings::created_ms`].
    pub created_ms: Option<u64>,
    /// See [`Settings::replacing_ms`].
    pub replacing_ms: Option<u64>,
    /// See [`Settings::suspending_ms`].
    pub suspending_ms: Option<u64>,
    /// See [`Settings::boot_window_ms`].
    pub boot_window_ms: Option<u64>,
    /// See [`Settings::destroyed_retention_ms`].
    pub destroyed_retention_ms: Option<u64>,
    /// See [`Settings::reassign_address_on_start`].
    pub reassign_address_on_start: Option<bool>,
    /// `{"rate_limit": null}` switches the limit off, an object sets it.
    #[serde(default, with = "double_option")]
    pub rate_limit: Option<Option<RateLimit>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RateLimit;

    pub fn serialize<S: Serializer>(
        value: &Option<Option<RateLimit>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.flatten().serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<RateLimit>>, D::Error> {
        Option::<RateLimit>::deserialize(deserializer).map(Some)
    }
}

/// The body of `POST /_emulator/faults`: answer the next `count` calls of `action`
/// with `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// The action name, as in `/_emulator/stats` (`create`, `start`, `wait`, ...).
    pub action: String,
    /// The HTTP status to answer, e.g. 503 or 429.
    pub status: u16,
    /// How many calls get it.
    #[serde(default = "one")]
    pub count: u32,
    /// A `Retry-After` header, in seconds.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// Only calls about this machine.
    #[serde(default)]
    pub machine_id: Option<String>,
    /// Carry out the call first, then answer the fault: a response lost after the work
    /// was done, the ambiguous case clients must not turn into duplicates.
    #[serde(default)]
    pub after: bool,
}

fn one() -> u32 {
    1
}

/// Counts of calls per action, the answer of `GET /_emulator/stats`.
pub type Stats = BTreeMap<String, u64>;
