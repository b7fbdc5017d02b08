//! Counters of what a push did, for tests, benchmarks and the final summary line.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a [`crate::Client`] has done since it was made; cheap to read at any time.
#[derive(Debug, Default)]
pub struct PushStats {
    bytes_uploaded: AtomicU64,
    blobs_uploaded: AtomicU64,
    blobs_skipped: AtomicU64,
    blobs_mounted: AtomicU64,
    upload_restarts: AtomicU64,
    retries: AtomicU64,
    tokens_fetched: AtomicU64,
}

/// A copy of [`PushStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Blob bytes put on the wire, counting bytes sent again after a restart.
    pub bytes_uploaded: u64,
    /// Blobs whose upload completed.
    pub blobs_uploaded: u64,
    /// Blobs the registry already had (HEAD answered 200).
    pub blobs_skipped: u64,
    /// Blobs mounted from another repository of the registry.
    pub blobs_mounted: u64,
    /// Blob uploads cancelled and started again after a failure.
    pub upload_restarts: u64,
    /// Requests sent again after a 5xx, 429 or dropped connection.
    pub retries: u64,
    /// Bearer tokens fetched from a token endpoint.
    pub tokens_fetched: u64,
}

impl PushStats {
    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn blob_uploaded(&self) {
        self.blobs_uploaded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn blob_skipped(&self) {
        self.blobs_skipped.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn blob_mounted(&self) {
        self.blobs_mounted.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn upload_restarted(&self) {
        self.upload_restarts.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn token_fetched(&self) {
        self.tokens_fetched.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            bytes_uploaded: self.bytes_uploaded.load(Ordering::Relaxed),
            blobs_uploaded: self.blobs_uploaded.load(Ordering::Relaxed),
            blobs_skipped: self.blobs_skipped.load(Ordering::Relaxed),
            blobs_mounted: self.blobs_mounted.load(Ordering::Relaxed),
            upload_restarts: self.upload_restarts.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            tokens_fetched: self.tokens_fetched.load(Ordering::Relaxed),
        }
    }
}
