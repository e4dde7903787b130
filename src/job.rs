//! Jobs: naming (DESIGN §1) and the `jobs` table row each job owns — inserted at start with
//! status 0, counts refreshed while it runs, closed with status 1 or 3 and an end reason.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;

use crate::db::quote_ident;

/// Why a job ended (a closed set: stored in `jobs.end_reason` and used as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Schedule,
    Idle,
    Rows,
    Priority,
    Manual,
    Shutdown,
    Error,
    /// The process died; the next start closed the job (and loaded what its spool still held).
    Crash,
}

impl EndReason {
    pub fn parse(s: &str) -> Option<EndReason> {
        [
            EndReason::Schedule,
            EndReason::Idle,
            EndReason::Rows,
            EndReason::Priority,
            EndReason::Manual,
            EndReason::Shutdown,
            EndReason::Error,
            EndReason::Crash,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Schedule => "schedule",
            EndReason::Idle => "idle",
            EndReason::Rows => "rows",
            EndReason::Priority => "priority",
            EndReason::Manual => "manual",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
            EndReason::Crash => "crash",
        }
    }
}

/// Job status values (seeds/000 STAT).
pub const STATUS_RUNNING: i16 = 0;
pub const STATUS_SUCCESS: i16 = 1;
pub const STATUS_FAILURE: i16 = 3;

/// `YYYYMMDD_HHMMSS_<pipeline>_<slot>` from the job's UTC start time.
pub fn job_name(start: DateTime<Utc>, pipeline: &str, slot: &str) -> String {
    format!("{}_{pipeline}_{slot}", start.format("%Y%m%d_%H%M%S"))
}

/// This machine's name, as recorded on jobs and runs.
pub fn host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Counters a worker keeps for its job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub inserted: u64,
    pub rejected: u64,
    pub batches: u64,
    /// Deliveries that were not rows: end-of-job markers for other (already ended) jobs.
    pub skipped: u64,
    /// Redeliveries of messages already owned (spool) or loaded (message_id), not loaded again.
    pub duplicates: u64,
    /// Of `rejected`, the rows that went to `uv_<job>` (duplicates of a unique key).
    pub uv: u64,
}

/// The counters' columns, bound by [`bind_counts`] as $2..$8 after the job name ($1).
const COUNTS_SET: &str = "rows_read = $2, rows_inserted = $3, rows_rejected = $4, batches = $5, rows_skipped = $6, rows_duplicate = $7, rows_uv = $8";

fn bind_counts<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    job: &'q str,
    c: &Counts,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(job)
        .bind(c.read as i64)
        .bind(c.inserted as i64)
        .bind(c.rejected as i64)
        .bind(c.batches as i64)
        .bind(c.skipped as i64)
        .bind(c.duplicates as i64)
        .bind(c.uv as i64)
}

/// What recovering a crashed job's spool did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records loaded now (not covered by a robust mark).
    pub loaded: u64,
    pub inserted: u64,
    pub rejected: u64,
    /// Of `rejected`, the duplicates of a unique key.
    pub uv: u64,
    /// Records skipped because a robust mark covers them (committed before the crash).
    pub covered: u64,
    pub damaged_bytes: u64,
}

/// How a job ended, as recorded in its row.
#[derive(Debug, Clone, Copy)]
pub struct JobEnd<'a> {
    pub status: i16,
    pub reason: EndReason,
    pub error: Option<&'a str>,
    /// Wall-clock time of the job's last delivery, µs since the epoch.
    pub last_delivery_us: Option<i64>,
}

/// Handle on the `jobs` table in `schema`.
#[derive(Debug, Clone)]
pub struct Jobs {
    table: String,
    /// The monitor table (`status`), one row per running job.
    status: String,
}

impl Jobs {
    pub fn new(schema: &str) -> Self {
        Jobs {
            table: format!("{}.jobs", quote_ident(schema)),
            status: format!("{}.status", quote_ident(schema)),
        }
    }

    /// Inserts the job's monitor row (`status`; its trigger logs `i`).
    pub async fn status_start(
        &self,
        conn: &mut PgConnection,
        job: &str,
        pipeline: &str,
        slot: &str,
        phase: &str,
        restarts: i32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (job_name, pipeline, slot, host, pid, phase, restarts)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (job_name) DO UPDATE SET phase = EXCLUDED.phase, pid = EXCLUDED.pid,
                 host = EXCLUDED.host, restarts = EXCLUDED.restarts, updated_at = clock_timestamp()",
            self.status
        )))
        .bind(job)
        .bind(pipeline)
        .bind(slot)
        .bind(host())
        .bind(std::process::id() as i32)
        .bind(phase)
        .bind(restarts)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Refreshes the monitor row with the job's counters and phase (its trigger logs `u`).
    pub async fn status_update(
        &self,
        conn: &mut PgConnection,
        job: &str,
        phase: &str,
        c: &Counts,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET phase = $2, rows_read = $3, rows_sent = $4, rows_inserted = $5,
                    rows_rejected = $6, rows_skipped = $7, updated_at = clock_timestamp()
             WHERE job_name = $1",
            self.status
        )))
        .bind(job)
        .bind(phase)
        .bind(c.read as i64)
        .bind((c.inserted + c.rejected) as i64)
        .bind(c.inserted as i64)
        .bind(c.rejected as i64)
        .bind(c.skipped as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Deletes the monitor row of ended jobs (its trigger logs `d`).
    pub async fn status_end(
        &self,
        conn: &mut PgConnection,
        jobs: &[String],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {} WHERE job_name = ANY($1)",
            self.status
        )))
        .bind(jobs)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Inserts the job's row and returns its name. Two jobs of one slot cannot start in the
    /// same second (the name would repeat), so on a clash it waits for the next second.
    pub async fn start(
        &self,
        conn: &mut PgConnection,
        pipeline: &str,
        slot: &str,
        params: &serde_json::Value,
    ) -> Result<String, sqlx::Error> {
        let host = host();
        loop {
            let name = job_name(Utc::now(), pipeline, slot);
            let r = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (job_name, pipeline, slot, host, pid, params, phase)
                 VALUES ($1, $2, $3, $4, $5, $6, 'acquisition') ON CONFLICT (job_name) DO NOTHING",
                self.table
            )))
            .bind(&name)
            .bind(pipeline)
            .bind(slot)
            .bind(&host)
            .bind(std::process::id() as i32)
            .bind(sqlx::types::Json(params))
            .execute(&mut *conn)
            .await?;
            if r.rows_affected() == 1 {
                return Ok(name);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Marks jobs of this pipeline and slot on this host that are still "running" but whose
    /// process is gone as failed: it died without closing them (kill -9, power loss). Jobs of
    /// live processes (another `conveyor run` on this host) are left alone. Returns how many.
    pub async fn close_stale(
        &self,
        conn: &mut PgConnection,
        pipeline: &str,
        slot: &str,
    ) -> Result<u64, sqlx::Error> {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let running: Vec<(String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT job_name, pid FROM {} WHERE pipeline = $1 AND slot = $2 AND host = $3 AND status = {STATUS_RUNNING}",
            self.table
        )))
        .bind(pipeline)
        .bind(slot)
        .bind(&host)
        .fetch_all(&mut *conn)
        .await?;
        let me = std::process::id() as i32;
        let dead: Vec<String> = running
            .into_iter()
            .filter(|(_, pid)| {
                *pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
            .map(|(job, _)| job)
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET status = {STATUS_FAILURE}, end_reason = 'crash', ended_at = clock_timestamp(),
                    phase = 'ended', error = 'the process ended without closing the job (crash or kill)'
             WHERE job_name = ANY($1) AND status = {STATUS_RUNNING}",
            self.table
        )))
        .bind(&dead)
        .execute(&mut *conn)
        .await?;
        self.status_end(conn, &dead).await?;
        Ok(r.rows_affected())
    }

    /// Records that the job now owns the queue (its first delivery), with the handoff gap if
    /// `handoff` names the job that owned the queue just before. Another process may have held
    /// the queue in between, so the gap is kept only if `handoff.previous` is the pipeline's most
    /// recently activated other job. Returns the gap stored.
    pub async fn activated(
        &self,
        conn: &mut PgConnection,
        job: &str,
        pipeline: &str,
        handoff: Option<(&str, f64)>,
    ) -> Result<Option<f64>, sqlx::Error> {
        let (previous, gap_ms) = handoff.unzip();
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE {t} SET phase = 'active', activated_at = clock_timestamp(),
                    handoff_gap_ms = CASE WHEN $3::text = (
                        SELECT job_name FROM {t} WHERE pipeline = $2 AND job_name <> $1
                          AND activated_at IS NOT NULL ORDER BY activated_at DESC LIMIT 1)
                        THEN $4::float8 END
             WHERE job_name = $1 RETURNING handoff_gap_ms",
            t = self.table
        )))
        .bind(job)
        .bind(pipeline)
        .bind(previous)
        .bind(gap_ms)
        .fetch_one(conn)
        .await
    }

    /// Takes over a job whose process died, to load what its spool still holds: the row is
    /// (re)opened with `restarts + 1` under this process (inserted if it is missing, e.g. the
    /// database was restored from a backup).
    pub async fn recovering(
        &self,
        conn: &mut PgConnection,
        job: &str,
        pipeline: &str,
        slot: &str,
    ) -> Result<i32, sqlx::Error> {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {t} AS j (job_name, pipeline, slot, host, pid, phase, restarts)
             VALUES ($1, $2, $3, $4, $5, 'recovery', 1)
             ON CONFLICT (job_name) DO UPDATE SET restarts = j.restarts + 1, pid = EXCLUDED.pid,
                    host = EXCLUDED.host, status = {STATUS_RUNNING}, phase = 'recovery',
                    ended_at = NULL, end_reason = NULL
             RETURNING restarts",
            t = self.table
        )))
        .bind(job)
        .bind(pipeline)
        .bind(slot)
        .bind(&host)
        .bind(std::process::id() as i32)
        .fetch_one(conn)
        .await
    }

    /// Closes a recovered job: status 1 (everything it read is loaded now), end reason `crash`.
    pub async fn end_recovered(
        &self,
        conn: &mut PgConnection,
        job: &str,
        r: &Recovered,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET status = {STATUS_SUCCESS}, end_reason = 'crash', ended_at = clock_timestamp(),
                    phase = 'ended', rows_recovered = rows_recovered + $2,
                    rows_inserted = rows_inserted + $3, rows_rejected = rows_rejected + $4,
                    rows_skipped = rows_skipped + $5, rows_uv = rows_uv + $7,
                    error = $6
             WHERE job_name = $1",
            self.table
        )))
        .bind(job)
        .bind(r.loaded as i64)
        .bind(r.inserted as i64)
        .bind(r.rejected as i64)
        .bind(r.covered as i64)
        .bind(format!(
            "the process died; pid {} recovered {} spooled rows ({} already committed, {} damaged bytes skipped)",
            std::process::id(),
            r.loaded,
            r.covered,
            r.damaged_bytes
        ))
        .bind(r.uv as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    pub async fn update(
        &self,
        conn: &mut PgConnection,
        job: &str,
        c: &Counts,
    ) -> Result<(), sqlx::Error> {
        let sql = format!("UPDATE {} SET {COUNTS_SET} WHERE job_name = $1", self.table);
        bind_counts(sqlx::query(sqlx::AssertSqlSafe(sql)), job, c)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub async fn end(
        &self,
        conn: &mut PgConnection,
        job: &str,
        c: &Counts,
        end: &JobEnd<'_>,
    ) -> Result<(), sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET {COUNTS_SET},
                    status = $9, end_reason = $10, error = $11, ended_at = clock_timestamp(), phase = 'ended',
                    last_delivery_at = to_timestamp($12::float8 / 1e6)
             WHERE job_name = $1",
            self.table
        );
        bind_counts(sqlx::query(sqlx::AssertSqlSafe(sql)), job, c)
            .bind(end.status)
            .bind(end.reason.as_str())
            .bind(end.error)
            .bind(end.last_delivery_us)
            .execute(conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn name_follows_design() {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 23, 3, 55, 48)
            .single()
            .expect("valid");
        assert_eq!(job_name(t, "orders", "02"), "20261123_035548_orders_02");
    }
}
