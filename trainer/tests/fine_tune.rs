//! Fine-tuning (`trainer train --from`), proven without downloading anything: the shipped
//! Fashion-MNIST CNN is the pretrained model, and the new classes are not clothing but
//! shapes (or handwriting-like digits) drawn here, every one at its own size, angle,
//! place and texture. The CNN fine-tuned on a few of them must beat the same CNN trained
//! from scratch on the same images, measured on held-out ones by `trainer evaluate`'s
//! code. The ONNX path is checked for its
//! mechanics on random-weight models of the usual shapes (torchvision's Gemm head,
//! Keras' MatMul + Add + Softmax): the cut, the cache, and a written model that loads and
//! answers as the head did.

use std::path::{Path, PathBuf};

use classifier_inference::backbone::SavedFormat;
use classifier_inference::Classifier;
use image::{GrayImage, Luma};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use trainer::evaluate;
use trainer::finetune::{fine_tune, FineTuneOptions, HeadKind};
use trainer::train::{self, ImageFolderOptions, RunOptions, TrainConfig};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The strokes of each digit, as polylines in the unit square (y down).
fn strokes(digit: usize) -> Vec<Vec<(f32, f32)>> {
    let ellipse = |cx: f32, cy: f32, rx: f32, ry: f32| -> Vec<(f32, f32)> {
        (0..=16)
            .map(|k| {
                let t = k as f32 / 16.0 * std::f32::consts::TAU;
                (cx + rx * t.sin(), cy - ry * t.cos())
            })
            .collect()
    };
    match digit {
        0 => vec![ellipse(0.5, 0.5, 0.28, 0.4)],
        1 => vec![vec![(0.35, 0.25), (0.55, 0.1), (0.55, 0.9)]],
        2 => vec![vec![
            (0.25, 0.3),
            (0.35, 0.13),
            (0.6, 0.1),
            (0.75, 0.28),
            (0.65, 0.5),
            (0.25, 0.88),
            (0.8, 0.88),
        ]],
        3 => vec![vec![
            (0.25, 0.15),
            (0.7, 0.15),
            (0.45, 0.45),
            (0.72, 0.62),
            (0.65, 0.85),
            (0.25, 0.85),
        ]],
        4 => vec![vec![(0.65, 0.9), (0.65, 0.1), (0.2, 0.62), (0.82, 0.62)]],
        5 => vec![vec![
            (0.75, 0.1),
            (0.32, 0.1),
            (0.28, 0.45),
            (0.6, 0.42),
            (0.76, 0.65),
            (0.6, 0.88),
            (0.25, 0.84),
        ]],
        6 => vec![vec![
            (0.7, 0.1),
            (0.4, 0.3),
            (0.27, 0.65),
            (0.45, 0.9),
            (0.7, 0.75),
            (0.62, 0.52),
            (0.3, 0.6),
        ]],
        7 => vec![vec![(0.2, 0.12), (0.8, 0.12), (0.42, 0.9)]],
        8 => vec![
            ellipse(0.5, 0.28, 0.2, 0.18),
            ellipse(0.5, 0.68, 0.25, 0.22),
        ],
        _ => vec![
            ellipse(0.48, 0.32, 0.22, 0.2),
            vec![(0.7, 0.32), (0.6, 0.9)],
        ],
    }
}

/// A pen stroke from one point to another, and its width in pixels.
type Segment = ((f32, f32), (f32, f32), f32);

/// One 28×28 digit: white strokes on black, as in MNIST, every stroke and pose varied,
/// with a stray stroke or two and noise around it.
fn digit_image(digit: usize, rng: &mut StdRng) -> GrayImage {
    let angle = rng.random_range(-0.35f32..0.35);
    let shear = rng.random_range(-0.35f32..0.35);
    let (sx, sy) = (
        rng.random_range(0.55f32..1.1),
        rng.random_range(0.6f32..1.1),
    );
    let (tx, ty) = (
        rng.random_range(-0.15f32..0.15),
        rng.random_range(-0.12f32..0.12),
    );
    let (sin, cos) = angle.sin_cos();
    let mut segments: Vec<Segment> = Vec::new();
    let pen = rng.random_range(1.0f32..4.0);
    for stroke in strokes(digit) {
        let points: Vec<(f32, f32)> = stroke
            .iter()
            .map(|&(x, y)| {
                let (x, y) = (
                    x + rng.random_range(-0.1f32..0.1) - 0.5,
                    y + rng.random_range(-0.1f32..0.1) - 0.5,
                );
                let (x, y) = ((x + shear * y) * sx, y * sy);
                let (x, y) = (x * cos - y * sin, x * sin + y * cos);
                ((x + 0.5 + tx) * 20.0 + 4.0, (y + 0.5 + ty) * 20.0 + 4.0)
            })
            .collect();
        segments.extend(points.windows(2).map(|w| (w[0], w[1], pen)));
    }
    for _ in 0..rng.random_range(0..3) {
        let a = (
            rng.random_range(0.0f32..28.0),
            rng.random_range(0.0f32..28.0),
        );
        let b = (
            a.0 + rng.random_range(-8.0f32..8.0),
            a.1 + rng.random_range(-8.0f32..8.0),
        );
        segments.push((a, b, rng.random_range(0.8f32..2.0)));
    }
    let ink = rng.random_range(0.4f32..1.0);
    let noise: Vec<f32> = (0..28 * 28)
        .map(|_| rng.random_range(0.0f32..0.3))
        .collect();
    GrayImage::from_fn(28, 28, |x, y| {
        let p = (x as f32 + 0.5, y as f32 + 0.5);
        let v = segments
            .iter()
            .map(|&(a, b, width)| {
                ((width / 2.0 - distance_to_segment(p, a, b)) + 0.5).clamp(0.0, 1.0)
            })
            .fold(0.0f32, f32::max);
        let v = v * ink + noise[(y * 28 + x) as usize];
        Luma([(v.min(1.0) * 255.0) as u8])
    })
}

fn distance_to_segment(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = (dx * dx + dy * dy).max(1e-6);
    let t = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0);
    let (cx, cy) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    (cx * cx + cy * cy).sqrt()
}

/// The names of the ten shape classes [`shape_image`] draws.
const SHAPES: [&str; 10] = [
    "circle", "ring", "crescent", "triangle", "square", "hexagon", "star", "cross", "arrow",
    "heart",
];

/// Whether the point `(x, y)` (shape coordinates, about −1 to 1) lies inside `shape`.
fn inside(shape: usize, x: f32, y: f32) -> bool {
    let r = (x * x + y * y).sqrt();
    let polygon = |points: &[(f32, f32)]| {
        let mut inside = false;
        for i in 0..points.len() {
            let (a, b) = (points[i], points[(i + 1) % points.len()]);
            if (a.1 > y) != (b.1 > y) && x < a.0 + (y - a.1) / (b.1 - a.1) * (b.0 - a.0) {
                inside = !inside;
            }
        }
        inside
    };
    let regular = |k: usize, inner: Option<f32>| -> Vec<(f32, f32)> {
        let n = if inner.is_some() { 2 * k } else { k };
        (0..n)
            .map(|i| {
                let radius = match inner {
                    Some(r) if i % 2 == 1 => r,
                    _ => 1.0,
                };
                let t = i as f32 / n as f32 * std::f32::consts::TAU;
                (radius * t.sin(), -radius * t.cos())
            })
            .collect()
    };
    match shape {
        0 => r < 1.0,
        1 => r < 1.0 && r > 0.6,
        2 => r < 1.0 && ((x - 0.5).powi(2) + y * y).sqrt() > 0.8,
        3 => polygon(&regular(3, None)),
        4 => x.abs() < 0.75 && y.abs() < 0.75,
        5 => polygon(&regular(6, None)),
        6 => polygon(&regular(5, Some(0.45))),
        7 => (x.abs() < 0.3 && y.abs() < 1.0) || (y.abs() < 0.3 && x.abs() < 1.0),
        8 => polygon(&[
            (-1.0, -0.3),
            (0.2, -0.3),
            (0.2, -0.75),
            (1.0, 0.0),
            (0.2, 0.75),
            (0.2, 0.3),
            (-1.0, 0.3),
        ]),
        _ => {
            let (x, y) = (x * 1.2, -y * 1.2 + 0.2);
            (x * x + y * y - 1.0).powi(3) - x * x * y.powi(3) < 0.0
        }
    }
}

/// One 28×28 shape, light on dark like a Fashion-MNIST garment: filled plain, striped or
/// speckled, at a random size, stretch, angle and place, with noise around it.
fn shape_image(shape: usize, rng: &mut StdRng) -> GrayImage {
    let angle = rng.random_range(-0.6f32..0.6);
    let (sin, cos) = angle.sin_cos();
    let size = rng.random_range(7.0f32..12.5);
    let stretch = rng.random_range(0.75f32..1.3);
    let (cx, cy) = (
        14.0 + rng.random_range(-3.0f32..3.0),
        14.0 + rng.random_range(-3.0f32..3.0),
    );
    let ink = rng.random_range(0.45f32..1.0);
    let texture = rng.random_range(0..3);
    let (freq, phase) = (rng.random_range(0.5f32..1.6), rng.random_range(0.0f32..6.3));
    let mut speckle = StdRng::seed_from_u64(rng.random());
    GrayImage::from_fn(28, 28, |px, py| {
        let mut covered = 0.0;
        for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
            let (dx, dy) = (px as f32 + ox - cx, py as f32 + oy - cy);
            let (x, y) = (
                (dx * cos + dy * sin) / size / stretch,
                (-dx * sin + dy * cos) / size,
            );
            if inside(shape, x, y) {
                covered += 0.25;
            }
        }
        let fill = match texture {
            0 => 1.0,
            1 => 0.65 + 0.35 * (px as f32 * freq + phase).sin(),
            _ => speckle.random_range(0.5f32..1.0),
        };
        let v = covered * ink * fill + speckle.random_range(0.0f32..0.1);
        Luma([(v.min(1.0) * 255.0) as u8])
    })
}

/// `root/<shape>/<n>.png`, `per_class` images of each shape.
fn write_shapes(root: &Path, per_class: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (shape, name) in SHAPES.iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for n in 0..per_class {
            shape_image(shape, &mut rng)
                .save(dir.join(format!("{n:04}.png")))
                .expect("write png");
        }
    }
}

/// `root/digit-<d>/<n>.png`, `per_class` images of each digit.
fn write_digits(root: &Path, per_class: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for digit in 0..10 {
        let dir = root.join(format!("digit-{digit}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for n in 0..per_class {
            digit_image(digit, &mut rng)
                .save(dir.join(format!("{n:04}.png")))
                .expect("write png");
        }
    }
}

fn run_options(output: &Path, epochs: usize) -> RunOptions {
    RunOptions {
        config: TrainConfig {
            epochs: Some(epochs),
            ..TrainConfig::default()
        },
        validation_split: 0.1,
        output: output.to_path_buf(),
        name: "digits".into(),
        version: "1".into(),
        command: "test".into(),
    }
}

fn fine_tune_options(from: &Path, cache: Option<&Path>) -> FineTuneOptions {
    FineTuneOptions {
        from: from.to_path_buf(),
        feature_node: None,
        head: HeadKind::Linear,
        unfreeze: 0,
        copies: 2,
        flip: false,
        cache_dir: cache.map(Path::to_path_buf),
        test_split: 0.0,
    }
}

/// Accuracy of the model directory `model` on the class folders of `heldout`.
fn heldout_accuracy(model: &Path, heldout: &Path) -> f64 {
    evaluate::evaluate_image_folder(model, heldout)
        .expect("evaluates")
        .evaluation
        .accuracy()
}

/// Held-out accuracy of a model fine-tuned from the shipped CNN on `folder`, cut at
/// `node` with `unfreeze` layers trained too, written to `out`.
fn fine_tuned(
    folder: &Path,
    out: &Path,
    (node, unfreeze): (Option<&str>, usize),
    heldout: &Path,
) -> f64 {
    let mut options = fine_tune_options(&workspace().join("models/fashion-mnist"), None);
    options.feature_node = node.map(str::to_string);
    options.unfreeze = unfreeze;
    fine_tune(folder, &options, &run_options(out, 60), |_| {})
        .unwrap_or_else(|e| panic!("fine-tunes at {node:?}, unfreeze {unfreeze}: {e:#}"));
    heldout_accuracy(out, heldout)
}

/// The proof. On 1,000 held-out images, the shipped CNN fine-tuned on 50 images per
/// class beats the same CNN trained from scratch on the same images, with its hidden
/// layer trained on the cached features (`--unfreeze 1`) and with every layer trained
/// from its weights (`--unfreeze 3`). Printed beside them: the linear head alone on the
/// hidden layer (the default cut) and on the convolution features (`--feature-node
/// flatten`), which need not win: this backbone is small and was trained on clothing.
///
/// `FINE_TUNE_DATA=shapes` (the default: ten filled, textured shapes, light on dark like
/// a garment) or `digits` (handwriting-like strokes, where clothing features transfer
/// badly), and `FINE_TUNE_SIZES=50,200` choose what is measured; the win is asserted at
/// 50 shapes per class, where a pretrained start matters most.
#[test]
fn fine_tuning_the_shipped_cnn_beats_training_from_scratch_on_few_images() {
    let data = std::env::var("FINE_TUNE_DATA").unwrap_or_else(|_| "shapes".into());
    let write = |root: &Path, per_class: usize, seed: u64| match data.as_str() {
        "digits" => write_digits(root, per_class, seed),
        _ => write_shapes(root, per_class, seed),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let heldout = tmp.path().join("heldout");
    write(&heldout, 100, 7);
    let sizes: Vec<usize> = std::env::var("FINE_TUNE_SIZES")
        .unwrap_or_else(|_| "50".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for per_class in sizes {
        let folder = tmp.path().join(format!("{data}-{per_class}"));
        write(&folder, per_class, per_class as u64);
        let path = |name: &str| tmp.path().join(format!("{name}-{per_class}"));
        let hidden = fine_tuned(&folder, &path("hidden"), (None, 0), &heldout);
        let flatten = fine_tuned(&folder, &path("flatten"), (Some("flatten"), 0), &heldout);
        let unfrozen = fine_tuned(&folder, &path("unfrozen"), (None, 1), &heldout);
        let whole = fine_tuned(&folder, &path("whole"), (None, 3), &heldout);
        let folder_options = ImageFolderOptions {
            image_size: 28,
            channels: 1,
            test_split: 0.0,
        };
        let scratch_run = run_options(&path("scratch"), 60);
        train::train_image_folder(&folder, &folder_options, &scratch_run, |_| {})
            .expect("trains from scratch");
        let scratch = heldout_accuracy(&path("scratch"), &heldout);
        eprintln!(
            "{per_class} {data} per class, accuracy on 1,000 held-out: linear head on \
             fc1.relu {:.1}%, on flatten {:.1}%, --unfreeze 1 {:.1}%, --unfreeze 3 {:.1}%, \
             from scratch {:.1}%",
            hidden * 100.0,
            flatten * 100.0,
            unfrozen * 100.0,
            whole * 100.0,
            scratch * 100.0
        );
        if data == "shapes" && per_class <= 50 {
            assert!(
                unfrozen > scratch && whole > scratch,
                "{per_class} per class: fine-tuned {unfrozen:.3} and {whole:.3}, scratch {scratch:.3}"
            );
        }
    }
}

/// `root/<colour>/<n>.png`: three classes of 40×36 noisy images, each mostly one colour.
fn write_colours(root: &Path, per_class: usize) {
    let mut rng = StdRng::seed_from_u64(3);
    for (class, name) in ["red", "green", "blue"].iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for n in 0..per_class {
            let img = image::RgbImage::from_fn(40, 36, |_, _| {
                let mut px = [0u8; 3];
                for (c, v) in px.iter_mut().enumerate() {
                    let base = if c == class { 200 } else { 40 };
                    *v = base + rng.random_range(0..50);
                }
                image::Rgb(px)
            });
            img.save(dir.join(format!("{n:03}.png")))
                .expect("write png");
        }
    }
}

/// A fixture model of `inference/tests/fixtures/onnx` as a model directory.
fn onnx_backbone(root: &Path, fixture: &str) -> PathBuf {
    let fixtures = workspace().join("inference/tests/fixtures/onnx");
    let dir = root.join(fixture);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (from, to) in [("onnx", "model.onnx"), ("labels.txt", "labels.txt")] {
        std::fs::copy(fixtures.join(format!("{fixture}.{from}")), dir.join(to)).expect("copy");
    }
    dir
}

/// Random-weight ONNX backbones of the two usual head shapes: each is cut at the input
/// of its last linear layer, its features are cached (a second run with another head
/// reads them back), and the written ONNX directory loads as a server loads it, names
/// its backbone and its new classes, and answers every test image as the head did.
#[test]
fn an_onnx_backbone_is_cut_cached_and_written_as_a_model_that_serves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder = tmp.path().join("colours");
    write_colours(&folder, 12);
    let cache = tmp.path().join("cache");
    for (fixture, feature) in [
        ("resnet18-tiny-op17", "/Flatten_output_0"),
        (
            "keras-mobilenet-nhwc-tiny-op13",
            "/global_average_pooling2d/ReduceMean_output_0",
        ),
    ] {
        let backbone = onnx_backbone(tmp.path(), fixture);
        let mut options = fine_tune_options(&backbone, Some(&cache));
        options.test_split = 0.25;
        let mut read_from_cache = Vec::new();
        for head in [HeadKind::Linear, HeadKind::Mlp { hidden: 16 }] {
            options.head = head;
            let out = tmp.path().join(format!("{fixture}-{head:?}"));
            let outcome = fine_tune(&folder, &options, &run_options(&out, 5), |_| {})
                .unwrap_or_else(|e| panic!("{fixture}: {e:#}"));
            assert_eq!(outcome.format, SavedFormat::Onnx, "{fixture}");
            assert!(out.join("model.onnx").is_file() && out.join("metadata.json").is_file());
            assert!(!out.join("model.safetensors").exists());
            assert_eq!(
                outcome.test.total(),
                9,
                "{fixture}: 3 of 12 per class held out"
            );
            assert_eq!(
                outcome.disagreements,
                Some(0),
                "{fixture}: the written model is the head"
            );
            let sets = outcome.features.as_ref().expect("features were computed");
            assert_eq!(
                sets.train.labels.len() % 3,
                0,
                "each image and its 2 copies"
            );
            read_from_cache.push(sets.cache.as_ref().map(|(_, hit)| *hit));
            let served = Classifier::load(&out).expect("the written model loads");
            let meta = served.metadata();
            assert_eq!(meta.class_names, ["blue", "green", "red"]);
            assert!(
                meta.backbone.contains(fixture) && meta.backbone.contains(feature),
                "{fixture}: {}",
                meta.backbone
            );
            let pre = served.preprocessor();
            let img = image::open(folder.join("red/000.png")).expect("png");
            let probs = served.predict(&pre.to_input(&img), 1).expect("predicts");
            assert_eq!(probs[0].len(), 3);
            assert!((probs[0].iter().sum::<f32>() - 1.0).abs() < 1e-4);
        }
        assert_eq!(read_from_cache, [Some(false), Some(true)], "{fixture}");
    }
}

/// What cannot be done is refused with a reason: a feature node the model lacks (the
/// error lists the last tensors), `--unfreeze` on an ONNX backbone, and writing the
/// model over its own backbone.
#[test]
fn impossible_fine_tuning_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder = tmp.path().join("colours");
    write_colours(&folder, 4);
    let backbone = onnx_backbone(tmp.path(), "resnet18-tiny-op17");
    let out = tmp.path().join("out");
    let mut options = fine_tune_options(&backbone, None);
    options.feature_node = Some("no-such-tensor".into());
    let err = fine_tune(&folder, &options, &run_options(&out, 1), |_| {}).expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("no-such-tensor") && text.contains("/Flatten_output_0"),
        "{text}"
    );

    let mut options = fine_tune_options(&backbone, None);
    options.unfreeze = 1;
    let err = fine_tune(&folder, &options, &run_options(&out, 1), |_| {}).expect_err("refused");
    assert!(
        format!("{err:#}").contains("native CNN backbone"),
        "{err:#}"
    );

    let options = fine_tune_options(&backbone, None);
    let err =
        fine_tune(&folder, &options, &run_options(&backbone, 1), |_| {}).expect_err("refused");
    assert!(
        format!("{err:#}").contains("backbone's own directory"),
        "{err:#}"
    );
    assert!(
        backbone.join("model.onnx").is_file(),
        "the backbone is untouched"
    );
}

/// The native CNN with a head that does not fit its shape (an MLP on `fc1.relu`) is
/// written as ONNX: its export cut at the hidden layer, with the MLP on top, answering
/// as the head did.
#[test]
fn a_native_backbone_with_an_mlp_head_is_written_as_onnx() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder = tmp.path().join("digits");
    write_digits(&folder, 10, 1);
    let out = tmp.path().join("mlp");
    let mut options = fine_tune_options(&workspace().join("models/fashion-mnist"), None);
    options.head = HeadKind::Mlp { hidden: 32 };
    options.test_split = 0.2;
    let outcome = fine_tune(&folder, &options, &run_options(&out, 5), |_| {}).expect("fine-tunes");
    assert_eq!(outcome.format, SavedFormat::Onnx);
    assert_eq!(outcome.disagreements, Some(0));
    assert!(outcome.classifier.metadata().backbone.contains("fc1.relu"));
    assert_eq!(outcome.classifier.metadata().class_names.len(), 10);
}

/// A model fine-tuned here is a backbone like any other: cut at its own head's input
/// (`head.flatten`), with the new head's names (`head_1.…`) clear of the old ones.
#[test]
fn a_fine_tuned_onnx_model_can_be_fine_tuned_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder = tmp.path().join("colours");
    write_colours(&folder, 6);
    let first = tmp.path().join("first");
    let backbone = onnx_backbone(tmp.path(), "resnet18-tiny-op17");
    fine_tune(
        &folder,
        &fine_tune_options(&backbone, None),
        &run_options(&first, 3),
        |_| {},
    )
    .expect("fine-tunes the fixture");
    let second = tmp.path().join("second");
    let outcome = fine_tune(
        &folder,
        &fine_tune_options(&first, None),
        &run_options(&second, 3),
        |_| {},
    )
    .expect("fine-tunes the fine-tuned model");
    assert_eq!(outcome.format, SavedFormat::Onnx);
    assert_eq!(outcome.disagreements, Some(0));
    let backbone = &outcome.classifier.metadata().backbone;
    assert!(backbone.contains("head.flatten"), "{backbone}");
}
