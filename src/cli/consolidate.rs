//! `conveyor consolidate`: the post-job consolidation by hand (the rotator runs it after every
//! job). Exit code = the run's result: 0 ok, 1 failed (resumable), 2 locked by another caller.
//! `--steps` instead runs the post-job SQL steps again: failed ones (status 3) and those that
//! waited behind them.

use std::path::Path;

use crate::consolidate::{Options, RunResult};

#[derive(Debug, clap::Args)]
pub struct ConsolidateArgs {
    /// Only this job's error tables (default: every ended job's).
    #[arg(long)]
    pub job: Option<String>,
    /// Rows moved per transaction (default: consolidate.limit).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Take over the lock if its holder has held it longer than consolidate.override_after
    /// (a hung run): its session is terminated, its run marked failed.
    #[arg(long = "override")]
    pub take_over: bool,
    /// Mark failed and abandoned runs as reset (acknowledged), then run.
    #[arg(long)]
    pub reset: bool,
    /// Run the post-job SQL steps instead: the failed ones (status 3) again, then the ones
    /// that waited behind them, in step order (with --job, only that job's). Exit 1 if one
    /// still fails.
    #[arg(long)]
    pub steps: bool,
    /// Name recorded on the run and shown to a caller that finds the lock taken.
    #[arg(long, default_value_t = default_caller())]
    pub caller: String,
}

fn default_caller() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    format!("{user}@{}", crate::job::host())
}

pub async fn run(config_path: &Path, args: ConsolidateArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    if args.steps {
        return steps(&config, args.job.as_deref()).await;
    }
    let mut opts = Options::from_config(&config, args.caller);
    if let Some(l) = args.limit {
        anyhow::ensure!(
            (1..=1_000_000).contains(&l),
            "--limit must be between 1 and 1000000"
        );
        opts.limit = l;
    }
    opts.take_over = args.take_over;
    opts.reset = args.reset;
    opts.job = args.job;
    let out = crate::consolidate::run(&config, &opts).await?;
    if out.reset_runs > 0 {
        println!("reset {} failed run(s)", out.reset_runs);
    }
    if let Some(prev) = &out.overrode {
        println!("took over the lock from {prev}");
    }
    for t in &out.tables {
        println!(
            "{:<60} {:>10} rows → error_history, dropped",
            t.table, t.rows
        );
    }
    match &out.result {
        RunResult::Ok => {
            println!(
                "run {}: result 0 — {} table(s), {} row(s) moved in {} transaction(s) of at most {} rows, {:.1} s",
                out.run_id,
                out.tables.len(),
                out.rows_moved,
                out.transactions,
                opts.limit,
                out.seconds
            );
            Ok(())
        }
        RunResult::Failed(e) => {
            println!(
                "run {}: result 1 — failed after {} row(s): {e}",
                out.run_id, out.rows_moved
            );
            Err(super::Exit::new(
                1,
                "consolidation failed; what it moved stays moved and the next run resumes. Fix the cause, then `conveyor consolidate --reset`",
            )
            .into())
        }
        RunResult::Locked {
            prev_caller,
            prev_age_s,
        } => {
            println!(
                "run {}: result 2 — locked by {prev_caller} for {prev_age_s:.0} s",
                out.run_id
            );
            Err(super::Exit::new(
                2,
                format!(
                    "another consolidation ({prev_caller}) is running; wait for it, or after {} use --override",
                    humantime::format_duration(opts.override_after)
                ),
            )
            .into())
        }
    }
}

async fn steps(config: &crate::config::Config, job: Option<&str>) -> anyhow::Result<()> {
    let report = crate::steps::run_post(config, true, job).await?;
    for (job, step, rows) in &report.succeeded {
        println!("{job} step {step}: status 1 ({rows} rows)");
    }
    for (job, step, error) in &report.failed {
        println!("{job} step {step}: status 3 — {error}");
    }
    if report.succeeded.is_empty() && report.failed.is_empty() {
        println!("no post-job step is pending or failed");
    }
    if report.failed.is_empty() {
        Ok(())
    } else {
        Err(super::Exit::new(
            1,
            "a post-job step failed again (status 3); the job's loaded data is kept. Fix the cause, then run `conveyor consolidate --steps` again",
        )
        .into())
    }
}
