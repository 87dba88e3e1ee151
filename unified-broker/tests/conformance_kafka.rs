//! The conformance suite on a real Kafka-protocol broker.
//!
//! Needs `KAFKA_BOOTSTRAP_SERVERS` (e.g. from `scripts/kafka-start.sh`). Without it every
//! case is skipped loudly, or fails if `REQUIRE_BROKERS` is set (CI).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use unified_broker::conformance::{self, BrokerFactory, Case};
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
    let servers = conformance::broker_address_or_skip(
        "KAFKA_BOOTSTRAP_SERVERS",
        "conformance_kafka",
        "scripts/kafka-start.sh",
    )?;
    Some(Kafka(KafkaConfig {
        bootstrap_servers: servers,
        ..KafkaConfig::default()
    }))
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
    let case = Case::new(&factory, "large", &[]).await;
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
    case.publish(messages).await;
    let mut subscriber = case.subscribe("readers").await;
    for (i, &size) in sizes.iter().enumerate() {
        let delivery = conformance::next_within(&mut *subscriber, factory.receive_timeout()).await;
        let message = delivery.message();
        assert_eq!(message.payload.len(), size, "message {i} in key order");
        assert!(message.payload.iter().all(|&b| b == (i % 251) as u8));
        assert_eq!(message.attribute("size"), Some(size.to_string().as_str()));
        assert_eq!(message.key.as_deref(), Some("same-key"));
        delivery.ack().expect("ack");
    }
    case.close_and_delete(subscriber).await;
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
