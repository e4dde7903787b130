//! Sink: commits batches into PostgreSQL, one transaction per batch, on `sessions` connections.
//!
//! Each session is a task that owns one connection and takes batches from a shared bounded
//! queue. A batch's transaction holds its good rows (COPY, the fastest path measured — see
//! ARCHITECTURE.md), its error rows and its robust mark; so a batch is all committed or not at
//! all, and only a committed batch is reported back to the worker for acking.
//!
//! Rows the database refuses are isolated without failing the batch: PostgreSQL names the COPY
//! line that failed, so the row is moved to the error table and the batch retried (one extra
//! round trip per bad row). If an error carries no line, the batch is bisected under savepoints.
//! Every other error (connection lost, server restarting, lock timeout, table missing) is retried
//! with backoff on a fresh connection; the robust mark makes a retry after an unknown COMMIT
//! outcome safe.

pub mod catalog;
mod copy;
pub mod errors;
pub mod keys;
pub mod routed;
mod session;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::postgres::{PgConnection, PgDatabaseError};
use sqlx::Connection;
use tracing::{info, warn};

use copy::{bisect_rows, copy_line, copy_rows, sending_order};
pub use session::{run_session, BatchQueue, SessionParams, SessionPipes};

use crate::decode::{Reject, RejectKind};
use crate::pack::Batch;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("target table {table} does not exist (create it, or fix the pipeline's target)")]
    NoTable { table: String },
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("the pipeline's settings do not fit the target table: {0}")]
    Decode(#[from] crate::decode::DecodeError),
    #[error("the pipeline's routes do not fit their tables: {0} (fix the [[pipeline.route]] section or the table)")]
    Route(String),
}

impl SinkError {
    /// Whether retrying can help; false only for errors that need an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::NoTable { .. } => false,
            SinkError::Query { source, .. } => is_retryable(source),
            SinkError::Db(_) => true,
            SinkError::Decode(_) => false,
            SinkError::Route(_) => false,
        }
    }
}

/// Retry classification for one statement's error: I/O and server-side transient states retry;
/// an error about the statement itself (syntax, missing object, permission) does not.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            !(code.starts_with("42") || code.starts_with("22") || code.starts_with("23"))
        }
        _ => true,
    }
}

/// The SQL a job's sessions run, built once at job start from checked identifiers.
#[derive(Debug)]
pub struct Target {
    pub pipeline: String,
    pub job: String,
    pub table: String,
    /// The COPY columns, in the order of each line's fields.
    pub columns: Vec<String>,
    pub copy_sql: String,
    pub et_table: String,
    pub uv_table: String,
    /// Unique keys the load fills: the duplicate-key checks before each COPY (`keys.rs`).
    pub keys: Vec<keys::UniqueKey>,
    /// Upper bounds (s) of the latency ranges each committed batch is summarised into.
    pub latency_buckets: Vec<f64>,
    /// Whether batches are checked against the table's keys before their COPY: from the start
    /// with `mode = "insert_ignore"`, else from the job's first duplicate key.
    pub probe: AtomicBool,
    pub robust_insert: String,
    pub robust_check: String,
    pub robust_delete: String,
    /// `durability = "broker"`: record loaded message_ids and skip redelivered ones.
    pub dedup: Option<Dedup>,
    /// A routed pipeline's tables (`routed`): then the batch is written by its routes, not COPY.
    pub routes: Option<routed::Routes>,
}

/// SQL of the message_id bookkeeping (`loaded_ids`).
#[derive(Debug)]
pub struct Dedup {
    /// $1 pipeline, $2 text[] → the ids among them already loaded.
    pub lookup: String,
    /// $1 pipeline, $2 text[], $3 job.
    pub record: String,
}

impl Target {
    pub fn new(
        pipeline: &str,
        job: &str,
        schema: &str,
        target_schema: Option<&str>,
        table: &str,
        columns: &[&str],
    ) -> Target {
        use crate::db::quote_ident as q;
        let table = match target_schema {
            Some(s) => format!("{}.{}", q(s), q(table)),
            None => q(table),
        };
        let cols: Vec<String> = columns.iter().map(|c| q(c)).collect();
        let s = q(schema);
        Target {
            pipeline: pipeline.to_string(),
            job: job.to_string(),
            copy_sql: format!("COPY {table} ({}) FROM STDIN", cols.join(", ")),
            table,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            et_table: format!("{s}.{}", q(&errors::et_table_name(job))),
            uv_table: format!("{s}.{}", q(&errors::uv_table_name(job))),
            keys: Vec::new(),
            latency_buckets: crate::stats::DEFAULT_BUCKETS.to_vec(),
            probe: AtomicBool::new(false),
            robust_insert: format!(
                "INSERT INTO {s}.robust_log (job_name, batch_id, first_seq, last_seq, rows) VALUES ($1, $2, $3, $4, $5)
                 RETURNING (extract(epoch FROM committed_at) * 1000000)::int8"
            ),
            robust_delete: format!("DELETE FROM {s}.robust_log WHERE job_name = $1"),
            robust_check: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.robust_log WHERE job_name = $1 AND first_seq = $2)"
            ),
            dedup: None,
            routes: None,
        }
    }

    /// Reads the target's unique keys and creates the job's error tables; the last step of
    /// building a target, on the job's control connection.
    pub async fn setup(
        &mut self,
        conn: &mut PgConnection,
        mode: crate::config::LoadMode,
    ) -> Result<(), SinkError> {
        let cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        self.keys = keys::read_unique_keys(conn, &self.table, &cols)
            .await
            .map_err(|source| SinkError::Query {
                what: "reading the target's unique keys",
                source,
            })?;
        self.probe = AtomicBool::new(mode == crate::config::LoadMode::InsertIgnore);
        for t in [&self.et_table, &self.uv_table] {
            errors::create(conn, t)
                .await
                .map_err(|source| SinkError::Query {
                    what: "creating the error tables",
                    source,
                })?;
        }
        Ok(())
    }

    /// Turns on message_id bookkeeping (`durability = "broker"`).
    pub fn with_dedup(mut self, schema: &str) -> Target {
        let s = crate::db::quote_ident(schema);
        self.dedup = Some(Dedup {
            lookup: format!(
                "SELECT message_id FROM {s}.loaded_ids WHERE pipeline = $1 AND message_id = ANY($2)"
            ),
            record: format!(
                "INSERT INTO {s}.loaded_ids (pipeline, message_id, job_name) SELECT $1, unnest($2::text[]), $3"
            ),
        });
        self
    }
}

/// Everything writing for `job` into pipeline `p`'s target needs, read from the catalogue now:
/// the decoder, the SQL, and the job's error table (created if missing). Used by recovery and
/// replay, which load under a job name of their own.
pub async fn prepare(
    conn: &mut PgConnection,
    schema: &str,
    p: &crate::config::PipelineConfig,
    job: &str,
) -> Result<(crate::decode::Decoder, Target), SinkError> {
    prepare_for(conn, schema, p, job, None).await
}

/// [`prepare`] for `conveyor run-steps`: only the steps `rerun` names are written, and counted
/// for the job it names (the re-run itself loads under a job name of its own).
pub async fn prepare_for(
    conn: &mut PgConnection,
    schema: &str,
    p: &crate::config::PipelineConfig,
    job: &str,
    rerun: Option<(&str, &[i32])>,
) -> Result<(crate::decode::Decoder, Target), SinkError> {
    let decoder = decoder_for(conn, p).await?;
    let cols: Vec<&str> = decoder.copy_columns().collect();
    let mut target = Target::new(
        &p.name,
        job,
        schema,
        p.target_schema.as_deref(),
        &p.target_table,
        &cols,
    );
    target.setup(conn, p.mode).await?;
    if !p.routes.is_empty() {
        target.routes = Some(routed::Routes::prepare(conn, schema, p, job, rerun).await?);
    }
    Ok((decoder, target))
}

/// The pipeline's decoder: the target's columns read now, or for a routed pipeline the
/// envelope check only (each route maps its rows).
pub async fn decoder_for(
    conn: &mut PgConnection,
    p: &crate::config::PipelineConfig,
) -> Result<crate::decode::Decoder, SinkError> {
    if !p.routes.is_empty() {
        return Ok(crate::decode::Decoder::envelope(p));
    }
    let columns = catalog::read_columns(conn, p.target_schema.as_deref(), &p.target_table).await?;
    Ok(crate::decode::Decoder::new(&columns, p)?)
}

/// What a session reports back to the worker for each batch it took.
#[derive(Debug)]
pub enum Outcome {
    /// The batch's transaction committed (or had already committed before a lost connection).
    Committed(Committed),
    /// Shutdown came while the batch could not be committed: it stays unacked, for redelivery.
    Abandoned { batch_id: u64 },
}

#[derive(Debug)]
pub struct Committed {
    pub batch_id: u64,
    pub last_tag: u64,
    pub rows: usize,
    pub inserted: u64,
    pub rejected: BTreeMap<RejectKind, u64>,
    /// Redelivered messages whose message_id a committed batch had already recorded.
    pub duplicates: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub commit_seconds: f64,
    /// The loaded rows' latencies against the database clock at commit (`stats`); `None` when
    /// this attempt found the batch already committed.
    pub latency: Option<crate::stats::BatchLatency>,
}

impl Committed {
    /// Rows that went to `uv_<job>`.
    pub fn uv(&self) -> u64 {
        self.rejected
            .get(&RejectKind::DuplicateKey)
            .copied()
            .unwrap_or(0)
    }
}

/// Commits one batch: good rows, error rows and robust mark in one transaction. Rows the
/// database refuses move from `batch.good` to the error rows; the rest load.
pub async fn commit_batch(
    conn: &mut PgConnection,
    target: &Target,
    batch: &mut Batch,
    maybe_committed: bool,
) -> Result<Committed, SinkError> {
    let q = |what: &'static str| move |source| SinkError::Query { what, source };
    let mut excluded = vec![false; batch.good.len()];
    let mut db_bad: Vec<(usize, Reject)> = Vec::new();
    let mut bisect = false;
    let mut duplicates = 0u64;
    let mut route_state = routed::State::default();
    if !target.keys.is_empty() {
        keys::in_batch(batch, &target.keys, &mut excluded, &mut db_bad);
    }
    let mut probed = target.keys.is_empty();
    // Already in key order (a feed with rising ids): COPY the packed buffer as it is.
    let order = keys::insertion_order(batch, &target.keys)
        .filter(|o| o.iter().enumerate().any(|(k, &i)| k != i));
    loop {
        let mut tx = conn.begin().await.map_err(q("BEGIN"))?;
        if maybe_committed {
            let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(target.robust_check.as_str()))
                .bind(&target.job)
                .bind(batch.first_seq as i64)
                .fetch_one(&mut *tx)
                .await
                .map_err(q("checking the robust log"))?;
            if done {
                tx.rollback().await.map_err(q("ROLLBACK"))?;
                info!(job = %target.job, batch = batch.id, "batch had committed before the connection was lost; not loading it again");
                return Ok(summary(batch, &excluded, &db_bad, duplicates));
            }
        }
        if let Some(d) = &target.dedup {
            // First attempt: only redeliveries can have been loaded before. A retry also checks
            // the rest, since a concurrent batch may have loaded the same message meanwhile.
            let ids: Vec<&str> = batch
                .good
                .iter()
                .zip(&excluded)
                .filter(|(r, e)| !**e && (r.redelivered || maybe_committed))
                .filter_map(|(r, _)| r.message_id.as_deref())
                .chain(
                    batch
                        .bad
                        .iter()
                        .filter(|r| r.redelivered || maybe_committed)
                        .filter_map(|r| r.message_id.as_deref()),
                )
                .collect();
            if !ids.is_empty() {
                let found: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(d.lookup.as_str()))
                    .bind(&target.pipeline)
                    .bind(&ids)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q("looking up loaded message ids"))?;
                if !found.is_empty() {
                    let found: std::collections::HashSet<String> = found.into_iter().collect();
                    for (row, e) in batch.good.iter().zip(excluded.iter_mut()) {
                        if !*e && row.message_id.as_ref().is_some_and(|m| found.contains(m)) {
                            *e = true;
                            duplicates += 1;
                        }
                    }
                    let before = batch.bad.len();
                    batch
                        .bad
                        .retain(|r| !r.message_id.as_ref().is_some_and(|m| found.contains(m)));
                    duplicates += (before - batch.bad.len()) as u64;
                    info!(job = %target.job, batch = batch.id, duplicates, "redelivered messages were already loaded; not loading them again");
                }
            }
        }
        if !probed && target.probe.load(Ordering::Relaxed) {
            probed = true;
            match keys::probe(&mut tx, batch, &target.keys, &mut excluded, &mut db_bad).await {
                Ok(()) => {}
                Err(e) if is_retryable(&e) => return Err(q("checking unique keys")(e)),
                Err(e) => {
                    // Only a shortcut: without it the database still finds each duplicate.
                    warn!(job = %target.job, batch = batch.id, error = %e, "could not check the batch's unique keys before its COPY; the database will find duplicates instead");
                    tx.rollback().await.map_err(q("ROLLBACK"))?;
                    continue;
                }
            }
        }
        let rows = sending_order(order.as_deref(), &excluded);
        if let Some(routes) = &target.routes {
            let written = routes
                .write(
                    &mut tx,
                    batch,
                    &mut excluded,
                    &mut db_bad,
                    &mut route_state,
                    bisect,
                )
                .await;
            match written {
                Ok(()) => {}
                Err(routed::Fail::Retry) => {
                    tx.rollback().await.map_err(q("ROLLBACK"))?;
                    continue;
                }
                Err(routed::Fail::Isolate) => {
                    tx.rollback().await.map_err(q("ROLLBACK"))?;
                    bisect = true;
                    continue;
                }
                Err(routed::Fail::Sql(what, e)) => return Err(q(what)(e)),
            }
        } else if bisect {
            let all = rows.unwrap_or_else(|| (0..batch.good.len()).collect());
            bisect_rows(&mut tx, target, batch, all, &mut excluded, &mut db_bad).await?;
        } else if excluded.iter().any(|e| !e) {
            match copy_rows(&mut tx, target, batch, rows.as_deref()).await {
                Ok(()) => {}
                Err(e) if is_row_error(&e) => {
                    tx.rollback().await.map_err(q("ROLLBACK"))?;
                    if is_duplicate_key(&e) && !target.keys.is_empty() {
                        if !target.probe.swap(true, Ordering::Relaxed) {
                            info!(job = %target.job, batch = batch.id, "first duplicate key of the job: from now on each batch's keys are checked before its COPY");
                        }
                        // Most often the key was in another session's batch, committed by now:
                        // one probe finds all such rows instead of one retry each.
                        probed = false;
                    }
                    let named = copy_line(&e).and_then(|line| match &rows {
                        Some(r) => line.checked_sub(1).and_then(|l| r.get(l).copied()),
                        None => line.checked_sub(1),
                    });
                    match named {
                        Some(i) => {
                            excluded[i] = true;
                            db_bad.push((i, reject_from_db(&e)));
                        }
                        None => bisect = true,
                    }
                    continue;
                }
                Err(e) => return Err(q("COPY into the target")(e)),
            }
        }
        errors::insert_rejects(&mut tx, &target.et_table, &target.uv_table, batch, &db_bad)
            .await
            .map_err(q("inserting into the error table"))?;
        // The database's clock at the end of the batch: latency compares it, not conveyor's
        // clock, with the publisher's queue_time.
        let commit_us: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(target.robust_insert.as_str()))
            .bind(&target.job)
            .bind(batch.id as i64)
            .bind(batch.first_seq as i64)
            .bind(batch.last_seq as i64)
            .bind(batch.rows() as i32)
            .fetch_one(&mut *tx)
            .await
            .map_err(q("writing the robust mark"))?;
        if let Some(d) = &target.dedup {
            let ids: Vec<&str> = batch
                .good
                .iter()
                .zip(&excluded)
                .filter(|(_, e)| !**e)
                .filter_map(|(r, _)| r.message_id.as_deref())
                .chain(
                    db_bad
                        .iter()
                        .filter_map(|(i, _)| batch.good[*i].message_id.as_deref()),
                )
                .chain(batch.bad.iter().filter_map(|r| r.message_id.as_deref()))
                .collect();
            if !ids.is_empty() {
                sqlx::query(sqlx::AssertSqlSafe(d.record.as_str()))
                    .bind(&target.pipeline)
                    .bind(&ids)
                    .bind(&target.job)
                    .execute(&mut *tx)
                    .await
                    .map_err(q("recording loaded message ids"))?;
            }
        }
        tx.commit().await.map_err(q("COMMIT"))?;
        crate::faults::point(crate::faults::AFTER_COMMIT);
        crate::metrics::row_latencies(&target.pipeline, batch, &excluded);
        let mut done = summary(batch, &excluded, &db_bad, duplicates);
        done.latency = Some(crate::stats::BatchLatency::new(
            commit_us,
            &target.latency_buckets,
            batch
                .good
                .iter()
                .zip(&excluded)
                .filter(|(_, e)| !**e)
                .map(|(r, _)| r.queue_time_us),
        ));
        return Ok(done);
    }
}

fn summary(
    batch: &Batch,
    excluded: &[bool],
    db_bad: &[(usize, Reject)],
    duplicates: u64,
) -> Committed {
    let mut rejected = BTreeMap::new();
    for r in batch
        .bad
        .iter()
        .map(|b| &b.reject)
        .chain(db_bad.iter().map(|(_, r)| r))
    {
        *rejected.entry(r.kind).or_insert(0) += 1;
    }
    Committed {
        batch_id: batch.id,
        last_tag: batch.last_tag,
        rows: batch.rows(),
        inserted: excluded.iter().filter(|e| !**e).count() as u64,
        rejected,
        duplicates,
        first_seq: batch.first_seq,
        last_seq: batch.last_seq,
        commit_seconds: 0.0,
        latency: None,
    }
}

fn db_error(e: &sqlx::Error) -> Option<&PgDatabaseError> {
    match e {
        sqlx::Error::Database(d) => d.try_downcast_ref::<PgDatabaseError>(),
        _ => None,
    }
}

/// Errors caused by a row's content: data exceptions (22), integrity violations (23) and
/// program limits such as an index row too large (54000).
pub(crate) fn is_row_error(e: &sqlx::Error) -> bool {
    db_error(e).is_some_and(|d| {
        let c = d.code();
        c.starts_with("22") || c.starts_with("23") || c == "54000"
    })
}

fn is_duplicate_key(e: &sqlx::Error) -> bool {
    db_error(e).is_some_and(|d| d.code() == "23505")
}

pub(crate) fn reject_from_db(e: &sqlx::Error) -> Reject {
    let Some(d) = db_error(e) else {
        return Reject {
            kind: RejectKind::DbRefused,
            column: None,
            message: e.to_string(),
            sqlstate: None,
        };
    };
    let kind = if d.code() == "23505" {
        RejectKind::DuplicateKey
    } else {
        RejectKind::DbRefused
    };
    // A key violation names its columns only in the detail: `Key (id)=(42) already exists.`
    let column = d.column().map(str::to_string).or_else(|| {
        let detail = d.detail()?;
        let start = detail.find("Key (")? + 5;
        let end = start + detail[start..].find(")=")?;
        Some(detail[start..end].to_string())
    });
    let message = match d.detail() {
        Some(detail) => format!("{}: {detail}", d.message()),
        None => d.message().to_string(),
    };
    Reject {
        kind,
        column,
        message,
        sqlstate: Some(d.code().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_order_keeps_the_order_and_drops_excluded_rows() {
        let ex = [false, true, false, false];
        assert_eq!(sending_order(None, &[false; 3]), None);
        assert_eq!(sending_order(None, &ex), Some(vec![0, 2, 3]));
        assert_eq!(sending_order(Some(&[3, 1, 0, 2]), &ex), Some(vec![3, 0, 2]));
    }

    #[test]
    fn target_sql_quotes_every_identifier() {
        let t = Target::new(
            "p",
            "20260101_000000_p_01",
            "conv",
            Some("public"),
            "person",
            &["id", "age"],
        );
        assert_eq!(
            t.copy_sql,
            r#"COPY "public"."person" ("id", "age") FROM STDIN"#
        );
        assert_eq!(t.et_table, r#""conv"."et_20260101_000000_p_01""#);
    }
}
