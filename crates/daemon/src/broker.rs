//! The SSE broker: the live transcript fanned out to every `/events` subscriber.
//!
//! Every event gets an increasing id and goes into a bounded ring buffer, so a client that
//! reconnects with `Last-Event-ID` gets what it missed (as far back as the ring reaches).
//! Each subscriber has a bounded queue; publishing never waits: when a subscriber's queue
//! is full the event is dropped for that subscriber alone and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;

/// Events kept for `Last-Event-ID` resumption.
pub const RING_CAPACITY: usize = 1024;
/// Events queued per subscriber before drops.
pub const SUBSCRIBER_CAPACITY: usize = 256;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Say,
    Status,
    Notice,
    Tool,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Say => "say",
            EventKind::Status => "status",
            EventKind::Notice => "notice",
            EventKind::Tool => "tool",
        }
    }
}

/// One transcript event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u64,
    pub kind: EventKind,
    /// JSON text.
    pub data: String,
}

impl Event {
    /// The event in SSE wire form.
    pub fn to_sse(&self) -> String {
        format!("id: {}\nevent: {}\ndata: {}\n\n", self.id, self.kind.name(), self.data)
    }
}

/// Counters served by `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BrokerStats {
    pub subscribers: usize,
    pub events_published: u64,
    pub events_sent: u64,
    pub events_dropped: u64,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    ring: VecDeque<Event>,
    subscribers: Vec<mpsc::Sender<Event>>,
}

#[derive(Debug, Default)]
pub struct Broker {
    inner: Mutex<Inner>,
    published: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// A subscription: the missed events first, then live ones.
#[derive(Debug)]
pub struct Subscription {
    pub backlog: VecDeque<Event>,
    pub live: mpsc::Receiver<Event>,
}

impl Broker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Publishes an event with `data` (JSON text) to every subscriber without waiting.
    pub fn publish(&self, kind: EventKind, data: String) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        let event = Event { id: inner.next_id, kind, data };
        if inner.ring.len() == RING_CAPACITY {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event.clone());
        self.published.fetch_add(1, Ordering::Relaxed);

        inner.subscribers.retain(|subscriber| match subscriber.try_send(event.clone()) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        event.id
    }

    /// Subscribes; with `last_event_id`, the ring's events after it come first.
    pub fn subscribe(&self, last_event_id: Option<u64>) -> Subscription {
        let (sender, live) = mpsc::channel(SUBSCRIBER_CAPACITY);
        let mut inner = self.lock();
        let backlog = match last_event_id {
            Some(last) => inner.ring.iter().filter(|e| e.id > last).cloned().collect(),
            None => VecDeque::new(),
        };
        inner.subscribers.push(sender);
        Subscription { backlog, live }
    }

    pub fn stats(&self) -> BrokerStats {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| !s.is_closed());
        BrokerStats {
            subscribers: inner.subscribers.len(),
            events_published: self.published.load(Ordering::Relaxed),
            events_sent: self.sent.load(Ordering::Relaxed),
            events_dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;

    #[test]
    fn a_full_subscriber_loses_events_and_the_others_do_not() {
        let broker = Broker::new();
        let mut fast = broker.subscribe(None);
        let slow = broker.subscribe(None);

        let total = SUBSCRIBER_CAPACITY as u64 * 2;
        let mut received = 0;
        for n in 0..total {
            broker.publish(EventKind::Say, format!("{n}"));
            while fast.live.try_recv().is_ok() {
                received += 1;
            }
        }

        assert_eq!(received, total);
        assert_eq!(slow.live.len(), SUBSCRIBER_CAPACITY);
        let stats = broker.stats();
        assert_eq!(stats.events_dropped, total - SUBSCRIBER_CAPACITY as u64);
        assert_eq!(stats.subscribers, 2);
    }

    #[test]
    fn resuming_replays_only_what_came_after_the_last_id() {
        let broker = Broker::new();
        for n in 0..5 {
            broker.publish(EventKind::Status, format!("{n}"));
        }
        let resumed = broker.subscribe(Some(3));
        let ids: Vec<u64> = resumed.backlog.iter().map(|e| e.id).collect();
        assert_eq!(ids, [4, 5]);
    }
}
