//! Health checks of machine processes, reported in a machine's `checks`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::types::{parse_go_duration, Check, CheckState, CheckStatus};

/// Where a check probes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub address: Ipv4Addr,
    /// The service port, for checks without their own.
    pub default_port: u16,
    /// The image map says this image fails its checks.
    pub fail_health: bool,
}

/// Which check of which machine process.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub app: String,
    pub machine: String,
    pub generation: u64,
    pub name: String,
}

/// A check's timings, with Fly's defaults for the ones not given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub grace_period: Duration,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Timing {
    pub fn of(check: &Check) -> Self {
        let parse = |text: &Option<String>, default: Duration| {
            text.as_deref().and_then(|t| parse_go_duration(t).ok()).unwrap_or(default)
        };
        Self {
            grace_period: parse(&check.grace_period, Duration::from_secs(1)),
            interval: parse(&check.interval, Duration::from_secs(15))
                .max(Duration::from_millis(100)),
            timeout: parse(&check.timeout, Duration::from_secs(2)),
        }
    }
}

/// What a freshly started machine reports before its first check ran.
pub(crate) fn initial(checks: &BTreeMap<String, Check>) -> Vec<CheckStatus> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    checks
        .keys()
        .map(|name| CheckStatus {
            name: name.clone(),
            status: CheckState::Warning,
            output: "waiting for the first check".to_owned(),
            updated_at: now.clone(),
        })
        .collect()
}

/// Runs a check once: an HTTP request when the check is `http` (or has a path), a TCP
/// connect otherwise.
pub(crate) async fn probe(
    check: &Check,
    target: &Target,
    timeout: Duration,
) -> (CheckState, String) {
    if target.fail_health {
        return (CheckState::Critical, "the image map marks this image as unhealthy".to_owned());
    }
    let address = SocketAddr::from((target.address, check.port.unwrap_or(target.default_port)));
    let is_http = check.kind.as_deref() == Some("http") || check.path.is_some();
    if !is_http {
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => (CheckState::Passing, format!("connected to {address}")),
            Ok(Err(e)) => (CheckState::Critical, format!("connecting to {address}: {e}")),
            Err(_) => (CheckState::Critical, format!("connecting to {address}: timed out")),
        };
    }

    let path = check.path.as_deref().unwrap_or("/");
    let method = check.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return (CheckState::Critical, format!("invalid method {method:?}"));
    };
    let url = format!("http://{address}{path}");
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let Ok(client) = client else {
        return (CheckState::Critical, "could not build an HTTP client".to_owned());
    };
    match client.request(method, &url).send().await {
        Ok(response) if response.status().is_success() => {
            (CheckState::Passing, format!("{} {url}", response.status()))
        }
        Ok(response) => (CheckState::Critical, format!("{} {url}", response.status())),
        Err(e) => (CheckState::Critical, format!("GET {url}: {e}")),
    }
}
