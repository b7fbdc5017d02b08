//! Which machines are ready, and when each last saw traffic.
//!
//! A request or an open stream holds an [`ActivityGuard`]; a machine with no guard for longer
//! than the idle time is handed to the suspender, and forgotten as ready so that the next
//! request wakes it again. The table is memory only, so requests never wait on the database:
//! the suspender copies it to the shared table at each tick ([`ActivityTable::take_unflushed`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

struct Entry {
    active: usize,
    last_seen: Instant,
    /// The daemon's address while the router believes the machine is running.
    ready: Option<SocketAddr>,
    /// The daemon's last known address after a failed exchange made the router forget it as
    /// ready: the machine may still run, so it stays a candidate for the idle suspend.
    unsure: Option<SocketAddr>,
    /// The `last_seen` last written to the shared table.
    flushed: Option<Instant>,
}

pub struct ActivityTable {
    entries: Mutex<HashMap<String, Entry>>,
    metrics: Arc<Metrics>,
}

/// Counts one request or stream as activity until dropped.
pub struct ActivityGuard {
    table: Arc<ActivityTable>,
    machine_id: String,
}

impl ActivityTable {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { entries: Mutex::new(HashMap::new()), metrics }
    }

    fn with_entry<T>(&self, machine_id: &str, f: impl FnOnce(&mut Entry) -> T) -> T {
        let mut entries = self.entries.lock().expect("activity lock");
        let entry = entries.entry(machine_id.to_owned()).or_insert_with(|| Entry {
            active: 0,
            last_seen: Instant::now(),
            ready: None,
            unsure: None,
            flushed: None,
        });
        f(entry)
    }

    pub fn enter(self: &Arc<Self>, machine_id: &str) -> ActivityGuard {
        self.with_entry(machine_id, |e| {
            e.active += 1;
            e.last_seen = Instant::now();
        });
        self.metrics.stream_opened();
        ActivityGuard { table: self.clone(), machine_id: machine_id.to_owned() }
    }

    pub fn ready_addr(&self, machine_id: &str) -> Option<SocketAddr> {
        let entries = self.entries.lock().expect("activity lock");
        entries.get(machine_id).and_then(|e| e.ready)
    }

    pub fn mark_ready(&self, machine_id: &str, addr: SocketAddr) {
        self.with_entry(machine_id, |e| {
            e.ready = Some(addr);
            e.unsure = None;
            e.last_seen = Instant::now();
        });
    }

    /// The next request wakes the machine again; until then it may still be running, so the
    /// idle suspender keeps it in view.
    pub fn mark_not_ready(&self, machine_id: &str) {
        self.with_entry(machine_id, |e| {
            if let Some(addr) = e.ready.take() {
                e.unsure = Some(addr);
            }
        });
    }

    /// Counts activity seen now on a machine taken by [`Self::take_idle`], and marks it ready
    /// again (it was not suspended).
    pub fn touch(&self, machine_id: &str, addr: SocketAddr) {
        self.with_entry(machine_id, |e| {
            e.last_seen = Instant::now();
            e.ready.get_or_insert(addr);
        });
    }

    /// Ready machines with nothing open and no traffic for `idle`, with their addresses;
    /// they are marked not ready.
    pub fn take_idle(&self, idle: Duration) -> Vec<(String, SocketAddr)> {
        let mut entries = self.entries.lock().expect("activity lock");
        let mut idle_ids = Vec::new();
        for (id, entry) in entries.iter_mut() {
            if entry.active > 0 || entry.last_seen.elapsed() < idle {
                continue;
            }
            if let Some(addr) = entry.ready.take().or_else(|| entry.unsure.take()) {
                idle_ids.push((id.clone(), addr));
            }
        }
        idle_ids
    }

    /// Marks a machine taken by [`Self::take_idle`] ready again (it was not suspended), unless
    /// a wake already did.
    pub fn restore_ready(&self, machine_id: &str, addr: SocketAddr) {
        self.with_entry(machine_id, |e| {
            e.ready.get_or_insert(addr);
        });
    }

    /// Activity not yet written to the shared table, as `(machine id, last seen)`: machines
    /// with a request or stream open (seen now) and machines seen since the last write.
    pub fn take_unflushed(&self) -> Vec<(String, Instant)> {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("activity lock");
        let mut unflushed = Vec::new();
        for (id, entry) in entries.iter_mut() {
            if entry.active > 0 {
                unflushed.push((id.clone(), now));
            } else if entry.flushed != Some(entry.last_seen) {
                unflushed.push((id.clone(), entry.last_seen));
            }
            entry.flushed = Some(entry.last_seen);
        }
        unflushed
    }

    /// Forgets that activity was written (the write failed), so the next tick writes it again.
    pub fn unflush(&self, machine_ids: impl IntoIterator<Item = String>) {
        let mut entries = self.entries.lock().expect("activity lock");
        for id in machine_ids {
            if let Some(entry) = entries.get_mut(&id) {
                entry.flushed = None;
            }
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.table.with_entry(&self.machine_id, |e| {
            e.active = e.active.saturating_sub(1);
            e.last_seen = Instant::now();
        });
        self.table.metrics.stream_closed();
    }
}
