//! Replay: loads a job's journal (`<journal_dir>/<job>.journal`) again — to re-process rows
//! after fixing what rejected them, or to restore a table. Either publishes every message back
//! to a queue with its own properties (`--to-queue`: the daemon loads it as any other message),
//! or loads it straight into the pipeline's target through the same decoder and batch
//! transactions as the daemon (`--direct`: bad rows go to an error table `et_replay_…`).
//!
//! End-of-job markers and redeliveries the journal recorded as duplicates are not replayed:
//! they were never rows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lapin::types::{FieldTable, ShortString};
use lapin::BasicProperties;
use sqlx::Connection;

use crate::config::{Config, PipelineConfig, QueueDeclare, SecretUrl};
use crate::pack::Packer;
use crate::sink::{self, Target};
use crate::source;
use crate::spool::{record, FileContents, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("{} does not exist (list the journals with `conveyor replay --list`)", .0.display())]
    Missing(PathBuf),
    #[error(transparent)]
    Feed(#[from] crate::feed::FeedError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
}

fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> ReplayError {
    move |source| ReplayError::Query { what, source }
}

/// One journal file, as `replay --list` shows it.
#[derive(Debug, Clone)]
pub struct JournalInfo {
    pub path: PathBuf,
    pub job: String,
    /// Messages that would be replayed (rows; markers and duplicates excluded).
    pub messages: u64,
    pub bytes: u64,
    pub damaged_bytes: u64,
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every `*.journal` in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<JournalInfo>, ReplayError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SpoolError::Io {
                path: dir.to_path_buf(),
                what: "listing",
                source,
            }
            .into())
        }
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "journal") {
            continue;
        }
        let Some(contents) = crate::spool::read_file(&path)? else {
            continue;
        };
        out.push(JournalInfo {
            messages: messages(&contents).count() as u64,
            bytes: contents.bytes.len() as u64,
            damaged_bytes: contents.scan.damaged_bytes() as u64,
            modified: e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(chrono::DateTime::<chrono::Utc>::from),
            job: contents.job,
            path,
        });
    }
    out.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.job.cmp(&b.job)));
    Ok(out)
}

/// Reads a journal for replay.
pub fn open(path: &Path) -> Result<FileContents, ReplayError> {
    crate::spool::read_file(path)?.ok_or_else(|| ReplayError::Missing(path.to_path_buf()))
}

/// The replayable messages of a journal: (sequence, decoded delivery).
pub fn messages(
    contents: &FileContents,
) -> impl Iterator<Item = (u64, Box<record::Delivery<'_>>)> + '_ {
    contents
        .records()
        .filter_map(|(seq, payload)| match record::decode(payload) {
            Ok(record::Record::Delivery(d))
                if d.kind == record::Kind::Delivery
                    && source::marker(&d.props, d.body).is_none() =>
            {
                Some((seq, d))
            }
            _ => None,
        })
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub published: u64,
    pub inserted: u64,
    pub rejected: u64,
    /// `--direct`: the error table holding the rejected rows (dropped when empty).
    /// The error tables that kept rows (et_/uv_ of the replay's job).
    pub error_tables: Vec<String>,
    pub seconds: f64,
}

fn bar(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{wide_bar} {pos}/{len} messages [{elapsed_precise}] {per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Publishes every message of the journal to `queue` with its own properties (headers,
/// message_id, queue time), waiting for each broker confirm.
pub async fn to_queue(
    amqp_url: &SecretUrl,
    queue: &str,
    declare: QueueDeclare,
    contents: &FileContents,
    progress: bool,
) -> Result<ReplayReport, ReplayError> {
    use crate::feed::FeedError;
    let started = Instant::now();
    let total = messages(contents).count() as u64;
    let conn = source::connect(amqp_url, "conveyor-replay").await?;
    let amqp = |what| move |source| FeedError::Amqp { what, source };
    let channel = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => {
            let _ = conn.close(200, "replay failed".into()).await;
            return Err(amqp("channel.open")(e).into());
        }
    };
    let published = publish_journal(&channel, queue, declare, contents, total, progress).await;
    // Channel first, then connection, on both paths: a channel dropped while its connection
    // closes makes lapin log a spurious error.
    let reply = if published.is_ok() {
        "replay done"
    } else {
        "replay failed"
    };
    let _ = channel.close(200, reply.into()).await;
    let _ = conn.close(200, reply.into()).await;
    let report = ReplayReport {
        published: published?,
        seconds: started.elapsed().as_secs_f64(),
        ..ReplayReport::default()
    };
    Ok(report)
}

/// Publishes every message of the journal with confirms; returns how many.
async fn publish_journal(
    channel: &lapin::Channel,
    queue: &str,
    declare: QueueDeclare,
    contents: &FileContents,
    total: u64,
    progress: bool,
) -> Result<u64, ReplayError> {
    use crate::feed::FeedError;
    let amqp = |what| move |source| FeedError::Amqp { what, source };
    source::declare_queue(channel, queue, declare).await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;
    let bar = bar(total, progress);
    let mut publisher = crate::feed::publish::Publisher::new(channel, queue, 0, bar.clone());
    let mut published = 0;
    for (seq, d) in messages(contents) {
        let id = d
            .props
            .message_id()
            .as_ref()
            .map_or_else(|| format!("{}:{seq}", contents.job), |m| m.to_string());
        publisher
            .publish_with(id, d.body.to_vec(), without_broker_headers(&d.props))
            .await?;
        published += 1;
    }
    publisher.drain().await?;
    bar.finish_and_clear();
    Ok(published)
}

/// The properties as the publisher sent them: without what the broker added on delivery.
fn without_broker_headers(props: &BasicProperties) -> BasicProperties {
    let mut p = props.clone();
    if let Some(h) = props.headers() {
        let mut kept = FieldTable::default();
        for (k, v) in h.inner() {
            if k.as_str() != "x-delivery-count" {
                kept.insert(ShortString::from(k.as_str()), v.clone());
            }
        }
        p = p.with_headers(kept);
    }
    p
}

/// Loads every message of the journal into pipeline `p`'s target, in batch transactions of
/// `p.pack` rows (rows, error rows and a robust mark each, as the daemon does).
pub async fn direct(
    config: &Config,
    p: &PipelineConfig,
    contents: &FileContents,
    progress: bool,
) -> Result<ReplayReport, ReplayError> {
    direct_steps(config, p, contents, progress, None).await
}

/// [`direct`] writing only some steps of a routed pipeline, counted for the job they re-run
/// (`conveyor run-steps`).
pub async fn direct_steps(
    config: &Config,
    p: &PipelineConfig,
    contents: &FileContents,
    progress: bool,
    rerun: Option<(&str, &[i32])>,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let total = messages(contents).count() as u64;
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    crate::db::migrate(&config.database_url, &config.schema, config.connect_timeout).await?;
    let job = format!(
        "replay_{}_{}",
        chrono::Utc::now().format("%Y%m%d_%H%M%S"),
        p.name
    );
    let (mut decoder, target) =
        sink::prepare_for(&mut conn, &config.schema, p, &job, rerun).await?;
    let bar = bar(total, progress);
    let mut report = ReplayReport::default();
    let mut packer = Packer::new(p.pack, Duration::from_secs(3600));
    let now = Instant::now();
    for (seq, d) in messages(contents) {
        let batch = packer.open(now, seq);
        let qt = source::header_queue_time_us(&d.props, &p.queue_time_header);
        batch.push_message(
            &mut decoder,
            d.body.to_vec(),
            seq,
            qt,
            d.received_us,
            source::message_id(&d.props),
            false,
        );
        if let Some(mut b) = packer.take_if_full() {
            commit(&mut conn, &target, &mut b, &mut report).await?;
            bar.inc(b.rows() as u64);
        }
    }
    if let Some(mut b) = packer.seal() {
        commit(&mut conn, &target, &mut b, &mut report).await?;
        bar.inc(b.rows() as u64);
    }
    bar.finish_and_clear();
    sqlx::query(sqlx::AssertSqlSafe(target.robust_delete.as_str()))
        .bind(&job)
        .execute(&mut conn)
        .await
        .map_err(query("deleting the replay's robust marks"))?;
    let errors = sink::errors::drop_empty(&mut conn, &target.et_table, &target.uv_table)
        .await
        .map_err(query("checking the error tables"))?;
    if errors.et > 0 {
        report.error_tables.push(target.et_table.clone());
    }
    if errors.uv > 0 {
        report.error_tables.push(target.uv_table.clone());
    }
    let _ = conn.close().await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn commit(
    conn: &mut sqlx::PgConnection,
    target: &Target,
    batch: &mut crate::pack::Batch,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let done = sink::commit_batch(conn, target, batch, false).await?;
    report.inserted += done.inserted;
    report.rejected += done.rejected.values().sum::<u64>();
    Ok(())
}
