//! The wire format between `client-app` and `classifier-server`.
//!
//! Defined once in `proto/classifier.proto` and generated with `prost`. Besides the
//! generated types this crate holds the few conventions both sides must agree on: the
//! schema version and the broker attribute names that let a server answer a request
//! even when its payload cannot be decoded.

#![allow(clippy::doc_lazy_continuation)]

/// Generated protobuf types (package `classifier.v1`).
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/classifier.v1.rs"));
}

pub use prost::Message as ProstMessage;
pub use v1::{
    classify_response::Outcome, ClassifyError, ClassifyRequest, ClassifyResponse, ErrorCode,
    Prediction, Predictions,
};

impl ErrorCode {
    /// Whether a server copies a request it answers with this code to the dead-letter
    /// topic: every code but [`ErrorCode::DeadlineExceeded`], whose requests are not at
    /// fault (the client had stopped waiting). Part of the wire contract.
    pub fn is_dead_lettered(self) -> bool {
        self != ErrorCode::DeadlineExceeded
    }
}

/// Minor schema revision written by this build (see the comment in the .proto file).
pub const SCHEMA_VERSION: u32 = 2;

/// Broker message attributes set by the client beside the protobuf payload.
///
/// They duplicate the routing fields of [`ClassifyRequest`] so that a server can send an
/// error reply (and the client can match it) even when the payload itself is garbage.
pub mod attributes {
    /// The request id (same as `ClassifyRequest::request_id`).
    pub const REQUEST_ID: &str = "request-id";
    /// The reply topic (same as `ClassifyRequest::reply_topic`).
    pub const REPLY_TOPIC: &str = "reply-topic";
    /// The job id (same as `ClassifyRequest::job_id`).
    pub const JOB_ID: &str = "job-id";
    /// Content type of the payload: always [`super::CONTENT_TYPE_REQUEST`] for requests.
    pub const CONTENT_TYPE: &str = "content-type";
}

/// Attributes a server adds to the copy of a request it dead-letters (the request's own
/// attributes are kept beside them). Part of the wire contract (`proto/README.md`).
pub mod dead_letter_attributes {
    /// What every dead-letter attribute name starts with.
    pub const PREFIX: &str = "dead-letter-";
    /// The error code name, e.g. `CORRUPT_IMAGE`.
    pub const CODE: &str = "dead-letter-code";
    /// The human-readable reason.
    pub const REASON: &str = "dead-letter-reason";
    /// The topic the request came from.
    pub const SOURCE_TOPIC: &str = "dead-letter-source-topic";
    /// The server that gave up on it.
    pub const SERVER_ID: &str = "dead-letter-server-id";
    /// Set (to the original payload's size in bytes) on a copy whose payload was left
    /// out because the copy would have been larger than the broker accepts; such a copy
    /// cannot be re-published.
    pub const PAYLOAD_OMITTED: &str = "dead-letter-payload-omitted";
}

/// Content type attribute value of a protobuf `ClassifyRequest` payload.
pub const CONTENT_TYPE_REQUEST: &str =
    "application/x-protobuf; message=classifier.v1.ClassifyRequest";
/// Content type attribute value of a protobuf `ClassifyResponse` payload.
pub const CONTENT_TYPE_RESPONSE: &str =
    "application/x-protobuf; message=classifier.v1.ClassifyResponse";

/// The `deadline_unix_micros` of a request sent at `sent_at` (microseconds since the Unix
/// epoch) whose sender waits `wait` for the reply (saturating, never overflowing).
pub fn deadline_after(sent_at: i64, wait: std::time::Duration) -> i64 {
    let wait = i64::try_from(wait.as_micros()).unwrap_or(i64::MAX);
    sent_at.saturating_add(wait)
}

/// Microseconds since the Unix epoch, as written in the `sent_at_unix_micros` fields
/// (0 if the clock is before the epoch).
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_bytes() {
        let request = ClassifyRequest {
            schema_version: SCHEMA_VERSION,
            request_id: "r-1".into(),
            job_id: "j-1".into(),
            image: vec![1, 2, 3],
            file_name: "a/b.png".into(),
            content_type: "image/png".into(),
            reply_topic: "replies".into(),
            sent_at_unix_micros: 42,
            attributes: [("k".to_string(), "v".to_string())].into(),
            top_k: 3,
            model_name: "shirts".into(),
            deadline_unix_micros: 1_765_000_060_000_000,
        };
        let bytes = request.encode_to_vec();
        let back = ClassifyRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, request);
    }

    #[test]
    fn response_error_outcome_round_trips() {
        let response = ClassifyResponse {
            request_id: "r-2".into(),
            outcome: Some(Outcome::Error(ClassifyError {
                code: ErrorCode::CorruptImage as i32,
                reason: "truncated".into(),
            })),
            ..Default::default()
        };
        let back = ClassifyResponse::decode(response.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(back, response);
        assert_eq!(
            back.outcome.map(|o| matches!(o, Outcome::Error(_))),
            Some(true)
        );
    }

    #[test]
    fn unix_micros_now_is_after_2020() {
        // 2020-01-01T00:00:00Z in microseconds: a clock read, not a constant 0.
        assert!(unix_micros_now() > 1_577_836_800_000_000);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(ClassifyRequest::decode(&[0xff, 0xff, 0xff, 0x01][..]).is_err());
    }
}
