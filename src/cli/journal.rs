//! `conveyor journal`: the change journal's subscribers (ODI's J$ consumption): lock a window,
//! read it, purge it after the downstream run succeeded, and see every subscriber's backlog.

use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct JournalArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Mark the subscriber's unconsumed rows consumed and print the window to process: its
    /// number and every consumed, unpurged row (a failed earlier run's rows included).
    Lock {
        /// The subscriber, as named in a route's `journal` list.
        #[arg(long)]
        subscriber: String,
        /// Print the window as one JSON object (window, rows with their keys) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Delete the subscriber's window once its downstream run succeeded. Rows locked later,
    /// and unconsumed ones, stay.
    Purge {
        /// The subscriber, as named in a route's `journal` list.
        #[arg(long)]
        subscriber: String,
        /// The window number `lock` printed.
        #[arg(long)]
        window: i64,
    },
    /// Backlog per subscriber and table: unconsumed rows, consumed rows waiting for a purge,
    /// the oldest row's time.
    Status {
        /// One JSON array (subscriber, target, unconsumed, consumed, oldest) for scripts.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config_path: &Path, args: JournalArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let schema = &config.schema;
    match args.action {
        Action::Lock { subscriber, json } => {
            let w = crate::changes::lock(&mut conn, schema, &subscriber).await?;
            let rows = crate::changes::rows(&mut conn, schema, &subscriber, w.window).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"subscriber": w.subscriber, "window": w.window, "locked": w.locked, "rows": rows})
                );
            } else {
                println!(
                    "window {} for {}: {} row(s), {} newly locked",
                    w.window, w.subscriber, w.rows, w.locked
                );
                for r in &rows {
                    println!(
                        "  {:>10} {} {:<30} {} {}",
                        r.id,
                        r.flag,
                        r.target,
                        r.key,
                        r.jrn_date.format("%Y-%m-%d %H:%M:%S%.3f")
                    );
                }
                println!(
                    "when the downstream run succeeded: conveyor journal purge --subscriber {} --window {}",
                    w.subscriber, w.window
                );
            }
        }
        Action::Purge { subscriber, window } => {
            let n = crate::changes::purge(&mut conn, schema, &subscriber, window).await?;
            println!("purged {n} row(s) of {subscriber}'s window {window}");
        }
        Action::Status { json } => {
            let all = crate::changes::status(&mut conn, schema).await?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else if all.is_empty() {
                println!("the change journal is empty (routes with `journal = [\"subscriber\"]` fill it)");
            } else {
                println!(
                    "{:<20} {:<32} {:>12} {:>12}  oldest",
                    "subscriber", "table", "unconsumed", "consumed"
                );
                for b in all {
                    println!(
                        "{:<20} {:<32} {:>12} {:>12}  {}",
                        b.subscriber,
                        b.target,
                        b.unconsumed,
                        b.consumed,
                        b.oldest
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}
