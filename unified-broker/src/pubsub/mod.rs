//! Google Cloud Pub/Sub backend, on the official `google-cloud-pubsub` client.
//!
//! How the common model maps onto Pub/Sub:
//!
//! - a topic is a Pub/Sub topic of the same id, in `project_id`;
//! - a consumer group is a subscription on it, with the deterministic id
//!   `{topic}--{group}` (sanitised and hashed when that is not a valid id); members of
//!   a group are streaming pulls on the same subscription and share its messages;
//! - `ack`/`nack` go to the client's lease manager (nack = redeliver now); a held
//!   delivery's lease is extended automatically up to `max_lease_seconds`;
//! - the key becomes the ordering key when `enable_message_ordering` is on (and
//!   subscriptions are then created with ordering); otherwise it travels as the
//!   attribute [`KEY_ATTRIBUTE`], so it survives the trip either way;
//! - messages published before a group's subscription exists are not delivered to it
//!   (`ensure_subscription` first), as on the embedded broker.
//! - a group's backlog is not known (`Broker::backlog` answers `None`): the Pub/Sub API
//!   has no count of a subscription's messages; Cloud Monitoring has it
//!   (`subscription/num_undelivered_messages`), for an autoscaler to read there.
//!
//! With `emulator_host` (or `PUBSUB_EMULATOR_HOST`) the client uses `http://HOST` and
//! anonymous credentials; it never looks for real credentials or the metadata server.
//! The emulator keeps everything in memory: a restart loses topics and messages.
//!
//! Emulator quirk (measured, emulator 0.8.20): it never ends a StreamingPull that its
//! client reset; the dead stream's server thread goes on taking messages off the
//! subscription every 50 ms until the subscription is deleted. So messages a subscriber
//! held when it closed come back only when their ack deadline expires, sometimes only
//! after several deadlines (10–50 s with a 10 s deadline, 30–90 s with 30 s), even
//! though they were nacked (and the nack confirmed) before the close: each time they
//! are free again, a dead stream may take them first. With ordering on they can stay
//! away for as long as an older message of their key is held. Use the minimum
//! `ack_deadline_seconds` (10) with the emulator when redelivery latency matters.
//! `scripts/pubsub-emulator-dead-streams.py` shows it with Google's Python client alone
//! (no code of ours): a message published after cancelled subscribers of the same
//! subscription arrives one or two ack deadlines late, on a fresh subscription at once.

mod admin;
mod config;
mod errors;
mod names;
mod publisher;
mod subscriber;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_pubsub::client::Subscriber as PullClient;
use google_cloud_pubsub::subscriber::ShutdownBehavior;

pub use config::{PubSubConfig, EMULATOR_HOST_ENV};

use crate::error::check_message_sizes;
use crate::{Broker, Features, Message, Result, SubscribeOptions, Subscriber};
use admin::Admin;
use config::CredentialsKind;
use publisher::Publishers;
use subscriber::PubSubSubscriber;

/// Attribute that carries a message's key when message ordering is off (with ordering
/// on, the key is the Pub/Sub ordering key). Removed again on receipt.
pub const KEY_ATTRIBUTE: &str = "unified-broker-key";

/// A client of Google Cloud Pub/Sub (or its emulator): publishing, subscribing and
/// admin, all in one project.
pub struct PubSubBroker {
    config: PubSubConfig,
    endpoint: Option<String>,
    credentials: CredentialsKind,
    admin: Admin,
    publishers: Publishers,
    /// One streaming-pull client (one gRPC connection) shared by all subscribers.
    pull: PullClient,
}

impl fmt::Debug for PubSubBroker {
    // Shows where it connects and which kind of credentials, never their content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubBroker")
            .field("project_id", &self.config.project_id)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .field("ordering", &self.config.enable_message_ordering)
            .finish()
    }
}

impl PubSubBroker {
    /// Builds the clients for `config` (with `PUBSUB_EMULATOR_HOST` applied if the config
    /// names no emulator). Connections are opened lazily, on first use.
    pub async fn connect(config: &PubSubConfig) -> Result<Self> {
        let mut config = config.clone();
        config.apply_env(&|name| std::env::var(name).ok());
        config.validate()?;
        install_crypto_provider();
        let connection = config.connection()?;
        let admin = Admin::new(
            &config.project_id,
            &connection,
            config.ack_deadline_seconds,
            config.enable_message_ordering,
        )
        .await?;
        let publishers = Publishers::new(&config, &connection).await?;
        let mut pull = PullClient::builder().with_credentials(connection.credentials.clone());
        if let Some(endpoint) = &connection.endpoint {
            pull = pull.with_endpoint(endpoint.clone());
        }
        let pull = pull
            .build()
            .await
            .map_err(|e| errors::builder("subscriber", &e))?;
        tracing::info!(
            project = %config.project_id,
            endpoint = connection.endpoint.as_deref().unwrap_or("default"),
            credentials = ?connection.kind,
            ordering = config.enable_message_ordering,
            "pubsub client ready"
        );
        Ok(PubSubBroker {
            endpoint: connection.endpoint.clone(),
            credentials: connection.kind,
            config,
            admin,
            publishers,
            pull,
        })
    }

    /// Whether this client talks to the (in-memory) emulator.
    pub fn uses_emulator(&self) -> bool {
        self.config.emulator_host.is_some()
    }
}

/// Makes sure rustls has a process-wide crypto provider. The client libraries use
/// aws-lc-rs; if feature unification also turns on rustls' `ring`, rustls can no longer
/// pick one by itself and TLS setup would fail. Installing one when none is set is
/// harmless otherwise (and loses a race to another installer without harm).
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// Clamps a flow-control limit into the i64 the API takes.
/// Pub/Sub's limit on one message (data, ordering key and attributes, counted as
/// [`Message::size`] counts them): 10 MB. It is also the client library's batch size, so
/// a publish request never holds more than one message that large.
pub const MAX_MESSAGE_BYTES: usize = 10_000_000;

fn limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl Broker for PubSubBroker {
    fn backend(&self) -> &'static str {
        "pubsub"
    }

    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            ordered_per_key: self.config.enable_message_ordering,
            retains_before_subscription: false,
            // Real Pub/Sub keeps unacked messages; the emulator is in-memory only.
            survives_broker_restart: !self.uses_emulator(),
            in_process_only: false,
            max_message_bytes: MAX_MESSAGE_BYTES,
        }
    }

    /// A Pub/Sub topic id: 3 to 255 characters of letters, digits and `-_.~+%`,
    /// starting with a letter, not with "goog".
    fn check_topic_name(&self, topic: &str) -> Result<()> {
        names::topic_id(topic).map(|_| ())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let topic_path = self.admin.topic_path(topic)?;
        check_message_sizes(&messages, MAX_MESSAGE_BYTES)?;
        if messages.is_empty() {
            return Ok(());
        }
        self.publishers
            .publish_batch(topic, &topic_path, messages)
            .await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let subscription = self.admin.ensure_subscription(topic, group).await?;
        let stream = self
            .pull
            .subscribe(subscription.clone())
            .set_max_lease_extension(Duration::from_secs(u64::from(
                self.config.ack_deadline_seconds,
            )))
            .set_max_lease(Duration::from_secs(self.config.max_lease_seconds))
            .set_max_outstanding_messages(limit(options.max_outstanding_messages))
            .set_max_outstanding_bytes(limit(options.max_outstanding_bytes))
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build();
        tracing::debug!(subscription = %subscription, topic, group, ?options, "subscribed");
        Ok(Box::new(PubSubSubscriber::start(subscription, stream)))
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.admin.ensure_topic(topic).await
    }

    /// One topic of the project listed (a page of one).
    async fn ping(&self) -> Result<()> {
        self.admin.ping().await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.publishers.forget(&self.admin.topic_path(topic)?);
        self.admin.delete_topic(topic).await
    }

    async fn ensure_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.admin
            .ensure_subscription(topic, group)
            .await
            .map(|_| ())
    }

    async fn delete_subscription(&self, topic: &str, group: &str) -> Result<()> {
        self.admin.delete_subscription(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.publishers.close().await;
        tracing::debug!(project = %self.config.project_id, "pubsub publishers closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn debug_of_a_connected_client_shows_no_secrets() {
        // An emulator address that nothing listens on: connect opens no connection.
        let config = PubSubConfig {
            emulator_host: Some("127.0.0.1:9".into()),
            credentials_json: Some(
                r#"{"type":"service_account","private_key":"SUPERSECRET"}"#.into(),
            ),
            ..Default::default()
        };
        let broker = PubSubBroker::connect(&config).await.expect("connect");
        let printed = format!("{broker:?}");
        assert!(!printed.contains("SUPERSECRET"), "{printed}");
        assert!(printed.contains("Anonymous"), "{printed}");
        assert!(broker.uses_emulator());
        assert!(!broker.features().survives_broker_restart);
    }

    #[tokio::test]
    async fn publishing_after_close_is_refused() {
        let config = PubSubConfig {
            emulator_host: Some("127.0.0.1:9".into()),
            ..Default::default()
        };
        let broker = PubSubBroker::connect(&config).await.expect("connect");
        broker.close().await.expect("close");
        let result = broker.publish("some-topic", Message::new("late")).await;
        assert!(
            matches!(result, Err(crate::BrokerError::Closed)),
            "{result:?}"
        );
    }

    #[test]
    fn the_example_config_file_parses() {
        match crate::example_config("pubsub") {
            crate::BrokerConfig::Pubsub(config) => config.validate().expect("valid values"),
            other => panic!("expected the pubsub backend, got {other:?}"),
        }
    }
}
