//! Daemon routes that only an operator on the machine may call, never a user through the
//! router.

/// Paths the daemon serves for its operator, not for users: `/shutdown` drains the daemon and
/// makes it exit, so a user who reached it through the router would take their own machine
/// down (and the next requests would fail until the machine is woken again). The router
/// answers 404 for these, whatever the method, without waking or touching the machine.
pub const DAEMON_INTERNAL_ROUTES: &[&str] = &["/shutdown"];

/// Whether `path` names one of [`DAEMON_INTERNAL_ROUTES`] once normalised the way a server
/// might: percent-decoded (repeatedly, so `%252F` cannot hide a slash), empty and `.`
/// segments dropped, `..` resolved, compared without regard to ASCII case.
pub fn is_daemon_internal(path: &str) -> bool {
    let normalised = normalise(&decode_fully(path));
    DAEMON_INTERNAL_ROUTES.iter().any(|route| route.eq_ignore_ascii_case(&normalised))
}

/// Percent-decodes until nothing changes (bounded, since every round shortens the text).
fn decode_fully(path: &str) -> String {
    let mut text = path.to_owned();
    loop {
        let decoded = decode_once(&text);
        if decoded == text {
            return text;
        }
        text = decoded;
    }
}

fn decode_once(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/a//b/./c/../d/` becomes `/a/b/d`; backslashes count as slashes, as some servers treat
/// them.
fn normalise(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_and_its_spellings_are_internal() {
        for path in [
            "/shutdown",
            "//shutdown",
            "/shutdown/",
            "/./shutdown",
            "/x/../shutdown",
            "/%73hutdown",
            "/%2Fshutdown",
            "/%252Fshutdown",
            "/SHUTDOWN",
            "/shutdown%2F",
            "\\shutdown",
        ] {
            assert!(is_daemon_internal(path), "{path}");
        }
    }

    #[test]
    fn user_routes_are_not_internal() {
        for path in ["/", "/me", "/shutdown-notes", "/files/shutdown", "/shutdownx", "/%zz"] {
            assert!(!is_daemon_internal(path), "{path}");
        }
    }
}
