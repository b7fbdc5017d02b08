//! HTTP/2 connections: closed when idle, kept while a stream is open, and WebSockets over
//! extended CONNECT (RFC 8441) bridged to the daemon's HTTP/1.1 upgrade.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

use crate::streams::tls_connect;
use crate::support::{Options, TestEnv};

/// The idle timeout these tests run with (`ROUTER_HEADER_READ_TIMEOUT_SECS`).
const IDLE_SECS: u64 = 1;
/// How long a test waits for the router to close a connection before it calls it a failure.
const CLOSE_BOUND: Duration = Duration::from_secs(30);

fn options() -> Options {
    Options { header_read_timeout_secs: IDLE_SECS, ..Options::default() }
}

/// An HTTP/2 connection to the router (ALPN `h2`); the task ends when the connection does.
async fn h2_connect(env: &TestEnv) -> (SendRequest<Empty<Bytes>>, JoinHandle<()>) {
    let tls = tls_connect(env, &[b"h2"]).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, closed)
}

fn request(env: &TestEnv, method: Method, path: &str, token: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("https://{}{path}", env.router.addr))
        .version(http::Version::HTTP_2)
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::new())
        .expect("request")
}

/// `GET /echo` on the connection, read to its end.
async fn echo(env: &TestEnv, sender: &mut SendRequest<Empty<Bytes>>, token: &str) {
    let response = sender.send_request(request(env, Method::GET, "/echo", token)).await;
    let response = response.expect("echo over HTTP/2");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("echo body");
}

async fn wait_closed(closed: JoinHandle<()>, why: &str) {
    tokio::time::timeout(CLOSE_BOUND, closed).await.expect(why).expect("connection task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed() {
    let Some(env) = TestEnv::start(options()).await else { return };
    let token = env.token(Uuid::new_v4());
    let (mut sender, closed) = h2_connect(&env).await;
    echo(&env, &mut sender, &token).await;

    // No stream is open any more: the router closes the connection after the idle timeout,
    // although the client answers every keep-alive ping.
    wait_closed(closed, "the idle HTTP/2 connection was never closed").await;
    assert!(sender.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_with_an_open_sse_stream_stays_open() {
    let Some(env) = TestEnv::start(options()).await else { return };
    let token = env.token(Uuid::new_v4());
    let (mut sender, closed) = h2_connect(&env).await;
    let response = sender.send_request(request(&env, Method::GET, "/events", &token)).await;
    let response = response.expect("SSE over HTTP/2");
    assert_eq!(response.status(), 200);
    let mut events = response.into_body();
    let first = events.frame().await.expect("an event").expect("event frame");
    assert_eq!(first.into_data().expect("data"), &b"event: say\ndata: hello\n\n"[..]);

    // Several idle timeouts pass with the stream open: its keep-alive comments keep coming,
    // and the connection still takes new requests (a closing one would refuse them).
    let until = Instant::now() + Duration::from_secs(4 * IDLE_SECS);
    while Instant::now() < until {
        let frame = events.frame().await.expect("the stream is still open").expect("frame");
        assert!(frame.is_data());
    }
    echo(&env, &mut sender, &token).await;
    assert!(!closed.is_finished(), "the connection was closed under an open stream");

    // Once the stream is gone, the connection is idle and closed.
    drop(events);
    wait_closed(closed, "the connection was not closed after its stream ended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http2_echoes_through_the_router() {
    let Some(env) = TestEnv::start(options()).await else { return };
    let token = env.token(Uuid::new_v4());
    let (mut sender, closed) = h2_connect(&env).await;
    // The router's SETTINGS, which allow extended CONNECT, arrive with its first answer.
    echo(&env, &mut sender, &token).await;

    let connect_to = |path: &str, token: &str| {
        let mut req = request(&env, Method::CONNECT, path, token);
        req.headers_mut().insert("sec-websocket-version", "13".parse().expect("value"));
        req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    let connect = |token: &str| connect_to("/ws", token);

    // Authenticated like any request: a bad token is refused and opens nothing, and so is
    // the session cookie from a foreign origin (WebSocket hijacking).
    let refused = sender.send_request(connect("not.a.jwt")).await.expect("refused CONNECT");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let mut hijack = connect("unused");
    hijack.headers_mut().remove("authorization");
    let cookie = crate::hygiene::session_cookie(&env, Uuid::new_v4());
    hijack.headers_mut().insert("cookie", cookie.parse().expect("cookie"));
    hijack.headers_mut().insert("origin", "https://evil.example".parse().expect("origin"));
    let refused = sender.send_request(hijack).await.expect("refused CONNECT");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // A daemon route that does not switch protocols opens no tunnel.
    let plain = sender.send_request(connect_to("/echo", &token)).await.expect("CONNECT /echo");
    assert_eq!(plain.status(), StatusCode::BAD_GATEWAY);
    let body = plain.into_body().collect().await.expect("502 body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("websocket_not_accepted"), "{body}");

    let mut response = sender.send_request(connect(&token)).await.expect("extended CONNECT");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let tunnel = hyper::upgrade::on(&mut response).await.expect("the CONNECT stream");
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(tunnel), Role::Client, None).await;

    socket.send(Message::text("hello over h2")).await.expect("send");
    assert_eq!(
        socket.next().await.expect("a reply").expect("reply"),
        Message::text("hello over h2")
    );
    // The open WebSocket is an open stream: idle timeouts pass without closing it.
    tokio::time::sleep(Duration::from_secs(3 * IDLE_SECS)).await;
    socket.send(Message::binary(vec![0u8, 1, 2, 255])).await.expect("send binary");
    let echoed = socket.next().await.expect("a reply").expect("reply");
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
    // Nor the connection: it still takes new requests.
    echo(&env, &mut sender, &token).await;
    assert!(!closed.is_finished(), "the connection was closed under an open WebSocket");
    socket.close(None).await.expect("close");
}
