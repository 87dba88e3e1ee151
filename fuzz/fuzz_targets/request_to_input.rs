//! Raw broker message → model input: the whole of `classifier_server::request::prepare`
//! (size check, protobuf decode, routing, format sniffing, header checks, bounded decode,
//! preprocessing) on arbitrary bytes.
//!
//! Input layout: one flag byte choosing which routing attributes are set, then the
//! payload (see `classifier_fuzz::message_from_fuzz_bytes`).

#![no_main]

use std::sync::OnceLock;

use classifier_fuzz::{
    check_outcome, fuzz_limits, init_target, message_from_fuzz_bytes, preprocessor,
};
use classifier_server::decode::DecodeLimits;
use classifier_server::request::prepare;
use libfuzzer_sys::fuzz_target;

fn limits() -> &'static DecodeLimits {
    static LIMITS: OnceLock<DecodeLimits> = OnceLock::new();
    LIMITS.get_or_init(fuzz_limits)
}

fuzz_target!(
    init: init_target(),
    |data: &[u8]| {
        let message = message_from_fuzz_bytes(data);
        let outcome = prepare(&message, limits(), preprocessor());
        check_outcome(&message, limits(), preprocessor(), &outcome);
    }
);
