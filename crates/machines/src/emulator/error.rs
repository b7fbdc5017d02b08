//! Errors the emulator answers with, in Fly's shape.

use hyper::StatusCode;

/// An API error: an HTTP status and Fly's `{"error": "<code>: <text>"}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    /// The full `error` string, gRPC code included.
    pub error: String,
    /// `status` of Fly's `ErrorResponse` (`name_taken`, ...), when Fly sends one.
    pub kind: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, text: impl std::fmt::Display) -> Self {
        Self { status, error: format!("{code}: {text}"), kind: None }
    }

    pub fn invalid_argument(text: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", text)
    }

    pub fn not_found(text: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", text)
    }

    pub fn failed_precondition(text: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, "failed_precondition", text)
    }

    /// 409 with gRPC `aborted`, what Fly answers for lease conflicts and concurrent updates.
    pub fn aborted(text: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::CONFLICT, "aborted", text)
    }

    pub fn deadline_exceeded(text: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "deadline_exceeded", text)
    }

    pub fn unauthenticated() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", "token validation error")
    }

    pub fn internal(text: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", text)
    }

    pub fn name_taken(text: impl std::fmt::Display) -> Self {
        let mut error = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "already_exists", text);
        error.kind = Some("name_taken");
        error
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(kind) = self.kind {
            body["status"] = kind.into();
        }
        body
    }
}
