//! A subscription that outlives broker restarts: [`Resubscribing`].
//!
//! A backend's own subscriber reconnects after short network trouble, but some failures
//! need a fresh start: the broker restarted and forgot the topic, the group or the
//! subscription (Tansu and the Pub/Sub emulator keep everything in memory), or the
//! backend's stream ended for good. Long-running consumers (the model server, the
//! client's reply reader) wrap their subscription in [`Resubscribing`], which then, on
//! its own:
//!
//! - counts consecutive receive errors and, after [`FAILURES_BEFORE_RESUBSCRIBING`] of
//!   them (or at once for an error no retry can fix), closes the subscriber;
//! - treats a stream that ended as one to reopen, not as the end;
//! - reopens: creates the topic and the group's subscription again if they are gone
//!   (both idempotent), then subscribes, with backoff ([`BROKER_WAIT`]: 250 ms doubling
//!   to 10 s) while the broker is still away.
//!
//! Every error is still handed to the caller (for its logs); only [`Subscriber::close`]
//! ends the stream. What the broker itself lost in a restart is lost to this
//! subscription: at-least-once covers what the broker kept. [`Resubscribing::resubscriptions`]
//! tells the caller that it happened (the client then sends its unanswered requests
//! again).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::retry::{Backoff, BROKER_WAIT};
use crate::{Broker, BrokerError, Delivery, Result, SubscribeOptions, Subscriber};

/// Consecutive receive errors after which the subscriber is replaced.
pub const FAILURES_BEFORE_RESUBSCRIBING: u32 = 3;

/// How long closing a failed subscriber may take before it is left to finish alone.
const CLOSE_FAILED_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Subscriber`] that re-creates its topic, subscription and subscriber when they
/// fail for good (see the module docs).
pub struct Resubscribing {
    broker: Arc<dyn Broker>,
    topic: String,
    group: String,
    options: SubscribeOptions,
    /// `None` between a failure and the next successful subscribe.
    inner: Option<Box<dyn Subscriber>>,
    /// The reopening attempt under way, kept across calls so a cancelled `next` (callers
    /// `select!` it) resumes the attempt instead of starting over.
    reopening: Option<Opening>,
    consecutive_failures: u32,
    /// No reopening attempt before this instant (kept across cancelled `next` calls).
    next_attempt_at: Instant,
    backoff: Backoff,
    /// Whether a subscriber is open, and how often it was replaced; shared with whoever
    /// asked for [`Resubscribing::state`].
    state: SubscriptionState,
}

/// A cloneable, read-only view of a [`Resubscribing`]'s health, for readiness checks and
/// metrics that must be read while the subscription itself is busy in `next`.
#[derive(Clone, Debug, Default)]
pub struct SubscriptionState(Arc<StateCounters>);

#[derive(Debug, Default)]
struct StateCounters {
    subscribed: AtomicBool,
    resubscriptions: AtomicU64,
}

impl SubscriptionState {
    /// Whether a subscriber is open now (false while waiting for the broker to serve the
    /// subscription again).
    pub fn is_subscribed(&self) -> bool {
        self.0.subscribed.load(Ordering::Relaxed)
    }

    /// How many times the subscriber was replaced after a failure.
    pub fn resubscriptions(&self) -> u64 {
        self.0.resubscriptions.load(Ordering::Relaxed)
    }

    fn set_subscribed(&self, subscribed: bool) {
        self.0.subscribed.store(subscribed, Ordering::Relaxed);
    }
}

impl Resubscribing {
    /// Creates `topic` and `group`'s subscription if needed and subscribes. Fails like
    /// [`Broker::subscribe`] if the broker cannot be reached now: retrying the first
    /// connection is the caller's business, so it can say what it waits for.
    pub async fn subscribe(
        broker: Arc<dyn Broker>,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Self> {
        let inner = open(&*broker, topic, group, &options).await?;
        let state = SubscriptionState::default();
        state.set_subscribed(true);
        Ok(Resubscribing {
            broker,
            topic: topic.to_string(),
            group: group.to_string(),
            options,
            inner: Some(inner),
            reopening: None,
            consecutive_failures: 0,
            next_attempt_at: Instant::now(),
            backoff: BROKER_WAIT,
            state,
        })
    }

    /// How many times the subscriber was replaced after a failure.
    pub fn resubscriptions(&self) -> u64 {
        self.state.resubscriptions()
    }

    /// A view of this subscription's health that stays valid while it is in use.
    pub fn state(&self) -> SubscriptionState {
        self.state.clone()
    }

    /// Drops the current subscriber and schedules a reopening. The old subscriber is
    /// closed in the background (its unsettled deliveries go back to the broker as far
    /// as it can still take them), bounded, so nothing here waits or can be cancelled
    /// halfway.
    fn drop_inner(&mut self, why: &str) {
        if let Some(inner) = self.inner.take() {
            self.state.set_subscribed(false);
            tracing::warn!(topic = %self.topic, group = %self.group, "{why}; subscribing again");
            let topic = self.topic.clone();
            tokio::spawn(async move {
                if tokio::time::timeout(CLOSE_FAILED_TIMEOUT, inner.close())
                    .await
                    .is_err()
                {
                    tracing::debug!(%topic, "closing the failed subscriber timed out");
                }
            });
        }
        self.consecutive_failures = 0;
        self.next_attempt_at = Instant::now() + self.backoff.current();
    }

    /// Drives the reopening attempt (started after the backoff) to its end. Cancel-safe:
    /// the attempt lives in `self.reopening` and the next call resumes it.
    async fn reopen(&mut self) -> Result<()> {
        if self.reopening.is_none() {
            tokio::time::sleep_until(self.next_attempt_at).await;
        }
        let opening = self.reopening.get_or_insert_with(|| {
            let broker = Arc::clone(&self.broker);
            let (topic, group, options) =
                (self.topic.clone(), self.group.clone(), self.options.clone());
            Box::pin(async move { open(&*broker, &topic, &group, &options).await })
        });
        let result = opening.await;
        self.reopening = None;
        match result {
            Ok(inner) => {
                tracing::info!(topic = %self.topic, group = %self.group, "subscribed again");
                self.inner = Some(inner);
                self.state.set_subscribed(true);
                self.state.0.resubscriptions.fetch_add(1, Ordering::Relaxed);
                self.backoff.reset();
                Ok(())
            }
            Err(error) => {
                self.backoff.grow();
                self.next_attempt_at = Instant::now() + self.backoff.current();
                tracing::warn!(topic = %self.topic, group = %self.group, %error, retry_in_ms = self.backoff.current().as_millis() as u64, "waiting for the broker to serve the subscription again");
                Err(error)
            }
        }
    }
}

/// A subscription being opened again (see [`Resubscribing::reopen`]).
type Opening =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Box<dyn Subscriber>>> + Send>>;

/// Creates what the subscription needs (idempotent) and subscribes.
async fn open(
    broker: &dyn Broker,
    topic: &str,
    group: &str,
    options: &SubscribeOptions,
) -> Result<Box<dyn Subscriber>> {
    if options.sole_member {
        broker.ensure_private_topic(topic).await?;
        broker.ensure_subscription(topic, group).await?;
    } else {
        broker.ensure_topic_and_subscription(topic, group).await?;
    }
    broker.subscribe(topic, group, options.clone()).await
}

#[async_trait]
impl Subscriber for Resubscribing {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            let Some(inner) = self.inner.as_mut() else {
                match self.reopen().await {
                    Ok(()) => continue,
                    // The client itself was closed or is misconfigured: nothing to wait for.
                    Err(BrokerError::Closed | BrokerError::Config(_)) => return None,
                    Err(error) => return Some(Err(error)),
                }
            };
            match inner.next().await {
                Some(Ok(delivery)) => {
                    self.consecutive_failures = 0;
                    return Some(Ok(delivery));
                }
                Some(Err(error)) => {
                    self.consecutive_failures += 1;
                    let hopeless = !error.is_retryable()
                        || self.consecutive_failures >= FAILURES_BEFORE_RESUBSCRIBING;
                    if hopeless {
                        self.drop_inner(&format!("receiving keeps failing ({error})"));
                    }
                    return Some(Err(error));
                }
                None => self.drop_inner("the subscription ended"),
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.state.set_subscribed(false);
        match self.inner.take() {
            Some(inner) => inner.close().await,
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Resubscribing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resubscribing")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("subscribed", &self.inner.is_some())
            .field("reopening", &self.reopening.is_some())
            .field("resubscriptions", &self.state.resubscriptions())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::{EmbeddedBroker, EmbeddedConfig};
    use crate::Message;

    fn broker() -> Arc<dyn Broker> {
        Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()))
    }

    /// A member of the group "workers" on `topic`.
    async fn resubscribing(broker: &Arc<dyn Broker>, topic: &str) -> Resubscribing {
        Resubscribing::subscribe(
            Arc::clone(broker),
            topic,
            "workers",
            SubscribeOptions::default(),
        )
        .await
        .expect("subscribe")
    }

    /// Publishes `payload` every 20 ms until `subscriber` yields a delivery, and returns
    /// that delivery's payload.
    async fn receive_while_publishing(
        broker: &Arc<dyn Broker>,
        subscriber: &mut Resubscribing,
        payload: &'static str,
    ) -> Vec<u8> {
        let publishing = async {
            loop {
                // The topic may be missing until the subscriber re-creates it.
                let _ = broker.publish("jobs", Message::new(payload)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let received = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                delivery = subscriber.next() => delivery,
                () = publishing => unreachable!("publishing never ends"),
            }
        })
        .await
        .expect("a delivery within 10 s");
        let delivery = received
            .expect("the stream goes on")
            .expect("a delivery, not an error");
        let payload = delivery.message().payload.to_vec();
        delivery.ack().expect("ack");
        payload
    }

    #[tokio::test]
    async fn carries_on_after_the_topic_was_deleted() {
        let broker = broker();
        let mut subscriber = resubscribing(&broker, "jobs").await;
        let state = subscriber.state();
        assert_eq!(
            receive_while_publishing(&broker, &mut subscriber, "before").await,
            b"before"
        );
        assert_eq!(subscriber.resubscriptions(), 0);
        assert!(state.is_subscribed());

        // What a broker restart does to an in-memory broker: the topic and the group
        // are gone, and the plain subscriber's stream ends.
        broker.delete_topic("jobs").await.expect("delete");
        let after = receive_while_publishing(&broker, &mut subscriber, "after").await;
        assert_eq!(after, b"after");
        assert_eq!(subscriber.resubscriptions(), 1);
        assert_eq!(state.resubscriptions(), 1);
        assert!(state.is_subscribed());
        Box::new(subscriber).close().await.expect("close");
    }

    #[tokio::test]
    async fn subscribe_creates_the_topic_and_the_group() {
        let broker = broker();
        let mut subscriber = resubscribing(&broker, "fresh").await;
        broker
            .publish("fresh", Message::new("kept for the group"))
            .await
            .expect("the topic exists");
        let delivery =
            crate::conformance::next_within(&mut subscriber, Duration::from_secs(5)).await;
        assert_eq!(delivery.message().payload.as_ref(), b"kept for the group");
    }
}
