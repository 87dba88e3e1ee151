//! The fast inference path of [`crate::Classifier`]: the same network and weights as
//! [`crate::model::Net::forward`], over plain slices instead of candle tensors.
//!
//! What the profile of the candle path showed (perf, batch 512): the convolution kernels
//! themselves were fine, but every layer allocated and touched fresh output tensors per
//! call, layer 1 went through im2col and a matrix product with K = 9 (all memory traffic),
//! `gemm`'s packing of the im2col patches cost as much as a fifth of the time, and the
//! linked `gemm` ran AVX2 kernels on an AVX-512 machine. Here:
//!
//! - the batch is cut into chunks of [`CHUNK`] images, one chunk at a time per rayon
//!   thread; each thread reuses thread-local scratch buffers across chunks and calls;
//! - layer 1 is a direct 3×3 convolution fused with 2×2 max-pool, bias and ReLU
//!   ([`direct::conv1_pool_relu`]), writing into a zero-padded buffer for layer 2;
//! - layer 2 is a direct convolution too ([`direct::conv2_pool_relu`]): the inputs of one
//!   output pixel's kernel row are `3 · c1` contiguous floats of the padded buffer, so no
//!   im2col copy and no `gemm` packing; the four outputs of each pooling window stay in
//!   registers, are pooled there, and only the pooled, biased, rectified features are
//!   written, straight into the flattened `(h, w, c)` order of the linear layer. Or
//!   [`direct::conv2_tiles`] holds a row of positions × registers of accumulators
//!   instead and pools afterwards (the kernel table picks: AVX2's 16 registers fit 6 × 2,
//!   AVX-512's 32 fit 14 × 2, which measured faster than pooling in registers);
//!   the weights are packed per block of output channels so each block walks its
//!   weights contiguously;
//! - the linear layers run over the whole batch (in tasks of at most 64 rows, at least
//!   one per thread) through [`direct::linear`], a cache-blocked product with the
//!   weights repacked once into panels of 32 outputs (`gemm` on the portable path);
//! - a batch smaller than the thread count runs one image at a time in one fork-join:
//!   each thread computes a share of layer 2's pooled rows and the hidden layer's sums
//!   over just those features, which are added up afterwards.
//!
//! Bias is added after pooling: `max(a + b) = max(a) + b` holds exactly in floating point,
//! as rounding `x + b` is monotonic in `x`. The sums run in other orders than the candle
//! path's (its convolutions run [`direct::conv2_tiles`] too, but its linear layers go
//! through candle's `matmul`), so probabilities agree to float rounding (the tests bound
//! the difference), not bit for bit.
//!
//! The kernels are written once, generic over the lane operations of [`crate::simd`], and
//! monomorphised for AVX-512 and for AVX2 + FMA inside `#[target_feature]` wrappers (the
//! crate is built for baseline x86-64); [`crate::simd::simd_level`] picks the level at run
//! time. Without either (or forced with `CLASSIFIER_SIMD=portable`, or on other
//! architectures) a portable path runs: plain layer 1, im2col + `gemm` for layer 2, with
//! the im2col and pooling of [`crate::kernels`]. Tests compare the layer kernels with
//! `reference` and every path the CPU can run with the candle forward pass.
//!
//! The code is split by concern:
//!
//! - this file: [`FastNet`], its weights and its entry points (building, the SIMD level,
//!   [`FastNet::logits`] with its scheduling over rayon threads, the linear layers);
//! - [`chunk`]: both convolution layers over one chunk of images (the per-thread
//!   scratch buffers, the dispatch per SIMD level, and the portable path);
//! - [`tables`]: the kernel tables (register blocks and tile shapes per SIMD level) and
//!   the `#[target_feature]` wrappers that instantiate the generic kernels with them;
//! - [`direct`], the hand-written SIMD kernels, gathered from [`infer`] (the forward
//!   convolution kernels), [`linear`] (the linear layers' kernel and packed weights),
//!   [`grad`] (the training gradients that `crate::ops` runs) and [`lanes`] (the lane
//!   operations they share).

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::sgemm;
use crate::simd::{simd_level, SimdLevel};
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512, Lanes};
#[cfg(target_arch = "x86_64")]
use tables::{linear_avx2, linear_avx512, AVX2_NV, AVX512_NV};

mod chunk;
// Elsewhere than on x86-64 some kernels run only in tests (with portable lanes).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod grad;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod infer;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod lanes;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod linear;
#[cfg(target_arch = "x86_64")]
mod tables;

/// Images per chunk (the unit of work of one rayon task): small enough that a batch of 16
/// keeps both cores busy, large enough to amortise the task overhead. On the portable path
/// a chunk's layer-2 patches (`CHUNK · 196 · 288` floats for 28×28 inputs, 1.8 MB) stay
/// within one core's L2 cache.
pub(crate) const CHUNK: usize = 8;

/// The network's weights as plain vectors, with the shapes they imply.
#[derive(Clone, Debug)]
pub(crate) struct FastNet {
    h: usize,
    w: usize,
    c_in: usize,
    c1: usize,
    c2: usize,
    hidden: usize,
    classes: usize,
    /// `(9 * c_in, c1)`, rows `(ky, kx, ci)`.
    conv1_w: Vec<f32>,
    conv1_b: Vec<f32>,
    /// `(9 * c1, c2)`, rows `(ky, kx, ci)`.
    conv2_w: Vec<f32>,
    conv2_b: Vec<f32>,
    /// `conv2_w` cut into the column blocks of the SIMD level's layer-2 kernel, and
    /// their width (see [`direct::pack_blocks`]).
    conv2_blocks: Arc<(Vec<f32>, usize)>,
    /// `(hidden, flat)`.
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    /// `(classes, hidden)`.
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
    /// `fc1_w` and `fc2_w` repacked for the SIMD kernels.
    fc1_p: Arc<direct::Packed>,
    fc2_p: Arc<direct::Packed>,
    /// The SIMD level whose kernels run (supported by the CPU: see [`FastNet::set_level`]).
    level: SimdLevel,
}

impl FastNet {
    /// Builds the inference path from the weights (as stored: see [`crate::model::names`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        (h, w, c_in): (usize, usize, usize),
        conv1: (Vec<f32>, Vec<f32>),
        conv2: (Vec<f32>, Vec<f32>),
        fc1: (Vec<f32>, Vec<f32>),
        fc2: (Vec<f32>, Vec<f32>),
    ) -> anyhow::Result<Self> {
        let c1 = conv1.1.len();
        let c2 = conv2.1.len();
        let hidden = fc1.1.len();
        let classes = fc2.1.len();
        let flat = (h / 4) * (w / 4) * c2;
        if conv1.0.len() != 9 * c_in * c1
            || conv2.0.len() != 9 * c1 * c2
            || fc1.0.len() != hidden * flat
            || fc2.0.len() != classes * hidden
        {
            anyhow::bail!("inconsistent weight sizes for the inference path");
        }
        Ok(FastNet {
            h,
            w,
            c_in,
            c1,
            c2,
            hidden,
            classes,
            conv1_w: conv1.0,
            conv1_b: conv1.1,
            conv2_blocks: Arc::new((Vec::new(), c2)),
            conv2_w: conv2.0,
            conv2_b: conv2.1,
            fc1_p: Arc::new(direct::Packed::new(&fc1.0, hidden, flat)),
            fc2_p: Arc::new(direct::Packed::new(&fc2.0, classes, hidden)),
            fc1_w: fc1.0,
            fc1_b: fc1.1,
            fc2_w: fc2.0,
            fc2_b: fc2.1,
            level: SimdLevel::Portable,
        }
        .at_level(simd_level()))
    }

    /// This network at `level` (or the best supported level below it), with the layer-2
    /// weights padded for that level's blocks.
    fn at_level(mut self, level: SimdLevel) -> FastNet {
        self.set_level(level);
        self
    }

    /// The SIMD level whose kernels run.
    pub(crate) fn level(&self) -> SimdLevel {
        self.level
    }

    /// Runs the kernels of `level`, or of the best level below it the CPU supports;
    /// returns the level set.
    pub(crate) fn set_level(&mut self, level: SimdLevel) -> SimdLevel {
        self.level = level.or_supported();
        let block = match self.level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => AVX512_NV.1 * Avx512::N,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => AVX2_NV.1 * Avx2::N,
            _ => 1,
        };
        let packed = direct::pack_blocks(&self.conv2_w, self.c2, block);
        self.conv2_blocks = Arc::new((packed, block));
        self.level
    }

    /// Floats per input image (CHW).
    fn input_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// Length of the flattened layer-2 output, the first linear layer's input.
    fn flat(&self) -> usize {
        (self.h / 4) * (self.w / 4) * self.c2
    }

    /// Logits `(n, classes)` for `n` CHW images concatenated in `inputs`.
    pub(crate) fn logits(&self, inputs: &[f32], n: usize) -> Vec<f32> {
        let len = self.input_len();
        assert_eq!(inputs.len(), n * len, "inputs must hold n images");
        let flat = self.flat();
        let mut features = vec![0f32; n * flat];
        let threads = rayon::current_num_threads().max(1);
        let chunk = CHUNK.min(n.div_ceil(threads)).max(1);
        let mut hidden = vec![0f32; n * self.hidden];
        if self.splits_rows(n, threads) {
            // One image at a time, in one fork-join: each thread computes layer 1 whole
            // (a twentieth of the work), a share of layer 2's pooled rows (as evenly as
            // whole rows allow), and the hidden layer's sums over just those features,
            // reading only their share of its weights; the sums are added up here.
            let h2 = self.h / 4;
            let per = h2.div_ceil(threads);
            let row_len = flat / h2;
            for ((img, f), hd) in inputs
                .chunks_exact(len)
                .zip(features.chunks_exact_mut(flat))
                .zip(hidden.chunks_exact_mut(self.hidden))
            {
                let partial_sums: Vec<Vec<f32>> = f
                    .par_chunks_mut(per * row_len)
                    .enumerate()
                    .map(|(i, part)| {
                        let rows = i * per..(i * per + part.len() / row_len);
                        self.conv_rows(img, rows, part);
                        let mut sums = vec![0f32; self.hidden];
                        let ks = i * per * row_len..i * per * row_len + part.len();
                        self.linear_simd(part, &self.fc1_p, ks, &mut sums);
                        sums
                    })
                    .collect();
                for sums in &partial_sums {
                    for (v, s) in hd.iter_mut().zip(sums) {
                        *v += s;
                    }
                }
                self.fc1_bias_relu(hd);
            }
        } else {
            if n <= chunk {
                self.conv_chunk(inputs, &mut features);
            } else {
                features
                    .par_chunks_mut(chunk * flat)
                    .zip(inputs.par_chunks(chunk * len))
                    .for_each(|(f, x)| self.conv_chunk(x, f));
            }
            // Hidden layer: (n × flat) · fc1ᵀ, then bias and ReLU, in tasks of at most 64
            // rows and at least one per thread (a small batch would otherwise leave a core
            // idle through the layer that reads the most weights).
            let rows_per_task = n.div_ceil(threads).clamp(1, 64);
            if n > rows_per_task && threads > 1 {
                hidden
                    .par_chunks_mut(rows_per_task * self.hidden)
                    .zip(features.par_chunks(rows_per_task * flat))
                    .for_each(|(hd, f)| self.fc1(f, hd));
            } else {
                self.fc1(&features, &mut hidden);
            }
        }
        let mut logits = vec![0f32; n * self.classes];
        if n > 0 {
            self.linear(&hidden, &self.fc2_p, &self.fc2_w, &mut logits);
        }
        for row in logits.chunks_exact_mut(self.classes) {
            for (v, b) in row.iter_mut().zip(&self.fc2_b) {
                *v += b;
            }
        }
        logits
    }

    /// The hidden layer for some rows of features.
    fn fc1(&self, features: &[f32], hidden: &mut [f32]) {
        if features.is_empty() {
            return;
        }
        self.linear(features, &self.fc1_p, &self.fc1_w, hidden);
        self.fc1_bias_relu(hidden);
    }

    /// Adds the hidden layer's bias to rows of its sums and applies ReLU.
    fn fc1_bias_relu(&self, hidden: &mut [f32]) {
        for row in hidden.chunks_exact_mut(self.hidden) {
            for (v, b) in row.iter_mut().zip(&self.fc1_b) {
                *v = (*v + b).max(0.0);
            }
        }
    }

    /// `out = x · wᵀ` for a linear layer (`packed` and `w` are its weights, repacked and
    /// as stored): the SIMD level's [`direct::linear`], or `gemm` on the portable path.
    fn linear(&self, x: &[f32], packed: &direct::Packed, w: &[f32], out: &mut [f32]) {
        match self.level {
            SimdLevel::Portable => {
                let (n, k) = (packed.n, packed.k);
                sgemm(x.len() / k, n, k, out, false, x, k, 1, w, 1, k);
            }
            _ => self.linear_simd(x, packed, 0..packed.k, out),
        }
    }

    /// The SIMD level's [`direct::linear`] over the inputs `ks` of the layer (`x` holds
    /// just those columns). The portable path uses `gemm` instead, and reaches this only
    /// on plain lanes if ever asked.
    fn linear_simd(&self, x: &[f32], packed: &direct::Packed, ks: Range<usize>, out: &mut [f32]) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `level` is only ever set by `set_level`, to a level the CPU
            // supports (`or_supported`): here AVX-512F, AVX2 and FMA.
            SimdLevel::Avx512 => unsafe { linear_avx512(x, packed, ks, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above: the CPU has AVX2 and FMA.
            SimdLevel::Avx2 => unsafe { linear_avx2(x, packed, ks, out) },
            // SAFETY: portable lanes are plain Rust and need no CPU feature; `linear`
            // checks the slice lengths itself.
            _ => unsafe { direct::linear::<crate::simd::Portable, 1, 8, 2>(x, packed, ks, out) },
        }
    }

    /// Whether a batch too small to give every thread an image has each image's rows
    /// split over the threads instead (the SIMD paths, for images of enough rows).
    fn splits_rows(&self, n: usize, threads: usize) -> bool {
        n < threads && self.level != SimdLevel::Portable && self.h / 4 >= threads
    }
}

/// The hand-written SIMD kernels, each written once over [`Lanes`] and
/// a block of `NV` registers of output channels; [`FastNet::conv_chunk`] and the training
/// op of `crate::ops` run them monomorphised for AVX-512 or AVX2 inside
/// `#[target_feature]` wrappers (see each caller's kernel table), the training op also on
/// portable lanes.
///
/// They live in files by concern ([`infer`], [`linear`], [`grad`], [`lanes`]); this
/// module gathers them under the one name their callers (here and in `crate::ops`) use.
// Elsewhere than on x86-64 some run only in tests (with portable lanes).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]
pub(crate) mod direct {
    pub(crate) use super::grad::{routed_input_grad, routed_weight_grad, RoutedGrads};
    pub(crate) use super::infer::conv2_tiles;
    pub(super) use super::infer::{conv1_pool_relu, conv2_pool_relu};
    pub(crate) use super::lanes::pack_blocks;
    pub(super) use super::linear::{linear, Packed};
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::model::{ModelMetadata, Net, Normalization};
    use crate::reference::{conv_weight_from_oihw, rel_err};
    use crate::simd::SimdLevel;
    use crate::Classifier;

    /// A classifier with random weights for `(h, w, c_in)` inputs.
    fn random_classifier(
        (h, w, c_in): (usize, usize, usize),
        (c1, c2, hidden, classes): (usize, usize, usize, usize),
    ) -> candle_core::Result<Classifier> {
        let dev = Device::Cpu;
        let r = |shape: &[usize], s: f64| Tensor::randn(0f32, s as f32, shape, &dev);
        let flat = (h / 4) * (w / 4) * c2;
        let net = Net {
            conv1_w: conv_weight_from_oihw(&r(&[c1, c_in, 3, 3], 0.5)?)?,
            conv1_b: r(&[c1], 0.3)?,
            conv2_w: conv_weight_from_oihw(&r(&[c2, c1, 3, 3], 0.1)?)?,
            conv2_b: r(&[c2], 0.3)?,
            fc1_w: r(&[hidden, flat], 0.05)?,
            fc1_b: r(&[hidden], 0.3)?,
            fc2_w: r(&[classes, hidden], 0.2)?,
            fc2_b: r(&[classes], 0.3)?,
        };
        let meta = ModelMetadata {
            name: "test".into(),
            version: "0".into(),
            input_width: w as u32,
            input_height: h as u32,
            input_channels: c_in as u32,
            normalization: Normalization {
                mean: vec![0.0; c_in],
                std: vec![1.0; c_in],
            },
            class_names: (0..classes).map(|i| format!("c{i}")).collect(),
            class_dirs: (0..classes).map(|i| format!("c{i}")).collect(),
            tensor_layout: "NHWC".into(),
            ..ModelMetadata::default()
        };
        Ok(Classifier::from_parts(meta, net).expect("consistent shapes"))
    }

    /// The fast path against the candle forward pass (whose layer op is tested against the
    /// reference in `ops`), on random weights and inputs of several shapes,
    /// batch sizes around the chunk size, and odd sizes that pooling truncates.
    #[test]
    fn fast_path_matches_candle() -> candle_core::Result<()> {
        for (input, layers, n) in [
            ((28, 28, 1), (32, 64, 128, 10), 1),
            ((28, 28, 1), (32, 64, 128, 10), 19),
            ((9, 11, 3), (5, 7, 6, 3), 4),
            ((16, 12, 3), (20, 24, 16, 5), 33),
            ((7, 7, 1), (17, 1, 4, 2), 2),
        ] {
            let clf = random_classifier(input, layers)?;
            let len = clf.input_len();
            let x = Tensor::randn(0f32, 1.0, n * len, &Device::Cpu)?.to_dtype(DType::F32)?;
            let x = x.to_vec1::<f32>()?;
            let fast = clf.predict(&x, n).expect("fast");
            let reference = clf.predict_candle(&x, n).expect("candle");
            let fast_logits = clf.fast_net().logits(&x, n);
            let ref_logits = clf.logits_candle(&x, n).expect("candle logits");
            let e = rel_err(&fast_logits, &ref_logits);
            assert!(e < 1e-4, "{input:?} {layers:?} n={n}: logits rel err {e}");
            let e = rel_err(&fast.concat(), &reference.concat());
            assert!(e < 1e-4, "{input:?} {layers:?} n={n}: probs rel err {e}");
            for level in SimdLevel::supported() {
                let mut at = clf.fast_net().clone();
                assert_eq!(at.set_level(level), level);
                let e = rel_err(&at.logits(&x, n), &ref_logits);
                assert!(
                    e < 1e-4,
                    "{input:?} {layers:?} n={n}: {level} logits rel err {e}"
                );
            }
        }
        Ok(())
    }
}
