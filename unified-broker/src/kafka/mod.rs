//! Apache Kafka backend (and any Kafka-protocol broker, e.g. Tansu or Redpanda), through
//! `rdkafka` (librdkafka).
//!
//! How the common API maps onto Kafka:
//!
//! - **publish**: one idempotent [`FutureProducer`] per client (replaced should it fail
//!   for good, e.g. fenced by a restarted broker); `publish_batch` enqueues
//!   every message in order, then waits for every delivery report. The message key is the
//!   Kafka key (same key → same partition → publish order kept); attributes are headers.
//!   Before that, the topic's name is checked against Kafka's rule and the topic must be
//!   known to exist (a bounded cache, else a listing of the cluster's topics), so a bad
//!   or missing topic fails at once and never reaches librdkafka (details in
//!   `topics.rs`); after 1,024 new topics the producer is retired for a fresh one
//!   (librdkafka keeps an object per topic a client ever saw; see `producer.rs`).
//! - **subscribe(topic, group)**: one consumer per subscriber in the Kafka consumer group
//!   `"{topic}.{group}"` (see [`KafkaConfig::group_per_topic`] for why the topic is
//!   part of it). Offsets are committed by us, only below every unacked delivery; nacks go
//!   through a local redelivery queue (details in `consumer.rs`).
//! - **admin**: topics are created with the configured partitions; subscriptions need no
//!   creation, and deleting one deletes its consumer group (details in `admin.rs`).
//! - **backlog**: high watermarks minus the group's committed offsets, read by a
//!   consumer that never joins the group (details in `backlog.rs`).
//!
//! Kafka retains messages by time/size, not by consumer: a group that subscribes later
//! starts at the oldest retained message (`auto.offset.reset=earliest`).

mod admin;
mod backlog;
mod config;
mod consumer;
mod offsets;
mod producer;
mod statistics;
mod topics;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::AdminClient;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;

use self::backlog::GroupReaders;
pub use self::config::KafkaConfig;
use self::consumer::KafkaSubscriber;
use self::producer::{ProducerContext, Producers};
pub use self::statistics::{transport_counts, TransportCounts};
pub use self::topics::MAX_TOPIC_NAME_LEN;
use self::topics::{check_name, KnownTopics, TopicListing, KNOWN_TOPICS_CAPACITY};
use crate::error::check_message_sizes;
use crate::{
    Backlog, Broker, BrokerError, ClosedFlag, Features, Message, Result, SubscribeOptions,
    Subscriber,
};

/// A client of a Kafka cluster: one idempotent producer (replaced when a broker restart
/// spoils it, see `producer.rs`) and one admin client, shared by every call; each
/// subscriber gets its own consumer.
pub struct KafkaBroker {
    config: KafkaConfig,
    producers: Producers,
    admin: Arc<AdminClient<LogContext>>,
    closed: ClosedFlag,
    /// The topics known to exist, each with its size limit for this client
    /// ([`Broker::max_message_bytes`]), bounded: looked up once per topic and checked
    /// before every publish, so a missing topic is never handed to librdkafka, and
    /// because not every Kafka-protocol broker enforces `max.message.bytes` itself
    /// (Tansu does not). See `topics.rs`.
    known: KnownTopics,
    /// Which topics exist, for topics not in `known`.
    listing: TopicListing,
    /// Consumers that read groups' committed offsets without joining them, for
    /// [`Broker::backlog`] (see `backlog.rs`).
    backlogs: Arc<GroupReaders>,
}

/// librdkafka context of the admin client: forwards its logs to `tracing`.
pub(crate) struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

/// The backlog readers are consumers that never subscribe: no rebalance to handle.
impl ConsumerContext for LogContext {}

/// Forwards one librdkafka log line to `tracing` (librdkafka never logs property values).
pub(crate) fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

/// What was being done when a Kafka error happened, to pick the right [`BrokerError`].
#[derive(Clone, Copy)]
pub(crate) enum ErrorContext<'a> {
    Connect,
    Publish(&'a str),
    Subscribe(&'a str),
    Admin(&'a str),
}

/// Whether an error code means the broker could not be reached or the connection broke.
fn is_transport(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::CoordinatorLoadInProgress
            | C::NetworkException
            | C::WaitingForCoordinator
            | C::BrokerDestroy
            | C::SSL
    )
}

fn is_timeout(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut | C::TimedOutQueue
    )
}

/// The broker (or librdkafka, checking its own `message.max.bytes`) refused a message for
/// its size: final, the same message is refused again.
fn is_too_large(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// The broker (or librdkafka) refused the topic's name: final, the same name is refused
/// again. librdkafka's own invalid-argument error counts only for a publish, where the
/// topic is the only argument we pass that it checks (no partition is ever set).
fn is_invalid_topic(code: RDKafkaErrorCode, context: ErrorContext<'_>) -> bool {
    code == RDKafkaErrorCode::InvalidTopic
        || (code == RDKafkaErrorCode::InvalidArgument
            && matches!(context, ErrorContext::Publish(_)))
}

fn is_unknown_topic(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicId
    )
}

/// Maps a librdkafka error onto the backend-independent error type.
pub(crate) fn map_error(error: &KafkaError, context: ErrorContext<'_>) -> BrokerError {
    // Config errors name the property but never print its (possibly secret) value.
    if let KafkaError::ClientConfig(_, description, name, _value) = error {
        return BrokerError::Config(format!("kafka property {name}: {description}"));
    }
    if let KafkaError::ClientCreation(reason) = error {
        return BrokerError::Config(format!("cannot create a kafka client: {reason}"));
    }
    if let KafkaError::Nul(_) = error {
        // The only strings librdkafka needs without NUL bytes that we pass on are names.
        return nul_in_name(context);
    }
    let code = match error {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    let topic = match context {
        ErrorContext::Publish(topic)
        | ErrorContext::Subscribe(topic)
        | ErrorContext::Admin(topic) => topic,
        ErrorContext::Connect => "",
    };
    match code {
        Some(code) if is_transport(code) => BrokerError::Unavailable(error.to_string()),
        Some(code) if is_timeout(code) => BrokerError::Timeout(error.to_string()),
        Some(code) if is_too_large(code) => BrokerError::MessageTooLarge { size: 0, limit: 0 },
        Some(code) if is_unknown_topic(code) && !topic.is_empty() => {
            BrokerError::TopicNotFound(topic.to_string())
        }
        Some(code) if is_invalid_topic(code, context) && !topic.is_empty() => {
            BrokerError::invalid_topic(topic, format!("refused by Kafka: {error}"))
        }
        _ => match context {
            ErrorContext::Connect => BrokerError::Unavailable(error.to_string()),
            ErrorContext::Publish(topic) => BrokerError::Publish {
                topic: topic.to_string(),
                reason: error.to_string(),
            },
            ErrorContext::Subscribe(_) => BrokerError::Subscribe(error.to_string()),
            ErrorContext::Admin(_) => BrokerError::Admin(error.to_string()),
        },
    }
}

/// What a NUL byte in a name librdkafka was given is: the topic's name is invalid (if
/// it has one) or else a group's (final either way).
fn nul_in_name(context: ErrorContext<'_>) -> BrokerError {
    match context {
        ErrorContext::Publish(topic)
        | ErrorContext::Subscribe(topic)
        | ErrorContext::Admin(topic)
            if topic.contains('\0') =>
        {
            BrokerError::invalid_topic(topic, "contains a NUL byte")
        }
        _ => BrokerError::Config("a name given to librdkafka contains a NUL byte".into()),
    }
}

/// Bytes of a record batch that are not the record's key, value and header strings:
/// the batch header (61 bytes), the record's own varint fields and the headers' length
/// prefixes, with room to spare. A message of [`Message::size`] `n` is a batch of at most
/// `n + RECORD_FRAMING_BYTES` bytes, which `max.message.bytes` limits.
pub(crate) const RECORD_FRAMING_BYTES: usize = 512;

/// How long to wait before retrying when librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

impl KafkaBroker {
    /// Creates the producer and admin clients and checks that the cluster answers
    /// (a metadata request, bounded by `request_timeout_ms`).
    pub async fn connect(config: &KafkaConfig) -> Result<KafkaBroker> {
        config.validate()?;
        let producers = Producers::new(config)?;
        let producer = producers.current_unused();
        let admin: AdminClient<LogContext> = config
            .admin()
            .create_with_context(LogContext)
            .map_err(|error| map_error(&error, ErrorContext::Connect))?;
        let probe = producer.clone();
        let timeout = config.request_timeout();
        let brokers = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, timeout)
                .map(|metadata| metadata.brokers().len())
        })
        .await
        .map_err(|error| BrokerError::Unavailable(format!("metadata probe failed: {error}")))?
        .map_err(|error| match producers.final_error() {
            // A refused certificate or failed authentication: final, and said as
            // librdkafka said it, not retried for ever as "did not answer".
            Some(reason) => BrokerError::Config(format!(
                "kafka at {}: {reason} (check security.protocol and the ssl.* and \
                 sasl.* properties)",
                config.bootstrap_servers
            )),
            None => BrokerError::Unavailable(format!(
                "kafka at {} did not answer: {error}",
                config.bootstrap_servers
            )),
        })?;
        tracing::info!(bootstrap_servers = %config.bootstrap_servers, brokers, "connected to kafka");
        let admin = Arc::new(admin);
        Ok(KafkaBroker {
            config: config.clone(),
            producers,
            listing: TopicListing::new(Arc::clone(&admin), timeout),
            admin,
            closed: ClosedFlag::default(),
            known: KnownTopics::new(KNOWN_TOPICS_CAPACITY),
            backlogs: Arc::new(GroupReaders::new(config)),
        })
    }

    /// The size limit of `topic`, which must exist: from the cache of known topics (no
    /// request), or else looked up (does it exist, then its `max.message.bytes`) and
    /// cached. Errors of the look-up are mapped as in `context`.
    async fn known_limit(&self, topic: &str, context: ErrorContext<'_>) -> Result<usize> {
        if let Some(limit) = self.known.get(topic) {
            return Ok(limit);
        }
        self.require_topic(topic, context).await?;
        let ours = self.config.max_record_bytes();
        let limit = match self.topic_max_message_bytes(topic, context).await? {
            Some(topic_limit) => ours.min(topic_limit.saturating_sub(RECORD_FRAMING_BYTES)),
            None => ours,
        };
        self.known.insert(topic, limit);
        self.producers.note_new_topic();
        Ok(limit)
    }

    /// The Kafka consumer group that backs `group` on `topic`.
    pub fn group_id(&self, topic: &str, group: &str) -> String {
        self.config.group_id(topic, group)
    }

    /// Enqueues one message, waiting while librdkafka's local queue is full.
    async fn enqueue(
        &self,
        producer: &FutureProducer<ProducerContext>,
        topic: &str,
        message: &Message,
    ) -> Result<rdkafka::producer::DeliveryFuture> {
        let mut headers = OwnedHeaders::new_with_capacity(message.attributes.len());
        for (name, value) in &message.attributes {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&message.payload[..])
            .headers(headers);
        if let Some(key) = &message.key {
            record = record.key(key.as_bytes());
        }
        let deadline = tokio::time::Instant::now() + self.config.message_timeout();
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((error, _)) => return Err(map_error(&error, ErrorContext::Publish(topic))),
            }
        }
    }

    /// Publishes on `producer`: enqueues every message first (in order, so keys keep
    /// their order), then awaits every delivery report.
    async fn publish_with(
        &self,
        producer: &FutureProducer<ProducerContext>,
        topic: &str,
        messages: &[Message],
    ) -> Result<()> {
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            deliveries.push(self.enqueue(producer, topic, message).await?);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(report)) => {
                    tracing::trace!(
                        topic,
                        partition = report.partition,
                        offset = report.offset,
                        "published"
                    )
                }
                Ok(Err((error, _message))) => {
                    let error = map_error(&error, ErrorContext::Publish(topic));
                    tracing::debug!(topic, %error, "publish failed");
                    return Err(error);
                }
                Err(_canceled) => {
                    return Err(BrokerError::Publish {
                        topic: topic.to_string(),
                        reason: "the producer was shut down before confirming".into(),
                    })
                }
            }
        }
        tracing::debug!(topic, count = messages.len(), "published batch");
        Ok(())
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            // Same key → same partition, fetched in order by one member.
            ordered_per_key: true,
            // A new group starts at the oldest retained message.
            retains_before_subscription: true,
            // Kafka persists its log. (The memory-only Tansu used in tests does not, but
            // that is a property of that test broker, not of this backend.)
            survives_broker_restart: true,
            in_process_only: false,
            max_message_bytes: self.config.max_record_bytes(),
        }
    }

    async fn max_message_bytes(&self, topic: &str) -> Result<usize> {
        check_name(topic)?;
        self.known_limit(topic, ErrorContext::Admin(topic)).await
    }

    /// Kafka's own rule: 1 to [`MAX_TOPIC_NAME_LEN`] characters of ASCII letters,
    /// digits, `.`, `_` and `-`, and neither `.` nor `..`.
    fn check_topic_name(&self, topic: &str) -> Result<()> {
        check_name(topic)
    }

    /// A topic not known to exist is looked up first (see `topics.rs`): a missing one
    /// fails with [`BrokerError::TopicNotFound`] at once, without a record handed to
    /// librdkafka (which would hold it for `message_timeout_ms`).
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        check_name(topic)?;
        self.closed.ensure_open()?;
        // The topic's limit is already capped by this client's own.
        let limit = self
            .known_limit(topic, ErrorContext::Publish(topic))
            .await?;
        check_message_sizes(&messages, limit)?;
        let (generation, producer) = self.producers.current();
        let result = self.publish_with(&producer, topic, &messages).await;
        result.map_err(|error| {
            if matches!(
                error,
                BrokerError::TopicNotFound(_) | BrokerError::InvalidTopic { .. }
            ) {
                self.known.forget(topic);
            }
            self.producers
                .replace_if_fatal(generation, &producer, error)
        })
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        check_name(topic)?;
        self.require_topic(topic, ErrorContext::Subscribe(topic))
            .await?;
        let group_id = self.group_id(topic, group);
        let subscriber = KafkaSubscriber::start(
            self.config.consumer(&group_id),
            topic,
            &group_id,
            options,
            self.config.request_timeout(),
        )?;
        Ok(Box::new(subscriber))
    }

    /// A metadata request (every topic), bounded by `request_timeout_ms`.
    async fn ping(&self) -> Result<()> {
        self.listing.ping().await
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        check_name(topic)?;
        self.create_topic(topic, self.config.partitions).await
    }

    async fn ensure_private_topic(&self, topic: &str) -> Result<()> {
        check_name(topic)?;
        self.create_topic(topic, 1).await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        check_name(topic)?;
        self.known.forget(topic);
        self.remove_topic(topic).await
    }

    async fn ensure_subscription(&self, topic: &str, group: &str) -> Result<()> {
        // Nothing to create: Kafka keeps messages by retention, not per group, and a
        // new group starts at the oldest retained one (auto.offset.reset=earliest).
        tracing::debug!(topic, group, "ensure_subscription: no-op for kafka");
        Ok(())
    }

    async fn delete_subscription(&self, topic: &str, group: &str) -> Result<()> {
        check_name(topic)?;
        self.remove_group(topic, &self.group_id(topic, group)).await
    }

    /// High watermarks minus the group's committed offsets, asked without joining the
    /// group (see `backlog.rs`).
    async fn backlog(&self, topic: &str, group: &str) -> Result<Option<Backlog>> {
        check_name(topic)?;
        let group_id = self.group_id(topic, group);
        self.backlogs.backlog(topic, &group_id).await.map(Some)
    }

    async fn close(&self) -> Result<()> {
        self.closed.close();
        self.backlogs.release_all();
        let producer = self.producers.current_unused();
        let timeout = self.config.message_timeout();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|error| BrokerError::Unavailable(format!("flush task failed: {error}")))?
            .map_err(|error| map_error(&error, ErrorContext::Connect))?;
        tracing::info!("kafka producer flushed and closed");
        Ok(())
    }
}
