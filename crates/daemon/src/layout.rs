//! The `/data` volume: what lives where, the state file, and laying the tree out.
//!
//! ```text
//! /data/
//!   state.json          generation of the last snapshot pushed or restored, and the tree digest
//!   cortex/             identity.key, settings.json, transcript.jsonl,
//!                       journal/<intent>/<seq>-<kind>.json
//!   workspace/          the user's files
//!   .restore/           a restore in progress (see restore.rs); never part of a snapshot
//!   .snapshot-tmp/      archives being uploaded; never part of a snapshot
//!   .push-pending.json  a generation being claimed, until the state file records it
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod fingerprint;

pub use fingerprint::Fingerprint;

/// The directories a snapshot holds, in archive order.
pub const SNAPSHOT_DIRS: [&str; 2] = ["cortex", "workspace"];

const STATE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is not a directory (a symbolic link or another file); snapshots refuse it")]
    NotADirectory { path: PathBuf },
}

impl LayoutError {
    pub fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io { action, path: path.to_owned(), source }
    }
}

/// The small state file beside `cortex/` and `workspace/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    /// Generation of the last snapshot pushed from or restored to this volume; 0 for none.
    pub generation: u64,
    /// [`tree_digest`] of the volume when that happened (or when it was laid out): a
    /// different digest now means local changes not yet in a snapshot.
    pub tree_sha256: String,
}

impl State {
    pub fn new(generation: u64, tree_sha256: String) -> Self {
        Self { format: STATE_FORMAT, generation, tree_sha256 }
    }
}

/// Paths inside the volume.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cortex(&self) -> PathBuf {
        self.root.join("cortex")
    }

    pub fn workspace(&self) -> PathBuf {
        self.root.join("workspace")
    }

    pub fn journal(&self) -> PathBuf {
        self.cortex().join("journal")
    }

    pub fn identity_key(&self) -> PathBuf {
        self.cortex().join("identity.key")
    }

    pub fn settings(&self) -> PathBuf {
        self.cortex().join("settings.json")
    }

    pub fn transcript(&self) -> PathBuf {
        self.cortex().join("transcript.jsonl")
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn restore_dir(&self) -> PathBuf {
        self.root.join(".restore")
    }

    pub fn snapshot_tmp(&self) -> PathBuf {
        self.root.join(".snapshot-tmp")
    }

    pub fn pending_push(&self) -> PathBuf {
        self.root.join(".push-pending.json")
    }

    /// Creates whatever part of the layout is missing and leaves the rest untouched, so a
    /// second run changes nothing. A new volume gets a fresh identity key and a state file
    /// at generation 0.
    pub fn ensure_layout(&self) -> Result<(), LayoutError> {
        for dir in [self.root.clone(), self.cortex(), self.journal(), self.workspace()] {
            fs::create_dir_all(&dir).map_err(LayoutError::io("creating", &dir))?;
        }
        if !self.identity_key().exists() {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            write_new_file(&self.identity_key(), hex::encode(key.to_bytes()).as_bytes(), 0o600)?;
        }
        if !self.settings().exists() {
            write_new_file(&self.settings(), b"{}\n", 0o644)?;
        }
        if !self.transcript().exists() {
            write_new_file(&self.transcript(), b"", 0o644)?;
        }
        if !self.state_file().exists() {
            let state = State::new(0, tree_digest(&self.root)?);
            self.write_state(&state)?;
        }
        Ok(())
    }

    /// The state file, or `None` on a volume that has none yet.
    pub fn read_state(&self) -> Result<Option<State>, LayoutError> {
        let path = self.state_file();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LayoutError::io("reading", &path)(e)),
        };
        let state: State = serde_json::from_str(&text)
            .map_err(|e| LayoutError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        if state.format != STATE_FORMAT {
            let reason = format!("format {} is not {STATE_FORMAT}", state.format);
            return Err(LayoutError::Corrupt { path, reason });
        }
        Ok(Some(state))
    }

    /// Replaces the state file atomically.
    pub fn write_state(&self, state: &State) -> Result<(), LayoutError> {
        let mut text = serde_json::to_string_pretty(state).expect("state serializes");
        text.push('\n');
        write_atomic(&self.state_file(), text.as_bytes())
    }

    /// The daemon's signing key.
    pub fn signing_key(&self) -> Result<SigningKey, LayoutError> {
        let path = self.identity_key();
        let text = fs::read_to_string(&path).map_err(LayoutError::io("reading", &path))?;
        let corrupt =
            |reason: &str| LayoutError::Corrupt { path: path.clone(), reason: reason.into() };
        let bytes = hex::decode(text.trim()).map_err(|_| corrupt("not hex"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| corrupt("not 32 bytes"))?;
        Ok(SigningKey::from_bytes(&bytes))
    }
}

/// Checks that each snapshot directory of `root` is a real directory or absent: a link in
/// its place would make a snapshot hold whatever the link points to.
pub fn check_snapshot_dirs(root: &Path) -> Result<(), LayoutError> {
    for dir in SNAPSHOT_DIRS {
        let path = root.join(dir);
        match fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => return Err(LayoutError::NotADirectory { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LayoutError::io("reading", &path)(e)),
        }
    }
    Ok(())
}

/// Whether an entry at `relative` that cannot be read is left out of snapshots (counted
/// and warned about) rather than failing them: anything under `workspace/`. `cortex/` is
/// the daemon's own state and stays strict.
pub fn may_skip_unreadable(relative: &Path) -> bool {
    relative.starts_with(SKIPPABLE_DIR)
}

/// Whether `error` means the caller lacks the permission to read.
pub fn is_permission_denied(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::PermissionDenied
}

/// The snapshot directory whose unreadable entries are skipped.
const SKIPPABLE_DIR: &str = "workspace";

/// A digest of `root/cortex` and `root/workspace`: every path (in walk order, names
/// sorted), its kind, its executable bit, its contents and, for a symbolic link, its
/// target. Equal digests mean equal snapshot contents.
pub fn tree_digest(root: &Path) -> Result<String, LayoutError> {
    let mut digest = TreeHasher::new();
    for entry in snapshot_entries(root) {
        let (path, relative) = entry?;
        let metadata = match fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // In a directory that may be listed but not searched, as the archive records it.
            Err(e) if is_permission_denied(&e) && may_skip_unreadable(&relative) => {
                digest.other(&relative);
                continue;
            }
            Err(e) => return Err(LayoutError::io("reading", &path)(e)),
        };
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            digest.dir(&relative);
        } else if file_type.is_file() {
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if is_permission_denied(&e) && may_skip_unreadable(&relative) => {
                    // As the archive records it: left out.
                    digest.other(&relative);
                    continue;
                }
                Err(e) => return Err(LayoutError::io("reading", &path)(e)),
            };
            digest.begin_file(&relative, metadata.permissions().mode() & 0o111 != 0);
            hash_file(&mut digest, file, &path)?;
        } else if file_type.is_symlink() {
            let target =
                fs::read_link(&path).map_err(LayoutError::io("reading the link", &path))?;
            digest.symlink(&relative, &target);
        } else {
            digest.other(&relative);
        }
    }
    Ok(digest.finish())
}

/// Every entry under `root/cortex` and `root/workspace`, directories before what they hold
/// and names sorted, as (path, path relative to `root`). Symbolic links are listed, never
/// followed.
pub fn snapshot_entries(
    root: &Path,
) -> impl Iterator<Item = Result<(PathBuf, PathBuf), LayoutError>> + '_ {
    SNAPSHOT_DIRS.iter().flat_map(move |dir| entries_under(root, dir))
}

/// Like [`snapshot_entries`], for the one snapshot directory `dir`. A directory under
/// `workspace/` that cannot be listed is walked past (see [`walk_under`]).
pub fn entries_under<'a>(
    root: &'a Path,
    dir: &str,
) -> impl Iterator<Item = Result<(PathBuf, PathBuf), LayoutError>> + 'a {
    walk_under(root, dir).filter_map(|walked| match walked {
        Ok(Walked::Entry { path, relative }) => Some(Ok((path, relative))),
        Ok(Walked::Unlistable { .. }) => None,
        Err(e) => Some(Err(e)),
    })
}

/// One step of [`walk_under`].
#[derive(Debug)]
pub enum Walked {
    /// An entry, as (path, path relative to the root).
    Entry { path: PathBuf, relative: PathBuf },
    /// A directory under `workspace/` whose entries could not be listed (no permission):
    /// it is listed itself, its contents are not.
    Unlistable { relative: PathBuf },
}

/// Every entry under `root/dir`, directories before what they hold and names sorted;
/// nothing when `root/dir` is not a directory (a link in its place is not followed).
pub fn walk_under<'a>(
    root: &'a Path,
    dir: &str,
) -> impl Iterator<Item = Result<Walked, LayoutError>> + 'a {
    let base = root.join(dir);
    // `lstat`: a link in the directory's place is not walked.
    let is_dir = fs::symlink_metadata(&base).is_ok_and(|m| m.is_dir());
    let walk = is_dir.then(|| walkdir::WalkDir::new(&base).sort_by_file_name());
    walk.into_iter().flatten().filter_map(move |entry| {
        let entry = match entry {
            Ok(entry) => entry,
            // Removed while the walk ran: the tree no longer holds it.
            Err(e) if e.io_error().is_some_and(|e| e.kind() == io::ErrorKind::NotFound) => {
                return None;
            }
            Err(e) => {
                let path = e.path().unwrap_or(&base).to_owned();
                let relative = path.strip_prefix(root).unwrap_or(&path).to_owned();
                if e.io_error().is_some_and(is_permission_denied) && may_skip_unreadable(&relative)
                {
                    return Some(Ok(Walked::Unlistable { relative }));
                }
                return Some(Err(LayoutError::Io { action: "walking", path, source: e.into() }));
            }
        };
        let path = entry.into_path();
        let relative = path.strip_prefix(root).unwrap_or(&path).to_owned();
        Some(Ok(Walked::Entry { path, relative }))
    })
}

/// Builds a [`tree_digest`] from entries given in walk order; restore uses it to digest a
/// tree while unpacking it, instead of reading it back.
#[derive(Debug, Clone, Default)]
pub struct TreeHasher {
    hasher: Sha256,
    file_length: u64,
    in_file: bool,
}

impl TreeHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(&mut self, relative: &Path) {
        self.end_file();
        self.entry(relative, b"d");
        self.hasher.update([0]);
    }

    /// A symbolic link: its target is part of the digest, so a changed target is a change.
    pub fn symlink(&mut self, relative: &Path, target: &Path) {
        self.end_file();
        self.entry(relative, b"l");
        self.hasher.update(target.as_os_str().as_encoded_bytes());
        self.hasher.update([0]);
    }

    pub fn other(&mut self, relative: &Path) {
        self.end_file();
        self.entry(relative, b"o");
        self.hasher.update([0]);
    }

    /// Starts a file; its contents follow through [`TreeHasher::update`].
    pub fn begin_file(&mut self, relative: &Path, executable: bool) {
        self.end_file();
        self.entry(relative, if executable { b"x" } else { b"f" });
        self.in_file = true;
        self.file_length = 0;
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.file_length += bytes.len() as u64;
    }

    pub fn finish(mut self) -> String {
        self.end_file();
        hex::encode(self.hasher.finalize())
    }

    fn entry(&mut self, relative: &Path, kind: &[u8]) {
        self.hasher.update(relative.as_os_str().as_encoded_bytes());
        self.hasher.update([0]);
        self.hasher.update(kind);
    }

    fn end_file(&mut self) {
        if std::mem::take(&mut self.in_file) {
            self.hasher.update(self.file_length.to_le_bytes());
            self.hasher.update([0]);
        }
    }
}

fn hash_file(digest: &mut TreeHasher, mut file: File, path: &Path) -> Result<(), LayoutError> {
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(LayoutError::io("reading", path))?;
        if read == 0 {
            return Ok(());
        }
        digest.update(&buffer[..read]);
    }
}

/// Writes a file that must not exist yet, durably.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), LayoutError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(LayoutError::io("creating", path))?;
    file.write_all(contents).map_err(LayoutError::io("writing", path))?;
    file.sync_all().map_err(LayoutError::io("syncing", path))
}

/// Replaces `path` with `contents` so that a crash leaves the old file or the new one:
/// a temporary file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), LayoutError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp =
        tempfile::NamedTempFile::new_in(dir).map_err(LayoutError::io("creating a file in", dir))?;
    temp.write_all(contents).map_err(LayoutError::io("writing", temp.path()))?;
    temp.as_file().sync_all().map_err(LayoutError::io("syncing", temp.path()))?;
    temp.persist(path).map_err(|e| LayoutError::io("renaming into", path)(e.error))?;
    sync_dir(dir)
}

/// Makes renames and creations inside `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(LayoutError::io("syncing", dir))
}
