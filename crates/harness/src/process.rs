//! Child processes that never outlive their handle.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStderr, ChildStdout, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A child process that is killed (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    stop_signal: Signal,
}

impl ChildGuard {
    /// Spawns `command` in its own process group, so that stopping it stops its children.
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name} ({:?}): {e}", command.get_program()))?;
        Ok(Self { name: name.to_owned(), child: Some(child), stop_signal: Signal::SIGTERM })
    }

    /// Stops the process with `signal` instead of SIGTERM (PostgreSQL's fast shutdown is
    /// SIGINT, for example).
    pub fn with_stop_signal(mut self, signal: Signal) -> Self {
        self.stop_signal = signal;
        self
    }

    /// Takes the child's piped stdout and stderr, for callers that forward its output.
    pub fn take_output(&mut self) -> (Option<ChildStdout>, Option<ChildStderr>) {
        match self.child.as_mut() {
            Some(child) => (child.stdout.take(), child.stderr.take()),
            None => (None, None),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Fails when the process has already exited (a start-up failure).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else { anyhow::bail!("{} was stopped", self.name) };
        match child.try_wait()? {
            Some(status) => anyhow::bail!("{} exited at start-up: {status}", self.name),
            None => Ok(()),
        }
    }

    /// Sends the stop signal to the process group and waits up to `grace` before SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let group = Pid::from_raw(child.id() as i32);
        let _ = killpg(group, self.stop_signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                // The leader is gone; make sure nothing it started lingers.
                let _ = killpg(group, Signal::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// For programs that cannot be told to listen on port 0 and report the port back.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Waits until something accepts TCP connections on `addr`, or fails after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("nothing listened on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
