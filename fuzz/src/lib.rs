//! Shared pieces of the fuzz targets: how fuzz bytes become a broker message, the limits
//! and preprocessor the targets use, and the properties every outcome must satisfy.
//!
//! `classifier-server/tests/fuzz_regressions.rs` replays inputs with the same code
//! (module `replay`, included there by path), so a file found here can be replayed there
//! as is.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use classifier_inference::Preprocessor;
use classifier_proto::{attributes, ErrorCode};
use classifier_server::decode::DecodeLimits;
use classifier_server::request::{PreparedInput, Rejected};
use unified_broker::Message;

mod replay;
mod seeds;
pub use replay::{
    fuzz_limits, message_from_fuzz_bytes, preprocessor, FUZZ_JOB_ID, FUZZ_REPLY_TOPIC,
    FUZZ_REQUEST_ID,
};
pub use seeds::{make_seeds_if_asked, write_seeds};

/// What every target does once before its first input: writes the seed corpus if asked
/// (see [`make_seeds_if_asked`]), installs the panic hook ([`install_panic_hook`]) and
/// loads the preprocessor, so the first input is not timed with the model's loading.
pub fn init_target() {
    make_seeds_if_asked();
    install_panic_hook();
    preprocessor();
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
