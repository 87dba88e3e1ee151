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

/// Shorthand used throughout the crate.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
