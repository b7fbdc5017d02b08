//! The environment the assembler reads, in one place.

use std::path::PathBuf;

/// Seconds since the epoch used as every file's mtime and the image's `created` (default 1).
pub const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";
/// Where Nix (2.16 and later) put the structured attributes; older Nix leaves
/// `.attrs.json` in the build directory, which is the default.
pub const NIX_ATTRS_JSON_FILE: &str = "NIX_ATTRS_JSON_FILE";

const DEFAULT_EPOCH: u64 = 1;
const DEFAULT_ATTRS_FILE: &str = ".attrs.json";

#[derive(Debug, Clone)]
pub struct Config {
    /// The fixed timestamp of every file and of the image config.
    pub epoch: u64,
    /// The `.attrs.json` of the derivation being built.
    pub attrs_file: PathBuf,
}

/// A variable that is set but unusable.
#[derive(Debug, thiserror::Error)]
#[error("{name} is malformed: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let epoch = match get(SOURCE_DATE_EPOCH) {
            None => DEFAULT_EPOCH,
            Some(value) => value.trim().parse().map_err(|_| ConfigError {
                name: SOURCE_DATE_EPOCH,
                reason: "expected whole seconds since 1970 (for example 1)".into(),
            })?,
        };
        let attrs_file = match get(NIX_ATTRS_JSON_FILE) {
            Some(path) if path.is_empty() => {
                return Err(ConfigError { name: NIX_ATTRS_JSON_FILE, reason: "empty".into() })
            }
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(DEFAULT_ATTRS_FILE),
        };
        Ok(Self { epoch, attrs_file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| {
            pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let c = config(&[]).unwrap();
        assert_eq!(c.epoch, 1);
        assert_eq!(c.attrs_file, PathBuf::from(".attrs.json"));
        assert_eq!(config(&[(SOURCE_DATE_EPOCH, "1700000000")]).unwrap().epoch, 1_700_000_000);
        let err = config(&[(SOURCE_DATE_EPOCH, "yesterday")]).unwrap_err();
        assert!(err.to_string().starts_with("SOURCE_DATE_EPOCH is malformed"), "{err}");
    }
}
