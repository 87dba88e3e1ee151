//! The conformance suite on the embedded in-process broker.

use std::sync::Arc;

use async_trait::async_trait;
use unified_broker::conformance::BrokerFactory;
use unified_broker::embedded::{EmbeddedBroker, EmbeddedConfig};
use unified_broker::Broker;

/// Clients of one embedded broker, as another part of the same process would get them.
struct Embedded(EmbeddedBroker);

#[async_trait]
impl BrokerFactory for Embedded {
    async fn client(&self) -> Arc<dyn Broker> {
        Arc::new(self.0.new_client())
    }
}

fn factory() -> Embedded {
    Embedded(EmbeddedBroker::new(EmbeddedConfig::default()))
}

unified_broker::conformance_tests!(factory());
