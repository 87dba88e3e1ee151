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
