//! One `[[pipeline]]` section: its raw form, its defaults (each with the reason for its value),
//! and its validation into `PipelineConfig`, the parameters a job runs with.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::is_identifier;

/// How the queue is obtained at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueDeclare {
    /// Durable quorum queue with single-active-consumer (DESIGN §3: the default, and the only
    /// type whose handoffs are reliable on RabbitMQ 3.10).
    Quorum,
    /// Durable classic queue with single-active-consumer; tolerated, with a warning.
    Classic,
    /// Do not declare; check that the queue exists (for brokers the operator controls).
    Passive,
}

/// What to do with a JSON field that maps to no column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    /// The row goes to the error table with code `extra_field` (nothing is silently dropped).
    Reject,
    /// The field is ignored; the row loads.
    Ignore,
}

/// What owns a delivery once it is acked to the broker (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The slot's checkpoint spool: acked after an fsync, loaded exactly once even into a
    /// table without a key (robust marks), including after kill -9.
    Spool,
    /// No local state: acked after the batch commits. Messages with a message_id are loaded
    /// exactly once (the batch records their ids); messages without one at least once.
    Broker,
}

/// What a row whose unique key is already in the table does (DESIGN §4, `uv_<job>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// Plain insert: a duplicate key goes to `uv_<job>`. The first one of a job is found by the
    /// database (its COPY fails and the row is isolated); from then on every batch is checked
    /// against the table's unique keys before its COPY.
    Insert,
    /// As `insert`, but every batch is checked from the first one (`INSERT … ON CONFLICT DO
    /// NOTHING` semantics): for feeds where duplicates are expected.
    InsertIgnore,
}

/// How the two workers of a pipeline share the queue (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handoff {
    /// The queue's single-active-consumer: both workers register, the broker delivers to one
    /// and activates the other the moment it cancels.
    SingleActive,
    /// An exclusive consumer; the standby retries every `retry_ms` until the active one cancels.
    Exclusive,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub name: String,
    pub queue: String,
    #[serde(default = "default_declare")]
    pub queue_declare: QueueDeclare,
    /// The target table; optional when `route` sections name the tables (then the first
    /// route's table stands for the pipeline where one table is shown).
    #[serde(default)]
    pub target: Option<String>,
    /// Several tables, one numbered step each (`[[pipeline.route]]`).
    #[serde(default)]
    pub route: Vec<super::routes::RawRoute>,
    /// SQL run after each job whose load succeeded (`[[pipeline.post_step]]`).
    #[serde(default)]
    pub post_step: Vec<super::routes::RawPostStep>,
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    #[serde(default = "default_pack")]
    pub pack: u32,
    #[serde(default = "default_latency_ms")]
    pub latency_ms: u64,
    #[serde(default = "default_sessions")]
    pub sessions: u32,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default = "default_unknown_fields")]
    pub unknown_fields: UnknownFields,
    #[serde(default = "default_mode")]
    pub mode: LoadMode,
    #[serde(default = "default_queue_time_header")]
    pub queue_time_header: String,
    #[serde(default)]
    pub queue_time_field: Option<String>,
    #[serde(default)]
    pub queue_time_column: Option<String>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default = "default_handoff")]
    pub handoff: Handoff,
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
    /// End each job after this long (e.g. "1h", "5m"); "0s" never.
    #[serde(default = "default_rotate_every")]
    pub rotate_every: String,
    /// End a job that has loaded rows after this long without a message; "0s" never.
    #[serde(default = "default_idle_eoj")]
    pub idle_eoj: String,
    /// End a job after this many messages; 0 = no limit.
    #[serde(default)]
    pub max_rows: u64,
    /// End the job with priority when the queue holds more ready messages than this; 0 = off.
    #[serde(default)]
    pub depth_threshold: u64,
    /// How often the rotator reads the queue depth.
    #[serde(default = "default_depth_poll")]
    pub depth_poll: String,
    /// `pack` for the job that follows a priority EOJ (default: unchanged).
    #[serde(default)]
    pub priority_pack: Option<u32>,
    /// `sessions` for the job that follows a priority EOJ (default: unchanged).
    #[serde(default)]
    pub priority_sessions: Option<u32>,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Longest wait before a spooled delivery is fsynced (and acked).
    #[serde(default = "default_fsync_ms")]
    pub fsync_ms: u64,
    /// Spooled deliveries that trigger an fsync at once.
    #[serde(default = "default_fsync_rows")]
    pub fsync_rows: u32,
    /// Cut the spool back to the oldest uncommitted record this often…
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: String,
    /// …or after this many rows, whichever comes first.
    #[serde(default = "default_checkpoint_rows")]
    pub checkpoint_rows: u64,
    /// Keep a journal of every message each job read (`[journal] dir`).
    #[serde(default)]
    pub journal: bool,
    /// Delete this pipeline's journals older than this at job start.
    #[serde(default = "default_journal_keep")]
    pub journal_keep: String,
    /// `durability = "broker"`: how long loaded message_ids of a job that did not end cleanly
    /// are kept to recognise redeliveries (cover the longest outage you expect).
    #[serde(default = "default_dedup_keep")]
    pub dedup_keep: String,
}

fn default_durability() -> Durability {
    Durability::Spool
}
/// Acks are not on the row-latency path (a sealed batch asks for its fsync at once), so this
/// only bounds how long the broker waits for acks between batches.
fn default_fsync_ms() -> u64 {
    5
}
fn default_fsync_rows() -> u32 {
    2_000
}
/// The seed's checkpoint of 30 (here seconds, smaller: the spool holds every row since the
/// last checkpoint, and recovery reads it whole).
fn default_checkpoint_interval() -> String {
    "10s".into()
}
fn default_checkpoint_rows() -> u64 {
    100_000
}
fn default_journal_keep() -> String {
    "7d".into()
}
fn default_dedup_keep() -> String {
    "7d".into()
}

fn default_handoff() -> Handoff {
    Handoff::SingleActive
}
/// The seed's standby retry interval.
fn default_retry_ms() -> u64 {
    1_000
}
/// The seed's production schedule: one job per hour.
fn default_rotate_every() -> String {
    "1h".into()
}
/// The seed's idle timeout: a quiet queue still gets its job closed and post-processed.
fn default_idle_eoj() -> String {
    "5m".into()
}
fn default_depth_poll() -> String {
    "1s".into()
}
fn default_declare() -> QueueDeclare {
    QueueDeclare::Quorum
}
/// Eight default batches: every session busy, batches queued behind them, one filling, and the
/// broker still streaming while a batch's ack is in flight. Measured on a 200k-row drain: a
/// prefetch of less than (sessions + 2) × pack leaves the pipeline waiting for the broker.
/// Memory is bounded by prefetch × body size (~20 MB for 1 KB rows).
fn default_prefetch() -> u32 {
    20_000
}
/// Measured on a 200k-row backlog (2 cores): pack 1,000 → ~46k rows/s, 2,500 → ~60k, 5,000 →
/// ~63k; per-commit cost stops dominating around 2,500. A quiet queue is not slowed by a large
/// pack: its batches close at `latency_ms`.
fn default_pack() -> u32 {
    2_500
}
/// The seed's LATENCY: a quiet queue still sees its rows committed within this bound.
fn default_latency_ms() -> u64 {
    100
}
fn default_sessions() -> u32 {
    2
}
/// 1 MiB: far above a normal row, small enough that one bad publisher cannot exhaust memory.
fn default_max_body_bytes() -> u64 {
    1 << 20
}
fn default_unknown_fields() -> UnknownFields {
    UnknownFields::Reject
}
fn default_mode() -> LoadMode {
    LoadMode::Insert
}
fn default_queue_time_header() -> String {
    "x-queue-time".into()
}

/// One queue → one target table, with the parameters a job runs with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineConfig {
    pub name: String,
    pub queue: String,
    #[serde(skip)]
    pub queue_declare: QueueDeclare,
    /// Target table as (schema, table); schema `None` means the connection's search_path.
    pub target_schema: Option<String>,
    pub target_table: String,
    pub prefetch: u16,
    pub pack: usize,
    pub latency: Duration,
    pub sessions: usize,
    pub max_body_bytes: usize,
    #[serde(skip)]
    pub unknown_fields: UnknownFields,
    pub mode: LoadMode,
    pub queue_time_header: String,
    pub queue_time_field: Option<String>,
    pub queue_time_column: Option<String>,
    /// JSON field name (lower-cased) → column name.
    pub rename: BTreeMap<String, String>,
    pub handoff: Handoff,
    pub retry: Duration,
    /// `None`: never rotate on a schedule.
    pub rotate_every: Option<Duration>,
    pub idle_eoj: Option<Duration>,
    pub max_rows: Option<u64>,
    pub depth_threshold: Option<u64>,
    pub depth_poll: Duration,
    pub priority_pack: Option<usize>,
    pub priority_sessions: Option<usize>,
    pub durability: Durability,
    pub fsync_every: Duration,
    pub fsync_rows: usize,
    pub checkpoint_interval: Duration,
    pub checkpoint_rows: u64,
    pub journal: bool,
    pub journal_keep: Duration,
    pub dedup_keep: Duration,
    /// Routed pipelines: one entry per table, in step order (empty: `target` only).
    pub routes: Vec<super::routes::RouteConfig>,
    pub post_steps: Vec<super::routes::PostStep>,
}

impl RawPipeline {
    /// Checks this section (reported as `at`, e.g. `pipeline[0]`), adding every problem to
    /// `problems`; the result is meaningful only if none was added.
    pub(super) fn validate(self, at: &str, problems: &mut Vec<String>) -> PipelineConfig {
        let p = self;
        if !is_identifier(&p.name) {
            problems.push(format!(
                "{at}.name = {:?} must be a plain identifier (it becomes part of job and table names)",
                p.name
            ));
        } else if p.name.len() > 30 {
            problems.push(format!(
                "{at}.name = {:?} is longer than 30 bytes (error table names must fit in 63)",
                p.name
            ));
        }
        if p.queue.is_empty() || p.queue.len() > 255 {
            problems.push(format!("{at}.queue must be 1 to 255 bytes"));
        }
        let (routes, post_steps) = super::routes::validate(at, p.route, p.post_step, problems);
        let (target_schema, target_table) = match (&p.target, routes.first()) {
            (Some(t), _) => super::routes::split_table(t).unwrap_or_else(|| {
                problems.push(format!(
                    "{at}.target = {t:?} must be table or schema.table (plain identifiers)"
                ));
                (None, String::new())
            }),
            (None, Some(r)) => (r.target_schema.clone(), r.target_table.clone()),
            (None, None) => {
                problems.push(format!(
                    "{at} has no target: give `target = \"schema.table\"`, or [[pipeline.route]] sections for several tables"
                ));
                (None, String::new())
            }
        };
        if p.target.is_some() && !routes.is_empty() {
            problems.push(format!(
                "{at} has both target and route sections: with routes, each route names its table (drop target)"
            ));
        }
        if !routes.is_empty() && p.mode != LoadMode::Insert {
            problems.push(format!(
                "{at}.mode applies to a single target; with routes give each route its mode"
            ));
        }
        let prefetch = match u16::try_from(p.prefetch) {
            Ok(v) if v > 0 => v,
            _ => {
                problems.push(format!(
                    "{at}.prefetch = {} must be between 1 and 65535",
                    p.prefetch
                ));
                1
            }
        };
        if p.pack == 0 || p.pack > 100_000 {
            problems.push(format!(
                "{at}.pack = {} must be between 1 and 100000",
                p.pack
            ));
        }
        if p.latency_ms == 0 || p.latency_ms > 3_600_000 {
            problems.push(format!(
                "{at}.latency_ms = {} must be between 1 and 3600000",
                p.latency_ms
            ));
        }
        if p.sessions == 0 || p.sessions > 64 {
            problems.push(format!(
                "{at}.sessions = {} must be between 1 and 64",
                p.sessions
            ));
        }
        if u64::from(prefetch) < u64::from(p.pack) {
            problems.push(format!(
                "{at}.prefetch = {} is smaller than pack = {}: a batch could never fill (raise prefetch to at least pack × sessions)",
                prefetch, p.pack
            ));
        }
        if p.max_body_bytes < 2 || p.max_body_bytes > (64 << 20) {
            problems.push(format!(
                "{at}.max_body_bytes = {} must be between 2 and 67108864",
                p.max_body_bytes
            ));
        }
        if p.queue_time_header.is_empty() {
            problems.push(format!("{at}.queue_time_header must not be empty"));
        }
        if let Some(c) = &p.queue_time_column {
            if !is_identifier(c) {
                problems.push(format!(
                    "{at}.queue_time_column = {c:?} must be a plain identifier"
                ));
            }
        }
        for (field, column) in &p.rename {
            if !is_identifier(column) {
                problems.push(format!(
                    "{at}.rename.{field:?} = {column:?}: the column must be a plain identifier"
                ));
            }
        }
        let mut duration = |key: &str, text: &str, zero_is_none: bool| -> Option<Duration> {
            match humantime::parse_duration(text) {
                Ok(d) if d.is_zero() && zero_is_none => None,
                Ok(d) if d.is_zero() => {
                    problems.push(format!("{at}.{key} = {text:?} must be longer than 0"));
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push(format!(
                        "{at}.{key} = {text:?} is not a duration ({e}; e.g. \"1h\", \"5m\", \"2s\", \"500ms\"{})",
                        if zero_is_none { "; \"0s\" disables it" } else { "" }
                    ));
                    None
                }
            }
        };
        let rotate_every = duration("rotate_every", &p.rotate_every, true);
        let idle_eoj = duration("idle_eoj", &p.idle_eoj, true);
        let depth_poll =
            duration("depth_poll", &p.depth_poll, false).unwrap_or(Duration::from_secs(1));
        let checkpoint_interval = duration("checkpoint_interval", &p.checkpoint_interval, false)
            .unwrap_or(Duration::from_secs(10));
        let journal_keep = duration("journal_keep", &p.journal_keep, false)
            .unwrap_or(Duration::from_secs(86_400 * 7));
        let dedup_keep =
            duration("dedup_keep", &p.dedup_keep, false).unwrap_or(Duration::from_secs(86_400 * 7));
        if p.fsync_ms == 0 || p.fsync_ms > 10_000 {
            problems.push(format!(
                "{at}.fsync_ms = {} must be between 1 and 10000",
                p.fsync_ms
            ));
        }
        if p.fsync_rows == 0 {
            problems.push(format!("{at}.fsync_rows must be at least 1"));
        }
        if p.checkpoint_rows == 0 {
            problems.push(format!("{at}.checkpoint_rows must be at least 1"));
        }
        if p.retry_ms == 0 || p.retry_ms > 60_000 {
            problems.push(format!(
                "{at}.retry_ms = {} must be between 1 and 60000",
                p.retry_ms
            ));
        }
        if p.priority_pack.is_some_and(|v| v == 0 || v > 100_000) {
            problems.push(format!("{at}.priority_pack must be between 1 and 100000"));
        } else if p.priority_pack.is_some_and(|v| v > u32::from(prefetch)) {
            problems.push(format!(
                "{at}.priority_pack = {} is larger than prefetch = {prefetch}: its batches could never fill (raise prefetch)",
                p.priority_pack.unwrap_or_default()
            ));
        }
        if p.priority_sessions.is_some_and(|v| v == 0 || v > 64) {
            problems.push(format!("{at}.priority_sessions must be between 1 and 64"));
        }
        PipelineConfig {
            name: p.name,
            queue: p.queue,
            queue_declare: p.queue_declare,
            target_schema,
            target_table,
            prefetch,
            pack: p.pack as usize,
            latency: Duration::from_millis(p.latency_ms),
            sessions: p.sessions as usize,
            max_body_bytes: p.max_body_bytes as usize,
            unknown_fields: p.unknown_fields,
            mode: p.mode,
            queue_time_header: p.queue_time_header,
            queue_time_field: p.queue_time_field.filter(|f| !f.is_empty()),
            queue_time_column: p.queue_time_column,
            rename: p
                .rename
                .into_iter()
                .map(|(k, v)| (k.to_lowercase(), v.to_lowercase()))
                .collect(),
            handoff: p.handoff,
            retry: Duration::from_millis(p.retry_ms),
            rotate_every,
            idle_eoj,
            max_rows: (p.max_rows > 0).then_some(p.max_rows),
            depth_threshold: (p.depth_threshold > 0).then_some(p.depth_threshold),
            depth_poll,
            priority_pack: p.priority_pack.map(|v| v as usize),
            priority_sessions: p.priority_sessions.map(|v| v as usize),
            durability: p.durability,
            fsync_every: Duration::from_millis(p.fsync_ms),
            fsync_rows: p.fsync_rows as usize,
            checkpoint_interval,
            checkpoint_rows: p.checkpoint_rows,
            journal: p.journal,
            journal_keep,
            dedup_keep,
            routes,
            post_steps,
        }
    }
}
