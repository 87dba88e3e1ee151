//! One async publish/subscribe API over several message brokers.
//!
//! Everything broker-specific in the project lives in this crate, one module per
//! backend, each behind the same two traits:
//!
//! - [`Broker`]: publish (confirmed), subscribe as a member of a consumer group, and
//!   idempotent admin of topics and subscriptions;
//! - [`Subscriber`]: a stream of [`Delivery`]s, each settled by `ack` or `nack`
//!   (dropping one unsettled counts as a nack).
//!
//! Pick a backend with [`BrokerConfig`] (serde, so it comes straight from a TOML file) and
//! get a client with [`connect`]. The [`embedded`] backend runs inside the process and is
//! the default; `kafka`, `pubsub` and `redis` (Redis Streams) talk to real servers. Long-running consumers wrap
//! their subscription in [`Resubscribing`] to carry on across broker restarts.
//!
//! Semantics every backend promises (checked by the conformance suite, feature
//! `conformance`): at-least-once delivery per consumer group, every group gets every
//! message published after the group was created, members of one group share the
//! messages, and a nacked or abandoned delivery comes back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod embedded;
mod error;
#[cfg(feature = "kafka")]
pub mod kafka;
mod message;
#[cfg(feature = "pubsub")]
pub mod pubsub;
#[cfg(feature = "redis")]
pub mod redis;
pub mod resubscribe;
pub mod retry;
pub mod sync;

pub use error::{BrokerError, Result, MAX_TOPIC_IN_ERROR};
pub use message::{AckHandle, Delivery, Message};
pub use resubscribe::{Resubscribing, SubscriptionState};
pub use retry::{retry_while_unavailable, Backoff};

/// What a backend promises beyond the common semantics; the conformance suite skips the
/// cases a backend does not promise, and callers can adapt (e.g. warn about ordering).
/// The default promises nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// Several groups each get every message; members of one group share them.
    pub consumer_groups: bool,
    /// Messages with the same key are delivered in publish order (to one subscriber).
    pub ordered_per_key: bool,
    /// A group created after a message was published still receives it.
    pub retains_before_subscription: bool,
    /// Unacked messages outlive the broker process (survive a broker restart).
    pub survives_broker_restart: bool,
    /// The broker lives inside this process: only clients in the same process reach it,
    /// so a model server must run in the process of its clients (the client then starts
    /// one itself). Same as [`BrokerConfig::in_process_only`] for the config it came from.
    pub in_process_only: bool,
    /// The largest [`Message::size`] this client publishes: larger messages fail at once
    /// with [`BrokerError::MessageTooLarge`], before anything is sent. A topic may accept
    /// less ([`Broker::max_message_bytes`]).
    pub max_message_bytes: usize,
}

/// Per-subscription tuning. Backends map these onto their own flow control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Upper bound on deliveries handed out and not yet settled by this subscriber.
    pub max_outstanding_messages: usize,
    /// Upper bound on payload bytes handed out and not yet settled by this subscriber.
    pub max_outstanding_bytes: usize,
    /// This subscriber is the only member its group will ever have (a client's private
    /// reply topic), so the backend may skip group coordination: Kafka then assigns
    /// itself every partition of the topic instead of joining the group, which saves
    /// the join (seconds on some brokers) before the first delivery. Acks, nacks and
    /// committed positions work as for any member. Other backends ignore it.
    pub sole_member: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            max_outstanding_messages: 1_000,
            max_outstanding_bytes: 100 * 1024 * 1024,
            sole_member: false,
        }
    }
}

/// How many messages a consumer group has not answered yet, as its broker counts them
/// ([`Broker::backlog`]): what an autoscaler scales the group's members on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Messages waiting for the group that no member holds: on Redis the group's `lag`,
    /// on the embedded broker its queue. Kafka cannot tell a message a member fetched
    /// from one nobody did (only committed offsets are the group's), so there it is every
    /// message past the committed offsets, held ones included, and `in_flight` is `None`.
    pub waiting: u64,
    /// Messages handed to a member and not yet acked, where the broker tells them apart
    /// from `waiting` (Redis: the group's pending entries; embedded: its deliveries under
    /// way). `None` where they are counted in `waiting` (Kafka).
    pub in_flight: Option<u64>,
    /// A count of the messages the group has consumed that only grows while the topic
    /// and group live (Kafka: the sum of the committed offsets; Redis: the group's
    /// `entries-read`; embedded: acks), so its change over time is the whole group's
    /// throughput, not one member's. `None` where the broker does not tell it (a Redis
    /// group that has read nothing yet). Its origin means nothing; it can go back when
    /// the topic or group is made anew.
    pub consumed: Option<u64>,
}

impl Backlog {
    /// Every message the group has not acked: `waiting` plus `in_flight`.
    pub fn unanswered(&self) -> u64 {
        self.waiting.saturating_add(self.in_flight.unwrap_or(0))
    }
}

/// A client of one broker: publishing, subscribing and admin.
///
/// Clients are cheap to share (`Arc<dyn Broker>`); every method takes `&self`.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Short backend name for logs: "embedded", "kafka", "pubsub", "redis".
    fn backend(&self) -> &'static str;

    /// What this backend promises beyond the basics.
    fn features(&self) -> Features;

    /// The largest [`Message::size`] that `topic` accepts from this client: the
    /// [`Features::max_message_bytes`], or less where the broker says so for the topic
    /// (Kafka's `max.message.bytes`). Callers check a message against it to answer "too
    /// large" at once instead of sending it.
    async fn max_message_bytes(&self, topic: &str) -> Result<usize> {
        let _ = topic;
        Ok(self.features().max_message_bytes)
    }

    /// `Err(`[`BrokerError::InvalidTopic`]`)` when this backend could never publish to a
    /// topic called `topic` (its naming rules: length, characters), checked locally
    /// without asking the broker. Servers check reply routes from untrusted peers with
    /// it before doing any work for them. The default accepts any non-empty name.
    fn check_topic_name(&self, topic: &str) -> Result<()> {
        if topic.is_empty() {
            return Err(BrokerError::invalid_topic(topic, "empty name"));
        }
        Ok(())
    }

    /// Publishes one message; returns once the broker has confirmed it.
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.publish_batch(topic, vec![message]).await
    }

    /// Publishes several messages; returns once the broker has confirmed all of them.
    /// On error some of them may have been published (callers retry the whole batch and
    /// consumers de-duplicate).
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()>;

    /// Joins consumer group `group` on `topic` (creating the group/subscription if
    /// needed) and returns a stream of deliveries shared with the group's other members.
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>>;

    /// Creates the topic if it does not exist (idempotent).
    async fn ensure_topic(&self, topic: &str) -> Result<()>;

    /// Creates the topic if it does not exist (idempotent), for one reader only (a
    /// [`SubscribeOptions::sole_member`] subscription, such as a client's private reply
    /// topic). A backend that splits topics for parallel readers makes it one piece,
    /// which costs the broker least: Kafka creates one partition instead of
    /// `partitions` (fewer, fuller produce batches; one partition per fetch). The
    /// others create it as [`Broker::ensure_topic`] does.
    async fn ensure_private_topic(&self, topic: &str) -> Result<()> {
        self.ensure_topic(topic).await
    }

    /// Deletes the topic if it exists (idempotent).
    async fn delete_topic(&self, topic: &str) -> Result<()>;

    /// Creates consumer group `group` on `topic` if needed, so that messages published
    /// from now on are kept for it even before anyone subscribes (idempotent).
    async fn ensure_subscription(&self, topic: &str, group: &str) -> Result<()>;

    /// Deletes consumer group `group` on `topic` if it exists (idempotent).
    async fn delete_subscription(&self, topic: &str, group: &str) -> Result<()>;

    /// Creates the topic and consumer group `group` on it if needed (idempotent): what
    /// must exist before messages for that group are published or consumed.
    async fn ensure_topic_and_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_topic(topic).await?;
        self.ensure_subscription(topic, group).await
    }

    /// The backlog of consumer group `group` on `topic` ([`Backlog`]), asked without
    /// joining the group (no member is added, no rebalance caused), or `Ok(None)` when
    /// this broker cannot tell it (the default). Autoscalers poll it.
    ///
    /// - **kafka**: per partition, the high watermark minus the group's committed offset
    ///   (an OffsetFetch, which does not join); a partition the group never committed
    ///   counts from where its members would start (`auto.offset.reset`, earliest unless
    ///   overridden: every retained message);
    /// - **redis**: `XINFO GROUPS`: `lag` waiting, `pending` in flight, `entries-read`
    ///   consumed. `Ok(None)` when Redis cannot compute `lag` (older than 7.0, or entries
    ///   deleted with `XDEL` inside the part of the stream the group has not read);
    /// - **embedded**: the group's queue and its deliveries under way;
    /// - **pubsub**: `Ok(None)`. The Pub/Sub API has no backlog count: it is Cloud
    ///   Monitoring's metric `pubsub.googleapis.com/subscription/num_undelivered_messages`,
    ///   which an autoscaler can read there.
    ///
    /// A group that does not exist has nothing waiting where the broker keeps messages
    /// per group (Redis, embedded: zero); on Kafka it counts what a new group would read.
    /// A topic that does not exist is [`BrokerError::TopicNotFound`].
    async fn backlog(&self, topic: &str, group: &str) -> Result<Option<Backlog>> {
        let _ = (topic, group);
        Ok(None)
    }

    /// Asks the broker something cheap, to tell whether it answers now: readiness
    /// probes call it every few seconds, since a backend's own client may retry a lost
    /// connection quietly, with no error reaching a subscriber. The default (a broker in
    /// this process) always answers.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// Waits until everything published so far is confirmed and releases the client's
    /// publishing resources. Publishing after `close` is an error.
    async fn close(&self) -> Result<()>;
}

/// A member of a consumer group, yielding deliveries.
#[async_trait]
pub trait Subscriber: Send {
    /// The next delivery; `None` once the subscription is closed or deleted, or lost
    /// with its broker (subscribe again; [`Resubscribing`] does so by itself).
    /// Errors are transient unless followed by `None`.
    ///
    /// Cancel-safe: dropping the returned future loses no message, so callers may
    /// `select!` it against a shutdown signal.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Leaves the group. Unsettled deliveries (held or not yet handed out) are
    /// redelivered to the group's other or future members.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// Whether a client was closed, for the backends that refuse to publish after
/// [`Broker::close`] by themselves: `close` sets it, every publish checks it first.
#[derive(Default)]
pub(crate) struct ClosedFlag(AtomicBool);

impl ClosedFlag {
    /// Marks the client closed: from now on [`ClosedFlag::ensure_open`] fails.
    pub(crate) fn close(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// `Err(BrokerError::Closed)` once the client was closed.
    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.0.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        Ok(())
    }
}

impl std::fmt::Debug for ClosedFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0.load(Ordering::Relaxed), f)
    }
}

/// Which backend to use and how to reach it. Deserialised from the `[broker]` table of
/// a config file, e.g. `backend = "kafka"` plus the backend's own fields.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum BrokerConfig {
    /// The in-process broker: no server, nothing to install.
    Embedded(embedded::EmbeddedConfig),
    /// Apache Kafka or any Kafka-protocol broker.
    #[cfg(feature = "kafka")]
    Kafka(kafka::KafkaConfig),
    /// Google Cloud Pub/Sub or its emulator.
    #[cfg(feature = "pubsub")]
    Pubsub(pubsub::PubSubConfig),
    /// Redis Streams with consumer groups.
    #[cfg(feature = "redis")]
    Redis(redis::RedisConfig),
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig::Embedded(embedded::EmbeddedConfig::default())
    }
}

impl BrokerConfig {
    /// Names accepted by [`BrokerConfig::default_for`] (and `--broker` flags).
    pub const BACKENDS: &'static [&'static str] = &[
        "embedded",
        #[cfg(feature = "kafka")]
        "kafka",
        #[cfg(feature = "pubsub")]
        "pubsub",
        #[cfg(feature = "redis")]
        "redis",
    ];

    /// The default settings of the backend called `name` (as in config files).
    pub fn default_for(name: &str) -> Result<Self> {
        match name {
            "embedded" => Ok(BrokerConfig::Embedded(Default::default())),
            #[cfg(feature = "kafka")]
            "kafka" => Ok(BrokerConfig::Kafka(Default::default())),
            #[cfg(feature = "pubsub")]
            "pubsub" => Ok(BrokerConfig::Pubsub(Default::default())),
            #[cfg(feature = "redis")]
            "redis" => Ok(BrokerConfig::Redis(Default::default())),
            other => Err(BrokerError::Config(format!(
                "unknown broker backend {other:?}; expected one of {:?}",
                Self::BACKENDS
            ))),
        }
    }

    /// Applies the standard environment variables of the selected backend, the ones
    /// its users already know: `KAFKA_BOOTSTRAP_SERVERS` for Kafka (and
    /// `KAFKA_SASL_USERNAME` / `KAFKA_SASL_PASSWORD`, so the password need not be in the
    /// config file), `PUBSUB_EMULATOR_HOST` for Pub/Sub, `REDIS_URL` for Redis. `lookup`
    /// reads one variable.
    pub fn apply_env(&mut self, lookup: &dyn Fn(&str) -> Option<String>) {
        match self {
            BrokerConfig::Embedded(_) => {}
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(config) => {
                if let Some(servers) = lookup("KAFKA_BOOTSTRAP_SERVERS") {
                    config.bootstrap_servers = servers;
                }
                for (variable, property) in [
                    ("KAFKA_SASL_USERNAME", "sasl.username"),
                    ("KAFKA_SASL_PASSWORD", "sasl.password"),
                ] {
                    if let Some(value) = lookup(variable) {
                        config.properties.insert(property.into(), value);
                    }
                }
            }
            #[cfg(feature = "pubsub")]
            BrokerConfig::Pubsub(config) => {
                if let Some(host) = lookup("PUBSUB_EMULATOR_HOST") {
                    config.emulator_host = Some(host);
                }
            }
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(config) => config.apply_env(lookup),
        }
    }

    /// Whether the broker this config selects lives inside the process that connects
    /// to it (see [`Features::in_process_only`]), known before connecting.
    pub fn in_process_only(&self) -> bool {
        match self {
            BrokerConfig::Embedded(_) => true,
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(_) => false,
            #[cfg(feature = "pubsub")]
            BrokerConfig::Pubsub(_) => false,
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(_) => false,
        }
    }

    /// The `host:port` of the (first) broker server this config talks to: the first
    /// Kafka bootstrap server, the Redis server, the Pub/Sub emulator. `None` for the
    /// embedded broker and for the real Pub/Sub service. Benchmarks use it to find a
    /// broker running on this machine and read its CPU time.
    pub fn server_address(&self) -> Option<String> {
        match self {
            BrokerConfig::Embedded(_) => None,
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(config) => config
                .bootstrap_servers
                .split(',')
                .map(str::trim)
                .find(|server| !server.is_empty())
                .map(|server| server.to_string()),
            #[cfg(feature = "pubsub")]
            BrokerConfig::Pubsub(config) => config.emulator_host.clone(),
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(config) => config.server_address(),
        }
    }

    /// Turns on the client library's own request statistics, reported every
    /// `interval`, where the backend has them (Kafka: librdkafka's statistics, read
    /// with [`kafka::transport_counts`]); a no-op elsewhere. For benchmarks: the
    /// reports cost a little CPU.
    pub fn enable_transport_statistics(&mut self, interval: std::time::Duration) {
        match self {
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(config) => config.enable_statistics(interval),
            _ => {}
        }
    }

    /// Backend name as written in config files.
    pub fn backend(&self) -> &'static str {
        match self {
            BrokerConfig::Embedded(_) => "embedded",
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(_) => "kafka",
            #[cfg(feature = "pubsub")]
            BrokerConfig::Pubsub(_) => "pubsub",
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(_) => "redis",
        }
    }
}

/// Connects to the configured broker.
///
/// For `embedded` this creates a new, empty in-process broker: share the returned client
/// (clone the `Arc`) between the parts of the program that must talk to each other.
pub async fn connect(config: &BrokerConfig) -> Result<Arc<dyn Broker>> {
    match config {
        BrokerConfig::Embedded(config) => {
            Ok(Arc::new(embedded::EmbeddedBroker::new(config.clone())))
        }
        #[cfg(feature = "kafka")]
        BrokerConfig::Kafka(config) => Ok(Arc::new(kafka::KafkaBroker::connect(config).await?)),
        #[cfg(feature = "pubsub")]
        BrokerConfig::Pubsub(config) => Ok(Arc::new(pubsub::PubSubBroker::connect(config).await?)),
        #[cfg(feature = "redis")]
        BrokerConfig::Redis(config) => Ok(Arc::new(redis::RedisBroker::connect(config).await?)),
    }
}

/// The `[broker]` table of the example config file `config/<name>.toml`, parsed: what
/// each backend's tests check their example file with.
#[cfg(test)]
pub(crate) fn example_config(name: &str) -> BrokerConfig {
    let path = format!("{}/../config/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
    let table: toml::Table = toml::from_str(&text).expect("valid TOML");
    let broker = table.get("broker").expect("[broker] table").clone();
    broker.try_into().expect("a valid BrokerConfig")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_only_is_known_from_the_config_and_from_the_broker() {
        let config = BrokerConfig::default();
        assert!(config.in_process_only());
        let broker = connect(&config).await.expect("embedded connects");
        assert!(broker.features().in_process_only);
        for name in BrokerConfig::BACKENDS
            .iter()
            .filter(|name| **name != "embedded")
        {
            let config = BrokerConfig::default_for(name).expect("known backend");
            assert!(!config.in_process_only(), "{name}");
        }
    }
}
