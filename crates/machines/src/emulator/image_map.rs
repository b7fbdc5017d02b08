//! The image map: which local command runs a machine of a given image.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Maps image references to local commands, plus the app-wide environment (Fly's app
/// secrets).
///
/// As JSON (the `fly-emulator --image-map` file):
///
/// ```json
/// {
///   "images": {
///     "registry.example/matrix:*": {"command": ["matrixd", "--listen", "{private_ip}:{port}"]},
///     "busybox": {"command": ["sleep", "600"], "env": {"A": "1"}, "fail_health": false}
///   },
///   "app_env": {"MATRIX_LOG": "info"}
/// }
/// ```
///
/// A key ending in `*` matches every reference starting with what comes before it; an
/// exact key wins over prefixes, and a longer prefix over a shorter one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageMap {
    /// Image reference (or `prefix*`) to the command that stands in for it.
    #[serde(default)]
    pub images: BTreeMap<String, ImageSpec>,
    /// Environment every machine gets, under its own `config.env`.
    #[serde(default)]
    pub app_env: BTreeMap<String, String>,
}

/// What runs for one image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Program and arguments; placeholders `{private_ip}`, `{port}`, `{machine_id}`,
    /// `{app}` and `{mount:/path}` are substituted.
    pub command: Vec<String>,
    /// Environment of the image (wins over `config.env`, as an image's own settings do).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Report every health check of such a machine as critical.
    #[serde(default)]
    pub fail_health: bool,
}

/// The image map file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageMapError {
    /// The file could not be read.
    #[error("reading image map {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid image map.
    #[error("parsing image map {path}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An entry has an empty command.
    #[error("image map entry {image:?} has an empty command")]
    EmptyCommand {
        /// The entry's key.
        image: String,
    },
}

impl ImageMap {
    /// Reads and checks an image map file.
    pub fn load(path: &Path) -> Result<Self, ImageMapError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ImageMapError::Read { path: shown.clone(), source })?;
        let map: ImageMap = serde_json::from_str(&text)
            .map_err(|source| ImageMapError::Parse { path: shown, source })?;
        map.validate()?;
        Ok(map)
    }

    /// Fails on an entry without a command.
    pub fn validate(&self) -> Result<(), ImageMapError> {
        match self.images.iter().find(|(_, spec)| spec.command.is_empty()) {
            Some((image, _)) => Err(ImageMapError::EmptyCommand { image: image.clone() }),
            None => Ok(()),
        }
    }

    /// The entry for `image`: an exact key, else the longest matching `prefix*`.
    pub fn lookup(&self, image: &str) -> Option<&ImageSpec> {
        if let Some(spec) = self.images.get(image) {
            return Some(spec);
        }
        self.images
            .iter()
            .filter_map(|(key, spec)| Some((key.strip_suffix('*')?, spec)))
            .filter(|(prefix, _)| image.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, spec)| spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(keys: &[&str], image: &str, expected: Option<&str>) {
        let images = keys
            .iter()
            .map(|k| {
                (k.to_string(), ImageSpec { command: vec![k.to_string()], ..Default::default() })
            })
            .collect();
        let map = ImageMap { images, app_env: BTreeMap::new() };
        let found = map.lookup(image).map(|spec| spec.command[0].as_str());
        assert_eq!(found, expected, "lookup of {image:?} in {keys:?}");
    }

    #[test]
    fn exact_keys_win_then_the_longest_prefix() {
        check(&["a/b:1", "a/*", "a/b:*"], "a/b:1", Some("a/b:1"));
        check(&["a/*", "a/b:*"], "a/b:2", Some("a/b:*"));
        check(&["a/*", "a/b:*"], "a/c", Some("a/*"));
        check(&["a/*"], "b/c", None);
        check(&["*"], "anything", Some("*"));
    }
}
