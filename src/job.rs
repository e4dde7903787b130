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
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Schedule => "schedule",
            EndReason::Idle => "idle",
            EndReason::Rows => "rows",
            EndReason::Priority => "priority",
            EndReason::Manual => "manual",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
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

/// Counters a worker keeps for its job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub inserted: u64,
    pub rejected: u64,
    pub batches: u64,
}

/// Handle on the `jobs` table in `schema`.
#[derive(Debug, Clone)]
pub struct Jobs {
    table: String,
}

impl Jobs {
    pub fn new(schema: &str) -> Self {
        Jobs {
            table: format!("{}.jobs", quote_ident(schema)),
        }
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
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
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

    /// Marks jobs of this pipeline and slot on this host that are still "running" as failed:
    /// their process died without closing them (kill -9, power loss). Returns how many.
    pub async fn close_stale(
        &self,
        conn: &mut PgConnection,
        pipeline: &str,
        slot: &str,
    ) -> Result<u64, sqlx::Error> {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET status = {STATUS_FAILURE}, end_reason = 'error', ended_at = clock_timestamp(),
                    phase = 'ended', error = 'the process ended without closing the job (crash or kill)'
             WHERE pipeline = $1 AND slot = $2 AND host = $3 AND status = {STATUS_RUNNING}",
            self.table
        )))
        .bind(pipeline)
        .bind(slot)
        .bind(&host)
        .execute(conn)
        .await?;
        Ok(r.rows_affected())
    }

    pub async fn update(
        &self,
        conn: &mut PgConnection,
        job: &str,
        c: &Counts,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET rows_read = $2, rows_inserted = $3, rows_rejected = $4, batches = $5
             WHERE job_name = $1",
            self.table
        )))
        .bind(job)
        .bind(c.read as i64)
        .bind(c.inserted as i64)
        .bind(c.rejected as i64)
        .bind(c.batches as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    pub async fn end(
        &self,
        conn: &mut PgConnection,
        job: &str,
        c: &Counts,
        status: i16,
        reason: EndReason,
        error: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET rows_read = $2, rows_inserted = $3, rows_rejected = $4, batches = $5,
                    status = $6, end_reason = $7, error = $8, ended_at = clock_timestamp(), phase = 'ended'
             WHERE job_name = $1",
            self.table
        )))
        .bind(job)
        .bind(c.read as i64)
        .bind(c.inserted as i64)
        .bind(c.rejected as i64)
        .bind(c.batches as i64)
        .bind(status)
        .bind(reason.as_str())
        .bind(error)
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
