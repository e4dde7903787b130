//! Worker health as the daemon and `/readyz`, `/healthz` and systemd see it: how many workers
//! are registered with the broker, and each worker's heartbeat (`Beat`) for the watchdog.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Readiness as seen by `/readyz`: every worker is registered with the broker (active or
/// standby).
#[derive(Debug, Default)]
pub struct Health {
    consuming: std::sync::atomic::AtomicUsize,
    expected: std::sync::atomic::AtomicUsize,
    beats: std::sync::Mutex<Vec<(String, Arc<std::sync::atomic::AtomicU64>)>>,
    /// Workers found wedged at the daemon's last look (for `/healthz`).
    wedged_now: std::sync::atomic::AtomicUsize,
}

impl Health {
    pub fn expect(&self, n: usize) {
        self.expected
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }
    pub(super) fn set(&self, on: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        if on {
            self.consuming.fetch_add(1, SeqCst);
        } else {
            self.consuming.fetch_sub(1, SeqCst);
        }
    }
    pub fn ready(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let e = self.expected.load(SeqCst);
        e > 0 && self.consuming.load(SeqCst) >= e
    }

    /// A heartbeat for the worker of `pipeline` slot `slot`, alive from now.
    pub fn beat_for(&self, pipeline: &str, slot: &str) -> Beat {
        let beat = Beat(Arc::new(std::sync::atomic::AtomicU64::new(0)));
        beat.beat();
        if let Ok(mut beats) = self.beats.lock() {
            beats.push((format!("{pipeline}/{slot}"), beat.0.clone()));
        }
        beat
    }

    /// Records how many workers the daemon found wedged.
    pub fn set_wedged(&self, n: usize) {
        self.wedged_now
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Workers found wedged at the daemon's last look.
    pub fn wedged_now(&self) -> usize {
        self.wedged_now.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Workers (`pipeline/slot`) whose loop has not turned for longer than `after` while not
    /// parked in a deliberate wait, with how long.
    pub fn wedged(&self, after: Duration) -> Vec<(String, Duration)> {
        let now = Beat::now_ms();
        let Ok(beats) = self.beats.lock() else {
            return Vec::new();
        };
        beats
            .iter()
            .filter_map(|(name, b)| {
                let last = b.load(std::sync::atomic::Ordering::Relaxed);
                let age = Duration::from_millis(now.saturating_sub(last));
                (last != Beat::PARKED && age > after).then(|| (name.clone(), age))
            })
            .collect()
    }
}

/// A worker's heartbeat for the systemd watchdog. The worker's event loop beats on every turn
/// (its timers make it turn at least every few seconds); around a wait whose end it does not
/// control but which is bounded or retried (a backoff, a database outage holding its batches)
/// it parks instead. A worker neither beating nor parked is wedged: a future that never
/// completes, a lock never released. The daemon then stops feeding the watchdog so systemd
/// restarts the service; restarting loses nothing (spool and robust marks).
#[derive(Debug, Clone)]
pub struct Beat(Arc<std::sync::atomic::AtomicU64>);

impl Beat {
    const PARKED: u64 = u64::MAX;

    fn now_ms() -> u64 {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub fn beat(&self) {
        self.0
            .store(Self::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// In a deliberate wait until the next [`Beat::beat`].
    pub fn park(&self) {
        self.0
            .store(Self::PARKED, std::sync::atomic::Ordering::Relaxed);
    }
}
