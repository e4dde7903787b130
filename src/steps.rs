//! Steps (seeds/000, ETL2_MONITOR): per job, one `conveyor.steps` row per route (a load step,
//! counted in each batch's transaction by `sink::routed`) and per post-job SQL step.
//!
//! When a job ends, its load steps take the job's status (1 success, 3 failure). A job whose load
//! succeeded gets its post steps as pending rows (status 0); the rotator's post-job task then
//! runs them in order, each in its own transaction with `$1` = the job's name, and the step's
//! row is flipped to 1 in that same transaction, so a step runs exactly once even with several
//! processes. A failing step is marked 3 with the database's message; the job's later steps wait
//! until `conveyor consolidate --steps` (or `conveyor run-steps`) runs it again successfully.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use tracing::{info, warn};

use crate::config::{Config, PipelineConfig};
use crate::db::quote_ident as q;

#[derive(Debug, thiserror::Error)]
pub enum StepsError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
}

fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> StepsError {
    move |source| StepsError::Query { what, source }
}

/// At the end of job `job` of pipeline `p` (on its control connection): the load steps take
/// the job's status, and the post steps of a successful job that read messages become pending
/// (a standby that never took the queue has nothing to finish).
pub async fn job_ended(
    c: &mut PgConnection,
    schema: &str,
    p: &PipelineConfig,
    job: &str,
    success: bool,
    read_any: bool,
) -> Result<(), sqlx::Error> {
    if p.routes.is_empty() && p.post_steps.is_empty() {
        return Ok(());
    }
    let s = q(schema);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {s}.steps SET status = $2, ended_at = now(), updated_at = now()
         WHERE job_name = $1 AND kind = 'load' AND status = 0"
    )))
    .bind(job)
    .bind(if success { 1i16 } else { 3 })
    .execute(&mut *c)
    .await?;
    if success && read_any {
        for step in &p.post_steps {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.steps (job_name, step, pipeline, kind, name) VALUES ($1, $2, $3, 'post', $4)
                 ON CONFLICT (job_name, step) DO NOTHING"
            )))
            .bind(job)
            .bind(step.step)
            .bind(&p.name)
            .bind(&step.name)
            .execute(&mut *c)
            .await?;
        }
    }
    Ok(())
}

/// What a run of post steps did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PostReport {
    /// (job, step, rows the statement touched)
    pub succeeded: Vec<(String, i32, u64)>,
    /// (job, step, the database's message)
    pub failed: Vec<(String, i32, String)>,
}

/// Runs the pending post steps of ended jobs (status 0), in step order per job; with `retry`
/// also the failed ones (status 3). A job whose step fails (or failed before, without `retry`)
/// runs none of its later steps. `only_job` restricts it to one job.
pub async fn run_post(
    config: &Config,
    retry: bool,
    only_job: Option<&str>,
) -> Result<PostReport, StepsError> {
    run_post_steps(config, retry, only_job, None).await
}

/// [`run_post`], limited to step `only_step` when given.
pub async fn run_post_steps(
    config: &Config,
    retry: bool,
    only_job: Option<&str>,
    only_step: Option<i32>,
) -> Result<PostReport, StepsError> {
    let mut report = PostReport::default();
    if config.pipelines.iter().all(|p| p.post_steps.is_empty()) && only_job.is_none() {
        return Ok(report);
    }
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let s = q(&config.schema);
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT job_name, step, pipeline, status FROM {s}.steps
         WHERE kind = 'post' AND status <> 1 AND ($1::text IS NULL OR job_name = $1)
           AND ($2::int4 IS NULL OR step = $2)
         ORDER BY job_name, step"
    )))
    .bind(only_job)
    .bind(only_step)
    .fetch_all(&mut conn)
    .await
    .map_err(query("reading pending post steps"))?;
    let mut blocked: Option<String> = None;
    for r in rows {
        let (job, step, pipeline, status): (String, i32, String, i16) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if blocked.as_deref() == Some(job.as_str()) {
            continue;
        }
        if status == 3 && !retry {
            // Failed before: the operator retries it (consolidate --steps); later steps wait.
            blocked = Some(job);
            continue;
        }
        let sql = config
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .and_then(|p| p.post_steps.iter().find(|x| x.step == step))
            .map(|x| x.sql.clone());
        let outcome = match &sql {
            Some(sql) => run_one(&mut conn, &s, &job, step, sql).await,
            None => Err(format!(
                "pipeline {pipeline} has no post step {step} in the config any more"
            )),
        };
        match outcome {
            Ok(Some(rows)) => {
                info!(job = %job, step, rows, "post-job step done");
                report.succeeded.push((job, step, rows));
            }
            // Another process holds it, or it is done: not ours.
            Ok(None) => blocked = Some(job),
            Err(message) => {
                warn!(job = %job, step, error = %message, "post-job step failed (status 3); the job's data stays, its later steps wait: fix the cause, then `conveyor consolidate --steps`");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {s}.steps SET status = 3, attempts = attempts + 1, error = $3, ended_at = now(), updated_at = now()
                     WHERE job_name = $1 AND step = $2"
                )))
                .bind(&job)
                .bind(step)
                .bind(&message)
                .execute(&mut conn)
                .await
                .map_err(query("marking a post step failed"))?;
                report.failed.push((job.clone(), step, message));
                blocked = Some(job);
            }
        }
    }
    let _ = conn.close().await;
    Ok(report)
}

/// One post step in its own transaction, flipped to 1 in the same one. `Ok(None)`: another
/// process holds the step or it is done already.
async fn run_one(
    conn: &mut PgConnection,
    s: &str,
    job: &str,
    step: i32,
    sql: &str,
) -> Result<Option<u64>, String> {
    let r = async {
        let mut tx = conn.begin().await?;
        let mine: Option<i16> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT status FROM {s}.steps WHERE job_name = $1 AND step = $2 FOR UPDATE SKIP LOCKED"
        )))
        .bind(job)
        .bind(step)
        .fetch_optional(&mut *tx)
        .await?;
        if !matches!(mine, Some(0) | Some(3)) {
            tx.rollback().await?;
            return Ok(None);
        }
        let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .bind(job)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.steps SET status = 1, attempts = attempts + 1, error = NULL, inserted = $3,
                ended_at = now(), updated_at = now() WHERE job_name = $1 AND step = $2"
        )))
        .bind(job)
        .bind(step)
        .bind(done.rows_affected() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(Some(done.rows_affected()))
    }
    .await;
    r.map_err(|e| e.to_string())
}

/// One `steps` row, as `conveyor status` and `run-steps` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRow {
    pub job_name: String,
    pub step: i32,
    pub kind: String,
    pub name: String,
    pub status: i16,
    pub inserted: i64,
    pub updated: i64,
    pub ignored: i64,
    pub errors: i64,
    pub attempts: i32,
    pub error: Option<String>,
}

/// The steps of `job`, in order.
pub async fn of_job(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
) -> Result<Vec<StepRow>, sqlx::Error> {
    of_jobs(conn, schema, &[job.to_string()]).await
}

/// The steps of `jobs`, by job (newest name first) and step.
pub async fn of_jobs(
    conn: &mut PgConnection,
    schema: &str,
    jobs: &[String],
) -> Result<Vec<StepRow>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT job_name, step, kind, name, status, inserted, updated, ignored, errors, attempts, error
         FROM {}.steps WHERE job_name = ANY($1) ORDER BY job_name DESC, step",
        q(schema)
    )))
    .bind(jobs)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StepRow {
            job_name: r.get(0),
            step: r.get(1),
            kind: r.get(2),
            name: r.get(3),
            status: r.get(4),
            inserted: r.get(5),
            updated: r.get(6),
            ignored: r.get(7),
            errors: r.get(8),
            attempts: r.get(9),
            error: r.get(10),
        })
        .collect())
}
