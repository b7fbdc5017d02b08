//! `matrixd dual`: run the API front door (`matrixd serve --front-door`) and the executor
//! (`matrixd executor`, which runs the intents and the snapshots) as two processes, restart
//! either when it crashes, and forward SIGTERM (or SIGINT) to both for a graceful drain. A
//! child that exits cleanly (the front door after `POST /shutdown`) stops the other and the
//! supervisor. A child that refuses its configuration (exit 64) would refuse it again: the
//! supervisor stops the other and exits 64 too.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

/// Pause before restarting a process that died, so a crash loop does not spin.
/// FIXME: a child that fails at every start is restarted at this pace forever: no backoff.
const RESTART_DELAY: Duration = Duration::from_millis(500);
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
}

struct Role {
    name: &'static str,
    args: &'static [&'static str],
    child: Child,
}

/// Supervises until SIGTERM or SIGINT; returns once both children have exited.
pub async fn supervise() -> Result<(), SupervisorError> {
    let exe = std::env::current_exe().map_err(SupervisorError::CurrentExe)?;
    let mut roles = Vec::new();
    for (name, args) in
        [("front door", &["serve", "--front-door"][..]), ("executor", &["executor"][..])]
    {
        let child = spawn(&exe, name, args)?;
        roles.push(Role { name, args, child });
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
        tracing::warn!(role = role.name, status = ?status, "child exited; restarting it");
        tokio::time::sleep(RESTART_DELAY).await;
        role.child = spawn(&exe, role.name, role.args)?;
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
/// A supervisor that dies before this call leaves the child running; the window is the
/// child's first instructions.
pub fn stop_with_supervisor() -> Result<(), SupervisorError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .map_err(|errno| SupervisorError::Signal(errno.into()))
}

fn spawn(exe: &PathBuf, role: &'static str, args: &[&str]) -> Result<Child, SupervisorError> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SupervisorError::Spawn { role, source })
}
