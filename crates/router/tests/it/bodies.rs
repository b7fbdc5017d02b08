//! Request bodies that break the router's limits are answered with the router's own JSON
//! error instead of a 502.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::streams::tls_connect;
use crate::support::{Options, TestEnv};

const MAX_BODY: u64 = 4096;

/// Reads one HTTP/1.1 response until the server closes the connection or the JSON body is
/// complete, and returns its status code and body.
async fn read_response<S: AsyncReadExt + Unpin>(stream: &mut S) -> (u16, serde_json::Value) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(answer) = parse_response(&raw) {
            return answer;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_response(&raw)
        .unwrap_or_else(|| panic!("no complete response: {}", String::from_utf8_lossy(&raw)))
}

fn parse_response(raw: &[u8]) -> Option<(u16, serde_json::Value)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.get(9..12)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))?
        .trim()
        .parse()
        .ok()?;
    if body.len() < length {
        return None;
    }
    Some((status, serde_json::from_str(&body[..length]).ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_past_the_limit_is_answered_413() {
    let options = Options { max_body_bytes: MAX_BODY, ..Options::default() };
    let Some(env) = TestEnv::start(options).await else { return };
    let user = Uuid::new_v4();
    // Provision and wake first, so the oversized request meets a ready daemon.
    env.echo(user).await;

    // A body within the limit, without a declared length, goes through whole.
    let mut tls = tls_connect(&env, &[b"http/1.1"]).await;
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
        env.token(user)
    );
    let small = format!("{:x}\r\n{}\r\n0\r\n\r\n", 1000, "y".repeat(1000));
    tls.write_all(format!("{head}{small}").as_bytes()).await.expect("write");
    let (status, body) = read_response(&mut tls).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body_len"], 1000);

    // Three chunks of 2000 bytes pass the 4096-byte limit only in the third: nothing declares
    // the length, so the router can only find out while streaming.
    let mut tls = tls_connect(&env, &[b"http/1.1"]).await;
    let chunk = format!("{:x}\r\n{}\r\n", 2000, "x".repeat(2000));
    let request = format!("{head}{chunk}{chunk}{chunk}0\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let (status, body) = read_response(&mut tls).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "body_too_large", "{body}");
    assert_eq!(body["message"], format!("request bodies are limited to {MAX_BODY} bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_and_answered_408() {
    let options = Options { body_idle_timeout_secs: 1, ..Options::default() };
    let Some(env) = TestEnv::start(options).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;

    // The head declares 1000 bytes; 100 arrive, then the client goes quiet without closing.
    let mut tls = tls_connect(&env, &[b"http/1.1"]).await;
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1000\r\n\r\n{}",
        env.token(user),
        "z".repeat(100)
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let (status, body) = read_response(&mut tls).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"], "body_timeout", "{body}");

    // The router lets the connection go instead of waiting for the rest of the body.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is still open after the 408");
}
