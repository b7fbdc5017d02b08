//! A snapshot store that accepts connections and never answers fails `init` and
//! `snapshot push` within the configured bound, with an error naming the endpoint and the
//! call and not the credentials; so does one that hangs in the middle of a push.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use std::collections::BTreeMap;

use common::*;
use harness::s3::S3Server;

const SECRET: &str = "s3-secret-never-printed";
const BUCKET: &str = "matrix-snapshots";

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

/// Forwards to `upstream`, but a connection that starts a `PUT` gets no answer, ever: a
/// store that hangs in the middle of a push.
fn store_that_hangs_on_put(upstream: String) -> String {
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let server = TcpStream::connect(&upstream).unwrap();
            let (mut answers, mut back) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut answers, &mut back));
            std::thread::spawn(move || forward_until_put(client, server));
        }
    });
    format!("http://{addr}")
}

fn forward_until_put(mut client: TcpStream, mut server: TcpStream) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match client.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if buffer[..read].starts_with(b"PUT ") {
            // Hold both ends open and say nothing.
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        if server.write_all(&buffer[..read]).is_err() {
            return;
        }
    }
}

fn store_env(endpoint: &str, data: &std::path::Path) -> BTreeMap<String, String> {
    let mut env = base_env(data);
    for (name, value) in [
        ("S3_ENDPOINT", endpoint),
        ("S3_BUCKET", BUCKET),
        ("S3_REGION", "us-east-1"),
        ("S3_ACCESS_KEY_ID", "access"),
        ("S3_SECRET_ACCESS_KEY", SECRET),
        ("MATRIX_S3_TIMEOUT_SECS", "1"),
    ] {
        env.insert(name.into(), value.into());
    }
    env
}

#[test]
fn a_push_fails_when_the_store_hangs_on_the_upload() {
    let Some(server) = S3Server::start().unwrap() else { return };
    server.create_bucket(BUCKET).unwrap();
    let endpoint = store_that_hangs_on_put(server.endpoint());
    let data = tempfile::tempdir().unwrap();
    let mut env = store_env(&endpoint, data.path());
    for (name, value) in server.env(BUCKET) {
        if name != "S3_ENDPOINT" {
            env.insert(name.into(), value);
        }
    }
    run_ok(&["init"], &env); // Lists through the proxy: an empty store, a new volume.

    let output = run(&["snapshot", "push"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("S3 request put"), "should name the call: {stderr}");
    assert!(stderr.contains("got no answer within 4s"), "one part's bound: {stderr}");
    assert!(stderr.contains(&endpoint), "should name the endpoint: {stderr}");
}

#[test]
fn init_and_push_fail_when_the_store_never_answers() {
    let endpoint = silent_store();
    let data = tempfile::tempdir().unwrap();
    let offline = base_env(data.path());
    let env = store_env(&endpoint, data.path());

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
