//! Pushing a snapshot: archive the volume, upload it, claim the next generation.

use std::path::PathBuf;

use crate::archive::{self, ArchiveError};
use crate::failpoint;
use crate::layout::{tree_digest, DataDir, LayoutError, State};
use crate::store::{Manifest, SnapshotStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the volume has no state file; run `matrixd init` first")]
    NotInitialised,
    #[error(
        "local state is at generation {local} but the store has generation {remote}: \
         refusing to overwrite a newer snapshot written by another machine"
    )]
    Stale { local: u64, remote: u64 },
    #[error("archiving task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Nothing changed since the last snapshot.
    Unchanged {
        generation: u64,
    },
    Pushed {
        generation: u64,
        size: u64,
    },
}

/// Pushes the volume as the next generation, unless nothing changed since the last one.
///
/// Steps: compare the tree with the state file; check the store holds no newer generation;
/// archive into the volume's temporary directory; upload under a fresh key; claim the
/// generation (create-only manifest); record it in the state file; prune old generations.
pub async fn push(
    data: &DataDir,
    store: &SnapshotStore,
    keep: usize,
) -> Result<PushOutcome, SnapshotError> {
    let state = data.read_state()?.ok_or(SnapshotError::NotInitialised)?;
    // FIXME: detecting a change reads the whole tree; a periodic push of a large, unchanged
    // workspace costs one full read per interval.
    let root = data.root().to_owned();
    let digest = tokio::task::spawn_blocking(move || tree_digest(&root)).await??;
    if state.generation > 0 && digest == state.tree_sha256 {
        return Ok(PushOutcome::Unchanged { generation: state.generation });
    }

    if let Some(latest) = store.latest().await? {
        if latest.generation > state.generation {
            return Err(SnapshotError::Stale {
                local: state.generation,
                remote: latest.generation,
            });
        }
    }
    let generation = state.generation + 1;

    let archive_path = temp_archive_path(data)?;
    let (root, out) = (data.root().to_owned(), archive_path.clone());
    let packed = tokio::task::spawn_blocking(move || archive::pack(&root, &out)).await??;
    failpoint::hit("push.packed");

    let key = store.new_archive_key(generation);
    let uploaded = store.upload_archive(&archive_path, &key).await;
    let _ = std::fs::remove_file(&archive_path);
    // Left only when another push is running; init clears it otherwise.
    let _ = std::fs::remove_dir(data.snapshot_tmp());
    uploaded?;
    failpoint::hit("push.uploaded");

    let manifest = Manifest::new(generation, key.clone(), packed.sha256, packed.size);
    if let Err(error) = store.commit(&manifest).await {
        // The archive is ours alone; nothing references it now.
        if let Err(cleanup) = store.delete(&key).await {
            tracing::warn!(key, error = %cleanup, "could not delete an unclaimed archive");
        }
        return Err(error.into());
    }
    failpoint::hit("push.committed");

    data.write_state(&State::new(generation, digest))?;
    let pruned = store.prune(keep).await?;
    tracing::debug!(generation, size = packed.size, pruned, "snapshot pushed");
    Ok(PushOutcome::Pushed { generation, size: packed.size })
}

fn temp_archive_path(data: &DataDir) -> Result<PathBuf, LayoutError> {
    let dir = data.snapshot_tmp();
    std::fs::create_dir_all(&dir).map_err(LayoutError::io("creating", &dir))?;
    Ok(dir.join(format!("{}.tar.zst", ulid::Ulid::new())))
}
