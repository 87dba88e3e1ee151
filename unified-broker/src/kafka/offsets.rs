//! Which offsets of a consumer's partitions may be committed.
//!
//! Kafka stores one position per (group, partition): committing offset `n` says
//! "everything below `n` is done". Our deliveries are acked one by one and out of order
//! (the server works on several at once), so the committable position of a partition is
//! its *low watermark*: the lowest offset handed out and not yet acked, or, when nothing
//! is outstanding, one past the highest offset handed out. Anything above it that was
//! acked already is delivered again after a crash or rebalance: duplicates, never loss.
//!
//! A partition's state lives from its first delivery until it is revoked. Each state gets
//! a fresh *generation* number, and every delivery carries the generation it was handed
//! out under; settlements from an older generation (a delivery that outlived a
//! rebalance) are ignored, because the partition's offsets now belong to whichever member
//! owns it, and the message comes back from the last committed offset anyway.

use std::collections::{BTreeSet, HashMap};

/// Tracks outstanding offsets per partition of one topic, for one consumer.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
    last_generation: u64,
}

#[derive(Debug)]
struct PartitionOffsets {
    generation: u64,
    /// Handed out and neither acked nor abandoned (nacked ones wait here for their
    /// redelivery).
    outstanding: BTreeSet<i64>,
    /// One past the highest offset handed out.
    next: i64,
    /// The last position sent in a commit, if any.
    committed: Option<i64>,
}

impl PartitionOffsets {
    fn low_watermark(&self) -> i64 {
        self.outstanding.first().copied().unwrap_or(self.next)
    }

    fn dirty(&self) -> bool {
        self.committed != Some(self.low_watermark())
    }
}

impl OffsetTracker {
    /// Records that `offset` of `partition` was handed out; returns the generation the
    /// delivery belongs to.
    pub(crate) fn delivered(&mut self, partition: i32, offset: i64) -> u64 {
        let next_generation = self.last_generation + 1;
        let state = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionOffsets {
                generation: next_generation,
                outstanding: BTreeSet::new(),
                next: offset,
                committed: None,
            });
        if state.generation == next_generation {
            self.last_generation = next_generation;
        }
        state.outstanding.insert(offset);
        state.next = state.next.max(offset + 1);
        state.generation
    }

    /// Whether a delivery of `generation` still belongs to the partition's live state
    /// (its settlement counts).
    pub(crate) fn is_current(&self, partition: i32, generation: u64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|state| state.generation == generation)
    }

    /// Marks `offset` done. Returns false (and changes nothing) for a stale delivery.
    pub(crate) fn ack(&mut self, partition: i32, generation: u64, offset: i64) -> bool {
        match self.partitions.get_mut(&partition) {
            Some(state) if state.generation == generation => {
                state.outstanding.remove(&offset);
                true
            }
            _ => false,
        }
    }

    /// The position that may be committed for `partition` now.
    #[cfg(test)]
    pub(crate) fn commit_point(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .map(PartitionOffsets::low_watermark)
    }

    /// Positions that moved since their last commit, as `(partition, position)`.
    pub(crate) fn to_commit(&self) -> Vec<(i32, i64)> {
        let mut positions: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter(|(_, state)| state.dirty())
            .map(|(&partition, state)| (partition, state.low_watermark()))
            .collect();
        positions.sort_unstable();
        positions
    }

    /// Records that these positions were sent in a commit.
    pub(crate) fn mark_committed(&mut self, positions: &[(i32, i64)]) {
        for &(partition, position) in positions {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.committed = Some(position);
            }
        }
    }

    /// Records that the commit of `position` for `partition` failed, so the position
    /// counts as moved again and the next commit (periodic, revoke or close) retries it.
    pub(crate) fn commit_failed(&mut self, partition: i32, position: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            if state.committed == Some(position) {
                state.committed = None;
            }
        }
    }

    /// Forgets `partition` (revoked, or the consumer is closing); returns the position to
    /// commit for it if that moved since the last commit. Later settlements of its
    /// deliveries are stale.
    pub(crate) fn revoke(&mut self, partition: i32) -> Option<i64> {
        let state = self.partitions.remove(&partition)?;
        state.dirty().then(|| state.low_watermark())
    }

    /// Forgets every partition; returns the positions to commit, as for
    /// [`OffsetTracker::revoke`].
    pub(crate) fn revoke_all(&mut self) -> Vec<(i32, i64)> {
        let positions = self.to_commit();
        self.partitions.clear();
        positions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_commit_the_low_watermark() {
        let mut tracker = OffsetTracker::default();
        let generation = tracker.delivered(0, 10);
        for offset in 11..15 {
            assert_eq!(tracker.delivered(0, offset), generation);
        }
        assert_eq!(tracker.commit_point(0), Some(10));
        // 12 and 14 done, 10 still out: nothing past 10 is committable.
        assert!(tracker.ack(0, generation, 12));
        assert!(tracker.ack(0, generation, 14));
        assert_eq!(tracker.commit_point(0), Some(10));
        // 10 done: 11 is the lowest still out.
        assert!(tracker.ack(0, generation, 10));
        assert_eq!(tracker.commit_point(0), Some(11));
        assert!(tracker.ack(0, generation, 11));
        assert_eq!(tracker.commit_point(0), Some(13));
        assert!(tracker.ack(0, generation, 13));
        // Everything done: one past the last handed out.
        assert_eq!(tracker.commit_point(0), Some(15));
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compaction or transaction markers leave holes; only delivered offsets count.
        let mut tracker = OffsetTracker::default();
        let generation = tracker.delivered(3, 5);
        tracker.delivered(3, 9);
        assert!(tracker.ack(3, generation, 9));
        assert_eq!(tracker.commit_point(3), Some(5));
        assert!(tracker.ack(3, generation, 5));
        assert_eq!(tracker.commit_point(3), Some(10));
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::default();
        let first = tracker.delivered(0, 0);
        let second = tracker.delivered(1, 100);
        assert!(tracker.ack(1, second, 100));
        assert_eq!(tracker.to_commit(), vec![(0, 0), (1, 101)]);
        assert!(tracker.ack(0, first, 0));
        assert_eq!(tracker.to_commit(), vec![(0, 1), (1, 101)]);
    }

    #[test]
    fn nacked_offset_holds_the_commit_point_until_redelivered_and_acked() {
        // A nack leaves the offset outstanding (the subscriber queues the message for
        // redelivery): the commit point cannot pass it, so a crash before the
        // redelivery is acked re-reads it from Kafka.
        let mut tracker = OffsetTracker::default();
        let generation = tracker.delivered(0, 0);
        tracker.delivered(0, 1);
        tracker.delivered(0, 2);
        // 1 is nacked: it stays outstanding; 0 and 2 are acked.
        assert!(tracker.is_current(0, generation));
        assert!(tracker.ack(0, generation, 0));
        assert!(tracker.ack(0, generation, 2));
        assert_eq!(tracker.commit_point(0), Some(1));
        assert_eq!(tracker.to_commit(), vec![(0, 1)]);
        // The redelivery is acked: everything is done.
        assert!(tracker.ack(0, generation, 1));
        assert_eq!(tracker.commit_point(0), Some(3));
    }

    #[test]
    fn commits_are_only_reported_when_the_position_moved() {
        let mut tracker = OffsetTracker::default();
        let generation = tracker.delivered(0, 0);
        assert!(tracker.ack(0, generation, 0));
        let positions = tracker.to_commit();
        assert_eq!(positions, vec![(0, 1)]);
        tracker.mark_committed(&positions);
        assert!(tracker.to_commit().is_empty());
        // An asynchronous commit that failed is retried by the next one.
        tracker.commit_failed(0, 1);
        assert_eq!(tracker.to_commit(), vec![(0, 1)]);
        tracker.mark_committed(&[(0, 1)]);
        tracker.delivered(0, 1);
        // Delivered but not acked: the position is still 1, already committed.
        assert!(tracker.to_commit().is_empty());
        assert_eq!(tracker.revoke(0), None);
    }

    #[test]
    fn revoke_returns_the_final_position_and_makes_old_deliveries_stale() {
        let mut tracker = OffsetTracker::default();
        let old = tracker.delivered(2, 40);
        tracker.delivered(2, 41);
        assert!(tracker.ack(2, old, 41));
        // Revoked with 40 outstanding: commit 40, so the new owner starts there.
        assert_eq!(tracker.revoke(2), Some(40));
        assert_eq!(tracker.commit_point(2), None);
        // A late ack of the old delivery changes nothing.
        assert!(!tracker.ack(2, old, 40));
        assert!(!tracker.is_current(2, old));
        // The partition comes back (re-assigned): a new generation, fresh state from
        // the committed position.
        let new = tracker.delivered(2, 40);
        assert_ne!(new, old);
        assert!(
            !tracker.ack(2, old, 40),
            "stale ack ignored after re-assignment"
        );
        assert_eq!(tracker.commit_point(2), Some(40));
        assert!(tracker.ack(2, new, 40));
        assert_eq!(tracker.commit_point(2), Some(41));
    }

    #[test]
    fn revoke_all_reports_every_moved_position() {
        let mut tracker = OffsetTracker::default();
        let a = tracker.delivered(0, 7);
        let b = tracker.delivered(1, 3);
        assert!(tracker.ack(0, a, 7));
        assert!(tracker.ack(1, b, 3));
        tracker.mark_committed(&[(1, 4)]);
        assert_eq!(tracker.revoke_all(), vec![(0, 8)]);
        assert!(tracker.to_commit().is_empty());
        assert!(!tracker.is_current(0, a));
    }
}
