//! Waking one machine: start (resume) it, wait for `started`, read its address again, then
//! poll the daemon's `/healthz` until it answers. One wake per machine at a time: concurrent
//! callers await the same [`SharedWake`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::StatusCode;
use machines::types::{Machine, MachineState, WaitState};
use machines::FlyError;

use super::Fleet;
use crate::error::ApiError;

pub type SharedWake = Shared<BoxFuture<'static, Result<SocketAddr, WakeError>>>;

/// Why a wake failed; cloned to every request that shared it.
#[derive(Clone, Debug)]
pub struct WakeError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Logged, never sent: the Fly client's error may name hosts and library internals.
    detail: Option<String>,
}

/// What a client reads when a Fly Machines API call failed (the detail is logged).
pub(crate) const FLY_FAILED: &str = "the machine service failed";

/// The code of a wake that found the machine destroyed.
const MACHINE_GONE: &str = "machine_gone";

impl From<WakeError> for ApiError {
    fn from(e: WakeError) -> Self {
        let err = ApiError::upstream(e.status, e.code, e.message);
        match e.detail {
            Some(detail) => err.with_detail(detail),
            None => err,
        }
    }
}

impl WakeError {
    /// The machine no longer exists: the user's record is stale.
    pub fn machine_gone(&self) -> bool {
        self.code == MACHINE_GONE
    }

    fn fly(e: &FlyError) -> Self {
        Self {
            status: StatusCode::BAD_GATEWAY,
            code: "fly_api_failed",
            message: FLY_FAILED.to_owned(),
            detail: Some(super::error_chain(e)),
        }
    }

    fn timeout(what: String) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            code: "wake_timeout",
            message: what,
            detail: None,
        }
    }

    fn machine(message: String) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "machine_unavailable",
            message,
            detail: None,
        }
    }
}

impl Fleet {
    /// Joins the running wake of `machine_id`, or starts one.
    pub(super) fn shared_wake(self: &Arc<Self>, machine_id: &str) -> SharedWake {
        let mut wakes = self.wakes.lock().expect("wakes lock");
        if let Some(running) = wakes.get(machine_id) {
            return running.clone();
        }
        // Spawned, so that the wake finishes even when the request that began it goes away.
        let fleet = self.clone();
        let id = machine_id.to_owned();
        let task = tokio::spawn(async move {
            let result = fleet.wake(&id).await;
            fleet.wakes.lock().expect("wakes lock").remove(&id);
            result
        });
        let shared = task
            .map(|joined| {
                joined.unwrap_or_else(|e| Err(WakeError::machine(format!("wake task failed: {e}"))))
            })
            .boxed()
            .shared();
        wakes.insert(machine_id.to_owned(), shared.clone());
        shared
    }

    async fn wake(&self, machine_id: &str) -> Result<SocketAddr, WakeError> {
        let started = Instant::now();
        let deadline = started + self.wake.wake_timeout;
        let result = self.wake_steps(machine_id, deadline).await;
        match &result {
            Ok(addr) => {
                self.activity.mark_ready(machine_id, *addr);
                self.metrics.wake(started.elapsed());
                tracing::debug!(
                    machine.id = machine_id,
                    took_ms = started.elapsed().as_millis() as u64,
                    "machine ready"
                );
            }
            Err(e) => {
                self.metrics.wake_failed();
                tracing::warn!(machine.id = machine_id, error = %e.message, "wake failed");
            }
        }
        result
    }

    async fn wake_steps(
        &self,
        machine_id: &str,
        deadline: Instant,
    ) -> Result<SocketAddr, WakeError> {
        let machine =
            self.fly.get_machine(machine_id).await.map_err(|e| gone_or_fly(machine_id, &e))?;
        check_usable(&machine)?;
        if machine.state != MachineState::Started {
            self.start_until_accepted(machine_id, deadline).await?;
        }

        let left = deadline.saturating_duration_since(Instant::now());
        match self.fly.wait_machine(machine_id, WaitState::Started, None, left).await {
            Ok(_) => {}
            Err(FlyError::WaitTimeout { .. }) => {
                return Err(WakeError::timeout(format!(
                    "machine {machine_id} did not start in time"
                )))
            }
            Err(e) => return Err(WakeError::fly(&e)),
        }

        // The private address can change across restarts: read it again.
        let machine = self.fly.get_machine(machine_id).await.map_err(|e| WakeError::fly(&e))?;
        check_usable(&machine)?;
        let addr = self.daemon_addr(&machine)?;
        self.wait_healthy(machine_id, addr).await?;
        Ok(addr)
    }

    /// `start`, retried while Fly answers 412 (`created`, `replacing`, `suspending`, ...) or
    /// 409 (a deploy holds the machine's lease).
    ///
    /// The router never takes or breaks a lease: the deploy that holds it is changing the
    /// machine, and the start goes in once it lets go (or the wake deadline passes: 504).
    async fn start_until_accepted(
        &self,
        machine_id: &str,
        deadline: Instant,
    ) -> Result<(), WakeError> {
        let mut pause = Duration::from_millis(50);
        loop {
            let refusal = match self.fly.start_machine(machine_id, None).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_precondition_failed() => {
                    tracing::debug!(
                        machine.id = machine_id,
                        error = %e,
                        "start refused for now; retrying",
                    );
                    "kept refusing to start"
                }
                Err(e) if e.is_conflict() => {
                    tracing::debug!(
                        machine.id = machine_id,
                        error = %e,
                        "machine leased by another; retrying",
                    );
                    "stayed leased by another (a deploy)"
                }
                Err(e) => return Err(WakeError::fly(&e)),
            };
            if Instant::now() + pause >= deadline {
                return Err(WakeError::timeout(format!("machine {machine_id} {refusal}")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));

            let machine = self.fly.get_machine(machine_id).await.map_err(|e| WakeError::fly(&e))?;
            check_usable(&machine)?;
            if machine.state == MachineState::Started {
                return Ok(());
            }
        }
    }

    fn daemon_addr(&self, machine: &Machine) -> Result<SocketAddr, WakeError> {
        let ip: IpAddr = machine.private_ip.parse().map_err(|_| {
            WakeError::machine(format!(
                "machine {} has no usable private address ({:?})",
                machine.id, machine.private_ip
            ))
        })?;
        Ok(SocketAddr::new(ip, self.daemon.port))
    }

    /// Polls `/healthz` until it answers 200, within the ready timeout.
    async fn wait_healthy(&self, machine_id: &str, addr: SocketAddr) -> Result<(), WakeError> {
        let deadline = Instant::now() + self.wake.ready_timeout;
        let url = format!("http://{addr}/healthz");
        let mut pause = Duration::from_millis(10);
        loop {
            let healthy = self.health.get(&url).send().await.is_ok_and(|r| r.status().is_success());
            if healthy {
                return Ok(());
            }
            if Instant::now() + pause >= deadline {
                return Err(WakeError::timeout(format!(
                    "the daemon on machine {machine_id} did not become healthy in time"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

fn gone_or_fly(machine_id: &str, e: &FlyError) -> WakeError {
    if !e.is_not_found() {
        return WakeError::fly(e);
    }
    WakeError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: MACHINE_GONE,
        message: format!("machine {machine_id} no longer exists; deprovision the user"),
        detail: None,
    }
}

/// A `failed` machine is reported with its last events; a destroyed one is gone.
fn check_usable(machine: &Machine) -> Result<(), WakeError> {
    match machine.state {
        MachineState::Failed => {
            let events: Vec<String> = machine
                .events
                .iter()
                .take(5)
                .map(|e| format!("{} {} ({})", e.kind, e.status, e.source))
                .collect();
            Err(WakeError::machine(format!(
                "machine {} failed; recent events: {}",
                machine.id,
                if events.is_empty() { "none".to_owned() } else { events.join(", ") }
            )))
        }
        MachineState::Destroyed | MachineState::Destroying => Err(WakeError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: MACHINE_GONE,
            message: format!(
                "machine {} was destroyed; deprovision the user to get a new one",
                machine.id
            ),
            detail: None,
        }),
        _ => Ok(()),
    }
}
