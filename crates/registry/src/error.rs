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
                Some(first) => (Some(first.code), first.message),
                None => (None, None),
            },
            Err(_) => (None, None),
        }
    }
}
