//! An ONNX model served over a real broker exactly like the native CNN: a model
//! directory of `model.onnx` + `labels.txt` given as `--model NAME=DIR`, chosen by
//! requests, its name, version and class names in every reply, and the same answers as
//! the model run in this process.

use std::collections::BTreeMap;
use std::path::Path;

use super::{stop, tail, CaseRun};

/// The fixture model served (a random-weight MobileNetV3-Small exported at opset 17 with
/// a dynamic batch, 64×64 input, 1000 classes; `inference/tests/fixtures/onnx`).
const FIXTURE: &str = "mobilenetv3-small-tiny-op17";

/// Largest difference accepted between the server's probability and this process's.
const TOLERANCE: f32 = 1e-4;

/// `dir` as an ONNX model directory: the fixture model and its labels, and a
/// `model.toml` giving the version.
fn write_onnx_model(dir: &Path, version: &str) {
    let fixtures = crate::workspace_root().join("inference/tests/fixtures/onnx");
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(
        fixtures.join(format!("{FIXTURE}.onnx")),
        dir.join("model.onnx"),
    )
    .expect("copy the model");
    std::fs::copy(
        fixtures.join(format!("{FIXTURE}.labels.txt")),
        dir.join("labels.txt"),
    )
    .expect("copy the labels");
    std::fs::write(dir.join("model.toml"), format!("version = \"{version}\"\n"))
        .expect("write model.toml");
}

/// The results file's rows: file name → (model, version, predicted class, probability).
fn rows(results: &Path) -> BTreeMap<String, (String, String, String, f32)> {
    let text = std::fs::read_to_string(results).expect("results file");
    text.lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).expect("json line");
            let field = |name: &str| row[name].as_str().unwrap_or_default().to_string();
            let probability = row["probability"].as_f64().unwrap_or(-1.0) as f32;
            (
                field("file"),
                (
                    field("model"),
                    field("model_version"),
                    field("predicted_class"),
                    probability,
                ),
            )
        })
        .collect()
}

/// A server of the shipped CNN (the default) and an ONNX model named `objects`: the 200
/// examples sent to `objects` are all classified by it, with its version and its
/// labels, and each answer is the one this process gets from the same directory (the
/// same top class and probability, within 1e-4); requests naming no model still get
/// the native CNN.
pub fn an_onnx_model_is_served_like_a_native_one(backend_env: &[(String, String)]) {
    let run = CaseRun::new(backend_env, "onnx");
    let (native, onnx) = (run.path("clothes-model"), run.path("objects-model"));
    crate::copy_shipped_model(&native, |_| {});
    write_onnx_model(&onnx, "3.1-onnx");
    let native_arg = format!("clothes={}", native.display());
    let onnx_arg = format!("objects={}", onnx.display());
    let server = run.start_server_with(
        "server-onnx",
        &["--model", &native_arg, "--model", &onnx_arg],
    );

    let results = run.path("onnx.jsonl");
    let results_arg = results.to_string_lossy().into_owned();
    let examples = crate::workspace_root().join("examples");
    let examples_arg = examples.to_string_lossy().into_owned();
    let (code, stdout, summary) = run.classify(&[
        "classify",
        &examples_arg,
        "--timeout",
        "120",
        "--model-name",
        "objects",
        "--output",
        &results_arg,
    ]);
    assert_eq!(code, 0, "{}", tail(&stdout));
    assert_eq!(
        (summary.classified, summary.errors),
        (200, 0),
        "{}",
        tail(&stdout)
    );

    let local = classifier_server::Classifier::load(&onnx).expect("the ONNX model loads here too");
    let preprocessor = local.preprocessor();
    let rows = rows(&results);
    assert_eq!(rows.len(), 200);
    for (file, (model, version, class, probability)) in &rows {
        assert_eq!(
            (model.as_str(), version.as_str()),
            ("objects", "3.1-onnx"),
            "{file}"
        );
        let image = image::open(find_example(&examples, file)).expect("example image");
        let expected = local
            .predict(&preprocessor.to_input(&image), 1)
            .expect("predict");
        let expected = &expected[0];
        let index = local
            .metadata()
            .class_names
            .iter()
            .position(|name| name == class)
            .unwrap_or_else(|| panic!("{file}: {class:?} is not one of the labels"));
        let best = expected.iter().copied().fold(0.0, f32::max);
        assert!(
            (expected[index] - best).abs() <= TOLERANCE
                && (expected[index] - probability).abs() <= TOLERANCE,
            "{file}: the server said {class} ({probability}), here {} has {} and the best {best}",
            class,
            expected[index]
        );
    }

    let default_results = run.path("default.jsonl");
    let default_arg = default_results.to_string_lossy().into_owned();
    let (code, stdout, summary) = run.classify(&[
        "classify",
        &examples_arg,
        "--timeout",
        "120",
        "--output",
        &default_arg,
    ]);
    assert_eq!((code, summary.classified), (0, 200), "{}", tail(&stdout));
    assert!(
        rows_of_model(&default_results, "clothes"),
        "the default is still the native CNN"
    );
    stop(server);
}

/// Whether every row of a results file names `model`.
fn rows_of_model(results: &Path, model: &str) -> bool {
    rows(results).values().all(|(m, ..)| m == model)
}

/// The example whose results row says `file` (the path as the client shows it: from the
/// folder given, its name included).
fn find_example(examples: &Path, file: &str) -> std::path::PathBuf {
    let parent = examples.parent().unwrap_or(examples);
    [examples.join(file), parent.join(file)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no example at {file}"))
}
