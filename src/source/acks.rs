//! Ack bookkeeping: which delivery tag may be acked, given batches that commit out of order.
//!
//! Batches are dispatched in delivery order but `sessions` of them commit concurrently, so they
//! finish in any order. A `basic.ack` with `multiple` covers every tag up to the one named, so it
//! may only name the last tag of a batch whose predecessors have all committed. This is pure
//! bookkeeping, property-tested: the broker never hears of a tag before its batch is durable.

use std::collections::VecDeque;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AckError {
    #[error("batch {0} completed but was never dispatched (or completed twice): a worker bug")]
    UnknownBatch(u64),
    #[error(
        "batch {id} dispatched out of order (last tag {last_tag} after {previous}): a worker bug"
    )]
    OutOfOrder {
        id: u64,
        last_tag: u64,
        previous: u64,
    },
}

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Dispatched, not yet acked batches, in dispatch order: (batch id, last tag, committed).
    pending: VecDeque<(u64, u64, bool)>,
    /// Highest tag already acked (0 = none).
    acked: u64,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that batch `id`, ending at `last_tag`, was handed to the sink.
    pub fn dispatched(&mut self, id: u64, last_tag: u64) -> Result<(), AckError> {
        let previous = self.pending.back().map_or(self.acked, |b| b.1);
        if last_tag <= previous {
            return Err(AckError::OutOfOrder {
                id,
                last_tag,
                previous,
            });
        }
        self.pending.push_back((id, last_tag, false));
        Ok(())
    }

    /// Records that batch `id` committed; returns the tag to ack with `multiple = true`, if the
    /// committed prefix grew.
    pub fn committed(&mut self, id: u64) -> Result<Option<u64>, AckError> {
        let slot = self
            .pending
            .iter_mut()
            .find(|b| b.0 == id && !b.2)
            .ok_or(AckError::UnknownBatch(id))?;
        slot.2 = true;
        let mut ack = None;
        while let Some(&(_, tag, true)) = self.pending.front() {
            self.pending.pop_front();
            self.acked = tag;
            ack = Some(tag);
        }
        Ok(ack)
    }

    /// Batches dispatched but not yet acked.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Forgets everything: after a channel is lost its tags mean nothing.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_commits_ack_only_the_prefix() {
        let mut t = AckTracker::new();
        t.dispatched(0, 10).unwrap();
        t.dispatched(1, 20).unwrap();
        t.dispatched(2, 25).unwrap();
        assert_eq!(t.committed(1), Ok(None));
        assert_eq!(t.committed(0), Ok(Some(20)));
        assert_eq!(t.committed(2), Ok(Some(25)));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.committed(2), Err(AckError::UnknownBatch(2)));
        assert!(t.dispatched(3, 25).is_err());
    }

    proptest! {
        /// Whatever order batches commit in, every acked tag is covered by committed batches
        /// only, and once all commit, the last tag is acked.
        #[test]
        fn acks_never_run_ahead(sizes in proptest::collection::vec(1u64..50, 1..30), seed in any::<u64>()) {
            let mut t = AckTracker::new();
            let mut last = 0;
            let mut ends = Vec::new();
            for (id, n) in sizes.iter().enumerate() {
                last += n;
                t.dispatched(id as u64, last).unwrap();
                ends.push(last);
            }
            let mut order: Vec<usize> = (0..sizes.len()).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut done = vec![false; sizes.len()];
            let mut acked = 0;
            for &i in &order {
                done[i] = true;
                if let Some(tag) = t.committed(i as u64).unwrap() {
                    prop_assert!(tag > acked);
                    let covered = ends.iter().position(|&e| e == tag).unwrap();
                    prop_assert!(done[..=covered].iter().all(|d| *d));
                    acked = tag;
                }
            }
            prop_assert_eq!(acked, last);
        }
    }
}
