//! Graceful shutdown: every connection and upgraded stream is a tracked task, so a shutdown
//! can stop accepting, wait a bounded time for what is open to finish, and then cut the rest.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by the listener and the proxy; cloning shares the same set of tasks.
#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when the shutdown starts: stop accepting, close idle connections.
    stop: CancellationToken,
    /// Cancelled when the grace period is over (or the router is dropped): cut everything.
    kill: CancellationToken,
    tasks: TaskTracker,
}

impl Drain {
    /// Runs `task` until it ends or the router is cut, counted as open work meanwhile.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let kill = self.kill.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = kill.cancelled() => {}
            }
        });
    }

    /// Resolves when the shutdown starts.
    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    /// Starts the shutdown and waits up to `grace` for the open work to finish, then cuts
    /// what is left. Returns whether everything finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        let finished = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        self.kill.cancel();
        finished
    }

    /// Cuts everything at once.
    pub fn cut(&self) {
        self.stop.cancel();
        self.kill.cancel();
    }

    /// Connections and upgraded streams still open.
    pub fn open(&self) -> usize {
        self.tasks.len()
    }
}
