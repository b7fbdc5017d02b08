//! The signed intent journal: `cortex/journal/<intent_id>/<seq>-<kind>.json`.
//!
//! Each lifecycle transition of an intent is an envelope signed with the daemon's ed25519
//! key and chained to the previous one by its hash. The intent id is the hash of the first
//! envelope (the hash root), so the id itself vouches for the chain's start. Reading an
//! intent verifies the whole chain; a chain that fails is an error, never served as valid.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layout::{write_atomic, LayoutError};

/// Lifecycle transitions, in the order they may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Drafting,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl Kind {
    /// Whether the intent ends with this transition.
    pub fn is_terminal(self) -> bool {
        matches!(self, Kind::Completed | Kind::Failed | Kind::Cancelled)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Drafting => "drafting",
            Kind::Running => "running",
            Kind::Completed => "completed",
            Kind::Failed => "failed",
            Kind::Cancelled => "cancelled",
        }
    }
}

/// What a transition carries; fixed fields so the signed bytes are canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Makes two identical messages different intents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The signed part of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub seq: u64,
    pub kind: Kind,
    pub body: Body,
    /// Hex sha256 of the previous envelope's payload; empty for the first.
    pub prev: String,
    pub at: DateTime<Utc>,
}

/// A payload and its signature, as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub seq: u64,
    pub kind: Kind,
    pub body: Body,
    pub prev: String,
    pub at: DateTime<Utc>,
    /// Hex ed25519 signature of the payload's canonical JSON.
    pub signature: String,
}

impl Envelope {
    /// The signed part.
    pub fn payload(&self) -> Payload {
        Payload {
            seq: self.seq,
            kind: self.kind,
            body: self.body.clone(),
            prev: self.prev.clone(),
            at: self.at,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("intent {0} not found")]
    NotFound(String),
    #[error("intent {intent} fails verification at envelope {seq}: {reason}")]
    Invalid { intent: String, seq: u64, reason: String },
}

impl Payload {
    fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("payload serializes")
    }

    fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical()))
    }
}

/// The journal directory and the key that signs it.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    key: SigningKey,
}

/// An intent being written.
#[derive(Debug, Clone)]
pub struct IntentWriter {
    pub id: String,
    next_seq: u64,
    prev: String,
}

impl Journal {
    pub fn new(dir: impl Into<PathBuf>, key: SigningKey) -> Self {
        Self { dir: dir.into(), key }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Starts an intent with its `drafting` envelope; the id is that envelope's hash.
    pub fn begin(&self, message: &str) -> Result<IntentWriter, JournalError> {
        let body = Body {
            message: Some(message.to_owned()),
            nonce: Some(ulid::Ulid::new().to_string()),
            ..Body::default()
        };
        let payload =
            Payload { seq: 0, kind: Kind::Drafting, body, prev: String::new(), at: Utc::now() };
        let id = payload.hash();
        let dir = self.dir.join(&id);
        std::fs::create_dir_all(&dir).map_err(LayoutError::io("creating", &dir))?;
        self.write(&dir, &payload)?;
        Ok(IntentWriter { id, next_seq: 1, prev: payload.hash() })
    }

    /// Appends a transition.
    pub fn append(
        &self,
        intent: &mut IntentWriter,
        kind: Kind,
        body: Body,
    ) -> Result<(), JournalError> {
        let payload =
            Payload { seq: intent.next_seq, kind, body, prev: intent.prev.clone(), at: Utc::now() };
        self.write(&self.dir.join(&intent.id), &payload)?;
        intent.next_seq += 1;
        intent.prev = payload.hash();
        Ok(())
    }

    fn write(&self, dir: &Path, payload: &Payload) -> Result<(), JournalError> {
        let signature = self.key.sign(&payload.canonical());
        let envelope = Envelope {
            seq: payload.seq,
            kind: payload.kind,
            body: payload.body.clone(),
            prev: payload.prev.clone(),
            at: payload.at,
            signature: hex::encode(signature.to_bytes()),
        };
        let path = dir.join(format!("{}-{}.json", payload.seq, payload.kind.name()));
        let mut text = serde_json::to_string_pretty(&envelope).expect("envelope serializes");
        text.push('\n');
        write_atomic(&path, text.as_bytes())?;
        Ok(())
    }

    /// The intents whose chain has no terminal envelope yet (a process stopped while they
    /// ran), ready to be given one. A chain that fails verification is left alone: nothing
    /// is appended to it.
    pub fn unfinished(&self) -> Result<Vec<IntentWriter>, JournalError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(LayoutError::io("reading", &self.dir)(e).into()),
        };
        let mut unfinished = Vec::new();
        for entry in entries {
            let entry = entry.map_err(LayoutError::io("reading", &self.dir))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            // Most intents are over: their file names say so without reading the chain.
            if has_terminal_file(&entry.path()) {
                continue;
            }
            let chain = match self.read(&id) {
                Ok(chain) => chain,
                Err(JournalError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::warn!(intent = %id, error = %e, "skipping an unreadable intent");
                    continue;
                }
            };
            let Some(last) = chain.last() else { continue };
            if !last.kind.is_terminal() {
                let next_seq = chain.len() as u64;
                unfinished.push(IntentWriter { id, next_seq, prev: last.payload().hash() });
            }
        }
        Ok(unfinished)
    }

    /// Reads and verifies intent `id`'s chain.
    pub fn read(&self, id: &str) -> Result<Vec<Envelope>, JournalError> {
        let is_hash = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let dir = self.dir.join(id);
        if !is_hash || !dir.is_dir() {
            return Err(JournalError::NotFound(id.to_owned()));
        }
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(LayoutError::io("reading", &dir))? {
            let path = entry.map_err(LayoutError::io("reading", &dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with('.') {
                continue; // An envelope being written (see `write_atomic`).
            }
            let seq = name.split_once('-').and_then(|(seq, _)| seq.parse().ok());
            let Some(seq) = seq else {
                return Err(invalid(id, 0, &format!("unexpected file {name}")));
            };
            files.push((seq, path));
        }
        files.sort();

        let public = self.public_key();
        let mut envelopes = Vec::with_capacity(files.len());
        let mut prev = String::new();
        for (index, (seq, path)) in files.iter().enumerate() {
            let text = std::fs::read(path).map_err(LayoutError::io("reading", path))?;
            let envelope: Envelope = serde_json::from_slice(&text)
                .map_err(|e| invalid(id, *seq, &format!("not an envelope: {e}")))?;
            verify(&public, id, index as u64, &prev, path, &envelope)?;
            prev = envelope.payload().hash();
            envelopes.push(envelope);
        }
        Ok(envelopes)
    }
}

/// Whether the intent directory `dir` holds a terminal envelope's file.
fn has_terminal_file(dir: &Path) -> bool {
    let terminal = [Kind::Completed, Kind::Failed, Kind::Cancelled]
        .map(|kind| format!("-{}.json", kind.name()));
    let Ok(files) = std::fs::read_dir(dir) else { return false };
    files.flatten().any(|file| {
        let name = file.file_name();
        let name = name.to_string_lossy();
        !name.starts_with('.') && terminal.iter().any(|suffix| name.ends_with(suffix.as_str()))
    })
}

fn verify(
    public: &VerifyingKey,
    id: &str,
    expected_seq: u64,
    prev: &str,
    path: &Path,
    envelope: &Envelope,
) -> Result<(), JournalError> {
    let payload = &envelope.payload();
    let fail = |reason: &str| invalid(id, expected_seq, reason);
    let file_name = format!("{}-{}.json", payload.seq, payload.kind.name());
    if payload.seq != expected_seq || path.file_name().and_then(|n| n.to_str()) != Some(&file_name)
    {
        return Err(fail("sequence number or kind does not match its place in the chain"));
    }
    if payload.prev != prev {
        return Err(fail("does not chain to the previous envelope"));
    }
    if expected_seq == 0 && payload.hash() != id {
        return Err(fail("the first envelope does not hash to the intent id"));
    }
    let signature = hex::decode(&envelope.signature)
        .ok()
        .and_then(|bytes| Signature::from_slice(&bytes).ok())
        .ok_or_else(|| fail("signature is malformed"))?;
    public.verify(&payload.canonical(), &signature).map_err(|_| fail("bad signature"))
}

fn invalid(intent: &str, seq: u64, reason: &str) -> JournalError {
    JournalError::Invalid { intent: intent.to_owned(), seq, reason: reason.to_owned() }
}
