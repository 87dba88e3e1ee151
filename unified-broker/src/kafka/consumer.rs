//! One member of a Kafka consumer group: deliveries, acks, redelivery and commits.
//!
//! # Acks and commits
//!
//! Offsets are never stored or committed by librdkafka itself
//! (`enable.auto.commit=false`, `enable.auto.offset.store=false`). Every delivery is
//! recorded in an [`OffsetTracker`]; an ack removes its offset, and the position we commit
//! per partition is the tracker's low watermark (lowest outstanding offset, or one past
//! the last delivered). Commits are sent asynchronously at most every
//! [`COMMIT_INTERVAL`] from within [`Subscriber::next`] (also while it waits for
//! messages), synchronously for the revoked partitions before a rebalance takes them
//! away, and synchronously for everything on [`Subscriber::close`] or drop.
//!
//! # Nacks: a local redelivery queue
//!
//! A nacked (or dropped) delivery goes back into this subscriber's redelivery queue, and
//! `next` hands out queued redeliveries before fetching anything new. Its offset stays
//! outstanding in the tracker meanwhile, so the committed position can never pass it:
//! if this member closes, crashes, or loses the partition first, the queue entry is
//! discarded and the message comes back from Kafka (to this or another member) because
//! the group's committed offset is still at or below it. We chose this over seeking the
//! partition back: a seek would also re-fetch every later message, including ones still
//! held by the application, and librdkafka rejects seeks during (re)assignment.
//!
//! # Rebalances
//!
//! The consumer's context ([`MemberContext`]) runs before a revocation takes effect: it
//! commits the revoked partitions' positions and forgets their state and queued
//! redeliveries. Deliveries of those partitions still held by the application become
//! stale (their generation is gone) and their acks and nacks are ignored; the new owner
//! starts from the committed position, so they are redelivered there (duplicates, not
//! loss). Acked messages above the low watermark are redelivered too.
//!
//! # Flow control
//!
//! When `max_outstanding_messages` or `max_outstanding_bytes` deliveries are handed out
//! and unsettled, `next` stops fetching (redeliveries are still served) until
//! something is acked. Like any Kafka consumer, a member that does not fetch for
//! `max.poll.interval.ms` (5 minutes by default) is removed from the group.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::offsets::OffsetTracker;
use super::{forward_log, map_error, ErrorContext};
use crate::sync::lock;
use crate::{AckHandle, BrokerError, Delivery, Message, Result, SubscribeOptions, Subscriber};

/// How often acked positions are committed while the subscriber is in use.
pub(crate) const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// State shared by the subscriber, its consumer's context and its deliveries' handles.
struct Shared {
    topic: String,
    group_id: String,
    state: Mutex<State>,
    /// Signalled when a redelivery is queued, or room frees up while `next` waits for it.
    wake: Notify,
}

#[derive(Default)]
struct State {
    tracker: OffsetTracker,
    redeliveries: VecDeque<Pending>,
    /// Handed out (or queued for redelivery) and not yet acked.
    outstanding_messages: usize,
    outstanding_bytes: usize,
    /// `next` is waiting for an ack to free room.
    waiting_for_room: bool,
    closed: bool,
}

impl State {
    fn release(&mut self, bytes: usize) {
        self.outstanding_messages = self.outstanding_messages.saturating_sub(1);
        self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
    }
}

/// One delivered message: what its handle needs to ack it or queue it again.
struct Pending {
    partition: i32,
    offset: i64,
    generation: u64,
    message: Message,
    /// Deliveries so far by this subscriber's redelivery queue (0 for a fetched one).
    redeliveries: u32,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.message.payload.len()
    }
}

impl Shared {
    /// Turns a queued or fetched message into a delivery whose handle points back here.
    fn delivery(self: &Arc<Self>, pending: Pending) -> Delivery {
        let message = pending.message.clone();
        // Kafka does not count deliveries: a fetched message may be a redelivery from
        // another member, so only local redeliveries get a number (at least the 2nd).
        let attempt = (pending.redeliveries > 0).then_some(pending.redeliveries + 1);
        let handle = KafkaAck {
            shared: Arc::clone(self),
            pending,
        };
        Delivery::new(message, attempt, Box::new(handle))
    }

    /// Takes the next queued redelivery that still belongs to a live partition state.
    fn pop_redelivery(&self, state: &mut State) -> Option<Pending> {
        while let Some(pending) = state.redeliveries.pop_front() {
            if state
                .tracker
                .is_current(pending.partition, pending.generation)
            {
                return Some(pending);
            }
            state.release(pending.bytes());
        }
        None
    }

    fn commit_list(&self, positions: &[(i32, i64)]) -> KafkaResult<TopicPartitionList> {
        let mut list = TopicPartitionList::with_capacity(positions.len());
        for &(partition, position) in positions {
            list.add_partition_offset(&self.topic, partition, Offset::Offset(position))?;
        }
        Ok(list)
    }

    /// Commits `positions` on `consumer` and records them as committed.
    fn commit<C: Consumer<MemberContext>>(
        &self,
        consumer: &C,
        positions: Vec<(i32, i64)>,
        mode: CommitMode,
    ) {
        if positions.is_empty() {
            return;
        }
        let result = self
            .commit_list(&positions)
            .and_then(|list| consumer.commit(&list, mode));
        match result {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, group = %self.group_id, ?positions, ?mode, "committed offsets");
                lock(&self.state).tracker.mark_committed(&positions);
            }
            // Not fatal: the next commit covers these positions, and until then a
            // restart only re-reads (duplicates).
            Err(error) => {
                tracing::warn!(topic = %self.topic, group = %self.group_id, ?positions, %error, "offset commit failed")
            }
        }
    }
}

/// Settles one Kafka delivery.
struct KafkaAck {
    shared: Arc<Shared>,
    pending: Pending,
}

impl AckHandle for KafkaAck {
    fn ack(self: Box<Self>) -> Result<()> {
        let KafkaAck { shared, pending } = *self;
        let mut state = lock(&shared.state);
        if state.closed {
            // Too late to commit: the message goes to the group's next owner of the
            // partition.
            return Err(BrokerError::Closed);
        }
        if !state
            .tracker
            .ack(pending.partition, pending.generation, pending.offset)
        {
            tracing::debug!(topic = %shared.topic, partition = pending.partition, offset = pending.offset, "ack after the partition was revoked; its new owner redelivers it");
        }
        state.release(pending.bytes());
        if std::mem::take(&mut state.waiting_for_room) {
            shared.wake.notify_one();
        }
        Ok(())
    }

    fn nack(self: Box<Self>) -> Result<()> {
        let KafkaAck {
            shared,
            mut pending,
        } = *self;
        let mut state = lock(&shared.state);
        if state.closed {
            // Never committed: it comes back from Kafka to the group.
            return Ok(());
        }
        if state
            .tracker
            .is_current(pending.partition, pending.generation)
        {
            tracing::debug!(topic = %shared.topic, partition = pending.partition, offset = pending.offset, "nacked; queued for redelivery");
            pending.redeliveries += 1;
            state.redeliveries.push_back(pending);
            shared.wake.notify_one();
        } else {
            state.release(pending.bytes());
        }
        Ok(())
    }
}

/// The consumer's librdkafka context: logs, and commits before partitions are revoked.
pub(crate) struct MemberContext {
    shared: Arc<Shared>,
}

impl ClientContext for MemberContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        super::statistics::record(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(topic = %self.shared.topic, group = %self.shared.group_id, %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let mut positions = Vec::new();
        {
            let mut state = lock(&self.shared.state);
            for element in list.elements() {
                if element.topic() != self.shared.topic {
                    continue;
                }
                let partition = element.partition();
                if let Some(position) = state.tracker.revoke(partition) {
                    positions.push((partition, position));
                }
                // Queued redeliveries of the partition are now stale: drop them.
                let (keep, stale): (VecDeque<_>, VecDeque<_>) =
                    std::mem::take(&mut state.redeliveries)
                        .into_iter()
                        .partition(|pending| pending.partition != partition);
                state.redeliveries = keep;
                for pending in stale {
                    state.release(pending.bytes());
                }
            }
        }
        tracing::info!(topic = %self.shared.topic, group = %self.shared.group_id, partitions = ?partitions_of(list), ?positions, "partitions revoked; committing their positions");
        self.shared.commit(consumer, positions, CommitMode::Sync);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(topic = %self.shared.topic, group = %self.shared.group_id, partitions = ?partitions_of(list), "partitions assigned")
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(topic = %self.shared.topic, group = %self.shared.group_id, %error, "rebalance failed")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(topic = %self.shared.topic, group = %self.shared.group_id, %error, partitions = ?partitions_of(offsets), "asynchronous offset commit failed; will retry");
            let mut state = lock(&self.shared.state);
            for element in offsets.elements() {
                if let (true, Offset::Offset(position)) =
                    (element.topic() == self.shared.topic, element.offset())
                {
                    state.tracker.commit_failed(element.partition(), position);
                }
            }
        }
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

/// A member of a Kafka consumer group on one topic.
pub(crate) struct KafkaSubscriber {
    /// `None` once closed.
    consumer: Option<StreamConsumer<MemberContext>>,
    shared: Arc<Shared>,
    options: SubscribeOptions,
    next_commit: Instant,
    close_timeout: Duration,
    /// Every broker connection was lost: the stream has ended (see `abandon`).
    lost_cluster: bool,
}

/// Assigns every partition of `topic` to `consumer` (no group join), each starting at
/// the group's committed position, or at the oldest message if it has none: what a
/// [`SubscribeOptions::sole_member`] subscriber reads.
fn assign_every_partition(
    consumer: &StreamConsumer<MemberContext>,
    topic: &str,
    timeout: Duration,
) -> Result<()> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(BrokerError::TopicNotFound(topic.to_string()));
    }
    let mut list = TopicPartitionList::new();
    for &partition in &partitions {
        list.add_partition_offset(topic, partition, Offset::Stored)
            .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
    }
    consumer
        .assign(&list)
        .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
    // (A metadata request bounded by the request timeout, once per subscription.)
    tracing::info!(
        topic,
        ?partitions,
        "kafka subscriber assigned every partition (sole member, no group join)"
    );
    Ok(())
}

impl KafkaSubscriber {
    /// Creates the consumer and joins `group_id` for `topic` (the join completes in the
    /// background; the first `next` waits for it), or, for a sole member, assigns it
    /// every partition at once.
    pub(crate) fn start(
        config: rdkafka::ClientConfig,
        topic: &str,
        group_id: &str,
        options: SubscribeOptions,
        close_timeout: Duration,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            topic: topic.to_string(),
            group_id: group_id.to_string(),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let context = MemberContext {
            shared: Arc::clone(&shared),
        };
        let consumer: StreamConsumer<MemberContext> = config
            .create_with_context(context)
            .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
        if options.sole_member {
            assign_every_partition(&consumer, topic, close_timeout)?;
        } else {
            consumer
                .subscribe(&[topic])
                .map_err(|error| map_error(&error, ErrorContext::Subscribe(topic)))?;
            tracing::info!(
                topic,
                group = group_id,
                "kafka subscriber joining its group"
            );
        }
        Ok(KafkaSubscriber {
            consumer: Some(consumer),
            shared,
            options,
            next_commit: Instant::now() + COMMIT_INTERVAL,
            close_timeout,
            lost_cluster: false,
        })
    }

    /// Records a fetched message and wraps it as a delivery.
    fn fetched(&self, message: &BorrowedMessage<'_>) -> Delivery {
        let mut attributes = std::collections::BTreeMap::new();
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                attributes.insert(header.key.to_string(), value);
            }
        }
        let content = Message {
            key: message
                .key()
                .map(|key| String::from_utf8_lossy(key).into_owned()),
            payload: message
                .payload()
                .map(Bytes::copy_from_slice)
                .unwrap_or_default(),
            attributes,
        };
        let (partition, offset) = (message.partition(), message.offset());
        let generation = {
            let mut state = lock(&self.shared.state);
            state.outstanding_messages += 1;
            state.outstanding_bytes += content.payload.len();
            state.tracker.delivered(partition, offset)
        };
        tracing::trace!(topic = %self.shared.topic, partition, offset, "fetched");
        self.shared.delivery(Pending {
            partition,
            offset,
            generation,
            message: content,
            redeliveries: 0,
        })
    }

    /// Sends an asynchronous commit of the positions that moved, if it is time.
    fn commit_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_commit {
            return;
        }
        self.next_commit = now + COMMIT_INTERVAL;
        if let Some(consumer) = &self.consumer {
            let positions = lock(&self.shared.state).tracker.to_commit();
            self.shared.commit(consumer, positions, CommitMode::Async);
        }
    }

    /// Gives up on a consumer that lost every broker: stops its fetching at once (a
    /// local operation) and ends the stream after the error, so the caller subscribes
    /// again with a fresh consumer. A consumer that kept fetching across a broker restart
    /// would use metadata the restarted broker no longer matches; with Tansu's replies
    /// to that, librdkafka 2.12 crashes the process (see `producer.rs`). Unacked
    /// deliveries are not committed past, so they come back to the group.
    fn abandon(&mut self) {
        self.lost_cluster = true;
        if let Some(consumer) = &self.consumer {
            if let Ok(assignment) = consumer.assignment() {
                if let Err(error) = consumer.pause(&assignment) {
                    tracing::debug!(topic = %self.shared.topic, %error, "pausing the lost consumer failed");
                }
            }
        }
        tracing::warn!(topic = %self.shared.topic, group = %self.shared.group_id, "the kafka consumer lost every broker; ending this subscription (subscribe again)");
    }

    /// Marks the subscriber closed and hands back what must be committed and the
    /// consumer to close.
    fn shut(&mut self) -> (Vec<(i32, i64)>, Option<StreamConsumer<MemberContext>>) {
        let mut state = lock(&self.shared.state);
        state.closed = true;
        state.redeliveries.clear();
        let positions = state.tracker.revoke_all();
        drop(state);
        self.shared.wake.notify_one();
        (positions, self.consumer.take())
    }
}

/// Commits the final positions and closes the consumer (leaving the group). Blocking:
/// librdkafka waits for the commit and the group leave, so run it off the async workers.
fn finish(shared: &Shared, positions: Vec<(i32, i64)>, consumer: StreamConsumer<MemberContext>) {
    shared.commit(&consumer, positions, CommitMode::Sync);
    drop(consumer);
    tracing::info!(topic = %shared.topic, group = %shared.group_id, "kafka subscriber left its group");
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let shared = Arc::clone(&self.shared);
        loop {
            if self.lost_cluster {
                return None;
            }
            self.consumer.as_ref()?;
            // Register for wake-ups before looking at the state, so a nack or ack in
            // between is not missed.
            let woken = shared.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let has_room = {
                let mut state = lock(&shared.state);
                if let Some(pending) = shared.pop_redelivery(&mut state) {
                    drop(state);
                    return Some(Ok(shared.delivery(pending)));
                }
                let room = state.outstanding_messages < self.options.max_outstanding_messages
                    && state.outstanding_bytes < self.options.max_outstanding_bytes;
                state.waiting_for_room = !room;
                room
            };
            self.commit_if_due();
            let commit_at = self.next_commit;
            let consumer = self.consumer.as_ref()?;
            if !has_room {
                tokio::select! {
                    _ = &mut woken => {}
                    _ = tokio::time::sleep_until(commit_at) => {}
                }
                continue;
            }
            // All three branches are cancel-safe: `recv` hands over a message only
            // when it returns it.
            let received = tokio::select! {
                biased;
                _ = &mut woken => continue,
                _ = tokio::time::sleep_until(commit_at) => continue,
                received = consumer.recv() => received,
            };
            match received {
                Ok(message) => return Some(Ok(self.fetched(&message))),
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(error) => {
                    let lost = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
                    let error = map_error(&error, ErrorContext::Subscribe(&self.shared.topic));
                    tracing::debug!(topic = %self.shared.topic, %error, "receive error");
                    if lost {
                        self.abandon();
                    }
                    return Some(Err(error));
                }
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        let (positions, consumer) = self.shut();
        let Some(consumer) = consumer else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let closing = tokio::task::spawn_blocking(move || finish(&shared, positions, consumer));
        match tokio::time::timeout(self.close_timeout, closing).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(join_error)) => Err(BrokerError::Subscribe(format!(
                "closing the kafka consumer failed: {join_error}"
            ))),
            Err(_) => Err(BrokerError::Timeout(format!(
                "leaving consumer group {} took longer than {:?}",
                self.shared.group_id, self.close_timeout
            ))),
        }
    }
}

impl Drop for KafkaSubscriber {
    fn drop(&mut self) {
        let (positions, consumer) = self.shut();
        let Some(consumer) = consumer else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        // Closing blocks until the group is left: never on an async worker thread.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || finish(&shared, positions, consumer));
            }
            Err(_) => finish(&shared, positions, consumer),
        }
    }
}
