//! The command line: argument definitions and dispatch; one thin file per subcommand.

mod check;
mod consolidate;
mod eoj;
mod errors;
mod feed;
mod journal;
mod migrate;
mod replay;
mod run;
mod run_steps;
mod stats;
mod status;
mod table;
mod view;
mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// conveyor continuously loads JSON messages from a RabbitMQ queue into PostgreSQL tables.
///
/// A message is acked only once something durable owns it: the worker's fsynced spool
/// (`durability = "spool"`, the default; a crash loses nothing and loads nothing twice) or the
/// database transaction that loaded it (`durability = "broker"`). Start with `conveyor migrate`, then `conveyor run`;
/// `conveyor feed` publishes test rows.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, max_term_width = 100)]
pub struct Cli {
    /// Configuration file (TOML). See config/conveyor.toml for every key, with comments.
    #[arg(
        long,
        short,
        global = true,
        env = "CONVEYOR_CONFIG",
        default_value = "config/conveyor.toml"
    )]
    pub config: PathBuf,
    /// Log format on stderr: `pretty` for a terminal, `json` (one object per line, with the
    /// pipeline, slot and job of every line) for journald/Loki. Overrides log.format.
    #[arg(long, global = true, env = "CONVEYOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load every configured pipeline until SIGTERM/SIGINT.
    ///
    /// Applies migrations first. On SIGTERM or SIGINT it stops consuming, commits and acks
    /// what is in flight, ends the job and exits 0.
    Run,
    /// Check the config, the broker, the database and the disks before `conveyor run`.
    ///
    /// For each pipeline: the queue (exists, or will be declared; its type and
    /// single-active-consumer), the target table and how the messages map onto its columns,
    /// the privileges conveyor needs, and the free space of the state and journal dirs. Prints
    /// the plan and every problem at once; exit 0 when there is none, 1 otherwise.
    Check(check::CheckArgs),
    /// Create or upgrade conveyor's tables (jobs, robust log) in database.schema; idempotent.
    Migrate,
    /// End a pipeline's active job: a marker behind the backlog, or --priority to end it now.
    ///
    /// Prints which job ended, with its counts.
    Eoj(eoj::EojArgs),
    /// Publish test rows (seed-like `person` rows, or a JSON-lines file) with publisher confirms.
    Feed(feed::FeedArgs),
    /// Load a job's journal again (--to-queue Q or --direct), or list the journals (--list).
    ///
    /// Journals are kept for pipelines with `journal = true`: every message a job read, with its
    /// headers. Use --direct to restore a table, --to-queue to re-process rows through the
    /// running daemon (e.g. after fixing what rejected them).
    Replay(replay::ReplayArgs),
    /// Show rejected rows: the error tables of running jobs and the history of ended ones.
    ///
    /// Raw payloads are shown decoded where they are text, escaped where not. --export writes
    /// them as JSON lines that `conveyor feed --file` re-sends (after you fixed them).
    Errors(errors::ErrorsArgs),
    /// Move ended jobs' error tables (et_<job>, uv_<job>) into error_history and drop them.
    ///
    /// The rotator does this after every job; run it by hand after a failure or with
    /// consolidate.after_job = false. One run at a time: exit 2 says who holds the lock.
    /// Exit 1: the run failed (resumable; fix the cause, then --reset).
    Consolidate(consolidate::ConsolidateArgs),
    /// Show each pipeline's workers, running jobs (counts, rows/s) and last ended jobs.
    ///
    /// Reads the monitor table (status, refreshed every status.interval), its log and the jobs
    /// table. --json for scripts; --watch SECS refreshes until Ctrl-C.
    Status(status::StatusArgs),
    /// Show a job's latency statistics: per minute (rows, rate, min/max/avg/stddev, absolute
    /// and relative to the job's minimum) and rows per latency range as a bar chart.
    ///
    /// Default: the pipeline's most recent job with statistics; --job J or --last N for
    /// others. Latency = commit time on the database clock − the row's queue time.
    Stats(stats::StatsArgs),
    /// The change journal of routed pipelines (ODI's J$): `lock` a subscriber's window, `purge`
    /// it after the downstream run succeeded, `status` of every subscriber's backlog.
    Journal(journal::JournalArgs),
    /// Run one step (--step N) or all steps (--step -1) of a job again: a route's rows from the
    /// job's journal file, or a post-job SQL step; for recovery, as ETL2's step selector.
    RunSteps(run_steps::RunStepsArgs),
    /// Create (or --drop) a point-in-time view over a pipeline's target table: the rows the
    /// database had inserted by --at TIME.
    ///
    /// The view filters on a column the database fills at insert (default db_time). Prints the
    /// view's name and its SQL.
    View(view::ViewArgs),
}

/// An error that also chooses the process's exit code (e.g. consolidate's result 2).
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    pub fn new(code: u8, message: impl Into<String>) -> Exit {
        Exit {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Parses the command line and runs the command; the binary's only entry point.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(f) = cli.log_format {
        let _ = LOG_FORMAT.set(f);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run => run::run(&cli.config).await,
            Command::Migrate => migrate::run(&cli.config).await,
            Command::Check(args) => check::run(&cli.config, args).await,
            Command::Feed(args) => feed::run(&cli.config, args).await,
            Command::Eoj(args) => eoj::run(&cli.config, args).await,
            Command::Replay(args) => replay::run(&cli.config, args).await,
            Command::Errors(args) => errors::run(&cli.config, args).await,
            Command::Consolidate(args) => consolidate::run(&cli.config, args).await,
            Command::Status(args) => status::run(&cli.config, args).await,
            Command::Stats(args) => stats::run(&cli.config, args).await,
            Command::View(args) => view::run(&cli.config, args).await,
            Command::Journal(args) => journal::run(&cli.config, args).await,
            Command::RunSteps(args) => run_steps::run(&cli.config, args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{e}` only: conveyor's error types already carry their cause in their message.
            eprintln!("error: {e}");
            match e.downcast_ref::<Exit>() {
                Some(x) => std::process::ExitCode::from(x.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// The pipeline named `name`, or the config's first when `None`.
pub fn pick_pipeline<'c>(
    config: &'c crate::config::Config,
    name: Option<&str>,
) -> anyhow::Result<&'c crate::config::PipelineConfig> {
    use anyhow::Context;
    match name {
        Some(name) => config
            .pipelines
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pipeline named {name:?} in {}", config.path.display())),
        None => config
            .pipelines
            .first()
            .context("the config defines no pipeline"),
    }
}

/// `--log-format`, when given: it wins over the config file's log.format.
static LOG_FORMAT: std::sync::OnceLock<crate::config::LogFormat> = std::sync::OnceLock::new();

/// Installs the tracing subscriber: `log.format` (or `--log-format`) and `log.level` from the
/// config; RUST_LOG wins over the level. In JSON every line carries its spans' fields
/// (pipeline, slot, job) as `span`/`spans`; pretty prints them as a `slot{…}:job{…}` prefix.
pub fn init_logging(format: crate::config::LogFormat, level: &str) {
    let format = LOG_FORMAT.get().copied().unwrap_or(format);
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Pretty => builder.try_init(),
    };
}

/// Errors unless conveyor's `tables` exist in `schema`, saying how to create them.
async fn check_tables(
    conn: &mut sqlx::postgres::PgConnection,
    schema: &str,
    tables: &[&str],
    config_path: &std::path::Path,
) -> anyhow::Result<()> {
    let s = crate::db::quote_ident(schema);
    for t in tables {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{s}.{t}"))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| anyhow::anyhow!("looking up conveyor's tables failed: {e}"))?;
        if !exists {
            anyhow::bail!(
                "schema {schema:?} has no {t} table: conveyor's tables are not created or not up to date there. Run `conveyor --config {} migrate` (or start `conveyor run`, which migrates), or check database.schema in the config",
                config_path.display()
            );
        }
    }
    Ok(())
}
