//! Turning untrusted bytes into an image, safely.
//!
//! Everything here assumes hostile input: the format is sniffed from the bytes (never
//! trusted from the file name), the dimensions are read from the header and checked
//! before any pixel is decoded (a 100000×100000 PNG is 30 bytes on disk and 10 GB in
//! memory), the decoder runs with allocation limits, and a decoder panic is caught and
//! reported as a corrupt image instead of taking the server down.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use classifier_proto::ErrorCode;
use image::{DynamicImage, ImageError, ImageFormat, ImageReader};

/// The limits live with the rest of the config file's `[server]` section.
pub use classifier_app::DecodeLimits;

/// Why bytes could not become an image; carries the protocol error code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    /// Error code for the reply.
    pub code: ErrorCode,
    /// Human-readable reason for the reply.
    pub reason: String,
}

/// Longest reason kept, in characters: decoder messages can quote input bytes.
const MAX_REASON_CHARS: usize = 200;

impl DecodeError {
    /// Decoder messages may echo raw input bytes; the reason goes into replies, logs
    /// and terminals, so control characters are replaced and the length is capped.
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        let reason: String = reason
            .into()
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .take(MAX_REASON_CHARS)
            .collect();
        DecodeError { code, reason }
    }
}

/// Decodes `bytes` into an image within `limits`.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, DecodeError> {
    decode_image_for(bytes, limits, None)
}

/// What size an image of a given width and height may be decoded at (see
/// `Preprocessor::decode_size_needed`).
pub type SizeNeeded<'a> = &'a dyn Fn(u32, u32) -> (u32, u32);

/// [`decode_image`], with a JPEG decoded at the smallest scale (1/8, 1/4 or 1/2) that
/// still gives `needed(width, height)` pixels: a 12-megapixel photo for a 224×224 model
/// is decoded at a quarter or an eighth of its sides, for a fraction of the work and
/// memory. Everything else, and any JPEG the scaled decoder does not take (CMYK,
/// 16-bit, or an error, which the full decoder then reports), is decoded in full.
pub fn decode_image_for(
    bytes: &[u8],
    limits: &DecodeLimits,
    needed: Option<SizeNeeded<'_>>,
) -> Result<DynamicImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::new(
            ErrorCode::EmptyImage,
            "the file is empty (0 bytes)",
        ));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        DecodeError::new(
            ErrorCode::UnsupportedFormat,
            format!(
                "not a recognised image format (starts with {})",
                hex_prefix(bytes)
            ),
        )
    })?;
    if format == ImageFormat::Jpeg && jpeg_is_truncated(bytes) {
        return Err(DecodeError::new(
            ErrorCode::CorruptImage,
            "the Jpeg data is truncated (no end-of-image marker after the image data)",
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| {
        decode_checked(bytes, format, limits, needed)
    })) {
        Ok(result) => result,
        Err(_) => Err(DecodeError::new(
            ErrorCode::CorruptImage,
            format!("the {format:?} decoder failed on malformed data"),
        )),
    }
}

fn decode_checked(
    bytes: &[u8],
    format: ImageFormat,
    limits: &DecodeLimits,
    needed: Option<SizeNeeded<'_>>,
) -> Result<DynamicImage, DecodeError> {
    // Some decoders need more than the header to report dimensions (a PNG decoder reads
    // up to the first data chunk), so first read them from the header bytes alone. Only
    // where that fails is a decoder asked, which costs a second decoder per image (for a
    // small PNG, as much as decoding it). The decoder's own limits below hold either way.
    let reader = || ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = match imagesize::blob_size(bytes) {
        Ok(size) => {
            let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            (clamp(size.width), clamp(size.height))
        }
        Err(_) => reader()
            .into_dimensions()
            .map_err(|error| classify_error(format, error))?,
    };
    check_dimensions(width, height, limits)?;
    if let (ImageFormat::Jpeg, Some(needed)) = (format, needed) {
        let (w, h) = needed(width, height);
        if w.saturating_mul(2) <= width && h.saturating_mul(2) <= height {
            if let Some(image) = decode_jpeg_scaled(bytes, (w, h), limits) {
                return Ok(image);
            }
        }
    }
    let mut reader = reader();
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(decoder_limits);
    let image = reader
        .decode()
        .map_err(|error| classify_error(format, error))?;
    // The decoder's limits bound width, height and memory but not the pixel count: the
    // image it made is checked too, should it disagree with the header read above.
    check_dimensions(image.width(), image.height(), limits)?;
    Ok(image)
}

/// A JPEG decoded by `jpeg-decoder`'s scaled IDCT to the smallest scale giving at least
/// `size`; `None` where it cannot (then the full decoder runs and reports any error).
fn decode_jpeg_scaled(
    bytes: &[u8],
    size: (u32, u32),
    limits: &DecodeLimits,
) -> Option<DynamicImage> {
    use jpeg_decoder::PixelFormat;
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.set_max_decoding_buffer_size(usize::try_from(limits.max_decoded_bytes).ok()?);
    let requested = (u16::try_from(size.0).ok()?, u16::try_from(size.1).ok()?);
    let (w, h) = decoder.scale(requested.0, requested.1).ok()?;
    let pixels = decoder.decode().ok()?;
    let (w, h) = (u32::from(w), u32::from(h));
    match decoder.info()?.pixel_format {
        PixelFormat::L8 => image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
        PixelFormat::RGB24 => image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
        PixelFormat::L16 | PixelFormat::CMYK32 => None,
    }
}

/// The JPEG decoder fills a cut-off scan with grey rather than failing, so a truncated
/// file would be "classified". A complete JPEG has an end-of-image marker (FF D9) after
/// its last start-of-scan marker (FF DA); embedded thumbnails end earlier, so only the
/// part after the last scan counts.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    match last_scan {
        Some(start) => !bytes[start..].windows(2).any(|w| w == [0xff, 0xd9]),
        None => true,
    }
}

/// Rejects images whose header announces more pixels than the limits allow.
pub fn check_dimensions(width: u32, height: u32, limits: &DecodeLimits) -> Result<(), DecodeError> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(DecodeError::new(
            ErrorCode::CorruptImage,
            format!("the image header claims {width}×{height} pixels"),
        ));
    }
    if width > limits.max_width || height > limits.max_height || pixels > limits.max_pixels {
        return Err(DecodeError::new(
            ErrorCode::ImageTooLarge,
            format!(
                "image is {width}×{height} pixels; the limit is {}×{} and {} pixels in all",
                limits.max_width, limits.max_height, limits.max_pixels
            ),
        ));
    }
    Ok(())
}

fn classify_error(format: ImageFormat, error: ImageError) -> DecodeError {
    match error {
        ImageError::Limits(limit) => DecodeError::new(
            ErrorCode::ImageTooLarge,
            format!("decoding the {format:?} image would exceed the server's limits: {limit}"),
        ),
        ImageError::Unsupported(unsupported) => DecodeError::new(
            ErrorCode::UnsupportedFormat,
            format!("unsupported {format:?} image: {unsupported}"),
        ),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::new(
                ErrorCode::CorruptImage,
                format!("the {format:?} data is truncated"),
            )
        }
        // Some decoders (OpenEXR) report a valid file using a feature they lack only in
        // their message text ("not supported: deep data").
        other if other.to_string().contains("not supported") => DecodeError::new(
            ErrorCode::UnsupportedFormat,
            format!("unsupported {format:?} image: {other}"),
        ),
        other => DecodeError::new(
            ErrorCode::CorruptImage,
            format!("corrupt {format:?} image: {other}"),
        ),
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    shown.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb};

    /// A photo-like colour JPEG: smooth gradients in each channel.
    fn photo_jpeg(width: u32, height: u32) -> Vec<u8> {
        let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(width, height, |x, y| {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let wave = ((fx * 9.0).sin() * (fy * 7.0).cos() * 60.0) as i32;
            let c = |base: f32| (base + wave as f32).clamp(0.0, 255.0) as u8;
            Rgb([
                c(fx * 200.0),
                c(fy * 180.0 + 40.0),
                c((1.0 - fx) * 150.0 + 50.0),
            ])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg)
            .expect("encode jpeg");
        out.into_inner()
    }

    #[test]
    fn a_photo_is_decoded_at_reduced_scale_and_looks_the_same_at_the_model_s_size() {
        let jpeg = photo_jpeg(1600, 1200);
        let limits = DecodeLimits::default();
        let full = decode_image(&jpeg, &limits).expect("full decode");
        let needed = |_w, _h| (220, 165);
        let scaled = decode_image_for(&jpeg, &limits, Some(&needed)).expect("scaled decode");
        // 1/4 is the smallest scale giving at least 220×165 (1/8 would give 200×150).
        assert_eq!((scaled.width(), scaled.height()), (400, 300));
        let small = |img: &DynamicImage| {
            img.resize_exact(64, 48, image::imageops::FilterType::Triangle)
                .to_rgb8()
        };
        let (a, b) = (small(&full), small(&scaled));
        let mean_diff = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum::<f64>()
            / a.as_raw().len() as f64;
        assert!(mean_diff < 2.0, "mean difference {mean_diff} levels");
        // A PNG, or a JPEG too small to shrink, is decoded in full.
        let tiny = decode_image_for(&photo_jpeg(300, 200), &limits, Some(&needed)).expect("ok");
        assert_eq!((tiny.width(), tiny.height()), (300, 200));
        let png = decode_image_for(&png(640, 480), &limits, Some(&needed)).expect("png");
        assert_eq!((png.width(), png.height()), (640, 480));
        // A truncated JPEG is still refused, scaled or not.
        let cut = &jpeg[..jpeg.len() / 2];
        let error = decode_image_for(cut, &limits, Some(&needed)).expect_err("truncated");
        assert_eq!(error.code, ErrorCode::CorruptImage);
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img: ImageBuffer<Luma<u8>, Vec<u8>> =
            ImageBuffer::from_fn(width, height, |x, y| Luma([(x * 7 + y * 3) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img: ImageBuffer<Rgb<u8>, Vec<u8>> =
            ImageBuffer::from_fn(width, height, |x, y| Rgb([x as u8, y as u8, 128]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg)
            .expect("encode jpeg");
        out.into_inner()
    }

    /// A valid PNG header (signature + IHDR with a correct CRC) claiming a huge size,
    /// with no pixel data behind it.
    pub(crate) fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        let crc = crc32fast::hash(&ihdr);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn decodes_png_and_jpeg_of_any_size() {
        let limits = DecodeLimits::default();
        let img = decode_image(&png(28, 28), &limits).expect("png decodes");
        assert_eq!((img.width(), img.height()), (28, 28));
        let img = decode_image(&jpeg(640, 480), &limits).expect("jpeg decodes");
        assert_eq!((img.width(), img.height()), (640, 480));
    }

    #[test]
    fn empty_bytes_are_reported_as_empty() {
        let error = decode_image(&[], &DecodeLimits::default()).expect_err("empty");
        assert_eq!(error.code, ErrorCode::EmptyImage);
    }

    #[test]
    fn text_is_an_unsupported_format() {
        let error =
            decode_image(b"hello, I am a text file\n", &DecodeLimits::default()).expect_err("text");
        assert_eq!(error.code, ErrorCode::UnsupportedFormat);
        assert!(error.reason.contains("68 65 6c 6c"), "{}", error.reason);
    }

    #[test]
    fn exr_feature_the_decoder_lacks_is_unsupported_not_corrupt() {
        // OpenEXR magic, then file version 3: a well-formed header the decoder declines.
        let mut exr = vec![0x76, 0x2f, 0x31, 0x01, 3, 0, 0, 0];
        exr.extend_from_slice(&[0; 64]);
        let error = decode_image(&exr, &DecodeLimits::default()).expect_err("declined");
        assert_eq!(error.code, ErrorCode::UnsupportedFormat, "{}", error.reason);
        assert!(error.reason.contains("not supported"), "{}", error.reason);
    }

    #[test]
    fn truncated_jpeg_is_corrupt() {
        let full = jpeg(64, 64);
        let error =
            decode_image(&full[..full.len() / 2], &DecodeLimits::default()).expect_err("truncated");
        assert_eq!(error.code, ErrorCode::CorruptImage, "{}", error.reason);
    }

    #[test]
    fn decompression_bomb_header_is_refused_before_decoding() {
        let bomb = png_header_claiming(100_000, 100_000);
        let error = decode_image(&bomb, &DecodeLimits::default()).expect_err("bomb");
        assert_eq!(error.code, ErrorCode::ImageTooLarge, "{}", error.reason);
        assert!(error.reason.contains("100000×100000"), "{}", error.reason);
    }

    #[test]
    fn limits_are_configurable() {
        let limits = DecodeLimits {
            max_width: 16,
            ..DecodeLimits::default()
        };
        let error = decode_image(&png(28, 28), &limits).expect_err("too wide");
        assert_eq!(error.code, ErrorCode::ImageTooLarge);
    }

    #[test]
    fn random_garbage_after_a_png_signature_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for length in 0..200 {
            let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
            for _ in 0..length {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            let result = decode_image(&bytes, &DecodeLimits::default());
            assert!(result.is_err(), "{length} random bytes decoded as an image");
        }
    }
}
