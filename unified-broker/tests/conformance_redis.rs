//! The conformance suite, and Redis-specific checks, against a real `redis-server`.
//!
//! Needs `REDIS_URL` (e.g. from `scripts/redis-start.sh`). Without it every case is
//! skipped loudly, or fails if `REQUIRE_BROKERS` is set (CI).

use std::collections::HashSet;
use std::time::Duration;

use unified_broker::conformance::{
    self, id_of, next_within, numbered_messages, receive_all, unique_name, BrokerFactory, Case,
    ConnectFactory,
};
use unified_broker::redis::{RedisBroker, RedisConfig, MAX_STREAM_KEY_BYTES, URL_ENV};
use unified_broker::{BrokerConfig, BrokerError, Message, SubscribeOptions};

/// The server's config, or `None` (after saying so) when no server is configured.
fn config() -> Option<RedisConfig> {
    let url = conformance::broker_address_or_skip(
        URL_ENV,
        "conformance_redis",
        "scripts/redis-start.sh",
    )?;
    Some(RedisConfig {
        url,
        ..RedisConfig::default()
    })
}

/// Clients of the server at `REDIS_URL`, each with its own connections, with `adjust`
/// applied to the config first (a case's own settings); `None` without a server.
fn factory_where(adjust: impl FnOnce(&mut RedisConfig)) -> Option<ConnectFactory> {
    let mut config = config()?;
    adjust(&mut config);
    // Well below the default claim_idle_ms (30 s): what a closed or dropped subscriber
    // held must come back because it was given back, not because it idled long enough
    // to be claimed.
    Some(
        ConnectFactory::new(BrokerConfig::Redis(config))
            .with_receive_timeout(Duration::from_secs(20)),
    )
}

fn factory() -> Option<ConnectFactory> {
    factory_where(|_| {})
}

/// [`factory`] with the given claim timing, for the cases about who gets held entries.
fn factory_claiming(claim_idle_ms: u64, claim_interval_ms: u64) -> Option<ConnectFactory> {
    factory_where(|config| {
        config.claim_idle_ms = claim_idle_ms;
        config.claim_interval_ms = claim_interval_ms;
    })
}

// The whole suite, and the large-message case; each returns early (skipped, said on
// stderr) without a server.
unified_broker::conformance_tests!(optional factory(); large_messages_round_trip);

/// A raw connection to the server at `REDIS_URL`, for what the backend never does (act
/// as a member that dies, look at a stream's length).
async fn raw() -> redis::aio::MultiplexedConnection {
    let config = config().expect("REDIS_URL is set");
    let url = if config.url.contains("://") {
        config.url.clone()
    } else {
        format!("redis://{}", config.url)
    };
    redis::Client::open(url)
        .expect("valid REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

/// Subscribing to or publishing on a stream that does not exist is `TopicNotFound`, not
/// a silently created stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_is_reported() {
    let Some(factory) = factory() else { return };
    let broker = factory.client().await;
    let topic = unique_name("missing");
    conformance::assert_subscribe_finds_no_topic(&*broker, &topic).await;
    let published = broker.publish(&topic, Message::new("x")).await;
    assert!(
        matches!(published, Err(BrokerError::TopicNotFound(_))),
        "{published:?}"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&topic)
        .query_async(&mut raw().await)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "the publish created no stream");
}

/// A client with nothing listening fails `connect` with `Unavailable`, promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_unavailable() {
    if config().is_none() {
        return;
    }
    let started = std::time::Instant::now();
    conformance::assert_unavailable(
        RedisBroker::connect(&RedisConfig {
            url: conformance::UNREACHABLE_ADDRESS.into(),
            request_timeout_ms: 2_000,
            ..RedisConfig::default()
        })
        .await,
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Entries a member took and never acked (it died: here a raw consumer that reads and
/// vanishes) are taken over by a live member once idle for `claim_idle_ms`, with their
/// delivery count as the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_member_are_claimed() {
    let Some(factory) = factory_claiming(1_000, 200) else {
        return;
    };
    let case = Case::new(&factory, "dead", &["workers"]).await;
    let expected = case.publish_numbered("d", 10).await;
    let taken: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("dies-holding-everything")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&case.topic)
        .arg(">")
        .query_async(&mut raw().await)
        .await
        .expect("the doomed member reads");
    assert!(!matches!(taken, redis::Value::Nil), "it took the entries");
    let mut subscriber = case.subscribe("workers").await;
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < expected.len() {
        let delivery = next_within(
            &mut *subscriber,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await;
        assert_eq!(
            delivery.attempt(),
            Some(2),
            "second delivery of {}",
            id_of(&delivery)
        );
        seen.insert(id_of(&delivery));
        delivery.ack().expect("ack");
    }
    assert_eq!(seen, expected);
    case.close_and_delete(subscriber).await;
}

/// A delivery held longer than `claim_idle_ms` is not taken over by another member (the
/// holder keeps re-claiming it); a nack serves it again with its attempt counted up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_delivery_is_not_stolen_and_nack_counts_attempts() {
    let Some(factory) = factory_claiming(600, 100) else {
        return;
    };
    let case = Case::new(&factory, "lease", &["workers"]).await;
    let mut holder = case.subscribe("workers").await;
    case.publish_marked("slow").await;
    let held = next_within(&mut *holder, Duration::from_secs(10)).await;
    assert_eq!(held.attempt(), Some(1));
    let mut other = case.subscribe("workers").await;
    // Four claim idle times: without the holder's re-claims it would have moved.
    let stolen = tokio::time::timeout(Duration::from_millis(2_400), other.next()).await;
    assert!(stolen.is_err(), "taken over from a live holder: {stolen:?}");
    held.nack().expect("nack");
    let again = next_within(&mut *holder, Duration::from_secs(5)).await;
    assert_eq!(id_of(&again), "slow");
    assert_eq!(again.attempt(), Some(2));
    again.ack().expect("ack");
    other.close().await.expect("close");
    case.close_and_delete(holder).await;
}

/// What a closing member still held goes to another member at once, long before
/// `claim_idle_ms` (here a minute), and acked entries stay acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_gives_held_entries_back_at_once() {
    let Some(factory) = factory_claiming(60_000, 200) else {
        return;
    };
    let case = Case::new(&factory, "handover", &["workers"]).await;
    let mut leaving = case.subscribe("workers").await;
    let expected = case.publish_numbered("h", 20).await;
    let mut acked = HashSet::new();
    let mut held = Vec::new();
    let mut seen_by_leaving = 0;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_secs(2), leaving.next()).await
    {
        seen_by_leaving += 1;
        if seen_by_leaving % 2 == 0 {
            acked.insert(id_of(&delivery));
            delivery.ack().expect("ack");
        } else {
            held.push(delivery);
        }
    }
    assert_eq!(seen_by_leaving, 20, "the only member got every entry");
    // A second member joins once the first has taken everything: all it can get is
    // what the first gives back.
    let mut staying = case.subscribe("workers").await;
    leaving.close().await.expect("close");
    drop(held);
    let rest: HashSet<String> = expected.difference(&acked).cloned().collect();
    let from_staying = receive_all(&mut *staying, &rest, Duration::from_secs(10))
        .await
        .ids();
    conformance::assert_none_lost(&rest, &from_staying, "handed over on close");
    let twice: Vec<_> = from_staying.intersection(&acked).collect();
    assert!(twice.is_empty(), "acked entries came back: {twice:?}");
    case.close_and_delete(staying).await;
}

/// Closing a subscriber whose read is blocked waiting for entries does not wait for
/// that read to time out (up to a claim interval, here a minute): the server ends it
/// (`CLIENT UNBLOCK`) and the read returns nothing, so no entry is stranded in the
/// leaving member's pending list: what is published next goes to the group's next
/// member. Before, every `client-app` job on Redis ended with a wait of up to a second
/// for its reply reader (the default claim interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_a_blocked_read_at_once() {
    let Some(factory) = factory_claiming(60_000, 60_000) else {
        return;
    };
    let case = Case::new(&factory, "unblock", &["workers"]).await;
    let mut leaving = case.subscribe("workers").await;
    let first = case.publish_numbered("before", 1).await;
    let got = receive_all(&mut *leaving, &first, Duration::from_secs(10)).await;
    conformance::assert_none_lost(&first, &got.ids(), "published before the close");
    // Nothing more to read: the pump is now blocked in XREADGROUP for up to a minute.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    leaving.close().await.expect("close");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "close waited {took:?} for a read blocked for up to a minute"
    );
    let mut staying = case.subscribe("workers").await;
    let after = case.publish_numbered("after", 5).await;
    let ids = receive_all(&mut *staying, &after, Duration::from_secs(10))
        .await
        .ids();
    conformance::assert_none_lost(&after, &ids, "published after the close");
    case.close_and_delete(staying).await;
}

/// `max_len` bounds the stream (approximately), and a group still receives what it
/// keeps up with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_length_is_bounded() {
    let Some(factory) = factory_where(|config| config.max_len = 1_000) else {
        return;
    };
    let case = Case::new(&factory, "bounded", &["readers"]).await;
    case.publish_in_batches(&numbered_messages("b", 5_000), 500)
        .await;
    let length: usize = redis::cmd("XLEN")
        .arg(&case.topic)
        .query_async(&mut raw().await)
        .await
        .expect("XLEN");
    assert!(
        (1_000..2_000).contains(&length),
        "5,000 entries trimmed to about 1,000, got {length}"
    );
    // The newest entries are the ones kept.
    let mut subscriber = case.subscribe("late").await;
    case.publish_marked("after").await;
    let expected: HashSet<String> = ["after".to_string()].into();
    let received = receive_all(&mut *subscriber, &expected, Duration::from_secs(10)).await;
    assert_eq!(received.ids(), expected);
    case.close_and_delete(subscriber).await;
}

/// Deleting the stream ends its subscribers' streams (`None`), which is what makes
/// `Resubscribing` start again after a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_stream_ends_the_subscription() {
    let Some(factory) = factory_where(|config| config.claim_interval_ms = 200) else {
        return;
    };
    let case = Case::new(&factory, "gone", &["readers"]).await;
    let mut subscriber = case.subscribe("readers").await;
    case.broker
        .delete_topic(&case.topic)
        .await
        .expect("delete_topic");
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match subscriber.next().await {
                None => return,
                Some(Err(error)) => eprintln!("receive error before the end: {error}"),
                Some(Ok(delivery)) => panic!("unexpected delivery {delivery:?}"),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the subscription did not end");
    subscriber.close().await.expect("close");
}

/// A topic whose key holds a string (or any other non-stream value) can never take a
/// publish: `XADD` answers `WRONGTYPE`, which used to be retried forever. It is a final
/// `InvalidTopic` for publishing, creating and subscribing, and the client works on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_a_stream_is_final() {
    let Some(factory) = factory() else { return };
    let broker = factory.client().await;
    let key = unique_name("string-key");
    let mut raw = raw().await;
    redis::cmd("SET")
        .arg(&key)
        .arg("not a stream")
        .query_async::<()>(&mut raw)
        .await
        .expect("SET");
    let published = broker.publish(&key, Message::new("x")).await;
    conformance::assert_invalid_topic(published, "publish");
    conformance::assert_invalid_topic(broker.ensure_topic(&key).await, "ensure_topic");
    conformance::assert_invalid_topic(
        broker.ensure_topic_and_subscription(&key, "readers").await,
        "ensure_topic_and_subscription",
    );
    let subscribed = broker
        .subscribe(&key, "readers", SubscribeOptions::default())
        .await;
    conformance::assert_invalid_topic(subscribed.map(|_| ()), "subscribe");
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .expect("GET");
    assert_eq!(value, "not a stream", "the key was left alone");
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut raw)
        .await
        .expect("DEL");
    let case = Case::on(&factory, broker, "after-wrongtype", &["readers"]).await;
    case.publish_marked("after").await;
    let expected: HashSet<String> = ["after".to_string()].into();
    case.read_all("readers", &expected, "after a non-stream key")
        .await;
    case.delete().await;
}

/// Stream keys are capped at `MAX_STREAM_KEY_BYTES`: one byte more is refused without
/// a command sent (no key is created), the cap itself works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_keys_are_capped() {
    let Some(factory) = factory() else { return };
    let broker = factory.client().await;
    let prefix = format!("{}-", unique_name("long-key"));
    let longest = format!(
        "{prefix}{}",
        "k".repeat(MAX_STREAM_KEY_BYTES - prefix.len())
    );
    let too_long = format!("{longest}k");
    conformance::assert_name_refused(&*broker, &too_long).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&too_long)
        .query_async(&mut raw().await)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0);
    broker
        .ensure_topic(&longest)
        .await
        .expect("the longest key");
    broker
        .publish(&longest, Message::new("x"))
        .await
        .expect("publish to it");
    broker.delete_topic(&longest).await.expect("delete it");
}
