//! Worker: one slot of one pipeline, running jobs one after another — init → standby → active →
//! end-of-job → init the next.
//!
//! A job initialises everything before it registers as a consumer (connections, catalogue,
//! decoder, error table, job row), so as a standby it takes over the moment the broker
//! activates it. The worker owns the AMQP channel, the packer and the ack bookkeeping; sink
//! sessions own the database connections. Deliveries flow in, are decoded into the open batch,
//! batches flow to the sessions over a bounded queue (backpressure reaches the broker through
//! prefetch), outcomes flow back. Architecture invariant: the only `basic.ack` is in
//! `on_outcome`, for a tag that `AckTracker` proves is covered by committed batches.
//!
//! End of job (marker, idle, max rows, priority control, shutdown), in this order: note the end
//! in the pipeline state → seal the open batch (the marker rides in it, so it is acked with the
//! rows before it) → wait for every batch in flight → ack → cancel the consumer (the broker
//! activates the standby) → requeue every delivery received after the end point → close the
//! channels → close the job row and report. Acks go out before the cancel because a quorum queue
//! did not always honour an ack sent after it (ARCHITECTURE.md, "End of job").

mod consume;
mod health;
mod recover;
mod spooled;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

pub use health::{Beat, Health};

use crate::config::{Config, PipelineConfig};
use crate::decode::Decoder;
use crate::job::{Counts, EndReason, Jobs, STATUS_FAILURE, STATUS_SUCCESS};
use crate::pack::Packer;
use crate::report::Report;
use crate::rotator::PipelineState;
use crate::sink::{self, Target};
use crate::source;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("the pipeline's settings do not fit the target table: {0}")]
    Decode(#[from] crate::decode::DecodeError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("ack bookkeeping: {0}")]
    Ack(#[from] source::acks::AckError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("shutdown came during recovery; the spool is kept and recovered at the next start")]
    Interrupted,
}

fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> WorkerError {
    move |source| WorkerError::Query { what, source }
}

/// Everything a slot shares with its pipeline and the daemon.
#[derive(Clone)]
pub struct SlotContext {
    pub config: Arc<Config>,
    pub slot: &'static str,
    pub state: Arc<PipelineState>,
    pub health: Arc<Health>,
    pub cancel: CancellationToken,
    /// Identities of the pipeline's recently spooled messages, shared by both slots, to
    /// recognise redeliveries of messages a spool already owns (`spool::owned`).
    pub owned: Arc<std::sync::Mutex<crate::spool::Owned>>,
    /// This slot's heartbeat for the watchdog.
    pub beat: Beat,
}

/// Runs jobs in `slot` of pipeline `p` until `cancel` fires. Initialisation failures (database
/// down, table missing) are logged and retried with backoff: nothing is consumed meanwhile.
/// `spool` is what the slot's spool held at start-up (read by the daemon): a crashed job's
/// records, loaded before the slot consumes anything.
pub async fn run_slot(
    ctx: SlotContext,
    mut p: PipelineConfig,
    spool: Option<crate::spool::FileContents>,
) -> Result<(), WorkerError> {
    let mut attempt = 0;
    let mut pending = spool;
    let spool_path = crate::spool::spool_path(&ctx.config.state_dir, &p.name, ctx.slot);
    while !ctx.cancel.is_cancelled() {
        ctx.beat.beat();
        if let Some(spool) = pending.take() {
            loop {
                match recover::recover(&ctx, &p, &spool).await {
                    Ok(()) => break,
                    Err(WorkerError::Interrupted) => return Ok(()),
                    Err(e) => {
                        attempt += 1;
                        error!(pipeline = %p.name, slot = ctx.slot, attempt, error = %e, "cannot recover the crashed job's spool yet; retrying (this slot consumes nothing until it is done)");
                        ctx.beat.park();
                        tokio::select! {
                            _ = tokio::time::sleep(crate::backoff::delay(attempt)) => continue,
                            _ = ctx.cancel.cancelled() => return Ok(()),
                        }
                    }
                }
            }
            attempt = 0;
        }
        let job = match Job::init(&ctx, &mut p).await {
            Ok(job) => job,
            Err(e) => {
                attempt += 1;
                error!(pipeline = %p.name, slot = ctx.slot, attempt, error = %e, "cannot start a job; retrying (nothing is consumed until this is fixed)");
                ctx.beat.park();
                tokio::select! {
                    _ = tokio::time::sleep(crate::backoff::delay(attempt)) => continue,
                    _ = ctx.cancel.cancelled() => return Ok(()),
                }
            }
        };
        attempt = 0;
        let span = tracing::info_span!("job", job = %job.name);
        if job.run(&ctx, &p).instrument(span).await? {
            // The job ended with spooled rows it could not commit: load them before the next
            // job's spool replaces the file.
            let path = spool_path.clone();
            pending = tokio::task::spawn_blocking(move || crate::spool::read_file(&path))
                .await
                .unwrap_or(Ok(None))?;
        }
    }
    Ok(())
}

/// Deletes this pipeline's journals older than `keep` (file modification time).
async fn prune_journals(dir: &std::path::Path, pipeline: &str, keep: Duration) {
    let dir = dir.to_path_buf();
    let suffix = [
        format!("_{pipeline}_01.journal"),
        format!("_{pipeline}_02.journal"),
    ];
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !suffix.iter().any(|s| name.ends_with(s.as_str())) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if old {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => info!(path = %e.path().display(), "deleted a journal older than journal_keep"),
                    Err(err) => warn!(path = %e.path().display(), error = %err, "could not delete an old journal"),
                }
            }
        }
    })
    .await;
}

/// `durability = "broker"`: forgets message ids older than `keep`.
async fn prune_loaded_ids(
    conn: &mut PgConnection,
    schema: &str,
    pipeline: &str,
    keep: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {}.loaded_ids WHERE pipeline = $1 AND loaded_at < now() - make_interval(secs => $2)",
        crate::db::quote_ident(schema)
    )))
    .bind(pipeline)
    .bind(keep.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(())
}

/// One job. Fields are owned by the worker task alone.
struct Job {
    /// `YYYYMMDD_HHMMSS_<pipeline>_<slot>`; fixed at init, names the error table and robust marks.
    name: String,
    /// Control connection: the job row and end-of-job cleanup. `None` after it failed; reopened
    /// lazily.
    control: Option<PgConnection>,
    jobs: Jobs,
    target: Arc<Target>,
    decoder: Decoder,
    packer: Packer,
    counts: Counts,
    /// Job sequence number of the last delivery read (1-based); travels with the batches.
    seq: u64,
    /// Session connections opened at init, handed to the session tasks when consuming starts.
    session_conns: Vec<PgConnection>,
    /// Wall-clock receive time of the last delivery (µs since the epoch), for the job row.
    last_delivery_us: Option<i64>,
    /// Set at the first delivery: the job owns the queue from then on.
    active: bool,
    handoff_gap_ms: Option<f64>,
    report: Report,
    started: Instant,
    db_url: crate::config::SecretUrl,
    /// The job's spool and/or journal writer (`None` with broker durability and no journal).
    spool: Option<crate::spool::Spool>,
    /// True when the spool owns acked messages (`durability = "spool"`).
    spooled: bool,
    /// Spool mode: sequences covered by committed batches (for checkpoints).
    committed: crate::spool::RangeSet,
    /// Spool mode: sealed batches waiting for their records' fsync before they may commit.
    waiting: std::collections::VecDeque<crate::pack::Batch>,
    /// Spool mode: the fsync watermark last seen.
    durable_seq: u64,
    /// Spool mode: the write is failing; deliveries are not read meanwhile.
    spool_failing: bool,
    /// Spool mode: highest sequence acked to the broker.
    acked_seq: u64,
    /// Spool mode: (first sequence, its delivery tag) on the current channel; tags are
    /// consecutive per channel, so this maps every later sequence to its tag.
    channel_base: Option<(u64, u64)>,
    /// Spool mode: rows committed since the last checkpoint, and the sequence it cut at.
    rows_since_checkpoint: u64,
    checkpoint_from: u64,
    checkpoints: u64,
    /// The broker confirmed (channel close-ok) every ack of the job's last channel.
    acks_settled: bool,
    /// conveyor's own schema.
    schema: String,
    /// Latency per commit minute and range, saved at each status interval and at the end.
    latency: crate::stats::JobLatency,
    /// The pipeline's shared state (rotation, alert counters).
    state: Arc<PipelineState>,
    /// The slot's watchdog heartbeat.
    beat: Beat,
    /// Publisher clock skew seen in this job's deliveries.
    skew: crate::monitor::SkewWatch,
}

impl Job {
    /// Prepares a job with the parameters of this moment (file, then `conveyor.config`).
    async fn init(ctx: &SlotContext, p: &mut PipelineConfig) -> Result<Job, WorkerError> {
        let config = &ctx.config;
        let mut control = crate::db::connect(&config.database_url, config.connect_timeout).await?;
        *p = crate::params::for_next_job(config, p, &mut control).await;
        let jobs = Jobs::new(&config.schema);
        let stale = jobs
            .close_stale(&mut control, &p.name, ctx.slot)
            .await
            .map_err(query("closing stale jobs"))?;
        if stale > 0 {
            warn!(pipeline = %p.name, slot = ctx.slot, stale, "marked jobs left running by a dead process as failed");
        }
        let decoder = sink::decoder_for(&mut control, p).await?;
        let params = serde_json::to_value(&*p).unwrap_or_default();
        let name = jobs
            .start(&mut control, &p.name, ctx.slot, &params)
            .await
            .map_err(query("inserting the job row"))?;
        jobs.status_start(&mut control, &name, &p.name, ctx.slot, "acquisition", 0)
            .await
            .map_err(query("inserting the job's status row"))?;
        let cols: Vec<&str> = decoder.copy_columns().collect();
        let spooled = p.durability == crate::config::Durability::Spool;
        let mut target = Target::new(
            &p.name,
            &name,
            &config.schema,
            p.target_schema.as_deref(),
            &p.target_table,
            &cols,
        );
        if !spooled {
            target = target.with_dedup(&config.schema);
        }
        target.setup(&mut control, p.mode).await?;
        if !p.routes.is_empty() {
            target.routes = Some(
                sink::routed::Routes::prepare(&mut control, &config.schema, p, &name, None).await?,
            );
        }
        target.latency_buckets = config.latency_buckets.clone();
        let target = Arc::new(target);
        let sessions = p.sessions.max(p.priority_sessions.unwrap_or(0));
        let mut session_conns = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            session_conns
                .push(crate::db::connect(&config.database_url, config.connect_timeout).await?);
        }
        let spool = if spooled || p.journal {
            if p.journal {
                prune_journals(&config.journal_dir, &p.name, p.journal_keep).await;
            }
            let opts = crate::spool::SpoolOptions {
                spool: spooled
                    .then(|| crate::spool::spool_path(&config.state_dir, &p.name, ctx.slot)),
                journal: p
                    .journal
                    .then(|| crate::spool::journal_path(&config.journal_dir, &name)),
                fsync_every: p.fsync_every,
                fsync_rows: p.fsync_rows,
                pipeline: p.name.clone(),
                slot: ctx.slot.to_string(),
            };
            Some(crate::spool::Spool::open(opts, &name).await?)
        } else {
            if let Err(e) =
                prune_loaded_ids(&mut control, &config.schema, &p.name, p.dedup_keep).await
            {
                warn!(pipeline = %p.name, error = %e, "could not prune old loaded message ids");
            }
            None
        };
        let mut report = Report::new(&config.report_dir, &name);
        report
            .event(
                "Init",
                &format!(
                    "Version={}, Job={name}, Pipeline={}, Slot={}, Host={}, Pid={}, Target={}, Pack={}, Sessions={}, Latency={:?}",
                    env!("CARGO_PKG_VERSION"),
                    p.name,
                    ctx.slot,
                    hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
                    std::process::id(),
                    p.target_table,
                    p.pack,
                    p.sessions,
                    p.latency
                ),
            )
            .await;
        info!(pipeline = %p.name, slot = ctx.slot, job = %name, columns = cols.len(), sessions = p.sessions, pack = p.pack, "job initialised");
        Ok(Job {
            name,
            control: Some(control),
            jobs,
            target,
            decoder,
            packer: Packer::new(p.pack, p.latency),
            counts: Counts::default(),
            seq: 0,
            session_conns,
            last_delivery_us: None,
            active: false,
            handoff_gap_ms: None,
            report,
            started: Instant::now(),
            db_url: config.database_url.clone(),
            spool,
            spooled,
            committed: crate::spool::RangeSet::new(),
            waiting: std::collections::VecDeque::new(),
            durable_seq: 0,
            spool_failing: false,
            acked_seq: 0,
            channel_base: None,
            rows_since_checkpoint: 0,
            checkpoint_from: 1,
            checkpoints: 0,
            acks_settled: false,
            schema: config.schema.clone(),
            latency: crate::stats::JobLatency::new(&config.latency_buckets),
            state: ctx.state.clone(),
            beat: ctx.beat.clone(),
            skew: crate::monitor::SkewWatch::default(),
        })
    }

    /// The job's first delivery: it owns the queue now.
    async fn activate(&mut self, ctx: &SlotContext, p: &PipelineConfig) -> bool {
        self.active = true;
        let boosted = ctx.state.take_boost();
        // The job a priority EOJ handed the backlog to is not ended for depth again: it is the
        // one with the raised pack and sessions, and ending it would only churn handoffs.
        let depth_threshold = if boosted { None } else { p.depth_threshold };
        let handoff = ctx
            .state
            .activated(&self.name, p.rotate_every, depth_threshold);
        if boosted {
            if let Some(pack) = p.priority_pack {
                self.packer.set_pack(pack);
            }
        }
        crate::metrics::active_worker(&p.name, ctx.slot, true);
        let (jobs, name) = (self.jobs.clone(), self.name.clone());
        let claimed = handoff
            .as_ref()
            .map(|h| (h.previous.as_str(), h.gap.as_secs_f64() * 1000.0));
        if let Some(c) = self.control().await {
            match jobs.activated(c, &name, &p.name, claimed).await {
                Ok(gap_ms) => self.handoff_gap_ms = gap_ms,
                Err(e) => warn!(job = %name, error = %e, "could not mark the job active"),
            }
        }
        if let Some(g) = self.handoff_gap_ms {
            crate::metrics::handoff_gap(&p.name, g / 1000.0);
            ctx.state
                .handoff_took(Duration::from_secs_f64((g / 1000.0).max(0.0)));
        }
        info!(pipeline = %p.name, slot = ctx.slot, job = %self.name, handoff_gap_ms = self.handoff_gap_ms, boosted, "job active");
        let gap_ms = self.handoff_gap_ms;
        self.report
            .event(
                "PhaseBegin",
                &format!(
                    "Phase=acquisition, HandoffGapMs={}",
                    gap_ms.map_or("-".into(), |g| format!("{g:.1}"))
                ),
            )
            .await;
        boosted
    }

    async fn control(&mut self) -> Option<&mut PgConnection> {
        if self.control.is_none() {
            // Short timeout: this is bookkeeping, never worth stalling the data path for.
            match crate::db::connect(&self.db_url, Duration::from_secs(2)).await {
                Ok(c) => self.control = Some(c),
                Err(e) => {
                    warn!(job = %self.name, error = %e, "control connection unavailable");
                    return None;
                }
            }
        }
        self.control.as_mut()
    }

    /// Refreshes the job's monitor row (`status`, logged by its trigger) and saves the latency
    /// statistics gathered since the last time.
    async fn save_status(&mut self) {
        let counts = self.counts;
        let jobs = self.jobs.clone();
        let name = self.name.clone();
        let phase = if self.active { "active" } else { "standby" };
        let latency = self.latency.take_dirty().then(|| self.latency.clone());
        let (schema, pipeline) = (self.schema.clone(), self.target.pipeline.clone());
        if let Some(c) = self.control().await {
            let r = async {
                jobs.status_update(c, &name, phase, &counts).await?;
                if let Some(l) = &latency {
                    crate::stats::save(c, &schema, &name, &pipeline, l).await?;
                }
                Ok::<_, sqlx::Error>(())
            }
            .await;
            if let Err(e) = r {
                warn!(job = %name, error = %e, "could not update the job's status row and latency statistics");
                self.control = None;
            }
        }
    }

    async fn save_counts(&mut self) {
        let counts = self.counts;
        let jobs = self.jobs.clone();
        let name = self.name.clone();
        if let Some(c) = self.control().await {
            if let Err(e) = jobs.update(c, &name, &counts).await {
                warn!(job = %name, error = %e, "could not refresh the job's counters");
                self.control = None;
            }
        }
    }

    /// Closes the job row (status 1, or 3 with the failure), drops an empty error table,
    /// deletes the job's robust marks (no batch of it can be retried any more), and writes the
    /// report's closing lines.
    async fn end(
        mut self,
        p: &PipelineConfig,
        reason: EndReason,
        failure: Option<String>,
        spool_kept: bool,
    ) {
        let pipeline = p.name.as_str();
        let (status, reason) = match &failure {
            None => (STATUS_SUCCESS, reason),
            Some(_) => (STATUS_FAILURE, EndReason::Error),
        };
        let counts = self.counts;
        let jobs = self.jobs.clone();
        let name = self.name.clone();
        let (et, uv) = (self.target.et_table.clone(), self.target.uv_table.clone());
        let robust_delete = self.target.robust_delete.clone();
        let (dedup, acks_settled) = (self.target.dedup.is_some(), self.acks_settled);
        let schema = self.schema.clone();
        let latency = self.latency.clone();
        let last = self.last_delivery_us;
        let mut error_rows = None;
        match self.control().await {
            None => {
                error!(job = %name, "database unreachable at job end; the job row stays 'running' and is closed as failed at the next start")
            }
            Some(c) => {
                let r = async {
                    let end = crate::job::JobEnd {
                        status,
                        reason,
                        error: failure.as_deref(),
                        last_delivery_us: last,
                    };
                    jobs.end(c, &name, &counts, &end).await?;
                    // The final counters, so status_log's last rows carry them.
                    jobs.status_update(c, &name, "ended", &counts).await?;
                    crate::stats::save(c, &schema, &name, pipeline, &latency).await?;
                    jobs.status_end(c, std::slice::from_ref(&name)).await?;
                    crate::steps::job_ended(
                        c,
                        &schema,
                        p,
                        &name,
                        status == STATUS_SUCCESS,
                        counts.read > 0,
                    )
                    .await?;
                    let errors = sink::errors::drop_empty(c, &et, &uv).await?;
                    if !spool_kept {
                        // With the spool kept, its recovery needs the marks to skip what committed.
                        sqlx::query(sqlx::AssertSqlSafe(robust_delete))
                            .bind(&name)
                            .execute(&mut *c)
                            .await?;
                    }
                    if dedup && acks_settled {
                        // Every ack of this job was applied: none of its messages can come back.
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DELETE FROM {}.loaded_ids WHERE job_name = $1",
                            crate::db::quote_ident(&schema)
                        )))
                        .bind(&name)
                        .execute(&mut *c)
                        .await?;
                    }
                    Ok::<_, sqlx::Error>(errors)
                }
                .await;
                match r {
                    Ok(n) => error_rows = Some(n),
                    Err(e) => error!(job = %name, error = %e, "could not close the job row"),
                }
            }
        }
        crate::metrics::job_ended(pipeline, status, reason.as_str());
        info!(job = %name, read = counts.read, inserted = counts.inserted, rejected = counts.rejected, skipped = counts.skipped, batches = counts.batches, et_rows = error_rows.map(|r| r.et), uv_rows = error_rows.map(|r| r.uv), end_reason = reason.as_str(), "job ended");
        let r = &mut self.report;
        r.event(
            "ImportEnd",
            &format!(
                "Records Read={}, Skipped={}, Rejected={}, Sent={}, Errors={}",
                counts.read,
                counts.skipped,
                counts.rejected,
                counts.inserted + counts.rejected,
                counts.rejected
            ),
        )
        .await;
        r.event(
            "TableStats",
            &format!(
                "jobtype=I, Activity={}, TableName={}",
                counts.inserted, pipeline
            ),
        )
        .await;
        // Empty tables go now (MultiLoad's cleanup); the others after consolidation.
        if let Some(rows) = error_rows {
            if rows.et == 0 {
                r.event("ErrTableDrop", &format!("Name={et}, Rows=0")).await;
            }
            if rows.uv == 0 {
                r.event("ErrTableDrop", &format!("Name={uv}, Rows=0")).await;
            }
        }
        r.event(
            "Exit",
            &format!(
                "TermCode={}, EndReason={}",
                if status == STATUS_SUCCESS { 0 } else { 12 },
                reason.as_str()
            ),
        )
        .await;
        r.event(
            "Exit",
            &format!(
                "FinalStats job={name} | elapsed_s={:.3} | handoff_gap_ms={} | read={} | inserted={} | rejected={} | skipped={} | batches={} | status={status} | end_reason={}",
                self.started.elapsed().as_secs_f64(),
                self.handoff_gap_ms.map_or("-".into(), |g| format!("{g:.1}")),
                counts.read,
                counts.inserted,
                counts.rejected,
                counts.skipped,
                counts.batches,
                reason.as_str()
            ),
        )
        .await;
        if let Some(c) = self.control.take() {
            let _ = c.close().await;
        }
    }
}
