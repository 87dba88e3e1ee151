//! Settings of the Pub/Sub backend and the credentials they select.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use google_cloud_auth::credentials::{self, Credentials};
use serde::{Deserialize, Serialize};

use crate::error::check_between;
use crate::{BrokerError, Result};

/// The standard variable Google's client libraries and tools read to find an emulator.
pub const EMULATOR_HOST_ENV: &str = "PUBSUB_EMULATOR_HOST";

/// Settings of the Pub/Sub backend, the `[broker]` table with `backend = "pubsub"`.
///
/// Every field has a default, so an empty table (plus `PUBSUB_EMULATOR_HOST`) is a
/// working configuration for the local emulator.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PubSubConfig {
    /// Google Cloud project that owns the topics and subscriptions. The emulator
    /// accepts any id.
    pub project_id: String,
    /// Emulator `host:port` (e.g. `127.0.0.1:8085`). When unset, `PUBSUB_EMULATOR_HOST`
    /// is used if present. With an emulator the client talks plain `http://` with
    /// anonymous credentials and never looks for real ones.
    pub emulator_host: Option<String>,
    /// Service endpoint override for real Pub/Sub (e.g. a regional endpoint such as
    /// `https://us-east1-pubsub.googleapis.com`); ignored with an emulator.
    pub endpoint: Option<String>,
    /// A service-account, user or external-account JSON credentials file. When unset
    /// (and no emulator), Application Default Credentials are used.
    pub credentials_file: Option<PathBuf>,
    /// The same JSON inline, e.g. injected from a secret store. Never printed.
    pub credentials_json: Option<String>,
    /// Publisher batching: send a batch once it holds this many messages (≤ 1000).
    pub batch_max_messages: u32,
    /// Publisher batching: send a batch once it holds this many bytes (≤ 10 MB).
    pub batch_max_bytes: u32,
    /// Publisher batching: send a batch at the latest this long after its first message.
    pub batch_max_delay_ms: u64,
    /// Per-key ordering: subscriptions are created with message ordering and messages
    /// with a key are published with it as their ordering key. Costs throughput
    /// (one batch in flight per key).
    pub enable_message_ordering: bool,
    /// Ack deadline of the subscriptions this backend creates, and the lease the
    /// subscriber keeps extending while a delivery is held (10–600 s).
    pub ack_deadline_seconds: u32,
    /// How long a held delivery's lease is extended in total before the message is
    /// given up for redelivery.
    pub max_lease_seconds: u64,
    /// How long a publish keeps retrying transient errors before failing.
    pub publish_timeout_seconds: u64,
}

impl Default for PubSubConfig {
    fn default() -> Self {
        PubSubConfig {
            project_id: "local-project".to_string(),
            emulator_host: None,
            endpoint: None,
            credentials_file: None,
            credentials_json: None,
            batch_max_messages: 100,
            batch_max_bytes: 1_000_000,
            batch_max_delay_ms: 10,
            enable_message_ordering: false,
            ack_deadline_seconds: 30,
            max_lease_seconds: 3_600,
            publish_timeout_seconds: 60,
        }
    }
}

impl fmt::Debug for PubSubConfig {
    // Inline credentials are secrets: say whether they are set, never what they are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubConfig")
            .field("project_id", &self.project_id)
            .field("emulator_host", &self.emulator_host)
            .field("endpoint", &self.endpoint)
            .field("credentials_file", &self.credentials_file)
            .field(
                "credentials_json",
                &self.credentials_json.as_ref().map(|_| "<redacted>"),
            )
            .field("batch_max_messages", &self.batch_max_messages)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("batch_max_delay_ms", &self.batch_max_delay_ms)
            .field("enable_message_ordering", &self.enable_message_ordering)
            .field("ack_deadline_seconds", &self.ack_deadline_seconds)
            .field("max_lease_seconds", &self.max_lease_seconds)
            .field("publish_timeout_seconds", &self.publish_timeout_seconds)
            .finish()
    }
}

impl PubSubConfig {
    /// Fills `emulator_host` from `PUBSUB_EMULATOR_HOST` (read with `lookup`) when the
    /// config leaves it unset; an explicit setting wins.
    pub fn apply_env(&mut self, lookup: &dyn Fn(&str) -> Option<String>) {
        if self.emulator_host.is_none() {
            self.emulator_host = lookup(EMULATOR_HOST_ENV).filter(|h| !h.trim().is_empty());
        }
    }

    /// Checks values the service would reject later with a less helpful message.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.project_id.trim().is_empty() {
            return Err(BrokerError::Config("pubsub: project_id is empty".into()));
        }
        check_between(
            "pubsub",
            "ack_deadline_seconds",
            self.ack_deadline_seconds,
            10..=600,
        )?;
        check_between(
            "pubsub",
            "batch_max_messages",
            self.batch_max_messages,
            1..=1000,
        )?;
        check_between(
            "pubsub",
            "batch_max_bytes",
            self.batch_max_bytes,
            1..=10_000_000,
        )?;
        if self.credentials_file.is_some() && self.credentials_json.is_some() {
            return Err(BrokerError::Config(
                "pubsub: set credentials_file or credentials_json, not both".into(),
            ));
        }
        Ok(())
    }

    /// Longest wait before a partial batch is sent.
    pub(crate) fn batch_delay(&self) -> Duration {
        Duration::from_millis(self.batch_max_delay_ms)
    }

    /// Where the clients connect and how they authenticate.
    pub(crate) fn connection(&self) -> Result<Connection> {
        if let Some(host) = &self.emulator_host {
            let host = host.trim();
            let endpoint = if host.starts_with("http://") || host.starts_with("https://") {
                host.to_string()
            } else {
                format!("http://{host}")
            };
            // Explicitly anonymous: without credentials the auth library would fall back
            // to Application Default Credentials and then to the metadata server.
            return Ok(Connection {
                endpoint: Some(endpoint),
                credentials: credentials::anonymous::Builder::new().build(),
                kind: CredentialsKind::Anonymous,
            });
        }
        let (credentials, kind) = if let Some(path) = &self.credentials_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BrokerError::Config(format!(
                    "pubsub: cannot read credentials_file {}: {e}",
                    path.display()
                ))
            })?;
            (credentials_from_json(&text)?, CredentialsKind::File)
        } else if let Some(text) = &self.credentials_json {
            (credentials_from_json(text)?, CredentialsKind::Inline)
        } else {
            let credentials = credentials::Builder::default().build().map_err(|e| {
                BrokerError::Config(format!(
                    "pubsub: no Application Default Credentials ({e}); set emulator_host \
                     for the emulator or credentials_file for real Pub/Sub"
                ))
            })?;
            (credentials, CredentialsKind::ApplicationDefault)
        };
        Ok(Connection {
            endpoint: self.endpoint.clone(),
            credentials,
            kind,
        })
    }
}

/// Builds credentials from a JSON credentials document of any supported type.
fn credentials_from_json(text: &str) -> Result<Credentials> {
    // The parse error can quote the document: do not pass it on.
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|_| BrokerError::Config("pubsub: credentials are not valid JSON".to_string()))?;
    let kind = json
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_string();
    let built = match kind.as_str() {
        "service_account" => credentials::service_account::Builder::new(json).build(),
        "authorized_user" => credentials::user_account::Builder::new(json).build(),
        "external_account" => credentials::external_account::Builder::new(json).build(),
        "impersonated_service_account" => credentials::impersonated::Builder::new(json).build(),
        other => {
            return Err(BrokerError::Config(format!(
                "pubsub: unsupported credentials type {other:?}"
            )))
        }
    };
    built.map_err(|e| BrokerError::Config(format!("pubsub: invalid {kind} credentials: {e}")))
}

/// Where to connect and with which credentials; built once and shared by all clients.
#[derive(Clone)]
pub(crate) struct Connection {
    pub(crate) endpoint: Option<String>,
    pub(crate) credentials: Credentials,
    pub(crate) kind: CredentialsKind,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.kind)
            .finish()
    }
}

/// Which credentials are in use, for logs (never their content).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CredentialsKind {
    Anonymous,
    File,
    Inline,
    ApplicationDefault,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "-----BEGIN PRIVATE KEY-----SUPERSECRET";

    #[test]
    fn emulator_host_comes_from_the_environment_when_unset() {
        let mut config = PubSubConfig::default();
        config.apply_env(&|name| (name == EMULATOR_HOST_ENV).then(|| "127.0.0.1:8085".into()));
        assert_eq!(config.emulator_host.as_deref(), Some("127.0.0.1:8085"));
        let connection = config.connection().expect("emulator connection");
        assert_eq!(
            connection.endpoint.as_deref(),
            Some("http://127.0.0.1:8085")
        );
        assert_eq!(connection.kind, CredentialsKind::Anonymous);
    }

    #[test]
    fn explicit_emulator_host_wins_over_the_environment() {
        let mut config = PubSubConfig {
            emulator_host: Some("127.0.0.1:9999".into()),
            ..Default::default()
        };
        config.apply_env(&|_| Some("127.0.0.1:8085".into()));
        assert_eq!(config.emulator_host.as_deref(), Some("127.0.0.1:9999"));
    }

    #[test]
    fn empty_environment_value_is_ignored() {
        let mut config = PubSubConfig::default();
        config.apply_env(&|_| Some("  ".into()));
        assert_eq!(config.emulator_host, None);
        let mut config = PubSubConfig::default();
        config.apply_env(&|_| None);
        assert_eq!(config.emulator_host, None);
    }

    #[test]
    fn broker_config_applies_the_standard_variable() {
        let mut config = crate::BrokerConfig::default_for("pubsub").expect("pubsub backend");
        config.apply_env(&|name| (name == EMULATOR_HOST_ENV).then(|| "127.0.0.1:8085".into()));
        match config {
            crate::BrokerConfig::Pubsub(config) => {
                assert_eq!(config.emulator_host.as_deref(), Some("127.0.0.1:8085"))
            }
            other => panic!("expected pubsub, got {other:?}"),
        }
    }

    #[test]
    fn debug_never_prints_inline_credentials() {
        let config = PubSubConfig {
            credentials_json: Some(format!(
                r#"{{"type":"service_account","private_key":"{SECRET}"}}"#
            )),
            ..Default::default()
        };
        let printed = format!("{config:?} {config:#?}");
        assert!(!printed.contains("SUPERSECRET"), "{printed}");
        assert!(!printed.contains("private_key"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn invalid_credentials_errors_do_not_quote_the_secret() {
        let config = PubSubConfig {
            credentials_json: Some(format!("{{ not json {SECRET}")),
            ..Default::default()
        };
        let error = config.connection().expect_err("invalid JSON");
        assert!(!error.to_string().contains("SUPERSECRET"), "{error}");
        let debug = format!("{error:?}");
        assert!(!debug.contains("SUPERSECRET"), "{debug}");
    }

    #[test]
    fn parses_from_toml_with_defaults() {
        let config: PubSubConfig = toml::from_str(
            r#"
            project_id = "demo"
            enable_message_ordering = true
            "#,
        )
        .expect("toml");
        assert_eq!(config.project_id, "demo");
        assert!(config.enable_message_ordering);
        assert_eq!(config.ack_deadline_seconds, 30);
        assert_eq!(config.emulator_host, None);
        config.validate().expect("valid");
    }

    #[test]
    fn rejects_out_of_range_values() {
        for config in [
            PubSubConfig {
                ack_deadline_seconds: 5,
                ..Default::default()
            },
            PubSubConfig {
                batch_max_messages: 5000,
                ..Default::default()
            },
            PubSubConfig {
                project_id: String::new(),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(config.validate(), Err(BrokerError::Config(_))),
                "{config:?}"
            );
        }
    }
}
