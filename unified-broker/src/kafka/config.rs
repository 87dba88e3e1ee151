//! Settings of the Kafka backend and their translation into librdkafka properties.

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::error::{check_at_least, check_between};

/// Settings of the Kafka backend, read from the `[broker]` table (`backend = "kafka"`).
///
/// Every field has a default, so `backend = "kafka"` alone talks to a broker on
/// `127.0.0.1:9092`. `Debug` redacts secret-looking `properties`, so the whole config can
/// be logged.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers to bootstrap from
    /// (overridden by the `KAFKA_BOOTSTRAP_SERVERS` environment variable).
    pub bootstrap_servers: String,
    /// Partitions of the topics this backend creates: the upper bound on members of one
    /// consumer group that receive messages in parallel.
    pub partitions: i32,
    /// Replication factor of the topics this backend creates (1 for a single broker).
    pub replication_factor: i32,
    /// `client.id` sent to the brokers, for their logs and quotas.
    pub client_id: String,
    /// How long a broker may hold a fetch waiting for data (`fetch.wait.max.ms`). Low,
    /// because some brokers (Tansu) hold every fetch for the full wait: this bounds the
    /// delivery latency.
    pub fetch_wait_max_ms: u32,
    /// How long the producer waits to fill a batch (`linger.ms`): latency vs throughput.
    pub linger_ms: u32,
    /// Producer compression: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// Largest message (payload plus headers) accepted anywhere: producer requests,
    /// consumer fetches and the `max.message.bytes` of topics we create. Images can be a
    /// few MB.
    pub message_max_bytes: usize,
    /// How long a publish may take (including retries) before it fails
    /// (`message.timeout.ms`).
    pub message_timeout_ms: u32,
    /// How long a consumer-group member may go without heartbeats before the group
    /// reassigns its partitions (`session.timeout.ms`). Short enough that a crashed
    /// member's messages move on quickly. Tansu also holds a new group's first join for
    /// about half of it.
    pub session_timeout_ms: u32,
    /// Timeout of admin requests, metadata look-ups and commits done while closing.
    pub request_timeout_ms: u32,
    /// Whether the Kafka consumer group of subscription `group` on `topic` is named
    /// `"{topic}.{group}"` (the default) rather than just `group`. Kafka groups span
    /// topics: with plain names, every member of a group name used on several topics
    /// (e.g. "readers") would rebalance with all the others whenever any of them joins or
    /// leaves. Set false to share a group with other Kafka clients by its plain name.
    pub group_per_topic: bool,
    /// Extra librdkafka properties, passed through to every client (TLS, SASL, tuning),
    /// applied after the settings above. The properties the delivery guarantees rest on
    /// (`group.id`, `enable.auto.commit`, `enable.auto.offset.store`,
    /// `enable.idempotence`) cannot be overridden.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".to_string(),
            partitions: 4,
            replication_factor: 1,
            client_id: "unified-broker".to_string(),
            fetch_wait_max_ms: 20,
            linger_ms: 5,
            compression: "none".to_string(),
            message_max_bytes: 16 * 1024 * 1024,
            message_timeout_ms: 30_000,
            session_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            group_per_topic: true,
            properties: BTreeMap::new(),
        }
    }
}

/// Fragments of property names whose values are secrets (passwords, keys, tokens,
/// JAAS configs) and must never be printed.
const SECRET_FRAGMENTS: &[&str] = &[
    "password",
    "secret",
    "sasl.jaas",
    "sasl.oauthbearer.config",
    "token",
    "key",
    "credential",
];

/// Whether the value of librdkafka property `name` must be hidden from logs.
pub(crate) fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_FRAGMENTS
        .iter()
        .any(|fragment| name.contains(fragment))
}

/// What `Debug` shows instead of a secret value.
const REDACTED: &str = "<redacted>";

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(name, value)| {
                let shown = if is_secret_property(name) {
                    REDACTED
                } else {
                    value.as_str()
                };
                (name.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("client_id", &self.client_id)
            .field("fetch_wait_max_ms", &self.fetch_wait_max_ms)
            .field("linger_ms", &self.linger_ms)
            .field("compression", &self.compression)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("group_per_topic", &self.group_per_topic)
            .field("properties", &properties)
            .finish()
    }
}

/// librdkafka's default `fetch.max.bytes`; we only ever raise it.
const DEFAULT_FETCH_MAX_BYTES: usize = 52_428_800;

impl KafkaConfig {
    /// The Kafka consumer group backing subscription `group` on `topic`.
    pub(crate) fn group_id(&self, topic: &str, group: &str) -> String {
        if self.group_per_topic {
            format!("{topic}.{group}")
        } else {
            group.to_string()
        }
    }

    /// Timeout of admin requests, metadata look-ups and closing commits.
    pub(crate) fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.request_timeout_ms))
    }

    /// How long one publish may take.
    pub(crate) fn message_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.message_timeout_ms))
    }

    /// Checks what librdkafka would only reject later or not at all.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let fail = |what: String| Err(crate::BrokerError::Config(what));
        if self.bootstrap_servers.trim().is_empty() {
            return fail("kafka: bootstrap_servers is empty".into());
        }
        check_at_least("kafka", "partitions", self.partitions, 1)?;
        check_at_least("kafka", "replication_factor", self.replication_factor, 1)?;
        check_at_least(
            "kafka",
            "session_timeout_ms",
            self.session_timeout_ms,
            1_000,
        )?;
        check_between(
            "kafka",
            "message_max_bytes",
            self.message_max_bytes,
            1024..=1_000_000_000,
        )?;
        const CODECS: &[&str] = &["none", "gzip", "snappy", "lz4", "zstd"];
        if !CODECS.contains(&self.compression.as_str()) {
            return fail(format!(
                "kafka: compression must be one of {CODECS:?}, got {:?}",
                self.compression
            ));
        }
        Ok(())
    }

    /// Settings shared by every client: servers, id, timeouts.
    fn base(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        // Let every log line through to `tracing`, whose filter decides; librdkafka only
        // produces debug lines for the contexts named in the `debug` property.
        config.set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", format!("{}-{role}", self.client_id))
            .set("socket.timeout.ms", self.request_timeout_ms.to_string())
            // Topics are always created explicitly, with their partitions (see
            // `ensure_topic`); a typo must not create a one-partition topic.
            .set("allow.auto.create.topics", "false");
        config
    }

    /// Applies the pass-through `properties` over our defaults.
    fn with_properties(&self, mut config: ClientConfig) -> ClientConfig {
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        config
    }

    /// The largest [`crate::Message::size`] the producer sends: its `message.max.bytes`
    /// less the record framing ([`super::RECORD_FRAMING_BYTES`]).
    pub(crate) fn max_record_bytes(&self) -> usize {
        self.message_max_bytes
            .saturating_sub(super::RECORD_FRAMING_BYTES)
    }

    /// The idempotent producer's settings.
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut config = self.base("producer");
        config
            .set("linger.ms", self.linger_ms.to_string())
            .set("compression.type", &self.compression)
            .set("message.max.bytes", self.message_max_bytes.to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            // Java-compatible key hashing, so other Kafka clients agree on partitions.
            .set("partitioner", "murmur2_random");
        let mut config = self.with_properties(config);
        // Exactly-once per partition and order per key, even across internal retries.
        config.set("enable.idempotence", "true");
        config
    }

    /// The settings of one consumer-group member.
    pub(crate) fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.base("consumer");
        let fetch_max = self.message_max_bytes.max(DEFAULT_FETCH_MAX_BYTES);
        config
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string())
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            // librdkafka requires heartbeats well inside the session timeout.
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout_ms / 3).clamp(100, 3_000).to_string(),
            )
            .set(
                "max.partition.fetch.bytes",
                self.message_max_bytes.to_string(),
            )
            .set("fetch.max.bytes", fetch_max.to_string())
            // librdkafka requires room for a whole fetch response plus framing.
            .set(
                "receive.message.max.bytes",
                (fetch_max + 1024 * 1024).to_string(),
            )
            // A new group starts at the oldest retained message, so it gets what was
            // published before it first subscribed.
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        let mut config = self.with_properties(config);
        // What at-least-once rests on: we decide which offsets are committed.
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        config
    }

    /// The admin client's settings.
    pub(crate) fn admin(&self) -> ClientConfig {
        self.with_properties(self.base("admin"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let mut config = KafkaConfig::default();
        for (name, value) in [
            ("sasl.password", "hunter2-password"),
            ("sasl.jaas.config", "jaas-secret-value"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----abc"),
            ("ssl.key.password", "key-password-value"),
            ("ssl.keystore.password", "keystore-password-value"),
            ("sasl.oauthbearer.client.secret", "oauth-client-secret"),
            ("SASL.OAUTHBEARER.CONFIG", "principal=admin token=abc"),
            ("sasl.username", "alice"),
            ("security.protocol", "SASL_SSL"),
        ] {
            config.properties.insert(name.into(), value.into());
        }
        let shown = format!("{config:?}");
        for secret in [
            "hunter2",
            "jaas-secret",
            "PRIVATE KEY",
            "key-password",
            "keystore-password",
            "oauth-client",
            "token=abc",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked into {shown}");
        }
        assert!(shown.contains("alice"), "non-secret values stay visible");
        assert!(shown.contains("SASL_SSL"));
        assert!(shown.contains("sasl.password"), "names stay visible");
        assert!(shown.contains(REDACTED));
        // Through the enum the app logs, too.
        let shown = format!("{:?}", crate::BrokerConfig::Kafka(config));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn sasl_credentials_come_from_the_environment_and_stay_out_of_logs() {
        let mut broker = crate::BrokerConfig::Kafka(KafkaConfig::default());
        broker.apply_env(&|name| match name {
            "KAFKA_SASL_USERNAME" => Some("alice".into()),
            "KAFKA_SASL_PASSWORD" => Some("hunter2-from-env".into()),
            _ => None,
        });
        let crate::BrokerConfig::Kafka(config) = &broker else {
            panic!("still kafka");
        };
        let producer = config.producer();
        assert_eq!(producer.get("sasl.username"), Some("alice"));
        assert_eq!(producer.get("sasl.password"), Some("hunter2-from-env"));
        assert!(!format!("{broker:?}").contains("hunter2"));
    }

    #[test]
    fn guarantees_cannot_be_overridden() {
        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("enable.auto.commit".into(), "true".into());
        config
            .properties
            .insert("enable.idempotence".into(), "false".into());
        config.properties.insert("group.id".into(), "other".into());
        let consumer = config.consumer("mine");
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("group.id"), Some("mine"));
        assert_eq!(consumer.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.producer().get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn message_size_limits_are_consistent() {
        let config = KafkaConfig {
            message_max_bytes: 64 * 1024 * 1024,
            ..KafkaConfig::default()
        };
        let consumer = config.consumer("g");
        let number = |v: Option<&str>| v.and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let fetch = number(consumer.get("fetch.max.bytes"));
        assert!(fetch >= config.message_max_bytes);
        assert!(number(consumer.get("receive.message.max.bytes")) >= fetch + 512);
        assert_eq!(
            number(consumer.get("max.partition.fetch.bytes")),
            config.message_max_bytes
        );
        assert_eq!(
            number(config.producer().get("message.max.bytes")),
            config.message_max_bytes
        );
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(KafkaConfig::default().validate().is_ok());
        let bad = KafkaConfig {
            compression: "brotli".into(),
            ..KafkaConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = KafkaConfig {
            partitions: 0,
            ..KafkaConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn example_config_file_parses() {
        let crate::BrokerConfig::Kafka(config) = crate::example_config("kafka") else {
            panic!("config/kafka.toml selects another backend");
        };
        assert!(config.validate().is_ok());
    }
}
