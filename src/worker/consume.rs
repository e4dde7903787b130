//! The consuming half of a job: register with the broker (as standby until the broker delivers),
//! the delivery loop, end-of-job detection, and the ordered stop.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::{Channel, Connection, Consumer};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use super::spooled::{next_durable, reserve};
use super::{Job, SlotContext, WorkerError};
use crate::config::{Handoff, PipelineConfig};
use crate::job::EndReason;
use crate::pack::Batch;
use crate::sink::{self, Outcome, SessionParams};
use crate::source::{self, acks::AckTracker};
use crate::spool::record;

/// How often the job's row in `jobs` gets its counters refreshed while it runs.
const COUNTS_INTERVAL: Duration = Duration::from_secs(10);
/// After cancel-ok every delivery the broker sent on the consumer is already in the client's
/// buffer (frames on a channel are ordered), so draining needs no real wait; this only covers
/// the hop from lapin's I/O thread. It sits inside the handoff gap: the queue hands over to the
/// standby once the cancelled consumer's deliveries are returned.
const DRAIN_WAIT: Duration = Duration::from_millis(2);

/// What one delivery means for the job.
enum Step {
    Continue,
    End(EndReason),
}

/// Why the delivery loop stopped.
enum Stop {
    End(EndReason),
    Shutdown,
    /// The broker connection or consumer was lost: reconnect and go on with the same job.
    Lost,
}

/// A registered consumer and the job's control channel.
struct Registered {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    /// Kept for the whole job: lapin closes a channel when its last handle drops, and a
    /// control message arriving on a closing channel is a connection error that would take the
    /// data channel (and its acks) down with it.
    control_channel: Channel,
    control: Consumer,
    consumer_tag: String,
    depth: u32,
}

/// Batches between dispatch and outcome, for one AMQP channel.
pub(super) struct Flight {
    pub(super) acks: AckTracker,
    pub(super) in_flight: usize,
    pub(super) abandoned: usize,
}

impl Job {
    /// Runs the job to its end; true when its spool was kept (rows not committed), to be
    /// recovered before the slot's next job.
    pub(super) async fn run(
        mut self,
        ctx: &SlotContext,
        p: &PipelineConfig,
    ) -> Result<bool, WorkerError> {
        let sessions_max = self.session_conns.len();
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(sessions_max);
        let (outcome_tx, mut outcomes) = mpsc::channel::<Outcome>(sessions_max * 2 + 2);
        let queue = Arc::new(Mutex::new(batch_rx));
        let permits = Arc::new(Semaphore::new(p.sessions));
        let sessions = TaskTracker::new();
        let session_cancel = ctx.cancel.child_token();
        let params = SessionParams {
            pipeline: p.name.clone(),
            url: ctx.config.database_url.clone(),
            connect_timeout: ctx.config.connect_timeout,
        };
        for (i, conn) in std::mem::take(&mut self.session_conns)
            .into_iter()
            .enumerate()
        {
            sessions.spawn(
                sink::run_session(
                    i,
                    Some(conn),
                    params.clone(),
                    self.target.clone(),
                    sink::SessionPipes {
                        batches: queue.clone(),
                        permits: permits.clone(),
                        outcomes: outcome_tx.clone(),
                    },
                    session_cancel.clone(),
                )
                .in_current_span(),
            );
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
        let mut durable_rx = self
            .spool
            .as_ref()
            .filter(|_| self.spooled)
            .map(|s| s.durable());
        // Room for one record in the spool's queue is reserved before the next delivery is
        // read: a spool that cannot keep up (or a full disk) stops the reading, never blocks
        // the worker halfway through a delivery while outcomes and checkpoints wait.
        let spool_tx = self.spool.as_ref().map(|s| s.sender());
        let mut spool_permit: Option<mpsc::OwnedPermit<(u64, Vec<u8>)>> = None;
        let mut checkpoint_tick = tokio::time::interval(p.checkpoint_interval);
        checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checkpoint_tick.reset();
        let reason = 'connection: loop {
            // Connecting is bounded by timeouts; an exclusive standby waits here for its turn.
            self.beat.park();
            let reg = tokio::select! {
                r = self.register(ctx, p) => r,
                _ = ctx.cancel.cancelled() => break 'connection EndReason::Shutdown,
            };
            let Registered {
                conn,
                channel,
                mut consumer,
                control_channel,
                mut control,
                consumer_tag,
                depth,
            } = match reg {
                Ok(Some(r)) => r,
                Ok(None) => break 'connection EndReason::Shutdown,
                Err(e) => {
                    attempt += 1;
                    crate::metrics::reconnect(&p.name, "rabbitmq");
                    warn!(pipeline = %p.name, slot = ctx.slot, attempt, error = %e, "RabbitMQ unavailable; retrying");
                    self.beat.park();
                    tokio::select! {
                        _ = tokio::time::sleep(crate::backoff::delay(attempt)) => continue 'connection,
                        _ = ctx.cancel.cancelled() => break 'connection EndReason::Shutdown,
                    }
                }
            };
            if attempt > 0 {
                info!(pipeline = %p.name, slot = ctx.slot, "RabbitMQ connection restored");
            }
            attempt = 0;
            info!(pipeline = %p.name, slot = ctx.slot, job = %self.name, queue = %p.queue, depth, "registered as consumer");
            self.report
                .event(
                    "QueueOpen",
                    &format!("Queue={}, Depth={depth}, Handoff={:?}", p.queue, p.handoff),
                )
                .await;
            ctx.health.set(true);
            let mut standing_by = !self.active;
            if standing_by {
                ctx.state.standby_up();
            }

            let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
            let latency_timer = tokio::time::sleep_until(far);
            tokio::pin!(latency_timer);
            let mut armed: Option<Instant> = None;
            let idle_after = p.idle_eoj.unwrap_or(Duration::from_secs(86_400 * 365));
            let idle_timer = tokio::time::sleep(idle_after);
            tokio::pin!(idle_timer);
            let mut counts_tick = tokio::time::interval(COUNTS_INTERVAL);
            counts_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut status_tick = tokio::time::interval(ctx.config.status_interval);
            status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            status_tick.reset();
            // Makes the loop turn (and beat) even when nothing else happens, so a wedge is
            // told from an idle worker within a second.
            let mut beat_tick = tokio::time::interval(Duration::from_secs(1));
            beat_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stop = loop {
                self.beat.beat();
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => break Stop::Shutdown,
                    Some(o) = outcomes.recv() => self.on_outcome(o, &channel, &mut flight).await?,
                    d = next_durable(&mut durable_rx) => {
                        self.on_durable(d, Some(&channel), &batch_tx, &mut outcomes, &mut flight).await?;
                    }
                    _ = checkpoint_tick.tick(), if self.spooled => self.checkpoint(p).await,
                    _ = &mut latency_timer, if armed.is_some() => {
                        armed = None;
                        latency_timer.as_mut().reset(far);
                        if let Some(b) = self.packer.seal() {
                            self.dispatch(b, &batch_tx, &mut outcomes, &channel, &mut flight).await?;
                        }
                    }
                    _ = &mut idle_timer, if self.active && p.idle_eoj.is_some() && self.counts.read > 0 => {
                        break Stop::End(EndReason::Idle);
                    }
                    _ = beat_tick.tick() => {}
                    c = control.next() => match c {
                        Some(Ok(d)) => {
                            if self.control_applies(&d.data, p) {
                                ctx.state.request_boost();
                                break Stop::End(EndReason::Priority);
                            }
                        }
                        _ => {
                            warn!(pipeline = %p.name, slot = ctx.slot, "control channel lost; reconnecting");
                            break Stop::Lost;
                        }
                    },
                    permit = reserve(spool_tx.clone()), if spool_tx.is_some() && spool_permit.is_none() && !self.spool_failing => {
                        if permit.is_none() {
                            // The writer is gone: nothing can be spooled (or acked) any more.
                            self.spool_failing = true;
                        }
                        spool_permit = permit;
                    }
                    d = consumer.next(), if !self.spool_failing && (spool_tx.is_none() || spool_permit.is_some()) => match d {
                        Some(Ok(delivery)) => {
                            if standing_by {
                                standing_by = false;
                                ctx.state.standby_down();
                            }
                            if !self.active && self.activate(ctx, p).await && p.priority_sessions.is_some_and(|s| s > p.sessions) {
                                permits.add_permits(p.priority_sessions.unwrap_or(0) - p.sessions);
                            }
                            if p.idle_eoj.is_some() {
                                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle_after);
                            }
                            let step = self.on_delivery(ctx, delivery, p, spool_permit.take()).await?;
                            if let Step::End(reason) = step {
                                break Stop::End(reason);
                            }
                            if let Some(b) = self.packer.take_if_full() {
                                self.dispatch(b, &batch_tx, &mut outcomes, &channel, &mut flight).await?;
                            }
                        }
                        Some(Err(e)) => {
                            warn!(pipeline = %p.name, slot = ctx.slot, error = %e, "RabbitMQ connection lost; finishing in-flight batches, then reconnecting");
                            break Stop::Lost;
                        }
                        None => {
                            warn!(pipeline = %p.name, slot = ctx.slot, "consumer cancelled by the broker (queue deleted or failover); re-registering");
                            break Stop::Lost;
                        }
                    },
                    _ = counts_tick.tick() => self.save_counts().await,
                    _ = status_tick.tick() => self.save_status().await,
                }
                if self.spooled && self.rows_since_checkpoint >= p.checkpoint_rows {
                    self.checkpoint(p).await;
                }
                let deadline = self.packer.deadline();
                if deadline != armed {
                    armed = deadline;
                    latency_timer
                        .as_mut()
                        .reset(deadline.map_or(far, tokio::time::Instant::from_std));
                }
            };
            ctx.health.set(false);
            if standing_by {
                ctx.state.standby_down();
            }
            let ending = match stop {
                Stop::End(reason) => Some(reason),
                Stop::Shutdown => Some(EndReason::Shutdown),
                Stop::Lost => None,
            };
            if let Some(reason) = ending {
                ctx.state.ending(&self.name, reason);
            }
            // Commit and ack everything up to the end point *before* cancelling: an ack sent
            // after basic.cancel was sometimes not honoured by a single-active-consumer quorum
            // queue (RabbitMQ 3.10): the last batch came back to the next job as duplicates.
            if let Some(b) = self.packer.seal() {
                self.dispatch(b, &batch_tx, &mut outcomes, &channel, &mut flight)
                    .await?;
            }
            if self.spooled {
                // The spool owns what is durable: ack up to the end point as soon as it is
                // fsynced; the commits finish after the standby has taken over.
                if ending.is_some() {
                    self.wait_durable(
                        ctx,
                        self.seq,
                        &mut durable_rx,
                        &channel,
                        &batch_tx,
                        &mut outcomes,
                        &mut flight,
                    )
                    .await?;
                    crate::faults::point(crate::faults::HANDOFF);
                }
            } else {
                while flight.in_flight > 0 {
                    match outcomes.recv().await {
                        Some(o) => self.on_outcome(o, &channel, &mut flight).await?,
                        None => break,
                    }
                }
            }
            let mut after_end = None;
            if ending.is_some() {
                // Now the broker may activate the standby.
                let _ = bounded(
                    channel
                        .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await;
                after_end = drain_rest(&mut consumer).await;
            }
            drop(consumer);
            drop(control);
            if let Some((last_tag, n)) = after_end {
                // Everything up to the end point is acked now, so one `multiple` nack returns
                // exactly the deliveries received after it (plus any abandoned batch).
                let opts = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                match bounded(channel.basic_nack(last_tag, opts)).await {
                    Some(Ok(())) => {
                        info!(job = %self.name, requeued = n, "requeued deliveries received after the end of the job")
                    }
                    _ => {
                        warn!(job = %self.name, "requeue failed; closing the channel returns them instead")
                    }
                }
            }
            if flight.abandoned > 0 {
                failure = Some(format!(
                    "{} batch(es) could not be committed before shutdown; left unacked for redelivery",
                    flight.abandoned
                ));
            }
            let _ = bounded(control_channel.close(200, "conveyor job ending".into())).await;
            // close-ok means the broker has applied every ack sent before it on this channel.
            self.acks_settled = matches!(
                bounded(channel.close(200, "conveyor job ending".into())).await,
                Some(Ok(()))
            );
            let _ = bounded(conn.close(200, "conveyor job ending".into())).await;
            self.channel_base = None;
            match ending {
                Some(reason) => break 'connection reason,
                None if ctx.cancel.is_cancelled() => break 'connection EndReason::Shutdown,
                None => {
                    // Tags of the lost channel mean nothing on the next one.
                    flight.acks.reset();
                    crate::metrics::reconnect(&p.name, "rabbitmq");
                }
            }
        };
        if self.spooled {
            self.settle(ctx, &mut durable_rx, &batch_tx, &mut outcomes, &mut flight)
                .await?;
        }
        drop(batch_tx);
        session_cancel.cancel();
        sessions.wait().await;
        let mut spool_kept = false;
        if let Some(spool) = self.spool.take() {
            // Delete the spool only when every record it owns is committed; otherwise the
            // next start recovers it.
            let complete = self.waiting.is_empty() && flight.abandoned == 0 && !self.spool_failing;
            if !complete && self.spooled {
                warn!(job = %self.name, waiting = self.waiting.len(), abandoned = flight.abandoned, "job ends with spooled rows not committed; the spool is kept and loaded at the next start");
                failure.get_or_insert_with(|| "spooled rows were not committed before the job ended; they are recovered at the next start".into());
            }
            spool_kept = self.spooled && !complete;
            if self.spooled && complete && self.counts.read > 0 {
                // A job of this slot consumed and ended cleanly: redeliveries from an earlier
                // crash have gone by, so their carried-forward identities can go.
                let sidecar = crate::spool::owned::sidecar_path(&crate::spool::spool_path(
                    &ctx.config.state_dir,
                    &p.name,
                    ctx.slot,
                ));
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(sidecar)).await;
            }
            if let Err(e) = spool.finish(complete || !self.spooled).await {
                warn!(job = %self.name, error = %e, "could not close the spool/journal");
            }
        }
        if self.active {
            crate::metrics::active_worker(&p.name, ctx.slot, false);
        }
        self.end(p, reason, failure, spool_kept).await;
        ctx.state.job_closed();
        Ok(spool_kept)
    }

    /// Connects, declares, opens the control consumer and registers on the queue. With
    /// `handoff = "exclusive"` it retries every `retry_ms` while another worker holds the
    /// queue. `Ok(None)`: shutdown came first.
    async fn register(
        &self,
        ctx: &SlotContext,
        p: &PipelineConfig,
    ) -> Result<Option<Registered>, source::SourceError> {
        let consumer_tag = format!(
            "conveyor-{}-{}-{}-{}",
            p.name,
            ctx.slot,
            std::process::id(),
            self.name
        );
        let conn = source::connect(&ctx.config.amqp_url, &consumer_tag).await?;
        let declare = source::open_channel(&conn).await?;
        let depth = source::declare_queue(&declare, &p.queue, p.queue_declare).await?;
        let _ = declare.close(200, "declared".into()).await;
        let (control_channel, control) = source::control_consumer(&conn).await?;
        let (channel, consumer) = match p.handoff {
            Handoff::SingleActive => {
                source::consume(&conn, &p.queue, p.prefetch, &consumer_tag).await?
            }
            Handoff::Exclusive => {
                // Retrying for the exclusive consumer is this handoff mode's standby.
                ctx.health.set(true);
                ctx.state.standby_up();
                let r = loop {
                    match source::consume_exclusive(&conn, &p.queue, p.prefetch, &consumer_tag)
                        .await
                    {
                        Ok(v) => break Ok(Some(v)),
                        Err(e) if is_in_use(&e) => {
                            tokio::select! {
                                _ = tokio::time::sleep(p.retry) => {}
                                _ = ctx.cancel.cancelled() => break Ok(None),
                            }
                        }
                        Err(e) => break Err(e),
                    }
                };
                ctx.health.set(false);
                ctx.state.standby_down();
                match r? {
                    Some(v) => v,
                    None => {
                        let _ = conn.close(200, "shutdown".into()).await;
                        return Ok(None);
                    }
                }
            }
        };
        Ok(Some(Registered {
            conn,
            channel,
            consumer,
            control_channel,
            control,
            consumer_tag,
            depth,
        }))
    }

    /// Whether a control message ends this job now.
    fn control_applies(&self, body: &[u8], p: &PipelineConfig) -> bool {
        match serde_json::from_slice::<source::Control>(body) {
            // The queue too: deployments sharing a broker may run pipelines and jobs of the same
            // name (job names are only unique within one database schema).
            Ok(c) => {
                self.active
                    && c.pipeline == p.name
                    && (c.queue.is_empty() || c.queue == p.queue)
                    && (c.job == "*" || c.job == self.name)
            }
            Err(e) => {
                warn!(pipeline = %p.name, error = %e, "ignoring an unreadable control message");
                false
            }
        }
    }

    async fn on_delivery(
        &mut self,
        ctx: &SlotContext,
        d: lapin::message::Delivery,
        p: &PipelineConfig,
        permit: Option<mpsc::OwnedPermit<(u64, Vec<u8>)>>,
    ) -> Result<Step, WorkerError> {
        self.seq += 1;
        let now = Instant::now();
        let received_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_micros() as i64);
        self.last_delivery_us = Some(received_us);
        let seq = self.seq;
        if self.channel_base.is_none() {
            self.channel_base = Some((seq, d.delivery_tag));
        }
        let mut kind = record::Kind::Delivery;
        if self.spooled {
            let id = crate::spool::owned::identity(&d.properties, &p.queue_time_header, &d.data);
            if let Ok(mut owned) = ctx.owned.lock() {
                if d.redelivered && owned.take(id) {
                    kind = record::Kind::Duplicate;
                } else {
                    owned.push(id);
                }
            }
        }
        if let Some(spool) = &self.spool {
            // A duplicate keeps its body too: its identity must survive a crash before its ack.
            let payload =
                record::delivery(kind, received_us, d.redelivered, &d.properties, &d.data);
            match permit {
                Some(permit) => {
                    permit.send((seq, payload));
                }
                None => spool.append(seq, payload).await?,
            }
        }
        if kind == record::Kind::Duplicate {
            let batch = self.packer.open(now, seq);
            batch.skipped += 1;
            batch.last_seq = seq;
            batch.last_tag = d.delivery_tag;
            self.counts.duplicates += 1;
            crate::metrics::duplicates_skipped(&p.name, 1);
            return Ok(Step::Continue);
        }
        if let Some(m) = source::marker(&d.properties, &d.data) {
            let batch = self.packer.open(now, seq);
            batch.skipped += 1;
            batch.last_seq = seq;
            batch.last_tag = d.delivery_tag;
            if m.applies_to(&self.name) {
                info!(job = %self.name, reason = m.reason.as_str(), "end-of-job marker");
                return Ok(Step::End(m.reason));
            }
            self.counts.skipped += 1;
            info!(job = %self.name, marker_for = %m.job, "end-of-job marker for a job that already ended: acked and ignored");
            return Ok(Step::Continue);
        }
        self.counts.read += 1;
        let queue_time = source::header_queue_time_us(&d.properties, &p.queue_time_header);
        let props = &d.properties;
        let publisher = props
            .app_id()
            .as_ref()
            .or(props.user_id().as_ref())
            .map_or("unknown", |s| s.as_str());
        let stamped = props
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .map(|s| s.saturating_mul(1_000_000));
        self.skew
            .observe(&p.name, publisher, queue_time, stamped, received_us);
        let message_id = source::message_id(&d.properties);
        let batch = self.packer.open(now, seq);
        batch.push_message(
            &mut self.decoder,
            d.data,
            seq,
            queue_time,
            received_us,
            message_id,
            d.redelivered,
        );
        batch.last_tag = d.delivery_tag;
        if p.max_rows.is_some_and(|m| self.counts.read >= m) {
            return Ok(Step::End(EndReason::Rows));
        }
        Ok(Step::Continue)
    }

    /// Hands a closed batch on: in spool mode it waits for its records' fsync first (a batch
    /// never commits rows the spool could lose); otherwise straight to the sessions.
    async fn dispatch(
        &mut self,
        batch: Batch,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        channel: &Channel,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        crate::metrics::messages_received(&self.target.pipeline, batch.rows() as u64);
        if self.spooled {
            self.waiting.push_back(batch);
            if let Some(s) = &self.spool {
                s.sync().await;
            }
            return self.release(tx, outcomes, Some(channel), flight).await;
        }
        flight.acks.dispatched(batch.id, batch.last_tag)?;
        self.send(batch, tx, outcomes, Some(channel), flight).await
    }

    /// Sends every waiting batch whose records are all durable.
    pub(super) async fn release(
        &mut self,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        channel: Option<&Channel>,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        while self
            .waiting
            .front()
            .is_some_and(|b| b.last_seq <= self.durable_seq)
        {
            if let Some(b) = self.waiting.pop_front() {
                self.send(b, tx, outcomes, channel, flight).await?;
            }
        }
        Ok(())
    }

    /// Queues a batch for the sessions, still processing outcomes while the queue is full (so a
    /// full queue can never deadlock against a full outcome channel).
    async fn send(
        &mut self,
        batch: Batch,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        channel: Option<&Channel>,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        flight.in_flight += 1;
        loop {
            tokio::select! {
                permit = tx.reserve() => {
                    match permit {
                        Ok(permit) => permit.send(batch),
                        Err(_) => error!(job = %self.name, "sessions stopped; batch left unacked"),
                    }
                    return Ok(());
                }
                // The sessions hold every batch (a database outage; they retry on their own):
                // waiting for them is not a wedge.
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.beat.park(),
                Some(o) = outcomes.recv() => match channel {
                    Some(c) => self.on_outcome(o, c, flight).await?,
                    None => {
                        self.on_outcome_closed(o, flight);
                    }
                },
            }
        }
    }

    pub(super) async fn on_outcome(
        &mut self,
        o: Outcome,
        channel: &Channel,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        let Some(tag) = self.on_outcome_closed(o, flight) else {
            return Ok(());
        };
        let opts = BasicAckOptions { multiple: true };
        match bounded(channel.basic_ack(tag, opts)).await {
            Some(Ok(())) => {}
            // The channel is gone: the broker redelivers these; see ARCHITECTURE.md.
            Some(Err(e)) => {
                warn!(job = %self.name, tag, error = %e, "ack after commit failed (channel lost); the messages will be redelivered")
            }
            None => {
                warn!(job = %self.name, tag, "ack after commit timed out; the messages may be redelivered")
            }
        }
        Ok(())
    }

    /// Books an outcome; returns the tag to ack (broker durability) if one is due.
    pub(super) fn on_outcome_closed(&mut self, o: Outcome, flight: &mut Flight) -> Option<u64> {
        flight.in_flight = flight.in_flight.saturating_sub(1);
        match o {
            Outcome::Committed(c) => {
                self.counts.inserted += c.inserted;
                self.counts.rejected += c.rejected.values().sum::<u64>();
                self.counts.uv += c.uv();
                self.counts.duplicates += c.duplicates;
                self.counts.batches += 1;
                if let Some(l) = &c.latency {
                    self.latency.add(l);
                }
                self.state
                    .batch_committed(c.inserted, c.rejected.values().sum::<u64>());
                crate::metrics::batch_committed(&self.target.pipeline, &c);
                if c.duplicates > 0 {
                    crate::metrics::duplicates_skipped(&self.target.pipeline, c.duplicates);
                }
                if self.spooled {
                    self.committed.insert(c.first_seq, c.last_seq);
                    self.rows_since_checkpoint += c.rows as u64;
                    return None;
                }
                match flight.acks.committed(c.batch_id) {
                    Ok(tag) => tag,
                    Err(e) => {
                        error!(job = %self.name, error = %e, "ack bookkeeping failed; the messages stay unacked and are redelivered");
                        None
                    }
                }
            }
            Outcome::Abandoned { batch_id } => {
                flight.abandoned += 1;
                warn!(job = %self.name, batch = batch_id, "batch abandoned at shutdown");
                None
            }
        }
    }
}

/// Takes every delivery the client still holds after the consumer was cancelled (they were
/// received after the end point and belong to the next job); returns the highest tag and count.
async fn drain_rest(consumer: &mut Consumer) -> Option<(u64, usize)> {
    let mut last = None;
    let mut n = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(DRAIN_WAIT, consumer.next()).await {
        last = Some(d.delivery_tag);
        n += 1;
    }
    last.map(|t| (t, n))
}

/// Longest wait for one AMQP operation on the end path: a broker that stops answering must not
/// wedge the worker (the job would never end and never free its slot).
const AMQP_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut` with [`AMQP_OP_TIMEOUT`]; `None` when it timed out.
pub(super) async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(AMQP_OP_TIMEOUT, fut).await.ok()
}

/// The broker's answer while another worker holds the queue exclusively.
fn is_in_use(e: &source::SourceError) -> bool {
    let s = e.to_string();
    s.contains("ACCESS_REFUSED") || s.contains("RESOURCE_LOCKED") || s.contains("exclusive")
}
