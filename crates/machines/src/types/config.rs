//! `MachineConfig` and its parts, as Fly's `fly.MachineConfig`.
//!
//! Fly replaces a machine's config whole on update, so every struct keeps the fields it
//! does not model in `extra` and writes them back unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A machine's configuration (`config` in create, update and machine responses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The image reference, the one required field.
    pub image: String,
    /// Environment variables of the machine's process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Free-form key/value metadata; `list` can filter on it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// CPU and memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
    /// Services the Fly proxy routes to the machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Health checks by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, Check>,
    /// Volumes mounted into the machine (Fly allows one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// What happens when the process exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// The signal and grace period used by `stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_config: Option<StopConfig>,
    /// Destroy the machine when its process exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_destroy: Option<bool>,
    /// Every field not modelled above, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `config.guest`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Guest {
    /// `shared` or `performance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
    /// Number of CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MiB, a multiple of 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `config.services`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// `tcp` or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The port the machine's process listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_port: Option<u16>,
    /// Public ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Whether the Fly proxy stops or suspends the machine when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostop: Option<Autostop>,
    /// Whether the Fly proxy starts the machine on a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Machines the proxy keeps running in the primary region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<u32>,
    /// Every other field (concurrency, checks, ...), kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `services[].ports`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Port {
    /// The public port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Handlers such as `http` and `tls`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<String>,
    /// Redirect plain HTTP to HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_https: Option<bool>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `services[].autostop`: what the Fly proxy does with an idle machine.
///
/// Fly accepts `"off"`, `"stop"`, `"suspend"` and the legacy booleans, and answers with
/// `false` for off, `true` for stop and `"suspend"` for suspend; this type does the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autostop {
    /// Never stop.
    Off,
    /// Stop when idle.
    Stop,
    /// Suspend when idle.
    Suspend,
}

impl Serialize for Autostop {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Autostop::Off => serializer.serialize_bool(false),
            Autostop::Stop => serializer.serialize_bool(true),
            Autostop::Suspend => serializer.serialize_str("suspend"),
        }
    }
}

impl<'de> Deserialize<'de> for Autostop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bool(false) => Ok(Autostop::Off),
            Raw::Bool(true) => Ok(Autostop::Stop),
            Raw::Text(text) => match text.as_str() {
                "off" | "false" | "" => Ok(Autostop::Off),
                "stop" | "true" => Ok(Autostop::Stop),
                "suspend" => Ok(Autostop::Suspend),
                other => Err(serde::de::Error::custom(format!(
                    "invalid autostop {other:?}: expected off, stop, suspend or a boolean"
                ))),
            },
        }
    }
}

/// One entry of `config.checks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// `http` or `tcp`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The port checked on the machine's private address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Go duration between checks (`"15s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Go duration a check may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Go duration after start before failures count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<String>,
    /// HTTP method (default GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `config.mounts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    /// The volume id (`vol_...`).
    #[serde(default)]
    pub volume: String,
    /// Where the volume is mounted, e.g. `/data`.
    #[serde(default)]
    pub path: String,
    /// The volume's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `config.restart`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// `no`, `always` or `on-failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Retries for `on-failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `config.stop_config`, also the body of a stop call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopConfig {
    /// Signal name such as `SIGTERM` (Fly's default is `SIGINT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Go duration to wait before SIGKILL (`"10s"`). A JSON number is nanoseconds, as
    /// fly-go's `Duration` reads it, and is kept as its decimal text.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration_text_or_nanos"
    )]
    pub timeout: Option<String>,
}

/// A Go duration given as text, or as a JSON number of nanoseconds (fly-go's `Duration`).
fn duration_text_or_nanos<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Nanos(u64),
        Fractional(f64),
    }
    match Option::<Raw>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Raw::Text(text)) => Ok(Some(text)),
        Some(Raw::Nanos(nanos)) => Ok(Some(nanos.to_string())),
        // Go converts a float to `time.Duration` by truncating it.
        Some(Raw::Fractional(nanos)) if nanos.is_finite() && (0.0..9.2e18).contains(&nanos) => {
            Ok(Some((nanos as u64).to_string()))
        }
        Some(Raw::Fractional(nanos)) => Err(serde::de::Error::custom(format!(
            "invalid duration {nanos}: expected nanoseconds within Go's time.Duration"
        ))),
    }
}

/// A text that is not a Go duration, or one longer than Go's `time.Duration` holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {text:?}: {reason}")]
pub struct DurationError {
    text: String,
    reason: &'static str,
}

/// The longest Go duration: `time.Duration` is an `int64` of nanoseconds (about 292 years).
const MAX_GO_DURATION: std::time::Duration = std::time::Duration::from_nanos(i64::MAX as u64);

/// Parses a Go duration string (`"1m30s"`, `"500ms"`); a bare number is nanoseconds, as in
/// fly-go. Anything Go's `time.ParseDuration` would reject as out of range is an error.
pub fn parse_go_duration(text: &str) -> Result<std::time::Duration, DurationError> {
    let error = |reason| DurationError { text: text.to_owned(), reason };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(error("empty"));
    }
    let total = match trimmed.parse::<u64>() {
        Ok(nanos) => std::time::Duration::from_nanos(nanos),
        Err(_) => {
            let seconds = sum_of_units(trimmed).ok_or_else(|| error("expected e.g. 1m30s"))?;
            std::time::Duration::try_from_secs_f64(seconds).map_err(|_| error("out of range"))?
        }
    };
    if total > MAX_GO_DURATION {
        return Err(error("out of range"));
    }
    Ok(total)
}

/// The seconds in `1h2m3.5s`-style text; `None` when a number or unit is malformed.
fn sum_of_units(text: &str) -> Option<f64> {
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * seconds;
        rest = tail;
    }
    total.is_finite().then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_autostop(json: &str, expected: Autostop, written: &str) {
        let parsed: Autostop = serde_json::from_str(json).expect(json);
        assert_eq!(parsed, expected, "{json}");
        assert_eq!(serde_json::to_string(&parsed).unwrap(), written, "{json}");
    }

    #[test]
    fn autostop_reads_every_form_and_writes_fly_s() {
        check_autostop("false", Autostop::Off, "false");
        check_autostop("\"off\"", Autostop::Off, "false");
        check_autostop("true", Autostop::Stop, "true");
        check_autostop("\"stop\"", Autostop::Stop, "true");
        check_autostop("\"suspend\"", Autostop::Suspend, "\"suspend\"");
        assert!(serde_json::from_str::<Autostop>("\"sleep\"").is_err());
    }

    #[test]
    fn unknown_config_fields_survive_a_round_trip() {
        let json = serde_json::json!({
            "image": "registry.example/matrix:1",
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512, "kernel_args": ["x"]},
            "services": [{"internal_port": 8080, "autostop": "suspend",
                          "concurrency": {"type": "requests", "soft_limit": 20},
                          "ports": [{"port": 443, "handlers": ["tls", "http"],
                                     "tls_options": {}}]}],
            "checks": {"h": {"type": "http", "port": 8080, "path": "/healthz", "headers": []}},
            "mounts": [{"volume": "vol_1", "path": "/data", "add_size_gb": 1}],
            "init": {"swap_size_mb": 0},
            "files": [{"guest_path": "/etc/x", "raw_value": "eA=="}],
        });
        let config: MachineConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(config.services[0].autostop, Some(Autostop::Suspend));
        assert_eq!(serde_json::to_value(&config).unwrap(), json);
    }

    fn check_duration(text: &str, expected: Option<u64>) {
        let parsed = parse_go_duration(text).ok().map(|d| d.as_millis() as u64);
        assert_eq!(parsed, expected, "{text}");
    }

    #[test]
    fn go_durations() {
        check_duration("15s", Some(15_000));
        check_duration("1m30s", Some(90_000));
        check_duration("500ms", Some(500));
        check_duration("1.5s", Some(1_500));
        check_duration("2000000000", Some(2_000));
        check_duration("", None);
        check_duration("5 minutes", None);
        check_duration("99999999999999999h", None);
        check_duration("18446744073709551615", None);
        check_duration(&format!("{}h", "9".repeat(400)), None);
        check_duration("2562047h", Some(2_562_047 * 3_600_000));
    }
}
