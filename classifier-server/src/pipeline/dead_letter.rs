//! Copies of requests that can never succeed, for the dead-letter topic: the original
//! message byte for byte, with the reason added as attributes.

use classifier_proto::{dead_letter_attributes, ErrorCode};
use unified_broker::Message;

use crate::request::Rejected;

/// Whether and how rejected requests are copied to the dead-letter topic.
#[derive(Clone, Debug, Default)]
pub(super) struct DeadLetters {
    /// Copies are made at all (a dead-letter topic is configured).
    pub enabled: bool,
    /// The request topic, named in every copy.
    pub source_topic: String,
}

impl DeadLetters {
    /// The original message, byte for byte, with the reason added as attributes; `None`
    /// when dead-lettering is off.
    pub fn copy(
        &self,
        original: &Message,
        rejected: &Rejected,
        server_id: &str,
    ) -> Option<Message> {
        let code = ErrorCode::try_from(rejected.error.code)
            .map(|c| c.as_str_name().to_string())
            .unwrap_or_else(|_| rejected.error.code.to_string());
        self.copy_for(original, &code, &rejected.error.reason, server_id)
    }

    /// [`DeadLetters::copy`] for a failure known only by its code name and reason (a
    /// reply the broker refused for good, after the request was classified).
    pub fn copy_for(
        &self,
        original: &Message,
        code: &str,
        reason: &str,
        server_id: &str,
    ) -> Option<Message> {
        if !self.enabled {
            return None;
        }
        let mut copy = original.clone();
        for (name, value) in [
            (dead_letter_attributes::CODE, code),
            (dead_letter_attributes::REASON, reason),
            (dead_letter_attributes::SOURCE_TOPIC, &self.source_topic),
            (dead_letter_attributes::SERVER_ID, server_id),
        ] {
            copy.attributes.insert(name.into(), value.to_string());
        }
        Some(copy)
    }
}

/// `copy` without its payload, marked with [`dead_letter_attributes::PAYLOAD_OMITTED`]:
/// what is dead-lettered when the full copy (the original plus the reason) is larger
/// than the broker accepts, so the reason is kept even when the bytes cannot be.
pub(super) fn without_payload(copy: &Message) -> Message {
    let mut smaller = copy.clone();
    smaller.attributes.insert(
        dead_letter_attributes::PAYLOAD_OMITTED.into(),
        copy.payload.len().to_string(),
    );
    smaller.payload = Default::default();
    smaller
}

#[cfg(test)]
mod tests {
    use classifier_proto::ClassifyError;

    use super::*;
    use crate::request::ReplyRoute;

    fn rejected(code: i32) -> Rejected {
        Rejected {
            route: ReplyRoute::default(),
            error: ClassifyError {
                code,
                reason: "truncated PNG".into(),
            },
        }
    }

    fn enabled() -> DeadLetters {
        DeadLetters {
            enabled: true,
            source_topic: "requests".into(),
        }
    }

    #[test]
    fn a_copy_keeps_the_original_and_adds_the_reason() {
        let original = Message::new(vec![0xde, 0xad])
            .with_key("r-1")
            .with_attribute("request-id", "r-1");
        let copy = enabled()
            .copy(
                &original,
                &rejected(ErrorCode::CorruptImage as i32),
                "server-a",
            )
            .expect("enabled");
        assert_eq!(copy.payload, original.payload);
        assert_eq!(copy.key, original.key);
        for (name, value) in [
            ("request-id", "r-1"),
            (dead_letter_attributes::CODE, "CORRUPT_IMAGE"),
            (dead_letter_attributes::REASON, "truncated PNG"),
            (dead_letter_attributes::SOURCE_TOPIC, "requests"),
            (dead_letter_attributes::SERVER_ID, "server-a"),
        ] {
            assert_eq!(copy.attribute(name), Some(value), "attribute {name}");
        }
    }

    #[test]
    fn an_unknown_code_is_written_as_its_number() {
        let copy = enabled()
            .copy(&Message::new("x"), &rejected(9999), "s")
            .expect("enabled");
        assert_eq!(copy.attribute(dead_letter_attributes::CODE), Some("9999"));
    }

    #[test]
    fn no_copy_when_disabled() {
        let disabled = DeadLetters::default();
        assert!(disabled
            .copy(&Message::new("x"), &rejected(1), "s")
            .is_none());
    }
}
