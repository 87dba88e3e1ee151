//! The conformance suite, and Pub/Sub-specific checks, against the Pub/Sub emulator.
//!
//! Needs `PUBSUB_EMULATOR_HOST` (start one with `scripts/pubsub-start.sh`). Without it
//! every test here prints SKIPPED and passes, unless `REQUIRE_BROKERS` is set (CI), in
//! which case they fail.
//!
//! The suite runs twice: without message ordering (the default configuration) and with
//! it, so `order_per_key` really runs.

use std::collections::HashSet;
use std::time::Duration;

use unified_broker::conformance::{
    self, numbered_messages, receive_all, BrokerFactory, Case, ConnectFactory,
};
use unified_broker::pubsub::{PubSubConfig, EMULATOR_HOST_ENV, KEY_ATTRIBUTE};
use unified_broker::{BrokerConfig, BrokerError, Message, SubscribeOptions};

/// When set (to anything), the cases the emulator is known to fail run anyway.
const RUN_KNOWN_FAILURES_ENV: &str = "PUBSUB_RUN_KNOWN_FAILURES";

/// Why the emulator is known to fail `case` with message ordering on, if it is (see
/// `BrokerFactory::known_failure`): the cases of [`emulator_known_failure`], and one more.
fn emulator_known_failure_ordered(case: &str) -> Option<&'static str> {
    if std::env::var_os(RUN_KNOWN_FAILURES_ENV).is_some() {
        return None;
    }
    // The same emulator defect as below, met by a dropped (crashed) subscriber: CI run of
    // 2026-12-02 (clean clone, full suite) lost 10 of 10 messages for the case's 60 s,
    // while the unordered variant passed in the same run and this one passed in every
    // earlier full run. The dropped subscriber's nacks are confirmed before its stream
    // is reset (see `pubsub/subscriber.rs`), but the emulator keeps pulling for the reset
    // stream; with ordering it redelivers a key's messages to the stream that holds the
    // key, so what that dead stream takes before the new subscriber connects never
    // reaches the live one. Loss across a crashing server is still tested end to end on
    // Pub/Sub with ordering off (tests/tests/pubsub.rs). Since 2026-12-03 the unordered
    // variant is a known failure too (see `emulator_known_failure`).
    if case == "unacked_redelivered_to_new_subscriber" {
        return Some(
            "with ordering on, the Pub/Sub emulator can hand a dropped subscriber's nacked \
             messages to its reset StreamingPull, which it never ends, and keeps the \
             ordering key there (lost 10 of 10 in one CI run of 2026-12-02)",
        );
    }
    emulator_known_failure(case)
}

/// Why the emulator is known to fail `case`, if it is (see
/// `BrokerFactory::known_failure`).
fn emulator_known_failure(case: &str) -> Option<&'static str> {
    // Set to run the known failures anyway (to reproduce or re-check them).
    if std::env::var_os(RUN_KNOWN_FAILURES_ENV).is_some() {
        return None;
    }
    // The emulator's defect, not ours (root-caused 2026-12-02 with a logging HTTP/2
    // proxy between client and emulator, and jstack on the emulator's JVM):
    //
    // - Our side is right: each closing subscriber's nack is a unary
    //   ModifyAckDeadline(0), answered OK before the client resets the stream, e.g.
    //   13:53:21.864 modack deadline=0 (ack id 1) sent; 21.876 OK; 21.877
    //   RST_STREAM(CANCEL) on the StreamingPull.
    // - The emulator (0.8.20) never ends a StreamingPull whose client reset it: its
    //   pusher thread keeps pulling the subscription every 50 ms, flow control
    //   ignored, and hands messages (fresh ack ids) to the dead stream. jstack at
    //   14:06:39 showed 13 such threads in FakePubsubServer$StreamingPullPusher.run,
    //   4 of them the streams of a failed run reset at 13:55:15-13:58:15; they only
    //   stop when the subscription is deleted. So every nacked or expired message
    //   races the live subscriber against every earlier round's dead stream, and a
    //   message a dead stream takes is back only after its ack deadline (measured:
    //   one held message, nacked and confirmed before the close, came back to the
    //   next subscriber with a third ack id 10.0 s later).
    // - With ordering on, the emulator redelivers expired messages of a key only
    //   when the oldest outstanding one expires (RESEND_ALL). The live subscriber
    //   holds that oldest one (and extends it), so what the dead streams took never
    //   comes back: the round waits for 5 more messages until the case's deadline.
    //
    // Runs with PUBSUB_RUN_KNOWN_FAILURES=1 on 2026-12-02: ordered 0 of 2 passed
    // ("no delivery before the timeout" in a round; the wire log shows the live
    // stream getting nothing for 2 minutes while extending its 5 held ack ids),
    // unordered 2 of 2 passed (it failed in some of the 6 runs of 2026-11-24).
    // Loss across a closing or crashing server is still tested end to end
    // (tests/tests/pubsub.rs: crash and graceful hand-over).
    //
    // Reproduced without any code of ours on 2026-12-07 by
    // scripts/pubsub-emulator-dead-streams.py: Google's Python client
    // (google-cloud-pubsub 2.44.0) opens a subscriber, gets one message, cancels the
    // subscriber; round after round on one subscription the next message took 10-20 s
    // (one or two 10 s ack deadlines: a dead stream took it first), against 0.04-0.07 s
    // on a fresh subscription each round in the same runs (5 rounds, then 3).
    match case {
        "continue_after_subscriber_close" => Some(
            "the Pub/Sub emulator keeps serving messages to StreamingPulls their client \
             reset (it never ends them), so messages nacked at a close go to dead streams \
             and, with ordering, never come back while an older one is held",
        ),
        // The same defect met by a dropped (crashed) subscriber, now also unordered:
        // clean-clone full runs of 2026-12-03 passed it twice, then lost 10 of 10 for
        // the case's whole deadline in the third (no Pub/Sub backend change that day).
        // The ordered variant was already skipped for it (above).
        "unacked_redelivered_to_new_subscriber" => Some(
            "the Pub/Sub emulator can hand a dropped subscriber's nacked messages to its \
             reset StreamingPull, which it never ends (lost 10 of 10 in 1 of 3 CI runs \
             of 2026-12-03)",
        ),
        _ => None,
    }
}

/// The emulator's config, or `None` (after saying so) when the tests must be skipped.
fn emulator_config(ordering: bool) -> Option<PubSubConfig> {
    let host = conformance::broker_address_or_skip(
        EMULATOR_HOST_ENV,
        "conformance_pubsub",
        "scripts/pubsub-start.sh",
    )?;
    Some(PubSubConfig {
        emulator_host: Some(host),
        enable_message_ordering: ordering,
        // Pub/Sub's minimum: an expired lease comes back as soon as the service allows.
        ack_deadline_seconds: 10,
        ..PubSubConfig::default()
    })
}

/// Clients of the emulator `config` names, each with its own connections.
fn emulator(config: PubSubConfig) -> ConnectFactory {
    let known_failures = if config.enable_message_ordering {
        emulator_known_failure_ordered
    } else {
        emulator_known_failure
    };
    ConnectFactory::new(BrokerConfig::Pubsub(config)).with_known_failures(known_failures)
}

fn factory(ordering: bool) -> Option<ConnectFactory> {
    emulator_config(ordering).map(emulator)
}

/// The whole suite with the default configuration (no ordering).
mod unordered {
    unified_broker::conformance_tests!(optional super::factory(false));
}

/// The whole suite with message ordering on.
mod ordered {
    unified_broker::conformance_tests!(optional super::factory(true));
}

/// A delivery held longer than the ack deadline is not redelivered: the client keeps
/// extending its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_message_lease_is_extended() {
    let Some(config) = emulator_config(false) else {
        return;
    };
    let emulator = emulator(PubSubConfig {
        ack_deadline_seconds: 10,
        ..config
    });
    let case = Case::new(&emulator, "lease", &["readers"]).await;
    case.publish_marked("slow").await;
    let mut subscriber = case.subscribe("readers").await;
    let held = conformance::next_within(&mut *subscriber, Duration::from_secs(60)).await;
    // A second member of the group must not get it either.
    let mut other = case.subscribe("readers").await;
    // 1.8 times the ack deadline: without lease extension it would be back by now.
    let wait = Duration::from_secs(18);
    let (mine, theirs) = tokio::join!(
        tokio::time::timeout(wait, subscriber.next()),
        tokio::time::timeout(wait, other.next()),
    );
    assert!(mine.is_err(), "redelivered to the holder: {mine:?}");
    assert!(theirs.is_err(), "redelivered to another member: {theirs:?}");
    held.ack().expect("ack");
    other.close().await.expect("close");
    case.close_and_delete(subscriber).await;
}

/// Keys survive the trip without ordering too, and the carrier attribute stays hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_survives_without_ordering() {
    let Some(factory) = factory(false) else {
        return;
    };
    let case = Case::new(&factory, "key", &["readers"]).await;
    let messages: Vec<Message> = numbered_messages("k", 10)
        .into_iter()
        .map(|m| m.with_key("the-key"))
        .collect();
    let expected: HashSet<String> = (0..10).map(|i| format!("k-{i}")).collect();
    case.publish(messages).await;
    let mut subscriber = case.subscribe("readers").await;
    let received = receive_all(&mut *subscriber, &expected, Duration::from_secs(60)).await;
    assert_eq!(received.ids(), expected);
    for message in &received.first_seen {
        assert_eq!(message.key.as_deref(), Some("the-key"));
        assert_eq!(message.attribute(KEY_ATTRIBUTE), None);
    }
    case.close_and_delete(subscriber).await;
}

/// Subscribing to or publishing on a topic that does not exist says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_is_reported() {
    let Some(factory) = factory(false) else {
        return;
    };
    let broker = factory.client().await;
    let topic = conformance::unique_name("missing");
    let subscribed = broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await;
    assert!(
        matches!(subscribed, Err(BrokerError::TopicNotFound(_))),
        "{:?}",
        subscribed.err()
    );
    let published = broker.publish(&topic, Message::new("x")).await;
    assert!(
        matches!(published, Err(BrokerError::TopicNotFound(_))),
        "{published:?}"
    );
}

/// Deleting a topic deletes its subscriptions: a re-created topic starts clean, and a
/// group re-created on it does not see messages published while it did not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_deletes_its_subscriptions() {
    let Some(factory) = factory(false) else {
        return;
    };
    let case = Case::new(&factory, "deltopic", &["readers"]).await;
    let (broker, topic) = (&case.broker, &case.topic);
    case.publish_marked("before").await;
    broker.delete_topic(topic).await.expect("delete_topic");
    // Re-create the topic, publish, and only then the group: had the old subscription
    // survived (detached, with its backlog), "before" would show up.
    broker.ensure_topic(topic).await.expect("ensure_topic");
    case.publish_marked("orphan").await;
    broker
        .ensure_subscription(topic, "readers")
        .await
        .expect("ensure_subscription");
    case.publish_marked("after").await;
    let mut subscriber = case.subscribe("readers").await;
    let expected: HashSet<String> = ["after".to_string()].into();
    let received = receive_all(&mut *subscriber, &expected, Duration::from_secs(60)).await;
    assert!(received.ids().contains("after"), "{:?}", received.ids());
    let extra = receive_all(
        &mut *subscriber,
        &["never".to_string()].into(),
        Duration::from_secs(2),
    )
    .await;
    let all: HashSet<String> = received.ids().union(&extra.ids()).cloned().collect();
    assert_eq!(all, expected, "only messages published after the group");
    case.close_and_delete(subscriber).await;
}

/// Names that are not Pub/Sub topic ids (too short or long, not starting with a letter,
/// starting with "goog", characters outside `-_.~+%`) are a final `InvalidTopic` before
/// any request, and the client works on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_pubsub_cannot_have_are_refused_before_any_request() {
    let Some(factory) = factory(false) else {
        return;
    };
    let broker = factory.client().await;
    let too_long = "t".repeat(256);
    for topic in [
        "ab",
        "1abc",
        "goog-reply",
        "with space",
        "slash/ed",
        "nul\0byte",
        "new\nline",
        too_long.as_str(),
    ] {
        conformance::assert_name_refused(&*broker, topic).await;
    }
    let case = Case::on(&factory, broker, "after-names", &["readers"]).await;
    case.publish_marked("after").await;
    let expected: HashSet<String> = ["after".to_string()].into();
    case.read_all("readers", &expected, "after refused names")
        .await;
    case.delete().await;
}
