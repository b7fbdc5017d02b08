//! The two Nix builders: `layer` (one named group, its own derivation) and `image`.
//!
//! Both read the `.attrs.json` that Nix writes for a derivation with `__structuredAttrs`;
//! `exportReferencesGraph` puts the closures there as `closure` and `exclude`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::blob::{self, Compression, LayerBlob};
use crate::closure::{Graph, PathInfo};
use crate::error::{Error, IoContext, Result};
use crate::extra_files::ExtraFile;
use crate::layering::{self, PlannedLayer};
use crate::layout::{self, ImageSpec, ImageSummary, PrebuiltLayer};
use crate::oci;
use crate::tarball::write_store_paths;

/// The description a `layer` build writes next to its blob.
pub const LAYER_JSON: &str = "layer.json";
/// The blob file of a `layer` build.
pub const LAYER_BLOB: &str = "blob";

#[derive(Debug, Deserialize)]
struct Outputs {
    out: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayerAttrs {
    layer_name: String,
    closure: Vec<PathInfo>,
    #[serde(default)]
    exclude: Vec<PathInfo>,
    outputs: Outputs,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageAttrs {
    system: String,
    tag: Option<String>,
    closure: Vec<PathInfo>,
    #[serde(default)]
    exclude: Vec<PathInfo>,
    #[serde(default)]
    group_layers: Vec<PathBuf>,
    image_config: serde_json::Value,
    #[serde(default)]
    extra_files: Vec<ExtraFile>,
    max_layers: usize,
    outputs: Outputs,
}

/// Options that do not come from the derivation.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    pub epoch: u64,
    pub compression: Compression,
}

/// Builds one named group: the closure of its contents minus the earlier groups' closures.
pub fn build_layer(attrs_path: &Path, options: BuildOptions) -> Result<LayerBlob> {
    let attrs: LayerAttrs = read_attrs(attrs_path)?;
    let graph = Graph::new(attrs.closure)?;
    let excluded = Graph::new(attrs.exclude)?;
    let paths: Vec<String> =
        graph.paths().filter(|p| !excluded.contains(p)).map(str::to_owned).collect();

    let out = &attrs.outputs.out;
    let staging = layout::staging_dir(out)?;
    let layer = blob::write_layer(
        staging.path(),
        &attrs.layer_name,
        options.compression,
        options.epoch,
        |tar| write_store_paths(tar, &paths),
    )?;
    let from = staging.path().join(layer.hex());
    let to = staging.path().join(LAYER_BLOB);
    fs::rename(&from, &to).writing(&to)?;
    let json_path = staging.path().join(LAYER_JSON);
    let json = serde_json::to_vec(&layer).expect("a layer description serialises");
    fs::write(&json_path, json).writing(&json_path)?;

    layout::publish(&staging.keep(), out)?;
    Ok(layer)
}

/// Builds the image: prebuilt group layers, then the rest of the closure, then extra files.
pub fn build_image(attrs_path: &Path, options: BuildOptions) -> Result<ImageSummary> {
    let attrs: ImageAttrs = read_attrs(attrs_path)?;
    let architecture = oci::architecture(&attrs.system)
        .ok_or_else(|| Error::UnknownSystem(attrs.system.clone()))?;
    let graph = Graph::new(attrs.closure)?;
    let excluded = Graph::new(attrs.exclude)?;

    let rest: BTreeSet<String> =
        graph.paths().filter(|p| !excluded.contains(p)).map(str::to_owned).collect();
    let extra_layers = usize::from(!attrs.extra_files.is_empty());
    let store_layers =
        plan_store_layers(&graph, &rest, attrs.group_layers.len(), extra_layers, attrs.max_layers)?;
    let prebuilt =
        attrs.group_layers.iter().map(|dir| read_prebuilt(dir)).collect::<Result<Vec<_>>>()?;

    let tag = attrs.tag.unwrap_or_else(|| default_tag(&attrs.outputs.out));
    let spec = ImageSpec {
        tag,
        architecture: architecture.to_owned(),
        config: attrs.image_config,
        epoch: options.epoch,
        compression: options.compression,
        prebuilt,
        store_layers,
        extra_files: attrs.extra_files,
    };
    layout::write_oci_layout(&spec, &attrs.outputs.out)
}

/// The layer budget left after the named groups and the extra-files layer, spent on `rest`.
pub fn plan_store_layers(
    graph: &Graph,
    rest: &BTreeSet<String>,
    groups: usize,
    extra_layers: usize,
    max_layers: usize,
) -> Result<Vec<PlannedLayer>> {
    if max_layers == 0 {
        return Err(Error::ZeroMaxLayers);
    }
    if groups > max_layers {
        return Err(Error::TooManyGroups { groups, max_layers });
    }
    let budget = max_layers.saturating_sub(groups + extra_layers);
    let over = groups + extra_layers > max_layers;
    if over || (budget == 0 && !rest.is_empty()) {
        return Err(Error::NoLayerLeft {
            max_layers,
            groups,
            paths: rest.len(),
            extra: extra_layers,
        });
    }
    Ok(layering::plan(graph, rest, budget))
}

fn read_prebuilt(dir: &Path) -> Result<PrebuiltLayer> {
    let json_path = dir.join(LAYER_JSON);
    let bytes = fs::read(&json_path).reading(&json_path)?;
    let blob = serde_json::from_slice(&bytes)
        .map_err(|source| Error::BadLayer { path: json_path, source })?;
    Ok(PrebuiltLayer { blob, path: dir.join(LAYER_BLOB) })
}

/// Without a tag, the hash part of the output path: it changes whenever the image does.
fn default_tag(out: &Path) -> String {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.split_once('-').map_or(name.clone(), |(hash, _)| hash.to_owned())
}

fn read_attrs<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|source| Error::ReadAttrs { path: path.into(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| Error::ParseAttrs { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(n: usize) -> (Graph, BTreeSet<String>) {
        let infos =
            (0..n).map(|i| PathInfo { path: format!("/nix/store/h{i}-p{i}"), references: vec![] });
        let graph = Graph::new(infos).unwrap();
        let all = graph.paths().map(str::to_owned).collect();
        (graph, all)
    }

    #[test]
    fn the_budget_counts_groups_and_the_extra_layer() {
        let (g, all) = graph(10);
        assert_eq!(plan_store_layers(&g, &all, 2, 1, 5).unwrap().len(), 2);
        assert_eq!(plan_store_layers(&g, &all, 0, 0, 100).unwrap().len(), 10);
        let empty = BTreeSet::new();
        assert!(plan_store_layers(&g, &empty, 3, 0, 3).unwrap().is_empty());
    }

    #[test]
    fn too_many_groups_is_an_error_that_says_so() {
        let (g, all) = graph(3);
        let err = plan_store_layers(&g, &all, 4, 0, 3).unwrap_err();
        assert_eq!(err.to_string(), "4 named layer groups do not fit in maxLayers = 3");
        let err = plan_store_layers(&g, &all, 3, 0, 3).unwrap_err();
        assert!(err.to_string().contains("leaves no layer for the 3 store paths"), "{err}");
        assert!(matches!(plan_store_layers(&g, &all, 0, 0, 0), Err(Error::ZeroMaxLayers)));
    }

    #[test]
    fn default_tag_is_the_output_hash() {
        assert_eq!(default_tag(Path::new("/nix/store/abc123-daemon-image")), "abc123");
    }
}
