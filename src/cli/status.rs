//! `conveyor status`: what each pipeline is doing now — its workers (the `status` rows of its
//! running jobs: slot, phase, host, pid, how long ago the row was refreshed), the running jobs'
//! counts and rates, and its last ended jobs from `jobs` — as aligned tables or JSON, once or
//! every `--watch` seconds.
//!
//! Each refresh reads in one `REPEATABLE READ` snapshot, and every age and duration is measured
//! on the database's clock (the clock that stamped the rows), so a client whose clock is off
//! still sees true ages. A job's rate is the `rows_inserted` difference between its last two
//! `u` rows in `status_log` over the time between them: the rate of the last status interval,
//! not an average since the job started (that is the fallback until two rows exist).
//!
//! Also home of what `stats` shares: the aligned [`Table`], the `--watch` value parser and the
//! [`Interrupt`] that ends a watch on Ctrl-C.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::table::{cut, duration, short_time, thousands, time, Align, Table};
use super::watch::{clear_screen, connection, parse_watch, watch_header, Watch};

use crate::config::{Config, PipelineConfig};
use crate::db::quote_ident;

/// Characters of a failed job's error shown in the table (JSON carries all of it).
const TABLE_ERROR_CHARS: usize = 60;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this pipeline (a [[pipeline]] name in the config; default: every pipeline).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Ended jobs shown per pipeline, newest first (0: none).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub last: u32,
    /// Print one JSON object instead of tables:
    /// {"schema", "taken_at", "pipelines": {NAME: {"queue", "target", "workers", "running_jobs",
    /// "last_jobs"}}}. Times are RFC 3339 UTC, durations seconds. With --watch: one object per
    /// refresh, one per line (JSON lines).
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds (e.g. 2, 0.5) until Ctrl-C. The tables are redrawn in place
    /// (the screen is cleared when stdout is a terminal).
    #[arg(long, value_name = "SECS", value_parser = parse_watch)]
    pub watch: Option<Duration>,
}

pub async fn run(config_path: &Path, args: StatusArgs) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let pipelines: Vec<&PipelineConfig> = match &args.pipeline {
        Some(name) => vec![super::pick_pipeline(&config, Some(name))?],
        None => config.pipelines.iter().collect(),
    };
    let mut watch = Watch::new(args.watch)?;
    let mut conn: Option<PgConnection> = None;
    loop {
        let snap = snapshot(&mut conn, &config, config_path, &pipelines, args.last).await;
        let out = match snap {
            Ok(snap) if args.json && args.watch.is_some() => {
                format!("{}\n", serde_json::to_string(&snap)?)
            }
            Ok(snap) if args.json => format!("{}\n", serde_json::to_string_pretty(&snap)?),
            Ok(snap) => {
                let mut text = String::new();
                if let Some(every) = args.watch {
                    text.push_str(clear_screen());
                    text.push_str(&watch_header("status", &snap.taken_at, every));
                }
                render(&snap, &config, &mut text);
                text
            }
            Err(e) => {
                let e = watch.failed(e)?;
                conn = None;
                if args.json {
                    eprintln!("error: {e} (retrying every {:?})", watch.every());
                    String::new()
                } else {
                    format!(
                        "{}refresh failed at {}: {e}\nretrying every {:?}; Ctrl-C to stop\n",
                        clear_screen(),
                        Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
                        watch.every()
                    )
                }
            }
        };
        if !watch.shown(&out).await? {
            break;
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
    Ok(())
}

/// Everything one refresh shows.
#[derive(Debug, serde::Serialize)]
struct Snapshot {
    schema: String,
    /// The database's clock at the read.
    taken_at: String,
    pipelines: Pipelines,
}

/// Serialised as an object keyed by pipeline name, in the config's order.
#[derive(Debug)]
struct Pipelines(Vec<PipelineStatus>);

impl serde::Serialize for Pipelines {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for p in &self.0 {
            m.serialize_entry(&p.name, p)?;
        }
        m.end()
    }
}

#[derive(Debug, serde::Serialize)]
struct PipelineStatus {
    #[serde(skip)]
    name: String,
    queue: String,
    target: String,
    workers: Vec<Worker>,
    running_jobs: Vec<RunningJob>,
    last_jobs: Vec<EndedJob>,
    /// Routed pipelines and post-job steps: the steps of the jobs above (`conveyor.steps`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps: Vec<crate::steps::StepRow>,
}

/// One `status` row seen as the worker (slot) that owns it.
#[derive(Debug, serde::Serialize)]
struct Worker {
    slot: String,
    /// `acquisition` (initialising), `standby` (registered, waiting for the queue), `active`.
    phase: String,
    job_name: String,
    host: String,
    pid: i32,
    updated_at: String,
    /// Seconds since the row was last refreshed.
    age_s: f64,
    /// No refresh for more than two status intervals (+10 s): the process is probably gone (its
    /// row stays until the slot's next start closes the job).
    stale: bool,
}

/// One `status` row seen as the job's progress.
#[derive(Debug, serde::Serialize)]
struct RunningJob {
    job_name: String,
    slot: String,
    phase: String,
    rows_read: i64,
    rows_sent: i64,
    rows_inserted: i64,
    rows_rejected: i64,
    rows_skipped: i64,
    restarts: i32,
    started_at: String,
    elapsed_s: f64,
    /// Rows inserted per second.
    rate_per_s: f64,
    /// `status_log`: over the job's last two status refreshes; `since_start`: average since
    /// started_at (fewer than two refreshes yet).
    rate_basis: &'static str,
}

/// One row of `jobs` with status 1 (success) or 3 (failure).
#[derive(Debug, serde::Serialize)]
struct EndedJob {
    job_name: String,
    slot: String,
    status: i16,
    end_reason: Option<String>,
    rows_read: i64,
    rows_inserted: i64,
    rows_rejected: i64,
    rows_uv: i64,
    handoff_gap_ms: Option<f64>,
    started_at: String,
    ended_at: Option<String>,
    duration_s: Option<f64>,
    error: Option<String>,
}

/// Reads one snapshot, connecting first when `conn` is `None`; a failed read drops the
/// connection so the next refresh starts on a new one.
async fn snapshot(
    conn: &mut Option<PgConnection>,
    config: &Config,
    config_path: &Path,
    pipelines: &[&PipelineConfig],
    last: u32,
) -> anyhow::Result<Snapshot> {
    let c = connection(conn, config, config_path, &["jobs", "status", "status_log"]).await?;
    match read(c, config, pipelines, last).await {
        Ok(s) => Ok(s),
        Err(e) => {
            *conn = None;
            Err(anyhow::anyhow!(
                "reading the status from schema {:?} failed: {e} (check that the database is reachable and that the user may read the schema)",
                config.schema
            ))
        }
    }
}

async fn read(
    conn: &mut PgConnection,
    config: &Config,
    pipelines: &[&PipelineConfig],
    last: u32,
) -> Result<Snapshot, sqlx::Error> {
    let s = quote_ident(&config.schema);
    // A refresh never missing for two intervals is alive; 10 s covers a slow database.
    let stale_after = (config.status_interval * 2 + Duration::from_secs(10)).as_secs_f64();
    let mut tx = conn.begin().await?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let taken_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let mut out = Vec::new();
    for p in pipelines {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT s.job_name, s.slot, s.phase, s.host, s.pid, s.rows_read, s.rows_sent,
                    s.rows_inserted, s.rows_rejected, s.rows_skipped, s.restarts, s.started_at,
                    s.updated_at,
                    extract(epoch FROM now() - s.updated_at)::float8 AS age_s,
                    extract(epoch FROM now() - s.started_at)::float8 AS elapsed_s,
                    (a.rows_inserted - b.rows_inserted)::float8 AS d_rows,
                    extract(epoch FROM a.logged_at - b.logged_at)::float8 AS d_s
             FROM {s}.status s
             LEFT JOIN LATERAL (SELECT rows_inserted, logged_at FROM {s}.status_log l
                                WHERE l.job_name = s.job_name AND l.ind = 'u'
                                ORDER BY l.log_id DESC LIMIT 1) a ON true
             LEFT JOIN LATERAL (SELECT rows_inserted, logged_at FROM {s}.status_log l
                                WHERE l.job_name = s.job_name AND l.ind = 'u'
                                ORDER BY l.log_id DESC OFFSET 1 LIMIT 1) b ON true
             WHERE s.pipeline = $1
             ORDER BY s.slot, s.started_at"
        )))
        .bind(&p.name)
        .fetch_all(&mut *tx)
        .await?;
        let mut workers = Vec::new();
        let mut running = Vec::new();
        for r in rows {
            let job_name: String = r.try_get("job_name")?;
            let slot: String = r.try_get("slot")?;
            let phase: String = r.try_get("phase")?;
            let age_s: f64 = r.try_get("age_s")?;
            let elapsed_s: f64 = r.try_get("elapsed_s")?;
            let inserted: i64 = r.try_get("rows_inserted")?;
            let d_rows: Option<f64> = r.try_get("d_rows")?;
            let d_s: Option<f64> = r.try_get("d_s")?;
            let (rate_per_s, rate_basis) = rate(inserted, elapsed_s, d_rows, d_s);
            workers.push(Worker {
                slot: slot.clone(),
                phase: phase.clone(),
                job_name: job_name.clone(),
                host: r.try_get("host")?,
                pid: r.try_get("pid")?,
                updated_at: time(&r.try_get("updated_at")?),
                age_s,
                stale: age_s > stale_after,
            });
            running.push(RunningJob {
                job_name,
                slot,
                phase,
                rows_read: r.try_get("rows_read")?,
                rows_sent: r.try_get("rows_sent")?,
                rows_inserted: inserted,
                rows_rejected: r.try_get("rows_rejected")?,
                rows_skipped: r.try_get("rows_skipped")?,
                restarts: r.try_get("restarts")?,
                started_at: time(&r.try_get("started_at")?),
                elapsed_s,
                rate_per_s,
                rate_basis,
            });
        }
        running.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT job_name, slot, status, end_reason, rows_read, rows_inserted, rows_rejected,
                    rows_uv, handoff_gap_ms, started_at, ended_at,
                    extract(epoch FROM ended_at - started_at)::float8 AS duration_s, error
             FROM {s}.jobs
             WHERE pipeline = $1 AND status <> 0
             ORDER BY ended_at DESC NULLS LAST, job_name DESC
             LIMIT $2"
        )))
        .bind(&p.name)
        .bind(i64::from(last))
        .fetch_all(&mut *tx)
        .await?;
        let mut last_jobs = Vec::new();
        for r in rows {
            last_jobs.push(EndedJob {
                job_name: r.try_get("job_name")?,
                slot: r.try_get("slot")?,
                status: r.try_get("status")?,
                end_reason: r.try_get("end_reason")?,
                rows_read: r.try_get("rows_read")?,
                rows_inserted: r.try_get("rows_inserted")?,
                rows_rejected: r.try_get("rows_rejected")?,
                rows_uv: r.try_get("rows_uv")?,
                handoff_gap_ms: r.try_get("handoff_gap_ms")?,
                started_at: time(&r.try_get("started_at")?),
                ended_at: r
                    .try_get::<Option<DateTime<Utc>>, _>("ended_at")?
                    .as_ref()
                    .map(time),
                duration_s: r.try_get("duration_s")?,
                error: r.try_get("error")?,
            });
        }
        let steps = if p.routes.is_empty() && p.post_steps.is_empty() {
            Vec::new()
        } else {
            let jobs: Vec<String> = running
                .iter()
                .map(|j| j.job_name.clone())
                .chain(last_jobs.iter().map(|j| j.job_name.clone()))
                .collect();
            crate::steps::of_jobs(&mut tx, &config.schema, &jobs).await?
        };
        out.push(PipelineStatus {
            steps,
            name: p.name.clone(),
            queue: p.queue.clone(),
            target: match &p.target_schema {
                Some(ts) => format!("{ts}.{}", p.target_table),
                None => p.target_table.clone(),
            },
            workers,
            running_jobs: running,
            last_jobs,
        });
    }
    tx.commit().await?;
    Ok(Snapshot {
        schema: config.schema.clone(),
        taken_at: time(&taken_at),
        pipelines: Pipelines(out),
    })
}

/// (rows inserted per second, basis): over the last two status refreshes when there are two
/// that are apart in time, else the average since the job started.
fn rate(
    inserted: i64,
    elapsed_s: f64,
    d_rows: Option<f64>,
    d_s: Option<f64>,
) -> (f64, &'static str) {
    match (d_rows, d_s) {
        (Some(rows), Some(s)) if s > 0.0 => ((rows / s).max(0.0), "status_log"),
        _ if elapsed_s > 0.0 => (inserted as f64 / elapsed_s, "since_start"),
        _ => (0.0, "since_start"),
    }
}

/// The tables of one snapshot.
fn render(snap: &Snapshot, config: &Config, out: &mut String) {
    for (i, p) in snap.pipelines.0.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "pipeline {}: queue {} → {} (schema {}, times UTC)",
            p.name, p.queue, p.target, snap.schema
        );
        if p.workers.is_empty() {
            let _ = writeln!(
                out,
                "  no worker: no running job has a status row (is `conveyor --config {} run` up?)",
                config.path.display()
            );
        } else {
            let mut t = Table::new(&[
                ("SLOT", Align::Left),
                ("PHASE", Align::Left),
                ("JOB", Align::Left),
                ("HOST", Align::Left),
                ("PID", Align::Right),
                ("UPDATED", Align::Left),
            ]);
            for w in &p.workers {
                t.row(vec![
                    w.slot.clone(),
                    w.phase.clone(),
                    w.job_name.clone(),
                    w.host.clone(),
                    w.pid.to_string(),
                    format!(
                        "{} ago{}",
                        duration(w.age_s),
                        if w.stale {
                            " (stale: is the process gone?)"
                        } else {
                            ""
                        }
                    ),
                ]);
            }
            let _ = writeln!(out, "  workers");
            t.render("    ", out);
            let mut t = Table::new(&[
                ("JOB", Align::Left),
                ("PHASE", Align::Left),
                ("READ", Align::Right),
                ("INSERTED", Align::Right),
                ("REJECTED", Align::Right),
                ("SKIPPED", Align::Right),
                ("RATE/S", Align::Right),
                ("STARTED", Align::Left),
                ("ELAPSED", Align::Right),
            ]);
            for j in &p.running_jobs {
                t.row(vec![
                    j.job_name.clone(),
                    j.phase.clone(),
                    thousands(j.rows_read),
                    thousands(j.rows_inserted),
                    thousands(j.rows_rejected),
                    thousands(j.rows_skipped),
                    format!("{:.1}", j.rate_per_s),
                    short_time(&j.started_at),
                    duration(j.elapsed_s),
                ]);
            }
            let _ = writeln!(out, "  running jobs");
            t.render("    ", out);
        }
        if p.last_jobs.is_empty() {
            let _ = writeln!(out, "  no ended job yet");
        } else {
            ended_table(p, out);
        }
        if !p.steps.is_empty() {
            steps_table(p, out);
        }
    }
}

/// The pipeline's last ended jobs.
fn ended_table(p: &PipelineStatus, out: &mut String) {
    let mut t = Table::new(&[
        ("JOB", Align::Left),
        ("STATUS", Align::Left),
        ("END", Align::Left),
        ("READ", Align::Right),
        ("INSERTED", Align::Right),
        ("REJECTED", Align::Right),
        ("UV", Align::Right),
        ("GAP_MS", Align::Right),
        ("STARTED", Align::Left),
        ("ENDED", Align::Left),
        ("DURATION", Align::Right),
        ("ERROR", Align::Left),
    ]);
    for j in &p.last_jobs {
        t.row(vec![
            j.job_name.clone(),
            match j.status {
                1 => "1 ok".into(),
                3 => "3 failed".into(),
                s => s.to_string(),
            },
            j.end_reason.clone().unwrap_or_else(|| "-".into()),
            thousands(j.rows_read),
            thousands(j.rows_inserted),
            thousands(j.rows_rejected),
            thousands(j.rows_uv),
            j.handoff_gap_ms
                .map_or_else(|| "-".into(), |g| format!("{g:.1}")),
            short_time(&j.started_at),
            j.ended_at.as_deref().map_or_else(|| "-".into(), short_time),
            j.duration_s.map_or_else(|| "-".into(), duration),
            j.error
                .as_deref()
                .map_or_else(String::new, |e| cut(e, TABLE_ERROR_CHARS)),
        ]);
    }
    let _ = writeln!(
        out,
        "  ended jobs (the last {}, newest first)",
        p.last_jobs.len()
    );
    t.render("    ", out);
}

/// The steps of the jobs shown (routed pipelines, post-job steps).
fn steps_table(p: &PipelineStatus, out: &mut String) {
    let mut t = Table::new(&[
        ("JOB", Align::Left),
        ("STEP", Align::Right),
        ("KIND", Align::Left),
        ("NAME", Align::Left),
        ("STATUS", Align::Left),
        ("INSERTED", Align::Right),
        ("UPDATED", Align::Right),
        ("IGNORED", Align::Right),
        ("ERRORS", Align::Right),
        ("ERROR", Align::Left),
    ]);
    for x in &p.steps {
        t.row(vec![
            x.job_name.clone(),
            x.step.to_string(),
            x.kind.clone(),
            x.name.clone(),
            match x.status {
                0 => "0 running".into(),
                1 => "1 ok".into(),
                3 => "3 failed".into(),
                s => s.to_string(),
            },
            thousands(x.inserted),
            thousands(x.updated),
            thousands(x.ignored),
            thousands(x.errors),
            x.error
                .as_deref()
                .map_or_else(String::new, |e| cut(e, TABLE_ERROR_CHARS)),
        ]);
    }
    let _ = writeln!(
        out,
        "  steps of these jobs (conveyor.steps; retry failed post steps: conveyor consolidate --steps)"
    );
    t.render("    ", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_the_last_two_refreshes_else_the_average() {
        assert_eq!(
            rate(5000, 10.0, Some(300.0), Some(0.3)),
            (1000.0, "status_log")
        );
        assert_eq!(rate(5000, 10.0, None, None), (500.0, "since_start"));
        // Two refreshes at the same instant say nothing about a rate.
        assert_eq!(
            rate(5000, 10.0, Some(0.0), Some(0.0)),
            (500.0, "since_start")
        );
        assert_eq!(rate(0, 0.0, None, None), (0.0, "since_start"));
    }
}
