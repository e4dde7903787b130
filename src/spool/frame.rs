//! The on-disk framing shared by the spool and the journal: a file magic, then records
//! `len: u32 | crc32: u32 | seq: u64 | payload`, little-endian. `len` counts `seq` and the
//! payload; the crc covers the same bytes. Sequence numbers strictly increase within a file.
//!
//! Reading is forgiving by design: a torn tail (the process died mid-write) or a damaged record
//! (a flipped bit) is skipped and reported, and the scan resynchronises on the next record whose
//! crc matches and whose sequence number continues the file — so one bad sector costs the
//! records it touches, never the ones after it.

use std::ops::Range;

/// First bytes of every spool and journal file; the last byte is the format version.
pub const MAGIC: &[u8; 8] = b"CNVYSPL1";
/// `len` + `crc` + `seq`.
pub const HEADER_LEN: usize = 16;
/// Upper bound on one record, so a damaged length cannot make the reader swallow the file.
/// Bodies are capped by `max_body_bytes` well below this.
pub const MAX_RECORD: usize = 256 << 20;

/// Appends one framed record to `out`.
pub fn append(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = (8 + payload.len()) as u32;
    let seq_bytes = seq.to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&seq_bytes);
    h.update(payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&seq_bytes);
    out.extend_from_slice(payload);
}

/// One whole record found by [`scan`]: its sequence number, and where it and its payload sit in
/// the scanned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub seq: u64,
    pub at: Range<usize>,
    pub payload: Range<usize>,
}

/// What a scan found: the whole records in order, and every byte range it had to skip.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    pub records: Vec<Found>,
    pub damaged: Vec<Range<usize>>,
    /// False when the bytes do not start with [`MAGIC`] (not a conveyor file, or empty).
    pub magic: bool,
}

impl Scan {
    pub fn damaged_bytes(&self) -> usize {
        self.damaged.iter().map(|r| r.len()).sum()
    }
}

/// Parses a record at `pos` if one is whole and intact there and continues after `after`.
fn record_at(bytes: &[u8], pos: usize, after: Option<u64>) -> Option<Found> {
    let head = bytes.get(pos..pos + HEADER_LEN)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    if !(8..=MAX_RECORD).contains(&len) {
        return None;
    }
    let end = pos.checked_add(8 + len)?;
    let body = bytes.get(pos + 8..end)?;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    if crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(head[8..16].try_into().ok()?);
    if after.is_some_and(|a| seq <= a) {
        return None;
    }
    Some(Found {
        seq,
        at: pos..end,
        payload: pos + HEADER_LEN..end,
    })
}

/// Finds every whole record in a file's bytes (magic included), skipping damage.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut s = Scan::default();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        if !bytes.is_empty() {
            s.damaged.push(0..bytes.len());
        }
        return s;
    }
    s.magic = true;
    let mut pos = MAGIC.len();
    let mut last: Option<u64> = None;
    while pos < bytes.len() {
        if let Some(f) = record_at(bytes, pos, last) {
            pos = f.at.end;
            last = Some(f.seq);
            s.records.push(f);
            continue;
        }
        // Damage: resynchronise on the next intact record that continues the sequence.
        let next = (pos + 1..bytes.len().saturating_sub(HEADER_LEN - 1))
            .find_map(|p| record_at(bytes, p, last));
        match next {
            Some(f) => {
                s.damaged.push(pos..f.at.start);
                pos = f.at.start;
            }
            None => {
                s.damaged.push(pos..bytes.len());
                break;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (seq, p) in records {
            append(&mut out, *seq, p);
        }
        out
    }

    fn payloads(bytes: &[u8], s: &Scan) -> Vec<(u64, Vec<u8>)> {
        s.records
            .iter()
            .map(|f| (f.seq, bytes[f.payload.clone()].to_vec()))
            .collect()
    }

    fn records() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..40).prop_map(|ps| {
            ps.into_iter()
                .enumerate()
                .map(|(i, p)| (i as u64 * 3 + 1, p))
                .collect()
        })
    }

    #[test]
    fn empty_and_foreign_files() {
        let s = scan(b"");
        assert!(!s.magic && s.records.is_empty() && s.damaged.is_empty());
        let s = scan(b"hello world, not a spool");
        assert!(!s.magic && s.damaged.len() == 1 && s.damaged[0] == (0..24));
        let s = scan(MAGIC);
        assert!(s.magic && s.records.is_empty() && s.damaged.is_empty());
    }

    proptest! {
        #[test]
        fn round_trip(recs in records()) {
            let bytes = file(&recs);
            let s = scan(&bytes);
            prop_assert!(s.damaged.is_empty());
            prop_assert_eq!(payloads(&bytes, &s), recs);
        }

        /// A file cut anywhere yields exactly the records that were whole before the cut.
        #[test]
        fn torn_tail_keeps_every_whole_record(recs in records(), cut in any::<prop::sample::Index>()) {
            let bytes = file(&recs);
            let at = MAGIC.len() + cut.index(bytes.len() - MAGIC.len() + 1);
            let torn = &bytes[..at];
            let s = scan(torn);
            let full = scan(&bytes);
            let whole: Vec<_> = full.records.iter().filter(|f| f.at.end <= at).cloned().collect();
            prop_assert_eq!(&s.records, &whole);
            let tail = whole.last().map_or(MAGIC.len(), |f| f.at.end);
            prop_assert_eq!(s.damaged_bytes(), at - tail);
        }

        /// A flipped byte costs at most the record it falls in (and never invents one).
        #[test]
        fn flipped_byte_costs_one_record(recs in records(), which in any::<prop::sample::Index>(), bit in 0u8..8) {
            prop_assume!(!recs.is_empty());
            let mut bytes = file(&recs);
            let full = scan(&bytes);
            let pos = MAGIC.len() + which.index(bytes.len() - MAGIC.len());
            bytes[pos] ^= 1 << bit;
            let s = scan(&bytes);
            let hit = full.records.iter().position(|f| f.at.contains(&pos)).expect("inside a record");
            let mut expected = payloads(&file(&recs), &full);
            expected.remove(hit);
            let got = payloads(&bytes, &s);
            // Every record but the damaged one survives, in order, unchanged.
            prop_assert_eq!(got, expected);
            prop_assert!(s.damaged_bytes() > 0);
        }
    }
}
