//! What a fuzz input means, outside the fuzzer too: how its bytes become a broker
//! message, and the limits and preprocessor it is checked under.
//!
//! Shared by source, not as a crate: the fuzz crate is a workspace of its own (nightly
//! flags, libFuzzer), so `classifier-server/tests/fuzz_regressions.rs` includes this file
//! with `#[path]` and replays each input found here exactly as the targets ran it. Only
//! crates both depend on may be used here.

use std::path::Path;
use std::sync::OnceLock;

use classifier_inference::{ModelMetadata, Preprocessor};
use classifier_proto::attributes;
use classifier_server::decode::DecodeLimits;
use unified_broker::Message;

/// Attribute values set when the flag byte asks for them.
pub const FUZZ_REQUEST_ID: &str = "fuzz-request";
/// See [`FUZZ_REQUEST_ID`].
pub const FUZZ_JOB_ID: &str = "fuzz-job";
/// See [`FUZZ_REQUEST_ID`].
pub const FUZZ_REPLY_TOPIC: &str = "fuzz-replies";

/// Builds the broker message a fuzz input stands for.
///
/// Byte 0 is a flag byte: bit 0 sets the `request-id` attribute, bit 1 `job-id`, bit 2
/// `reply-topic`, bit 3 `content-type`; the rest of the input is the payload (normally a
/// `ClassifyRequest` protobuf). An empty input is an empty message.
pub fn message_from_fuzz_bytes(data: &[u8]) -> Message {
    let Some((&flags, payload)) = data.split_first() else {
        return Message::new(Vec::new());
    };
    let mut message = Message::new(payload.to_vec());
    if flags & 1 != 0 {
        message = message.with_attribute(attributes::REQUEST_ID, FUZZ_REQUEST_ID);
    }
    if flags & 2 != 0 {
        message = message.with_attribute(attributes::JOB_ID, FUZZ_JOB_ID);
    }
    if flags & 4 != 0 {
        message = message.with_attribute(attributes::REPLY_TOPIC, FUZZ_REPLY_TOPIC);
    }
    if flags & 8 != 0 {
        message = message.with_attribute(
            attributes::CONTENT_TYPE,
            classifier_proto::CONTENT_TYPE_REQUEST,
        );
    }
    message
}

/// Limits for fuzzing: the shape of the defaults, scaled down so the fuzzer spends its
/// time on malformed data rather than on decoding large legitimate images.
pub fn fuzz_limits() -> DecodeLimits {
    DecodeLimits {
        max_message_bytes: 1024 * 1024,
        max_width: 2048,
        max_height: 2048,
        max_pixels: 1024 * 1024,
        max_decoded_bytes: 32 * 1024 * 1024,
    }
}

/// The shipped model's preprocessor, loaded once.
pub fn preprocessor() -> &'static Preprocessor {
    static PREPROCESSOR: OnceLock<Preprocessor> = OnceLock::new();
    PREPROCESSOR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist");
        let metadata = ModelMetadata::load(&dir)
            .unwrap_or_else(|error| panic!("loading {}: {error:#}", dir.display()));
        Preprocessor::new(&metadata)
    })
}
