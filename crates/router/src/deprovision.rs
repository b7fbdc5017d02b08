//! Taking a user's machine and volume away, and making sure the volume goes too.
//!
//! Fly keeps a volume bound until its machine's destroy has finished, so the volume delete
//! that follows a machine delete can be refused. It is retried after waiting (bounded) for
//! the machine to be `destroyed`; a volume still refused after that is recorded in the
//! `orphaned_volumes` table, which a sweep works through: every [`SWEEP_INTERVAL`], and
//! before every admin call.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use machines::types::WaitState;
use machines::{FlyClient, FlyError};
use serde::Serialize;

use crate::error::ApiError;
use crate::fleet::{error_chain, Fleet};
use crate::metrics::Metrics;
use crate::store::{Store, UserMachine};

/// Volume delete attempts within one deprovision.
const VOLUME_DELETE_ATTEMPTS: u32 = 3;
/// Bound on waiting for the machine to be `destroyed` before the volume delete is retried.
const DESTROY_WAIT: Duration = Duration::from_secs(30);
/// Pause before each further attempt, multiplied by the attempt number.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often the background sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Orphaned volumes one sweep tries at most, so an admin call stays short.
const SWEEP_BATCH: i64 = 20;

/// What became of the user's volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeOutcome {
    /// Deleted (or already gone, or the record had none).
    Deleted,
    /// Still there: recorded for the sweep.
    Orphaned,
}

/// Destroys the user's machine, then the volume, then the record. A failure before the
/// record is deleted leaves it in place, so running the deprovision again finishes the job.
pub async fn deprovision(
    fleet: &Fleet,
    metrics: &Metrics,
    record: &UserMachine,
) -> Result<VolumeOutcome, ApiError> {
    let fly = fleet.fly();
    let store = fleet.store();

    // Machine first: a volume cannot be destroyed while mounted.
    if let Err(e) = fly.delete_machine(&record.machine_id, true, None).await {
        if !e.is_not_found() {
            return Err(fly_failed(&e));
        }
    }
    fleet.forget_ready(&record.machine_id);

    let outcome = match delete_volume(fly, record).await {
        Ok(()) => VolumeOutcome::Deleted,
        Err(e) => {
            store
                .record_orphaned_volume(&record.volume_id, &record.machine_id, record.user_id)
                .await
                .map_err(|e| ApiError::internal(error_chain(&e)))?;
            metrics.volume_orphaned();
            tracing::warn!(
                volume.id = %record.volume_id,
                machine.id = %record.machine_id,
                error = %error_chain(&e),
                "volume not deleted; recorded for the orphaned-volume sweep",
            );
            VolumeOutcome::Orphaned
        }
    };

    store.delete(record.user_id).await.map_err(|e| ApiError::internal(error_chain(&e)))?;
    fleet.forget_user(record.user_id);
    Ok(outcome)
}

/// Deletes the record's volume, waiting for the machine's destroy to finish and trying
/// again when it is refused.
async fn delete_volume(fly: &FlyClient, record: &UserMachine) -> Result<(), FlyError> {
    if record.volume_id.is_empty() {
        return Ok(());
    }
    let mut attempt = 1;
    loop {
        let error = match fly.delete_volume(&record.volume_id).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if attempt >= VOLUME_DELETE_ATTEMPTS => return Err(e),
            Err(e) => e,
        };
        tracing::debug!(
            volume.id = %record.volume_id,
            attempt,
            error = %error_chain(&error),
            "volume delete refused; trying again",
        );
        if attempt == 1 {
            wait_destroyed(fly, &record.machine_id).await;
        } else {
            tokio::time::sleep(RETRY_PAUSE * attempt).await;
        }
        attempt += 1;
    }
}

/// Waits (bounded) until Fly reports the machine `destroyed` or has forgotten it.
async fn wait_destroyed(fly: &FlyClient, machine_id: &str) {
    match fly.wait_machine(machine_id, WaitState::Destroyed, None, DESTROY_WAIT).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => {
            tracing::debug!(machine.id = %machine_id, error = %error_chain(&e), "destroy wait");
        }
    }
}

/// Tries to delete every recorded orphaned volume (up to a batch); returns how many are gone.
/// Two replicas sweeping at once is harmless: the second delete finds nothing (404).
pub async fn sweep(fly: &FlyClient, store: &Store, metrics: &Metrics) -> usize {
    let orphans = match store.orphaned_volumes(SWEEP_BATCH).await {
        Ok(orphans) => orphans,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "listing orphaned volumes failed");
            return 0;
        }
    };
    let mut deleted = 0;
    for orphan in orphans {
        let gone = match fly.delete_volume(&orphan.volume_id).await {
            Ok(_) => true,
            Err(e) if e.is_not_found() => true,
            Err(e) => {
                tracing::debug!(
                    volume.id = %orphan.volume_id,
                    attempts = orphan.attempts + 1,
                    error = %error_chain(&e),
                    "orphaned volume still not deleted",
                );
                false
            }
        };
        let recorded = if gone {
            store.forget_orphaned_volume(&orphan.volume_id).await
        } else {
            store.orphaned_volume_failed(&orphan.volume_id).await
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %error_chain(&e), "recording the orphaned-volume sweep failed");
        }
        if gone {
            deleted += 1;
            metrics.orphaned_volume_deleted();
            tracing::warn!(
                volume.id = %orphan.volume_id,
                machine.id = %orphan.machine_id,
                attempts = orphan.attempts + 1,
                "orphaned volume deleted by the sweep",
            );
        }
    }
    deleted
}

/// Sweeps orphaned volumes every [`SWEEP_INTERVAL`] until the router stops.
pub async fn run_sweeper(fleet: Arc<Fleet>, metrics: Arc<Metrics>) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        sweep(fleet.fly(), fleet.store(), &metrics).await;
    }
}

fn fly_failed(e: &FlyError) -> ApiError {
    ApiError::upstream(StatusCode::BAD_GATEWAY, "fly_api_failed", crate::fleet::FLY_FAILED)
        .with_detail(error_chain(e))
}
