//! Prometheus text metrics: requests by status, wakes and their latency, open streams.
//!
//! Labels carry no user id, path or token.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the wake latency histogram, in seconds.
const WAKE_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    wakes: Mutex<Histogram>,
    wake_failures: AtomicU64,
    provisions: AtomicU64,
    suspends: AtomicU64,
    active_streams: AtomicI64,
    volumes_orphaned: AtomicU64,
    orphaned_volumes_deleted: AtomicU64,
}

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Metrics {
    pub fn request(&self, status: u16) {
        let mut requests = self.requests.lock().expect("metrics lock");
        *requests.entry(status).or_default() += 1;
    }

    pub fn wake(&self, took: Duration) {
        let mut wakes = self.wakes.lock().expect("metrics lock");
        if wakes.counts.is_empty() {
            wakes.counts = vec![0; WAKE_BUCKETS.len()];
        }
        let secs = took.as_secs_f64();
        for (bound, count) in WAKE_BUCKETS.iter().zip(wakes.counts.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        wakes.sum += secs;
        wakes.count += 1;
    }

    pub fn wake_failed(&self) {
        self.wake_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn provisioned(&self) {
        self.provisions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn suspended(&self) {
        self.suspends.fetch_add(1, Ordering::Relaxed);
    }

    /// A deprovision left a volume behind for the sweep.
    pub fn volume_orphaned(&self) {
        self.volumes_orphaned.fetch_add(1, Ordering::Relaxed);
    }

    /// The sweep deleted an orphaned volume.
    pub fn orphaned_volume_deleted(&self) {
        self.orphaned_volumes_deleted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_opened(&self) {
        self.active_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_closed(&self) {
        self.active_streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP matrix_router_requests_total Requests answered, by status.\n");
        out.push_str("# TYPE matrix_router_requests_total counter\n");
        for (status, n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "matrix_router_requests_total{{status=\"{status}\"}} {n}");
        }

        let wakes = self.wakes.lock().expect("metrics lock");
        out.push_str("# HELP matrix_router_wake_seconds Time from wake start to a ready daemon.\n");
        out.push_str("# TYPE matrix_router_wake_seconds histogram\n");
        for (i, bound) in WAKE_BUCKETS.iter().enumerate() {
            let n = wakes.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "matrix_router_wake_seconds_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "matrix_router_wake_seconds_bucket{{le=\"+Inf\"}} {}", wakes.count);
        let _ = writeln!(out, "matrix_router_wake_seconds_sum {}", wakes.sum);
        let _ = writeln!(out, "matrix_router_wake_seconds_count {}", wakes.count);
        drop(wakes);

        let counters = [
            ("matrix_router_wakes_total", "Machines woken.", self.wake_count()),
            (
                "matrix_router_wake_failures_total",
                "Wakes that failed.",
                self.load(&self.wake_failures),
            ),
            (
                "matrix_router_provisions_total",
                "Machines provisioned.",
                self.load(&self.provisions),
            ),
            ("matrix_router_suspends_total", "Idle machines suspended.", self.load(&self.suspends)),
            (
                "matrix_router_volumes_orphaned_total",
                "Volumes a deprovision could not delete, left to the sweep.",
                self.load(&self.volumes_orphaned),
            ),
            (
                "matrix_router_orphaned_volumes_deleted_total",
                "Orphaned volumes the sweep deleted.",
                self.load(&self.orphaned_volumes_deleted),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let streams = self.active_streams.load(Ordering::Relaxed);
        out.push_str(
            "# HELP matrix_router_active_streams Proxied responses and WebSockets open.\n",
        );
        let _ = writeln!(
            out,
            "# TYPE matrix_router_active_streams gauge\nmatrix_router_active_streams {streams}"
        );
        out
    }

    pub fn wake_count(&self) -> u64 {
        self.wakes.lock().expect("metrics lock").count
    }

    fn load(&self, counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
