//! The one error type every backend returns, so callers can decide what is retryable
//! without knowing which broker is in use.

/// What went wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration is invalid or incomplete (never retryable).
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// The topic does not exist (create it with `ensure_topic`).
    #[error("topic not found: {0}")]
    TopicNotFound(String),
    /// The broker can never publish to a topic of this name: it breaks the backend's
    /// naming rules ([`crate::Broker::check_topic_name`]: too long, illegal characters,
    /// a NUL byte) or the name is taken by something that is not a topic (a Redis key of
    /// another type). Final, never retryable: the same publish fails the same way.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The name, cut to [`MAX_TOPIC_IN_ERROR`] characters and escaped (it may come
        /// from an untrusted peer).
        topic: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The broker could not be reached or the connection broke (retryable).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A publish was not confirmed by the broker.
    #[error("publish to {topic} failed: {reason}")]
    Publish {
        /// Topic the message was meant for.
        topic: String,
        /// What the backend said.
        reason: String,
    },
    /// Creating or deleting a topic or subscription failed.
    #[error("admin operation failed: {0}")]
    Admin(String),
    /// Receiving, acking or nacking failed.
    #[error("subscription failed: {0}")]
    Subscribe(String),
    /// The client or subscription was closed.
    #[error("closed")]
    Closed,
    /// An operation did not complete in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A message is larger than the broker accepts (never retryable: the same message
    /// will be refused again). Checked before publishing against
    /// [`crate::Broker::max_message_bytes`], and what a broker's own size rejection maps to.
    #[error("message of {size} bytes is larger than the broker accepts ({limit} bytes at most)")]
    MessageTooLarge {
        /// The message's [`crate::Message::size`] (0 when the broker did not say).
        size: usize,
        /// The limit it exceeded (0 when the broker did not say).
        limit: usize,
    },
}

impl BrokerError {
    /// Whether trying the same operation again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BrokerError::Unavailable(_)
                | BrokerError::Publish { .. }
                | BrokerError::Timeout(_)
                | BrokerError::Subscribe(_)
        )
    }
}

/// How many characters of a topic name an [`BrokerError::InvalidTopic`] keeps: names
/// come from untrusted peers, and a 1 MB name must not become a 1 MB error or log line.
pub const MAX_TOPIC_IN_ERROR: usize = 80;

impl BrokerError {
    /// An [`BrokerError::InvalidTopic`] for `topic`, its name cut and escaped for logs.
    pub fn invalid_topic(topic: &str, reason: impl Into<String>) -> BrokerError {
        BrokerError::InvalidTopic {
            topic: shown_topic(topic),
            reason: reason.into(),
        }
    }
}

/// `topic` as errors show it: escaped, and cut to [`MAX_TOPIC_IN_ERROR`] characters.
pub(crate) fn shown_topic(topic: &str) -> String {
    let mut shown: String = topic
        .chars()
        .take(MAX_TOPIC_IN_ERROR)
        .flat_map(char::escape_debug)
        .collect();
    if topic.chars().count() > MAX_TOPIC_IN_ERROR {
        shown.push_str(&format!("… ({} bytes)", topic.len()));
    }
    shown
}

/// `Err(`[`BrokerError::InvalidTopic`]`)` for an empty `topic` or one longer than
/// `max_bytes`: the naming rule of the backends whose brokers take any string as a name
/// (Redis keys, the embedded broker), where only the length needs a bound (names come
/// from untrusted peers, and every name is kept in memory, sent and logged).
pub(crate) fn check_topic_length(topic: &str, max_bytes: usize) -> Result<()> {
    if topic.is_empty() {
        return Err(BrokerError::invalid_topic(topic, "empty name"));
    }
    if topic.len() > max_bytes {
        return Err(BrokerError::invalid_topic(
            topic,
            format!("longer than {max_bytes} bytes"),
        ));
    }
    Ok(())
}

/// `Err(BrokerError::MessageTooLarge)` for the first of `messages` larger than `limit`:
/// what every backend checks before it sends anything of a batch.
pub(crate) fn check_message_sizes(messages: &[crate::Message], limit: usize) -> Result<()> {
    match messages
        .iter()
        .map(crate::Message::size)
        .find(|&size| size > limit)
    {
        Some(size) => Err(BrokerError::MessageTooLarge { size, limit }),
        None => Ok(()),
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Checks a numeric setting of `backend`'s config against the values it accepts: a
/// [`BrokerError::Config`] saying "`backend`: `name` must be between … and …, got …"
/// unless `allowed` holds `value`. The one wording of every backend's range checks.
pub(crate) fn check_between<T: PartialOrd + std::fmt::Display>(
    backend: &str,
    name: &str,
    value: T,
    allowed: std::ops::RangeInclusive<T>,
) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(BrokerError::Config(format!(
        "{backend}: {name} must be between {} and {}, got {value}",
        allowed.start(),
        allowed.end()
    )))
}

/// Like [`check_between`] for a setting with only a lower bound: "must be at least …".
pub(crate) fn check_at_least<T: PartialOrd + std::fmt::Display>(
    backend: &str,
    name: &str,
    value: T,
    min: T,
) -> Result<()> {
    if value >= min {
        return Ok(());
    }
    Err(BrokerError::Config(format!(
        "{backend}: {name} must be at least {min}, got {value}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_topic_names_are_cut_and_escaped() {
        let BrokerError::InvalidTopic { topic, .. } = BrokerError::invalid_topic(
            &format!("a\nb\0\u{1b}[31m{}", "x".repeat(1_000_000)),
            "why",
        ) else {
            panic!("an InvalidTopic");
        };
        assert!(
            topic.len() < 4 * MAX_TOPIC_IN_ERROR,
            "{} bytes",
            topic.len()
        );
        assert!(!topic.chars().any(char::is_control), "{topic:?}");
        assert!(topic.starts_with("a\\nb\\0\\u{1b}[31m"), "{topic:?}");
        assert!(topic.ends_with("(1000009 bytes)"), "{topic:?}");
        assert!(!BrokerError::invalid_topic("t", "why").is_retryable());
    }

    #[test]
    fn topic_length_is_bounded_on_both_sides() {
        assert!(check_topic_length("t", 4).is_ok());
        assert!(check_topic_length("four", 4).is_ok());
        for bad in ["", "fives"] {
            assert!(
                matches!(
                    check_topic_length(bad, 4),
                    Err(BrokerError::InvalidTopic { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
