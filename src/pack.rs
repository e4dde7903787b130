//! Pack: groups decoded rows into batches that the sink commits in one transaction each.
//!
//! A batch closes at `pack` rows or `latency` after its first row, whichever comes first (the
//! seed's PACK and LATENCY). Progress travels with the data: every batch carries the delivery
//! tags it covers — good rows and rejected rows alike — so acking a committed batch can never
//! skip a poison message or ack one that is still in flight.

use std::time::{Duration, Instant};

use crate::decode::{Decoder, Reject};

/// One message that decoded into a COPY line.
#[derive(Debug)]
pub struct GoodRow {
    /// Byte range of this row's line in `Batch::copy`.
    pub start: usize,
    pub end: usize,
    /// Kept so a row the database refuses can still go to the error table as it arrived.
    pub raw: Vec<u8>,
    pub seq: u64,
    pub queue_time_us: i64,
    pub message_id: Option<String>,
    /// The broker had delivered this message before (`durability = "broker"` checks its id).
    pub redelivered: bool,
}

/// One message that goes to the error table.
#[derive(Debug)]
pub struct BadRow {
    pub raw: Vec<u8>,
    pub seq: u64,
    pub queue_time_us: Option<i64>,
    pub message_id: Option<String>,
    pub redelivered: bool,
    pub reject: Reject,
}

/// The unit of commit and of ack.
#[derive(Debug)]
pub struct Batch {
    /// Position of this batch in its job (0, 1, 2, …); also its robust-mark key.
    pub id: u64,
    /// COPY text of the good rows, one line each.
    pub copy: Vec<u8>,
    pub good: Vec<GoodRow>,
    pub bad: Vec<BadRow>,
    /// Deliveries that are not rows (end-of-job markers): acked with the batch, loaded nowhere.
    pub skipped: usize,
    /// Highest AMQP delivery tag in the batch (tags are consecutive per channel).
    pub last_tag: u64,
    /// First and last job sequence numbers covered.
    pub first_seq: u64,
    pub last_seq: u64,
    pub opened_at: Instant,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.good.len() + self.bad.len()
    }

    /// Decodes one message into this batch: a COPY line and a good row, or a bad row with its
    /// reason. `seq` becomes the batch's last sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn push_message(
        &mut self,
        decoder: &mut Decoder,
        body: Vec<u8>,
        seq: u64,
        header_queue_time_us: Option<i64>,
        received_us: i64,
        message_id: Option<String>,
        redelivered: bool,
    ) {
        let start = self.copy.len();
        match decoder.decode(&body, header_queue_time_us, received_us, &mut self.copy) {
            Ok(decoded) => self.good.push(GoodRow {
                start,
                end: self.copy.len(),
                raw: body,
                seq,
                queue_time_us: decoded.queue_time_us,
                message_id,
                redelivered,
            }),
            Err(reject) => self.bad.push(BadRow {
                raw: body,
                seq,
                queue_time_us: header_queue_time_us,
                message_id,
                redelivered,
                reject,
            }),
        }
        self.last_seq = seq;
    }

    /// True when the batch covers no delivery at all.
    pub fn is_empty(&self) -> bool {
        self.rows() == 0 && self.skipped == 0
    }
}

/// Builds batches; owned by one worker.
#[derive(Debug)]
pub struct Packer {
    pack: usize,
    latency: Duration,
    next_id: u64,
    open: Option<Batch>,
    /// COPY bytes per row of the last closed batch: sizes the next buffer so it is allocated
    /// once (a growing 2 MB buffer cost reallocations and fresh zeroed pages in the profile).
    row_bytes: usize,
}

impl Packer {
    pub fn new(pack: usize, latency: Duration) -> Self {
        Packer {
            pack,
            latency,
            next_id: 0,
            open: None,
            row_bytes: 512,
        }
    }

    fn closed(&mut self, b: &Batch) {
        if !b.good.is_empty() {
            self.row_bytes = (b.copy.len() / b.good.len()).clamp(16, 1 << 20);
        }
    }

    /// The open batch, creating it if needed, for decode to append into.
    pub fn open(&mut self, now: Instant, seq: u64) -> &mut Batch {
        let pack = self.pack;
        let bytes = pack.saturating_mul(self.row_bytes + self.row_bytes / 8);
        let id = &mut self.next_id;
        self.open.get_or_insert_with(|| {
            let b = Batch {
                id: *id,
                copy: Vec::with_capacity(bytes),
                good: Vec::with_capacity(pack),
                bad: Vec::new(),
                skipped: 0,
                last_tag: 0,
                first_seq: seq,
                last_seq: seq,
                opened_at: now,
            };
            *id += 1;
            b
        })
    }

    /// Takes the open batch if it is full.
    pub fn take_if_full(&mut self) -> Option<Batch> {
        if self.open.as_ref().is_some_and(|b| b.rows() >= self.pack) {
            let b = self.open.take()?;
            self.closed(&b);
            Some(b)
        } else {
            None
        }
    }

    /// When the open batch must close for latency, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|b| b.opened_at + self.latency)
    }

    /// Takes the open batch whatever its size (latency expiry, EOJ, shutdown).
    pub fn seal(&mut self) -> Option<Batch> {
        let b = self.open.take().filter(|b| !b.is_empty())?;
        self.closed(&b);
        Some(b)
    }

    /// Changes the batch size for batches opened from now on (a priority job's raised pack).
    pub fn set_pack(&mut self, pack: usize) {
        self.pack = pack;
    }

    /// Number of rows in the open batch.
    pub fn pending_rows(&self) -> usize {
        self.open.as_ref().map_or(0, Batch::rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(p: &mut Packer, now: Instant, seq: u64) {
        let b = p.open(now, seq);
        b.good.push(GoodRow {
            start: 0,
            end: 0,
            raw: Vec::new(),
            seq,
            queue_time_us: 0,
            message_id: None,
            redelivered: false,
        });
        b.last_seq = seq;
        b.last_tag = seq + 1;
    }

    #[test]
    fn closes_at_pack_rows() {
        let t = Instant::now();
        let mut p = Packer::new(3, Duration::from_millis(50));
        let mut closed = Vec::new();
        for seq in 0..7 {
            push(&mut p, t, seq);
            closed.extend(p.take_if_full());
        }
        assert_eq!(closed.len(), 2);
        assert_eq!((closed[0].first_seq, closed[0].last_seq), (0, 2));
        assert_eq!(
            (closed[1].first_seq, closed[1].last_seq, closed[1].id),
            (3, 5, 1)
        );
        assert_eq!(p.pending_rows(), 1);
        let last = p.seal().expect("open batch");
        assert_eq!((last.first_seq, last.id), (6, 2));
        assert!(p.seal().is_none());
    }

    #[test]
    fn deadline_is_latency_after_first_row() {
        let t = Instant::now();
        let mut p = Packer::new(100, Duration::from_millis(50));
        assert_eq!(p.deadline(), None);
        push(&mut p, t, 0);
        push(&mut p, t + Duration::from_millis(30), 1);
        assert_eq!(p.deadline(), Some(t + Duration::from_millis(50)));
    }
}
