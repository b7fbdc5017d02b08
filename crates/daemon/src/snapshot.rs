//! Pushing a snapshot: archive the volume, upload it, claim the next generation.

mod changes;
pub mod pending;

use std::path::PathBuf;

pub use changes::{Assessment, ChangeCheck, Fingerprint, FULL_CHECK_EVERY};

use crate::archive::{self, ArchiveError};
use crate::failpoint;
use crate::layout::{check_snapshot_dirs, tree_digest, DataDir, LayoutError, State};
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

/// Held for the whole of a push.
static PUSHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
/// Reads the whole tree to tell; a periodic pusher uses [`push_with`] instead.
pub async fn push(
    data: &DataDir,
    store: &SnapshotStore,
    keep: usize,
) -> Result<PushOutcome, SnapshotError> {
    push_with(data, store, keep, &mut ChangeCheck::default()).await
}

/// Like [`push`], with what `changes` remembers from earlier pushes: when the tree's
/// metadata is as it was at the last snapshot, no file is read.
///
/// Steps: compare the tree with the state file (its metadata, or its contents when that
/// says nothing); archive into the volume's temporary directory, digesting what is
/// archived; check the store holds no newer generation; upload under a fresh key; claim
/// the generation (create-only manifest); record it in the state file; prune old
/// generations.
pub async fn push_with(
    data: &DataDir,
    store: &SnapshotStore,
    keep: usize,
    changes: &mut ChangeCheck,
) -> Result<PushOutcome, SnapshotError> {
    // One push at a time in this process: a periodic push still running when the shutdown
    // push starts must finish and record its generation first.
    let _pushing = PUSHING.lock().await;
    pending::settle(data, store).await?;
    let state = data.read_state()?.ok_or(SnapshotError::NotInitialised)?;
    let unchanged = Ok(PushOutcome::Unchanged { generation: state.generation });

    // A link in place of `cortex/` or `workspace/` would put what it points to in the
    // snapshot, and make the snapshot unrestorable: refused before anything is read.
    check_snapshot_dirs(data.root())?;

    // 1. Taken before anything is read, so a change made meanwhile moves it again.
    let root = data.root().to_owned();
    let fingerprint = tokio::task::spawn_blocking(move || Fingerprint::of(&root)).await??;
    if state.generation > 0 {
        match changes.assess(state.generation, &fingerprint) {
            Assessment::Unchanged => return unchanged,
            Assessment::Moved => {}
            Assessment::Unknown => {
                changes.count_full_read();
                let root = data.root().to_owned();
                let digest = tokio::task::spawn_blocking(move || tree_digest(&root)).await??;
                if digest == state.tree_sha256 {
                    changes.settle(state.generation, fingerprint);
                    return unchanged;
                }
            }
        }
    }

    // 2. The archive, and the digest of exactly what it holds.
    let archive_path = temp_archive_path(data)?;
    let (root, out) = (data.root().to_owned(), archive_path.clone());
    let packed = tokio::task::spawn_blocking(move || archive::pack(&root, &out)).await?;
    let packed = match packed {
        Ok(packed) => packed,
        Err(e) => {
            discard_archive(data, &archive_path);
            return Err(e.into());
        }
    };
    if packed.skipped > 0 {
        tracing::warn!(skipped = packed.skipped, "snapshot leaves out special files");
    }
    if packed.unreadable > 0 {
        tracing::warn!(
            unreadable = packed.unreadable,
            "snapshot leaves out workspace entries it could not read",
        );
    }
    if state.generation > 0 && packed.tree_sha256 == state.tree_sha256 {
        discard_archive(data, &archive_path);
        changes.settle(state.generation, fingerprint);
        return unchanged;
    }
    failpoint::hit("push.packed");

    let uploaded = upload(store, &state, &archive_path).await;
    discard_archive(data, &archive_path);
    let (generation, key) = uploaded?;
    failpoint::hit("push.uploaded");

    let manifest = Manifest::new(generation, key.clone(), packed.sha256.clone(), packed.size);
    let claim = pending::Pending {
        generation,
        sha256: packed.sha256,
        tree_sha256: packed.tree_sha256.clone(),
    };
    pending::record(data, &claim)?;
    if let Err(error) = store.commit(&manifest).await {
        // Refused: the archive is ours alone and nothing references it. Any other error
        // leaves the claim recorded, since the store may have taken it.
        if let StoreError::GenerationTaken { .. } = error {
            pending::clear(data)?;
            if let Err(cleanup) = store.delete(&key).await {
                tracing::warn!(key, error = %cleanup, "could not delete an unclaimed archive");
            }
        }
        return Err(error.into());
    }
    failpoint::hit("push.committed");

    data.write_state(&State::new(generation, packed.tree_sha256))?;
    pending::clear(data)?;
    changes.settle(generation, fingerprint);
    let pruned = store.prune(keep).await?;
    tracing::debug!(
        generation,
        size = packed.size,
        skipped = packed.skipped,
        unreadable = packed.unreadable,
        pruned,
        "snapshot pushed",
    );
    Ok(PushOutcome::Pushed { generation, size: packed.size })
}

/// Checks that the store holds no generation newer than the volume's, then uploads the
/// archive for the next one. Returns that generation and the archive's key.
async fn upload(
    store: &SnapshotStore,
    state: &State,
    archive_path: &std::path::Path,
) -> Result<(u64, String), SnapshotError> {
    if let Some(latest) = store.latest().await? {
        if latest.generation > state.generation {
            return Err(SnapshotError::Stale {
                local: state.generation,
                remote: latest.generation,
            });
        }
    }
    let generation = state.generation + 1;
    let key = store.new_archive_key(generation);
    store.upload_archive(archive_path, &key).await?;
    Ok((generation, key))
}

/// Removes an archive once uploaded or abandoned.
fn discard_archive(data: &DataDir, archive_path: &std::path::Path) {
    let _ = std::fs::remove_file(archive_path);
    // Left only when another push is running; init clears it otherwise.
    let _ = std::fs::remove_dir(data.snapshot_tmp());
}

fn temp_archive_path(data: &DataDir) -> Result<PathBuf, LayoutError> {
    let dir = data.snapshot_tmp();
    std::fs::create_dir_all(&dir).map_err(LayoutError::io("creating", &dir))?;
    Ok(dir.join(format!("{}.tar.zst", ulid::Ulid::new())))
}
