//! The configurable preprocessing of an ONNX model ([`PreprocessRecipe`]): the choices
//! exporters bake into their models (resize then centre crop or stretch, interpolation,
//! scale, mean/std, channel order, layout), run with a SIMD resize
//! (`fast_image_resize`) so that a 12-megapixel photo becomes a 224×224 input in
//! milliseconds.

use std::cell::RefCell;

use anyhow::{bail, Context};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;
use serde::{Deserialize, Serialize};

/// How an image is brought to the model's input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resize {
    /// Scale to exactly the input size, ignoring the aspect ratio (what the native CNN
    /// and many Keras pipelines do).
    Stretch,
    /// Scale so that the shorter side is `shorter` pixels (aspect ratio kept), then cut
    /// the input size out of the centre: torchvision's `Resize(256)` +
    /// `CenterCrop(224)`, the usual ImageNet recipe.
    ShorterSideThenCenterCrop {
        /// The shorter side's length after scaling, at least the input's larger side.
        shorter: u32,
    },
}

/// The resampling filter of a resize. With antialiasing (the default) the filter widens
/// when shrinking, as Pillow (and so torchvision on PIL images) does; without it, it
/// keeps its size, as OpenCV's and TensorFlow's resizes do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// The nearest source pixel.
    Nearest,
    /// Linear in both directions (Pillow `BILINEAR`, torchvision's default).
    Bilinear,
    /// Catmull-Rom cubic, a = -0.5 (Pillow `BICUBIC`, timm's usual choice).
    Bicubic,
    /// Lanczos with 3 lobes (Pillow `LANCZOS`).
    Lanczos3,
}

/// Order of the colour channels the model expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelOrder {
    /// Red, green, blue (PyTorch, Keras, most exports).
    #[serde(alias = "rgb")]
    RGB,
    /// Blue, green, red (OpenCV-based pipelines, Caffe-style models).
    #[serde(alias = "bgr")]
    BGR,
}

/// Memory layout of the model's input tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// `[batch, channels, height, width]` (PyTorch exports).
    #[serde(alias = "nchw")]
    NCHW,
    /// `[batch, height, width, channels]` (TensorFlow/Keras exports through tf2onnx).
    #[serde(alias = "nhwc")]
    NHWC,
}

/// Everything that turns a decoded image into one model input, resolved (no defaults
/// left): `value = (pixel × scale − mean[c]) / std[c]` per channel `c` of the model's
/// input, in `channel_order`, written in `layout`. Grayscale when `channels` is 1 (a
/// colour image is converted with ITU-R 601-2 luma weights, as Pillow does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreprocessRecipe {
    /// Input width in pixels.
    pub width: u32,
    /// Input height in pixels.
    pub height: u32,
    /// 1 (grayscale) or 3 (colour).
    pub channels: u32,
    /// Resize mode.
    pub resize: Resize,
    /// Resampling filter.
    pub interpolation: Interpolation,
    /// Whether the filter widens when shrinking (see [`Interpolation`]).
    pub antialias: bool,
    /// Factor from an 8-bit sample to the value mean/std apply to (1/255: [0, 1]).
    pub scale: f32,
    /// Mean per input channel (in `channel_order`).
    pub mean: Vec<f32>,
    /// Standard deviation per input channel (in `channel_order`).
    pub std: Vec<f32>,
    /// RGB or BGR.
    pub channel_order: ChannelOrder,
    /// NCHW or NHWC.
    pub layout: Layout,
}

/// Largest input side accepted: bounds the memory one preprocessed image takes
/// (4096² × 3 floats = 200 MB would already be absurd for a classifier).
pub const MAX_INPUT_SIDE: u32 = 4096;

impl PreprocessRecipe {
    /// Checks that the recipe can be run: sizes in range, a crop that fits, finite
    /// positive scale and std, one mean and std per channel.
    pub fn validate(&self) -> anyhow::Result<()> {
        let (w, h) = (self.width, self.height);
        if !(1..=MAX_INPUT_SIDE).contains(&w) || !(1..=MAX_INPUT_SIDE).contains(&h) {
            bail!("input size {w}x{h} is out of range (1 to {MAX_INPUT_SIDE} pixels a side)");
        }
        if !(self.channels == 1 || self.channels == 3) {
            bail!(
                "the model takes {} channels; only 1 (grayscale) or 3 (colour) are served",
                self.channels
            );
        }
        if let Resize::ShorterSideThenCenterCrop { shorter } = self.resize {
            if shorter < w.max(h) || shorter > 4 * MAX_INPUT_SIDE {
                bail!(
                    "resize_shorter_to = {shorter} cannot be centre-cropped to {w}x{h} (it \
                     must be at least {} and at most {})",
                    w.max(h),
                    4 * MAX_INPUT_SIDE
                );
            }
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            bail!("scale must be a positive number, got {}", self.scale);
        }
        let c = self.channels as usize;
        if self.mean.len() != c || self.std.len() != c {
            bail!(
                "mean and std need {c} values each (one per channel), got {} and {}",
                self.mean.len(),
                self.std.len()
            );
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            bail!("mean values must be finite numbers: {:?}", self.mean);
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("std values must be positive numbers: {:?}", self.std);
        }
        Ok(())
    }

    /// Floats per preprocessed image.
    pub fn input_len(&self) -> usize {
        self.channels as usize * self.width as usize * self.height as usize
    }
}

/// A validated recipe with its per-channel lookup tables (8-bit sample → input value).
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    pub(crate) recipe: PreprocessRecipe,
    /// `lut[c][p]` = the value of sample `p` in input channel `c`.
    lut: Vec<[f32; 256]>,
}

thread_local! {
    /// One resizer per thread (decode-pool threads): it keeps its scratch buffers
    /// between images instead of allocating them per image.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

impl Compiled {
    /// Validates `recipe` and builds its lookup tables.
    pub(crate) fn new(recipe: PreprocessRecipe) -> anyhow::Result<Compiled> {
        recipe.validate()?;
        let lut = (0..recipe.channels as usize)
            .map(|c| {
                let mut table = [0f32; 256];
                for (p, v) in table.iter_mut().enumerate() {
                    *v = (p as f32 * recipe.scale - recipe.mean[c]) / recipe.std[c];
                }
                table
            })
            .collect();
        Ok(Compiled { recipe, lut })
    }

    /// Appends one image's input values to `out` (`input_len` floats).
    pub(crate) fn append_input(&self, img: &DynamicImage, out: &mut Vec<f32>) {
        let pixels = self.resized_pixels(img);
        self.write_values(&pixels, out);
    }

    /// The image resized (and cropped) to the input size, as 8-bit gray or RGB samples.
    /// Never fails for a decoded image: if the SIMD resize refuses (it should not), the
    /// `image` crate's resize of the same region is used.
    fn resized_pixels(&self, img: &DynamicImage) -> Vec<u8> {
        let gray = self.recipe.channels == 1;
        let (w, h) = (img.width(), img.height());
        let converted;
        let (raw, pixel_type): (&[u8], PixelType) = match (gray, img) {
            (true, DynamicImage::ImageLuma8(g)) => (g.as_raw(), PixelType::U8),
            (false, DynamicImage::ImageRgb8(rgb)) => (rgb.as_raw(), PixelType::U8x3),
            (
                true,
                DynamicImage::ImageLumaA8(_)
                | DynamicImage::ImageLuma16(_)
                | DynamicImage::ImageLumaA16(_),
            ) => {
                converted = img.to_luma8().into_raw();
                (&converted, PixelType::U8)
            }
            (true, _) => {
                converted = luma_601(&img.to_rgb8());
                (&converted, PixelType::U8)
            }
            (false, _) => {
                converted = img.to_rgb8().into_raw();
                (&converted, PixelType::U8x3)
            }
        };
        let crop = self.crop_box(w, h);
        match self.resize_simd(raw, (w, h), pixel_type, crop) {
            Ok(pixels) => pixels,
            Err(error) => {
                tracing::warn!(%error, "SIMD resize failed; using the portable resize");
                self.resize_portable(img, crop)
            }
        }
    }

    /// The source region `(left, top, width, height)` that becomes the input, in source
    /// pixels (fractional): the whole image for [`Resize::Stretch`]; for the centre crop,
    /// the window torchvision's `Resize` + `CenterCrop` keep, mapped back to the source.
    fn crop_box(&self, w: u32, h: u32) -> (f64, f64, f64, f64) {
        let (out_w, out_h) = (self.recipe.width, self.recipe.height);
        match self.recipe.resize {
            Resize::Stretch => (0.0, 0.0, w as f64, h as f64),
            Resize::ShorterSideThenCenterCrop { shorter } => {
                let (rw, rh) = shorter_side_size(w, h, shorter);
                // torchvision's CenterCrop: int(round((size - crop) / 2)).
                let left = ((rw as f64 - out_w as f64) / 2.0).round_ties_even();
                let top = ((rh as f64 - out_h as f64) / 2.0).round_ties_even();
                let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
                let (left, top) = (left * sx, top * sy);
                // Within the image even where rounding would put the far edge a hair out.
                let width = (out_w as f64 * sx).min(w as f64 - left);
                let height = (out_h as f64 * sy).min(h as f64 - top);
                (left, top, width, height)
            }
        }
    }

    fn resize_simd(
        &self,
        raw: &[u8],
        (w, h): (u32, u32),
        pixel_type: PixelType,
        (left, top, cw, ch): (f64, f64, f64, f64),
    ) -> anyhow::Result<Vec<u8>> {
        let src = ImageRef::new(w, h, raw, pixel_type).context("source image")?;
        let mut dst = Image::new(self.recipe.width, self.recipe.height, pixel_type);
        let filter = match self.recipe.interpolation {
            Interpolation::Nearest => None,
            Interpolation::Bilinear => Some(FilterType::Bilinear),
            Interpolation::Bicubic => Some(FilterType::CatmullRom),
            Interpolation::Lanczos3 => Some(FilterType::Lanczos3),
        };
        let algorithm = match (filter, self.recipe.antialias) {
            (None, _) => ResizeAlg::Nearest,
            (Some(f), true) => ResizeAlg::Convolution(f),
            (Some(f), false) => ResizeAlg::Interpolation(f),
        };
        let options = ResizeOptions::new()
            .resize_alg(algorithm)
            .crop(left, top, cw, ch);
        RESIZER.with(|resizer| resizer.borrow_mut().resize(&src, &mut dst, &options))?;
        Ok(dst.into_vec())
    }

    /// The same region through the `image` crate (slower; the fallback only).
    fn resize_portable(&self, img: &DynamicImage, (l, t, cw, ch): (f64, f64, f64, f64)) -> Vec<u8> {
        use image::imageops::FilterType as F;
        let filter = match self.recipe.interpolation {
            Interpolation::Nearest => F::Nearest,
            Interpolation::Bilinear => F::Triangle,
            Interpolation::Bicubic => F::CatmullRom,
            Interpolation::Lanczos3 => F::Lanczos3,
        };
        let (l, t) = (l.floor() as u32, t.floor() as u32);
        let cropped = img.crop_imm(l, t, (cw.round() as u32).max(1), (ch.round() as u32).max(1));
        let resized = cropped.resize_exact(self.recipe.width, self.recipe.height, filter);
        if self.recipe.channels == 1 {
            resized.to_luma8().into_raw()
        } else {
            resized.to_rgb8().into_raw()
        }
    }

    /// Writes the resized samples as input values: channel order, layout and the
    /// per-channel lookup.
    fn write_values(&self, pixels: &[u8], out: &mut Vec<f32>) {
        let c = self.recipe.channels as usize;
        if c == 1 {
            out.extend(pixels.iter().map(|&p| self.lut[0][p as usize]));
            return;
        }
        // Input channel i reads source (RGB) channel `source[i]`.
        let source: [usize; 3] = match self.recipe.channel_order {
            ChannelOrder::RGB => [0, 1, 2],
            ChannelOrder::BGR => [2, 1, 0],
        };
        match self.recipe.layout {
            Layout::NCHW => {
                for (i, &s) in source.iter().enumerate() {
                    let lut = &self.lut[i];
                    out.extend(pixels.chunks_exact(3).map(|px| lut[px[s] as usize]));
                }
            }
            Layout::NHWC => {
                for px in pixels.chunks_exact(3) {
                    for (i, &s) in source.iter().enumerate() {
                        out.push(self.lut[i][px[s] as usize]);
                    }
                }
            }
        }
    }
}

/// Gray levels of an RGB image by ITU-R 601-2 luma, as Pillow's `convert("L")` (and so
/// torchvision's `Grayscale`) computes them: `(299 R + 587 G + 114 B) / 1000`, in
/// Pillow's fixed point. (`image`'s `to_luma8` uses Rec. 709 weights instead.)
fn luma_601(rgb: &image::RgbImage) -> Vec<u8> {
    rgb.pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// The size torchvision's `Resize(shorter)` gives a `w`×`h` image: the shorter side
/// becomes `shorter`, the longer `int(shorter × long / short)`.
pub(crate) fn shorter_side_size(w: u32, h: u32, shorter: u32) -> (u32, u32) {
    let long_of = |long: u32, short: u32| {
        ((shorter as u64 * long as u64) / short.max(1) as u64).max(1) as u32
    };
    if w <= h {
        (shorter, long_of(h, w))
    } else {
        (long_of(w, h), shorter)
    }
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage};

    use super::*;

    fn recipe(width: u32, height: u32) -> PreprocessRecipe {
        PreprocessRecipe {
            width,
            height,
            channels: 3,
            resize: Resize::Stretch,
            interpolation: Interpolation::Bilinear,
            antialias: true,
            scale: 1.0 / 255.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            channel_order: ChannelOrder::RGB,
            layout: Layout::NCHW,
        }
    }

    fn input(recipe: PreprocessRecipe, img: RgbImage) -> Vec<f32> {
        let mut out = Vec::new();
        Compiled::new(recipe)
            .expect("valid")
            .append_input(&DynamicImage::ImageRgb8(img), &mut out);
        out
    }

    #[test]
    fn a_uniform_image_gives_scale_mean_and_std_exactly_per_channel() {
        let img = RgbImage::from_pixel(300, 200, Rgb([51, 102, 204]));
        let mut r = recipe(7, 5);
        r.mean = vec![0.1, 0.2, 0.3];
        r.std = vec![0.5, 0.25, 2.0];
        r.resize = Resize::ShorterSideThenCenterCrop { shorter: 8 };
        let out = input(r, img);
        let expected = [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.8 - 0.3) / 2.0];
        for (c, plane) in out.chunks_exact(35).enumerate() {
            for v in plane {
                assert!(
                    (v - expected[c]).abs() < 1e-6,
                    "channel {c}: {v} vs {}",
                    expected[c]
                );
            }
        }
    }

    #[test]
    fn channel_order_and_layout_place_each_value() {
        // Left half red, right half blue: NCHW planes and NHWC pixels, RGB and BGR.
        let img = RgbImage::from_fn(8, 4, |x, _| {
            if x < 4 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let mut r = recipe(2, 1);
        r.interpolation = Interpolation::Nearest;
        assert_eq!(
            input(r.clone(), img.clone()),
            [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        );
        r.channel_order = ChannelOrder::BGR;
        assert_eq!(
            input(r.clone(), img.clone()),
            [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
        );
        r.layout = Layout::NHWC;
        assert_eq!(input(r, img), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn the_centre_crop_keeps_the_middle_of_the_longer_side() {
        // 300x100: shorter side 100 → 10, so 30x10; the centre crop of 10x10 keeps
        // source columns 100..200 only, which are the gray band.
        let img = RgbImage::from_fn(300, 100, |x, _| {
            if (100..200).contains(&x) {
                Rgb([128, 128, 128])
            } else {
                Rgb([0, 255, 0])
            }
        });
        let mut r = recipe(10, 10);
        r.resize = Resize::ShorterSideThenCenterCrop { shorter: 10 };
        r.interpolation = Interpolation::Nearest;
        let out = input(r.clone(), img.clone());
        assert!(
            out.iter().all(|v| (v - 128.0 / 255.0).abs() < 1e-6),
            "{out:?}"
        );
        // Stretched, the green sides come back.
        r.resize = Resize::Stretch;
        let out = input(r, img);
        assert!(out[100..200].contains(&1.0), "green in the G plane");
    }

    #[test]
    fn torchvision_sizes_and_crop_offsets() {
        assert_eq!(shorter_side_size(640, 480, 256), (341, 256));
        assert_eq!(shorter_side_size(480, 640, 256), (256, 341));
        assert_eq!(shorter_side_size(500, 500, 256), (256, 256));
        let compiled = Compiled::new(PreprocessRecipe {
            resize: Resize::ShorterSideThenCenterCrop { shorter: 256 },
            ..recipe(224, 224)
        })
        .expect("valid");
        // 341x256: left = round((341 - 224) / 2) = round(58.5) = 58 (ties to even),
        // top = round((256 - 224) / 2) = 16, in source pixels.
        let (l, t, w, h) = compiled.crop_box(640, 480);
        let s = 640.0 / 341.0;
        assert!(
            (l - 58.0 * s).abs() < 1e-9 && (t - 16.0 * 480.0 / 256.0).abs() < 1e-9,
            "{l} {t}"
        );
        assert!((w - 224.0 * s).abs() < 1e-9 && (h - 224.0 * 480.0 / 256.0).abs() < 1e-9);
    }

    #[test]
    fn a_grayscale_model_uses_pillows_luma() {
        let img = RgbImage::from_pixel(4, 4, Rgb([200, 100, 50]));
        let mut r = recipe(2, 2);
        r.channels = 1;
        r.mean = vec![0.0];
        r.std = vec![1.0];
        let out = input(r, img);
        // Pillow: (200*19595 + 100*38470 + 50*7471 + 0x8000) >> 16 = 124.
        assert!(
            out.iter().all(|v| (v - 124.0 / 255.0).abs() < 1e-6),
            "{out:?}"
        );
    }

    #[test]
    fn a_huge_photo_is_resized_fast_enough() {
        let img = RgbImage::from_fn(4000, 3000, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        });
        let mut r = recipe(224, 224);
        r.resize = Resize::ShorterSideThenCenterCrop { shorter: 256 };
        let compiled = Compiled::new(r).expect("valid");
        let img = DynamicImage::ImageRgb8(img);
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        compiled.append_input(&img, &mut out);
        let took = started.elapsed();
        assert_eq!(out.len(), 3 * 224 * 224);
        eprintln!("12 MP RGB → 224x224: {took:?}");
    }
}
