//! The set of committed sequence numbers. Sessions commit batches out of order, so what is
//! committed is a set of ranges, not a prefix; the checkpoint cuts the spool at the first
//! sequence the set does not cover, and recovery skips every sequence it does cover.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent inclusive ranges of sequence numbers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// first → last, inclusive.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `first..=last` (ignored when `first > last`), merging with overlapping or adjacent
    /// ranges.
    pub fn insert(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let (mut lo, mut hi) = (first, last);
        // The range starting at or before `first` may overlap or touch it.
        if let Some((&s, &e)) = self.ranges.range(..=first).next_back() {
            if e.saturating_add(1) >= first {
                lo = s;
                hi = hi.max(e);
            }
        }
        // Ranges starting inside `lo..=hi+1` are swallowed.
        let swallowed: Vec<(u64, u64)> = self
            .ranges
            .range(lo..=hi.saturating_add(1))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in swallowed {
            self.ranges.remove(&s);
            hi = hi.max(e);
        }
        self.ranges.insert(lo, hi);
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &e)| seq <= e)
    }

    /// The smallest sequence `>= from` not in the set.
    pub fn first_missing(&self, from: u64) -> u64 {
        match self.ranges.range(..=from).next_back() {
            Some((_, &e)) if e >= from => e.saturating_add(1),
            _ => from,
        }
    }

    /// Forgets everything below `seq` (after a checkpoint cut the spool there).
    pub fn prune_below(&mut self, seq: u64) {
        let mut keep = self.ranges.split_off(&seq);
        // A range straddling `seq` keeps its upper part.
        if let Some((_, &e)) = self.ranges.iter().next_back() {
            if e >= seq {
                keep.insert(seq, e);
            }
        }
        self.ranges = keep;
    }

    /// Number of disjoint ranges (what the set costs to hold).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn out_of_order_commits() {
        let mut r = RangeSet::new();
        r.insert(11, 20);
        assert_eq!(r.first_missing(1), 1);
        r.insert(1, 10);
        assert_eq!(r.first_missing(1), 21);
        assert_eq!(r.len(), 1);
        r.insert(31, 40);
        assert_eq!(r.first_missing(1), 21);
        assert!(r.contains(35) && !r.contains(25));
        r.prune_below(21);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(31, 40)]);
    }

    proptest! {
        /// The set behaves exactly like a set of integers, and stays in canonical form.
        #[test]
        fn matches_a_plain_set(ops in prop::collection::vec((0u64..200, 0u64..12), 0..60), probe in 0u64..220, cut in 0u64..220) {
            let mut r = RangeSet::new();
            let mut model = BTreeSet::new();
            for (first, n) in ops {
                r.insert(first, first + n);
                model.extend(first..=first + n);
            }
            for s in 0..220 {
                prop_assert_eq!(r.contains(s), model.contains(&s));
            }
            let missing = (probe..).find(|s| !model.contains(s)).unwrap();
            prop_assert_eq!(r.first_missing(probe), missing);
            // Canonical: disjoint and not adjacent.
            let v: Vec<_> = r.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
            r.prune_below(cut);
            for s in 0..220 {
                prop_assert_eq!(r.contains(s), s >= cut && model.contains(&s));
            }
        }
    }
}
