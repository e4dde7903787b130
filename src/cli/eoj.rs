//! `conveyor eoj`: the operator's end-of-job control, then a wait until the job has ended.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Connection;

use crate::job::EndReason;

#[derive(Debug, clap::Args)]
pub struct EojArgs {
    /// Pipeline whose job to end (default: the first in the config).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// End the job now, ahead of the backlog (control message on the conveyor.control
    /// exchange), instead of queueing a marker behind the messages already waiting.
    #[arg(long)]
    pub priority: bool,
    /// The job to end (default: the pipeline's active job, read from the jobs table).
    #[arg(long)]
    pub job: Option<String>,
    /// Seconds to wait for the job to end before giving up (the marker stays queued).
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
}

pub async fn run(config_path: &Path, args: EojArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let p = super::pick_pipeline(&config, args.pipeline.as_deref())?;
    let mut db = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let jobs = format!("{}.jobs", crate::db::quote_ident(&config.schema));
    let job = match &args.job {
        Some(j) => j.clone(),
        None => sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
            "SELECT job_name FROM {jobs} WHERE pipeline = $1 AND status = 0 AND phase = 'active'
             ORDER BY activated_at DESC LIMIT 1"
        )))
        .bind(&p.name)
        .fetch_optional(&mut db)
        .await?
        .with_context(|| {
            format!(
                "pipeline {:?} has no active job (is `conveyor run` up and has the queue delivered anything yet?)",
                p.name
            )
        })?,
    };
    let status: Option<i16> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT status FROM {jobs} WHERE job_name = $1"
    )))
    .bind(&job)
    .fetch_optional(&mut db)
    .await?;
    match status {
        None => anyhow::bail!(
            "job {job} is not in {jobs}: check --job (or omit it to end the active job) and the config's database.schema"
        ),
        Some(s) if s != 0 => anyhow::bail!("job {job} has already ended (status {s}); nothing sent"),
        Some(_) => {}
    }
    let amqp = crate::source::connect(&config.amqp_url, "conveyor-eoj").await?;
    let channel = amqp.create_channel().await?;
    if args.priority {
        let msg = crate::source::Control {
            pipeline: p.name.clone(),
            queue: p.queue.clone(),
            job: job.clone(),
            reason: EndReason::Priority.as_str().into(),
        };
        crate::source::publish_control(&channel, &msg).await?;
    } else {
        crate::source::publish_marker(&channel, &p.queue, &job, EndReason::Manual).await?;
    }
    let _ = amqp.close(200, "done".into()).await;
    println!(
        "{} end of job {job} (pipeline {}); waiting for it to end",
        if args.priority {
            "sent priority"
        } else {
            "queued"
        },
        p.name
    );
    let start = Instant::now();
    loop {
        let row: Option<(i16, Option<String>, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT status, end_reason, rows_read, rows_inserted, rows_rejected FROM {jobs} WHERE job_name = $1"
        )))
        .bind(&job)
        .fetch_optional(&mut db)
        .await?;
        match row {
            None => anyhow::bail!("job {job} is not in {jobs}: check --job and the config's database.schema"),
            Some((status, reason, read, inserted, rejected)) if status != 0 => {
                println!(
                    "ended job {job}: status {status}, end_reason {}, read {read}, inserted {inserted}, rejected {rejected}",
                    reason.as_deref().unwrap_or("-")
                );
                break;
            }
            Some(_) if start.elapsed() > Duration::from_secs(args.wait) => anyhow::bail!(
                "job {job} has not ended after {} s; the marker stays queued behind the backlog (use --priority to end it now)",
                args.wait
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = db.close().await;
    Ok(())
}
