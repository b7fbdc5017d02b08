//! The user's machine: found, provisioned when missing, woken when not running, suspended
//! when idle.
//!
//! - Provisioning happens once per user across replicas: a PostgreSQL advisory lock per user
//!   serialises it, and a machine already carrying the user's metadata is adopted rather than
//!   created again (the lock holder may have crashed after Fly created it).
//! - Concurrent requests for one machine share one wake; the number of requests waiting on
//!   wakes is bounded.
//! - Traffic over the private network bypasses Fly's proxy and its autostop, so this module
//!   suspends a machine itself after `ROUTER_IDLE_SUSPEND_SECS` with no request and no open
//!   stream at any replica, unless the daemon's `/healthz` says it is `busy` with work of
//!   its own.
//! - Each replica counts activity in memory (no database write on the request path) and, at
//!   every suspender tick (a quarter of the idle time, between 100 ms and 5 s), writes to the
//!   shared `machine_activity` table when each machine it served was last seen, "now" for
//!   machines with a stream open. A machine idle at one replica is suspended only when a
//!   conditional upsert on its row finds no activity anywhere within the idle time and no
//!   suspend since; that upsert marks the suspend, so at most one replica acts on it. A
//!   replica that finds the suspend already done forgets the machine as ready, and its next
//!   request wakes it; a request that arrives during a suspend goes through the same wake.

mod activity;
mod provision;
mod wake;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use machines::FlyClient;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub use activity::ActivityGuard;
use activity::ActivityTable;
pub(crate) use wake::FLY_FAILED;
use wake::{SharedWake, WakeError};

use crate::config::{DaemonConfig, WakeConfig};
use crate::daemon_token::DaemonTokens;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{IdleClaim, Store, StoreError, UserMachine};
use crate::template::MachineTemplate;

/// Everything the fleet needs, built once at start.
pub struct FleetParts {
    pub fly: FlyClient,
    pub store: Store,
    pub template: MachineTemplate,
    pub tokens: DaemonTokens,
    pub daemon: DaemonConfig,
    pub region: String,
    pub wake: WakeConfig,
    pub metrics: Arc<Metrics>,
}

/// Where to send a user's request.
#[derive(Clone, Debug)]
pub struct Target {
    pub machine_id: String,
    pub addr: SocketAddr,
    /// How long this request waited for a wake, when it did.
    pub waited: Option<Duration>,
}

pub struct Fleet {
    fly: FlyClient,
    store: Store,
    template: MachineTemplate,
    tokens: DaemonTokens,
    daemon: DaemonConfig,
    region: String,
    wake: WakeConfig,
    metrics: Arc<Metrics>,
    wakes: Mutex<HashMap<String, SharedWake>>,
    provisioning: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// User -> machine records already read; they change only on deprovisioning.
    records: Mutex<HashMap<Uuid, UserMachine>>,
    pending_wakes: Semaphore,
    activity: Arc<ActivityTable>,
    health: reqwest::Client,
}

impl Fleet {
    pub fn new(parts: FleetParts) -> Arc<Self> {
        let health = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("static reqwest configuration");
        Arc::new(Self {
            pending_wakes: Semaphore::new(parts.wake.max_pending_wakes),
            activity: Arc::new(ActivityTable::new(parts.metrics.clone())),
            fly: parts.fly,
            store: parts.store,
            template: parts.template,
            tokens: parts.tokens,
            daemon: parts.daemon,
            region: parts.region,
            wake: parts.wake,
            metrics: parts.metrics,
            wakes: Mutex::new(HashMap::new()),
            provisioning: Mutex::new(HashMap::new()),
            records: Mutex::new(HashMap::new()),
            health,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn fly(&self) -> &FlyClient {
        &self.fly
    }

    /// The daemon token of a user's machine.
    pub fn daemon_token(&self, user_id: Uuid) -> String {
        self.tokens.for_user(user_id)
    }

    /// The user's ready machine: provisioned if missing, woken if not running.
    pub async fn target(self: &Arc<Self>, user_id: Uuid) -> Result<Target, ApiError> {
        let record = self.record(user_id).await?;

        if let Some(addr) = self.activity.ready_addr(&record.machine_id) {
            return Ok(Target { machine_id: record.machine_id, addr, waited: None });
        }

        let Ok(_permit) = self.pending_wakes.try_acquire() else {
            return Err(ApiError::upstream(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_wakes",
                "too many requests are waiting for machines to wake",
            )
            .with_retry_after(Duration::from_secs(2)));
        };
        let started = std::time::Instant::now();
        let woken = self.shared_wake(&record.machine_id).await;
        if woken.as_ref().is_err_and(WakeError::machine_gone) {
            // Deprovisioned by another replica: read the record again next time.
            self.forget_user(user_id);
        }
        let addr = woken.map_err(ApiError::from)?;
        Ok(Target { machine_id: record.machine_id, addr, waited: Some(started.elapsed()) })
    }

    /// The user's record: from memory, the database, or a new machine. A user's machine
    /// never changes while the record exists, so it is kept after the first read.
    async fn record(&self, user_id: Uuid) -> Result<UserMachine, ApiError> {
        if let Some(record) = self.records.lock().expect("records lock").get(&user_id) {
            return Ok(record.clone());
        }
        let record = match self.store.get(user_id).await.map_err(store_failed)? {
            Some(record) => record,
            None => self.provision(user_id).await?,
        };
        self.records.lock().expect("records lock").insert(user_id, record.clone());
        Ok(record)
    }

    /// Drops the remembered record of a user (after deprovisioning).
    pub fn forget_user(&self, user_id: Uuid) {
        self.records.lock().expect("records lock").remove(&user_id);
    }

    /// A guard counting one request or stream as activity on `machine_id`.
    pub fn activity(&self, machine_id: &str) -> ActivityGuard {
        self.activity.enter(machine_id)
    }

    /// Forgets that a machine is ready (the daemon did not answer).
    pub fn forget_ready(&self, machine_id: &str) {
        self.activity.mark_not_ready(machine_id);
    }

    /// Suspends machines idle for longer than the configured time; runs until dropped.
    pub async fn run_idle_suspender(self: Arc<Self>) {
        let idle = self.wake.idle_suspend;
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.share_activity().await;
            for (machine_id, addr) in self.activity.take_idle(idle) {
                // Work the daemon does on its own (an intent running for an hour) has no
                // request open at the router; the daemon says so on `/healthz`.
                if self.daemon_busy(addr).await {
                    tracing::debug!(machine.id = %machine_id, "idle but busy; not suspending");
                    self.activity.touch(&machine_id, addr);
                    continue;
                }
                match self.store.claim_idle(&machine_id, idle).await {
                    Ok(IdleClaim::Claimed) => self.suspend_idle(&machine_id).await,
                    Ok(IdleClaim::Busy) => self.activity.restore_ready(&machine_id, addr),
                    Ok(IdleClaim::AlreadySuspended) => {
                        tracing::debug!(machine.id = %machine_id, "suspended by another replica")
                    }
                    Err(e) => {
                        // Not knowing whether another replica serves it, keep it running.
                        tracing::warn!(
                            machine.id = %machine_id,
                            error = %error_chain(&e),
                            "checking shared activity failed; not suspending"
                        );
                        self.activity.restore_ready(&machine_id, addr);
                    }
                }
            }
        }
    }

    /// Whether the daemon at `addr` reports work in progress (`"busy": true` on `/healthz`).
    /// A daemon that does not answer is not busy: there is nothing to keep running for.
    async fn daemon_busy(&self, addr: SocketAddr) -> bool {
        #[derive(serde::Deserialize)]
        struct Health {
            #[serde(default)]
            busy: bool,
        }
        let response = self.health.get(format!("http://{addr}/healthz")).send().await;
        match response {
            Ok(response) if response.status().is_success() => {
                response.json::<Health>().await.is_ok_and(|h| h.busy)
            }
            _ => false,
        }
    }

    /// Writes this replica's activity since the last tick to the shared table.
    async fn share_activity(&self) {
        let unflushed = self.activity.take_unflushed();
        if unflushed.is_empty() {
            return;
        }
        let seen: Vec<(String, f64)> = unflushed
            .iter()
            .map(|(id, last_seen)| (id.clone(), last_seen.elapsed().as_secs_f64()))
            .collect();
        if let Err(e) = self.store.record_activity(&seen).await {
            tracing::warn!(
                machines = seen.len(),
                error = %error_chain(&e),
                "recording shared activity failed"
            );
            self.activity.unflush(unflushed.into_iter().map(|(id, _)| id));
        }
    }

    async fn suspend_idle(&self, machine_id: &str) {
        match self.fly.suspend_machine(machine_id, None).await {
            Ok(()) => {
                self.metrics.suspended();
                tracing::debug!(machine.id = machine_id, "suspended an idle machine");
            }
            // A machine that is not running any more needs no suspend.
            Err(e) if e.is_precondition_failed() => {
                tracing::debug!(machine.id = machine_id, error = %e, "idle machine not suspended")
            }
            Err(e) => {
                tracing::warn!(
                    machine.id = machine_id,
                    error = %e,
                    "suspending an idle machine failed",
                )
            }
        }
    }

    /// All records (admin).
    pub async fn list(&self) -> Result<Vec<UserMachine>, ApiError> {
        self.store.list().await.map_err(store_failed)
    }
}

fn store_failed(e: StoreError) -> ApiError {
    let detail = format!("database: {}", error_chain(&e));
    match e {
        // A database that does not answer is an outage the client can wait out.
        StoreError::Timeout { .. } | StoreError::Connect(_) => ApiError::upstream(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the router's database is not answering; retry shortly",
        )
        .with_retry_after(Duration::from_secs(2))
        .with_detail(detail),
        _ => ApiError::internal(detail),
    }
}

/// `error: cause: cause` on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
