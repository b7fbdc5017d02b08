//! A local OpenAI-compatible model server: `POST /v1/chat/completions`, streaming (SSE) or
//! not. Its reply is a function of the request, so tests can assert it: the last user
//! message, prefixed with `echo: `, sent one word per chunk when streaming.
//!
//! It runs on a thread of its own (with its own tokio runtime), so sync and async callers
//! can both start it; it stops when the handle is dropped. `cargo xtask dev` uses it as the
//! model when no provider key is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

/// The prefix of every reply.
pub const REPLY_PREFIX: &str = "echo: ";

/// The reply the server gives to a conversation whose last user message is `message`.
pub fn expected_reply(message: &str) -> String {
    format!("{REPLY_PREFIX}{message}")
}

/// What the server saw, for assertions.
#[derive(Debug, Default)]
struct Seen {
    requests: usize,
    last_body: Option<Value>,
    last_headers: HeaderMap,
}

#[derive(Debug)]
struct Shared {
    seen: Mutex<Seen>,
    /// While `true`, accepted requests wait before answering (see [`ModelServer::hold`]).
    held: watch::Sender<bool>,
}

/// A running model server.
#[derive(Debug)]
pub struct ModelServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Keeps the server's answers waiting until dropped.
#[derive(Debug)]
pub struct Hold {
    shared: Arc<Shared>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.shared.held.send_replace(false);
    }
}

impl ModelServer {
    /// Starts the server on a free port of 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts the server on `addr` (port 0 picks a free one); `cargo xtask dev` gives a
    /// fixed loopback address.
    pub fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { seen: Mutex::default(), held: watch::Sender::new(false) });
        let (stop, stopped) = oneshot::channel();

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("model-server".into()).spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                tokio::select! {
                    () = accept_loop(listener, serving) => {}
                    _ = stopped => {}
                }
            });
        })?;
        Ok(Self { addr, shared, stop: Some(stop), thread: Some(thread) })
    }

    /// The base URL, ending in `/v1`, as OpenAI-compatible clients expect it.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// How many chat-completion requests arrived.
    pub fn request_count(&self) -> usize {
        self.seen().requests
    }

    /// The JSON body of the last request.
    pub fn last_body(&self) -> Option<Value> {
        self.seen().last_body.clone()
    }

    /// A header of the last request, e.g. `authorization`.
    pub fn last_header(&self, name: &str) -> Option<String> {
        let seen = self.seen();
        seen.last_headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }

    /// Makes requests wait (after being counted) until the returned guard is dropped;
    /// tests use it to keep a model call in flight.
    pub fn hold(&self) -> Hold {
        self.shared.held.send_replace(true);
        Hold { shared: Arc::clone(&self.shared) }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.shared.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.shared.held.send_replace(false);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(request, Arc::clone(&shared)));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    if request.method() != http::Method::POST || request.uri().path() != "/v1/chat/completions" {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": "not found"}}),
        ));
    }
    let headers = request.headers().clone();
    let Ok(collected) = request.into_body().collect().await else {
        return Ok(json_response(StatusCode::BAD_REQUEST, &json!({"error": {"message": "body"}})));
    };
    let Ok(body) = serde_json::from_slice::<Value>(&collected.to_bytes()) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "body is not JSON"}}),
        ));
    };

    // 1. Record the request, then wait while a test holds the server.
    {
        let mut seen = shared.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.requests += 1;
        seen.last_body = Some(body.clone());
        seen.last_headers = headers;
    }
    let mut held = shared.held.subscribe();
    let _ = held.wait_for(|held| !*held).await;

    // 2. Answer with the echo of the last user message.
    let reply = expected_reply(&last_user_message(&body));
    let model = body.get("model").and_then(Value::as_str).unwrap_or("local-echo").to_owned();
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        Ok(stream_response(&model, &reply))
    } else {
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-local",
                "object": "chat.completion",
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop"
                }]
            }),
        ))
    }
}

fn last_user_message(body: &Value) -> String {
    let messages = body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
    messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned()
}

/// One chunk per word (the space that follows a word belongs to it), then `[DONE]`.
fn stream_response(model: &str, reply: &str) -> Response<Body> {
    let mut events: Vec<String> = reply
        .split_inclusive(' ')
        .map(|piece| {
            let chunk = json!({
                "id": "chatcmpl-local",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
            });
            format!("data: {chunk}\n\n")
        })
        .collect();
    events.push("data: [DONE]\n\n".to_owned());
    let frames = events.into_iter().map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(e))));
    let body = StreamBody::new(futures_util::stream::iter(frames));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;

    fn post(server: &ModelServer, body: Value) -> (u16, String) {
        let url = format!("{}/chat/completions", server.base_url());
        ureq_post(&url, &body)
    }

    fn ureq_post(url: &str, body: &Value) -> (u16, String) {
        use std::io::{Read, Write};
        let url = url.strip_prefix("http://").unwrap();
        let (host, path) = url.split_once('/').unwrap();
        let payload = body.to_string();
        let mut stream = std::net::TcpStream::connect(host).unwrap();
        write!(
            stream,
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer k-123\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{payload}",
            payload.len()
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        (status, text)
    }

    #[test]
    fn streams_the_echo_of_the_last_user_message_word_by_word() {
        let server = ModelServer::start().unwrap();
        let body = json!({"model": "m", "stream": true, "messages": [
            {"role": "user", "content": "first"},
            {"role": "user", "content": "hello there"}
        ]});
        let (status, text) = post(&server, body);

        assert_eq!(status, 200);
        let pieces: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| {
                let v: Value = serde_json::from_str(d).unwrap();
                v["choices"][0]["delta"]["content"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(pieces, ["echo: ", "hello ", "there"]);
        assert!(text.contains("data: [DONE]"));
        assert_eq!(server.request_count(), 1);
        assert_eq!(server.last_header("authorization").as_deref(), Some("Bearer k-123"));
    }

    #[test]
    fn answers_without_streaming_when_asked() {
        let server = ModelServer::start().unwrap();
        let (status, text) =
            post(&server, json!({"messages": [{"role": "user", "content": "plain"}]}));
        assert_eq!(status, 200);
        assert!(text.contains(r#""content":"echo: plain""#), "{text}");
        assert_eq!(server.last_body().unwrap()["messages"][0]["content"], "plain");
    }
}
