//! CORS for the browser app on an allowed origin.
//!
//! The router owns the policy: a preflight is answered here (it carries no credentials, so it
//! never reaches a daemon), and every response to a request from an allowed origin says that
//! origin may read it with credentials. A foreign origin gets no CORS header at all, so the
//! browser keeps the answer from its script; cookie authentication refuses it anyway.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::RouterBody;

/// What a preflight may ask for.
const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// How long a browser may reuse a preflight answer, in seconds.
const MAX_AGE_SECS: &str = "600";

/// A CORS preflight: `OPTIONS` with an `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: 204, with what may be asked when the origin is allowed
/// ([`apply`] adds the grant itself, as on every response).
pub fn preflight(allowed_origins: &[String], request: &HeaderMap) -> Response<RouterBody> {
    let mut response = Response::new(crate::body::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    if allowed_origin(allowed_origins, request.get(header::ORIGIN)).is_none() {
        return response;
    }

    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
    // The origin is trusted with credentials already; the headers it asks for are its own
    // business (the daemon token and identity headers are replaced by the router anyway).
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE_SECS));
    response
}

/// Sets the CORS headers of any response to a request from `origin`: the grant for an
/// allowed origin, none otherwise. (What a daemon says about CORS is dropped by
/// `proxy::headers`: it is not its call.)
pub fn apply(allowed_origins: &[String], origin: Option<&HeaderValue>, response: &mut HeaderMap) {
    if origin.is_none() {
        return;
    }
    response.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed_origin(allowed_origins, origin) {
        grant(response, origin);
    }
}

fn grant(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
}

/// The request's `Origin` when it is on the allowlist, byte for byte.
fn allowed_origin(allowed_origins: &[String], origin: Option<&HeaderValue>) -> Option<HeaderValue> {
    let origin = origin?;
    let text = origin.to_str().ok()?;
    allowed_origins.iter().any(|allowed| allowed == text).then(|| origin.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            let name = header::HeaderName::from_bytes(name.as_bytes()).expect("name");
            headers.append(name, value.parse().expect("value"));
        }
        headers
    }

    fn check(origin: Option<&str>, daemon: &[(&str, &str)], expected: &[(&str, &str)]) {
        let allowed = vec!["https://app.example".to_owned()];
        let inbound = request(&origin.map(|o| vec![("origin", o)]).unwrap_or_default());
        let mut response = request(daemon);
        apply(&allowed, inbound.get(header::ORIGIN), &mut response);
        let mut got: Vec<(String, String)> = response
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> =
            expected.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn only_an_allowed_origin_is_granted() {
        let daemon = [("content-type", "text/plain")];
        check(
            Some("https://app.example"),
            &daemon,
            &[
                ("content-type", "text/plain"),
                ("vary", "Origin"),
                ("access-control-allow-origin", "https://app.example"),
                ("access-control-allow-credentials", "true"),
            ],
        );
        check(
            Some("https://evil.example"),
            &daemon,
            &[("content-type", "text/plain"), ("vary", "Origin")],
        );
        check(Some("https://app.example.evil"), &[], &[("vary", "Origin")]);
        check(None, &daemon, &[("content-type", "text/plain")]);
    }
}
