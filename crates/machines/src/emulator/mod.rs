//! A local emulator of the Fly Machines API that runs every machine as a local process.
//!
//! It serves the `/v1` routes Fly serves for apps, machines, leases, metadata and
//! volumes, with Fly's bodies, status codes, `{"error": "<code>: <text>"}` errors, machine
//! states and `wait` semantics (see the project's Fly reference notes). What it runs:
//!
//! - **Images** come from an [`ImageMap`]: a machine's `config.image` picks a local command.
//!   The process runs in its own process group with the environment `app_env` +
//!   `config.env` + the image's `env` + `FLY_MACHINE_ID`, `FLY_APP_NAME`, `FLY_REGION`,
//!   `FLY_PRIVATE_IP`, `FLY_IMAGE_REF` (plus the emulator's `PATH` and `HOME`), and its
//!   output goes to the emulator's stderr, each line prefixed `[<machine id>]`.
//! - **Addresses:** every machine gets its own random address in 127.0.0.0/8 (never
//!   127.0.0.1), so all machines listen on the same internal port, as Fly machines do on
//!   their private addresses. [`Settings::reassign_address_on_start`] moves it on each boot.
//! - **States:** `created` for [`Settings::created_ms`] after create, then `started` as
//!   soon as the process is spawned (as Fly says); `suspend` freezes the process group
//!   (SIGSTOP) and `start` resumes it (SIGCONT) or spawns it; `stop` sends the requested
//!   signal (SIGINT by default) then SIGKILL after the timeout; a process that exits within
//!   [`Settings::boot_window_ms`] of its start leaves the machine `failed`, a later exit
//!   `stopped`. An update replaces the whole config, gives a new `instance_id` and keeps
//!   the machine `replacing` for [`Settings::replacing_ms`]. `start` answers 412 while
//!   `created`, `replacing`, `stopping` or `suspending`.
//! - **Volumes** are directories under the state directory, mounted by substituting
//!   `{mount:/data}` in the command and environment.
//! - **Persistence:** apps, machines and volumes are saved in `state.json` in the state
//!   directory after every change; after a restart the machines are back, `stopped`.
//! - **Auth:** `Authorization: Bearer <token>` or `FlyV1 <token>` (the scheme in any
//!   case); anything else is 401.
//! - **Apps** come into being on first use. A path naming an app Fly could not have (not
//!   lower-case letters, digits and dashes, or over 63 characters) is 404 and never stored.
//! - **Input checks:** bodies must be JSON objects (Go's `cannot unmarshal array` 400), over
//!   1 MiB is 413, and lease TTLs or Go durations beyond what Go's types hold are 400.
//!
//! - **Restart policy:** a process that exits after its boot window is booted again under
//!   `restart.policy = "always"`, and under `"on-failure"` (the default) after a non-zero
//!   exit or a signal, at most `max_retries` times (10 when unset) until a user starts it.
//!
//! Not emulated: `auto_destroy`, exec, cordons, IP assignments, app deletion, volume
//! snapshots and extension.
//!
//! # Test controls (never under `/v1`, no token needed)
//!
//! - `GET /_emulator/stats`: calls received per action, `{"create": 1, "start": 2, ...}`;
//!   `DELETE` resets the counts.
//! - `POST /_emulator/faults` with
//!   `{"action": "create", "status": 503, "count": 2, "retry_after": 1}` answers the next
//!   `count` calls of that action with `status` (and `Retry-After` when given). Optional
//!   `"machine_id"` limits it to one machine; `"after": true` carries the call out first
//!   and then replaces its answer, a lost response. `GET` lists pending faults, `DELETE`
//!   clears them.
//! - `GET /_emulator/settings` shows the current [`Settings`]; `POST` changes some of
//!   them, e.g. `{"replacing_ms": 2000}` or
//!   `{"rate_limit": {"per_second": 1, "burst": 3, "get_per_second": 5, "get_burst": 10}}`
//!   (`{"rate_limit": null}` turns the limit off).
//!
//! Action names: `app_create`, `app_get`, `create`, `list`, `get`, `update`, `delete`,
//! `start`, `stop`, `suspend`, `wait`, `lease_acquire`, `lease_get`, `lease_release`,
//! `metadata_get`, `metadata_set`, `metadata_delete`, `events`, `volume_create`,
//! `volume_list`, `volume_get`, `volume_delete`.

mod address;
mod checks;
mod controls;
mod engine;
mod error;
mod http;
mod image_map;
mod process;
mod rate;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use controls::{Fault, Settings, SettingsPatch, Stats};
pub use image_map::{ImageMap, ImageMapError, ImageSpec};
pub use rate::RateLimit;
pub use store::StateError;

/// How to run an emulator.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks a free port. Must be a loopback address.
    pub listen: SocketAddr,
    /// The API token clients must present.
    pub token: String,
    /// Which command runs which image.
    pub images: ImageMap,
    /// Where `state.json` and the volume directories live.
    pub state_dir: PathBuf,
    /// The region machines and volumes are placed in.
    pub region: String,
    /// Timings, rate limit and address policy.
    pub settings: Settings,
}

impl EmulatorConfig {
    /// Listens on 127.0.0.1 with a free port, region `local`, default settings.
    pub fn new(token: &str, images: ImageMap, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: token.to_owned(),
            images,
            state_dir: state_dir.into(),
            region: "local".to_owned(),
            settings: Settings::default(),
        }
    }
}

/// The emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The listen address is not a loopback address.
    #[error("the emulator only listens on loopback addresses, not {0}")]
    NotLoopback(SocketAddr),
    /// The token is empty.
    #[error("the emulator needs a non-empty API token")]
    EmptyToken,
    /// The image map has an unusable entry.
    #[error(transparent)]
    ImageMap(#[from] ImageMapError),
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The listening socket could not be opened.
    #[error("listening on {address}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Starts emulators.
#[derive(Debug)]
pub struct Emulator;

impl Emulator {
    /// Loads the state, binds the socket and serves until the handle is shut down or dropped.
    pub async fn start(config: EmulatorConfig) -> Result<EmulatorHandle, EmulatorError> {
        if !config.listen.ip().is_loopback() {
            return Err(EmulatorError::NotLoopback(config.listen));
        }
        if config.token.trim().is_empty() {
            return Err(EmulatorError::EmptyToken);
        }
        config.images.validate()?;
        let state_dir = store::StateDir::open(&config.state_dir)?;
        let saved = state_dir.load()?;

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| EmulatorError::Listen { address: config.listen, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| EmulatorError::Listen { address: config.listen, source })?;

        let cancel = CancellationToken::new();
        let engine = engine::Engine::new(
            config.images,
            state_dir,
            saved,
            config.region,
            config.settings,
            cancel.clone(),
        );
        let api = Arc::new(http::Api::new(Arc::clone(&engine), &config.token));
        let server = tokio::spawn(serve(listener, api, cancel.clone()));
        tracing::debug!(%address, "fly emulator serving");
        Ok(EmulatorHandle { address, engine, cancel, server: Some(server) })
    }
}

async fn serve(listener: TcpListener, api: Arc<http::Api>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let api = Arc::clone(&api);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| Arc::clone(&api).handle(request));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(client.addr = %peer, error = %e, "connection error");
                    }
                }
            }
        });
    }
}

/// A running emulator. [`EmulatorHandle::shutdown`] stops the server and lets every machine
/// process drain within its stop grace; dropping it kills them at once.
#[derive(Debug)]
pub struct EmulatorHandle {
    address: SocketAddr,
    engine: Arc<engine::Engine>,
    cancel: CancellationToken,
    server: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for engine::Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl EmulatorHandle {
    /// The base URL clients use, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The listening address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving, stops every machine process (its stop signal, then SIGKILL after its
    /// grace period, as a host shutting down) and waits for the server to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.engine.terminate_all().await;
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }

    fn stop(&self) {
        self.cancel.cancel();
        self.engine.kill_all();
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.stop();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
