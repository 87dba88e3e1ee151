//! Client-side downscaling of images too large for the broker (`--resize-to`).
//!
//! The model sees a small image (28×28 for the shipped one), so a 40-megapixel photo
//! loses nothing it needs when shrunk to a few hundred pixels a side before sending;
//! it just fits the broker's message size limit then (Pub/Sub: 10 MB).

use std::io::Cursor;

use anyhow::Context;
use image::imageops::FilterType;
use image::{ImageFormat, ImageReader};

/// Decodes `bytes`, shrinks the image to fit `side`×`side` pixels (aspect ratio kept;
/// smaller images keep their size) and encodes it as PNG. Decoding uses the `image`
/// crate's default limits, so a decompression bomb is an error, not an allocation.
pub fn to_png(bytes: &[u8], side: u32) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(side > 0, "--resize-to must be at least 1 pixel");
    let image = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("reading the image")?
        .decode()
        .context("decoding the image")?;
    let image = if image.width() > side || image.height() > side {
        image.resize(side, side, FilterType::Triangle)
    } else {
        image
    };
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .context("encoding the downscaled image as PNG")?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
        });
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .expect("encode");
        bytes
    }

    fn dimensions(bytes: &[u8]) -> (u32, u32) {
        let image = image::load_from_memory(bytes).expect("decodes");
        (image.width(), image.height())
    }

    #[test]
    fn large_images_shrink_to_fit_keeping_their_aspect_ratio() {
        let original = png(800, 400);
        let small = to_png(&original, 100).expect("downscaled");
        assert_eq!(dimensions(&small), (100, 50));
        assert!(small.len() < original.len());
    }

    #[test]
    fn small_images_keep_their_size() {
        assert_eq!(
            dimensions(&to_png(&png(20, 30), 100).expect("re-encoded")),
            (20, 30)
        );
    }

    #[test]
    fn what_is_not_an_image_is_an_error() {
        let error = to_png(b"not an image at all", 100).expect_err("not an image");
        assert!(format!("{error:#}").contains("image"), "{error:#}");
    }
}
