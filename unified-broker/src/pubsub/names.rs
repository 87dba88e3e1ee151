//! Resource names: our topics and consumer groups as Pub/Sub topic and subscription ids.
//!
//! Pub/Sub ids start with a letter, are 3–255 characters of letters, digits and
//! `-_.~+%`, and must not start with `goog`.

use crate::{BrokerError, Result};

const MAX_ID_LEN: usize = 255;
/// Separates topic and group in a subscription id.
const SEPARATOR: &str = "--";

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '%')
}

fn is_valid_id(id: &str) -> bool {
    broken_rule(id).is_none()
}

/// Checks a topic name: topics are used as Pub/Sub topic ids unchanged, so they stay
/// recognisable to other tools (gcloud, the console). A name that is not a valid id is
/// [`BrokerError::InvalidTopic`] (final), saying which rule it breaks.
pub(crate) fn topic_id(topic: &str) -> Result<&str> {
    match broken_rule(topic) {
        None => Ok(topic),
        Some(rule) => Err(BrokerError::invalid_topic(
            topic,
            format!("not a Pub/Sub topic id: {rule}"),
        )),
    }
}

/// The first rule of Pub/Sub ids that `id` breaks, if any (the length first, so a
/// megabyte-long name is refused without a look at its characters).
fn broken_rule(id: &str) -> Option<&'static str> {
    if !(3..=MAX_ID_LEN).contains(&id.len()) {
        Some("it must have 3 to 255 characters")
    } else if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some("it must start with a letter")
    } else if !id.chars().all(allowed) {
        Some("only letters, digits and -_.~+% are allowed")
    } else if id.to_ascii_lowercase().starts_with("goog") {
        Some("it must not start with \"goog\"")
    } else {
        None
    }
}

/// The subscription id of consumer group `group` on `topic`: `{topic}--{group}` when
/// that is a valid id and unambiguous, otherwise a sanitised, shortened form with a hash
/// of both names, so every (topic, group) pair maps to its own id, deterministically
/// (every client, every process, every build).
pub(crate) fn subscription_id(topic: &str, group: &str) -> String {
    let plain = format!("{topic}{SEPARATOR}{group}");
    // `--` inside the topic would make "a--b" + "c" and "a" + "b--c" collide.
    if !topic.contains(SEPARATOR) && is_valid_id(&plain) {
        return plain;
    }
    let hash = fnv1a64(topic.as_bytes(), group.as_bytes());
    let readable: String = plain
        .chars()
        .map(|c| if allowed(c) && c != '%' { c } else { '_' })
        .collect();
    // "s-" + readable part + "-" + 16 hex digits, within the length limit.
    let keep = MAX_ID_LEN - 2 - 1 - 16;
    let readable: String = readable.chars().take(keep).collect();
    format!("s-{readable}-{hash:016x}")
}

/// FNV-1a over the topic, a 0xff separator (never in UTF-8) and the group: a stable
/// hash with no dependency, unlike std's `DefaultHasher`, whose output may change
/// between Rust releases.
fn fnv1a64(topic: &[u8], group: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in topic.iter().chain(&[0xff]).chain(group) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `projects/{project}/topics/{topic}`.
pub(crate) fn topic_path(project: &str, topic: &str) -> String {
    format!("projects/{project}/topics/{topic}")
}

/// `projects/{project}/subscriptions/{subscription}`.
pub(crate) fn subscription_path(project: &str, subscription: &str) -> String {
    format!("projects/{project}/subscriptions/{subscription}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_map_readably() {
        assert_eq!(
            subscription_id("images-in", "classifier"),
            "images-in--classifier"
        );
        assert_eq!(
            subscription_id("conf-pubsub-0123456789ab", "readers"),
            "conf-pubsub-0123456789ab--readers"
        );
    }

    #[test]
    fn mapping_is_deterministic() {
        assert_eq!(subscription_id("a b", "c/d"), subscription_id("a b", "c/d"));
        // Pinned: the id must not change between builds or the group loses its backlog.
        assert_eq!(subscription_id("a b", "g"), "s-a_b--g-68e5440884e6daf0");
    }

    #[test]
    fn sanitised_ids_are_valid() {
        let long = "x".repeat(400);
        for (topic, group) in [
            ("images", "group with spaces/and:slashes"),
            ("1starts-with-digit", "g"),
            ("t", "g"),
            ("googly", "eyes"),
            ("images", "ünïcödé"),
            (long.as_str(), "g"),
            ("t", long.as_str()),
            ("", ""),
        ] {
            let id = subscription_id(topic, group);
            assert!(is_valid_id(&id), "{topic:?}/{group:?} -> {id:?}");
        }
    }

    #[test]
    fn different_pairs_do_not_collide() {
        let pairs = [
            ("a--b", "c"),
            ("a", "b--c"),
            ("images", "g h"),
            ("images", "g_h"),
            ("images", "g/h"),
            ("t", "g"),
            ("t", "g "),
        ];
        let ids: std::collections::HashSet<String> =
            pairs.iter().map(|(t, g)| subscription_id(t, g)).collect();
        assert_eq!(ids.len(), pairs.len(), "{ids:?}");
        let long = "x".repeat(300);
        assert_ne!(
            subscription_id(&format!("{long}a"), "g"),
            subscription_id(&format!("{long}b"), "g")
        );
    }

    #[test]
    fn topic_ids_are_checked_not_rewritten() {
        assert_eq!(topic_id("images-in").ok(), Some("images-in"));
        let long = "t".repeat(256);
        let huge = "t".repeat(1_000_000);
        for bad in [
            "ab",
            "1abc",
            "goog-topic",
            "GOOG-topic",
            "with space",
            "slash/ed",
            "",
            "nul\0byte",
            "new\nline",
            "ünïcödé",
            &long,
            &huge,
        ] {
            match topic_id(bad) {
                Err(error @ BrokerError::InvalidTopic { .. }) => {
                    assert!(!error.is_retryable());
                    assert!(error.to_string().len() < 400, "{error}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(topic_id(&"t".repeat(255)).is_ok());
        assert!(topic_id("a~+%.-_9").is_ok());
    }

    #[test]
    fn paths() {
        assert_eq!(topic_path("p", "t"), "projects/p/topics/t");
        assert_eq!(subscription_path("p", "s"), "projects/p/subscriptions/s");
    }
}
