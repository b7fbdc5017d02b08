//! Creating machines and running their processes: boot, exit, `failed` at boot.

use super::*;

impl Engine {
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
        check_durations(&config)?;
        let lease_expiry = request.lease_ttl.map(lease_expiry).transpose()?;

        let mut inner = lock(&self.inner);
        let id = random_hex(14);
        let port = config.services.iter().find_map(|s| s.internal_port).unwrap_or(8080);
        let taken = inner.taken_addresses();
        let address = crate::emulator::address::allocate(&taken, port)
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
        let lease = lease_expiry.map(|expires_at| LeaseData {
            nonce: random_hex(16),
            expires_at,
            owner: LEASE_OWNER.to_owned(),
            description: String::new(),
            version: machine.instance_id.clone(),
        });

        let mut answer = machine.clone();
        answer.nonce = lease.as_ref().map(|l| l.nonce.clone());
        let record = MachineRecord {
            machine,
            address,
            lease,
            destroyed_at: None,
            replaced_versions: Vec::new(),
            restarts: 0,
        };
        inner.app(app).machines.insert(id.clone(), record);
        self.commit(&inner);
        drop(inner);

        self.after_created(app, &id, answer.instance_id.clone(), request.skip_launch);
        Ok(answer)
    }

    /// A new machine stays `created` for a moment, as on Fly, then boots (or, created with
    /// `skip_launch`, settles in `stopped`).
    pub(super) fn after_created(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        version: String,
        skip_launch: bool,
    ) {
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
                // Fly does not document where a `skip_launch` machine settles; the emulator
                // leaves it `stopped` so that `start` can boot it.
                push_event(&mut record.machine, "launch", MachineState::Stopped, "flyd");
            } else {
                engine.boot(&mut inner, &app, &id);
            }
            engine.commit(&inner);
        });
    }

    /// Spawns the machine's process; `started` as soon as it runs, `failed` if it cannot.
    pub(super) fn boot(self: &Arc<Self>, inner: &mut Inner, app: &str, id: &str) {
        let settings = self.settings();
        let taken = inner.taken_addresses();
        let Some(record) = inner.store.apps.get_mut(app).and_then(|a| a.machines.get_mut(id))
        else {
            return;
        };
        let port = record.machine.internal_port();
        let address_in_use = !is_free(record.address, port);
        if settings.reassign_address_on_start || address_in_use {
            if let Some(address) = crate::emulator::address::allocate(&taken, port) {
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

    pub(super) fn launch_for(
        &self,
        app: &str,
        record: &MachineRecord,
        port: u16,
    ) -> Result<Launch, String> {
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
    /// when it died at boot; booted again when its `restart` policy says so. Processes of
    /// replaced or destroyed versions are ignored.
    pub(super) fn on_exit(
        self: &Arc<Self>,
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
        let mut restart = false;
        let next = match record.machine.state {
            MachineState::Stopping => MachineState::Stopped,
            MachineState::Started | MachineState::Starting | MachineState::Suspending => {
                if proc.started.elapsed() < boot_window {
                    MachineState::Failed
                } else {
                    restart = policy_restarts(&record.machine.config, exit_code, record.restarts);
                    MachineState::Stopped
                }
            }
            _ => return,
        };
        tracing::debug!(
            machine = id,
            ?exit_code,
            ?signal,
            state = %next,
            restart,
            "machine process exited",
        );
        push_event_with(&mut record.machine, "exit", next, "flyd", Some(detail));
        record.machine.checks.clear();
        if restart {
            record.restarts += 1;
            self.boot(&mut inner, app, id);
        }
        self.commit(&inner);
    }
}

/// Whether a machine whose process exited after booting is booted again: always under
/// `always`, never under `no`, and under `on-failure` (the default) after a non-zero exit
/// or a signal, at most `max_retries` times in a row.
fn policy_restarts(
    config: &crate::types::MachineConfig,
    exit_code: Option<i32>,
    restarts: u32,
) -> bool {
    let policy = config.restart.as_ref();
    match policy.and_then(|p| p.policy.as_deref()).unwrap_or("on-failure") {
        "always" => true,
        "on-failure" => {
            let max = policy.and_then(|p| p.max_retries).unwrap_or(DEFAULT_MAX_RETRIES);
            exit_code != Some(0) && restarts < max
        }
        _ => false,
    }
}

/// Fly's documentation names `max_retries` without a default; this is the emulator's.
const DEFAULT_MAX_RETRIES: u32 = 10;

pub(super) fn fail_boot(record: &mut MachineRecord, reason: &str) {
    tracing::warn!(machine = %record.machine.id, reason, "machine failed to boot");
    let detail = json!({"error": reason});
    push_event_with(&mut record.machine, "launch", MachineState::Failed, "flyd", Some(detail));
}

pub(super) fn is_free(address: Ipv4Addr, port: u16) -> bool {
    std::net::TcpListener::bind(SocketAddrV4::new(address, port)).is_ok()
}

/// Every Go duration in a config (checks, `stop_config`) must parse, or the background
/// tasks that use them could not: Fly answers 400 for a malformed config.
pub(super) fn check_durations(config: &crate::types::MachineConfig) -> Result<(), ApiError> {
    let invalid = |field: String| {
        move |e: crate::types::DurationError| ApiError::invalid_argument(format!("{field}: {e}"))
    };
    for (name, check) in &config.checks {
        let fields = [
            ("interval", &check.interval),
            ("timeout", &check.timeout),
            ("grace_period", &check.grace_period),
        ];
        for (field, text) in fields {
            if let Some(text) = text {
                parse_go_duration(text).map_err(invalid(format!("checks.{name}.{field}")))?;
            }
        }
    }
    if let Some(text) = config.stop_config.as_ref().and_then(|c| c.timeout.as_ref()) {
        parse_go_duration(text).map_err(invalid("stop_config.timeout".to_owned()))?;
    }
    Ok(())
}
