//! Turns a Nix store closure into a byte-identical OCI image.
//!
//! The assembler does no network I/O. `nix/lib/mk-image.nix` runs its CLI
//! (`matrix-image-assembler`) as the builder of two kinds of derivation: one per named
//! layer group (`layer`), and the image itself (`image`), which reads the closure that
//! Nix exports with `__structuredAttrs` + `exportReferencesGraph`.
//!
//! # Layering
//!
//! An image has at most `maxLayers` layers (default 100, under Docker's limit of about 125)
//! and never drops a store path to fit. From the bottom up:
//!
//! 1. **Named groups**, in the order the caller lists them. Group *i* holds the closure of
//!    its contents minus the closures of groups *0..i*. Each group is its own derivation, so
//!    a group that did not change (a base system, a language runtime) is reused from the
//!    store: a rebuild re-tars nothing in it and a push sends none of its bytes again.
//! 2. **The rest of the closure**, split by popularity (`layering::plan`). A path's
//!    popularity is how many paths of the image's closure have it in their own closure,
//!    itself included: libc scores high, the application 1. Paths are ranked by
//!    popularity (highest first), then by the size of their own closure (smallest first),
//!    then by package name *without the store hash*, then by the full path. With a budget
//!    of *n* layers (maxLayers minus the groups and the extra-files layer), the first
//!    *n - 1* get a layer each and the rest share the top one; when everything fits,
//!    every path gets its own layer.
//! 3. **Extra files** (`/etc/passwd`, `/tmp`, links, the entrypoint), one layer, on top.
//!
//! Why this shape: a layer's bytes depend only on the paths in it, so a change to one
//! package changes only the layer that holds it. Packages many others depend on change
//! least often and are shared most between images, so they sit low and get layers of their
//! own. Among equally popular paths, one with a bigger closure changes more often (its
//! hash changes whenever anything it depends on does), so it goes higher: the application
//! comes last, in its own layer or in the shared top one. Ranking by the name without the
//! hash keeps a rebuilt package (new hash, same name) in its place, so its neighbours do
//! not move between the per-path layers and the shared one. Only the closure is counted,
//! never data from outside the build, so the split is the same on every machine.
//!
//! # Determinism
//!
//! See `tarball` (entries, modes, owners, PAX) and `blob` (pinned compressors, one-pass
//! digests). JSON documents are compact with a fixed field order; `created` and every
//! mtime come from `SOURCE_DATE_EPOCH` (default 1).

#![forbid(unsafe_code)]

pub mod blob;
pub mod closure;
pub mod docker_archive;
pub mod error;
pub mod extra_files;
pub mod layering;
pub mod layout;
pub mod nix_build;
pub mod oci;
pub mod pgzip;
pub mod tarball;

pub use blob::{Compression, LayerBlob};
pub use error::{Error, Result};
pub use layout::{write_oci_layout, ImageSpec, ImageSummary, PrebuiltLayer};
