//! The executor of dual mode, link side: it listens on the executor socket (see `link.rs`),
//! runs the intents the front door hands it, and relays their transcript events back.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::broker::EventKind;
use crate::intent::{BeginError, Events, Runner};
use crate::journal::JournalError;
use crate::layout::LayoutError;
use crate::link::{write_line, Refusal, Reply, Request};

/// Messages queued for the front door before events are dropped.
const OUTBOX_CAPACITY: usize = 1024;
/// How long the last messages get to reach the front door at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("recording interrupted intents as failed")]
    Recover(#[source] JournalError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("listening on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The executor's half of the link, and the intents it runs.
pub struct Executor {
    runner: Arc<Runner>,
    relay: Arc<Relay>,
    socket: PathBuf,
    draining: AtomicBool,
}

impl Executor {
    /// Records what a previous executor left unfinished, then listens on `socket`.
    pub fn start(
        runner: Arc<Runner>,
        relay: Arc<Relay>,
        socket: PathBuf,
    ) -> Result<(Arc<Self>, UnixListener), ExecutorError> {
        // 1. No intent may start before the interrupted ones have their outcome.
        let interrupted = runner.fail_interrupted().map_err(ExecutorError::Recover)?;

        // 2. A private directory: the socket's only protection.
        let dir = socket.parent().expect("the socket lives in a directory").to_owned();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(LayoutError::io("creating", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(LayoutError::io("securing", &dir))?;

        // 3. A socket left by a killed executor refuses connections; replace it.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LayoutError::io("removing", &socket)(e).into()),
        }
        let listener = UnixListener::bind(&socket)
            .map_err(|source| ExecutorError::Listen { path: socket.clone(), source })?;
        tracing::info!(link.socket = %socket.display(), interrupted, "executor listening");
        let executor = Arc::new(Self { runner, relay, socket, draining: AtomicBool::new(false) });
        Ok((executor, listener))
    }

    /// Accepts front door connections until the task is dropped; a new one replaces the
    /// previous one (a front door that was restarted).
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(Arc::clone(&self).serve_connection(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a front door connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: UnixStream) {
        let (read, write) = stream.into_split();
        let hello = Reply::Hello { pid: std::process::id(), running: self.runner.running() };
        self.relay.connect(write, hello);
        tracing::debug!("front door connected");

        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::Submit { message }) => self.submit(message).await,
                Ok(Request::Cancel) => self.runner.cancel(),
                Err(e) => {
                    tracing::warn!(error = %e, "the front door sent an unreadable message");
                    break;
                }
            }
        }
        tracing::debug!("front door disconnected");
    }

    async fn submit(&self, message: String) {
        if self.draining.load(Ordering::SeqCst) {
            self.relay.send(Reply::Refused { reason: Refusal::Draining }).await;
            return;
        }
        match self.runner.begin(&message) {
            Ok(started) => {
                // Accepted goes out before any event of the intent.
                let intent_id = started.id().to_owned();
                self.relay.send(Reply::Accepted { intent_id }).await;
                tokio::spawn(Arc::clone(&self.runner).run(started));
            }
            Err(BeginError::Busy) => {
                self.relay.send(Reply::Refused { reason: Refusal::Busy }).await;
            }
            Err(e @ BeginError::Journal(_)) => {
                let error = format!("{:#}", anyhow::Error::from(e));
                tracing::error!(error = %error, "could not start an intent");
                self.relay.send(Reply::Refused { reason: Refusal::Journal }).await;
            }
        }
    }

    /// Refuses new intents from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Sends what is queued for the front door, then removes the socket.
    pub async fn close(&self) {
        self.relay.flush().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Carries replies and events to the connected front door. Publishing never waits: when
/// the front door falls behind, events are dropped and counted, like a slow `/events`
/// subscriber. A `finished` that cannot be queued closes the connection instead, so the
/// front door reconnects and learns from `hello` that nothing runs.
#[derive(Debug, Default)]
pub struct Relay {
    current: Mutex<Option<Outbox>>,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Outbox {
    sender: mpsc::Sender<Reply>,
    writer: JoinHandle<()>,
}

impl Relay {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `write` the front door's connection, with `hello` as its first message.
    fn connect(&self, mut write: tokio::net::unix::OwnedWriteHalf, hello: Reply) {
        let (sender, mut queued) = mpsc::channel::<Reply>(OUTBOX_CAPACITY);
        let writer = tokio::spawn(async move {
            if write_line(&mut write, &hello).await.is_err() {
                return;
            }
            while let Some(reply) = queued.recv().await {
                if write_line(&mut write, &reply).await.is_err() {
                    return;
                }
            }
        });
        if let Some(previous) = self.lock().replace(Outbox { sender, writer }) {
            previous.writer.abort();
        }
    }

    /// Queues `reply`, waiting for room.
    async fn send(&self, reply: Reply) {
        let sender = self.lock().as_ref().map(|outbox| outbox.sender.clone());
        if let Some(sender) = sender {
            let _ = sender.send(reply).await;
        }
    }

    /// Queues `reply` without waiting; whether it was queued (`true` with no front door).
    fn try_send(&self, reply: Reply) -> bool {
        let current = self.lock();
        let Some(outbox) = current.as_ref() else { return true };
        match outbox.sender.try_send(reply) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    }

    /// Lets the writer send what is queued, within [`FLUSH_TIMEOUT`].
    async fn flush(&self) {
        let Some(Outbox { sender, writer }) = self.lock().take() else { return };
        drop(sender);
        if tokio::time::timeout(FLUSH_TIMEOUT, writer).await.is_err() {
            tracing::warn!("the front door did not take the last messages in time");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Outbox>> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Events for Relay {
    fn publish(&self, kind: EventKind, data: String) {
        if !self.try_send(Reply::Event { kind: kind.name().to_owned(), data }) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(events.dropped = dropped, "the front door is behind; event dropped");
        }
    }

    fn finished(&self, intent_id: &str) {
        if !self.try_send(Reply::Finished { intent_id: intent_id.to_owned() }) {
            tracing::warn!("the front door is behind; resetting the link");
            if let Some(outbox) = self.lock().take() {
                outbox.writer.abort();
            }
        }
    }
}
