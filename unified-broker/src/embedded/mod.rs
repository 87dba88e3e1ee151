//! The embedded in-process broker: the default backend, so the whole system runs with no
//! infrastructure at all.
//!
//! It has the semantics of a real broker, scaled down to one process:
//!
//! - a topic fans every message out to each of its consumer groups (subscriptions);
//! - the members of one group compete for that group's queue;
//! - a delivery stays owned by the group until it is acked; a nack, or dropping the
//!   delivery, puts it back at the front of the queue for any member;
//! - memory is bounded: each group holds at most `max_backlog_per_group` messages
//!   (queued plus unacked), and a publisher waits for room rather than growing the queue;
//! - messages published while a topic has no groups are dropped, as in Pub/Sub: create
//!   the group first with `ensure_subscription`.
//!
//! Nothing survives the process: it is a broker for one program (e.g. the client running
//! the classifier server in-process), not a persistence layer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};

use crate::error::{check_message_sizes, check_topic_length};
use crate::sync::lock;
use crate::{
    AckHandle, Backlog, Broker, BrokerError, ClosedFlag, Delivery, Features, Message, Result,
    SubscribeOptions, Subscriber,
};

/// Settings of the embedded broker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Messages a consumer group may hold (queued plus delivered-but-unacked) before
    /// publishers to its topic wait.
    pub max_backlog_per_group: usize,
    /// Largest message ([`Message::size`]) accepted; larger ones fail with
    /// [`BrokerError::MessageTooLarge`]. Bounds what one request can make the process hold.
    pub max_message_bytes: usize,
}

/// The embedded broker's default [`EmbeddedConfig::max_message_bytes`]: 32 MiB, room for
/// the client's largest file (16 MiB by default) and its envelope.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The longest topic name the embedded broker takes, in bytes. It would take any string,
/// but every name is kept (a map key) and shows up in logs: a bound keeps a peer's
/// megabyte-long name out of both. Well above what the other backends allow (249 to
/// 1024), so nothing that works on them fails here.
pub const MAX_TOPIC_NAME_BYTES: usize = 1024;

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            max_backlog_per_group: 10_000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// A client of an in-process broker. [`EmbeddedBroker::new`] makes a new broker;
/// [`EmbeddedBroker::new_client`] another client of the same one.
pub struct EmbeddedBroker {
    shared: Arc<Shared>,
    closed: ClosedFlag,
}

struct Shared {
    config: EmbeddedConfig,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

#[derive(Default)]
struct Topic {
    groups: Mutex<HashMap<String, Arc<Group>>>,
}

/// One consumer group's queue.
struct Group {
    queue: Mutex<GroupQueue>,
    /// Signalled when an entry is queued (one waiting member wakes) or the group is
    /// deleted (all wake).
    available: Notify,
    /// One permit per free backlog slot: taken by publish, given back by ack.
    room: Semaphore,
}

#[derive(Default)]
struct GroupQueue {
    ready: VecDeque<Entry>,
    /// Deliveries handed to members and not yet settled.
    in_flight: u64,
    /// Deliveries acked since the group was made: its [`Backlog::consumed`].
    acked: u64,
    deleted: bool,
}

struct Entry {
    /// Shared by the group's queue and the delivery under way (kept for a redelivery).
    message: Arc<Message>,
    attempt: u32,
}

impl Group {
    fn new(capacity: usize) -> Self {
        Group {
            queue: Mutex::new(GroupQueue::default()),
            available: Notify::new(),
            room: Semaphore::new(capacity.max(1)),
        }
    }

    fn push_back(&self, entry: Entry) {
        lock(&self.queue).ready.push_back(entry);
        self.available.notify_one();
    }

    fn requeue_front(&self, entry: Entry) {
        let mut queue = lock(&self.queue);
        queue.in_flight = queue.in_flight.saturating_sub(1);
        if queue.deleted {
            return;
        }
        queue.ready.push_front(entry);
        drop(queue);
        self.available.notify_one();
    }

    /// A delivery was acked: it leaves the group's backlog for good.
    fn acked(&self) {
        let mut queue = lock(&self.queue);
        queue.in_flight = queue.in_flight.saturating_sub(1);
        queue.acked += 1;
    }

    /// What waits in the queue, what is under way, what was acked.
    fn backlog(&self) -> Backlog {
        let queue = lock(&self.queue);
        Backlog {
            waiting: queue.ready.len() as u64,
            in_flight: Some(queue.in_flight),
            consumed: Some(queue.acked),
        }
    }

    fn delete(&self) {
        let mut queue = lock(&self.queue);
        queue.deleted = true;
        queue.ready.clear();
        drop(queue);
        self.room.close();
        self.available.notify_waiters();
    }
}

impl EmbeddedBroker {
    /// Starts a new, empty broker and returns its first client.
    pub fn new(config: EmbeddedConfig) -> Self {
        EmbeddedBroker {
            shared: Arc::new(Shared {
                config,
                topics: Mutex::new(HashMap::new()),
            }),
            closed: ClosedFlag::default(),
        }
    }

    /// Another client of the same broker, with its own `close`.
    pub fn new_client(&self) -> Self {
        EmbeddedBroker {
            shared: Arc::clone(&self.shared),
            closed: ClosedFlag::default(),
        }
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        lock(&self.shared.topics)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_string()))
    }

    fn group(&self, topic: &str, group: &str) -> Result<Arc<Group>> {
        let topic = self.topic(topic)?;
        let mut groups = lock(&topic.groups);
        let capacity = self.shared.config.max_backlog_per_group;
        Ok(Arc::clone(
            groups
                .entry(group.to_string())
                .or_insert_with(|| Arc::new(Group::new(capacity))),
        ))
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            ordered_per_key: false,
            retains_before_subscription: false,
            survives_broker_restart: false,
            in_process_only: true,
            max_message_bytes: self.shared.config.max_message_bytes,
        }
    }

    fn check_topic_name(&self, topic: &str) -> Result<()> {
        check_topic_length(topic, MAX_TOPIC_NAME_BYTES)
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.check_topic_name(topic)?;
        self.closed.ensure_open()?;
        check_message_sizes(&messages, self.shared.config.max_message_bytes)?;
        let topic_state = self.topic(topic)?;
        let groups: Vec<Arc<Group>> = lock(&topic_state.groups).values().cloned().collect();
        for message in messages {
            // One copy for every group, shared with each delivery of it.
            let message = Arc::new(message);
            for group in &groups {
                match group.room.acquire().await {
                    // The slot is given back by ack, not when this guard drops.
                    Ok(permit) => permit.forget(),
                    // The group was deleted while we waited: nothing to deliver to.
                    Err(_closed) => continue,
                }
                group.push_back(Entry {
                    message: Arc::clone(&message),
                    attempt: 1,
                });
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        _options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let group = self.group(topic, group)?;
        Ok(Box::new(EmbeddedSubscriber { group }))
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_topic_name(topic)?;
        lock(&self.shared.topics)
            .entry(topic.to_string())
            .or_default();
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        let removed = lock(&self.shared.topics).remove(topic);
        if let Some(topic) = removed {
            for group in lock(&topic.groups).values() {
                group.delete();
            }
        }
        Ok(())
    }

    async fn ensure_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.group(topic, group).map(|_| ())
    }

    async fn delete_subscription(&self, topic: &str, group: &str) -> Result<()> {
        let Ok(topic) = self.topic(topic) else {
            return Ok(());
        };
        let removed = lock(&topic.groups).remove(group);
        if let Some(group) = removed {
            group.delete();
        }
        Ok(())
    }

    /// The group's queue and its deliveries under way; a group that does not exist has
    /// none (it is not created).
    async fn backlog(&self, topic: &str, group: &str) -> Result<Option<Backlog>> {
        let topic = self.topic(topic)?;
        let group = lock(&topic.groups).get(group).cloned();
        Ok(Some(group.map(|group| group.backlog()).unwrap_or_default()))
    }

    async fn close(&self) -> Result<()> {
        // Publishes are confirmed when `publish_batch` returns: nothing to flush.
        self.closed.close();
        Ok(())
    }
}

/// One member of an embedded consumer group.
struct EmbeddedSubscriber {
    group: Arc<Group>,
}

#[async_trait]
impl Subscriber for EmbeddedSubscriber {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            // Register interest before looking at the queue so a push in between is
            // not missed.
            let notified = self.group.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut queue = lock(&self.group.queue);
                if queue.deleted {
                    return None;
                }
                if let Some(entry) = queue.ready.pop_front() {
                    queue.in_flight += 1;
                    let message = Arc::clone(&entry.message);
                    let attempt = entry.attempt;
                    drop(queue);
                    let handle = EmbeddedAck {
                        group: Arc::clone(&self.group),
                        entry,
                    };
                    return Some(Ok(Delivery::new(message, Some(attempt), Box::new(handle))));
                }
            }
            notified.await;
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        // Nothing is prefetched: every message is either queued or held by a Delivery,
        // which requeues itself if dropped unsettled.
        Ok(())
    }
}

/// Settles one embedded delivery.
struct EmbeddedAck {
    group: Arc<Group>,
    entry: Entry,
}

impl AckHandle for EmbeddedAck {
    fn ack(self: Box<Self>) -> Result<()> {
        self.group.acked();
        self.group.room.add_permits(1);
        Ok(())
    }

    fn nack(self: Box<Self>) -> Result<()> {
        let EmbeddedAck { group, mut entry } = *self;
        entry.attempt += 1;
        group.requeue_front(entry);
        Ok(())
    }
}
