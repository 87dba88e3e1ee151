//! Reading the dead-letter topic back: what the servers gave up on, and why.
//!
//! A server copies every request that can never succeed (malformed, not an image, too
//! large, …) byte for byte to the dead-letter topic, with the error code and reason as
//! attributes, before it acks it. This module lets an operator list those copies and,
//! after fixing the cause (a server limit, a missing decoder), publish chosen ones back
//! to the topic they came from.
//!
//! Letters are read from the dead-letter inspection group and held unacked while the
//! operator decides: a letter that is re-published is acked only after the broker
//! confirmed the new copy (at-least-once, like everything else here); every other letter
//! is nacked on [`DeadLetterInbox::close`] and stays on the topic for the next look.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use classifier_proto::{attributes, dead_letter_attributes, ClassifyRequest, ProstMessage};
use unified_broker::{Broker, Delivery, Message, SubscribeOptions, Subscriber};

/// Where the dead letters are and how long to wait for them.
#[derive(Clone, Debug)]
pub struct InboxOptions {
    /// The dead-letter topic (config `server.dead_letter_topic`).
    pub topic: String,
    /// The group that keeps the copies for inspection (`server.dead_letter_subscription`).
    pub group: String,
    /// Stop reading after this long without a new letter.
    pub idle: Duration,
    /// Read at most this many letters.
    pub max_letters: usize,
}

/// One dead letter, as the server left it.
#[derive(Debug)]
pub struct DeadLetter {
    /// The request id (from the attributes, or the payload when it decodes).
    pub request_id: String,
    /// The file name inside the request, when the payload is a `ClassifyRequest`.
    pub file_name: Option<String>,
    /// Error code name, e.g. `IMAGE_TOO_LARGE`.
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
    /// Topic the request was read from (where a re-publish sends it).
    pub source_topic: String,
    /// The server that gave up on it.
    pub server_id: String,
    /// Size of the original message payload.
    pub payload_bytes: usize,
    delivery: Delivery,
}

impl DeadLetter {
    fn from_delivery(delivery: Delivery) -> DeadLetter {
        let message = delivery.message();
        let attribute = |name: &str| message.attribute(name).unwrap_or_default().to_string();
        let decoded = ClassifyRequest::decode(message.payload.as_ref()).ok();
        let mut request_id = attribute(attributes::REQUEST_ID);
        if request_id.is_empty() {
            request_id = decoded
                .as_ref()
                .map(|request| request.request_id.clone())
                .unwrap_or_default();
        }
        DeadLetter {
            request_id,
            file_name: decoded
                .map(|request| request.file_name)
                .filter(|name| !name.is_empty()),
            code: attribute(dead_letter_attributes::CODE),
            reason: attribute(dead_letter_attributes::REASON),
            source_topic: attribute(dead_letter_attributes::SOURCE_TOPIC),
            server_id: attribute(dead_letter_attributes::SERVER_ID),
            payload_bytes: message.payload.len(),
            delivery,
        }
    }

    /// Whether the server left the original payload out of this copy (it was too large
    /// for the broker together with the reason), so it cannot be re-published.
    pub fn payload_omitted(&self) -> bool {
        self.delivery
            .message()
            .attribute(dead_letter_attributes::PAYLOAD_OMITTED)
            .is_some()
    }

    /// The request as it was first published: the original payload and attributes,
    /// without the dead-letter ones.
    fn original(&self) -> Message {
        let message = self.delivery.message();
        let attributes: BTreeMap<String, String> = message
            .attributes
            .iter()
            .filter(|(name, _)| !name.starts_with(dead_letter_attributes::PREFIX))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Message {
            key: message.key.clone(),
            payload: message.payload.clone(),
            attributes,
        }
    }
}

/// The letters read so far, held unacked on an open subscription.
pub struct DeadLetterInbox {
    broker: Arc<dyn Broker>,
    subscriber: Box<dyn Subscriber>,
    letters: Vec<DeadLetter>,
}

impl DeadLetterInbox {
    /// Reads what is on the dead-letter topic: until `options.idle` passes without a
    /// new letter, or `options.max_letters` were read.
    pub async fn open(broker: Arc<dyn Broker>, options: &InboxOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !options.topic.is_empty() && !options.group.is_empty(),
            "dead-lettering is off: server.dead_letter_topic and \
             server.dead_letter_subscription must both be set"
        );
        broker
            .ensure_topic_and_subscription(&options.topic, &options.group)
            .await
            .context("creating the dead-letter topic and its inspection group")?;
        let mut subscriber = broker
            .subscribe(
                &options.topic,
                &options.group,
                SubscribeOptions {
                    max_outstanding_messages: options.max_letters.max(1),
                    ..SubscribeOptions::default()
                },
            )
            .await
            .context("subscribing to the dead-letter topic")?;
        let mut letters = Vec::new();
        while letters.len() < options.max_letters {
            match tokio::time::timeout(options.idle, subscriber.next()).await {
                Err(_elapsed) => break,
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "reading the dead-letter topic");
                }
                Ok(Some(Ok(delivery))) => letters.push(DeadLetter::from_delivery(delivery)),
            }
        }
        Ok(DeadLetterInbox {
            broker,
            subscriber,
            letters,
        })
    }

    /// The letters read, oldest first.
    pub fn letters(&self) -> &[DeadLetter] {
        &self.letters
    }

    /// Publishes the letters `chosen` selects back to their source topics (or to
    /// `to_topic` when given) and acks each one once its copy is confirmed. Returns how
    /// many were re-published; letters that could not be are kept (and reported in the
    /// error).
    pub async fn republish(
        &mut self,
        chosen: impl Fn(&DeadLetter) -> bool,
        to_topic: Option<&str>,
    ) -> anyhow::Result<usize> {
        let (selected, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.letters)
            .into_iter()
            .partition(|l| chosen(l));
        self.letters = kept;
        let mut republished = 0;
        let mut failures = Vec::new();
        for letter in selected {
            let topic = to_topic.unwrap_or(&letter.source_topic).to_string();
            if topic.is_empty() {
                failures.push(format!("{}: no source topic recorded", letter.request_id));
                self.letters.push(letter);
                continue;
            }
            if letter.payload_omitted() {
                failures.push(format!(
                    "{}: the server kept only the reason, not the image (too large for the broker)",
                    letter.request_id
                ));
                self.letters.push(letter);
                continue;
            }
            match self.broker.publish(&topic, letter.original()).await {
                Ok(()) => {
                    if let Err(error) = letter.delivery.ack() {
                        // The copy is out; the letter stays and may be listed again.
                        tracing::warn!(%error, "acking a re-published dead letter");
                    }
                    republished += 1;
                }
                Err(error) => {
                    failures.push(format!("{}: {error}", letter.request_id));
                    self.letters.push(letter);
                }
            }
        }
        anyhow::ensure!(
            failures.is_empty(),
            "{republished} re-published; {} failed: {}",
            failures.len(),
            failures.join("; ")
        );
        Ok(republished)
    }

    /// Leaves the letters not re-published on the topic (nacks them) and closes the
    /// subscription.
    pub async fn close(self) -> anyhow::Result<()> {
        for letter in self.letters {
            if let Err(error) = letter.delivery.nack() {
                tracing::warn!(%error, "returning a dead letter to the topic");
            }
        }
        self.subscriber
            .close()
            .await
            .context("closing the dead-letter subscription")
    }
}

/// One line per letter, for people.
pub fn letter_line(letter: &DeadLetter) -> String {
    format!(
        "{}  {}  from {}  {}  ({} bytes, server {}): {}",
        if letter.request_id.is_empty() {
            "-"
        } else {
            &letter.request_id
        },
        letter.code,
        letter.source_topic,
        letter.file_name.as_deref().unwrap_or("-"),
        letter.payload_bytes,
        letter.server_id,
        letter.reason
    )
}

/// One JSON object per letter, for scripts.
pub fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "request_id": letter.request_id,
        "code": letter.code,
        "reason": letter.reason,
        "source_topic": letter.source_topic,
        "file_name": letter.file_name,
        "server_id": letter.server_id,
        "payload_bytes": letter.payload_bytes,
    })
}
