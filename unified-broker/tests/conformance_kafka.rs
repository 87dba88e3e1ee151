//! The conformance suite on a real Kafka-protocol broker.
//!
//! Needs `KAFKA_BOOTSTRAP_SERVERS` (e.g. from `scripts/kafka-start.sh`). Without it every
//! case is skipped loudly, or fails if `REQUIRE_BROKERS` is set (CI).

use std::time::Duration;

use unified_broker::conformance::{self, ConnectFactory};
use unified_broker::kafka::{KafkaBroker, KafkaConfig};
use unified_broker::{Broker, BrokerConfig, BrokerError, Message};

/// Clients of the broker at `KAFKA_BOOTSTRAP_SERVERS`, or `None` (after saying so) when
/// no broker is configured.
fn factory() -> Option<ConnectFactory> {
    let servers = conformance::broker_address_or_skip(
        "KAFKA_BOOTSTRAP_SERVERS",
        "conformance_kafka",
        "scripts/kafka-start.sh",
    )?;
    let config = KafkaConfig {
        bootstrap_servers: servers,
        ..KafkaConfig::default()
    };
    // A consumer group's first join takes ~5 s on Tansu, more on a busy machine.
    Some(
        ConnectFactory::new(BrokerConfig::Kafka(config))
            .with_receive_timeout(Duration::from_secs(90)),
    )
}

// The whole suite, and the large-message and missing-topic cases; each returns early
// (skipped, said on stderr) without a broker.
unified_broker::conformance_tests!(
    optional factory();
    large_messages_round_trip,
    missing_topic_is_reported,
);

/// A client with nothing listening fails `connect` with `Unavailable`, promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_unavailable() {
    if factory().is_none() {
        return;
    }
    conformance::assert_unavailable(
        KafkaBroker::connect(&KafkaConfig {
            bootstrap_servers: conformance::UNREACHABLE_ADDRESS.into(),
            request_timeout_ms: 2_000,
            ..KafkaConfig::default()
        })
        .await,
    );
}

/// The size limit comes from the topic, as the broker describes it: a topic created
/// with a smaller `max.message.bytes` than this client's own limit caps what the client
/// sends there, and a message over it fails at once with `MessageTooLarge`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topics_smaller_size_limit_is_described_and_enforced() {
    let Some(servers) =
        factory().map(|_| std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("checked by factory()"))
    else {
        return;
    };
    let small = 1024 * 1024;
    let creator = KafkaBroker::connect(&KafkaConfig {
        bootstrap_servers: servers.clone(),
        message_max_bytes: small,
        ..KafkaConfig::default()
    })
    .await
    .expect("connect");
    let topic = conformance::unique_name("smalltopic");
    creator.ensure_topic(&topic).await.expect("ensure_topic");
    let client = KafkaBroker::connect(&KafkaConfig {
        bootstrap_servers: servers,
        ..KafkaConfig::default()
    })
    .await
    .expect("connect");
    let own = client.features().max_message_bytes;
    let limit = client.max_message_bytes(&topic).await.expect("limit");
    assert!(
        limit < small,
        "the topic's {small} bytes, less framing: got {limit} (client's own: {own})"
    );
    let over = Message::new(vec![0u8; limit + 1]);
    let refused = client.publish(&topic, over).await;
    assert!(
        matches!(refused, Err(BrokerError::MessageTooLarge { .. })),
        "{refused:?}"
    );
    client
        .publish(&topic, Message::new(vec![0u8; limit]))
        .await
        .expect("a message of the limit is accepted");
    creator.delete_topic(&topic).await.expect("delete_topic");
}
