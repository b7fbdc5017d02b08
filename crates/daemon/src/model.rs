//! The model client: OpenAI-compatible chat completions, streamed.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::config::{ModelConfig, Secret, FIREWORKS_API_KEY, TOGETHER_API_KEY};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte from the provider for this long ends the call.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no model provider is configured: set {FIREWORKS_API_KEY} or {TOGETHER_API_KEY}")]
    NotConfigured,
    #[error("model request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("model provider at {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("model provider sent a chunk that is not JSON")]
    BadChunk(#[source] serde_json::Error),
}

/// A client for the configured provider.
#[derive(Debug, Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    base_url: Option<String>,
    api_key: Option<Secret>,
    model: String,
}

impl ModelClient {
    pub fn new(config: &ModelConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .expect("the HTTP client builds");
        Self {
            http,
            base_url: config.base_url.clone(),
            api_key: config.api_key.clone(),
            model: config.model.clone(),
        }
    }

    /// Whether a provider is configured; without one, calls fail with `NotConfigured`.
    pub fn is_configured(&self) -> bool {
        self.base_url.is_some()
    }

    /// Sends `message` as a user turn and calls `on_delta` with each piece of the reply as
    /// it streams in; returns the whole reply.
    pub async fn complete(
        &self,
        message: &str,
        mut on_delta: impl FnMut(&str),
    ) -> Result<String, ModelError> {
        let base = self.base_url.as_deref().ok_or(ModelError::NotConfigured)?;
        let url = format!("{base}/chat/completions");
        let body = json!({
            "model": self.model,
            "stream": true,
            "messages": [{"role": "user", "content": message}],
        });
        let mut request = self.http.post(&url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        let failed = |source| ModelError::Request { url: url.clone(), source };
        let response = request.send().await.map_err(failed)?;
        if !response.status().is_success() {
            return Err(ModelError::Status { url, status: response.status().as_u16() });
        }

        // Server-sent events: `data: {json}` lines, ended by `data: [DONE]`.
        let mut reply = String::new();
        let mut pending = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.map_err(failed)?);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
                let data = data.trim_start();
                if data == "[DONE]" {
                    return Ok(reply);
                }
                let value: Value = serde_json::from_str(data).map_err(ModelError::BadChunk)?;
                if let Some(delta) = value["choices"][0]["delta"]["content"].as_str() {
                    on_delta(delta);
                    reply.push_str(delta);
                }
            }
        }
        Ok(reply)
    }
}
