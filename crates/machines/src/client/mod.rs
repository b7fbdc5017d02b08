//! `FlyClient`: an async client of the Fly Machines API.
//!
//! Every call has a timeout. Calls are retried with exponential backoff and full jitter
//! (see [`RetryPolicy`]) when Fly answers 429 or 5xx or the connection fails, waiting for
//! `Retry-After` when Fly sends it. Whether a retry is safe depends on the call:
//!
//! - a 429 or a refused connection means the request was not acted on: every call is retried;
//! - a 5xx, a timeout or a broken connection is ambiguous (the call may have happened):
//!   reads, `update`, `start`, `stop`, `suspend`, `delete` and lease releases are retried
//!   because doing them twice leaves the same result;
//! - `create_machine` stamps the config's metadata with a fresh [`CREATE_KEY_METADATA`]
//!   value, and after an ambiguous failure lists the app's machines by that key: when the
//!   first attempt did create the machine, that machine is returned instead of creating a
//!   second one;
//! - `create_volume` and `acquire_lease` have no such key and are not retried after an
//!   ambiguous failure: the error reaches the caller, who can list volumes or read the lease.

mod auth;
mod error;
mod retry;

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

/// Whether a call may be sent again after an ambiguous failure (5xx, timeout, reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idempotence {
    /// Doing it twice leaves the same result.
    Safe,
    /// Doing it twice may do it twice: only retried when it certainly did not happen.
    Unsafe,
}

/// One API call, before it is sent.
struct Call<'a> {
    name: &'static str,
    target: Option<&'a str>,
    method: Method,
    path: Vec<&'a str>,
    query: Vec<(String, String)>,
    body: Option<Value>,
    nonce: Option<&'a str>,
    timeout: Duration,
    idempotence: Idempotence,
}

/// How one attempt ended, for the retry loop.
enum Attempt {
    Done(bytes::Bytes),
    /// Failed; `unsent` says whether Fly certainly did not act on it.
    Failed {
        error: FlyError,
        unsent: bool,
        retry_after: Option<Duration>,
    },
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

    // ---- machines ------------------------------------------------------------------

    /// Creates a machine (`POST /v1/apps/{app}/machines`).
    ///
    /// Safe to retry: see the module documentation for how a machine is never created twice.
    pub async fn create_machine(
        &self,
        request: &CreateMachineRequest,
    ) -> Result<Machine, FlyError> {
        let key = ulid::Ulid::new().to_string();
        let mut request = request.clone();
        request.config.metadata.insert(CREATE_KEY_METADATA.to_owned(), key.clone());
        let body = to_json("create_machine", &request)?;

        let mut retry = 0;
        loop {
            let call = self.call("create_machine", None, Method::POST, &["machines"]);
            let call = Call { body: Some(body.clone()), idempotence: Idempotence::Unsafe, ..call };
            let (error, unsent, retry_after) = match self.attempt(&call).await {
                Attempt::Done(bytes) => return decode(&call, &bytes),
                Attempt::Failed { error, unsent, retry_after } => (error, unsent, retry_after),
            };
            let retryable = unsent || error.is_transient();
            let Some(delay) =
                retryable.then(|| self.options.retry.delay(retry, retry_after)).flatten()
            else {
                return Err(error);
            };
            tracing::warn!(call = "create_machine", error = %error, delay_ms = delay.as_millis() as u64, "retrying");
            tokio::time::sleep(delay).await;
            retry += 1;

            // The failed attempt may have created the machine: look for it by its key.
            if !unsent {
                let filter = ListMachines::with_metadata(CREATE_KEY_METADATA, key.clone());
                match self.list_machines(&filter).await {
                    Ok(found) if !found.is_empty() => {
                        return Ok(found.into_iter().next().expect("non-empty"))
                    }
                    Ok(_) => {}
                    Err(_) => return Err(error),
                }
            }
        }
    }

    /// Reads a machine (`GET /v1/apps/{app}/machines/{id}`).
    pub async fn get_machine(&self, id: &str) -> Result<Machine, FlyError> {
        let call = self.call("get_machine", Some(id), Method::GET, &["machines", id]);
        self.json(call).await
    }

    /// Lists the app's machines, filtered by metadata, state and region.
    pub async fn list_machines(&self, filter: &ListMachines) -> Result<Vec<Machine>, FlyError> {
        let mut call = self.call("list_machines", None, Method::GET, &["machines"]);
        for (key, value) in &filter.metadata {
            call.query.push((format!("metadata.{key}"), value.clone()));
        }
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            call.query.push(("state".into(), states.join(",")));
        }
        if filter.include_deleted {
            call.query.push(("include_deleted".into(), "true".into()));
        }
        if let Some(region) = &filter.region {
            call.query.push(("region".into(), region.clone()));
        }
        self.json(call).await
    }

    /// Replaces a machine's whole config (`POST /v1/apps/{app}/machines/{id}`); the machine
    /// gets a new `instance_id`. Pass the lease nonce when the machine is leased.
    pub async fn update_machine(
        &self,
        id: &str,
        request: &UpdateMachineRequest,
        nonce: Option<&str>,
    ) -> Result<Machine, FlyError> {
        let mut call = self.call("update_machine", Some(id), Method::POST, &["machines", id]);
        call.body = Some(to_json("update_machine", request)?);
        call.nonce = nonce;
        self.json(call).await
    }

    /// Starts a stopped machine or resumes a suspended one. Fly answers 412 while the
    /// machine is `created`, `replacing`, `stopping` or `suspending`: see
    /// [`FlyError::is_precondition_failed`].
    pub async fn start_machine(
        &self,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<StartResponse, FlyError> {
        let mut call =
            self.call("start_machine", Some(id), Method::POST, &["machines", id, "start"]);
        call.nonce = nonce;
        let bytes = self.send(&call).await?;
        // Fly's spec says "no content" while its docs show a body: accept both.
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(StartResponse::default());
        }
        decode(&call, &bytes)
    }

    /// Stops a machine with the signal and grace period of `request` (Fly's default:
    /// SIGINT, then SIGKILL).
    pub async fn stop_machine(
        &self,
        id: &str,
        request: &StopRequest,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut call = self.call("stop_machine", Some(id), Method::POST, &["machines", id, "stop"]);
        call.body = Some(to_json("stop_machine", request)?);
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    /// Suspends a started machine (memory snapshot; `start` resumes it).
    pub async fn suspend_machine(&self, id: &str, nonce: Option<&str>) -> Result<(), FlyError> {
        let path = ["machines", id, "suspend"];
        let mut call = self.call("suspend_machine", Some(id), Method::POST, &path);
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    /// Destroys a machine; `force` kills it first when it is running.
    pub async fn delete_machine(
        &self,
        id: &str,
        force: bool,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut call = self.call("delete_machine", Some(id), Method::DELETE, &["machines", id]);
        if force {
            call.query.push(("force".into(), "true".into()));
        }
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    /// Waits until the machine reaches `state`, for up to `timeout` in total.
    ///
    /// Fly accepts at most 60 s per request and answers 408 when that runs out: the client
    /// asks again until `timeout` is spent, then returns [`FlyError::WaitTimeout`].
    /// `version` (the `instance_id`) is required by Fly when waiting for `stopped`.
    pub async fn wait_machine(
        &self,
        id: &str,
        state: WaitState,
        version: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitResponse, FlyError> {
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            // Fly counts whole seconds from 1 to 60.
            let slice = left.min(MAX_WAIT_SLICE).as_secs().max(1);
            let mut call =
                self.call("wait_machine", Some(id), Method::GET, &["machines", id, "wait"]);
            call.query.push(("state".into(), state.as_str().into()));
            call.query.push(("timeout".into(), slice.to_string()));
            if let Some(version) = version {
                call.query.push(("version".into(), version.into()));
            }
            call.timeout = self.options.timeout + Duration::from_secs(slice);

            match self.json::<WaitResponse>(call).await {
                Ok(reached) => return Ok(reached),
                Err(e) if e.status() == Some(StatusCode::REQUEST_TIMEOUT) => {
                    if started.elapsed() >= timeout {
                        return Err(FlyError::WaitTimeout {
                            machine: id.to_owned(),
                            state: state.as_str().to_owned(),
                            waited: started.elapsed(),
                        });
                    }
                    tracing::debug!(machine = id, state = %state, "wait slice ran out, asking again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The machine's recent events, newest first.
    pub async fn list_events(&self, id: &str) -> Result<Vec<MachineEvent>, FlyError> {
        let path = ["machines", id, "events"];
        self.json(self.call("list_events", Some(id), Method::GET, &path)).await
    }

    /// Sets one metadata key (`POST .../metadata/{key}`, 204).
    pub async fn set_metadata(
        &self,
        id: &str,
        key: &str,
        value: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let path = ["machines", id, "metadata", key];
        let mut call = self.call("set_metadata", Some(id), Method::POST, &path);
        call.body = Some(serde_json::json!({ "value": value }));
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    // ---- leases --------------------------------------------------------------------

    /// Takes the machine's lease for `ttl`. Fly answers 409 when someone else holds it
    /// (see [`FlyError::is_conflict`]).
    pub async fn acquire_lease(
        &self,
        id: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<Lease, FlyError> {
        let path = ["machines", id, "lease"];
        let mut call = self.call("acquire_lease", Some(id), Method::POST, &path);
        let body =
            LeaseRequest { ttl: Some(ttl.as_secs().max(1)), description: Some(description.into()) };
        call.body = Some(to_json("acquire_lease", &body)?);
        call.idempotence = Idempotence::Unsafe;
        self.json(call).await
    }

    /// Extends a lease this client holds (the same POST, with the nonce).
    pub async fn refresh_lease(
        &self,
        id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<Lease, FlyError> {
        let path = ["machines", id, "lease"];
        let mut call = self.call("refresh_lease", Some(id), Method::POST, &path);
        call.body = Some(to_json(
            "refresh_lease",
            &LeaseRequest { ttl: Some(ttl.as_secs().max(1)), description: None },
        )?);
        call.nonce = Some(nonce);
        self.json(call).await
    }

    /// Reads the machine's current lease (404 when there is none).
    pub async fn get_lease(&self, id: &str) -> Result<Lease, FlyError> {
        let path = ["machines", id, "lease"];
        self.json(self.call("get_lease", Some(id), Method::GET, &path)).await
    }

    /// Releases a lease this client holds.
    pub async fn release_lease(&self, id: &str, nonce: &str) -> Result<(), FlyError> {
        let path = ["machines", id, "lease"];
        let mut call = self.call("release_lease", Some(id), Method::DELETE, &path);
        call.nonce = Some(nonce);
        self.send(&call).await.map(drop)
    }

    // ---- volumes -------------------------------------------------------------------

    /// Creates a volume (200). Not retried after an ambiguous failure: see the module docs.
    pub async fn create_volume(&self, request: &CreateVolumeRequest) -> Result<Volume, FlyError> {
        let mut call = self.call("create_volume", None, Method::POST, &["volumes"]);
        call.body = Some(to_json("create_volume", request)?);
        call.idempotence = Idempotence::Unsafe;
        self.json(call).await
    }

    /// Reads a volume.
    pub async fn get_volume(&self, id: &str) -> Result<Volume, FlyError> {
        self.json(self.call("get_volume", Some(id), Method::GET, &["volumes", id])).await
    }

    /// Lists the app's volumes.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>, FlyError> {
        self.json(self.call("list_volumes", None, Method::GET, &["volumes"])).await
    }

    /// Destroys a volume; answers the volume in state `destroyed`.
    pub async fn delete_volume(&self, id: &str) -> Result<Volume, FlyError> {
        self.json(self.call("delete_volume", Some(id), Method::DELETE, &["volumes", id])).await
    }

    // ---- plumbing ------------------------------------------------------------------

    /// A call on `/v1/apps/{app}/<path...>` with the defaults: safe to retry, no body.
    fn call<'a>(
        &'a self,
        name: &'static str,
        target: Option<&'a str>,
        method: Method,
        path: &[&'a str],
    ) -> Call<'a> {
        let mut segments = vec!["v1", "apps", self.app.as_str()];
        segments.extend_from_slice(path);
        Call {
            name,
            target,
            method,
            path: segments,
            query: Vec::new(),
            body: None,
            nonce: None,
            timeout: self.options.timeout,
            idempotence: Idempotence::Safe,
        }
    }

    /// Sends `call` with retries and decodes a JSON answer.
    async fn json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, FlyError> {
        let bytes = self.send(&call).await?;
        decode(&call, &bytes)
    }

    /// Sends `call`, retrying as the module documentation says; returns the 2xx body.
    async fn send(&self, call: &Call<'_>) -> Result<bytes::Bytes, FlyError> {
        let mut retry = 0;
        loop {
            let (error, unsent, retry_after) = match self.attempt(call).await {
                Attempt::Done(bytes) => return Ok(bytes),
                Attempt::Failed { error, unsent, retry_after } => (error, unsent, retry_after),
            };
            let allowed = unsent
                || (call.idempotence == Idempotence::Safe
                    && error.is_transient()
                    // `wait` answers 408 as "not yet" and loops itself.
                    && !(call.name == "wait_machine"
                        && error.status() == Some(StatusCode::REQUEST_TIMEOUT)));
            let Some(delay) =
                allowed.then(|| self.options.retry.delay(retry, retry_after)).flatten()
            else {
                return Err(error);
            };
            tracing::warn!(
                call = call.name,
                target = call.target.unwrap_or_default(),
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "Fly API call failed, retrying"
            );
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }

    /// One HTTP exchange.
    async fn attempt(&self, call: &Call<'_>) -> Attempt {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(&call.path);
        }
        let mut request = self
            .http
            .request(call.method.clone(), url)
            .timeout(call.timeout)
            .header(AUTHORIZATION, self.authorization.clone())
            .query(&call.query);
        if let Some(nonce) = call.nonce {
            request = request.header(LEASE_NONCE_HEADER, nonce);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }

        let target = call.target.map(str::to_owned);
        let response = match request.send().await {
            Ok(response) => response,
            Err(source) => {
                // A refused connection never reached Fly; anything else may have.
                let unsent = source.is_connect();
                let error = FlyError::Transport { call: call.name, target, source };
                return Attempt::Failed { error, unsent, retry_after: None };
            }
        };
        let status = response.status();
        let retry_after = retry::retry_after(response.headers());
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(source) => {
                let error = FlyError::Transport { call: call.name, target, source };
                return Attempt::Failed { error, unsent: false, retry_after: None };
            }
        };
        if status.is_success() {
            return Attempt::Done(bytes);
        }

        let message = error_text(&bytes);
        let error = FlyError::Api { call: call.name, target, status, message, retry_after };
        // Fly rate-limits before acting on a request.
        let unsent = status == StatusCode::TOO_MANY_REQUESTS;
        Attempt::Failed { error, unsent, retry_after }
    }
}

fn to_json<T: Serialize>(call: &'static str, body: &T) -> Result<Value, FlyError> {
    serde_json::to_value(body).map_err(|source| FlyError::Decode { call, target: None, source })
}

fn decode<T: DeserializeOwned>(call: &Call<'_>, bytes: &[u8]) -> Result<T, FlyError> {
    serde_json::from_slice(bytes).map_err(|source| FlyError::Decode {
        call: call.name,
        target: call.target.map(str::to_owned),
        source,
    })
}

/// Fly's error text: `message`, else `error`, else the body itself (shortened).
fn error_text(bytes: &[u8]) -> String {
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) {
        if let Some(message) = body.message.filter(|m| !m.is_empty()) {
            return message;
        }
        if !body.error.is_empty() {
            return body.error;
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return "(no body)".to_owned();
    }
    text.chars().take(300).collect()
}
