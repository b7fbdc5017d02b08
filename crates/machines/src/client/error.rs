//! The client's error: which call failed, on which machine, and what Fly said.

use std::time::Duration;

use reqwest::StatusCode;

/// A failed Fly Machines API call.
///
/// Every variant names the call (`start_machine`, `create_volume`, ...) and, when there is
/// one, the machine or volume id. The token never appears in it.
#[derive(Debug, thiserror::Error)]
pub enum FlyError {
    /// Fly answered with an error status.
    #[error("{call}{}: Fly answered {status}: {message}", on(.target))]
    Api {
        /// The client method.
        call: &'static str,
        /// The machine or volume id, when the call is about one.
        target: Option<String>,
        /// The HTTP status.
        status: StatusCode,
        /// Fly's error text (`"failed_precondition: ..."`).
        message: String,
        /// The `Retry-After` delay Fly asked for, if any.
        retry_after: Option<Duration>,
    },
    /// The request did not complete (connection refused or reset, timeout).
    #[error("{call}{}: the request did not complete", on(.target))]
    Transport {
        /// The client method.
        call: &'static str,
        /// The machine or volume id, when the call is about one.
        target: Option<String>,
        /// What went wrong.
        #[source]
        source: reqwest::Error,
    },
    /// Fly answered 2xx with a body this client cannot read.
    #[error("{call}{}: unexpected response body", on(.target))]
    Decode {
        /// The client method.
        call: &'static str,
        /// The machine or volume id, when the call is about one.
        target: Option<String>,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// `wait_machine` ran out of time (Fly kept answering 408).
    #[error("wait_machine on {machine}: not {state} after {waited:?}")]
    WaitTimeout {
        /// The machine id.
        machine: String,
        /// The awaited states, comma-separated.
        state: String,
        /// How long the client waited.
        waited: Duration,
    },
    /// The client was built with an unusable setting.
    #[error("invalid Fly API client setting: {0}")]
    InvalidSetting(String),
}

fn on(target: &Option<String>) -> String {
    target.as_deref().map(|t| format!(" on {t}")).unwrap_or_default()
}

impl FlyError {
    /// The HTTP status Fly answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            FlyError::Api { status, .. } => Some(*status),
            FlyError::WaitTimeout { .. } => Some(StatusCode::REQUEST_TIMEOUT),
            _ => None,
        }
    }

    /// Fly's error text, if it answered with one.
    pub fn message(&self) -> Option<&str> {
        match self {
            FlyError::Api { message, .. } => Some(message),
            _ => None,
        }
    }

    /// 412: the machine is not in a state that allows the call (e.g. start while
    /// `replacing`), or a lease or version precondition failed.
    pub fn is_precondition_failed(&self) -> bool {
        self.status() == Some(StatusCode::PRECONDITION_FAILED)
    }

    /// 404: no such app, machine, volume or lease.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// 409: e.g. the lease is held by someone else.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT)
    }

    /// 429: rate limited (after the client's own retries).
    pub fn is_rate_limited(&self) -> bool {
        self.status() == Some(StatusCode::TOO_MANY_REQUESTS)
    }

    /// 408, or a wait that ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.status() == Some(StatusCode::REQUEST_TIMEOUT)
            || matches!(self, FlyError::Transport { source, .. } if source.is_timeout())
    }

    /// Whether trying again later may succeed: 408, 429, 5xx and transport failures.
    pub fn is_transient(&self) -> bool {
        match self {
            FlyError::Api { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || status.is_server_error()
            }
            FlyError::Transport { .. } | FlyError::WaitTimeout { .. } => true,
            FlyError::Decode { .. } | FlyError::InvalidSetting(_) => false,
        }
    }
}
