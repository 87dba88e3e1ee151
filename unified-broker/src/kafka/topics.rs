//! Topic names and which topics exist, as the Kafka backend needs them before it hands a
//! record to librdkafka.
//!
//! Topic names can come from untrusted peers (reply routes), and librdkafka is not the
//! place to find out that one is bad or missing:
//!
//! - a name Kafka cannot have fails in librdkafka or at the broker in ways that look
//!   transient or break connections (a NUL byte is an FFI error, 250 characters an
//!   invalid-argument error, a 1 MB name makes the broker drop the connection), so
//!   [`check_name`] applies Kafka's own rule first;
//! - a record for a topic that does not exist is held by librdkafka until
//!   `message.timeout.ms` (30 s by default), and every name librdkafka ever sees keeps
//!   a topic object, re-queried every second, until the client is destroyed. So a
//!   publish first looks the topic up in [`KnownTopics`], a bounded cache of topics
//!   known to exist (with their size limits), and on a miss in a listing of the
//!   cluster's topics ([`TopicListing`], one metadata request for all topics, which
//!   creates no topic object), shared by the lookups that wait at the same time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use tokio::time::Instant;

use super::LogContext;
use crate::{BrokerError, Result};

/// Kafka's longest topic name (`Topic.MAX_NAME_LENGTH` in Kafka's own code).
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// How many topics a [`KnownTopics`] keeps: far more than one client publishes to at
/// a time (the request topic, the dead-letter topic, one reply topic per client being
/// served), and small enough (a few hundred KB) not to matter. A topic pushed out
/// costs one lookup on its next publish.
pub(crate) const KNOWN_TOPICS_CAPACITY: usize = 1024;

/// The longest a lookup of the cluster's topics may take, whatever
/// `request_timeout_ms` says: a publish to a missing topic must fail within seconds.
pub(crate) const MAX_LISTING_TIMEOUT: Duration = Duration::from_secs(5);

/// Kafka's rule for topic names (`Topic.validate`): 1 to 249 characters of ASCII
/// letters, digits, `.`, `_` and `-`, and neither `.` nor `..`.
pub(crate) fn check_name(topic: &str) -> Result<()> {
    let broken = if topic.is_empty() {
        "empty name".to_string()
    } else if topic.len() > MAX_TOPIC_NAME_LEN {
        format!("longer than Kafka's {MAX_TOPIC_NAME_LEN} characters")
    } else if topic == "." || topic == ".." {
        "\".\" and \"..\" are not topic names".to_string()
    } else if let Some(bad) = topic.chars().find(|c| !is_legal(*c)) {
        format!(
            "character {:?} is not allowed (only ASCII letters, digits, '.', '_' and '-')",
            bad
        )
    } else {
        return Ok(());
    };
    Err(BrokerError::invalid_topic(topic, broken))
}

fn is_legal(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Topics this client knows to exist, each with its size limit for this client
/// ([`crate::Broker::max_message_bytes`]): at most `capacity`, the least recently used
/// pushed out first. A hit costs no request to the broker.
pub(crate) struct KnownTopics {
    capacity: usize,
    state: Mutex<KnownState>,
}

#[derive(Default)]
struct KnownState {
    /// Topic → (size limit, when it was last used, on `clock`).
    entries: HashMap<String, (usize, u64)>,
    /// Counts uses, to find the least recently used entry.
    clock: u64,
}

impl KnownTopics {
    /// An empty cache of at most `capacity` topics (at least one).
    pub(crate) fn new(capacity: usize) -> KnownTopics {
        KnownTopics {
            capacity: capacity.max(1),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, KnownState> {
        // Every critical section leaves the map consistent: a poisoned lock is usable.
        crate::sync::lock(&self.state)
    }

    /// The size limit of `topic`, if it is known to exist.
    pub(crate) fn get(&self, topic: &str) -> Option<usize> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        let (limit, used) = state.entries.get_mut(topic)?;
        *used = now;
        Some(*limit)
    }

    /// Remembers that `topic` exists and takes `limit`, pushing out the least recently
    /// used topic if the cache is full.
    pub(crate) fn insert(&self, topic: &str, limit: usize) {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        if !state.entries.contains_key(topic) && state.entries.len() >= self.capacity {
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                state.entries.remove(&oldest);
            }
        }
        state.entries.insert(topic.to_string(), (limit, now));
    }

    /// Forgets `topic` (deleted, or a publish found it missing).
    pub(crate) fn forget(&self, topic: &str) {
        self.lock().entries.remove(topic);
    }

    /// How many topics are known.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

/// The names of the cluster's topics, from metadata requests for all topics, shared by
/// concurrent lookups: a lookup waits for a listing that was requested after it began
/// (so a topic created just before is seen), and the lookups waiting together share
/// one request. Asking librdkafka about one topic instead would leave a topic object
/// per name asked about, for the life of the client.
pub(crate) struct TopicListing {
    admin: Arc<AdminClient<LogContext>>,
    timeout: Duration,
    last: tokio::sync::Mutex<Option<Listing>>,
}

/// One listing of the cluster's topics.
struct Listing {
    /// When its request was sent.
    requested: Instant,
    /// Topics with partitions and no error.
    names: Arc<HashSet<String>>,
}

impl TopicListing {
    /// Listings through `admin`, each request bounded by `timeout` (at most
    /// [`MAX_LISTING_TIMEOUT`]).
    pub(crate) fn new(admin: Arc<AdminClient<LogContext>>, timeout: Duration) -> TopicListing {
        TopicListing {
            admin,
            timeout: timeout.min(MAX_LISTING_TIMEOUT),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether `topic` exists, according to a listing requested after this call began.
    pub(crate) async fn contains(&self, topic: &str) -> Result<bool, KafkaError> {
        let began = Instant::now();
        // Fair (FIFO): every waiter gets the lock in turn, and all but the first one
        // after a request find a listing fresh enough for them.
        let mut last = self.last.lock().await;
        if let Some(listing) = last.as_ref().filter(|l| l.requested >= began) {
            return Ok(listing.names.contains(topic));
        }
        let requested = Instant::now();
        let names = Arc::new(self.fetch().await?);
        let found = names.contains(topic);
        *last = Some(Listing { requested, names });
        Ok(found)
    }

    /// One metadata request, for a readiness probe: `Unavailable` when the cluster does
    /// not answer.
    pub(crate) async fn ping(&self) -> crate::Result<()> {
        self.fetch().await.map(|_| ()).map_err(|error| {
            crate::BrokerError::Unavailable(format!(
                "kafka did not answer a metadata request: {error}"
            ))
        })
    }

    /// One metadata request for every topic, off the async workers (it blocks).
    async fn fetch(&self) -> Result<HashSet<String>, KafkaError> {
        let admin = Arc::clone(&self.admin);
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, timeout))
            .await
            .map_err(|_| KafkaError::Canceled)?
            .map(|metadata| existing_topics(&metadata))
    }
}

/// The topics of `metadata` that exist: known to the broker, with partitions.
fn existing_topics(metadata: &Metadata) -> HashSet<String> {
    metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none() && !topic.partitions().is_empty())
        .map(|topic| topic.name().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafkas_naming_rule() {
        for good in ["t", "images-in", "a.b_c-D9", &"x".repeat(249), "..."] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        let huge = "y".repeat(1_000_000);
        for bad in [
            "",
            ".",
            "..",
            "nul\0byte",
            "with space",
            "slash/ed",
            "new\nline",
            "ünïcödé",
            &"x".repeat(250),
            &huge,
        ] {
            match check_name(bad) {
                Err(error @ BrokerError::InvalidTopic { .. }) => {
                    assert!(!error.is_retryable());
                    assert!(error.to_string().len() < 400, "{error}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn known_topics_are_bounded_and_least_recently_used_go_first() {
        let known = KnownTopics::new(3);
        for (i, topic) in ["a", "b", "c"].iter().enumerate() {
            known.insert(topic, i);
        }
        assert_eq!(known.get("a"), Some(0), "a is used again");
        known.insert("d", 3);
        assert_eq!(known.len(), 3);
        assert_eq!(known.get("b"), None, "b was the least recently used");
        assert_eq!(known.get("a"), Some(0));
        for i in 0..10_000 {
            known.insert(&format!("n{i}"), i);
        }
        assert_eq!(known.len(), 3);
        known.forget("n9999");
        assert_eq!(known.get("n9999"), None);
        assert_eq!(known.get("n9998"), Some(9998));
    }
}
