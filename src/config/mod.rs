//! Configuration: the TOML file, environment overrides, and validation.
//!
//! `RawConfig` mirrors the file exactly (`deny_unknown_fields`, so a typo is an error, not a
//! silently ignored key); `validate()` turns it into `Config`, whose values are already checked:
//! identifiers are safe to quote into SQL, sizes are non-zero, URLs parse. Every error names the
//! file, the key and what is allowed, because the person reading it is an operator at 3 a.m.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod pipeline;
mod routes;

pub use routes::{split_table, Identity, PostStep, RouteConfig, RouteMode};

pub use pipeline::{
    Durability, Handoff, LoadMode, PipelineConfig, QueueDeclare, RawPipeline, UnknownFields,
};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
    pub state: RawState,
    #[serde(default)]
    pub journal: RawJournal,
    #[serde(default)]
    pub consolidate: RawConsolidate,
    #[serde(default)]
    pub status: RawStatus,
    #[serde(default)]
    pub watchdog: RawWatchdog,
    #[serde(default)]
    pub stats: RawStats,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default)]
    pub pipeline: Vec<RawPipeline>,
}

/// `[alerts]`: thresholds of the alerts the daemon evaluates itself (`conveyor_alert`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Rows/s below which a pipeline whose queue holds messages is "low_rate"; 0 = off.
    #[serde(default)]
    pub low_rate: f64,
    /// A handoff longer than this is "slow_handoff".
    #[serde(default = "default_slow_handoff_ms")]
    pub slow_handoff_ms: u64,
}

impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            low_rate: 0.0,
            slow_handoff_ms: default_slow_handoff_ms(),
        }
    }
}

/// The seed's rotation took under 2 s; conveyor's handoffs take tens of ms, so 1 s means trouble.
fn default_slow_handoff_ms() -> u64 {
    1_000
}

/// `[stats]`: latency statistics (`latency_minute`, `latency_histogram`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStats {
    /// Upper bounds in seconds of the latency ranges, increasing; below the first and above the
    /// last are ranges of their own (default: 0, 0.1, 0.25, 0.5, 1, 2, …, 10, 20, 30, 60).
    #[serde(default)]
    pub latency_buckets: Option<Vec<f64>>,
}

/// `[status]`: the monitor table (`conveyor.status`, one row per running job).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatus {
    /// How often a running job's row is updated (each update is logged in `status_log`).
    #[serde(default = "default_status_interval")]
    pub interval: String,
}

impl Default for RawStatus {
    fn default() -> Self {
        Self {
            interval: default_status_interval(),
        }
    }
}

/// The seed's monitor cadence: often enough to see a stall, rare enough to keep the log small.
fn default_status_interval() -> String {
    "60s".into()
}

/// `[watchdog]`: when systemd's watchdog (`WatchdogSec`) stops being fed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatchdog {
    /// A worker whose loop has not turned for this long, outside a deliberate wait (backoff,
    /// database outage), is wedged: conveyor stops sending WATCHDOG=1 and systemd restarts it.
    #[serde(default = "default_wedged_after")]
    pub wedged_after: String,
}

impl Default for RawWatchdog {
    fn default() -> Self {
        Self {
            wedged_after: default_wedged_after(),
        }
    }
}

/// Well above the worker loop's slowest turn (a 10 s bounded AMQP operation, 10 s timers).
fn default_wedged_after() -> String {
    "2m".into()
}

/// `[consolidate]`: moving each ended job's error tables into `error_history` (DESIGN §4).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsolidate {
    /// Rows moved per transaction: bounds lock time and WAL per step; a killed run loses at
    /// most one step's work, which the next run redoes.
    #[serde(default = "default_consolidate_limit")]
    pub limit: u32,
    /// `conveyor consolidate --override` takes over a run that has held the lock this long.
    #[serde(default = "default_override_after")]
    pub override_after: String,
    /// Whether the rotator consolidates after every job (off: run `conveyor consolidate`
    /// from cron instead).
    #[serde(default = "default_true")]
    pub after_job: bool,
}

impl Default for RawConsolidate {
    fn default() -> Self {
        Self {
            limit: default_consolidate_limit(),
            override_after: default_override_after(),
            after_job: true,
        }
    }
}

fn default_consolidate_limit() -> u32 {
    10_000
}
fn default_override_after() -> String {
    "1h".into()
}
fn default_true() -> bool {
    true
}

/// Validated `[consolidate]`.
#[derive(Debug, Clone)]
pub struct ConsolidateConfig {
    pub limit: u32,
    pub override_after: Duration,
    pub after_job: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// Directory for the checkpoint spools `<dir>/<pipeline>/<slot>/checkpoint.spool`; must be
    /// on a local disk that survives a restart (systemd: StateDirectory).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for RawState {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJournal {
    /// Directory for job journals `<job>.journal` (pipelines with `journal = true`).
    #[serde(default = "default_journal_dir")]
    pub dir: PathBuf,
}

impl Default for RawJournal {
    fn default() -> Self {
        Self {
            dir: default_journal_dir(),
        }
    }
}

fn default_journal_dir() -> PathBuf {
    PathBuf::from("journal")
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
    pub state_dir: PathBuf,
    pub journal_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    pub consolidate: ConsolidateConfig,
    pub status_interval: Duration,
    /// `[watchdog] wedged_after`.
    pub wedged_after: Duration,
    /// Upper bounds (s) of the latency ranges, strictly increasing.
    pub latency_buckets: Vec<f64>,
    pub alerts: crate::monitor::Thresholds,
    pub pipelines: Vec<PipelineConfig>,
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
        if self.consolidate.limit == 0 || self.consolidate.limit > 1_000_000 {
            problems.push(format!(
                "consolidate.limit = {} must be between 1 and 1000000",
                self.consolidate.limit
            ));
        }
        let override_after = match humantime::parse_duration(&self.consolidate.override_after) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!(
                    "consolidate.override_after = {:?} is not a duration ({e}; e.g. \"30m\", \"1h\")",
                    self.consolidate.override_after
                ));
                Duration::ZERO
            }
        };
        let status_interval = match humantime::parse_duration(&self.status.interval) {
            Ok(d) if d >= Duration::from_millis(100) => d,
            _ => {
                problems.push(format!(
                    "status.interval = {:?} must be a duration of at least 100ms (e.g. \"60s\")",
                    self.status.interval
                ));
                Duration::from_secs(60)
            }
        };
        let wedged_after = match humantime::parse_duration(&self.watchdog.wedged_after) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            _ => {
                problems.push(format!(
                    "watchdog.wedged_after = {:?} must be a duration of at least 1s (e.g. \"2m\")",
                    self.watchdog.wedged_after
                ));
                Duration::from_secs(120)
            }
        };
        let latency_buckets = self
            .stats
            .latency_buckets
            .unwrap_or_else(|| crate::stats::DEFAULT_BUCKETS.to_vec());
        if latency_buckets.is_empty()
            || latency_buckets.len() > 100
            || latency_buckets.iter().any(|b| !b.is_finite())
            || latency_buckets.windows(2).any(|w| w[0] >= w[1])
        {
            problems.push(format!(
                "stats.latency_buckets = {latency_buckets:?} must be 1 to 100 finite, strictly increasing bounds in seconds (e.g. [0, 0.5, 1, 2, 5])"
            ));
        }
        if !self.alerts.low_rate.is_finite() || self.alerts.low_rate < 0.0 {
            problems.push(format!(
                "alerts.low_rate = {} must be a rate in rows/s ≥ 0 (0 turns the alert off)",
                self.alerts.low_rate
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
            if !names.insert(p.name.clone()) {
                problems.push(format!("{at}.name = {:?} is used twice", p.name));
            }
            pipelines.push(p.validate(&at, &mut problems));
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
            state_dir: self.state.dir,
            journal_dir: self.journal.dir,
            log_format: self.log.format,
            log_level: self.log.level,
            consolidate: ConsolidateConfig {
                limit: self.consolidate.limit,
                override_after,
                after_job: self.consolidate.after_job,
            },
            status_interval,
            wedged_after,
            latency_buckets,
            alerts: crate::monitor::Thresholds {
                low_rate: self.alerts.low_rate,
                slow_handoff: Duration::from_millis(self.alerts.slow_handoff_ms),
            },
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
