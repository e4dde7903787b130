//! `conveyor replay`: loads a job's journal again, or lists the journals.

use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("how").args(["to_queue", "direct", "list"]).required(true)))]
pub struct ReplayArgs {
    /// The journal to replay (`<journal dir>/<job>.journal`; see --list).
    #[arg(required_unless_present = "list")]
    pub file: Option<PathBuf>,
    /// Publish every message back to this queue, with its own headers and message_id; the
    /// running daemon loads them as any other message.
    #[arg(long, value_name = "QUEUE")]
    pub to_queue: Option<String>,
    /// Load the messages straight into the pipeline's target table (bad rows go to an error
    /// table `et_replay_…`, named in the output).
    #[arg(long)]
    pub direct: bool,
    /// List the journals in the journal directory with their job, size and message count.
    #[arg(long)]
    pub list: bool,
    /// Pipeline whose target (--direct) or queue declaration to use (default: the journal's
    /// pipeline if it is in the config, else the first).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub async fn run(config_path: &Path, args: ReplayArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    if args.list {
        let journals = crate::replay::list(&config.journal_dir)?;
        if journals.is_empty() {
            println!(
                "no journals in {} (set `journal = true` on a pipeline to keep them)",
                config.journal_dir.display()
            );
        }
        for j in journals {
            println!(
                "{:<40} {:>10} messages {:>12} bytes  {}{}",
                j.job,
                j.messages,
                j.bytes,
                j.modified
                    .map(|m| m.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default(),
                if j.damaged_bytes > 0 {
                    format!("  ({} damaged bytes skipped)", j.damaged_bytes)
                } else {
                    String::new()
                }
            );
            println!("  {}", j.path.display());
        }
        return Ok(());
    }
    let file = args.file.context("give the journal file to replay")?;
    let contents = crate::replay::open(&file)?;
    // The job name ends with `_<pipeline>_<slot>`.
    let from_job = config
        .pipelines
        .iter()
        .find(|p| {
            contents.job.ends_with(&format!("_{}_01", p.name))
                || contents.job.ends_with(&format!("_{}_02", p.name))
        })
        .map(|p| p.name.clone());
    let pipeline = super::pick_pipeline(&config, args.pipeline.as_deref().or(from_job.as_deref()))?;
    if let Some(queue) = &args.to_queue {
        let r = crate::replay::to_queue(
            &config.amqp_url,
            queue,
            pipeline.queue_declare,
            &contents,
            !args.quiet,
        )
        .await?;
        println!(
            "replayed {} messages of job {} to queue {queue:?} in {:.1} s",
            r.published, contents.job, r.seconds
        );
    } else {
        let r = crate::replay::direct(&config, pipeline, &contents, !args.quiet).await?;
        println!(
            "loaded {} rows of job {} into {} in {:.1} s; {} rejected{}",
            r.inserted,
            contents.job,
            pipeline.target_table,
            r.seconds,
            r.rejected,
            if r.error_tables.is_empty() {
                String::new()
            } else {
                format!(
                    " (see {}, or `conveyor errors`)",
                    r.error_tables.join(" and ")
                )
            }
        );
    }
    if contents.scan.damaged_bytes() > 0 {
        eprintln!(
            "warning: {} damaged bytes of {} were skipped",
            contents.scan.damaged_bytes(),
            file.display()
        );
    }
    Ok(())
}
