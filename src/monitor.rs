//! Monitoring the daemon evaluates itself (DESIGN §6; seeds/001 "Triggers": a DBA alerted when a
//! continuous load misbehaves, since there is no batch end at which to look): the alerts behind
//! `conveyor_alert{pipeline,name}` and a warn log line when one fires, and publisher clock skew
//! behind `conveyor_clock_skew_seconds`.
//!
//! Alerts, evaluated every `status.interval` from counters the workers and the rotator keep in
//! `PipelineState` (no query):
//! - `stalled`: no row committed since the previous snapshot while the queue holds messages;
//! - `errors`: rows rejected since the previous snapshot;
//! - `low_rate`: rows/s since the previous snapshot below `alerts.low_rate` while the queue holds
//!   messages (0 = off);
//! - `slow_handoff`: a handoff since the previous snapshot took longer than `alerts.slow_handoff_ms`;
//! - `consolidation_failed`: the last consolidation run of this process failed (label
//!   `pipeline = "*"`).
//!
//! Each clears at the first snapshot where its condition no longer holds, with an info line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::rotator::PipelineState;

/// The alerts, in the order they are evaluated; their names are the `name` label.
pub const ALERTS: [&str; 5] = [
    "stalled",
    "errors",
    "low_rate",
    "slow_handoff",
    "consolidation_failed",
];

/// Result of this process's last consolidation run (-1 none yet).
static LAST_CONSOLIDATION: AtomicI16 = AtomicI16::new(-1);

/// Records a consolidation run's result for the `consolidation_failed` alert.
pub fn consolidation_result(result: i16) {
    // Result 2 (locked by another caller) says nothing about failure: keep the previous one.
    if result != 2 {
        LAST_CONSOLIDATION.store(result, Ordering::Relaxed);
    }
}

/// Thresholds from `[alerts]`.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Rows/s below which a pipeline with a backlog is slow; 0 = off.
    pub low_rate: f64,
    pub slow_handoff: Duration,
}

/// One pipeline's counters at a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub committed: u64,
    pub rejected: u64,
    /// Ready messages in the queue, as last read by the rotator (`None`: not read yet).
    pub depth: Option<u64>,
    /// Longest handoff gap since the previous snapshot.
    pub slowest_handoff: Option<Duration>,
}

/// Which alerts hold between two snapshots `elapsed` apart. Pure, for tests.
pub fn evaluate(
    prev: &Snapshot,
    now: &Snapshot,
    elapsed: Duration,
    t: &Thresholds,
    consolidation_failed: bool,
) -> [bool; 5] {
    let backlog = now.depth.is_some_and(|d| d > 0);
    let progress = now.committed.saturating_sub(prev.committed);
    let rate = progress as f64 / elapsed.as_secs_f64().max(1e-3);
    [
        backlog && progress == 0,
        now.rejected > prev.rejected,
        t.low_rate > 0.0 && backlog && rate < t.low_rate,
        now.slowest_handoff.is_some_and(|g| g > t.slow_handoff),
        consolidation_failed,
    ]
}

/// Evaluates the alerts of `pipelines` every `interval` until `cancel`.
pub async fn run(
    pipelines: Vec<(String, Arc<PipelineState>)>,
    interval: Duration,
    t: Thresholds,
    cancel: CancellationToken,
) {
    let mut prev: HashMap<String, (Snapshot, tokio::time::Instant)> = HashMap::new();
    let mut firing: HashMap<(String, &'static str), bool> = HashMap::new();
    for (p, _) in &pipelines {
        for name in ALERTS {
            crate::metrics::alert(alert_pipeline(p, name), name, false);
        }
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let failed = LAST_CONSOLIDATION.load(Ordering::Relaxed) == 1;
        for (p, state) in &pipelines {
            let now = state.snapshot();
            let at = tokio::time::Instant::now();
            let Some((before, then)) = prev.insert(p.clone(), (now, at)) else {
                continue;
            };
            let holds = evaluate(&before, &now, at - then, &t, failed);
            for (name, on) in ALERTS.into_iter().zip(holds) {
                let label = alert_pipeline(p, name);
                let was = firing
                    .insert((label.to_string(), name), on)
                    .unwrap_or(false);
                if on == was {
                    continue;
                }
                crate::metrics::alert(label, name, on);
                if on {
                    warn!(
                        alert = name,
                        pipeline = label,
                        committed = now.committed,
                        rejected = now.rejected,
                        depth = now.depth,
                        slowest_handoff_ms = now.slowest_handoff.map(|g| g.as_secs_f64() * 1e3),
                        "{}",
                        describe(name)
                    );
                } else {
                    info!(alert = name, pipeline = label, "alert cleared");
                }
            }
        }
    }
}

/// The consolidation alert is one per process, whatever the pipeline.
fn alert_pipeline<'a>(pipeline: &'a str, name: &str) -> &'a str {
    if name == "consolidation_failed" {
        "*"
    } else {
        pipeline
    }
}

fn describe(name: &str) -> &'static str {
    match name {
        "stalled" => "ALERT stalled: no row committed since the last snapshot while the queue holds messages (check `conveyor status`, the database and the log)",
        "errors" => "ALERT errors: rows were rejected since the last snapshot (see `conveyor errors --since 10m`)",
        "low_rate" => "ALERT low_rate: rows/s below alerts.low_rate while the queue holds messages (see `conveyor stats`)",
        "slow_handoff" => "ALERT slow_handoff: a handoff took longer than alerts.slow_handoff_ms (see `conveyor status`)",
        _ => "ALERT consolidation_failed: the last consolidation run failed (see postjob_runs.error; fix it, then `conveyor consolidate --reset`)",
    }
}

/// Publisher clock skew, per pipeline and publisher (AMQP `app_id`, else `user_id`). A
/// queue_time ahead of the receive time means the publisher's clock runs fast (latencies come
/// out negative or too small); one far behind the message's own AMQP timestamp means its clock
/// runs slow. Checked per delivery with a few subtractions; the gauge is set at most once a
/// second per publisher and the warning is logged once per publisher.
#[derive(Debug, Default)]
pub struct SkewWatch {
    publishers: HashMap<String, SkewState>,
}

#[derive(Debug, Default)]
struct SkewState {
    warned: bool,
    /// Largest |skew| seen since the gauge was last set, with its sign.
    pending: f64,
    last_set_us: i64,
}

/// A queue_time this far ahead of the receive time is skew, not jitter.
const AHEAD_US: i64 = 1_000_000;
/// A queue_time this far behind the message's AMQP timestamp is skew.
const BEHIND_US: i64 = 30_000_000;

impl SkewWatch {
    /// Observes one delivery. `header_us`: the queue-time header; `timestamp_us`: the AMQP
    /// timestamp property (set by the broker's timestamp plugin or the publisher).
    pub fn observe(
        &mut self,
        pipeline: &str,
        publisher: &str,
        header_us: Option<i64>,
        timestamp_us: Option<i64>,
        received_us: i64,
    ) {
        let Some(q) = header_us else { return };
        let ahead = q - received_us;
        let skew_us = if ahead > AHEAD_US {
            ahead
        } else if let Some(ts) = timestamp_us.filter(|ts| ts - q > BEHIND_US) {
            q - ts
        } else {
            0
        };
        if skew_us == 0 && !self.publishers.contains_key(publisher) {
            return;
        }
        let s = self.publishers.entry(publisher.to_string()).or_default();
        let skew = skew_us as f64 / 1e6;
        if skew.abs() > s.pending.abs() {
            s.pending = skew;
        }
        if skew_us != 0 && !s.warned {
            s.warned = true;
            warn!(pipeline, publisher, skew_s = skew, "publisher clock skew: its queue_time is {:.1} s {} (latency statistics carry the offset; the relative columns of latency_minute remove it)", skew.abs(), if skew > 0.0 { "ahead of this host's clock" } else { "behind the message's own timestamp" });
        }
        if received_us - s.last_set_us >= 1_000_000 {
            crate::metrics::clock_skew(pipeline, publisher, s.pending);
            s.pending = 0.0;
            s.last_set_us = received_us;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(committed: u64, rejected: u64, depth: Option<u64>) -> Snapshot {
        Snapshot {
            committed,
            rejected,
            depth,
            slowest_handoff: None,
        }
    }

    const T: Thresholds = Thresholds {
        low_rate: 100.0,
        slow_handoff: Duration::from_secs(1),
    };

    #[test]
    fn stalled_needs_a_backlog_and_no_progress() {
        let s = Duration::from_secs(1);
        assert!(evaluate(&snap(10, 0, Some(5)), &snap(10, 0, Some(5)), s, &T, false)[0]);
        assert!(!evaluate(&snap(10, 0, Some(0)), &snap(10, 0, Some(0)), s, &T, false)[0]);
        assert!(!evaluate(&snap(10, 0, None), &snap(10, 0, None), s, &T, false)[0]);
        assert!(!evaluate(&snap(10, 0, Some(5)), &snap(11, 0, Some(5)), s, &T, false)[0]);
    }

    #[test]
    fn errors_low_rate_handoff_and_consolidation() {
        let s = Duration::from_secs(2);
        let a = evaluate(&snap(0, 0, Some(9)), &snap(100, 3, Some(9)), s, &T, true);
        // 50 rows/s < 100 with a backlog: low; 3 new rejects: errors.
        assert_eq!(a, [false, true, true, false, true]);
        let mut now = snap(1000, 3, Some(0));
        now.slowest_handoff = Some(Duration::from_millis(1500));
        let b = evaluate(&snap(0, 3, Some(0)), &now, s, &T, false);
        assert_eq!(b, [false, false, false, true, false]);
        let off = Thresholds { low_rate: 0.0, ..T };
        assert!(!evaluate(&snap(0, 0, Some(9)), &snap(1, 0, Some(9)), s, &off, false)[2]);
    }

    #[test]
    fn skew_is_recognised_ahead_and_behind() {
        let mut w = SkewWatch::default();
        w.observe("p", "fast", Some(17_000_000), None, 10_000_000);
        assert!(w.publishers["fast"].warned);
        w.observe("p", "honest", Some(9_500_000), Some(9_000_000), 10_000_000);
        assert!(!w.publishers.contains_key("honest"));
        w.observe("p", "slow", Some(1_000_000), Some(60_000_000), 61_000_000);
        assert!(w.publishers["slow"].warned);
    }
}
