//! Lease calls: acquire, refresh, read, release.

use super::*;

impl FlyClient {
    /// Takes the machine's lease for `ttl`. Fly answers 409 when someone else holds it
    /// (see [`FlyError::is_conflict`]).
    pub async fn acquire_lease(
        &self,
        id: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<Lease, FlyError> {
        let path = ["machines", id, "lease"];
        let mut call = self.call("acquire_lease", Some(id), Method::POST, &path);
        let body =
            LeaseRequest { ttl: Some(ttl.as_secs().max(1)), description: Some(description.into()) };
        call.body = Some(to_json("acquire_lease", &body)?);
        call.idempotence = Idempotence::Unsafe;
        self.json(call).await
    }

    /// Extends a lease this client holds (the same POST, with the nonce).
    pub async fn refresh_lease(
        &self,
        id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<Lease, FlyError> {
        let path = ["machines", id, "lease"];
        let mut call = self.call("refresh_lease", Some(id), Method::POST, &path);
        call.body = Some(to_json(
            "refresh_lease",
            &LeaseRequest { ttl: Some(ttl.as_secs().max(1)), description: None },
        )?);
        call.nonce = Some(nonce);
        self.json(call).await
    }

    /// Reads the machine's current lease (404 when there is none).
    pub async fn get_lease(&self, id: &str) -> Result<Lease, FlyError> {
        let path = ["machines", id, "lease"];
        self.json(self.call("get_lease", Some(id), Method::GET, &path)).await
    }

    /// Releases a lease this client holds; a lease that is already gone counts as released.
    pub async fn release_lease(&self, id: &str, nonce: &str) -> Result<(), FlyError> {
        let path = ["machines", id, "lease"];
        let mut call = self.call("release_lease", Some(id), Method::DELETE, &path);
        call.nonce = Some(nonce);
        match self.send(&call).await {
            // No lease is held any more: what releasing wanted (a retry after a lost
            // answer, or a lease that expired).
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(drop),
        }
    }
}
