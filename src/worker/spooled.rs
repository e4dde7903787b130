//! Spool mode of a job (`durability = "spool"`): acking up to the spool's fsync watermark,
//! releasing batches whose records are durable, the end-of-job waits, and the checkpoint that
//! cuts the spool back. The delivery loop itself is in `consume.rs`.

use std::time::Instant;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::consume::{bounded, Flight};
use super::{Job, SlotContext, WorkerError};
use crate::config::PipelineConfig;
use crate::pack::Batch;
use crate::sink::Outcome;
use crate::spool::Durable;

impl Job {
    /// Spool mode: the writer reported progress (or a failure). Acks every delivery of the
    /// current channel that is now durable and releases the batches waiting for it.
    pub(super) async fn on_durable(
        &mut self,
        d: Option<Durable>,
        channel: Option<&Channel>,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        let Some(d) = d else {
            // The writer task is gone: nothing more can become durable.
            self.spool_failing = true;
            return Ok(());
        };
        self.spool_failing = d.error.is_some();
        if d.seq <= self.durable_seq {
            return Ok(());
        }
        self.durable_seq = d.seq;
        if let (Some(c), Some((base_seq, base_tag))) = (channel, self.channel_base) {
            let upto = self.durable_seq.min(self.seq);
            if upto >= base_seq && upto > self.acked_seq {
                let tag = base_tag + (upto - base_seq);
                crate::faults::point(crate::faults::BEFORE_ACK);
                crate::faults::wedge(crate::faults::BEFORE_ACK).await;
                match bounded(c.basic_ack(tag, BasicAckOptions { multiple: true })).await {
                    Some(Ok(())) => self.acked_seq = upto,
                    _ => {
                        warn!(job = %self.name, tag, "ack of spooled deliveries failed; the broker redelivers them and they are recognised as duplicates")
                    }
                }
            }
        }
        self.release(tx, outcomes, channel, flight).await
    }

    /// Spool mode: waits until every delivery up to `seq` is fsynced (and so acked). Gives up
    /// only at shutdown while the spool cannot be written (those deliveries stay unacked).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn wait_durable(
        &mut self,
        ctx: &SlotContext,
        seq: u64,
        durable_rx: &mut Option<watch::Receiver<Durable>>,
        channel: &Channel,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        if let Some(s) = &self.spool {
            s.sync().await;
        }
        while self.durable_seq < seq {
            if self.spool_failing && ctx.cancel.is_cancelled() {
                warn!(job = %self.name, "shutting down while the spool cannot be written; unspooled deliveries stay unacked for redelivery");
                return Ok(());
            }
            tokio::select! {
                d = next_durable(durable_rx) => self.on_durable(d, Some(channel), tx, outcomes, flight).await?,
                Some(o) = outcomes.recv() => self.on_outcome(o, channel, flight).await?,
                _ = ctx.cancel.cancelled(), if self.spool_failing => {}
            }
        }
        Ok(())
    }

    /// Spool mode, at the end of the job: commits every spooled batch (the channel is closed;
    /// nothing is acked any more).
    pub(super) async fn settle(
        &mut self,
        ctx: &SlotContext,
        durable_rx: &mut Option<watch::Receiver<Durable>>,
        tx: &mpsc::Sender<Batch>,
        outcomes: &mut mpsc::Receiver<Outcome>,
        flight: &mut Flight,
    ) -> Result<(), WorkerError> {
        if let Some(s) = &self.spool {
            s.sync().await;
        }
        self.release(tx, outcomes, None, flight).await?;
        // Waits for the sessions, which retry a database outage on their own: not a wedge.
        self.beat.park();
        while flight.in_flight > 0 || !self.waiting.is_empty() {
            if flight.in_flight == 0 && self.spool_failing && ctx.cancel.is_cancelled() {
                break;
            }
            tokio::select! {
                d = next_durable(durable_rx) => self.on_durable(d, None, tx, outcomes, flight).await?,
                o = outcomes.recv() => match o {
                    Some(o) => { self.on_outcome_closed(o, flight); }
                    None => break,
                },
                _ = ctx.cancel.cancelled(), if self.spool_failing => {}
            }
        }
        Ok(())
    }

    /// Spool mode: cuts the spool back to the oldest uncommitted record, then deletes the
    /// robust marks below it (in this order: a mark may outlive its records, never the reverse,
    /// or a crash in between would load those records twice).
    pub(super) async fn checkpoint(&mut self, p: &PipelineConfig) {
        let keep_from = self.committed.first_missing(self.checkpoint_from);
        self.rows_since_checkpoint = 0;
        if keep_from <= self.checkpoint_from {
            return;
        }
        let Some(spool) = &self.spool else { return };
        let started = Instant::now();
        self.report
            .event("CheckPoint", &format!("Begin, KeepFrom={keep_from}"))
            .await;
        let stats = match spool.cut(keep_from).await {
            Ok(s) => s,
            Err(e) => {
                warn!(job = %self.name, error = %e, "checkpoint failed; the spool keeps everything and the next checkpoint retries");
                return;
            }
        };
        crate::faults::point(crate::faults::MID_CHECKPOINT);
        let (name, sql) = (
            self.name.clone(),
            format!(
                "DELETE FROM {}.robust_log WHERE job_name = $1 AND last_seq < $2",
                crate::db::quote_ident(&self.schema)
            ),
        );
        let mut marks = None;
        if let Some(c) = self.control().await {
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&name)
                .bind(keep_from as i64)
                .execute(c)
                .await
            {
                Ok(r) => marks = Some(r.rows_affected()),
                Err(e) => {
                    warn!(job = %name, error = %e, "could not delete robust marks at checkpoint (harmless; they go at job end)");
                    self.control = None;
                }
            }
        }
        self.committed.prune_below(keep_from);
        self.checkpoint_from = keep_from;
        self.checkpoints += 1;
        crate::metrics::checkpoint(&p.name);
        self.report
            .event(
                "CheckPoint",
                &format!(
                    "End, KeepFrom={keep_from}, SpoolBytes={}->{}, RecordsKept={}, MarksDeleted={}, Seconds={:.3}",
                    stats.bytes_before,
                    stats.bytes_after,
                    stats.records_kept,
                    marks.map_or("-".into(), |m| m.to_string()),
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
        tracing::debug!(job = %self.name, keep_from, kept = stats.records_kept, "checkpoint");
    }
}

/// Room for one record in the spool's queue; pending forever without a spool, `None` when the
/// writer is gone.
pub(super) async fn reserve(
    tx: Option<mpsc::Sender<(u64, Vec<u8>)>>,
) -> Option<mpsc::OwnedPermit<(u64, Vec<u8>)>> {
    match tx {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

/// The next durable watermark; pending forever without a spool. `None`: the writer stopped.
pub(super) async fn next_durable(rx: &mut Option<watch::Receiver<Durable>>) -> Option<Durable> {
    match rx {
        Some(r) => match r.changed().await {
            Ok(()) => Some(r.borrow_and_update().clone()),
            Err(_) => {
                *rx = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}
