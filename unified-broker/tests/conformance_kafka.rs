//! The conformance suite on a real Kafka-protocol broker.
//!
//! Needs `KAFKA_BOOTSTRAP_SERVERS` (e.g. from `scripts/kafka-start.sh`). Without it every
//! case is skipped loudly, or fails if `REQUIRE_BROKERS` is set (CI).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use unified_broker::conformance::{self, BrokerFactory};
use unified_broker::kafka::{KafkaBroker, KafkaConfig};
use unified_broker::{Broker, BrokerError, Message, SubscribeOptions};

/// Clients of the broker at `KAFKA_BOOTSTRAP_SERVERS`, each with its own connections.
struct Kafka(KafkaConfig);

#[async_trait]
impl BrokerFactory for Kafka {
    async fn client(&self) -> Arc<dyn Broker> {
        Arc::new(
            KafkaBroker::connect(&self.0)
                .await
                .expect("connect to KAFKA_BOOTSTRAP_SERVERS"),
        )
    }

    fn receive_timeout(&self) -> Duration {
        // A consumer group's first join takes ~5 s on Tansu, more on a busy machine.
        Duration::from_secs(90)
    }
}

/// The factory, or `None` (after saying so) when no broker is configured.
fn factory() -> Option<Kafka> {
    match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(servers) if !servers.trim().is_empty() => Some(Kafka(KafkaConfig {
            bootstrap_servers: servers,
            ..KafkaConfig::default()
        })),
        _ if std::env::var_os("REQUIRE_BROKERS").is_some() => panic!(
            "REQUIRE_BROKERS is set but KAFKA_BOOTSTRAP_SERVERS is not: start a broker with \
             scripts/kafka-start.sh and export the variable it prints"
        ),
        _ => {
            // Straight to stderr: libtest captures `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "*** conformance_kafka: SKIPPED: KAFKA_BOOTSTRAP_SERVERS not set \
                 (run scripts/kafka-start.sh) ***"
            );
            None
        }
    }
}

// The whole suite; each case returns early (skipped, said on stderr) without a broker.
unified_broker::conformance_tests!(match factory() {
    Some(factory) => factory,
    None => return,
});

/// Image-sized payloads (several MB) make the round trip through producer, topic and
/// consumer limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_round_trip() {
    let Some(factory) = factory() else { return };
    let broker = factory.client().await;
    let topic = conformance::unique_name("large");
    broker.ensure_topic(&topic).await.expect("ensure_topic");
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
        let delivery = tokio::time::timeout(factory.receive_timeout(), subscriber.next())
            .await
            .expect("a large message before the timeout")
            .expect("stream open")
            .expect("no receive error");
        let message = delivery.message();
        assert_eq!(message.payload.len(), size, "message {i} in key order");
        assert!(message.payload.iter().all(|&b| b == (i % 251) as u8));
        assert_eq!(message.attribute("size"), Some(size.to_string().as_str()));
        assert_eq!(message.key.as_deref(), Some("same-key"));
        delivery.ack().expect("ack");
    }
    subscriber.close().await.expect("close");
    broker.delete_topic(&topic).await.expect("delete_topic");
}

/// Subscribing to or publishing on a topic that does not exist is `TopicNotFound`, not a
/// silently auto-created topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_is_reported() {
    let Some(factory) = factory() else { return };
    let broker = factory.client().await;
    let topic = conformance::unique_name("missing");
    match broker
        .subscribe(&topic, "readers", SubscribeOptions::default())
        .await
    {
        Err(BrokerError::TopicNotFound(name)) => assert_eq!(name, topic),
        Err(other) => panic!("expected TopicNotFound, got {other}"),
        Ok(_) => panic!("subscribing to a missing topic succeeded"),
    }
}

/// A client with nothing listening fails `connect` with `Unavailable`, promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_unavailable() {
    if factory().is_none() {
        return;
    }
    let config = KafkaConfig {
        // Port 9 (discard) on loopback: nothing listens there.
        bootstrap_servers: "127.0.0.1:9".into(),
        request_timeout_ms: 2_000,
        ..KafkaConfig::default()
    };
    match KafkaBroker::connect(&config).await {
        Err(error @ BrokerError::Unavailable(_)) => assert!(error.is_retryable()),
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
}
