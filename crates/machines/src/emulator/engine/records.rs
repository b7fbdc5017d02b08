//! Reading machines, their events and their metadata.

use super::*;

impl Engine {
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

    pub fn events(&self, app: &str, id: &str, limit: usize) -> Result<Vec<MachineEvent>, ApiError> {
        let mut machine = self.get(app, id)?;
        machine.events.truncate(limit);
        Ok(machine.events)
    }

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
}
