//! A small stand-in for `matrixd`, run by the Fly Machines emulator as a machine's image.
//!
//! It keeps the daemon's contract where the router depends on it: `/healthz` answers 200 JSON
//! without auth, every other route needs `Authorization: Bearer $MATRIX_DAEMON_TOKEN`. On top of
//! that it serves what the router's tests need to observe:
//!
//! - `GET /events`: a Server-Sent Events stream whose first event is written at once, then a
//!   comment every second, open until the client goes away;
//! - `GET /ws`: a WebSocket that echoes every text and binary message;
//! - any other path: a JSON echo of the request (method, path, headers) together with the
//!   machine id, user id and a digest of the token this process was started with;
//! - `GET /_upstream/stats` (no auth): how many requests reached an authenticated route;
//! - `POST /busy?on=true|false`: what `/healthz` reports as `busy`, as the daemon does while
//!   it runs an intent;
//! - `GET /drop`: closes the connection without an answer, as a daemon that crashed would.
//!
//! Environment: `MATRIX_LISTEN_ADDR` (or `FLY_PRIVATE_IP` with `PORT`, default 8080),
//! `MATRIX_DAEMON_TOKEN`, `MATRIX_USER_ID`, `FLY_MACHINE_ID`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, Infallible>;

struct Upstream {
    token: String,
    user_id: String,
    machine_id: String,
    served: AtomicU64,
    busy: AtomicBool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = listen_addr()?;
    let upstream = Arc::new(Upstream {
        token: std::env::var("MATRIX_DAEMON_TOKEN").unwrap_or_default(),
        user_id: std::env::var("MATRIX_USER_ID").unwrap_or_default(),
        machine_id: std::env::var("FLY_MACHINE_ID").unwrap_or_default(),
        served: AtomicU64::new(0),
        busy: AtomicBool::new(false),
    });

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("test-upstream listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(upstream.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}

fn listen_addr() -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = std::env::var("MATRIX_LISTEN_ADDR") {
        return Ok(addr.parse()?);
    }
    let ip = std::env::var("FLY_PRIVATE_IP").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    Ok(SocketAddr::new(ip.parse()?, port.parse()?))
}

/// An error makes hyper close the connection without an answer.
async fn handle(
    up: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        let busy = up.busy.load(Ordering::SeqCst);
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({"ok": true, "machine_id": up.machine_id, "busy": busy}),
        ));
    }
    if path == "/_upstream/stats" {
        let served = up.served.load(Ordering::SeqCst);
        return Ok(json(StatusCode::OK, serde_json::json!({ "served": served })));
    }

    let expected = format!("Bearer {}", up.token);
    let authorized = req.headers().get(header::AUTHORIZATION).is_some_and(|v| v == &expected[..]);
    if up.token.is_empty() || !authorized {
        return Ok(json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": "unauthorized"})));
    }
    up.served.fetch_add(1, Ordering::SeqCst);

    Ok(match path.as_str() {
        "/events" => events(),
        "/ws" => websocket(req),
        "/drop" => return Err(std::io::Error::other("dropped on request")),
        "/busy" => {
            let on = req.uri().query() == Some("on=true");
            up.busy.store(on, Ordering::SeqCst);
            json(StatusCode::OK, serde_json::json!({ "busy": on }))
        }
        _ => echo(&up, req).await,
    })
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("static response")
}

async fn echo(up: &Upstream, req: Request<Incoming>) -> Response<Body> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers() {
        headers.push((name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()));
    }
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    json(
        StatusCode::OK,
        serde_json::json!({
            "machine_id": up.machine_id,
            "user_id": up.user_id,
            "method": method,
            "path": path,
            "headers": headers,
            "body_len": body.len(),
        }),
    )
}

fn events() -> Response<Body> {
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"event: say\ndata: hello\n\n")))
    });
    let beats = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))), ()))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(StreamBody::new(first.chain(beats))))
        .expect("static response")
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": "not a websocket"}));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_text() || message.is_binary() {
                if ws.send(message).await.is_err() {
                    break;
                }
            } else if message.is_close() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()).boxed())
        .expect("static response")
}
