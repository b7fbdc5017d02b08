//! The Supabase session cookie as `@supabase/ssr` writes it.
//!
//! Name `sb-<project ref>-auth-token`; a long value is split into `<name>.0`, `<name>.1`, ...;
//! the value is the JSON session, either raw (possibly percent-encoded) or `base64-` followed
//! by base64url. A value that does not decode to a session with an `access_token` is absent.

use base64::Engine;
use http::{header, HeaderMap};

/// Chunks beyond this many are ignored (a session is a few KiB; tokens are capped at 8 KiB).
const MAX_CHUNKS: usize = 8;

/// `sb-<ref>-auth-token`, where `<ref>` is the first label of the project's host name.
pub fn session_cookie_name(supabase_url: &str) -> String {
    let host = supabase_url.split("://").nth(1).unwrap_or(supabase_url);
    let host = host.split(['/', ':']).next().unwrap_or(host);
    let project_ref = host.split('.').next().unwrap_or(host);
    format!("sb-{project_ref}-auth-token")
}

/// The access token in the session cookie named `name`, if there is a well-formed one.
pub fn access_token(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = cookie_value(headers, name)?;
    let json = decode_value(&value)?;
    let session: serde_json::Value = serde_json::from_str(&json).ok()?;
    let token = match &session {
        serde_json::Value::Object(map) => map.get("access_token")?,
        // Older helpers stored `[access_token, refresh_token, ...]`.
        serde_json::Value::Array(items) => items.first()?,
        _ => return None,
    };
    token.as_str().filter(|t| !t.is_empty()).map(str::to_owned)
}

/// The whole value: the cookie itself, or its chunks `.0`, `.1`, ... joined in order.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let pairs: Vec<(&str, &str)> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .collect();
    let find = |wanted: &str| pairs.iter().find(|(n, _)| *n == wanted).map(|(_, v)| *v);

    if let Some(value) = find(name) {
        return Some(value.to_owned());
    }
    let mut joined = String::new();
    for index in 0..MAX_CHUNKS {
        match find(&format!("{name}.{index}")) {
            Some(chunk) => joined.push_str(chunk),
            None => break,
        }
    }
    (!joined.is_empty()).then_some(joined)
}

fn decode_value(value: &str) -> Option<String> {
    if let Some(encoded) = value.strip_prefix("base64-") {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .ok()?;
        return String::from_utf8(bytes).ok();
    }
    percent_decode(value)
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cookies: &[&str], expected: Option<&str>) {
        let mut headers = HeaderMap::new();
        for line in cookies {
            headers.append(header::COOKIE, line.parse().expect("header value"));
        }
        assert_eq!(access_token(&headers, "sb-abcd-auth-token").as_deref(), expected);
    }

    #[test]
    fn cookie_name_comes_from_the_project_host() {
        assert_eq!(session_cookie_name("https://abcd.supabase.co"), "sb-abcd-auth-token");
        assert_eq!(session_cookie_name("http://127.0.0.1:54321"), "sb-127-auth-token");
    }

    #[test]
    fn session_cookie_shapes() {
        let session = r#"{"access_token":"tok","refresh_token":"r"}"#;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(session);
        check(&[&format!("sb-abcd-auth-token=base64-{b64}")], Some("tok"));
        check(&["sb-abcd-auth-token=%7B%22access_token%22%3A%22tok%22%7D"], Some("tok"));
        check(&[r#"a=1; sb-abcd-auth-token=["tok","r"]"#], Some("tok"));
        let (first, second) = b64.split_at(10);
        check(
            &[
                &format!("sb-abcd-auth-token.1={second}"),
                &format!("sb-abcd-auth-token.0=base64-{first}"),
            ],
            Some("tok"),
        );
        // A missing chunk, another project's cookie, or garbage: no token.
        check(&[&format!("sb-abcd-auth-token.1={second}")], None);
        check(&[&format!("sb-other-auth-token=base64-{b64}")], None);
        check(&["sb-abcd-auth-token=base64-!!!"], None);
    }
}
