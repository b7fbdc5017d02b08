//! Layer blobs: tar -> sha256 (diff ID) -> compressor -> sha256 (digest) -> file, in one pass.
//!
//! The compressors are pinned so that the compressed bytes, and so the digests a registry
//! sees, are the same on every machine: gzip is `pgzip` (fixed 1 MiB chunks deflated in
//! parallel by flate2's zlib-rs backend, the version in `Cargo.lock`, at
//! level 6; zero mtime, no file name, OS byte 255); zstd is libzstd (the `zstd-sys`
//! version in `Cargo.lock`) at level 3 on one thread. A change of either crate version may
//! change compressed digests, never diff IDs.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::pgzip::ParallelGzip;
use crate::tarball::TarWriter;

pub const GZIP_LEVEL: u32 = 6;
pub const ZSTD_LEVEL: i32 = 3;
const MEDIA_TYPE_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MEDIA_TYPE_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How layer tarballs are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => MEDIA_TYPE_GZIP,
            Compression::Zstd => MEDIA_TYPE_ZSTD,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(Error::UnknownCompression(other.to_owned())),
        }
    }
}

/// A written layer blob: what the manifest and the config need to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerBlob {
    /// A short description, kept in the image history.
    pub name: String,
    pub media_type: String,
    /// `sha256:<hex>` of the compressed bytes.
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    /// Size in bytes of the compressed blob.
    pub size: u64,
}

impl LayerBlob {
    /// The hex part of the digest: the blob's file name under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// Writes one compressed layer into `blob_dir` (named by its digest) and describes it.
///
/// `fill` writes the tar entries; the archive is finished here.
pub fn write_layer(
    blob_dir: &Path,
    name: &str,
    compression: Compression,
    mtime: u64,
    fill: impl FnOnce(&mut TarWriter<Hashing<Encoder>>) -> Result<()>,
) -> Result<LayerBlob> {
    let staging =
        tempfile::Builder::new().prefix(".layer-").tempfile_in(blob_dir).writing(blob_dir)?;
    let file = staging.reopen().writing(staging.path())?;
    let compressed = Hashing::new(BufWriter::with_capacity(1 << 20, file));
    let encoder = Encoder::new(compressed, compression).writing(staging.path())?;

    let mut tar = TarWriter::new(Hashing::new(encoder), mtime);
    fill(&mut tar)?;
    let tar_hashing = tar.finish().writing(staging.path())?;
    let (diff_id, _) = tar_hashing.digest();
    let compressed = tar_hashing.inner.finish().writing(staging.path())?;
    let (digest, size) = compressed.digest();
    compressed.inner.into_inner().map_err(|e| e.into_error()).writing(staging.path())?;

    let blob = LayerBlob {
        name: name.to_owned(),
        media_type: compression.media_type().to_owned(),
        digest,
        diff_id,
        size,
    };
    let final_path = blob_dir.join(blob.hex());
    staging.persist(&final_path).map_err(|e| Error::Write { path: final_path, source: e.error })?;
    Ok(blob)
}

/// Writes `bytes` as a blob named by its digest; returns `(digest, size)`.
pub fn write_bytes(blob_dir: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let hex = hex::encode(Sha256::digest(bytes));
    let path = blob_dir.join(&hex);
    std::fs::write(&path, bytes).writing(path)?;
    Ok((format!("sha256:{hex}"), bytes.len() as u64))
}

/// Links a blob made elsewhere (a named group's layer in the store) into `blob_dir`.
///
/// A symlink, not a copy: the image output then refers to the layer's store path, which
/// Nix keeps alive, and the blob's bytes are in the store once. Its size is checked; its
/// digest was computed in one pass when the layer was built.
pub fn link_prebuilt(source: &Path, blob_dir: &Path, blob: &LayerBlob) -> Result<PathBuf> {
    let size = source.metadata().reading(source)?.len();
    if size != blob.size {
        return Err(Error::BlobMismatch { path: source.into(), digest: blob.digest.clone() });
    }
    let target = blob_dir.join(blob.hex());
    // Two groups can make the same bytes (say, both empty after the groups below them).
    if target.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(source, &target).writing(&target)?;
    }
    Ok(target)
}

/// A writer that hashes and counts what goes through it.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }

    /// `sha256:<hex>` and the byte count so far.
    fn digest(&self) -> (String, u64) {
        (format!("sha256:{}", hex::encode(self.hasher.clone().finalize())), self.count)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Sink = Hashing<BufWriter<File>>;

/// The pinned compressor in front of the blob file.
pub enum Encoder {
    Gzip(ParallelGzip<Sink>),
    Zstd(zstd::Encoder<'static, Sink>),
}

impl Encoder {
    fn new(sink: Sink, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::Gzip => Encoder::Gzip(ParallelGzip::new(sink, GZIP_LEVEL)),
            Compression::Zstd => Encoder::Zstd(zstd::Encoder::new(sink, ZSTD_LEVEL)?),
        })
    }

    fn finish(self) -> io::Result<Sink> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl Write for Encoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarball::Owner;

    fn layer(compression: Compression) -> LayerBlob {
        let dir = tempfile::tempdir().unwrap();
        write_layer(dir.path(), "test", compression, 1, |tar| {
            let data = b"hello, world\n".repeat(1000);
            tar.file(
                b"nix/store/x-hello/greeting",
                0o444,
                Owner::default(),
                data.len() as u64,
                &data[..],
            )
            .map(|_| ())
            .map_err(|e| Error::Write { path: "test".into(), source: e })
        })
        .unwrap()
    }

    /// Pins the compressed bytes: if this fails, a dependency bump or a feature switch
    /// (for example flate2 on another backend than zlib-rs) changed every image digest.
    #[test]
    fn compressed_digests_are_pinned() {
        let gzip = layer(Compression::Gzip);
        let zstd = layer(Compression::Zstd);
        assert_eq!(gzip.diff_id, zstd.diff_id);
        assert_eq!(
            gzip.diff_id,
            "sha256:07ffec952b72b1e43774649f8f7a6251ec73227dc4500392d0730044a8a56175"
        );
        assert_eq!(
            gzip.digest,
            "sha256:3e487eca750ecc8f3ae6ae2203db262ae229080c3182839acbf1939fcbd9ee61"
        );
        assert_eq!(
            zstd.digest,
            "sha256:222148eb42af3f0f6583745710a87493a75a421c40334f4d08ad1ae8ec180ca9"
        );
    }

    #[test]
    fn the_digest_names_the_file_and_matches_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let blob = write_layer(dir.path(), "t", Compression::Gzip, 1, |_| Ok(())).unwrap();
        let bytes = std::fs::read(dir.path().join(blob.hex())).unwrap();
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))), blob.digest);
        assert_eq!(bytes.len() as u64, blob.size);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no staging file left behind");
    }
}
