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
    /// because some brokers (Tansu) answer a fetch only when its wait ends, even when
    /// data arrived meanwhile: this bounds the delivery latency. 10 ms by default: one
    /// image through Tansu in 9 ms (12 ms at 20), the same throughput, an idle
    /// consumer's polling costing the broker 8.5% of a core (7% at 20); 5 with
    /// `linger_ms = 0` is the latency profile (6 ms, a fifth less throughput).
    /// Measured in `docs/benchmarks.md`, 2026-12-07.
    pub fetch_wait_max_ms: u32,
    /// How long the producer waits to fill a batch (`linger.ms`). 1 ms by default:
    /// under load, batches fill while earlier produce requests are in flight anyway, so
    /// a longer linger only adds latency to every hop (a request and its reply are two),
    /// while 0 sends many tiny requests (measured in `docs/benchmarks.md`).
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
            fetch_wait_max_ms: 10,
            linger_ms: 1,
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

/// The `security.protocol` values librdkafka knows (it compares them case-insensitively).
const SECURITY_PROTOCOLS: &[&str] = &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

/// The SASL mechanisms this build of librdkafka has (`sasl.mechanisms`): PLAIN and
/// OAUTHBEARER are built in, SCRAM needs only OpenSSL (which the `ssl-vendored` feature
/// links). GSSAPI (Kerberos), librdkafka's default mechanism, would need libsasl2 and the
/// `gssapi` feature, so it is not among them.
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// Properties that tell librdkafka which CAs to trust. With none of them, a TLS client
/// of ours trusts the system's store (see [`KafkaConfig::tls_defaults`]).
const CA_PROPERTIES: &[&str] = &["ssl.ca.location", "ssl.ca.pem"];

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
        self.validate_security()
    }

    /// The lower-cased `security.protocol` of the pass-through properties, if one is set.
    fn security_protocol(&self) -> Option<String> {
        self.properties
            .get("security.protocol")
            .map(|protocol| protocol.trim().to_ascii_lowercase())
    }

    /// Checks the security properties, so that a secured cluster's config fails at start
    /// with a message that says what to write, not with librdkafka's "No provider for
    /// SASL mechanism GSSAPI" (its default mechanism, which this build lacks) or a client
    /// that retries a misspelt protocol. Values shown are not secrets (protocol and
    /// mechanism names only).
    fn validate_security(&self) -> crate::Result<()> {
        let Some(protocol) = self.security_protocol() else {
            return Ok(());
        };
        if !SECURITY_PROTOCOLS.contains(&protocol.as_str()) {
            return Err(crate::BrokerError::Config(format!(
                "kafka: security.protocol must be one of {SECURITY_PROTOCOLS:?} \
                 (any case), got {protocol:?}"
            )));
        }
        if !protocol.starts_with("sasl_") {
            return Ok(());
        }
        // librdkafka accepts `sasl.mechanism` as an alias of `sasl.mechanisms`.
        let mechanism = self
            .properties
            .get("sasl.mechanisms")
            .or_else(|| self.properties.get("sasl.mechanism"))
            .map(|mechanism| mechanism.trim().to_ascii_uppercase());
        match mechanism {
            Some(mechanism) if SASL_MECHANISMS.contains(&mechanism.as_str()) => {
                // librdkafka would say "sasl.username and sasl.password must be set";
                // this also says where they usually come from.
                let needs_password = mechanism == "PLAIN" || mechanism.starts_with("SCRAM-");
                let missing = ["sasl.username", "sasl.password"]
                    .into_iter()
                    .find(|name| !self.properties.contains_key(*name));
                match missing {
                    Some(name) if needs_password => Err(crate::BrokerError::Config(format!(
                        "kafka: sasl.mechanisms {mechanism} needs {name} (set \
                         KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD in the environment, \
                         or the property)"
                    ))),
                    _ => Ok(()),
                }
            }
            Some(mechanism) => Err(crate::BrokerError::Config(format!(
                "kafka: sasl.mechanisms must be one of {SASL_MECHANISMS:?}, got \
                 {mechanism:?} (GSSAPI/Kerberos is not built in: it needs libsasl2)"
            ))),
            None => Err(crate::BrokerError::Config(format!(
                "kafka: security.protocol {protocol:?} needs sasl.mechanisms, one of \
                 {SASL_MECHANISMS:?} (librdkafka's default, GSSAPI/Kerberos, is not \
                 built in: it needs libsasl2)"
            ))),
        }
    }

    /// Defaults for TLS connections, applied only where the properties say nothing.
    ///
    /// OpenSSL is linked statically (rdkafka's `ssl-vendored` feature), so its built-in
    /// CA directory is the one OpenSSL was configured with (`/usr/local/ssl`), which no
    /// distribution fills: a client given no CA would trust nothing and fail every
    /// handshake with a managed cluster's public certificate. `ssl.ca.location=probe`
    /// makes librdkafka look in the usual places of the system's store instead
    /// (`/etc/ssl/certs/ca-certificates.crt` on Debian, `/etc/pki/tls/...` on Red Hat,
    /// and more). A CA given in `ssl.ca.location` or `ssl.ca.pem` is used as given.
    fn tls_defaults(&self) -> Vec<(&'static str, &'static str)> {
        let tls = matches!(
            self.security_protocol().as_deref(),
            Some("ssl" | "sasl_ssl")
        );
        let ca_given = CA_PROPERTIES
            .iter()
            .any(|name| self.properties.contains_key(*name));
        if tls && !ca_given {
            vec![("ssl.ca.location", "probe")]
        } else {
            Vec::new()
        }
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

    /// Applies the pass-through `properties` over our defaults, then the TLS defaults
    /// that only apply where the properties are silent ([`KafkaConfig::tls_defaults`]).
    fn with_properties(&self, mut config: ClientConfig) -> ClientConfig {
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        for (name, value) in self.tls_defaults() {
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
        without_statistics(self.with_properties(self.base("admin")))
    }

    /// Turns on librdkafka's statistics every `interval` (unless the properties already
    /// set an interval), for [`super::transport_counts`].
    pub(crate) fn enable_statistics(&mut self, interval: std::time::Duration) {
        self.properties
            .entry(STATISTICS_INTERVAL.to_string())
            .or_insert_with(|| interval.as_millis().max(1).to_string());
    }
}

/// librdkafka's property for how often a client reports its statistics.
const STATISTICS_INTERVAL: &str = "statistics.interval.ms";

/// `config` with statistics off: for clients that never poll their main queue (the
/// admin client, the backlog readers), where the reports would pile up unread.
pub(crate) fn without_statistics(mut config: ClientConfig) -> ClientConfig {
    config.set(STATISTICS_INTERVAL, "0");
    config
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

    /// A config with `security.protocol` (and, for SASL, a mechanism and credentials),
    /// pointed at an address where nothing listens: creating a client needs no broker.
    fn secured(protocol: &str, mechanism: Option<&str>) -> KafkaConfig {
        let mut config = KafkaConfig {
            bootstrap_servers: "127.0.0.1:9".into(),
            ..KafkaConfig::default()
        };
        config
            .properties
            .insert("security.protocol".into(), protocol.into());
        if let Some(mechanism) = mechanism {
            for (name, value) in [
                ("sasl.mechanisms", mechanism),
                ("sasl.username", "classifier"),
                ("sasl.password", "not-a-real-password"),
            ] {
                config.properties.insert(name.into(), value.into());
            }
        }
        config
    }

    /// Issue 28: `SSL` and `SASL_SSL` failed at client creation with "OpenSSL not
    /// available at build time". With rdkafka's `ssl-vendored` feature every secured
    /// setup the README names gets all three clients (producer, consumer, admin).
    #[test]
    fn secured_clients_can_be_created() {
        use rdkafka::admin::AdminClient;
        use rdkafka::client::DefaultClientContext;
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;
        for (protocol, mechanism) in [
            ("SSL", None),
            ("ssl", None),
            ("SASL_SSL", Some("SCRAM-SHA-512")),
            ("SASL_SSL", Some("SCRAM-SHA-256")),
            ("SASL_SSL", Some("PLAIN")),
            ("SASL_PLAINTEXT", Some("SCRAM-SHA-256")),
        ] {
            let config = secured(protocol, mechanism);
            let what = format!("{protocol} {mechanism:?}");
            config
                .validate()
                .unwrap_or_else(|error| panic!("{what}: {error}"));
            if let Err(error) = config.producer().create::<BaseProducer>() {
                panic!("{what}: producer: {error}");
            }
            if let Err(error) = config.consumer("g").create::<BaseConsumer>() {
                panic!("{what}: consumer: {error}");
            }
            if let Err(error) = config.admin().create::<AdminClient<DefaultClientContext>>() {
                panic!("{what}: admin: {error}");
            }
        }
    }

    #[test]
    fn tls_trusts_the_system_store_unless_a_ca_is_given() {
        let config = secured("SASL_SSL", Some("SCRAM-SHA-512"));
        assert_eq!(config.producer().get("ssl.ca.location"), Some("probe"));
        assert_eq!(config.consumer("g").get("ssl.ca.location"), Some("probe"));
        assert_eq!(config.admin().get("ssl.ca.location"), Some("probe"));

        let mut given = secured("SSL", None);
        given
            .properties
            .insert("ssl.ca.location".into(), "/etc/kafka/ca.pem".into());
        assert_eq!(
            given.producer().get("ssl.ca.location"),
            Some("/etc/kafka/ca.pem")
        );
        let mut pem = secured("SSL", None);
        pem.properties
            .insert("ssl.ca.pem".into(), "-----BEGIN CERTIFICATE-----".into());
        assert_eq!(pem.producer().get("ssl.ca.location"), None);

        // No TLS, no CA default.
        assert_eq!(
            KafkaConfig::default().producer().get("ssl.ca.location"),
            None
        );
        let plain_sasl = secured("SASL_PLAINTEXT", Some("PLAIN"));
        assert_eq!(plain_sasl.producer().get("ssl.ca.location"), None);
    }

    #[test]
    fn security_settings_this_build_lacks_are_refused_clearly() {
        let message = |config: &KafkaConfig| match config.validate() {
            Err(crate::BrokerError::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        };
        // GSSAPI: librdkafka's default mechanism, and the only one needing libsasl2.
        let no_mechanism = secured("SASL_SSL", None);
        let said = message(&no_mechanism);
        assert!(
            said.contains("sasl.mechanisms") && said.contains("GSSAPI"),
            "{said}"
        );
        let gssapi = secured("SASL_SSL", Some("GSSAPI"));
        assert!(message(&gssapi).contains("GSSAPI"));
        let mut alias = secured("SASL_SSL", Some("SCRAM-SHA-512"));
        alias.properties.remove("sasl.mechanisms");
        alias
            .properties
            .insert("sasl.mechanism".into(), "scram-sha-512".into());
        assert!(
            alias.validate().is_ok(),
            "the alias and any case are accepted"
        );

        let mut no_password = secured("SASL_SSL", Some("SCRAM-SHA-512"));
        no_password.properties.remove("sasl.password");
        let said = message(&no_password);
        assert!(
            said.contains("sasl.password") && said.contains("KAFKA_SASL_PASSWORD"),
            "{said}"
        );

        let typo = secured("TLS", None);
        assert!(message(&typo).contains("security.protocol"));
        assert!(secured("PLAINTEXT", None).validate().is_ok());
    }

    /// The shipped SASL_SSL example validates and gets its clients (before the feature it
    /// failed at start with "OpenSSL not available at build time"), with the password
    /// from the environment as its comment says. Its servers are replaced by an address
    /// where nothing listens: no lookups of example hosts.
    #[test]
    fn sasl_example_config_gets_its_clients() {
        use rdkafka::producer::BaseProducer;
        let mut broker = crate::example_config("kafka-sasl");
        broker.apply_env(&|name| match name {
            "KAFKA_SASL_PASSWORD" => Some("from-the-environment".into()),
            _ => None,
        });
        let crate::BrokerConfig::Kafka(mut config) = broker else {
            panic!("config/kafka-sasl.toml selects another backend");
        };
        assert_eq!(
            config
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("SASL_SSL")
        );
        config.validate().expect("the example validates");
        config.bootstrap_servers = "127.0.0.1:9".into();
        let producer = config.producer();
        assert_eq!(producer.get("ssl.ca.location"), Some("probe"));
        if let Err(error) = producer.create::<BaseProducer>() {
            panic!("config/kafka-sasl.toml: {error}");
        }
    }

    /// The TLS example (for scripts/kafka-tls-start.sh's listener) validates and keeps
    /// its own CA rather than the system store. Its CA file exists only while that
    /// listener runs, so no client is created here (tests/kafka_tls.rs connects).
    #[test]
    fn tls_example_config_validates() {
        let crate::BrokerConfig::Kafka(config) = crate::example_config("kafka-tls") else {
            panic!("config/kafka-tls.toml selects another backend");
        };
        config.validate().expect("the example validates");
        let producer = config.producer();
        assert_eq!(producer.get("security.protocol"), Some("SSL"));
        assert_eq!(
            producer.get("ssl.ca.location"),
            Some(".tools/run/kafka-tls-19094/ca.pem")
        );
    }

    #[test]
    fn example_config_file_parses() {
        let crate::BrokerConfig::Kafka(config) = crate::example_config("kafka") else {
            panic!("config/kafka.toml selects another backend");
        };
        assert!(config.validate().is_ok());
    }
}
