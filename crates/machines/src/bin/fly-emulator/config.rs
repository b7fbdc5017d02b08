//! The emulator's settings, from flags or the environment, checked before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Listen address (flag `--listen`).
pub const LISTEN_VAR: &str = "FLY_EMULATOR_LISTEN";
/// Image map JSON file (flag `--image-map`).
pub const IMAGE_MAP_VAR: &str = "FLY_EMULATOR_IMAGE_MAP";
/// State directory (flag `--state-dir`).
pub const STATE_DIR_VAR: &str = "FLY_EMULATOR_STATE_DIR";
/// Region code given to machines and volumes (flag `--region`).
pub const REGION_VAR: &str = "FLY_EMULATOR_REGION";
/// `true` turns on Fly's documented per-action rate limit (flag `--rate-limit`).
pub const RATE_LIMIT_VAR: &str = "FLY_EMULATOR_RATE_LIMIT";
/// `true` gives machines a new address on every start (flag `--reassign-addresses`).
pub const REASSIGN_VAR: &str = "FLY_EMULATOR_REASSIGN_ADDRESSES";
/// The API token clients must present; read from the environment only, so that it never
/// shows in a process listing.
pub const TOKEN_VAR: &str = "FLY_API_TOKEN";

const DEFAULT_LISTEN: &str = "127.0.0.1:4280";

/// A local emulator of the Fly Machines API that runs each machine as a local process.
///
/// The API token is read from FLY_API_TOKEN.
#[derive(Debug, Parser)]
#[command(name = "fly-emulator", version)]
pub struct Cli {
    /// Loopback address to listen on [default: 127.0.0.1:4280].
    #[arg(long, env = LISTEN_VAR, value_name = "ADDR")]
    listen: Option<String>,
    /// JSON file mapping image references to local commands.
    #[arg(long, env = IMAGE_MAP_VAR, value_name = "FILE")]
    image_map: Option<PathBuf>,
    /// Directory for the emulator's state and the volumes' files.
    #[arg(long, env = STATE_DIR_VAR, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Region code of machines and volumes [default: local].
    #[arg(long, env = REGION_VAR)]
    region: Option<String>,
    /// Apply Fly's per-action rate limit (1 req/s, burst 3; get 5 req/s, burst 10).
    #[arg(
        long,
        env = RATE_LIMIT_VAR,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    rate_limit: Option<String>,
    /// Give machines a new private address on every start.
    #[arg(
        long,
        env = REASSIGN_VAR,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    reassign_addresses: Option<String>,
}

/// The checked settings.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub image_map: PathBuf,
    pub state_dir: PathBuf,
    pub region: String,
    pub rate_limit: bool,
    pub reassign_addresses: bool,
    pub token: String,
}

/// A missing or malformed setting, named by its variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set (or pass the matching flag)")]
    Missing(&'static str),
    #[error("{0} is not set (it is read from the environment only)")]
    MissingFromEnvironment(&'static str),
    #[error("{name} is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
}

impl Config {
    /// Checks the parsed flags and reads the token.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let listen_text = cli.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError::Malformed {
            name: LISTEN_VAR,
            reason: format!("{listen_text:?} is not an address:port"),
        })?;
        if !listen.ip().is_loopback() {
            return Err(ConfigError::Malformed {
                name: LISTEN_VAR,
                reason: format!("{listen} is not a loopback address"),
            });
        }
        let token = std::env::var(TOKEN_VAR)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .ok_or(ConfigError::MissingFromEnvironment(TOKEN_VAR))?;
        Ok(Self {
            listen,
            image_map: cli.image_map.ok_or(ConfigError::Missing(IMAGE_MAP_VAR))?,
            state_dir: cli.state_dir.ok_or(ConfigError::Missing(STATE_DIR_VAR))?,
            region: cli.region.unwrap_or_else(|| "local".to_owned()),
            rate_limit: parse_bool(RATE_LIMIT_VAR, cli.rate_limit)?,
            reassign_addresses: parse_bool(REASSIGN_VAR, cli.reassign_addresses)?,
            token,
        })
    }
}

fn parse_bool(name: &'static str, value: Option<String>) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => {
            Err(ConfigError::Malformed { name, reason: format!("{other:?} is not true or false") })
        }
    }
}
