//! The project's public keys, fetched from its JWKS URL and cached.
//!
//! - A key set is used for at most [`MAX_AGE`] (Supabase asks clients not to cache longer).
//! - Concurrent fetches are coalesced: one request goes out, the others wait for its result.
//! - A `kid` missing from a fresh set triggers at most one refetch per [`COOLDOWN`], so random
//!   `kid`s cannot turn every request into an outbound fetch.
//! - When Supabase is unreachable the last good set keeps serving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::{Mutex, RwLock};

pub const MAX_AGE: Duration = Duration::from_secs(600);
pub const COOLDOWN: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("fetching the key set from {url}")]
    Fetch { url: String, source: reqwest::Error },
    #[error("the key set from {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("the key set from {url} is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { url: String },
    #[error("the key set from {url} is not a JWKS document")]
    Parse { url: String, source: serde_json::Error },
}

/// A verification key with the one algorithm it may be used with.
#[derive(Clone)]
pub struct VerifyingKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    fetched_at: Instant,
}

/// Cached JWKS keys by `kid`.
pub struct JwksCache {
    url: String,
    http: reqwest::Client,
    current: RwLock<Option<KeySet>>,
    /// Held while a fetch runs; waiters re-check the cache after acquiring it.
    fetching: Mutex<Option<Instant>>,
    fetches: std::sync::atomic::AtomicU64,
}

impl JwksCache {
    pub fn new(url: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("static reqwest configuration");
        Self {
            url,
            http,
            current: RwLock::new(None),
            fetching: Mutex::new(None),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many fetches went out (metrics and tests).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key for `kid`, fetching the set when it is old or missing, or when the `kid` is
    /// new and no fetch happened within the cooldown.
    pub async fn key(&self, kid: &str) -> Option<VerifyingKey> {
        let asked_at = Instant::now();
        let (key, young) = self.cached(kid).await;
        if let (Some(key), true) = (&key, young) {
            return Some(key.clone());
        }

        let mut last_fetch = self.fetching.lock().await;
        // Another caller may have fetched while this one waited for the lock.
        let fetched_since = last_fetch.is_some_and(|at| at >= asked_at);
        let cooling_down = last_fetch.is_some_and(|at| at.elapsed() < COOLDOWN);
        let (key, young) = self.cached(kid).await;
        let fetch = !fetched_since && (!young || (key.is_none() && !cooling_down));
        if fetch {
            *last_fetch = Some(Instant::now());
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "JWKS fetch failed; keeping the last good key set");
            }
        }
        drop(last_fetch);

        self.cached(kid).await.0
    }

    /// The cached key for `kid`, and whether a set younger than [`MAX_AGE`] is cached.
    async fn cached(&self, kid: &str) -> (Option<VerifyingKey>, bool) {
        let current = self.current.read().await;
        match current.as_ref() {
            Some(set) => (set.keys.get(kid).cloned(), set.fetched_at.elapsed() < MAX_AGE),
            None => (None, false),
        }
    }

    async fn refresh(&self) -> Result<(), JwksError> {
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = self.url.clone();
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| JwksError::Fetch { url: url.clone(), source })?;
        if !response.status().is_success() {
            return Err(JwksError::Status { url, status: response.status().as_u16() });
        }
        if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(JwksError::TooLarge { url });
        }
        let body = response
            .bytes()
            .await
            .map_err(|source| JwksError::Fetch { url: url.clone(), source })?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge { url });
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|source| JwksError::Parse { url, source })?;

        let keys = usable_keys(&set);
        tracing::debug!(keys = keys.len(), "JWKS refreshed");
        *self.current.write().await = Some(KeySet { keys, fetched_at: Instant::now() });
        Ok(())
    }
}

/// Keys with a `kid` and an algorithm this router accepts; the JWK's own `alg` decides.
fn usable_keys(set: &JwkSet) -> HashMap<String, VerifyingKey> {
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let algorithm = match jwk.common.key_algorithm {
            Some(KeyAlgorithm::ES256) => Algorithm::ES256,
            Some(KeyAlgorithm::RS256) => Algorithm::RS256,
            // Keys without `alg` or with another algorithm are not used for verification.
            _ => continue,
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                keys.insert(kid, VerifyingKey { key, algorithm });
            }
            Err(e) => tracing::warn!(kid = %kid, error = %e, "skipping an unusable JWKS key"),
        }
    }
    keys
}
