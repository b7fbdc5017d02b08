//! Header hygiene between the client and the daemon.
//!
//! Order matters (RFC 9110 §7.6.1, and the Go `ReverseProxy` bug where headers were
//! removed after the hook that added them): first everything the client may not pass on is
//! removed, then the router adds its own.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The verified user id the daemon receives.
pub const USER_ID_HEADER: &str = "x-matrix-user-id";
/// A request id, also sent back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Hop-by-hop fields (RFC 9110 §7.6.1 and the older `Keep-Alive`/`Proxy-Connection`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "trailer",
];

/// Forwarding and identity fields a client must never set, compared after folding `_` and
/// `.` to `-` (backends that read CGI-style names treat `X_Forwarded_For` as the same field).
const IDENTITY: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-request-id",
    "x-user-id",
    "x-auth-user",
    "x-authenticated-user",
    "x-remote-user",
    "remote-user",
];

/// Prefixes of the same kind: every `X-Forwarded-*`, every header Fly's proxy sets
/// (`Fly-Client-IP`, `Fly-Forwarded-Port`, `Fly-Region`, ...; a daemon behind Fly would trust
/// them) and every header of the router's own.
const IDENTITY_PREFIXES: &[&str] = &["x-forwarded-", "fly-", "x-matrix-", "x-original-"];

/// What the router adds to a request it forwards.
pub struct Forwarding<'a> {
    pub client_ip: IpAddr,
    pub request_id: &'a str,
    pub user_id: &'a str,
    pub daemon_token: &'a str,
    pub websocket: bool,
}

/// Turns the client's headers into the daemon's.
pub fn request_headers(inbound: &HeaderMap, forwarding: &Forwarding<'_>) -> HeaderMap {
    let mut headers = inbound.clone();
    remove_hop_by_hop(&mut headers);
    remove_identity(&mut headers);
    // The session cookie and the bearer token are the user's credentials: the daemon gets
    // its own token instead.
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::COOKIE);
    headers.remove(header::HOST);

    let value = |text: &str| HeaderValue::from_str(text).expect("router-made header value");
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        value(&forwarding.client_ip.to_string()),
    );
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("https"));
    headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), value(forwarding.request_id));
    headers.insert(HeaderName::from_static(USER_ID_HEADER), value(forwarding.user_id));
    headers.insert(header::AUTHORIZATION, value(&format!("Bearer {}", forwarding.daemon_token)));
    if forwarding.websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    headers
}

/// Cleans the daemon's response headers; a `101` keeps its `Upgrade`/`Connection`. CORS
/// headers are the router's to set (`auth::cors`): a daemon cannot widen who may read it.
pub fn response_headers(headers: &mut HeaderMap, switching_protocols: bool) {
    let upgrade = headers.get(header::UPGRADE).cloned();
    remove_hop_by_hop(headers);
    remove_cors(headers);
    if switching_protocols {
        if let Some(upgrade) = upgrade {
            headers.insert(header::UPGRADE, upgrade);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// Whether the request asks for a WebSocket: `Upgrade: websocket` on an HTTP/1.1 GET, or an
/// HTTP/2 extended CONNECT with `:protocol = websocket`. Any other upgrade (`h2c`, ...) is
/// dropped with the other hop-by-hop fields.
pub fn wants_websocket<B>(req: &http::Request<B>) -> bool {
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let http1 = req.method() == http::Method::GET
        && upgrade.is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    http1 || super::websocket::is_extended_connect(req)
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let nominated: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in nominated.iter().map(String::as_str).chain(HOP_BY_HOP.iter().copied()) {
        headers.remove(name);
    }
}

fn remove_cors(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

fn remove_identity(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> =
        headers.keys().filter(|name| is_identity(name.as_str())).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

fn is_identity(name: &str) -> bool {
    let folded: String = name
        .chars()
        .map(|c| if c == '_' || c == '.' { '-' } else { c.to_ascii_lowercase() })
        .collect();
    IDENTITY.contains(&folded.as_str()) || IDENTITY_PREFIXES.iter().any(|p| folded.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(inbound: &[(&str, &str)], expected: &[(&str, &str)]) {
        let mut headers = HeaderMap::new();
        for (name, value) in inbound {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("name");
            headers.append(name, value.parse().expect("value"));
        }
        let forwarding = Forwarding {
            client_ip: "203.0.113.7".parse().expect("ip"),
            request_id: "req-1",
            user_id: "u-1",
            daemon_token: "daemon",
            websocket: false,
        };
        let out = request_headers(&headers, &forwarding);
        let mut got: Vec<(String, String)> = out
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> =
            expected.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        want.sort();
        assert_eq!(got, want);
    }

    const ROUTER_SET: &[(&str, &str)] = &[
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "req-1"),
        ("x-matrix-user-id", "u-1"),
        ("authorization", "Bearer daemon"),
    ];

    #[test]
    fn spoofed_identity_and_hop_by_hop_headers_are_dropped() {
        let inbound = [
            ("accept", "text/event-stream"),
            ("authorization", "Bearer user-jwt"),
            ("cookie", "sb-x-auth-token=abc"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x_forwarded_for", "1.2.3.4"),
            ("x.forwarded.host", "evil"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-matrix-user-id", "someone-else"),
            ("x_matrix_user_id", "someone-else"),
            ("x-request-id", "client-chosen"),
            ("fly-client-ip", "1.2.3.4"),
            ("fly-forwarded-port", "443"),
            ("fly_region", "ams"),
            ("fly.request.id", "01H"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "nominated by connection"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("host", "router.example"),
        ];
        let mut expected = vec![("accept", "text/event-stream")];
        expected.extend_from_slice(ROUTER_SET);
        check(&inbound, &expected);
    }

    #[test]
    fn the_daemon_cannot_widen_cors_or_pass_hop_by_hop_fields() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("connection", "close"),
            ("upgrade", "websocket"),
        ] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        response_headers(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);
    }
}
