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
//! Every case uses fresh, uniquely named topics (a [`Case`]). Reads tolerate duplicates
//! (they de-duplicate by a message id carried in an attribute) but fail on any loss. Cases
//! that need a [`Features`](crate::Features) flag the backend lacks are skipped with a
//! message saying so.
//!
//! The cases, by topic: [`basics`] (publish/subscribe, topic isolation, admin),
//! [`load`] (concurrent publishers and readers, many topics, closing under load),
//! [`redelivery`] (nacks, errors, subscribers that close or vanish), [`ordering`],
//! [`groups`], [`names`] (names no broker takes, topics that do not exist) and
//! [`backlog`] (what a group has not acked, as autoscalers read it).

mod backlog;
mod basics;
mod groups;
mod load;
mod names;
mod ordering;
mod redelivery;

pub use backlog::backlog_counts_what_the_group_has_not_acked;
pub use basics::{
    admin_is_idempotent, large_messages_round_trip, missing_topic_is_reported, publish_subscribe,
    size_limit_is_exact, topic_isolation,
};
pub use groups::{
    group_members_share_the_stream, groups_each_receive_everything, new_group_receives_old_messages,
};
pub use load::{
    concurrent_close, concurrent_publish_subscribe, many_topics, publisher_close_loses_nothing,
};
pub use names::{
    assert_invalid_topic, assert_name_refused, hostile_topic_names_are_refused,
    missing_topics_fail_fast,
};
pub use ordering::order_per_key;
pub use redelivery::{
    continue_after_errors, continue_after_subscriber_close, nack_redelivers,
    unacked_redelivered_to_new_subscriber,
};

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::{
    Broker, BrokerConfig, BrokerError, Delivery, Features, Message, SubscribeOptions, Subscriber,
};

/// Attribute carrying each test message's unique id.
pub const ID_ATTRIBUTE: &str = "conformance-id";

/// How long a case waits for messages unless its factory says otherwise (see
/// [`BrokerFactory::receive_timeout`]).
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Makes clients of the backend under test.
#[async_trait]
pub trait BrokerFactory: Send + Sync {
    /// A new client of the same broker (same server, or the same in-process broker).
    async fn client(&self) -> Arc<dyn Broker>;

    /// How long a case waits for messages before declaring them lost. Generous: a first
    /// consumer-group join can take seconds on some brokers.
    fn receive_timeout(&self) -> Duration {
        DEFAULT_RECEIVE_TIMEOUT
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

/// The broker address in the environment variable `var`, for a test file whose broker
/// runs outside the tests. Unset or empty, it is `None` and `suite` is skipped, said on
/// stderr, unless `REQUIRE_BROKERS` is set (CI): then a missing broker fails the test
/// instead of passing unseen. `start_script` names the script that starts one.
pub fn broker_address_or_skip(var: &str, suite: &str, start_script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(address) if !address.trim().is_empty() => Some(address),
        _ if std::env::var_os("REQUIRE_BROKERS").is_some() => panic!(
            "REQUIRE_BROKERS is set but {var} is not: start a broker with {start_script} \
             and export the variable it prints"
        ),
        _ => {
            // Straight to stderr: libtest captures `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "*** {suite}: SKIPPED: {var} not set (run {start_script}) ***"
            );
            None
        }
    }
}

/// Clients of a broker that runs outside the tests (Kafka, Pub/Sub, Redis), each a new
/// connection made by [`crate::connect`] from one config: the factory all such backends'
/// test files need, so each of them only says how its backend is configured.
pub struct ConnectFactory {
    config: BrokerConfig,
    receive_timeout: Duration,
    known_failure: fn(&str) -> Option<&'static str>,
}

impl ConnectFactory {
    /// Clients connected with `config`, with the [`DEFAULT_RECEIVE_TIMEOUT`] and no known
    /// failures.
    pub fn new(config: BrokerConfig) -> ConnectFactory {
        ConnectFactory {
            config,
            receive_timeout: DEFAULT_RECEIVE_TIMEOUT,
            known_failure: |_case| None,
        }
    }

    /// The same factory with `timeout` as its [`BrokerFactory::receive_timeout`].
    pub fn with_receive_timeout(self, timeout: Duration) -> ConnectFactory {
        ConnectFactory {
            receive_timeout: timeout,
            ..self
        }
    }

    /// The same factory with `known_failure` as its [`BrokerFactory::known_failure`].
    pub fn with_known_failures(
        self,
        known_failure: fn(&str) -> Option<&'static str>,
    ) -> ConnectFactory {
        ConnectFactory {
            known_failure,
            ..self
        }
    }
}

#[async_trait]
impl BrokerFactory for ConnectFactory {
    async fn client(&self) -> Arc<dyn Broker> {
        crate::connect(&self.config).await.unwrap_or_else(|error| {
            panic!(
                "connect to the {} broker under test: {error}",
                self.config.backend()
            )
        })
    }

    fn receive_timeout(&self) -> Duration {
        self.receive_timeout
    }

    fn known_failure(&self, case: &str) -> Option<&'static str> {
        (self.known_failure)(case)
    }
}

/// An address where nothing listens (port 9, discard, on loopback), for checking what
/// connecting to nothing gives (see [`assert_unavailable`]).
pub const UNREACHABLE_ADDRESS: &str = "127.0.0.1:9";

/// Panics unless `connected` failed with a retryable [`BrokerError::Unavailable`]: what
/// connecting to an address where nothing listens must give.
pub fn assert_unavailable<B>(connected: crate::Result<B>) {
    match connected {
        Err(error @ BrokerError::Unavailable(_)) => assert!(error.is_retryable()),
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// Panics unless subscribing to `topic`, which must not exist, fails with
/// [`BrokerError::TopicNotFound`] naming it (instead of creating the topic silently).
pub async fn assert_subscribe_finds_no_topic(broker: &dyn Broker, topic: &str) {
    match broker
        .subscribe(topic, "readers", SubscribeOptions::default())
        .await
    {
        Err(BrokerError::TopicNotFound(name)) => assert_eq!(name, topic),
        Err(other) => panic!("expected TopicNotFound, got {other}"),
        Ok(_) => panic!("subscribing to the missing topic {topic} succeeded"),
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

/// The test id a delivery carries ("" if none).
pub fn id_of(delivery: &Delivery) -> String {
    delivery
        .message()
        .attribute(ID_ATTRIBUTE)
        .unwrap_or_default()
        .to_string()
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

/// The next delivery within `wait`; panics if the wait ends first, the stream ends, or
/// the backend reports a receive error (for checks that allow none).
pub async fn next_within(subscriber: &mut dyn Subscriber, wait: Duration) -> Delivery {
    tokio::time::timeout(wait, subscriber.next())
        .await
        .expect("a delivery before the timeout")
        .expect("stream open")
        .expect("no receive error")
}

/// The next delivery before `deadline`, passing over transient receive errors; panics,
/// naming `case`, if the stream ends or the deadline passes first.
async fn next_before(subscriber: &mut dyn Subscriber, deadline: Instant, case: &str) -> Delivery {
    loop {
        match tokio::time::timeout_at(deadline, subscriber.next()).await {
            Ok(Some(Ok(delivery))) => return delivery,
            Ok(Some(Err(error))) => tracing::warn!(%error, "transient receive error"),
            Ok(None) => panic!("{case}: subscription ended early"),
            Err(_) => panic!("{case}: no delivery before the timeout"),
        }
    }
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

/// A promise some cases need from the backend's [`Features`] (see [`Case::if_promised`]).
pub struct Promise {
    /// What the line of a skipped case says the backend does not promise.
    pub what: &'static str,
    /// Whether the features include it.
    pub holds: fn(&Features) -> bool,
}

/// [`Features::consumer_groups`].
pub const CONSUMER_GROUPS: Promise = Promise {
    what: "consumer groups",
    holds: |features| features.consumer_groups,
};

/// [`Features::ordered_per_key`].
pub const ORDERED_PER_KEY: Promise = Promise {
    what: "ordering per key",
    holds: |features| features.ordered_per_key,
};

/// [`Features::retains_before_subscription`].
pub const RETAINS_BEFORE_SUBSCRIPTION: Promise = Promise {
    what: "retention before subscription",
    holds: |features| features.retains_before_subscription,
};

/// One case's fresh topic on a client of the backend under test: the setup every case
/// starts with, and the publish / subscribe / read-everything steps most of them repeat
/// (each panics on failure, saying which step failed).
pub struct Case<'f> {
    factory: &'f dyn BrokerFactory,
    /// The client the case publishes, subscribes and administers with.
    pub broker: Arc<dyn Broker>,
    /// The case's uniquely named topic (see [`unique_name`]), created with its groups.
    pub topic: String,
}

impl<'f> Case<'f> {
    /// A new client of `factory`, and a topic named after `name` with `groups` on it.
    pub async fn new(factory: &'f dyn BrokerFactory, name: &str, groups: &[&str]) -> Case<'f> {
        let broker = factory.client().await;
        Case::on(factory, broker, name, groups).await
    }

    /// Like [`Case::new`], on a client the caller already has (cases that share one
    /// client between topics, or check its features first).
    pub async fn on(
        factory: &'f dyn BrokerFactory,
        broker: Arc<dyn Broker>,
        name: &str,
        groups: &[&str],
    ) -> Case<'f> {
        let topic = unique_name(name);
        setup_topic(&*broker, &topic, groups).await;
        Case {
            factory,
            broker,
            topic,
        }
    }

    /// Like [`Case::new`] if the backend makes `promise`; otherwise `None`, with no
    /// topic created and a line saying the case `case` is skipped, and why.
    pub async fn if_promised(
        factory: &'f dyn BrokerFactory,
        promise: &Promise,
        case: &str,
        name: &str,
        groups: &[&str],
    ) -> Option<Case<'f>> {
        let broker = factory.client().await;
        if !(promise.holds)(&broker.features()) {
            skip(case, promise.what);
            return None;
        }
        Some(Case::on(factory, broker, name, groups).await)
    }

    /// Publishes `messages` on the topic in one batch.
    pub async fn publish(&self, messages: Vec<Message>) {
        self.broker
            .publish_batch(&self.topic, messages)
            .await
            .expect("publish");
    }

    /// Publishes `messages` in batches of `batch`, one after another.
    pub async fn publish_in_batches(&self, messages: &[Message], batch: usize) {
        for chunk in messages.chunks(batch) {
            self.publish(chunk.to_vec()).await;
        }
    }

    /// Publishes [`numbered_messages`]`(prefix, count)` in one batch; returns their ids.
    pub async fn publish_numbered(&self, prefix: &str, count: usize) -> HashSet<String> {
        let messages = numbered_messages(prefix, count);
        let ids = ids_of(&messages);
        self.publish(messages).await;
        ids
    }

    /// Publishes one message whose payload and [`ID_ATTRIBUTE`] are both `id`.
    pub async fn publish_marked(&self, id: &str) {
        self.broker
            .publish(
                &self.topic,
                Message::new(id.to_string()).with_attribute(ID_ATTRIBUTE, id),
            )
            .await
            .expect("publish");
    }

    /// A new member of `group` on the topic.
    pub async fn subscribe(&self, group: &str) -> Box<dyn Subscriber> {
        subscribe(&*self.broker, &self.topic, group).await
    }

    /// `receive_timeouts` of the factory's receive timeout from now.
    pub fn deadline(&self, receive_timeouts: u32) -> Instant {
        Instant::now() + self.factory.receive_timeout() * receive_timeouts
    }

    /// [`receive_all`] with the factory's receive timeout.
    pub async fn receive_all(
        &self,
        subscriber: &mut dyn Subscriber,
        expected: &HashSet<String>,
    ) -> Received {
        receive_all(subscriber, expected, self.factory.receive_timeout()).await
    }

    /// A new member of `group` reads until every id of `expected` arrived, and closes;
    /// fails the case (named `what`) if any is lost.
    pub async fn read_all(&self, group: &str, expected: &HashSet<String>, what: &str) -> Received {
        let mut subscriber = self.subscribe(group).await;
        let received = self.receive_all(&mut *subscriber, expected).await;
        assert_none_lost(expected, &received.ids(), what);
        subscriber.close().await.expect("close");
        received
    }

    /// Closes the case's last subscriber, then deletes the topic.
    pub async fn close_and_delete(self, subscriber: Box<dyn Subscriber>) {
        subscriber.close().await.expect("close");
        self.delete().await;
    }

    /// Deletes the topic (and with it its groups): the end of a case that passed.
    pub async fn delete(self) {
        self.broker
            .delete_topic(&self.topic)
            .await
            .expect("delete_topic");
    }
}

/// Generates one `#[tokio::test]` per conformance case for the factory expression.
///
/// Use in a backend's test file: `unified_broker::conformance_tests!(factory());`. With
/// `optional`, the expression is an `Option` of a factory, for a broker that runs outside
/// the tests: `None` (no broker configured, and said so) makes every case return at once.
/// Names after a `;` add cases of this module that are not in the suite, e.g.
/// `conformance_tests!(optional factory(); large_messages_round_trip)`.
#[macro_export]
macro_rules! conformance_tests {
    (optional $factory:expr $(; $($extra:ident),+ $(,)?)?) => {
        $crate::conformance_tests!(
            match $factory {
                Some(factory) => factory,
                None => return,
            }
            $(; $($extra),+)?
        );
    };
    ($factory:expr $(; $($extra:ident),+ $(,)?)?) => {
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
            size_limit_is_exact,
            hostile_topic_names_are_refused,
            missing_topics_fail_fast,
            backlog_counts_what_the_group_has_not_acked,
            $($($extra,)+)?
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
