//! Forwarding one request to a daemon and streaming the answer back.
//!
//! Bodies stream both ways without buffering or compression. WebSockets, over HTTP/1.1 or
//! HTTP/2, are in [`websocket`].

pub mod headers;
pub mod internal;
pub mod websocket;

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BoxError, IdleTimeout, RouterBody};
use crate::config::Limits;
use crate::drain::Drain;
use crate::error::ApiError;
use crate::fleet::ActivityGuard;
use headers::Forwarding;

/// The HTTP client towards daemons: pooled keep-alive connections per machine address.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, RouterBody>,
    limits: Limits,
    /// Upgraded WebSockets run as drained tasks, so a shutdown waits for them too.
    drain: Drain,
}

impl Upstream {
    pub fn new(limits: &Limits, drain: Drain) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.upstream_connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build(connector);
        Self { client, limits: limits.clone(), drain }
    }

    /// Sends `req` to the daemon at `addr` and returns its response, streaming.
    ///
    /// `guard` counts the exchange as activity on the machine until the response body (or the
    /// upgraded connection) is finished.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
        forwarding: Forwarding<'_>,
        guard: ActivityGuard,
    ) -> Result<Response<RouterBody>, ApiError> {
        let uri = upstream_uri(addr, req.uri())?;
        let headers = headers::request_headers(req.headers(), &forwarding);

        if forwarding.websocket {
            return self.websocket(req, uri, headers, addr, guard).await;
        }

        let (parts, body) = req.into_parts();
        let body = IdleTimeout::new(body, self.limits.body_idle_timeout);
        let body = Limited::new(body, self.limits.max_body_bytes as usize).boxed();
        let mut upstream_req = Request::from_parts(parts, body);
        *upstream_req.uri_mut() = uri;
        *upstream_req.version_mut() = http::Version::HTTP_11;
        *upstream_req.headers_mut() = headers;

        let response = tokio::time::timeout(
            self.limits.upstream_headers_timeout,
            self.client.request(upstream_req),
        )
        .await
        .map_err(|_| upstream_timeout(addr))?
        .map_err(|e| {
            ApiError::forwarding(&e, self.limits.max_body_bytes, || {
                if e.is_connect() {
                    upstream_unreachable(addr, &e)
                } else {
                    upstream_failed(addr, &e)
                }
            })
        })?;

        let (mut parts, body) = response.into_parts();
        headers::response_headers(&mut parts.headers, false);
        let body = GuardedBody { inner: body, _guard: guard }.boxed();
        Ok(Response::from_parts(parts, body))
    }
}

/// Exactly one valid `Host` (or an HTTP/2 `:authority`), else 400.
pub fn check_host<B>(req: &Request<B>) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::client(StatusCode::BAD_REQUEST, "bad_host", why.to_owned());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    let host = match (first, req.uri().authority()) {
        (Some(value), authority) => {
            let text = value.to_str().map_err(|_| bad("malformed Host header"))?;
            if authority.is_some_and(|a| a.as_str() != text) {
                return Err(bad("Host header and request authority differ"));
            }
            text.to_owned()
        }
        (None, Some(authority)) => authority.as_str().to_owned(),
        (None, None) => return Err(bad("missing Host header")),
    };
    let valid = host
        .parse::<http::uri::Authority>()
        .is_ok_and(|a| !a.host().is_empty() && !host.contains('@'));
    if !valid {
        return Err(bad("malformed Host header"));
    }
    Ok(())
}

/// Refuses a body declared larger than the limit before anything is forwarded. A body without
/// a declared length is cut where it passes the limit, and answered 413 by [`Upstream::forward`]
/// when the daemon has not answered yet.
pub fn check_body_size<B>(req: &Request<B>, max: u64) -> Result<(), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::body_too_large(max));
    }
    Ok(())
}

fn upstream_uri(addr: SocketAddr, inbound: &Uri) -> Result<Uri, ApiError> {
    let path = inbound.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("http://{addr}{path}").parse().map_err(|e: http::uri::InvalidUri| {
        ApiError::client(StatusCode::BAD_REQUEST, "bad_path", "the request path is malformed")
            .with_detail(e.to_string())
    })
}

// The machine's private address and the HTTP client's error stay in the log (with the
// request's machine id from its span); the client reads a short sentence.

fn upstream_timeout(addr: SocketAddr) -> ApiError {
    ApiError::upstream(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        "the user's machine did not answer in time",
    )
    .with_detail(format!("the daemon at {addr} did not answer in time"))
}

/// Nothing listens at the daemon's address: the machine stopped, crashed or was suspended
/// behind the router's back. The request never reached it, so the client may simply retry;
/// the next request wakes the machine again.
fn upstream_unreachable(addr: SocketAddr, error: &dyn std::fmt::Display) -> ApiError {
    ApiError::upstream(
        StatusCode::SERVICE_UNAVAILABLE,
        "machine_unreachable",
        "the user's machine is not running; retry to wake it",
    )
    .with_retry_after(std::time::Duration::from_secs(1))
    .with_detail(format!("connecting to the daemon at {addr} failed: {error}"))
}

fn upstream_failed(addr: SocketAddr, error: &dyn std::fmt::Display) -> ApiError {
    ApiError::upstream(
        StatusCode::BAD_GATEWAY,
        "upstream_failed",
        "the user's machine did not answer",
    )
    .with_detail(format!("the daemon at {addr} failed: {error}"))
}

/// A response body that keeps the machine counted as active until it ends or is dropped.
struct GuardedBody<B> {
    inner: B,
    _guard: ActivityGuard,
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
