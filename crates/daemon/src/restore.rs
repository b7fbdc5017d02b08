//! Restoring a snapshot so that a kill at any moment leaves the old state or the new one,
//! and the next run finishes the job.
//!
//! 1. Download the archive into `/data/.restore/` (same filesystem) and check its sha256.
//! 2. Unpack it into `.restore/tree/`, syncing every file and directory.
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
use crate::layout::{self, sync_dir, tree_digest, DataDir, LayoutError, State, SNAPSHOT_DIRS};
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

    let archive_path = staging.join("archive.tar.zst");
    store.download(manifest, &archive_path).await?;
    failpoint::hit("restore.downloaded");

    let tree = staging.join("tree");
    let (from, into) = (archive_path.clone(), tree.clone());
    tokio::task::spawn_blocking(move || archive::unpack(&from, &into)).await??;
    std::fs::remove_file(&archive_path).map_err(LayoutError::io("removing", &archive_path))?;
    failpoint::hit("restore.unpacked");

    let digest = tree_digest(&tree)?;
    let state = serde_json::to_string_pretty(&State::new(manifest.generation, digest))
        .expect("state serializes");
    layout::write_atomic(&staging.join("state.json"), format!("{state}\n").as_bytes())?;
    layout::write_atomic(&staging.join(READY), b"")?;
    failpoint::hit("restore.ready");

    roll_forward(data)?;
    tracing::debug!(generation = manifest.generation, "snapshot restored");
    Ok(())
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

fn remove_dir(path: &Path) -> Result<(), LayoutError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LayoutError::io("removing", path)(e)),
    }
}
