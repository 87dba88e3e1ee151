//! The gateway's side of the wire contract: it publishes `ClassifyRequest`s to the
//! servers' request topic and matches their replies on a reply topic of its own, so the
//! servers answer the gateway exactly as they answer `client-app` and scale out behind
//! it the same way.
//!
//! One [`Dispatcher`] serves every HTTP request. Each image waits for its reply under a
//! request id of 128 random bits; a reply counts only with the gateway's instance id as
//! its job id and an id still waiting, so a peer that can write to the reply topic cannot
//! answer for the servers. At most `max_pending` images wait at once (room is waited for,
//! within the caller's deadline). A caller that gives up (its HTTP connection closed, its
//! deadline passed) takes its entries out, so nothing is left waiting forever.
//!
//! When the reply subscription had to be re-created (the broker restarted and may have
//! lost what it held), every waiting request is published again under the same id, as
//! the CLI does: a second reply to one of them finds nobody waiting and is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use classifier_app::trace::TraceContext;
use classifier_app::{lock, ServerConfig};
use classifier_proto::{ClassifyRequest, ClassifyResponse, ProstMessage, SCHEMA_VERSION};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use unified_broker::{
    Broker, BrokerError, Delivery, Message, Resubscribing, SubscribeOptions, SubscriptionState,
};

/// How often the reply reader looks whether its subscription was re-created.
const RESUBSCRIPTION_CHECK: Duration = Duration::from_millis(500);

/// Requests published in one broker call, at most.
const PUBLISH_CHUNK: usize = 32;

/// What one image asks of the servers.
#[derive(Clone, Debug)]
pub struct ImageRequest {
    /// The encoded image, as the caller sent it.
    pub image: Vec<u8>,
    /// The model to answer (empty: the servers' default).
    pub model_name: String,
    /// Predictions wanted in the reply (0: the servers' default).
    pub top_k: u32,
    /// The W3C trace context the request carries to the servers (the caller's, through
    /// the gateway's span), if any.
    pub trace: Option<TraceContext>,
}

/// Why images got no reply.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No reply before the deadline.
    #[error("no reply from the servers within the deadline")]
    DeadlineExceeded,
    /// Too many images already wait for replies (there was no room before the
    /// deadline), or one request has more than can ever wait at once.
    #[error("the gateway is busy: {0} images wait for replies")]
    Busy(usize),
    /// An image does not fit in one broker message.
    #[error("image {index} is too large for the broker: the request would be {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Which image (from 0).
        index: usize,
        /// Size of its request message.
        size: usize,
        /// The broker's limit on the request topic.
        limit: usize,
    },
    /// The broker refused or failed the publish.
    #[error("publishing to the broker failed: {0}")]
    Broker(#[from] BrokerError),
    /// The gateway is stopping.
    #[error("the gateway is shutting down")]
    Closed,
}

/// A request waiting for its reply.
struct Waiter {
    reply: oneshot::Sender<ClassifyResponse>,
    /// The published message, kept to publish again after a resubscription.
    message: Message,
}

/// Publishes requests and hands each reply to the caller waiting for it.
pub struct Dispatcher {
    broker: Arc<dyn Broker>,
    request_topic: String,
    reply_topic: String,
    reply_group: String,
    /// The job id of every request this gateway sends: replies must carry it.
    instance_id: String,
    max_request_bytes: usize,
    max_pending: usize,
    room: Arc<Semaphore>,
    waiting: Mutex<HashMap<String, Waiter>>,
    replies_state: SubscriptionState,
    rejected_replies: AtomicU64,
}

impl Dispatcher {
    /// Makes sure the servers' request topic and group exist, subscribes to a new reply
    /// topic and starts reading it until `stop` is cancelled (then the reply topic is
    /// deleted).
    pub async fn start(
        broker: Arc<dyn Broker>,
        server: &ServerConfig,
        max_pending: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<(Arc<Dispatcher>, tokio::task::JoinHandle<()>)> {
        use anyhow::Context;
        broker
            .ensure_topic_and_subscription(&server.request_topic, &server.group)
            .await
            .context("creating the request topic and the servers' subscription")?;
        let instance_id = format!("gateway-{}", uuid::Uuid::new_v4().simple());
        let reply_topic = format!("{}{instance_id}", server.reply_topic_prefix);
        let reply_group = instance_id.clone();
        let replies = Resubscribing::subscribe(
            Arc::clone(&broker),
            &reply_topic,
            &reply_group,
            SubscribeOptions {
                sole_member: true,
                ..SubscribeOptions::default()
            },
        )
        .await
        .context("subscribing to the gateway's reply topic")?;
        let max_request_bytes = match broker.max_message_bytes(&server.request_topic).await {
            Ok(limit) => limit,
            Err(_) => broker.features().max_message_bytes,
        };
        let max_pending = max_pending.max(1);
        let dispatcher = Arc::new(Dispatcher {
            broker,
            request_topic: server.request_topic.clone(),
            reply_topic,
            reply_group,
            instance_id,
            max_request_bytes,
            max_pending,
            room: Arc::new(Semaphore::new(max_pending)),
            waiting: Mutex::new(HashMap::new()),
            replies_state: replies.state(),
            rejected_replies: AtomicU64::new(0),
        });
        let reader = tokio::spawn(Arc::clone(&dispatcher).read_replies(replies, stop));
        Ok((dispatcher, reader))
    }

    /// Whether replies can arrive now (the reply subscription is open).
    pub fn is_ready(&self) -> bool {
        self.replies_state.is_subscribed()
    }

    /// Images waiting for replies now.
    pub fn pending(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// Replies dropped because nobody waited for them (late, duplicate, forged).
    pub fn rejected_replies(&self) -> u64 {
        self.rejected_replies.load(Ordering::Relaxed)
    }

    /// The largest request message the broker takes.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Sends every image and waits until all are answered or `deadline` passes. The
    /// replies come in the order of `images`.
    pub async fn classify(
        &self,
        images: Vec<ImageRequest>,
        deadline: Instant,
    ) -> Result<Vec<ClassifyResponse>, DispatchError> {
        let count = images.len();
        if count == 0 {
            return Ok(Vec::new());
        }
        if count > self.max_pending {
            return Err(DispatchError::Busy(count));
        }
        let wanted = u32::try_from(count).unwrap_or(u32::MAX);
        let _room = match tokio::time::timeout_at(
            deadline,
            Arc::clone(&self.room).acquire_many_owned(wanted),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => return Err(DispatchError::Closed),
            Err(_elapsed) => return Err(DispatchError::Busy(self.pending())),
        };
        let mut messages = Vec::with_capacity(count);
        let mut registered = Registered {
            dispatcher: self,
            ids: Vec::with_capacity(count),
        };
        let mut receivers = Vec::with_capacity(count);
        for (index, image) in images.into_iter().enumerate() {
            let (id, message) = self.request_message(image, deadline);
            if message.size() > self.max_request_bytes {
                return Err(DispatchError::TooLarge {
                    index,
                    size: message.size(),
                    limit: self.max_request_bytes,
                });
            }
            let (reply, receiver) = oneshot::channel();
            lock(&self.waiting).insert(
                id.clone(),
                Waiter {
                    reply,
                    message: message.clone(),
                },
            );
            registered.ids.push(id);
            receivers.push(receiver);
            messages.push(message);
        }
        for chunk in chunks(messages, PUBLISH_CHUNK) {
            match tokio::time::timeout_at(
                deadline,
                self.broker.publish_batch(&self.request_topic, chunk),
            )
            .await
            {
                Ok(result) => result?,
                Err(_elapsed) => return Err(DispatchError::DeadlineExceeded),
            }
        }
        let mut replies = Vec::with_capacity(count);
        for receiver in receivers {
            match tokio::time::timeout_at(deadline, receiver).await {
                Ok(Ok(reply)) => replies.push(reply),
                Ok(Err(_dropped)) => return Err(DispatchError::Closed),
                Err(_elapsed) => return Err(DispatchError::DeadlineExceeded),
            }
        }
        Ok(replies)
    }

    /// The request id and the broker message for one image, whose caller waits until
    /// `deadline` (the servers skip the model for it after that).
    fn request_message(&self, mut image: ImageRequest, deadline: Instant) -> (String, Message) {
        let now = classifier_proto::unix_micros_now();
        let left = deadline.saturating_duration_since(Instant::now());
        let request = ClassifyRequest {
            schema_version: SCHEMA_VERSION,
            request_id: client_app::job::new_request_id(),
            job_id: self.instance_id.clone(),
            image: std::mem::take(&mut image.image),
            file_name: String::new(),
            content_type: String::new(),
            reply_topic: self.reply_topic.clone(),
            sent_at_unix_micros: now,
            attributes: HashMap::new(),
            top_k: image.top_k,
            model_name: std::mem::take(&mut image.model_name),
            deadline_unix_micros: classifier_proto::deadline_after(now, left),
        };
        let message = client_app::job::request_message(&request, image.trace.as_ref());
        (request.request_id, message)
    }

    /// Reads replies until `stop`, handing each to its waiter; publishes what waits
    /// again after the subscription was re-created. Deletes the reply topic at the end.
    async fn read_replies(self: Arc<Self>, mut replies: Resubscribing, stop: CancellationToken) {
        let mut resubscriptions_seen = 0;
        let mut check = tokio::time::interval(RESUBSCRIPTION_CHECK);
        loop {
            tokio::select! {
                delivery = replies.next() => match delivery {
                    Some(Ok(delivery)) => self.on_reply(delivery),
                    Some(Err(error)) => tracing::warn!(%error, "receiving replies failed; retrying"),
                    None => break,
                },
                _ = check.tick() => {
                    let now = replies.resubscriptions();
                    if now > resubscriptions_seen {
                        resubscriptions_seen = now;
                        // In a task of its own: replies keep being read meanwhile.
                        tokio::spawn(Arc::clone(&self).publish_waiting_again());
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        self.room.close();
        lock(&self.waiting).clear();
        use unified_broker::Subscriber;
        if let Err(error) = Box::new(replies).close().await {
            tracing::debug!(%error, "closing the reply subscription failed");
        }
        let (topic, group) = (&self.reply_topic, &self.reply_group);
        if let Err(error) = self.broker.delete_subscription(topic, group).await {
            tracing::debug!(%error, "deleting the reply subscription failed");
        }
        if let Err(error) = self.broker.delete_topic(topic).await {
            tracing::debug!(%error, "deleting the reply topic failed");
        }
    }

    /// One reply: to its waiter if it is ours and awaited, else counted and dropped.
    /// Acked either way (a reply nobody waits for never will be).
    fn on_reply(&self, delivery: Delivery) {
        let waiter = match ClassifyResponse::decode(delivery.message().payload.as_ref()) {
            Ok(reply) if reply.job_id == self.instance_id => {
                let waiter = lock(&self.waiting).remove(&reply.request_id);
                waiter.map(|waiter| (waiter, reply))
            }
            _ => None,
        };
        match waiter {
            // The caller may have gone meanwhile: nothing to do then.
            Some((waiter, reply)) => drop(waiter.reply.send(reply)),
            None => {
                self.rejected_replies.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(error) = delivery.ack() {
            tracing::debug!(%error, "acking a reply failed");
        }
    }

    /// Publishes every waiting request again (same ids).
    async fn publish_waiting_again(self: Arc<Self>) {
        let messages: Vec<Message> = lock(&self.waiting)
            .values()
            .map(|waiter| waiter.message.clone())
            .collect();
        if messages.is_empty() {
            return;
        }
        tracing::warn!(
            count = messages.len(),
            "the reply subscription was re-created; publishing the waiting requests again"
        );
        for chunk in chunks(messages, PUBLISH_CHUNK) {
            if let Err(error) = self.broker.publish_batch(&self.request_topic, chunk).await {
                tracing::warn!(%error, "publishing waiting requests again failed");
            }
        }
    }
}

/// The ids one `classify` call registered: taken out when the call ends, however it
/// ends (answered, timed out, or dropped because its HTTP caller went away).
struct Registered<'a> {
    dispatcher: &'a Dispatcher,
    ids: Vec<String>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut waiting = lock(&self.dispatcher.waiting);
        for id in &self.ids {
            waiting.remove(id);
        }
    }
}

/// `items` in chunks of at most `size`, in order.
fn chunks<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::with_capacity(items.len().div_ceil(size));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        out.push(items.by_ref().take(size).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_order_and_bound_size() {
        let parts = chunks((0..70).collect::<Vec<_>>(), 32);
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![32, 32, 6]
        );
        assert_eq!(parts.concat(), (0..70).collect::<Vec<_>>());
        assert!(chunks(Vec::<u8>::new(), 32).is_empty());
    }
}
