//! `wait`: block until a machine reaches a state, or answer 408.

use super::*;

impl Engine {
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
                let record = inner.machine(app, id, retention)?;
                let machine = &record.machine;
                // A version that was replaced has ended: it counts as stopped.
                let replaced = version.is_some_and(|v| v != machine.instance_id);
                let known = |v: &&str| record.replaced_versions.iter().any(|r| r == v);
                if let Some(unknown) = version.filter(|v| replaced && !known(v)) {
                    return Err(ApiError::not_found(format!(
                        "machine {id} has no version {unknown}"
                    )));
                }
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
}
