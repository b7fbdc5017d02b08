//! Configuration: environment variables only, each name a constant here, read once at start.
//!
//! A missing or malformed value is a [`ConfigError`] naming the variable; `main` prints it
//! and exits with status 64 before anything else happens.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

/// Address the API listens on. Default `[::]:8080` (Fly's private network is IPv6).
pub const LISTEN_ADDR: &str = "MATRIX_LISTEN_ADDR";
/// Root of the volume. Default `/data`.
pub const DATA_DIR: &str = "MATRIX_DATA_DIR";
/// Bearer token every route but `/healthz` requires. Required by `serve`.
pub const DAEMON_TOKEN: &str = "MATRIX_DAEMON_TOKEN";
/// The user this daemon belongs to (a UUID). Required.
pub const USER_ID: &str = "MATRIX_USER_ID";
/// Fireworks API key; chooses Fireworks as the model provider.
pub const FIREWORKS_API_KEY: &str = "FIREWORKS_API_KEY";
/// Together API key; chooses Together when no Fireworks key is set.
pub const TOGETHER_API_KEY: &str = "TOGETHER_API_KEY";
/// Overrides the provider's base URL (ending in `/v1`); with no key it names a local server.
pub const LLM_BASE_URL: &str = "MATRIX_LLM_BASE_URL";
/// Model name sent to the provider.
pub const LLM_MODEL: &str = "MATRIX_LLM_MODEL";
/// S3-compatible endpoint URL of the snapshot store.
pub const S3_ENDPOINT: &str = "S3_ENDPOINT";
/// Bucket holding snapshots.
pub const S3_BUCKET: &str = "S3_BUCKET";
/// Region requests are signed for.
pub const S3_REGION: &str = "S3_REGION";
/// Access key id of the snapshot store.
pub const S3_ACCESS_KEY_ID: &str = "S3_ACCESS_KEY_ID";
/// Secret access key of the snapshot store.
pub const S3_SECRET_ACCESS_KEY: &str = "S3_SECRET_ACCESS_KEY";
/// Seconds an S3 call may wait to connect and for the response headers, and a streamed
/// download for its next bytes. Default 30, at least 1.
pub const S3_TIMEOUT_SECS: &str = "MATRIX_S3_TIMEOUT_SECS";
/// How many snapshots to keep. Default 5, at least 1.
pub const SNAPSHOT_KEEP: &str = "MATRIX_SNAPSHOT_KEEP";
/// Seconds between periodic snapshots (pushed only when state changed); 0 turns them off.
/// Default 300.
pub const SNAPSHOT_INTERVAL_SECS: &str = "MATRIX_SNAPSHOT_INTERVAL_SECS";
/// Seconds a graceful drain waits for a running intent before cancelling it. Default 30.
pub const DRAIN_TIMEOUT_SECS: &str = "MATRIX_DRAIN_TIMEOUT_SECS";
/// `standalone` (default) or `dual`.
pub const MODE: &str = "MATRIX_MODE";
/// Test hook: the name of a step at which the process kills itself with SIGKILL (see
/// `failpoint.rs`). Unset in production.
pub const FAILPOINT: &str = "MATRIX_FAILPOINT";

/// Every variable above, checked for text that is not UTF-8 before any is read.
const VARIABLES: &[&str] = &[
    LISTEN_ADDR,
    DATA_DIR,
    DAEMON_TOKEN,
    USER_ID,
    FIREWORKS_API_KEY,
    TOGETHER_API_KEY,
    LLM_BASE_URL,
    LLM_MODEL,
    S3_ENDPOINT,
    S3_BUCKET,
    S3_REGION,
    S3_ACCESS_KEY_ID,
    S3_SECRET_ACCESS_KEY,
    S3_TIMEOUT_SECS,
    SNAPSHOT_KEEP,
    SNAPSHOT_INTERVAL_SECS,
    DRAIN_TIMEOUT_SECS,
    MODE,
    FAILPOINT,
];

/// A day: larger S3 bounds are mistakes, and would overflow the bounds derived from them.
const MAX_S3_TIMEOUT_SECS: u64 = 86_400;

/// Every S3 variable; snapshots need all or none.
const S3_VARIABLES: [&str; 5] =
    [S3_ENDPOINT, S3_BUCKET, S3_REGION, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY];

const FIREWORKS_BASE_URL: &str = "https://api.fireworks.ai/inference/v1";
const FIREWORKS_DEFAULT_MODEL: &str = "accounts/fireworks/models/llama-v3p1-70b-instruct";
const TOGETHER_BASE_URL: &str = "https://api.together.xyz/v1";
const TOGETHER_DEFAULT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const LOCAL_DEFAULT_MODEL: &str = "local";

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is required but not set")]
    Missing { name: &'static str },
    #[error("{name} is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
    #[error("S3 snapshots are partly configured: {missing} not set (set all of {all}, or none)")]
    PartialS3 { missing: String, all: String },
    #[error("snapshots are off: set {all}")]
    SnapshotsOff { all: String },
    #[error("{DATA_DIR} ({path}) {problem}")]
    DataDir { path: String, problem: String },
}

/// How the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One process serves the API and runs the background work.
    Standalone,
    /// A supervisor runs the API front door and the executor as two processes.
    Dual,
}

/// Where model calls go.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Base URL ending in `/v1`; `None` when no provider is configured.
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
    pub model: String,
}

/// The snapshot store.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Bound on each call's wait for an answer; see [`S3_TIMEOUT_SECS`].
    pub timeout: Duration,
}

/// Everything `matrixd` reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Required by `serve`; see [`Config::daemon_token`].
    daemon_token: Option<Secret>,
    pub user_id: Uuid,
    pub model: ModelConfig,
    /// `None`: snapshots are off.
    pub s3: Option<S3Config>,
    pub snapshot_keep: usize,
    /// `None`: no periodic snapshots.
    pub snapshot_interval: Option<Duration>,
    /// How long a graceful drain waits for a running intent before cancelling it.
    pub drain_timeout: Duration,
    pub mode: Mode,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A value that is not UTF-8 is an error, not "unset": an unreadable MATRIX_DATA_DIR
        // must not fall back to /data.
        for &name in VARIABLES {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(name) {
                return Err(ConfigError::Malformed { name, reason: "not valid UTF-8".into() });
            }
        }
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads through `lookup`, so tests can pass a map. Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let listen_addr = parse_or(&get, LISTEN_ADDR, "[::]:8080".parse().expect("default"))?;
        let data_dir = get(DATA_DIR).map(PathBuf::from).unwrap_or_else(|| "/data".into());
        let user_id = get(USER_ID).ok_or(ConfigError::Missing { name: USER_ID })?;
        let user_id = Uuid::parse_str(&user_id)
            .map_err(|e| ConfigError::Malformed { name: USER_ID, reason: e.to_string() })?;
        let snapshot_keep: usize = parse_or(&get, SNAPSHOT_KEEP, 5)?;
        if snapshot_keep == 0 {
            return Err(malformed(SNAPSHOT_KEEP, "must be at least 1"));
        }
        let interval: u64 = parse_or(&get, SNAPSHOT_INTERVAL_SECS, 300)?;
        let drain_timeout: u64 = parse_or(&get, DRAIN_TIMEOUT_SECS, 30)?;
        let mode = match get(MODE).as_deref() {
            None | Some("standalone") => Mode::Standalone,
            Some("dual") => Mode::Dual,
            Some(other) => {
                return Err(malformed(MODE, &format!("`{other}` is not standalone or dual")))
            }
        };

        Ok(Self {
            listen_addr,
            data_dir,
            daemon_token: get(DAEMON_TOKEN).map(Secret::new),
            user_id,
            model: model_config(&get)?,
            s3: s3_config(&get)?,
            snapshot_keep,
            snapshot_interval: (interval > 0).then(|| Duration::from_secs(interval)),
            drain_timeout: Duration::from_secs(drain_timeout),
            mode,
        })
    }

    /// The API token; `serve` calls this at start so a missing token stops it with exit 64.
    pub fn daemon_token(&self) -> Result<&Secret, ConfigError> {
        self.daemon_token.as_ref().ok_or(ConfigError::Missing { name: DAEMON_TOKEN })
    }

    /// The snapshot store; `snapshot push` and `snapshot restore` need it.
    pub fn s3(&self) -> Result<&S3Config, ConfigError> {
        self.s3.as_ref().ok_or_else(|| ConfigError::SnapshotsOff { all: S3_VARIABLES.join(", ") })
    }

    /// Checks that the data directory is a directory this process can write, creating it
    /// when missing, so a wrong [`DATA_DIR`] stops every command before it starts work.
    /// Leaves nothing behind in it.
    pub fn check_data_dir(&self) -> Result<(), ConfigError> {
        check_data_dir(&self.data_dir)
    }
}

fn check_data_dir(path: &Path) -> Result<(), ConfigError> {
    let refuse =
        |problem: String| ConfigError::DataDir { path: path.display().to_string(), problem };
    match std::fs::metadata(path) {
        Ok(metadata) if !metadata.is_dir() => {
            return Err(refuse("is not a directory".into()));
        }
        // Root working on the daemon's volume (an operator's shell on the machine) would
        // leave root-owned files the daemon can no longer read or replace.
        Ok(metadata) if nix::unistd::geteuid().is_root() && metadata.uid() != 0 => {
            return Err(refuse(format!(
                "belongs to uid {}: run matrixd as that user, not as root (files root \
                 writes there would lock the daemon out)",
                metadata.uid()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| refuse(format!("cannot be created: {e}")))?;
        }
        Err(e) => return Err(refuse(format!("cannot be read: {e}"))),
    }
    // An unnamed temporary file: it disappears when closed.
    tempfile::tempfile_in(path).map_err(|e| refuse(format!("is not writable: {e}")))?;
    Ok(())
}

/// The failpoint named by [`FAILPOINT`], if any.
pub fn failpoint() -> Option<String> {
    std::env::var(FAILPOINT).ok()
}

fn model_config(get: &impl Fn(&str) -> Option<String>) -> Result<ModelConfig, ConfigError> {
    let (provider_url, api_key, default_model) = if let Some(key) = get(FIREWORKS_API_KEY) {
        (Some(FIREWORKS_BASE_URL), Some(Secret::new(key)), FIREWORKS_DEFAULT_MODEL)
    } else if let Some(key) = get(TOGETHER_API_KEY) {
        (Some(TOGETHER_BASE_URL), Some(Secret::new(key)), TOGETHER_DEFAULT_MODEL)
    } else {
        (None, None, LOCAL_DEFAULT_MODEL)
    };
    let base_url = match get(LLM_BASE_URL) {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url),
        Some(_) => return Err(malformed(LLM_BASE_URL, "must start with http:// or https://")),
        None => provider_url.map(str::to_owned),
    };
    let model = get(LLM_MODEL).unwrap_or_else(|| default_model.to_owned());
    Ok(ModelConfig {
        base_url: base_url.map(|u| u.trim_end_matches('/').to_owned()),
        api_key,
        model,
    })
}

fn s3_config(get: &impl Fn(&str) -> Option<String>) -> Result<Option<S3Config>, ConfigError> {
    let values: Vec<Option<String>> = S3_VARIABLES.iter().map(|name| get(name)).collect();
    if values.iter().all(Option::is_none) {
        return Ok(None);
    }
    let missing: Vec<&str> =
        S3_VARIABLES.iter().zip(&values).filter(|(_, v)| v.is_none()).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Err(ConfigError::PartialS3 {
            missing: missing.join(", "),
            all: S3_VARIABLES.join(", "),
        });
    }
    let [Some(endpoint), Some(bucket), Some(region), Some(access), Some(secret)] =
        <[Option<String>; 5]>::try_from(values).expect("five values")
    else {
        unreachable!("checked above that every value is set")
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(malformed(S3_ENDPOINT, "must start with http:// or https://"));
    }
    let timeout: u64 = parse_or(get, S3_TIMEOUT_SECS, 30)?;
    if !(1..=MAX_S3_TIMEOUT_SECS).contains(&timeout) {
        return Err(malformed(
            S3_TIMEOUT_SECS,
            &format!("must be between 1 and {MAX_S3_TIMEOUT_SECS} seconds"),
        ));
    }
    Ok(Some(S3Config {
        endpoint,
        bucket,
        region,
        access_key_id: access,
        secret_access_key: Secret::new(secret),
        timeout: Duration::from_secs(timeout),
    }))
}

fn parse_or<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    match get(name) {
        None => Ok(default),
        Some(raw) => raw.trim().parse().map_err(|e: T::Err| malformed(name, &e.to_string())),
    }
}

fn malformed(name: &'static str, reason: &str) -> ConfigError {
    ConfigError::Malformed { name, reason: reason.to_owned() }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const USER: &str = "6f1c2a4e-1b7d-4c55-9a57-2f1f1f0e9b01";

    fn check(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_apply_when_only_the_user_is_set() {
        let config = check(&[(USER_ID, USER)]).unwrap();
        assert_eq!(config.listen_addr.to_string(), "[::]:8080");
        assert_eq!(config.data_dir, PathBuf::from("/data"));
        assert!(config.s3.is_none());
        assert!(config.model.base_url.is_none());
        assert_eq!(config.mode, Mode::Standalone);
        assert_eq!(config.drain_timeout, Duration::from_secs(30));
        assert_eq!(
            config.daemon_token().unwrap_err().to_string(),
            format!("{DAEMON_TOKEN} is required but not set")
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], USER_ID),
            (&[(USER_ID, "nope")], USER_ID),
            (&[(USER_ID, USER), (LISTEN_ADDR, "localhost")], LISTEN_ADDR),
            (&[(USER_ID, USER), (SNAPSHOT_KEEP, "0")], SNAPSHOT_KEEP),
            (&[(USER_ID, USER), (MODE, "triple")], MODE),
            (&[(USER_ID, USER), (DRAIN_TIMEOUT_SECS, "soon")], DRAIN_TIMEOUT_SECS),
            (&[(USER_ID, USER), (S3_BUCKET, "b")], S3_SECRET_ACCESS_KEY),
            (&[(USER_ID, USER), (LLM_BASE_URL, "ftp://x")], LLM_BASE_URL),
            (
                &[
                    (USER_ID, USER),
                    (S3_ENDPOINT, "http://s3"),
                    (S3_BUCKET, "b"),
                    (S3_REGION, "r"),
                    (S3_ACCESS_KEY_ID, "a"),
                    (S3_SECRET_ACCESS_KEY, "s"),
                    (S3_TIMEOUT_SECS, "soon"),
                ],
                S3_TIMEOUT_SECS,
            ),
            (
                &[
                    (USER_ID, USER),
                    (S3_ENDPOINT, "http://s3"),
                    (S3_BUCKET, "b"),
                    (S3_REGION, "r"),
                    (S3_ACCESS_KEY_ID, "a"),
                    (S3_SECRET_ACCESS_KEY, "s"),
                    (S3_TIMEOUT_SECS, "0"),
                ],
                S3_TIMEOUT_SECS,
            ),
        ];
        for (vars, name) in cases {
            let message = check(vars).unwrap_err().to_string();
            assert!(message.contains(name), "{message:?} should name {name}");
        }
    }

    #[test]
    fn a_data_dir_that_is_a_file_or_missing_s3_name_the_variables() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let config = check(&[(USER_ID, USER), (DATA_DIR, file.path().to_str().unwrap())]).unwrap();
        let message = config.check_data_dir().unwrap_err().to_string();
        assert!(message.contains(DATA_DIR) && message.contains("not a directory"), "{message}");

        let message = config.s3().unwrap_err().to_string();
        for name in S3_VARIABLES {
            assert!(message.contains(name), "{message:?} should name {name}");
        }
    }

    #[test]
    fn a_missing_data_dir_is_created_and_left_empty() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("data");
        let config = check(&[(USER_ID, USER), (DATA_DIR, root.to_str().unwrap())]).unwrap();
        config.check_data_dir().unwrap();
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn secrets_do_not_print() {
        let config = check(&[
            (USER_ID, USER),
            (DAEMON_TOKEN, "tok-sekrit"),
            (FIREWORKS_API_KEY, "fw-sekrit"),
        ])
        .unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("sekrit"), "{printed}");
        assert_eq!(config.model.base_url.as_deref(), Some(FIREWORKS_BASE_URL));
    }
}
