//! Publishing: one batching publisher per topic, cached, over one shared gRPC client.
//!
//! The cache is bounded ([`MAX_PUBLISHERS`]) and forgets a topic whose publish found it
//! missing or refused its name: topics can be named by untrusted peers (reply routes),
//! and each cached publisher keeps a background task.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher};
use google_cloud_pubsub::model::Message as PubSubMessage;
use google_cloud_pubsub::retry_policy::RetryableErrors;

use super::config::{Connection, PubSubConfig};
use super::{errors, KEY_ATTRIBUTE};
use crate::{BrokerError, Message, Result};

/// How many topics' publishers one client keeps. Creating one is local and cheap (no
/// request), so a topic pushed out is only a little slower on its next publish; what the
/// bound prevents is a task and a map entry kept forever per name ever published to.
pub(crate) const MAX_PUBLISHERS: usize = 1024;

/// The publishers of one broker client.
#[derive(Debug)]
pub(crate) struct Publishers {
    base: BasePublisher,
    state: Mutex<State>,
    batch_max_messages: u32,
    batch_max_bytes: u32,
    batch_max_delay: Duration,
    ordering: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Topic path → its publisher.
    by_topic: HashMap<String, Publisher>,
    closed: bool,
}

impl Publishers {
    pub(crate) async fn new(config: &PubSubConfig, connection: &Connection) -> Result<Self> {
        let mut builder = BasePublisher::builder()
            .with_credentials(connection.credentials.clone())
            .with_retry_policy(
                RetryableErrors
                    .with_time_limit(Duration::from_secs(config.publish_timeout_seconds)),
            );
        if let Some(endpoint) = &connection.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let base = builder
            .build()
            .await
            .map_err(|e| errors::builder("publisher", &e))?;
        Ok(Publishers {
            base,
            state: Mutex::new(State::default()),
            batch_max_messages: config.batch_max_messages,
            batch_max_bytes: config.batch_max_bytes,
            batch_max_delay: config.batch_delay(),
            ordering: config.enable_message_ordering,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the map consistent: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topic's publisher (created on first use), or `Closed` after `close`.
    fn publisher(&self, topic_path: &str) -> Result<Publisher> {
        let mut state = self.state();
        if state.closed {
            return Err(BrokerError::Closed);
        }
        if !state.by_topic.contains_key(topic_path) {
            make_room(&mut state.by_topic);
        }
        let publisher = state
            .by_topic
            .entry(topic_path.to_string())
            .or_insert_with(|| {
                tracing::debug!(topic = %topic_path, "new publisher");
                self.base
                    .publisher(topic_path)
                    .set_message_count_threshold(self.batch_max_messages)
                    .set_byte_threshold(self.batch_max_bytes)
                    .set_delay_threshold(self.batch_max_delay)
                    .build()
            });
        Ok(publisher.clone())
    }

    /// Forgets a deleted topic's publisher (and its paused ordering keys).
    pub(crate) fn forget(&self, topic_path: &str) {
        self.state().by_topic.remove(topic_path);
    }

    /// Publishes all messages and waits for every result.
    pub(crate) async fn publish_batch(
        &self,
        topic: &str,
        topic_path: &str,
        messages: Vec<Message>,
    ) -> Result<()> {
        let publisher = self.publisher(topic_path)?;
        let count = messages.len();
        let pending: Vec<_> = messages
            .into_iter()
            .map(|message| {
                let ordering_key = if self.ordering {
                    message.key.clone()
                } else {
                    None
                };
                let future = publisher.publish(self.to_pubsub(message));
                (ordering_key, future)
            })
            .collect();
        let mut first_error = None;
        let mut failed = 0usize;
        for (ordering_key, future) in pending {
            if let Err(error) = future.await {
                failed += 1;
                if let Some(key) = ordering_key {
                    // A failed publish pauses its ordering key; callers retry the whole
                    // batch, so let the next attempt through.
                    publisher.resume_publish(key);
                }
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            None => {
                tracing::trace!(topic = %topic_path, count, "published");
                Ok(())
            }
            Some(error) => {
                tracing::warn!(topic = %topic_path, count, failed, %error, "publish failed");
                let error = errors::publish(topic, &error);
                if matches!(
                    error,
                    BrokerError::TopicNotFound(_) | BrokerError::InvalidTopic { .. }
                ) {
                    self.forget(topic_path);
                }
                Err(error)
            }
        }
    }

    fn to_pubsub(&self, message: Message) -> PubSubMessage {
        let Message {
            key,
            payload,
            mut attributes,
        } = message;
        let mut out = PubSubMessage::new().set_data(payload);
        if let Some(key) = key {
            if self.ordering {
                out = out.set_ordering_key(key);
            } else {
                // Without ordering the key must not become an ordering key (that would
                // serialise publishing per key); it still travels, as an attribute.
                attributes.insert(KEY_ATTRIBUTE.to_string(), key);
            }
        }
        out.set_attributes(attributes)
    }

    /// Refuses new publishes, then waits until every message handed to a publisher has
    /// been sent and confirmed (or failed).
    pub(crate) async fn close(&self) {
        let publishers: Vec<(String, Publisher)> = {
            let mut state = self.state();
            state.closed = true;
            state.by_topic.drain().collect()
        };
        for (topic, publisher) in &publishers {
            publisher.flush().await;
            tracing::debug!(topic = %topic, "publisher flushed");
        }
        // Dropping the last handle lets each publisher's background task finish.
    }
}

/// Drops one cached publisher if `by_topic` is full, to make room for another. Which one
/// does not matter much (re-creating it is cheap); a publish under way keeps its own
/// handle, so its messages are still sent and confirmed.
fn make_room(by_topic: &mut HashMap<String, Publisher>) {
    if by_topic.len() < MAX_PUBLISHERS {
        return;
    }
    if let Some(victim) = by_topic.keys().next().cloned() {
        tracing::debug!(topic = %victim, "publisher cache full; dropping one");
        by_topic.remove(&victim);
    }
}
