//! Where the model comes from, so that the binaries work from any directory.
//!
//! In order, the first that applies wins:
//!
//! 1. a model directory named explicitly: `--model DIR`, `CLASSIFIER_MODEL_DIR` or the
//!    config file's `server.model_dir` (flags over the environment over the file, as for
//!    every setting). It must hold a model: a named directory that does not is an error,
//!    never a silent fallback to another model;
//! 2. the per-user model directory, [`user_model_dir`] (on Linux
//!    `$XDG_DATA_HOME/image-classifier/model`, by default
//!    `~/.local/share/image-classifier/model`), if it holds a `metadata.json` (the native
//!    CNN) or a `model.onnx` (an ONNX model): where an installed server's operator puts a
//!    retrained model without any flag;
//! 3. the shipped Fashion-MNIST model, compiled into the binary from
//!    `models/fashion-mnist/` (1.7 MB), so `cargo install` users get a working default.
//!
//! When none applies (a binary built without the `embedded-model` feature and no model
//! anywhere) the error names every place that was looked at.
//!
//! A directory holds either engine's model: `model.safetensors` + `metadata.json` (the
//! native CNN) or `model.onnx` with optional `model.toml` and `labels.txt` (see
//! `classifier_inference::onnx`); [`Classifier::load`] picks the engine by the files.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use classifier_inference::Classifier;

pub use classifier_app::config::MODEL_DIR_ENV;

/// The file whose presence makes a directory a native model directory (beside the
/// weights).
const METADATA_FILE: &str = "metadata.json";

/// The file whose presence makes a directory an ONNX model directory.
const ONNX_FILE: &str = classifier_inference::onnx::ONNX_FILE;

/// The model that was found, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory named by a flag, the environment or the config file.
    Configured(PathBuf),
    /// The per-user model directory.
    UserDir(PathBuf),
    /// The model compiled into this binary.
    Embedded,
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Configured(dir) => write!(f, "{}", dir.display()),
            ModelSource::UserDir(dir) => write!(f, "{} (the per-user model)", dir.display()),
            ModelSource::Embedded => f.write_str("the model built into this binary"),
        }
    }
}

impl ModelSource {
    /// The directory the model is read from; `None` for the built-in one.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelSource::Configured(dir) | ModelSource::UserDir(dir) => Some(dir),
            ModelSource::Embedded => None,
        }
    }
}

/// The per-user model directory (see the module docs), if the platform has a home.
pub fn user_model_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "image-classifier")
        .map(|dirs| dirs.data_dir().join("model"))
}

/// Picks the model to load (see the module docs): `configured` is the directory named
/// by a flag, the environment or the config file, `user_dir` the per-user directory.
pub fn resolve(configured: Option<&Path>, user_dir: Option<&Path>) -> anyhow::Result<ModelSource> {
    resolve_with(configured, user_dir, embedded::AVAILABLE)
}

/// [`resolve`], with whether this binary holds the embedded model as a parameter.
fn resolve_with(
    configured: Option<&Path>,
    user_dir: Option<&Path>,
    embedded_available: bool,
) -> anyhow::Result<ModelSource> {
    if let Some(dir) = configured {
        return Ok(ModelSource::Configured(dir.to_path_buf()));
    }
    if let Some(dir) = user_dir {
        if dir.join(METADATA_FILE).is_file() || dir.join(ONNX_FILE).is_file() {
            return Ok(ModelSource::UserDir(dir.to_path_buf()));
        }
    }
    if embedded_available {
        return Ok(ModelSource::Embedded);
    }
    let user_dir = user_dir.map_or_else(
        || "the per-user model directory (no home directory here)".to_string(),
        |dir| {
            format!(
                "{} (no {METADATA_FILE} or {ONNX_FILE} there)",
                dir.display()
            )
        },
    );
    anyhow::bail!(
        "no model found. Looked at: --model (not given), {MODEL_DIR_ENV} (not set), the \
         config file's server.model_dir (not set), {user_dir}; and this binary was built \
         without the embedded model (feature `embedded-model`). Train one with \
         `cargo run --release -p trainer -- train` and name its directory with --model."
    )
}

/// Loads the model `source` names, with an error that says what to do when it fails.
pub fn load(source: &ModelSource) -> anyhow::Result<Classifier> {
    match source {
        ModelSource::Configured(dir) | ModelSource::UserDir(dir) => {
            Classifier::load(dir).with_context(|| load_failure(source, dir))
        }
        ModelSource::Embedded => embedded::load(),
    }
}

/// What a failed load of `dir` says before the cause: for an ONNX model just where it
/// was (the cause names the problem); otherwise what a model directory holds.
fn load_failure(source: &ModelSource, dir: &Path) -> String {
    if dir.join(ONNX_FILE).is_file() {
        return format!("cannot serve the ONNX model in {source}");
    }
    format!(
        "cannot load the model from {source} (expected model.safetensors and \
         {METADATA_FILE}, or {ONNX_FILE} with an optional labels.txt and model.toml; \
         train one with `cargo run --release -p trainer -- train`, or name another \
         directory with --model or {MODEL_DIR_ENV})"
    )
}

#[cfg(feature = "embedded-model")]
mod embedded {
    use classifier_inference::Classifier;

    pub(super) const AVAILABLE: bool = true;

    const WEIGHTS: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/fashion-mnist/model.safetensors"
    ));
    const METADATA: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/fashion-mnist/metadata.json"
    ));

    pub(super) fn load() -> anyhow::Result<Classifier> {
        Classifier::from_bytes(WEIGHTS, METADATA, "the built-in model")
    }
}

#[cfg(not(feature = "embedded-model"))]
mod embedded {
    use classifier_inference::Classifier;

    pub(super) const AVAILABLE: bool = false;

    pub(super) fn load() -> anyhow::Result<Classifier> {
        anyhow::bail!("this binary was built without the embedded model")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_directory_wins_even_if_it_holds_no_model() {
        let user = tempfile::tempdir().expect("tempdir");
        std::fs::write(user.path().join(METADATA_FILE), "{}").expect("write");
        let named = Path::new("/nonexistent/model");
        let source = resolve(Some(named), Some(user.path())).expect("resolves");
        assert_eq!(source, ModelSource::Configured(named.to_path_buf()));
        let error = load(&source).expect_err("no model there").to_string();
        assert!(error.contains("/nonexistent/model"), "{error}");
        assert!(error.contains("--model"), "{error}");
    }

    #[test]
    fn the_user_directory_is_used_only_when_it_holds_a_model() {
        let user = tempfile::tempdir().expect("tempdir");
        let empty = resolve(None, Some(user.path())).expect("resolves");
        assert_ne!(empty, ModelSource::UserDir(user.path().to_path_buf()));
        std::fs::write(user.path().join(METADATA_FILE), "{}").expect("write");
        let found = resolve(None, Some(user.path())).expect("resolves");
        assert_eq!(found, ModelSource::UserDir(user.path().to_path_buf()));
    }

    #[test]
    fn an_onnx_directory_is_a_model_directory_and_its_errors_name_the_cause() {
        let user = tempfile::tempdir().expect("tempdir");
        std::fs::write(user.path().join(ONNX_FILE), b"not an onnx file").expect("write");
        let found = resolve(None, Some(user.path())).expect("resolves");
        assert_eq!(found, ModelSource::UserDir(user.path().to_path_buf()));
        let error = format!("{:#}", load(&found).expect_err("not a model"));
        assert!(error.contains("cannot serve the ONNX model"), "{error}");
        assert!(error.contains("not a valid ONNX model"), "{error}");
        assert!(!error.contains("trainer"), "no advice to train: {error}");
    }

    #[cfg(feature = "embedded-model")]
    #[test]
    fn the_embedded_model_is_the_shipped_one() {
        let source = resolve(None, None).expect("resolves");
        assert_eq!(source, ModelSource::Embedded);
        let embedded = load(&source).expect("loads");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist");
        let shipped = Classifier::load(&dir).expect("shipped model");
        let (ours, theirs) = (embedded.metadata(), shipped.metadata());
        assert_eq!(
            (&ours.name, &ours.version, &ours.class_names),
            (&theirs.name, &theirs.version, &theirs.class_names)
        );
        let input = vec![0.25f32; shipped.input_len()];
        assert_eq!(
            embedded.predict(&input, 1).expect("predict"),
            shipped.predict(&input, 1).expect("predict")
        );
    }

    #[test]
    fn without_any_model_the_error_names_every_place_looked_at() {
        let user = tempfile::tempdir().expect("tempdir");
        let error = resolve_with(None, Some(user.path()), false)
            .expect_err("none")
            .to_string();
        for place in [
            "--model",
            MODEL_DIR_ENV,
            "server.model_dir",
            "embedded-model",
        ] {
            assert!(error.contains(place), "{place} missing from: {error}");
        }
        assert!(
            error.contains(&user.path().display().to_string()),
            "{error}"
        );
    }
}
