//! One request: route it to the router's own endpoints or through to the user's daemon.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::admin;
use crate::auth::{cors, Authenticator};
use crate::body::{full, json, RouterBody};
use crate::error::ApiError;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::proxy::{self, headers, Upstream};

/// The methods forwarded to a daemon, for `Allow` on a 405.
const PROXIED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Set on responses that waited for the machine to wake: the wait in milliseconds.
pub const WOKE_HEADER: &str = "x-matrix-woke-ms";

/// Shared by every connection.
pub struct AppState {
    pub auth: Authenticator,
    pub fleet: Arc<Fleet>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub wake_token: Option<String>,
    pub admin_token: Option<String>,
    pub metrics_token: Option<String>,
    pub max_body_bytes: u64,
}

/// Answers one request; every failure is an [`ApiError`] turned into a response here.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<RouterBody>, std::convert::Infallible> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::debug_span!(
        "request",
        request.id = %request_id,
        http.method = %req.method(),
        client.addr = %peer,
    );
    let origin = req.headers().get(header::ORIGIN).cloned();
    let result = route(&state, req, peer, &request_id).instrument(span).await;
    let mut response = result.unwrap_or_else(ApiError::into_response);
    cors::apply(state.auth.allowed_origins(), origin.as_ref(), response.headers_mut());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(headers::REQUEST_ID_HEADER, value);
    }
    state.metrics.request(response.status().as_u16());
    Ok(response)
}

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    request_id: &str,
) -> Result<Response<RouterBody>, ApiError> {
    proxy::check_host(&req)?;
    if cors::is_preflight(req.method(), req.headers()) {
        return Ok(cors::preflight(state.auth.allowed_origins(), req.headers()));
    }
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => Ok(ok_json(serde_json::json!({"ok": true}))),
        (&Method::GET, "/readyz") => readyz(state).await,
        (&Method::GET, "/metrics") => {
            if let Some(expected) = state.metrics_token.as_deref() {
                require_bearer(req.headers(), expected)?;
            }
            Ok(metrics(state))
        }
        (_, "/internal/wake") => internal_wake(state, req).await,
        (_, p) if p == "/admin/users" || p.starts_with("/admin/users/") => {
            admin::handle(state, req).await
        }
        // Before authentication: the route does not exist for anyone, and the machine is not
        // woken for it.
        (_, p) if proxy::internal::is_daemon_internal(p) => Err(ApiError::not_found()),
        // A tunnel (CONNECT) or a reflection of the request (TRACE) is nothing a daemon
        // serves; only a WebSocket's extended CONNECT goes through.
        (&Method::CONNECT | &Method::TRACE, _) if !headers::wants_websocket(&req) => {
            Err(ApiError::method_not_allowed(PROXIED_METHODS))
        }
        _ => proxy_to_daemon(state, req, peer, request_id).await,
    }
}

async fn proxy_to_daemon(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    request_id: &str,
) -> Result<Response<RouterBody>, ApiError> {
    // Authentication first: a refused request never reaches the fleet or a daemon.
    let user = state.auth.authenticate(req.headers()).await?;
    proxy::check_body_size(&req, state.max_body_bytes)?;
    let websocket = headers::wants_websocket(&req);

    let target = state.fleet.target(user.id).await?;
    let guard = state.fleet.activity(&target.machine_id);
    let token = state.fleet.daemon_token(user.id);
    let user_id = user.id.to_string();
    let forwarding = headers::Forwarding {
        client_ip: peer.ip(),
        request_id,
        user_id: &user_id,
        daemon_token: &token,
        websocket,
    };

    let result = state.upstream.forward(req, target.addr, forwarding, guard).await;
    let mut response = match result {
        Ok(response) => response,
        Err(mut e) => {
            // The daemon may have been suspended or moved behind the router's back.
            if matches!(
                e.status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ) {
                state.fleet.forget_ready(&target.machine_id);
            }
            // The log names the machine; the client's message stays as it is.
            let detail = e.detail.take().unwrap_or_else(|| e.message.clone());
            e.detail = Some(format!("machine {}: {detail}", target.machine_id));
            return Err(e);
        }
    };
    if let Some(waited) = target.waited {
        response.headers_mut().insert(WOKE_HEADER, HeaderValue::from(waited.as_millis() as u64));
    }
    Ok(response)
}

async fn readyz(state: &AppState) -> Result<Response<RouterBody>, ApiError> {
    match state.fleet.store().ping().await {
        Ok(()) => Ok(ok_json(serde_json::json!({"ok": true}))),
        Err(e) => Err(ApiError::upstream(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unreachable",
            "the database is unreachable",
        )
        .with_detail(crate::fleet::error_chain(&e))),
    }
}

fn metrics(state: &AppState) -> Response<RouterBody> {
    let mut response = Response::new(full(state.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `POST /internal/wake {"user_id": ...}` for the scheduler: provision if needed, wake, and
/// answer once the daemon is ready.
async fn internal_wake(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, ApiError> {
    let Some(expected) = state.wake_token.as_deref() else { return Err(ApiError::not_found()) };
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    require_bearer(req.headers(), expected)?;

    #[derive(serde::Deserialize)]
    struct WakeRequest {
        user_id: uuid::Uuid,
    }
    let body: WakeRequest = read_json(req, 4 * 1024).await?;
    let target = state.fleet.target(body.user_id).await?;
    // A wake counts as activity, so the idle timer starts now.
    drop(state.fleet.activity(&target.machine_id));
    Ok(ok_json(serde_json::json!({
        "machine_id": target.machine_id,
        "woke": target.waited.is_some(),
        "waited_ms": target.waited.map(|d| d.as_millis() as u64),
    })))
}

/// 401 unless `Authorization: Bearer <expected>`, compared in constant time.
pub fn require_bearer(headers: &http::HeaderMap, expected: &str) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare digests, so the comparison time does not depend on the lengths either.
    let digest = |s: &str| <sha2::Sha256 as sha2::Digest>::digest(s.as_bytes());
    if bool::from(digest(given).ct_eq(&digest(expected))) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid bearer token"))
    }
}

/// Reads a small JSON body, refusing more than `limit` bytes.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, ApiError> {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), limit);
    let read = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
    let bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            return Err(ApiError::client(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is limited to {limit} bytes"),
            ))
        }
        Err(_) => {
            return Err(ApiError::client(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive in time",
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::client(StatusCode::BAD_REQUEST, "bad_json", "the body is not the expected JSON")
            .with_detail(e.to_string())
    })
}

pub fn ok_json(value: serde_json::Value) -> Response<RouterBody> {
    let mut response = Response::new(json(&value));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
