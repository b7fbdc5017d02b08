//! Tokens that already verified, so a client's next request skips the signature check.
//!
//! A browser or CLI sends the same access token on every request until it refreshes it, and
//! checking an ES256 or RS256 signature costs far more than the rest of a proxied request.
//! Entries are keyed by the SHA-256 of the whole token (a cheaper hash would let a forged
//! token collide with a real one), hold only the user id and the token's `exp`, and are
//! trusted for at most [`MAX_AGE`], well under the key set's own cache time, so a key Supabase
//! withdraws stops working here as soon as it would without this cache. Refusals are never
//! cached: they stay as expensive as before and change nothing here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How long a verified token is trusted without checking its signature again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Entries kept; past it, expired ones are dropped, then everything if still full.
const CAPACITY: usize = 16 * 1024;

type Key = [u8; 32];

struct Entry {
    user: Uuid,
    /// The token's `exp` plus the configured leeway, in Unix seconds.
    valid_until: u64,
    cached_at: Instant,
}

pub struct VerifiedTokens {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl VerifiedTokens {
    pub fn new() -> Self {
        Self { entries: Mutex::new(HashMap::new()) }
    }

    pub fn key(token: &str) -> Key {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The user of a token verified less than [`MAX_AGE`] ago and not expired since.
    pub fn get(&self, key: &Key, now_unix: u64) -> Option<Uuid> {
        let entries = self.entries.lock().expect("verified tokens lock");
        let entry = entries.get(key)?;
        let fresh = entry.cached_at.elapsed() < MAX_AGE && now_unix <= entry.valid_until;
        fresh.then_some(entry.user)
    }

    pub fn insert(&self, key: Key, user: Uuid, valid_until: u64) {
        let mut entries = self.entries.lock().expect("verified tokens lock");
        if entries.len() >= CAPACITY {
            entries.retain(|_, e| e.cached_at.elapsed() < MAX_AGE);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, Entry { user, valid_until, cached_at: Instant::now() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_token_expires_with_its_exp() {
        let cache = VerifiedTokens::new();
        let user = Uuid::from_u128(7);
        let key = VerifiedTokens::key("a.b.c");
        cache.insert(key, user, 1_000);

        assert_eq!(cache.get(&key, 999), Some(user));
        assert_eq!(cache.get(&key, 1_000), Some(user));
        assert_eq!(cache.get(&key, 1_001), None);
        assert_eq!(cache.get(&VerifiedTokens::key("a.b.d"), 999), None);
    }

    #[test]
    fn a_full_cache_makes_room() {
        let cache = VerifiedTokens::new();
        for i in 0..CAPACITY + 10 {
            cache.insert(VerifiedTokens::key(&i.to_string()), Uuid::from_u128(1), u64::MAX);
        }
        let len = cache.entries.lock().unwrap().len();
        assert!(len <= CAPACITY, "{len} entries");
        assert!(cache.get(&VerifiedTokens::key(&(CAPACITY + 9).to_string()), 0).is_some());
    }
}
