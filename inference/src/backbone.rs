//! A served model used as a pretrained feature extractor ([`Backbone`]), and a model
//! directory written from it with a new head ([`Backbone::save_with_head`]): what
//! `trainer train --from MODEL` fine-tunes with.
//!
//! Any model the server can serve is a backbone: an ONNX classifier, or our CNN (seen
//! through its ONNX export, so both kinds are cut the same way, by tensor name). The
//! features are the cut graph's output, run by the same ONNX engine the server uses.
//!
//! **What is written.** A native CNN whose new head fits the CNN's own shape is written as
//! a native model directory (`model.safetensors` + `metadata.json`), served by the fast
//! path: a linear head on the hidden layer (`fc1.relu`, the default cut) replaces the
//! output layer; a two-layer head on the flattened convolutions (`flatten`, as
//! `--unfreeze 1` trains it) replaces both linear layers. Every other case is written as
//! one ONNX graph (`model.onnx` + `labels.txt` + `model.toml`, plus the training record in
//! `metadata.json`): the backbone's graph cut at the feature tensor with the head's nodes
//! on top. One self-contained file, rather than a reference to the backbone's directory
//! plus head weights, so that the model served cannot change when the backbone's directory
//! does, and it is deployed, copied and hot-reloaded like any other model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use prost::Message;

use crate::model::{ModelMetadata, Net, METADATA_FILE, WEIGHTS_FILE};
use crate::onnx::export::{description, model_proto, write_directory};
use crate::onnx::head::{self, Cut};
use crate::onnx::{EngineChoice, ModelToml, OutputKind, Runner};
use crate::onnx::{DESCRIPTION_FILE, LABELS_FILE, ONNX_FILE};
use crate::preprocess::Preprocessor;

pub use crate::onnx::head::Dense;

/// The native CNN's hidden layer after its ReLU: the input of the output layer, and the
/// default cut of a native backbone (a tensor of its ONNX export).
pub const NATIVE_HIDDEN: &str = "fc1.relu";
/// The native CNN's flattened convolution features: the input of its hidden layer.
pub const NATIVE_FLATTEN: &str = "flatten";

/// Images per engine run when features are computed.
const FEATURE_CHUNK: usize = 64;

/// A model cut at its feature layer, ready to turn preprocessed images into features.
#[derive(Debug)]
pub struct Backbone {
    /// The model directory it was loaded from.
    dir: PathBuf,
    /// The model's metadata (name, version, input, its own classes).
    meta: ModelMetadata,
    /// The whole graph (for a native CNN, its ONNX export).
    proto: tract_onnx::pb::ModelProto,
    /// The preprocessing of the graph's input, as `model.toml` gives it.
    description: ModelToml,
    /// Where the graph is cut.
    cut: Cut,
    /// The native CNN's weights, when the backbone is one.
    native: Option<Net>,
    /// The engine running the features graph.
    runner: Box<dyn Runner>,
    /// The image → input conversion.
    preprocessor: Preprocessor,
}

impl Backbone {
    /// Loads the model in `dir` (any directory [`crate::Classifier::load`] takes) and cuts
    /// it at `feature_node` (a tensor or node name) or, by default, at the input of its
    /// last linear layer (see [`crate::onnx`]'s `head` module for how it is found).
    pub fn load(dir: &Path, feature_node: Option<&str>) -> anyhow::Result<Backbone> {
        let classifier = crate::Classifier::load(dir)?;
        let meta = classifier.metadata().clone();
        let engine = EngineChoice::from_env()?;
        let (proto, description, native, fixed_batch, on_ort) = match classifier.native_net() {
            Some(net) => {
                let proto = model_proto(net, &meta)?;
                (
                    proto,
                    description(&meta),
                    Some(net.clone()),
                    None,
                    engine.uses_onnxruntime()?,
                )
            }
            None => {
                let source = crate::onnx::read_source(dir, engine, &mut Vec::new())?;
                let batch = source.fixed_batch;
                (source.proto, source.description, None, batch, source.on_ort)
            }
        };
        drop(classifier);
        let named = feature_node.or(native.as_ref().map(|_| NATIVE_HIDDEN));
        let graph = proto.graph.as_ref().context("the model holds no graph")?;
        let cut = head::find_cut(graph, named)
            .with_context(|| format!("finding the feature layer of {}", dir.display()))?;
        let features = head::features_model(&proto, &cut)?;
        let recipe = crate::onnx::recipe_of(&description, &features)?;
        let origin = format!("the features of {} at {:?}", dir.display(), cut.feature);
        let bytes = features.encode_to_vec();
        let runner = crate::onnx::runner(
            features,
            &bytes,
            on_ort,
            (&recipe, fixed_batch),
            dir,
            &origin,
        )?;
        Ok(Backbone {
            dir: dir.to_path_buf(),
            meta,
            proto,
            description,
            cut,
            native,
            runner,
            preprocessor: Preprocessor::from_recipe(recipe)?,
        })
    }

    /// The image → input conversion of the backbone: what every image must go through
    /// before [`Backbone::features`], and what the fine-tuned model will use.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// The model directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The engine computing the features: "tract" or "ONNX Runtime" (their features
    /// differ by rounding, so a cache keeps them apart).
    pub fn engine_name(&self) -> &'static str {
        self.runner.name()
    }

    /// Features per image.
    pub fn feature_len(&self) -> usize {
        self.runner.classes()
    }

    /// The feature tensor's name.
    pub fn feature_node(&self) -> &str {
        &self.cut.feature
    }

    /// The backbone's own metadata (name, version, input, its classes).
    pub fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    /// What a fine-tuned model's metadata records of its backbone: name, version,
    /// directory, engine, and the cut.
    pub fn describe(&self) -> String {
        format!(
            "{} {} ({}, {}) cut at {:?}: {}, {} features",
            self.meta.name,
            self.meta.version,
            self.dir.display(),
            if self.native.is_some() {
                "native CNN"
            } else {
                "ONNX"
            },
            self.cut.feature,
            self.cut.found,
            self.feature_len()
        )
    }

    /// `n` preprocessed images → `n × feature_len` features, in chunks run by the
    /// engine.
    pub fn features(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let len = self.preprocessor.input_len();
        if inputs.len() != n * len {
            bail!(
                "features: expected {n} images of {len} values, got {}",
                inputs.len()
            );
        }
        let mut out = Vec::with_capacity(n * self.feature_len());
        for chunk in inputs.chunks(FEATURE_CHUNK * len) {
            out.extend(self.runner.run(chunk, chunk.len() / len)?);
        }
        Ok(out)
    }

    /// The layer after the cut, when the backbone is the native CNN cut at
    /// [`NATIVE_FLATTEN`]: its hidden layer, the starting point of `--unfreeze 1`.
    pub fn next_layer(&self) -> Option<Dense> {
        let net = self
            .native
            .as_ref()
            .filter(|_| self.cut.feature == NATIVE_FLATTEN)?;
        Dense::from_tensors(&net.fc1_w, &net.fc1_b).ok()
    }

    /// Writes the backbone with `head` (dense layers, ReLU between them; the last one
    /// gives the class logits) as a model directory in `out`, with `meta`'s name,
    /// version, classes and training record (its input and architecture are filled in
    /// here). Native where the head fits the CNN's shape, else ONNX (module docs); the
    /// other format's files are removed from `out`. Returns which was written.
    pub fn save_with_head(
        &self,
        head_layers: &[Dense],
        mut meta: ModelMetadata,
        out: &Path,
    ) -> anyhow::Result<SavedFormat> {
        for layer in head_layers {
            layer.check()?;
        }
        let classes = head_layers.last().map_or(0, Dense::outputs);
        if classes != meta.class_names.len()
            || head_layers.first().map(|l| l.inputs) != Some(self.feature_len())
        {
            bail!(
                "the head takes {:?} inputs and gives {classes} outputs; the backbone gives \
                 {} features and there are {} classes",
                head_layers.first().map(|l| l.inputs),
                self.feature_len(),
                meta.class_names.len()
            );
        }
        meta.backbone = self.describe();
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        match self.native_with(head_layers)? {
            Some(net) => {
                self.save_native(&net, meta, head_layers, out)?;
                Ok(SavedFormat::Native)
            }
            None => {
                self.save_onnx(head_layers, meta, out)?;
                Ok(SavedFormat::Onnx)
            }
        }
    }

    /// Gives `meta` the backbone's input: size, channels, normalisation, inversion and
    /// layout (what the fine-tuned model is fed, in either format).
    fn describe_input(&self, meta: &mut ModelMetadata) {
        let own = &self.meta;
        meta.input_width = own.input_width;
        meta.input_height = own.input_height;
        meta.input_channels = own.input_channels;
        meta.normalization = own.normalization.clone();
        meta.invert = own.invert;
        meta.tensor_layout = own.tensor_layout.clone();
    }

    /// The native CNN with `head` in place of its last layers, when it fits (module docs).
    fn native_with(&self, head_layers: &[Dense]) -> anyhow::Result<Option<Net>> {
        let Some(net) = &self.native else {
            return Ok(None);
        };
        let mut net = net.clone();
        match (self.cut.feature.as_str(), head_layers) {
            (NATIVE_HIDDEN, [output]) => (net.fc2_w, net.fc2_b) = tensors(output)?,
            (NATIVE_FLATTEN, [hidden, output]) => {
                (net.fc1_w, net.fc1_b) = tensors(hidden)?;
                (net.fc2_w, net.fc2_b) = tensors(output)?;
            }
            _ => return Ok(None),
        }
        Ok(Some(net))
    }

    fn save_native(
        &self,
        net: &Net,
        mut meta: ModelMetadata,
        head_layers: &[Dense],
        out: &Path,
    ) -> anyhow::Result<()> {
        remove_files(out, &[ONNX_FILE, LABELS_FILE, DESCRIPTION_FILE])?;
        self.describe_input(&mut meta);
        meta.architecture = format!(
            "{} (the backbone up to {}) -> {}",
            self.meta.name,
            self.cut.feature,
            describe_head(head_layers)
        );
        meta.validate()?;
        net.save(&out.join(WEIGHTS_FILE))?;
        meta.save(out)
    }

    fn save_onnx(
        &self,
        head_layers: &[Dense],
        mut meta: ModelMetadata,
        out: &Path,
    ) -> anyhow::Result<()> {
        remove_files(out, &[WEIGHTS_FILE])?;
        let model = head::with_head(
            &self.proto,
            &self.cut,
            head_layers,
            &meta.class_names,
            &meta.backbone,
        )?;
        meta.architecture = format!(
            "ONNX: {} up to {:?} -> {}",
            self.meta.name,
            self.cut.feature,
            describe_head(head_layers)
        );
        self.describe_input(&mut meta);
        let toml = ModelToml {
            name: Some(meta.name.clone()),
            version: Some(meta.version.clone()),
            output: OutputKind::Logits,
            labels_key: None,
            preprocess: self.description.preprocess.clone(),
        };
        write_directory(out, &model, &meta.class_names, &toml)?;
        let record = serde_json::to_string_pretty(&meta)?;
        write(&out.join(METADATA_FILE), format!("{record}\n").as_bytes())
    }
}

/// Which format [`Backbone::save_with_head`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedFormat {
    /// `model.safetensors` + `metadata.json`: the native CNN's fast path.
    Native,
    /// `model.onnx` + `labels.txt` + `model.toml` (+ `metadata.json`).
    Onnx,
}

/// "linear 128->10" or "linear 3136->128 -> ReLU -> linear 128->10".
fn describe_head(layers: &[Dense]) -> String {
    let parts: Vec<String> = layers
        .iter()
        .map(|l| format!("linear {}->{}", l.inputs, l.outputs()))
        .collect();
    format!("{} -> softmax", parts.join(" -> ReLU -> "))
}

/// A dense layer as the native CNN's weight and bias tensors.
fn tensors(layer: &Dense) -> anyhow::Result<(Tensor, Tensor)> {
    Ok((
        Tensor::from_slice(&layer.weight, (layer.outputs(), layer.inputs), &Device::Cpu)?,
        Tensor::from_slice(&layer.bias, layer.outputs(), &Device::Cpu)?,
    ))
}

fn remove_files(dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
