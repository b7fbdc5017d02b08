//! The one error type of the library: every variant names what it was working on.

use std::path::PathBuf;

/// What went wrong while assembling an image, with the path, digest or input it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the build attributes {path}")]
    ReadAttrs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the build attributes {path}")]
    ParseAttrs {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("parsing {path}")]
    ParseJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not inside the Nix store ({store})")]
    OutsideStore { path: String, store: String },
    #[error("{path} refers to {reference}, which is missing from the closure")]
    MissingReference { path: String, reference: String },
    #[error("the image config is not a JSON object (found {found})")]
    ConfigNotObject { found: &'static str },
    #[error("{groups} named layer groups do not fit in maxLayers = {max_layers}")]
    TooManyGroups { groups: usize, max_layers: usize },
    #[error(
        "maxLayers = {max_layers} leaves no layer for the {paths} store paths outside the named \
         groups (named groups: {groups}, extra-files layer: {extra})"
    )]
    NoLayerLeft { max_layers: usize, groups: usize, paths: usize, extra: usize },
    #[error("maxLayers must be at least 1")]
    ZeroMaxLayers,
    #[error("extra file {path}: {reason}")]
    BadExtraFile { path: String, reason: String },
    #[error("{path} is a {kind}, which an image layer cannot hold")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error(
        "{path} changed size while it was being read (expected {expected} bytes, read {read})"
    )]
    FileChanged { path: PathBuf, expected: u64, read: u64 },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {path} is not a valid layer description")]
    BadLayer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob {digest} in {path} does not match its recorded size")]
    BlobMismatch { path: PathBuf, digest: String },
    #[error("unknown compression {0:?} (expected gzip or zstd)")]
    UnknownCompression(String),
    #[error("unknown Nix system {0:?}: cannot name its OCI architecture")]
    UnknownSystem(String),
    #[error("the output {path} already exists")]
    OutputExists { path: PathBuf },
    #[error("the image layout {path} has no manifest tagged {tag:?}")]
    NoSuchTag { path: PathBuf, tag: String },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Helpers that attach a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn reading(self, path: impl Into<PathBuf>) -> Result<T>;
    fn writing(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn reading(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Read { path: path.into(), source })
    }

    fn writing(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Write { path: path.into(), source })
    }
}
