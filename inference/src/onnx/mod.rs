//! ONNX image classifiers: the model directory format and its loading, run by tract
//! (pure Rust: nothing downloaded or linked at build time). [`crate::Classifier::load`]
//! takes this path for a directory holding `model.onnx`.
//!
//! # The model directory
//!
//! | file | |
//! |---|---|
//! | `model.onnx` | the model: one float32 image input of rank 4, NCHW (`[N, 3, 224, 224]`) or NHWC (`[N, 224, 224, 3]`), the batch fixed (often 1) or dynamic; its first output holds one row of class scores per image |
//! | `labels.txt` | optional: the class names, one per line, in output order |
//! | `model.toml` | optional: name, version, output kind, preprocessing (below) |
//!
//! The usual case (a torchvision or timm export with the ImageNet recipe) needs only
//! `model.onnx` and `labels.txt`. Without `labels.txt`, class names come from the
//! model's `metadata_props` (the key `labels_key`, or the first of `labels`, `classes`,
//! `class_names`, `names`, `id2label`, `class_labels`: a JSON list, a JSON or Python
//! index → name map, or names separated by newlines or commas), else `class 0`,
//! `class 1`, … A count that differs from the model's outputs is an error.
//!
//! # `model.toml`
//!
//! Every field is optional; unknown fields are errors. The defaults are shown:
//!
//! ```toml
//! name = "shoes"                 # default: the directory's name
//! version = "1"                  # default: the ONNX model_version if set, else "1"
//! output = "auto"                # "logits" (softmax applied), "probabilities" (kept),
//!                                # "auto": probabilities if the output comes out of a
//!                                # Softmax node, else logits
//! # labels_key = "classes"       # metadata_props key of the class names
//!
//! [preprocess]
//! # width = 224                  # default: the model's input width (224 if dynamic)
//! # height = 224                 # default: the model's input height (224 if dynamic)
//! resize = "shorter-side-then-center-crop"   # or "stretch"
//! # resize_shorter_to = 256      # default: the larger input side / 0.875 (256 for 224)
//! interpolation = "bilinear"     # "nearest", "bilinear", "bicubic", "lanczos3"
//! antialias = true               # false: OpenCV/TensorFlow-style (filter not widened)
//! scale = 0.00392156862745098    # 1/255: samples to [0, 1] before mean/std
//! mean = [0.485, 0.456, 0.406]   # per channel of the model's input ([0.0] if gray)
//! std = [0.229, 0.224, 0.225]    # ([1.0] if gray)
//! channel_order = "RGB"          # or "BGR"
//! # layout = "NCHW"              # default: from the input shape (where the 1 or 3 is)
//! ```
//!
//! Each input value is `(sample × scale − mean[c]) / std[c]`. Grayscale or colour
//! follows the model's channel count (1 or 3). Examples: a Keras MobileNet
//! (`preprocess_input` to [−1, 1], NHWC, stretched) takes `resize = "stretch"`,
//! `scale = 0.00784313725490196`, `mean = [1.0, 1.0, 1.0]`, `std = [1.0, 1.0, 1.0]`;
//! a Caffe-style ResNet-50 takes `channel_order = "BGR"`, `scale = 1.0`,
//! `mean = [103.939, 116.779, 123.68]`, `std = [1.0, 1.0, 1.0]`.
//!
//! # Refusals
//!
//! A model is refused at load, with an error naming the cause: a file that is not a
//! complete ONNX model (e.g. truncated); an operator the engine does not implement
//! (naming it and the node); more than one input, an input that is not float32 or not
//! of rank 4, a channel count other than 1 or 3; an output that is not float32; class
//! names whose count differs from the outputs; a graph the engine cannot optimise or
//! run (it is run once on a blank image at load).

mod config;
mod engine;
pub(crate) mod export;
mod graph;
pub(crate) mod head;
mod labels;
mod onnxruntime;

use std::path::Path;

use anyhow::Context;

pub use config::{
    ModelToml, OutputKind, PreprocessToml, ResizeMode, DEFAULT_SIDE, IMAGENET_MEAN, IMAGENET_STD,
    LABEL_KEYS,
};

use crate::model::{ModelMetadata, Normalization};
use crate::preprocess::{Layout, PreprocessRecipe};
use engine::Engine;
pub use export::export_native;
use graph::GraphInfo;
use labels::LabelSource;
use onnxruntime::OrtRunner;

/// File name of the ONNX model inside a model directory.
pub const ONNX_FILE: &str = "model.onnx";
/// File name of the optional description.
pub const DESCRIPTION_FILE: &str = "model.toml";
/// File name of the optional class names.
pub const LABELS_FILE: &str = "labels.txt";

/// Largest batch size a file may fix (every run pads to it).
const MAX_FIXED_BATCH: u64 = 64;

/// The environment variable that chooses the ONNX engine: `auto` (the default: ONNX
/// Runtime when its library can be loaded, else tract), `tract` or `onnxruntime`.
pub const ENGINE_ENV: &str = "CLASSIFIER_ONNX_ENGINE";

/// Which engine runs ONNX models (see [`ENGINE_ENV`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// ONNX Runtime if its library loads (`ORT_DYLIB_PATH`, or `libonnxruntime.so` on
    /// the loader's path), else tract.
    Auto,
    /// tract: pure Rust, always available.
    Tract,
    /// ONNX Runtime; a model load fails when the library cannot be loaded.
    OnnxRuntime,
}

impl EngineChoice {
    /// The choice [`ENGINE_ENV`] names (`Auto` when unset); an unknown value is an error.
    pub fn from_env() -> anyhow::Result<EngineChoice> {
        match std::env::var(ENGINE_ENV).ok().as_deref() {
            None | Some("") | Some("auto") => Ok(EngineChoice::Auto),
            Some("tract") => Ok(EngineChoice::Tract),
            Some("onnxruntime" | "ort") => Ok(EngineChoice::OnnxRuntime),
            Some(other) => anyhow::bail!(
                "{ENGINE_ENV}={other:?} is not an engine: use auto, tract or onnxruntime"
            ),
        }
    }

    /// Whether this choice runs models on ONNX Runtime here (loading it if needed); for
    /// `OnnxRuntime` without the library, the error says why it did not load.
    pub fn uses_onnxruntime(self) -> anyhow::Result<bool> {
        match self {
            EngineChoice::Tract => Ok(false),
            EngineChoice::Auto => Ok(onnxruntime::library().is_ok()),
            EngineChoice::OnnxRuntime => onnxruntime::library()
                .map(|_| true)
                .map_err(|e| anyhow::anyhow!("{e} (and {ENGINE_ENV}=onnxruntime)")),
        }
    }
}

/// The name of the engine [`EngineChoice::from_env`] gives here, and where ONNX Runtime
/// was loaded from or why not: for a server's start-up log.
pub fn engine_report() -> String {
    match EngineChoice::from_env() {
        Err(e) => format!("{e:#}"),
        Ok(EngineChoice::Tract) => format!("tract ({ENGINE_ENV}=tract)"),
        Ok(choice) => match onnxruntime::library() {
            Ok(path) => format!("ONNX Runtime from {path}"),
            Err(e) if choice == EngineChoice::Auto => {
                format!("tract ({e}; set ORT_DYLIB_PATH to use ONNX Runtime)")
            }
            Err(e) => e.to_string(),
        },
    }
}

/// What an ONNX engine does for a loaded model: implemented by tract's plan and by an
/// ONNX Runtime session, so the rest of the crate never asks which one it has.
pub(crate) trait Runner: Send + Sync + std::fmt::Debug {
    /// `n` images (`n × item_len` floats, the model's layout) → `n × classes` outputs.
    fn run(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<f32>>;
    /// Output values per image.
    fn classes(&self) -> usize;
    /// The batch size the file fixes, if any.
    fn fixed_batch(&self) -> Option<usize>;
    /// Multiply-adds of one image, 0 when unknown.
    fn fma_per_image(&self) -> u64;
    /// The engine's name, for logs and the model summary.
    fn name(&self) -> &'static str;
}

/// Checks that `inputs` holds `n` images of `len` values each (both engines' `run`).
fn check_inputs(inputs: &[f32], n: usize, len: usize) -> anyhow::Result<()> {
    if inputs.len() != n * len {
        anyhow::bail!(
            "expected {n} images of {len} values, got {} values",
            inputs.len()
        );
    }
    Ok(())
}

/// Checks that a run of `n` images gave one row of `classes` values per image.
fn check_outputs(values: usize, n: usize, classes: usize) -> anyhow::Result<()> {
    if values != n * classes {
        anyhow::bail!("the model gave {values} values for {n} images of {classes} classes");
    }
    Ok(())
}

/// `images` padded with blank (zero) values to `total` values, for a file that fixes
/// its batch size; borrowed when already full.
fn padded(images: &[f32], total: usize) -> std::borrow::Cow<'_, [f32]> {
    if images.len() == total {
        return std::borrow::Cow::Borrowed(images);
    }
    let mut full = images.to_vec();
    full.resize(total, 0.0);
    std::borrow::Cow::Owned(full)
}

/// A loaded ONNX classifier: the engine and what to do with its output.
#[derive(Debug)]
pub(crate) struct OnnxModel {
    engine: Box<dyn Runner>,
    /// Whether softmax turns the outputs into probabilities.
    logits: bool,
}

/// Everything [`load`] makes of a model directory.
pub(crate) struct Loaded {
    /// Name, version, class names, input size, and a summary in `architecture`.
    pub meta: ModelMetadata,
    /// The preprocessing the model needs.
    pub recipe: PreprocessRecipe,
    /// The engine, ready to run.
    pub model: OnnxModel,
}

impl OnnxModel {
    /// Output values per image.
    pub(crate) fn classes(&self) -> usize {
        self.engine.classes()
    }

    /// Whether the outputs are logits (softmax applied) rather than probabilities.
    pub(crate) fn outputs_logits(&self) -> bool {
        self.logits
    }

    /// `n` preprocessed images → `n × classes` raw outputs.
    pub(crate) fn run(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        self.engine.run(inputs, n)
    }

    /// FLOPs of one image (2 × multiply-adds), 0 when unknown.
    pub(crate) fn flops_per_image(&self) -> u64 {
        2 * self.engine.fma_per_image()
    }

    /// The engine running it: "tract" or "ONNX Runtime".
    pub(crate) fn engine_name(&self) -> &'static str {
        self.engine.name()
    }
}

/// A model directory's ONNX file read and checked, before any engine runs it.
pub(crate) struct Source {
    /// The parsed `model.toml` (defaults when absent).
    pub description: ModelToml,
    /// What the file says of itself.
    pub info: GraphInfo,
    /// The preprocessing the model needs.
    pub recipe: PreprocessRecipe,
    /// The batch size the file fixes, if any.
    pub fixed_batch: Option<usize>,
    /// The decoded file.
    pub proto: tract_onnx::pb::ModelProto,
    /// Whether the engine is ONNX Runtime (else tract).
    pub on_ort: bool,
}

/// Reads and checks the ONNX model directory `dir` for `engine`; `bytes` gets the
/// file's bytes (ONNX Runtime reads those rather than the decoded graph).
pub(crate) fn read_source(
    dir: &Path,
    engine: EngineChoice,
    bytes: &mut Vec<u8>,
) -> anyhow::Result<Source> {
    let description = ModelToml::load(&dir.join(DESCRIPTION_FILE))?;
    let on_ort = engine.uses_onnxruntime()?;
    let path = dir.join(ONNX_FILE);
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let (read, proto) = read_proto(&onnx, &path)?;
    *bytes = read;
    let cannot_serve = || format!("{} cannot be served", path.display());
    // ONNX Runtime knows more operators than tract and names a missing one itself.
    let info = GraphInfo::of(&proto, |op| on_ort || onnx.op_register.0.contains_key(op))
        .with_context(cannot_serve)?;
    let recipe = description
        .preprocess
        .resolve(&info.shape)
        .with_context(|| format!("the preprocessing of {}", dir.display()))?;
    let fixed_batch = checked_batch(&info).with_context(cannot_serve)?;
    Ok(Source {
        description,
        info,
        recipe,
        fixed_batch,
        proto,
        on_ort,
    })
}

/// The preprocessing `description` gives for the graph of `proto` (its input shape
/// fills in what the description leaves unset).
pub(crate) fn recipe_of(
    description: &ModelToml,
    proto: &tract_onnx::pb::ModelProto,
) -> anyhow::Result<PreprocessRecipe> {
    let shape = GraphInfo::of(proto, |_| true)?.shape;
    description.preprocess.resolve(&shape)
}

/// The engine for a graph: ONNX Runtime from the file's `bytes`, or tract from `proto`
/// (`dir` resolves external weight files); `origin` names the model in errors.
pub(crate) fn runner(
    proto: tract_onnx::pb::ModelProto,
    bytes: &[u8],
    on_ort: bool,
    (recipe, fixed_batch): (&PreprocessRecipe, Option<usize>),
    dir: &Path,
    origin: &str,
) -> anyhow::Result<Box<dyn Runner>> {
    let cannot_serve = || format!("{origin} cannot be served");
    if on_ort {
        drop(proto);
        return Ok(Box::new(
            OrtRunner::new(bytes, item_dims(recipe), fixed_batch).with_context(cannot_serve)?,
        ));
    }
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let source = engine::parse(&onnx, &proto, dir.to_str()).with_context(cannot_serve)?;
    drop(proto);
    Ok(Box::new(
        Engine::new(source, item_dims(recipe), fixed_batch).with_context(cannot_serve)?,
    ))
}

/// Loads the ONNX model directory `dir` on `engine` (see the module docs).
pub(crate) fn load(dir: &Path, engine: EngineChoice) -> anyhow::Result<Loaded> {
    let mut bytes = Vec::new();
    let source = read_source(dir, engine, &mut bytes)?;
    let (description, info, recipe) = (source.description, source.info, source.recipe);
    let origin = dir.join(ONNX_FILE).display().to_string();
    let batch = (&recipe, source.fixed_batch);
    let engine = runner(source.proto, &bytes, source.on_ort, batch, dir, &origin)?;
    drop(bytes);
    let labels = labels::class_names(
        &dir.join(LABELS_FILE),
        &info.props,
        description.labels_key.as_deref(),
        engine.classes(),
    )?;
    let model = OnnxModel {
        engine,
        logits: outputs_logits(description.output, &info),
    };
    let mut meta = metadata(dir, &description, &info, &recipe, &model, labels)?;
    training_record(dir, &mut meta);
    Ok(Loaded {
        meta,
        recipe,
        model,
    })
}

/// Takes the training record (dataset, accuracy, command, backbone, …) from the
/// directory's `metadata.json` when one lies beside the ONNX file, as `trainer train
/// --from` writes it; the name, version, classes and input stay the ONNX model's.
/// A file that is not a training record is logged and ignored: it says nothing the
/// model needs.
fn training_record(dir: &Path, meta: &mut ModelMetadata) {
    let path = dir.join(crate::model::METADATA_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the training record");
            return;
        }
    };
    match serde_json::from_str::<ModelMetadata>(&text) {
        Ok(record) => meta.take_training_record(record),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring a metadata.json that is not a training record")
        }
    }
}

/// The ONNX file at `path`: its bytes and their decoding. Read into memory, not
/// mapped: a file replaced while the server reads it must not be able to crash the
/// process.
fn read_proto(
    onnx: &tract_onnx::Onnx,
    path: &Path,
) -> anyhow::Result<(Vec<u8>, tract_onnx::pb::ModelProto)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let proto = engine::decode(onnx, &bytes).with_context(|| {
        format!(
            "{} is not a valid ONNX model ({} bytes; truncated, or not ONNX)",
            path.display(),
            bytes.len()
        )
    })?;
    Ok((bytes, proto))
}

/// The batch size the file fixes (`None`: dynamic), refused above [`MAX_FIXED_BATCH`].
fn checked_batch(info: &GraphInfo) -> anyhow::Result<Option<usize>> {
    match info.fixed_batch {
        Some(b) if b > MAX_FIXED_BATCH => anyhow::bail!(
            "the file fixes its batch size at {b}; at most {MAX_FIXED_BATCH} are served \
             (export it with a dynamic batch)"
        ),
        other => Ok(other.map(|b| b as usize)),
    }
}

/// Whether softmax is to be applied: as `model.toml` says, or (`auto`) unless the
/// graph's output comes out of a `Softmax` node.
fn outputs_logits(kind: OutputKind, info: &GraphInfo) -> bool {
    match kind {
        OutputKind::Logits => true,
        OutputKind::Probabilities => false,
        OutputKind::Auto => info.output_op.as_deref() != Some("Softmax"),
    }
}

/// One image's input dimensions in the model's layout.
fn item_dims(recipe: &PreprocessRecipe) -> [usize; 3] {
    let (c, h, w) = (
        recipe.channels as usize,
        recipe.height as usize,
        recipe.width as usize,
    );
    match recipe.layout {
        Layout::NCHW => [c, h, w],
        Layout::NHWC => [h, w, c],
    }
}

/// The [`ModelMetadata`] replies and logs use: name, version, class names, input, and
/// in `architecture` a summary of the file and how it is run.
fn metadata(
    dir: &Path,
    description: &ModelToml,
    info: &GraphInfo,
    recipe: &PreprocessRecipe,
    model: &OnnxModel,
    (class_names, labels_from): (Vec<String>, LabelSource),
) -> anyhow::Result<ModelMetadata> {
    let name = description.name.clone().unwrap_or_else(|| {
        dir.file_name().map_or_else(
            || "onnx-model".to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    let version = description
        .version
        .clone()
        .unwrap_or_else(|| match info.model_version {
            0 => "1".to_string(),
            v => v.to_string(),
        });
    let architecture = summary(info, recipe, model, &labels_from);
    let meta = ModelMetadata {
        name,
        version,
        architecture,
        input_width: recipe.width,
        input_height: recipe.height,
        input_channels: recipe.channels,
        normalization: Normalization {
            mean: recipe.mean.clone(),
            std: recipe.std.clone(),
        },
        class_dirs: class_names.iter().map(|n| folder_name(n)).collect(),
        class_names,
        tensor_layout: format!("{:?}", recipe.layout),
        ..ModelMetadata::default()
    };
    meta.validate().context("the model's description")?;
    Ok(meta)
}

/// What `architecture` says of an ONNX model: the file, its input and output, where the
/// class names came from.
fn summary(
    info: &GraphInfo,
    recipe: &PreprocessRecipe,
    model: &OnnxModel,
    labels_from: &LabelSource,
) -> String {
    let labels = match labels_from {
        LabelSource::File => LABELS_FILE.to_string(),
        LabelSource::Metadata(key) => format!("metadata_props[{key:?}]"),
        LabelSource::Numbered => "none (numbered)".to_string(),
    };
    let producer = match info.producer.as_str() {
        "" => "unknown producer",
        p => p,
    };
    let batch = model
        .engine
        .fixed_batch()
        .map_or("dynamic".to_string(), |b| format!("fixed at {b}"));
    let kind = match model.logits {
        true => "logits (softmax applied)",
        false => "probabilities",
    };
    format!(
        "ONNX ({producer}, opset {}, {} nodes) on {}: input {:?} {:?} {}x{}x{}, batch \
         {batch}; output {} {kind}; labels from {labels}",
        info.opset,
        info.nodes,
        model.engine_name(),
        info.input_name,
        recipe.layout,
        recipe.width,
        recipe.height,
        recipe.channels,
        model.classes(),
    )
}

/// A class name as a folder name: path separators and control characters replaced.
fn folder_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => format!("_{cleaned}"),
        _ => cleaned,
    }
}
