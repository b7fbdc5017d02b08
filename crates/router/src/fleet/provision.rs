//! Provisioning a user's volume and machine, exactly once.
//!
//! 1. Take the user's advisory lock (other replicas provisioning the same user wait here).
//! 2. Read the record again: the lock holder before us may have finished the job.
//! 3. Adopt a machine already tagged `matrix_user_id = <user>` on Fly (a crash between Fly's
//!    create and our insert leaves one), else reuse the user's unattached volume or create
//!    one, then create the machine from the rendered template, with the image the last
//!    deploy recorded (`ROUTER_DAEMON_IMAGE` until there is one).
//! 4. Record it and release the lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use machines::types::{CreateVolumeRequest, Machine, MachineState};
use machines::{FlyError, ListMachines};
use uuid::Uuid;

use super::{error_chain, store_failed, Fleet};
use crate::error::ApiError;
use crate::store::{UserLock, UserMachine};
use crate::template::Value;

/// The machine metadata key that names the user.
pub const USER_METADATA_KEY: &str = "matrix_user_id";

impl Fleet {
    /// The user's record, creating their volume and machine when they have none.
    pub async fn provision(&self, user_id: Uuid) -> Result<UserMachine, ApiError> {
        // Requests of this replica queue here, so each holds no database connection while
        // waiting; replicas queue on the advisory lock.
        let local = self.provisioning_lock(user_id);
        let _local = local.lock().await;
        let lock = self.store.lock_user(user_id).await.map_err(store_failed)?;
        let result = self.provision_locked(&lock, user_id).await;
        lock.release().await;
        result
    }

    fn provisioning_lock(&self, user_id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.provisioning.lock().expect("provisioning lock");
        // Drop the locks nobody holds or waits for, so the map stays small.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(user_id).or_default().clone()
    }

    async fn provision_locked(
        &self,
        lock: &UserLock,
        user_id: Uuid,
    ) -> Result<UserMachine, ApiError> {
        if let Some(record) = lock.get(user_id).await.map_err(store_failed)? {
            return Ok(record);
        }

        let machine = match self.existing_machine(user_id).await? {
            Some(machine) => {
                tracing::info!(machine.id = %machine.id, "adopting a machine provisioned before");
                machine
            }
            None => self.create_machine(lock, user_id).await?,
        };
        let volume_id = machine.config.mounts.first().map(|m| m.volume.clone()).unwrap_or_default();
        let record = UserMachine {
            user_id,
            machine_id: machine.id.clone(),
            volume_id,
            region: machine.region.clone(),
        };
        let record = lock.insert(&record).await.map_err(store_failed)?;
        self.metrics.provisioned();
        Ok(record)
    }

    async fn existing_machine(&self, user_id: Uuid) -> Result<Option<Machine>, ApiError> {
        let filter = ListMachines::with_metadata(USER_METADATA_KEY, user_id.to_string());
        let machines = self.fly.list_machines(&filter).await.map_err(fly_failed)?;
        Ok(machines.into_iter().find(|m| {
            !matches!(m.state, MachineState::Destroyed | MachineState::Destroying)
                && m.config.metadata.get(USER_METADATA_KEY) == Some(&user_id.to_string())
        }))
    }

    async fn create_machine(&self, lock: &UserLock, user_id: Uuid) -> Result<Machine, ApiError> {
        let image = self.image_for_new_machine(lock).await?;
        let volume_id = self.user_volume(user_id).await?;
        let values = BTreeMap::from([
            ("image", Value::Text(image)),
            ("region", Value::Text(self.region.clone())),
            ("machine_name", Value::Text(format!("matrix-{}", user_id.simple()))),
            ("user_id", Value::Text(user_id.to_string())),
            ("volume_id", Value::Text(volume_id)),
            ("daemon_token", Value::Text(self.tokens.for_user(user_id))),
            ("daemon_port", Value::Number(u64::from(self.daemon.port))),
        ]);
        let request = self
            .template
            .render(&values)
            .map_err(|e| ApiError::internal(format!("machine template: {}", error_chain(&e))))?;
        let machine = self.fly.create_machine(&request).await.map_err(fly_failed)?;
        tracing::info!(machine.id = %machine.id, "provisioned a machine");
        Ok(machine)
    }

    /// The image the last deploy recorded for the app, else `ROUTER_DAEMON_IMAGE`: a machine
    /// provisioned after a deploy runs what the deploy rolled out to the others.
    async fn image_for_new_machine(&self, lock: &UserLock) -> Result<String, ApiError> {
        let desired = lock.desired_image(self.fly.app()).await.map_err(store_failed)?;
        Ok(desired.unwrap_or_else(|| self.daemon.image.clone()))
    }

    /// The user's volume: an unattached one from an earlier attempt, or a new one.
    ///
    /// Creating a volume is not idempotent on Fly, so the client does not retry it; here the
    /// volume's name makes it so: after a failure the next attempt looks for it first.
    async fn user_volume(&self, user_id: Uuid) -> Result<String, ApiError> {
        let name = volume_name(user_id);
        let mut attempt = 0;
        loop {
            if let Some(id) = self.unattached_volume(&name).await? {
                return Ok(id);
            }
            let request = CreateVolumeRequest {
                name: name.clone(),
                region: Some(self.region.clone()),
                size_gb: Some(self.daemon.volume_size_gb),
                encrypted: Some(true),
                require_unique_zone: Some(false),
                ..CreateVolumeRequest::default()
            };
            match self.fly.create_volume(&request).await {
                Ok(volume) => return Ok(volume.id),
                Err(e) if e.is_transient() && attempt + 1 < VOLUME_ATTEMPTS => {
                    tracing::warn!(error = %error_chain(&e), "creating a volume failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(250 << attempt)).await;
                }
                Err(e) => return Err(fly_failed(e)),
            }
        }
    }

    async fn unattached_volume(&self, name: &str) -> Result<Option<String>, ApiError> {
        let volumes = self.fly.list_volumes().await.map_err(fly_failed)?;
        let reusable = volumes.into_iter().find(|v| {
            v.name == name
                && v.state != "destroyed"
                && v.state != "destroying"
                && v.attached_machine_id.as_deref().is_none_or(str::is_empty)
        });
        Ok(reusable.map(|v| v.id))
    }
}

/// Attempts at creating a volume; the client itself does not retry this call.
const VOLUME_ATTEMPTS: u32 = 4;

/// Fly volume names: lowercase letters, digits and underscores, at most 30 characters.
fn volume_name(user_id: Uuid) -> String {
    let simple = user_id.simple().to_string();
    format!("u_{}", &simple[..28])
}

fn fly_failed(e: FlyError) -> ApiError {
    let status =
        if e.is_rate_limited() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::BAD_GATEWAY };
    ApiError::upstream(status, "fly_api_failed", super::FLY_FAILED).with_detail(error_chain(&e))
}
