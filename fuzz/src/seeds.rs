//! The seed corpus, generated with the same `image` encoders the server's decoders are
//! paired with (no external tools). `scripts/fuzz.sh` runs a target with
//! `FUZZ_MAKE_SEEDS=DIR` to (re)create `fuzz/seeds/` when it is missing.

use std::io::Cursor;
use std::path::Path;

use classifier_proto::{ClassifyRequest, ProstMessage};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};

/// One example image shipped with the repository (a 28×28 grey Fashion-MNIST PNG).
fn example_png(manifest_dir: &Path, class: &str, file: &str) -> Vec<u8> {
    let path = manifest_dir.join("../examples").join(class).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, format)
        .unwrap_or_else(|e| panic!("encoding {format:?}: {e}"));
    out.into_inner()
}

fn gradient_rgb(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([(x * 9) as u8, (y * 7) as u8, ((x + y) * 5) as u8])
    }))
}

fn gradient_rgba16(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgba16(ImageBuffer::from_fn(width, height, |x, y| {
        Rgba([
            (x * 2000) as u16,
            (y * 1500) as u16,
            30_000,
            65_535 - (x * 900) as u16,
        ])
    }))
}

fn gradient_luma(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageLuma8(ImageBuffer::from_fn(width, height, |x, y| {
        Luma([(x * 11 + y * 3) as u8])
    }))
}

/// A full request as the client sends it, behind a flag byte (see
/// `message_from_fuzz_bytes`).
fn request(flags: u8, request_id: &str, image: Vec<u8>, file_name: &str) -> Vec<u8> {
    let mut request = ClassifyRequest {
        schema_version: 1,
        request_id: request_id.into(),
        job_id: "job-1".into(),
        image,
        file_name: file_name.into(),
        content_type: classifier_proto::CONTENT_TYPE_REQUEST.into(),
        reply_topic: "classify-replies-job-1".into(),
        sent_at_unix_micros: 1_700_000_000_000_000,
        top_k: 3,
        ..ClassifyRequest::default()
    };
    request.attributes.insert("label".into(), "bag".into());
    let mut out = vec![flags];
    out.extend_from_slice(&request.encode_to_vec());
    out
}

/// Writes `DIR/request_to_input/*` and `DIR/decode_image/*`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bag = example_png(manifest_dir, "bag", "00018.png");
    let sneaker = example_png(manifest_dir, "sneaker", "00009.png");
    let rgb = gradient_rgb(30, 20);
    let grey = gradient_luma(28, 28);

    let requests: Vec<(&str, Vec<u8>)> = vec![
        (
            "png-bag-all-attributes",
            request(0x0f, "req-1", bag.clone(), "bag/00018.png"),
        ),
        (
            "png-sneaker-no-attributes",
            request(0, "req-2", sneaker.clone(), "x.png"),
        ),
        (
            "png-id-only-in-attributes",
            request(0x07, "", bag.clone(), ""),
        ),
        (
            "jpeg-rgb",
            request(0x05, "req-3", encode(&rgb, ImageFormat::Jpeg), "a.jpg"),
        ),
        (
            "gif",
            request(0x01, "req-4", encode(&rgb, ImageFormat::Gif), "a.gif"),
        ),
        (
            "webp-lossless",
            request(0x01, "req-5", encode(&rgb, ImageFormat::WebP), "a.webp"),
        ),
        (
            "tiff",
            request(0x01, "req-6", encode(&grey, ImageFormat::Tiff), "a.tif"),
        ),
        (
            "truncated-protobuf",
            vec![0x05, 0x12, 0x05, b'r', b'e', b'q', 0x22, 0xff, 0x01, 0x89],
        ),
    ];
    let control = [0x07, 0, 0, 0];
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("png-grey-example", bag),
        (
            "png-rgba16",
            encode(&gradient_rgba16(17, 9), ImageFormat::Png),
        ),
        ("jpeg-grey", encode(&grey, ImageFormat::Jpeg)),
        ("bmp-rgb", encode(&rgb, ImageFormat::Bmp)),
        (
            "ico-rgba",
            encode(&gradient_rgba16(16, 16).to_rgba8().into(), ImageFormat::Ico),
        ),
        ("pnm-grey", encode(&grey, ImageFormat::Pnm)),
        ("qoi-rgb", encode(&rgb, ImageFormat::Qoi)),
        (
            "farbfeld",
            encode(&gradient_rgba16(8, 8), ImageFormat::Farbfeld),
        ),
        ("hdr", encode(&rgb.to_rgb32f().into(), ImageFormat::Hdr)),
        (
            "exr",
            encode(
                &gradient_rgba16(8, 8).to_rgba32f().into(),
                ImageFormat::OpenExr,
            ),
        ),
    ];

    let requests_dir = dir.join("request_to_input");
    std::fs::create_dir_all(&requests_dir)?;
    for (name, bytes) in requests {
        std::fs::write(requests_dir.join(name), bytes)?;
    }
    let images_dir = dir.join("decode_image");
    std::fs::create_dir_all(&images_dir)?;
    for (name, bytes) in images {
        let mut seed = control.to_vec();
        seed.extend_from_slice(&bytes);
        std::fs::write(images_dir.join(name), seed)?;
    }
    Ok(())
}

/// Called from the targets' `init`: with `FUZZ_MAKE_SEEDS=DIR`, writes the seeds and
/// exits instead of fuzzing.
pub fn make_seeds_if_asked() {
    if let Some(dir) = std::env::var_os("FUZZ_MAKE_SEEDS") {
        let dir = Path::new(&dir);
        match write_seeds(dir) {
            Ok(()) => {
                eprintln!("fuzz: wrote seeds to {}", dir.display());
                std::process::exit(0);
            }
            Err(error) => {
                eprintln!("fuzz: writing seeds to {}: {error}", dir.display());
                std::process::exit(1);
            }
        }
    }
}
