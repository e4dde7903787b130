//! Every metric conveyor exports, declared once: names, labels, units and buckets.
//!
//! Labels come from closed sets (pipeline names from config, reject kinds from
//! `decode::RejectKind`, end reasons from `job::EndReason`); metrics are emitted per batch, not
//! per row, except the row-latency histogram, which is fed after commit, off the decode path.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::pack::Batch;

pub const MESSAGES_RECEIVED: &str = "conveyor_messages_received_total";
pub const ROWS_LOADED: &str = "conveyor_rows_loaded_total";
pub const ROWS_REJECTED: &str = "conveyor_rows_rejected_total";
pub const BATCHES: &str = "conveyor_batches_total";
pub const BATCH_ROWS: &str = "conveyor_batch_rows";
pub const BATCH_COMMIT_SECONDS: &str = "conveyor_batch_commit_seconds";
pub const ROW_LATENCY_SECONDS: &str = "conveyor_row_latency_seconds";
pub const RECONNECTS: &str = "conveyor_reconnects_total";
pub const JOBS: &str = "conveyor_jobs_total";
pub const ACTIVE_WORKER: &str = "conveyor_active_worker";
pub const HANDOFF_GAP_SECONDS: &str = "conveyor_handoff_gap_seconds";
pub const QUEUE_DEPTH: &str = "conveyor_queue_depth";
pub const SPOOL_BYTES: &str = "conveyor_spool_bytes";
pub const SPOOL_FSYNC_SECONDS: &str = "conveyor_spool_fsync_seconds";
pub const SPOOL_FAILING: &str = "conveyor_spool_failing";
pub const CHECKPOINTS: &str = "conveyor_checkpoints_total";
pub const RECOVERED_ROWS: &str = "conveyor_recovered_rows_total";
pub const DUPLICATES_SKIPPED: &str = "conveyor_duplicates_skipped_total";
pub const ALERT: &str = "conveyor_alert";
pub const CLOCK_SKEW: &str = "conveyor_clock_skew_seconds";
pub const CONSOLIDATION_RUNS: &str = "conveyor_consolidation_runs_total";
pub const ERROR_HISTORY_ROWS: &str = "conveyor_error_history_rows";
pub const WORKERS_WEDGED: &str = "conveyor_workers_wedged";
pub const WORKER_RESTARTS: &str = "conveyor_worker_restarts_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];
const FSYNC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const BATCH_ROW_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ROW_LATENCY_SECONDS.into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BATCH_COMMIT_SECONDS.into()),
                        LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), BATCH_ROW_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SPOOL_FSYNC_SECONDS.into()),
                        FSYNC_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(HANDOFF_GAP_SECONDS.into()),
                        LATENCY_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (a test harness); the handle still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(MESSAGES_RECEIVED, "AMQP deliveries received");
    describe_counter!(ROWS_LOADED, "rows committed into target tables, by op");
    describe_counter!(ROWS_REJECTED, "rows committed into error tables, by kind");
    describe_counter!(BATCHES, "batch transactions committed");
    describe_histogram!(BATCH_ROWS, Unit::Count, "rows per committed batch");
    describe_histogram!(
        BATCH_COMMIT_SECONDS,
        Unit::Seconds,
        "time to write and commit one batch"
    );
    describe_histogram!(
        ROW_LATENCY_SECONDS,
        Unit::Seconds,
        "queue_time to commit, per loaded row"
    );
    describe_counter!(
        RECONNECTS,
        "failed attempts on a service, each followed by a reconnect"
    );
    describe_counter!(JOBS, "jobs ended, by status and end reason");
    describe_gauge!(ACTIVE_WORKER, "1 while this slot owns the queue");
    describe_gauge!(
        WORKERS_WEDGED,
        "workers whose loop has not turned for watchdog.wedged_after (systemd's watchdog is no longer fed)"
    );
    describe_counter!(
        WORKER_RESTARTS,
        "worker slots restarted after an error that ended them (the other pipelines go on)"
    );
    describe_histogram!(
        HANDOFF_GAP_SECONDS,
        Unit::Seconds,
        "first delivery of a job minus last delivery of the job before it"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "ready messages in the pipeline's queue, as last read by the rotator"
    );
    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "size of the slot's checkpoint spool"
    );
    describe_histogram!(
        SPOOL_FSYNC_SECONDS,
        Unit::Seconds,
        "one group commit of the spool: write + fsync"
    );
    describe_gauge!(
        SPOOL_FAILING,
        "1 while the slot's spool cannot be written (disk full, permissions); nothing is read or acked meanwhile"
    );
    describe_counter!(
        CHECKPOINTS,
        "spool checkpoints (cut back to the oldest uncommitted record)"
    );
    describe_counter!(
        RECOVERED_ROWS,
        "spooled rows loaded at start-up after a crash (not covered by a robust mark)"
    );
    describe_gauge!(
        ALERT,
        "1 while the daemon's own alert `name` fires for the pipeline (stalled, errors, low_rate, slow_handoff, consolidation_failed)"
    );
    describe_gauge!(
        CLOCK_SKEW,
        Unit::Seconds,
        "a publisher's queue_time minus this host's clock (> 0: its clock runs ahead) or minus the message's AMQP timestamp (< 0: behind); 0 when in line"
    );
    describe_counter!(
        CONSOLIDATION_RUNS,
        "error-table consolidation runs, by result (0 ok, 1 error, 2 locked by another caller)"
    );
    describe_gauge!(
        ERROR_HISTORY_ROWS,
        "rows in conveyor.error_history, as counted after the last consolidation run"
    );
    describe_counter!(
        DUPLICATES_SKIPPED,
        "redelivered messages already owned by a spool or recorded as loaded, acked and not loaded again"
    );
}

pub fn spool_fsync(pipeline: &str, slot: &str, seconds: f64, bytes: u64) {
    metrics::histogram!(SPOOL_FSYNC_SECONDS, "pipeline" => pipeline.to_string(), "slot" => slot.to_string()).record(seconds);
    spool_bytes(pipeline, slot, bytes);
}

pub fn spool_bytes(pipeline: &str, slot: &str, bytes: u64) {
    metrics::gauge!(SPOOL_BYTES, "pipeline" => pipeline.to_string(), "slot" => slot.to_string())
        .set(bytes as f64);
}

/// Also counts failing spools for `/readyz`.
pub fn spool_error(pipeline: &str, slot: &str, failing: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    if failing {
        FAILING_SPOOLS.fetch_add(1, SeqCst);
    } else {
        FAILING_SPOOLS.fetch_sub(1, SeqCst);
    }
    metrics::gauge!(SPOOL_FAILING, "pipeline" => pipeline.to_string(), "slot" => slot.to_string())
        .set(if failing { 1.0 } else { 0.0 });
}

static FAILING_SPOOLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Number of spools whose last write failed (the daemon is not ready while any is).
pub fn failing_spools() -> usize {
    FAILING_SPOOLS.load(std::sync::atomic::Ordering::SeqCst)
}

pub fn checkpoint(pipeline: &str) {
    metrics::counter!(CHECKPOINTS, "pipeline" => pipeline.to_string()).increment(1);
}

pub fn recovered_rows(pipeline: &str, n: u64) {
    metrics::counter!(RECOVERED_ROWS, "pipeline" => pipeline.to_string()).increment(n);
}

pub fn duplicates_skipped(pipeline: &str, n: u64) {
    metrics::counter!(DUPLICATES_SKIPPED, "pipeline" => pipeline.to_string()).increment(n);
}

pub fn messages_received(pipeline: &str, n: u64) {
    metrics::counter!(MESSAGES_RECEIVED, "pipeline" => pipeline.to_string()).increment(n);
}

pub fn alert(pipeline: &str, name: &'static str, firing: bool) {
    metrics::gauge!(ALERT, "pipeline" => pipeline.to_string(), "name" => name).set(if firing {
        1.0
    } else {
        0.0
    });
}

pub fn clock_skew(pipeline: &str, publisher: &str, seconds: f64) {
    metrics::gauge!(CLOCK_SKEW, "pipeline" => pipeline.to_string(), "publisher" => publisher.to_string())
        .set(seconds);
}

/// One consolidation run ended with `result` (0, 1 or 2).
pub fn consolidation_run(result: i16) {
    metrics::counter!(CONSOLIDATION_RUNS, "result" => result.to_string()).increment(1);
}

pub fn error_history_rows(n: i64) {
    metrics::gauge!(ERROR_HISTORY_ROWS).set(n as f64);
}

/// Emitted once per committed batch.
pub fn batch_committed(pipeline: &str, c: &crate::sink::Committed) {
    let p = pipeline.to_string();
    metrics::counter!(ROWS_LOADED, "pipeline" => p.clone(), "op" => "insert").increment(c.inserted);
    for (kind, n) in &c.rejected {
        metrics::counter!(ROWS_REJECTED, "pipeline" => p.clone(), "kind" => kind.as_str())
            .increment(*n);
    }
    metrics::counter!(BATCHES, "pipeline" => p.clone()).increment(1);
    metrics::histogram!(BATCH_ROWS, "pipeline" => p.clone()).record(c.rows as f64);
    metrics::histogram!(BATCH_COMMIT_SECONDS, "pipeline" => p).record(c.commit_seconds);
}

/// Records queue_time → now for every row of `batch` that loaded; called right after COMMIT.
pub fn row_latencies(pipeline: &str, batch: &Batch, excluded: &[bool]) {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let h = metrics::histogram!(ROW_LATENCY_SECONDS, "pipeline" => pipeline.to_string());
    for (row, _) in batch.good.iter().zip(excluded).filter(|(_, e)| !**e) {
        h.record(((now_us - row.queue_time_us).max(0)) as f64 / 1e6);
    }
}

pub fn handoff_gap(pipeline: &str, seconds: f64) {
    metrics::histogram!(HANDOFF_GAP_SECONDS, "pipeline" => pipeline.to_string()).record(seconds);
}

pub fn queue_depth(pipeline: &str, depth: u32) {
    metrics::gauge!(QUEUE_DEPTH, "pipeline" => pipeline.to_string()).set(f64::from(depth));
}

pub fn reconnect(pipeline: &str, service: &'static str) {
    metrics::counter!(RECONNECTS, "pipeline" => pipeline.to_string(), "service" => service)
        .increment(1);
}

pub fn job_ended(pipeline: &str, status: i16, reason: &'static str) {
    metrics::counter!(JOBS, "pipeline" => pipeline.to_string(), "status" => status.to_string(), "end_reason" => reason)
        .increment(1);
}

pub fn workers_wedged(n: usize) {
    metrics::gauge!(WORKERS_WEDGED).set(n as f64);
}

pub fn worker_restarted(pipeline: &str, slot: &str) {
    metrics::counter!(WORKER_RESTARTS, "pipeline" => pipeline.to_string(), "slot" => slot.to_string())
        .increment(1);
}

pub fn active_worker(pipeline: &str, slot: &str, active: bool) {
    metrics::gauge!(ACTIVE_WORKER, "pipeline" => pipeline.to_string(), "slot" => slot.to_string())
        .set(if active { 1.0 } else { 0.0 });
}

/// How often histogram samples are folded into their buckets. The exporter keeps raw samples
/// until then, so without upkeep an unscraped daemon's memory would grow with every row.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the exporter's upkeep until `stop`.
pub async fn upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}
