//! The task that owns a job's spool and journal files. Records arrive over a bounded channel;
//! the task appends them and group-commits: one `fsync` covers every record that arrived since
//! the previous one, and starts when `fsync_rows` records are pending, when the oldest pending
//! record is `fsync_ms` old, or when the worker asks (a batch was sealed and waits to be
//! durable). File I/O runs on the blocking pool, one operation at a time, while the task keeps
//! taking records. The durable watermark is published on a `watch` channel; the worker acks and
//! dispatches up to it.
//!
//! A failed write (disk full, unwritable directory) truncates the file back to its last good
//! length, publishes the error on the same channel (the worker stops reading deliveries; nothing
//! is acked that is not durable) and is retried every second until it succeeds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;
use tracing::{info, warn};

use super::files::{frame_bounds, frame_seq, Files};
use super::{frame, SpoolError};

/// Where and how a job's records are written.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// The checkpoint spool; `None` with `durability = "broker"`.
    pub spool: Option<PathBuf>,
    /// The job's journal file; `None` when journaling is off.
    pub journal: Option<PathBuf>,
    pub fsync_every: Duration,
    pub fsync_rows: usize,
    /// Metric labels.
    pub pipeline: String,
    pub slot: String,
}

/// The durable watermark: every record with a sequence `<= seq` is fsynced in the spool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    pub seq: u64,
    /// The last write failed with this; cleared by the next success.
    pub error: Option<String>,
}

/// What a checkpoint cut did.
#[derive(Debug, Clone, Copy, Default)]
pub struct CutStats {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_kept: u64,
}

/// Control commands travel apart from the records, so a checkpoint can reach the writer while
/// records are held back by a failing disk.
enum Cmd {
    Sync,
    Cut {
        keep_from: u64,
        reply: oneshot::Sender<Result<CutStats, SpoolError>>,
    },
    Finish {
        delete_spool: bool,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// Handle to a job's writer task.
#[derive(Debug)]
pub struct Spool {
    data: mpsc::Sender<(u64, Vec<u8>)>,
    tx: mpsc::Sender<Cmd>,
    durable: watch::Receiver<Durable>,
    task: JoinHandle<()>,
}

/// Records queued between the worker and the writer; a full queue is backpressure on the
/// worker (it stops reading deliveries), never unbounded memory.
const QUEUE: usize = 4096;
/// Sparse offset index: one entry per this many records, to find a checkpoint's cut point
/// without holding an offset per record.
pub(super) const INDEX_EVERY: u64 = 256;
/// How long to wait before retrying a failed write.
const RETRY: Duration = Duration::from_secs(1);

impl Spool {
    /// Creates the job's files (a fresh spool holding only its header record, fsynced, and the
    /// journal) and starts the writer task.
    pub async fn open(opts: SpoolOptions, job: &str) -> Result<Spool, SpoolError> {
        let job_s = job.to_string();
        let o = opts.clone();
        let files = tokio::task::spawn_blocking(move || Files::create(&o, &job_s))
            .await
            .map_err(|e| SpoolError::Io {
                path: PathBuf::new(),
                what: "starting the spool",
                source: std::io::Error::other(e),
            })??;
        let (data, data_rx) = mpsc::channel(QUEUE);
        let (tx, rx) = mpsc::channel(4);
        let (durable_tx, durable) = watch::channel(Durable::default());
        let task = tokio::spawn(run(opts, files, data_rx, rx, durable_tx).in_current_span());
        Ok(Spool {
            data,
            tx,
            durable,
            task,
        })
    }

    /// Queues one record; waits while the queue is full.
    pub async fn append(&self, seq: u64, payload: Vec<u8>) -> Result<(), SpoolError> {
        self.data
            .send((seq, payload))
            .await
            .map_err(|_| SpoolError::Stopped)
    }

    /// A clone of the record queue's sender, for a caller that reserves room before it reads
    /// the next delivery (so a full queue stops reading instead of blocking mid-delivery).
    pub fn sender(&self) -> mpsc::Sender<(u64, Vec<u8>)> {
        self.data.clone()
    }

    /// Asks for an fsync of everything queued so far, as soon as the disk is free.
    pub async fn sync(&self) {
        let _ = self.tx.send(Cmd::Sync).await;
    }

    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    /// Rewrites the spool without the records below `keep_from` (all committed).
    pub async fn cut(&self, keep_from: u64) -> Result<CutStats, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Cut { keep_from, reply })
            .await
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Writes and fsyncs everything queued (spool and journal), then closes the files; with
    /// `delete_spool` the spool is removed (the job ended and every record is committed).
    pub async fn finish(self, delete_spool: bool) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Finish {
                delete_spool,
                reply,
            })
            .await
            .map_err(|_| SpoolError::Stopped)?;
        let r = rx.await.map_err(|_| SpoolError::Stopped)?;
        let _ = self.task.await;
        r
    }
}

/// Pending records not yet handed to the disk.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    rows: usize,
    last_seq: u64,
    since: Option<Instant>,
    /// (seq, logical offset) entries to add to the index once written.
    index: Vec<(u64, u64)>,
}

/// A write in flight: the files, the bytes, their index entries, last sequence and record
/// count come back with the result, so a failed write can be put back and retried.
struct Written {
    files: Files,
    buf: Vec<u8>,
    /// Bytes of `buf` now durable (all of it on success).
    done: usize,
    index: Vec<(u64, u64)>,
    last_seq: u64,
    rows: usize,
    result: Result<(), SpoolError>,
    took: Duration,
}

type Io = JoinHandle<Written>;

async fn run(
    opts: SpoolOptions,
    files: Files,
    mut data: mpsc::Receiver<(u64, Vec<u8>)>,
    mut rx: mpsc::Receiver<Cmd>,
    durable: watch::Sender<Durable>,
) {
    // Appends one record to the pending buffer (and the sparse index).
    let push =
        |pending: &mut Pending, count: &mut u64, logical: &mut u64, seq: u64, payload: Vec<u8>| {
            if pending.since.is_none() {
                pending.since = Some(Instant::now());
            }
            let start = pending.buf.len() as u64;
            if count.is_multiple_of(INDEX_EVERY) {
                pending.index.push((seq, *logical));
            }
            *count += 1;
            frame::append(&mut pending.buf, seq, &payload);
            *logical += pending.buf.len() as u64 - start;
            pending.rows += 1;
            pending.last_seq = seq;
        };
    let mut files = Some(files);
    let mut pending = Pending::default();
    // Logical end of the spool including pending bytes, for the offset index.
    let mut logical = files.as_ref().map_or(0, |f| f.spool_len);
    let mut inflight: Option<Io> = None;
    // Records in the spool since it was created or last cut, pending ones included.
    let mut count: u64 = 0;
    let mut sync_wanted = false;
    let mut failed_at: Option<Instant> = None;
    let mut recycled: Vec<u8> = Vec::new();
    let has_spool = opts.spool.is_some();
    let labels = (opts.pipeline.clone(), opts.slot.clone());
    let mut closing: Option<(bool, oneshot::Sender<Result<(), SpoolError>>)> = None;
    let mut cut: Option<(u64, oneshot::Sender<Result<CutStats, SpoolError>>)> = None;
    loop {
        // Start a write when one is due and the disk is free.
        if inflight.is_none() && files.is_some() {
            let due = pending.rows > 0
                && (sync_wanted
                    || closing.is_some()
                    || cut.is_some()
                    || pending.rows >= opts.fsync_rows
                    || pending
                        .since
                        .is_some_and(|t| t.elapsed() >= opts.fsync_every)
                    || !has_spool && pending.buf.len() >= 1 << 20);
            let retry_ok = failed_at.is_none_or(|t| t.elapsed() >= RETRY);
            if due && retry_ok {
                let mut f = files.take().expect("files present");
                let buf = std::mem::replace(&mut pending.buf, std::mem::take(&mut recycled));
                let idx = std::mem::take(&mut pending.index);
                let last = pending.last_seq;
                let rows = pending.rows;
                pending.rows = 0;
                pending.since = None;
                sync_wanted = false;
                inflight = Some(tokio::task::spawn_blocking(move || {
                    let t = Instant::now();
                    let (done, result) = f.write(&buf);
                    Written {
                        files: f,
                        buf,
                        done,
                        index: idx,
                        last_seq: last,
                        rows,
                        result,
                        took: t.elapsed(),
                    }
                }));
            }
        }
        // A cut works on what is on disk; records still pending (a write that keeps failing on
        // a full disk) stay pending, so a checkpoint can free the space they need.
        if inflight.is_none() && (pending.rows == 0 || failed_at.is_some()) {
            if let Some((keep_from, reply)) = cut.take() {
                let mut f = files.take().expect("files present");
                let before_len = f.spool_len;
                let r = tokio::task::spawn_blocking(move || {
                    let r = f.cut(keep_from);
                    (f, r)
                })
                .await;
                match r {
                    Ok((f, r)) => {
                        // Pending index entries were offsets past the old end of the file.
                        let old_len = before_len;
                        for e in pending.index.iter_mut() {
                            e.1 = e.1 - old_len + f.spool_len;
                        }
                        logical = f.spool_len + pending.buf.len() as u64;
                        count = f.records + pending.rows as u64;
                        if r.is_ok() {
                            failed_at = failed_at.map(|_| Instant::now() - RETRY);
                        }
                        crate::metrics::spool_bytes(&labels.0, &labels.1, f.spool_len);
                        files = Some(f);
                        let _ = reply.send(r);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(SpoolError::Io {
                            path: PathBuf::new(),
                            what: "checkpoint",
                            source: std::io::Error::other(e),
                        }));
                        return;
                    }
                }
            }
        }
        if inflight.is_none() && pending.rows == 0 {
            if let Some((delete, reply)) = closing.take() {
                let f = files.take().expect("files present");
                let r = tokio::task::spawn_blocking(move || f.finish(delete))
                    .await
                    .unwrap_or_else(|e| {
                        Err(SpoolError::Io {
                            path: PathBuf::new(),
                            what: "closing the spool",
                            source: std::io::Error::other(e),
                        })
                    });
                crate::metrics::spool_bytes(&labels.0, &labels.1, 0);
                let _ = reply.send(r);
                return;
            }
        }
        let wake = match (&inflight, failed_at, pending.since) {
            (Some(_), _, _) => None,
            (None, Some(t), _) if pending.rows > 0 => Some(t + RETRY),
            (None, None, Some(t)) => Some(t + opts.fsync_every),
            _ => None,
        };
        // While a write is failing, stop taking records: the queue fills and the worker stops.
        let accepting = failed_at.is_none() && closing.is_none();
        tokio::select! {
                    biased;
                    r = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                        inflight = None;
                        let Ok(w) = r else { return };
        let Written { files: f, mut buf, done, index: idx, last_seq: last, rows, result, took } = w;
                        match result {
                            Ok(()) => {
                                if failed_at.take().is_some() {
                                    info!(pipeline = %labels.0, slot = %labels.1, "spool writable again; resuming");
                                    crate::metrics::spool_error(&labels.0, &labels.1, false);
                                }
                                let mut f = f;
                                f.index.extend(idx);
                                if has_spool {
                                    crate::metrics::spool_fsync(&labels.0, &labels.1, took.as_secs_f64(), f.spool_len);
                                }
                                files = Some(f);
                                buf.clear();
                                recycled = buf;
                                durable.send_modify(|d| {
                                    d.seq = d.seq.max(last);
                                    d.error = None;
                                });
                            }
                            Err(e) => {
                                if failed_at.is_none() {
                                    tracing::error!(pipeline = %labels.0, slot = %labels.1, error = %e, "spool write failed: not reading or acking any more deliveries until it succeeds (free disk space or fix permissions; retrying every second)");
                                    crate::metrics::spool_error(&labels.0, &labels.1, true);
                                }
                                failed_at = Some(Instant::now());
                                let mut f = f;
                                // Whatever fitted is durable: publish it, keep the rest pending.
                                let (mut idx, mut rows, mut last) = (idx, rows, last);
                                if done > 0 {
                                    let frames: Vec<(usize, usize)> =
                                        frame_bounds(&buf[..done]).collect();
                                    let written_last = frames.last().map_or(0, |(s, _)| frame_seq(&buf, *s));
                                    let base = f.spool_len - done as u64;
                                    let (on_disk, rest): (Vec<_>, Vec<_>) =
                                        idx.into_iter().partition(|(_, o)| *o < base + done as u64);
                                    f.index.extend(on_disk);
                                    idx = rest;
                                    rows -= frames.len();
                                    buf.drain(..done);
                                    if rows == 0 {
                                        last = 0;
                                    }
                                    durable.send_modify(|d| d.seq = d.seq.max(written_last));
                                }
                                files = Some(f);
                                if closing.is_some() {
                                    // Shutting down with the disk still failing: these records were
                                    // never acked, so the broker redelivers them; drop them.
                                    warn!(pipeline = %labels.0, slot = %labels.1, records = rows + pending.rows, "closing with unwritten spool records; they were never acked and will be redelivered");
                                    pending = Pending::default();
                                    continue;
                                }
                                // Put the bytes back in front of anything that arrived meanwhile.
                                buf.extend_from_slice(&pending.buf);
                                pending.buf = buf;
                                let mut i = idx;
                                i.append(&mut pending.index);
                                pending.index = i;
                                pending.rows += rows;
                                pending.last_seq = pending.last_seq.max(last);
                                pending.since.get_or_insert_with(Instant::now);
                                let msg = e.to_string();
                                durable.send_modify(|d| d.error = Some(msg));
                            }
                        }
                    }
                    rec = data.recv(), if accepting => match rec {
                        Some((seq, payload)) => push(&mut pending, &mut count, &mut logical, seq, payload),
                        None => return,
                    },
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Sync) => {
                            // Everything sent before the request is already in the record queue.
                            if accepting {
                                while let Ok((seq, payload)) = data.try_recv() {
                                    push(&mut pending, &mut count, &mut logical, seq, payload);
                                }
                            }
                            sync_wanted = true;
                        }
                        Some(Cmd::Cut { keep_from, reply }) => cut = Some((keep_from, reply)),
                        Some(Cmd::Finish { delete_spool, reply }) => {
                            // The worker has stopped appending: take what is still queued.
                            while let Ok((seq, payload)) = data.try_recv() {
                                if failed_at.is_none() {
                                    push(&mut pending, &mut count, &mut logical, seq, payload);
                                }
                            }
                            closing = Some((delete_spool, reply));
                        }
                        None => return,
                    },
                    _ = sleep_until(wake), if wake.is_some() => {}
                }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::read_file;

    fn opts(dir: &std::path::Path) -> SpoolOptions {
        SpoolOptions {
            spool: Some(dir.join("s/checkpoint.spool")),
            journal: Some(dir.join("j/job.journal")),
            fsync_every: Duration::from_millis(2),
            fsync_rows: 100,
            pipeline: "p".into(),
            slot: "01".into(),
        }
    }

    async fn wait_durable(s: &Spool, seq: u64) {
        let mut rx = s.durable();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|d| d.seq >= seq))
            .await
            .expect("durable in time")
            .expect("writer alive");
    }

    #[tokio::test]
    async fn group_commit_cut_and_finish() {
        let dir = std::env::temp_dir().join(format!("conveyor-spool-{}", rand::random::<u64>()));
        let o = opts(&dir);
        let s = Spool::open(o.clone(), "job_a").await.expect("open");
        for seq in 1..=1000u64 {
            s.append(seq, format!("record {seq}").into_bytes())
                .await
                .expect("append");
        }
        s.sync().await;
        wait_durable(&s, 1000).await;
        let path = o.spool.clone().expect("spool path");
        let before = read_file(&path).expect("read").expect("exists");
        assert_eq!(before.job, "job_a");
        assert_eq!(before.records().count(), 1000);

        let stats = s.cut(700).await.expect("cut");
        assert_eq!(stats.records_kept, 301);
        assert!(stats.bytes_after < stats.bytes_before);
        let after = read_file(&path).expect("read").expect("exists");
        let seqs: Vec<u64> = after.records().map(|(q, _)| q).collect();
        assert_eq!(seqs, (700..=1000).collect::<Vec<_>>());
        assert_eq!(
            after.records().next().map(|(_, p)| p),
            Some(&b"record 700"[..])
        );

        // Appends after a cut land after the kept records; a second cut uses the new index.
        for seq in 1001..=1600u64 {
            s.append(seq, vec![b'x'; 10]).await.expect("append");
        }
        s.sync().await;
        wait_durable(&s, 1600).await;
        let stats = s.cut(1500).await.expect("cut");
        assert_eq!(stats.records_kept, 101);
        let seqs: Vec<u64> = read_file(&path)
            .expect("read")
            .expect("exists")
            .records()
            .map(|(q, _)| q)
            .collect();
        assert_eq!(seqs, (1500..=1600).collect::<Vec<_>>());

        s.finish(true).await.expect("finish");
        assert!(!path.exists(), "spool deleted at a clean end");
        let journal = read_file(&o.journal.expect("journal path"))
            .expect("read")
            .expect("kept");
        assert_eq!(
            journal.records().count(),
            1600,
            "the journal keeps every record"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
