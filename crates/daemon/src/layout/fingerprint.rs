//! A digest of a tree's metadata: for every entry, its path, kind and mode, size, inode,
//! mtime and ctime to the nanosecond, and link target. It reads no file contents: one
//! `lstat` per entry.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    entries_under, is_permission_denied, may_skip_unreadable, snapshot_entries, LayoutError,
};

/// The metadata digest of some of the snapshot directories, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `root`'s snapshot directories as they are now.
    pub fn of(root: &Path) -> Result<Self, LayoutError> {
        Self::from_entries(snapshot_entries(root))
    }

    /// The fingerprint of `root/dir` alone.
    pub fn of_dir(root: &Path, dir: &str) -> Result<Self, LayoutError> {
        Self::from_entries(entries_under(root, dir))
    }

    fn from_entries(
        entries: impl Iterator<Item = Result<(PathBuf, PathBuf), LayoutError>>,
    ) -> Result<Self, LayoutError> {
        let mut hasher = Sha256::new();
        for entry in entries {
            let (path, relative) = entry?;
            let metadata = match std::fs::symlink_metadata(&path) {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Listed in a directory that may not be searched: only its name is known,
                // and the directory's own mtime moves when names come and go.
                Err(e) if is_permission_denied(&e) && may_skip_unreadable(&relative) => {
                    hasher.update(relative.as_os_str().as_encoded_bytes());
                    hasher.update([1]);
                    continue;
                }
                Err(e) => return Err(LayoutError::io("reading", &path)(e)),
            };
            hasher.update(relative.as_os_str().as_encoded_bytes());
            hasher.update([0]);
            for number in [
                metadata.mode().into(),
                metadata.len(),
                metadata.ino(),
                metadata.mtime() as u64,
                metadata.mtime_nsec() as u64,
                metadata.ctime() as u64,
                metadata.ctime_nsec() as u64,
            ] {
                hasher.update(number.to_le_bytes());
            }
            if metadata.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap_or_default();
                hasher.update(target.as_os_str().as_encoded_bytes());
            }
            hasher.update([0]);
        }
        Ok(Self(hasher.finalize().into()))
    }
}
