//! A consumer group's backlog on Kafka ([`crate::Broker::backlog`]), asked without
//! joining the group.
//!
//! Kafka keeps a group's progress as one committed offset per partition, so per
//! partition the group has not answered the messages from where it stands to the high
//! watermark (the next offset to be written). Where it stands is its committed offset,
//! or, for a partition it never committed (or whose committed offset retention has
//! removed), where a member would start: the consumers' `auto.offset.reset` (earliest
//! as [`KafkaConfig::consumer`] sets it, unless `properties` override it). A committed
//! offset past the high watermark counts as at the end.
//!
//! Tansu 0.6 (the test broker `scripts/kafka-start.sh` installs) answers ListOffsets
//! for the latest offset with the base offset of the partition's last record batch plus
//! one, not its last offset plus one: a batch of several records at the end of a
//! partition is counted as one message there (it sees them all once another batch
//! follows). Kafka itself answers the high watermark. Kafka cannot
//! tell messages a member holds from ones nobody fetched: both are past the committed
//! offset, so [`Backlog::in_flight`] is `None`. The sum of the committed offsets grows
//! with every commit and with nothing else (not with produced messages, nor with
//! retention): it is [`Backlog::consumed`].
//!
//! The questions go through a consumer created with the group's id that never
//! subscribes: the committed offsets come from an OffsetFetch, which does not join the
//! group (no member added, no rebalance), and the watermarks from ListOffsets. One such
//! consumer per group is kept and reused across polls ([`GroupReaders`]); after any
//! error it is dropped and the next poll makes a fresh one, with fresh metadata (stale
//! metadata across a broker restart is what crashes librdkafka 2.12, see
//! `producer.rs`). Every call blocks, so a poll runs on the blocking pool.

use std::collections::{HashMap, HashSet};
use std::ops::DerefMut;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::topics::MAX_LISTING_TIMEOUT;
use super::{map_error, ErrorContext, KafkaConfig, LogContext};
use crate::sync::lock;
use crate::{Backlog, BrokerError, Result};

/// How many groups' consumers are kept (a server polls one; a few is plenty). When
/// more are asked about, one of the kept ones is dropped.
const MAX_READERS: usize = 8;

/// How many queued events (errors a consumer reports while the cluster is away) one poll
/// serves, so an unsubscribed consumer's queue never grows.
const MAX_EVENTS_PER_POLL: usize = 64;

/// The non-joining consumers that read groups' backlogs, one per group id, reused.
pub(crate) struct GroupReaders {
    config: KafkaConfig,
    readers: Mutex<HashMap<String, Arc<BaseConsumer<LogContext>>>>,
    /// The groups being asked about now: a poll that outlived its caller's timeout is
    /// not joined by another one for the same group (they would pile up).
    asking: Mutex<HashSet<String>>,
}

/// Marks a group as being asked about until dropped.
struct Asking<'a> {
    asking: &'a Mutex<HashSet<String>>,
    group_id: String,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        lock(self.asking).remove(&self.group_id);
    }
}

impl Drop for GroupReaders {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Destroys consumers off the async workers: destroying one blocks until its group
/// connection is closed (librdkafka polls in 100 ms steps).
fn release<T: Send + 'static>(consumers: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || drop(consumers));
        }
        Err(_) => drop(consumers),
    }
}

/// Where a member of a group starts in a partition the group has no offset for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reset {
    /// At the oldest retained message: every message counts.
    Earliest,
    /// At the end: what is there already is never read, so none counts.
    Latest,
}

impl Reset {
    /// librdkafka's `auto.offset.reset` value (its synonyms too); anything else
    /// (`error`) leaves the messages unread, so they count, as with `Earliest`.
    fn from_property(value: Option<&str>) -> Reset {
        match value {
            Some("latest" | "largest" | "end") => Reset::Latest,
            _ => Reset::Earliest,
        }
    }
}

/// One partition's offsets: its watermarks and the group's committed offset.
#[derive(Clone, Copy, Debug)]
struct PartitionOffsets {
    low: i64,
    high: i64,
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// Where the group stands: its committed offset; where `reset` starts a member if
    /// it has none or retention removed the message at it; the high watermark if it is
    /// past that (nothing we can count waits).
    fn position(&self, reset: Reset) -> i64 {
        let reset_to = match reset {
            Reset::Earliest => self.low,
            Reset::Latest => self.high,
        };
        match self.committed {
            Some(committed) if committed >= self.low => committed.min(self.high),
            _ => reset_to,
        }
    }
}

/// The group's backlog over `partitions`.
fn backlog_of(partitions: &[PartitionOffsets], reset: Reset) -> Backlog {
    let mut backlog = Backlog {
        waiting: 0,
        in_flight: None,
        consumed: Some(0),
    };
    for partition in partitions {
        let position = partition.position(reset);
        let behind = u64::try_from(partition.high - position).unwrap_or(0);
        backlog.waiting = backlog.waiting.saturating_add(behind);
        let consumed = u64::try_from(partition.committed.unwrap_or(0)).unwrap_or(0);
        backlog.consumed = backlog.consumed.map(|sum| sum.saturating_add(consumed));
    }
    backlog
}

impl GroupReaders {
    /// No consumers yet; they are made with `config`'s consumer settings when first used.
    pub(crate) fn new(config: &KafkaConfig) -> GroupReaders {
        GroupReaders {
            config: config.clone(),
            readers: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashSet::new()),
        }
    }

    /// Lets every kept consumer go (the broker is closing).
    pub(crate) fn release_all(&self) {
        release(std::mem::take(lock(&self.readers).deref_mut()));
    }

    /// The backlog of consumer group `group_id` on `topic`, on the blocking pool.
    pub(crate) async fn backlog(self: &Arc<Self>, topic: &str, group_id: &str) -> Result<Backlog> {
        let readers = Arc::clone(self);
        let (topic, group_id) = (topic.to_string(), group_id.to_string());
        tokio::task::spawn_blocking(move || readers.backlog_blocking(&topic, &group_id))
            .await
            .map_err(|error| BrokerError::Admin(format!("the backlog query failed: {error}")))?
    }

    fn backlog_blocking(&self, topic: &str, group_id: &str) -> Result<Backlog> {
        let _asking = self.start_asking(group_id)?;
        let consumer = self.reader(group_id)?;
        let reset = Reset::from_property(self.config.consumer(group_id).get("auto.offset.reset"));
        let timeout = self.config.request_timeout().min(MAX_LISTING_TIMEOUT);
        let offsets = partition_offsets(&consumer, topic, timeout);
        for _ in 0..MAX_EVENTS_PER_POLL {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        match offsets {
            Ok(Some(partitions)) => Ok(backlog_of(&partitions, reset)),
            Ok(None) => Err(BrokerError::TopicNotFound(topic.to_string())),
            Err(error) => {
                // `consumer` holds it still: it is destroyed when this returns, unlocked.
                lock(&self.readers).remove(group_id);
                Err(map_error(&error, ErrorContext::Admin(topic)))
            }
        }
    }

    /// Marks `group_id` as being asked about, or says an earlier question still runs.
    fn start_asking(&self, group_id: &str) -> Result<Asking<'_>> {
        if !lock(&self.asking).insert(group_id.to_string()) {
            return Err(BrokerError::Unavailable(format!(
                "the previous backlog query of group {group_id} has not finished"
            )));
        }
        Ok(Asking {
            asking: &self.asking,
            group_id: group_id.to_string(),
        })
    }

    /// The kept consumer of `group_id`, or a new one (which never subscribes). A
    /// consumer evicted to make room is destroyed after the lock is released (on this
    /// blocking thread), so other polls never wait for it.
    fn reader(&self, group_id: &str) -> Result<Arc<BaseConsumer<LogContext>>> {
        let mut readers = lock(&self.readers);
        if let Some(reader) = readers.get(group_id) {
            return Ok(Arc::clone(reader));
        }
        let reader: BaseConsumer<LogContext> =
            super::config::without_statistics(self.config.consumer(group_id))
                .create_with_context(LogContext)
                .map_err(|error| map_error(&error, ErrorContext::Connect))?;
        let mut evicted = None;
        if readers.len() >= MAX_READERS {
            let oldest = readers.keys().next().cloned();
            evicted = oldest.and_then(|group| readers.remove(&group));
        }
        let reader = Arc::new(reader);
        readers.insert(group_id.to_string(), Arc::clone(&reader));
        drop(readers);
        drop(evicted);
        Ok(reader)
    }
}

/// Every partition's watermarks and committed offset for `consumer`'s group, or `None`
/// if the topic does not exist.
fn partition_offsets(
    consumer: &BaseConsumer<LogContext>,
    topic: &str,
    timeout: Duration,
) -> KafkaResult<Option<Vec<PartitionOffsets>>> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if ids.is_empty() {
        return Ok(None);
    }
    let mut list = TopicPartitionList::new();
    for &id in &ids {
        list.add_partition(topic, id);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let mut partitions = Vec::with_capacity(ids.len());
    for id in ids {
        let (low, high) = consumer.fetch_watermarks(topic, id, timeout)?;
        partitions.push(PartitionOffsets {
            low,
            high,
            committed: committed_offset(&committed, topic, id)?,
        });
    }
    Ok(Some(partitions))
}

/// The offset the group committed for partition `id`, `None` if it has none.
fn committed_offset(
    committed: &TopicPartitionList,
    topic: &str,
    id: i32,
) -> KafkaResult<Option<i64>> {
    let Some(element) = committed.find_partition(topic, id) else {
        return Ok(None);
    };
    element.error()?;
    Ok(match element.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(low: i64, high: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets {
            low,
            high,
            committed,
        }
    }

    #[test]
    fn the_backlog_is_what_lies_past_where_the_group_stands() {
        let partitions = [
            partition(0, 10, Some(4)),
            // Never committed: from the oldest retained message.
            partition(3, 8, None),
            // Committed below what retention kept: from the oldest retained one.
            partition(5, 9, Some(2)),
            // Committed past the high watermark (a broker that undercounts it): at
            // the end, nothing waits.
            partition(0, 2, Some(7)),
        ];
        assert_eq!(
            backlog_of(&partitions, Reset::Earliest),
            Backlog {
                waiting: 6 + 5 + 4,
                in_flight: None,
                consumed: Some(4 + 2 + 7),
            }
        );
        assert_eq!(
            backlog_of(&partitions, Reset::Latest),
            Backlog {
                waiting: 6,
                in_flight: None,
                consumed: Some(4 + 2 + 7),
            }
        );
        assert_eq!(backlog_of(&[], Reset::Earliest).unanswered(), 0);
    }

    #[test]
    fn auto_offset_reset_is_read_as_librdkafka_reads_it() {
        for (value, reset) in [
            (Some("earliest"), Reset::Earliest),
            (Some("smallest"), Reset::Earliest),
            (Some("beginning"), Reset::Earliest),
            (Some("error"), Reset::Earliest),
            (None, Reset::Earliest),
            (Some("latest"), Reset::Latest),
            (Some("largest"), Reset::Latest),
            (Some("end"), Reset::Latest),
        ] {
            assert_eq!(Reset::from_property(value), reset, "{value:?}");
        }
        let consumer = KafkaConfig::default().consumer("g");
        assert_eq!(
            Reset::from_property(consumer.get("auto.offset.reset")),
            Reset::Earliest,
            "our consumers start a new group at the oldest message"
        );
    }
}
