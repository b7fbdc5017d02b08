//! The reference graph of a Nix store closure, as `exportReferencesGraph` writes it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The Nix store directory; every path of a closure must be directly inside it.
pub const STORE_DIR: &str = "/nix/store";

/// One entry of the `exportReferencesGraph` data in `.attrs.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct PathInfo {
    pub path: String,
    #[serde(default)]
    pub references: Vec<String>,
}

/// A validated closure: every path is a store path and every reference is in the graph.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    references: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    /// Validates `infos` (and merges duplicates, which Nix writes when roots share paths).
    pub fn new(infos: impl IntoIterator<Item = PathInfo>) -> Result<Self> {
        let mut references: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for info in infos {
            check_store_path(&info.path)?;
            // A path's reference to itself says nothing about layering.
            let PathInfo { path, references: refs } = info;
            let refs: Vec<String> = refs.into_iter().filter(|r| *r != path).collect();
            references.entry(path).or_default().extend(refs);
        }

        for (path, refs) in &references {
            if let Some(missing) = refs.iter().find(|r| !references.contains_key(*r)) {
                return Err(Error::MissingReference {
                    path: path.clone(),
                    reference: missing.clone(),
                });
            }
        }
        Ok(Self { references })
    }

    /// Every path of the graph, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.references.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.references.len()
    }

    pub fn is_empty(&self) -> bool {
        self.references.is_empty()
    }

    pub fn contains(&self, path: &str) -> bool {
        self.references.contains_key(path)
    }

    /// The direct references of `path` (empty for a path not in the graph).
    pub fn references(&self, path: &str) -> impl Iterator<Item = &str> {
        self.references.get(path).into_iter().flatten().map(String::as_str)
    }

    /// `path` and everything it refers to, transitively.
    pub fn closure_of<'a>(&'a self, path: &'a str) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![path];
        while let Some(next) = stack.pop() {
            if seen.insert(next) {
                stack.extend(self.references(next));
            }
        }
        seen
    }
}

fn check_store_path(path: &str) -> Result<()> {
    let outside = || Error::OutsideStore { path: path.to_owned(), store: STORE_DIR.to_owned() };
    let name = path.strip_prefix(STORE_DIR).and_then(|rest| rest.strip_prefix('/'));
    let Some(name) = name else { return Err(outside()) };
    let is_plain_name = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    if !is_plain_name {
        return Err(outside());
    }
    Ok(())
}

/// The package name of a store path, without the directory and the hash.
///
/// `/nix/store/<hash>-hello-2.12` gives `hello-2.12`. It is the tie-breaker of the
/// layering order because it survives a rebuild of the package with new contents.
pub fn package_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split_once('-').map_or(base, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo { path: path.into(), references: refs.iter().map(|r| r.to_string()).collect() }
    }

    #[test]
    fn a_path_outside_the_store_is_named() {
        let err = Graph::new([info("/usr/lib/libc.so", &[])]).unwrap_err();
        assert_eq!(err.to_string(), "/usr/lib/libc.so is not inside the Nix store (/nix/store)");
        let err = Graph::new([info("/nix/store/../etc", &[])]).unwrap_err();
        assert!(matches!(err, Error::OutsideStore { .. }), "{err}");
    }

    #[test]
    fn a_missing_reference_is_named() {
        let err = Graph::new([info("/nix/store/aaa-app", &["/nix/store/bbb-lib"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/nix/store/aaa-app refers to /nix/store/bbb-lib, which is missing from the closure"
        );
    }

    #[test]
    fn closure_follows_references_transitively() {
        let graph = Graph::new([
            info("/nix/store/a-app", &["/nix/store/b-lib", "/nix/store/a-app"]),
            info("/nix/store/b-lib", &["/nix/store/c-libc"]),
            info("/nix/store/c-libc", &[]),
            info("/nix/store/d-other", &[]),
        ])
        .unwrap();
        let closure: Vec<_> = graph.closure_of("/nix/store/a-app").into_iter().collect();
        assert_eq!(closure, ["/nix/store/a-app", "/nix/store/b-lib", "/nix/store/c-libc"]);
    }

    #[test]
    fn package_name_drops_the_hash() {
        assert_eq!(package_name("/nix/store/0123abc-hello-2.12"), "hello-2.12");
        assert_eq!(package_name("/nix/store/0123abc"), "0123abc");
    }
}
