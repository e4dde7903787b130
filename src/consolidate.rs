//! Post-job consolidation (DESIGN §4; seeds/001's move into et_hist, seeds/004's locked,
//! resumable procedure): moves the rows of every ended job's `et_<job>` / `uv_<job>` into
//! `conveyor.error_history` with the job name and kind, then drops the tables and writes an
//! ErrTableDrop event into the job's report.
//!
//! Why it is safe to run at any moment, from anywhere:
//! - One run at a time: a session-level advisory lock, plus a `postjob_runs` row saying who holds
//!   it. A second caller gets result 2 with the holder's name and age; `--override` terminates
//!   a holder older than `override_after` (a hung run) and takes over. A holder that died
//!   released the lock with its connection; the next run marks its row abandoned.
//! - No row lost or doubled: each step is one transaction that deletes at most `limit` rows from
//!   the job's table and inserts exactly those rows into history (`DELETE … RETURNING` feeding
//!   the `INSERT`), and counts them on the run's row. A kill -9 between steps loses nothing; a
//!   kill inside a step rolls it back. The next run resumes with whatever is left.
//! - Only ended jobs (status ≠ 0) are touched: a running job still writes its tables.

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::db::quote_ident;

#[derive(Debug, thiserror::Error)]
pub enum ConsolidateError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{what}: {source} (check that `conveyor migrate` ran and the database is reachable)")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("stopped between two steps by shutdown; the next run resumes")]
    Stopped,
}

fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> ConsolidateError {
    move |source| ConsolidateError::Query { what, source }
}

/// How a run is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Who asks: recorded on the run and shown to a caller that finds the lock taken.
    pub caller: String,
    /// Rows per transaction.
    pub limit: u32,
    /// Take over a lock held longer than `override_after`.
    pub take_over: bool,
    pub override_after: Duration,
    /// Only this job's tables.
    pub job: Option<String>,
    /// First mark failed and abandoned runs as reset (acknowledged).
    pub reset: bool,
    /// Stops the run between two steps (daemon shutdown); the next run resumes.
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

impl Options {
    pub fn from_config(config: &Config, caller: impl Into<String>) -> Options {
        Options {
            caller: caller.into(),
            limit: config.consolidate.limit,
            take_over: false,
            override_after: config.consolidate.override_after,
            job: None,
            reset: false,
            stop: None,
        }
    }
}

/// One table moved (or found empty) and dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDone {
    pub job: String,
    pub kind: &'static str,
    pub table: String,
    /// Rows of this table now in history (moved by this run or an earlier, interrupted one).
    pub rows: i64,
}

/// The seeds/004 result codes.
#[derive(Debug, Clone, PartialEq)]
pub enum RunResult {
    /// 0: every ended job's tables are consolidated.
    Ok,
    /// 1: the run failed (its error is on the run's row); the next run resumes.
    Failed(String),
    /// 2: another caller holds the lock.
    Locked {
        prev_caller: String,
        prev_age_s: f64,
    },
}

impl RunResult {
    pub fn code(&self) -> i16 {
        match self {
            RunResult::Ok => 0,
            RunResult::Failed(_) => 1,
            RunResult::Locked { .. } => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub run_id: i64,
    pub result: RunResult,
    pub tables: Vec<TableDone>,
    pub rows_moved: i64,
    pub transactions: i64,
    /// Failed or abandoned runs marked reset by `--reset`.
    pub reset_runs: u64,
    /// The caller whose lock this run took over (`--override`).
    pub overrode: Option<String>,
    pub seconds: f64,
}

/// Advisory lock key: one consolidation per conveyor schema.
fn lock_key(schema: &str) -> String {
    format!("conveyor.consolidate.{schema}")
}

/// Runs one consolidation. `Err` only when it could not even start (database unreachable,
/// schema missing); a failure after the start is result 1 on the run's row and in `Ok`.
pub async fn run(config: &Config, opts: &Options) -> Result<Outcome, ConsolidateError> {
    let started = Instant::now();
    let s = quote_ident(&config.schema);
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let key = lock_key(&config.schema);
    let mut out = Outcome {
        run_id: 0,
        result: RunResult::Ok,
        tables: Vec::new(),
        rows_moved: 0,
        transactions: 0,
        reset_runs: 0,
        overrode: None,
        seconds: 0.0,
    };
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .fetch_one(&mut conn)
        .await
        .map_err(query("taking the consolidation lock"))?;
    if !got {
        let holder = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT caller, extract(epoch FROM clock_timestamp() - started_at)::float8 AS age, backend_pid
             FROM {s}.postjob_runs WHERE result IS NULL ORDER BY run_id DESC LIMIT 1"
        )))
        .fetch_optional(&mut conn)
        .await
        .map_err(query("reading the lock holder"))?;
        let (prev_caller, prev_age_s, backend) = match &holder {
            Some(r) => (
                r.get::<String, _>("caller"),
                r.get::<f64, _>("age"),
                r.get::<Option<i32>, _>("backend_pid"),
            ),
            None => ("(unknown)".to_string(), 0.0, None),
        };
        let stale = prev_age_s >= opts.override_after.as_secs_f64();
        if opts.take_over && stale && backend.is_some() {
            warn!(caller = %opts.caller, prev_caller, prev_age_s, "taking over the consolidation lock (--override): terminating the holder's session");
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(backend)
                .execute(&mut conn)
                .await
                .map_err(query("terminating the lock holder"))?;
            // The lock is released when the terminated backend exits: wait for it, bounded.
            sqlx::raw_sql("SET lock_timeout = '30s'")
                .execute(&mut conn)
                .await
                .map_err(query("setting lock_timeout"))?;
            sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .execute(&mut conn)
                .await
                .map_err(query("taking over the consolidation lock"))?;
            sqlx::raw_sql("RESET lock_timeout")
                .execute(&mut conn)
                .await
                .map_err(query("resetting lock_timeout"))?;
            out.overrode = Some(prev_caller);
        } else {
            if opts.take_over {
                info!(caller = %opts.caller, prev_caller, prev_age_s, override_after_s = opts.override_after.as_secs_f64(), "the lock is younger than override_after; not taking it over");
            }
            let run_id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.postjob_runs (caller, host, pid, row_limit, result, prev_caller, prev_age_s, ended_at)
                 VALUES ($1, $2, $3, $4, 2, $5, $6, clock_timestamp()) RETURNING run_id"
            )))
            .bind(&opts.caller)
            .bind(crate::job::host())
            .bind(std::process::id() as i32)
            .bind(opts.limit as i32)
            .bind(&prev_caller)
            .bind(prev_age_s)
            .fetch_one(&mut conn)
            .await
            .map_err(query("recording the run"))?;
            info!(msg_id = 5030, run_id, caller = %opts.caller, result = 2, prev_caller, prev_age_s, "consolidation not run: another caller holds the lock");
            crate::metrics::consolidation_run(2);
            crate::monitor::consolidation_result(2);
            let _ = conn.close().await;
            out.run_id = run_id;
            out.result = RunResult::Locked {
                prev_caller,
                prev_age_s,
            };
            out.seconds = started.elapsed().as_secs_f64();
            return Ok(out);
        }
    }
    // We hold the lock: a run still marked running died (its lock went with its connection).
    let abandoned = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {s}.postjob_runs SET result = 1, ended_at = clock_timestamp(),
                error = coalesce(error, $1)
         WHERE result IS NULL"
    )))
    .bind(match &out.overrode {
        Some(_) => format!("taken over by {} (--override)", opts.caller),
        None => "abandoned: the run's process or connection died; resumed by a later run".into(),
    })
    .execute(&mut conn)
    .await
    .map_err(query("closing abandoned runs"))?
    .rows_affected();
    if abandoned > 0 {
        warn!(
            runs = abandoned,
            "earlier consolidation runs died mid-way; this run resumes their work"
        );
    }
    if opts.reset {
        out.reset_runs = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.postjob_runs SET reset_at = clock_timestamp() WHERE result = 1 AND reset_at IS NULL"
        )))
        .execute(&mut conn)
        .await
        .map_err(query("resetting failed runs"))?
        .rows_affected();
        info!(runs = out.reset_runs, caller = %opts.caller, "failed consolidation runs reset");
    }
    let run_id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {s}.postjob_runs (caller, host, pid, backend_pid, row_limit, overrode)
         VALUES ($1, $2, $3, pg_backend_pid(), $4, $5) RETURNING run_id"
    )))
    .bind(&opts.caller)
    .bind(crate::job::host())
    .bind(std::process::id() as i32)
    .bind(opts.limit as i32)
    .bind(&out.overrode)
    .fetch_one(&mut conn)
    .await
    .map_err(query("recording the run"))?;
    out.run_id = run_id;
    info!(msg_id = 5020, run_id, caller = %opts.caller, limit = opts.limit, job = opts.job.as_deref(), "consolidation started");

    let r = consolidate_all(&mut conn, config, opts, run_id, &mut out).await;
    let (result, err) = match &r {
        Ok(()) => (0i16, None),
        Err(e) => (1i16, Some(e.to_string())),
    };
    let closed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {s}.postjob_runs SET result = $2, error = $3, ended_at = clock_timestamp(), tables = $4
         WHERE run_id = $1"
    )))
    .bind(run_id)
    .bind(result)
    .bind(&err)
    .bind(out.tables.len() as i32)
    .execute(&mut conn)
    .await;
    if let Err(e) = closed {
        // The row stays "running"; the next run marks it abandoned.
        warn!(run_id, error = %e, "could not record the end of the consolidation run");
    }
    let history: Result<i64, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {s}.error_history"
    )))
    .fetch_one(&mut conn)
    .await;
    if let Ok(n) = history {
        crate::metrics::error_history_rows(n);
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    crate::metrics::consolidation_run(result);
    crate::monitor::consolidation_result(result);
    out.seconds = started.elapsed().as_secs_f64();
    match err {
        None => {
            info!(msg_id = 5030, run_id, caller = %opts.caller, result, tables = out.tables.len(), rows = out.rows_moved, transactions = out.transactions, seconds = out.seconds, "consolidation ended");
        }
        Some(e) => {
            error!(msg_id = 5030, run_id, caller = %opts.caller, result, tables = out.tables.len(), rows = out.rows_moved, transactions = out.transactions, error = %e, "consolidation failed; what it moved stays moved, the next run resumes (fix the cause; `conveyor consolidate --reset` acknowledges the failure)");
            out.result = RunResult::Failed(e);
        }
    }
    Ok(out)
}

/// The error tables of ended jobs (or of `job`), oldest job first.
async fn pending_tables(
    conn: &mut PgConnection,
    schema: &str,
    job: Option<&str>,
) -> Result<Vec<(String, &'static str, Option<String>)>, ConsolidateError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT c.relname::text AS table, substr(c.relname, 1, 2) AS kind, substr(c.relname, 4) AS job,
                j.pipeline, j.status
         FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN {}.jobs j ON j.job_name = substr(c.relname, 4)
         WHERE n.nspname = $1 AND c.relkind = 'r'
           AND (c.relname LIKE 'et\\_%' OR c.relname LIKE 'uv\\_%')
           AND ($2::text IS NULL OR substr(c.relname, 4) = $2)
         ORDER BY j.started_at NULLS FIRST, c.relname",
        quote_ident(schema)
    )))
    .bind(schema)
    .bind(job)
    .fetch_all(&mut *conn)
    .await
    .map_err(query("listing error tables"))?;
    let mut out = Vec::new();
    for r in rows {
        let status: Option<i16> = r.get("status");
        let job: String = r.get("job");
        if status == Some(0) {
            // Running (or crashed and not yet recovered: recovery closes it first).
            continue;
        }
        let kind = if r.get::<String, _>("kind") == "uv" {
            "uv"
        } else {
            "et"
        };
        out.push((job, kind, r.get("pipeline")));
    }
    Ok(out)
}

async fn consolidate_all(
    conn: &mut PgConnection,
    config: &Config,
    opts: &Options,
    run_id: i64,
    out: &mut Outcome,
) -> Result<(), ConsolidateError> {
    let schema = &config.schema;
    let s = quote_ident(schema);
    for (job, kind, pipeline) in pending_tables(conn, schema, opts.job.as_deref()).await? {
        let table = format!("{s}.{}", quote_ident(&format!("{kind}_{job}")));
        let step = format!(
            "WITH moved AS (
                DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} ORDER BY seq LIMIT $1))
                RETURNING *)
             , ins AS (
                INSERT INTO {s}.error_history (job_name, pipeline, kind, seq, code, sqlstate, message,
                    column_name, raw, queue_time, message_id, recorded_at)
                SELECT $2, $3, $4, seq, code, sqlstate, message, column_name, raw, queue_time,
                    message_id, recorded_at FROM moved
                RETURNING 1)
             SELECT count(*) FROM ins"
        );
        loop {
            if opts.stop.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(ConsolidateError::Stopped);
            }
            let mut tx = conn.begin().await.map_err(query("BEGIN"))?;
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(step.as_str()))
                .bind(opts.limit as i64)
                .bind(&job)
                .bind(&pipeline)
                .bind(kind)
                .fetch_one(&mut *tx)
                .await
                .map_err(query("moving error rows into error_history"))?;
            if n > 0 {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {s}.postjob_runs SET rows_moved = rows_moved + $2, transactions = transactions + 1 WHERE run_id = $1"
                )))
                .bind(run_id)
                .bind(n)
                .execute(&mut *tx)
                .await
                .map_err(query("counting the step"))?;
            }
            tx.commit().await.map_err(query("COMMIT"))?;
            if n > 0 {
                out.rows_moved += n;
                out.transactions += 1;
                crate::faults::point(crate::faults::MID_CONSOLIDATION);
            }
            if n < opts.limit as i64 {
                break;
            }
        }
        // Empty now, and nothing writes to an ended job's tables.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(&mut *conn)
            .await
            .map_err(query("dropping the consolidated error table"))?;
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {s}.error_history WHERE job_name = $1 AND kind = $2"
        )))
        .bind(&job)
        .bind(kind)
        .fetch_one(&mut *conn)
        .await
        .map_err(query("counting the job's history rows"))?;
        info!(job = %job, table = %table, rows, "error table consolidated and dropped");
        crate::report::Report::new(&config.report_dir, &job)
            .event("ErrTableDrop", &format!("Name={table}, Rows={rows}"))
            .await;
        out.tables.push(TableDone {
            job,
            kind,
            table,
            rows,
        });
    }
    Ok(())
}
