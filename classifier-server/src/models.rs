//! The models a server serves ([`ModelSet`]): one or more, by name, the first being the
//! default for requests that name none. A model loaded from a directory is replaced
//! while serving when that directory gets a new model ([`ModelSet::reload_changed`]);
//! a model that does not load is refused and the one serving keeps serving.
//!
//! A swap takes effect between batches: each request is decoded for the model current
//! when it was decoded, and run by that same model (see `pipeline::infer`), so a request
//! is never preprocessed for one model and run by another.
//!
//! Both engines are served alike: a directory of the native CNN (`model.safetensors` +
//! `metadata.json`) or of an ONNX model (`model.onnx`, optional `model.toml` and
//! `labels.txt`). The watcher compares every file either kind may hold
//! ([`classifier_inference::model_dir::MODEL_DIR_FILES`]), so a new labels file or
//! description reloads an ONNX model too, and a directory switched from one engine to
//! the other is reloaded. The files a model was loaded from are the ones
//! [`Classifier::load`] saw before reading them, not a later look, so a change made
//! while the model loaded is still noticed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use classifier_inference::{Classifier, DirSnapshot, Preprocessor};

use classifier_app::lock;

/// Characters of an unknown model name that an error reply repeats.
const MAX_ECHOED_NAME: usize = 64;

/// One model as served: its name (what requests ask for), the classifier and its
/// preprocessing, swapped together.
#[derive(Debug)]
pub struct ServedModel {
    /// The name requests use, written in replies.
    pub name: String,
    /// The network with its metadata.
    pub classifier: Arc<Classifier>,
    /// Image → input, for this model's input format.
    pub preprocessor: Preprocessor,
}

impl ServedModel {
    /// `classifier` served under `name`, with the preprocessing it needs (its
    /// metadata's for the native CNN, its recipe for an ONNX model).
    pub fn new(name: &str, classifier: Arc<Classifier>) -> Self {
        ServedModel {
            name: name.to_string(),
            preprocessor: classifier.preprocessor(),
            classifier,
        }
    }

    /// The version its metadata gives.
    pub fn version(&self) -> &str {
        &self.classifier.metadata().version
    }
}

impl crate::request::HasPreprocessor for Arc<ServedModel> {
    fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }
}

/// The models of one server, by name; the first is the default.
#[derive(Debug)]
pub struct ModelSet {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// Where it was loaded from; `None` for a model that cannot change (built in).
    dir: Option<PathBuf>,
    current: RwLock<Arc<ServedModel>>,
    watch: Mutex<Watch>,
}

/// What the watcher knows of a directory's files.
#[derive(Debug)]
struct Watch {
    /// The files as they were when last loaded or refused.
    settled: Option<Fingerprint>,
    /// The files as the previous poll saw them.
    last_seen: Option<Fingerprint>,
}

/// Modification time and length of every file a model directory may hold; `None`
/// while the directory holds no model (nothing to load).
type Fingerprint = DirSnapshot;

fn fingerprint(dir: &std::path::Path) -> Option<Fingerprint> {
    Some(DirSnapshot::of(dir)).filter(DirSnapshot::holds_model)
}

/// What one reload check did to one model.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The new model serves from now on.
    Swapped {
        /// The served name.
        name: String,
        /// Version before.
        from: String,
        /// Version now.
        to: String,
    },
    /// The new files did not load; the old model keeps serving.
    Refused {
        /// The served name.
        name: String,
        /// Why, with the directory.
        reason: String,
    },
}

impl ModelSet {
    /// Serves `models` (name, directory it came from if any, classifier); the first is
    /// the default. Names must be distinct and non-empty.
    pub fn new(models: Vec<(String, Option<PathBuf>, Arc<Classifier>)>) -> anyhow::Result<Self> {
        if models.is_empty() {
            anyhow::bail!("no model to serve");
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(models.len());
        for (name, dir, classifier) in models {
            if name.is_empty() {
                anyhow::bail!("a model needs a name");
            }
            if entries.iter().any(|e| e.served().name == name) {
                anyhow::bail!("two models are named {name:?}");
            }
            entries.push(Entry::new(&name, dir, classifier));
        }
        Ok(ModelSet { entries })
    }

    /// One model, named by its metadata, that never changes.
    pub fn single(classifier: Arc<Classifier>) -> Self {
        let name = classifier.metadata().name.clone();
        ModelSet {
            entries: vec![Entry::new(&name, None, classifier)],
        }
    }

    /// The model serving requests that name none.
    pub fn default_model(&self) -> Arc<ServedModel> {
        self.entries[0].served()
    }

    /// The model `name` asks for (empty: the default), or an error naming the known ones.
    pub fn resolve(&self, name: &str) -> Result<Arc<ServedModel>, String> {
        if name.is_empty() {
            return Ok(self.default_model());
        }
        self.entries
            .iter()
            .map(Entry::served)
            .find(|served| served.name == name)
            .ok_or_else(|| {
                let known: Vec<String> = self.served().iter().map(|m| m.name.clone()).collect();
                // The name comes from the request: echo a bounded part of it.
                let shown: String = name.chars().take(MAX_ECHOED_NAME).collect();
                let cut = if shown.len() < name.len() { "…" } else { "" };
                format!(
                    "this server has no model named {shown:?}{cut}; it serves {}",
                    known.join(", ")
                )
            })
    }

    /// Every model as it serves now, the default first.
    pub fn served(&self) -> Vec<Arc<ServedModel>> {
        self.entries.iter().map(Entry::served).collect()
    }

    /// Loads the model of each directory whose files changed and then stayed the same
    /// for one more call (so a model being copied in is not read half-written), or of
    /// every directory if `force`; swaps in what loads, refuses what does not. Blocking
    /// (reads and parses the files): call it off the async executor.
    pub fn reload_changed(&self, force: bool) -> Vec<Reload> {
        let mut outcomes = Vec::new();
        for entry in &self.entries {
            let Some(dir) = &entry.dir else { continue };
            let now = fingerprint(dir);
            let due = {
                let mut watch = lock(&entry.watch);
                let settled_now = now.is_some() && now == watch.last_seen;
                watch.last_seen = now.clone();
                force || (settled_now && now != watch.settled)
            };
            if !due {
                continue;
            }
            let old = entry.served();
            let (outcome, settled) = match Classifier::load(dir) {
                Ok(classifier) => {
                    let seen = classifier.loaded_from().cloned();
                    let new = Arc::new(ServedModel::new(&old.name, Arc::new(classifier)));
                    let swapped = Reload::Swapped {
                        name: old.name.clone(),
                        from: old.version().to_string(),
                        to: new.version().to_string(),
                    };
                    *entry.current.write().unwrap_or_else(|p| p.into_inner()) = new;
                    // The files as the load saw them: if they changed since `now`, the
                    // next checks load them again.
                    (swapped, seen.or(now))
                }
                Err(error) => (
                    Reload::Refused {
                        name: old.name.clone(),
                        reason: format!("{}: {error:#}", dir.display()),
                    },
                    now,
                ),
            };
            lock(&entry.watch).settled = settled;
            outcomes.push(outcome);
        }
        outcomes
    }
}

impl Entry {
    /// `classifier` served under `name`, watched in `dir` from its files as they were
    /// when it was loaded (or, for a model not loaded by `Classifier::load`, as they
    /// are now).
    fn new(name: &str, dir: Option<PathBuf>, classifier: Arc<Classifier>) -> Self {
        let settled = dir.as_deref().and_then(|dir| {
            classifier
                .loaded_from()
                .cloned()
                .filter(DirSnapshot::holds_model)
                .or_else(|| fingerprint(dir))
        });
        Entry {
            current: RwLock::new(Arc::new(ServedModel::new(name, classifier))),
            watch: Mutex::new(Watch {
                last_seen: settled.clone(),
                settled,
            }),
            dir,
        }
    }

    fn served(&self) -> Arc<ServedModel> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;

    fn shipped_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist")
    }

    /// A copy of the shipped model in a fresh directory, with `version` in its metadata.
    fn model_copy(version: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        write_model(dir.path(), version);
        dir
    }

    fn write_model(dir: &Path, version: &str) {
        let shipped = shipped_dir();
        std::fs::copy(
            shipped.join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .expect("copy weights");
        let meta = std::fs::read_to_string(shipped.join("metadata.json")).expect("metadata");
        let mut json: serde_json::Value = serde_json::from_str(&meta).expect("json");
        json["version"] = serde_json::Value::String(version.into());
        std::fs::write(dir.join("metadata.json"), json.to_string()).expect("write metadata");
    }

    fn set_from(dir: &Path) -> ModelSet {
        let classifier = Arc::new(Classifier::load(dir).expect("loads"));
        ModelSet::new(vec![(
            "clothes".into(),
            Some(dir.to_path_buf()),
            classifier,
        )])
        .expect("one model")
    }

    /// Makes the next fingerprint differ even on file systems with coarse timestamps:
    /// every model file present gets a modification time `secs` seconds from now.
    fn touch_later_by(dir: &Path, secs: u64) {
        let later = SystemTime::now() + std::time::Duration::from_secs(secs);
        for name in classifier_inference::model_dir::MODEL_DIR_FILES {
            let Ok(file) = std::fs::File::options().append(true).open(dir.join(name)) else {
                continue;
            };
            file.set_modified(later).expect("set mtime");
        }
    }

    fn touch_later(dir: &Path) {
        touch_later_by(dir, 5);
    }

    #[test]
    fn a_new_model_is_swapped_in_once_its_files_have_settled() {
        let dir = model_copy("1.0.0");
        let models = set_from(dir.path());
        assert!(models.reload_changed(false).is_empty(), "nothing changed");
        write_model(dir.path(), "2.0.0");
        touch_later(dir.path());
        assert!(
            models.reload_changed(false).is_empty(),
            "files just changed: wait one more check"
        );
        assert_eq!(models.default_model().version(), "1.0.0");
        assert_eq!(
            models.reload_changed(false),
            [Reload::Swapped {
                name: "clothes".into(),
                from: "1.0.0".into(),
                to: "2.0.0".into()
            }]
        );
        assert_eq!(models.resolve("clothes").expect("known").version(), "2.0.0");
        assert!(models.reload_changed(false).is_empty(), "loaded once");
    }

    #[test]
    fn a_broken_model_is_refused_and_the_old_one_keeps_serving() {
        let dir = model_copy("1.0.0");
        let models = set_from(dir.path());
        let weights = std::fs::read(dir.path().join("model.safetensors")).expect("read");
        std::fs::write(
            dir.path().join("model.safetensors"),
            &weights[..weights.len() / 2],
        )
        .expect("truncate");
        touch_later(dir.path());
        models.reload_changed(false);
        let outcome = models.reload_changed(false);
        assert!(
            matches!(&outcome[..], [Reload::Refused { name, reason }]
                if name == "clothes" && reason.contains(&dir.path().display().to_string())),
            "{outcome:?}"
        );
        assert_eq!(models.default_model().version(), "1.0.0");
        assert!(
            models.reload_changed(false).is_empty(),
            "refused once, not every check"
        );
    }

    /// An ONNX fixture model (`inference/tests/fixtures/onnx`) as `model.onnx` in `dir`,
    /// with its labels.
    fn write_onnx(dir: &Path, fixture: &str) {
        let fixtures =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/fixtures/onnx");
        std::fs::copy(
            fixtures.join(format!("{fixture}.onnx")),
            dir.join("model.onnx"),
        )
        .expect("copy model");
        let labels = fixtures.join(format!("{fixture}.labels.txt"));
        if labels.exists() {
            std::fs::copy(labels, dir.join("labels.txt")).expect("copy labels");
        }
    }

    #[test]
    fn an_onnx_model_reloads_like_a_native_one_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_onnx(dir.path(), "mobilenetv2-tiny-op13");
        let models = set_from(dir.path());
        let served = models.default_model();
        assert_eq!(served.version(), "1");
        assert!(served.preprocessor.recipe().is_some(), "the ONNX recipe");
        assert_eq!(
            served.preprocessor.input_len(),
            served.classifier.input_len()
        );

        // An operator the engine lacks: refused, naming it; the old model serves on.
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../inference/tests/fixtures/onnx/bad-unknown-op.onnx"),
            dir.path().join("model.onnx"),
        )
        .expect("copy bad model");
        touch_later_by(dir.path(), 5);
        assert!(models.reload_changed(false).is_empty(), "settling");
        let outcome = models.reload_changed(false);
        assert!(
            matches!(&outcome[..], [Reload::Refused { reason, .. }] if reason.contains("NoSuchOp")),
            "{outcome:?}"
        );
        assert!(
            Arc::ptr_eq(&models.default_model(), &served),
            "the old model serves on"
        );
        let len = served.classifier.input_len();
        assert_eq!(
            served
                .classifier
                .predict(&vec![0.5; len], 1)
                .expect("predicts")[0]
                .len(),
            1000
        );

        // A good model with a description: swapped in under the same name.
        write_onnx(dir.path(), "resnet18-tiny-op17");
        std::fs::write(dir.path().join("model.toml"), "version = \"2\"\n").expect("write");
        touch_later_by(dir.path(), 10);
        models.reload_changed(false);
        assert_eq!(
            models.reload_changed(false),
            [Reload::Swapped {
                name: "clothes".into(),
                from: "1".into(),
                to: "2".into()
            }]
        );
    }

    #[test]
    fn a_new_labels_file_alone_reloads_an_onnx_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_onnx(dir.path(), "keras-mobilenet-nhwc-tiny-op13");
        let models = set_from(dir.path());
        let names = |m: &ModelSet| m.default_model().classifier.metadata().class_names.clone();
        let new_names: Vec<String> = (0..10).map(|i| format!("thing {i}")).collect();
        std::fs::write(dir.path().join("labels.txt"), new_names.join("\n")).expect("write");
        touch_later(dir.path());
        models.reload_changed(false);
        assert!(matches!(
            &models.reload_changed(false)[..],
            [Reload::Swapped { .. }]
        ));
        assert_eq!(names(&models), new_names);
    }

    #[test]
    fn a_change_made_while_the_first_load_ran_is_still_loaded() {
        // The files change after `Classifier::load` looked at them but before the set
        // is built (the start-up race): the watcher compares with what the load saw.
        let dir = model_copy("1.0.0");
        let classifier = Arc::new(Classifier::load(dir.path()).expect("loads"));
        write_model(dir.path(), "2.0.0");
        touch_later(dir.path());
        let models = ModelSet::new(vec![(
            "clothes".into(),
            Some(dir.path().to_path_buf()),
            classifier,
        )])
        .expect("one model");
        assert!(models.reload_changed(false).is_empty(), "settling");
        assert!(
            matches!(&models.reload_changed(false)[..], [Reload::Swapped { to, .. }] if to == "2.0.0"),
        );
    }

    #[test]
    fn requests_pick_a_model_by_name_and_unknown_names_are_told_the_known_ones() {
        let classifier = Arc::new(Classifier::load(&shipped_dir()).expect("loads"));
        let models = ModelSet::new(vec![
            ("a".into(), None, Arc::clone(&classifier)),
            ("b".into(), None, classifier),
        ])
        .expect("two models");
        assert_eq!(models.resolve("").expect("default").name, "a");
        assert_eq!(models.resolve("b").expect("known").name, "b");
        let error = models.resolve("c").expect_err("unknown");
        assert!(error.contains("\"c\"") && error.contains("a, b"), "{error}");
        let long = models.resolve(&"x".repeat(10_000)).expect_err("unknown");
        assert!(
            long.len() < 200,
            "a hostile name is not echoed whole: {long}"
        );
        let twice = ModelSet::new(vec![
            (
                "a".into(),
                None,
                Arc::clone(&models.default_model().classifier),
            ),
            (
                "a".into(),
                None,
                Arc::clone(&models.default_model().classifier),
            ),
        ]);
        assert!(twice.is_err());
    }
}
