//! Restoring a snapshot so that a kill at any moment leaves the old state or the new one,
//! and the next run finishes the job.
//!
//! 1. Stream the archive from the store and unpack it as it arrives into
//!    `/data/.restore/tree/` (same filesystem), syncing every file and directory. The
//!    staging tree is never live: only after the download's size and sha256 match the
//!    manifest does the restore go on (unpacking refuses any entry outside the tree, so an
//!    archive that fails the check has touched nothing but the staging directory).
//! 2. (folded into 1)
//! 3. Write the new state file to `.restore/state.json`.
//! 4. Write the `.restore/READY` marker: from here on the restore is committed.
//! 5. Roll forward: for `cortex` and `workspace`, move the live directory to
//!    `.restore/old/` and the new one into place; then rename the state file over the old.
//! 6. Remove `.restore/`.
//!
//! [`recover`] runs before anything else reads the volume: a `.restore/` without `READY`
//! is discarded (the old state was never touched); one with `READY` is rolled forward
//! again. Every step of the roll-forward is a rename that can be repeated.

use std::path::Path;

use crate::archive;
use crate::failpoint;
use crate::layout::{self, sync_dir, DataDir, LayoutError, State, SNAPSHOT_DIRS};
use crate::snapshot::SnapshotError;
use crate::store::{Manifest, SnapshotStore};

const READY: &str = "READY";

/// Restores `manifest`'s snapshot over the volume.
pub async fn restore(
    data: &DataDir,
    store: &SnapshotStore,
    manifest: &Manifest,
) -> Result<(), SnapshotError> {
    recover(data)?;
    let staging = data.restore_dir();
    std::fs::create_dir_all(&staging).map_err(LayoutError::io("creating", &staging))?;

    let tree = staging.join("tree");
    let digest = download_and_unpack(store, manifest, tree).await?;
    failpoint::hit("restore.unpacked");

    let state = serde_json::to_string_pretty(&State::new(manifest.generation, digest))
        .expect("state serializes");
    layout::write_atomic(&staging.join("state.json"), format!("{state}\n").as_bytes())?;
    layout::write_atomic(&staging.join(READY), b"")?;
    failpoint::hit("restore.ready");

    roll_forward(data)?;
    tracing::debug!(generation = manifest.generation, "snapshot restored");
    Ok(())
}

// FIXME: restore reaches 0.8 of a raw GET of the same bytes only when the machine has CPU to
// spare (1.04-1.32 when idle, 0.61-0.73 in 8 of 12 runs on a loaded 2-core machine: see
// docs/benchmarks.md); the archive is one zstd frame, so decompression uses one core.
/// Downloads and unpacks at once: the download feeds a bounded channel that a blocking
/// thread decompresses and unpacks from. Returns the tree digest.
async fn download_and_unpack(
    store: &SnapshotStore,
    manifest: &Manifest,
    tree: std::path::PathBuf,
) -> Result<String, SnapshotError> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(CHANNEL_CHUNKS);
    let unpacking = tokio::task::spawn_blocking(move || {
        archive::unpack_from(ChannelReader { receiver, current: bytes::Bytes::new() }, &tree)
    });
    let downloaded = store.download(manifest, sender).await;
    let unpacked = unpacking.await?;
    match (downloaded, unpacked) {
        // An unpacking failure is reported as such only when the archive was intact.
        (Err(crate::store::StoreError::SinkClosed), Err(e)) => Err(e.into()),
        (Err(e), _) => Err(e.into()),
        (Ok(()), Err(e)) => Err(e.into()),
        (Ok(()), Ok(digest)) => Ok(digest),
    }
}

/// Chunks in flight between the download and the unpacker.
const CHANNEL_CHUNKS: usize = 16;

/// Reads the bytes sent through a channel, chunk by chunk without copying them; the end of
/// the channel is the end of input.
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = std::io::BufRead::fill_buf(self)?;
        let count = buf.len().min(available.len());
        buf[..count].copy_from_slice(&available[..count]);
        std::io::BufRead::consume(self, count);
        Ok(count)
    }
}

impl std::io::BufRead for ChannelReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => break,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amount: usize) {
        bytes::Buf::advance(&mut self.current, amount);
    }
}

/// Finishes or discards a restore that a previous run left behind.
pub fn recover(data: &DataDir) -> Result<(), LayoutError> {
    let staging = data.restore_dir();
    if !staging.exists() {
        return Ok(());
    }
    if staging.join(READY).exists() {
        tracing::warn!("finishing a restore that was interrupted");
        roll_forward(data)
    } else {
        tracing::warn!("discarding a restore that was interrupted before it was complete");
        remove_dir(&staging)
    }
}

fn roll_forward(data: &DataDir) -> Result<(), LayoutError> {
    let staging = data.restore_dir();
    let (tree, old) = (staging.join("tree"), staging.join("old"));
    std::fs::create_dir_all(&old).map_err(LayoutError::io("creating", &old))?;

    for name in SNAPSHOT_DIRS {
        let (new, live, retired) = (tree.join(name), data.root().join(name), old.join(name));
        if !new.exists() {
            continue; // Moved into place by an earlier run.
        }
        if live.exists() {
            if retired.exists() {
                remove_dir(&retired)?;
            }
            rename(&live, &retired)?;
            failpoint::hit(&format!("restore.retired.{name}"));
        }
        rename(&new, &live)?;
        sync_dir(data.root())?;
        failpoint::hit(&format!("restore.swapped.{name}"));
    }

    let new_state = staging.join("state.json");
    if new_state.exists() {
        rename(&new_state, &data.state_file())?;
        sync_dir(data.root())?;
    }
    failpoint::hit("restore.state");
    remove_dir(&staging)?;
    sync_dir(data.root())
}

fn rename(from: &Path, to: &Path) -> Result<(), LayoutError> {
    std::fs::rename(from, to).map_err(LayoutError::io("renaming", from))
}

/// Removes a retired or partial tree, whatever modes its directories have: snapshots keep
/// modes, so a tree can hold read-only directories (a Go module cache makes them), whose
/// entries a non-root user cannot delete.
pub fn remove_dir(path: &Path) -> Result<(), LayoutError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(LayoutError::io("removing", path)(e)),
    }
    make_dirs_writable(path)?;
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LayoutError::io("removing", path)(e)),
    }
}

/// Gives the owner `rwx` on `dir` and every directory under it (links are not followed),
/// each before it is listed.
fn make_dirs_writable(dir: &Path) -> Result<(), LayoutError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = match std::fs::symlink_metadata(dir) {
        Ok(metadata) if metadata.is_dir() => metadata,
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LayoutError::io("reading", dir)(e)),
    };
    let mode = metadata.permissions().mode() | 0o700;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(LayoutError::io("setting the mode of", dir))?;
    let entries = std::fs::read_dir(dir).map_err(LayoutError::io("listing", dir))?;
    for entry in entries {
        let entry = entry.map_err(LayoutError::io("listing", dir))?;
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        if is_dir {
            make_dirs_writable(&entry.path())?;
        }
    }
    Ok(())
}
