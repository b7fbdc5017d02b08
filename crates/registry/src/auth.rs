//! Registry auth: anonymous, basic, and the Bearer token flow a `WWW-Authenticate`
//! challenge starts (distribution's token spec). Tokens are cached per scope and reused
//! until shortly before they expire.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::stats::PushStats;
use crate::Error;

/// Tokens are refreshed this long before the expiry the token endpoint announced.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The lifetime the token spec says to assume when `expires_in` is missing.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// The longest a token is reused, whatever its endpoint says (a push never lasts a day).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How long to reuse a token: its `expires_in`, capped so that a hostile or broken token
/// endpoint cannot overflow the expiry instant.
fn token_lifetime(expires_in: Option<u64>) -> Duration {
    expires_in.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFETIME).min(MAX_TOKEN_LIFETIME)
}

/// What the client logs in with.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials; the registry or its token endpoint must allow anonymous push.
    #[default]
    Anonymous,
    /// A user and password, sent as basic auth to the registry or to its token endpoint.
    /// The Fly registry takes the user `x` and an API token as the password.
    Basic { user: String, password: String },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            // The password never reaches a log line.
            Credentials::Basic { user, .. } => {
                write!(f, "Basic {{ user: {user:?}, password: <redacted> }}")
            }
        }
    }
}

impl Credentials {
    fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Anonymous => None,
            Credentials::Basic { user, password } => {
                let raw = format!("{user}:{password}");
                Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
            }
        }
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String> },
}

impl Challenge {
    /// Parses `Basic realm="..."` or `Bearer realm="...",service="...",scope="..."`.
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(params);
        let realm = params.get("realm")?.clone();
        Some(Challenge::Bearer { realm, service: params.get("service").cloned() })
    }
}

/// `key="value", key=value` pairs; commas inside quotes are kept.
fn parse_params(input: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = input.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key, value.to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    params
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct CachedToken {
    value: String,
    expires: Instant,
}

/// Decides the `Authorization` header of each request to one registry.
pub(crate) struct Authorizer {
    credentials: Credentials,
    registry: String,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Held while a token is fetched, so that concurrent uploads wait for one token
    /// instead of each asking for their own.
    fetching: tokio::sync::Mutex<()>,
}

impl Authorizer {
    pub(crate) fn new(credentials: Credentials, registry: &str) -> Self {
        Self {
            credentials,
            registry: registry.to_owned(),
            challenge: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Records the challenge of a 401 answer.
    pub(crate) fn learn(&self, challenge: Challenge) {
        *self.challenge.lock().unwrap_or_else(|p| p.into_inner()) = Some(challenge);
    }

    /// Forgets the cached token of `scope`, after the registry refused it.
    pub(crate) fn forget(&self, scope: &str) {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).remove(scope);
    }

    /// The header to send for `scope` (`repository:name:pull,push` ..., space separated),
    /// fetching a token when the registry asked for Bearer and none is cached.
    pub(crate) async fn header(
        &self,
        http: &reqwest::Client,
        scope: &str,
        stats: &PushStats,
    ) -> Result<Option<String>, Error> {
        let challenge = self.challenge.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.basic_header()),
            Some(Challenge::Bearer { realm, service }) => {
                if let Some(token) = self.cached(scope) {
                    return Ok(Some(format!("Bearer {token}")));
                }
                let _single_flight = self.fetching.lock().await;
                if let Some(token) = self.cached(scope) {
                    return Ok(Some(format!("Bearer {token}")));
                }
                let token = self.fetch_token(http, &realm, service.as_deref(), scope).await?;
                stats.token_fetched();
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    fn cached(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let token = tokens.get(scope)?;
        (Instant::now() + EXPIRY_MARGIN < token.expires).then(|| token.value.clone())
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, Error> {
        let token_error = |problem: String| Error::Token {
            realm: realm.to_owned(),
            registry: self.registry.clone(),
            problem,
        };

        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service));
        }
        for one in scope.split(' ').filter(|s| !s.is_empty()) {
            query.push(("scope", one));
        }
        let mut request = http.get(realm).query(&query);
        if let Some(basic) = self.credentials.basic_header() {
            request = request.header(reqwest::header::AUTHORIZATION, basic);
        }

        let issued = Instant::now();
        let response = request.send().await.map_err(|e| token_error(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(token_error(format!("HTTP {status}")));
        }
        let body: TokenResponse =
            response.json().await.map_err(|e| token_error(format!("unreadable answer: {e}")))?;
        let Some(value) = body.token.or(body.access_token).filter(|t| !t.is_empty()) else {
            return Err(token_error("the answer holds no token".to_owned()));
        };

        let lifetime = token_lifetime(body.expires_in);
        let expires = issued + lifetime;
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.to_owned(), CachedToken { value: value.clone(), expires });
        tracing::debug!(
            registry = %self.registry,
            scope,
            lifetime_s = lifetime.as_secs(),
            "got a registry token",
        );
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes_are_capped() {
        assert_eq!(token_lifetime(None), DEFAULT_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(300));
        assert_eq!(token_lifetime(Some(u64::MAX)), MAX_TOKEN_LIFETIME);
        // The expiry instant of the largest lifetime is representable.
        assert!(Instant::now().checked_add(token_lifetime(Some(u64::MAX))).is_some());
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(Challenge::parse("Basic realm=\"Registry Realm\""), Some(Challenge::Basic));
        assert_eq!(
            Challenge::parse(
                "Bearer realm=\"https://auth.example/token\",service=\"registry.example\",\
                 scope=\"repository:a/b:pull,push\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
            })
        );
        assert_eq!(
            Challenge::parse("bearer realm=http://127.0.0.1:1/t"),
            Some(Challenge::Bearer { realm: "http://127.0.0.1:1/t".into(), service: None })
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let creds = Credentials::Basic { user: "x".into(), password: "s3cret".into() };
        assert!(!format!("{creds:?}").contains("s3cret"));
    }
}
