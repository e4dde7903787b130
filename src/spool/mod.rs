//! Spool: the files that own messages between the broker's ack and the database's commit.
//!
//! With `durability = "spool"` (the default) every delivery is appended to the slot's
//! checkpoint spool, `<state_dir>/<pipeline>/<slot>/checkpoint.spool`, and acked to the broker
//! only once an fsync covers it (group-committed by [`writer`]). From then on the spool owns the
//! message: a batch commits only records that are already durable, every batch transaction
//! writes a robust mark (job, sequence range), and after a crash the worker loads every spooled
//! record no mark covers ([`crate::worker`]'s recovery). A checkpoint cuts the spool back to the
//! oldest uncommitted record; a job that ends normally deletes it.
//!
//! The optional journal, `<journal_dir>/<job>.journal`, uses the same framing ([`frame`]) and
//! record layout ([`record`]) for every message the job read; `conveyor replay` loads it again.
//!
//! Why a spool at all: it lets the broker forget a message as soon as a local fsync (≈ 1 ms)
//! covers it instead of after a database commit, so a slow or restarting database never holds
//! the queue's unacked window hostage, and a handoff does not wait for in-flight commits.

mod files;
pub mod frame;
pub mod owned;
pub mod ranges;
pub mod record;
pub mod writer;

use std::path::{Path, PathBuf};

pub use owned::Owned;
pub use ranges::RangeSet;
pub use writer::{CutStats, Durable, Spool, SpoolOptions};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what} {}: {source} (check free space and permissions of the state directory; conveyor retries and acks nothing meanwhile)", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("damaged record: {0}")]
    BadRecord(String),
    #[error("{} is not a conveyor spool or journal (no header record); move it away if it is not yours", .0.display())]
    NotSpool(PathBuf),
    #[error("the spool writer stopped")]
    Stopped,
}

/// The checkpoint spool of one slot.
pub fn spool_path(state_dir: &Path, pipeline: &str, slot: &str) -> PathBuf {
    state_dir.join(pipeline).join(slot).join("checkpoint.spool")
}

/// A job's journal file.
pub fn journal_path(journal_dir: &Path, job: &str) -> PathBuf {
    journal_dir.join(format!("{job}.journal"))
}

/// A spool or journal file read back: its job and its whole records.
#[derive(Debug, Clone)]
pub struct FileContents {
    pub path: PathBuf,
    pub job: String,
    pub bytes: Vec<u8>,
    pub scan: frame::Scan,
}

impl FileContents {
    /// Whole records after the header, as (sequence, payload).
    pub fn records(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.scan
            .records
            .iter()
            .filter(|f| f.seq > 0)
            .map(|f| (f.seq, &self.bytes[f.payload.clone()]))
    }
}

/// Reads a spool or journal file. `Ok(None)` when it does not exist (nothing to recover).
pub fn read_file(path: &Path) -> Result<Option<FileContents>, SpoolError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SpoolError::Io {
                path: path.to_path_buf(),
                what: "reading",
                source,
            })
        }
    };
    let scan = frame::scan(&bytes);
    let job = scan.records.first().filter(|f| f.seq == 0).and_then(|f| {
        match record::decode(&bytes[f.payload.clone()]) {
            Ok(record::Record::Header { job }) => Some(job),
            _ => None,
        }
    });
    match job {
        Some(job) => Ok(Some(FileContents {
            path: path.to_path_buf(),
            job,
            bytes,
            scan,
        })),
        // A crash while the header was being written leaves a file with nothing in it.
        None if scan.records.is_empty() && bytes.len() < 64 => Ok(None),
        None => Err(SpoolError::NotSpool(path.to_path_buf())),
    }
}
