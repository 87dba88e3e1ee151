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
//!   ([`simd::conv1_pool_relu`]), writing into a zero-padded buffer for layer 2;
//! - layer 2 is a direct convolution too ([`simd::conv2_pool_relu`]): the inputs of one
//!   output pixel's kernel row are `3 · c1` contiguous floats of the padded buffer, so no
//!   im2col copy and no `gemm` packing; the four outputs of each pooling window stay in
//!   registers, are pooled there, and only the pooled, biased, rectified features are
//!   written, straight into the flattened `(h, w, c)` order of the linear layer;
//! - the linear layers run over the whole batch with `gemm` (in tasks of 64 rows).
//!
//! Bias is added after pooling: `max(a + b) = max(a) + b` holds exactly in floating point,
//! as rounding `x + b` is monotonic in `x`; on Fashion-MNIST's test set the probabilities
//! come out bit-for-bit equal to the candle path's. The AVX-512 kernels are picked at run
//! time (the crate is built for baseline x86-64); other CPUs take a portable path (direct
//! layer 1, im2col + `gemm` for layer 2, with the im2col and pooling of [`crate::kernels`]).
//! Tests compare the layer kernels with `reference` and both paths with the candle
//! forward pass.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::kernels::{fmax, im2col, max_pool2_relu, sgemm};

/// Images per chunk (the unit of work of one rayon task): small enough that a batch of 16
/// keeps both cores busy, large enough to amortise the task overhead. On the portable path
/// a chunk's layer-2 patches (`CHUNK · 196 · 288` floats for 28×28 inputs, 1.8 MB) stay
/// within one core's L2 cache.
pub(crate) const CHUNK: usize = 8;

/// Whether the CPU runs the AVX-512 kernels.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

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
    /// `(hidden, flat)`.
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    /// `(classes, hidden)`.
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
    /// Whether to run the AVX-512 kernels (the CPU has them; tests turn it off to check
    /// the portable path too).
    pub(crate) avx512: bool,
}

/// Per-thread buffers, reused across chunks and calls.
#[derive(Default)]
struct Scratch {
    /// The geometry the buffers were laid out for (`(h, w, c_in, c1, c2)`).
    key: (usize, usize, usize, usize, usize),
    /// One zero-padded HWC input image, `(h+2) · (w+2) · c_in`.
    pad0: Vec<f32>,
    /// The chunk's zero-padded layer-1 outputs, `CHUNK · (h1+2) · (w1+2) · c1`.
    pad1: Vec<f32>,
    /// The chunk's layer-2 patches, `CHUNK · h1 · w1 · 9 · c1`.
    patches: Vec<f32>,
    /// The chunk's layer-2 outputs before pooling, `CHUNK · h1 · w1 · c2`.
    conv2: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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
            conv2_w: conv2.0,
            conv2_b: conv2.1,
            fc1_w: fc1.0,
            fc1_b: fc1.1,
            fc2_w: fc2.0,
            fc2_b: fc2.1,
            avx512: has_avx512(),
        })
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
        if n <= chunk {
            self.conv_chunk(inputs, &mut features);
        } else {
            features
                .par_chunks_mut(chunk * flat)
                .zip(inputs.par_chunks(chunk * len))
                .for_each(|(f, x)| self.conv_chunk(x, f));
        }
        // Hidden layer: (n × flat) · fc1ᵀ, then bias and ReLU.
        let mut hidden = vec![0f32; n * self.hidden];
        let rows_per_task = 64;
        if n > rows_per_task && threads > 1 {
            hidden
                .par_chunks_mut(rows_per_task * self.hidden)
                .zip(features.par_chunks(rows_per_task * flat))
                .for_each(|(hd, f)| self.fc1(f, hd));
        } else {
            self.fc1(&features, &mut hidden);
        }
        let mut logits = vec![0f32; n * self.classes];
        if n > 0 {
            sgemm(
                n,
                self.classes,
                self.hidden,
                &mut logits,
                false,
                &hidden,
                self.hidden,
                1,
                &self.fc2_w,
                1,
                self.hidden,
            );
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
        let flat = self.flat();
        let m = features.len() / flat;
        if m == 0 {
            return;
        }
        sgemm(
            m,
            self.hidden,
            flat,
            hidden,
            false,
            features,
            flat,
            1,
            &self.fc1_w,
            1,
            flat,
        );
        for row in hidden.chunks_exact_mut(self.hidden) {
            for (v, b) in row.iter_mut().zip(&self.fc1_b) {
                *v = (*v + b).max(0.0);
            }
        }
    }

    /// Both convolution layers for a chunk of images, writing their flattened features.
    fn conv_chunk(&self, inputs: &[f32], features: &mut [f32]) {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            self.layout(&mut s);
            #[cfg(target_arch = "x86_64")]
            {
                if self.avx512 {
                    // SAFETY: `avx512` is only true when the CPU has AVX-512F.
                    return unsafe { self.conv_chunk_avx512(inputs, features, &mut s) };
                }
            }
            self.conv_chunk_generic::<false>(inputs, features, &mut s)
        })
    }

    /// Sizes the scratch buffers for this network (zeroing them, which sets the padding
    /// borders that nothing writes afterwards) unless they already fit.
    fn layout(&self, s: &mut Scratch) {
        let key = (self.h, self.w, self.c_in, self.c1, self.c2);
        if s.key == key && !s.pad0.is_empty() {
            return;
        }
        let (h1, w1) = (self.h / 2, self.w / 2);
        s.key = key;
        s.pad0 = vec![0.0; (self.h + 2) * (self.w + 2) * self.c_in];
        s.pad1 = vec![0.0; CHUNK * (h1 + 2) * (w1 + 2) * self.c1];
        s.patches = vec![0.0; CHUNK * h1 * w1 * 9 * self.c1];
        s.conv2 = vec![0.0; CHUNK * h1 * w1 * self.c2];
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn conv_chunk_avx512(&self, inputs: &[f32], features: &mut [f32], s: &mut Scratch) {
        self.conv_chunk_generic::<true>(inputs, features, s)
    }

    /// The body of [`FastNet::conv_chunk`]; `AVX512` selects the AVX-512 kernels (only
    /// called from [`FastNet::conv_chunk_avx512`], which checked the CPU has them).
    #[inline(always)]
    fn conv_chunk_generic<const AVX512: bool>(
        &self,
        inputs: &[f32],
        features: &mut [f32],
        s: &mut Scratch,
    ) {
        let (h, w, c_in, c1, c2) = (self.h, self.w, self.c_in, self.c1, self.c2);
        let (h1, w1) = (h / 2, w / 2);
        let (h2, w2) = (h1 / 2, w1 / 2);
        let len = self.input_len();
        let m = inputs.len() / len;
        let pad1_len = (h1 + 2) * (w1 + 2) * c1;
        let k2 = 9 * c1;
        let rows = h1 * w1;
        for (i, img) in inputs.chunks_exact(len).enumerate() {
            // CHW → zero-padded HWC (the border stays zero from `layout`).
            for ch in 0..c_in {
                for y in 0..h {
                    let src = &img[(ch * h + y) * w..][..w];
                    let dst = &mut s.pad0[((y + 1) * (w + 2) + 1) * c_in..];
                    for (x, v) in src.iter().enumerate() {
                        dst[x * c_in + ch] = *v;
                    }
                }
            }
            let pad1 = &mut s.pad1[i * pad1_len..][..pad1_len];
            let geometry = (h, w, c_in);
            #[cfg(target_arch = "x86_64")]
            if AVX512 {
                // SAFETY: AVX512 is only true inside `conv_chunk_avx512`.
                unsafe {
                    simd::conv1_pool_relu(&s.pad0, geometry, &self.conv1_w, &self.conv1_b, pad1)
                };
            } else {
                conv1_pool_relu(&s.pad0, geometry, &self.conv1_w, &self.conv1_b, pad1);
            }
            #[cfg(not(target_arch = "x86_64"))]
            conv1_pool_relu(&s.pad0, geometry, &self.conv1_w, &self.conv1_b, pad1);
            #[cfg(target_arch = "x86_64")]
            if AVX512 {
                let flat = h2 * w2 * c2;
                let out = &mut features[i * flat..][..flat];
                // SAFETY: AVX512 is only true inside `conv_chunk_avx512`.
                unsafe {
                    simd::conv2_pool_relu(pad1, (h1, w1, c1), &self.conv2_w, &self.conv2_b, out)
                };
                continue;
            }
            // im2col over the padded layer-1 output.
            im2col(
                pad1,
                (h1, w1, c1),
                &mut s.patches[i * rows * k2..][..rows * k2],
            );
        }
        if AVX512 {
            return;
        }
        let conv2 = &mut s.conv2[..m * rows * c2];
        sgemm(
            m * rows,
            c2,
            k2,
            conv2,
            false,
            &s.patches[..m * rows * k2],
            k2,
            1,
            &self.conv2_w,
            c2,
            1,
        );
        let flat = h2 * w2 * c2;
        for (conv, out) in conv2
            .chunks_exact(rows * c2)
            .zip(features.chunks_exact_mut(flat))
        {
            max_pool2_relu(conv, (h1, w1, c2), Some(&self.conv2_b), out);
        }
    }
}

/// Layer 1 fused: 3×3 convolution (stride 1, the padding already in `pad`), 2×2
/// max-pool, bias, ReLU. `pad` is one zero-padded HWC image `(h+2, w+2, c_in)`; the
/// pooled `(h/2, w/2, c1)` result goes into the interior of `out`, itself padded by one
/// pixel for layer 2. `wt` is `(9 * c_in, c1)` with rows `(ky, kx, ci)`. Portable version
/// of [`simd::conv1_pool_relu`].
fn conv1_pool_relu(
    pad: &[f32],
    (h, w, c_in): (usize, usize, usize),
    wt: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let c1 = bias.len();
    let (h1, w1) = (h / 2, w / 2);
    let pw = w + 2;
    let mut acc = vec![0f32; 4 * c1];
    for py in 0..h1 {
        for px in 0..w1 {
            acc.fill(0.0);
            for (q, a) in acc.chunks_exact_mut(c1).enumerate() {
                let (y, x) = (2 * py + q / 2, 2 * px + q % 2);
                for ky in 0..3 {
                    for kx in 0..3 {
                        for ci in 0..c_in {
                            let v = pad[((y + ky) * pw + x + kx) * c_in + ci];
                            let wr = &wt[((ky * 3 + kx) * c_in + ci) * c1..][..c1];
                            for (a, wv) in a.iter_mut().zip(wr) {
                                *a += v * wv;
                            }
                        }
                    }
                }
            }
            let dst = &mut out[((py + 1) * (w1 + 2) + px + 1) * c1..][..c1];
            for o in 0..c1 {
                let m = fmax(
                    fmax(acc[o], acc[c1 + o]),
                    fmax(acc[2 * c1 + o], acc[3 * c1 + o]),
                );
                dst[o] = fmax(m + bias[o], 0.0);
            }
        }
    }
}

/// AVX-512 versions of the hand-written kernels.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// The slice lengths the raw reads and writes of a kernel rely on: `pad` holds one
    /// zero-padded `(h, w, c_in)` image, `wt` a `(9 * c_in, c_out)` matrix, `out` at least
    /// `out_len` floats. Panics otherwise.
    fn assert_lengths(
        pad: &[f32],
        (h, w, c_in): (usize, usize, usize),
        wt: &[f32],
        c_out: usize,
        out: &[f32],
        out_len: usize,
    ) {
        assert!(
            pad.len() >= (h + 2) * (w + 2) * c_in,
            "padded input too short"
        );
        assert!(wt.len() >= 9 * c_in * c_out, "weights too short");
        assert!(out.len() >= out_len, "output too short");
    }

    /// Layer 2 fused, without im2col: 3×3 convolution over the zero-padded layer-1 output
    /// `pad` (`(h1+2, w1+2, c1)`), 2×2 max-pool, bias, ReLU, into `out` (`(h1/2, w1/2, c2)`).
    ///
    /// For each pooling window and block of 64 output channels, 16 registers accumulate
    /// the window's four conv outputs (4 × 4 vectors of 16 channels); each step over the
    /// reduction (kernel row, then the `3 · c1` contiguous inputs of that row) loads 4
    /// weight vectors and broadcasts 4 inputs into 16 fused multiply-adds. The
    /// accumulators are pooled in registers, so the conv output never reaches memory.
    /// Channels beyond `c2` in the last block are masked off.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Slice lengths are checked (panics, not UB).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn conv2_pool_relu(
        pad: &[f32],
        (h1, w1, c1): (usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let c2 = bias.len();
        let (h2, w2) = (h1 / 2, w1 / 2);
        let pw = w1 + 2;
        let run = 3 * c1;
        assert_lengths(pad, (h1, w1, c1), wt, c2, out, h2 * w2 * c2);
        let zero = _mm512_setzero_ps();
        let mut cb = 0;
        while cb < c2 {
            let lane_mask = |v: usize| -> __mmask16 {
                let lanes = c2.saturating_sub(cb + 16 * v).min(16);
                ((1u32 << lanes) - 1) as u16
            };
            let m = [lane_mask(0), lane_mask(1), lane_mask(2), lane_mask(3)];
            for py in 0..h2 {
                for px in 0..w2 {
                    let mut acc = [[zero; 4]; 4];
                    // Top-left input of the window's first conv output.
                    let base = (2 * py * pw + 2 * px) * c1;
                    for ky in 0..3 {
                        // SAFETY (all raw reads): the furthest input read is
                        // base + (ky + 1) * pw * c1 + c1 + run - 1 < (h1 + 2) * pw * c1, as
                        // 2 * py + 1 + 2 <= h1 + 1 and 2 * px + 1 + 3 <= w1 + 2; weight rows
                        // k < 9 * c1 and lanes masked to cb + 16 * v + lane < c2.
                        let p = pad.as_ptr().add(base + ky * pw * c1);
                        let q = [p, p.add(c1), p.add(pw * c1), p.add((pw + 1) * c1)];
                        let wrow = wt.as_ptr().add(ky * run * c2 + cb);
                        for j in 0..run {
                            let wp = wrow.add(j * c2);
                            let wv = [
                                _mm512_maskz_loadu_ps(m[0], wp),
                                _mm512_maskz_loadu_ps(m[1], wp.add(16)),
                                _mm512_maskz_loadu_ps(m[2], wp.add(32)),
                                _mm512_maskz_loadu_ps(m[3], wp.add(48)),
                            ];
                            for (a, qp) in acc.iter_mut().zip(q) {
                                let x = _mm512_set1_ps(*qp.add(j));
                                for (av, w) in a.iter_mut().zip(wv) {
                                    *av = _mm512_fmadd_ps(x, w, *av);
                                }
                            }
                        }
                    }
                    let o = out.as_mut_ptr().add((py * w2 + px) * c2 + cb);
                    for v in 0..4 {
                        let mx = _mm512_max_ps(
                            _mm512_max_ps(acc[0][v], acc[1][v]),
                            _mm512_max_ps(acc[2][v], acc[3][v]),
                        );
                        let b = _mm512_maskz_loadu_ps(m[v], bias.as_ptr().add(cb + 16 * v));
                        let r = _mm512_max_ps(_mm512_add_ps(mx, b), zero);
                        _mm512_mask_storeu_ps(o.add(16 * v), m[v], r);
                    }
                }
            }
            cb += 64;
        }
    }

    /// [`super::conv1_pool_relu`] with 16 output channels per register: for each pooling
    /// window and block of 16 channels, four accumulators (the window's four conv
    /// outputs) take one fused multiply-add per kernel tap and input channel. A tail of
    /// fewer than 16 channels uses masked loads and stores.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Slice lengths are checked (panics, not UB).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn conv1_pool_relu(
        pad: &[f32],
        (h, w, c_in): (usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let c1 = bias.len();
        let (h1, w1) = (h / 2, w / 2);
        let pw = w + 2;
        let k = 9 * c_in;
        assert_lengths(pad, (h, w, c_in), wt, c1, out, (h1 + 2) * (w1 + 2) * c1);
        // Offsets in `pad` of each tap, relative to a conv output's top-left input.
        let taps: Vec<usize> = (0..k)
            .map(|t| ((t / (3 * c_in)) * pw + (t / c_in) % 3) * c_in + t % c_in)
            .collect();
        let zero = _mm512_setzero_ps();
        let mut cb = 0;
        while cb < c1 {
            let lanes = (c1 - cb).min(16);
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            let b = _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(cb));
            for py in 0..h1 {
                for px in 0..w1 {
                    let base = (2 * py * pw + 2 * px) * c_in;
                    let p = pad.as_ptr().add(base);
                    let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
                    for (t, &off) in taps.iter().enumerate() {
                        // SAFETY (all raw reads): base + off + (pw + 1) * c_in is within
                        // `pad` since 2 * py + 1 + 2 <= h + 1 and 2 * px + 1 + 2 <= w + 1;
                        // the weight row t * c1 + cb + lanes <= k * c1.
                        let wv = _mm512_maskz_loadu_ps(mask, wt.as_ptr().add(t * c1 + cb));
                        let q = p.add(off);
                        a0 = _mm512_fmadd_ps(_mm512_set1_ps(*q), wv, a0);
                        a1 = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(c_in)), wv, a1);
                        a2 = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(pw * c_in)), wv, a2);
                        a3 = _mm512_fmadd_ps(_mm512_set1_ps(*q.add((pw + 1) * c_in)), wv, a3);
                    }
                    let m = _mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3));
                    let r = _mm512_max_ps(_mm512_add_ps(m, b), zero);
                    let o = ((py + 1) * (w1 + 2) + px + 1) * c1 + cb;
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(o), mask, r);
                }
            }
            cb += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::kernels::pad_image;
    use crate::model::{ModelMetadata, Net, Normalization};
    use crate::reference::{self, conv_weight_from_oihw, rel_err};
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
            architecture: String::new(),
            input_width: w as u32,
            input_height: h as u32,
            input_channels: c_in as u32,
            normalization: Normalization {
                mean: vec![0.0; c_in],
                std: vec![1.0; c_in],
            },
            invert: false,
            class_names: (0..classes).map(|i| format!("c{i}")).collect(),
            class_dirs: (0..classes).map(|i| format!("c{i}")).collect(),
            dataset: String::new(),
            test_accuracy: 0.0,
            test_samples: 0,
            training_seconds: 0.0,
            epochs: 0,
            command: String::new(),
            seed: 0,
            batch_size: 0,
            learning_rate: 0.0,
            tensor_layout: "NHWC".into(),
            created_at_unix: 0,
        };
        Ok(Classifier::from_parts(meta, net).expect("consistent shapes"))
    }

    /// The layer kernels (both AVX-512 ones, when the CPU has them, and the portable
    /// layer 1) against the reference layer on random inputs.
    #[test]
    fn layer_kernels_match_reference() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (h, w, c_in, c_out) in [
            (28, 28, 1, 32),
            (14, 14, 32, 64),
            (7, 9, 3, 5),
            (10, 6, 5, 70),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, h, w, c_in), &dev)?;
            let wt = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 0.5, c_out, &dev)?;
            let reference = reference::conv3x3_pool2_relu(&x, &wt, &b)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut pad = vec![0f32; (h + 2) * (w + 2) * c_in];
            pad_image(&x.flatten_all()?.to_vec1::<f32>()?, (h, w, c_in), &mut pad);
            let wk = conv_weight_from_oihw(&wt)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bv = b.to_vec1::<f32>()?;
            let (h1, w1) = (h / 2, w / 2);
            let interior = |padded_out: &[f32]| -> Vec<f32> {
                (0..h1)
                    .flat_map(|y| {
                        padded_out[((y + 1) * (w1 + 2) + 1) * c_out..][..w1 * c_out].to_vec()
                    })
                    .collect()
            };
            let check = |ours: &[f32], what: &str| {
                let e = rel_err(ours, &reference);
                assert!(e < 1e-4, "{what} {h}x{w}x{c_in}->{c_out}: rel err {e}");
            };
            let mut out = vec![0f32; (h1 + 2) * (w1 + 2) * c_out];
            super::conv1_pool_relu(&pad, (h, w, c_in), &wk, &bv, &mut out);
            check(&interior(&out), "portable layer 1");
            #[cfg(target_arch = "x86_64")]
            if super::has_avx512() {
                let mut out = vec![0f32; (h1 + 2) * (w1 + 2) * c_out];
                // SAFETY: the CPU has AVX-512F.
                unsafe { super::simd::conv1_pool_relu(&pad, (h, w, c_in), &wk, &bv, &mut out) };
                check(&interior(&out), "AVX-512 layer 1");
                let mut out = vec![0f32; h1 * w1 * c_out];
                // SAFETY: as above.
                unsafe { super::simd::conv2_pool_relu(&pad, (h, w, c_in), &wk, &bv, &mut out) };
                check(&out, "AVX-512 layer 2");
            }
        }
        Ok(())
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
            let fast_logits = clf.fast.logits(&x, n);
            let ref_logits = clf.logits_candle(&x, n).expect("candle logits");
            let e = rel_err(&fast_logits, &ref_logits);
            assert!(e < 1e-4, "{input:?} {layers:?} n={n}: logits rel err {e}");
            let e = rel_err(&fast.concat(), &reference.concat());
            assert!(e < 1e-4, "{input:?} {layers:?} n={n}: probs rel err {e}");
            let mut portable = (*clf.fast).clone();
            portable.avx512 = false;
            let e = rel_err(&portable.logits(&x, n), &ref_logits);
            assert!(
                e < 1e-4,
                "{input:?} {layers:?} n={n}: portable logits rel err {e}"
            );
        }
        Ok(())
    }
}
