//! One writer per data directory: a second `matrixd serve` waits for the first, and the
//! snapshot commands refuse to run under a live daemon.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

const WAITING: &str = "waiting for the other process holding the data directory";

#[test]
fn a_second_serve_waits_for_the_first_to_exit_then_serves() {
    let data = tempfile::tempdir().unwrap();
    let env = base_env(data.path());
    run_ok(&["init"], &env);
    let mut first = Daemon::start(&env);

    let mut second =
        command(&["serve"], &env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(second.stderr.take().unwrap()).lines();
    let waiting = stderr.by_ref().map(Result::unwrap).find(|line| line.contains(WAITING));
    assert!(waiting.is_some(), "the second daemon never said it waits");
    std::thread::spawn(move || for _ in stderr {});

    let response = ureq::post(&format!("{}/shutdown", first.url))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(first.wait_exit().success());

    // Only now does the second one start serving.
    let mut stdout = BufReader::new(second.stdout.take().unwrap()).lines();
    let line = stdout.next().unwrap().unwrap();
    let url = line.strip_prefix("matrixd listening on ").expect(&line).to_owned();
    let health = ureq::get(&format!("{url}/healthz")).call().unwrap();
    assert_eq!(health.status(), 200);
    let _ = second.kill();
    let _ = second.wait();
}

#[test]
fn snapshot_commands_refuse_a_data_directory_a_daemon_holds() {
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    run_ok(&["init"], &env);
    let _daemon = Daemon::start(&env);

    // Never contacted: the lock is checked before any S3 call.
    let closed = harness::process::free_port();
    for (name, value) in [
        ("S3_ENDPOINT", format!("http://127.0.0.1:{closed}")),
        ("S3_BUCKET", "snapshots".into()),
        ("S3_REGION", "us-east-1".into()),
        ("S3_ACCESS_KEY_ID", "access".into()),
        ("S3_SECRET_ACCESS_KEY", "secret".into()),
    ] {
        env.insert(name.into(), value);
    }
    for action in ["push", "restore"] {
        let output = run(&["snapshot", action], &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "snapshot {action}: {stderr}");
        assert!(
            stderr.contains("another matrixd process holds the data directory"),
            "snapshot {action}: {stderr}"
        );
    }
}
