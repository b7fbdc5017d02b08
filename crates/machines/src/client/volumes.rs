//! Volume calls: create, read, list, delete.

use super::*;

impl FlyClient {
    /// Creates a volume (200). Not retried after an ambiguous failure: see the module docs.
    pub async fn create_volume(&self, request: &CreateVolumeRequest) -> Result<Volume, FlyError> {
        let mut call = self.call("create_volume", None, Method::POST, &["volumes"]);
        call.body = Some(to_json("create_volume", request)?);
        call.idempotence = Idempotence::Unsafe;
        self.json(call).await
    }

    /// Reads a volume.
    pub async fn get_volume(&self, id: &str) -> Result<Volume, FlyError> {
        self.json(self.call("get_volume", Some(id), Method::GET, &["volumes", id])).await
    }

    /// Lists the app's volumes.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>, FlyError> {
        self.json(self.call("list_volumes", None, Method::GET, &["volumes"])).await
    }

    /// Destroys a volume; answers the volume in state `destroyed`.
    pub async fn delete_volume(&self, id: &str) -> Result<Volume, FlyError> {
        self.json(self.call("delete_volume", Some(id), Method::DELETE, &["volumes", id])).await
    }
}
