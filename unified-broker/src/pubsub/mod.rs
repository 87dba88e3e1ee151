//! Google Cloud Pub/Sub backend (placeholder until the google-cloud-pubsub implementation lands).

use serde::{Deserialize, Serialize};

use crate::{BrokerError, Result};

/// Settings of the Pub/Sub backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PubSubConfig {
    /// Google Cloud project id.
    pub project_id: String,
    /// Emulator `host:port`.
    pub emulator_host: Option<String>,
}

/// Pub/Sub client.
pub struct PubSubBroker;

impl PubSubBroker {
    /// Connects to the cluster.
    pub async fn connect(_config: &PubSubConfig) -> Result<Self> {
        Err(BrokerError::Config(
            "the pubsub backend is not built yet".into(),
        ))
    }
}

#[async_trait::async_trait]
impl crate::Broker for PubSubBroker {
    fn backend(&self) -> &'static str {
        "pubsub"
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
