//! The HTTP API: routing, authentication, request bodies and JSON errors.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::{Config, Mode, Secret};
use crate::intent::{self, BeginError, Runner, Transcript};
use crate::journal::{Journal, JournalError};
use crate::layout::DataDir;
use crate::link::{ExecutorLink, Refusal, SubmitError};
use crate::model::{ModelClient, ModelError};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How much of a refused body is read and dropped before the 413 goes out (see
/// `discard_rest`): more than the router forwards by default.
const DISCARD_LIMIT_BYTES: usize = 32 << 20;
/// How long a refused body may take to be read and dropped.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The header the router sets to the user it routed for.
pub const USER_ID_HEADER: &str = "x-matrix-user-id";

pub type Body = BoxBody<Bytes, Infallible>;

/// Everything a request handler needs.
pub struct App {
    pub user_id: Uuid,
    token_digest: [u8; 32],
    pub data: DataDir,
    pub broker: Arc<Broker>,
    pub model: ModelClient,
    pub journal: Journal,
    pub mode: Mode,
    /// Where `/messages` intents run.
    pub work: Work,
    /// Set once shutdown began: new work is refused.
    draining: AtomicBool,
    transcript: Arc<Transcript>,
    /// Fires when `/shutdown` is called.
    shutdown: watch::Sender<bool>,
}

/// Where intents run.
pub enum Work {
    /// In this process (standalone mode).
    Local(Arc<Runner>),
    /// In the executor process, over the executor link (dual mode's front door).
    Remote(Arc<ExecutorLink>),
}

impl App {
    /// The app for `config`. With `executor_socket`, intents go to the executor behind it
    /// (the caller keeps the link up with [`ExecutorLink::maintain`]); without, they run here.
    pub fn new(
        config: &Config,
        token: &Secret,
        data: DataDir,
        journal: Journal,
        executor_socket: Option<PathBuf>,
    ) -> Arc<Self> {
        let broker = Broker::new();
        let model = ModelClient::new(&config.model);
        let transcript = Transcript::new(data.clone());
        let work = match executor_socket {
            Some(socket) => Work::Remote(ExecutorLink::new(socket, Arc::clone(&broker))),
            None => Work::Local(Runner::new(
                journal.clone(),
                model.clone(),
                Arc::clone(&transcript),
                broker.clone(),
            )),
        };
        Arc::new(Self {
            user_id: config.user_id,
            token_digest: Sha256::digest(token.expose().as_bytes()).into(),
            data,
            broker,
            model,
            journal,
            mode: config.mode,
            work,
            draining: AtomicBool::new(false),
            transcript,
            shutdown: watch::Sender::new(false),
        })
    }

    /// Resolves when `/shutdown` was called.
    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Refuses new work from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops the running intent, which records a `cancelled` envelope and then clears
    /// [`App::is_busy`]. Called once draining, so no new intent starts afterwards.
    pub fn cancel_running(&self) {
        match &self.work {
            Work::Local(runner) => runner.cancel(),
            Work::Remote(link) => link.cancel(),
        }
    }

    /// Whether a `/messages` intent is running.
    pub fn is_busy(&self) -> bool {
        match &self.work {
            Work::Local(runner) => runner.is_busy(),
            Work::Remote(link) => link.is_busy(),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Comparing digests keeps the comparison constant-time whatever the length.
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        !presented.is_empty() && bool::from(digest.ct_eq(&self.token_digest))
    }
}

/// Handles one request.
pub async fn handle(
    app: Arc<App>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = route(&app, request).await;
    let status = response.status();
    if status.is_server_error() {
        tracing::error!(
            http.method = %method,
            http.path = %path,
            http.status = status.as_u16(),
            "request failed",
        );
    } else {
        tracing::debug!(
            http.method = %method,
            http.path = %path,
            http.status = status.as_u16(),
            "request",
        );
    }
    Ok(response)
}

async fn route(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    if path == "/healthz" {
        return match method {
            Method::GET | Method::HEAD => healthz(app),
            _ => method_not_allowed(),
        };
    }

    if !app.authorized(request.headers()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required");
    }
    if let Some(claimed) = request.headers().get(USER_ID_HEADER) {
        let ours = claimed.to_str().ok().and_then(|v| Uuid::parse_str(v.trim()).ok());
        if ours != Some(app.user_id) {
            return error(StatusCode::FORBIDDEN, "wrong_user", "this daemon serves another user");
        }
    }

    match (method, path.as_str()) {
        (Method::POST, "/chat") => chat(app, request).await,
        (Method::GET, "/events") => events(app, request.headers()),
        (Method::POST, "/messages") => messages(app, request).await,
        (Method::GET, "/me") => me(app).await,
        (Method::POST, "/shutdown") => shutdown(app),
        (Method::GET, p) if p.starts_with("/intents/") => intent(app, &p["/intents/".len()..]),
        (_, "/chat" | "/events" | "/messages" | "/me" | "/shutdown") => method_not_allowed(),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

fn healthz(app: &App) -> Response<Body> {
    let mut body = json!({
        "status": if app.draining.load(Ordering::SeqCst) { "draining" } else { "ok" },
        "pid": std::process::id(),
        "busy": app.is_busy(),
        "broker": app.broker.stats(),
    });
    if let Work::Remote(link) = &app.work {
        let pid = link.executor_pid();
        body["executor"] = json!({ "link": if pid.is_some() { "up" } else { "down" }, "pid": pid });
    }
    json_response(StatusCode::OK, &body)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageRequest {
    message: String,
}

/// Checks what every unit of new work needs; `Err` is the response to send.
async fn accept_work(app: &App, request: Request<Incoming>) -> Result<String, Response<Body>> {
    let body: MessageRequest = read_json(request).await?;
    if body.message.trim().is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "invalid_request", "message must not be empty"));
    }
    if app.draining.load(Ordering::SeqCst) {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the daemon is shutting down",
        ));
    }
    if !app.model.is_configured() {
        let message = ModelError::NotConfigured.to_string();
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "model_not_configured", &message));
    }
    Ok(body.message)
}

async fn chat(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let message = match accept_work(app, request).await {
        Ok(message) => message,
        Err(response) => return response,
    };
    match intent::converse(&app.model, &app.transcript, app.broker.as_ref(), &message).await {
        Ok(reply) => json_response(StatusCode::OK, &json!({ "reply": reply })),
        Err(e) => model_error(&e),
    }
}

fn events(app: &App, headers: &HeaderMap) -> Response<Body> {
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let subscription = app.broker.subscribe(last_event_id);
    let stream = futures_util::stream::unfold(subscription, |mut sub| async move {
        let event = match sub.backlog.pop_front() {
            Some(event) => event,
            None => sub.live.recv().await?,
        };
        let frame = Frame::data(Bytes::from(event.to_sse()));
        Some((Ok::<_, Infallible>(frame), sub))
    });
    // A comment first, so clients see the stream open at once.
    let opening = futures_util::stream::once(async {
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b": connected\n\n")))
    });
    let body = StreamBody::new(futures_util::StreamExt::chain(opening, stream));
    let mut response = Response::new(BodyExt::boxed(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    response
}

async fn messages(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let message = match accept_work(app, request).await {
        Ok(message) => message,
        Err(response) => return response,
    };
    let busy = || error(StatusCode::CONFLICT, "busy", "another message is being worked on");
    let journal_failed =
        || error(StatusCode::INTERNAL_SERVER_ERROR, "journal", "could not record the intent");

    let intent_id = match &app.work {
        Work::Local(runner) => match runner.begin(&message) {
            Ok(started) => {
                let intent_id = started.id().to_owned();
                tokio::spawn(Arc::clone(runner).run(started));
                intent_id
            }
            Err(BeginError::Busy) => return busy(),
            Err(e @ BeginError::Journal(_)) => {
                let error = format!("{:#}", anyhow::Error::from(e));
                tracing::error!(error = %error, "could not start an intent");
                return journal_failed();
            }
        },
        Work::Remote(link) => {
            if !link.try_claim() {
                return busy();
            }
            match link.submit(message).await {
                Ok(intent_id) => intent_id,
                Err(e) => {
                    link.release();
                    return match e {
                        SubmitError::Refused(Refusal::Busy) => busy(),
                        SubmitError::Refused(Refusal::Journal) => journal_failed(),
                        SubmitError::Refused(Refusal::Draining) => error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "draining",
                            "the daemon is shutting down",
                        ),
                        SubmitError::Unavailable => error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "executor_unavailable",
                            "the executor is restarting; try again shortly",
                        ),
                    };
                }
            }
        }
    };
    json_response(StatusCode::ACCEPTED, &json!({ "intent_id": intent_id }))
}

fn intent(app: &App, id: &str) -> Response<Body> {
    match app.journal.read(id) {
        Ok(envelopes) => json_response(
            StatusCode::OK,
            &json!({
                "intent_id": id,
                "verified": true,
                "public_key": hex::encode(app.journal.public_key().to_bytes()),
                "envelopes": envelopes,
            }),
        ),
        Err(JournalError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, "not_found", "no such intent")
        }
        Err(e @ JournalError::Invalid { .. }) => {
            tracing::error!(intent = id, error = %e, "intent chain failed verification");
            error(StatusCode::INTERNAL_SERVER_ERROR, "intent_chain_invalid", &e.to_string())
        }
        Err(e) => {
            tracing::error!(intent = id, error = %e, "could not read an intent");
            error(StatusCode::INTERNAL_SERVER_ERROR, "journal", "could not read the intent")
        }
    }
}

async fn me(app: &App) -> Response<Body> {
    let settings: Value = tokio::fs::read(app.data.settings())
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| json!({}));
    json_response(
        StatusCode::OK,
        &json!({
            "user_id": app.user_id,
            "public_key": hex::encode(app.journal.public_key().to_bytes()),
            "version": env!("CARGO_PKG_VERSION"),
            "mode": match app.mode { Mode::Standalone => "standalone", Mode::Dual => "dual" },
            "settings": settings,
        }),
    )
}

fn shutdown(app: &App) -> Response<Body> {
    app.start_draining();
    app.shutdown.send_replace(true);
    json_response(StatusCode::ACCEPTED, &json!({ "status": "draining" }))
}

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, Response<Body>> {
    let too_large = || {
        let message = format!("the body is larger than {MAX_BODY_BYTES} bytes");
        error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &message)
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut body = request.into_body();
    if declared.is_some_and(|length| length > MAX_BODY_BYTES) {
        discard_rest(body).await;
        return Err(too_large());
    }

    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "could not read the body",
            ));
        };
        let Some(data) = frame.data_ref() else { continue };
        if bytes.len() + data.len() > MAX_BODY_BYTES {
            discard_rest(body).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(data);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()))
}

/// Reads and drops what is left of a refused body, within bounds, before the refusal is
/// sent. A peer still writing when the connection closes with unread data gets a reset that
/// can destroy the 413 in flight; the router, which streams bodies, would then report its
/// own 502 instead of the daemon's answer.
async fn discard_rest(mut body: Incoming) {
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > DISCARD_LIMIT_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
}

fn model_error(e: &ModelError) -> Response<Body> {
    match e {
        ModelError::NotConfigured => {
            error(StatusCode::SERVICE_UNAVAILABLE, "model_not_configured", &e.to_string())
        }
        _ => {
            tracing::warn!(error = %e, "model call failed");
            error(StatusCode::BAD_GATEWAY, "model_failed", &e.to_string())
        }
    }
}

fn method_not_allowed() -> Response<Body> {
    error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": code, "message": message }))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}
