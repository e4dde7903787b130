//! Recovery at start-up: a slot whose spool still exists belongs to a job whose process died.
//! Before the slot registers as a consumer, every spooled record that no robust mark covers is
//! loaded under that job's name (so a crash during recovery is recovered the same way), the job
//! is closed (restarts + 1, end reason `crash`, status 1) and the spool is deleted.
//!
//! Records the marks cover were committed before the crash and are skipped: that is what makes
//! a table with no key at all (a reloaded row would be a new row) come out exactly once.

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tracing::{info, warn};

use super::{query, SlotContext, WorkerError};
use crate::config::PipelineConfig;
use crate::job::{Jobs, Recovered};
use crate::pack::Packer;
use crate::report::Report;
use crate::sink::{self, Target};
use crate::source;
use crate::spool::{record, FileContents, RangeSet};

/// Loads what `spool` holds that is not committed yet, then closes its job and deletes the file.
pub(super) async fn recover(
    ctx: &SlotContext,
    p: &PipelineConfig,
    spool: &FileContents,
) -> Result<(), WorkerError> {
    let config = &ctx.config;
    let job = spool.job.clone();
    let started = Instant::now();
    if spool.scan.damaged_bytes() > 0 {
        warn!(pipeline = %p.name, slot = ctx.slot, job = %job, path = %spool.path.display(), damaged = ?spool.scan.damaged, "spool has damaged or torn records; they are skipped (a torn tail is a write the crash interrupted: never acked, so the broker redelivers it)");
    }
    let mut control = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let jobs = Jobs::new(&config.schema);
    let restarts = jobs
        .recovering(&mut control, &job, &p.name, ctx.slot)
        .await
        .map_err(query("reopening the crashed job"))?;
    let marks: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT first_seq, last_seq FROM {}.robust_log WHERE job_name = $1",
        crate::db::quote_ident(&config.schema)
    )))
    .bind(&job)
    .fetch_all(&mut control)
    .await
    .map_err(query("reading the robust marks"))?;
    let mut committed = RangeSet::new();
    for (a, b) in marks {
        committed.insert(a as u64, b as u64);
    }
    let (mut decoder, target) = sink::prepare(&mut control, &config.schema, p, &job).await?;
    let mut report = Report::new(&config.report_dir, &job);
    report
        .event(
            "Restart",
            &format!(
                "Restarts={restarts}, Pid={}, Spool={}, Records={}, DamagedBytes={}",
                std::process::id(),
                spool.path.display(),
                spool.scan.records.len().saturating_sub(1),
                spool.scan.damaged_bytes()
            ),
        )
        .await;
    info!(pipeline = %p.name, slot = ctx.slot, job = %job, restarts, records = spool.scan.records.len().saturating_sub(1), "recovering a crashed job from its spool");

    let mut totals = Recovered {
        damaged_bytes: spool.scan.damaged_bytes() as u64,
        ..Recovered::default()
    };
    // Batch ids only name batches in logs here; robust marks are keyed by first sequence.
    let mut packer = Packer::new(p.pack, Duration::from_secs(3600));
    let mut session: Option<PgConnection> = None;
    let now = Instant::now();
    for (seq, payload) in spool.records() {
        if committed.contains(seq) {
            totals.covered += 1;
            continue;
        }
        let d = match record::decode(payload) {
            Ok(record::Record::Delivery(d)) => d,
            Ok(record::Record::Header { .. }) => continue,
            Err(e) => {
                warn!(job = %job, seq, error = %e, "unreadable spool record skipped");
                continue;
            }
        };
        let batch = packer.open(now, seq);
        if d.kind == record::Kind::Duplicate || source::marker(&d.props, d.body).is_some() {
            batch.skipped += 1;
            batch.last_seq = seq;
        } else {
            let qt = source::header_queue_time_us(&d.props, &p.queue_time_header);
            batch.push_message(
                &mut decoder,
                d.body.to_vec(),
                seq,
                qt,
                d.received_us,
                source::message_id(&d.props),
                d.redelivered,
            );
            totals.loaded += 1;
        }
        if let Some(mut b) = packer.take_if_full() {
            commit(ctx, p, &target, &mut b, &mut session, &mut totals).await?;
        }
    }
    if let Some(mut b) = packer.seal() {
        commit(ctx, p, &target, &mut b, &mut session, &mut totals).await?;
    }
    if let Some(s) = session.take() {
        let _ = s.close().await;
    }
    jobs.end_recovered(&mut control, &job, &totals)
        .await
        .map_err(query("closing the recovered job"))?;
    // A recovered job ends with status 1: its steps too, and its post steps become due.
    crate::steps::job_ended(&mut control, &config.schema, p, &job, true, true)
        .await
        .map_err(query("closing the recovered job's steps"))?;
    let errors = sink::errors::drop_empty(&mut control, &target.et_table, &target.uv_table)
        .await
        .map_err(query("checking the error table"))?;
    sqlx::query(sqlx::AssertSqlSafe(target.robust_delete.as_str()))
        .bind(&job)
        .execute(&mut control)
        .await
        .map_err(query("deleting the robust marks"))?;
    // The broker may still redeliver what was unacked at the crash, after this spool is gone
    // and even after another crash: carry those identities forward first.
    let sidecar = crate::spool::owned::sidecar_path(&spool.path);
    let mut ids = crate::spool::owned::load(&sidecar);
    ids.extend(crate::spool::owned::spool_identities(
        spool,
        &p.queue_time_header,
        usize::from(p.prefetch),
    ));
    let keep = ids.len().saturating_sub(4 * usize::from(p.prefetch));
    ids.drain(..keep);
    tokio::task::spawn_blocking(move || crate::spool::owned::save(&sidecar, &ids))
        .await
        .unwrap_or(Ok(()))?;
    let path = spool.path.clone();
    tokio::task::spawn_blocking(move || std::fs::remove_file(&path))
        .await
        .ok()
        .transpose()
        .map_err(|source| crate::spool::SpoolError::Io {
            path: spool.path.clone(),
            what: "deleting the recovered spool",
            source,
        })?;
    crate::metrics::recovered_rows(&p.name, totals.loaded);
    report
        .event(
            "RecoveryEnd",
            &format!(
                "Loaded={}, Inserted={}, Rejected={}, AlreadyCommitted={}, ErrorRows={}, UvRows={}, Seconds={:.3}",
                totals.loaded,
                totals.inserted,
                totals.rejected,
                totals.covered,
                errors.et,
                errors.uv,
                started.elapsed().as_secs_f64()
            ),
        )
        .await;
    info!(pipeline = %p.name, slot = ctx.slot, job = %job, loaded = totals.loaded, inserted = totals.inserted, rejected = totals.rejected, already_committed = totals.covered, "crashed job recovered and closed");
    let _ = control.close().await;
    ctx.state.job_closed();
    Ok(())
}

/// Commits one recovery batch, retrying (with backoff, on a new connection) until it commits
/// or shutdown comes; the robust mark makes a retry after a lost COMMIT safe.
async fn commit(
    ctx: &SlotContext,
    p: &PipelineConfig,
    target: &Target,
    batch: &mut crate::pack::Batch,
    session: &mut Option<PgConnection>,
    totals: &mut Recovered,
) -> Result<(), WorkerError> {
    let mut attempt = 0u32;
    ctx.beat.beat();
    loop {
        if session.is_none() {
            match crate::db::connect(&ctx.config.database_url, ctx.config.connect_timeout).await {
                Ok(c) => *session = Some(c),
                Err(e) => {
                    warn!(pipeline = %p.name, slot = ctx.slot, attempt, error = %e, "database unavailable during recovery; retrying")
                }
            }
        }
        if let Some(c) = session.as_mut() {
            match sink::commit_batch(c, target, batch, attempt > 0).await {
                Ok(done) => {
                    totals.inserted += done.inserted;
                    totals.rejected += done.rejected.values().sum::<u64>();
                    totals.uv += done.uv();
                    crate::faults::point(crate::faults::MID_RECOVERY);
                    return Ok(());
                }
                Err(e) => {
                    warn!(pipeline = %p.name, slot = ctx.slot, attempt, error = %e, "recovery batch failed; retrying");
                    *session = None;
                }
            }
        }
        attempt += 1;
        ctx.beat.park();
        tokio::select! {
            _ = tokio::time::sleep(crate::backoff::delay(attempt)) => {}
            _ = ctx.cancel.cancelled() => return Err(WorkerError::Interrupted),
        }
        ctx.beat.beat();
    }
}
