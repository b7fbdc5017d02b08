//! The executor link of dual mode, front door side: one Unix socket,
//! `<data dir>/.run/executor.sock`, carrying newline-delimited JSON. The front door
//! submits intents and, when a drain runs out of time, cancels the running one; the
//! executor answers each submission and streams the intent's transcript events back, which
//! the front door publishes on its own `/events` broker (so event ids are the front door's,
//! as in standalone mode).
//!
//! The socket's directory is private to the daemon's user (0700), which is the link's only
//! authentication: no secret crosses it.
//!
//! The front door keeps one connection and reconnects whenever it breaks. On connecting it
//! learns from the executor's `hello` which intent runs, so a restarted front door knows it
//! is busy. When the link breaks while an intent runs, the front door frees its single
//! flight at once and tells `/events` subscribers; the restarted executor records that
//! intent as `failed` (see `Runner::fail_interrupted`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, EventKind};
use crate::intent::INTERRUPTED;
use crate::layout::DataDir;

/// Pause between attempts to reach the executor.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// How long a submission waits for the executor's answer.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The executor's socket for the volume at `data`.
pub fn socket_path(data: &DataDir) -> PathBuf {
    data.root().join(".run").join("executor.sock")
}

/// Front door to executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start an intent for `message`.
    Submit { message: String },
    /// Stop the running intent; it records `cancelled`.
    Cancel,
}

/// Executor to front door.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// First on every connection.
    Hello {
        pid: u32,
        running: Option<String>,
    },
    Accepted {
        intent_id: String,
    },
    Refused {
        reason: Refusal,
    },
    /// A transcript event of the running intent; `kind` is an `EventKind` name.
    Event {
        kind: String,
        data: String,
    },
    /// The intent's terminal envelope is written.
    Finished {
        intent_id: String,
    },
}

/// Why the executor did not start an intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("another intent is running")]
    Busy,
    #[error("the executor is shutting down")]
    Draining,
    #[error("the executor could not record the intent")]
    Journal,
}

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the executor is not reachable")]
    Unavailable,
    #[error(transparent)]
    Refused(Refusal),
}

/// The event kind named `name`.
pub fn event_kind(name: &str) -> Option<EventKind> {
    [EventKind::Say, EventKind::Status, EventKind::Notice, EventKind::Tool]
        .into_iter()
        .find(|kind| kind.name() == name)
}

/// Writes one message as a line.
pub async fn write_line<T: Serialize>(
    writer: &mut (impl AsyncWriteExt + Unpin),
    message: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).expect("link messages serialize");
    line.push(b'\n');
    writer.write_all(&line).await
}

/// The front door's end of the link.
#[derive(Debug)]
pub struct ExecutorLink {
    socket: PathBuf,
    broker: Arc<Broker>,
    /// The front door's single flight: set from submission until the executor reports the
    /// intent finished or the link breaks.
    busy: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Set once the executor said hello; `None` while the link is down.
    outbox: Option<mpsc::UnboundedSender<Request>>,
    executor_pid: Option<u32>,
    running: Option<String>,
    pending: Option<oneshot::Sender<Result<String, Refusal>>>,
}

impl ExecutorLink {
    pub fn new(socket: PathBuf, broker: Arc<Broker>) -> Arc<Self> {
        Arc::new(Self { socket, broker, busy: AtomicBool::new(false), state: Mutex::default() })
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// The executor's pid while the link is up.
    pub fn executor_pid(&self) -> Option<u32> {
        self.lock().executor_pid
    }

    /// Takes the single flight; `false` when an intent runs.
    pub fn try_claim(&self) -> bool {
        self.busy.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// Gives the single flight back after a submission failed.
    pub fn release(&self) {
        self.busy.store(false, Ordering::SeqCst);
    }

    /// Hands `message` to the executor; its intent id once the `drafting` envelope is written.
    pub async fn submit(&self, message: String) -> Result<String, SubmitError> {
        let (answer, answered) = oneshot::channel();
        {
            let mut state = self.lock();
            let Some(outbox) = &state.outbox else { return Err(SubmitError::Unavailable) };
            outbox.send(Request::Submit { message }).map_err(|_| SubmitError::Unavailable)?;
            state.pending = Some(answer);
        }
        match tokio::time::timeout(SUBMIT_TIMEOUT, answered).await {
            Ok(Ok(Ok(intent_id))) => Ok(intent_id),
            Ok(Ok(Err(refusal))) => Err(SubmitError::Refused(refusal)),
            Ok(Err(_)) | Err(_) => Err(SubmitError::Unavailable),
        }
    }

    /// Asks the executor to cancel the running intent.
    pub fn cancel(&self) {
        if let Some(outbox) = &self.lock().outbox {
            let _ = outbox.send(Request::Cancel);
        }
    }

    /// Keeps the link up for the life of the process.
    pub async fn maintain(self: Arc<Self>) {
        let mut was_up = false;
        loop {
            match UnixStream::connect(&self.socket).await {
                Ok(stream) => {
                    let socket = self.socket.display();
                    tracing::debug!(link.socket = %socket, "executor link connected");
                    let ended = self.run_connection(stream).await;
                    self.link_down();
                    tracing::warn!(reason = %ended, "executor link down; reconnecting");
                    was_up = true;
                }
                Err(e) if !was_up => {
                    tracing::debug!(error = %e, "executor not reachable yet");
                }
                Err(_) => {}
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    }

    /// Serves one connection until it breaks; what ended it.
    async fn run_connection(&self, stream: UnixStream) -> String {
        let (read, mut write) = stream.into_split();
        let (outbox, mut outgoing) = mpsc::unbounded_channel::<Request>();
        let writer = tokio::spawn(async move {
            while let Some(request) = outgoing.recv().await {
                if write_line(&mut write, &request).await.is_err() {
                    break;
                }
            }
        });

        let mut lines = BufReader::new(read).lines();
        let mut outbox = Some(outbox);
        let ended = loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break "the executor closed the link".to_owned(),
                Err(e) => break format!("reading: {e}"),
            };
            match serde_json::from_str::<Reply>(&line) {
                Ok(reply) => self.receive(reply, &mut outbox),
                Err(e) => break format!("the executor sent an unreadable message: {e}"),
            }
        };
        writer.abort();
        ended
    }

    fn receive(&self, reply: Reply, outbox: &mut Option<mpsc::UnboundedSender<Request>>) {
        match reply {
            Reply::Hello { pid, running } => {
                let mut state = self.lock();
                state.outbox = outbox.take();
                state.executor_pid = Some(pid);
                self.busy.store(running.is_some(), Ordering::SeqCst);
                state.running = running;
                tracing::info!(executor.pid = pid, "executor link up");
            }
            Reply::Accepted { intent_id } => {
                let mut state = self.lock();
                state.running = Some(intent_id.clone());
                if let Some(pending) = state.pending.take() {
                    let _ = pending.send(Ok(intent_id));
                }
            }
            Reply::Refused { reason } => {
                if let Some(pending) = self.lock().pending.take() {
                    let _ = pending.send(Err(reason));
                }
            }
            Reply::Event { kind, data } => match event_kind(&kind) {
                Some(kind) => {
                    self.broker.publish(kind, data);
                }
                None => tracing::warn!(event.kind = %kind, "the executor sent an unknown event"),
            },
            Reply::Finished { intent_id } => {
                let mut state = self.lock();
                if state.running.as_deref() == Some(&intent_id) {
                    state.running = None;
                }
                self.busy.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Forgets the connection; a running intent is over as far as this process knows.
    fn link_down(&self) {
        let mut state = self.lock();
        state.outbox = None;
        state.executor_pid = None;
        state.pending = None;
        if let Some(intent_id) = state.running.take() {
            self.broker.publish(
                EventKind::Notice,
                json!({"intent_id": intent_id, "done": true, "error": INTERRUPTED}).to_string(),
            );
        }
        self.busy.store(false, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether `path` is short enough for a Unix socket address (108 bytes on Linux, with the
/// terminating NUL).
pub fn fits_socket_address(path: &Path) -> bool {
    path.as_os_str().len() < 108
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// The executor's end, played by the test.
    struct FakeExecutor {
        lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
        write: tokio::net::unix::OwnedWriteHalf,
    }

    impl FakeExecutor {
        async fn accept(listener: &UnixListener, hello: Reply) -> Self {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write_line(&mut write, &hello).await.unwrap();
            Self { lines: BufReader::new(read).lines(), write }
        }

        async fn send(&mut self, reply: Reply) {
            write_line(&mut self.write, &reply).await.unwrap();
        }

        async fn receive(&mut self) -> Request {
            let line = self.lines.next_line().await.unwrap().unwrap();
            serde_json::from_str(&line).unwrap()
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    fn start() -> (tempfile::TempDir, UnixListener, Arc<ExecutorLink>, Arc<Broker>) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("executor.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let broker = Broker::new();
        let link = ExecutorLink::new(socket, Arc::clone(&broker));
        tokio::spawn(Arc::clone(&link).maintain());
        (dir, listener, link, broker)
    }

    #[tokio::test]
    async fn a_submission_relays_its_events_and_frees_the_flight_when_finished() {
        let (_dir, listener, link, broker) = start();
        let mut subscription = broker.subscribe(None);
        let mut executor =
            FakeExecutor::accept(&listener, Reply::Hello { pid: 42, running: None }).await;
        until("the link is up", || link.executor_pid() == Some(42)).await;

        assert!(link.try_claim());
        assert!(!link.try_claim(), "single flight");
        let submitted = tokio::spawn({
            let link = Arc::clone(&link);
            async move { link.submit("hello".into()).await }
        });
        assert_eq!(executor.receive().await, Request::Submit { message: "hello".into() });
        executor.send(Reply::Accepted { intent_id: "i1".into() }).await;
        assert_eq!(submitted.await.unwrap().unwrap(), "i1");

        executor.send(Reply::Event { kind: "say".into(), data: "{\"text\":\"hi\"}".into() }).await;
        let event = subscription.live.recv().await.unwrap();
        assert_eq!(
            (event.id, event.kind, event.data.as_str()),
            (1, EventKind::Say, "{\"text\":\"hi\"}")
        );
        assert!(link.is_busy());

        executor.send(Reply::Finished { intent_id: "i1".into() }).await;
        until("the flight is free", || !link.is_busy()).await;
    }

    #[tokio::test]
    async fn a_broken_link_frees_the_flight_and_a_new_executor_says_what_runs() {
        let (_dir, listener, link, broker) = start();
        let mut subscription = broker.subscribe(None);
        let executor =
            FakeExecutor::accept(&listener, Reply::Hello { pid: 7, running: Some("i1".into()) })
                .await;
        until("the link is up", || link.executor_pid() == Some(7)).await;
        assert!(link.is_busy(), "hello said an intent runs");

        drop(executor);
        until("the link is down", || link.executor_pid().is_none()).await;
        assert!(!link.is_busy());
        let notice = subscription.live.recv().await.unwrap();
        assert_eq!(notice.kind, EventKind::Notice);
        assert!(notice.data.contains("i1") && notice.data.contains(INTERRUPTED), "{notice:?}");
        assert!(matches!(link.submit("x".into()).await, Err(SubmitError::Unavailable)));

        let mut executor =
            FakeExecutor::accept(&listener, Reply::Hello { pid: 8, running: None }).await;
        until("the link is back", || link.executor_pid() == Some(8)).await;
        link.cancel();
        assert_eq!(executor.receive().await, Request::Cancel);
    }
}
