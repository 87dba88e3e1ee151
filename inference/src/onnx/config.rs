//! `model.toml`, the optional description of an ONNX model directory (format: see the
//! [`crate::onnx`] module docs), and how its unset values are filled in from the model.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::preprocess::{ChannelOrder, Interpolation, Layout, PreprocessRecipe, Resize};

/// The parsed `model.toml`: every field optional; unknown fields are an error (a typo
/// must not silently serve with a default).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelToml {
    /// Model name (default: the directory's name).
    pub name: Option<String>,
    /// Model version written in every reply (default: the ONNX file's `model_version`
    /// if set, else "1").
    pub version: Option<String>,
    /// What the model's output is (default `auto`).
    pub output: OutputKind,
    /// The `metadata_props` key holding the class names (default: the first of
    /// [`LABEL_KEYS`] present) when there is no `labels.txt`.
    pub labels_key: Option<String>,
    /// How images become the model's input.
    pub preprocess: PreprocessToml,
}

/// The `[preprocess]` table of `model.toml`; unset fields take the defaults listed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessToml {
    /// Input width (default: from the model's input shape; 224 if that is dynamic).
    pub width: Option<u32>,
    /// Input height (default: as `width`).
    pub height: Option<u32>,
    /// `"shorter-side-then-center-crop"` (default) or `"stretch"`.
    pub resize: Option<ResizeMode>,
    /// Shorter side before the centre crop (default: the input's larger side / 0.875,
    /// rounded: 256 for 224).
    pub resize_shorter_to: Option<u32>,
    /// `"nearest"`, `"bilinear"` (default), `"bicubic"` or `"lanczos3"`.
    pub interpolation: Option<Interpolation>,
    /// Whether the filter widens when shrinking, as Pillow/torchvision do (default
    /// true; false for OpenCV/TensorFlow-style resizing).
    pub antialias: Option<bool>,
    /// Factor applied to 8-bit samples before mean/std (default 1/255).
    pub scale: Option<f32>,
    /// Mean per channel, in the model's channel order (default: ImageNet's
    /// 0.485, 0.456, 0.406 for colour, 0 for grayscale).
    pub mean: Option<Vec<f32>>,
    /// Standard deviation per channel (default: ImageNet's 0.229, 0.224, 0.225 for
    /// colour, 1 for grayscale).
    pub std: Option<Vec<f32>>,
    /// `"RGB"` (default) or `"BGR"`.
    pub channel_order: Option<ChannelOrder>,
    /// `"NCHW"` or `"NHWC"` (default: from the model's input shape).
    pub layout: Option<Layout>,
}

/// `[preprocess] resize` of `model.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Shorter side to `resize_shorter_to`, then centre crop (torchvision's recipe).
    ShorterSideThenCenterCrop,
    /// Straight to the input size, aspect ratio not kept.
    Stretch,
}

/// What the model's (first) output holds per image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Probabilities if the graph's output comes out of a `Softmax` node, else logits.
    #[default]
    Auto,
    /// Unnormalised scores: softmax is applied.
    Logits,
    /// Already probabilities: returned as they are.
    Probabilities,
}

/// The `metadata_props` keys tried for class names, in order, when `labels_key` is not
/// set and there is no `labels.txt`.
pub const LABEL_KEYS: [&str; 6] = [
    "labels",
    "classes",
    "class_names",
    "names",
    "id2label",
    "class_labels",
];

/// ImageNet's per-channel mean (RGB), torchvision's and timm's default.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Input side used when neither the model nor `model.toml` gives one.
pub const DEFAULT_SIDE: u32 = 224;

impl ModelToml {
    /// Reads `path`; a missing file is the empty description (all defaults).
    pub fn load(path: &Path) -> anyhow::Result<ModelToml> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ModelToml::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses the text of a `model.toml`.
    pub fn parse(text: &str) -> anyhow::Result<ModelToml> {
        Ok(toml::from_str(text)?)
    }
}

/// What the model's input shape says, for the defaults of [`PreprocessToml::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InputShape {
    /// Layout told by where the channel axis (1 or 3) is; `None` if it cannot tell.
    pub layout: Option<Layout>,
    /// Dimensions after the batch one, `None` where symbolic or unknown.
    pub dims: [Option<u64>; 3],
}

impl InputShape {
    /// `(channels, height, width)` in `layout`.
    fn chw(&self, layout: Layout) -> [Option<u64>; 3] {
        let [a, b, c] = self.dims;
        match layout {
            Layout::NCHW => [a, b, c],
            Layout::NHWC => [c, a, b],
        }
    }
}

impl PreprocessToml {
    /// The complete recipe for a model whose input has `shape`: set fields win, the model
    /// gives layout, channels and size where they are fixed, the ImageNet recipe the rest.
    pub(crate) fn resolve(&self, shape: &InputShape) -> anyhow::Result<PreprocessRecipe> {
        let layout = match (self.layout, shape.layout) {
            (Some(layout), _) | (None, Some(layout)) => layout,
            (None, None) => bail!(
                "cannot tell the input layout from the model's input shape {}; set \
                 [preprocess] layout = \"NCHW\" or \"NHWC\" in model.toml",
                show_dims(&shape.dims)
            ),
        };
        let [c, h, w] = shape.chw(layout);
        let channels = match c {
            Some(c @ (1 | 3)) => c as u32,
            Some(c) => bail!(
                "the model's input has {c} channels (layout {layout:?}, shape {}); only 1 \
                 (grayscale) or 3 (colour) are served",
                show_dims(&shape.dims)
            ),
            None => bail!(
                "the model's input channel count is not fixed (layout {layout:?}, shape {})",
                show_dims(&shape.dims)
            ),
        };
        let width = pick_side("width", self.width, w)?;
        let height = pick_side("height", self.height, h)?;
        let resize = match self.resize.unwrap_or(ResizeMode::ShorterSideThenCenterCrop) {
            ResizeMode::Stretch => Resize::Stretch,
            ResizeMode::ShorterSideThenCenterCrop => Resize::ShorterSideThenCenterCrop {
                shorter: self
                    .resize_shorter_to
                    .unwrap_or_else(|| (width.max(height) as f64 / 0.875).round() as u32),
            },
        };
        let (mean, std) = match channels {
            1 => (vec![0.0], vec![1.0]),
            _ => (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()),
        };
        let recipe = PreprocessRecipe {
            width,
            height,
            channels,
            resize,
            interpolation: self.interpolation.unwrap_or(Interpolation::Bilinear),
            antialias: self.antialias.unwrap_or(true),
            scale: self.scale.unwrap_or(1.0 / 255.0),
            mean: self.mean.clone().unwrap_or(mean),
            std: self.std.clone().unwrap_or(std),
            channel_order: self.channel_order.unwrap_or(ChannelOrder::RGB),
            layout,
        };
        recipe.validate()?;
        Ok(recipe)
    }
}

/// One input side: `model.toml`'s if set (it must agree with a fixed model dimension),
/// else the model's, else [`DEFAULT_SIDE`].
fn pick_side(what: &str, configured: Option<u32>, model: Option<u64>) -> anyhow::Result<u32> {
    match (configured, model) {
        (Some(c), Some(m)) if c as u64 != m => {
            bail!("model.toml sets {what} = {c} but the model's input {what} is fixed at {m}")
        }
        (Some(c), _) => Ok(c),
        (None, Some(m)) => u32::try_from(m)
            .ok()
            .filter(|m| *m >= 1)
            .with_context(|| format!("the model's input {what} {m} is out of range")),
        (None, None) => Ok(DEFAULT_SIDE),
    }
}

/// `[1, 3, 224, 224]`-style text of dimensions after the batch, `?` where unknown.
pub(crate) fn show_dims(dims: &[Option<u64>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string()))
        .collect();
    format!("[N, {}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nchw(c: u64, h: Option<u64>, w: Option<u64>) -> InputShape {
        InputShape {
            layout: Some(Layout::NCHW),
            dims: [Some(c), h, w],
        }
    }

    #[test]
    fn an_empty_description_gives_the_imagenet_recipe() {
        let recipe = ModelToml::parse("")
            .expect("parses")
            .preprocess
            .resolve(&nchw(3, Some(224), Some(224)))
            .expect("resolves");
        assert_eq!(
            recipe,
            PreprocessRecipe {
                width: 224,
                height: 224,
                channels: 3,
                resize: Resize::ShorterSideThenCenterCrop { shorter: 256 },
                interpolation: Interpolation::Bilinear,
                antialias: true,
                scale: 1.0 / 255.0,
                mean: IMAGENET_MEAN.to_vec(),
                std: IMAGENET_STD.to_vec(),
                channel_order: ChannelOrder::RGB,
                layout: Layout::NCHW,
            }
        );
    }

    #[test]
    fn every_field_can_be_set() {
        let toml = r#"
            name = "shoes"
            version = "2.1"
            output = "probabilities"
            labels_key = "my_labels"
            [preprocess]
            width = 160
            height = 128
            resize = "stretch"
            interpolation = "bicubic"
            antialias = false
            scale = 1.0
            mean = [103.9, 116.8, 123.7]
            std = [1.0, 1.0, 1.0]
            channel_order = "BGR"
            layout = "NHWC"
        "#;
        let parsed = ModelToml::parse(toml).expect("parses");
        assert_eq!(parsed.name.as_deref(), Some("shoes"));
        assert_eq!(parsed.output, OutputKind::Probabilities);
        let shape = InputShape {
            layout: None,
            dims: [None, None, Some(3)],
        };
        let recipe = parsed.preprocess.resolve(&shape).expect("resolves");
        assert_eq!((recipe.width, recipe.height), (160, 128));
        assert_eq!(recipe.resize, Resize::Stretch);
        assert_eq!(recipe.interpolation, Interpolation::Bicubic);
        assert_eq!(recipe.channel_order, ChannelOrder::BGR);
        assert_eq!(recipe.layout, Layout::NHWC);
        assert!(!recipe.antialias);
        assert_eq!(recipe.mean, vec![103.9, 116.8, 123.7]);
    }

    #[test]
    fn typos_and_impossible_values_are_errors_that_say_what_is_wrong() {
        let typo = ModelToml::parse("[preprocess]\nmaen = [0.5]").expect_err("unknown field");
        assert!(format!("{typo:#}").contains("maen"), "{typo:#}");
        let bad_mode = ModelToml::parse("[preprocess]\nresize = \"squash\"").expect_err("mode");
        assert!(format!("{bad_mode:#}").contains("squash"), "{bad_mode:#}");
        let fixed = nchw(3, Some(224), Some(224));
        let cases = [
            ("[preprocess]\nwidth = 300", "fixed at 224"),
            ("[preprocess]\nresize_shorter_to = 200", "resize_shorter_to"),
            ("[preprocess]\nstd = [0.2, 0.0, 0.2]", "std"),
            ("[preprocess]\nmean = [0.5]", "3 values"),
            ("[preprocess]\nscale = -1.0", "scale"),
        ];
        for (text, expected) in cases {
            let error = ModelToml::parse(text)
                .expect("parses")
                .preprocess
                .resolve(&fixed)
                .expect_err(text);
            assert!(format!("{error:#}").contains(expected), "{text}: {error:#}");
        }
    }

    #[test]
    fn sizes_come_from_the_model_or_default_to_224_and_grayscale_from_one_channel() {
        let none = PreprocessToml::default();
        let gray = none.resolve(&nchw(1, None, None)).expect("resolves");
        assert_eq!((gray.width, gray.height, gray.channels), (224, 224, 1));
        assert_eq!(
            (gray.mean.clone(), gray.std.clone()),
            (vec![0.0], vec![1.0])
        );
        let nhwc = InputShape {
            layout: Some(Layout::NHWC),
            dims: [Some(299), Some(299), Some(3)],
        };
        let recipe = none.resolve(&nhwc).expect("resolves");
        assert_eq!(
            recipe.resize,
            Resize::ShorterSideThenCenterCrop { shorter: 342 }
        );
        let four = none
            .resolve(&nchw(4, Some(8), Some(8)))
            .expect_err("4 channels");
        assert!(format!("{four:#}").contains("4 channels"), "{four:#}");
        let unknown = InputShape {
            layout: None,
            dims: [Some(5), Some(5), Some(5)],
        };
        let error = none.resolve(&unknown).expect_err("no layout");
        assert!(format!("{error:#}").contains("layout"), "{error:#}");
    }
}
