//! The emulator's core: apps, machines and volumes, their state transitions and processes.
//!
//! All state sits behind one mutex that is never held across an `.await`. Timed
//! transitions (`created` -> boot, `replacing` -> new version, `suspending` -> frozen)
//! run in tasks that re-check, under the lock, that the machine is still where they left
//! it before acting. Every change bumps a `watch` counter that `wait` listens to.

mod health;
mod launch;
mod leases;
mod records;
mod transitions;
mod volumes;
mod wait;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::Rng;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::leases::{check_lease, lease_expiry};
use super::checks;
use super::controls::Settings;
use super::error::ApiError;
use super::image_map::ImageMap;
use super::process::{parse_stop_signal, signal_group, Launch};
use super::store::{AppRecord, MachineRecord, StateDir, Store};
use crate::types::{
    parse_go_duration, App, CheckState, CheckStatus, CreateAppRequest, CreateMachineRequest,
    CreateVolumeRequest, Lease, LeaseData, Machine, MachineEvent, MachineState, StartResponse,
    StopConfig, UpdateMachineRequest, Volume, WaitResponse, WaitState,
};

/// Fly's default grace period between the stop signal and SIGKILL (`kill_timeout`).
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Events kept per machine, newest first.
const MAX_EVENTS: usize = 50;

/// Who holds leases taken through the emulator (there is one token, so one owner).
const LEASE_OWNER: &str = "token@emulator.local";

/// A running machine process.
#[derive(Debug)]
struct Proc {
    /// Process group id (= the leader's pid).
    group: i32,
    /// Distinguishes this process from later ones of the same machine.
    generation: u64,
    started: Instant,
    /// Becomes true when the process has exited.
    exited: watch::Receiver<bool>,
}

struct Inner {
    store: Store,
    procs: HashMap<String, Proc>,
    /// Process groups of replaced versions, still being stopped.
    retiring: BTreeSet<i32>,
    next_generation: u64,
}

/// The emulator's state and behaviour, shared by the HTTP layer and background tasks.
pub(crate) struct Engine {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    images: ImageMap,
    state_dir: StateDir,
    region: String,
    settings: Mutex<Settings>,
    cancel: CancellationToken,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn random_hex(length: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..length).map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0')).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn push_event(machine: &mut Machine, kind: &str, status: MachineState, source: &str) {
    push_event_with(machine, kind, status, source, None);
}

fn push_event_with(
    machine: &mut Machine,
    kind: &str,
    status: MachineState,
    source: &str,
    request: Option<serde_json::Value>,
) {
    let event = MachineEvent {
        id: ulid::Ulid::new().to_string(),
        kind: kind.to_owned(),
        status: status.as_str().to_owned(),
        source: source.to_owned(),
        timestamp: now_ms(),
        request,
    };
    machine.events.insert(0, event);
    machine.events.truncate(MAX_EVENTS);
    machine.state = status;
    machine.updated_at = now_rfc3339();
}

/// Whether Fly could have an app of this name: lower-case letters, digits and dashes, at
/// most 63 characters. Apps come into being on first use, so nothing else may reach the store.
pub(crate) fn is_app_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Inner {
    fn app(&mut self, app: &str) -> &mut AppRecord {
        self.store.apps.entry(app.to_owned()).or_insert_with(|| AppRecord {
            id: random_hex(16),
            name: app.to_owned(),
            org_slug: "personal".to_owned(),
            created_at: now_ms(),
            machines: BTreeMap::new(),
            volumes: BTreeMap::new(),
        })
    }

    /// The machine, or 404; a destroyed machine is shown for a while, then forgotten.
    fn machine(
        &mut self,
        app: &str,
        id: &str,
        retention: Duration,
    ) -> Result<&mut MachineRecord, ApiError> {
        let machines = &mut self.app(app).machines;
        let expired = machines.get(id).and_then(|r| r.destroyed_at).is_some_and(|at| {
            let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            now_ms().saturating_sub(at) > retention
        });
        if expired {
            machines.remove(id);
        }
        machines.get_mut(id).ok_or_else(|| ApiError::not_found("machine not found"))
    }

    fn taken_addresses(&self) -> BTreeSet<Ipv4Addr> {
        let machines = self.store.apps.values().flat_map(|a| a.machines.values());
        machines.map(|r| r.address).collect()
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

impl Engine {
    pub fn new(
        images: ImageMap,
        state_dir: StateDir,
        store: Store,
        region: String,
        settings: Settings,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        let inner =
            Inner { store, procs: HashMap::new(), retiring: BTreeSet::new(), next_generation: 0 };
        Arc::new(Self {
            inner: Mutex::new(inner),
            changed,
            images,
            state_dir,
            region,
            settings: Mutex::new(settings),
            cancel,
        })
    }

    pub fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    pub fn update_settings(&self, apply: impl FnOnce(&mut Settings)) -> Settings {
        let mut settings = lock(&self.settings);
        apply(&mut settings);
        settings.clone()
    }

    /// Saves the store and wakes every `wait`.
    fn commit(&self, inner: &Inner) {
        if let Err(e) = self.state_dir.save(&inner.store) {
            tracing::error!(error = %e, "saving the emulator state");
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Stops every machine process as a host shutting down would: each gets its machine's
    /// stop signal (SIGINT unless `stop_config` says otherwise) and its grace period, then
    /// SIGKILL. The machines' records are left as they are (they come back `stopped`).
    pub async fn terminate_all(&self) {
        self.cancel.cancel();
        let mut stopping = Vec::new();
        {
            let mut inner = lock(&self.inner);
            let procs: Vec<(String, Proc)> = inner.procs.drain().collect();
            for group in std::mem::take(&mut inner.retiring) {
                signal_group(group, Signal::SIGKILL);
                signal_group(group, Signal::SIGCONT);
            }
            for (id, proc) in procs {
                let configured = inner
                    .store
                    .apps
                    .values()
                    .find_map(|app| app.machines.get(&id))
                    .and_then(|record| record.machine.config.stop_config.clone());
                let (signal, grace) =
                    transitions::stop_parameters(&StopConfig::default(), configured.as_ref())
                        .unwrap_or((Signal::SIGINT, DEFAULT_STOP_TIMEOUT));
                stopping.push((proc, signal, grace));
            }
        }
        let waits = stopping.into_iter().map(|(proc, signal, grace)| {
            transitions::terminate(proc.group, proc.exited, signal, grace)
        });
        futures_util::future::join_all(waits).await;
    }

    /// Kills every machine process (SIGKILL to each group); used when the emulator is dropped
    /// without [`crate::emulator::EmulatorHandle::shutdown`].
    pub fn kill_all(&self) {
        self.cancel.cancel();
        let mut inner = lock(&self.inner);
        let running: Vec<i32> = inner.procs.drain().map(|(_, proc)| proc.group).collect();
        let retiring = std::mem::take(&mut inner.retiring);
        for group in running.into_iter().chain(retiring) {
            signal_group(group, Signal::SIGKILL);
            signal_group(group, Signal::SIGCONT);
        }
    }

    pub fn create_app(&self, request: CreateAppRequest) -> Result<App, ApiError> {
        if request.app_name.is_empty() {
            return Err(ApiError::invalid_argument("app_name is required"));
        }
        if !is_app_name(&request.app_name) {
            return Err(ApiError::invalid_argument(format!(
                "invalid app_name {:?}: use lower-case letters, digits and dashes, at most 63",
                request.app_name
            )));
        }
        let mut inner = lock(&self.inner);
        if inner.store.apps.contains_key(&request.app_name) {
            return Err(ApiError::name_taken(format!("app {} already exists", request.app_name)));
        }
        let app = inner.app(&request.app_name);
        if !request.org_slug.is_empty() {
            app.org_slug = request.org_slug;
        }
        let answer = App { id: app.id.clone(), name: app.name.clone(), created_at: app.created_at };
        self.commit(&inner);
        Ok(answer)
    }

    pub fn get_app(&self, app: &str) -> serde_json::Value {
        let mut inner = lock(&self.inner);
        let record = inner.app(app);
        json!({
            "id": record.id,
            "name": record.name,
            "status": "deployed",
            "organization": {"name": record.org_slug, "slug": record.org_slug},
        })
    }
}
