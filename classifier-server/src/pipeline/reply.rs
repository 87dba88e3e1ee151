//! Replying: publishes replies (grouped by reply topic) and dead-letter copies, and
//! acks each request only after its reply was confirmed: at-least-once.
//!
//! A publish that fails transiently ([`BrokerError::is_retryable`]: the broker is away,
//! a timeout) is retried with backoff ([`REPLY_PUBLISH_BACKOFF`]) for as long as it
//! takes, and the request is not acked meanwhile; if the server stops first, the
//! unacked request goes back to the broker. Every other failure is final: a reply topic
//! that is gone is logged and its requests acked; one the broker can never publish to
//! (an invalid name, a Redis key that is not a stream) is counted, its requests are
//! dead-lettered as `UNROUTABLE` and acked, so a poisoned reply route can never hold
//! the in-flight window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use classifier_proto::ErrorCode;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use unified_broker::retry::retry;
use unified_broker::{Backoff, Broker, BrokerError, Message};

use super::dead_letter::{self, DeadLetters};
use super::intake::{Work, TRACE_TARGET};
use super::stats::ServerStats;
use crate::log_safe::{LogLimiter, Untrusted};
use crate::request::{error_response, response_message, Rejected, ReplyContext};
use crate::warn_limited;

/// Delays between attempts to publish a reply: 50 ms doubling to 5 s.
pub(super) const REPLY_PUBLISH_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(50), 2, Duration::from_secs(5));

/// Peers choose reply topics and request ids: the warnings they can cause at will are
/// limited to a few lines a second each (what is held back is counted in the next).
static REJECTED_LOG: LogLimiter = LogLimiter::new(10, Duration::from_secs(1));
static RETRY_LOG: LogLimiter = LogLimiter::new(5, Duration::from_secs(1));
static GONE_LOG: LogLimiter = LogLimiter::new(5, Duration::from_secs(1));
static REFUSED_LOG: LogLimiter = LogLimiter::new(5, Duration::from_secs(1));

/// A reply to publish, and the request to ack once it is out.
pub(super) struct Outgoing {
    /// The request answered.
    pub work: Work,
    /// Where the reply goes; empty when nobody can be answered.
    pub reply_topic: String,
    /// The reply.
    pub message: Message,
    /// Whether the reply is an error reply (for the metrics).
    pub is_error: bool,
    /// For requests that can never succeed: the copy for the dead-letter topic.
    pub dead_letter: Option<Message>,
}

/// Turns rejected requests into error replies (and dead-letter copies), counting and
/// logging them: the path of requests that skip the model.
pub(super) struct ErrorReplies {
    /// Identity stamped on the replies.
    pub context: ReplyContext,
    /// Whether copies are made.
    pub dead_letters: DeadLetters,
    /// Where `rejected` is counted.
    pub stats: Arc<ServerStats>,
}

impl ErrorReplies {
    /// The error reply to `work`, rejected for `rejected`'s reason.
    pub fn reply(&self, work: Work, rejected: Rejected) -> Outgoing {
        let code = ErrorCode::try_from(rejected.error.code).unwrap_or(ErrorCode::Internal);
        self.stats.reject(code.as_str_name());
        if let Some(suppressed) = REJECTED_LOG.allow() {
            tracing::info!(
                suppressed,
                request_id = %Untrusted(&rejected.route.request_id),
                code = ?code,
                reason = %Untrusted(&rejected.error.reason),
                "request rejected"
            );
        }
        let context = ReplyContext {
            queue_time_micros: work.received_at.elapsed().as_micros() as u64,
            ..self.context.clone()
        };
        let mut message = response_message(&error_response(&rejected, &context));
        work.stamp_trace(&mut message);
        Outgoing {
            reply_topic: rejected.route.reply_topic.clone(),
            message,
            is_error: true,
            dead_letter: code
                .is_dead_lettered()
                .then(|| {
                    self.dead_letters
                        .copy(work.delivery.message(), &rejected, &context.server_id)
                })
                .flatten(),
            work,
        }
    }
}

/// What the reply stage publishes with, shared by its tasks.
pub(super) struct Publisher {
    /// Where replies and copies go.
    pub broker: Arc<dyn Broker>,
    /// The dead-letter topic; empty: none.
    pub dead_letter_topic: String,
    /// How copies of requests whose replies the broker refused are made.
    pub dead_letters: DeadLetters,
    /// This replica's id, in those copies.
    pub server_id: String,
    /// What is counted.
    pub stats: Arc<ServerStats>,
}

/// The publisher stage: for each group of replies, one task per reply topic that
/// publishes and then acks. Ends when `outgoing` closes and every task is done.
pub(super) async fn run(publisher: Arc<Publisher>, mut outgoing: mpsc::Receiver<Vec<Outgoing>>) {
    let mut tasks = JoinSet::new();
    while let Some(replies) = outgoing.recv().await {
        let mut by_topic: BTreeMap<String, Vec<Outgoing>> = BTreeMap::new();
        for reply in replies {
            by_topic
                .entry(reply.reply_topic.clone())
                .or_default()
                .push(reply);
        }
        for (topic, replies) in by_topic {
            tasks.spawn(publish_then_ack(Arc::clone(&publisher), topic, replies));
        }
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// What became of a publish that was retried until it stopped failing transiently.
enum Published {
    Confirmed,
    /// The topic does not exist (a client's reply topic after it gave up).
    TopicGone,
    /// The broker refuses the batch for its size: final, as is.
    TooLarge,
    /// The broker can never publish there (see [`BrokerError::is_retryable`]): final.
    Refused(BrokerError),
    /// The broker client was closed (the server is stopping): the requests are left
    /// unacked and go back to the broker.
    Closed,
}

/// Publishes, retrying transient failures ([`BrokerError::is_retryable`]) with
/// [`REPLY_PUBLISH_BACKOFF`] for as long as it takes; the caller's requests stay unacked
/// meanwhile. Any other failure is final at once.
async fn publish_with_retry(
    broker: &dyn Broker,
    topic: &str,
    messages: Vec<Message>,
    stats: &ServerStats,
) -> Published {
    let published = retry(
        REPLY_PUBLISH_BACKOFF,
        || broker.publish_batch(topic, messages.clone()),
        |error, delay| {
            if !error.is_retryable() {
                return false;
            }
            ServerStats::add(&stats.publish_retries, 1);
            warn_limited!(RETRY_LOG, topic = %Untrusted(topic), %error, retry_in_ms = delay.as_millis() as u64, "publishing failed; retrying (requests stay unacked)");
            true
        },
    )
    .await;
    match published {
        Ok(()) => Published::Confirmed,
        Err(BrokerError::MessageTooLarge { .. }) => Published::TooLarge,
        Err(BrokerError::TopicNotFound(_)) => Published::TopicGone,
        Err(BrokerError::Closed) => Published::Closed,
        Err(final_error) => Published::Refused(final_error),
    }
}

/// Publishes dead-letter copies; a copy too large for the broker (a request near the
/// size limit, plus the reason) goes without its payload instead
/// ([`dead_letter::without_payload`]). Counts what was published in `stats`.
async fn publish_dead_letters(
    broker: &dyn Broker,
    topic: &str,
    copies: Vec<Message>,
    stats: &ServerStats,
) {
    match publish_with_retry(broker, topic, copies.clone(), stats).await {
        Published::Confirmed => {
            ServerStats::add(&stats.dead_lettered, copies.len() as u64);
            return;
        }
        Published::TooLarge => {}
        other => {
            tracing::error!(%topic, reason = other.describe(), "dead-letter copies dropped");
            return;
        }
    }
    for copy in copies {
        let published = match publish_with_retry(broker, topic, vec![copy.clone()], stats).await {
            Published::TooLarge => {
                tracing::warn!(%topic, bytes = copy.payload.len(), "dead-letter copy too large for the broker; sending it without the original payload");
                let smaller = dead_letter::without_payload(&copy);
                publish_with_retry(broker, topic, vec![smaller], stats).await
            }
            other => other,
        };
        match published {
            Published::Confirmed => ServerStats::add(&stats.dead_lettered, 1),
            other => {
                tracing::error!(%topic, reason = other.describe(), "a dead-letter copy could not be published; dropped")
            }
        }
    }
}

impl Published {
    /// Why a publish did not go through, for logs.
    fn describe(&self) -> String {
        match self {
            Published::Confirmed => "published".into(),
            Published::TopicGone => "the topic does not exist".into(),
            Published::TooLarge => "larger than the broker accepts".into(),
            Published::Refused(error) => error.to_string(),
            Published::Closed => "the broker client was closed".into(),
        }
    }
}

/// Publishes the replies to `topic` and the dead-letter copies among them, then acks
/// their requests (unless the broker client was closed: then they go back unacked).
async fn publish_then_ack(publisher: Arc<Publisher>, topic: String, mut replies: Vec<Outgoing>) {
    let stats = &*publisher.stats;
    // Each request's `reply` span: from here to its ack.
    let _reply_spans: Vec<tracing::Span> = replies
        .iter()
        .filter(|r| !r.work.span.is_none())
        .map(|r| tracing::trace_span!(target: TRACE_TARGET, parent: &r.work.span, "reply"))
        .collect();
    if topic.is_empty() {
        // Nobody to answer: no reply route, or one this server does not answer on
        // (the copies say which; they were made when the request was rejected).
        ServerStats::add(&stats.unanswerable, replies.len() as u64);
        warn_limited!(
            REFUSED_LOG,
            count = replies.len(),
            "requests without a reply route this server answers; dead-lettering and acking them"
        );
    } else {
        let messages: Vec<Message> = replies.iter().map(|r| r.message.clone()).collect();
        match publish_with_retry(&*publisher.broker, &topic, messages, stats).await {
            Published::Confirmed => {
                let errors = replies.iter().filter(|r| r.is_error).count();
                stats.published(replies.len(), errors);
            }
            Published::TopicGone => {
                ServerStats::add(&stats.unanswerable, replies.len() as u64);
                warn_limited!(GONE_LOG, topic = %Untrusted(&topic), count = replies.len(), "reply topic no longer exists; the client is gone");
            }
            Published::TooLarge => {
                // Replies are small; only absurd request fields (a huge file name) get
                // here. Retrying cannot help, so the requests are acked unanswered.
                ServerStats::add(&stats.unanswerable, replies.len() as u64);
                warn_limited!(REFUSED_LOG, topic = %Untrusted(&topic), count = replies.len(), "replies larger than the broker accepts; not answered");
            }
            Published::Refused(error) => {
                publisher.refused(&mut replies, &error);
                warn_limited!(REFUSED_LOG, topic = %Untrusted(&topic), count = replies.len(), %error, "the broker refuses this reply topic for good; dead-lettering and acking the requests");
            }
            Published::Closed => return,
        }
    }
    let dead: Vec<Message> = replies
        .iter()
        .filter_map(|r| r.dead_letter.clone())
        .collect();
    if !dead.is_empty() && !publisher.dead_letter_topic.is_empty() {
        publish_dead_letters(
            &*publisher.broker,
            &publisher.dead_letter_topic,
            dead,
            stats,
        )
        .await;
    }
    for reply in replies {
        stats.finished(reply.work.received_at.elapsed().as_secs_f64());
        if let Err(error) = reply.work.delivery.ack() {
            tracing::warn!(%error, "ack failed; the request may be redelivered and answered twice");
        }
    }
}

impl Publisher {
    /// Replies the broker refused for good: counted, and every request gets a
    /// dead-letter copy (`UNROUTABLE`, the broker's reason) unless it has one already.
    fn refused(&self, replies: &mut [Outgoing], error: &BrokerError) {
        ServerStats::add(&self.stats.unanswerable, replies.len() as u64);
        ServerStats::add(&self.stats.replies_refused, replies.len() as u64);
        let code = ErrorCode::Unroutable.as_str_name();
        let reason = format!("the broker refuses the reply topic for good: {error}");
        for reply in replies.iter_mut().filter(|r| r.dead_letter.is_none()) {
            reply.dead_letter = self.dead_letters.copy_for(
                reply.work.delivery.message(),
                code,
                &reason,
                &self.server_id,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
    use unified_broker::{Delivery, SubscribeOptions, Subscriber};

    use super::*;
    use crate::pipeline::test_support::{work, Settlement};

    fn outgoing(
        reply_topic: &str,
        reply: &str,
        dead_letter: Option<&str>,
    ) -> (Outgoing, Settlement) {
        let (work, settlement) = work(Message::new("request"));
        let outgoing = Outgoing {
            work,
            reply_topic: reply_topic.into(),
            message: Message::new(reply.to_string()),
            is_error: dead_letter.is_some(),
            dead_letter: dead_letter.map(|copy| Message::new(copy.to_string())),
        };
        (outgoing, settlement)
    }

    fn publisher(
        broker: &Arc<dyn Broker>,
        dead_letters: &str,
        stats: &Arc<ServerStats>,
    ) -> Arc<Publisher> {
        Arc::new(Publisher {
            broker: Arc::clone(broker),
            dead_letter_topic: dead_letters.into(),
            dead_letters: DeadLetters {
                enabled: !dead_letters.is_empty(),
                source_topic: "requests".into(),
            },
            server_id: "server-1".into(),
            stats: Arc::clone(stats),
        })
    }

    async fn next(subscriber: &mut Box<dyn Subscriber>) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), subscriber.next())
            .await
            .expect("a delivery in time")
            .expect("open")
            .expect("a delivery")
    }

    #[tokio::test]
    async fn a_request_is_acked_only_after_its_reply_was_confirmed() {
        // One message per group at most: a second publish waits until the first is acked.
        let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig {
            max_backlog_per_group: 1,
            ..EmbeddedConfig::default()
        }));
        broker
            .ensure_topic_and_subscription("replies", "client")
            .await
            .expect("create");
        broker
            .publish("replies", Message::new("earlier"))
            .await
            .expect("room for one");
        let (reply, settlement) = outgoing("replies", "the reply", None);
        let stats = Arc::new(ServerStats::default());
        let task = tokio::spawn(publish_then_ack(
            publisher(&broker, "", &stats),
            "replies".into(),
            vec![reply],
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            settlement.get(),
            None,
            "acked before the reply was confirmed"
        );

        let mut client = broker
            .subscribe("replies", "client", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let earlier = next(&mut client).await;
        assert_eq!(earlier.message().payload.as_ref(), b"earlier");
        earlier.ack().expect("ack");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the publish goes through once there is room")
            .expect("no panic");
        assert_eq!(settlement.get(), Some("ack"));
        assert_eq!(
            next(&mut client).await.message().payload.as_ref(),
            b"the reply"
        );
        assert_eq!(stats.snapshot().unanswerable, 0);
    }

    #[tokio::test]
    async fn a_copy_too_large_for_the_broker_goes_without_its_payload_and_the_request_is_acked() {
        let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig {
            max_message_bytes: 1_000,
            ..EmbeddedConfig::default()
        }));
        broker
            .ensure_topic_and_subscription("replies", "client")
            .await
            .expect("create");
        broker
            .ensure_topic_and_subscription("dead", "inspect")
            .await
            .expect("create");
        let big = "x".repeat(1_001);
        let (too_large, too_large_settled) = outgoing("replies", "error reply", Some(&big));
        let (small, small_settled) = outgoing("replies", "error reply", Some("small copy"));
        let stats = Arc::new(ServerStats::default());
        tokio::time::timeout(
            Duration::from_secs(5),
            publish_then_ack(
                publisher(&broker, "dead", &stats),
                "replies".into(),
                vec![too_large, small],
            ),
        )
        .await
        .expect("a final size error is not retried");
        assert_eq!(too_large_settled.get(), Some("ack"));
        assert_eq!(small_settled.get(), Some("ack"));
        assert_eq!(stats.snapshot().dead_lettered, 2);
        let mut inspector = broker
            .subscribe("dead", "inspect", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let mut copies = Vec::new();
        for _ in 0..2 {
            let delivery = next(&mut inspector).await;
            copies.push(delivery.message().clone());
            delivery.ack().expect("ack");
        }
        copies.sort_by_key(|copy| copy.payload.len());
        let omitted = classifier_proto::dead_letter_attributes::PAYLOAD_OMITTED;
        assert_eq!(
            copies[0].payload.len(),
            0,
            "the large copy lost its payload"
        );
        assert_eq!(copies[0].attribute(omitted), Some("1001"));
        assert_eq!(copies[1].payload.as_ref(), b"small copy");
        assert_eq!(copies[1].attribute(omitted), None);
    }

    #[tokio::test]
    async fn without_a_reply_topic_the_copy_is_dead_lettered_and_the_request_acked() {
        let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
        broker
            .ensure_topic_and_subscription("dead", "inspect")
            .await
            .expect("create");
        let (reply, settlement) = outgoing("", "unsendable", Some("the copy"));
        let stats = Arc::new(ServerStats::default());
        publish_then_ack(
            publisher(&broker, "dead", &stats),
            String::new(),
            vec![reply],
        )
        .await;
        assert_eq!(settlement.get(), Some("ack"));
        let stats = stats.snapshot();
        assert_eq!((stats.unanswerable, stats.dead_lettered), (1, 1));
        let mut inspector = broker
            .subscribe("dead", "inspect", SubscribeOptions::default())
            .await
            .expect("subscribe");
        assert_eq!(
            next(&mut inspector).await.message().payload.as_ref(),
            b"the copy"
        );
    }

    #[tokio::test]
    async fn a_gone_reply_topic_is_not_retried_and_the_request_is_acked() {
        let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
        let (reply, settlement) = outgoing("replies-of-a-gone-client", "late", None);
        let stats = Arc::new(ServerStats::default());
        let done = tokio::time::timeout(
            Duration::from_secs(5),
            publish_then_ack(
                publisher(&broker, "", &stats),
                "replies-of-a-gone-client".into(),
                vec![reply],
            ),
        )
        .await;
        assert!(done.is_ok(), "a missing topic is not waited for");
        assert_eq!(settlement.get(), Some("ack"));
        let stats = stats.snapshot();
        assert_eq!((stats.unanswerable, stats.publish_retries), (1, 0));
    }

    #[tokio::test]
    async fn the_publisher_answers_each_reply_topic_and_ends_with_its_input() {
        let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::new(EmbeddedConfig::default()));
        for topic in ["replies-a", "replies-b"] {
            broker
                .ensure_topic_and_subscription(topic, "client")
                .await
                .expect("create");
        }
        let (to_publisher, from_stages) = mpsc::channel(4);
        let publisher = tokio::spawn(run(publisher(&broker, "", &Arc::default()), from_stages));
        let (a1, a1_settled) = outgoing("replies-a", "a1", None);
        let (b1, b1_settled) = outgoing("replies-b", "b1", None);
        let (a2, a2_settled) = outgoing("replies-a", "a2", None);
        to_publisher.send(vec![a1, b1, a2]).await.expect("open");
        drop(to_publisher);
        tokio::time::timeout(Duration::from_secs(5), publisher)
            .await
            .expect("ends once its input closes and its tasks are done")
            .expect("no panic");
        for settled in [a1_settled, b1_settled, a2_settled] {
            assert_eq!(settled.get(), Some("ack"));
        }
        for (topic, expected) in [("replies-a", vec!["a1", "a2"]), ("replies-b", vec!["b1"])] {
            let mut client = broker
                .subscribe(topic, "client", SubscribeOptions::default())
                .await
                .expect("subscribe");
            for payload in expected {
                // Acked, or a dropped delivery would come back first.
                let delivery = next(&mut client).await;
                assert_eq!(delivery.message().payload.as_ref(), payload.as_bytes());
                delivery.ack().expect("ack");
            }
        }
    }
}
