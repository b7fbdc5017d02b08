//! Machine processes: spawning from the image map, signals to the process group, output.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// The signals a stop call may name (Fly's list).
const STOP_SIGNALS: &[&str] =
    &["SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM"];

/// Variables of the emulator's own environment a machine process inherits, so that the
/// mapped commands can be found (a Fly image brings its own PATH).
const INHERITED_ENV: &[&str] = &["PATH", "HOME"];

/// Everything needed to start one machine's process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub machine_id: String,
    pub app: String,
    pub region: String,
    pub image: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub command: Vec<String>,
    /// app_env, then config.env, then the image's env (later wins).
    pub env: BTreeMap<String, String>,
    /// Guest path (`/data`) to host directory.
    pub mounts: BTreeMap<String, PathBuf>,
}

impl Launch {
    /// Replaces `{private_ip}`, `{port}`, `{machine_id}`, `{app}` and `{mount:/path}`.
    pub fn substitute(&self, text: &str) -> Result<String, String> {
        let mut out = text
            .replace("{private_ip}", &self.address.to_string())
            .replace("{port}", &self.port.to_string())
            .replace("{machine_id}", &self.machine_id)
            .replace("{app}", &self.app);
        while let Some(start) = out.find("{mount:") {
            let Some(length) = out[start..].find('}') else { break };
            let guest = &out[start + "{mount:".len()..start + length];
            let Some(host) = self.mounts.get(guest) else {
                return Err(format!("no volume is mounted at {guest} for {text:?}"));
            };
            out.replace_range(start..=start + length, &host.display().to_string());
        }
        Ok(out)
    }

    /// Starts the process in its own process group, its output forwarded to stderr.
    pub fn spawn(&self) -> Result<Child, String> {
        let argv: Vec<String> =
            self.command.iter().map(|arg| self.substitute(arg)).collect::<Result<_, _>>()?;
        let Some((program, args)) = argv.split_first() else {
            return Err("the image map gives an empty command".into());
        };

        let mut command = Command::new(program);
        command.args(args).env_clear().process_group(0).kill_on_drop(false);
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        for (name, value) in &self.env {
            command.env(name, self.substitute(value)?);
        }
        command
            .env("FLY_MACHINE_ID", &self.machine_id)
            .env("FLY_APP_NAME", &self.app)
            .env("FLY_REGION", &self.region)
            .env("FLY_PRIVATE_IP", self.address.to_string())
            .env("FLY_IMAGE_REF", &self.image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        let mut child = command.spawn().map_err(|e| format!("starting {program:?}: {e}"))?;
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward(self.machine_id.clone(), stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward(self.machine_id.clone(), stderr));
        }
        Ok(child)
    }
}

/// Copies a process's output to the emulator's stderr, each line prefixed `[<machine id>]`.
async fn forward(machine_id: String, output: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(output);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                eprintln!("[{machine_id}] {}", text.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

/// Sends `signal` to a process group; a group that is already gone is not an error.
pub(crate) fn signal_group(group: i32, signal: Signal) {
    if let Err(e) = killpg(Pid::from_raw(group), signal) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(group, signal = %signal, error = %e, "signalling a machine process");
        }
    }
}

/// Parses a stop signal name (`SIGTERM`, or `TERM`), limited to the ones Fly accepts.
pub(crate) fn parse_stop_signal(name: &str) -> Option<Signal> {
    let name = name.trim().to_ascii_uppercase();
    let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
    if !STOP_SIGNALS.contains(&name.as_str()) {
        return None;
    }
    name.parse().ok()
}
