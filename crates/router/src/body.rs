//! The response body type every handler returns: a boxed, streaming body.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// A streaming body whose errors are boxed; proxied bodies pass through without buffering.
pub type RouterBody = BoxBody<Bytes, BoxError>;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body held in memory (JSON answers, metrics).
pub fn full(bytes: impl Into<Bytes>) -> RouterBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A JSON response body.
pub fn json(value: &serde_json::Value) -> RouterBody {
    full(value.to_string())
}
