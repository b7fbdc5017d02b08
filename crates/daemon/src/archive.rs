//! Snapshot archives: `cortex/` and `workspace/` as a deterministic tar, zstd-compressed.
//!
//! The same tree always gives the same bytes: entries in name order, mtime 0, owner 0,
//! modes without special bits or group/other write (so `identity.key` stays 0600). Only
//! directories and regular files are archived, and unpacking accepts nothing else, so an
//! archive cannot place anything outside its root.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::layout::{TreeHasher, SNAPSHOT_DIRS};

const ZSTD_LEVEL: i32 = 3;
/// Permission bits kept in an archive.
const ARCHIVED_MODE_BITS: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archive entry {path:?} is refused: {reason}")]
    UnsafeEntry { path: String, reason: &'static str },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io { action, path: path.to_owned(), source }
}

/// What was written: the sha256 and size of the compressed archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub sha256: String,
    pub size: u64,
}

/// Writes the archive of `root`'s snapshot directories to `out`.
pub fn pack(root: &Path, out: &Path) -> Result<Packed, ArchiveError> {
    let file = File::create(out).map_err(io_err("creating", out))?;
    let hashing = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let encoder = zstd::Encoder::new(hashing, ZSTD_LEVEL).map_err(io_err("compressing", out))?;
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);

    for dir in SNAPSHOT_DIRS {
        let base = root.join(dir);
        if !base.exists() {
            continue;
        }
        for entry in walkdir::WalkDir::new(&base).sort_by_file_name() {
            let entry = entry.map_err(|e| io_err("walking", &base)(e.into()))?;
            let relative = entry.path().strip_prefix(root).unwrap_or(entry.path()).to_owned();
            append_entry(&mut builder, entry.path(), &relative)?;
        }
    }

    let encoder = builder.into_inner().map_err(io_err("writing", out))?;
    let hashing = encoder.finish().map_err(io_err("compressing", out))?;
    let (writer, sha256, size) = hashing.finish();
    let file = writer.into_inner().map_err(|e| io_err("writing", out)(e.into_error()))?;
    file.sync_all().map_err(io_err("syncing", out))?;
    Ok(Packed { sha256, size })
}

fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    relative: &Path,
) -> Result<(), ArchiveError> {
    let metadata = std::fs::symlink_metadata(path).map_err(io_err("reading", path))?;
    let mut header = Header::new_gnu();
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    if metadata.is_dir() {
        header.set_entry_type(EntryType::Directory);
        header.set_mode(metadata.permissions().mode() & ARCHIVED_MODE_BITS);
        header.set_size(0);
        builder.append_data(&mut header, relative, io::empty()).map_err(io_err("archiving", path))
    } else if metadata.is_file() {
        header.set_entry_type(EntryType::Regular);
        header.set_mode(metadata.permissions().mode() & ARCHIVED_MODE_BITS);
        header.set_size(metadata.len());
        // Exactly the size in the header, even if the file grows or shrinks meanwhile, so the
        // archive always parses (the change itself goes into the next snapshot).
        let file = File::open(path).map_err(io_err("reading", path))?;
        let exact = file.take(metadata.len()).chain(io::repeat(0)).take(metadata.len());
        builder.append_data(&mut header, relative, exact).map_err(io_err("archiving", path))
    } else {
        // FIXME: symbolic links and special files in the workspace are not snapshotted.
        tracing::warn!(
            path = %relative.display(),
            "skipping a file that is neither a directory nor a regular file",
        );
        Ok(())
    }
}

/// Unpacks an archive made by [`pack`] into `dest` (which should be empty), refusing any
/// entry that is not a directory or regular file under one of the snapshot directories.
/// Every file and directory is synced before this returns. Returns the unpacked tree's
/// [`tree_digest`](crate::layout::tree_digest), computed on the way.
pub fn unpack(archive: &Path, dest: &Path) -> Result<String, ArchiveError> {
    let file = File::open(archive).map_err(io_err("opening", archive))?;
    unpack_from(BufReader::new(file), dest)
}

/// Like [`unpack`], reading the compressed archive from `reader`.
pub fn unpack_from(reader: impl Read, dest: &Path) -> Result<String, ArchiveError> {
    let decoder = zstd::Decoder::new(reader).map_err(io_err("decompressing", dest))?;
    let mut tar = tar::Archive::new(decoder);
    let mut digest = TreeHasher::new();
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for entry in tar.entries().map_err(io_err("reading the archive for", dest))? {
        let mut entry = entry.map_err(io_err("reading the archive for", dest))?;
        let path = entry.path().map_err(io_err("reading the archive for", dest))?.into_owned();
        check_entry(&path, entry.header().entry_type())?;
        let target = dest.join(&path);
        let mode = entry.header().mode().map_err(io_err("reading the archive for", dest))?
            & ARCHIVED_MODE_BITS;
        if entry.header().entry_type() == EntryType::Directory {
            std::fs::create_dir_all(&target).map_err(io_err("creating", &target))?;
            digest.dir(&path);
            dirs.push((target, mode));
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        digest.begin_file(&path, mode & 0o111 != 0);
        let mut out = BufWriter::with_capacity(
            1 << 20,
            File::create(&target).map_err(io_err("creating", &target))?,
        );
        let mut buffer = vec![0; 1 << 20];
        loop {
            let read =
                entry.read(&mut buffer).map_err(io_err("reading the archive for", &target))?;
            if read == 0 {
                break;
            }
            digest.update(&buffer[..read]);
            out.write_all(&buffer[..read]).map_err(io_err("writing", &target))?;
        }
        let out = out.into_inner().map_err(|e| io_err("writing", &target)(e.into_error()))?;
        out.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err("setting the mode of", &target))?;
        files.push(target);
    }
    // Synced at the end rather than one by one, so the disk writes back while the rest
    // is still being decompressed.
    for file in &files {
        File::open(file).and_then(|f| f.sync_all()).map_err(io_err("syncing", file))?;
    }
    // Directories last, deepest first: their modes may forbid writing, and syncing them
    // makes their entries durable.
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (dir, mode) in &dirs {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode))
            .map_err(io_err("setting the mode of", dir))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing", dir))?;
    }
    File::open(dest).and_then(|d| d.sync_all()).map_err(io_err("syncing", dest))?;
    Ok(digest.finish())
}

fn check_entry(path: &Path, kind: EntryType) -> Result<(), ArchiveError> {
    let refuse = |reason| ArchiveError::UnsafeEntry { path: path.display().to_string(), reason };
    if !matches!(kind, EntryType::Regular | EntryType::Directory) {
        return Err(refuse("only directories and regular files are allowed"));
    }
    let mut components = path.components();
    let Some(Component::Normal(first)) = components.next() else {
        return Err(refuse("must be a relative path"));
    };
    if !SNAPSHOT_DIRS.iter().any(|d| first == *d) {
        return Err(refuse("must be under cortex/ or workspace/"));
    }
    if !components.all(|c| matches!(c, Component::Normal(_))) {
        return Err(refuse("must not contain `..` or `.`"));
    }
    Ok(())
}

/// Hashes and counts the bytes passing through.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), size: 0 }
    }

    /// The writer, the hex sha256 and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The hex sha256 and size of a file.
pub fn file_sha256(path: &Path) -> Result<(String, u64), ArchiveError> {
    let mut file = File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut size = 0;
    loop {
        let read = file.read(&mut buffer).map_err(io_err("reading", path))?;
        if read == 0 {
            return Ok((hex::encode(hasher.finalize()), size));
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("cortex/journal")).unwrap();
        std::fs::create_dir_all(root.join("workspace/src")).unwrap();
        std::fs::write(root.join("cortex/settings.json"), "{}").unwrap();
        std::fs::write(root.join("workspace/src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(root.join("stray.txt"), "not archived").unwrap();
    }

    #[test]
    fn the_same_tree_packs_to_the_same_bytes_and_round_trips() {
        let (a, b, out) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        tree(a.path());
        tree(b.path());

        let first = pack(a.path(), &out.path().join("a.tar.zst")).unwrap();
        let second = pack(b.path(), &out.path().join("b.tar.zst")).unwrap();
        assert_eq!(first, second);

        let dest = out.path().join("unpacked");
        unpack(&out.path().join("a.tar.zst"), &dest).unwrap();
        assert_eq!(
            crate::layout::tree_digest(&dest).unwrap(),
            crate::layout::tree_digest(b.path()).unwrap()
        );
        assert!(!dest.join("stray.txt").exists());
    }

    #[test]
    fn entries_outside_the_snapshot_directories_are_refused() {
        for (path, kind) in [
            ("../etc/passwd", EntryType::Regular),
            ("/etc/passwd", EntryType::Regular),
            ("cortex/../../x", EntryType::Regular),
            ("other/x", EntryType::Regular),
            ("cortex/link", EntryType::Symlink),
            ("workspace/dev", EntryType::Char),
        ] {
            assert!(check_entry(Path::new(path), kind).is_err(), "{path} should be refused");
        }
        assert!(check_entry(Path::new("workspace/a/b.txt"), EntryType::Regular).is_ok());
    }
}
