//! Configuration errors of the real binary: each exits 64 (EX_USAGE) with a message naming
//! the variable to fix, before any work starts.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Output;

use common::*;

/// The uid the daemon runs as when the test is root, whom permissions do not stop.
const NOBODY: u32 = 65534;

/// Asserts `output` is a configuration error naming every one of `names`.
fn assert_config_error(output: &Output, names: &[&str], what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{what}: {stderr}");
    for name in names {
        assert!(stderr.contains(name), "{what}: {stderr:?} should name {name}");
    }
    assert!(!stderr.contains(TOKEN), "{what}: the token never appears");
}

#[test]
fn a_data_dir_that_is_a_regular_file_exits_64_for_every_command() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut env = base_env(file.path());
    env.insert("MATRIX_MODE".into(), "dual".into());
    for args in [&["init"][..], &["serve"], &["dual"], &["executor"], &["snapshot", "push"]] {
        let output = run(args, &env);
        assert_config_error(&output, &["MATRIX_DATA_DIR", "not a directory"], &format!("{args:?}"));
    }
}

#[test]
fn an_unwritable_data_dir_exits_64() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    let env = base_env(&data);

    for args in [&["init"][..], &["serve"]] {
        let mut command = command(args, &env);
        // Root writes anywhere; the daemon runs as nobody to meet the permission bits.
        if nix::unistd::geteuid().is_root() {
            command.uid(NOBODY).gid(NOBODY);
        }
        let output = command.output().unwrap();
        assert_config_error(&output, &["MATRIX_DATA_DIR", "not writable"], &format!("{args:?}"));
    }
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0, "nothing was written");
}

#[test]
fn snapshot_commands_without_s3_exit_64_naming_the_s3_variables() {
    let data = tempfile::tempdir().unwrap();
    let env = base_env(data.path());
    run_ok(&["init"], &env);
    let s3 = ["S3_ENDPOINT", "S3_BUCKET", "S3_REGION", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"];
    for action in ["push", "restore"] {
        let output = run(&["snapshot", action], &env);
        assert_config_error(&output, &s3, action);
    }
}

#[test]
fn dual_mode_without_a_token_exits_64_before_starting_children() {
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    env.remove("MATRIX_DAEMON_TOKEN");
    env.insert("MATRIX_MODE".into(), "dual".into());
    let output = run(&["dual"], &env);
    assert_config_error(&output, &["MATRIX_DAEMON_TOKEN"], "dual");
}

#[test]
fn a_data_dir_that_is_not_utf8_exits_64_instead_of_falling_back_to_the_default() {
    use std::os::unix::ffi::OsStrExt;
    let parent = tempfile::tempdir().unwrap();
    let mut env = base_env(parent.path());
    env.remove("MATRIX_DATA_DIR");
    let mut raw = parent.path().as_os_str().as_bytes().to_vec();
    raw.extend_from_slice(b"/data\xff");
    let output = command(&["init"], &env)
        .env("MATRIX_DATA_DIR", std::ffi::OsStr::from_bytes(&raw))
        .output()
        .unwrap();
    assert_config_error(&output, &["MATRIX_DATA_DIR", "UTF-8"], "init");
}

#[test]
fn an_s3_timeout_past_a_day_exits_64() {
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    for (name, value) in [
        ("S3_ENDPOINT", "http://127.0.0.1:9"),
        ("S3_BUCKET", "b"),
        ("S3_REGION", "r"),
        ("S3_ACCESS_KEY_ID", "a"),
        ("S3_SECRET_ACCESS_KEY", "s"),
        ("MATRIX_S3_TIMEOUT_SECS", "18446744073709551615"),
    ] {
        env.insert(name.into(), value.into());
    }
    let output = run(&["init"], &env);
    assert_config_error(&output, &["MATRIX_S3_TIMEOUT_SECS"], "init");
}

#[test]
fn root_refuses_a_data_dir_that_belongs_to_the_daemons_user() {
    if !nix::unistd::geteuid().is_root() {
        // CI runs as root (it installs packages); elsewhere this is said loudly.
        assert!(std::env::var_os("CI").is_none(), "this test needs root under CI");
        eprintln!("SKIPPED: only root can be refused here; the test runs as another user");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let env = base_env(data.path());
    run_ok(&["init"], &env);
    std::os::unix::fs::chown(data.path(), Some(NOBODY), Some(NOBODY)).unwrap();

    let output = run(&["snapshot", "push"], &env);

    assert_config_error(&output, &["MATRIX_DATA_DIR", "65534", "not as root"], "push as root");
}
