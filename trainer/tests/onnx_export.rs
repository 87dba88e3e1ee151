//! `trainer export --onnx`: the shipped CNN written as an ONNX model directory answers
//! as the native path does — on Fashion-MNIST's 10,000 test images (Debian's
//! `dataset-fashion-mnist`, or `FASHION_MNIST_DIR`) or, without them, on the 200 examples —
//! run by each of our ONNX engines in this process and by ONNX Runtime in Python
//! (`scripts/onnx-top1.py`, when `ORT_PYTHON` names the venv's interpreter).
//!
//! `REQUIRE_FASHION_MNIST=1` and `REQUIRE_ONNXRUNTIME=1` (scripts/test.sh) turn a missing
//! dataset or ONNX Runtime into a failure instead of a smaller test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use classifier_inference::{Classifier, EngineChoice};
use trainer::data;

/// Largest difference accepted between a native and an ONNX probability.
const TOLERANCE: f32 = 1e-4;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

/// The preprocessed test inputs and a name for them: Fashion-MNIST's test set if it is
/// here, else the examples folder.
fn test_inputs(native: &Classifier) -> (String, usize, Vec<f32>) {
    let dir = std::env::var_os("FASHION_MNIST_DIR").map_or_else(
        || PathBuf::from("/usr/share/datasets/fashion-mnist"),
        PathBuf::from,
    );
    match data::load_fashion_mnist(&dir) {
        Ok(set) => {
            let inputs = set.test.to_dataset(&native.metadata().normalization).images;
            ("Fashion-MNIST's test set".into(), set.test.n, inputs)
        }
        Err(e) => {
            assert!(
                !required("REQUIRE_FASHION_MNIST"),
                "REQUIRE_FASHION_MNIST=1 but {}: {e:#}",
                dir.display()
            );
            eprintln!(
                "no Fashion-MNIST at {} ({e:#}): the examples instead",
                dir.display()
            );
            let pre = native.preprocessor();
            let mut inputs = Vec::new();
            let mut n = 0;
            for class in std::fs::read_dir(workspace().join("examples")).expect("examples") {
                for file in std::fs::read_dir(class.expect("entry").path()).expect("class") {
                    let image = image::open(file.expect("entry").path()).expect("example");
                    pre.append_input(&image, &mut inputs);
                    n += 1;
                }
            }
            ("the examples".into(), n, inputs)
        }
    }
}

fn engines() -> Vec<EngineChoice> {
    let mut engines = vec![EngineChoice::Tract];
    match EngineChoice::OnnxRuntime.uses_onnxruntime() {
        Ok(_) => engines.push(EngineChoice::OnnxRuntime),
        Err(e) => {
            assert!(
                !required("REQUIRE_ONNXRUNTIME"),
                "REQUIRE_ONNXRUNTIME=1 but {e:#}"
            );
            eprintln!("ONNX Runtime not tested in process: {e:#}");
        }
    }
    engines
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap_or(0)
}

#[test]
fn the_exported_cnn_answers_like_the_native_one() {
    let native = Classifier::load(&workspace().join("models/fashion-mnist")).expect("shipped");
    let out = tempfile::tempdir().expect("tempdir");
    native.export_onnx(out.path()).expect("export");
    let (what, n, inputs) = test_inputs(&native);
    let expected = native.predict(&inputs, n).expect("native");
    let expected_top1: Vec<usize> = expected.iter().map(|r| argmax(r)).collect();

    for engine in engines() {
        let onnx = Classifier::load_with_engine(out.path(), engine).expect("the export loads");
        assert_eq!(onnx.metadata().class_names, native.metadata().class_names);
        assert_eq!(
            (&onnx.metadata().name, &onnx.metadata().version),
            (&native.metadata().name, &native.metadata().version)
        );
        let rows = onnx.predict(&inputs, n).expect("onnx");
        let worst = rows
            .iter()
            .zip(&expected)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        let same = (rows.iter().map(|r| argmax(r)))
            .zip(&expected_top1)
            .filter(|(a, b)| a == *b)
            .count();
        eprintln!("{engine:?} on {what}: {same}/{n} same top-1, max abs diff {worst:.1e}");
        assert_eq!(same, n, "{engine:?}: top-1 differs");
        assert!(worst <= TOLERANCE, "{engine:?}: max abs diff {worst}");
    }

    the_preprocessing_is_the_native_one(&native, out.path());
    onnx_runtime_in_python_agrees(out.path(), n, &inputs, &expected_top1, &what);
}

/// The `model.toml` written makes the ONNX engine's preprocessing give the native
/// inputs for an image of the model's size (an example, as the client sends it).
fn the_preprocessing_is_the_native_one(native: &Classifier, dir: &Path) {
    let onnx = Classifier::load_with_engine(dir, EngineChoice::Tract).expect("loads");
    let class = workspace().join("examples/bag");
    let first = std::fs::read_dir(&class)
        .expect("examples/bag")
        .next()
        .expect("an example")
        .expect("entry");
    let image = image::open(first.path()).expect("an example image");
    let (a, b) = (
        native.preprocessor().to_input(&image),
        onnx.preprocessor().to_input(&image),
    );
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "preprocessing differs by {diff}");
}

/// ONNX Runtime (Python, from PyPI) gives the native top-1 for every input.
fn onnx_runtime_in_python_agrees(
    dir: &Path,
    n: usize,
    inputs: &[f32],
    expected: &[usize],
    what: &str,
) {
    let Some(python) = std::env::var_os("ORT_PYTHON") else {
        assert!(
            !required("REQUIRE_ONNXRUNTIME"),
            "REQUIRE_ONNXRUNTIME=1 but ORT_PYTHON is not set"
        );
        eprintln!("ORT_PYTHON not set: ONNX Runtime in Python not run");
        return;
    };
    let npy = dir.join("inputs.npy");
    write_npy(&npy, &[n, 1, 28, 28], inputs);
    let output = Command::new(python)
        .arg(workspace().join("scripts/onnx-top1.py"))
        .arg(dir.join("model.onnx"))
        .arg(&npy)
        .output()
        .expect("runs python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let top1: Vec<usize> = serde_json::from_slice(&output.stdout).expect("a JSON list");
    let same = top1.iter().zip(expected).filter(|(a, b)| a == b).count();
    eprintln!("ONNX Runtime (Python) on {what}: {same}/{n} same top-1 as the native path");
    assert_eq!((top1.len(), same), (n, n));
}

/// A float32 `.npy` file (version 1, C order).
fn write_npy(path: &Path, shape: &[usize], values: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut file = std::fs::File::create(path).expect("create npy");
    file.write_all(b"\x93NUMPY\x01\x00").expect("write");
    file.write_all(&(header.len() as u16).to_le_bytes())
        .expect("write");
    file.write_all(header.as_bytes()).expect("write");
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    file.write_all(&bytes).expect("write");
}
