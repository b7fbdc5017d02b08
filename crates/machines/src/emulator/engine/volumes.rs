//! Volumes: directories under the state directory.

use super::*;

impl Engine {
    pub fn create_volume(
        &self,
        app: &str,
        request: CreateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        if request.name.is_empty() {
            return Err(ApiError::invalid_argument("volume name is required"));
        }
        let id = format!("vol_{}", random_hex(16));
        let directory = self.state_dir.volume_dir(&id);
        std::fs::create_dir_all(&directory)
            .map_err(|e| ApiError::internal(format!("creating the volume directory: {e}")))?;
        let volume = Volume {
            id: id.clone(),
            name: request.name,
            state: "created".to_owned(),
            size_gb: request.size_gb.unwrap_or(3),
            region: request.region.unwrap_or_else(|| self.region.clone()),
            zone: "emu0".to_owned(),
            encrypted: request.encrypted.unwrap_or(true),
            attached_machine_id: None,
            created_at: now_rfc3339(),
            extra: serde_json::Map::from_iter([("fstype".to_owned(), json!("ext4"))]),
        };
        let mut inner = lock(&self.inner);
        inner.app(app).volumes.insert(id, volume.clone());
        self.commit(&inner);
        Ok(volume)
    }

    pub fn get_volume(&self, app: &str, id: &str) -> Result<Volume, ApiError> {
        let mut inner = lock(&self.inner);
        let volume = inner.app(app).volumes.get(id).cloned();
        volume.ok_or_else(|| ApiError::not_found("volume not found"))
    }

    pub fn list_volumes(&self, app: &str) -> Vec<Volume> {
        let mut inner = lock(&self.inner);
        inner.app(app).volumes.values().cloned().collect()
    }

    pub fn delete_volume(&self, app: &str, id: &str) -> Result<Volume, ApiError> {
        let mut inner = lock(&self.inner);
        let volumes = &mut inner.app(app).volumes;
        let Some(volume) = volumes.get(id) else {
            return Err(ApiError::not_found("volume not found"));
        };
        if let Some(machine) = &volume.attached_machine_id {
            return Err(ApiError::failed_precondition(format!(
                "volume {id} is attached to machine {machine}"
            )));
        }
        let Some(mut volume) = volumes.remove(id) else {
            return Err(ApiError::not_found("volume not found"));
        };
        volume.state = "destroyed".to_owned();
        let directory = self.state_dir.volume_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&directory) {
            tracing::warn!(volume = id, error = %e, "removing a destroyed volume's files");
        }
        self.commit(&inner);
        Ok(volume)
    }
}
