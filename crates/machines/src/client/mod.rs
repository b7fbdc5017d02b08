//! `FlyClient`: an async client of the Fly Machines API.
//!
//! Every call has a timeout. Calls are retried with exponential backoff and full jitter
//! (see [`RetryPolicy`]) when Fly answers 429 or 5xx or the connection fails, waiting for
//! `Retry-After` when Fly sends it. Whether a retry is safe depends on the call:
//!
//! - a 429 or a refused connection means the request was not acted on: every call is retried;
//! - a 5xx, a timeout or a broken connection is ambiguous (the call may have happened):
//!   reads, `update` without `current_version`, `start`, `stop`, `suspend`, `delete` and
//!   lease releases are retried because doing them twice leaves the same result (a release
//!   that finds no lease counts as done);
//! - an `update` with `current_version` is not retried after an ambiguous failure: had the
//!   first attempt worked, the retry would be refused for the version it just changed;
//! - `create_machine` stamps the config's metadata with a fresh [`CREATE_KEY_METADATA`]
//!   value, and after an ambiguous failure lists the app's machines by that key: when the
//!   first attempt did create the machine, that machine is returned instead of creating a
//!   second one;
//! - `create_volume` and `acquire_lease` have no such key and are not retried after an
//!   ambiguous failure: the error reaches the caller, who can list volumes or read the lease.

mod auth;
mod error;
mod leases;
mod machines;
mod retry;
mod transport;
mod volumes;

use transport::{decode, to_json, Attempt, Call, Idempotence};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use error::FlyError;
pub use retry::RetryPolicy;

use crate::types::{
    CreateMachineRequest, CreateVolumeRequest, ErrorBody, Lease, LeaseRequest, Machine,
    MachineEvent, MachineState, StartResponse, StopRequest, UpdateMachineRequest, Volume,
    WaitResponse, WaitState,
};

/// The header that carries a lease nonce on mutating calls.
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";

/// The metadata key `create_machine` sets to make its retries idempotent.
pub const CREATE_KEY_METADATA: &str = "machines_create_key";

/// The longest `wait` Fly accepts in one request.
pub const MAX_WAIT_SLICE: Duration = Duration::from_secs(60);

/// Timeouts and retries of a [`FlyClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// The deadline of one HTTP request (a `wait` gets its own slice on top of this).
    pub timeout: Duration,
    /// The deadline for opening a connection.
    pub connect_timeout: Duration,
    /// When and how to retry.
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

/// Filters of [`FlyClient::list_machines`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMachines {
    /// Only machines whose metadata has all these pairs.
    pub metadata: BTreeMap<String, String>,
    /// Only machines in one of these states (empty: all but destroyed).
    pub states: Vec<MachineState>,
    /// Also list destroyed machines.
    pub include_deleted: bool,
    /// Only machines in this region.
    pub region: Option<String>,
}

impl ListMachines {
    /// Machines whose metadata `key` is `value`.
    pub fn with_metadata(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self { metadata: BTreeMap::from([(key.into(), value.into())]), ..Self::default() }
    }
}

/// An async client of the Fly Machines API for one app.
#[derive(Clone)]
pub struct FlyClient {
    http: reqwest::Client,
    base: Url,
    authorization: HeaderValue,
    app: String,
    options: ClientOptions,
}

impl std::fmt::Debug for FlyClient {
    // Written by hand so that the token is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyClient")
            .field("base", &self.base.as_str())
            .field("app", &self.app)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl FlyClient {
    /// A client of the API at `base_url` (`https://api.machines.dev`, or an emulator's
    /// URL) for `app`, with default [`ClientOptions`].
    pub fn new(base_url: &str, token: &str, app: &str) -> Result<Self, FlyError> {
        Self::with_options(base_url, token, app, ClientOptions::default())
    }

    /// Like [`FlyClient::new`], with explicit timeouts and retries.
    pub fn with_options(
        base_url: &str,
        token: &str,
        app: &str,
        options: ClientOptions,
    ) -> Result<Self, FlyError> {
        let base = Url::parse(base_url)
            .ok()
            .filter(|url| !url.cannot_be_a_base() && matches!(url.scheme(), "http" | "https"))
            .ok_or_else(|| FlyError::InvalidSetting(format!("base URL {base_url:?}")))?;
        if app.is_empty() {
            return Err(FlyError::InvalidSetting("the app name is empty".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| FlyError::InvalidSetting(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            authorization: auth::authorization(token)?,
            app: app.to_owned(),
            options,
        })
    }

    /// The same client for another app (same token, options and connection pool).
    pub fn for_app(&self, app: &str) -> Self {
        Self { app: app.to_owned(), ..self.clone() }
    }

    /// The app this client works on.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The options the client was built with.
    pub fn options(&self) -> ClientOptions {
        self.options
    }
}
