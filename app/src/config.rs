//! The application config file, shared by the server and the client: one TOML file with
//! a `[broker]` table (which backend and how to reach it), a `[server]` table and a
//! `[client]` table. Every field has a default, so no file at all means "embedded
//! broker, shipped model".
//!
//! Precedence, lowest first: defaults, the file (`--config` or `CLASSIFIER_CONFIG`),
//! environment variables (`CLASSIFIER_*`, see [`ENV_SETTINGS`], plus the brokers' own
//! standard variables such as `KAFKA_BOOTSTRAP_SERVERS` and `PUBSUB_EMULATOR_HOST`),
//! then command-line flags ([`AppConfig::apply_server_flags`] and its client twin). Environment variables and flags
//! go through one overlay ([`crate::overlay`]): a setting is named once, by its place in
//! the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use unified_broker::BrokerConfig;

use crate::overlay::{overlaid, with_text};

/// Default topic the client publishes requests to and servers consume.
pub const DEFAULT_REQUEST_TOPIC: &str = "classify-requests";
/// Default consumer group shared by all server replicas.
pub const DEFAULT_SERVER_GROUP: &str = "classifier-server";

/// Default prefix of reply topics: the client names its own `classify-replies-<job id>`.
pub const DEFAULT_REPLY_TOPIC_PREFIX: &str = "classify-replies-";

/// The environment variable that names a model directory.
pub const MODEL_DIR_ENV: &str = "CLASSIFIER_MODEL_DIR";

/// Limits on what one request may make the server do (`[server.limits]`): they protect
/// the server from hostile or accidental huge inputs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeLimits {
    /// Largest accepted broker message (request) in bytes.
    pub max_message_bytes: usize,
    /// Largest accepted image width in pixels.
    pub max_width: u32,
    /// Largest accepted image height in pixels.
    pub max_height: u32,
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Most memory the decoder may allocate for one image, in bytes.
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_message_bytes: 16 * 1024 * 1024,
            max_width: 16_384,
            max_height: 16_384,
            max_pixels: 40_000_000,
            max_decoded_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The `CLASSIFIER_*` environment variables and the `[server]` fields they set (besides
/// `CLASSIFIER_BROKER`, which picks the backend, and `CLASSIFIER_CONFIG`, the file).
/// An empty `CLASSIFIER_DEAD_LETTER_TOPIC` turns dead-lettering off.
pub const ENV_SETTINGS: &[(&str, &str)] = &[
    (MODEL_DIR_ENV, "model_dir"),
    ("CLASSIFIER_REQUEST_TOPIC", "request_topic"),
    ("CLASSIFIER_GROUP", "group"),
    ("CLASSIFIER_DEAD_LETTER_TOPIC", "dead_letter_topic"),
    ("CLASSIFIER_SERVER_ID", "server_id"),
    ("CLASSIFIER_MODEL_POLL_MS", "model_poll_ms"),
    ("CLASSIFIER_METRICS_ADDR", "metrics_addr"),
    ("CLASSIFIER_BACKLOG_POLL_SECS", "backlog_poll_secs"),
];

/// The whole config file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Which broker, and its settings.
    pub broker: BrokerConfig,
    /// Model server settings.
    pub server: ServerConfig,
    /// Client settings.
    pub client: ClientConfig,
    /// HTTP gateway settings (`classifier-gateway`).
    pub gateway: GatewayConfig,
}

/// Settings of the model server.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Directory holding `model.safetensors` and `metadata.json`; unset means the
    /// per-user model directory if it holds one, else the model built into the binary
    /// (see `classifier_server::model_source`).
    pub model_dir: Option<PathBuf>,
    /// Topic requests arrive on.
    pub request_topic: String,
    /// Consumer group (Pub/Sub: subscription) shared by all replicas.
    pub group: String,
    /// Name of this replica in replies and logs; a random one if empty.
    pub server_id: String,
    /// Largest batch the model runs at once.
    pub max_batch_size: usize,
    /// How long a partial batch waits for more requests.
    pub max_batch_wait_ms: u64,
    /// Requests taken from the broker and not yet acked, at most.
    pub max_in_flight: usize,
    /// Predictions per reply when the request does not say.
    pub default_top_k: usize,
    /// On SIGTERM, how long to finish in-flight work before giving up on it (it is then
    /// redelivered by the broker, not lost).
    pub drain_timeout_secs: u64,
    /// Topic that receives a copy (original bytes + reason) of every request that can
    /// never succeed; empty disables it.
    pub dead_letter_topic: String,
    /// Subscription created on the dead-letter topic so that copies are kept for
    /// inspection (Pub/Sub drops messages of topics without subscriptions); empty
    /// creates none.
    pub dead_letter_subscription: String,
    /// Limits that protect the server from hostile or accidental huge inputs.
    pub limits: DecodeLimits,
    /// More models to serve, each under its name (`[[server.models]]` with `name` and
    /// `dir`, or `--model NAME=DIR`); requests choose one by name. Without `model_dir`,
    /// the first of them is the default model (else `model_dir`'s model is).
    pub models: Vec<NamedModel>,
    /// How often model directories are checked for a new model, in milliseconds (a
    /// model that loads replaces the old one between batches); 0 checks only on SIGHUP.
    pub model_poll_ms: u64,
    /// Where to serve Prometheus metrics (`/metrics`) and health probes (`/healthz`,
    /// `/readyz`) over HTTP, e.g. `127.0.0.1:9464`; unset serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// SHA-256 digests (64 hex digits) of the bearer tokens that may read `/metrics`
    /// (`printf %s TOKEN | sha256sum`); empty leaves it open. `/healthz` and `/readyz`
    /// stay open either way, for probes.
    pub metrics_token_sha256: Vec<String>,
    /// The server publishes replies only to topics that start with this (the client
    /// names its reply topics `classify-replies-<job id>`); requests naming any other
    /// reply topic are dead-lettered as `UNROUTABLE`, so a peer that can write requests
    /// cannot make the server publish into other topics. Empty allows any topic the
    /// broker accepts.
    pub reply_topic_prefix: String,
    /// `/readyz` reports a server as stalled when requests are in flight and none has
    /// finished for this many seconds (e.g. every reply publish keeps failing), so an
    /// orchestrator can restart it or stop routing to it.
    pub stall_after_secs: u64,
    /// A request whose deadline (`ClassifyRequest.deadline_unix_micros`, set by the
    /// client) passed more than this many milliseconds before the server took it is
    /// answered `DEADLINE_EXCEEDED` without running the model: the allowance for the
    /// clocks of client and server disagreeing.
    pub deadline_grace_ms: u64,
    /// How often the group's backlog is asked of the broker (`Broker::backlog`), in
    /// seconds, for the gauges an autoscaler reads (`classifier_backlog_messages`,
    /// `classifier_backlog_drain_seconds`); 0 asks never. Also the period of
    /// `classifier-server backlog-exporter`.
    pub backlog_poll_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_dir: None,
            request_topic: DEFAULT_REQUEST_TOPIC.to_string(),
            group: DEFAULT_SERVER_GROUP.to_string(),
            server_id: String::new(),
            max_batch_size: 64,
            max_batch_wait_ms: 2,
            max_in_flight: 512,
            default_top_k: 3,
            drain_timeout_secs: 30,
            dead_letter_topic: "classify-dead-letter".to_string(),
            dead_letter_subscription: "dead-letter-inspection".to_string(),
            limits: DecodeLimits::default(),
            models: Vec::new(),
            model_poll_ms: 2_000,
            metrics_addr: None,
            metrics_token_sha256: Vec::new(),
            reply_topic_prefix: DEFAULT_REPLY_TOPIC_PREFIX.to_string(),
            stall_after_secs: 60,
            deadline_grace_ms: 1000,
            backlog_poll_secs: 5,
        }
    }
}

impl ServerConfig {
    /// `max_batch_wait_ms` as a duration.
    pub fn max_batch_wait(&self) -> Duration {
        Duration::from_millis(self.max_batch_wait_ms)
    }

    /// `drain_timeout_secs` as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// `deadline_grace_ms` as a duration.
    pub fn deadline_grace(&self) -> Duration {
        Duration::from_millis(self.deadline_grace_ms)
    }

    /// `stall_after_secs` as a duration.
    pub fn stall_after(&self) -> Duration {
        Duration::from_secs(self.stall_after_secs)
    }

    /// `backlog_poll_secs` as a duration, `None` for 0 (no polling), at most an hour (a
    /// larger period would say nothing an autoscaler could use, and one near `u64::MAX`
    /// would overflow the timer).
    pub fn backlog_poll(&self) -> Option<Duration> {
        const LONGEST: u64 = 3_600;
        (self.backlog_poll_secs > 0)
            .then(|| Duration::from_secs(self.backlog_poll_secs.min(LONGEST)))
    }

    /// `model_poll_ms` as a duration, `None` for 0 (no polling).
    pub fn model_poll(&self) -> Option<Duration> {
        (self.model_poll_ms > 0).then(|| Duration::from_millis(self.model_poll_ms))
    }
}

/// A model served under a name of its own (see [`ServerConfig::models`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamedModel {
    /// The name requests ask for.
    pub name: String,
    /// Its directory (model.safetensors + metadata.json).
    pub dir: PathBuf,
}

impl std::str::FromStr for NamedModel {
    type Err = String;

    /// `NAME=DIR`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok(NamedModel {
                name: name.to_string(),
                dir: PathBuf::from(dir),
            }),
            _ => Err(format!("{text:?} is not NAME=DIR")),
        }
    }
}

/// Settings of the client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Requests sent and not yet answered, at most. 512 by default: on Kafka (Tansu) 256
    /// left the servers waiting on fetches, 512 ran 9,968-10,265 images/s against
    /// 8,720-9,211 (AMD EPYC Zen 4, 2 vCPUs; `docs/benchmarks.md`, 2026-12-08);
    /// `max_in_flight_bytes` keeps a folder of large photos from holding 512 of them.
    pub window: usize,
    /// Bytes of requests sent and not yet answered, at most (each is kept until its
    /// answer, to be sent again if the broker loses it). One request larger than this
    /// still goes, alone.
    pub max_in_flight_bytes: usize,
    /// Give up when no reply arrived for this long.
    pub reply_timeout_secs: u64,
    /// Files larger than this are reported as errors without being read.
    pub max_file_bytes: usize,
    /// Largest request sent, when less than the broker's own limit; larger ones are
    /// reported as `FILE_TOO_LARGE` (or downscaled, with `resize_to`).
    pub max_request_bytes: Option<usize>,
    /// Images whose request would exceed the size limit are downscaled to fit this many
    /// pixels a side and re-encoded as PNG before sending; unset reports them as
    /// `FILE_TOO_LARGE`.
    pub resize_to: Option<u32>,
    /// Predictions to ask for per image.
    pub top_k: usize,
    /// Which of the servers' models should answer; empty: their default model.
    pub model_name: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            window: 512,
            max_in_flight_bytes: 256 * 1024 * 1024,
            reply_timeout_secs: 60,
            max_file_bytes: 16 * 1024 * 1024,
            max_request_bytes: None,
            resize_to: None,
            top_k: 3,
            model_name: String::new(),
        }
    }
}

/// Settings of the HTTP gateway (`classifier-gateway`): where it listens, who may use
/// it, and the limits that keep one caller from holding it all.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to serve HTTP on. Beyond loopback only with `api_key_sha256` set.
    pub listen: SocketAddr,
    /// SHA-256 digests (hex) of the API keys accepted as `Authorization: Bearer <key>`
    /// (`classifier-gateway hash-key` prints one). Empty: no keys, loopback only.
    pub api_key_sha256: Vec<String>,
    /// Model names to list besides the servers' default model (the names of their
    /// `[[server.models]]`); any name the servers serve can be asked for anyway.
    pub models: Vec<String>,
    /// Longest wait for the servers' answers to one HTTP request, in seconds (a request
    /// may ask for less with the `timeout` parameter, in microseconds).
    pub request_timeout_secs: u64,
    /// Largest HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// Most images in one inference request.
    pub max_images_per_request: usize,
    /// Most images waiting for the servers' answers at once, over all callers; beyond
    /// that a request waits (until its timeout) for room.
    pub max_pending: usize,
    /// How long what the servers said about a model (version, class names) is reused
    /// before it is asked again, in seconds.
    pub model_info_ttl_secs: u64,
    /// Most HTTP connections open at once; new ones beyond are closed at once.
    pub max_connections: usize,
    /// A request's headers and body must arrive within this many seconds.
    pub read_timeout_secs: u64,
    /// Where jobs keep their uploaded files until deleted (`spool/`) and, without
    /// `database_url`, their SQLite database (`jobs.db`); unset: the per-user data
    /// directory (`~/.local/share/image-classifier/gateway`).
    pub data_dir: Option<PathBuf>,
    /// The jobs database: `sqlite://PATH` or `postgres://USER@HOST/DB`; unset: SQLite in
    /// `data_dir`.
    pub database_url: Option<String>,
    /// Largest upload of one job (all its files, or its archive), in bytes.
    pub max_job_bytes: u64,
    /// Most files in one job.
    pub max_job_files: usize,
    /// Most bytes an uploaded archive may expand to (zip bombs are refused).
    pub max_archive_expansion_bytes: u64,
    /// Images of one job waiting for replies at once.
    pub job_window: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_key_sha256: Vec::new(),
            models: Vec::new(),
            request_timeout_secs: 30,
            max_body_bytes: 64 * 1024 * 1024,
            max_images_per_request: 256,
            max_pending: 4096,
            model_info_ttl_secs: 30,
            max_connections: 1024,
            read_timeout_secs: 30,
            data_dir: None,
            database_url: None,
            max_job_bytes: 1024 * 1024 * 1024,
            max_job_files: 100_000,
            max_archive_expansion_bytes: 4 * 1024 * 1024 * 1024,
            job_window: 256,
        }
    }
}

impl AppConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Defaults, then the file if given (or named by `CLASSIFIER_CONFIG`), then the
    /// environment. Flags are applied by the binaries afterwards.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let from_env = std::env::var_os("CLASSIFIER_CONFIG").map(PathBuf::from);
        let mut config = match path.map(Path::to_path_buf).or(from_env) {
            Some(path) => Self::from_file(&path)?,
            None => AppConfig::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Applies `CLASSIFIER_*` overrides ([`ENV_SETTINGS`]) and the broker's standard
    /// variables. `lookup` reads a variable (injected so tests need not touch the
    /// process environment).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(backend) = lookup("CLASSIFIER_BROKER") {
            self.select_backend(&backend)?;
        }
        for (name, field) in ENV_SETTINGS {
            if let Some(text) = lookup(name) {
                self.server = with_text(&self.server, field, &text)
                    .with_context(|| format!("{name}={text:?} is not a valid server.{field}"))?;
            }
        }
        self.broker.apply_env(&lookup);
        Ok(())
    }

    /// Lays a binary's `[server]` flags over the config: `flags` serializes with the
    /// names of the fields it sets (a flag left out, `None`, keeps the config's value),
    /// so each flag is declared once, with its place in the file, instead of copied
    /// field by field.
    pub fn apply_server_flags(&mut self, flags: &impl Serialize) -> anyhow::Result<()> {
        self.server = overlaid(&self.server, flags).context("invalid server flags")?;
        Ok(())
    }

    /// Lays a binary's `[client]` flags over the config, as
    /// [`AppConfig::apply_server_flags`] does for `[server]`.
    pub fn apply_client_flags(&mut self, flags: &impl Serialize) -> anyhow::Result<()> {
        self.client = overlaid(&self.client, flags).context("invalid client flags")?;
        Ok(())
    }

    /// Lays a binary's `[gateway]` flags over the config, as
    /// [`AppConfig::apply_server_flags`] does for `[server]`.
    pub fn apply_gateway_flags(&mut self, flags: &impl Serialize) -> anyhow::Result<()> {
        self.gateway = overlaid(&self.gateway, flags).context("invalid gateway flags")?;
        Ok(())
    }

    /// Applies `--broker`: switches backend (keeping the file's settings for the same
    /// backend) and re-reads the new backend's standard variables.
    pub fn apply_broker_flag(&mut self, backend: Option<&str>) -> anyhow::Result<()> {
        if let Some(backend) = backend {
            self.select_backend(backend)?;
            self.broker.apply_env(&|name| std::env::var(name).ok());
        }
        Ok(())
    }

    /// Switches to another backend by name, keeping the current settings if it is the
    /// same backend (so `--broker kafka` with a kafka config file changes nothing).
    pub fn select_backend(&mut self, backend: &str) -> anyhow::Result<()> {
        if self.broker.backend() != backend {
            self.broker = BrokerConfig::default_for(backend)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_embedded_broker_and_shipped_model() {
        let config = AppConfig::default();
        assert_eq!(config.broker.backend(), "embedded");
        assert_eq!(config.server.model_dir, None);
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                AppConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no example configs found in {}", dir.display());
    }

    #[test]
    fn environment_overrides_file_and_backend_switch_keeps_same_backend() {
        let mut config: AppConfig = toml::from_str(
            "[broker]\nbackend = \"embedded\"\nmax_backlog_per_group = 7\n[server]\nmax_batch_size = 8\n",
        )
        .expect("parses");
        config
            .apply_env(|name| match name {
                "CLASSIFIER_BROKER" => Some("embedded".into()),
                "CLASSIFIER_REQUEST_TOPIC" => Some("other-requests".into()),
                _ => None,
            })
            .expect("applies");
        assert_eq!(config.server.request_topic, "other-requests");
        assert_eq!(config.server.max_batch_size, 8);
        assert_eq!(
            config.broker,
            BrokerConfig::Embedded(unified_broker::embedded::EmbeddedConfig {
                max_backlog_per_group: 7,
                ..Default::default()
            })
        );
    }

    #[test]
    fn environment_values_are_typed_by_their_setting() {
        let mut config = AppConfig::default();
        config
            .apply_env(|name| match name {
                "CLASSIFIER_MODEL_POLL_MS" => Some("250".into()),
                "CLASSIFIER_METRICS_ADDR" => Some("127.0.0.1:9464".into()),
                "CLASSIFIER_SERVER_ID" => Some("42".into()),
                "CLASSIFIER_MODEL_DIR" => Some("/srv/models/a".into()),
                "CLASSIFIER_DEAD_LETTER_TOPIC" => Some(String::new()),
                "CLASSIFIER_BACKLOG_POLL_SECS" => Some("1".into()),
                _ => None,
            })
            .expect("applies");
        assert_eq!(config.server.model_poll_ms, 250);
        assert_eq!(config.server.backlog_poll(), Some(Duration::from_secs(1)));
        assert_eq!(
            config.server.metrics_addr,
            Some("127.0.0.1:9464".parse().expect("address"))
        );
        assert_eq!(config.server.server_id, "42");
        assert_eq!(
            config.server.model_dir,
            Some(PathBuf::from("/srv/models/a"))
        );
        assert_eq!(config.server.dead_letter_topic, "");
    }

    #[test]
    fn a_bad_environment_value_names_its_variable() {
        for (name, value) in [
            ("CLASSIFIER_MODEL_POLL_MS", "soon"),
            ("CLASSIFIER_METRICS_ADDR", "nine-four-six-four"),
        ] {
            let error = AppConfig::default()
                .apply_env(|asked| (asked == name).then(|| value.to_string()))
                .expect_err("rejected");
            let text = format!("{error:#}");
            assert!(text.contains(name) && text.contains(value), "{text}");
        }
    }

    #[derive(Serialize)]
    struct ServerFlags {
        group: Option<String>,
        #[serde(rename = "model_dir")]
        model: Option<PathBuf>,
    }

    #[derive(Serialize)]
    struct ClientFlags {
        window: Option<usize>,
        #[serde(rename = "reply_timeout_secs")]
        timeout: Option<u64>,
        #[serde(rename = "max_request_bytes")]
        max_bytes: Option<usize>,
    }

    #[test]
    fn flags_given_override_and_flags_left_out_keep_the_config() {
        let mut config: AppConfig = toml::from_str(
            "[server]\ngroup = \"from-file\"\nmax_batch_size = 8\n[client]\nwindow = 9\n",
        )
        .expect("parses");
        let server = ServerFlags {
            group: None,
            model: Some(PathBuf::from("models/x")),
        };
        let client = ClientFlags {
            window: None,
            timeout: Some(5),
            max_bytes: Some(1000),
        };
        config
            .apply_server_flags(&server)
            .expect("server flags apply");
        config
            .apply_client_flags(&client)
            .expect("client flags apply");
        assert_eq!(config.server.group, "from-file");
        assert_eq!(config.server.max_batch_size, 8);
        assert_eq!(config.server.model_dir, Some(PathBuf::from("models/x")));
        assert_eq!(config.client.window, 9);
        assert_eq!(config.client.reply_timeout_secs, 5);
        assert_eq!(config.client.max_request_bytes, Some(1000));
    }

    #[test]
    fn a_flag_naming_no_setting_is_an_error() {
        #[derive(Serialize)]
        struct Misspelt {
            windoe: Option<usize>,
        }
        let error = AppConfig::default()
            .apply_client_flags(&Misspelt { windoe: Some(3) })
            .expect_err("rejected");
        assert!(format!("{error:#}").contains("windoe"), "{error:#}");
    }

    #[test]
    fn unknown_backend_is_a_clear_error() {
        let mut config = AppConfig::default();
        let error = config
            .select_backend("carrier-pigeon")
            .expect_err("rejected");
        assert!(format!("{error:#}").contains("carrier-pigeon"), "{error:#}");
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let kafka: AppConfig = toml::from_str(
            "[broker]\nbackend = \"kafka\"\n[broker.properties]\n\"sasl.password\" = \"hunter2-kafka\"\n\"ssl.key.password\" = \"hunter3-key\"\n",
        )
        .expect("kafka config parses");
        let pubsub: AppConfig = toml::from_str(
            "[broker]\nbackend = \"pubsub\"\ncredentials_json = '{\"private_key\": \"hunter4-pem\"}'\n",
        )
        .expect("pubsub config parses");
        for (config, secrets) in [
            (&kafka, &["hunter2-kafka", "hunter3-key"][..]),
            (&pubsub, &["hunter4-pem"][..]),
        ] {
            for text in [
                format!("{config:?}"),
                format!("{config:#?}"),
                format!("{:?}", config.broker),
            ] {
                for secret in secrets {
                    assert!(!text.contains(secret), "{secret} leaked into {text}");
                }
            }
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<AppConfig>("[server]\nmax_batch_sise = 3\n").is_err());
    }
}
