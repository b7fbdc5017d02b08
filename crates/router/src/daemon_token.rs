//! Per-machine daemon tokens: `HMAC-SHA256(ROUTER_DAEMON_TOKEN_SECRET, user id)`, hex.
//!
//! Each user has exactly one machine, so a token bound to the user id is bound to that
//! machine: it is useless against any other machine, and the router never stores it.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// Domain separation, so the secret could sign other things without collisions.
const CONTEXT: &[u8] = b"matrix-daemon-token:v1:";

#[derive(Clone)]
pub struct DaemonTokens {
    /// The MAC keyed with the secret and fed the context: cloned per token, so the key is
    /// not hashed again on every request.
    keyed: Hmac<Sha256>,
}

impl DaemonTokens {
    pub fn new(secret: &str) -> Self {
        let mut keyed = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
        keyed.update(CONTEXT);
        Self { keyed }
    }

    pub fn for_user(&self, user_id: Uuid) -> String {
        let mut mac = self.keyed.clone();
        mac.update(user_id.as_hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_user_and_per_secret() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let tokens = DaemonTokens::new("0123456789abcdef0123456789abcdef");
        assert_eq!(tokens.for_user(a), tokens.for_user(a));
        assert_ne!(tokens.for_user(a), tokens.for_user(b));
        assert_ne!(
            tokens.for_user(a),
            DaemonTokens::new("another secret of 32 bytes......").for_user(a)
        );
        assert_eq!(tokens.for_user(a).len(), 64);
    }
}
