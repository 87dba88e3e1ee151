//! Image → model input conversion, shared by training on image folders, evaluation and the
//! classifier server so that every path feeds the network identically.
//!
//! Two recipes: the native CNN's (stretch to the input size with `image`'s Lanczos3,
//! scale to [0, 1], optional inversion, normalise, CHW), which training used and must
//! keep; and an ONNX model's configurable [`PreprocessRecipe`] (see [`recipe`]).

use image::imageops::FilterType;
use image::DynamicImage;

use crate::model::{ModelMetadata, Normalization};

pub mod recipe;

pub use recipe::{ChannelOrder, Interpolation, Layout, PreprocessRecipe, Resize};

/// Turns any decoded image into the model's input: for the native CNN grayscale or RGB
/// per metadata channels, resized to input size with a good filter, scaled to `[0, 1]`,
/// normalised, as CHW f32; for an ONNX model as its [`PreprocessRecipe`] says.
#[derive(Clone, Debug)]
pub struct Preprocessor {
    width: u32,
    height: u32,
    channels: u32,
    invert: bool,
    /// Per channel `1 / std`, precomputed.
    scale: Vec<f32>,
    /// Per channel mean.
    mean: Vec<f32>,
    /// An ONNX model's recipe; `None` for the native CNN's.
    recipe: Option<recipe::Compiled>,
}

/// Resampling filter used when an image is not already at the model's input size:
/// Lanczos3 is sharp and, because `image` widens its support when downscaling, also
/// anti-aliased for large photos.
const FILTER: FilterType = FilterType::Lanczos3;

impl Preprocessor {
    /// Builds the preprocessor described by a model's metadata.
    pub fn new(meta: &ModelMetadata) -> Self {
        Self::with_params(
            meta.input_width,
            meta.input_height,
            meta.input_channels,
            meta.invert,
            &meta.normalization,
        )
    }

    /// Builds a preprocessor from explicit parameters (used before metadata exists, e.g.
    /// while measuring a dataset's normalisation).
    pub fn with_params(
        width: u32,
        height: u32,
        channels: u32,
        invert: bool,
        norm: &Normalization,
    ) -> Self {
        let c = channels as usize;
        let get = |v: &[f32], i: usize, d: f32| v.get(i).or(v.first()).copied().unwrap_or(d);
        let mean = (0..c).map(|i| get(&norm.mean, i, 0.0)).collect();
        let scale = (0..c)
            .map(|i| {
                let s = get(&norm.std, i, 1.0);
                if s > 0.0 {
                    1.0 / s
                } else {
                    1.0
                }
            })
            .collect();
        Preprocessor {
            width,
            height,
            channels,
            invert,
            scale,
            mean,
            recipe: None,
        }
    }

    /// The preprocessor of an ONNX model: `recipe` checked
    /// ([`PreprocessRecipe::validate`]) and compiled to per-channel lookup tables.
    pub fn from_recipe(recipe: PreprocessRecipe) -> anyhow::Result<Self> {
        let compiled = recipe::Compiled::new(recipe)?;
        let r = &compiled.recipe;
        let norm = Normalization {
            mean: r.mean.clone(),
            std: r.std.clone(),
        };
        let mut pre = Self::with_params(r.width, r.height, r.channels, false, &norm);
        pre.recipe = Some(compiled);
        Ok(pre)
    }

    /// The ONNX recipe this preprocessor runs; `None` for the native CNN's.
    pub fn recipe(&self) -> Option<&PreprocessRecipe> {
        self.recipe.as_ref().map(|c| &c.recipe)
    }

    /// The smallest size a `width`×`height` image may be decoded at (aspect ratio kept)
    /// without changing what this preprocessor makes of it in any way that matters:
    /// twice the size its resize scales the image to, so the final resize still shrinks
    /// (and filters) by at least 2. A decoder that can shrink while decoding (JPEG's
    /// scaled IDCT) does so down to this, for a fraction of the work on a photo.
    pub fn decode_size_needed(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = (width.max(1) as f64, height.max(1) as f64);
        let factor = match self.recipe.as_ref().map(|c| c.recipe.resize) {
            Some(recipe::Resize::ShorterSideThenCenterCrop { shorter }) => {
                shorter as f64 / w.min(h)
            }
            _ => (self.width as f64 / w).max(self.height as f64 / h),
        };
        let side = |n: f64| ((n * factor * 2.0).ceil() as u32).clamp(1, u32::MAX);
        (side(w).min(width), side(h).min(height))
    }

    /// Number of floats produced per image: channels × height × width.
    pub fn input_len(&self) -> usize {
        (self.channels * self.width * self.height) as usize
    }

    /// `(channels, height, width)` of the produced input (in NCHW order whatever the
    /// layout).
    pub fn dims(&self) -> (usize, usize, usize) {
        (
            self.channels as usize,
            self.height as usize,
            self.width as usize,
        )
    }

    /// Converts one image into a fresh CHW vector of `input_len()` floats.
    pub fn to_input(&self, img: &DynamicImage) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.input_len());
        self.append_input(img, &mut out);
        out
    }

    /// Appends one image's input floats (CHW for the native CNN; for an ONNX model in
    /// its recipe's layout) to `out`, so a batch can be built without copies.
    pub fn append_input(&self, img: &DynamicImage, out: &mut Vec<f32>) {
        if let Some(recipe) = &self.recipe {
            recipe.append_input(img, out);
            return;
        }
        let (w, h) = (self.width, self.height);
        let plane = (w * h) as usize;
        if self.channels == 1 {
            let mut gray = img.to_luma8();
            if gray.dimensions() != (w, h) {
                gray = image::imageops::resize(&gray, w, h, FILTER);
            }
            out.extend(gray.as_raw().iter().map(|&p| self.value(p, 0)));
        } else {
            let mut rgb = img.to_rgb8();
            if rgb.dimensions() != (w, h) {
                rgb = image::imageops::resize(&rgb, w, h, FILTER);
            }
            let raw = rgb.as_raw();
            for ch in 0..self.channels as usize {
                out.extend((0..plane).map(|p| self.value(raw[p * 3 + ch.min(2)], ch)));
            }
        }
    }

    /// Normalises one 8-bit sample of channel `ch`.
    #[inline]
    fn value(&self, p: u8, ch: usize) -> f32 {
        let mut v = p as f32 / 255.0;
        if self.invert {
            v = 1.0 - v;
        }
        (v - self.mean[ch]) * self.scale[ch]
    }
}
