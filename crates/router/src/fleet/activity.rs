//! Which machines are ready, and when each last saw traffic.
//!
//! A request or an open stream holds an [`ActivityGuard`]; a machine with no guard for longer
//! than the idle time is handed to the suspender, and forgotten as ready so that the next
//! request wakes it again.

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
            e.last_seen = Instant::now();
        });
    }

    pub fn mark_not_ready(&self, machine_id: &str) {
        self.with_entry(machine_id, |e| e.ready = None);
    }

    /// Ready machines with nothing open and no traffic for `idle`; they are marked not ready.
    pub fn take_idle(&self, idle: Duration) -> Vec<String> {
        let mut entries = self.entries.lock().expect("activity lock");
        let mut idle_ids = Vec::new();
        for (id, entry) in entries.iter_mut() {
            if entry.ready.is_some() && entry.active == 0 && entry.last_seen.elapsed() >= idle {
                entry.ready = None;
                idle_ids.push(id.clone());
            }
        }
        idle_ids
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
