//! What can go wrong during a push; every variant names what was being pushed and where.

use std::path::PathBuf;

use serde::Deserialize;

/// A push failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference could not be parsed.
    #[error("invalid image reference {input:?}: {reason}")]
    Reference { input: String, reason: &'static str },

    /// The OCI layout on disk is missing a file or holds something unexpected.
    #[error("reading the OCI layout at {path}: {reason}")]
    Layout { path: PathBuf, reason: String },

    /// A blob or manifest file of the layout could not be read.
    #[error("reading {what} from {path}")]
    Read {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The registry answered with an error status.
    #[error("{op} {what} at {registry}: HTTP {status}{}", describe(code, message))]
    Registry {
        op: &'static str,
        what: String,
        registry: String,
        status: u16,
        /// The first error code of the body (`BLOB_UNKNOWN`, `DIGEST_INVALID`, ...).
        code: Option<String>,
        message: Option<String>,
    },

    /// The request never got an answer (refused, reset, timed out), after every retry.
    #[error("{op} {what} at {registry}: no answer after {attempts} attempts")]
    Transport {
        op: &'static str,
        what: String,
        registry: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },

    /// The registry's answer lacked something the protocol requires.
    #[error("{op} {what} at {registry}: {problem}")]
    Protocol { op: &'static str, what: String, registry: String, problem: String },

    /// The token endpoint named by the registry's challenge refused or failed.
    #[error("getting a token from {realm} for {registry}: {problem}")]
    Token { realm: String, registry: String, problem: String },
}

impl Error {
    /// The registry's error code, when the registry sent one.
    pub fn registry_code(&self) -> Option<&str> {
        match self {
            Error::Registry { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

fn describe(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(code), Some(message)) => format!(" {code}: {message}"),
        (Some(code), None) => format!(" {code}"),
        (None, Some(message)) => format!(": {message}"),
        (None, None) => String::new(),
    }
}

/// The error body of the distribution spec: `{"errors":[{"code","message","detail"}]}`.
#[derive(Debug, Deserialize)]
pub struct RegistryErrorBody {
    #[serde(default)]
    pub errors: Vec<RegistryErrorEntry>,
}

/// One entry of [`RegistryErrorBody`].
#[derive(Debug, Deserialize)]
pub struct RegistryErrorEntry {
    pub code: String,
    #[serde(default)]
    pub message: Option<String>,
}

impl RegistryErrorBody {
    /// The first code and message of a body, or nothing when it is not the spec's JSON.
    pub fn parse(body: &[u8]) -> (Option<String>, Option<String>) {
        match serde_json::from_slice::<RegistryErrorBody>(body) {
            Ok(parsed) => match parsed.errors.into_iter().next() {
                Some(first) => {
                    (Some(sanitize(&first.code)), first.message.as_deref().map(sanitize))
                }
                None => (None, None),
            },
            Err(_) => (None, None),
        }
    }
}

/// The most of a registry's text that goes into an error.
const MAX_ECHOED: usize = 300;

/// A registry's text made safe to print: a hostile or careless registry may echo the
/// request's `Authorization` header, so any credential in it is blanked, control
/// characters are dropped, and it is cut to [`MAX_ECHOED`] characters.
pub(crate) fn sanitize(text: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut hide_next = false;
    for word in text.split_whitespace() {
        let lower = word.to_ascii_lowercase();
        if hide_next {
            words.push("[redacted]".to_owned());
            let bare = lower.trim_end_matches([':', '=']);
            hide_next = matches!(bare, "authorization" | "basic" | "bearer");
            continue;
        }
        let scheme = lower.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
        if scheme.starts_with("authorization") || scheme == "basic" || scheme == "bearer" {
            hide_next = true;
            // `authorization:basic,xyz` style: keep the name, drop what follows it.
            let name_end = word.find([':', '=']).map_or(word.len(), |i| i + 1);
            let (name, rest) = word.split_at(name_end);
            words.push(name.to_owned());
            if !rest.is_empty() {
                words.push("[redacted]".to_owned());
            }
            continue;
        }
        if scheme.starts_with("basic") || scheme.starts_with("bearer") {
            // `Basic=...`, `Bearer:...`: a scheme glued to its credential.
            words.push("[redacted]".to_owned());
            continue;
        }
        words.push(word.chars().filter(|c| !c.is_control()).collect());
    }
    let joined = words.join(" ");
    if joined.chars().count() <= MAX_ECHOED {
        return joined;
    }
    let cut: String = joined.chars().take(MAX_ECHOED).collect();
    format!("{cut}... (cut)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, expected: (Option<&str>, Option<&str>)) {
        let (code, message) = RegistryErrorBody::parse(body.as_bytes());
        assert_eq!((code.as_deref(), message.as_deref()), expected, "for {body}");
    }

    #[test]
    fn error_bodies_never_echo_credentials() {
        check(
            r#"{"errors":[{"code":"DENIED","message":"no: Authorization: Basic eDpzZWNyZXQ="}]}"#,
            (Some("DENIED"), Some("no: Authorization: [redacted] [redacted]")),
        );
        check(
            r#"{"errors":[{"code":"DENIED","message":"got bearer abc.def.ghi here"}]}"#,
            (Some("DENIED"), Some("got bearer [redacted] here")),
        );
        check(
            r#"{"errors":[{"code":"Basic eDpzZWNyZXQ=","message":"authorization=Bearer x"}]}"#,
            (Some("Basic [redacted]"), Some("authorization= [redacted] [redacted]")),
        );
        check(r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#, (Some("BLOB_UNKNOWN"), None));
    }

    #[test]
    fn long_error_bodies_are_cut() {
        let long = "x".repeat(10_000);
        let body = format!(r#"{{"errors":[{{"code":"DENIED","message":"{long}"}}]}}"#);
        let (_, message) = RegistryErrorBody::parse(body.as_bytes());
        let message = message.expect("message");
        assert!(message.len() < 400, "{} chars", message.len());
        assert!(message.ends_with("... (cut)"));
    }
}
