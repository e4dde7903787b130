//! `conveyor run-steps --job J --step N|-1`: ETL2's step selector, for recovery. A load step
//! (a route) is re-run from the job's journal file into its table, its counters reset and
//! counted again for the job; a post-job step is run again in its own transaction. `-1` runs
//! every step of the job, in order.

use std::path::Path;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct RunStepsArgs {
    /// The job (as `conveyor status` shows it).
    #[arg(long)]
    pub job: String,
    /// The step number, or -1 for every step in order.
    #[arg(long, allow_hyphen_values = true, default_value_t = -1)]
    pub step: i32,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub async fn run(config_path: &Path, args: RunStepsArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let s = crate::db::quote_ident(&config.schema);
    let pipeline: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pipeline FROM {s}.jobs WHERE job_name = $1"
    )))
    .bind(&args.job)
    .fetch_optional(&mut conn)
    .await?;
    let pipeline = pipeline
        .with_context(|| format!("no job {:?} in {s}.jobs (see `conveyor status`)", args.job))?;
    let p = super::pick_pipeline(&config, Some(&pipeline))?;
    let all = args.step == -1;
    let load: Vec<i32> = p
        .routes
        .iter()
        .filter(|r| all || r.step == args.step)
        .map(|r| r.step)
        .collect();
    let post: Vec<i32> = p
        .post_steps
        .iter()
        .filter(|x| all || x.step == args.step)
        .map(|x| x.step)
        .collect();
    if load.is_empty() && post.is_empty() {
        let steps: Vec<String> = p
            .routes
            .iter()
            .map(|r| format!("{} (load {})", r.step, r.table_display()))
            .chain(
                p.post_steps
                    .iter()
                    .map(|x| format!("{} ({})", x.step, x.name)),
            )
            .collect();
        anyhow::bail!(
            "pipeline {} has no step {} (its steps: {}; -1 runs them all)",
            p.name,
            args.step,
            if steps.is_empty() {
                "none".into()
            } else {
                steps.join(", ")
            }
        );
    }
    if !load.is_empty() {
        let steps = load;
        let path = crate::spool::journal_path(&config.journal_dir, &args.job);
        let contents = crate::replay::open(&path).with_context(|| {
            format!(
                "job {} kept no journal at {} (set `journal = true` on pipeline {} to keep one); its load steps cannot be re-run",
                args.job,
                path.display(),
                p.name
            )
        })?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.steps SET inserted = 0, updated = 0, ignored = 0, errors = 0, status = 0,
                attempts = attempts + 1, error = NULL, ended_at = NULL, updated_at = now()
             WHERE job_name = $1 AND step = ANY($2)"
        )))
        .bind(&args.job)
        .bind(&steps)
        .execute(&mut conn)
        .await?;
        let r = crate::replay::direct_steps(
            &config,
            p,
            &contents,
            !args.quiet,
            Some((args.job.as_str(), steps.as_slice())),
        )
        .await;
        let (status, error) = match &r {
            Ok(_) => (1i16, None),
            Err(e) => (3, Some(e.to_string())),
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {s}.steps SET status = $3, error = $4, ended_at = now(), updated_at = now()
             WHERE job_name = $1 AND step = ANY($2)"
        )))
        .bind(&args.job)
        .bind(&steps)
        .bind(status)
        .bind(error)
        .execute(&mut conn)
        .await?;
        let report = r?;
        println!(
            "re-ran load step(s) {steps:?} of {} from {}: {} message(s) loaded, {} refused{}",
            args.job,
            path.display(),
            report.inserted,
            report.rejected,
            if report.error_tables.is_empty() {
                String::new()
            } else {
                format!(" (in {})", report.error_tables.join(", "))
            }
        );
    }
    let mut failed = false;
    for step in post {
        let x = p
            .post_steps
            .iter()
            .find(|x| x.step == step)
            .map(|x| x.name.clone())
            .unwrap_or_default();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.steps (job_name, step, pipeline, kind, name) VALUES ($1, $2, $3, 'post', $4)
             ON CONFLICT (job_name, step) DO UPDATE SET status = 0"
        )))
        .bind(&args.job)
        .bind(step)
        .bind(&p.name)
        .bind(&x)
        .execute(&mut conn)
        .await?;
        let report =
            crate::steps::run_post_steps(&config, true, Some(&args.job), Some(step)).await?;
        for (_, step, rows) in &report.succeeded {
            println!("post step {step} ({x}): status 1, {rows} row(s)");
        }
        for (_, step, error) in &report.failed {
            println!("post step {step} ({x}): status 3 — {error}");
            failed = true;
        }
        if failed {
            break;
        }
    }
    for r in crate::steps::of_job(&mut conn, &config.schema, &args.job).await? {
        println!(
            "  step {:>3} {:<5} {:<32} status {} inserted {} updated {} ignored {} errors {}{}",
            r.step,
            r.kind,
            r.name,
            r.status,
            r.inserted,
            r.updated,
            r.ignored,
            r.errors,
            r.error.map(|e| format!(" — {e}")).unwrap_or_default()
        );
    }
    if failed {
        return Err(super::Exit::new(
            1,
            "a post-job step failed (status 3); fix the cause and run it again",
        )
        .into());
    }
    Ok(())
}
