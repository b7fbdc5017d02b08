//! The router's settings, read from the environment in one place.
//!
//! Every variable name is a constant below. [`Config::from_lookup`] takes the lookup as a
//! function so tests pass a map; a missing or malformed value is a [`ConfigError`] that names
//! the variable, and `main` turns it into exit status 64 before any socket is bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub const ROUTER_LISTEN_ADDR: &str = "ROUTER_LISTEN_ADDR";
pub const ROUTER_TLS_CERT: &str = "ROUTER_TLS_CERT";
pub const ROUTER_TLS_KEY: &str = "ROUTER_TLS_KEY";
pub const ROUTER_DEV_MODE: &str = "ROUTER_DEV_MODE";
pub const SUPABASE_URL: &str = "SUPABASE_URL";
pub const SUPABASE_JWT_SECRET: &str = "SUPABASE_JWT_SECRET";
pub const SUPABASE_JWT_ISSUER: &str = "SUPABASE_JWT_ISSUER";
pub const SUPABASE_JWKS_URL: &str = "SUPABASE_JWKS_URL";
pub const ROUTER_JWT_LEEWAY_SECS: &str = "ROUTER_JWT_LEEWAY_SECS";
pub const ROUTER_ALLOW_ANONYMOUS: &str = "ROUTER_ALLOW_ANONYMOUS";
pub const ROUTER_ALLOWED_ORIGINS: &str = "ROUTER_ALLOWED_ORIGINS";
pub const DATABASE_URL: &str = "DATABASE_URL";
pub const FLY_API_URL: &str = "FLY_API_URL";
pub const FLY_API_TOKEN: &str = "FLY_API_TOKEN";
pub const FLY_APP_NAME: &str = "FLY_APP_NAME";
pub const FLY_REGION: &str = "FLY_REGION";
pub const ROUTER_DAEMON_IMAGE: &str = "ROUTER_DAEMON_IMAGE";
pub const ROUTER_DAEMON_TEMPLATE: &str = "ROUTER_DAEMON_TEMPLATE";
pub const ROUTER_DAEMON_PORT: &str = "ROUTER_DAEMON_PORT";
pub const ROUTER_DAEMON_TOKEN_SECRET: &str = "ROUTER_DAEMON_TOKEN_SECRET";
pub const ROUTER_VOLUME_SIZE_GB: &str = "ROUTER_VOLUME_SIZE_GB";
pub const ROUTER_IDLE_SUSPEND_SECS: &str = "ROUTER_IDLE_SUSPEND_SECS";
pub const ROUTER_WAKE_TIMEOUT_SECS: &str = "ROUTER_WAKE_TIMEOUT_SECS";
pub const ROUTER_READY_TIMEOUT_SECS: &str = "ROUTER_READY_TIMEOUT_SECS";
pub const ROUTER_MAX_PENDING_WAKES: &str = "ROUTER_MAX_PENDING_WAKES";
pub const ROUTER_WAKE_TOKEN: &str = "ROUTER_WAKE_TOKEN";
pub const ROUTER_ADMIN_TOKEN: &str = "ROUTER_ADMIN_TOKEN";
pub const ROUTER_METRICS_TOKEN: &str = "ROUTER_METRICS_TOKEN";
pub const ROUTER_MAX_BODY_BYTES: &str = "ROUTER_MAX_BODY_BYTES";
pub const ROUTER_HEADER_READ_TIMEOUT_SECS: &str = "ROUTER_HEADER_READ_TIMEOUT_SECS";
pub const ROUTER_BODY_IDLE_TIMEOUT_SECS: &str = "ROUTER_BODY_IDLE_TIMEOUT_SECS";
pub const ROUTER_TLS_HANDSHAKE_TIMEOUT_SECS: &str = "ROUTER_TLS_HANDSHAKE_TIMEOUT_SECS";
pub const ROUTER_UPSTREAM_CONNECT_TIMEOUT_SECS: &str = "ROUTER_UPSTREAM_CONNECT_TIMEOUT_SECS";
pub const ROUTER_UPSTREAM_HEADERS_TIMEOUT_SECS: &str = "ROUTER_UPSTREAM_HEADERS_TIMEOUT_SECS";
pub const ROUTER_H2_MAX_STREAMS: &str = "ROUTER_H2_MAX_STREAMS";
pub const ROUTER_SHUTDOWN_GRACE_SECS: &str = "ROUTER_SHUTDOWN_GRACE_SECS";
pub const ROUTER_DATABASE_TIMEOUT_SECS: &str = "ROUTER_DATABASE_TIMEOUT_SECS";
/// Extra certificates to trust for the database's TLS (`sslmode=require`), as libpq reads it.
pub const PGSSLROOTCERT: &str = rollout::pg_tls::PGSSLROOTCERT;

/// Daemon token secrets shorter than this are refused: the HMAC key must not be guessable.
const MIN_SECRET_LEN: usize = 32;

/// The wake and admin bearer tokens shorter than this are refused: they guard operator routes
/// on the public listener.
const MIN_BEARER_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not set")]
    Missing { name: &'static str },
    #[error("{name} is malformed: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("{name} is not valid UTF-8")]
    NotUnicode { name: String },
}

/// The prefixes and names of the variables the router reads.
const PREFIXES: &[&str] = &["ROUTER_", "SUPABASE_", "FLY_", "DATABASE_URL", PGSSLROOTCERT];

/// Where the TLS certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files: a certificate chain and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// A self-signed certificate made at start (dev mode only).
    SelfSigned,
}

/// Everything the router reads at start. Secrets are kept out of `Debug`.
#[derive(Clone)]
pub struct Config {
    /// Address the public listener binds.
    pub listen_addr: SocketAddr,
    pub tls: TlsSource,
    /// Dev mode: self-signed certificate allowed.
    pub dev_mode: bool,
    pub auth: AuthConfig,
    /// PostgreSQL connection URL (user -> machine records).
    pub database_url: String,
    /// Bound on one database operation, waiting for a connection included.
    pub database_timeout: Duration,
    /// PEM certificates trusted for the database's TLS besides the Mozilla roots.
    pub database_root_cert: Option<PathBuf>,
    pub fly: FlyConfig,
    pub daemon: DaemonConfig,
    pub wake: WakeConfig,
    /// Bearer token for `POST /internal/wake`; the route answers 404 when unset.
    pub wake_token: Option<String>,
    /// Bearer token for `/admin/users`; the routes are absent when unset.
    pub admin_token: Option<String>,
    /// Bearer token for `/metrics`; without it the metrics are public.
    pub metrics_token: Option<String>,
    pub limits: Limits,
    /// On SIGTERM, how long open requests and streams may take to finish before they are cut.
    pub shutdown_grace: Duration,
}

/// How user tokens are verified.
#[derive(Clone)]
pub struct AuthConfig {
    /// The project URL, e.g. `https://abcd.supabase.co`; the cookie name derives from it.
    pub supabase_url: String,
    /// Legacy HS256 shared secret; HS256 tokens are refused when unset.
    pub hs256_secret: Option<String>,
    /// Expected `iss`, compared byte for byte.
    pub issuer: String,
    /// Where the project's public keys are published.
    pub jwks_url: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Whether Supabase anonymous users (`is_anonymous: true`) may reach a machine.
    pub allow_anonymous: bool,
    /// Origins allowed on cookie-authenticated requests (exact `scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
}

/// The Fly Machines API and the app the per-user machines live in.
#[derive(Clone)]
pub struct FlyConfig {
    pub api_url: String,
    pub api_token: String,
    pub app_name: String,
    pub region: String,
}

/// What a per-user machine is made from.
#[derive(Clone)]
pub struct DaemonConfig {
    pub image: String,
    pub template: PathBuf,
    /// The daemon's port on the machine's private address.
    pub port: u16,
    /// HMAC key from which every machine's daemon token is derived.
    pub token_secret: String,
    pub volume_size_gb: u32,
}

/// Waking and idling.
#[derive(Clone, Debug)]
pub struct WakeConfig {
    pub idle_suspend: Duration,
    /// Bound on `start` + `wait` for `started`.
    pub wake_timeout: Duration,
    /// Bound on polling the daemon's `/healthz` after the machine started.
    pub ready_timeout: Duration,
    /// Requests allowed to wait on wakes at once; past it, 503 with `Retry-After`.
    pub max_pending_wakes: usize,
}

/// Limits and timeouts of the public listener and the upstream side.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: u64,
    /// Time to read a request head; also bounds an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// A request body that sends nothing for this long is cut (408 when no response started).
    pub body_idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_headers_timeout: Duration,
    pub h2_max_streams: u32,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("tls", &self.tls)
            .field("dev_mode", &self.dev_mode)
            .field("issuer", &self.auth.issuer)
            .field("fly_app", &self.fly.app_name)
            .field("wake", &self.wake)
            .field("limits", &self.limits)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A value that is not UTF-8 would read as unset and quietly take the default.
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if value.to_str().is_none() && PREFIXES.iter().any(|p| name.starts_with(p)) {
                return Err(ConfigError::NotUnicode { name: name.to_owned() });
            }
        }
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads from a map (tests).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(|name| map.get(name).cloned())
    }

    /// Reads every variable through `lookup`; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env { lookup: &lookup };

        let dev_mode = env.parse_or(ROUTER_DEV_MODE, false, parse_bool)?;
        let tls = match (env.get(ROUTER_TLS_CERT), env.get(ROUTER_TLS_KEY)) {
            (Some(cert), Some(key)) => TlsSource::Files { cert: cert.into(), key: key.into() },
            (Some(_), None) => return Err(ConfigError::Missing { name: ROUTER_TLS_KEY }),
            (None, Some(_)) => return Err(ConfigError::Missing { name: ROUTER_TLS_CERT }),
            (None, None) if dev_mode => TlsSource::SelfSigned,
            (None, None) => return Err(ConfigError::Missing { name: ROUTER_TLS_CERT }),
        };

        let supabase_url = env.required(SUPABASE_URL)?.trim_end_matches('/').to_owned();
        check_url(SUPABASE_URL, &supabase_url)?;
        // Set but blank is a mistake, not "use the default": the issuer is compared byte for
        // byte.
        if (env.lookup)(SUPABASE_JWT_ISSUER).is_some_and(|v| v.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                name: SUPABASE_JWT_ISSUER,
                reason: "is blank; unset it to use $SUPABASE_URL/auth/v1".into(),
            });
        }
        let issuer =
            env.get(SUPABASE_JWT_ISSUER).unwrap_or_else(|| format!("{supabase_url}/auth/v1"));
        let jwks_url = env
            .get(SUPABASE_JWKS_URL)
            .unwrap_or_else(|| format!("{supabase_url}/auth/v1/.well-known/jwks.json"));
        check_url(SUPABASE_JWKS_URL, &jwks_url)?;
        let allowed_origins: Vec<String> = env
            .get(ROUTER_ALLOWED_ORIGINS)
            .map(|list| {
                list.split(',').map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect()
            })
            .unwrap_or_default();
        if let Some(bad) = allowed_origins.iter().find(|o| !is_origin(o)) {
            return Err(ConfigError::Invalid {
                name: ROUTER_ALLOWED_ORIGINS,
                reason: format!("{bad:?} is not an origin like https://app.example.com"),
            });
        }
        let auth = AuthConfig {
            supabase_url,
            hs256_secret: env.get(SUPABASE_JWT_SECRET),
            issuer,
            jwks_url,
            leeway_secs: env.parse_or(ROUTER_JWT_LEEWAY_SECS, 30, parse_from_str)?,
            allow_anonymous: env.parse_or(ROUTER_ALLOW_ANONYMOUS, false, parse_bool)?,
            allowed_origins,
        };

        let api_url = env.get(FLY_API_URL).unwrap_or_else(|| "https://api.machines.dev".into());
        check_url(FLY_API_URL, &api_url)?;
        let fly = FlyConfig {
            api_url,
            api_token: env.required(FLY_API_TOKEN)?,
            app_name: env.required(FLY_APP_NAME)?,
            region: env.required(FLY_REGION)?,
        };

        let token_secret = env.required(ROUTER_DAEMON_TOKEN_SECRET)?;
        if token_secret.len() < MIN_SECRET_LEN {
            return Err(ConfigError::Invalid {
                name: ROUTER_DAEMON_TOKEN_SECRET,
                reason: format!("must be at least {MIN_SECRET_LEN} bytes"),
            });
        }
        let daemon = DaemonConfig {
            image: env.required(ROUTER_DAEMON_IMAGE)?,
            template: env
                .get(ROUTER_DAEMON_TEMPLATE)
                .unwrap_or_else(|| "deploy/daemon/fly.toml.tmpl".into())
                .into(),
            port: env.parse_or(ROUTER_DAEMON_PORT, 8080, parse_from_str)?,
            token_secret,
            volume_size_gb: env.parse_or(ROUTER_VOLUME_SIZE_GB, 1, parse_positive)?,
        };

        let wake = WakeConfig {
            idle_suspend: env.parse_or(ROUTER_IDLE_SUSPEND_SECS, secs(900), parse_secs)?,
            wake_timeout: env.parse_or(ROUTER_WAKE_TIMEOUT_SECS, secs(120), parse_secs)?,
            ready_timeout: env.parse_or(ROUTER_READY_TIMEOUT_SECS, secs(30), parse_secs)?,
            max_pending_wakes: env.parse_or(ROUTER_MAX_PENDING_WAKES, 1000, parse_positive)?,
        };
        let limits = Limits {
            max_body_bytes: env.parse_or(ROUTER_MAX_BODY_BYTES, 10 << 20, parse_positive)?,
            header_read_timeout: env.parse_or(
                ROUTER_HEADER_READ_TIMEOUT_SECS,
                secs(30),
                parse_secs,
            )?,
            body_idle_timeout: env.parse_or(ROUTER_BODY_IDLE_TIMEOUT_SECS, secs(30), parse_secs)?,
            tls_handshake_timeout: env.parse_or(
                ROUTER_TLS_HANDSHAKE_TIMEOUT_SECS,
                secs(10),
                parse_secs,
            )?,
            upstream_connect_timeout: env.parse_or(
                ROUTER_UPSTREAM_CONNECT_TIMEOUT_SECS,
                secs(5),
                parse_secs,
            )?,
            upstream_headers_timeout: env.parse_or(
                ROUTER_UPSTREAM_HEADERS_TIMEOUT_SECS,
                secs(120),
                parse_secs,
            )?,
            h2_max_streams: env.parse_or(ROUTER_H2_MAX_STREAMS, 100, parse_positive)?,
        };

        Ok(Config {
            listen_addr: env.parse_or(
                ROUTER_LISTEN_ADDR,
                SocketAddr::from(([0u16; 8], 443)),
                parse_from_str,
            )?,
            tls,
            dev_mode,
            auth,
            database_url: env.parse(DATABASE_URL, parse_database_url)?,
            database_timeout: env.parse_or(ROUTER_DATABASE_TIMEOUT_SECS, secs(10), parse_secs)?,
            database_root_cert: env.get(PGSSLROOTCERT).map(PathBuf::from),
            fly,
            daemon,
            wake,
            wake_token: env.bearer_token(ROUTER_WAKE_TOKEN)?,
            admin_token: env.bearer_token(ROUTER_ADMIN_TOKEN)?,
            metrics_token: env.bearer_token(ROUTER_METRICS_TOKEN)?,
            limits,
            shutdown_grace: env.parse_or(ROUTER_SHUTDOWN_GRACE_SECS, secs(30), parse_secs)?,
        })
    }
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name).ok_or(ConfigError::Missing { name })
    }

    fn parse<T>(
        &self,
        name: &'static str,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let raw = self.required(name)?;
        parse(raw.trim()).map_err(|reason| ConfigError::Invalid { name, reason })
    }

    /// An optional bearer token; when set, long enough not to be guessed.
    fn bearer_token(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            Some(token) if token.len() < MIN_BEARER_LEN => Err(ConfigError::Invalid {
                name,
                reason: format!("must be at least {MIN_BEARER_LEN} bytes"),
            }),
            token => Ok(token),
        }
    }

    fn parse_or<T>(
        &self,
        name: &'static str,
        default: T,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => parse(raw.trim()).map_err(|reason| ConfigError::Invalid { name, reason }),
        }
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn parse_from_str<T: FromStr>(raw: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    raw.parse().map_err(|e: T::Err| format!("{e} (got {raw:?})"))
}

/// A count or size where 0 would refuse everything (or nothing would fit).
fn parse_positive<T: FromStr + Default + PartialEq>(raw: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let n: T = parse_from_str(raw)?;
    if n == T::default() {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// Parsed as the PostgreSQL client will, so a bad URL stops the router at start. The
/// reason never repeats the URL, which may hold a password.
fn parse_database_url(raw: &str) -> Result<String, String> {
    raw.parse::<tokio_postgres::Config>()
        .map_err(|_| "expected a URL like postgres://user@host:5432/matrix".to_owned())?;
    Ok(raw.to_owned())
}

fn parse_secs(raw: &str) -> Result<Duration, String> {
    let n: u64 = parse_from_str(raw)?;
    if n == 0 {
        return Err("must be at least 1 second".into());
    }
    Ok(Duration::from_secs(n))
}

fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false (got {raw:?})")),
    }
}

/// `scheme://host[:port]`, nothing more: what browsers send in `Origin`.
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else { return false };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@'])
        && rest.parse::<http::uri::Authority>().is_ok()
}

fn check_url(name: &'static str, url: &str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { name, reason: "expected an http(s) URL".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            (ROUTER_DEV_MODE, "true"),
            (SUPABASE_URL, "https://abcd.supabase.co/"),
            (DATABASE_URL, "postgres://localhost/matrix"),
            (FLY_API_TOKEN, "t"),
            (FLY_APP_NAME, "matrix-users"),
            (FLY_REGION, "ams"),
            (ROUTER_DAEMON_IMAGE, "registry.example/daemon:1"),
            (ROUTER_DAEMON_TOKEN_SECRET, "0123456789abcdef0123456789abcdef"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn check_err(name: &str, value: Option<&str>, expected: &str) {
        let mut map = base();
        match value {
            Some(v) => map.insert(name.to_owned(), v.to_owned()),
            None => map.remove(name),
        };
        let err = Config::from_map(&map).expect_err("config should be refused");
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn defaults_follow_the_supabase_url() {
        let config = Config::from_map(&base()).expect("valid config");
        assert_eq!(config.auth.issuer, "https://abcd.supabase.co/auth/v1");
        assert_eq!(config.auth.jwks_url, "https://abcd.supabase.co/auth/v1/.well-known/jwks.json");
        assert_eq!(config.listen_addr.to_string(), "[::]:443");
        assert_eq!(config.tls, TlsSource::SelfSigned);
        assert_eq!(config.daemon.port, 8080);
        assert!(!config.auth.allow_anonymous);
    }

    /// Values out of range are refused at start, naming the variable.
    #[test]
    fn out_of_range_values_are_refused() {
        let cases: &[(&str, &str, &str)] = &[
            (ROUTER_MAX_BODY_BYTES, "0", "ROUTER_MAX_BODY_BYTES is malformed: must be at least 1"),
            (ROUTER_H2_MAX_STREAMS, "0", "ROUTER_H2_MAX_STREAMS is malformed: must be at least 1"),
            (
                ROUTER_MAX_PENDING_WAKES,
                "0",
                "ROUTER_MAX_PENDING_WAKES is malformed: must be at least 1",
            ),
            (ROUTER_VOLUME_SIZE_GB, "0", "ROUTER_VOLUME_SIZE_GB is malformed: must be at least 1"),
            (
                ROUTER_ADMIN_TOKEN,
                "short-token",
                "ROUTER_ADMIN_TOKEN is malformed: must be at least 16 bytes",
            ),
            (
                ROUTER_WAKE_TOKEN,
                "short-token",
                "ROUTER_WAKE_TOKEN is malformed: must be at least 16 bytes",
            ),
            (
                SUPABASE_JWT_ISSUER,
                "  ",
                "SUPABASE_JWT_ISSUER is malformed: is blank; unset it to use $SUPABASE_URL/auth/v1",
            ),
            (
                DATABASE_URL,
                "notaurl",
                "DATABASE_URL is malformed: expected a URL like postgres://user@host:5432/matrix",
            ),
        ];
        for (name, value, expected) in cases {
            check_err(name, Some(value), expected);
        }
        let mut map = base();
        map.insert(ROUTER_ADMIN_TOKEN.into(), "sixteen-bytes-ok".into());
        map.insert(ROUTER_MAX_BODY_BYTES.into(), "1".into());
        let config = Config::from_map(&map).expect("the smallest allowed values");
        assert_eq!(config.admin_token.as_deref(), Some("sixteen-bytes-ok"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        check_err(DATABASE_URL, None, "DATABASE_URL is not set");
        check_err(ROUTER_DEV_MODE, Some("false"), "ROUTER_TLS_CERT is not set");
        check_err(
            ROUTER_DEV_MODE,
            Some("maybe"),
            "ROUTER_DEV_MODE is malformed: expected true or false (got \"maybe\")",
        );
        check_err(
            ROUTER_LISTEN_ADDR,
            Some("localhost"),
            "ROUTER_LISTEN_ADDR is malformed: invalid socket address syntax (got \"localhost\")",
        );
        check_err(
            ROUTER_IDLE_SUSPEND_SECS,
            Some("0"),
            "ROUTER_IDLE_SUSPEND_SECS is malformed: must be at least 1 second",
        );
        check_err(
            ROUTER_DAEMON_TOKEN_SECRET,
            Some("short"),
            "ROUTER_DAEMON_TOKEN_SECRET is malformed: must be at least 32 bytes",
        );
        check_err(
            SUPABASE_URL,
            Some("abcd.supabase.co"),
            "SUPABASE_URL is malformed: expected an http(s) URL",
        );
        check_err(
            ROUTER_ALLOWED_ORIGINS,
            Some("https://a.example, https://b.example/app"),
            "ROUTER_ALLOWED_ORIGINS is malformed: \"https://b.example/app\" is not an origin \
                like https://app.example.com",
        );
    }
}
