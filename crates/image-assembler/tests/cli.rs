//! The CLI on bad input: a message that names the problem, a failing exit status, and no
//! output (not even a staging directory) left behind.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

/// Runs `matrix-image-assembler image` on `attrs` (with `outputs.out` set to a path in a
/// fresh directory) and returns its stderr, after checking that it failed cleanly.
fn image_fails(mut attrs: Value) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image");
    attrs["outputs"] = json!({ "out": out });
    let attrs_file = dir.path().join("attrs.json");
    std::fs::write(&attrs_file, serde_json::to_vec(&attrs).unwrap()).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_matrix-image-assembler"))
        .arg("image")
        .env("NIX_ATTRS_JSON_FILE", &attrs_file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(entries(dir.path()), ["attrs.json"], "nothing but the input is left");
    String::from_utf8(output.stderr).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn attrs(closure: Value) -> Value {
    json!({
        "system": "x86_64-linux",
        "tag": "t",
        "closure": closure,
        "exclude": [],
        "groupLayers": [],
        "imageConfig": {},
        "extraFiles": [],
        "maxLayers": 100,
    })
}

fn check(attrs: Value, expected: &str) {
    let stderr = image_fails(attrs);
    assert!(stderr.contains(expected), "expected {expected:?} in:\n{stderr}");
}

#[test]
fn a_path_outside_the_store_is_named() {
    let closure = json!([{ "path": "/usr/lib", "references": [] }]);
    check(attrs(closure), "/usr/lib is not inside the Nix store (/nix/store)");
}

#[test]
fn a_missing_reference_is_named() {
    let closure = json!([{ "path": "/nix/store/aaaa-app", "references": ["/nix/store/bbbb-lib"] }]);
    check(attrs(closure), "/nix/store/aaaa-app refers to /nix/store/bbbb-lib, which is missing");
}

#[test]
fn a_config_that_is_not_an_object_is_refused() {
    let mut bad = attrs(json!([]));
    bad["imageConfig"] = json!(["Entrypoint"]);
    check(bad, "the image config is not a JSON object (found an array)");
}

#[test]
fn more_groups_than_max_layers_is_refused() {
    let mut bad = attrs(json!([]));
    bad["groupLayers"] = json!(["/nix/store/a-layer", "/nix/store/b-layer"]);
    bad["maxLayers"] = json!(1);
    check(bad, "2 named layer groups do not fit in maxLayers = 1");
}

#[test]
fn a_failure_while_writing_leaves_no_partial_output() {
    // Valid as a graph, but the path is not on disk: the walk fails mid-build.
    let closure = json!([{ "path": "/nix/store/0000000000000000-not-on-disk", "references": [] }]);
    check(attrs(closure), "0000000000000000-not-on-disk");
}

#[test]
fn a_malformed_source_date_epoch_exits_64_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_matrix-image-assembler"))
        .arg("image")
        .env("SOURCE_DATE_EPOCH", "yesterday")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("SOURCE_DATE_EPOCH is malformed"), "{stderr}");
}
