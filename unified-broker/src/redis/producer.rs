//! Publishing to Redis streams: one pipelined round trip of `XADD`s per batch.
//!
//! `NOMKSTREAM` makes a publish to a missing stream fail (`TopicNotFound`) instead of
//! creating a stream no group listens on; `MAXLEN ~` bounds the stream's length
//! (approximately, in whole internal nodes, which is cheap). The pipeline is not a
//! transaction: if the connection breaks halfway, some entries may be in the stream and
//! the caller publishes the whole batch again (consumers de-duplicate).

use super::{map_error, ErrorContext, RedisBroker, ATTRIBUTE_PREFIX, KEY_FIELD, PAYLOAD_FIELD};
use crate::{BrokerError, Message, Result};

impl RedisBroker {
    /// Appends `messages` to stream `topic`, in order.
    pub(super) async fn append(&self, topic: &str, messages: &[Message]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for message in messages {
            let command = pipeline
                .cmd("XADD")
                .arg(topic)
                .arg("NOMKSTREAM")
                .arg("MAXLEN")
                .arg("~")
                .arg(self.config.max_len)
                .arg("*")
                .arg(PAYLOAD_FIELD)
                .arg(&message.payload[..]);
            if let Some(key) = &message.key {
                command.arg(KEY_FIELD).arg(key);
            }
            for (name, value) in &message.attributes {
                command.arg(format!("{ATTRIBUTE_PREFIX}{name}")).arg(value);
            }
        }
        let ids: Vec<Option<String>> =
            pipeline
                .query_async(&mut self.manager())
                .await
                .map_err(|error| {
                    let error = map_error(&error, ErrorContext::Publish(topic));
                    tracing::debug!(topic, %error, "publish failed");
                    error
                })?;
        if ids.iter().any(Option::is_none) {
            // NOMKSTREAM answers nil for a stream that does not exist.
            return Err(BrokerError::TopicNotFound(topic.to_string()));
        }
        tracing::debug!(topic, count = messages.len(), "published batch");
        Ok(())
    }
}
