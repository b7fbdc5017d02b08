//! One call on the wire: the request, its retries, and reading the answer.

use super::*;

/// Whether a call may be sent again after an ambiguous failure (5xx, timeout, reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Idempotence {
    /// Doing it twice leaves the same result.
    Safe,
    /// Doing it twice may do it twice: only retried when it certainly did not happen.
    Unsafe,
}

/// One API call, before it is sent.
pub(super) struct Call<'a> {
    pub(super) name: &'static str,
    pub(super) target: Option<&'a str>,
    pub(super) method: Method,
    pub(super) path: Vec<&'a str>,
    pub(super) query: Vec<(String, String)>,
    pub(super) body: Option<Value>,
    pub(super) nonce: Option<&'a str>,
    pub(super) timeout: Duration,
    pub(super) idempotence: Idempotence,
}

/// How one attempt ended, for the retry loop.
pub(super) enum Attempt {
    Done(bytes::Bytes),
    /// Failed; `unsent` says whether Fly certainly did not act on it.
    Failed {
        error: FlyError,
        unsent: bool,
        retry_after: Option<Duration>,
    },
}

impl FlyClient {
    /// A call on `/v1/apps/{app}/<path...>` with the defaults: safe to retry, no body.
    pub(super) fn call<'a>(
        &'a self,
        name: &'static str,
        target: Option<&'a str>,
        method: Method,
        path: &[&'a str],
    ) -> Call<'a> {
        let mut segments = vec!["v1", "apps", self.app.as_str()];
        segments.extend_from_slice(path);
        Call {
            name,
            target,
            method,
            path: segments,
            query: Vec::new(),
            body: None,
            nonce: None,
            timeout: self.options.timeout,
            idempotence: Idempotence::Safe,
        }
    }

    /// Sends `call` with retries and decodes a JSON answer.
    pub(super) async fn json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, FlyError> {
        let bytes = self.send(&call).await?;
        decode(&call, &bytes)
    }

    /// Sends `call`, retrying as the module documentation says; returns the 2xx body.
    pub(super) async fn send(&self, call: &Call<'_>) -> Result<bytes::Bytes, FlyError> {
        let mut retry = 0;
        loop {
            let (error, unsent, retry_after) = match self.attempt(call).await {
                Attempt::Done(bytes) => return Ok(bytes),
                Attempt::Failed { error, unsent, retry_after } => (error, unsent, retry_after),
            };
            let allowed = unsent
                || (call.idempotence == Idempotence::Safe
                    && error.is_transient()
                    // `wait` answers 408 as "not yet" and loops itself.
                    && !(call.name == "wait_machine"
                        && error.status() == Some(StatusCode::REQUEST_TIMEOUT)));
            let Some(delay) =
                allowed.then(|| self.options.retry.delay(retry, retry_after)).flatten()
            else {
                return Err(error);
            };
            tracing::warn!(
                call = call.name,
                target = call.target.unwrap_or_default(),
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "Fly API call failed, retrying"
            );
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }

    /// One HTTP exchange.
    pub(super) async fn attempt(&self, call: &Call<'_>) -> Attempt {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(&call.path);
        }
        let mut request = self
            .http
            .request(call.method.clone(), url)
            .timeout(call.timeout)
            .header(AUTHORIZATION, self.authorization.clone())
            .query(&call.query);
        if let Some(nonce) = call.nonce {
            request = request.header(LEASE_NONCE_HEADER, nonce);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }

        let target = call.target.map(str::to_owned);
        let response = match request.send().await {
            Ok(response) => response,
            Err(source) => {
                // A refused connection never reached Fly; anything else may have.
                let unsent = source.is_connect();
                let error = FlyError::Transport { call: call.name, target, source };
                return Attempt::Failed { error, unsent, retry_after: None };
            }
        };
        let status = response.status();
        let retry_after = retry::retry_after(response.headers());
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(source) => {
                let error = FlyError::Transport { call: call.name, target, source };
                return Attempt::Failed { error, unsent: false, retry_after: None };
            }
        };
        if status.is_success() {
            return Attempt::Done(bytes);
        }

        let message = error_text(&bytes);
        let error = FlyError::Api { call: call.name, target, status, message, retry_after };
        // Fly rate-limits before acting on a request.
        let unsent = status == StatusCode::TOO_MANY_REQUESTS;
        Attempt::Failed { error, unsent, retry_after }
    }
}

pub(super) fn to_json<T: Serialize>(call: &'static str, body: &T) -> Result<Value, FlyError> {
    serde_json::to_value(body).map_err(|source| FlyError::Decode { call, target: None, source })
}

pub(super) fn decode<T: DeserializeOwned>(call: &Call<'_>, bytes: &[u8]) -> Result<T, FlyError> {
    serde_json::from_slice(bytes).map_err(|source| FlyError::Decode {
        call: call.name,
        target: call.target.map(str::to_owned),
        source,
    })
}

/// Fly's error text: `message`, else `error`, else the body itself (shortened).
pub(super) fn error_text(bytes: &[u8]) -> String {
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) {
        if let Some(message) = body.message.filter(|m| !m.is_empty()) {
            return message;
        }
        if !body.error.is_empty() {
            return body.error;
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return "(no body)".to_owned();
    }
    text.chars().take(300).collect()
}
