//! Topic and subscription admin for Kafka.
//!
//! - Topics are created explicitly with the configured partitions, replication factor and
//!   `max.message.bytes` (never auto-created: brokers differ in what they auto-create).
//!   "Already exists" and "unknown topic" make `ensure_topic` and `delete_topic`
//!   idempotent.
//! - A subscription is a consumer group, and Kafka needs no step to create one: messages
//!   are retained per topic (by time/size), and a group that has never committed starts
//!   at the oldest retained message (`auto.offset.reset=earliest`). So
//!   `ensure_subscription` is a no-op; what it promises ("kept from now on") holds as long
//!   as the topic's retention keeps the messages.
//! - `delete_subscription` deletes the consumer group (its committed offsets) with the
//!   DeleteGroups API. A group that does not exist counts as deleted; a broker that does
//!   not implement the API (e.g. some Tansu builds) leaves it in place, logged at debug:
//!   an idle group holds no messages, only offsets, so that is harmless. A group with
//!   active members cannot be deleted (an error, as in Kafka).

use rdkafka::admin::{AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{is_unknown_topic, map_error, ErrorContext, KafkaBroker};
use crate::{BrokerError, Result};

impl KafkaBroker {
    fn admin_options(&self) -> AdminOptions {
        let timeout = self.config.request_timeout();
        AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout))
    }

    /// Creates `topic` unless it exists.
    pub(super) async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let max_message_bytes = self.config.message_max_bytes.to_string();
        let new_topic = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        )
        .set("max.message.bytes", &max_message_bytes);
        let results = self
            .admin
            .create_topics([&new_topic], &self.admin_options())
            .await
            .map_err(|error| map_error(&error, ErrorContext::Admin(topic)))?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, partitions, "created kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic, "kafka topic already exists")
                }
                Err((_, code)) => {
                    return Err(map_error(
                        &KafkaError::AdminOp(code),
                        ErrorContext::Admin(topic),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The topic's `max.message.bytes` as the broker describes it (its own setting or the
    /// broker's default), or `None` if the broker does not describe it. A topic that does
    /// not exist is [`BrokerError::TopicNotFound`]; other errors are mapped as in
    /// `context`.
    pub(super) async fn topic_max_message_bytes(
        &self,
        topic: &str,
        context: ErrorContext<'_>,
    ) -> Result<Option<usize>> {
        let resource = ResourceSpecifier::Topic(topic);
        let described = self
            .admin
            .describe_configs([&resource], &self.admin_options())
            .await
            .map_err(|error| map_error(&error, context))?;
        let limit = match described.into_iter().next() {
            Some(Ok(config)) => config
                .get("max.message.bytes")
                .and_then(|entry| entry.value.as_deref()?.parse::<usize>().ok()),
            Some(Err(code)) if is_unknown_topic(code) => {
                return Err(BrokerError::TopicNotFound(topic.to_string()))
            }
            Some(Err(code)) => {
                tracing::debug!(topic, ?code, "describing the topic's config failed");
                None
            }
            None => None,
        };
        if limit.is_none() {
            tracing::debug!(topic, "the broker does not describe max.message.bytes");
        }
        Ok(limit)
    }

    /// Deletes `topic` if it exists.
    pub(super) async fn remove_topic(&self, topic: &str) -> Result<()> {
        let results = self
            .admin
            .delete_topics(&[topic], &self.admin_options())
            .await
            .map_err(|error| map_error(&error, ErrorContext::Admin(topic)))?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, "deleted kafka topic"),
                Err((_, code)) if is_unknown_topic(code) => {
                    tracing::debug!(topic, "kafka topic to delete does not exist")
                }
                Err((_, code)) => {
                    return Err(map_error(
                        &KafkaError::AdminOp(code),
                        ErrorContext::Admin(topic),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Deletes consumer group `group_id` if it exists and the broker supports it.
    pub(super) async fn remove_group(&self, topic: &str, group_id: &str) -> Result<()> {
        let results = match self
            .admin
            .delete_groups(&[group_id], &self.admin_options())
            .await
        {
            Ok(results) => results,
            Err(error) if unsupported(&error) => {
                tracing::debug!(topic, group = group_id, %error, "broker cannot delete consumer groups; left in place");
                return Ok(());
            }
            Err(error) => return Err(map_error(&error, ErrorContext::Admin(topic))),
        };
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, group = group_id, "deleted kafka consumer group"),
                Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {
                    tracing::debug!(
                        topic,
                        group = group_id,
                        "consumer group to delete does not exist"
                    )
                }
                Err((_, RDKafkaErrorCode::NonEmptyGroup)) => {
                    return Err(BrokerError::Admin(format!(
                        "consumer group {group_id} still has members; close its subscribers first"
                    )))
                }
                Err((_, code)) if unsupported(&KafkaError::AdminOp(code)) => {
                    tracing::debug!(topic, group = group_id, %code, "broker cannot delete consumer groups; left in place")
                }
                Err((_, code)) => {
                    return Err(map_error(
                        &KafkaError::AdminOp(code),
                        ErrorContext::Admin(topic),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Fails with `TopicNotFound` unless the cluster knows `topic` (a listing of its
    /// topics, see `topics.rs`); errors of the look-up are mapped as in `context`.
    pub(super) async fn require_topic(&self, topic: &str, context: ErrorContext<'_>) -> Result<()> {
        let exists = self
            .listing
            .contains(topic)
            .await
            .map_err(|error| map_error(&error, context))?;
        if exists {
            Ok(())
        } else {
            tracing::debug!(topic, "kafka topic does not exist");
            Err(BrokerError::TopicNotFound(topic.to_string()))
        }
    }
}

/// Whether the broker does not implement the requested admin API.
fn unsupported(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            RDKafkaErrorCode::UnsupportedVersion
                | RDKafkaErrorCode::UnsupportedFeature
                | RDKafkaErrorCode::NotImplemented
                | RDKafkaErrorCode::InvalidRequest
        )
    )
}
