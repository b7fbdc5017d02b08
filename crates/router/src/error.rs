//! The one place where a failure becomes a status code, a JSON body and a log level.
//!
//! Every error that reaches a client is an [`ApiError`]: its [`Fault`] is decided where the
//! error is made (who is at fault), and [`ApiError::into_response`] maps it in one step.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, BodyIdleTimeout, RouterBody};

/// Who caused a failure; decides the log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something wrong (4xx, logged at debug).
    Client,
    /// The user's machine or the Fly API failed (502/503/504, logged at warn).
    Upstream,
    /// The router itself failed (500, logged at error).
    Internal,
}

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub fault: Fault,
    /// Short machine-readable code, e.g. `invalid_token`.
    pub code: &'static str,
    /// Human-readable text sent to the client: short, and never a token, an address or a
    /// library's internals.
    pub message: String,
    /// What went wrong in full, for the log only (never sent).
    pub detail: Option<String>,
    /// Sent as `Retry-After` when set.
    pub retry_after: Option<Duration>,
    /// Sent as `WWW-Authenticate` on 401.
    pub www_authenticate: Option<&'static str>,
    /// Sent as `Allow` on a 405 the router itself answers.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, fault: Fault, code: &'static str, message: String) -> Self {
        Self {
            status,
            fault,
            code,
            message,
            detail: None,
            retry_after: None,
            www_authenticate: None,
            allow: None,
        }
    }

    pub fn client(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(status, Fault::Client, code, message.into())
    }

    pub fn upstream(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(status, Fault::Upstream, code, message.into())
    }

    /// A 500; `detail` is logged, the client reads only "internal error".
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Fault::Internal,
            "internal",
            "internal error".into(),
        )
        .with_detail(detail)
    }

    /// A 405 for a route of the router's own, with the methods it accepts in `Allow`.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut err = Self::client(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        );
        err.allow = Some(allow);
        err
    }

    /// Keeps `detail` for the log; the client still reads only `message`.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A 401 with the `WWW-Authenticate` challenge RFC 6750 asks for.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut err = Self::client(StatusCode::UNAUTHORIZED, "invalid_token", message);
        err.www_authenticate = Some("Bearer realm=\"matrix\", error=\"invalid_token\"");
        err
    }

    pub fn not_found() -> Self {
        Self::client(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 413: the request body is larger than the router forwards.
    pub fn body_too_large(max: u64) -> Self {
        Self::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {max} bytes"),
        )
    }

    /// A request towards a daemon failed before its response started: when the cause is the
    /// client's body breaking a limit (size: 413, idle time: 408; found anywhere in `error`'s
    /// source chain), the client is at fault; otherwise the daemon is, with `upstream` as its
    /// error.
    pub fn forwarding(
        error: &(dyn std::error::Error + 'static),
        max_body: u64,
        upstream: impl FnOnce() -> ApiError,
    ) -> Self {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if e.is::<http_body_util::LengthLimitError>() {
                return Self::body_too_large(max_body);
            }
            if let Some(idle) = e.downcast_ref::<BodyIdleTimeout>() {
                return Self::client(StatusCode::REQUEST_TIMEOUT, "body_timeout", idle.to_string());
            }
            cause = e.source();
        }
        upstream()
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Logs the error at the level its fault calls for, and turns it into a response.
    pub fn into_response(self) -> Response<RouterBody> {
        let detail = self.detail.as_deref().unwrap_or(&self.message);
        match self.fault {
            Fault::Client => {
                tracing::debug!(
                    status = self.status.as_u16(),
                    code = self.code,
                    error = %detail,
                    "request refused",
                )
            }
            Fault::Upstream => {
                tracing::warn!(
                    status = self.status.as_u16(),
                    code = self.code,
                    error = %detail,
                    "upstream failure",
                )
            }
            Fault::Internal => {
                tracing::error!(
                    status = self.status.as_u16(),
                    code = self.code,
                    error = %detail,
                    "request could not be served",
                )
            }
        }
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(challenge) = self.www_authenticate {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(after) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
        }
        response
    }
}
