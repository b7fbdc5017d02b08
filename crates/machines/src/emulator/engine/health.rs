//! Health checks of running machines, reported in their `checks`.

use super::*;

impl Engine {
    /// Runs one health check of one machine process until that process is gone.
    pub(super) async fn run_check(
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
