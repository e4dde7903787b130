//! Worker: one slot of one pipeline running one job — init → consume → end.
//!
//! The worker owns the AMQP channel, the packer and the ack bookkeeping; sink sessions own the
//! database connections. Deliveries flow in, are decoded into the open batch, batches flow out
//! to the sessions over a bounded queue (backpressure reaches the broker through prefetch), and
//! outcomes flow back. Architecture invariant: the only `basic.ack` is in `on_outcome`, for a tag
//! that `AckTracker` proves is covered by committed batches.
//!
//! Stop order (shutdown or lost broker connection): cancel the consumer → seal the open batch →
//! wait for every batch in flight → ack what committed → close the channel (the broker requeues
//! whatever was prefetched but not acked) → end the job row → close connections.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, PipelineConfig};
use crate::decode::Decoder;
use crate::job::{Counts, EndReason, Jobs, STATUS_FAILURE, STATUS_SUCCESS};
use crate::pack::{BadRow, Batch, GoodRow, Packer};
use crate::sink::{self, Outcome, SessionParams, Target};
use crate::source::{self, acks::AckTracker};

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
}

fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> WorkerError {
    move |source| WorkerError::Query { what, source }
}

/// Readiness as seen by `/readyz`: every worker that should be consuming is.
#[derive(Debug, Default)]
pub struct Health {
    consuming: std::sync::atomic::AtomicUsize,
    expected: std::sync::atomic::AtomicUsize,
}

impl Health {
    pub fn expect(&self, n: usize) {
        self.expected
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }
    fn set(&self, on: bool) {
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
}

/// How often the job's row in `jobs` gets its counters refreshed while it runs.
const COUNTS_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the pipeline's worker in `slot` until `cancel` fires. Initialisation failures (database
/// down, table missing) are logged and retried with backoff: nothing is consumed meanwhile.
pub async fn run(
    config: Arc<Config>,
    p: PipelineConfig,
    slot: &'static str,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<(), WorkerError> {
    let mut attempt = 0;
    let job = loop {
        match Job::init(&config, &p, slot).await {
            Ok(job) => break job,
            Err(e) => {
                attempt += 1;
                error!(pipeline = %p.name, slot, attempt, error = %e, "cannot start a job; retrying (nothing is consumed until this is fixed)");
                tokio::select! {
                    _ = tokio::time::sleep(crate::backoff::delay(attempt)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
        }
    };
    job.run(&config, &p, health, cancel).await
}

/// One job. Fields are owned by the worker task alone.
struct Job {
    /// `YYYYMMDD_HHMMSS_<pipeline>_<slot>`; fixed at init, names the error table and robust marks.
    name: String,
    slot: &'static str,
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
    queue_time_header: String,
    db_url: crate::config::SecretUrl,
}

impl Job {
    async fn init(
        config: &Config,
        p: &PipelineConfig,
        slot: &'static str,
    ) -> Result<Job, WorkerError> {
        let mut control = crate::db::connect(&config.database_url, config.connect_timeout).await?;
        let jobs = Jobs::new(&config.schema);
        let stale = jobs
            .close_stale(&mut control, &p.name, slot)
            .await
            .map_err(query("closing stale jobs"))?;
        if stale > 0 {
            warn!(pipeline = %p.name, slot, stale, "marked jobs left running by a previous process as failed");
        }
        let columns =
            sink::catalog::read_columns(&mut control, p.target_schema.as_deref(), &p.target_table)
                .await?;
        let decoder = Decoder::new(&columns, p)?;
        let params = serde_json::to_value(p).unwrap_or_default();
        let name = jobs
            .start(&mut control, &p.name, slot, &params)
            .await
            .map_err(query("inserting the job row"))?;
        let cols: Vec<&str> = decoder.copy_columns().collect();
        let target = Arc::new(Target::new(
            &p.name,
            &name,
            &config.schema,
            p.target_schema.as_deref(),
            &p.target_table,
            &cols,
        ));
        sink::errors::create(&mut control, &target.et_table)
            .await
            .map_err(query("creating the error table"))?;
        let mut session_conns = Vec::with_capacity(p.sessions);
        for _ in 0..p.sessions {
            session_conns
                .push(crate::db::connect(&config.database_url, config.connect_timeout).await?);
        }
        info!(pipeline = %p.name, slot, job = %name, columns = cols.len(), sessions = p.sessions, pack = p.pack, "job initialised");
        Ok(Job {
            name,
            slot,
            control: Some(control),
            jobs,
            target,
            decoder,
            packer: Packer::new(p.pack, p.latency),
            counts: Counts::default(),
            seq: 0,
            session_conns,
            queue_time_header: p.queue_time_header.clone(),
            db_url: config.database_url.clone(),
        })
    }

    async fn run(
        mut self,
        config: &Config,
        p: &PipelineConfig,
        health: Arc<Health>,
        cancel: CancellationToken,
    ) -> Result<(), WorkerError> {
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(p.sessions);
        let (outcome_tx, mut outcomes) = mpsc::channel::<Outcome>(p.sessions * 2 + 2);
        let queue = Arc::new(Mutex::new(batch_rx));
        let sessions = TaskTracker::new();
        let session_cancel = cancel.child_token();
        let params = SessionParams {
            pipeline: p.name.clone(),
            url: config.database_url.clone(),
            connect_timeout: config.connect_timeout,
        };
        for (i, conn) in std::mem::take(&mut self.session_conns)
            .into_iter()
            .enumerate()
        {
            sessions.spawn(sink::run_session(
                i,
                Some(conn),
                params.clone(),
                self.target.clone(),
                queue.clone(),
                outcome_tx.clone(),
                session_cancel.clone(),
            ));
        }
        sessions.close();
        drop(outcome_tx);

        let mut flight = Flight {
            acks: AckTracker::new(),
            in_flight: 0,
            abandoned: 0,
        };
        let mut attempt = 0u32;
        let mut failure: Option<String> = None;
        'connection: loop {
            let consumer_tag = format!("conveyor-{}-{}-{}", p.name, self.slot, std::process::id());
            let opened = async {
                let conn = source::connect(&config.amqp_url, &consumer_tag).await?;
                let ch =
                    conn.create_channel()
                        .await
                        .map_err(|source| source::SourceError::Channel {
                            what: "channel.open",
                            source,
                        })?;
                let depth = source::declare_queue(&ch, &p.queue, p.queue_declare).await?;
                let _ = ch.close(200, "declared".into()).await;
                let (channel, consumer) =
                    source::consume(&conn, &p.queue, p.prefetch, &consumer_tag).await?;
                Ok::<_, source::SourceError>((conn, channel, consumer, depth))
            };
            let (amqp, channel, mut consumer, depth) = tokio::select! {
                r = opened => match r {
                    Ok(v) => v,
                    Err(e) => {
                        attempt += 1;
                        crate::metrics::reconnect(&p.name, "rabbitmq");
                        warn!(pipeline = %p.name, slot = self.slot, attempt, error = %e, "RabbitMQ unavailable; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(crate::backoff::delay(attempt)) => continue 'connection,
                            _ = cancel.cancelled() => break 'connection,
                        }
                    }
                },
                _ = cancel.cancelled() => break 'connection,
            };
            if attempt > 0 {
                info!(pipeline = %p.name, slot = self.slot, "RabbitMQ connection restored");
            }
            attempt = 0;
            info!(pipeline = %p.name, slot = self.slot, job = %self.name, queue = %p.queue, depth, prefetch = p.prefetch, "consuming");
            health.set(true);
            crate::metrics::active_worker(&p.name, self.slot, true);

            let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
            let latency_timer = tokio::time::sleep_until(far);
            tokio::pin!(latency_timer);
            let mut armed: Option<Instant> = None;
            let mut counts_tick = tokio::time::interval(COUNTS_INTERVAL);
            counts_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let lost = loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break false,
                    Some(o) = outcomes.recv() => self.on_outcome(o, &channel, &mut flight).await?,
                    _ = &mut latency_timer, if armed.is_some() => {
                        armed = None;
                        latency_timer.as_mut().reset(far);
                        if let Some(b) = self.packer.seal() {
                            self.dispatch(b, &batch_tx, &mut outcomes, &channel, &mut flight).await?;
                        }
                    }
                    d = consumer.next() => match d {
                        Some(Ok(delivery)) => {
                            self.on_delivery(delivery);
                            if let Some(b) = self.packer.take_if_full() {
                                self.dispatch(b, &batch_tx, &mut outcomes, &channel, &mut flight).await?;
                            }
                        }
                        Some(Err(e)) => {
                            warn!(pipeline = %p.name, slot = self.slot, error = %e, "RabbitMQ connection lost; finishing in-flight batches, then reconnecting");
                            break true;
                        }
                        None => {
                            warn!(pipeline = %p.name, slot = self.slot, "consumer cancelled by the broker (queue deleted or failover); re-registering");
                            break true;
                        }
                    },
                    _ = counts_tick.tick() => self.save_counts().await,
                }
                let deadline = self.packer.deadline();
                if deadline != armed {
                    armed = deadline;
                    latency_timer
                        .as_mut()
                        .reset(deadline.map_or(far, tokio::time::Instant::from_std));
                }
            };
            health.set(false);
            crate::metrics::active_worker(&p.name, self.slot, false);
            if !lost {
                let _ = channel
                    .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
            drop(consumer);
            if let Some(b) = self.packer.seal() {
                self.dispatch(b, &batch_tx, &mut outcomes, &channel, &mut flight)
                    .await?;
            }
            while flight.in_flight > 0 {
                match outcomes.recv().await {
                    Some(o) => self.on_outcome(o, &channel, &mut flight).await?,
                    None => break,
                }
            }
            if flight.abandoned > 0 {
                failure = Some(format!(
                    "{} batch(es) could not be committed before shutdown; left unacked for redelivery",
                    flight.abandoned
                ));
            }
            let _ = channel.close(200, "conveyor worker stopping".into()).await;
            let _ = amqp.close(200, "conveyor worker stopping".into()).await;
            if !lost || cancel.is_cancelled() {
                break;
            }
            // Tags of the lost channel mean nothing on the next one.
            flight.acks.reset();
            crate::metrics::reconnect(&p.name, "rabbitmq");
        }
        drop(batch_tx);
        session_cancel.cancel();
        sessions.wait().await;
        self.end(failure).await;
        Ok(())
    }

    fn on_delivery(&mut self, d: lapin::message::Delivery) {
        self.seq += 1;
        self.counts.read += 1;
        let now = Instant::now();
        let received_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_micros() as i64);
        let queue_time = source::header_queue_time_us(&d.properties, &self.queue_time_header);
        let message_id = source::message_id(&d.properties);
        let seq = self.seq;
        let batch = self.packer.open(now, seq);
        let start = batch.copy.len();
        match self
            .decoder
            .decode(&d.data, queue_time, received_us, &mut batch.copy)
        {
            Ok(decoded) => batch.good.push(GoodRow {
                start,
                end: batch.copy.len(),
                raw: d.data,
                seq,
                queue_time_us: decoded.queue_time_us,
                message_id,
            }),
            Err(reject) => batch.bad.push(BadRow {
                raw: d.data,
                seq,
                queue_time_us: queue_time,
                message_id,
                reject,
            }),
        }
        batch.last_seq = seq;
        batch.last_tag = d.delivery_tag;
    }

    /// Hands a closed batch to the sessions, still processing outcomes while the queue is full
    /// (so a full queue can never deadlock against a full outcome channel).
    async fn dispatch(
        &mut self,
        batch: Batch,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        channel: &lapin::Channel,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        flight.acks.dispatched(batch.id, batch.last_tag)?;
        flight.in_flight += 1;
        crate::metrics::messages_received(&self.target.pipeline, batch.rows() as u64);
        loop {
            tokio::select! {
                permit = tx.reserve() => {
                    match permit {
                        Ok(permit) => permit.send(batch),
                        Err(_) => error!(job = %self.name, "sessions stopped; batch left unacked"),
                    }
                    return Ok(());
                }
                Some(o) = outcomes.recv() => self.on_outcome(o, channel, flight).await?,
            }
        }
    }

    async fn on_outcome(
        &mut self,
        o: Outcome,
        channel: &lapin::Channel,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        flight.in_flight = flight.in_flight.saturating_sub(1);
        match o {
            Outcome::Committed(c) => {
                self.counts.inserted += c.inserted;
                self.counts.rejected += c.rejected.values().sum::<u64>();
                self.counts.batches += 1;
                crate::metrics::batch_committed(&self.target.pipeline, &c);
                if let Some(tag) = flight.acks.committed(c.batch_id)? {
                    let opts = BasicAckOptions { multiple: true };
                    if let Err(e) = channel.basic_ack(tag, opts).await {
                        // The channel is gone: the broker redelivers these; see ARCHITECTURE.md.
                        warn!(job = %self.name, tag, error = %e, "ack after commit failed (channel lost); the messages will be redelivered");
                    }
                }
            }
            Outcome::Abandoned { batch_id } => {
                flight.abandoned += 1;
                warn!(job = %self.name, batch = batch_id, "batch abandoned at shutdown");
            }
        }
        Ok(())
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

    /// Closes the job row (status 1, or 3 with the failure), drops an empty error table, and
    /// deletes the job's robust marks (no batch of it can be retried any more).
    async fn end(mut self, failure: Option<String>) {
        let (status, reason) = match &failure {
            None => (STATUS_SUCCESS, EndReason::Shutdown),
            Some(_) => (STATUS_FAILURE, EndReason::Error),
        };
        let counts = self.counts;
        let jobs = self.jobs.clone();
        let name = self.name.clone();
        let et = self.target.et_table.clone();
        let schema_robust = self.target.robust_delete.clone();
        let Some(c) = self.control().await else {
            error!(job = %name, "database unreachable at job end; the job row stays 'running' and is closed as failed at next start");
            return;
        };
        let r = async {
            jobs.end(c, &name, &counts, status, reason, failure.as_deref())
                .await?;
            let errors = sink::errors::drop_if_empty(c, &et).await?;
            sqlx::query(sqlx::AssertSqlSafe(schema_robust))
                .bind(&name)
                .execute(&mut *c)
                .await?;
            Ok::<_, sqlx::Error>(errors)
        }
        .await;
        match r {
            Ok(errors) => {
                crate::metrics::job_ended(&self.target.pipeline, status, reason.as_str());
                info!(job = %name, read = counts.read, inserted = counts.inserted, rejected = counts.rejected, batches = counts.batches, error_rows = errors, end_reason = reason.as_str(), "job ended");
            }
            Err(e) => error!(job = %name, error = %e, "could not close the job row"),
        }
        if let Some(c) = self.control.take() {
            let _ = c.close().await;
        }
    }
}

/// Batches between dispatch and outcome, for one AMQP channel.
struct Flight {
    acks: AckTracker,
    in_flight: usize,
    abandoned: usize,
}
