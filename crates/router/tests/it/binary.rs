//! The `matrix-router` binary: bad configuration stops it before anything is bound.

use std::process::Command;

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
