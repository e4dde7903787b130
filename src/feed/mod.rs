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
//! Throughput: publishes are queued on one channel in call order (which keeps the order of
//! rows, so a duplicate always follows its original), and up to [`CONFIRM_WINDOW`] of them may
//! be outstanding — not yet written or not yet confirmed — instead of one round trip per
//! message. A nack, or a message returned as unroutable, fails the feed.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

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
    /// JSON lines: each non-empty line is one message body, published as is.
    pub file: Option<PathBuf>,
    /// RNG seed: same seed → same rows.
    pub seed: u64,
    /// First generated id number (so several feeds into one table do not collide).
    pub id_base: u64,
    /// Show an indicatif progress bar with the rate.
    pub progress: bool,
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
        Some(path) => Some((
            path.clone(),
            tokio::fs::File::open(path)
                .await
                .map_err(|source| FeedError::File {
                    path: path.clone(),
                    source,
                })?,
        )),
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
    let amqp = |what| move |source| FeedError::Amqp { what, source };
    let channel = conn.create_channel().await.map_err(amqp("channel.open"))?;
    source::declare_queue(&channel, &opts.queue, opts.declare).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;

    let bar = progress_bar(opts, file.is_some());
    let mut publisher = Publisher::new(&channel, &opts.queue, opts.rate, bar.clone());
    let mut report = match file {
        Some((path, f)) => feed_file(&mut publisher, opts.seed, &path, f).await?,
        None => feed_generated(&mut publisher, opts).await?,
    };
    publisher.drain().await?;
    report.seconds = publisher.start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    channel
        .close(200, "feed done".into())
        .await
        .map_err(amqp("channel.close"))?;
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
/// (invalid UTF-8 included, so the daemon's rejects can be exercised too).
async fn feed_file(
    publisher: &mut Publisher<'_>,
    seed: u64,
    path: &std::path::Path,
    file: tokio::fs::File,
) -> Result<FeedReport, FeedError> {
    let mut report = FeedReport::default();
    let mut reader = tokio::io::BufReader::with_capacity(1 << 16, file);
    let mut line = Vec::with_capacity(1024);
    let mut line_no: u64 = 0;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| FeedError::File {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        publisher
            .publish(format!("{seed:x}-L{line_no}"), line.clone())
            .await?;
        report.published += 1;
        report.good += 1;
    }
    Ok(report)
}

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
