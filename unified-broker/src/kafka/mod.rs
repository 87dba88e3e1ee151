//! Apache Kafka backend (placeholder until the rdkafka implementation lands).

use serde::{Deserialize, Serialize};

use crate::{BrokerError, Result};

/// Settings of the Kafka backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
}

/// Kafka client.
pub struct KafkaBroker;

impl KafkaBroker {
    /// Connects to the cluster.
    pub async fn connect(_config: &KafkaConfig) -> Result<Self> {
        Err(BrokerError::Config(
            "the kafka backend is not built yet".into(),
        ))
    }
}

#[async_trait::async_trait]
impl crate::Broker for KafkaBroker {
    fn backend(&self) -> &'static str {
        "kafka"
    }
    fn features(&self) -> crate::Features {
        unreachable!()
    }
    async fn publish_batch(&self, _: &str, _: Vec<crate::Message>) -> Result<()> {
        unreachable!()
    }
    async fn subscribe(
        &self,
        _: &str,
        _: &str,
        _: crate::SubscribeOptions,
    ) -> Result<Box<dyn crate::Subscriber>> {
        unreachable!()
    }
    async fn ensure_topic(&self, _: &str) -> Result<()> {
        unreachable!()
    }
    async fn delete_topic(&self, _: &str) -> Result<()> {
        unreachable!()
    }
    async fn ensure_subscription(&self, _: &str, _: &str) -> Result<()> {
        unreachable!()
    }
    async fn delete_subscription(&self, _: &str, _: &str) -> Result<()> {
        unreachable!()
    }
    async fn close(&self) -> Result<()> {
        unreachable!()
    }
}
