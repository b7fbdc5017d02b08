//! Fly's per-action rate limit, as token buckets per (action, machine or app).

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Requests per second and burst, per action and per machine id (or app, for calls not
/// about one machine). Fly documents 1 req/s with a burst of 3 for every action but
/// `get`, which has 5 req/s with a burst of 10; that is [`RateLimit::default`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Sustained requests per second of one action.
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: f64,
    /// Sustained requests per second of `get`.
    pub get_per_second: f64,
    /// Burst of `get`.
    pub get_burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self { per_second: 1.0, burst: 3.0, get_per_second: 5.0, get_burst: 10.0 }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The buckets.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    buckets: HashMap<(String, String), Bucket>,
}

impl Limiter {
    /// Takes a token for `action` on `key`; `false` means "answer 429".
    pub fn allow(&mut self, limit: &RateLimit, action: &str, key: &str) -> bool {
        let (rate, burst) = if action == "get" {
            (limit.get_per_second, limit.get_burst)
        } else {
            (limit.per_second, limit.burst)
        };
        let now = Instant::now();
        let bucket = self
            .buckets
            .entry((action.to_owned(), key.to_owned()))
            .or_insert(Bucket { tokens: burst, refilled: now });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
