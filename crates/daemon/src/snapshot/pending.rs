//! The claim a push is making, recorded before it is made, so that a push killed between
//! claiming a generation and recording it in the state file is recognised afterwards as
//! this volume's own, not taken for another machine's newer snapshot.

use serde::{Deserialize, Serialize};

use crate::layout::{self, DataDir, LayoutError, State};
use crate::store::SnapshotStore;

use super::SnapshotError;

/// What `.push-pending.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub generation: u64,
    /// The archive's sha256, as the manifest will name it.
    pub sha256: String,
    /// The tree digest of what the archive holds.
    pub tree_sha256: String,
}

/// Records `pending` durably before the claim is sent.
pub fn record(data: &DataDir, pending: &Pending) -> Result<(), LayoutError> {
    let text = serde_json::to_string_pretty(pending).expect("a pending claim serializes");
    layout::write_atomic(&data.pending_push(), format!("{text}\n").as_bytes())
}

/// Forgets the claim once it is settled either way.
pub fn clear(data: &DataDir) -> Result<(), LayoutError> {
    let path = data.pending_push();
    match std::fs::remove_file(&path) {
        Ok(()) => layout::sync_dir(data.root()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LayoutError::io("removing", &path)(e)),
    }
}

/// Settles a claim an interrupted push left: when the store holds the generation with
/// this volume's archive, the state file records it (the push had succeeded); otherwise
/// the claim is forgotten. Returns whether the state file moved.
pub async fn settle(data: &DataDir, store: &SnapshotStore) -> Result<bool, SnapshotError> {
    let path = data.pending_push();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(LayoutError::io("reading", &path)(e).into()),
    };
    let Ok(pending) = serde_json::from_str::<Pending>(&text) else {
        // Torn by a crash before the claim was sent (it is written atomically, so this
        // takes a damaged volume): nothing was claimed on its strength.
        tracing::warn!(path = %path.display(), "discarding an unreadable pending claim");
        clear(data)?;
        return Ok(false);
    };

    let state = data.read_state()?.ok_or(SnapshotError::NotInitialised)?;
    let mut moved = false;
    if pending.generation > state.generation {
        let claimed = store.manifest_if_claimed(pending.generation).await?;
        if claimed.is_some_and(|manifest| manifest.sha256 == pending.sha256) {
            tracing::warn!(
                generation = pending.generation,
                "recording a generation an interrupted push had claimed"
            );
            data.write_state(&State::new(pending.generation, pending.tree_sha256))?;
            moved = true;
        }
    }
    clear(data)?;
    Ok(moved)
}
