//! Redis Streams backend, through the `redis` crate (tokio, connection manager).
//!
//! How the common API maps onto Redis:
//!
//! - a **topic** is a stream of the same key (1 to [`MAX_STREAM_KEY_BYTES`] bytes).
//!   `ensure_topic` creates it empty; publishing to a stream that does not exist is
//!   [`BrokerError::TopicNotFound`] (`XADD NOMKSTREAM`), never a silently created one,
//!   and to a key that holds something else is a final [`BrokerError::InvalidTopic`].
//! - **publish**: one `XADD key NOMKSTREAM MAXLEN ~ max_len * …` per message, a batch
//!   pipelined in one round trip on the client's shared, self-reconnecting connection.
//!   The entry's fields are [`PAYLOAD_FIELD`], [`KEY_FIELD`] (if any) and one
//!   [`ATTRIBUTE_PREFIX`]`name` field per attribute, so other Redis tools can read them.
//!   The trimming is approximate and ignores consumer groups: see
//!   [`RedisConfig::max_len`] for what a too small bound does to unacked entries.
//! - a **group** is a stream consumer group of the same name, created at the end of the
//!   stream (`$`): like Pub/Sub, a group receives what is published after it exists.
//! - each **subscriber** is a consumer of the group with a unique name, reading new
//!   entries (`XREADGROUP … >`) on a connection of its own, taking over entries that a
//!   dead member left idle (`XAUTOCLAIM`), acking with `XACK`. Details, nacks, closing
//!   and flow control in `consumer/`.
//! - `delete_topic` deletes the stream (and with it its groups); `delete_subscription`
//!   destroys the group (`XGROUP DESTROY`). Acked entries stay in the stream for other
//!   groups until `MAXLEN` trims them.
//! - a group's **backlog** is its `lag` (entries not yet delivered to it, Redis ≥ 7) plus
//!   its `pending` entries, from `XINFO GROUPS` (details in `admin.rs`).
//!
//! Redis keeps streams in memory; whether they survive a restart depends on the server's
//! persistence settings (the scripts' server has none), so the backend does not promise
//! it. After a restart, subscribers' reads fail with `NOGROUP` and their streams end;
//! [`crate::Resubscribing`] re-creates stream and group.

mod admin;
mod config;
mod consumer;
mod producer;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};

use self::config::redacted_url;
pub use self::config::{RedisConfig, URL_ENV};
use self::consumer::RedisSubscriber;
use crate::error::{check_message_sizes, check_topic_length};
use crate::{
    Backlog, Broker, BrokerError, ClosedFlag, Features, Message, Result, SubscribeOptions,
    Subscriber,
};

/// Stream field holding a message's payload.
pub const PAYLOAD_FIELD: &str = "payload";
/// Stream field holding a message's key, when it has one.
pub const KEY_FIELD: &str = "key";
/// Prefix of the stream fields holding a message's attributes (`attr:<name>`).
pub const ATTRIBUTE_PREFIX: &str = "attr:";

/// The longest stream key (topic name) this backend takes, in bytes. Redis itself takes
/// keys of up to 512 MB, so this bound is ours: a name is sent with every `XADD`, kept by
/// the server and shown in logs and errors, and reply routes come from untrusted peers,
/// whose megabyte-long names must not reach the shared connection. 1 KiB is far above
/// any name the system makes (a reply topic is about 50 bytes) and above the other
/// backends' limits (Kafka 249, Pub/Sub 255), so a name valid there is valid here.
pub const MAX_STREAM_KEY_BYTES: usize = 1024;

/// A client of one Redis server: a shared connection manager (multiplexed, reconnects by
/// itself) for publishing, admin, claims and acks; each subscriber adds a connection of
/// its own for its blocking reads.
pub struct RedisBroker {
    config: RedisConfig,
    client: redis::Client,
    manager: ConnectionManager,
    closed: ClosedFlag,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("config", &self.config)
            .field("closed", &self.closed)
            .finish()
    }
}

/// What was being done when a Redis error happened, to pick the right [`BrokerError`].
#[derive(Clone, Copy)]
pub(crate) enum ErrorContext<'a> {
    Connect,
    Publish(&'a str),
    Subscribe(&'a str),
    Admin(&'a str),
}

/// Whether the error means the server could not be reached, the connection broke, or the
/// server cannot serve yet (loading, failing over): worth retrying later.
fn is_unreachable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.code(),
            Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY")
        )
}

/// Whether a read or claim failed because the stream or the group is gone (deleted, or
/// lost in a server restart): the subscription has ended.
pub(crate) fn is_lost_group(error: &RedisError) -> bool {
    error.code() == Some("NOGROUP")
}

/// Whether the server refused a command because the key holds another type than the
/// command works on (`WRONGTYPE`): for a stream command, the topic's key is taken by a
/// string, list, …, and no retry changes that. A pipeline's error (a batch of `XADD`s)
/// carries each failed command's error inside.
fn is_wrong_type(error: &RedisError) -> bool {
    error.code() == Some("WRONGTYPE")
        || error
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "WRONGTYPE"))
}

/// What a topic whose key holds something other than a stream is: final.
pub(crate) fn not_a_stream(topic: &str, kind: &str) -> BrokerError {
    BrokerError::invalid_topic(topic, format!("the key holds a {kind}, not a stream"))
}

/// Maps a `redis` error onto the backend-independent error type.
pub(crate) fn map_error(error: &RedisError, context: ErrorContext<'_>) -> BrokerError {
    match error.kind() {
        ErrorKind::InvalidClientConfig => {
            return BrokerError::Config(format!("redis client configuration: {error}"))
        }
        ErrorKind::AuthenticationFailed => {
            return BrokerError::Config(format!(
                "redis refused the credentials (wrong user or password): {error}"
            ))
        }
        _ => {}
    }
    match error.code() {
        Some("NOAUTH") => {
            return BrokerError::Config(
                "redis requires credentials and none were given (NOAUTH): put the user and \
                 password in the URL, redis://USER:PASSWORD@HOST:PORT (or REDIS_URL)"
                    .into(),
            )
        }
        // An ACL that keeps this user from a key or a command: asking again cannot help.
        Some("NOPERM") => {
            let what = match context {
                ErrorContext::Publish(topic)
                | ErrorContext::Subscribe(topic)
                | ErrorContext::Admin(topic) => format!(" on {}", crate::error::shown_topic(topic)),
                ErrorContext::Connect => String::new(),
            };
            return BrokerError::Config(format!(
                "redis refuses this user{what} (NOPERM, its ACL): {error}"
            ));
        }
        _ => {}
    }
    if error.is_timeout() {
        return BrokerError::Timeout(format!("redis: {error}"));
    }
    if is_unreachable(error) {
        return BrokerError::Unavailable(format!("redis: {error}"));
    }
    match context {
        ErrorContext::Publish(topic)
        | ErrorContext::Subscribe(topic)
        | ErrorContext::Admin(topic)
            if is_wrong_type(error) =>
        {
            not_a_stream(topic, "value of another type")
        }
        ErrorContext::Connect => BrokerError::Unavailable(format!("redis: {error}")),
        ErrorContext::Publish(topic) => BrokerError::Publish {
            topic: topic.to_string(),
            reason: error.to_string(),
        },
        ErrorContext::Subscribe(topic) => BrokerError::Subscribe(format!("{topic}: {error}")),
        ErrorContext::Admin(topic) => BrokerError::Admin(format!("{topic}: {error}")),
    }
}

impl RedisBroker {
    /// Opens the shared connection and checks that the server answers (`PING`), both
    /// bounded by `request_timeout_ms`.
    pub async fn connect(config: &RedisConfig) -> Result<RedisBroker> {
        config.validate()?;
        let url = config.connection_url();
        let client = redis::Client::open(url.as_str())
            .map_err(|error| map_error(&error, ErrorContext::Connect))?;
        let timeout = config.request_timeout();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2);
        let connecting = ConnectionManager::new_with_config(client.clone(), manager_config);
        let mut manager = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                BrokerError::Unavailable(format!(
                    "redis at {} did not answer within {timeout:?}",
                    redacted_url(&url)
                ))
            })?
            .map_err(|error| map_error(&error, ErrorContext::Connect))?;
        redis::cmd("PING")
            .query_async::<()>(&mut manager)
            .await
            .map_err(|error| map_error(&error, ErrorContext::Connect))?;
        tracing::info!(url = %redacted_url(&url), "connected to redis");
        Ok(RedisBroker {
            config: config.clone(),
            client,
            manager,
            closed: ClosedFlag::default(),
        })
    }

    /// A clone of the shared connection (clones share one multiplexed connection).
    pub(crate) fn manager(&self) -> ConnectionManager {
        self.manager.clone()
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            // One member reads in stream order, but the members of a group share the
            // stream entry by entry, with no key affinity.
            ordered_per_key: false,
            // Groups start at the end of the stream (`$`).
            retains_before_subscription: false,
            // Only with the server's persistence configured (AOF); not promised.
            survives_broker_restart: false,
            in_process_only: false,
            max_message_bytes: self.config.max_message_bytes,
        }
    }

    /// A stream key of 1 to [`MAX_STREAM_KEY_BYTES`] bytes; Redis has no other rule.
    fn check_topic_name(&self, topic: &str) -> Result<()> {
        check_topic_length(topic, MAX_STREAM_KEY_BYTES)
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.check_topic_name(topic)?;
        self.closed.ensure_open()?;
        check_message_sizes(&messages, self.config.max_message_bytes)?;
        self.append(topic, &messages).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        self.check_topic_name(topic)?;
        self.require_topic(topic).await?;
        self.create_group(topic, group, false).await?;
        let subscriber = RedisSubscriber::start(
            &self.client,
            self.manager(),
            &self.config,
            topic,
            group,
            options,
        )
        .await?;
        Ok(Box::new(subscriber))
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_topic_name(topic)?;
        self.create_stream(topic).await
    }

    /// `PING` on the shared connection (its response timeout is `request_timeout_ms`).
    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.manager())
            .await
            .map_err(|error| map_error(&error, ErrorContext::Connect))
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.remove_stream(topic).await
    }

    async fn ensure_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.check_topic_name(topic)?;
        self.create_group(topic, group, true).await
    }

    /// One atomic `XGROUP CREATE … MKSTREAM`: with a separate stream creation first, an
    /// entry published between the two would sit before the group's start and never be
    /// delivered to it.
    async fn ensure_topic_and_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.check_topic_name(topic)?;
        self.create_group(topic, group, true).await
    }

    async fn delete_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.remove_group(topic, group).await
    }

    /// `XINFO GROUPS`: see `admin.rs`.
    async fn backlog(&self, topic: &str, group: &str) -> Result<Option<Backlog>> {
        self.check_topic_name(topic)?;
        self.group_backlog(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        // Publishes are confirmed before `publish_batch` returns: nothing to flush.
        self.closed.close();
        tracing::debug!("redis client closed for publishing");
        Ok(())
    }
}
