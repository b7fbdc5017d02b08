//! The `fly-emulator` program: its one stdout line, its exit codes, its signal handling.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use machines::types::{CreateMachineRequest, MachineConfig, StopConfig, WaitState};
use machines::FlyClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BINARY: &str = env!("CARGO_BIN_EXE_fly-emulator");

/// A `sleep` with an argument no other process has, to find it in `/proc`.
const MARKER_SECONDS: &str = "86399";

fn processes_with(argument: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == argument.as_bytes()))
        .count()
}

/// Starts the emulator with `images` as its image map; returns it and its URL.
fn start_emulator(
    dir: &std::path::Path,
    images: serde_json::Value,
) -> (std::process::Child, String) {
    let map = dir.join("images.json");
    std::fs::write(&map, images.to_string()).expect("writing the image map");
    let mut child = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--image-map"])
        .arg(&map)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("FLY_API_TOKEN", "binary-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting fly-emulator");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    BufReader::new(stdout).read_line(&mut line).expect("the first line");
    let url = line
        .trim()
        .strip_prefix("fly-emulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, url)
}

#[test]
fn sigterm_kills_every_machine_process_and_exits_zero() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let images = serde_json::json!({"images": {"idle": {"command": ["sleep", MARKER_SECONDS]}}});
    let (mut child, url) = start_emulator(dir.path(), images);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let fly = FlyClient::new(&url, "binary-token", "app").unwrap();
        let config = MachineConfig { image: "idle".into(), ..Default::default() };
        let machine = fly
            .create_machine(&CreateMachineRequest { config, ..Default::default() })
            .await
            .unwrap();
        fly.wait_machine(&machine.id, WaitState::Started, None, Duration::from_secs(30))
            .await
            .unwrap();
    });
    assert_eq!(processes_with(MARKER_SECONDS), 1, "the machine runs as a process");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(0));
    assert_eq!(processes_with(MARKER_SECONDS), 0, "no machine process outlives the emulator");
}

#[test]
fn machines_get_their_stop_signal_and_time_to_drain_when_the_emulator_stops() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let drained = dir.path().join("drained");
    let ready = dir.path().join("ready");
    let script = format!(
        "trap 'sleep 0.5; echo drained > {}; exit 0' TERM; touch {}; \
         while true; do sleep 0.1; done",
        drained.display(),
        ready.display()
    );
    let images = serde_json::json!({"images": {"drainer": {"command": ["sh", "-c", script]}}});
    let (mut child, url) = start_emulator(dir.path(), images);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let fly = FlyClient::new(&url, "binary-token", "app").unwrap();
        let mut config = MachineConfig { image: "drainer".into(), ..Default::default() };
        config.stop_config =
            Some(StopConfig { signal: Some("SIGTERM".into()), timeout: Some("10s".into()) });
        let machine = fly
            .create_machine(&CreateMachineRequest { config, ..Default::default() })
            .await
            .unwrap();
        fly.wait_machine(&machine.id, WaitState::Started, None, Duration::from_secs(30))
            .await
            .unwrap();
    });
    // `started` comes as the process is spawned; the shell sets its trap a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "the machine's script never started");
        std::thread::sleep(Duration::from_millis(20));
    }

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let written = std::fs::read_to_string(&drained).unwrap_or_default();
    assert_eq!(written.trim(), "drained", "the machine drained before the emulator exited");
}

#[test]
fn a_missing_setting_exits_64_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str], token: Option<&str>, variable: &str| {
        let mut command = Command::new(BINARY);
        command.args(args).env_remove("FLY_API_TOKEN").current_dir(dir.path());
        for name in ["FLY_EMULATOR_IMAGE_MAP", "FLY_EMULATOR_STATE_DIR", "FLY_EMULATOR_LISTEN"] {
            command.env_remove(name);
        }
        if let Some(token) = token {
            command.env("FLY_API_TOKEN", token);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(variable), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty());
    };
    std::fs::write(dir.path().join("map.json"), "{\"images\": {}}").unwrap();
    std::fs::write(dir.path().join("bad.json"), "{\"images\": [").unwrap();

    check(&["--image-map", "map.json", "--state-dir", "s"], None, "FLY_API_TOKEN");
    check(&["--state-dir", "s"], Some("t"), "FLY_EMULATOR_IMAGE_MAP");
    check(&["--image-map", "map.json"], Some("t"), "FLY_EMULATOR_STATE_DIR");
    check(&["--image-map", "bad.json", "--state-dir", "s"], Some("t"), "FLY_EMULATOR_IMAGE_MAP");
    let public = ["--listen", "0.0.0.0:4280", "--image-map", "map.json", "--state-dir", "s"];
    check(&public, Some("t"), "FLY_EMULATOR_LISTEN");
}

#[test]
fn an_unusable_state_dir_exits_64_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    std::fs::write(&map, "{\"images\": {}}").unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("state.json"), "{\"apps\": [").unwrap();

    for state_dir in [&file, &corrupt] {
        let output = Command::new(BINARY)
            .args(["--listen", "127.0.0.1:0", "--image-map"])
            .arg(&map)
            .arg("--state-dir")
            .arg(state_dir)
            .env("FLY_API_TOKEN", "t")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{state_dir:?}: {stderr}");
        assert!(stderr.contains("FLY_EMULATOR_STATE_DIR"), "{state_dir:?}: {stderr}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn a_missing_token_is_not_said_to_have_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("map.json"), "{\"images\": {}}").unwrap();
    let output = Command::new(BINARY)
        .args(["--image-map", "map.json", "--state-dir", "s"])
        .env_remove("FLY_API_TOKEN")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("FLY_API_TOKEN"), "{stderr}");
    assert!(!stderr.contains("flag"), "FLY_API_TOKEN has no flag: {stderr}");
}
