//! The model format (weights in `model.safetensors`, description in `metadata.json`) and the
//! network itself ([`Net`]): the one definition the trainer writes and every consumer reads.
//!
//! Network (NHWC tensors throughout):
//! `conv3x3(pad 1) c→32 → maxpool 2 → ReLU → conv3x3(pad 1) 32→64 → maxpool 2 → ReLU →
//! flatten (h, w, c order) → linear →128 → ReLU → dropout → linear 128→classes`.
//! (ReLU after pooling equals ReLU before it, as both are monotonic, and is 4× cheaper.)

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ops;

/// File name of the weights inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the metadata inside a model directory.
pub const METADATA_FILE: &str = "metadata.json";

/// Tensor names in `model.safetensors`, so trainer and loader agree on them.
pub mod names {
    /// First convolution weight, `(9 * in_channels, c1)`, rows ordered (ky, kx, c_in).
    pub const CONV1_W: &str = "conv1.weight";
    /// First convolution bias, `(c1)`.
    pub const CONV1_B: &str = "conv1.bias";
    /// Second convolution weight, `(9 * c1, c2)`.
    pub const CONV2_W: &str = "conv2.weight";
    /// Second convolution bias, `(c2)`.
    pub const CONV2_B: &str = "conv2.bias";
    /// Hidden linear layer weight, `(hidden, (h/4) * (w/4) * c2)` (PyTorch `Linear` layout).
    pub const FC1_W: &str = "fc1.weight";
    /// Hidden linear layer bias, `(hidden)`.
    pub const FC1_B: &str = "fc1.bias";
    /// Output layer weight, `(classes, hidden)`.
    pub const FC2_W: &str = "fc2.weight";
    /// Output layer bias, `(classes)`.
    pub const FC2_B: &str = "fc2.bias";
}

/// Per-channel normalisation applied after pixels are scaled to `[0, 1]`:
/// `(v - mean[c]) / std[c]`. Stored in the metadata so inference matches training.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Mean per channel.
    pub mean: Vec<f32>,
    /// Standard deviation per channel.
    pub std: Vec<f32>,
}

/// Everything a consumer needs to know about a trained model; serialized beside the weights
/// as `metadata.json`. `Default` is all empty or zero (not a valid model): for models
/// that were not trained here, which fill in what they know and leave the training
/// record at its defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Short model name, e.g. "fashion-cnn".
    pub name: String,
    /// Model version, e.g. "1.0.0".
    pub version: String,
    /// Human readable layer list.
    pub architecture: String,
    /// Input width in pixels.
    pub input_width: u32,
    /// Input height in pixels.
    pub input_height: u32,
    /// Input channels: 1 (grayscale) or 3 (RGB).
    pub input_channels: u32,
    /// Per-channel normalisation applied after scaling pixels to `[0, 1]`.
    pub normalization: Normalization,
    /// Whether pixel values are inverted (`1 - v`) before normalisation; false for
    /// Fashion-MNIST (light garment on black background).
    pub invert: bool,
    /// Display names of the classes, in output order.
    pub class_names: Vec<String>,
    /// Filesystem-safe folder names of the classes, same order as `class_names`.
    pub class_dirs: Vec<String>,
    /// Dataset the model was trained on.
    pub dataset: String,
    /// Accuracy on the held-out test set, in [0, 1].
    pub test_accuracy: f32,
    /// Number of test images `test_accuracy` was measured on.
    #[serde(default)]
    pub test_samples: usize,
    /// Wall time of training (all epochs, excluding data loading and the final test), in seconds.
    pub training_seconds: f64,
    /// Number of training epochs.
    pub epochs: usize,
    /// Exact command line used to train the model.
    pub command: String,
    /// Seed of all random choices in training.
    #[serde(default)]
    pub seed: u64,
    /// Mini-batch size.
    #[serde(default)]
    pub batch_size: usize,
    /// Initial learning rate (cosine decayed over the epochs).
    #[serde(default)]
    pub learning_rate: f64,
    /// Memory layout of the network's activations ("NHWC").
    #[serde(default)]
    pub tensor_layout: String,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default)]
    pub created_at_unix: u64,
    /// Augmentations used in training, as given to `trainer train --augment` ("none" if
    /// none; empty for models written before it was recorded).
    #[serde(default)]
    pub augment: String,
    /// Label smoothing of the training loss (0 = plain cross-entropy).
    #[serde(default)]
    pub label_smoothing: f32,
    /// The epoch whose weights were kept (the best on the validation split; 0 when not
    /// recorded).
    #[serde(default)]
    pub best_epoch: usize,
    /// The pretrained model a fine-tuned model's features come from (`trainer train
    /// --from`): its name, version, directory and where it was cut; empty for a model
    /// trained from scratch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backbone: String,
}

impl ModelMetadata {
    /// Number of floats in one preprocessed input image (channels × height × width).
    pub fn input_len(&self) -> usize {
        self.input_channels as usize * self.input_height as usize * self.input_width as usize
    }

    /// Checks internal consistency, so a bad `metadata.json` fails at load, not at predict.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.input_channels == 1 || self.input_channels == 3) {
            bail!("input_channels must be 1 or 3, got {}", self.input_channels);
        }
        if self.input_width < 4 || self.input_height < 4 {
            bail!(
                "input size {}x{} is too small (minimum 4x4)",
                self.input_width,
                self.input_height
            );
        }
        let c = self.input_channels as usize;
        if self.normalization.mean.len() != c || self.normalization.std.len() != c {
            bail!("normalization must have {c} mean and std values");
        }
        if self
            .normalization
            .std
            .iter()
            .any(|s| *s <= 0.0 || !s.is_finite())
        {
            bail!("normalization std values must be positive");
        }
        if self.class_names.is_empty() || self.class_names.len() != self.class_dirs.len() {
            bail!("class_names and class_dirs must be non-empty and of equal length");
        }
        Ok(())
    }

    /// Takes what `record` says of training (dataset, accuracy, time, command, seed,
    /// backbone, …) and keeps what this model's own files say of it (name, version,
    /// architecture, input, classes): an ONNX model with a training record beside it.
    pub fn take_training_record(&mut self, record: ModelMetadata) {
        let own = std::mem::replace(self, record);
        self.name = own.name;
        self.version = own.version;
        self.architecture = own.architecture;
        self.input_width = own.input_width;
        self.input_height = own.input_height;
        self.input_channels = own.input_channels;
        self.normalization = own.normalization;
        self.invert = own.invert;
        self.class_names = own.class_names;
        self.class_dirs = own.class_dirs;
        self.tensor_layout = own.tensor_layout;
    }

    /// Reads `metadata.json` from a model directory.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(METADATA_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and validates the text of a `metadata.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> anyhow::Result<Self> {
        let meta: ModelMetadata =
            serde_json::from_str(text).with_context(|| format!("parsing {origin}"))?;
        meta.validate()
            .with_context(|| format!("invalid {origin}"))?;
        Ok(meta)
    }

    /// Writes `metadata.json` (pretty printed) into a model directory.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(METADATA_FILE);
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// The network's parameters and its candle forward pass: trained by the trainer (with
/// `Var`-backed tensors, through the custom op's backward pass), stored and loaded here, and
/// the reference the fast inference path is checked against. Shapes: see [`names`].
#[derive(Clone, Debug)]
pub struct Net {
    /// See [`names::CONV1_W`].
    pub conv1_w: Tensor,
    /// See [`names::CONV1_B`].
    pub conv1_b: Tensor,
    /// See [`names::CONV2_W`].
    pub conv2_w: Tensor,
    /// See [`names::CONV2_B`].
    pub conv2_b: Tensor,
    /// See [`names::FC1_W`].
    pub fc1_w: Tensor,
    /// See [`names::FC1_B`].
    pub fc1_b: Tensor,
    /// See [`names::FC2_W`].
    pub fc2_w: Tensor,
    /// See [`names::FC2_B`].
    pub fc2_b: Tensor,
}

impl Net {
    /// Computes logits for an NHWC batch `(n, h, w, c)`. `dropout_mask`, if given, is an
    /// `(n, hidden)` tensor of 0 / 1/(1-p) multipliers applied to the hidden layer.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let h = ops::conv3x3_pool2_relu(x, &self.conv1_w, &self.conv1_b, false)?;
        let h = ops::conv3x3_pool2_relu(&h, &self.conv2_w, &self.conv2_b, true)?;
        let n = h.dim(0)?;
        let h = h.reshape((n, ()))?;
        let h = h
            .matmul(&self.fc1_w.t()?)?
            .broadcast_add(&self.fc1_b)?
            .relu()?;
        let h = match dropout_mask {
            Some(m) => (h * m)?,
            None => h,
        };
        h.matmul(&self.fc2_w.t()?)?.broadcast_add(&self.fc2_b)
    }

    /// The same weights cut loose from the autograd graph (what a finished training run
    /// keeps, without the optimiser's variables).
    pub fn detach(&self) -> Net {
        Net {
            conv1_w: self.conv1_w.detach(),
            conv1_b: self.conv1_b.detach(),
            conv2_w: self.conv2_w.detach(),
            conv2_b: self.conv2_b.detach(),
            fc1_w: self.fc1_w.detach(),
            fc1_b: self.fc1_b.detach(),
            fc2_w: self.fc2_w.detach(),
            fc2_b: self.fc2_b.detach(),
        }
    }

    /// Named tensors, as stored in `model.safetensors`.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            (names::CONV1_W, &self.conv1_w),
            (names::CONV1_B, &self.conv1_b),
            (names::CONV2_W, &self.conv2_w),
            (names::CONV2_B, &self.conv2_b),
            (names::FC1_W, &self.fc1_w),
            (names::FC1_B, &self.fc1_b),
            (names::FC2_W, &self.fc2_w),
            (names::FC2_B, &self.fc2_b),
        ]
    }

    /// Writes the weights to `path` as safetensors.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let map: HashMap<String, Tensor> = self
            .named()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.detach()))
            .collect();
        candle_core::safetensors::save(&map, path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads weights from `path` and checks their shapes against the metadata.
    pub fn load(path: &Path, meta: &ModelMetadata) -> anyhow::Result<Self> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::from_tensors(map, meta, &path.display().to_string())
    }

    /// Reads weights from the bytes of a safetensors file (`origin` names it in errors)
    /// and checks their shapes against the metadata.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        meta: &ModelMetadata,
        origin: &str,
    ) -> anyhow::Result<Self> {
        let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .with_context(|| format!("reading {origin}"))?;
        Self::from_tensors(map, meta, origin)
    }

    fn from_tensors(
        mut map: HashMap<String, Tensor>,
        meta: &ModelMetadata,
        origin: &str,
    ) -> anyhow::Result<Self> {
        let mut take = |name: &str| -> anyhow::Result<Tensor> {
            let t = map
                .remove(name)
                .with_context(|| format!("{origin} has no tensor {name}"))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let net = Net {
            conv1_w: take(names::CONV1_W)?,
            conv1_b: take(names::CONV1_B)?,
            conv2_w: take(names::CONV2_W)?,
            conv2_b: take(names::CONV2_B)?,
            fc1_w: take(names::FC1_W)?,
            fc1_b: take(names::FC1_B)?,
            fc2_w: take(names::FC2_W)?,
            fc2_b: take(names::FC2_B)?,
        };
        net.check_shapes(meta)
            .with_context(|| format!("{origin} does not match its metadata"))?;
        Ok(net)
    }

    /// Verifies that all weight shapes fit together and with the metadata.
    fn check_shapes(&self, meta: &ModelMetadata) -> anyhow::Result<()> {
        let c = meta.input_channels as usize;
        let (k1, c1) = self.conv1_w.dims2()?;
        let (k2, c2) = self.conv2_w.dims2()?;
        let (hidden, flat) = self.fc1_w.dims2()?;
        let (classes, hidden2) = self.fc2_w.dims2()?;
        let expect_flat = (meta.input_height as usize / 4) * (meta.input_width as usize / 4) * c2;
        let ok = k1 == 9 * c
            && self.conv1_b.dims() == [c1]
            && k2 == 9 * c1
            && self.conv2_b.dims() == [c2]
            && flat == expect_flat
            && self.fc1_b.dims() == [hidden]
            && hidden2 == hidden
            && self.fc2_b.dims() == [classes]
            && classes == meta.class_names.len();
        if !ok {
            bail!(
                "inconsistent shapes: conv1 {:?}, conv2 {:?}, fc1 {:?}, fc2 {:?} for input {}x{}x{} and {} classes",
                self.conv1_w.dims(),
                self.conv2_w.dims(),
                self.fc1_w.dims(),
                self.fc2_w.dims(),
                meta.input_height,
                meta.input_width,
                c,
                meta.class_names.len()
            );
        }
        Ok(())
    }
}

/// Converts N concatenated CHW images (as [`crate::Preprocessor`] makes them) into the one
/// NHWC tensor [`Net::forward`] takes (a copy; a plain reshape for 1 channel).
pub fn chw_batch_to_nhwc(
    inputs: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> candle_core::Result<Tensor> {
    let data = if c == 1 {
        inputs.to_vec()
    } else {
        let mut out = vec![0f32; inputs.len()];
        for (src, dst) in inputs
            .chunks_exact(c * h * w)
            .zip(out.chunks_exact_mut(c * h * w))
        {
            for ch in 0..c {
                for p in 0..h * w {
                    dst[p * c + ch] = src[ch * h * w + p];
                }
            }
        }
        out
    };
    Tensor::from_vec(data, (n, h, w, c), &Device::Cpu)
}
