//! The rollout engine: waves, the per-machine update, health gates and rollback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use machines::types::{CheckState, Machine, MachineState, UpdateMachineRequest, WaitState};
use machines::{FlyClient, ListMachines};
use uuid::Uuid;

use crate::outcome::{MachineOutcome, MachineResult, Outcome, RolloutStatus};
use crate::plan::{wave_name, Plan};
use crate::store::{MachineRecord, MachineStatus, RunStatus, Store};
use crate::RolloutError;

/// How a rollout proceeds.
#[derive(Debug, Clone)]
pub struct RolloutConfig {
    /// Machines in the canary wave.
    pub canary: usize,
    /// Machines per wave after the canary (updated at the same time).
    pub batch: usize,
    /// The lease taken on each machine while it is changed; refreshed in the background.
    pub lease_ttl: Duration,
    /// How long to wait for a lease someone else holds (a router wake, a killed deploy).
    pub lease_wait: Duration,
    /// How long a machine may take to reach its state after an update.
    pub wait_timeout: Duration,
    /// How long a restarted machine may take to pass its health checks and `/healthz`.
    pub health_timeout: Duration,
    /// The daemon's liveness path, asked on the machine's private address; `None` skips it.
    pub health_path: Option<String>,
    /// The pause between two health probes or lease attempts.
    pub poll_interval: Duration,
    /// Only machines whose metadata has this key are rolled out (the per-user machines).
    pub machine_metadata_key: Option<String>,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            canary: 1,
            batch: 10,
            lease_ttl: Duration::from_secs(30),
            lease_wait: Duration::from_secs(40),
            wait_timeout: Duration::from_secs(300),
            health_timeout: Duration::from_secs(120),
            health_path: Some("/healthz".to_owned()),
            poll_interval: Duration::from_millis(500),
            machine_metadata_key: Some("matrix_user_id".to_owned()),
        }
    }
}

/// Hooks for showing progress; every method has an empty default.
pub trait Progress: Send + Sync {
    fn wave_started(&self, _name: &str, _machines: usize) {}
    fn machine_finished(&self, _machine: &str, _result: MachineResult) {}
    fn wave_finished(&self, _name: &str, _ok: bool) {}
    fn rolling_back(&self, _machines: usize) {}
}

/// Progress that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

/// A rollout of one app.
pub struct Rollout {
    fly: FlyClient,
    store: Store,
    config: RolloutConfig,
    http: reqwest::Client,
}

impl Rollout {
    pub fn new(fly: FlyClient, store: Store, config: RolloutConfig) -> Self {
        // The health probe is a plain request on the private network; it never waits long.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { fly, store, config, http }
    }

    /// The store, e.g. to read the desired image.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What a rollout of `image` would do now; changes nothing.
    pub async fn plan(&self, image: &str) -> Result<Plan, RolloutError> {
        let machines = self.machines().await?;
        Ok(Plan::new(self.fly.app(), image, &machines, self.config.canary, self.config.batch))
    }

    async fn machines(&self) -> Result<Vec<Machine>, RolloutError> {
        let all = self.fly.list_machines(&ListMachines::default()).await.map_err(|source| {
            RolloutError::Fly { op: "list the machines", app: self.fly.app().to_owned(), source }
        })?;
        let key = self.config.machine_metadata_key.as_deref();
        Ok(all
            .into_iter()
            .filter(|m| key.is_none_or(|k| m.config.metadata.contains_key(k)))
            .filter(|m| !matches!(m.state, MachineState::Destroyed | MachineState::Destroying))
            .collect())
    }

    /// Rolls `image` (pinned by digest) out, or finishes the interrupted rollout of it.
    pub async fn run(
        &mut self,
        image: &str,
        progress: &dyn Progress,
    ) -> Result<Outcome, RolloutError> {
        let app = self.fly.app().to_owned();
        if !image.contains("@sha256:") {
            return Err(RolloutError::NotPinned { image: image.to_owned() });
        }

        // 1. One deploy per app at a time.
        if !self.store.try_lock_app(&app).await? {
            return Err(RolloutError::Busy { app });
        }

        // 2. Resume the unfinished run of this image, or plan a new one.
        let (run, records, previous_desired, resumed) = match self.store.active_run(&app).await? {
            Some(active) if active.image == image => {
                tracing::info!(app, run = %active.id, "resuming the interrupted rollout");
                (active.id, active.machines, active.previous_desired_image, true)
            }
            Some(active) => {
                // FIXME: no command abandons an unfinished run of another image; it is
                // finished by deploying that image again.
                return Err(RolloutError::OtherRunActive {
                    app,
                    run: active.id,
                    image: active.image,
                });
            }
            None => {
                let plan = self.plan(image).await?;
                if plan.is_noop() {
                    return self.nothing_to_do(&plan).await;
                }
                let previous = self.store.desired_image(&app).await?;
                let run = self.store.create_run(&plan).await?;
                tracing::info!(app, %run, machines = plan.machine_count(), "rollout planned");
                (run, self.store.machines(run).await?, previous, false)
            }
        };

        // 3. Wave by wave; the first failing one halts and rolls back.
        let mut waves: BTreeMap<usize, Vec<MachineRecord>> = BTreeMap::new();
        for record in records {
            waves.entry(record.wave).or_default().push(record);
        }
        let canary = self.config.canary;
        let mut results: BTreeMap<String, MachineOutcome> = BTreeMap::new();
        for (index, wave) in &waves {
            let name = wave_name(*index, canary);
            let ok = self.run_wave(run, &name, wave, image, progress, &mut results).await?;
            if !ok {
                return self
                    .halt(run, &app, image, previous_desired.as_deref(), resumed, results, progress)
                    .await;
            }
            if *index == 0 {
                // The canary proved the image: new machines get it from now on.
                self.store.set_desired_image(&app, image, run).await?;
            }
        }

        // 4. Done.
        self.store.set_desired_image(&app, image, run).await?;
        self.store.finish_run(run, RunStatus::Succeeded).await?;
        Ok(Outcome {
            app,
            image: image.to_owned(),
            run: Some(run),
            resumed,
            status: RolloutStatus::Succeeded,
            machines: results.into_values().collect(),
        })
    }

    async fn nothing_to_do(&self, plan: &Plan) -> Result<Outcome, RolloutError> {
        // Every machine runs the image already; new ones should get it too.
        self.store.set_desired_image(&plan.app, &plan.image, Uuid::nil()).await?;
        let machines = plan
            .current
            .iter()
            .map(|id| MachineOutcome {
                machine_id: id.clone(),
                result: MachineResult::Current,
                detail: None,
            })
            .collect();
        Ok(Outcome {
            app: plan.app.clone(),
            image: plan.image.clone(),
            run: None,
            resumed: false,
            status: RolloutStatus::NothingToDo,
            machines,
        })
    }

    /// Updates the machines of one wave at the same time; false when any failed.
    async fn run_wave(
        &self,
        run: Uuid,
        name: &str,
        wave: &[MachineRecord],
        image: &str,
        progress: &dyn Progress,
        results: &mut BTreeMap<String, MachineOutcome>,
    ) -> Result<bool, RolloutError> {
        let (done, todo): (Vec<&MachineRecord>, Vec<&MachineRecord>) =
            wave.iter().partition(|r| r.status == MachineStatus::Updated);
        for record in done {
            // Finished by an earlier, interrupted run: never touched again.
            let result = if record.was_running {
                MachineResult::Updated
            } else {
                MachineResult::UpdatedAsleep
            };
            results.insert(record.machine_id.clone(), outcome(record, result, None));
        }
        // A machine left failed by an interrupted run fails the wave again, so that it is
        // rolled back like the rest.
        let mut ok = !todo.iter().any(|r| r.status == MachineStatus::Failed);
        let todo: Vec<&MachineRecord> =
            todo.into_iter().filter(|r| r.status != MachineStatus::Failed).collect();
        if todo.is_empty() {
            return Ok(ok);
        }

        // Results are recorded as each machine finishes, so a rollout killed mid-wave
        // leaves every finished machine marked.
        progress.wave_started(name, todo.len());
        let mut updates: FuturesUnordered<_> = todo
            .iter()
            .map(|record| async move { (*record, self.update_machine(run, record, image).await) })
            .collect();
        while let Some((record, result)) = updates.next().await {
            let (result, detail) = match result? {
                Ok(new_version) => {
                    let id = &record.machine_id;
                    self.store
                        .mark(run, id, MachineStatus::Updated, Some(&new_version), None)
                        .await?;
                    let result = if record.was_running {
                        MachineResult::Updated
                    } else {
                        MachineResult::UpdatedAsleep
                    };
                    (result, None)
                }
                Err(MachineProblem::Leased(problem)) => {
                    // Never touched: someone else (a router wake, another tool) holds it.
                    // The wave still fails, so the deploy does not report itself finished.
                    tracing::warn!(machine = %record.machine_id, problem, "machine skipped");
                    let id = &record.machine_id;
                    self.store.mark(run, id, MachineStatus::Skipped, None, Some(&problem)).await?;
                    ok = false;
                    (MachineResult::SkippedLeased, Some(problem))
                }
                Err(MachineProblem::Failed(problem)) => {
                    tracing::warn!(machine = %record.machine_id, problem, "machine update failed");
                    let id = &record.machine_id;
                    self.store.mark(run, id, MachineStatus::Failed, None, Some(&problem)).await?;
                    ok = false;
                    (MachineResult::Failed, Some(problem))
                }
            };
            progress.machine_finished(&record.machine_id, result);
            results.insert(record.machine_id.clone(), outcome(record, result, detail));
        }
        progress.wave_finished(name, ok);
        Ok(ok)
    }

    #[allow(clippy::too_many_arguments)]
    async fn halt(
        &self,
        run: Uuid,
        app: &str,
        image: &str,
        previous_desired: Option<&str>,
        resumed: bool,
        mut results: BTreeMap<String, MachineOutcome>,
        progress: &dyn Progress,
    ) -> Result<Outcome, RolloutError> {
        // 1. Every machine this run touched goes back to what it ran before.
        let records = self.store.machines(run).await?;
        let touched: Vec<&MachineRecord> = records
            .iter()
            .filter(|r| {
                matches!(
                    r.status,
                    MachineStatus::Updated | MachineStatus::Updating | MachineStatus::Failed
                )
            })
            .collect();
        progress.rolling_back(touched.len());
        for chunk in touched.chunks(self.config.batch.max(1)) {
            let rollbacks =
                chunk.iter().map(|record| async move { (*record, self.roll_back(record).await) });
            for (record, result) in join_all(rollbacks).await {
                let failed_detail = results.get(&record.machine_id).and_then(|o| o.detail.clone());
                let (status, result, detail) = match result {
                    Ok(()) => (MachineStatus::RolledBack, MachineResult::RolledBack, failed_detail),
                    Err(problem) => {
                        tracing::error!(machine = %record.machine_id, problem, "rollback failed");
                        (
                            MachineStatus::RollbackFailed,
                            MachineResult::RollbackFailed,
                            Some(problem),
                        )
                    }
                };
                self.store.mark(run, &record.machine_id, status, None, detail.as_deref()).await?;
                progress.machine_finished(&record.machine_id, result);
                results.insert(record.machine_id.clone(), outcome(record, result, detail));
            }
        }

        // 2. Machines never reached are listed as such; the desired image goes back.
        for record in records.iter().filter(|r| r.status == MachineStatus::Pending) {
            results.insert(
                record.machine_id.clone(),
                outcome(record, MachineResult::NotReached, None),
            );
        }
        self.store.restore_desired_image(app, previous_desired, run).await?;
        self.store.finish_run(run, RunStatus::RolledBack).await?;
        Ok(Outcome {
            app: app.to_owned(),
            image: image.to_owned(),
            run: Some(run),
            resumed,
            status: RolloutStatus::RolledBack,
            machines: results.into_values().collect(),
        })
    }

    /// One machine to `image`. The outer error stops the rollout (the database failed);
    /// the inner one is this machine's failure, recorded in the outcome.
    async fn update_machine(
        &self,
        run: Uuid,
        record: &MachineRecord,
        image: &str,
    ) -> Result<Result<String, MachineProblem>, RolloutError> {
        let id = record.machine_id.as_str();
        let lease = match self.lease(id, &format!("deploy {run}")).await {
            Ok(lease) => lease,
            Err(LeaseProblem::HeldElsewhere(why)) => return Ok(Err(MachineProblem::Leased(why))),
            Err(LeaseProblem::Failed(why)) => return Ok(Err(MachineProblem::Failed(why))),
        };
        let result = self.replace_image(run, record, image, &lease.nonce).await;
        self.release(id, lease).await;
        Ok(result?.map_err(MachineProblem::Failed))
    }

    async fn replace_image(
        &self,
        run: Uuid,
        record: &MachineRecord,
        image: &str,
        nonce: &str,
    ) -> Result<Result<String, String>, RolloutError> {
        let id = record.machine_id.as_str();

        // 1. Read it under the lease; an interrupted run may already have updated it.
        let machine = match self.fly.get_machine(id).await {
            Ok(machine) => machine,
            Err(e) => return Ok(Err(format!("reading the machine: {e}"))),
        };
        let already =
            machine.config.image == image && machine.instance_id != record.previous_version;
        let new_version = if already {
            machine.instance_id.clone()
        } else {
            // 2. Mark before sending, so that a resume checks before sending again.
            self.store.mark(run, id, MachineStatus::Updating, None, None).await?;
            let mut config = machine.config.clone();
            config.image = image.to_owned();
            let request = UpdateMachineRequest {
                config,
                current_version: Some(machine.instance_id.clone()),
                // A sleeping user's machine is never woken by a deploy.
                skip_launch: !record.was_running,
                skip_service_registration: false,
            };
            match self.fly.update_machine(id, &request, Some(nonce)).await {
                Ok(updated) => updated.instance_id,
                Err(e) => return Ok(Err(format!("update: {e}"))),
            }
        };

        // 3. Wait for the new version, then make sure Fly did not revert it.
        if let Err(problem) = self.settle(id, &new_version, record.was_running).await {
            return Ok(Err(problem));
        }
        let machine = match self.fly.get_machine(id).await {
            Ok(machine) => machine,
            Err(e) => return Ok(Err(format!("reading the machine after the update: {e}"))),
        };
        if machine.instance_id == record.previous_version {
            return Ok(Err(format!(
                "Fly kept the previous version {}: the update was reverted",
                record.previous_version
            )));
        }
        if machine.config.image != image {
            return Ok(Err(format!("the machine runs {} after the update", machine.config.image)));
        }

        // 4. A running machine must come back healthy.
        if record.was_running {
            if let Err(problem) = self.healthy(id).await {
                return Ok(Err(problem));
            }
        }
        Ok(Ok(machine.instance_id))
    }

    async fn roll_back(&self, record: &MachineRecord) -> Result<(), String> {
        let id = record.machine_id.as_str();
        let lease = self.lease(id, "deploy rollback").await.map_err(LeaseProblem::into_detail)?;
        let result = async {
            let machine =
                self.fly.get_machine(id).await.map_err(|e| format!("reading the machine: {e}"))?;
            // A failed update Fly reverted, or one never sent, is already back.
            if machine.config.image == record.previous_image {
                return Ok(());
            }
            let mut config = machine.config.clone();
            config.image = record.previous_image.clone();
            let request = UpdateMachineRequest {
                config,
                current_version: Some(machine.instance_id.clone()),
                skip_launch: !record.was_running,
                skip_service_registration: false,
            };
            let updated = self
                .fly
                .update_machine(id, &request, Some(&lease.nonce))
                .await
                .map_err(|e| format!("rollback update: {e}"))?;
            self.settle(id, &updated.instance_id, record.was_running).await
        }
        .await;
        self.release(id, lease).await;
        result
    }

    /// Waits until `version` of the machine is started (or, for a machine left asleep,
    /// settled in a non-transient state).
    async fn settle(&self, id: &str, version: &str, running: bool) -> Result<(), String> {
        let state = if running { WaitState::Started } else { WaitState::Settled };
        self.fly
            .wait_machine(id, state, Some(version), self.config.wait_timeout)
            .await
            .map(drop)
            .map_err(|e| format!("waiting for {state}: {e}"))
    }

    /// Polls until the machine is started, every check passes, and `/healthz` answers.
    async fn healthy(&self, id: &str) -> Result<(), String> {
        let deadline = deadline_after(self.config.health_timeout);
        loop {
            let problem = match self.probe(id).await {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(format!(
                    "not healthy after {:?}: {problem}",
                    self.config.health_timeout
                ));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    async fn probe(&self, id: &str) -> Result<(), String> {
        let machine =
            self.fly.get_machine(id).await.map_err(|e| format!("reading the machine: {e}"))?;
        if machine.state != MachineState::Started {
            return Err(format!("state is {}", machine.state));
        }
        if machine.checks.len() < machine.config.checks.len() {
            return Err("health checks have not reported yet".to_owned());
        }
        if let Some(check) = machine.checks.iter().find(|c| c.status != CheckState::Passing) {
            return Err(format!("check {} is {:?}: {}", check.name, check.status, check.output));
        }
        let Some(path) = &self.config.health_path else { return Ok(()) };
        let host = if machine.private_ip.contains(':') {
            format!("[{}]", machine.private_ip)
        } else {
            machine.private_ip.clone()
        };
        let url = format!("http://{host}:{}{path}", machine.internal_port());
        match self.http.get(&url).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("{path} answered {}", response.status())),
            Err(e) => Err(format!("{path} did not answer: {e}")),
        }
    }

    /// Takes the machine's lease, waiting while someone else holds it, and keeps it
    /// fresh in the background until released (or dropped).
    async fn lease(&self, id: &str, description: &str) -> Result<HeldLease, LeaseProblem> {
        let deadline = deadline_after(self.config.lease_wait);
        let lease = loop {
            match self.fly.acquire_lease(id, self.config.lease_ttl, description).await {
                Ok(lease) => break lease,
                Err(e) if e.is_conflict() => {
                    if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        return Err(LeaseProblem::HeldElsewhere(format!(
                            "someone else held its lease for over {:?}",
                            self.config.lease_wait
                        )));
                    }
                    tracing::debug!(machine = id, "lease held elsewhere; waiting");
                    tokio::time::sleep(self.config.poll_interval).await;
                }
                Err(e) => return Err(LeaseProblem::Failed(format!("taking the lease: {e}"))),
            }
        };
        let nonce = lease.data.nonce;
        let fly = self.fly.clone();
        let (machine, refresh_nonce, ttl) = (id.to_owned(), nonce.clone(), self.config.lease_ttl);
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(error) = fly.refresh_lease(&machine, &refresh_nonce, ttl).await {
                    tracing::warn!(machine, %error, "refreshing the lease failed");
                }
            }
        });
        Ok(HeldLease { nonce, refresher })
    }

    async fn release(&self, id: &str, lease: HeldLease) {
        lease.refresher.abort();
        if let Err(error) = self.fly.release_lease(id, &lease.nonce).await {
            // It expires on its own; a later deploy waits for that.
            tracing::warn!(machine = id, %error, "releasing the lease failed");
        }
    }
}

/// Why one machine was not updated.
enum MachineProblem {
    /// Someone else held its lease for all of `lease_wait`: it was left as it was.
    Leased(String),
    /// Its update, wait or health check failed.
    Failed(String),
}

/// Why a lease could not be taken.
enum LeaseProblem {
    HeldElsewhere(String),
    Failed(String),
}

impl LeaseProblem {
    fn into_detail(self) -> String {
        match self {
            LeaseProblem::HeldElsewhere(why) | LeaseProblem::Failed(why) => why,
        }
    }
}

/// `timeout` from now, or `None` (no deadline) when that is past what an `Instant` holds.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// A lease this rollout holds; dropping it (a cancelled rollout) stops the refreshing,
/// so the lease expires after its TTL.
struct HeldLease {
    nonce: String,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

fn outcome(
    record: &MachineRecord,
    result: MachineResult,
    detail: Option<String>,
) -> MachineOutcome {
    MachineOutcome { machine_id: record.machine_id.clone(), result, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_timeout_has_no_deadline_instead_of_overflowing() {
        assert!(deadline_after(Duration::MAX).is_none());
        assert!(deadline_after(Duration::from_secs(120)).is_some_and(|d| d > Instant::now()));
    }
}
