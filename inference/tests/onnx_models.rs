//! The ONNX engine on real exports (random-weight ResNet-18, MobileNetV2/V3,
//! EfficientNet-B0 and a Keras MobileNet through tf2onnx, opsets 11 to 18, dynamic and
//! fixed batch: `tests/fixtures/onnx/`, made by `scripts/make-onnx-models.py` with ONNX
//! Runtime's outputs beside them), and the models it must refuse.

use std::path::{Path, PathBuf};

use classifier_inference::{Classifier, EngineChoice};
use serde::Deserialize;

/// Largest difference from ONNX Runtime's probabilities accepted.
const TOLERANCE: f32 = 1e-4;

/// The engines to test: tract always; ONNX Runtime when its library loads
/// (`ORT_DYLIB_PATH`), and required when `REQUIRE_ONNXRUNTIME=1` (scripts/test.sh).
fn engines() -> Vec<EngineChoice> {
    let mut engines = vec![EngineChoice::Tract];
    match EngineChoice::OnnxRuntime.uses_onnxruntime() {
        Ok(_) => engines.push(EngineChoice::OnnxRuntime),
        Err(e) if std::env::var("REQUIRE_ONNXRUNTIME").as_deref() == Ok("1") => {
            panic!("REQUIRE_ONNXRUNTIME=1 but {e:#}")
        }
        Err(e) => eprintln!("ONNX Runtime not tested: {e:#}"),
    }
    engines
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

/// What `make-onnx-models.py` wrote beside each model (the fields used here).
#[derive(Deserialize)]
struct Reference {
    input_shape: Vec<usize>,
    probabilities: Vec<Vec<f32>>,
    top1: Vec<usize>,
    output_is_probabilities: bool,
}

/// The names of the fixture models (those with a reference).
fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .expect("tests/fixtures/onnx exists (scripts/make-onnx-models.py fixtures)")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".ref.json").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 5,
        "expected the fixture models, found {names:?}"
    );
    names
}

/// A model directory holding fixture `name` as `model.onnx` (+ its labels unless
/// `labels` is false).
fn model_dir(name: &str, labels: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let from = fixtures();
    std::fs::copy(
        from.join(format!("{name}.onnx")),
        dir.path().join("model.onnx"),
    )
    .expect("copy model");
    if labels {
        std::fs::copy(
            from.join(format!("{name}.labels.txt")),
            dir.path().join("labels.txt"),
        )
        .expect("copy labels");
    }
    dir
}

/// A little-endian float32 `.npy` file: its shape and values.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("npy file");
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + len]).expect("header");
    assert!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dimension"))
        .collect();
    let values: Vec<f32> = bytes[start + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (shape, values)
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every fixture model: our probabilities against ONNX Runtime's on the same
/// preprocessed input, within 1e-4 with the same top-1, in the batch of the reference,
/// one image at a time, and in a larger batch of the images repeated (which runs split
/// over two threads, in chunks of several plan sizes, or padded for a fixed batch).
#[test]
fn fixture_models_match_onnx_runtime() {
    for engine in engines() {
        for name in fixture_names() {
            let reference: Reference = serde_json::from_str(
                &std::fs::read_to_string(fixtures().join(format!("{name}.ref.json")))
                    .expect("reference"),
            )
            .expect("reference json");
            let (shape, input) = read_npy(&fixtures().join(format!("{name}.input.npy")));
            assert_eq!(shape, reference.input_shape, "{name}");
            let dir = model_dir(&name, true);
            let classifier = Classifier::load_with_engine(dir.path(), engine)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let n = shape[0];
            let len = classifier.input_len();
            assert_eq!(len * n, input.len(), "{name}: input length");
            assert_eq!(
                classifier.metadata().class_names.len(),
                reference.probabilities[0].len()
            );
            let described_probabilities =
                classifier.metadata().architecture.contains("probabilities");
            assert_eq!(
                described_probabilities, reference.output_is_probabilities,
                "{name}: output kind"
            );

            // Rows from image `first` on, the images repeating every `n`.
            let worst = std::cell::Cell::new(0f32);
            let check = |rows: &[Vec<f32>], first: usize, what: &str| {
                for (i, row) in rows.iter().enumerate().map(|(i, row)| (first + i, row)) {
                    let expected = &reference.probabilities[i % n];
                    let diff = max_abs_diff(row, expected);
                    worst.set(worst.get().max(diff));
                    assert!(
                        diff <= TOLERANCE,
                        "{name} {what} image {i}: max abs diff {diff}"
                    );
                    assert_eq!(
                        argmax(row),
                        reference.top1[i % n],
                        "{name} {what} image {i}: top-1"
                    );
                }
            };
            check(&classifier.predict(&input, n).expect("predict"), 0, "batch");
            for (i, image) in input.chunks_exact(len).enumerate() {
                let row = classifier.predict(image, 1).expect("predict one");
                check(&row, i, "alone");
            }
            let repeats = 11;
            let many: Vec<f32> = (0..repeats).flat_map(|_| input.iter().copied()).collect();
            let rows = classifier
                .predict(&many, repeats * n)
                .expect("predict many");
            assert_eq!(rows.len(), repeats * n);
            check(&rows, 0, "repeated");
            eprintln!(
                "{name}: max abs diff {:.1e} from ONNX Runtime ({})",
                worst.get(),
                classifier.metadata().architecture
            );
        }
    }
}

/// A batch (run in parallel, image by image) gives the rows of its images run alone, for
/// a dynamic and a fixed batch.
#[test]
fn batch_sizes_give_the_same_rows() {
    for engine in engines() {
        for name in ["mobilenetv3-small-tiny-op17", "resnet18-tiny-op11-bn-b1"] {
            same_rows_in_a_batch(name, engine);
        }
    }
}

fn same_rows_in_a_batch(name: &str, engine: EngineChoice) {
    let dir = model_dir(name, true);
    let classifier = Classifier::load_with_engine(dir.path(), engine).expect("loads");
    let len = classifier.input_len();
    let images: Vec<f32> = (0..37 * len)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let batch = classifier.predict(&images, 37).expect("batch");
    for (i, image) in images.chunks_exact(len).enumerate().step_by(6) {
        let alone = classifier.predict(image, 1).expect("alone");
        assert!(
            max_abs_diff(&alone[0], &batch[i]) <= 1e-6,
            "{name} {engine:?} image {i}"
        );
    }
}

fn load_error(dir: &Path, engine: EngineChoice) -> String {
    let refused = Classifier::load_with_engine(dir, engine).expect_err("must be refused");
    format!("{refused:#}")
}

/// A directory holding one of the bad fixtures as its model.
fn bad_dir(file: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixtures().join(file), dir.path().join("model.onnx")).expect("copy");
    dir
}

#[test]
fn an_unknown_operator_is_refused_naming_the_operator_and_the_node() {
    for engine in engines() {
        let error = load_error(bad_dir("bad-unknown-op.onnx").path(), engine);
        assert!(
            error.contains("NoSuchOp") && error.contains("/mystery/NoSuchOp"),
            "{error}"
        );
        let says_why = match engine {
            EngineChoice::OnnxRuntime => "No Op registered",
            _ => "does not implement",
        };
        assert!(error.contains(says_why), "{error}");
    }
}

#[test]
fn a_truncated_file_is_refused_as_not_a_valid_model() {
    for engine in engines() {
        let error = load_error(bad_dir("bad-truncated.onnx").path(), engine);
        assert!(error.contains("not a valid ONNX model"), "{error}");
        let empty = tempfile::tempdir().expect("tempdir");
        std::fs::write(empty.path().join("model.onnx"), b"").expect("write");
        let error = load_error(empty.path(), engine);
        assert!(error.contains("model.onnx"), "{error}");
        // Every cut of a real model is refused, none panics.
        let bytes =
            std::fs::read(fixtures().join("keras-mobilenet-nhwc-tiny-op13.onnx")).expect("model");
        let dir = tempfile::tempdir().expect("tempdir");
        for cut in (0..bytes.len()).step_by(bytes.len() / 23) {
            std::fs::write(dir.path().join("model.onnx"), &bytes[..cut]).expect("write");
            assert!(
                Classifier::load_with_engine(dir.path(), engine).is_err(),
                "cut at {cut} of {}",
                bytes.len()
            );
        }
    }
}

#[test]
fn a_wrong_input_rank_is_refused_with_the_shape() {
    for engine in engines() {
        let error = load_error(bad_dir("bad-input-rank.onnx").path(), engine);
        assert!(
            error.contains("rank 2") && error.contains("NCHW"),
            "{error}"
        );
    }
}

#[test]
fn labels_that_do_not_match_the_outputs_are_refused_with_both_counts() {
    for engine in engines() {
        let dir = model_dir("resnet18-tiny-op17", false);
        std::fs::write(dir.path().join("labels.txt"), "cat\ndog\n").expect("write");
        let error = load_error(dir.path(), engine);
        assert!(
            error.contains("2 class names") && error.contains("1000 classes"),
            "{error}"
        );
    }
}

#[test]
fn labels_come_from_the_metadata_when_there_is_no_file_and_probabilities_stay_as_they_are() {
    for engine in engines() {
        let dir = model_dir("keras-mobilenet-nhwc-tiny-op13", false);
        let classifier = Classifier::load_with_engine(dir.path(), engine).expect("loads");
        let meta = classifier.metadata();
        assert_eq!(meta.class_names[..3], ["airplane", "automobile", "bird"]);
        assert!(
            meta.architecture.contains("metadata_props[\"classes\"]"),
            "{}",
            meta.architecture
        );
        assert_eq!(meta.tensor_layout, "NHWC");
        let pre = classifier.preprocessor();
        let recipe = pre.recipe().expect("an ONNX recipe");
        assert_eq!(
            recipe.layout,
            classifier_inference::preprocess::Layout::NHWC
        );
        // Forcing "logits" applies softmax to what already are probabilities: flatter rows.
        std::fs::write(
            dir.path().join("model.toml"),
            "output = \"logits\"\nname = \"cifar\"\nversion = \"7\"",
        )
        .expect("write");
        let forced = Classifier::load_with_engine(dir.path(), engine).expect("loads");
        assert_eq!(
            (
                forced.metadata().name.as_str(),
                forced.metadata().version.as_str()
            ),
            ("cifar", "7")
        );
        let (_, input) = read_npy(&fixtures().join("keras-mobilenet-nhwc-tiny-op13.input.npy"));
        let image = &input[..classifier.input_len()];
        let kept = classifier.predict(image, 1).expect("predict");
        let flattened = forced.predict(image, 1).expect("predict");
        let max = |row: &[f32]| row.iter().copied().fold(0.0, f32::max);
        assert!(
            max(&flattened[0]) < max(&kept[0]),
            "{kept:?} vs {flattened:?}"
        );
    }
}

#[test]
fn a_directory_with_both_engines_files_or_neither_is_refused() {
    for engine in engines() {
        let dir = model_dir("resnet18-tiny-op17", true);
        std::fs::write(dir.path().join("model.safetensors"), b"x").expect("write");
        let error = load_error(dir.path(), engine);
        assert!(error.contains("both"), "{error}");
        let none = tempfile::tempdir().expect("tempdir");
        let error = load_error(none.path(), engine);
        assert!(error.contains("metadata.json"), "{error}");
    }
}

#[test]
fn a_model_toml_typo_is_refused_naming_the_field() {
    for engine in engines() {
        let dir = model_dir("resnet18-tiny-op17", true);
        std::fs::write(
            dir.path().join("model.toml"),
            "[preprocess]\ninterpolaton = \"bicubic\"\n",
        )
        .expect("write");
        let error = load_error(dir.path(), engine);
        assert!(
            error.contains("interpolaton") && error.contains("model.toml"),
            "{error}"
        );
    }
}

#[test]
fn the_fixed_batch_model_says_so_and_the_default_name_is_the_directory() {
    for engine in engines() {
        let dir = model_dir("resnet18-tiny-op11-bn-b1", true);
        let classifier = Classifier::load_with_engine(dir.path(), engine).expect("loads");
        let meta = classifier.metadata();
        assert!(
            meta.architecture.contains("fixed at 1"),
            "{}",
            meta.architecture
        );
        assert_eq!(meta.version, "1");
        let dir_name = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        assert_eq!(meta.name, dir_name);
        assert!(
            classifier.flops_per_image() > 0 || engine == EngineChoice::OnnxRuntime,
            "tract counts the convolutions"
        );
        assert!(classifier.loaded_from().is_some_and(|s| s.holds_model()));
    }
}
