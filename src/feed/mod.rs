//! Feed: the test publisher behind `conveyor feed`.
//!
//! It owns everything needed to put realistic load on a queue without a separate tool:
//! generating seed-like rows for the demo `person` table (deploy/sql/person.sql), with a chosen
//! share of deliberately bad rows whose reject codes are known in advance, and publishing them
//! (or the lines of a JSON-lines file) with the header conventions the daemon reads
//! (`x-queue-time`, message id), persistent and with publisher confirms.
//!
//! Why it lives in the crate: tests and benchmarks need to know *exactly* what was published —
//! how many rows should load, how many should be rejected and under which code, and a checksum
//! of the loaded ids — so they can check the daemon end to end. The [`FeedReport`] is that
//! ground truth. Generation is deterministic from the seed, so a failing run can be replayed.
//!
//! Re-sending refused rows: `conveyor errors --export FILE` writes each error row as a JSON
//! object (the *export envelope*) carrying the message's payload; `--file` recognises such a
//! line and publishes the payload, not the envelope — see [`envelope_payload`] for the exact
//! rule, which an ordinary row does not meet.
//!
//! Throughput: publishes are queued on one channel in call order (which keeps the order of
//! rows, so a duplicate always follows its original), and up to [`CONFIRM_WINDOW`] of them may
//! be outstanding — not yet written or not yet confirmed — instead of one round trip per
//! message. A nack, or a message returned as unroutable, fails the feed.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::ConfirmSelectOptions;
use lapin::Connection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncBufReadExt;

use crate::config::{QueueDeclare, SecretUrl};
use crate::source::{self, SourceError};

pub(crate) mod publish;
mod rows;
mod vocab;

use publish::Publisher;

pub use rows::person_row;

/// Outstanding publisher confirms allowed before the publisher waits for the oldest one.
pub const CONFIRM_WINDOW: usize = 2_000;

/// Header carrying the publish time in microseconds since the epoch (the daemon's default
/// `queue_time_header`).
pub const QUEUE_TIME_HEADER: &str = "x-queue-time";

/// Pacing granularity when a rate is set: messages go out in small bursts at most this often.
const PACE_TICK: Duration = Duration::from_millis(10);

/// Keys in a generated body: the 33 columns of `person` minus `db_time` (filled by the
/// database) and `queue_time` (carried in the [`QUEUE_TIME_HEADER`] header).
pub const PERSON_BODY_KEYS: usize = 31;

/// How many recent good ids a duplicate may copy from.
const RECENT_GOOD: usize = 4_096;

/// A deliberate defect in a generated row; each bad row has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadKind {
    /// The id repeats the id of a good row published earlier in the run.
    DuplicateKey,
    /// `last_update` is "2021-02-30".
    InvalidDate,
    /// `age` is "4x2".
    LettersInInteger,
    /// `income` is "12a4.50".
    LettersInDecimal,
    /// `creditexp` is "9999999-01-01".
    DateOutOfRange,
}

impl BadKind {
    pub const ALL: [BadKind; 5] = [
        BadKind::DuplicateKey,
        BadKind::InvalidDate,
        BadKind::LettersInInteger,
        BadKind::LettersInDecimal,
        BadKind::DateOutOfRange,
    ];

    /// The reject code conveyor records for a row with this defect.
    pub fn as_str(self) -> &'static str {
        match self {
            BadKind::DuplicateKey => "duplicate_key",
            BadKind::InvalidDate => "invalid_date",
            BadKind::LettersInInteger => "invalid_integer",
            BadKind::LettersInDecimal => "invalid_decimal",
            BadKind::DateOutOfRange => "date_out_of_range",
        }
    }
}

impl std::fmt::Display for BadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct FeedOptions {
    pub amqp_url: SecretUrl,
    pub queue: String,
    /// Declare the queue the same way the daemon does before publishing.
    pub declare: QueueDeclare,
    /// Rows to publish (ignored when `file` is `Some`: every line is published).
    pub count: u64,
    /// Rows per second, 0 = as fast as possible.
    pub rate: u64,
    /// 0..=100: share of generated rows that are bad, spread evenly over the 5 kinds.
    pub errors_pct: f64,
    /// JSON lines: each non-empty line is one message body, published as is — except an
    /// export envelope of `conveyor errors --export`, whose payload is published instead
    /// ([`envelope_payload`]).
    pub file: Option<PathBuf>,
    /// RNG seed: same seed → same rows.
    pub seed: u64,
    /// First generated id number (so several feeds into one table do not collide).
    pub id_base: u64,
    /// Show an indicatif progress bar with the rate.
    pub progress: bool,
    /// Publish to this exchange (which must exist), with each message's id as routing key,
    /// instead of to `queue`: a consistent-hash exchange then shards the stream over its
    /// queues (docs/scaling.md).
    pub exchange: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FeedReport {
    /// Messages published and confirmed by the broker.
    pub published: u64,
    /// Rows expected to load.
    pub good: u64,
    /// Rows expected to be rejected, by defect.
    pub bad: BTreeMap<BadKind, u64>,
    /// Sum of the numeric ids of the good rows (checksum for tests).
    pub good_id_sum: u128,
    pub seconds: f64,
}

impl FeedReport {
    /// Total bad rows over all kinds.
    pub fn bad_total(&self) -> u64 {
        self.bad.values().sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("invalid feed options: {0}")]
    Options(String),
    #[error("cannot read feed file {path}: {source} (check the path given with --file; it must be a readable JSON-lines file)")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {reason}. The line is an export of `conveyor errors` (keys job, kind, seq, code and body, body_base64 or body_hex): fix it (or delete it) and feed the file again; {published}")]
    Envelope {
        path: PathBuf,
        line: u64,
        reason: String,
        /// What was published before the bad line.
        published: String,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("AMQP {what} failed: {source} (the broker closed the channel or connection; check the RabbitMQ log and `rabbitmqctl status` for alarms, then rerun the feed)")]
    Amqp {
        what: &'static str,
        source: lapin::Error,
    },
    #[error("the broker refused (nack) message {message_id} on queue {queue:?}: it could not store it — check `rabbitmqctl status` for a disk or memory alarm and the queue's length limit, then rerun the feed")]
    Nacked { queue: String, message_id: String },
    #[error("message {message_id} could not be routed to queue {queue:?}: the queue was deleted while feeding — rerun the feed to declare it again")]
    Unroutable { queue: String, message_id: String },
    #[error("the broker did not confirm message {message_id}: publisher confirms are off on the channel (a bug in conveyor feed; please report it)")]
    NotConfirmed { message_id: String },
}

/// Publishes generated rows (or the lines of `opts.file`) to `opts.queue`, waits for every
/// broker confirm, and reports exactly what was published.
pub async fn run(opts: FeedOptions) -> Result<FeedReport, FeedError> {
    validate(&opts)?;
    // Open the file before touching the broker, so a wrong path fails fast and harmlessly.
    let file = match &opts.file {
        Some(path) => {
            let file_error = |source| FeedError::File {
                path: path.clone(),
                source,
            };
            let mut file = tokio::fs::File::open(path).await.map_err(file_error)?;
            // A regular file is checked whole first, so a broken export line publishes
            // nothing; a pipe cannot be read twice and is checked line by line as it goes.
            if file.metadata().await.map_err(file_error)?.is_file() {
                check_file(path, &mut file).await?;
            }
            Some((path.clone(), file))
        }
        None => None,
    };

    let conn = source::connect(&opts.amqp_url, "conveyor-feed").await?;
    let result = publish_all(&conn, &opts, file).await;
    match result {
        Ok(report) => {
            conn.close(200, "feed done".into())
                .await
                .map_err(|source| FeedError::Amqp {
                    what: "connection.close",
                    source,
                })?;
            tracing::info!(
                queue = %opts.queue,
                published = report.published,
                good = report.good,
                bad = report.bad_total(),
                seconds = report.seconds,
                rate = if report.seconds > 0.0 { report.published as f64 / report.seconds } else { 0.0 },
                "feed done"
            );
            Ok(report)
        }
        Err(e) => {
            // Best effort: the error that stopped the feed is the one worth reporting.
            let _ = conn.close(200, "feed aborted".into()).await;
            Err(e)
        }
    }
}

fn validate(opts: &FeedOptions) -> Result<(), FeedError> {
    if opts.queue.is_empty() {
        return Err(FeedError::Options(
            "the queue name is empty: give the queue to publish to".into(),
        ));
    }
    if !opts.errors_pct.is_finite() || !(0.0..=100.0).contains(&opts.errors_pct) {
        return Err(FeedError::Options(format!(
            "errors_pct = {} is outside 0..=100: give the percentage of bad rows",
            opts.errors_pct
        )));
    }
    if opts.file.is_none() && opts.id_base.checked_add(opts.count).is_none() {
        return Err(FeedError::Options(format!(
            "id_base {} + count {} overflows the 20-digit id: lower id_base or count",
            opts.id_base, opts.count
        )));
    }
    Ok(())
}

async fn publish_all(
    conn: &Connection,
    opts: &FeedOptions,
    file: Option<(PathBuf, tokio::fs::File)>,
) -> Result<FeedReport, FeedError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|source| FeedError::Amqp {
            what: "channel.open",
            source,
        })?;
    let result = publish_on(&channel, opts, file).await;
    // The channel is closed, and the broker's close-ok awaited, before the caller closes the
    // connection, on the error path too: a channel merely dropped is closed in the background,
    // racing the connection's close (lapin then logs "invalid channel state: Closing").
    let reply = if result.is_ok() {
        "feed done"
    } else {
        "feed aborted"
    };
    let closed = channel.close(200, reply.into()).await;
    match result {
        Ok(report) => {
            closed.map_err(|source| FeedError::Amqp {
                what: "channel.close",
                source,
            })?;
            Ok(report)
        }
        // Best effort: the broker may already have closed the channel, and the error that
        // stopped the feed is the one worth reporting.
        Err(e) => Err(e),
    }
}

async fn publish_on(
    channel: &lapin::Channel,
    opts: &FeedOptions,
    file: Option<(PathBuf, tokio::fs::File)>,
) -> Result<FeedReport, FeedError> {
    let amqp = |what| move |source| FeedError::Amqp { what, source };
    match &opts.exchange {
        Some(x) => source::check_exchange(channel, x).await?,
        None => {
            source::declare_queue(channel, &opts.queue, opts.declare).await?;
        }
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;

    let bar = progress_bar(opts, file.is_some());
    let mut publisher = Publisher::new(channel, &opts.queue, opts.rate, bar.clone());
    if let Some(x) = &opts.exchange {
        publisher = publisher.via_exchange(x);
    }
    let mut report = match file {
        Some((path, f)) => feed_file(&mut publisher, opts.seed, &path, f).await?,
        None => feed_generated(&mut publisher, opts).await?,
    };
    publisher.drain().await?;
    report.seconds = publisher.start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(report)
}

fn progress_bar(opts: &FeedOptions, from_file: bool) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let (bar, template) = if from_file {
        (
            ProgressBar::new_spinner(),
            "{spinner} {pos} rows [{elapsed_precise}] {per_sec}",
        )
    } else {
        (
            ProgressBar::new(opts.count),
            "{wide_bar} {pos}/{len} rows [{elapsed_precise}] {per_sec} eta {eta}",
        )
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Generates `opts.count` rows with the planned share of bad ones and publishes them.
async fn feed_generated(
    publisher: &mut Publisher<'_>,
    opts: &FeedOptions,
) -> Result<FeedReport, FeedError> {
    let mut report = FeedReport::default();
    let mut rows = StdRng::seed_from_u64(opts.seed);
    let mut plan = BadPlan::new(opts.seed, opts.errors_pct);
    let mut recent_good: VecDeque<u64> = VecDeque::with_capacity(RECENT_GOOD);
    for i in 0..opts.count {
        // Cannot overflow: validate() checked id_base + count.
        let id = opts.id_base + i;
        let bad = plan.next(i, !recent_good.is_empty());
        let duplicate_of = match bad {
            Some(BadKind::DuplicateKey) => {
                let k = plan.rng.random_range(0..recent_good.len());
                recent_good.get(k).copied()
            }
            _ => None,
        };
        let body = person_row(id, &mut rows, bad, duplicate_of);
        publisher
            .publish(format!("{:x}-{id}", opts.seed), body)
            .await?;
        report.published += 1;
        match bad {
            None => {
                report.good += 1;
                report.good_id_sum += u128::from(id);
                if recent_good.len() == RECENT_GOOD {
                    recent_good.pop_front();
                }
                recent_good.push_back(id);
            }
            Some(kind) => *report.bad.entry(kind).or_insert(0) += 1,
        }
    }
    Ok(report)
}

/// Publishes every non-empty line of a JSON-lines file as one message body, bytes as they are
/// (invalid UTF-8 included, so the daemon's rejects can be exercised too) — or, for an export
/// envelope of `conveyor errors --export`, its payload ([`envelope_payload`]).
async fn feed_file(
    publisher: &mut Publisher<'_>,
    seed: u64,
    path: &std::path::Path,
    file: tokio::fs::File,
) -> Result<FeedReport, FeedError> {
    let mut report = FeedReport::default();
    let mut lines = Lines::new(path, file);
    while let Some(line) = lines.next().await? {
        let body = match envelope_payload(line) {
            Ok(Some(payload)) => payload,
            Ok(None) => line.to_vec(),
            Err(reason) => {
                // What the message says was published must be confirmed by the broker.
                publisher.drain().await?;
                return Err(FeedError::Envelope {
                    path: path.to_path_buf(),
                    line: lines.line_no,
                    reason,
                    published: format!(
                        "the {} message(s) before it were published (delete those lines before feeding the file again)",
                        report.published
                    ),
                });
            }
        };
        publisher
            .publish(format!("{seed:x}-L{}", lines.line_no), body)
            .await?;
        report.published += 1;
        report.good += 1;
    }
    Ok(report)
}

/// Reads the whole file once to check its export envelopes, then rewinds it: a broken
/// envelope fails the feed before anything is published.
async fn check_file(path: &std::path::Path, file: &mut tokio::fs::File) -> Result<(), FeedError> {
    use tokio::io::AsyncSeekExt;
    let mut lines = Lines::new(path, &mut *file);
    while let Some(line) = lines.next().await? {
        if let Err(reason) = envelope_payload(line) {
            return Err(FeedError::Envelope {
                path: path.to_path_buf(),
                line: lines.line_no,
                reason,
                published: "nothing was published".into(),
            });
        }
    }
    drop(lines);
    file.rewind().await.map_err(|source| FeedError::File {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// The non-blank lines of a file, without their line ends, numbered from 1.
struct Lines<'p, R> {
    path: &'p std::path::Path,
    reader: tokio::io::BufReader<R>,
    line: Vec<u8>,
    /// The number of the line last returned.
    line_no: u64,
}

impl<'p, R: tokio::io::AsyncRead + Unpin> Lines<'p, R> {
    fn new(path: &'p std::path::Path, file: R) -> Self {
        Lines {
            path,
            reader: tokio::io::BufReader::with_capacity(1 << 16, file),
            line: Vec::with_capacity(1024),
            line_no: 0,
        }
    }

    async fn next(&mut self) -> Result<Option<&[u8]>, FeedError> {
        loop {
            self.line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|source| FeedError::File {
                    path: self.path.to_path_buf(),
                    source,
                })?;
            if n == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            while matches!(self.line.last(), Some(b'\n' | b'\r')) {
                self.line.pop();
            }
            if !self.line.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(&self.line));
            }
        }
    }
}

/// The keys an export envelope must carry besides its payload.
const ENVELOPE_KEYS: [&[u8]; 4] = [b"\"job\"", b"\"kind\"", b"\"seq\"", b"\"code\""];

/// The payload an export line of `conveyor errors --export` carries, `Ok(None)` for an
/// ordinary line (published as it is), or why an export line cannot be sent.
///
/// A line is an export envelope when it is a JSON object with **all** of
/// - `"job"`: a string,
/// - `"kind"`: `"et"` or `"uv"`,
/// - `"seq"`: an integer,
/// - `"code"`: one of conveyor's reject codes (`malformed_json`, `duplicate_key`, …),
/// - and at least one of `"body"`, `"body_base64"`, `"body_hex"`.
///
/// Only conveyor's own error rows look like that, so an ordinary row (whose keys are the target
/// table's columns) is not taken for one. Its payload is then: the bytes of the `body` string
/// (UTF-8; fix the JSON text inside it before re-sending), or the decoded bytes of
/// `body_base64` (standard alphabet, padding optional) or `body_hex` (for payloads that are
/// not UTF-8). An envelope with more than one of these keys, or one that does not decode, is an
/// error, as is a line that starts with `{` and holds all these key names but is not valid JSON
/// (typically an unescaped `"` typed into `body`): sending it as is would load the envelope,
/// not the row.
pub fn envelope_payload(line: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let trimmed = line.trim_ascii();
    let has = |needle: &[u8]| trimmed.windows(needle.len()).any(|w| w == needle);
    // Cheap test first: ordinary rows are never parsed here.
    if !trimmed.starts_with(b"{") || !has(b"\"body") || !ENVELOPE_KEYS.iter().all(|k| has(k)) {
        return Ok(None);
    }
    let value: serde_json::Value = match serde_json::from_slice(trimmed) {
        Ok(v) => v,
        Err(e) => {
            return Err(format!(
                "it is not valid JSON ({e}); inside \"body\" write a quote as \\\" and a backslash as \\\\"
            ))
        }
    };
    let Some(obj) = value.as_object() else {
        return Ok(None);
    };
    let is_code = |v: &serde_json::Value| {
        v.as_str().is_some_and(|c| {
            crate::decode::RejectKind::ALL
                .iter()
                .any(|k| k.as_str() == c)
        })
    };
    let envelope = obj.get("job").is_some_and(serde_json::Value::is_string)
        && obj
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|k| k == "et" || k == "uv")
        && obj.get("seq").is_some_and(|s| s.is_i64() || s.is_u64())
        && obj.get("code").is_some_and(is_code);
    let bodies: Vec<(&str, &serde_json::Value)> = ["body", "body_base64", "body_hex"]
        .into_iter()
        .filter_map(|k| obj.get(k).map(|v| (k, v)))
        .collect();
    if !envelope || bodies.is_empty() {
        return Ok(None);
    }
    let [(key, value)] = bodies.as_slice() else {
        return Err(format!(
            "it has {} payload keys ({}); keep exactly one",
            bodies.len(),
            bodies
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let Some(text) = value.as_str() else {
        return Err(format!("{key:?} is not a string"));
    };
    match *key {
        "body" => Ok(Some(text.as_bytes().to_vec())),
        "body_base64" => BASE64
            .decode(text)
            .map(Some)
            .map_err(|e| format!("\"body_base64\" is not valid base64 ({})", detail(e))),
        _ => hex::decode(text).map(Some).map_err(|e| {
            format!(
                "\"body_hex\" is not valid hex, two digits per byte ({})",
                detail(e)
            )
        }),
    }
}

/// A decoder's error as a clause: "Invalid padding." → "invalid padding".
fn detail(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    let text = text.trim_end_matches('.');
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

/// Standard base64 (RFC 4648 §4) for `body_base64`, the padding optional on decode.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decides which rows are bad: exactly `errors_pct` percent of rows (to a millionth), spread
/// evenly through the run from a seed-dependent phase, kinds in round-robin from a
/// seed-dependent start. A duplicate needs an earlier good row; until one exists that turn
/// goes to the next kind.
struct BadPlan {
    ppm: u128,
    phase: u128,
    kind_next: usize,
    rng: StdRng,
}

impl BadPlan {
    fn new(seed: u64, errors_pct: f64) -> BadPlan {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
        // errors_pct was validated to 0..=100, so this is 0..=1_000_000.
        let ppm = (errors_pct * 10_000.0).round().clamp(0.0, 1_000_000.0) as u128;
        let phase = rng.random_range(0..1_000_000u128);
        let kind_next = rng.random_range(0..BadKind::ALL.len());
        BadPlan {
            ppm,
            phase,
            kind_next,
            rng,
        }
    }

    fn next(&mut self, i: u64, have_good: bool) -> Option<BadKind> {
        let i = u128::from(i);
        let before = (i * self.ppm + self.phase) / 1_000_000;
        let after = ((i + 1) * self.ppm + self.phase) / 1_000_000;
        if after == before {
            return None;
        }
        let mut kind = BadKind::ALL[self.kind_next % BadKind::ALL.len()];
        self.kind_next = self.kind_next.wrapping_add(1);
        if kind == BadKind::DuplicateKey && !have_good {
            kind = BadKind::ALL[self.kind_next % BadKind::ALL.len()];
            self.kind_next = self.kind_next.wrapping_add(1);
        }
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_kind_codes() {
        let codes: Vec<&str> = BadKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            codes,
            [
                "duplicate_key",
                "invalid_date",
                "invalid_integer",
                "invalid_decimal",
                "date_out_of_range"
            ]
        );
    }

    #[test]
    fn bad_plan_is_exact_even_and_deterministic() {
        let rows = 100_000u64;
        let run = |seed: u64, pct: f64| {
            let mut plan = BadPlan::new(seed, pct);
            (0..rows).map(|i| plan.next(i, i > 0)).collect::<Vec<_>>()
        };
        let a = run(11, 5.0);
        assert_eq!(a, run(11, 5.0));
        let bad = a.iter().filter(|b| b.is_some()).count() as u64;
        assert_eq!(bad, rows / 20);
        let mut per: BTreeMap<BadKind, u64> = BTreeMap::new();
        for k in a.iter().flatten() {
            *per.entry(*k).or_insert(0) += 1;
        }
        assert_eq!(per.len(), 5);
        assert!(per.values().all(|&v| v == bad / 5), "{per:?}");
        assert!(run(11, 0.0).iter().all(Option::is_none));
        assert!(run(11, 100.0).iter().all(Option::is_some));
        // No duplicate before any good row exists.
        let mut plan = BadPlan::new(0, 100.0);
        for i in 0..20 {
            assert_ne!(plan.next(i, false), Some(BadKind::DuplicateKey));
        }
    }

    #[test]
    fn export_envelopes_are_unwrapped_and_ordinary_lines_kept() {
        let env = |extra: &str| {
            format!(
                r#"{{"job":"20261124_013000_person_01","pipeline":"person","kind":"et","seq":7,"code":"malformed_json","sqlstate":null,"column":null,"message":"m","queue_time":null,"message_id":null,"recorded_at":"2026-11-24T01:00:00.000000Z","consolidated":true,{extra}}}"#
            )
        };
        let payload = |line: &str| envelope_payload(line.as_bytes());
        assert_eq!(
            payload(&env(r#""body":"{\"id\": \"x\"""#)),
            Ok(Some(br#"{"id": "x""#.to_vec()))
        );
        assert_eq!(
            payload(&env(r#""body":"a\u0000b""#)),
            Ok(Some(b"a\0b".to_vec()))
        );
        assert_eq!(
            payload(&env(r#""body_base64":"Yf/+AA==""#)),
            Ok(Some(vec![b'a', 0xff, 0xfe, 0]))
        );
        assert_eq!(
            payload(&env(r#""body_base64":"Yf/+AA""#)),
            Ok(Some(vec![b'a', 0xff, 0xfe, 0]))
        );
        assert_eq!(
            payload(&env(r#""body_hex":"61FFfe00""#)),
            Ok(Some(vec![b'a', 0xff, 0xfe, 0]))
        );
        for broken in [
            env(r#""body_base64":"Y*==""#),
            env(r#""body_base64":"Yf/+AA===""#),
            env(r#""body_base64":"Y""#),
            env(r#""body_hex":"6""#),
            env(r#""body_hex":"6g""#),
            env(r#""body":"a","body_hex":"61""#),
            env(r#""body":7"#),
            env(r#""body":"{"id": "x"}""#),
        ] {
            assert!(payload(&broken).is_err(), "{broken}");
        }
        // Ordinary rows, even with some of the keys, are published as they are.
        for line in [
            r#"{"id":"1","body":"b","code":"malformed_json","seq":1}"#,
            r#"{"job":"j","kind":"et","seq":1,"code":"not_a_code","body":"b"}"#,
            r#"{"job":"j","kind":"xx","seq":1,"code":"malformed_json","body":"b"}"#,
            r#"{"job":"j","kind":"et","seq":"1","code":"malformed_json","body":"b"}"#,
            r#"{"job":"j","kind":"et","seq":1,"code":"malformed_json","bodyguard":"b"}"#,
            r#"{"id": "x""#,
            "[1,2]",
        ] {
            assert_eq!(payload(line), Ok(None), "{line}");
        }
    }

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let opts = FeedOptions {
            amqp_url: SecretUrl::new("amqp://localhost:5672/%2f"),
            queue: "q".into(),
            declare: QueueDeclare::Quorum,
            count: 0,
            rate: 0,
            errors_pct: 0.0,
            file: None,
            seed: 0,
            id_base: 0,
            progress: false,
            exchange: None,
        };
        // Only built, never polled: no network.
        let fut = run(opts);
        assert_send(&fut);
    }

    #[test]
    fn options_are_validated() {
        let opts = FeedOptions {
            amqp_url: SecretUrl::new("amqp://localhost:5672/%2f"),
            queue: "q".into(),
            declare: QueueDeclare::Quorum,
            count: 10,
            rate: 0,
            errors_pct: 5.0,
            file: None,
            seed: 1,
            id_base: 0,
            progress: false,
            exchange: None,
        };
        assert!(validate(&opts).is_ok());
        assert!(validate(&FeedOptions {
            errors_pct: 101.0,
            ..opts.clone()
        })
        .is_err());
        assert!(validate(&FeedOptions {
            errors_pct: f64::NAN,
            ..opts.clone()
        })
        .is_err());
        assert!(validate(&FeedOptions {
            queue: String::new(),
            ..opts.clone()
        })
        .is_err());
        assert!(validate(&FeedOptions {
            id_base: u64::MAX,
            ..opts.clone()
        })
        .is_err());
    }
}
