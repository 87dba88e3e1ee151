//! The ONNX preprocessing against Pillow + numpy, the way PyTorch users preprocess
//! (`tests/fixtures/preprocess/`, made by `scripts/make-preprocess-reference.py`): resize
//! modes, filters, crop, scale, mean/std, channel order, layout and grayscale. Pillow
//! and our SIMD resize round differently in their fixed-point arithmetic, so values may
//! differ by a few sample levels at sharp edges (a tenth of a level on average); a
//! different recipe moves them by much more.

use std::path::{Path, PathBuf};

use classifier_inference::preprocess::{
    ChannelOrder, Interpolation, Layout, PreprocessRecipe, Resize,
};
use classifier_inference::Preprocessor;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

#[derive(Deserialize)]
struct Reference {
    image: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    width: u32,
    height: u32,
    #[serde(default = "three")]
    channels: u32,
    resize: String,
    #[serde(default)]
    resize_shorter_to: u32,
    interpolation: Interpolation,
    scale: f32,
    mean: Vec<f32>,
    std: Vec<f32>,
    channel_order: ChannelOrder,
    layout: Layout,
    values: Vec<f32>,
}

fn three() -> u32 {
    3
}

impl Case {
    fn recipe(&self) -> PreprocessRecipe {
        PreprocessRecipe {
            width: self.width,
            height: self.height,
            channels: self.channels,
            resize: match self.resize.as_str() {
                "stretch" => Resize::Stretch,
                _ => Resize::ShorterSideThenCenterCrop {
                    shorter: self.resize_shorter_to,
                },
            },
            interpolation: self.interpolation,
            antialias: true,
            scale: self.scale,
            mean: self.mean.clone(),
            std: self.std.clone(),
            channel_order: self.channel_order,
            layout: self.layout,
        }
    }

    /// One sample level in this case's output units (the smallest std).
    fn level(&self) -> f32 {
        self.scale / self.std.iter().copied().fold(f32::INFINITY, f32::min)
    }
}

#[test]
fn onnx_preprocessing_matches_pillow_and_numpy() {
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference.json")).expect("reference"),
    )
    .expect("json");
    let image = image::open(fixtures().join(&reference.image)).expect("photo.png");
    for case in &reference.cases {
        let pre = Preprocessor::from_recipe(case.recipe()).expect("valid recipe");
        let ours = pre.to_input(&image);
        assert_eq!(ours.len(), case.values.len(), "{}", case.name);
        let level = case.level();
        let diffs: Vec<f32> = ours
            .iter()
            .zip(&case.values)
            .map(|(a, b)| (a - b).abs() / level)
            .collect();
        let max = diffs.iter().copied().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let off = diffs.iter().filter(|d| **d > 0.51).count() as f32 / diffs.len() as f32;
        eprintln!(
            "{}: max {max:.2} levels, mean {mean:.3}, {:.1}% off by more than half a level",
            case.name,
            off * 100.0
        );
        if case.interpolation == Interpolation::Nearest {
            // Pillow steps through source positions in 16.16 fixed point, so a few
            // picks land on the neighbouring pixel; ours are exactly (x + 0.5) × scale.
            assert!(off <= 0.03, "{}: {off} of the values differ", case.name);
            continue;
        }
        // Rounding differs at sharp edges (cubic and Lanczos overshoot, then clamp);
        // a wrong crop, filter, scale or channel order moves the mean by whole levels.
        assert!(
            max <= 5.0,
            "{}: max difference {max} sample levels",
            case.name
        );
        assert!(
            mean <= 0.15,
            "{}: mean difference {mean} sample levels",
            case.name
        );
        assert!(
            off <= 0.15,
            "{}: {off} of the values off by more than half a level",
            case.name
        );
    }
}
