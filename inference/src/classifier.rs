//! [`Classifier`]: a loaded model that turns preprocessed images into class probabilities,
//! behind one interface for both engines: the native CNN (the fast inference path,
//! [`crate::fast`], with the candle forward pass [`Net::forward`] as its reference) and an
//! ONNX model run by tract ([`crate::onnx`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use candle_core::{DType, Tensor};

use crate::fast::FastNet;
use crate::model::{chw_batch_to_nhwc, ModelMetadata, Net, WEIGHTS_FILE};
use crate::model_dir::DirSnapshot;
use crate::onnx::{EngineChoice, OnnxModel, ONNX_FILE};
use crate::preprocess::Preprocessor;
use crate::simd::SimdLevel;

/// A loaded model ready for inference. It is `Send + Sync` (weights are immutable and
/// reference-counted), so a server can share one instance across threads; clones share
/// the weights.
#[derive(Clone, Debug)]
pub struct Classifier {
    meta: ModelMetadata,
    engine: Engine,
    /// The directory's files as they were just before [`Classifier::load`] read them.
    loaded_from: Option<DirSnapshot>,
}

/// The engine behind a [`Classifier`].
#[derive(Clone, Debug)]
enum Engine {
    /// Our CNN: the candle network (reference) and the same weights for the fast path.
    Native { net: Net, fast: Arc<FastNet> },
    /// An ONNX model and the preprocessing its directory describes.
    Onnx {
        model: Arc<OnnxModel>,
        preprocessor: Preprocessor,
    },
}

/// Largest number of images pushed through the network at once by [`Classifier::predict`];
/// bigger requests are processed in slices so memory stays bounded.
const PREDICT_CHUNK: usize = 256;

impl Classifier {
    /// Loads the model in `dir`, choosing the engine by the files present: `model.onnx`
    /// (with optional `model.toml` and `labels.txt`, see [`crate::onnx`]) is run by the
    /// ONNX engine; `model.safetensors` + `metadata.json` by the native CNN. A directory
    /// with both is refused (which one is meant is not ours to guess).
    ///
    /// An ONNX model runs on the engine [`EngineChoice::from_env`] names (by default
    /// ONNX Runtime when its library loads, else tract).
    pub fn load(dir: &Path) -> anyhow::Result<Classifier> {
        Self::load_choosing(dir, None)
    }

    /// [`Classifier::load`] with an ONNX model on `engine` whatever the environment
    /// says (tests and benchmarks that compare the engines in one process).
    pub fn load_with_engine(dir: &Path, engine: EngineChoice) -> anyhow::Result<Classifier> {
        Self::load_choosing(dir, Some(engine))
    }

    fn load_choosing(dir: &Path, engine: Option<EngineChoice>) -> anyhow::Result<Classifier> {
        let snapshot = DirSnapshot::of(dir);
        let onnx = dir.join(ONNX_FILE).is_file();
        let native = dir.join(WEIGHTS_FILE).is_file();
        let mut classifier = match (onnx, native) {
            (true, true) => bail!(
                "{} holds both {ONNX_FILE} and {WEIGHTS_FILE}: keep one model per directory",
                dir.display()
            ),
            (true, false) => {
                let engine = engine.map_or_else(EngineChoice::from_env, Ok)?;
                Self::load_onnx(dir, engine)?
            }
            (false, _) => Self::load_native(dir)?,
        };
        classifier.loaded_from = Some(snapshot);
        Ok(classifier)
    }

    /// The model directory's files as they were just before [`Classifier::load`] read
    /// them (`None` for a model not loaded from a directory). A server watching the
    /// directory compares later snapshots with this one.
    pub fn loaded_from(&self) -> Option<&DirSnapshot> {
        self.loaded_from.as_ref()
    }

    /// Loads `model.safetensors` and `metadata.json` from `dir`, validating that they agree.
    fn load_native(dir: &Path) -> anyhow::Result<Classifier> {
        let meta = ModelMetadata::load(dir)?;
        let net = Net::load(&dir.join(WEIGHTS_FILE), &meta)?;
        Self::from_parts(meta, net)
    }

    /// Loads the ONNX model directory `dir`: checks the file, optimises it for the
    /// engine and runs it once (see [`crate::onnx`] for what is refused).
    fn load_onnx(dir: &Path, engine: EngineChoice) -> anyhow::Result<Classifier> {
        let loaded = crate::onnx::load(dir, engine)?;
        Ok(Classifier {
            meta: loaded.meta,
            engine: Engine::Onnx {
                model: Arc::new(loaded.model),
                preprocessor: Preprocessor::from_recipe(loaded.recipe)?,
            },
            loaded_from: None,
        })
    }

    /// Builds a classifier from the bytes of a model directory's two files (for a model
    /// compiled into a binary); `origin` names them in errors.
    pub fn from_bytes(weights: &[u8], metadata_json: &str, origin: &str) -> anyhow::Result<Self> {
        let meta = ModelMetadata::from_json(metadata_json, &format!("{origin} metadata"))?;
        let net = Net::from_safetensors_bytes(weights, &meta, &format!("{origin} weights"))?;
        Self::from_parts(meta, net)
    }

    /// Builds a classifier from in-memory parts (what a training run returns, without
    /// writing and reading back the model directory).
    pub fn from_parts(meta: ModelMetadata, net: Net) -> anyhow::Result<Classifier> {
        let v = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let fast = FastNet::new(
            (
                meta.input_height as usize,
                meta.input_width as usize,
                meta.input_channels as usize,
            ),
            (v(&net.conv1_w)?, v(&net.conv1_b)?),
            (v(&net.conv2_w)?, v(&net.conv2_b)?),
            (v(&net.fc1_w)?, v(&net.fc1_b)?),
            (v(&net.fc2_w)?, v(&net.fc2_b)?),
        )?;
        Ok(Classifier {
            meta,
            engine: Engine::Native {
                net,
                fast: Arc::new(fast),
            },
            loaded_from: None,
        })
    }

    /// Which engine runs this model, for logs and benchmarks: "native CNN",
    /// "ONNX (tract)" or "ONNX (ONNX Runtime)".
    pub fn engine_name(&self) -> &'static str {
        match &self.engine {
            Engine::Native { .. } => "native CNN",
            Engine::Onnx { model, .. } => match model.engine_name() {
                "tract" => "ONNX (tract)",
                _ => "ONNX (ONNX Runtime)",
            },
        }
    }

    /// Writes this native CNN as an ONNX model directory in `out` (`model.onnx`,
    /// `labels.txt`, `model.toml`; see [`crate::onnx::export_native`]). An error for a
    /// model that is already ONNX.
    pub fn export_onnx(&self, out: &Path) -> anyhow::Result<()> {
        let Engine::Native { net, .. } = &self.engine else {
            bail!("this model is already ONNX: copy its directory instead");
        };
        crate::onnx::export_native(net, &self.meta, out)
    }

    /// The native CNN's weights (`None` for an ONNX model): a fine-tuning backbone.
    pub(crate) fn native_net(&self) -> Option<&Net> {
        match &self.engine {
            Engine::Native { net, .. } => Some(net),
            Engine::Onnx { .. } => None,
        }
    }

    /// Whether this is an ONNX model (whose directory files differ from the native
    /// CNN's; see [`Classifier::load`]).
    pub fn is_onnx(&self) -> bool {
        matches!(self.engine, Engine::Onnx { .. })
    }

    /// The image → input conversion this model needs: the native CNN's (from its
    /// metadata) or the ONNX model's recipe ([`Preprocessor::recipe`]).
    pub fn preprocessor(&self) -> Preprocessor {
        match &self.engine {
            Engine::Native { .. } => Preprocessor::new(&self.meta),
            Engine::Onnx { preprocessor, .. } => preprocessor.clone(),
        }
    }

    /// The fast path's network (tests of the native kernels).
    #[cfg(test)]
    pub(crate) fn fast_net(&self) -> &FastNet {
        match &self.engine {
            Engine::Native { fast, .. } => fast,
            Engine::Onnx { .. } => panic!("an ONNX classifier has no native network"),
        }
    }

    /// The SIMD level this classifier's kernels run at: [`crate::simd_level`] (the best
    /// the CPU has, or what `CLASSIFIER_SIMD` asked for) unless
    /// [`Classifier::with_simd_level`] chose another. For an ONNX model, the level
    /// [`crate::simd_level`] names (tract picks its own kernels for the CPU).
    pub fn simd_level(&self) -> SimdLevel {
        match &self.engine {
            Engine::Native { fast, .. } => fast.level(),
            Engine::Onnx { .. } => crate::simd_level(),
        }
    }

    /// This classifier with its kernels at `level`, or at the best level below it that
    /// the CPU supports (see [`Classifier::simd_level`] for which one was taken). Shares
    /// the weights; for benchmarks and tests that compare levels in one process. An
    /// ONNX model is returned as it is.
    pub fn with_simd_level(&self, level: SimdLevel) -> Classifier {
        let Engine::Native { net, fast } = &self.engine else {
            return self.clone();
        };
        let mut fast = (**fast).clone();
        fast.set_level(level);
        Classifier {
            meta: self.meta.clone(),
            engine: Engine::Native {
                net: net.clone(),
                fast: Arc::new(fast),
            },
            loaded_from: self.loaded_from.clone(),
        }
    }

    /// The model's metadata (class names, input size, normalisation, provenance).
    pub fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    /// Number of floats per preprocessed input image: channels × height × width.
    /// (224×224×3 floats, 602 KB, for an ImageNet model.)
    pub fn input_len(&self) -> usize {
        self.meta.input_len()
    }

    /// FLOPs of one forward pass for one image: 2 × the multiply-adds of the two
    /// convolutions and the two linear layers (bias, pooling, ReLU and softmax, which are
    /// comparatively free, are not counted). For benchmarks: images/s × this = FLOP/s.
    /// For an ONNX model, 2 × the multiply-adds tract counts (0 if it counts none).
    pub fn flops_per_image(&self) -> u64 {
        let net = match &self.engine {
            Engine::Native { net, .. } => net,
            Engine::Onnx { model, .. } => return model.flops_per_image(),
        };
        let dims = |t: &Tensor| t.dims().to_vec();
        let (h, w) = (self.meta.input_height as u64, self.meta.input_width as u64);
        let (k1, c1) = (dims(&net.conv1_w)[0] as u64, dims(&net.conv1_w)[1] as u64);
        let (k2, c2) = (dims(&net.conv2_w)[0] as u64, dims(&net.conv2_w)[1] as u64);
        let (hidden, flat) = (dims(&net.fc1_w)[0] as u64, dims(&net.fc1_w)[1] as u64);
        let classes = dims(&net.fc2_w)[0] as u64;
        2 * (h * w * k1 * c1 + (h / 2) * (w / 2) * k2 * c2 + flat * hidden + hidden * classes)
    }

    /// `inputs` is N preprocessed images concatenated (N * input_len floats, each as
    /// [`Classifier::preprocessor`] makes it); returns N rows of class probabilities.
    ///
    /// The native CNN runs the fast path (see the `fast` module): plain-slice kernels on
    /// the rayon threads, bypassing candle; [`Classifier::predict_candle`] is the
    /// reference. An ONNX model runs on tract, a batch of two or more split over two
    /// threads; softmax is applied to logits, probabilities are returned as they are.
    pub fn predict(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        let classes = self.meta.class_names.len();
        match &self.engine {
            Engine::Native { fast, .. } => self.predict_in_chunks(inputs, n, |chunk, m, out| {
                let logits = fast.logits(chunk, m);
                out.extend(logits.chunks_exact(classes).map(softmax));
                Ok(())
            }),
            Engine::Onnx { model, .. } => self.predict_in_chunks(inputs, n, |chunk, m, out| {
                let scores = model.run(chunk, m)?;
                let rows = scores.chunks_exact(classes);
                if model.outputs_logits() {
                    out.extend(rows.map(softmax));
                } else {
                    out.extend(rows.map(<[f32]>::to_vec));
                }
                Ok(())
            }),
        }
    }

    /// [`Classifier::predict`] through candle tensors and the training forward pass
    /// ([`Net::forward`]): the reference the fast path is checked against. Native CNN
    /// only (an error for an ONNX model).
    pub fn predict_candle(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        self.predict_in_chunks(inputs, n, |chunk, m, out| {
            let logits = self.logits_tensor_candle(chunk, m)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            out.extend(probs.to_vec2::<f32>()?);
            Ok(())
        })
    }

    /// Checks that `inputs` holds `n` images, then has `probabilities` append the rows of
    /// slices of at most [`PREDICT_CHUNK`] images (`(slice, images in it, rows)`) in order.
    fn predict_in_chunks(
        &self,
        inputs: &[f32],
        n: usize,
        mut probabilities: impl FnMut(&[f32], usize, &mut Vec<Vec<f32>>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let len = self.input_len();
        if inputs.len() != n * len {
            bail!(
                "predict: expected {n} images of {len} floats ({} floats), got {}",
                n * len,
                inputs.len()
            );
        }
        let mut out = Vec::with_capacity(n);
        for chunk in inputs.chunks(PREDICT_CHUNK * len) {
            probabilities(chunk, chunk.len() / len, &mut out)?;
        }
        Ok(out)
    }

    /// The `(n, classes)` logits tensor of [`Net::forward`] for `n` CHW images.
    fn logits_tensor_candle(&self, inputs: &[f32], n: usize) -> anyhow::Result<Tensor> {
        let Engine::Native { net, .. } = &self.engine else {
            bail!(
                "the candle reference exists for the native CNN only, not for {}",
                self.engine_name()
            );
        };
        let x = chw_batch_to_nhwc(
            inputs,
            n,
            self.meta.input_channels as usize,
            self.meta.input_height as usize,
            self.meta.input_width as usize,
        )?;
        Ok(net.forward(&x, None)?)
    }

    /// Flat `(n, classes)` logits of the candle forward pass (for tests of the fast path's
    /// logits).
    #[cfg(test)]
    pub(crate) fn logits_candle(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(self
            .logits_tensor_candle(inputs, n)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

/// Softmax of one row of logits (as candle's `softmax_last_dim`: `exp(x - max) / sum`).
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = out.iter().sum();
    for v in &mut out {
        *v /= sum;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn classifier_is_send_sync() {
        assert_send_sync::<Classifier>();
    }
}
