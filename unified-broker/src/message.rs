//! Messages as publishers send them and deliveries as subscribers receive them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::Result;

/// A message to publish, or the content of a received delivery.
///
/// The same shape maps onto every backend: Kafka key/value/headers, Pub/Sub ordering
/// key/data/attributes, and the embedded broker's own queue entries.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Messages with the same key keep their order where the backend guarantees it
    /// (Kafka partitions, Pub/Sub ordering keys).
    pub key: Option<String>,
    /// The opaque body (our protobuf bytes).
    pub payload: Bytes,
    /// String metadata travelling beside the payload.
    pub attributes: BTreeMap<String, String>,
}

impl Message {
    /// A message with this payload and nothing else.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            key: None,
            payload: payload.into(),
            attributes: BTreeMap::new(),
        }
    }

    /// Sets the ordering/partitioning key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds one attribute.
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    /// Reads one attribute.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }

    /// The bytes this message counts against a broker's message size limit
    /// ([`crate::Features::max_message_bytes`]): payload, key, and every attribute's name
    /// and value. (Each backend's limit already leaves room for its own framing.)
    pub fn size(&self) -> usize {
        let attributes: usize = self.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.payload.len() + self.key.as_ref().map_or(0, String::len) + attributes
    }
}

impl fmt::Debug for Message {
    // Payloads can be megabytes of image bytes: show their size, not their content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("key", &self.key)
            .field("payload_len", &self.payload.len())
            .field("attributes", &self.attributes)
            .finish()
    }
}

/// How a backend settles one delivery. Implemented once per backend.
///
/// Both methods are synchronous and must not block for long: they record the decision
/// (Kafka: mark the offset; Pub/Sub: hand the ack id to the lease manager; embedded:
/// release or requeue) and the backend talks to the broker in the background.
pub trait AckHandle: Send + 'static {
    /// The message was processed: never deliver it to this group again.
    fn ack(self: Box<Self>) -> Result<()>;
    /// The message was not processed: deliver it again (to any member of the group).
    fn nack(self: Box<Self>) -> Result<()>;
}

/// One received message that must be settled with [`Delivery::ack`] or
/// [`Delivery::nack`].
///
/// Dropping a delivery without settling it counts as a nack: the message comes back.
/// That is what makes a crash or a bug lose nothing (at-least-once).
pub struct Delivery {
    message: Arc<Message>,
    attempt: Option<u32>,
    handle: Option<Box<dyn AckHandle>>,
}

impl Delivery {
    /// Built by backends. A backend that keeps the message for redelivery (the
    /// embedded broker) shares it with the delivery as an `Arc` instead of copying it.
    pub fn new(
        message: impl Into<Arc<Message>>,
        attempt: Option<u32>,
        handle: Box<dyn AckHandle>,
    ) -> Self {
        Delivery {
            message: message.into(),
            attempt,
            handle: Some(handle),
        }
    }

    /// The message content.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// 1 for a first delivery, more for redeliveries, where the backend knows.
    pub fn attempt(&self) -> Option<u32> {
        self.attempt
    }

    /// Marks the message processed.
    pub fn ack(mut self) -> Result<()> {
        match self.handle.take() {
            Some(handle) => handle.ack(),
            None => Ok(()),
        }
    }

    /// Asks for the message to be delivered again.
    pub fn nack(mut self) -> Result<()> {
        match self.handle.take() {
            Some(handle) => handle.nack(),
            None => Ok(()),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(error) = handle.nack() {
                tracing::debug!(%error, "nack of a dropped delivery failed; the broker will redeliver after its deadline");
            }
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field("settled", &self.handle.is_none())
            .finish()
    }
}
