//! The `matrix-router` binary: bad configuration stops it before anything is bound, and its
//! logs are plain text when they do not go to a terminal.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{Options, TestEnv};

/// Runs the binary with only `vars` in its environment.
fn run(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let binary = harness::tools::workspace_binary("matrix-router");
    let output = Command::new(binary).env_clear().envs(vars.iter().copied()).output().expect("run");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("ROUTER_TLS_CERT is not set"), "{stderr}");

    let (code, stderr) = run(&[("ROUTER_DEV_MODE", "true"), ("SUPABASE_URL", "not a url")]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("SUPABASE_URL is malformed"), "{stderr}");

    let secret = "a-secret-that-is-too-short";
    let (code, stderr) = run(&[
        ("ROUTER_DEV_MODE", "true"),
        ("SUPABASE_URL", "https://abcd.supabase.co"),
        ("DATABASE_URL", "postgres://127.0.0.1:1/matrix"),
        ("FLY_API_TOKEN", "token"),
        ("FLY_APP_NAME", "app"),
        ("FLY_REGION", "ams"),
        ("ROUTER_DAEMON_IMAGE", "image"),
        ("ROUTER_DAEMON_TOKEN_SECRET", secret),
    ]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("ROUTER_DAEMON_TOKEN_SECRET is malformed"), "{stderr}");
    assert!(!stderr.contains(secret), "the secret is printed: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_logs_carry_no_colour_codes() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let binary = harness::tools::workspace_binary("matrix-router");
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .envs(&env.vars)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn matrix-router");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();

    let mut logged = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            let started = line.contains("matrix-router started");
            logged.push(line);
            if started {
                return;
            }
        }
    })
    .await;
    child.kill().await.expect("stop matrix-router");

    assert!(read.is_ok(), "no start line within 30 s; logged: {logged:?}");
    assert!(logged.iter().any(|l| l.contains("matrix-router started")), "{logged:?}");
    assert!(logged.iter().all(|l| !l.contains('\x1b')), "colour codes in piped logs: {logged:?}");
}
