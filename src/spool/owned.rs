//! Which recent messages the spools of a pipeline already own, to recognise their redeliveries.
//!
//! A delivery is acked after its spool record is fsynced, and an ack is not confirmed by the
//! broker: if the process dies (or the connection drops) between the fsync and the broker
//! applying the ack, the message is both in the spool and back in the queue. The broker marks
//! such a message `redelivered`, and it can only be one of the last `prefetch` messages of the
//! channel that received it (the broker never has more unacked). So each pipeline remembers the
//! identities of its last spooled messages; a redelivered message whose identity is there is
//! acked and recorded as a duplicate instead of being loaded twice. Identities are counted, so
//! two genuinely identical messages are still both loaded once.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use lapin::BasicProperties;

use super::{frame, SpoolError};

/// The sidecar that carries a recovered spool's identities past its deletion:
/// `<state_dir>/<pipeline>/<slot>/owned.ids`. Recovery loads the spool's rows and deletes the
/// spool, but the broker may still redeliver the messages that were unacked at the crash — and
/// the process may die again before they come. The sidecar keeps their identities until a job
/// of the slot has consumed and ended normally (by then the redeliveries have gone by).
pub fn sidecar_path(spool: &Path) -> PathBuf {
    spool.with_file_name("owned.ids")
}

/// Writes `ids` to the sidecar (atomically: temp file, fsync, rename).
pub fn save(path: &Path, ids: &[u64]) -> Result<(), SpoolError> {
    use std::io::Write;
    let io = |what: &'static str| {
        move |source| SpoolError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let mut payload = Vec::with_capacity(ids.len() * 8);
    for id in ids {
        payload.extend_from_slice(&id.to_le_bytes());
    }
    let mut bytes = frame::MAGIC.to_vec();
    frame::append(&mut bytes, 1, &payload);
    let tmp = path.with_extension("ids.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("writing"))?;
    f.write_all(&bytes).map_err(io("writing"))?;
    f.sync_all().map_err(io("fsyncing"))?;
    std::fs::rename(&tmp, path).map_err(io("replacing"))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The identities in the sidecar; none when it is missing or damaged.
pub fn load(path: &Path) -> Vec<u64> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let scan = frame::scan(&bytes);
    scan.records
        .first()
        .map(|f| {
            bytes[f.payload.clone()]
                .chunks_exact(8)
                .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
                .collect()
        })
        .unwrap_or_default()
}

/// Bounded multiset of message identities, oldest evicted first.
#[derive(Debug)]
pub struct Owned {
    cap: usize,
    ring: VecDeque<u64>,
    counts: HashMap<u64, u32, std::hash::BuildHasherDefault<IdHasher>>,
}

/// The identities are already 64-bit hashes: hashing them again (SipHash) was 4 % of the
/// drain's CPU in the profile, for nothing.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else anyway rather than panic.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Owned {
    pub fn new(cap: usize) -> Self {
        Owned {
            cap: cap.max(1),
            ring: VecDeque::with_capacity(cap.max(1)),
            counts: HashMap::default(),
        }
    }

    /// Remembers one spooled message.
    pub fn push(&mut self, id: u64) {
        if self.ring.len() == self.cap {
            if let Some(old) = self.ring.pop_front() {
                self.forget(old);
            }
        }
        self.ring.push_back(id);
        *self.counts.entry(id).or_insert(0) += 1;
    }

    /// True (and consumes one occurrence) when `id` is owned.
    pub fn take(&mut self, id: u64) -> bool {
        self.forget(id)
    }

    fn forget(&mut self, id: u64) -> bool {
        match self.counts.get_mut(&id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.counts.remove(&id);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

/// Identities of the last `window` messages a spool (or journal) holds, duplicates included.
pub fn spool_identities(
    spool: &super::FileContents,
    queue_time_header: &str,
    window: usize,
) -> Vec<u64> {
    use super::record::{self, Record};
    let records: Vec<&[u8]> = spool.records().map(|(_, p)| p).collect();
    let from = records.len().saturating_sub(window);
    records[from..]
        .iter()
        .filter_map(|payload| match record::decode(payload) {
            Ok(Record::Delivery(d)) => Some(identity(&d.props, queue_time_header, d.body)),
            _ => None,
        })
        .collect()
}

/// A message's identity: its message_id when the publisher set one, else its timestamp,
/// `x-queue-time` and body. Headers the broker adds on redelivery (`x-delivery-count`) are left
/// out on purpose.
pub fn identity(props: &BasicProperties, queue_time_header: &str, body: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(id) = props.message_id() {
        0u8.hash(&mut h);
        id.as_str().hash(&mut h);
        return h.finish();
    }
    1u8.hash(&mut h);
    props.timestamp().hash(&mut h);
    use lapin::types::AMQPValue;
    match props
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(queue_time_header))
    {
        Some(AMQPValue::LongLongInt(v)) => v.hash(&mut h),
        Some(AMQPValue::LongString(s)) => s.as_bytes().hash(&mut h),
        Some(AMQPValue::ShortString(s)) => s.as_str().hash(&mut h),
        Some(AMQPValue::Timestamp(t)) => t.hash(&mut h),
        _ => {}
    }
    body.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_occurrences_and_evicts_oldest() {
        let mut o = Owned::new(3);
        o.push(1);
        o.push(1);
        o.push(2);
        assert!(o.take(1));
        assert!(o.take(1));
        assert!(!o.take(1));
        o.push(3); // evicts the first 1 (already taken: nothing left to forget)
        o.push(4); // evicts the second 1
        o.push(5); // evicts 2
        assert!(!o.take(2), "2 was evicted");
        assert!(o.take(3) && o.take(4));
        assert!(o.take(5));
        assert!(!o.take(9));
    }

    #[test]
    fn identity_prefers_message_id_and_ignores_delivery_count() {
        use lapin::types::{AMQPValue, FieldTable, ShortString};
        let with_id = BasicProperties::default().with_message_id("abc".into());
        assert_eq!(
            identity(&with_id, "x-queue-time", b"a"),
            identity(&with_id, "x-queue-time", b"b")
        );
        let mut h1 = FieldTable::default();
        h1.insert(ShortString::from("x-queue-time"), AMQPValue::LongLongInt(5));
        let mut h2 = h1.clone();
        h2.insert(
            ShortString::from("x-delivery-count"),
            AMQPValue::LongLongInt(1),
        );
        let a = BasicProperties::default().with_headers(h1);
        let b = BasicProperties::default().with_headers(h2);
        assert_eq!(
            identity(&a, "x-queue-time", b"row"),
            identity(&b, "x-queue-time", b"row")
        );
        assert_ne!(
            identity(&a, "x-queue-time", b"row"),
            identity(&a, "x-queue-time", b"row2")
        );
    }
}
