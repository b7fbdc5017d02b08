//! One request to the registry: auth header, retries with backoff, error bodies.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};

use crate::auth::{Authorizer, Challenge};
use crate::stats::PushStats;
use crate::{Error, RegistryErrorBody};

/// How often and how patiently a failed request is sent again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The wait before the second attempt; doubled each time, with jitter.
    pub first_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): exponential, ±50% jitter.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self.first_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let capped = exponential.min(self.max_backoff);
        capped.mul_f64(0.5 + rand::random::<f64>())
    }
}

/// What a request is, for errors and logs.
pub(crate) struct Call<'a> {
    pub op: &'static str,
    /// The blob digest, manifest reference or path the request is about.
    pub what: &'a str,
    /// The token scope the request needs.
    pub scope: &'a str,
    /// Whether a dropped connection, 429 or 5xx sends the same request again. Requests
    /// inside an upload session say no: the whole upload restarts instead.
    pub retry: bool,
}

pub(crate) struct Transport {
    pub http: reqwest::Client,
    pub base: Url,
    pub registry: String,
    pub auth: Authorizer,
    pub stats: Arc<PushStats>,
    pub retry: RetryPolicy,
}

impl Transport {
    /// `path` (absolute, relative, or a full URL from a `Location` header) against the
    /// registry's base URL.
    pub(crate) fn resolve(&self, call: &Call<'_>, location: &str) -> Result<Url, Error> {
        self.base
            .join(location)
            .map_err(|e| self.protocol(call, format!("bad Location {location:?}: {e}")))
    }

    pub(crate) fn protocol(&self, call: &Call<'_>, problem: String) -> Error {
        Error::Protocol {
            op: call.op,
            what: call.what.to_owned(),
            registry: self.registry.clone(),
            problem,
        }
    }

    /// Sends the request `build` makes, as often as the policy allows, and returns the
    /// first answer that is neither a retryable failure nor an auth challenge.
    pub(crate) async fn send<F>(&self, call: &Call<'_>, build: F) -> Result<Response, Error>
    where
        F: Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder, Error>,
    {
        let mut attempt = 0;
        let mut reauthorized = false;
        loop {
            attempt += 1;
            let request =
                build(&self.http)?.build().map_err(|e| self.transport(call, attempt, e))?;
            let request = self.authorize(call, request).await?;
            let method = request.method().clone();
            let path = request.url().path().to_owned();
            tracing::debug!(registry = %self.registry, %method, path, attempt, "registry request");

            let outcome = self.http.execute(request).await;
            let retryable = call.retry && attempt < self.retry.attempts;
            let response = match outcome {
                Ok(response) => response,
                Err(e) if retryable && is_transient(&e) => {
                    tracing::warn!(
                        registry = %self.registry,
                        op = call.op,
                        what = call.what,
                        attempt,
                        error = %e,
                        "request failed; retrying",
                    );
                    self.pause(attempt, None).await;
                    continue;
                }
                Err(e) => return Err(self.transport(call, attempt, e)),
            };

            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !reauthorized {
                // The first 401 teaches the scheme (or says the token expired): learn,
                // drop the token, and try once more with a fresh header.
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                if let Some(challenge) = challenge {
                    self.auth.learn(challenge);
                    self.auth.forget(call.scope);
                    reauthorized = true;
                    attempt -= 1;
                    continue;
                }
            }
            let transient = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
            if transient && retryable {
                let wait = retry_after(&response);
                tracing::warn!(
                    registry = %self.registry,
                    op = call.op,
                    what = call.what,
                    attempt,
                    %status,
                    "registry busy or failing; retrying",
                );
                self.pause(attempt, wait).await;
                continue;
            }
            return Ok(response);
        }
    }

    /// Turns an unexpected answer into an error carrying the registry's error code.
    pub(crate) async fn unexpected(&self, call: &Call<'_>, response: Response) -> Error {
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        let (code, message) = RegistryErrorBody::parse(&body);
        Error::Registry {
            op: call.op,
            what: call.what.to_owned(),
            registry: self.registry.clone(),
            status,
            code,
            message,
        }
    }

    async fn authorize(
        &self,
        call: &Call<'_>,
        mut request: reqwest::Request,
    ) -> Result<reqwest::Request, Error> {
        // A registry credential goes to the registry only: an upload Location may point
        // at other storage, which must never see it.
        if !same_origin(request.url(), &self.base) {
            return Ok(request);
        }
        if let Some(value) = self.auth.header(&self.http, call.scope, &self.stats).await? {
            let value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|_| self.protocol(call, "the token is not a valid header value".into()))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        Ok(request)
    }

    async fn pause(&self, attempt: u32, at_least: Option<Duration>) {
        self.stats.retried();
        let wait = self
            .retry
            .backoff(attempt)
            .max(at_least.unwrap_or_default())
            .min(self.retry.max_backoff);
        tokio::time::sleep(wait).await;
    }

    fn transport(&self, call: &Call<'_>, attempts: u32, source: reqwest::Error) -> Error {
        Error::Transport {
            op: call.op,
            what: call.what.to_owned(),
            registry: self.registry.clone(),
            attempts,
            source,
        }
    }
}

/// Whether an error is the network's fault (and a new attempt may succeed).
pub(crate) fn is_transient(error: &reqwest::Error) -> bool {
    error.is_connect() || error.is_timeout() || error.is_request() || error.is_body()
}

/// Whether a failed push step is worth starting again from a clean upload.
pub(crate) fn is_retryable(error: &Error) -> bool {
    match error {
        Error::Transport { source, .. } => is_transient(source),
        Error::Registry { status, .. } => *status >= 500 || *status == 429 || *status == 416,
        _ => false,
    }
}

fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_the_registry_origin_only() {
        let base = Url::parse("https://registry.example").expect("url");
        let check = |url: &str| same_origin(&Url::parse(url).expect("url"), &base);
        assert!(check("https://registry.example/v2/app/blobs/uploads/1?_state=x"));
        assert!(check("https://registry.example:443/v2/"));
        assert!(!check("https://storage.example/upload/1"));
        assert!(!check("http://registry.example/v2/"));
        assert!(!check("https://registry.example:5000/v2/"));
    }

    #[test]
    fn relative_and_absolute_locations_resolve_against_the_registry() {
        let base = Url::parse("http://127.0.0.1:5000").expect("url");
        let join = |location: &str| base.join(location).expect("join").to_string();
        assert_eq!(
            join("/v2/a/blobs/uploads/u1?_state=s"),
            "http://127.0.0.1:5000/v2/a/blobs/uploads/u1?_state=s"
        );
        assert_eq!(join("https://storage.example/u1"), "https://storage.example/u1");
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let policy = RetryPolicy::default();
        assert!(policy.backoff(1) <= Duration::from_millis(300));
        assert!(policy.backoff(10) <= policy.max_backoff.mul_f64(1.5));
    }
}
