//! The files of one job, owned by the writer task and moved into each blocking operation:
//! creating the spool and journal, appending (whole frames only, also on a nearly full disk),
//! cutting the spool at a checkpoint (new file + rename, or in place on a full disk), closing.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::writer::{CutStats, SpoolOptions, INDEX_EVERY};
use super::{frame, record, SpoolError};

/// The open files, moved into each blocking operation and back.
pub(super) struct Files {
    pub(super) job: String,
    pub(super) spool: Option<(PathBuf, File)>,
    /// Length of the spool file up to its last good write.
    pub(super) spool_len: u64,
    pub(super) journal: Option<(PathBuf, File)>,
    pub(super) journal_failed: bool,
    /// Whether anything beyond the header went into the journal (an empty one is removed).
    pub(super) journal_used: bool,
    /// (seq, offset) of every `INDEX_EVERY`-th record.
    pub(super) index: Vec<(u64, u64)>,
    pub(super) records: u64,
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn is_no_space(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Io { source, .. } if source.raw_os_error() == Some(28))
}

/// The usual checkpoint: a new file with the preamble and the kept tail `at..end`, fsynced and
/// renamed over the spool (a crash leaves the old or the new file, both whole).
fn copy_to_new_file(path: &Path, pre: &[u8], at: u64, end: u64) -> Result<(File, u64), SpoolError> {
    let tmp = path.with_extension("spool.tmp");
    let r = (|| {
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "writing the checkpointed spool"))?;
        out.write_all(pre)
            .map_err(io_err(&tmp, "writing the checkpointed spool"))?;
        let mut src = File::open(path).map_err(io_err(path, "reading the spool"))?;
        src.seek(SeekFrom::Start(at.min(end)))
            .map_err(io_err(path, "reading the spool"))?;
        let kept = std::io::copy(&mut (&mut src).take(end.saturating_sub(at)), &mut out)
            .map_err(io_err(&tmp, "writing the checkpointed spool"))?;
        out.sync_all()
            .map_err(io_err(&tmp, "fsyncing the checkpointed spool"))?;
        std::fs::rename(&tmp, path).map_err(io_err(path, "replacing the spool"))?;
        sync_dir(path);
        Ok((out, kept))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Checkpoint on a full disk: moves the kept tail `at..end` down to just after the preamble,
/// fsyncs, then truncates. Crash-safe with the reader: a half-done move leaves the copied
/// records first and the originals after them; the scan keeps each sequence once (it only
/// accepts increasing sequences) and skips the stale bytes between as damage.
fn compact_in_place(
    file: &mut File,
    path: &Path,
    pre_len: u64,
    at: u64,
    end: u64,
) -> Result<u64, SpoolError> {
    let mut src = File::open(path).map_err(io_err(path, "reading the spool"))?;
    let mut buf = vec![0u8; 256 << 10];
    let (mut from, mut to) = (at, pre_len);
    while from < end {
        let n = buf.len().min((end - from) as usize);
        src.seek(SeekFrom::Start(from))
            .and_then(|_| src.read_exact(&mut buf[..n]))
            .map_err(io_err(path, "reading the spool"))?;
        file.seek(SeekFrom::Start(to))
            .and_then(|_| file.write_all(&buf[..n]))
            .map_err(io_err(path, "compacting the spool"))?;
        from += n as u64;
        to += n as u64;
    }
    file.sync_data()
        .map_err(io_err(path, "fsyncing the spool"))?;
    file.set_len(to)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path, "truncating the spool"))?;
    file.seek(SeekFrom::Start(to))
        .map_err(io_err(path, "compacting the spool"))?;
    Ok(to - pre_len)
}

/// (start, end) of each whole frame in a buffer of frames.
pub(super) fn frame_bounds(buf: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let head = buf.get(at..at + 4)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let end = at + 8 + len;
        if end > buf.len() {
            return None;
        }
        let r = (at, end);
        at = end;
        Some(r)
    })
}

/// Sequence number of the frame starting at `at`.
pub(super) fn frame_seq(buf: &[u8], at: usize) -> u64 {
    buf.get(at + 8..at + 16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Magic + header record naming the job.
fn preamble(job: &str) -> Vec<u8> {
    let mut b = frame::MAGIC.to_vec();
    frame::append(&mut b, 0, &record::header(job));
    b
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Files {
    pub(super) fn create(o: &SpoolOptions, job: &str) -> Result<Files, SpoolError> {
        let pre = preamble(job);
        let mut spool = None;
        if let Some(path) = &o.spool {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(io_err(dir, "creating the spool directory"))?;
            }
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(io_err(path, "creating the spool"))?;
            f.write_all(&pre)
                .map_err(io_err(path, "writing the spool"))?;
            f.sync_all().map_err(io_err(path, "fsyncing the spool"))?;
            sync_dir(path);
            spool = Some((path.clone(), f));
        }
        let mut journal = None;
        if let Some(path) = &o.journal {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(io_err(dir, "creating the journal directory"))?;
            }
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(io_err(path, "creating the journal"))?;
            f.write_all(&pre)
                .map_err(io_err(path, "writing the journal"))?;
            journal = Some((path.clone(), f));
        }
        Ok(Files {
            job: job.to_string(),
            spool,
            spool_len: pre.len() as u64,
            journal,
            journal_failed: false,
            journal_used: false,
            index: Vec::new(),
            records: 0,
        })
    }

    /// Appends `buf` to the spool and fsyncs it, then to the journal (fsynced at job end).
    /// Appends `buf` (whole frames) to the spool and fsyncs it, then to the journal (fsynced
    /// at job end). On a failure (disk full) it writes as many whole frames as fit, so a nearly
    /// full disk still makes progress; returns how many bytes are durable.
    pub(super) fn write(&mut self, buf: &[u8]) -> (usize, Result<(), SpoolError>) {
        let Some((path, f)) = self.spool.as_mut() else {
            self.write_journal(buf);
            return (buf.len(), Ok(()));
        };
        let r = f
            .write_all(buf)
            .and_then(|()| f.sync_data())
            .map_err(io_err(path, "appending to the spool"));
        let Err(e) = r else {
            self.spool_len += buf.len() as u64;
            self.write_journal(buf);
            return (buf.len(), Ok(()));
        };
        // Leave no partial record behind, then fit in what we can, frame by frame.
        let _ = f.set_len(self.spool_len);
        let _ = f.seek(SeekFrom::Start(self.spool_len));
        let mut done = 0;
        for (start, end) in frame_bounds(buf) {
            if f.write_all(&buf[start..end]).is_err() {
                break;
            }
            done = end;
        }
        let _ = f.set_len(self.spool_len + done as u64);
        let _ = f.seek(SeekFrom::Start(self.spool_len + done as u64));
        if done > 0 && f.sync_data().is_err() {
            done = 0;
            let _ = f.set_len(self.spool_len);
            let _ = f.seek(SeekFrom::Start(self.spool_len));
        }
        self.spool_len += done as u64;
        self.write_journal(&buf[..done]);
        (done, Err(e))
    }

    fn write_journal(&mut self, buf: &[u8]) {
        if self.journal_failed {
            return;
        }
        if let Some((path, f)) = self.journal.as_mut() {
            self.journal_used = true;
            if let Err(e) = f.write_all(buf) {
                // The journal is an archive: losing it must not stop the load.
                warn!(path = %path.display(), error = %e, "journal write failed; this job's journal is incomplete from here");
                self.journal_failed = true;
            }
        }
    }

    /// Rewrites the spool keeping the records from `keep_from` on.
    pub(super) fn cut(&mut self, keep_from: u64) -> Result<CutStats, SpoolError> {
        let Some((path, file)) = self.spool.as_mut() else {
            return Ok(CutStats::default());
        };
        let path = path.clone();
        let before = self.spool_len;
        let pre = preamble(&self.job);
        // Start from the indexed record at or before the cut, then walk the headers.
        let mut at = self
            .index
            .iter()
            .rev()
            .find(|(s, _)| *s <= keep_from)
            .map_or(pre.len() as u64, |(_, o)| *o);
        let mut r = BufReader::with_capacity(
            256 << 10,
            File::open(&path).map_err(io_err(&path, "reading the spool"))?,
        );
        r.seek(SeekFrom::Start(at))
            .map_err(io_err(&path, "reading the spool"))?;
        let mut head = [0u8; frame::HEADER_LEN];
        while at < before {
            r.read_exact(&mut head)
                .map_err(io_err(&path, "reading the spool"))?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
            let seq = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
            if seq >= keep_from {
                break;
            }
            r.seek_relative(len as i64 - 8)
                .map_err(io_err(&path, "reading the spool"))?;
            at += 8 + len;
        }
        let kept = match copy_to_new_file(&path, &pre, at, before) {
            Ok((out, kept)) => {
                *file = out;
                kept
            }
            // A full disk has no room for the new file: compact in place instead.
            Err(e) if is_no_space(&e) => {
                compact_in_place(file, &path, pre.len() as u64, at, before)?
            }
            Err(e) => return Err(e),
        };
        self.spool_len = pre.len() as u64 + kept;
        // Rebuild the sparse index over what was kept.
        self.index.clear();
        let mut r = BufReader::with_capacity(
            256 << 10,
            File::open(&path).map_err(io_err(&path, "reading the spool"))?,
        );
        let mut off = pre.len() as u64;
        r.seek(SeekFrom::Start(off))
            .map_err(io_err(&path, "reading the spool"))?;
        let mut n = 0u64;
        while off < self.spool_len {
            r.read_exact(&mut head)
                .map_err(io_err(&path, "reading the spool"))?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
            if n.is_multiple_of(INDEX_EVERY) {
                let seq = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
                self.index.push((seq, off));
            }
            n += 1;
            r.seek_relative(len as i64 - 8)
                .map_err(io_err(&path, "reading the spool"))?;
            off += 8 + len;
        }
        self.records = n;
        Ok(CutStats {
            bytes_before: before,
            bytes_after: self.spool_len,
            records_kept: n,
        })
    }

    pub(super) fn finish(mut self, delete_spool: bool) -> Result<(), SpoolError> {
        if let Some((path, f)) = self.journal.take() {
            if !self.journal_used {
                // A standby job that never consumed: no journal worth keeping.
                drop(f);
                let _ = std::fs::remove_file(&path);
            } else if let Err(e) = f.sync_all() {
                warn!(path = %path.display(), error = %e, "could not fsync the journal");
            }
        }
        if let Some((path, f)) = self.spool.take() {
            drop(f);
            if delete_spool {
                std::fs::remove_file(&path).map_err(io_err(&path, "deleting the spool"))?;
                sync_dir(&path);
            }
        }
        Ok(())
    }
}
