//! Shared test support: running `matrixd`, hashing trees, talking HTTP.

#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub const USER: &str = "0b7c9a52-3f7e-4f59-8d2b-5a1e2c3d4e5f";
pub const OTHER_USER: &str = "9d1e6f40-2a3b-4c5d-8e9f-0a1b2c3d4e5f";
pub const TOKEN: &str = "daemon-token-for-tests";

pub fn matrixd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_matrixd"))
}

/// The environment of a daemon of [`USER`] on `data`, without S3 or a model.
pub fn base_env(data: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("MATRIX_DATA_DIR".into(), data.display().to_string());
    env.insert("MATRIX_USER_ID".into(), USER.into());
    env.insert("MATRIX_DAEMON_TOKEN".into(), TOKEN.into());
    env.insert("MATRIX_LISTEN_ADDR".into(), "127.0.0.1:0".into());
    env.insert("RUST_LOG".into(), "warn,matrixd=debug".into());
    env
}

/// A command for `matrixd` with exactly `env` (plus PATH), nothing inherited.
pub fn command(args: &[&str], env: &BTreeMap<String, String>) -> Command {
    let mut command = Command::new(matrixd());
    command.args(args).env_clear().envs(env);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}

/// Runs `matrixd args` to completion.
pub fn run(args: &[&str], env: &BTreeMap<String, String>) -> Output {
    command(args, env).output().expect("running matrixd")
}

/// Runs `matrixd args` and fails the test unless it succeeds.
pub fn run_ok(args: &[&str], env: &BTreeMap<String, String>) -> String {
    let output = run(args, env);
    assert!(
        output.status.success(),
        "matrixd {args:?} failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A running `matrixd serve`; killed when dropped.
pub struct Daemon {
    pub url: String,
    pub child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `matrixd args` and waits for its "listening" line.
    pub fn start_with(args: &[&str], env: &BTreeMap<String, String>) -> Self {
        let mut command = command(args, env);
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = command.spawn().expect("spawning matrixd");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().expect("matrixd printed nothing").expect("reading stdout");
        let url = line
            .strip_prefix("matrixd listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        // Keep reading so the daemon never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { url, child }
    }

    pub fn start(env: &BTreeMap<String, String>) -> Self {
        Self::start_with(&["serve"], env)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits up to 60 s for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..3000 {
            if let Some(status) = self.child.try_wait().expect("waiting for matrixd") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("matrixd did not exit");
    }
}

/// A digest of every path, kind, mode, content and link target under `root` (hidden entries
/// included).
pub fn tree_hash(root: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mut hasher = Sha256::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.expect("walking the tree");
        let relative = entry.path().strip_prefix(root).expect("under root");
        let metadata = entry.path().symlink_metadata().expect("metadata");
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update(format!(" {:o} ", metadata.permissions().mode()).as_bytes());
        if metadata.is_file() {
            hasher.update(std::fs::read(entry.path()).expect("reading a file"));
        }
        if metadata.is_symlink() {
            let target = std::fs::read_link(entry.path()).expect("reading a link");
            hasher.update(b"-> ");
            hasher.update(target.as_os_str().as_encoded_bytes());
        }
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// A digest of just `cortex/` and `workspace/` (what a snapshot carries).
pub fn snapshot_tree_hash(root: &Path) -> String {
    let mut hasher = Sha256::new();
    for dir in ["cortex", "workspace"] {
        hasher.update(dir.as_bytes());
        hasher.update(tree_hash(&root.join(dir)).as_bytes());
    }
    hex::encode(hasher.finalize())
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("HTTP client")
}

/// Polls `check` every 20 ms until it is true; fails after 20 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sse {
    pub id: u64,
    pub event: String,
    pub data: serde_json::Value,
}

/// Reads events from an open `/events` response until `done` says so (10 s at most per chunk).
pub async fn read_events_until(
    response: &mut reqwest::Response,
    buffer: &mut String,
    mut done: impl FnMut(&[Sse]) -> bool,
) -> Vec<Sse> {
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = Sse { id: 0, event: String::new(), data: serde_json::Value::Null };
            for line in block.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    event.id = id.parse().expect("numeric id");
                } else if let Some(kind) = line.strip_prefix("event: ") {
                    event.event = kind.to_owned();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data = serde_json::from_str(data).expect("JSON data");
                }
            }
            if event.id > 0 {
                events.push(event);
            }
        }
        if done(&events) {
            return events;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .expect("reading the stream")
            .expect("the stream stays open");
        buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
}

/// Reads exactly `count` events.
pub async fn read_events(response: &mut reqwest::Response, count: usize) -> Vec<Sse> {
    let mut buffer = String::new();
    read_events_until(response, &mut buffer, |events| events.len() >= count).await
}
