//! Settings of the Redis Streams backend.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{check_at_least, check_between};
use crate::{BrokerError, Result};

/// The variable that overrides [`RedisConfig::url`], as many Redis tools read it.
pub const URL_ENV: &str = "REDIS_URL";

/// Longest `claim_idle_ms` accepted. Entries given back to the group are marked idle for
/// [`GIVE_BACK_IDLE`], which must exceed it, so any member's next claim takes them.
const MAX_CLAIM_IDLE_MS: u64 = 24 * 60 * 60 * 1000;

/// How idle an entry given back by a closing subscriber (or nacked after it closed) is
/// made to look: more than any allowed `claim_idle_ms`.
pub(crate) const GIVE_BACK_IDLE: Duration = Duration::from_secs(2 * 24 * 60 * 60);

/// Settings of the Redis backend, read from the `[broker]` table (`backend = "redis"`).
///
/// Every field has a default, so `backend = "redis"` alone talks to the server that
/// `scripts/redis-start.sh` starts (`redis://127.0.0.1:6380`). `Debug` hides the
/// password of the URL, so the whole config can be logged.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Where the server is: `redis://[user:password@]host:port[/db]`, `rediss://` for TLS
    /// (not built in), or a bare `host:port`. Overridden by `REDIS_URL`.
    pub url: String,
    /// Approximate upper bound on entries kept per stream: every publish trims with
    /// `XADD … MAXLEN ~ max_len`. Trimming does not look at consumer groups: an entry
    /// trimmed before every group acked it is lost to the groups that did not (logged
    /// when a claim finds it gone). Keep it well above any backlog you expect.
    pub max_len: u64,
    /// How long an entry may stay delivered and unacked before another member of the
    /// group takes it over (`XAUTOCLAIM` min idle time): how fast a crashed member's
    /// messages come back. Live members keep what they hold from looking idle (they
    /// re-claim it for themselves every third of this), so slow work is not stolen.
    pub claim_idle_ms: u64,
    /// How often every subscriber looks for entries to take over (those idle longer
    /// than `claim_idle_ms`, and those a closing member gave back); also the longest
    /// time one blocking read waits for new entries.
    pub claim_interval_ms: u64,
    /// Entries fetched per read (`XREADGROUP … COUNT`), at most; fewer when the
    /// subscriber's flow-control room is smaller.
    pub read_count: usize,
    /// Timeout of connecting and of each command (the blocking read gets this on top of
    /// its own wait).
    pub request_timeout_ms: u64,
    /// Largest message ([`crate::Message::size`]) published; larger ones fail with
    /// [`crate::BrokerError::MessageTooLarge`] before they are sent. Redis itself takes
    /// values up to its `proto-max-bulk-len` (512 MB), but every entry stays in the
    /// server's memory until trimmed, so this is kept to what one image needs.
    pub max_message_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6380".to_string(),
            max_len: 1_000_000,
            claim_idle_ms: 30_000,
            claim_interval_ms: 1_000,
            read_count: 100,
            request_timeout_ms: 10_000,
            max_message_bytes: 32 * 1024 * 1024,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted_url(&self.url))
            .field("max_len", &self.max_len)
            .field("claim_idle_ms", &self.claim_idle_ms)
            .field("claim_interval_ms", &self.claim_interval_ms)
            .field("read_count", &self.read_count)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

/// The URL with any password replaced, for logs.
pub(crate) fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:<redacted>@{host}")
        }
        None => url.to_string(),
    }
}

impl RedisConfig {
    /// Takes `url` from `REDIS_URL` (read with `lookup`) when that is set and not empty.
    pub fn apply_env(&mut self, lookup: &dyn Fn(&str) -> Option<String>) {
        if let Some(url) = lookup(URL_ENV).filter(|url| !url.trim().is_empty()) {
            self.url = url;
        }
    }

    /// The server's `host:port` (without credentials or database); `None` for a Unix
    /// socket.
    pub(crate) fn server_address(&self) -> Option<String> {
        let url = self.connection_url();
        let (_, rest) = url.split_once("://")?;
        let host_port = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let host_port = host_port.split('/').next().unwrap_or_default();
        (!host_port.is_empty()).then(|| host_port.to_string())
    }

    /// The URL the client connects to: a bare `host:port` gets the `redis://` scheme.
    pub(crate) fn connection_url(&self) -> String {
        let url = self.url.trim();
        if url.contains("://") || url.starts_with("unix:") {
            url.to_string()
        } else {
            format!("redis://{url}")
        }
    }

    /// Checks what would otherwise only fail later or behave oddly.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.url.trim().is_empty() {
            return Err(BrokerError::Config("redis: url is empty".into()));
        }
        check_at_least("redis", "max_len", self.max_len, 1_000)?;
        check_between(
            "redis",
            "claim_idle_ms",
            self.claim_idle_ms,
            100..=MAX_CLAIM_IDLE_MS,
        )?;
        check_between(
            "redis",
            "claim_interval_ms",
            self.claim_interval_ms,
            10..=60_000,
        )?;
        check_between("redis", "read_count", self.read_count, 1..=10_000)?;
        check_at_least("redis", "request_timeout_ms", self.request_timeout_ms, 100)
    }

    pub(crate) fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms)
    }

    pub(crate) fn claim_interval(&self) -> Duration {
        Duration::from_millis(self.claim_interval_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_address_leaves_out_credentials_and_database() {
        let address = |url: &str| {
            RedisConfig {
                url: url.into(),
                ..RedisConfig::default()
            }
            .server_address()
        };
        assert_eq!(
            address("redis://user:secret@10.0.0.7:6390/2").as_deref(),
            Some("10.0.0.7:6390")
        );
        assert_eq!(address("127.0.0.1:6380").as_deref(), Some("127.0.0.1:6380"));
        assert_eq!(address("unix:/run/redis.sock"), None);
    }

    #[test]
    fn debug_hides_the_password() {
        let config = RedisConfig {
            url: "redis://reader:hunter2@cache.internal:6379/0".into(),
            ..RedisConfig::default()
        };
        let shown = format!(
            "{config:?} {:?}",
            crate::BrokerConfig::Redis(config.clone())
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("reader:<redacted>@cache.internal:6379/0"),
            "{shown}"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6380"),
            "redis://127.0.0.1:6380"
        );
    }

    #[test]
    fn redis_url_overrides_the_file_and_bare_addresses_work() {
        let mut config = crate::BrokerConfig::default_for("redis").expect("redis backend");
        config.apply_env(&|name| (name == URL_ENV).then(|| "127.0.0.1:46379".into()));
        let crate::BrokerConfig::Redis(config) = config else {
            panic!("default_for(\"redis\") gave another backend");
        };
        assert_eq!(config.url, "127.0.0.1:46379");
        assert_eq!(config.connection_url(), "redis://127.0.0.1:46379");
        let mut unchanged = RedisConfig::default();
        unchanged.apply_env(&|_| Some(" ".into()));
        assert_eq!(unchanged, RedisConfig::default());
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(RedisConfig::default().validate().is_ok());
        for bad in [
            RedisConfig {
                max_len: 10,
                ..RedisConfig::default()
            },
            RedisConfig {
                claim_idle_ms: MAX_CLAIM_IDLE_MS + 1,
                ..RedisConfig::default()
            },
            RedisConfig {
                read_count: 0,
                ..RedisConfig::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(BrokerError::Config(_))),
                "{bad:?}"
            );
        }
        assert!(GIVE_BACK_IDLE > Duration::from_millis(MAX_CLAIM_IDLE_MS));
    }

    #[test]
    fn example_config_file_parses() {
        let crate::BrokerConfig::Redis(config) = crate::example_config("redis") else {
            panic!("config/redis.toml selects another backend");
        };
        assert!(config.validate().is_ok());
    }
}
