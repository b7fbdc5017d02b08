//! Running intents: the lifecycle written to the signed journal, the model call, the
//! transcript and its live events. Standalone mode runs intents inside the API process;
//! dual mode runs them in the executor process, whose events travel over the executor link
//! (see `link.rs`) to the front door's broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::watch;

use crate::broker::{Broker, EventKind};
use crate::journal::{Body, IntentWriter, Journal, JournalError, Kind};
use crate::layout::DataDir;
use crate::model::{ModelClient, ModelError};

/// The reason written into the `failed` envelope of an intent whose process stopped.
pub const INTERRUPTED: &str = "the executor stopped before the intent finished";
/// The reason written into the `cancelled` envelope of an intent a drain gave up on.
const SHUT_DOWN: &str = "the daemon shut down before the intent finished";

/// Where an intent's transcript events go.
pub trait Events: Send + Sync {
    fn publish(&self, kind: EventKind, data: String);

    /// Called once the intent's terminal envelope is written (or could not be).
    fn finished(&self, _intent_id: &str) {}
}

impl Events for Broker {
    fn publish(&self, kind: EventKind, data: String) {
        Broker::publish(self, kind, data);
    }
}

/// The transcript file; appends are serialised within the process.
#[derive(Debug)]
pub struct Transcript {
    data: DataDir,
    lock: tokio::sync::Mutex<()>,
}

impl Transcript {
    pub fn new(data: DataDir) -> Arc<Self> {
        Arc::new(Self { data, lock: tokio::sync::Mutex::new(()) })
    }

    /// Appends one exchange. Each append is a single `O_APPEND` write, so the front door's
    /// `/chat` turns and the executor's intents do not interleave within a line.
    pub async fn append(&self, message: &str, reply: &str) {
        use std::io::Write;
        let _guard = self.lock.lock().await;
        let path = self.data.transcript();
        let lines = format!(
            "{}\n{}\n",
            json!({"role": "user", "content": message}),
            json!({"role": "assistant", "content": reply})
        );
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut file| file.write_all(lines.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "could not append to the transcript",
            );
        }
    }
}

/// One conversational turn: the reply streams to `events` as `say` events.
pub async fn converse(
    model: &ModelClient,
    transcript: &Transcript,
    events: &dyn Events,
    message: &str,
) -> Result<String, ModelError> {
    events.publish(EventKind::Status, json!({"state": "thinking"}).to_string());
    let result = model
        .complete(message, |delta| {
            events.publish(EventKind::Say, json!({ "text": delta }).to_string());
        })
        .await;
    events.publish(EventKind::Status, json!({"state": "idle"}).to_string());
    let reply = result?;
    transcript.append(message, &reply).await;
    Ok(reply)
}

/// Why an intent did not start.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error("another intent is running")]
    Busy,
    #[error("recording the intent")]
    Journal(#[source] JournalError),
}

/// An intent whose `drafting` envelope is written; [`Runner::run`] takes it from there.
#[derive(Debug)]
pub struct Started {
    writer: IntentWriter,
    message: String,
}

impl Started {
    pub fn id(&self) -> &str {
        &self.writer.id
    }
}

/// Runs one intent at a time.
pub struct Runner {
    journal: Journal,
    model: ModelClient,
    transcript: Arc<Transcript>,
    events: Arc<dyn Events>,
    /// The running intent's id (single flight).
    running: Mutex<Option<String>>,
    busy: AtomicBool,
    /// Set to stop the running intent, which then records `cancelled`.
    cancel: watch::Sender<bool>,
}

impl Runner {
    pub fn new(
        journal: Journal,
        model: ModelClient,
        transcript: Arc<Transcript>,
        events: Arc<dyn Events>,
    ) -> Arc<Self> {
        Arc::new(Self {
            journal,
            model,
            transcript,
            events,
            running: Mutex::new(None),
            busy: AtomicBool::new(false),
            cancel: watch::Sender::new(false),
        })
    }

    /// Whether an intent is running.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// The running intent's id.
    pub fn running(&self) -> Option<String> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the running intent, which records a `cancelled` envelope and then clears
    /// [`Runner::is_busy`]. Does nothing when no intent runs.
    pub fn cancel(&self) {
        if self.is_busy() {
            self.cancel.send_replace(true);
        }
    }

    /// Claims the single flight and writes the `drafting` envelope.
    pub fn begin(&self, message: &str) -> Result<Started, BeginError> {
        if self.busy.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(BeginError::Busy);
        }
        self.cancel.send_replace(false);
        match self.journal.begin(message) {
            Ok(writer) => {
                *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer.id.clone());
                Ok(Started { writer, message: message.to_owned() })
            }
            Err(e) => {
                self.busy.store(false, Ordering::SeqCst);
                Err(BeginError::Journal(e))
            }
        }
    }

    /// Drives a started intent to its terminal envelope, then frees the single flight.
    pub async fn run(self: Arc<Self>, started: Started) {
        let Started { mut writer, message } = started;
        if let Err(e) = self.drive(&mut writer, &message).await {
            tracing::error!(
                intent = %writer.id,
                error = %e,
                "could not record the intent's outcome",
            );
        }
        self.events
            .publish(EventKind::Notice, json!({"intent_id": writer.id, "done": true}).to_string());
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.busy.store(false, Ordering::SeqCst);
        self.events.finished(&writer.id);
    }

    async fn drive(&self, writer: &mut IntentWriter, message: &str) -> Result<(), JournalError> {
        self.journal.append(writer, Kind::Running, Body::default())?;

        let mut cancel = self.cancel.subscribe();
        let conversation = converse(&self.model, &self.transcript, self.events.as_ref(), message);
        let (kind, body) = tokio::select! {
            outcome = conversation => match outcome {
                Ok(reply) => (Kind::Completed, Body { reply: Some(reply), ..Default::default() }),
                Err(e) => (Kind::Failed, Body { error: Some(e.to_string()), ..Default::default() }),
            },
            // Dropping the conversation aborts the model call.
            _ = cancel.wait_for(|cancelled| *cancelled) => {
                self.events.publish(EventKind::Status, json!({"state": "idle"}).to_string());
                (Kind::Cancelled, Body { error: Some(SHUT_DOWN.into()), ..Default::default() })
            }
        };
        self.journal.append(writer, kind, body)
    }

    /// Gives every intent a previous process left without an outcome a `failed` envelope,
    /// so no chain stays `running` forever. Run before any new intent can start.
    pub fn fail_interrupted(&self) -> Result<usize, JournalError> {
        let unfinished = self.journal.unfinished()?;
        for mut writer in unfinished.iter().cloned() {
            let body = Body { error: Some(INTERRUPTED.into()), ..Default::default() };
            self.journal.append(&mut writer, Kind::Failed, body)?;
            tracing::warn!(intent = %writer.id, "recorded an interrupted intent as failed");
        }
        Ok(unfinished.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn runner(data: &DataDir) -> Arc<Runner> {
        data.ensure_layout().unwrap();
        let journal = Journal::new(data.journal(), data.signing_key().unwrap());
        let model =
            ModelClient::new(&ModelConfig { base_url: None, api_key: None, model: "local".into() });
        Runner::new(journal, model, Transcript::new(data.clone()), Broker::new())
    }

    fn kinds(data: &DataDir, id: &str) -> Vec<Kind> {
        let journal = Journal::new(data.journal(), data.signing_key().unwrap());
        journal.read(id).unwrap().iter().map(|e| e.kind).collect()
    }

    #[tokio::test]
    async fn an_intent_left_running_by_a_dead_process_is_recorded_as_failed_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let journal = Journal::new(data.journal(), {
            data.ensure_layout().unwrap();
            data.signing_key().unwrap()
        });
        let mut interrupted = journal.begin("cut short").unwrap();
        journal.append(&mut interrupted, Kind::Running, Body::default()).unwrap();
        let mut done = journal.begin("finished").unwrap();
        journal.append(&mut done, Kind::Running, Body::default()).unwrap();
        journal.append(&mut done, Kind::Completed, Body::default()).unwrap();

        let runner = runner(&data);
        assert_eq!(runner.fail_interrupted().unwrap(), 1);
        assert_eq!(runner.fail_interrupted().unwrap(), 0, "a second start finds nothing");

        assert_eq!(kinds(&data, &interrupted.id), [Kind::Drafting, Kind::Running, Kind::Failed]);
        assert_eq!(kinds(&data, &done.id), [Kind::Drafting, Kind::Running, Kind::Completed]);
        let chain = journal.read(&interrupted.id).unwrap();
        assert_eq!(chain[2].body.error.as_deref(), Some(INTERRUPTED));
    }

    #[tokio::test]
    async fn one_intent_at_a_time_and_a_failed_model_call_ends_failed() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let runner = runner(&data);

        let started = runner.begin("first").unwrap();
        assert!(matches!(runner.begin("second"), Err(BeginError::Busy)));
        assert_eq!(runner.running().as_deref(), Some(started.id()));

        // No provider configured: the model call fails and the chain records why.
        let id = started.id().to_owned();
        Arc::clone(&runner).run(started).await;
        assert!(!runner.is_busy());
        assert_eq!(kinds(&data, &id), [Kind::Drafting, Kind::Running, Kind::Failed]);
        assert!(runner.begin("third").is_ok());
    }
}
