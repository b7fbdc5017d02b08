//! The data directory's writer lock: an exclusive `flock` on `.run/data.lock`, held for the
//! life of the one process that writes the journal and the tree (the executor in dual mode,
//! `serve` standalone, and `init` / `snapshot` from the command line). The kernel drops it
//! when the process exits, however it exits, so a killed holder never leaves it behind.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::layout::DataDir;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("opening the data directory lock {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking the data directory lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error(
        "another matrixd process holds the data directory (lock {path}); stop it first, or let \
         its own snapshots run"
    )]
    Held { path: PathBuf },
}

/// Proof that this process is the data directory's one writer; released when dropped.
#[derive(Debug)]
pub struct DataLock {
    _held: Flock<File>,
}

/// The lock file for the volume at `data`.
pub fn lock_path(data: &DataDir) -> PathBuf {
    data.root().join(".run").join("data.lock")
}

/// Takes the lock, waiting for a process that holds it to exit (it is draining, or a
/// restarted supervisor's children raced the old ones).
pub async fn acquire(data: &DataDir) -> Result<DataLock, LockError> {
    let path = lock_path(data);
    let file = open(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(DataLock { _held: held }),
        Err((file, Errno::EWOULDBLOCK)) => {
            tracing::warn!(
                lock.path = %path.display(),
                "waiting for the other process holding the data directory"
            );
            let waited = tokio::task::spawn_blocking(move || lock_blocking(file, &path))
                .await
                .expect("the lock wait does not panic")?;
            tracing::info!("the other process released the data directory");
            Ok(waited)
        }
        Err((_, source)) => Err(LockError::Lock { path, source }),
    }
}

/// Takes the lock now, or fails with [`LockError::Held`] when another process holds it.
pub fn try_acquire(data: &DataDir) -> Result<DataLock, LockError> {
    let path = lock_path(data);
    match Flock::lock(open(&path)?, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(DataLock { _held: held }),
        Err((_, Errno::EWOULDBLOCK)) => Err(LockError::Held { path }),
        Err((_, source)) => Err(LockError::Lock { path, source }),
    }
}

fn lock_blocking(mut file: File, path: &Path) -> Result<DataLock, LockError> {
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(held) => return Ok(DataLock { _held: held }),
            Err((again, Errno::EINTR)) => file = again,
            Err((_, source)) => return Err(LockError::Lock { path: path.to_owned(), source }),
        }
    }
}

/// Opens (creating) the lock file in the private run directory.
fn open(path: &Path) -> Result<File, LockError> {
    let fail = |source| LockError::Open { path: path.to_owned(), source };
    let dir = path.parent().expect("the lock lives in a directory");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(fail)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_holder_is_refused_until_the_first_lets_go() {
        let root = tempfile::tempdir().unwrap();
        let data = DataDir::new(root.path());
        let first = acquire(&data).await.unwrap();
        assert!(matches!(try_acquire(&data), Err(LockError::Held { .. })));

        let waiter = tokio::spawn({
            let data = data.clone();
            async move { acquire(&data).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the second taker must wait");
        drop(first);
        waiter.await.unwrap().unwrap();
    }
}
