//! The conformance suite every backend must pass, modelled on Watermill's universal
//! pub/sub tests.
//!
//! Each case is a plain `async fn` generic over a [`BrokerFactory`], and
//! [`conformance_tests!`](crate::conformance_tests) turns them all into `#[tokio::test]`s
//! for one backend, so a new backend gets the whole suite by writing a factory:
//!
//! ```ignore
//! unified_broker::conformance_tests!(my_factory());
//! ```
//!
//! Every case uses fresh, uniquely named topics. Reads tolerate duplicates (they
//! de-duplicate by a message id carried in an attribute) but fail on any loss. Cases
//! that need a [`Features`](crate::Features) flag the backend lacks are skipped with a
//! message saying so.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use tokio::time::{timeout, Instant};

use crate::{Broker, Message, SubscribeOptions, Subscriber};

/// Attribute carrying each test message's unique id.
pub const ID_ATTRIBUTE: &str = "conformance-id";

/// Makes clients of the backend under test.
#[async_trait]
pub trait BrokerFactory: Send + Sync {
    /// A new client of the same broker (same server, or the same in-process broker).
    async fn client(&self) -> Arc<dyn Broker>;

    /// How long a case waits for messages before declaring them lost. Generous: a first
    /// consumer-group join can take seconds on some brokers.
    fn receive_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// Why the broker under test is known to fail `case`, if it is. Such a case is
    /// skipped with that reason printed, so a known defect of a test broker is written
    /// down where the suite runs instead of being a flaky failure. Default: none.
    fn known_failure(&self, _case: &str) -> Option<&'static str> {
        None
    }
}

/// Whether `case` must be skipped for `factory` (see [`BrokerFactory::known_failure`]);
/// prints the reason if so.
pub fn skip_known_failure(factory: &dyn BrokerFactory, case: &str) -> bool {
    match factory.known_failure(case) {
        Some(reason) => {
            eprintln!("\n*** SKIPPED (known broker defect): {case}: {reason} ***\n");
            true
        }
        None => false,
    }
}

/// A unique topic (or group) name that every backend accepts (starts with a letter,
/// lower-case letters, digits and dashes only, well under 255 characters).
pub fn unique_name(case: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("conf-{case}-{}", &id[..12])
}

/// Builds `count` messages with ids `prefix-0…`, a payload derived from the id, and two
/// attributes.
pub fn numbered_messages(prefix: &str, count: usize) -> Vec<Message> {
    (0..count)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            Message::new(Bytes::from(format!("payload of {id}")))
                .with_attribute(ID_ATTRIBUTE, id.clone())
                .with_attribute("index", i.to_string())
        })
        .collect()
}

fn ids_of(messages: &[Message]) -> HashSet<String> {
    messages
        .iter()
        .filter_map(|m| m.attribute(ID_ATTRIBUTE).map(str::to_string))
        .collect()
}

/// Creates a topic and the given groups on it, ready for publishing.
pub async fn setup_topic(broker: &dyn Broker, topic: &str, groups: &[&str]) {
    broker.ensure_topic(topic).await.expect("ensure_topic");
    for group in groups {
        broker
            .ensure_subscription(topic, group)
            .await
            .expect("ensure_subscription");
    }
}

/// What a reader saw.
#[derive(Debug, Default)]
pub struct Received {
    /// Deliveries per id (more than one means duplicates).
    pub counts: HashMap<String, usize>,
    /// The messages in the order they first arrived.
    pub first_seen: Vec<Message>,
}

impl Received {
    fn record(&mut self, message: &Message) {
        let id = message.attribute(ID_ATTRIBUTE).unwrap_or("").to_string();
        let count = self.counts.entry(id).or_insert(0);
        if *count == 0 {
            self.first_seen.push(message.clone());
        }
        *count += 1;
    }

    /// Ids seen at least once.
    pub fn ids(&self) -> HashSet<String> {
        self.counts.keys().cloned().collect()
    }
}

/// Reads (and acks) until every id in `expected` was seen or `wait` passed.
pub async fn receive_all(
    subscriber: &mut dyn Subscriber,
    expected: &HashSet<String>,
    wait: Duration,
) -> Received {
    let mut received = Received::default();
    let deadline = Instant::now() + wait;
    while !expected.iter().all(|id| received.counts.contains_key(id)) {
        let Ok(next) = tokio::time::timeout_at(deadline, subscriber.next()).await else {
            break;
        };
        match next {
            Some(Ok(delivery)) => {
                received.record(delivery.message());
                delivery.ack().expect("ack");
            }
            Some(Err(error)) => tracing::warn!(%error, "transient receive error"),
            None => break,
        }
    }
    received
}

/// Panics with a helpful message if anything expected is missing.
pub fn assert_none_lost(expected: &HashSet<String>, received: &HashSet<String>, what: &str) {
    let missing: Vec<_> = expected.difference(received).take(10).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} messages lost, e.g. {missing:?}",
        expected.difference(received).count(),
        expected.len()
    );
}

async fn subscribe(broker: &dyn Broker, topic: &str, group: &str) -> Box<dyn Subscriber> {
    broker
        .subscribe(topic, group, SubscribeOptions::default())
        .await
        .expect("subscribe")
}

fn skip(case: &str, why: &str) {
    eprintln!("conformance: SKIPPED {case}: backend does not promise {why}");
}

/// Case 1: 100 messages arrive with ids, payloads and attributes intact; closing ends the
/// subscription cleanly.
pub async fn publish_subscribe(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("pubsub");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let messages: Vec<Message> = numbered_messages("m", 100)
        .into_iter()
        .map(|m| m.with_attribute("colour", "blue"))
        .collect();
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages.clone())
        .await
        .expect("publish");
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
    assert_none_lost(&expected, &received.ids(), "publish_subscribe");
    let sent: HashMap<_, _> = messages
        .iter()
        .map(|m| (m.attribute(ID_ATTRIBUTE).unwrap_or_default().to_string(), m))
        .collect();
    for got in &received.first_seen {
        let id = got.attribute(ID_ATTRIBUTE).unwrap_or_default();
        let original = sent.get(id).expect("only sent ids arrive");
        assert_eq!(got.payload, original.payload, "payload of {id}");
        // Backends may add attributes of their own; ours must all be there.
        for (name, value) in &original.attributes {
            assert_eq!(
                got.attribute(name),
                Some(value.as_str()),
                "attribute {name} of {id}"
            );
        }
    }
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 2: 5,000 messages from 50 concurrent publishers, read by 3 concurrent members of one
/// group: none lost.
pub async fn concurrent_publish_subscribe(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("concurrent");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let publishers = (0..50).map(|p| {
        let broker = Arc::clone(&broker);
        let topic = topic.clone();
        tokio::spawn(async move {
            for chunk in numbered_messages(&format!("p{p}"), 100).chunks(25) {
                broker
                    .publish_batch(&topic, chunk.to_vec())
                    .await
                    .expect("publish");
            }
        })
    });
    let expected: HashSet<String> = (0..50)
        .flat_map(|p| ids_of(&numbered_messages(&format!("p{p}"), 100)))
        .collect();
    let received = read_with_members(factory, &broker, &topic, "readers", 3, &expected, async {
        for publisher in join_all(publishers).await {
            publisher.expect("publisher task");
        }
    })
    .await;
    assert_none_lost(&expected, &received, "concurrent_publish_subscribe");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Runs `members` subscribers of one group in parallel with `publishing`, until
/// together they have seen every expected id (or the timeout passed); returns the union.
async fn read_with_members(
    factory: &dyn BrokerFactory,
    broker: &Arc<dyn Broker>,
    topic: &str,
    group: &str,
    members: usize,
    expected: &HashSet<String>,
    publishing: impl std::future::Future<Output = ()>,
) -> HashSet<String> {
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let done = Arc::new(tokio::sync::Notify::new());
    let wait = factory.receive_timeout();
    let mut readers = Vec::new();
    for _ in 0..members {
        let mut subscriber = subscribe(&**broker, topic, group).await;
        let seen = Arc::clone(&seen);
        let expected = expected.clone();
        let done = Arc::clone(&done);
        readers.push(tokio::spawn(async move {
            let deadline = Instant::now() + wait;
            loop {
                let complete = {
                    let seen = seen.lock().expect("lock");
                    expected.iter().all(|id| seen.contains(id))
                };
                if complete {
                    done.notify_waiters();
                    break;
                }
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, subscriber.next()) => next,
                    _ = done.notified() => break,
                };
                match next {
                    Ok(Some(Ok(delivery))) => {
                        if let Some(id) = delivery.message().attribute(ID_ATTRIBUTE) {
                            seen.lock().expect("lock").insert(id.to_string());
                        }
                        delivery.ack().expect("ack");
                    }
                    Ok(Some(Err(error))) => tracing::warn!(%error, "transient receive error"),
                    Ok(None) | Err(_) => break,
                }
            }
            subscriber.close().await.expect("close");
        }));
    }
    publishing.await;
    for reader in join_all(readers).await {
        reader.expect("reader task");
    }
    let seen = seen.lock().expect("lock").clone();
    seen
}

/// Case 3: 20 topics × 100 messages at once, each topic read by its own task.
pub async fn many_topics(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let tasks = (0..20).map(|t| {
        let broker = Arc::clone(&broker);
        let wait = factory.receive_timeout();
        async move {
            let topic = unique_name(&format!("many{t}"));
            setup_topic(&*broker, &topic, &["readers"]).await;
            let messages = numbered_messages(&format!("t{t}"), 100);
            let expected = ids_of(&messages);
            broker
                .publish_batch(&topic, messages)
                .await
                .expect("publish");
            let mut subscriber = subscribe(&*broker, &topic, "readers").await;
            let received = receive_all(&mut *subscriber, &expected, wait).await;
            assert_none_lost(&expected, &received.ids(), &format!("many_topics[{t}]"));
            subscriber.close().await.expect("close");
            broker.delete_topic(&topic).await.expect("delete_topic");
        }
    });
    join_all(tasks).await;
}

/// Case 4: 1,000 messages over 16 keys arrive in publish order per key (first deliveries).
pub async fn order_per_key(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    if !broker.features().ordered_per_key {
        return skip("order_per_key", "ordering per key");
    }
    let topic = unique_name("ordered");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let messages: Vec<Message> = numbered_messages("o", 1000)
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.with_key(format!("key-{}", i % 16)))
        .collect();
    let expected = ids_of(&messages);
    for chunk in messages.chunks(100) {
        broker
            .publish_batch(&topic, chunk.to_vec())
            .await
            .expect("publish");
    }
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
    assert_none_lost(&expected, &received.ids(), "order_per_key");
    let mut last_index: HashMap<String, usize> = HashMap::new();
    for message in &received.first_seen {
        let key = message.key.clone().expect("key survives the trip");
        let index: usize = message
            .attribute("index")
            .and_then(|i| i.parse().ok())
            .expect("index attribute");
        if let Some(previous) = last_index.insert(key.clone(), index) {
            assert!(previous < index, "{key}: {index} arrived after {previous}");
        }
    }
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 5: The first deliveries are nacked; every message still arrives, the nacked ones again.
pub async fn nack_redelivers(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("nack");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let messages = numbered_messages("n", 20);
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    // Nack the first five deliveries (a backend may redeliver the same one at once).
    let mut nacked = HashSet::new();
    let deadline = Instant::now() + factory.receive_timeout();
    for _ in 0..5 {
        let delivery = next_before(&mut *subscriber, deadline, "nack_redelivers").await;
        let id = delivery
            .message()
            .attribute(ID_ATTRIBUTE)
            .unwrap_or_default()
            .to_string();
        nacked.insert(id);
        delivery.nack().expect("nack");
    }
    let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
    assert_none_lost(&expected, &received.ids(), "nack_redelivers");
    assert_none_lost(
        &nacked,
        &received.ids(),
        "nack_redelivers (nacked ones again)",
    );
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

async fn next_before(
    subscriber: &mut dyn Subscriber,
    deadline: Instant,
    case: &str,
) -> crate::Delivery {
    loop {
        match tokio::time::timeout_at(deadline, subscriber.next()).await {
            Ok(Some(Ok(delivery))) => return delivery,
            Ok(Some(Err(error))) => tracing::warn!(%error, "transient receive error"),
            Ok(None) => panic!("{case}: subscription ended early"),
            Err(_) => panic!("{case}: no delivery before the timeout"),
        }
    }
}

/// Case 9: Continue after errors: every message is nacked three times (several rounds of
/// failures), then all are consumed.
pub async fn continue_after_errors(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("errors");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let messages = numbered_messages("e", 50);
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let mut failures: HashMap<String, usize> = HashMap::new();
    let mut acked = HashSet::new();
    let deadline = Instant::now() + factory.receive_timeout() * 2;
    while acked.len() < expected.len() {
        let delivery = next_before(&mut *subscriber, deadline, "continue_after_errors").await;
        let id = delivery
            .message()
            .attribute(ID_ATTRIBUTE)
            .unwrap_or_default()
            .to_string();
        let failed = failures.entry(id.clone()).or_insert(0);
        if *failed < 3 && !acked.contains(&id) {
            *failed += 1;
            delivery.nack().expect("nack");
        } else {
            acked.insert(id);
            delivery.ack().expect("ack");
        }
    }
    assert_none_lost(&expected, &acked, "continue_after_errors");
    assert!(
        failures.values().all(|&n| n == 3),
        "every message failed three times first"
    );
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 7: Unacked messages come back to a new subscriber after the old one closes; 5 rounds
/// of subscribers each ack part of the stream, and nothing is lost across them.
pub async fn continue_after_subscriber_close(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("resume");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let messages = numbered_messages("r", 1000);
    let expected = ids_of(&messages);
    for chunk in messages.chunks(250) {
        broker
            .publish_batch(&topic, chunk.to_vec())
            .await
            .expect("publish");
    }
    let mut acked: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + factory.receive_timeout() * 3;
    for round in 0..5 {
        let mut subscriber = subscribe(&*broker, &topic, "readers").await;
        let mut held = Vec::new();
        // Ack up to 200 new messages, and hold 5 unacked ones across the close.
        let mut acked_this_round = 0;
        while acked_this_round < 200 && acked.len() < expected.len() {
            let delivery = next_before(
                &mut *subscriber,
                deadline,
                "continue_after_subscriber_close",
            )
            .await;
            let id = delivery
                .message()
                .attribute(ID_ATTRIBUTE)
                .unwrap_or_default()
                .to_string();
            if held.len() < 5 && !acked.contains(&id) && round < 4 {
                held.push(delivery);
                continue;
            }
            if acked.insert(id) {
                acked_this_round += 1;
            }
            delivery.ack().expect("ack");
        }
        // Give the held ones back first (a nack), then leave: a backend may only
        // redeliver what a closed subscriber held after an ack deadline.
        drop(held);
        subscriber.close().await.expect("close");
    }
    // Whatever is left (including every held message) goes to one more subscriber.
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let missing: HashSet<String> = expected.difference(&acked).cloned().collect();
    let received = receive_all(&mut *subscriber, &missing, factory.receive_timeout()).await;
    acked.extend(received.ids());
    assert_none_lost(&expected, &acked, "continue_after_subscriber_close");
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 13: Messages abandoned unacked (deliveries dropped, then the subscriber) come back to
/// a new subscriber.
pub async fn unacked_redelivered_to_new_subscriber(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("unacked");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let messages = numbered_messages("u", 10);
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let deadline = Instant::now() + factory.receive_timeout();
    let mut held = Vec::new();
    let mut held_ids = HashSet::new();
    while held_ids.len() < expected.len() {
        let delivery = next_before(&mut *subscriber, deadline, "unacked_redelivered").await;
        held_ids.insert(
            delivery
                .message()
                .attribute(ID_ATTRIBUTE)
                .unwrap_or_default()
                .to_string(),
        );
        held.push(delivery);
    }
    drop(held);
    drop(subscriber);
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
    assert_none_lost(
        &expected,
        &received.ids(),
        "unacked_redelivered_to_new_subscriber",
    );
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 8: 10 subscribers of one group subscribe and close concurrently; afterwards the group
/// still receives everything.
pub async fn concurrent_close(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("close");
    setup_topic(&*broker, &topic, &["readers"]).await;
    let churn = (0..10).map(|_| {
        let broker = Arc::clone(&broker);
        let topic = topic.clone();
        async move {
            let subscriber = subscribe(&*broker, &topic, "readers").await;
            subscriber.close().await.expect("close");
        }
    });
    join_all(churn).await;
    let messages = numbered_messages("c", 50);
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let mut subscriber = subscribe(&*broker, &topic, "readers").await;
    let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
    assert_none_lost(&expected, &received.ids(), "concurrent_close");
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 10: 10,000 messages from 20 tasks, then `close`: another client receives them all.
pub async fn publisher_close_loses_nothing(factory: &dyn BrokerFactory) {
    let admin = factory.client().await;
    let topic = unique_name("pubclose");
    setup_topic(&*admin, &topic, &["readers"]).await;
    let publisher = factory.client().await;
    let tasks = (0..20).map(|t| {
        let publisher = Arc::clone(&publisher);
        let topic = topic.clone();
        tokio::spawn(async move {
            for chunk in numbered_messages(&format!("w{t}"), 500).chunks(100) {
                publisher
                    .publish_batch(&topic, chunk.to_vec())
                    .await
                    .expect("publish");
            }
        })
    });
    let expected: HashSet<String> = (0..20)
        .flat_map(|t| ids_of(&numbered_messages(&format!("w{t}"), 500)))
        .collect();
    let received = read_with_members(factory, &admin, &topic, "readers", 1, &expected, async {
        for task in join_all(tasks).await {
            task.expect("publisher task");
        }
        publisher.close().await.expect("close publisher");
    })
    .await;
    assert_none_lost(&expected, &received, "publisher_close_loses_nothing");
    assert!(
        publisher
            .publish(&topic, Message::new("late"))
            .await
            .is_err(),
        "publishing after close must fail"
    );
    admin.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 11: Messages of one topic never show up on another.
pub async fn topic_isolation(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let first = unique_name("iso-a");
    let second = unique_name("iso-b");
    setup_topic(&*broker, &first, &["readers"]).await;
    setup_topic(&*broker, &second, &["readers"]).await;
    let a = numbered_messages("a", 30);
    let b = numbered_messages("b", 30);
    let (expected_a, expected_b) = (ids_of(&a), ids_of(&b));
    broker.publish_batch(&first, a).await.expect("publish a");
    broker.publish_batch(&second, b).await.expect("publish b");
    for (topic, expected, other) in [
        (&first, &expected_a, &expected_b),
        (&second, &expected_b, &expected_a),
    ] {
        let mut subscriber = subscribe(&*broker, topic, "readers").await;
        let received = receive_all(&mut *subscriber, expected, factory.receive_timeout()).await;
        assert_none_lost(expected, &received.ids(), "topic_isolation");
        // Give stray messages a moment to show up, then check none did.
        let extra = receive_all(&mut *subscriber, other, Duration::from_millis(500)).await;
        let leaked: Vec<_> = received
            .ids()
            .union(&extra.ids())
            .filter(|id| !expected.contains(*id))
            .cloned()
            .collect();
        assert!(
            leaked.is_empty(),
            "topic_isolation: {topic} received {leaked:?}"
        );
        subscriber.close().await.expect("close");
    }
    broker.delete_topic(&first).await.expect("delete_topic");
    broker.delete_topic(&second).await.expect("delete_topic");
}

/// Case 15: A group created after publishing still receives older messages, where retained.
pub async fn new_group_receives_old_messages(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    if !broker.features().retains_before_subscription {
        return skip(
            "new_group_receives_old_messages",
            "retention before subscription",
        );
    }
    let topic = unique_name("old");
    setup_topic(&*broker, &topic, &[]).await;
    let messages = numbered_messages("old", 20);
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let mut subscriber = subscribe(&*broker, &topic, "late-group").await;
    let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
    assert_none_lost(
        &expected,
        &received.ids(),
        "new_group_receives_old_messages",
    );
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 16a: Two consumer groups each receive every message.
pub async fn groups_each_receive_everything(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    if !broker.features().consumer_groups {
        return skip("groups_each_receive_everything", "consumer groups");
    }
    let topic = unique_name("groups");
    setup_topic(&*broker, &topic, &["group-one", "group-two"]).await;
    let messages = numbered_messages("g", 200);
    let expected = ids_of(&messages);
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    for group in ["group-one", "group-two"] {
        let mut subscriber = subscribe(&*broker, &topic, group).await;
        let received = receive_all(&mut *subscriber, &expected, factory.receive_timeout()).await;
        assert_none_lost(&expected, &received.ids(), group);
        subscriber.close().await.expect("close");
    }
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Case 16b: Two members of one group split the stream: both get some, together all.
pub async fn group_members_share_the_stream(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    if !broker.features().consumer_groups {
        return skip("group_members_share_the_stream", "consumer groups");
    }
    let topic = unique_name("share");
    setup_topic(&*broker, &topic, &["workers"]).await;
    let mut first = subscribe(&*broker, &topic, "workers").await;
    let mut second = subscribe(&*broker, &topic, "workers").await;
    let messages: Vec<Message> = numbered_messages("s", 400)
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.with_key(format!("key-{i}")))
        .collect();
    let expected = ids_of(&messages);
    let wait = factory.receive_timeout();
    // Both members read at the same pace (a short pause per message) so neither can
    // drain the whole stream before the other has joined.
    let read = |mut subscriber: Box<dyn Subscriber>,
                expected: HashSet<String>,
                seen: Arc<std::sync::Mutex<HashMap<String, usize>>>| async move {
        let deadline = Instant::now() + wait;
        let mut mine = 0usize;
        loop {
            let all_seen = expected
                .iter()
                .all(|id| seen.lock().expect("lock").contains_key(id));
            if all_seen {
                break;
            }
            match timeout(Duration::from_millis(200), subscriber.next()).await {
                Ok(Some(Ok(delivery))) => {
                    let id = delivery
                        .message()
                        .attribute(ID_ATTRIBUTE)
                        .unwrap_or_default()
                        .to_string();
                    *seen.lock().expect("lock").entry(id).or_insert(0) += 1;
                    mine += 1;
                    delivery.ack().expect("ack");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(Some(Err(error))) => tracing::warn!(%error, "transient receive error"),
                Ok(None) => break,
                Err(_) if Instant::now() > deadline => break,
                Err(_) => {}
            }
        }
        subscriber.close().await.expect("close");
        mine
    };
    let seen = Arc::new(std::sync::Mutex::new(HashMap::new()));
    // Let both members finish joining (some brokers rebalance) before publishing.
    let warmup = numbered_messages("warmup", 1);
    broker
        .publish_batch(&topic, warmup)
        .await
        .expect("publish warmup");
    let _ = timeout(Duration::from_millis(10), first.next()).await;
    let _ = timeout(Duration::from_millis(10), second.next()).await;
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let (a, b) = tokio::join!(
        read(first, expected.clone(), Arc::clone(&seen)),
        read(
            std::mem::replace(&mut second, Box::new(NeverSubscriber)),
            expected.clone(),
            Arc::clone(&seen)
        ),
    );
    let seen: HashSet<String> = seen.lock().expect("lock").keys().cloned().collect();
    assert_none_lost(&expected, &seen, "group_members_share_the_stream");
    assert!(a > 0 && b > 0, "both members take part (got {a} and {b})");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Placeholder left behind by `mem::replace`; never polled.
struct NeverSubscriber;

#[async_trait]
impl Subscriber for NeverSubscriber {
    async fn next(&mut self) -> Option<crate::Result<crate::Delivery>> {
        None
    }
    async fn close(self: Box<Self>) -> crate::Result<()> {
        Ok(())
    }
}

/// Admin calls are idempotent: ensuring twice and deleting twice are fine.
pub async fn admin_is_idempotent(factory: &dyn BrokerFactory) {
    let broker = factory.client().await;
    let topic = unique_name("admin");
    for _ in 0..2 {
        broker.ensure_topic(&topic).await.expect("ensure_topic");
        broker
            .ensure_subscription(&topic, "readers")
            .await
            .expect("ensure_subscription");
    }
    for _ in 0..2 {
        broker
            .delete_subscription(&topic, "readers")
            .await
            .expect("delete_subscription");
    }
    for _ in 0..2 {
        broker.delete_topic(&topic).await.expect("delete_topic");
    }
}

/// Generates one `#[tokio::test]` per conformance case for the factory expression.
///
/// Use in a backend's test file: `unified_broker::conformance_tests!(factory());`
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            publish_subscribe,
            concurrent_publish_subscribe,
            many_topics,
            order_per_key,
            nack_redelivers,
            continue_after_errors,
            continue_after_subscriber_close,
            unacked_redelivered_to_new_subscriber,
            concurrent_close,
            publisher_close_loses_nothing,
            topic_isolation,
            new_group_receives_old_messages,
            groups_each_receive_everything,
            group_members_share_the_stream,
            admin_is_idempotent,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                if $crate::conformance::skip_known_failure(&factory, stringify!($case)) {
                    return;
                }
                $crate::conformance::$case(&factory).await;
            }
        )*
    };
}
