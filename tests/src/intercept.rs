//! A real broker with a test's hooks in front: the hooks see (and may fail) publishes and
//! see subscriptions, and every call then goes on to the broker wrapped. Tests that
//! inject failures or watch what a peer could see write only their hooks, not a whole
//! `Broker` that passes the other calls along.

use std::sync::Arc;

use async_trait::async_trait;
use unified_broker::{Broker, Features, Message, SubscribeOptions, Subscriber};

/// What a test does before a call reaches the real broker. Both hooks do nothing by
/// default.
pub trait Hooks: Send + Sync + 'static {
    /// Before a batch is published on `topic`; an error fails the publish instead (the
    /// batch never reaches the broker).
    fn before_publish(&self, _topic: &str, _messages: &[Message]) -> unified_broker::Result<()> {
        Ok(())
    }

    /// Before a subscription to `topic` is made.
    fn before_subscribe(&self, _topic: &str) {}
}

/// `inner` with `hooks` in front of its publishes and subscriptions.
pub struct Intercepted<H> {
    /// The real broker every call goes on to.
    pub inner: Arc<dyn Broker>,
    /// The test's hooks (and whatever they count).
    pub hooks: H,
}

#[async_trait]
impl<H: Hooks> Broker for Intercepted<H> {
    fn backend(&self) -> &'static str {
        "intercepted"
    }
    fn features(&self) -> Features {
        self.inner.features()
    }
    async fn max_message_bytes(&self, topic: &str) -> unified_broker::Result<usize> {
        self.inner.max_message_bytes(topic).await
    }
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> unified_broker::Result<()> {
        self.hooks.before_publish(topic, &messages)?;
        self.inner.publish_batch(topic, messages).await
    }
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> unified_broker::Result<Box<dyn Subscriber>> {
        self.hooks.before_subscribe(topic);
        self.inner.subscribe(topic, group, options).await
    }
    async fn ensure_topic(&self, topic: &str) -> unified_broker::Result<()> {
        self.inner.ensure_topic(topic).await
    }
    async fn ensure_private_topic(&self, topic: &str) -> unified_broker::Result<()> {
        self.inner.ensure_private_topic(topic).await
    }
    async fn delete_topic(&self, topic: &str) -> unified_broker::Result<()> {
        self.inner.delete_topic(topic).await
    }
    async fn ensure_subscription(&self, topic: &str, group: &str) -> unified_broker::Result<()> {
        self.inner.ensure_subscription(topic, group).await
    }
    async fn delete_subscription(&self, topic: &str, group: &str) -> unified_broker::Result<()> {
        self.inner.delete_subscription(topic, group).await
    }
    async fn backlog(
        &self,
        topic: &str,
        group: &str,
    ) -> unified_broker::Result<Option<unified_broker::Backlog>> {
        self.inner.backlog(topic, group).await
    }
    async fn close(&self) -> unified_broker::Result<()> {
        self.inner.close().await
    }
}
