//! How the store paths outside the named groups are split into layers.
//!
//! See the crate documentation for the algorithm and the reasons behind it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::closure::{package_name, Graph};

/// One planned layer: a human-readable name and the store paths it holds, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLayer {
    pub name: String,
    pub paths: Vec<String>,
}

/// Splits `paths` (a subset of `graph`) into at most `budget` layers, bottom layer first.
///
/// Never drops a path: with more paths than layers, the least popular ones share the top
/// layer. An empty `paths` gives no layer; a `budget` of 0 with paths left is the caller's
/// error to report.
pub fn plan(graph: &Graph, paths: &BTreeSet<String>, budget: usize) -> Vec<PlannedLayer> {
    if paths.is_empty() || budget == 0 {
        return Vec::new();
    }

    let popularity = popularity(graph);
    let mut ranked: Vec<&String> = paths.iter().collect();
    ranked.sort_by_cached_key(|path| {
        let score = popularity.get(path.as_str()).copied().unwrap_or(1);
        let closure_size = graph.closure_of(path).len();
        (Reverse(score), closure_size, package_name(path), path.as_str())
    });

    // Everything fits: one layer per path.
    if ranked.len() <= budget {
        return ranked.into_iter().map(|p| single(p)).collect();
    }

    // Otherwise the most popular paths get a layer each and the rest share the top one.
    let (own, shared) = ranked.split_at(budget - 1);
    let mut layers: Vec<PlannedLayer> = own.iter().map(|p| single(p)).collect();
    let mut tail: Vec<String> = shared.iter().map(|p| p.to_string()).collect();
    tail.sort();
    layers.push(PlannedLayer {
        name: format!("{} less shared store paths", tail.len()),
        paths: tail,
    });
    layers
}

fn single(path: &str) -> PlannedLayer {
    PlannedLayer { name: package_name(path).to_owned(), paths: vec![path.to_owned()] }
}

/// For every path: how many paths of the graph have it in their closure (itself included).
fn popularity(graph: &Graph) -> BTreeMap<&str, usize> {
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for path in graph.paths() {
        for reference in graph.references(path) {
            dependents.entry(reference).or_default().push(path);
        }
    }

    graph
        .paths()
        .map(|path| {
            let mut seen = BTreeSet::new();
            let mut stack = vec![path];
            while let Some(next) = stack.pop() {
                if seen.insert(next) {
                    stack.extend(dependents.get(next).into_iter().flatten().copied());
                }
            }
            (path, seen.len())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::closure::PathInfo;

    fn graph(edges: &[(&str, &[&str])]) -> Graph {
        Graph::new(edges.iter().map(|(path, refs)| PathInfo {
            path: format!("/nix/store/{path}"),
            references: refs.iter().map(|r| format!("/nix/store/{r}")).collect(),
        }))
        .unwrap()
    }

    fn check(graph: &Graph, budget: usize, expected: &[&[&str]]) {
        let all: BTreeSet<String> = graph.paths().map(str::to_owned).collect();
        let got: Vec<Vec<String>> = plan(graph, &all, budget)
            .into_iter()
            .map(|l| l.paths.iter().map(|p| p.trim_start_matches("/nix/store/").into()).collect())
            .collect();
        let expected: Vec<Vec<String>> =
            expected.iter().map(|l| l.iter().map(|p| p.to_string()).collect()).collect();
        assert_eq!(got, expected);
    }

    fn sample() -> Graph {
        graph(&[
            ("h1-app", &["h2-python", "h3-libc", "h6-certs"]),
            ("h2-python", &["h3-libc", "h4-zlib"]),
            ("h4-zlib", &["h3-libc"]),
            ("h3-libc", &[]),
            ("h5-tool", &["h3-libc"]),
            ("h6-certs", &[]),
        ])
    }

    #[test]
    fn shared_paths_sit_low_and_the_application_on_top() {
        check(
            &sample(),
            10,
            &[&["h3-libc"], &["h4-zlib"], &["h6-certs"], &["h2-python"], &["h5-tool"], &["h1-app"]],
        );
    }

    #[test]
    fn over_budget_the_least_shared_paths_share_the_top_layer() {
        check(
            &sample(),
            3,
            &[&["h3-libc"], &["h4-zlib"], &["h1-app", "h2-python", "h5-tool", "h6-certs"]],
        );
        check(
            &sample(),
            1,
            &[&["h1-app", "h2-python", "h3-libc", "h4-zlib", "h5-tool", "h6-certs"]],
        );
    }

    #[test]
    fn a_new_hash_keeps_a_package_in_its_place() {
        // Rebuilding zlib with new contents changes its hash, not its rank.
        let changed = graph(&[
            ("h1-app", &["h2-python", "h3-libc", "h6-certs"]),
            ("h2-python", &["h3-libc", "a9-zlib"]),
            ("a9-zlib", &["h3-libc"]),
            ("h3-libc", &[]),
            ("h5-tool", &["h3-libc"]),
            ("h6-certs", &[]),
        ]);
        check(
            &changed,
            3,
            &[&["h3-libc"], &["a9-zlib"], &["h1-app", "h2-python", "h5-tool", "h6-certs"]],
        );
    }

    #[test]
    fn no_paths_no_layers() {
        assert!(plan(&sample(), &BTreeSet::new(), 5).is_empty());
    }
}
