//! Configuration: the TOML file, environment overrides, and validation.
//!
//! `RawConfig` mirrors the file exactly (`deny_unknown_fields`, so a typo is an error, not a
//! silently ignored key); `validate()` turns it into `Config`, whose values are already checked:
//! identifiers are safe to quote into SQL, sizes are non-zero, URLs parse. Every error names the
//! file, the key and what is allowed, because the person reading it is an operator at 3 a.m.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variable that overrides `amqp.url` (keeps secrets out of the file).
pub const ENV_AMQP_URL: &str = "CONVEYOR_AMQP_URL";
/// Environment variable that overrides `database.url`.
pub const ENV_DATABASE_URL: &str = "CONVEYOR_DATABASE_URL";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass --config FILE or create config/conveyor.toml)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub amqp: RawAmqp,
    pub database: RawDatabase,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub report: RawReport,
    #[serde(default)]
    pub pipeline: Vec<RawPipeline>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    /// Directory for job reports `<job>.output`; created if missing.
    #[serde(default = "default_report_dir")]
    pub dir: PathBuf,
}

impl Default for RawReport {
    fn default() -> Self {
        Self {
            dir: default_report_dir(),
        }
    }
}

fn default_report_dir() -> PathBuf {
    PathBuf::from("reports")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmqp {
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_schema")]
    pub schema: String,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` for /metrics, /healthz and /readyz; empty string disables the listener.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub name: String,
    pub queue: String,
    #[serde(default = "default_declare")]
    pub queue_declare: QueueDeclare,
    pub target: String,
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

fn default_schema() -> String {
    "conveyor".into()
}
/// Long enough for a loaded server, short enough that a wrong URL fails while someone watches.
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_listen() -> String {
    "127.0.0.1:9187".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Pretty
}
fn default_log_level() -> String {
    "info".into()
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
fn default_queue_time_header() -> String {
    "x-queue-time".into()
}

/// A URL whose password is hidden when displayed or logged.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The full URL, password included: only for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                write!(f, "{u}")
            }
            Err(_) => f.write_str("<unparseable url>"),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// True when read from `path` (`load`), so each job start re-reads it; false for a config
    /// built from text (tests, benches, embedding).
    pub reloadable: bool,
    pub amqp_url: SecretUrl,
    pub database_url: SecretUrl,
    /// Schema for conveyor's own objects (jobs, error tables); a checked identifier.
    pub schema: String,
    pub connect_timeout: Duration,
    pub http_listen: Option<SocketAddr>,
    pub report_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    pub pipelines: Vec<PipelineConfig>,
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
}

impl Config {
    /// Reads, parses and validates `path`, then applies the environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml(path, &text, |k| std::env::var(k).ok())?;
        config.reloadable = true;
        Ok(config)
    }

    /// Parses `text` as if read from `path`; `env` supplies overrides (a seam for tests).
    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_toml_error(&e),
        })?;
        raw.validate(path, env)
    }
}

fn describe_toml_error(e: &toml::de::Error) -> String {
    // toml's Display names the line and shows it with a caret under the offending value/key.
    format!(
        "{}\n(see config/conveyor.toml for every key and its allowed values)",
        e.to_string().trim_end()
    )
}

/// A SQL identifier conveyor will quote into statements: letters, digits, `_`, starting with a
/// letter or `_`, at most 63 bytes (PostgreSQL's NAMEDATALEN - 1).
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

impl RawConfig {
    fn validate(
        self,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let amqp_url = env(ENV_AMQP_URL).or(self.amqp.url).unwrap_or_default();
        if amqp_url.is_empty() {
            problems.push(format!(
                "amqp.url is missing: set it in the file or in {ENV_AMQP_URL} (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)"
            ));
        } else if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            problems.push("amqp.url must start with amqp:// or amqps://".into());
        }
        let database_url = env(ENV_DATABASE_URL)
            .or(self.database.url)
            .unwrap_or_default();
        if database_url.is_empty() {
            problems.push(format!(
                "database.url is missing: set it in the file or in {ENV_DATABASE_URL} (e.g. postgres://postgres@127.0.0.1:5432/test)"
            ));
        } else if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            problems.push("database.url must start with postgres:// or postgresql://".into());
        }
        if !is_identifier(&self.database.schema) {
            problems.push(format!(
                "database.schema = {:?} is not a plain identifier (letters, digits, _; at most 63 bytes)",
                self.database.schema
            ));
        }
        if self.database.connect_timeout_ms == 0 {
            problems.push("database.connect_timeout_ms must be > 0".into());
        }
        let http_listen = if self.http.listen.is_empty() {
            None
        } else {
            match self.http.listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(format!(
                        "http.listen = {:?} is not host:port (e.g. 127.0.0.1:9187; \"\" disables it)",
                        self.http.listen
                    ));
                    None
                }
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!(
                "log.level = {:?} is not a level or filter (error, warn, info, debug, trace, or e.g. \"conveyor=debug\")",
                self.log.level
            ));
        }
        if self.pipeline.is_empty() {
            problems
                .push("no [[pipeline]] section: define at least one queue → table pipeline".into());
        }
        let mut pipelines = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.pipeline.into_iter().enumerate() {
            let at = format!("pipeline[{i}]");
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
            if !names.insert(p.name.clone()) {
                problems.push(format!("{at}.name = {:?} is used twice", p.name));
            }
            if p.queue.is_empty() || p.queue.len() > 255 {
                problems.push(format!("{at}.queue must be 1 to 255 bytes"));
            }
            let (target_schema, target_table) = match p.target.split_once('.') {
                Some((s, t)) => (Some(s.to_string()), t.to_string()),
                None => (None, p.target.clone()),
            };
            if !target_schema.as_deref().is_none_or(is_identifier) || !is_identifier(&target_table)
            {
                problems.push(format!(
                    "{at}.target = {:?} must be table or schema.table (plain identifiers)",
                    p.target
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
            pipelines.push(PipelineConfig {
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
            });
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            reloadable: false,
            amqp_url: SecretUrl::new(amqp_url),
            database_url: SecretUrl::new(database_url),
            schema: self.database.schema,
            connect_timeout: Duration::from_millis(self.database.connect_timeout_ms),
            http_listen,
            report_dir: self.report.dir,
            log_format: self.log.format,
            log_level: self.log.level,
            pipelines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[amqp]
url = "amqp://guest:secret@127.0.0.1:5672/%2f"
[database]
url = "postgres://postgres@127.0.0.1:5432/test"
[[pipeline]]
name = "person"
queue = "q"
target = "public.person"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("t.toml"), text, |_| None)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        let p = &c.pipelines[0];
        assert_eq!(p.pack, 2500);
        assert_eq!(p.sessions, 2);
        assert_eq!(p.queue_declare, QueueDeclare::Quorum);
        assert_eq!(p.target_schema.as_deref(), Some("public"));
        assert_eq!(c.schema, "conveyor");
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let text = MINIMAL.replace("queue = \"q\"", "queue = \"q\"\npakc = 5");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("pakc"), "{err}");
        assert!(err.starts_with("t.toml"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = MINIMAL.replace("queue = \"q\"", "queue = \"q\"\npack = \"many\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("pack"), "{err}");
    }

    #[test]
    fn impossible_values_are_all_listed() {
        let text = MINIMAL.replace("queue = \"q\"", "queue = \"q\"\npack = 0\nsessions = 0");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("pack = 0"), "{err}");
        assert!(err.contains("sessions = 0"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_password_is_hidden() {
        let c = Config::from_toml(Path::new("t.toml"), MINIMAL, |k| {
            (k == ENV_DATABASE_URL).then(|| "postgres://u:hunter2@db:5432/x".to_string())
        })
        .expect("valid");
        assert_eq!(c.database_url.expose(), "postgres://u:hunter2@db:5432/x");
        let shown = format!("{} {:?} {:?}", c.database_url, c.amqp_url, c);
        assert!(
            !shown.contains("hunter2") && !shown.contains("secret"),
            "{shown}"
        );
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("person_01"));
        assert!(!is_identifier("1abc"));
        assert!(!is_identifier("a-b"));
        assert!(!is_identifier("a\"b"));
        assert!(!is_identifier(""));
    }
}
