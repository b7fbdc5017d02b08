//! What the emulator remembers across restarts, saved as one JSON file written atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::{LeaseData, Machine, MachineState, Volume};

/// The file name under the state directory.
const STATE_FILE: &str = "state.json";

/// Every app, machine and volume.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Store {
    pub apps: BTreeMap<String, AppRecord>,
}

/// One app.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AppRecord {
    pub id: String,
    pub name: String,
    pub org_slug: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub machines: BTreeMap<String, MachineRecord>,
    pub volumes: BTreeMap<String, Volume>,
}

/// One machine and what the API does not show of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MachineRecord {
    pub machine: Machine,
    pub address: Ipv4Addr,
    pub lease: Option<LeaseData>,
    /// Unix milliseconds of the destroy, for the short time a destroyed machine is shown.
    pub destroyed_at: Option<i64>,
    /// The instance ids of replaced versions, oldest first: `wait` knows them as stopped.
    #[serde(default)]
    pub replaced_versions: Vec<String>,
    /// Restarts by the machine's `restart` policy since a user last started it.
    #[serde(default)]
    pub restarts: u32,
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
}

/// The state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing a file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("parsing the emulator state {path}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io { action, path: path.display().to_string(), source }
}

impl StateDir {
    /// Creates the directory (and its `volumes/`) when missing.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let volumes = root.join("volumes");
        std::fs::create_dir_all(&volumes).map_err(io("creating", &volumes))?;
        // Machine processes get volume paths substituted into their command: make them
        // absolute so that they do not depend on the emulator's working directory.
        let root = std::fs::canonicalize(root).map_err(io("resolving", root))?;
        // Find a read-only directory now rather than at the first call that changes state.
        let probe = root.join(format!("{STATE_FILE}.probe"));
        std::fs::File::create(&probe).map_err(io("writing to", &root))?;
        std::fs::remove_file(&probe).map_err(io("writing to", &root))?;
        Ok(Self { root })
    }

    /// The host directory that holds a volume's files.
    pub fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join("volumes").join(volume_id)
    }

    /// Reads the saved store, or an empty one. Machines come back `stopped`: their
    /// processes did not survive the emulator.
    pub fn load(&self) -> Result<Store, StateError> {
        let path = self.root.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Store::default()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let mut store: Store = serde_json::from_str(&text)
            .map_err(|source| StateError::Parse { path: path.display().to_string(), source })?;
        for app in store.apps.values_mut() {
            app.machines.retain(|_, record| record.destroyed_at.is_none());
            for record in app.machines.values_mut() {
                let machine = &mut record.machine;
                if machine.state != MachineState::Failed {
                    machine.state = MachineState::Stopped;
                }
                machine.checks.clear();
            }
        }
        Ok(store)
    }

    /// Writes the store atomically: a temporary file renamed over the old one, so that a
    /// killed emulator leaves the old state or the new one. There is no fsync: it would
    /// cost milliseconds on every call, under the lock, to survive only a power cut.
    pub fn save(&self, store: &Store) -> Result<(), StateError> {
        let path = self.root.join(STATE_FILE);
        let temporary = self.root.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec(store)
            .map_err(|source| StateError::Parse { path: path.display().to_string(), source })?;
        let mut file = std::fs::File::create(&temporary).map_err(io("creating", &temporary))?;
        file.write_all(&text).map_err(io("writing", &temporary))?;
        std::fs::rename(&temporary, &path).map_err(io("renaming", &temporary))?;
        Ok(())
    }
}
