//! A sink session: one task, one PostgreSQL connection, taking batches from the job's shared
//! bounded queue and committing each (`commit_batch`); a batch that cannot be written is kept
//! and retried with backoff on a new connection, never dropped, until it commits or shutdown
//! leaves it unacked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{commit_batch, Outcome, Target};
use crate::config::SecretUrl;
use crate::pack::Batch;

/// Shared receiving end of the batch queue: whichever session is free takes the next batch.
pub type BatchQueue = Arc<Mutex<mpsc::Receiver<Batch>>>;

/// The channels a session works between: batches in, outcomes out, and the permits that cap
/// how many sessions write at once.
#[derive(Debug, Clone)]
pub struct SessionPipes {
    pub batches: BatchQueue,
    pub permits: Arc<tokio::sync::Semaphore>,
    pub outcomes: mpsc::Sender<Outcome>,
}

/// Everything a session needs to (re)connect.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub pipeline: String,
    pub url: SecretUrl,
    pub connect_timeout: Duration,
}

/// Runs one session until the queue closes or `cancel` fires while a batch cannot be committed.
/// `conn` is the connection opened during job initialisation.
pub async fn run_session(
    index: usize,
    mut conn: Option<PgConnection>,
    params: SessionParams,
    target: Arc<Target>,
    pipes: SessionPipes,
    cancel: CancellationToken,
) {
    let SessionPipes {
        batches: queue,
        permits,
        outcomes,
    } = pipes;
    loop {
        // A permit per batch being written: `sessions` of them normally, more after a priority
        // EOJ raised the job's sessions; sessions beyond that idle on their open connection.
        let Ok(_permit) = permits.acquire().await else {
            break;
        };
        let batch = { queue.lock().await.recv().await };
        let Some(mut batch) = batch else { break };
        let mut attempt: u32 = 0;
        let outcome = loop {
            if conn.is_none() {
                match crate::db::connect(&params.url, params.connect_timeout).await {
                    Ok(c) => {
                        if attempt > 0 {
                            info!(pipeline = %params.pipeline, session = index, "database connection restored");
                        }
                        conn = Some(c);
                    }
                    Err(e) => {
                        crate::metrics::reconnect(&params.pipeline, "postgres");
                        warn!(pipeline = %params.pipeline, session = index, attempt, error = %e, "database unavailable, batch held unacked; retrying");
                    }
                }
            }
            if let Some(c) = conn.as_mut() {
                let started = Instant::now();
                match commit_batch(c, &target, &mut batch, attempt > 0).await {
                    Ok(mut done) => {
                        done.commit_seconds = started.elapsed().as_secs_f64();
                        break Outcome::Committed(done);
                    }
                    Err(e) => {
                        crate::metrics::reconnect(&params.pipeline, "postgres");
                        let level_error = !e.is_retryable();
                        if level_error {
                            tracing::error!(pipeline = %params.pipeline, session = index, attempt, error = %e, "batch cannot be written; it stays unacked and is retried (fix the cause, nothing is lost)");
                        } else {
                            warn!(pipeline = %params.pipeline, session = index, attempt, error = %e, "batch failed, retrying on a new connection; nothing acked");
                        }
                        if let Some(c) = conn.take() {
                            drop(c.close());
                        }
                    }
                }
            }
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(crate::backoff::delay(attempt)) => {}
                _ = cancel.cancelled() => {
                    warn!(pipeline = %params.pipeline, session = index, batch = batch.id, rows = batch.rows(), "shutting down with an uncommitted batch: left unacked for redelivery");
                    break Outcome::Abandoned { batch_id: batch.id };
                }
            }
        };
        if outcomes.send(outcome).await.is_err() {
            break;
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}
