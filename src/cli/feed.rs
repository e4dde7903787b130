//! `conveyor feed`: the test publisher (generated seed-like rows or a JSON-lines file).

use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct FeedArgs {
    /// Pipeline whose queue to publish to (default: the first in the config).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Publish to this queue instead of the pipeline's.
    #[arg(long)]
    pub queue: Option<String>,
    /// Rows to generate.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Rows per second; 0 publishes as fast as the broker confirms.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Percentage of bad rows, spread over the five seed kinds (duplicate key, invalid date,
    /// letters in an integer, letters in a decimal, date out of range).
    #[arg(long, default_value_t = 0.0)]
    pub errors: f64,
    /// Publish each non-empty line of this JSON-lines file instead of generating rows. A line
    /// exported by `conveyor errors --export` (a JSON object with job, kind, seq, code and
    /// body / body_base64 / body_hex) is sent as its payload: the `body` text (edit it to fix
    /// the row) or the decoded bytes; other lines are sent as they are.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Random seed: the same seed publishes the same rows.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// First id number; use distinct ranges when feeding one table several times.
    #[arg(long, default_value_t = 1)]
    pub id_base: u64,
    /// Publish to this exchange instead of a queue, with each message's id as the routing key:
    /// a consistent-hash exchange shards the stream over its queues, one id always to the
    /// same queue (docs/scaling.md). The exchange must exist.
    #[arg(long)]
    pub exchange: Option<String>,
    /// No progress bar (for scripts and logs).
    #[arg(long)]
    pub quiet: bool,
}

pub async fn run(config_path: &Path, args: FeedArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    anyhow::ensure!(
        (0.0..=100.0).contains(&args.errors),
        "--errors must be a percentage between 0 and 100"
    );
    let pipeline = super::pick_pipeline(&config, args.pipeline.as_deref())?;
    let opts = crate::feed::FeedOptions {
        amqp_url: config.amqp_url.clone(),
        queue: args.queue.clone().unwrap_or_else(|| pipeline.queue.clone()),
        declare: pipeline.queue_declare,
        count: args.count,
        rate: args.rate,
        errors_pct: args.errors,
        file: args.file.clone(),
        seed: args.seed,
        id_base: args.id_base,
        progress: !args.quiet,
        exchange: args.exchange.clone(),
    };
    let queue = match &opts.exchange {
        Some(x) => format!("exchange {x}"),
        None => opts.queue.clone(),
    };
    let report = crate::feed::run(opts).await?;
    let bad: u64 = report.bad.values().sum();
    println!(
        "published {} rows to {queue} in {:.1} s ({:.0} rows/s): {} good, {} bad",
        report.published,
        report.seconds,
        report.published as f64 / report.seconds.max(1e-9),
        report.good,
        bad
    );
    for (kind, n) in &report.bad {
        println!("  {:<18} {n}", kind.as_str());
    }
    Ok(())
}
