//! `classifier_server::decode::decode_image` on arbitrary image bytes under arbitrary
//! (small) limits, checked against the limits and against `prepare` on the same image
//! wrapped in a well-formed `ClassifyRequest`.
//!
//! Input layout: 4 control bytes, then the image bytes.
//! - byte 0: flags: bit 0 puts a request id in the protobuf (else only in the
//!   attributes), bit 1 asks for `top_k` 3, bit 2 sets a file name.
//! - byte 1 / byte 2: `max_width` / `max_height` = 8 × value (0: the fuzz default).
//! - byte 3: `max_decoded_bytes` = value × 64 KiB (0: the fuzz default).

#![no_main]

use classifier_fuzz::{check_outcome, fuzz_limits, init_target, preprocessor};
use classifier_proto::{attributes, ClassifyRequest, ErrorCode, ProstMessage};
use classifier_server::decode::{decode_image, DecodeLimits};
use classifier_server::request::prepare;
use libfuzzer_sys::fuzz_target;
use unified_broker::Message;

const HEADER: usize = 4;

fn limits_from(control: &[u8]) -> DecodeLimits {
    let mut limits = fuzz_limits();
    if control[1] != 0 {
        limits.max_width = 8 * u32::from(control[1]);
    }
    if control[2] != 0 {
        limits.max_height = 8 * u32::from(control[2]);
    }
    limits.max_pixels = limits
        .max_pixels
        .min(u64::from(limits.max_width) * u64::from(limits.max_height));
    if control[3] != 0 {
        limits.max_decoded_bytes = 64 * 1024 * u64::from(control[3]);
    }
    limits
}

fuzz_target!(
    init: init_target(),
    |data: &[u8]| {
        if data.len() < HEADER {
            return;
        }
        let (control, image) = data.split_at(HEADER);
        let limits = limits_from(control);

        let direct = decode_image(image, &limits);
        match &direct {
            Ok(decoded) => {
                let (w, h) = (decoded.width(), decoded.height());
                assert!(w > 0 && h > 0, "decoded an empty {w}×{h} image");
                assert!(
                    w <= limits.max_width && h <= limits.max_height,
                    "decoded {w}×{h} beyond {}×{}",
                    limits.max_width,
                    limits.max_height
                );
                assert!(u64::from(w) * u64::from(h) <= limits.max_pixels);
                assert!(
                    decoded.as_bytes().len() as u64 <= limits.max_decoded_bytes,
                    "decoded {} bytes beyond the {} byte limit",
                    decoded.as_bytes().len(),
                    limits.max_decoded_bytes
                );
            }
            Err(error) => {
                assert!(
                    matches!(
                        error.code,
                        ErrorCode::EmptyImage
                            | ErrorCode::UnsupportedFormat
                            | ErrorCode::CorruptImage
                            | ErrorCode::ImageTooLarge
                    ),
                    "unexpected code {:?}: {}",
                    error.code,
                    error.reason
                );
                assert!(!error.reason.is_empty());
                if image.is_empty() {
                    assert_eq!(error.code, ErrorCode::EmptyImage);
                }
            }
        }

        // The same image through the whole request path must end the same way.
        let flags = control[0];
        let request = ClassifyRequest {
            schema_version: 1,
            request_id: if flags & 1 != 0 { "fuzz-request".into() } else { String::new() },
            job_id: "fuzz-job".into(),
            image: image.to_vec(),
            file_name: if flags & 4 != 0 { "image.png".into() } else { String::new() },
            reply_topic: "fuzz-replies".into(),
            top_k: if flags & 2 != 0 { 3 } else { 0 },
            ..ClassifyRequest::default()
        };
        let message = Message::new(request.encode_to_vec())
            .with_attribute(attributes::REQUEST_ID, "fuzz-request-attribute");
        let outcome = prepare(&message, &limits, preprocessor());
        check_outcome(&message, &limits, preprocessor(), &outcome);
        match (&direct, &outcome) {
            (Ok(_), Ok(_)) => {}
            (Err(error), Err(rejected)) => assert_eq!(
                error.code as i32, rejected.error.code,
                "decode_image and prepare disagree: {} / {}",
                error.reason, rejected.error.reason
            ),
            (Ok(_), Err(rejected)) => {
                assert!(
                    message.payload.len() > limits.max_message_bytes,
                    "decode_image accepted what prepare rejected: {}",
                    rejected.error.reason
                )
            }
            (Err(error), Ok(_)) => panic!("prepare accepted what decode_image rejected: {}", error.reason),
        }
    }
);
