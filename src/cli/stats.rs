//! `conveyor stats`: a job's latency statistics as the seed prints them (seeds/001 "Analyzing
//! Prototype Latency"): per commit minute the rows, rate, cumulative rows and min/max/avg/stddev
//! latency, absolute and relative to the job's minimum (which removes a constant clock skew
//! between publisher and database), then the rows per latency range as a bar chart.
//!
//! The daemon writes `latency_minute` and `latency_histogram` at every status interval and at
//! job end; this command only reads them, one job's rows in one `REPEATABLE READ` snapshot, so
//! a job's minutes and histogram always come from the same write.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::table::{duration, thousands, Align, Table};
use super::watch::{clear_screen, connection, watch_header, Watch};
use crate::config::Config;
use crate::db::quote_ident;

/// Bar width when stdout is not a terminal (a file, a pipe), or the terminal's size is unknown.
const DEFAULT_BAR_WIDTH: usize = 50;
/// Narrowest bar in a narrow terminal: below this the chart says nothing.
const MIN_BAR_WIDTH: usize = 10;
/// A bar's last cell in eighths, so that small differences and small counts still show.
const PARTIAL: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The per-minute table, then the latency ranges as a bar chart.
    Table,
    /// The per-minute table as CSV: a header line, then one line per job and minute (seconds
    /// with 3 decimals; minute in RFC 3339 UTC). One rectangular table, so a spreadsheet or
    /// `COPY … FROM … CSV HEADER` reads it as is; the ranges are `csv-histogram`.
    Csv,
    /// The latency ranges as CSV: a header line, then one line per job and range.
    CsvHistogram,
    /// One JSON object per job, one per line: {"job", "pipeline", "summary", "minutes": [...],
    /// "histogram": [...]}; full precision, seconds as numbers.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The job to show (a name like 20261124_013000_person_01, as `conveyor status` lists).
    /// Default: the pipeline's most recent job that has statistics.
    #[arg(long, conflicts_with = "last")]
    pub job: Option<String>,
    /// The pipeline's last N jobs that have statistics, oldest first, each with its tables.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub last: Option<u32>,
    /// Pipeline whose jobs to show (default: the first in the config).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Output format. csv is the per-minute table only (one header line, one line per minute);
    /// csv-histogram is the latency ranges.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Refresh every SECS seconds (e.g. 5) until Ctrl-C, following the newest job. The table is
    /// redrawn in place; csv and json print every refresh again (json: one line per job).
    #[arg(long, value_name = "SECS", value_parser = super::watch::parse_watch)]
    pub watch: Option<Duration>,
}

pub async fn run(config_path: &Path, args: StatsArgs) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let pick = match (&args.job, args.last) {
        (Some(job), _) => Pick::Job {
            job: job.clone(),
            pipeline: args.pipeline.clone(),
        },
        (None, n) => Pick::Last {
            pipeline: super::pick_pipeline(&config, args.pipeline.as_deref())?
                .name
                .clone(),
            n: n.unwrap_or(1),
        },
    };
    let mut watch = Watch::new(args.watch)?;
    let mut conn: Option<PgConnection> = None;
    loop {
        let text = match read(&mut conn, &config, config_path, &pick).await {
            Ok(Read::Jobs(taken_at, jobs)) => {
                let mut text = String::new();
                if let (Some(every), Format::Table) = (args.watch, args.format) {
                    text.push_str(clear_screen());
                    text.push_str(&watch_header("stats", &time(&taken_at), every));
                }
                render(&jobs, args.format, &mut text)?;
                text
            }
            Ok(Read::Nothing(why)) if args.watch.is_none() => anyhow::bail!(why),
            Ok(Read::Nothing(why)) => {
                if args.format == Format::Table {
                    format!("{}{why}\nwaiting; Ctrl-C to stop\n", clear_screen())
                } else {
                    eprintln!("{why}");
                    String::new()
                }
            }
            Err(e) => {
                let e = watch.failed(e)?;
                conn = None;
                let every = watch.every();
                if args.format == Format::Table {
                    format!(
                        "{}refresh failed: {e}\nretrying every {}; Ctrl-C to stop\n",
                        clear_screen(),
                        duration(every.as_secs_f64())
                    )
                } else {
                    eprintln!(
                        "error: {e} (retrying every {})",
                        duration(every.as_secs_f64())
                    );
                    String::new()
                }
            }
        };
        let separator =
            if args.watch.is_some() && matches!(args.format, Format::Csv | Format::CsvHistogram) {
                "\n"
            } else {
                ""
            };
        let out = if text.is_empty() {
            text
        } else {
            format!("{text}{separator}")
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

/// Which jobs to show.
#[derive(Debug)]
enum Pick {
    /// `--job`, checked against `--pipeline` when given.
    Job {
        job: String,
        pipeline: Option<String>,
    },
    /// The pipeline's `n` most recent jobs with statistics (by their latest minute).
    Last { pipeline: String, n: u32 },
}

/// What one read found.
#[derive(Debug)]
enum Read {
    /// The database's clock at the read, and the jobs, oldest first.
    Jobs(DateTime<Utc>, Vec<JobStats>),
    /// No statistics yet, and why (an error without --watch, a waiting screen with it).
    Nothing(String),
}

/// One job's statistics.
#[derive(Debug, serde::Serialize)]
struct JobStats {
    job: String,
    pipeline: String,
    summary: Summary,
    minutes: Vec<Minute>,
    histogram: Vec<Bucket>,
}

/// The job over all its minutes (from the exact sums, not from averaging averages).
#[derive(Debug, serde::Serialize)]
struct Summary {
    rows: i64,
    minutes: usize,
    first_minute: String,
    last_minute: String,
    min_s: f64,
    max_s: f64,
    avg_s: f64,
    stddev_s: f64,
    /// avg_s − min_s: the average relative to the job's minimum.
    avg_rel_s: f64,
}

/// One row of `latency_minute`.
#[derive(Debug, serde::Serialize)]
struct Minute {
    /// The commit minute, UTC.
    minute: String,
    /// 1 for the job's first minute; a minute without commits leaves a gap.
    index: i64,
    rows: i64,
    rate_per_s: f64,
    cumulative_rows: i64,
    min_s: f64,
    max_s: f64,
    avg_s: f64,
    stddev_s: f64,
    min_rel_s: f64,
    max_rel_s: f64,
    avg_rel_s: f64,
    #[serde(skip)]
    sum_s: f64,
    #[serde(skip)]
    sumsq_s: f64,
}

/// One row of `latency_histogram`.
#[derive(Debug, serde::Serialize)]
struct Bucket {
    bucket: i32,
    /// null: no lower bound (negative latencies: a publisher clock ahead of the database).
    lower_s: Option<f64>,
    /// null: no upper bound.
    upper_s: Option<f64>,
    /// `<0 s`, `0–0.1 s`, `60 s+`.
    label: String,
    rows: i64,
    /// Of the job's rows in the histogram.
    percent: f64,
}

/// Reads the picked jobs, connecting first when `conn` is `None`; a failed read drops the
/// connection so the next refresh starts on a new one.
async fn read(
    conn: &mut Option<PgConnection>,
    config: &Config,
    config_path: &Path,
    pick: &Pick,
) -> anyhow::Result<Read> {
    let c = connection(
        conn,
        config,
        config_path,
        &["jobs", "latency_minute", "latency_histogram"],
    )
    .await?;
    match read_snapshot(c, &quote_ident(&config.schema), pick).await {
        Ok(r) => Ok(r),
        Err(e) => {
            *conn = None;
            Err(anyhow::anyhow!(
                "reading the latency statistics from schema {:?} failed: {e} (check that the database is reachable and that the user may read the schema)",
                config.schema
            ))
        }
    }
}

/// The picked jobs' rows, in one snapshot.
async fn read_snapshot(conn: &mut PgConnection, s: &str, pick: &Pick) -> Result<Read, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let taken_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let jobs = match pick_jobs(&mut tx, s, pick).await? {
        Ok(jobs) => jobs,
        Err(why) => return Ok(Read::Nothing(why)),
    };
    let mut out = Vec::new();
    for (job, pipeline) in jobs {
        out.push(read_job(&mut tx, s, job, pipeline).await?);
    }
    tx.commit().await?;
    Ok(Read::Jobs(taken_at, out))
}

/// (job, pipeline) of the picked jobs, oldest first; or why there are none.
async fn pick_jobs(
    conn: &mut PgConnection,
    s: &str,
    pick: &Pick,
) -> Result<Result<Vec<(String, String)>, String>, sqlx::Error> {
    match pick {
        Pick::Job { job, pipeline } => {
            let found: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT pipeline FROM {s}.latency_minute WHERE job_name = $1 LIMIT 1"
            )))
            .bind(job)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(p) = found {
                return Ok(match pipeline {
                    Some(want) if *want != p => Err(format!(
                        "job {job} belongs to pipeline {p:?}, not {want:?}: drop --pipeline or check the job name"
                    )),
                    _ => Ok(vec![(job.clone(), p)]),
                });
            }
            let known: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT pipeline FROM {s}.jobs WHERE job_name = $1"
            )))
            .bind(job)
            .fetch_optional(&mut *conn)
            .await?;
            Ok(Err(match known {
                Some(p) => format!(
                    "job {job} (pipeline {p}) has no latency statistics in {s}.latency_minute: they are written every status.interval while a job commits rows and at its end, so a job that loaded nothing (or has only just started) has none"
                ),
                None => format!(
                    "job {job:?} is not in {s}.jobs: check the name (`conveyor status` lists the last jobs; omit --job for the newest) or the config's database.schema"
                ),
            }))
        }
        Pick::Last { pipeline, n } => {
            let mut jobs: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT job_name FROM {s}.latency_minute WHERE pipeline = $1
                 GROUP BY job_name ORDER BY max(minute) DESC, job_name DESC LIMIT $2"
            )))
            .bind(pipeline)
            .bind(i64::from(*n))
            .fetch_all(&mut *conn)
            .await?;
            if jobs.is_empty() {
                return Ok(Err(format!(
                    "no latency statistics for pipeline {pipeline:?} in {s}.latency_minute yet: the daemon writes them every status.interval while a job commits rows and at job end (is `conveyor run` up and loading? `conveyor status` shows it)"
                )));
            }
            jobs.reverse();
            Ok(Ok(jobs
                .into_iter()
                .map(|j| (j, pipeline.clone()))
                .collect()))
        }
    }
}

async fn read_job(
    conn: &mut PgConnection,
    s: &str,
    job: String,
    pipeline: String,
) -> Result<JobStats, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT minute, rows, rate_per_s, cumulative_rows, min_s, max_s, avg_s, stddev_s,
                min_rel_s, max_rel_s, avg_rel_s, sum_s, sumsq_s
         FROM {s}.latency_minute WHERE job_name = $1 ORDER BY minute"
    )))
    .bind(&job)
    .fetch_all(&mut *conn)
    .await?;
    let mut minutes = Vec::with_capacity(rows.len());
    let mut first: Option<DateTime<Utc>> = None;
    for r in rows {
        let minute: DateTime<Utc> = r.try_get("minute")?;
        let first = *first.get_or_insert(minute);
        minutes.push(Minute {
            minute: minute.to_rfc3339_opts(SecondsFormat::Secs, true),
            index: (minute - first).num_minutes() + 1,
            rows: r.try_get("rows")?,
            rate_per_s: r.try_get("rate_per_s")?,
            cumulative_rows: r.try_get("cumulative_rows")?,
            min_s: r.try_get("min_s")?,
            max_s: r.try_get("max_s")?,
            avg_s: r.try_get("avg_s")?,
            stddev_s: r.try_get("stddev_s")?,
            min_rel_s: r.try_get("min_rel_s")?,
            max_rel_s: r.try_get("max_rel_s")?,
            avg_rel_s: r.try_get("avg_rel_s")?,
            sum_s: r.try_get("sum_s")?,
            sumsq_s: r.try_get("sumsq_s")?,
        });
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT bucket, lower_s, upper_s, rows FROM {s}.latency_histogram
         WHERE job_name = $1 ORDER BY bucket"
    )))
    .bind(&job)
    .fetch_all(&mut *conn)
    .await?;
    let mut histogram = Vec::with_capacity(rows.len());
    for r in rows {
        let lower_s: Option<f64> = r.try_get("lower_s")?;
        let upper_s: Option<f64> = r.try_get("upper_s")?;
        histogram.push(Bucket {
            bucket: r.try_get("bucket")?,
            lower_s,
            upper_s,
            label: range_label(lower_s, upper_s),
            rows: r.try_get("rows")?,
            percent: 0.0,
        });
    }
    let total: i64 = histogram.iter().map(|b| b.rows).sum();
    for b in &mut histogram {
        b.percent = if total > 0 {
            b.rows as f64 * 100.0 / total as f64
        } else {
            0.0
        };
    }
    Ok(JobStats {
        summary: summary(&minutes),
        job,
        pipeline,
        minutes,
        histogram,
    })
}

/// The job over all its minutes, from the minutes' exact sums.
fn summary(minutes: &[Minute]) -> Summary {
    let rows: i64 = minutes.iter().map(|m| m.rows).sum();
    let sum: f64 = minutes.iter().map(|m| m.sum_s).sum();
    let sumsq: f64 = minutes.iter().map(|m| m.sumsq_s).sum();
    let min_s = minutes
        .iter()
        .map(|m| m.min_s)
        .fold(f64::INFINITY, f64::min);
    let max_s = minutes
        .iter()
        .map(|m| m.max_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let n = rows.max(1) as f64;
    let avg_s = if rows > 0 { sum / n } else { 0.0 };
    let stddev_s = if rows > 0 {
        (sumsq / n - avg_s * avg_s).max(0.0).sqrt()
    } else {
        0.0
    };
    let (min_s, max_s) = if min_s.is_finite() {
        (min_s, max_s)
    } else {
        (0.0, 0.0)
    };
    Summary {
        rows,
        minutes: minutes.len(),
        first_minute: minutes
            .first()
            .map(|m| m.minute.clone())
            .unwrap_or_default(),
        last_minute: minutes.last().map(|m| m.minute.clone()).unwrap_or_default(),
        min_s,
        max_s,
        avg_s,
        stddev_s,
        avg_rel_s: avg_s - min_s,
    }
}

fn render(jobs: &[JobStats], format: Format, out: &mut String) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            let columns = terminal_columns();
            for (i, j) in jobs.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                render_table(j, columns, out);
            }
        }
        Format::Csv => {
            out.push_str(
                "job,pipeline,minute,index,rows,rate_per_s,cumulative_rows,min_s,max_s,avg_s,stddev_s,min_rel_s,max_rel_s,avg_rel_s\n",
            );
            for j in jobs {
                for m in &j.minutes {
                    let _ = writeln!(
                        out,
                        "{},{},{},{},{},{:.3},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3}",
                        csv_field(&j.job),
                        csv_field(&j.pipeline),
                        m.minute,
                        m.index,
                        m.rows,
                        m.rate_per_s,
                        m.cumulative_rows,
                        m.min_s,
                        m.max_s,
                        m.avg_s,
                        m.stddev_s,
                        m.min_rel_s,
                        m.max_rel_s,
                        m.avg_rel_s
                    );
                }
            }
        }
        Format::CsvHistogram => {
            out.push_str("job,pipeline,bucket,lower_s,upper_s,range,rows,percent\n");
            for j in jobs {
                for b in &j.histogram {
                    let _ = writeln!(
                        out,
                        "{},{},{},{},{},{},{},{:.2}",
                        csv_field(&j.job),
                        csv_field(&j.pipeline),
                        b.bucket,
                        b.lower_s.map(num).unwrap_or_default(),
                        b.upper_s.map(num).unwrap_or_default(),
                        csv_field(&b.label),
                        b.rows,
                        b.percent
                    );
                }
            }
        }
        Format::Json => {
            for j in jobs {
                out.push_str(&serde_json::to_string(j)?);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// One job in the terminal: a summary, the seed's per-minute table, the ranges as bars.
/// `columns`: the terminal's width, `None` when stdout is not a terminal.
fn render_table(j: &JobStats, columns: Option<usize>, out: &mut String) {
    let s = &j.summary;
    let _ = writeln!(
        out,
        "job {} (pipeline {}): {} rows in {} {}, {} UTC",
        j.job,
        j.pipeline,
        thousands(s.rows),
        s.minutes,
        if s.minutes == 1 { "minute" } else { "minutes" },
        minute_span(&s.first_minute, &s.last_minute),
    );
    let _ = writeln!(
        out,
        "latency (queue time → commit): avg {:.3} s, stddev {:.3} s, min {:.3} s, max {:.3} s; relative to the job's minimum: avg {:.3} s",
        s.avg_s, s.stddev_s, s.min_s, s.max_s, s.avg_rel_s
    );
    out.push('\n');
    let mut t = Table::new(&[
        ("#", Align::Right),
        ("MINUTE (UTC)", Align::Left),
        ("ROWS", Align::Right),
        ("RATE/S", Align::Right),
        ("CUMULATIVE", Align::Right),
        ("MIN", Align::Right),
        ("MAX", Align::Right),
        ("AVG", Align::Right),
        ("STDDEV", Align::Right),
        ("MIN_REL", Align::Right),
        ("MAX_REL", Align::Right),
        ("AVG_REL", Align::Right),
    ]);
    for m in &j.minutes {
        t.row(vec![
            m.index.to_string(),
            minute_label(&m.minute),
            thousands(m.rows),
            format!("{:.1}", m.rate_per_s),
            thousands(m.cumulative_rows),
            format!("{:.3}", m.min_s),
            format!("{:.3}", m.max_s),
            format!("{:.3}", m.avg_s),
            format!("{:.3}", m.stddev_s),
            format!("{:.3}", m.min_rel_s),
            format!("{:.3}", m.max_rel_s),
            format!("{:.3}", m.avg_rel_s),
        ]);
    }
    t.render("", out);
    out.push('\n');
    if j.histogram.is_empty() {
        let _ = writeln!(out, "no latency ranges recorded for this job");
        return;
    }
    let total: i64 = j.histogram.iter().map(|b| b.rows).sum();
    let _ = writeln!(out, "rows per latency range ({} rows)", thousands(total));
    let label_w = j
        .histogram
        .iter()
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(0);
    let rows_w = j
        .histogram
        .iter()
        .map(|b| thousands(b.rows).len())
        .max()
        .unwrap_or(0);
    // "  label  rows  100.0%  bar": what is left of the terminal goes to the bar.
    let fixed = 2 + label_w + 2 + rows_w + 2 + 6 + 2;
    let width = columns.map_or(DEFAULT_BAR_WIDTH, |c| {
        c.saturating_sub(fixed).max(MIN_BAR_WIDTH)
    });
    let max = j.histogram.iter().map(|b| b.rows).max().unwrap_or(0);
    // Empty ranges beyond the last that has rows say nothing more than one line does.
    let shown = match j.histogram.iter().rposition(|b| b.rows > 0) {
        Some(last) => &j.histogram[..=last],
        None => &j.histogram[..],
    };
    for b in shown {
        let line = format!(
            "  {:<label_w$}  {:>rows_w$}  {:>5.1}%  {}",
            b.label,
            thousands(b.rows),
            b.percent,
            bar(b.rows, max, width)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if let Some(next) = j.histogram.get(shown.len()) {
        let from = next
            .lower_s
            .map_or_else(|| "any latency".into(), |l| format!("{} s", num(l)));
        let _ = writeln!(out, "  (no rows at {from} or more)");
    }
}

/// The terminal's width in columns; `None` when stdout is not a terminal or its size is unknown.
fn terminal_columns() -> Option<usize> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given, which outlives the
    // call; stdout is an open descriptor (checked above).
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// `rows` of `max` as a bar of `width` cells: full blocks, then an eighth-block for the
/// remainder; any row at all shows at least an eighth.
fn bar(rows: i64, max: i64, width: usize) -> String {
    if rows <= 0 || max <= 0 {
        return String::new();
    }
    let eighths = ((rows as f64 / max as f64) * (width * 8) as f64).round() as usize;
    let eighths = eighths.clamp(1, width * 8);
    let mut out = "█".repeat(eighths / 8);
    out.push_str(PARTIAL[eighths % 8]);
    out
}

/// `<0 s`, `0–0.1 s`, `1–2 s`, `60 s+`.
fn range_label(lower: Option<f64>, upper: Option<f64>) -> String {
    match (lower, upper) {
        (None, Some(u)) => format!("<{} s", num(u)),
        (Some(l), None) => format!("{} s+", num(l)),
        (Some(l), Some(u)) => format!("{}–{} s", num(l), num(u)),
        (None, None) => "any".into(),
    }
}

/// A bound as written in the config: `0.1`, `1`, `60`.
fn num(x: f64) -> String {
    format!("{}", x + 0.0) // + 0.0 turns -0 into 0
}

/// `2026-11-24 01:30`, `2026-11-24 01:30 – 01:44` or `2026-11-24 23:50 – 2026-11-25 00:10`.
fn minute_span(first: &str, last: &str) -> String {
    let (a, b) = (minute_label(first), minute_label(last));
    if a == b {
        return a;
    }
    match (a.split_once(' '), b.split_once(' ')) {
        (Some((day_a, _)), Some((day_b, time_b))) if day_a == day_b => format!("{a} – {time_b}"),
        _ => format!("{a} – {b}"),
    }
}

/// `2026-11-24 01:30` from a minute in RFC 3339.
fn minute_label(rfc3339: &str) -> String {
    match DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => t.with_timezone(&Utc).format("%Y-%m-%d %H:%M").to_string(),
        Err(_) => rfc3339.to_string(),
    }
}

fn time(t: &DateTime<Utc>) -> String {
    super::table::time(t)
}

/// A CSV field, quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_labelled_like_the_config() {
        assert_eq!(range_label(None, Some(0.0)), "<0 s");
        assert_eq!(range_label(Some(0.0), Some(0.1)), "0–0.1 s");
        assert_eq!(range_label(Some(1.0), Some(2.0)), "1–2 s");
        assert_eq!(range_label(Some(0.25), Some(0.5)), "0.25–0.5 s");
        assert_eq!(range_label(Some(60.0), None), "60 s+");
        assert_eq!(range_label(Some(-0.0), Some(1.0)), "0–1 s");
    }

    #[test]
    fn bars_scale_to_the_largest_range() {
        assert_eq!(bar(10, 10, 4), "████");
        assert_eq!(bar(5, 10, 4), "██");
        assert_eq!(bar(0, 10, 4), "");
        // 1 of 1,000,000 still shows, as the thinnest mark.
        assert_eq!(bar(1, 1_000_000, 50), "▏");
        // 3/16 of 4 cells = 6 eighths.
        assert_eq!(bar(3, 16, 4), "▊");
        assert_eq!(bar(11, 16, 4), "██▊");
    }

    #[test]
    fn the_summary_comes_from_the_exact_sums() {
        let m = |rows: i64, sum: f64, sumsq: f64, min: f64, max: f64| Minute {
            minute: "2026-11-24T01:30:00Z".into(),
            index: 1,
            rows,
            rate_per_s: rows as f64 / 60.0,
            cumulative_rows: rows,
            min_s: min,
            max_s: max,
            avg_s: sum / rows as f64,
            stddev_s: 0.0,
            min_rel_s: 0.0,
            max_rel_s: 0.0,
            avg_rel_s: 0.0,
            sum_s: sum,
            sumsq_s: sumsq,
        };
        // Latencies 1, 3 in one minute and 2, 2, 2 in the next: avg 2, variance 0.4.
        let s = summary(&[m(2, 4.0, 10.0, 1.0, 3.0), m(3, 6.0, 12.0, 2.0, 2.0)]);
        assert_eq!(s.rows, 5);
        assert!((s.avg_s - 2.0).abs() < 1e-12);
        assert!((s.stddev_s - 0.4f64.sqrt()).abs() < 1e-12);
        assert_eq!((s.min_s, s.max_s), (1.0, 3.0));
        assert!((s.avg_rel_s - 1.0).abs() < 1e-12);
        let empty = summary(&[]);
        assert_eq!((empty.rows, empty.min_s, empty.avg_s), (0, 0.0, 0.0));
    }

    #[test]
    fn minute_spans_are_short() {
        let m = |t: &str| format!("2026-11-24T{t}:00Z");
        assert_eq!(minute_span(&m("01:30"), &m("01:30")), "2026-11-24 01:30");
        assert_eq!(
            minute_span(&m("01:30"), &m("01:44")),
            "2026-11-24 01:30 – 01:44"
        );
        assert_eq!(
            minute_span(&m("23:50"), "2026-11-25T00:10:00Z"),
            "2026-11-24 23:50 – 2026-11-25 00:10"
        );
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("person"), "person");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
