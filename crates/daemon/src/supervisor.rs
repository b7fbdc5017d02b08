//! `matrixd dual`: run the API front door (`matrixd serve --front-door`) and the executor
//! (`matrixd executor`, which runs the intents and the snapshots) as two processes, restart
//! either when it crashes, and forward SIGTERM (or SIGINT) to both for a graceful drain. A
//! child that exits cleanly (the front door after `POST /shutdown`) stops the other and the
//! supervisor. A child that refuses its configuration (exit 64) would refuse it again: the
//! supervisor stops the other and exits 64 too.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

/// Pause before restarting a process that died, doubled at each crash in a row up to
/// [`MAX_RESTART_DELAY`], so a crash loop does not spin.
const RESTART_DELAY: Duration = Duration::from_millis(500);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A child that ran this long before it died is restarted after [`RESTART_DELAY`] again.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Tells a child which process supervises it, so it can tell it was orphaned at birth.
const SUPERVISOR_PID_ENV: &str = "MATRIX_SUPERVISOR_PID";
/// How long the children get to drain before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// The status a child exits with when its configuration is wrong.
const EXIT_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("starting {role}")]
    Spawn {
        role: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("finding this executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("installing a signal handler")]
    Signal(#[source] std::io::Error),
    #[error("the {role} refused its configuration (see its message above)")]
    ChildConfig { role: &'static str },
    #[error("the supervisor exited while this process started")]
    Orphaned,
}

struct Role {
    name: &'static str,
    args: &'static [&'static str],
    child: Child,
    started: Instant,
    /// Crashes in a row, each after less than [`STABLE_RUN`].
    crashes: u32,
}

impl Role {
    /// How long to wait before restarting this child after it died now.
    fn restart_delay(&mut self) -> Duration {
        if self.started.elapsed() >= STABLE_RUN {
            self.crashes = 0;
        }
        let delay = RESTART_DELAY.saturating_mul(1 << self.crashes.min(10));
        self.crashes += 1;
        delay.min(MAX_RESTART_DELAY)
    }
}

/// Supervises until SIGTERM or SIGINT; returns once both children have exited.
///
/// FIXME: the supervisor does not take the data directory's lock itself, only its executor
/// does: a second `matrixd dual` on a served volume starts a front door that links to the
/// first supervisor's executor, and the two front doors keep taking the link from each other.
pub async fn supervise() -> Result<(), SupervisorError> {
    let exe = std::env::current_exe().map_err(SupervisorError::CurrentExe)?;
    let mut roles = Vec::new();
    for (name, args) in
        [("front door", &["serve", "--front-door"][..]), ("executor", &["executor"][..])]
    {
        let child = spawn(&exe, name, args)?;
        roles.push(Role { name, args, child, started: Instant::now(), crashes: 0 });
    }
    tracing::info!("matrixd supervisor started");

    let mut terminate = signal(SignalKind::terminate()).map_err(SupervisorError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(SupervisorError::Signal)?;
    let mut outcome = Ok(());
    loop {
        let (front, executor) = roles.split_at_mut(1);
        let (index, status) = tokio::select! {
            status = front[0].child.wait() => (0, status),
            status = executor[0].child.wait() => (1, status),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        let role = &mut roles[index];
        // A clean exit is a drain that finished (`POST /shutdown`): stop the other one too.
        if status.as_ref().is_ok_and(|s| s.success()) {
            tracing::info!(role = role.name, "child finished draining; stopping");
            break;
        }
        if status.as_ref().is_ok_and(|s| s.code() == Some(EXIT_CONFIG)) {
            tracing::error!(role = role.name, "child refused its configuration; stopping");
            outcome = Err(SupervisorError::ChildConfig { role: role.name });
            break;
        }
        let delay = role.restart_delay();
        tracing::warn!(
            role = role.name,
            status = ?status,
            crashes_in_a_row = role.crashes,
            restart_in_ms = delay.as_millis() as u64,
            "child exited; restarting it",
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        role.child = spawn(&exe, role.name, role.args)?;
        role.started = Instant::now();
    }

    tracing::info!("matrixd supervisor stopping");
    for role in &roles {
        if let Some(pid) = role.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    for role in &mut roles {
        if tokio::time::timeout(STOP_GRACE, role.child.wait()).await.is_err() {
            tracing::warn!(role = role.name, "child did not drain in time; killing it");
            let _ = role.child.kill().await;
        }
    }
    outcome
}

/// Makes this process (a child of `matrixd dual`) receive SIGTERM, and so drain, when the
/// supervisor dies without stopping it (SIGKILL, out of memory): no child outlives it.
/// A supervisor that died before this call is no longer this process's parent: the child
/// then refuses to start.
pub fn stop_with_supervisor() -> Result<(), SupervisorError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .map_err(|errno| SupervisorError::Signal(errno.into()))?;
    let supervisor = std::env::var(SUPERVISOR_PID_ENV).ok().and_then(|p| p.parse::<i32>().ok());
    match supervisor {
        Some(pid) if nix::unistd::getppid().as_raw() != pid => Err(SupervisorError::Orphaned),
        _ => Ok(()),
    }
}

fn spawn(exe: &PathBuf, role: &'static str, args: &[&str]) -> Result<Child, SupervisorError> {
    Command::new(exe)
        .args(args)
        .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SupervisorError::Spawn { role, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn restarts_back_off_and_reset_after_a_stable_run() {
        let child = Command::new("true").spawn().unwrap();
        let mut role = Role { name: "test", args: &[], child, started: Instant::now(), crashes: 0 };
        let delays: Vec<_> = (0..9).map(|_| role.restart_delay().as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);

        role.started = Instant::now() - STABLE_RUN;
        assert_eq!(role.restart_delay(), RESTART_DELAY);
        let _ = role.child.wait().await;
    }
}
