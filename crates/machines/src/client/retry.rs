//! When and how long to wait before trying a call again.

use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// Exponential backoff with full jitter, honouring `Retry-After`.
///
/// Attempt `n` (from 0) sleeps a random time in `[0, min(max_delay, base_delay * 2^n)]`,
/// unless Fly sent `Retry-After`, which is then waited for exactly; a `Retry-After` longer
/// than `max_delay` ends the retries and returns the error to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 disables retries).
    pub max_attempts: u32,
    /// The backoff ceiling of the first retry.
    pub base_delay: Duration,
    /// The largest sleep between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Six attempts, 250 ms doubling up to 8 s: enough to ride out Fly's documented
    /// per-action limit of 1 request/s with a burst of 3.
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The sleep before retry number `retry` (0 for the first retry), or `None` when the
    /// policy is exhausted or the server asked for a longer wait than `max_delay`.
    pub(crate) fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if retry + 1 >= self.max_attempts {
            return None;
        }
        if let Some(asked) = retry_after {
            return (asked <= self.max_delay).then_some(asked);
        }
        let ceiling = self.base_delay.saturating_mul(1u32 << retry.min(20)).min(self.max_delay);
        let jittered = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
        Some(Duration::from_millis(jittered))
    }
}

/// Reads `Retry-After` as seconds or as an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_ceiling_and_retry_after_wins() {
        let policy = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        for _ in 0..50 {
            assert!(policy.delay(0, None).unwrap() <= Duration::from_millis(100));
            assert!(policy.delay(2, None).unwrap() <= Duration::from_millis(300));
        }
        assert_eq!(policy.delay(3, None), None, "four attempts in all");
        let asked = Some(Duration::from_millis(250));
        assert_eq!(policy.delay(0, asked), asked);
        assert_eq!(policy.delay(0, Some(Duration::from_secs(5))), None, "too long to wait");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        headers.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
    }
}
