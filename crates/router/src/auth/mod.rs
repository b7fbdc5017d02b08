//! Who is calling: a verified Supabase user id, or a refusal.
//!
//! The token comes from `Authorization: Bearer` or, for browser EventSource and WebSocket
//! clients that cannot set headers, from the Supabase session cookie; never from the query
//! string. A cookie-authenticated request must also come from an allowed origin, since the
//! browser attaches cookies to cross-site requests too.

mod cookie;
pub mod cors;
mod jwks;
mod jwt;
mod verified;

use std::sync::Arc;

use http::{header, HeaderMap};
use uuid::Uuid;

pub use jwks::{JwksCache, JwksError};
pub use jwt::{TokenError, Verifier};

use crate::config::AuthConfig;
use crate::error::ApiError;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A user whose token verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
}

/// Extracts and verifies the caller's token.
pub struct Authenticator {
    verifier: Verifier,
    cookie_name: String,
    allowed_origins: Vec<String>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig, jwks: Arc<JwksCache>) -> Self {
        Self {
            verifier: Verifier::new(config, jwks),
            cookie_name: cookie::session_cookie_name(&config.supabase_url),
            allowed_origins: config.allowed_origins.clone(),
        }
    }

    /// The verified user, or a 401 (bad or missing token) / 403 (cookie from a foreign origin).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<User, ApiError> {
        let (token, from_cookie) = match bearer(headers)? {
            Some(token) => (token, false),
            None => match cookie::access_token(headers, &self.cookie_name) {
                Some(token) => (token, true),
                None => return Err(ApiError::unauthorized("missing bearer token")),
            },
        };

        if from_cookie && !self.origin_allowed(headers) {
            return Err(ApiError::client(
                http::StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "cookie authentication from this origin is not allowed",
            ));
        }

        let id = self.verifier.verify(&token).await.map_err(|e| {
            tracing::debug!(reason = %e, "token refused");
            ApiError::unauthorized(e.reason()).with_detail(e.to_string())
        })?;
        Ok(User { id })
    }

    /// The origins whose pages may call the router with the user's cookie.
    pub fn allowed_origins(&self) -> &[String] {
        &self.allowed_origins
    }

    /// An allowed `Origin`, or no `Origin` on a request the browser marks same-origin.
    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        match headers.get(header::ORIGIN).map(|o| o.to_str()) {
            Some(Ok(origin)) => self.allowed_origins.iter().any(|allowed| allowed == origin),
            Some(Err(_)) => false,
            None => headers.get("sec-fetch-site").is_some_and(|site| site == "same-origin"),
        }
    }
}

/// The bearer token, `None` without an `Authorization` header, 401 when it is malformed.
fn bearer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::unauthorized("more than one Authorization header"));
    }
    let value = value.to_str().map_err(|_| ApiError::unauthorized("malformed Authorization"))?;
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(ApiError::unauthorized("expected a bearer token"));
    };
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthorized("expected a bearer token"));
    }
    Ok(Some(token.trim().to_owned()))
}
