//! End-to-end tests of the public API: folder loading, preprocessing, a tiny training run,
//! metadata round-trip, and the shipped Fashion-MNIST model on the shipped examples.

use std::path::{Path, PathBuf};

use classifier_inference::{Classifier, ModelMetadata, Normalization, Preprocessor, SimdLevel};
use image::{DynamicImage, GrayImage, Rgb, RgbImage};
use trainer::data::{self, FASHION_MNIST_CLASS_DIRS};
use trainer::evaluate;
use trainer::train::{self, Augment, ImageFolderOptions, RunOptions, TrainConfig};

/// Three visually distinct classes: horizontal stripes, vertical stripes, a centred blob.
fn pattern(class: usize, size: u32, variant: u32) -> GrayImage {
    GrayImage::from_fn(size, size, |x, y| {
        let on = match class {
            0 => (y + variant) % 4 < 2,
            1 => (x + variant) % 4 < 2,
            _ => {
                let c = size as i32 / 2;
                let (dx, dy) = (x as i32 - c, y as i32 - c);
                dx * dx + dy * dy < (size as i32 * size as i32) / 9
            }
        };
        image::Luma([if on { 230 } else { 20 }])
    })
}

/// Builds `root/{hstripes,vstripes,blob}/...` with PNG, JPEG-free RGB and odd-sized images,
/// plus one file that is not an image.
fn make_folder(root: &Path, per_class: u32) -> anyhow::Result<()> {
    for (class, name) in ["hstripes", "vstripes", "blob"].iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for v in 0..per_class {
            let size = if v % 3 == 0 { 20 } else { 16 };
            let img = pattern(class, size, v);
            if v % 2 == 0 {
                img.save(dir.join(format!("img{v:03}.png")))?;
            } else {
                DynamicImage::ImageLuma8(img)
                    .to_rgb8()
                    .save(dir.join(format!("img{v:03}.bmp")))?;
            }
        }
    }
    std::fs::write(root.join("blob").join("notes.txt"), "not an image")?;
    Ok(())
}

fn meta_for(w: u32, h: u32, c: u32) -> ModelMetadata {
    ModelMetadata {
        name: "t".into(),
        version: "0".into(),
        architecture: "test".into(),
        input_width: w,
        input_height: h,
        input_channels: c,
        normalization: Normalization {
            mean: vec![0.5; c as usize],
            std: vec![0.25; c as usize],
        },
        invert: false,
        class_names: vec!["a".into(), "b".into()],
        class_dirs: vec!["a".into(), "b".into()],
        dataset: "none".into(),
        test_accuracy: 0.5,
        test_samples: 2,
        training_seconds: 1.5,
        epochs: 1,
        command: "trainer train --x 'a b'".into(),
        seed: 3,
        batch_size: 4,
        learning_rate: 0.01,
        tensor_layout: "NHWC".into(),
        created_at_unix: 1,
        augment: String::new(),
        label_smoothing: 0.0,
        best_epoch: 0,
        backbone: String::new(),
    }
}

#[test]
fn preprocess_rgb_and_resized_images() {
    let gray = Preprocessor::new(&meta_for(28, 28, 1));
    let rgb = Preprocessor::new(&meta_for(10, 12, 3));
    assert_eq!(gray.input_len(), 784);
    assert_eq!(rgb.input_len(), 360);
    let big_rgb = DynamicImage::ImageRgb8(RgbImage::from_pixel(100, 37, Rgb([255, 0, 128])));
    let small_gray = DynamicImage::ImageLuma8(GrayImage::from_pixel(5, 9, image::Luma([255])));
    for img in [&big_rgb, &small_gray] {
        assert_eq!(gray.to_input(img).len(), 784);
        assert_eq!(rgb.to_input(img).len(), 360);
    }
    // Uniform colour survives resizing; channels are planar (CHW) and normalised.
    let v = rgb.to_input(&big_rgb);
    assert!((v[0] - (1.0 - 0.5) / 0.25).abs() < 1e-3);
    assert!((v[120] - (0.0 - 0.5) / 0.25).abs() < 1e-3);
    assert!((v[359] - (128.0 / 255.0 - 0.5) / 0.25).abs() < 1e-2);
    let g = gray.to_input(&small_gray);
    assert!(g.iter().all(|x| (x - 2.0).abs() < 1e-3));
    // append_input matches to_input.
    let mut buf = vec![9.0];
    gray.append_input(&small_gray, &mut buf);
    assert_eq!(&buf[1..], &g[..]);
}

#[test]
fn preprocessor_matches_idx_normalisation() {
    let split = data::IdxSplit {
        n: 1,
        rows: 28,
        cols: 28,
        pixels: (0..784).map(|i| (i % 256) as u8).collect(),
        labels: vec![3],
    };
    let meta = meta_for(28, 28, 1);
    let direct = split.to_dataset(&meta.normalization);
    let via_image =
        Preprocessor::new(&meta).to_input(&DynamicImage::ImageLuma8(split.gray_image(0)));
    for (a, b) in direct.images.iter().zip(&via_image) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn metadata_round_trip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let meta = meta_for(28, 28, 1);
    meta.save(dir.path())?;
    let back = ModelMetadata::load(dir.path())?;
    assert_eq!(serde_json::to_value(&meta)?, serde_json::to_value(&back)?);
    assert_eq!(back.input_len(), 784);
    // Inconsistent metadata is rejected at load time.
    let mut bad = meta.clone();
    bad.class_dirs.pop();
    bad.save(dir.path())?;
    assert!(ModelMetadata::load(dir.path()).is_err());
    Ok(())
}

#[test]
fn loads_folder_of_class_folders() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    make_folder(dir.path(), 4)?;
    let pre = Preprocessor::new(&meta_for(12, 12, 1));
    let f = data::load_image_folder(dir.path(), &pre)?;
    assert_eq!(f.class_dirs, vec!["blob", "hstripes", "vstripes"]);
    assert_eq!(f.data.len(), 12);
    assert_eq!(f.data.images.len(), 12 * 144);
    assert_eq!(f.skipped.len(), 1);
    assert!(f.skipped[0].ends_with("notes.txt"));
    assert_eq!(f.data.labels, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    let names: Vec<_> = f.paths.iter().filter_map(|p| p.file_name()).collect();
    assert_eq!(names[0], "img000.png");
    assert_eq!(names[1], "img001.bmp");
    // Deterministic: a second load is identical.
    let again = data::load_image_folder(dir.path(), &pre)?;
    assert_eq!(again.data.images, f.data.images);
    Ok(())
}

#[test]
fn tiny_training_run_writes_a_loadable_model() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    make_folder(data_dir.path(), 12)?;
    let opts = RunOptions {
        config: TrainConfig {
            epochs: Some(4),
            batch_size: 8,
            learning_rate: 3e-3,
            conv1_channels: 4,
            conv2_channels: 8,
            hidden: 16,
            augment: Augment::default(),
            ..TrainConfig::default()
        },
        validation_split: 0.1,
        output: out.path().to_path_buf(),
        name: "tiny".into(),
        version: "0.0.1".into(),
        command: "trainer train --image-folder x".into(),
    };
    let folder = ImageFolderOptions {
        image_size: 12,
        channels: 3,
        test_split: 0.25,
    };
    let mut seen = 0;
    let outcome = train::train_image_folder(data_dir.path(), &folder, &opts, |_| seen += 1)?;
    assert_eq!(seen, 4);
    assert_eq!(outcome.epochs.len(), 4);
    assert!(outcome.epochs.iter().all(|e| e.train_loss.is_finite()));
    assert!(out.path().join("model.safetensors").is_file());
    assert!(out.path().join("metadata.json").is_file());

    let clf = Classifier::load(out.path())?;
    let meta = clf.metadata();
    assert_eq!(meta.class_dirs, vec!["blob", "hstripes", "vstripes"]);
    assert_eq!(meta.input_channels, 3);
    assert_eq!(clf.input_len(), 3 * 12 * 12);
    assert_eq!(meta.command, "trainer train --image-folder x");
    assert!(meta.test_samples > 0);

    let pre = Preprocessor::new(meta);
    let mut inputs = Vec::new();
    for class in 0..3 {
        pre.append_input(
            &DynamicImage::ImageLuma8(pattern(class, 16, 1)),
            &mut inputs,
        );
    }
    let probs = clf.predict(&inputs, 3)?;
    assert_eq!(probs.len(), 3);
    for row in &probs {
        assert_eq!(row.len(), 3);
        assert!(row.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    // The in-memory and reloaded models agree.
    let fresh = outcome.classifier.predict(&inputs, 3)?;
    for (a, b) in probs.iter().flatten().zip(fresh.iter().flatten()) {
        assert!((a - b).abs() < 1e-6);
    }
    // Wrong input length is an error, not a panic.
    assert!(clf.predict(&inputs[1..], 3).is_err());
    Ok(())
}

/// Early stopping: with a learning rate of 0 nothing can improve after the first epoch, so a
/// patience of 2 ends a 30-epoch run after epoch 3 and keeps epoch 1; the metadata says so,
/// the split is class-balanced, and the test set is reported class by class.
#[test]
fn early_stopping_keeps_the_best_epoch_and_records_it() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    make_folder(data_dir.path(), 12)?;
    let opts = RunOptions {
        config: TrainConfig {
            epochs: Some(30),
            patience: Some(2),
            batch_size: 8,
            learning_rate: 0.0,
            conv1_channels: 4,
            conv2_channels: 8,
            hidden: 16,
            ..TrainConfig::default()
        },
        validation_split: 0.2,
        output: out.path().to_path_buf(),
        name: "stopped".into(),
        version: "0.0.1".into(),
        command: "trainer train".into(),
    };
    let folder = ImageFolderOptions {
        image_size: 12,
        channels: 1,
        test_split: 0.25,
    };
    let outcome = train::train_image_folder(data_dir.path(), &folder, &opts, |_| {})?;
    assert_eq!(outcome.epochs.len(), 3, "stopped after the patience");
    assert!(outcome.epochs[0].best && !outcome.epochs[1].best && !outcome.epochs[2].best);
    assert!(outcome.epochs.iter().all(|e| e.of_epochs == 30));
    let meta = Classifier::load(out.path())?.metadata().clone();
    assert_eq!((meta.epochs, meta.best_epoch), (3, 1));
    assert_eq!(meta.augment, "shift(1px)");
    // Every class is in the test set in proportion (12 images per class, 25% held out).
    let test = &outcome.test;
    assert_eq!(test.class_names, meta.class_names);
    assert_eq!(
        (0..test.class_names.len())
            .map(|c| test.support(c))
            .collect::<Vec<_>>(),
        vec![3; test.class_names.len()]
    );
    assert!((test.accuracy() - meta.test_accuracy as f64).abs() < 1e-6);
    Ok(())
}

/// The shipped model directory (`models/fashion-mnist` at the workspace root).
fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist")
}

#[test]
fn shipped_model_classifies_shipped_examples() -> anyhow::Result<()> {
    let clf = Classifier::load(&shipped_model())?;
    let meta = clf.metadata();
    assert_eq!(meta.class_dirs, FASHION_MNIST_CLASS_DIRS);
    assert!(
        meta.test_accuracy >= 0.93,
        "recorded accuracy {}",
        meta.test_accuracy
    );
    let pre = Preprocessor::new(meta);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let folder = data::load_image_folder(&examples, &pre)?;
    assert!(
        folder.data.len() >= 200,
        "found {} examples",
        folder.data.len()
    );
    let probs = clf.predict(&folder.data.images, folder.data.len())?;
    let mut correct = 0;
    for (p, &label) in probs.iter().zip(&folder.data.labels) {
        // Folder labels index the sorted folder names; map back to the model's class order.
        let want = &folder.class_dirs[label as usize];
        if &meta.class_dirs[evaluate::argmax(p)] == want {
            correct += 1;
        }
    }
    let acc = correct as f32 / probs.len() as f32;
    assert!(acc >= 0.85, "accuracy on shipped examples {acc}");
    // Every SIMD level this CPU has gives the candle forward pass's classes and, to
    // float rounding, its probabilities.
    let reference = clf.predict_candle(&folder.data.images, folder.data.len())?;
    for level in SimdLevel::supported() {
        let at = clf.with_simd_level(level);
        assert_eq!(at.simd_level(), level);
        let probs = at.predict(&folder.data.images, folder.data.len())?;
        let mut max_diff = 0f32;
        for (p, r) in probs.iter().zip(&reference) {
            assert_eq!(
                evaluate::argmax(p),
                evaluate::argmax(r),
                "{level}: class differs"
            );
            for (a, b) in p.iter().zip(r) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
        assert!(
            max_diff < 1e-5,
            "{level}: probabilities differ by {max_diff}"
        );
    }
    Ok(())
}
