//! Update, start, stop, suspend and destroy: the state machine driven by API calls.

use super::*;

impl Engine {
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
        super::launch::check_durations(&request.config)?;
        let retention = self.settings().destroyed_retention();
        let mut inner = lock(&self.inner);
        let record = inner.machine(app, id, retention)?;
        check_lease(record, nonce)?;
        let replaced_versions = &mut record.replaced_versions;
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
                "the mounted volume cannot change: destroy and recreate the machine",
            ));
        }

        let was_started = matches!(machine.state, MachineState::Started | MachineState::Starting);
        let old_stop = machine.config.stop_config.clone().unwrap_or_default();
        machine.config = request.config;
        let replaced = std::mem::replace(&mut machine.instance_id, ulid::Ulid::new().to_string());
        replaced_versions.push(replaced);
        machine.checks.clear();
        push_event(machine, "update", MachineState::Replacing, "user");
        let version = machine.instance_id.clone();
        let answer = machine.clone();
        let old = inner.procs.remove(id);
        if let Some(old) = &old {
            inner.retiring.insert(old.group);
        }
        self.commit(&inner);
        drop(inner);

        let engine = Arc::clone(self);
        let (app, id) = (app.to_owned(), id.to_owned());
        let launch = was_started && !request.skip_launch;
        tokio::spawn(async move {
            if let Some(old) = old {
                let (signal, grace) = stop_parameters(&old_stop, None)
                    .unwrap_or((Signal::SIGINT, DEFAULT_STOP_TIMEOUT));
                terminate(old.group, old.exited, signal, grace).await;
                lock(&engine.inner).retiring.remove(&old.group);
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
        record.restarts = 0;
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
            // Fly does not document its answer to starting a started machine; the emulator
            // treats it as done.
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
                        tokio::spawn(terminate(proc.group, proc.exited.clone(), signal, grace));
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
}

pub(super) fn record_of<'a>(inner: &'a mut Inner, app: &str, id: &str) -> &'a mut MachineRecord {
    inner
        .store
        .apps
        .get_mut(app)
        .and_then(|a| a.machines.get_mut(id))
        .expect("the record was just looked up under the same lock")
}

/// SIGSTOP of the machine's process group: the emulator's suspend.
pub(super) fn freeze(inner: &mut Inner, app: &str, id: &str, generation: u64) {
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
pub(super) fn stop_parameters(
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
            .map_err(|e| ApiError::invalid_argument(format!("timeout: {e}")))?,
        None => DEFAULT_STOP_TIMEOUT,
    };
    Ok((signal, grace))
}

/// Sends `signal`, waits up to `grace` for the process to exit, then SIGKILLs the group.
pub(super) async fn terminate(
    group: i32,
    mut exited: watch::Receiver<bool>,
    signal: Signal,
    grace: Duration,
) {
    signal_group(group, signal);
    // A frozen process cannot act on the signal until it runs again.
    signal_group(group, Signal::SIGCONT);
    if tokio::time::timeout(grace, exited.wait_for(|done| *done)).await.is_err() {
        signal_group(group, Signal::SIGKILL);
        let _ = tokio::time::timeout(DEFAULT_STOP_TIMEOUT, exited.wait_for(|done| *done)).await;
    }
}
