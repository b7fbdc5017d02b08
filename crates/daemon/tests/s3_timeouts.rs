//! A snapshot store that accepts connections and never answers fails `init` and
//! `snapshot push` within the configured bound, with an error naming the endpoint and the
//! call and not the credentials.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::net::{TcpListener, TcpStream};

use common::*;

const SECRET: &str = "s3-secret-never-printed";

/// Accepts every connection and never reads or writes; holds them open for the test.
fn silent_store() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for stream in listener.incoming() {
            held.extend(stream.ok());
        }
    });
    format!("http://{addr}")
}

#[test]
fn init_and_push_fail_when_the_store_never_answers() {
    let endpoint = silent_store();
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    let offline = env.clone();
    for (name, value) in [
        ("S3_ENDPOINT", endpoint.as_str()),
        ("S3_BUCKET", "snapshots"),
        ("S3_REGION", "us-east-1"),
        ("S3_ACCESS_KEY_ID", "access"),
        ("S3_SECRET_ACCESS_KEY", SECRET),
        ("MATRIX_S3_TIMEOUT_SECS", "1"),
    ] {
        env.insert(name.into(), value.into());
    }

    for args in [&["init"][..], &["snapshot", "push"]] {
        if args == ["snapshot", "push"] {
            run_ok(&["init"], &offline); // A volume to push.
        }
        let output = run(args, &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("got no answer within 1s"), "{args:?}: {stderr}");
        assert!(stderr.contains(&endpoint), "{args:?} should name the endpoint: {stderr}");
        assert!(stderr.contains("S3 request list"), "{args:?} should name the call: {stderr}");
        assert!(!stderr.contains(SECRET), "{args:?} printed the secret: {stderr}");
    }
}
