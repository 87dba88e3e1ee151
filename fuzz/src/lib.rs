//! Shared pieces of the fuzz targets: how fuzz bytes become a broker message, the limits
//! and preprocessor the targets use, and the properties every outcome must satisfy.
//!
//! `classifier-server/tests/fuzz_regressions.rs` wraps its inputs the same way
//! ([`message_from_fuzz_bytes`]), so a file found here can be replayed there as is.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use classifier_proto::{attributes, ErrorCode};
use classifier_server::decode::DecodeLimits;
use classifier_server::request::{PreparedInput, Rejected};
use classifier_inference::ModelMetadata;
use classifier_inference::Preprocessor;
use unified_broker::Message;

mod seeds;
pub use seeds::{make_seeds_if_asked, write_seeds};

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

/// Makes panics that `decode_image` catches (decoder panics, reported as corrupt images)
/// non-fatal, while panics escaping the code under test still abort the fuzzer.
///
/// `libfuzzer-sys` installs a hook that aborts on *any* panic, caught or not. The server
/// relies on `catch_unwind` around the decoders, so by default the targets replace that
/// hook with one that reports each distinct caught panic once and lets it unwind;
/// `libfuzzer-sys` still aborts when a panic escapes the target. Set
/// `FUZZ_ABORT_ON_ANY_PANIC=1` to keep the strict hook and hunt decoder panics (bugs in
/// the decoder crates that the server survives).
pub fn install_panic_hook() {
    if std::env::var_os("FUZZ_ABORT_ON_ANY_PANIC").is_some_and(|v| v != "0") {
        return;
    }
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
        let first = seen
            .lock()
            .map(|mut set| set.insert(location.clone()))
            .unwrap_or(false);
        if first {
            eprintln!("fuzz: panic at {location} (caught by the code under test?): {info}");
        }
    }));
}

/// The properties every outcome of `prepare` must have.
pub fn check_outcome(
    message: &Message,
    limits: &DecodeLimits,
    preprocessor: &Preprocessor,
    outcome: &Result<PreparedInput, Box<Rejected>>,
) {
    match outcome {
        Ok(prepared) => {
            assert!(
                !prepared.route.request_id.is_empty(),
                "accepted a request without request id"
            );
            assert_eq!(prepared.input.len(), preprocessor.input_len());
            assert!(
                prepared.input.iter().all(|v| v.is_finite()),
                "non-finite model input"
            );
            assert!(message.payload.len() <= limits.max_message_bytes);
        }
        Err(rejected) => {
            let code = ErrorCode::try_from(rejected.error.code).unwrap_or(ErrorCode::Unspecified);
            assert!(
                !matches!(code, ErrorCode::Unspecified | ErrorCode::Internal),
                "rejected with code {code:?}: {}",
                rejected.error.reason
            );
            assert!(!rejected.error.reason.is_empty(), "empty reason ({code:?})");
            if message.payload.len() > limits.max_message_bytes {
                assert_eq!(code, ErrorCode::MessageTooLarge);
            }
            // The attributes are the fallback route: a request id given there is never lost.
            if let Some(id) = message.attribute(attributes::REQUEST_ID) {
                if !id.is_empty() {
                    assert!(!rejected.route.request_id.is_empty(), "lost the request id");
                }
            }
        }
    }
}
