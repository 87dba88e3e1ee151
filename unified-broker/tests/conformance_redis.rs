//! The conformance suite, and Redis-specific checks, against a real `redis-server`.
//!
//! Needs `REDIS_URL` (e.g. from `scripts/redis-start.sh`). Without it every case is
//! skipped loudly, or fails if `REQUIRE_BROKERS` is set (CI).

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use unified_broker::conformance::{
    self, numbered_messages, receive_all, setup_topic, unique_name, BrokerFactory, ID_ATTRIBUTE,
};
use unified_broker::redis::{RedisBroker, RedisConfig, URL_ENV};
use unified_broker::{Broker, BrokerError, Message, SubscribeOptions};

/// Clients of the server at `REDIS_URL`, each with its own connections.
struct Redis(RedisConfig);

#[async_trait]
impl BrokerFactory for Redis {
    async fn client(&self) -> Arc<dyn Broker> {
        Arc::new(
            RedisBroker::connect(&self.0)
                .await
                .expect("connect to REDIS_URL"),
        )
    }

    fn receive_timeout(&self) -> Duration {
        // Well below the default claim_idle_ms (30 s): what a closed or dropped
        // subscriber held must come back because it was given back, not because it
        // idled long enough to be claimed.
        Duration::from_secs(20)
    }
}

/// The server's config, or `None` (after saying so) when no server is configured.
fn config() -> Option<RedisConfig> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(RedisConfig {
            url,
            ..RedisConfig::default()
        }),
        _ if std::env::var_os("REQUIRE_BROKERS").is_some() => panic!(
            "REQUIRE_BROKERS is set but {URL_ENV} is not: start a server with \
             scripts/redis-start.sh and export the variable it prints"
        ),
        _ => {
            // Straight to stderr: libtest captures `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "*** conformance_redis: SKIPPED: {URL_ENV} not set (run scripts/redis-start.sh) ***"
            );
            None
        }
    }
}

fn factory() -> Option<Redis> {
    config().map(Redis)
}

// The whole suite; each case returns early (skipped, said on stderr) without a server.
unified_broker::conformance_tests!(match factory() {
    Some(factory) => factory,
    None => return,
});

async fn connect(config: &RedisConfig) -> RedisBroker {
    RedisBroker::connect(config)
        .await
        .expect("connect to REDIS_URL")
}

/// A raw connection, for what the backend never does (act as a member that dies).
async fn raw(config: &RedisConfig) -> redis::aio::MultiplexedConnection {
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

fn id_of(delivery: &unified_broker::Delivery) -> String {
    delivery
        .message()
        .attribute(ID_ATTRIBUTE)
        .unwrap_or_default()
        .to_string()
}

/// Image-sized payloads (several MB), keys and attributes make the round trip, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_round_trip() {
    let Some(config) = config() else { return };
    let broker = connect(&config).await;
    let topic = unique_name("large");
    setup_topic(&broker, &topic, &["readers"]).await;
    let sizes = [5 * 1024 * 1024, 1, 8 * 1024 * 1024];
    let messages: Vec<Message> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            Message::new(vec![(i % 251) as u8; size])
                .with_key("same-key")
                .with_attribute("size", size.to_string())
        })
        .collect();
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish large messages");
    let mut subscriber = broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    for (i, &size) in sizes.iter().enumerate() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), subscriber.next())
            .await
            .expect("a large message before the timeout")
            .expect("stream open")
            .expect("no receive error");
        let message = delivery.message();
        assert_eq!(message.payload.len(), size, "message {i} in stream order");
        assert!(message.payload.iter().all(|&b| b == (i % 251) as u8));
        assert_eq!(message.attribute("size"), Some(size.to_string().as_str()));
        assert_eq!(message.key.as_deref(), Some("same-key"));
        assert_eq!(delivery.attempt(), Some(1));
        delivery.ack().expect("ack");
    }
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Subscribing to or publishing on a stream that does not exist is `TopicNotFound`, not
/// a silently created stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_is_reported() {
    let Some(config) = config() else { return };
    let broker = connect(&config).await;
    let topic = unique_name("missing");
    match broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await
    {
        Err(BrokerError::TopicNotFound(name)) => assert_eq!(name, topic),
        Err(other) => panic!("expected TopicNotFound, got {other}"),
        Ok(_) => panic!("subscribing to a missing stream succeeded"),
    }
    let published = broker.publish(&topic, Message::new("x")).await;
    assert!(
        matches!(published, Err(BrokerError::TopicNotFound(_))),
        "{published:?}"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&topic)
        .query_async(&mut raw(&config).await)
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
    let config = RedisConfig {
        // Port 9 (discard) on loopback: nothing listens there.
        url: "127.0.0.1:9".into(),
        request_timeout_ms: 2_000,
        ..RedisConfig::default()
    };
    let started = std::time::Instant::now();
    match RedisBroker::connect(&config).await {
        Err(error @ BrokerError::Unavailable(_)) => assert!(error.is_retryable()),
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Entries a member took and never acked (it died: here a raw consumer that reads and
/// vanishes) are taken over by a live member once idle for `claim_idle_ms`, with their
/// delivery count as the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_member_are_claimed() {
    let Some(config) = config() else { return };
    let config = RedisConfig {
        claim_idle_ms: 1_000,
        claim_interval_ms: 200,
        ..config
    };
    let broker = connect(&config).await;
    let topic = unique_name("dead");
    setup_topic(&broker, &topic, &["workers"]).await;
    let messages = numbered_messages("d", 10);
    let expected: HashSet<String> = (0..10).map(|i| format!("d-{i}")).collect();
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let taken: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("dies-holding-everything")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&topic)
        .arg(">")
        .query_async(&mut raw(&config).await)
        .await
        .expect("the doomed member reads");
    assert!(!matches!(taken, redis::Value::Nil), "it took the entries");
    let mut subscriber = broker
        .subscribe(&topic, "workers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < expected.len() {
        let delivery = tokio::time::timeout_at(deadline, subscriber.next())
            .await
            .expect("claimed before the timeout")
            .expect("stream open")
            .expect("delivery");
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
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// A delivery held longer than `claim_idle_ms` is not taken over by another member (the
/// holder keeps re-claiming it); a nack serves it again with its attempt counted up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_delivery_is_not_stolen_and_nack_counts_attempts() {
    let Some(config) = config() else { return };
    let config = RedisConfig {
        claim_idle_ms: 600,
        claim_interval_ms: 100,
        ..config
    };
    let broker = connect(&config).await;
    let topic = unique_name("lease");
    setup_topic(&broker, &topic, &["workers"]).await;
    let mut holder = broker
        .subscribe(&topic, "workers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    broker
        .publish(
            &topic,
            Message::new("slow").with_attribute(ID_ATTRIBUTE, "slow"),
        )
        .await
        .expect("publish");
    let held = tokio::time::timeout(Duration::from_secs(10), holder.next())
        .await
        .expect("a delivery")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(held.attempt(), Some(1));
    let mut other = broker
        .subscribe(&topic, "workers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    // Four claim idle times: without the holder's re-claims it would have moved.
    let stolen = tokio::time::timeout(Duration::from_millis(2_400), other.next()).await;
    assert!(stolen.is_err(), "taken over from a live holder: {stolen:?}");
    held.nack().expect("nack");
    let again = tokio::time::timeout(Duration::from_secs(5), holder.next())
        .await
        .expect("served again after the nack")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(id_of(&again), "slow");
    assert_eq!(again.attempt(), Some(2));
    again.ack().expect("ack");
    other.close().await.expect("close");
    holder.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// What a closing member still held goes to another member at once, long before
/// `claim_idle_ms` (here a minute), and acked entries stay acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_gives_held_entries_back_at_once() {
    let Some(config) = config() else { return };
    let config = RedisConfig {
        claim_idle_ms: 60_000,
        claim_interval_ms: 200,
        ..config
    };
    let broker = connect(&config).await;
    let topic = unique_name("handover");
    setup_topic(&broker, &topic, &["workers"]).await;
    let mut leaving = broker
        .subscribe(&topic, "workers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let messages = numbered_messages("h", 20);
    let expected: HashSet<String> = (0..20).map(|i| format!("h-{i}")).collect();
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
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
    let mut staying = broker
        .subscribe(&topic, "workers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    leaving.close().await.expect("close");
    drop(held);
    let rest: HashSet<String> = expected.difference(&acked).cloned().collect();
    let mut from_staying = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !rest.iter().all(|id| from_staying.contains(id)) {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, staying.next()).await else {
            break;
        };
        from_staying.insert(id_of(&delivery));
        delivery.ack().expect("ack");
    }
    conformance::assert_none_lost(&rest, &from_staying, "handed over on close");
    let twice: Vec<_> = from_staying.intersection(&acked).collect();
    assert!(twice.is_empty(), "acked entries came back: {twice:?}");
    staying.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// `max_len` bounds the stream (approximately), and a group still receives what it
/// keeps up with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_length_is_bounded() {
    let Some(config) = config() else { return };
    let config = RedisConfig {
        max_len: 1_000,
        ..config
    };
    let broker = connect(&config).await;
    let topic = unique_name("bounded");
    setup_topic(&broker, &topic, &["readers"]).await;
    for chunk in numbered_messages("b", 5_000).chunks(500) {
        broker
            .publish_batch(&topic, chunk.to_vec())
            .await
            .expect("publish");
    }
    let length: usize = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut raw(&config).await)
        .await
        .expect("XLEN");
    assert!(
        (1_000..2_000).contains(&length),
        "5,000 entries trimmed to about 1,000, got {length}"
    );
    // The newest entries are the ones kept.
    let mut subscriber = broker
        .subscribe(&topic, "late", SubscribeOptions::default())
        .await
        .expect("subscribe");
    broker
        .publish(
            &topic,
            Message::new("after").with_attribute(ID_ATTRIBUTE, "after"),
        )
        .await
        .expect("publish");
    let expected: HashSet<String> = ["after".to_string()].into();
    let received = receive_all(&mut *subscriber, &expected, Duration::from_secs(10)).await;
    assert_eq!(received.ids(), expected);
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Deleting the stream ends its subscribers' streams (`None`), which is what makes
/// `Resubscribing` start again after a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_stream_ends_the_subscription() {
    let Some(config) = config() else { return };
    let config = RedisConfig {
        claim_interval_ms: 200,
        ..config
    };
    let broker = connect(&config).await;
    let topic = unique_name("gone");
    setup_topic(&broker, &topic, &["readers"]).await;
    let mut subscriber = broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await
        .expect("subscribe");
    broker.delete_topic(&topic).await.expect("delete_topic");
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
