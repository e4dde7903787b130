//! `conveyor check`: everything `conveyor run` would trip over, found before it runs — the
//! config, each pipeline's queue (exists or will be declared, its type and
//! single-active-consumer), its target table (exists, the messages' fields map onto its
//! columns, the privileges conveyor needs) and the free space where the spools and journals go.
//!
//! Read-only, with one exception: when the management API cannot be reached, an existing
//! queue's type is checked by declaring it again with the arguments conveyor would use. The
//! broker answers PRECONDITION_FAILED if they differ and changes nothing if they match, which is
//! exactly the declare `conveyor run` does at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

mod queue;
mod table;

use crate::config::{Config, ConfigError, Handoff, PipelineConfig, QueueDeclare};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Check only this pipeline (default: every pipeline in the config).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Print {pipelines:[{name, plan, problems}], problems, warnings, disk} as JSON instead of
    /// text; `problems` lists every pipeline's problems too (empty = ready to run).
    #[arg(long)]
    pub json: bool,
}

/// Free space below which a spool or journal directory gets a warning: a spool holds every row
/// since the last checkpoint, and a full disk stops acking (DESIGN §5).
const LOW_DISK: u64 = 1 << 30;

/// Port of RabbitMQ's management plugin, the only place a queue's arguments can be read.
const MANAGEMENT_PORT: u16 = 15672;

#[derive(Debug, Default, Serialize)]
struct Report {
    pipelines: Vec<PipelineReport>,
    /// Every problem (config, disk and each pipeline's, prefixed with its name): exit 1 if any.
    problems: Vec<String>,
    /// Worth knowing, not blocking (e.g. little free disk).
    warnings: Vec<String>,
    disk: Vec<Disk>,
}

#[derive(Debug, Serialize)]
struct PipelineReport {
    name: String,
    plan: Plan,
    problems: Vec<String>,
    warnings: Vec<String>,
}

/// What `conveyor run` will do for one pipeline, with what the check found.
#[derive(Debug, Serialize)]
struct Plan {
    queue: String,
    target: String,
    queue_declare: &'static str,
    /// "exists, N ready, M consumers", "missing: will be declared (…)", or why unknown.
    queue_state: String,
    /// The queue's type and single-active-consumer, or why they were not checked.
    queue_type: String,
    durability: crate::config::Durability,
    mode: crate::config::LoadMode,
    handoff: crate::config::Handoff,
    pack: usize,
    sessions: usize,
    prefetch: u16,
    latency_ms: u128,
    rotate_every: String,
    idle_eoj: String,
    journal: bool,
    /// Columns of the target table (None: not read).
    columns: Option<usize>,
    /// Columns conveyor writes (the COPY columns); the others the database fills.
    columns_mapped: Option<usize>,
    unique_keys: Vec<String>,
    /// A routed pipeline's steps: each route (table, rule, mode) and post-job step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps: Vec<String>,
    /// conveyor's own schema (jobs, error tables): ready, or created by `conveyor run`.
    conveyor_schema: String,
}

#[derive(Debug, Serialize)]
struct Disk {
    what: &'static str,
    dir: PathBuf,
    /// Free bytes for an unprivileged user; None when the filesystem could not be read.
    free_bytes: Option<u64>,
}

pub async fn run(config_path: &Path, args: CheckArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    match Config::load(config_path) {
        Ok(config) => {
            // lapin logs every channel the broker closes; check closes some on purpose (a passive
            // declare of a missing queue) and reports every AMQP error itself.
            super::init_logging(config.log_format, "warn,lapin=off");
            check_config(&config, args.pipeline.as_deref(), &mut report).await;
        }
        Err(e) => {
            super::init_logging(crate::config::LogFormat::Pretty, "warn,lapin=off");
            match e {
                // One problem per entry: Config::load already collected all of them.
                ConfigError::Invalid { path, problems } => report.problems.extend(
                    problems
                        .into_iter()
                        .map(|p| format!("config {}: {p}", path.display())),
                ),
                other => report.problems.push(format!("config: {other}")),
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(super::Exit::new(
            1,
            format!(
                "{} problem(s) found (listed above): fix them and run `conveyor check` again",
                report.problems.len()
            ),
        )
        .into())
    }
}

async fn check_config(config: &Config, only: Option<&str>, report: &mut Report) {
    let pipelines: Vec<&PipelineConfig> = match only {
        Some(_) => match super::pick_pipeline(config, only) {
            Ok(p) => vec![p],
            Err(e) => {
                let names: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
                report
                    .problems
                    .push(format!("{e} (configured: {})", names.join(", ")));
                return;
            }
        },
        None => config.pipelines.iter().collect(),
    };
    for p in pipelines {
        let r = check_pipeline(config, p).await;
        report.problems.extend(
            r.problems
                .iter()
                .map(|x| format!("pipeline {}: {x}", r.name)),
        );
        report.warnings.extend(
            r.warnings
                .iter()
                .map(|x| format!("pipeline {}: {x}", r.name)),
        );
        report.pipelines.push(r);
    }
    let mut dirs = vec![("state dir", &config.state_dir)];
    if config.pipelines.iter().any(|p| p.journal) {
        dirs.push(("journal dir", &config.journal_dir));
    }
    for (what, dir) in dirs {
        let free = free_bytes(dir);
        match &free {
            Ok(n) if *n < LOW_DISK => report.warnings.push(format!(
                "{what} {}: only {} MiB free (under 1 GiB); a full disk stops the spool, and with it the acks",
                dir.display(),
                *n >> 20
            )),
            Ok(_) => {}
            Err(e) => report.warnings.push(format!(
                "{what} {}: cannot read its filesystem's free space: {e}",
                dir.display()
            )),
        }
        report.disk.push(Disk {
            what,
            dir: dir.clone(),
            free_bytes: free.ok(),
        });
    }
}

fn declare_name(d: QueueDeclare) -> &'static str {
    match d {
        QueueDeclare::Quorum => "quorum",
        QueueDeclare::Classic => "classic",
        QueueDeclare::Passive => "passive",
    }
}

fn never_or(d: Option<Duration>) -> String {
    d.map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "never".into())
}

async fn check_pipeline(config: &Config, p: &PipelineConfig) -> PipelineReport {
    let target = match &p.target_schema {
        Some(s) => format!("{s}.{}", p.target_table),
        None => p.target_table.clone(),
    };
    let mut r = PipelineReport {
        name: p.name.clone(),
        plan: Plan {
            queue: p.queue.clone(),
            target,
            queue_declare: declare_name(p.queue_declare),
            queue_state: "not checked".into(),
            queue_type: "not checked".into(),
            durability: p.durability,
            mode: p.mode,
            handoff: p.handoff,
            pack: p.pack,
            sessions: p.sessions,
            prefetch: p.prefetch,
            latency_ms: p.latency.as_millis(),
            rotate_every: never_or(p.rotate_every),
            idle_eoj: never_or(p.idle_eoj),
            journal: p.journal,
            columns: None,
            columns_mapped: None,
            unique_keys: Vec::new(),
            steps: Vec::new(),
            conveyor_schema: "not checked".into(),
        },
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    queue::check_queue(config, p, &mut r).await;
    table::check_table(config, p, &mut r).await;
    r
}

// ---- RabbitMQ ----------------------------------------------------------------------------

/// Free bytes (for an unprivileged user) of the filesystem `dir` is or will be on: `dir` may
/// not exist yet (conveyor creates it), so its nearest existing ancestor is asked.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(dir)
    };
    let existing = abs
        .ancestors()
        .find(|a| a.exists())
        .ok_or_else(|| std::io::Error::other("no existing ancestor"))?;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: `c` is a NUL-terminated path and `st` a zeroed statvfs that the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

// ---- Output ------------------------------------------------------------------------------

/// A setting as it is written in the config file (`spool`, `insert_ignore`, …).
fn wire<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

fn print_text(report: &Report) {
    for r in &report.pipelines {
        let p = &r.plan;
        println!(
            "pipeline {}: queue {} → table {}",
            r.name, p.queue, p.target
        );
        println!(
            "  queue         {} (queue_declare = {})",
            p.queue_state, p.queue_declare
        );
        println!("  queue type    {}", p.queue_type);
        println!(
            "  durability    {}, mode {}, handoff {}",
            wire(&p.durability),
            wire(&p.mode),
            wire(&p.handoff)
        );
        println!(
            "  batches       pack {} rows or {} ms, {} session(s), prefetch {}",
            p.pack, p.latency_ms, p.sessions, p.prefetch
        );
        println!(
            "  jobs          rotate every {}, idle end after {}, journal {}",
            p.rotate_every,
            p.idle_eoj,
            if p.journal { "on" } else { "off" }
        );
        match (p.columns_mapped, p.columns) {
            (Some(m), Some(n)) => {
                println!("  columns       {m} mapped of {n} (the others the database fills)")
            }
            (None, Some(n)) => println!("  columns       {n}, mapping refused (see problems)"),
            _ => println!("  columns       not read"),
        }
        println!(
            "  unique keys   {}",
            if p.unique_keys.is_empty() {
                "none".to_string()
            } else {
                p.unique_keys.join("; ")
            }
        );
        for step in &p.steps {
            println!("  {step}");
        }
        println!("  error tables  in schema {}", p.conveyor_schema);
    }
    for d in &report.disk {
        let free = d.free_bytes.map_or("unknown".to_string(), |n| {
            format!("{:.1} GiB free", n as f64 / (1u64 << 30) as f64)
        });
        println!("{} {}: {free}", d.what, d.dir.display());
    }
    if !report.warnings.is_empty() {
        println!("warnings:");
        for w in &report.warnings {
            println!("  - {w}");
        }
    }
    if report.problems.is_empty() {
        println!("no problems: ready for `conveyor run`");
    } else {
        println!("problems:");
        for x in &report.problems {
            println!("  - {x}");
        }
    }
}
