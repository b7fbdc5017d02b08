//! Leases: who may change a machine, proven by the nonce.

use super::*;

pub(super) fn lease_is_active(lease: &LeaseData) -> bool {
    lease.expires_at > chrono::Utc::now().timestamp()
}

pub(super) fn lease_held(id: &str, lease: &LeaseData) -> ApiError {
    let expires = chrono::DateTime::from_timestamp(lease.expires_at, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    ApiError::aborted(format!(
        "machine ID {id} lease currently held by {}, expires at {expires}",
        lease.owner
    ))
}

/// When a lease of `ttl` seconds taken now ends; 400 for a TTL no date can hold.
pub(super) fn lease_expiry(ttl: u64) -> Result<i64, ApiError> {
    i64::try_from(ttl)
        .ok()
        .and_then(|ttl| chrono::Utc::now().timestamp().checked_add(ttl))
        .filter(|at| chrono::DateTime::from_timestamp(*at, 0).is_some())
        .ok_or_else(|| ApiError::invalid_argument(format!("invalid lease ttl {ttl}: too long")))
}

/// Mutating calls on a leased machine must carry the lease's nonce (Fly answers 409).
pub(super) fn check_lease(record: &mut MachineRecord, nonce: Option<&str>) -> Result<(), ApiError> {
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

impl Engine {
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
        let expires_at = lease_expiry(ttl)?;
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
}
