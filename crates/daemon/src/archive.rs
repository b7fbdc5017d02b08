//! Snapshot archives: `cortex/` and `workspace/` as a deterministic tar, zstd-compressed.
//!
//! The same tree always gives the same bytes: entries in name order, mtime 0, owner 0,
//! modes without special bits or group/other write (so `identity.key` stays 0600).
//!
//! What is archived: directories, regular files (each as one state it had, see `capture`),
//! and, under `workspace/`, symbolic links as links (the target as written, never
//! followed). Fifos, sockets and device nodes, and links under `cortex/` (which `matrixd`
//! itself reads and appends to), are skipped with a warning and counted in
//! [`Packed::skipped`].
//!
//! Unpacking accepts nothing else, and never writes through a link: an entry at or under
//! a link the archive made is refused, and every file is created new, never opened over
//! something already there. So an archive cannot place anything outside its root. A link
//! in place of `workspace/` itself (pushes before the push refused one followed it) is
//! unpacked as a real directory holding the entries archived under it, so such a snapshot
//! still restores.
//!
//! A push leaves out, with a warning each, what under `workspace/` it cannot read: a file
//! or directory without read permission, or a file that kept changing while it was read
//! ([`Packed::unreadable`]). Under `cortex/`, the daemon's own state, either fails the push.

mod capture;
mod digest;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::layout::{
    check_snapshot_dirs, is_permission_denied, may_skip_unreadable, walk_under, Fingerprint,
    LayoutError, TreeHasher, Walked, SNAPSHOT_DIRS,
};

const ZSTD_LEVEL: i32 = 3;
/// Permission bits kept in an archive.
const ARCHIVED_MODE_BITS: u32 = 0o755;
const CORTEX: &str = "cortex";
const WORKSPACE: &str = "workspace";
/// The one directory whose links are archived.
const LINKS_ALLOWED_UNDER: &str = WORKSPACE;
/// Times `cortex/` is archived before a push gives up on it changing.
const CORTEX_ATTEMPTS: u32 = 5;
/// Pause before the second try; doubled for each later one.
const CORTEX_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);
/// The mode given to a snapshot directory an archive holds as a link.
const ROOT_DIR_MODE: u32 = 0o755;
/// Bytes moved per read and write when unpacking.
const UNPACK_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("archive entry {path:?} is refused: {reason}")]
    UnsafeEntry { path: String, reason: &'static str },
    #[error("{path} kept changing while it was archived ({attempts} reads); not snapshotted")]
    KeptChanging { path: PathBuf, attempts: u32 },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io { action, path: path.to_owned(), source }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The hex sha256 of the compressed archive.
    pub sha256: String,
    /// The size of the compressed archive.
    pub size: u64,
    /// The [`tree_digest`](crate::layout::tree_digest) of what was archived, computed from
    /// the archived bytes themselves.
    pub tree_sha256: String,
    /// Entries left out: fifos, sockets, devices, and links under `cortex/`.
    pub skipped: u64,
    /// Entries under `workspace/` left out because they could not be read: files or
    /// directories without read permission, and files that kept changing while read.
    pub unreadable: u64,
}

/// Writes the archive of `root`'s snapshot directories to `out`. Large files are spooled
/// beside `out` while they are read.
///
/// `cortex/` is archived as it was at one moment: its metadata fingerprint is taken before
/// and after it is archived, and the archive is started again when they differ (it comes
/// first and is small, so that costs little). `workspace/` follows, each file as one
/// state it had.
///
/// FIXME: `workspace/` is consistent per file, not across files: two files another process
/// writes while the walk runs can be archived from different moments (each of them whole).
pub fn pack(root: &Path, out: &Path) -> Result<Packed, ArchiveError> {
    check_snapshot_dirs(root)?;
    let mut pause = CORTEX_FIRST_PAUSE;
    for attempt in 1..=CORTEX_ATTEMPTS {
        let mut packer = Packer::create(out)?;
        let before = Fingerprint::of_dir(root, CORTEX)?;
        packer.append_dir(root, CORTEX)?;
        if Fingerprint::of_dir(root, CORTEX)? == before {
            packer.append_dir(root, WORKSPACE)?;
            return packer.finish(out);
        }
        tracing::debug!(attempt, "cortex changed while it was archived; again");
        std::thread::sleep(pause);
        pause *= 2;
    }
    let path = root.join(CORTEX);
    Err(ArchiveError::KeptChanging { path, attempts: CORTEX_ATTEMPTS })
}

impl Packer<zstd::Encoder<'static, HashingWriter<BufWriter<File>>>> {
    /// A packer writing a new archive to `out` (replacing what a previous attempt wrote).
    fn create(out: &Path) -> Result<Self, ArchiveError> {
        let file = File::create(out).map_err(io_err("creating", out))?;
        let hashing = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let encoder =
            zstd::Encoder::new(hashing, ZSTD_LEVEL).map_err(io_err("compressing", out))?;
        let mut builder = tar::Builder::new(encoder);
        builder.mode(tar::HeaderMode::Deterministic);
        let spool_dir = out.parent().unwrap_or(Path::new("."));
        Ok(Packer {
            builder,
            digest: TreeHasher::new(),
            capture: capture::Capture::new(spool_dir),
            skipped: 0,
            unreadable: 0,
        })
    }

    /// Ends the archive, syncs it, and says what was written.
    fn finish(self, out: &Path) -> Result<Packed, ArchiveError> {
        let Packer { builder, digest, skipped, unreadable, .. } = self;
        let encoder = builder.into_inner().map_err(io_err("writing", out))?;
        let hashing = encoder.finish().map_err(io_err("compressing", out))?;
        let (writer, sha256, size) = hashing.finish();
        let file = writer.into_inner().map_err(|e| io_err("writing", out)(e.into_error()))?;
        file.sync_all().map_err(io_err("syncing", out))?;
        Ok(Packed { sha256, size, tree_sha256: digest.finish(), skipped, unreadable })
    }
}

struct Packer<W: Write> {
    builder: tar::Builder<W>,
    digest: TreeHasher,
    capture: capture::Capture,
    skipped: u64,
    unreadable: u64,
}

impl<W: Write> Packer<W> {
    /// Appends `root/dir` and everything under it, in walk order.
    fn append_dir(&mut self, root: &Path, dir: &str) -> Result<(), ArchiveError> {
        for walked in walk_under(root, dir) {
            match walked? {
                Walked::Entry { path, relative } => self.append(&path, &relative)?,
                // Listed as a directory already; what it holds is left out.
                Walked::Unlistable { relative } => {
                    warn_unreadable(&relative, "listed");
                    self.unreadable += 1;
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, path: &Path, relative: &Path) -> Result<(), ArchiveError> {
        let metadata = match std::fs::symlink_metadata(path) {
            Ok(metadata) => metadata,
            // Removed since the walk listed it: the tree no longer holds it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // In a directory that may be listed but not searched: the name is all there is.
            Err(e) if is_permission_denied(&e) && may_skip_unreadable(relative) => {
                warn_unreadable(relative, "read");
                self.unreadable += 1;
                // As `tree_digest` records an entry it cannot reach.
                self.digest.other(relative);
                return Ok(());
            }
            Err(e) => return Err(io_err("reading", path)(e)),
        };
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            let mode = metadata.permissions().mode() & ARCHIVED_MODE_BITS;
            let mut header = header(EntryType::Directory, mode, 0);
            self.digest.dir(relative);
            self.builder
                .append_data(&mut header, relative, io::empty())
                .map_err(io_err("archiving", path))
        } else if file_type.is_file() {
            self.append_file(path, relative)
        } else if file_type.is_symlink() && relative.starts_with(LINKS_ALLOWED_UNDER) {
            self.append_symlink(path, relative)
        } else {
            tracing::warn!(
                path = %relative.display(),
                "skipping a fifo, socket, device or cortex link: snapshots do not hold them",
            );
            self.skipped += 1;
            self.digest.other(relative);
            Ok(())
        }
    }

    fn append_file(&mut self, path: &Path, relative: &Path) -> Result<(), ArchiveError> {
        let captured = match self.capture.read(path) {
            Ok(Some(captured)) => captured,
            Ok(None) => return Ok(()),
            Err(e) if may_skip_unreadable(relative) && is_unreadable(&e) => {
                let what = match e {
                    ArchiveError::KeptChanging { .. } => "read as one state (it kept changing)",
                    _ => "read",
                };
                warn_unreadable(relative, what);
                self.unreadable += 1;
                // As `tree_digest` records a file it cannot open.
                self.digest.other(relative);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mode = captured.mode & ARCHIVED_MODE_BITS;
        let mut header = header(EntryType::Regular, mode, captured.len);
        self.digest.begin_file(relative, mode & 0o111 != 0);
        let mut hashed = HashingReader { inner: captured.bytes, digest: &mut self.digest, read: 0 };
        self.builder
            .append_data(&mut header, relative, &mut hashed)
            .map_err(io_err("archiving", path))?;
        // tar pads a short entry silently; a short one would shift every entry after it.
        if hashed.read != captured.len {
            let short = io::Error::new(io::ErrorKind::UnexpectedEof, "the spool was short");
            return Err(io_err("archiving", path)(short));
        }
        Ok(())
    }

    fn append_symlink(&mut self, path: &Path, relative: &Path) -> Result<(), ArchiveError> {
        let target = match std::fs::read_link(path) {
            Ok(target) => target,
            // Removed or replaced since it was listed; the next snapshot sees what is there.
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::InvalidInput) => {
                return Ok(());
            }
            Err(e) => return Err(io_err("reading the link", path)(e)),
        };
        let mut header = header(EntryType::Symlink, 0o777, 0);
        self.digest.symlink(relative, &target);
        self.builder.append_link(&mut header, relative, &target).map_err(io_err("archiving", path))
    }
}

/// An entry under `workspace/` that cannot be read is left out, so that one such entry
/// does not stop every snapshot of the volume.
fn warn_unreadable(relative: &Path, what: &str) {
    tracing::warn!(
        path = %relative.display(),
        "skipping an entry that could not be {what}: the snapshot does not hold it",
    );
}

/// Whether `error` from reading one file means that file cannot be snapshotted now,
/// rather than that the push itself failed.
fn is_unreadable(error: &ArchiveError) -> bool {
    match error {
        ArchiveError::KeptChanging { .. } => true,
        ArchiveError::Io { action: "opening", source, .. } => is_permission_denied(source),
        _ => false,
    }
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Feeds the bytes read through it to a [`TreeHasher`].
struct HashingReader<'a, R> {
    inner: R,
    digest: &'a mut TreeHasher,
    read: u64,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.digest.update(&buf[..read]);
        self.read += read as u64;
        Ok(read)
    }
}

/// Unpacks an archive made by [`pack`] into `dest` (which should be empty), refusing any
/// entry that is not a directory, regular file or workspace link under one of the
/// snapshot directories, and any entry at or under a link. Every file and directory is
/// synced before this returns. Returns the unpacked tree's
/// [`tree_digest`](crate::layout::tree_digest), computed on the way.
pub fn unpack(archive: &Path, dest: &Path) -> Result<String, ArchiveError> {
    let file = File::open(archive).map_err(io_err("opening", archive))?;
    unpack_from(BufReader::with_capacity(UNPACK_CHUNK, file), dest)
}

/// Like [`unpack`], reading the compressed archive from `reader`.
///
/// Two threads: this one decompresses and writes; a second digests what was written, so
/// the digest costs the restore no time on a machine with a spare core.
pub fn unpack_from(reader: impl BufRead, dest: &Path) -> Result<String, ArchiveError> {
    std::thread::scope(|scope| {
        let (feed, digesting) = digest::start(scope);
        let unpacked = unpack_entries(reader, dest, feed);
        let digest = digesting.join().expect("the digest thread does not panic");
        unpacked.map(|()| digest)
    })
}

fn unpack_entries(
    reader: impl BufRead,
    dest: &Path,
    feed: digest::Feed,
) -> Result<(), ArchiveError> {
    let decoder = zstd::Decoder::with_buffer(reader).map_err(io_err("decompressing", dest))?;
    let mut tar = tar::Archive::new(decoder);
    let mut unpacker = Unpacker::new(dest, feed);
    let reading = io_err("reading the archive for", dest);
    for entry in tar.entries().map_err(reading)? {
        let mut entry = entry.map_err(io_err("reading the archive for", dest))?;
        let path = entry.path().map_err(io_err("reading the archive for", dest))?.into_owned();
        let kind = entry.header().entry_type();
        check_entry(&path, kind)?;
        unpacker.check_not_under_link(&path)?;
        let mode = entry.header().mode().map_err(io_err("reading the archive for", dest))?
            & ARCHIVED_MODE_BITS;
        match kind {
            EntryType::Directory => unpacker.dir(&path, mode)?,
            EntryType::Symlink if path.components().count() == 1 => {
                tracing::error!(
                    path = %path.display(),
                    "the archive holds a link in place of a snapshot directory (an older push \
                     followed it); restoring what it held as a directory",
                );
                unpacker.dir(&path, ROOT_DIR_MODE)?;
            }
            EntryType::Symlink => {
                let target = entry.link_name().map_err(io_err("reading the archive for", dest))?;
                let Some(target) = target.filter(|t| !t.as_os_str().is_empty()) else {
                    return Err(refused(&path, "a link must have a target"));
                };
                unpacker.symlink(&path, &target)?;
            }
            _ => unpacker.file(&path, mode, &mut entry)?,
        }
    }
    unpacker.finish()
}

/// Writes entries under `dest`, feeding them to the digest in archive order.
struct Unpacker<'a> {
    dest: &'a Path,
    feed: digest::Feed,
    links: HashSet<PathBuf>,
    dirs: Vec<(PathBuf, u32)>,
    files: Vec<PathBuf>,
}

impl<'a> Unpacker<'a> {
    fn new(dest: &'a Path, feed: digest::Feed) -> Self {
        Self { dest, feed, links: HashSet::new(), dirs: Vec::new(), files: Vec::new() }
    }

    /// Refuses `path` when it or a directory above it is a link this archive made: writing
    /// there would follow the link.
    fn check_not_under_link(&self, path: &Path) -> Result<(), ArchiveError> {
        if path.ancestors().any(|ancestor| self.links.contains(ancestor)) {
            return Err(refused(path, "it is at or under a symbolic link"));
        }
        Ok(())
    }

    fn dir(&mut self, path: &Path, mode: u32) -> Result<(), ArchiveError> {
        let target = self.dest.join(path);
        std::fs::create_dir_all(&target).map_err(io_err("creating", &target))?;
        self.feed.dir(path);
        self.dirs.push((target, mode));
        Ok(())
    }

    fn symlink(&mut self, path: &Path, link_target: &Path) -> Result<(), ArchiveError> {
        let target = self.dest.join(path);
        self.create_parent(&target)?;
        std::os::unix::fs::symlink(link_target, &target).map_err(io_err("creating", &target))?;
        self.feed.symlink(path, link_target);
        self.links.insert(path.to_owned());
        Ok(())
    }

    fn file(
        &mut self,
        path: &Path,
        mode: u32,
        contents: &mut impl Read,
    ) -> Result<(), ArchiveError> {
        let target = self.dest.join(path);
        self.create_parent(&target)?;
        // `create_new`: never opened over an existing file or link.
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)
            .map_err(io_err("creating", &target))?;
        self.feed.file(path, mode & 0o111 != 0);
        loop {
            let mut chunk = self.feed.spare_chunk();
            let filled =
                fill(contents, &mut chunk).map_err(io_err("reading the archive for", &target))?;
            if filled == 0 {
                break;
            }
            out.write_all(&chunk[..filled]).map_err(io_err("writing", &target))?;
            self.feed.bytes(chunk, filled);
        }
        out.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err("setting the mode of", &target))?;
        start_writeback(&out);
        self.files.push(target);
        Ok(())
    }

    fn create_parent(&self, target: &Path) -> Result<(), ArchiveError> {
        match target.parent() {
            Some(parent) => std::fs::create_dir_all(parent).map_err(io_err("creating", parent)),
            None => Ok(()),
        }
    }

    /// Makes everything durable.
    fn finish(mut self) -> Result<(), ArchiveError> {
        // Written back since each file was closed; these mostly wait for the journal.
        for file in &self.files {
            File::open(file).and_then(|f| f.sync_all()).map_err(io_err("syncing", file))?;
        }
        // Directories last, deepest first: their modes may forbid writing, and syncing them
        // makes their entries durable.
        self.dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (dir, mode) in &self.dirs {
            // Opened before its mode is set: the mode may forbid this user to open it (a
            // directory archived as 0000 or 0300), and the open handle stays usable.
            let handle = File::open(dir).map_err(io_err("opening", dir))?;
            handle
                .set_permissions(std::fs::Permissions::from_mode(*mode))
                .map_err(io_err("setting the mode of", dir))?;
            handle.sync_all().map_err(io_err("syncing", dir))?;
        }
        let dest = self.dest;
        File::open(dest).and_then(|d| d.sync_all()).map_err(io_err("syncing", dest))
    }
}

/// Reads until `buffer` is full or the input ends; returns the bytes read.
fn fill(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Asks the kernel to start writing `file` back now, so the sync at the end waits less.
/// `POSIX_FADV_DONTNEED` starts writeback of dirty pages (and drops clean ones from the
/// cache); advice only, so a refusal is ignored.
fn start_writeback(file: &File) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    let _ = posix_fadvise(file.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

fn refused(path: &Path, reason: &'static str) -> ArchiveError {
    ArchiveError::UnsafeEntry { path: path.display().to_string(), reason }
}

fn check_entry(path: &Path, kind: EntryType) -> Result<(), ArchiveError> {
    let mut components = path.components();
    let Some(Component::Normal(first)) = components.next() else {
        return Err(refused(path, "must be a relative path"));
    };
    if !SNAPSHOT_DIRS.iter().any(|d| first == *d) {
        return Err(refused(path, "must be under cortex/ or workspace/"));
    }
    if !components.all(|c| matches!(c, Component::Normal(_))) {
        return Err(refused(path, "must not contain `..` or `.`"));
    }
    match kind {
        EntryType::Regular | EntryType::Directory => Ok(()),
        EntryType::Symlink if first == LINKS_ALLOWED_UNDER => Ok(()),
        EntryType::Symlink => Err(refused(path, "links are allowed only under workspace/")),
        _ => Err(refused(path, "only directories, regular files and links are allowed")),
    }
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
mod tests;
