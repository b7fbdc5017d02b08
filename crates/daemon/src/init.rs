//! `matrixd init`: make the volume ready, restoring the latest snapshot when the volume
//! holds no state or an older, unchanged one. Idempotent: a second run changes nothing.

use crate::config::Config;
use crate::layout::{tree_digest, DataDir, LayoutError};
use crate::restore;
use crate::snapshot::{self, SnapshotError};
use crate::store::SnapshotStore;

/// What `init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    /// The volume was laid out (or already was); nothing was restored.
    Ready {
        generation: u64,
    },
    Restored {
        generation: u64,
    },
    /// The store has a newer generation but the volume has changes of its own; both are
    /// kept and the daemon runs on the local state.
    KeptLocal {
        local: u64,
        remote: u64,
    },
}

/// Runs `init` for `config`.
pub async fn init(config: &Config) -> Result<InitOutcome, SnapshotError> {
    let data = DataDir::new(&config.data_dir);
    let root = data.root();
    std::fs::create_dir_all(root).map_err(LayoutError::io("creating", root))?;

    // 1. Finish or discard what an interrupted run left behind.
    restore::recover(&data)?;
    let tmp = data.snapshot_tmp();
    restore::remove_dir(&tmp)?;

    // 2. Restore when the store is ahead of an unchanged volume.
    let mut outcome = None;
    if let Some(s3) = &config.s3 {
        let store = SnapshotStore::new(s3, config.user_id)?;
        if data.read_state()?.is_some() {
            snapshot::pending::settle(&data, &store).await?;
        }
        if let Some(latest) = store.latest().await? {
            outcome = Some(match local_generation(&data, latest.generation)? {
                Local::Clean(local) if latest.generation > local => {
                    restore::restore(&data, &store, &latest).await?;
                    InitOutcome::Restored { generation: latest.generation }
                }
                Local::Changed(local) if latest.generation > local => {
                    tracing::warn!(
                        local,
                        remote = latest.generation,
                        "the store has a newer snapshot but this volume has unsaved changes; \
                            keeping the local state"
                    );
                    InitOutcome::KeptLocal { local, remote: latest.generation }
                }
                Local::Clean(local) | Local::Changed(local) => {
                    InitOutcome::Ready { generation: local }
                }
            });
        }
    }

    // 3. Lay out whatever is missing.
    data.ensure_layout()?;
    match outcome {
        Some(outcome) => Ok(outcome),
        None => {
            let generation = data.read_state()?.map(|s| s.generation).unwrap_or_default();
            Ok(InitOutcome::Ready { generation })
        }
    }
}

enum Local {
    /// The tree is what the state file recorded (or there is no tree at all).
    Clean(u64),
    Changed(u64),
}

/// The volume's generation, and whether it changed since; the tree is read only when the
/// store is ahead of it, so init on an up-to-date volume stays cheap.
fn local_generation(data: &DataDir, remote: u64) -> Result<Local, LayoutError> {
    let has_tree = data.cortex().exists() || data.workspace().exists();
    match data.read_state()? {
        None if has_tree => Ok(Local::Changed(0)),
        None => Ok(Local::Clean(0)),
        Some(state) if state.generation >= remote => Ok(Local::Clean(state.generation)),
        Some(state) if tree_digest(data.root())? == state.tree_sha256 => {
            Ok(Local::Clean(state.generation))
        }
        Some(state) => Ok(Local::Changed(state.generation)),
    }
}
