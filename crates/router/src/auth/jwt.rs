//! Verifying one Supabase access token.

use std::sync::Arc;

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use uuid::Uuid;

use super::jwks::JwksCache;
use super::verified::VerifiedTokens;
use super::MAX_TOKEN_BYTES;
use crate::config::AuthConfig;

/// Why a token was refused. The text never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("token header is malformed or names an unsupported algorithm")]
    Header,
    #[error("HS256 tokens are not accepted")]
    NoSecret,
    #[error("token has no key id")]
    NoKid,
    #[error("unknown signing key")]
    UnknownKid,
    #[error("token algorithm does not match its key")]
    AlgorithmMismatch,
    #[error("token refused: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("token role is not `authenticated`")]
    Role,
    #[error("token subject is not a user id")]
    Subject,
    #[error("anonymous users are not allowed")]
    Anonymous,
}

impl TokenError {
    /// A short reason that is stable across library versions, for the client: the
    /// `Display` text (with the JWT library's and serde's wording) is for the debug log only.
    pub fn reason(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind;
        match self {
            TokenError::TooLarge => "token too large",
            TokenError::Header => "token malformed",
            TokenError::NoSecret | TokenError::AlgorithmMismatch => "token algorithm not accepted",
            TokenError::NoKid | TokenError::UnknownKid => "token signing key unknown",
            TokenError::Role | TokenError::Subject => "token claims invalid",
            TokenError::Anonymous => "anonymous users are not allowed",
            TokenError::Invalid(e) => match e.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::ImmatureSignature => "token not yet valid",
                ErrorKind::InvalidSignature => "token signature invalid",
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                    "token malformed"
                }
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::MissingAlgorithm => "token algorithm not accepted",
                _ => "token claims invalid",
            },
        }
    }
}

/// The claims the router reads. A derived struct refuses duplicate fields.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Checked by `jsonwebtoken`; read here to bound the verified-token cache.
    exp: f64,
    role: String,
    #[serde(default)]
    is_anonymous: bool,
}

pub struct Verifier {
    hs256: Option<DecodingKey>,
    jwks: Arc<JwksCache>,
    issuer: String,
    leeway: u64,
    allow_anonymous: bool,
    verified: VerifiedTokens,
}

impl Verifier {
    pub fn new(config: &AuthConfig, jwks: Arc<JwksCache>) -> Self {
        Self {
            hs256: config.hs256_secret.as_ref().map(|s| DecodingKey::from_secret(s.as_bytes())),
            jwks,
            issuer: config.issuer.clone(),
            leeway: config.leeway_secs,
            allow_anonymous: config.allow_anonymous,
            verified: VerifiedTokens::new(),
        }
    }

    /// The user id of a valid token.
    pub async fn verify(&self, token: &str) -> Result<Uuid, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let cache_key = VerifiedTokens::key(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(user) = self.verified.get(&cache_key, now) {
            return Ok(user);
        }

        let (user, exp) = self.verify_signed(token).await?;
        self.verified.insert(cache_key, user, exp.saturating_add(self.leeway));
        Ok(user)
    }

    /// Checks the signature and the claims: the user id and the token's `exp`.
    async fn verify_signed(&self, token: &str) -> Result<(Uuid, u64), TokenError> {
        // `alg: none` and unknown algorithms fail here: jsonwebtoken has no such variant.
        let header = decode_header(token).map_err(|_| TokenError::Header)?;

        // The key decides the algorithm; the token's header only has to agree with it.
        let (key, algorithm) = match header.alg {
            Algorithm::HS256 => (self.hs256.clone().ok_or(TokenError::NoSecret)?, Algorithm::HS256),
            Algorithm::ES256 | Algorithm::RS256 => {
                let kid = header.kid.as_deref().ok_or(TokenError::NoKid)?;
                let found = self.jwks.key(kid).await.ok_or(TokenError::UnknownKid)?;
                if found.algorithm != header.alg {
                    return Err(TokenError::AlgorithmMismatch);
                }
                (found.key, found.algorithm)
            }
            _ => return Err(TokenError::Header),
        };

        let claims = decode::<Claims>(token, &key, &self.validation(algorithm))
            .map_err(TokenError::Invalid)?
            .claims;
        let user = self.check_claims(&claims)?;
        Ok((user, claims.exp as u64))
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&["authenticated"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        validation
    }

    fn check_claims(&self, claims: &Claims) -> Result<Uuid, TokenError> {
        if claims.role != "authenticated" {
            return Err(TokenError::Role);
        }
        if claims.is_anonymous && !self.allow_anonymous {
            return Err(TokenError::Anonymous);
        }
        // Only the canonical hyphenated lowercase form, as Supabase writes it.
        let id = Uuid::try_parse(&claims.sub).map_err(|_| TokenError::Subject)?;
        // The nil UUID is nobody's id: a token minted with it is forged or a test leftover.
        if id.as_hyphenated().to_string() != claims.sub || id.is_nil() {
            return Err(TokenError::Subject);
        }
        Ok(id)
    }
}
