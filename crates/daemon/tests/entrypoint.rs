//! `deploy/daemon/entrypoint.sh`, run with bash as the machine runs it.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

fn script() -> PathBuf {
    harness::tools::workspace_root().join("deploy/daemon/entrypoint.sh")
}

/// PATH with matrixd's directory first, then the system's.
fn path_with_matrixd() -> String {
    format!("{}:/usr/local/bin:/usr/bin:/bin", matrixd().parent().unwrap().display())
}

fn entrypoint(env: &BTreeMap<String, String>, path: &str) -> Command {
    let mut command = Command::new("bash");
    command.arg(script()).env_clear().envs(env).env("PATH", path);
    command
}

fn run_entrypoint(env: &BTreeMap<String, String>, path: &str) -> Output {
    entrypoint(env, path).output().unwrap()
}

/// Runs the entrypoint until the daemon listens, asks it to shut down, and waits.
fn boot_and_shut_down(env: &BTreeMap<String, String>) {
    let mut child = entrypoint(env, &path_with_matrixd()).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next().unwrap().unwrap();
    let url = line.strip_prefix("matrixd listening on ").expect(&line).to_owned();

    let response = ureq::post(&format!("{url}/shutdown"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    assert_eq!(response.status(), 202);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn running_it_twice_gives_the_same_volume() {
    let data = tempfile::tempdir().unwrap();
    let env = base_env(data.path());

    boot_and_shut_down(&env);
    let first = tree_hash(data.path());
    assert!(data.path().join("cortex/identity.key").is_file());
    assert!(data.path().join("workspace").is_dir());
    assert!(data.path().join("state.json").is_file());

    boot_and_shut_down(&env);
    assert_eq!(tree_hash(data.path()), first);
}

#[test]
fn a_missing_required_variable_is_named() {
    let data = tempfile::tempdir().unwrap();
    for name in ["MATRIX_USER_ID", "MATRIX_DAEMON_TOKEN"] {
        let mut env = base_env(data.path());
        env.remove(name);
        let output = run_entrypoint(&env, &path_with_matrixd());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(name), "{stderr}");
    }
    assert!(!data.path().join("cortex").exists(), "nothing was laid out");
}

#[test]
fn failures_say_which_step_failed() {
    let data = tempfile::tempdir().unwrap();
    let env = base_env(data.path());
    let output = run_entrypoint(&env, "/usr/bin:/bin");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(127), "{stderr}");
    assert!(stderr.contains("matrixd is not on PATH"), "{stderr}");

    let mut env = base_env(data.path());
    env.insert("S3_BUCKET".into(), "only-a-bucket".into());
    let output = run_entrypoint(&env, &path_with_matrixd());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("step 2 (matrixd init)") && stderr.contains("S3_ENDPOINT"), "{stderr}");
}

#[test]
fn the_script_is_shellcheck_clean() {
    let Some(shellcheck) =
        harness::tools::require("shellcheck", "install it with `apt-get install shellcheck`")
    else {
        return;
    };
    let output = Command::new(shellcheck).arg(script()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn init_twice_leaves_the_same_tree_byte_for_byte() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let env = base_env(data.path());

    let out = run_ok(&["init"], &env);
    assert!(out.contains("ready at generation 0"), "{out}");
    let first = tree_hash(data.path());
    run_ok(&["init"], &env);

    assert_eq!(tree_hash(data.path()), first);
    for dir in ["cortex/journal", "workspace"] {
        assert!(data.path().join(dir).is_dir(), "{dir}");
    }
    let key = std::fs::metadata(data.path().join("cortex/identity.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600, "the identity key is private");
}
