//! One member of a consumer group: a streaming pull on the group's subscription.
//!
//! The official client does the hard parts: its lease loop keeps extending the ack
//! deadline of every message received and not yet settled (so slow processing does not
//! cause redelivery), batches acks and nacks, and reopens the stream after transport
//! errors. Flow control is the streaming pull's own (`max_outstanding_*`, enforced by
//! the service).
//!
//! The stream is driven by a task of its own that hands deliveries over a small channel,
//! so [`Subscriber::next`] is a plain channel receive: cancel-safe even while the task
//! is opening or re-opening the stream.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_pubsub::model::Message as PubSubMessage;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownToken};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::errors;
use super::KEY_ATTRIBUTE;
use crate::{AckHandle, BrokerError, Delivery, Message, Result, Subscriber};

/// Deliveries waiting in the channel between the pull task and `next()`. More are
/// buffered (and leased) inside the client library, up to the flow-control limits.
const HANDOFF_CAPACITY: usize = 16;

/// How long `close` waits for the final acks and nacks to reach the service.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A consumer-group member on Pub/Sub (see the module docs).
pub(crate) struct PubSubSubscriber {
    subscription: String,
    deliveries: mpsc::Receiver<Result<Delivery>>,
    /// Dropping (or sending on) this stops the pull task.
    stop: Option<oneshot::Sender<()>>,
    pump: Option<JoinHandle<()>>,
}

impl PubSubSubscriber {
    /// Starts pulling `stream` (a streaming pull on `subscription`) in the background.
    pub(crate) fn start(subscription: String, stream: MessageStream) -> Self {
        let shutdown = stream.shutdown_token();
        let (tx, deliveries) = mpsc::channel(HANDOFF_CAPACITY);
        let (stop, stopped) = oneshot::channel();
        let pump = tokio::spawn(pump(subscription.clone(), stream, shutdown, tx, stopped));
        PubSubSubscriber {
            subscription,
            deliveries,
            stop: Some(stop),
            pump: Some(pump),
        }
    }
}

/// Moves messages from the stream to the channel until stopped, the receiver is gone,
/// or the stream ends. On the way out it shuts the client's lease manager down first,
/// which nacks every message still leased (`ShutdownBehavior::NackImmediately`), those
/// waiting in the channel included, and only then drops (closes) the stream.
///
/// The client library sends those nacks as unary ModifyAckDeadline(0) calls and
/// `shutdown()` returns only when they have been answered, so every nack is confirmed
/// by the service before the stream is reset (seen on the wire: nack sent, OK back 12 ms
/// later, then RST_STREAM). Dropping the stream alone would start the same shutdown
/// concurrently with the close, and a nack could then still be in flight when the
/// caller goes on. (The emulator still redelivers such messages late: it never ends a
/// StreamingPull that its client reset and keeps handing messages to it; see the
/// conformance test's known failures.)
async fn pump(
    subscription: String,
    mut stream: MessageStream,
    shutdown: ShutdownToken,
    tx: mpsc::Sender<Result<Delivery>>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let item = tokio::select! {
            biased;
            _ = &mut stopped => break,
            item = stream.next() => item,
        };
        let item = match item {
            None => {
                tracing::debug!(subscription = %subscription, "streaming pull ended");
                break;
            }
            Some(Ok((message, handler))) => Ok(to_delivery(message, handler)),
            Some(Err(error)) => {
                tracing::warn!(subscription = %subscription, %error, "streaming pull failed");
                Err(errors::subscribe(&subscription, &error))
            }
        };
        tokio::select! {
            biased;
            // The undelivered item is dropped here, which nacks it.
            _ = &mut stopped => break,
            sent = tx.send(item) => if sent.is_err() { break },
        }
    }
    if tokio::time::timeout(CLOSE_TIMEOUT, shutdown.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(subscription = %subscription, "nacks of unsettled messages not sent within {CLOSE_TIMEOUT:?}; they come back after their ack deadline");
    }
    drop(stream);
    tracing::debug!(subscription = %subscription, "streaming pull closed");
}

/// Turns a received Pub/Sub message into a [`Delivery`] settled through `handler`.
fn to_delivery(message: PubSubMessage, handler: Handler) -> Delivery {
    let attempt = handler
        .delivery_attempt()
        .and_then(|attempt| u32::try_from(attempt).ok());
    let mut attributes: BTreeMap<String, String> = message.attributes.into_iter().collect();
    let carried_key = attributes.remove(KEY_ATTRIBUTE);
    let key = if message.ordering_key.is_empty() {
        carried_key
    } else {
        Some(message.ordering_key)
    };
    let message = Message {
        key,
        payload: message.data,
        attributes,
    };
    Delivery::new(message, attempt, Box::new(PubSubAck(handler)))
}

/// Settles one delivery through the client library's lease manager, which batches the
/// acks and nacks into requests in the background.
struct PubSubAck(Handler);

impl AckHandle for PubSubAck {
    fn ack(self: Box<Self>) -> Result<()> {
        self.0.ack();
        Ok(())
    }

    fn nack(self: Box<Self>) -> Result<()> {
        // A nack sets the message's ack deadline to zero: it is redelivered at once.
        self.0.nack();
        Ok(())
    }
}

#[async_trait]
impl Subscriber for PubSubSubscriber {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.deliveries.recv().await
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        drop(self.stop.take());
        let Some(pump) = self.pump.take() else {
            return Ok(());
        };
        // The pull task sends the final acks and nacks, then closes the stream.
        match tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_secs(5), pump).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(BrokerError::Subscribe(format!(
                "pull task of {} failed: {error}",
                self.subscription
            ))),
            Err(_) => Err(BrokerError::Timeout(format!(
                "closing the subscriber of {}",
                self.subscription
            ))),
        }
    }
}
