//! The counters a running server keeps ([`ServerStats`]) and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a running server keeps; read them for logs, tests and benchmarks.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Deliveries taken from the broker.
    pub received: AtomicU64,
    /// Requests answered with predictions.
    pub classified: AtomicU64,
    /// Requests answered with an error reply.
    pub rejected: AtomicU64,
    /// Requests acked without any reply (no reply topic, or the reply topic is gone).
    pub unanswerable: AtomicU64,
    /// Batches run through the model.
    pub batches: AtomicU64,
    /// Reply publishes that failed and were retried.
    pub publish_retries: AtomicU64,
    /// Requests copied to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

/// A snapshot of [`ServerStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`ServerStats::received`].
    pub received: u64,
    /// See [`ServerStats::classified`].
    pub classified: u64,
    /// See [`ServerStats::rejected`].
    pub rejected: u64,
    /// See [`ServerStats::unanswerable`].
    pub unanswerable: u64,
    /// See [`ServerStats::batches`].
    pub batches: u64,
    /// See [`ServerStats::publish_retries`].
    pub publish_retries: u64,
    /// See [`ServerStats::dead_lettered`].
    pub dead_lettered: u64,
}

impl ServerStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            classified: get(&self.classified),
            rejected: get(&self.rejected),
            unanswerable: get(&self.unanswerable),
            batches: get(&self.batches),
            publish_retries: get(&self.publish_retries),
            dead_lettered: get(&self.dead_lettered),
        }
    }

    /// Adds `n` to one of the counters (the stages' only way to count).
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_every_counter() {
        let stats = ServerStats::default();
        let counters = [
            &stats.received,
            &stats.classified,
            &stats.rejected,
            &stats.unanswerable,
            &stats.batches,
            &stats.publish_retries,
            &stats.dead_lettered,
        ];
        for (i, counter) in counters.into_iter().enumerate() {
            ServerStats::add(counter, i as u64 + 1);
        }
        assert_eq!(
            stats.snapshot(),
            StatsSnapshot {
                received: 1,
                classified: 2,
                rejected: 3,
                unanswerable: 4,
                batches: 5,
                publish_retries: 6,
                dead_lettered: 7,
            }
        );
    }
}
