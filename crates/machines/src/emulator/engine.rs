//! The emulator's core: apps, machines and volumes, their state transitions and processes.
//!
//! All state sits behind one mutex that is never held across an `.await`. Timed
//! transitions (`created` -> boot, `replacing` -> new version, `suspending` -> frozen)
//! run in tasks that re-check, under the lock, that the machine is still where they left
//! it before acting. Every change bumps a `watch` counter that `wait` listens to.

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

fn lease_is_active(lease: &LeaseData) -> bool {
    lease.expires_at > chrono::Utc::now().timestamp()
}

fn lease_held(id: &str, lease: &LeaseData) -> ApiError {
    let expires = chrono::DateTime::from_timestamp(lease.expires_at, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    ApiError::aborted(format!(
        "machine ID {id} lease currently held by {}, expires at {expires}",
        lease.owner
    ))
}

/// Mutating calls on a leased machine must carry the lease's nonce (Fly answers 409).
fn check_lease(record: &mut MachineRecord, nonce: Option<&str>) -> Result<(), ApiError> {
    let Some(lease) = &record.lease else { return Ok(()) };
    if !lease_is_active(lease) {
        record.lease = None;
        return Ok(());
    }
    if nonce == Some(lease.nonce.as_str()) {
        return Ok(());
    }
    Err(lease_held(&record.machine.id, lease))
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
        let expired = machines
            .get(id)
            .and_then(|r| r.destroyed_at)
            .is_some_and(|at| now_ms().saturating_sub(at) > retention.as_millis() as i64);
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
        let inner = Inner { store, procs: HashMap::new(), next_generation: 0 };
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

    /// Kills every machine process (SIGKILL to each group); used at shutdown.
    pub fn kill_all(&self) {
        self.cancel.cancel();
        let mut inner = lock(&self.inner);
        for (_, proc) in inner.procs.drain() {
            signal_group(proc.group, Signal::SIGKILL);
            signal_group(proc.group, Signal::SIGCONT);
        }
    }

    // ---- apps ----------------------------------------------------------------------

    pub fn create_app(&self, request: CreateAppRequest) -> Result<App, ApiError> {
        if request.app_name.is_empty() {
            return Err(ApiError::invalid_argument("app_name is required"));
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

    // ---- machines ------------------------------------------------------------------

    pub fn create(
        self: &Arc<Self>,
        app: &str,
        request: CreateMachineRequest,
    ) -> Result<Machine, ApiError> {
        let config = request.config;
        if config.image.is_empty() {
            return Err(ApiError::invalid_argument("config.image is required"));
        }
        if self.images.lookup(&config.image).is_none() {
            return Err(ApiError::invalid_argument(format!(
                "image {:?} is not in the emulator's image map",
                config.image
            )));
        }
        if config.mounts.len() > 1 {
            return Err(ApiError::invalid_argument("a machine can mount one volume"));
        }

        let mut inner = lock(&self.inner);
        let id = random_hex(14);
        let port = config.services.iter().find_map(|s| s.internal_port).unwrap_or(8080);
        let taken = inner.taken_addresses();
        let address = super::address::allocate(&taken, port)
            .ok_or_else(|| ApiError::internal("no free loopback address"))?;

        let volumes = &mut inner.app(app).volumes;
        for mount in &config.mounts {
            let Some(volume) = volumes.get(&mount.volume) else {
                return Err(ApiError::invalid_argument(format!(
                    "volume {} not found in app {app}",
                    mount.volume
                )));
            };
            if let Some(holder) = &volume.attached_machine_id {
                return Err(ApiError::failed_precondition(format!(
                    "volume {} is already attached to machine {holder}",
                    mount.volume
                )));
            }
        }
        for mount in &config.mounts {
            if let Some(volume) = volumes.get_mut(&mount.volume) {
                volume.attached_machine_id = Some(id.clone());
            }
        }

        let now = now_rfc3339();
        let mut machine = Machine {
            id: id.clone(),
            name: request.name.unwrap_or_else(|| format!("machine-{}", &id[..8])),
            state: MachineState::Created,
            region: request.region.unwrap_or_else(|| self.region.clone()),
            instance_id: ulid::Ulid::new().to_string(),
            private_ip: address.to_string(),
            config,
            created_at: now.clone(),
            updated_at: now,
            events: Vec::new(),
            checks: Vec::new(),
            nonce: None,
            extra: serde_json::Map::new(),
        };
        push_event(&mut machine, "launch", MachineState::Created, "user");
        let lease = request.lease_ttl.map(|ttl| LeaseData {
            nonce: random_hex(16),
            expires_at: chrono::Utc::now().timestamp() + ttl as i64,
            owner: LEASE_OWNER.to_owned(),
            description: String::new(),
            version: machine.instance_id.clone(),
        });

        let mut answer = machine.clone();
        answer.nonce = lease.as_ref().map(|l| l.nonce.clone());
        let record = MachineRecord { machine, address, lease, destroyed_at: None };
        inner.app(app).machines.insert(id.clone(), record);
        self.commit(&inner);
        drop(inner);

        self.after_created(app, &id, answer.instance_id.clone(), request.skip_launch);
        Ok(answer)
    }

    /// A new machine stays `created` for a moment, as on Fly, then boots (or, created with
    /// `skip_launch`, settles in `stopped`).
    fn after_created(self: &Arc<Self>, app: &str, id: &str, version: String, skip_launch: bool) {
        let engine = Arc::clone(self);
        let (app, id) = (app.to_owned(), id.to_owned());
        let delay = self.settings().created();
        tokio::spawn(async move {
            tokio::select! {
                _ = engine.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let mut inner = lock(&engine.inner);
            let retention = engine.settings().destroyed_retention();
            let Ok(record) = inner.machine(&app, &id, retention) else { return };
            let still_created = record.machine.state == MachineState::Created
                && record.machine.instance_id == version;
            if !still_created {
                return;
            }
            if skip_launch {
                // FIXME: Fly does not document where a `skip_launch` machine settles; the
                // emulator leaves it `stopped` so that `start` can boot it.
                push_event(&mut record.machine, "launch", MachineState::Stopped, "flyd");
            } else {
                engine.boot(&mut inner, &app, &id);
            }
            engine.commit(&inner);
        });
    }

    /// Spawns the machine's process; `started` as soon as it runs, `failed` if it cannot.
    fn boot(self: &Arc<Self>, inner: &mut Inner, app: &str, id: &str) {
        let settings = self.settings();
        let taken = inner.taken_addresses();
        let Some(record) = inner.store.apps.get_mut(app).and_then(|a| a.machines.get_mut(id))
        else {
            return;
        };
        let port = record.machine.internal_port();
        let address_in_use = !is_free(record.address, port);
        if settings.reassign_address_on_start || address_in_use {
            if let Some(address) = super::address::allocate(&taken, port) {
                record.address = address;
                record.machine.private_ip = address.to_string();
            }
        }
        push_event(&mut record.machine, "start", MachineState::Starting, "user");

        let launch = match self.launch_for(app, record, port) {
            Ok(launch) => launch,
            Err(reason) => return fail_boot(record, &reason),
        };
        let mut child = match launch.spawn() {
            Ok(child) => child,
            Err(reason) => return fail_boot(record, &reason),
        };
        let Some(group) = child.id().map(|pid| pid as i32) else {
            return fail_boot(record, "the process exited before it could be tracked");
        };

        push_event(&mut record.machine, "start", MachineState::Started, "flyd");
        let fail_health =
            self.images.lookup(&record.machine.config.image).is_some_and(|s| s.fail_health);
        record.machine.checks = checks::initial(&record.machine.config.checks);
        let check_list = record.machine.config.checks.clone();
        let address = record.address;

        let generation = inner.generation();
        let (exited_tx, exited) = watch::channel(false);
        inner
            .procs
            .insert(id.to_owned(), Proc { group, generation, started: Instant::now(), exited });
        tracing::debug!(machine = id, app, group, %address, "machine process started");

        let engine = Arc::clone(self);
        let (app_owned, id_owned) = (app.to_owned(), id.to_owned());
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exited_tx.send(true);
            engine.on_exit(&app_owned, &id_owned, generation, status);
        });
        for (name, check) in check_list {
            let target = checks::Target { address, default_port: port, fail_health };
            let run = checks::Run { app: app.to_owned(), machine: id.to_owned(), generation, name };
            tokio::spawn(Arc::clone(self).run_check(run, check, target));
        }
    }

    fn launch_for(&self, app: &str, record: &MachineRecord, port: u16) -> Result<Launch, String> {
        let machine = &record.machine;
        let image = self
            .images
            .lookup(&machine.config.image)
            .ok_or_else(|| format!("image {:?} is not in the image map", machine.config.image))?;
        let mut env = self.images.app_env.clone();
        env.extend(machine.config.env.clone());
        env.extend(image.env.clone());
        let mounts = machine
            .config
            .mounts
            .iter()
            .map(|m| (m.path.clone(), self.state_dir.volume_dir(&m.volume)))
            .collect();
        Ok(Launch {
            machine_id: machine.id.clone(),
            app: app.to_owned(),
            region: machine.region.clone(),
            image: machine.config.image.clone(),
            address: record.address,
            port,
            command: image.command.clone(),
            env,
            mounts,
        })
    }

    /// A process ended: `stopped` when asked to stop or after the boot window, `failed`
    /// when it died at boot. Processes of replaced or destroyed versions are ignored.
    fn on_exit(
        &self,
        app: &str,
        id: &str,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        if self.cancel.is_cancelled() {
            return;
        }
        let mut inner = lock(&self.inner);
        if inner.procs.get(id).map(|p| p.generation) != Some(generation) {
            return;
        }
        let Some(proc) = inner.procs.remove(id) else { return };
        // The leader is gone; whatever it started goes with it.
        signal_group(proc.group, Signal::SIGKILL);

        let boot_window = self.settings().boot_window();
        let Some(record) = inner.store.apps.get_mut(app).and_then(|a| a.machines.get_mut(id))
        else {
            return;
        };
        let (exit_code, signal) = match &status {
            Ok(status) => (status.code(), status.signal()),
            Err(_) => (None, None),
        };
        let detail = json!({"exit_event": {"exit_code": exit_code, "signal": signal}});
        let next = match record.machine.state {
            MachineState::Stopping => MachineState::Stopped,
            MachineState::Started | MachineState::Starting | MachineState::Suspending => {
                if proc.started.elapsed() < boot_window {
                    MachineState::Failed
                } else {
                    // FIXME: `config.restart` is not applied: a process that exits after
                    // boot leaves the machine `stopped` whatever the policy says.
                    MachineState::Stopped
                }
            }
            _ => return,
        };
        tracing::debug!(machine = id, ?exit_code, ?signal, state = %next, "machine process exited");
        push_event_with(&mut record.machine, "exit", next, "flyd", Some(detail));
        record.machine.checks.clear();
        self.commit(&inner);
    }

    pub fn get(&self, app: &str, id: &str) -> Result<Machine, ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        Ok(inner.machine(app, id, retention)?.machine.clone())
    }

    pub fn list(
        &self,
        app: &str,
        metadata: &BTreeMap<String, String>,
        states: &[MachineState],
        include_deleted: bool,
        region: Option<&str>,
    ) -> Vec<Machine> {
        let mut inner = lock(&self.inner);
        inner
            .app(app)
            .machines
            .values()
            .map(|r| &r.machine)
            .filter(|m| include_deleted || m.state != MachineState::Destroyed)
            .filter(|m| states.is_empty() || states.contains(&m.state))
            .filter(|m| region.is_none_or(|r| m.region == r))
            .filter(|m| metadata.iter().all(|(k, v)| m.config.metadata.get(k) == Some(v)))
            .cloned()
            .collect()
    }

    pub fn update(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        request: UpdateMachineRequest,
        nonce: Option<&str>,
    ) -> Result<Machine, ApiError> {
        if self.images.lookup(&request.config.image).is_none() {
            return Err(ApiError::invalid_argument(format!(
                "image {:?} is not in the emulator's image map",
                request.config.image
            )));
        }
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        check_lease(record, nonce)?;
        let machine = &mut record.machine;
        if let Some(expected) = &request.current_version {
            if *expected != machine.instance_id {
                return Err(ApiError::failed_precondition(format!(
                    "machine version mismatch: current version is {}, not {expected}",
                    machine.instance_id
                )));
            }
        }
        match machine.state {
            MachineState::Replacing => {
                return Err(ApiError::aborted(
                    "machine is replacing: concurrent update in progress",
                ))
            }
            MachineState::Destroyed | MachineState::Destroying => {
                return Err(ApiError::failed_precondition("machine is destroyed"))
            }
            _ => {}
        }
        let volumes = |c: &crate::types::MachineConfig| -> Vec<String> {
            c.mounts.iter().map(|m| m.volume.clone()).collect()
        };
        if volumes(&machine.config) != volumes(&request.config) {
            return Err(ApiError::invalid_argument(
                "the mounted volume cannot be changed by an update: destroy and recreate the machine",
            ));
        }

        let was_started = matches!(machine.state, MachineState::Started | MachineState::Starting);
        let old_stop = machine.config.stop_config.clone().unwrap_or_default();
        machine.config = request.config;
        machine.instance_id = ulid::Ulid::new().to_string();
        machine.checks.clear();
        push_event(machine, "update", MachineState::Replacing, "user");
        let version = machine.instance_id.clone();
        let answer = machine.clone();
        let old = inner.procs.remove(id);
        self.commit(&inner);
        drop(inner);

        let engine = Arc::clone(self);
        let (app, id) = (app.to_owned(), id.to_owned());
        let launch = was_started && !request.skip_launch;
        tokio::spawn(async move {
            if let Some(old) = old {
                let (signal, grace) = stop_parameters(&old_stop, None)
                    .unwrap_or((Signal::SIGINT, DEFAULT_STOP_TIMEOUT));
                terminate(old, signal, grace).await;
            }
            tokio::select! {
                _ = engine.cancel.cancelled() => return,
                _ = tokio::time::sleep(engine.settings().replacing()) => {}
            }
            let mut inner = lock(&engine.inner);
            let Ok(record) = inner.machine(&app, &id, retention) else { return };
            let current = record.machine.instance_id == version
                && record.machine.state == MachineState::Replacing;
            if !current {
                return;
            }
            if launch {
                engine.boot(&mut inner, &app, &id);
            } else {
                // Fly: "machine was in a non-started state prior to the update so leaving
                // the new version stopped".
                push_event(&mut record.machine, "update", MachineState::Stopped, "flyd");
            }
            engine.commit(&inner);
        });
        Ok(answer)
    }

    pub fn start(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<StartResponse, ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        check_lease(record, nonce)?;
        let previous = record.machine.state;
        match previous {
            MachineState::Stopped | MachineState::Failed => self.boot(&mut inner, app, id),
            MachineState::Suspended => match inner.procs.get(id).map(|p| p.group) {
                Some(group) => {
                    signal_group(group, Signal::SIGCONT);
                    push_event(
                        &mut record_of(&mut inner, app, id).machine,
                        "start",
                        MachineState::Started,
                        "user",
                    );
                }
                None => self.boot(&mut inner, app, id),
            },
            // FIXME: Fly's answer to starting a started machine is undocumented; the
            // emulator treats it as done.
            MachineState::Started => {}
            other => {
                return Err(ApiError::failed_precondition(format!(
                    "unable to start machine from current state: '{other}'"
                )))
            }
        }
        self.commit(&inner);
        Ok(StartResponse {
            previous_state: previous.as_str().to_owned(),
            migrated: false,
            new_host: String::new(),
        })
    }

    pub fn stop(
        &self,
        app: &str,
        id: &str,
        request: StopConfig,
        nonce: Option<&str>,
    ) -> Result<(), ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        let configured = record.machine.config.stop_config.clone().unwrap_or_default();
        let (signal, grace) = stop_parameters(&request, Some(&configured))?;
        check_lease(record, nonce)?;
        let state = record.machine.state;
        match state {
            MachineState::Started | MachineState::Starting | MachineState::Suspended => {
                push_event(&mut record.machine, "stop", MachineState::Stopping, "user");
                match inner.procs.get(id) {
                    Some(proc) if state == MachineState::Suspended => {
                        // Stopping a suspended machine discards its snapshot.
                        signal_group(proc.group, Signal::SIGKILL);
                        signal_group(proc.group, Signal::SIGCONT);
                    }
                    Some(proc) => {
                        let proc = Proc {
                            group: proc.group,
                            generation: proc.generation,
                            started: proc.started,
                            exited: proc.exited.clone(),
                        };
                        tokio::spawn(terminate(proc, signal, grace));
                    }
                    None => {
                        let record = record_of(&mut inner, app, id);
                        push_event(&mut record.machine, "stop", MachineState::Stopped, "flyd");
                    }
                }
            }
            MachineState::Stopping
            | MachineState::Stopped
            | MachineState::Created
            | MachineState::Failed => {}
            other => {
                return Err(ApiError::failed_precondition(format!(
                    "unable to stop machine from current state: '{other}'"
                )))
            }
        }
        self.commit(&inner);
        Ok(())
    }

    pub fn suspend(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), ApiError> {
        let settings = self.settings();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, settings.destroyed_retention())?;
        check_lease(record, nonce)?;
        match record.machine.state {
            MachineState::Started => {}
            MachineState::Suspended | MachineState::Suspending => return Ok(()),
            other => {
                return Err(ApiError::failed_precondition(format!(
                    "unable to suspend machine from current state: '{other}'"
                )))
            }
        }
        push_event(&mut record.machine, "suspend", MachineState::Suspending, "user");
        let Some(generation) = inner.procs.get(id).map(|p| p.generation) else {
            return Err(ApiError::internal("a started machine without a process"));
        };
        if settings.suspending().is_zero() {
            freeze(&mut inner, app, id, generation);
        } else {
            let engine = Arc::clone(self);
            let (app, id) = (app.to_owned(), id.to_owned());
            let delay = settings.suspending();
            tokio::spawn(async move {
                tokio::select! {
                    _ = engine.cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                let mut inner = lock(&engine.inner);
                freeze(&mut inner, &app, &id, generation);
                engine.commit(&inner);
            });
        }
        self.commit(&inner);
        Ok(())
    }

    pub fn delete(
        &self,
        app: &str,
        id: &str,
        force: bool,
        nonce: Option<&str>,
    ) -> Result<(), ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        check_lease(record, nonce)?;
        let state = record.machine.state;
        let stoppable = matches!(
            state,
            MachineState::Created
                | MachineState::Stopped
                | MachineState::Suspended
                | MachineState::Failed
        );
        if state == MachineState::Destroyed {
            return Ok(());
        }
        if !stoppable && !force {
            return Err(ApiError::failed_precondition(format!(
                "unable to destroy machine from current state: '{state}' (use force=true)"
            )));
        }
        record.lease = None;
        record.destroyed_at = Some(now_ms());
        record.machine.checks.clear();
        push_event(&mut record.machine, "destroy", MachineState::Destroyed, "user");
        let mounted: Vec<String> =
            record.machine.config.mounts.iter().map(|m| m.volume.clone()).collect();
        for volume in inner.app(app).volumes.values_mut() {
            if mounted.contains(&volume.id) {
                volume.attached_machine_id = None;
            }
        }
        if let Some(proc) = inner.procs.remove(id) {
            signal_group(proc.group, Signal::SIGKILL);
            signal_group(proc.group, Signal::SIGCONT);
        }
        self.commit(&inner);
        Ok(())
    }

    /// Waits for one of `states`, at most `timeout`; 408 when it runs out.
    pub async fn wait(
        &self,
        app: &str,
        id: &str,
        states: &[WaitState],
        version: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitResponse, ApiError> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let retention = self.settings().destroyed_retention();
        loop {
            changes.borrow_and_update();
            {
                let mut inner = lock(&self.inner);
                let machine = &inner.machine(app, id, retention)?.machine;
                // A version that was replaced has ended: it counts as stopped.
                let replaced = version.is_some_and(|v| v != machine.instance_id);
                let reached = if replaced {
                    states.iter().any(|s| matches!(s, WaitState::Stopped | WaitState::Settled))
                } else {
                    states.iter().any(|s| s.is_reached_by(machine.state))
                };
                if reached {
                    let state = if replaced { MachineState::Stopped } else { machine.state };
                    return Ok(WaitResponse {
                        ok: true,
                        state: state.as_str().to_owned(),
                        version: version.unwrap_or(&machine.instance_id).to_owned(),
                        event_id: machine.events.first().map(|e| e.id.clone()).unwrap_or_default(),
                    });
                }
            }
            let wanted: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
            let timed_out = || {
                ApiError::deadline_exceeded(format!(
                    "machine did not reach state {} within {}s",
                    wanted.join(","),
                    timeout.as_secs()
                ))
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(timed_out()),
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(ApiError::internal("the emulator is shutting down"));
                    }
                }
            }
        }
    }

    pub fn events(&self, app: &str, id: &str, limit: usize) -> Result<Vec<MachineEvent>, ApiError> {
        let mut machine = self.get(app, id)?;
        machine.events.truncate(limit);
        Ok(machine.events)
    }

    // ---- metadata ------------------------------------------------------------------

    pub fn metadata(&self, app: &str, id: &str) -> Result<BTreeMap<String, String>, ApiError> {
        Ok(self.get(app, id)?.config.metadata)
    }

    pub fn set_metadata(
        &self,
        app: &str,
        id: &str,
        key: &str,
        value: Option<String>,
        nonce: Option<&str>,
    ) -> Result<(), ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        check_lease(record, nonce)?;
        let metadata = &mut record.machine.config.metadata;
        match value {
            Some(value) => metadata.insert(key.to_owned(), value),
            None => metadata.remove(key),
        };
        record.machine.updated_at = now_rfc3339();
        self.commit(&inner);
        Ok(())
    }

    // ---- leases --------------------------------------------------------------------

    pub fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        ttl: u64,
        description: String,
        nonce: Option<&str>,
    ) -> Result<Lease, ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        let expires_at = chrono::Utc::now().timestamp() + ttl as i64;
        let lease = match record.lease.take().filter(lease_is_active) {
            Some(mut held) if nonce == Some(held.nonce.as_str()) => {
                held.expires_at = expires_at;
                held
            }
            Some(held) => {
                let error = lease_held(id, &held);
                record.lease = Some(held);
                return Err(error);
            }
            None => LeaseData {
                nonce: random_hex(16),
                expires_at,
                owner: LEASE_OWNER.to_owned(),
                description,
                version: record.machine.instance_id.clone(),
            },
        };
        record.lease = Some(lease.clone());
        self.commit(&inner);
        Ok(Lease { status: "success".to_owned(), data: lease })
    }

    pub fn get_lease(&self, app: &str, id: &str) -> Result<Lease, ApiError> {
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        match record.lease.clone().filter(lease_is_active) {
            Some(data) => Ok(Lease { status: "success".to_owned(), data }),
            None => Err(ApiError::not_found("lease not found")),
        }
    }

    pub fn release_lease(&self, app: &str, id: &str, nonce: Option<&str>) -> Result<(), ApiError> {
        let Some(nonce) = nonce else {
            return Err(ApiError::invalid_argument("fly-machine-lease-nonce header is required"));
        };
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        match record.lease.take().filter(lease_is_active) {
            None => return Err(ApiError::not_found("lease not found")),
            Some(held) if held.nonce != nonce => {
                let error = lease_held(id, &held);
                record.lease = Some(held);
                return Err(error);
            }
            Some(_) => {}
        }
        self.commit(&inner);
        Ok(())
    }

    // ---- volumes -------------------------------------------------------------------

    pub fn create_volume(
        &self,
        app: &str,
        request: CreateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        if request.name.is_empty() {
            return Err(ApiError::invalid_argument("volume name is required"));
        }
        let id = format!("vol_{}", random_hex(16));
        let directory = self.state_dir.volume_dir(&id);
        std::fs::create_dir_all(&directory)
            .map_err(|e| ApiError::internal(format!("creating the volume directory: {e}")))?;
        let volume = Volume {
            id: id.clone(),
            name: request.name,
            state: "created".to_owned(),
            size_gb: request.size_gb.unwrap_or(3),
            region: request.region.unwrap_or_else(|| self.region.clone()),
            zone: "emu0".to_owned(),
            encrypted: request.encrypted.unwrap_or(true),
            attached_machine_id: None,
            created_at: now_rfc3339(),
            extra: serde_json::Map::from_iter([("fstype".to_owned(), json!("ext4"))]),
        };
        let mut inner = lock(&self.inner);
        inner.app(app).volumes.insert(id, volume.clone());
        self.commit(&inner);
        Ok(volume)
    }

    pub fn get_volume(&self, app: &str, id: &str) -> Result<Volume, ApiError> {
        let mut inner = lock(&self.inner);
        let volume = inner.app(app).volumes.get(id).cloned();
        volume.ok_or_else(|| ApiError::not_found("volume not found"))
    }

    pub fn list_volumes(&self, app: &str) -> Vec<Volume> {
        let mut inner = lock(&self.inner);
        inner.app(app).volumes.values().cloned().collect()
    }

    pub fn delete_volume(&self, app: &str, id: &str) -> Result<Volume, ApiError> {
        let mut inner = lock(&self.inner);
        let volumes = &mut inner.app(app).volumes;
        let Some(volume) = volumes.get(id) else {
            return Err(ApiError::not_found("volume not found"));
        };
        if let Some(machine) = &volume.attached_machine_id {
            return Err(ApiError::failed_precondition(format!(
                "volume {id} is attached to machine {machine}"
            )));
        }
        let Some(mut volume) = volumes.remove(id) else {
            return Err(ApiError::not_found("volume not found"));
        };
        volume.state = "destroyed".to_owned();
        let directory = self.state_dir.volume_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&directory) {
            tracing::warn!(volume = id, error = %e, "removing a destroyed volume's files");
        }
        self.commit(&inner);
        Ok(volume)
    }

    // ---- health checks -------------------------------------------------------------

    /// Runs one health check of one machine process until that process is gone.
    async fn run_check(
        self: Arc<Self>,
        run: checks::Run,
        check: crate::types::Check,
        target: checks::Target,
    ) {
        let timing = checks::Timing::of(&check);
        let mut next = timing.grace_period;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
            }
            next = timing.interval;
            let frozen = {
                let mut inner = lock(&self.inner);
                if inner.procs.get(&run.machine).map(|p| p.generation) != Some(run.generation) {
                    return;
                }
                let retention = self.settings().destroyed_retention();
                let Ok(record) = inner.machine(&run.app, &run.machine, retention) else { return };
                record.machine.state != MachineState::Started
            };
            if frozen {
                continue;
            }
            let (status, output) = checks::probe(&check, &target, timing.timeout).await;

            let mut inner = lock(&self.inner);
            if inner.procs.get(&run.machine).map(|p| p.generation) != Some(run.generation) {
                return;
            }
            let Some(record) =
                inner.store.apps.get_mut(&run.app).and_then(|a| a.machines.get_mut(&run.machine))
            else {
                return;
            };
            let result =
                CheckStatus { name: run.name.clone(), status, output, updated_at: now_rfc3339() };
            match record.machine.checks.iter_mut().find(|c| c.name == run.name) {
                Some(slot) => *slot = result,
                None => record.machine.checks.push(result),
            }
            if status == CheckState::Critical {
                tracing::debug!(machine = %run.machine, check = %run.name, "health check failing");
            }
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

impl Settings {
    pub(crate) fn destroyed_retention(&self) -> Duration {
        Duration::from_millis(self.destroyed_retention_ms)
    }
}

fn record_of<'a>(inner: &'a mut Inner, app: &str, id: &str) -> &'a mut MachineRecord {
    inner
        .store
        .apps
        .get_mut(app)
        .and_then(|a| a.machines.get_mut(id))
        .expect("the record was just looked up under the same lock")
}

fn fail_boot(record: &mut MachineRecord, reason: &str) {
    tracing::warn!(machine = %record.machine.id, reason, "machine failed to boot");
    let detail = json!({"error": reason});
    push_event_with(&mut record.machine, "launch", MachineState::Failed, "flyd", Some(detail));
}

/// SIGSTOP of the machine's process group: the emulator's suspend.
fn freeze(inner: &mut Inner, app: &str, id: &str, generation: u64) {
    let Some(group) = inner.procs.get(id).filter(|p| p.generation == generation).map(|p| p.group)
    else {
        return;
    };
    let Some(record) = inner.store.apps.get_mut(app).and_then(|a| a.machines.get_mut(id)) else {
        return;
    };
    if record.machine.state != MachineState::Suspending {
        return;
    }
    signal_group(group, Signal::SIGSTOP);
    push_event(&mut record.machine, "suspend", MachineState::Suspended, "flyd");
}

/// The signal and grace period of a stop: the call's, else the config's, else Fly's
/// defaults (SIGINT, 5 s).
fn stop_parameters(
    request: &StopConfig,
    configured: Option<&StopConfig>,
) -> Result<(Signal, Duration), ApiError> {
    let signal_name = request.signal.clone().or_else(|| configured.and_then(|c| c.signal.clone()));
    let signal = match signal_name {
        Some(name) => parse_stop_signal(&name)
            .ok_or_else(|| ApiError::invalid_argument(format!("invalid signal {name:?}")))?,
        None => Signal::SIGINT,
    };
    let timeout_text =
        request.timeout.clone().or_else(|| configured.and_then(|c| c.timeout.clone()));
    let grace = match timeout_text {
        Some(text) => parse_go_duration(&text)
            .ok_or_else(|| ApiError::invalid_argument(format!("invalid timeout {text:?}")))?,
        None => DEFAULT_STOP_TIMEOUT,
    };
    Ok((signal, grace))
}

/// Sends `signal`, waits up to `grace` for the process to exit, then SIGKILLs the group.
async fn terminate(proc: Proc, signal: Signal, grace: Duration) {
    let mut exited = proc.exited;
    signal_group(proc.group, signal);
    // A frozen process cannot act on the signal until it runs again.
    signal_group(proc.group, Signal::SIGCONT);
    if tokio::time::timeout(grace, exited.wait_for(|done| *done)).await.is_err() {
        signal_group(proc.group, Signal::SIGKILL);
        let _ = tokio::time::timeout(DEFAULT_STOP_TIMEOUT, exited.wait_for(|done| *done)).await;
    }
}

fn is_free(address: Ipv4Addr, port: u16) -> bool {
    std::net::TcpListener::bind(SocketAddrV4::new(address, port)).is_ok()
}
