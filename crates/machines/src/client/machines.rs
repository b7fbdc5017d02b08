//! Machine calls: create, read, list, update, start, stop, suspend, wait, delete.

use super::*;

impl FlyClient {
    /// Creates a machine (`POST /v1/apps/{app}/machines`).
    ///
    /// Safe to retry: see the module documentation for how a machine is never created twice.
    pub async fn create_machine(
        &self,
        request: &CreateMachineRequest,
    ) -> Result<Machine, FlyError> {
        let key = ulid::Ulid::new().to_string();
        let mut request = request.clone();
        request.config.metadata.insert(CREATE_KEY_METADATA.to_owned(), key.clone());
        let body = to_json("create_machine", &request)?;

        let mut retry = 0;
        loop {
            let call = self.call("create_machine", None, Method::POST, &["machines"]);
            let call = Call { body: Some(body.clone()), idempotence: Idempotence::Unsafe, ..call };
            let (error, unsent, retry_after) = match self.attempt(&call).await {
                Attempt::Done(bytes) => return decode(&call, &bytes),
                Attempt::Failed { error, unsent, retry_after } => (error, unsent, retry_after),
            };
            let retryable = unsent || error.is_transient();
            let Some(delay) =
                retryable.then(|| self.options.retry.delay(retry, retry_after)).flatten()
            else {
                return Err(error);
            };
            tracing::warn!(
                call = "create_machine",
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "Fly API call failed, retrying"
            );
            tokio::time::sleep(delay).await;
            retry += 1;

            // The failed attempt may have created the machine: look for it by its key.
            if !unsent {
                let filter = ListMachines::with_metadata(CREATE_KEY_METADATA, key.clone());
                let Ok(found) = self.list_machines(&filter).await else { return Err(error) };
                if let Some(machine) = found.into_iter().next() {
                    return Ok(machine);
                }
            }
        }
    }

    /// Reads a machine (`GET /v1/apps/{app}/machines/{id}`).
    pub async fn get_machine(&self, id: &str) -> Result<Machine, FlyError> {
        let call = self.call("get_machine", Some(id), Method::GET, &["machines", id]);
        self.json(call).await
    }

    /// Lists the app's machines, filtered by metadata, state and region.
    pub async fn list_machines(&self, filter: &ListMachines) -> Result<Vec<Machine>, FlyError> {
        let mut call = self.call("list_machines", None, Method::GET, &["machines"]);
        for (key, value) in &filter.metadata {
            call.query.push((format!("metadata.{key}"), value.clone()));
        }
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            call.query.push(("state".into(), states.join(",")));
        }
        if filter.include_deleted {
            call.query.push(("include_deleted".into(), "true".into()));
        }
        if let Some(region) = &filter.region {
            call.query.push(("region".into(), region.clone()));
        }
        self.json(call).await
    }

    /// Replaces a machine's whole config (`POST /v1/apps/{app}/machines/{id}`); the machine
    /// gets a new `instance_id`. Pass the lease nonce when the machine is leased.
    pub async fn update_machine(
        &self,
        id: &str,
        request: &UpdateMachineRequest,
        nonce: Option<&str>,
    ) -> Result<Machine, FlyError> {
        let mut call = self.call("update_machine", Some(id), Method::POST, &["machines", id]);
        call.body = Some(to_json("update_machine", request)?);
        call.nonce = nonce;
        if request.current_version.is_some() {
            call.idempotence = Idempotence::Unsafe;
        }
        self.json(call).await
    }

    /// Starts a stopped machine or resumes a suspended one. Fly answers 412 while the
    /// machine is `created`, `replacing`, `stopping` or `suspending`: see
    /// [`FlyError::is_precondition_failed`].
    pub async fn start_machine(
        &self,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<StartResponse, FlyError> {
        let mut call =
            self.call("start_machine", Some(id), Method::POST, &["machines", id, "start"]);
        call.nonce = nonce;
        let bytes = self.send(&call).await?;
        // Fly's spec says "no content" while its docs show a body: accept both.
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(StartResponse::default());
        }
        decode(&call, &bytes)
    }

    /// Stops a machine with the signal and grace period of `request` (Fly's default:
    /// SIGINT, then SIGKILL).
    pub async fn stop_machine(
        &self,
        id: &str,
        request: &StopRequest,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut call = self.call("stop_machine", Some(id), Method::POST, &["machines", id, "stop"]);
        call.body = Some(to_json("stop_machine", request)?);
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    /// Suspends a started machine (memory snapshot; `start` resumes it).
    pub async fn suspend_machine(&self, id: &str, nonce: Option<&str>) -> Result<(), FlyError> {
        let path = ["machines", id, "suspend"];
        let mut call = self.call("suspend_machine", Some(id), Method::POST, &path);
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    /// Destroys a machine; `force` kills it first when it is running.
    pub async fn delete_machine(
        &self,
        id: &str,
        force: bool,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut call = self.call("delete_machine", Some(id), Method::DELETE, &["machines", id]);
        if force {
            call.query.push(("force".into(), "true".into()));
        }
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }

    /// Waits until the machine reaches `state`, for up to `timeout` in total.
    ///
    /// Fly accepts at most 60 s per request and answers 408 when that runs out: the client
    /// asks again until `timeout` is spent, then returns [`FlyError::WaitTimeout`].
    /// `version` (the `instance_id`) is required by Fly when waiting for `stopped`.
    pub async fn wait_machine(
        &self,
        id: &str,
        state: WaitState,
        version: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitResponse, FlyError> {
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            // Fly counts whole seconds from 1 to 60.
            let slice = left.min(MAX_WAIT_SLICE).as_secs().max(1);
            let mut call =
                self.call("wait_machine", Some(id), Method::GET, &["machines", id, "wait"]);
            call.query.push(("state".into(), state.as_str().into()));
            call.query.push(("timeout".into(), slice.to_string()));
            if let Some(version) = version {
                call.query.push(("version".into(), version.into()));
            }
            call.timeout = self.options.timeout + Duration::from_secs(slice);

            match self.json::<WaitResponse>(call).await {
                Ok(reached) => return Ok(reached),
                Err(e) if e.status() == Some(StatusCode::REQUEST_TIMEOUT) => {
                    if started.elapsed() >= timeout {
                        return Err(FlyError::WaitTimeout {
                            machine: id.to_owned(),
                            state: state.as_str().to_owned(),
                            waited: started.elapsed(),
                        });
                    }
                    tracing::debug!(machine = id, state = %state, "wait slice ran out");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The machine's recent events, newest first.
    pub async fn list_events(&self, id: &str) -> Result<Vec<MachineEvent>, FlyError> {
        let path = ["machines", id, "events"];
        self.json(self.call("list_events", Some(id), Method::GET, &path)).await
    }

    /// Sets one metadata key (`POST .../metadata/{key}`, 204).
    pub async fn set_metadata(
        &self,
        id: &str,
        key: &str,
        value: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let path = ["machines", id, "metadata", key];
        let mut call = self.call("set_metadata", Some(id), Method::POST, &path);
        call.body = Some(serde_json::json!({ "value": value }));
        call.nonce = nonce;
        self.send(&call).await.map(drop)
    }
}
