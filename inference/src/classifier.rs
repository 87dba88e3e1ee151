//! [`Classifier`]: a loaded model that turns preprocessed images into class probabilities,
//! through the fast inference path ([`crate::fast`]), with the candle forward pass
//! ([`Net::forward`]) as its reference.

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use candle_core::{DType, Tensor};

use crate::fast::FastNet;
use crate::model::{chw_batch_to_nhwc, ModelMetadata, Net, WEIGHTS_FILE};
use crate::simd::SimdLevel;

/// A loaded model ready for inference. It is `Send + Sync` (weights are immutable
/// reference-counted tensors), so a server can share one instance across threads.
#[derive(Clone, Debug)]
pub struct Classifier {
    meta: ModelMetadata,
    net: Net,
    /// The same weights as plain vectors, for the fast inference path.
    pub(crate) fast: Arc<FastNet>,
}

/// Largest number of images pushed through the network at once by [`Classifier::predict`];
/// bigger requests are processed in slices so memory stays bounded.
const PREDICT_CHUNK: usize = 256;

impl Classifier {
    /// Loads `model.safetensors` and `metadata.json` from `dir`, validating that they agree.
    pub fn load(dir: &Path) -> anyhow::Result<Classifier> {
        let meta = ModelMetadata::load(dir)?;
        let net = Net::load(&dir.join(WEIGHTS_FILE), &meta)?;
        Self::from_parts(meta, net)
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
            net,
            fast: Arc::new(fast),
        })
    }

    /// The SIMD level this classifier's kernels run at: [`crate::simd_level`] (the best
    /// the CPU has, or what `CLASSIFIER_SIMD` asked for) unless
    /// [`Classifier::with_simd_level`] chose another.
    pub fn simd_level(&self) -> SimdLevel {
        self.fast.level()
    }

    /// This classifier with its kernels at `level`, or at the best level below it that
    /// the CPU supports (see [`Classifier::simd_level`] for which one was taken). Shares
    /// the weights; for benchmarks and tests that compare levels in one process.
    pub fn with_simd_level(&self, level: SimdLevel) -> Classifier {
        let mut fast = (*self.fast).clone();
        fast.set_level(level);
        Classifier {
            meta: self.meta.clone(),
            net: self.net.clone(),
            fast: Arc::new(fast),
        }
    }

    /// The model's metadata (class names, input size, normalisation, provenance).
    pub fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    /// Number of floats per preprocessed input image: channels × height × width.
    pub fn input_len(&self) -> usize {
        self.meta.input_len()
    }

    /// FLOPs of one forward pass for one image: 2 × the multiply-adds of the two
    /// convolutions and the two linear layers (bias, pooling, ReLU and softmax, which are
    /// comparatively free, are not counted). For benchmarks: images/s × this = FLOP/s.
    pub fn flops_per_image(&self) -> u64 {
        let dims = |t: &Tensor| t.dims().to_vec();
        let (h, w) = (self.meta.input_height as u64, self.meta.input_width as u64);
        let (k1, c1) = (
            dims(&self.net.conv1_w)[0] as u64,
            dims(&self.net.conv1_w)[1] as u64,
        );
        let (k2, c2) = (
            dims(&self.net.conv2_w)[0] as u64,
            dims(&self.net.conv2_w)[1] as u64,
        );
        let (hidden, flat) = (
            dims(&self.net.fc1_w)[0] as u64,
            dims(&self.net.fc1_w)[1] as u64,
        );
        let classes = dims(&self.net.fc2_w)[0] as u64;
        2 * (h * w * k1 * c1 + (h / 2) * (w / 2) * k2 * c2 + flat * hidden + hidden * classes)
    }

    /// `inputs` is N preprocessed images concatenated (N * input_len floats, CHW each);
    /// returns N rows of class probabilities (softmax).
    ///
    /// Runs the fast path (see the `fast` module): plain-slice kernels on the rayon
    /// threads, bypassing candle; [`Classifier::predict_candle`] is the reference.
    pub fn predict(&self, inputs: &[f32], n: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        let classes = self.meta.class_names.len();
        self.predict_in_chunks(inputs, n, |chunk, m, out| {
            let logits = self.fast.logits(chunk, m);
            out.extend(logits.chunks_exact(classes).map(softmax));
            Ok(())
        })
    }

    /// [`Classifier::predict`] through candle tensors and the training forward pass
    /// ([`Net::forward`]): the reference the fast path is checked against.
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
    fn logits_tensor_candle(&self, inputs: &[f32], n: usize) -> candle_core::Result<Tensor> {
        let x = chw_batch_to_nhwc(
            inputs,
            n,
            self.meta.input_channels as usize,
            self.meta.input_height as usize,
            self.meta.input_width as usize,
        )?;
        self.net.forward(&x, None)
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
