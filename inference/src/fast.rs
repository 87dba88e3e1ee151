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
//!   written, straight into the flattened `(h, w, c)` order of the linear layer. Where
//!   registers are few (AVX2: 16), [`direct::conv2_tiles`] holds 6 positions × 2
//!   registers of accumulators instead and pools afterwards (the kernel table picks);
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

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::{fmax, im2col, max_pool2_relu, sgemm};
use crate::simd::{simd_level, SimdLevel};
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512, Lanes};

/// Images per chunk (the unit of work of one rayon task): small enough that a batch of 16
/// keeps both cores busy, large enough to amortise the task overhead. On the portable path
/// a chunk's layer-2 patches (`CHUNK · 196 · 288` floats for 28×28 inputs, 1.8 MB) stay
/// within one core's L2 cache.
pub(crate) const CHUNK: usize = 8;

/// The kernel table: registers of output channels per block (`NV`) of the two direct
/// convolutions at each SIMD level, `(layer 1, layer 2)`. Each block keeps `4 · NV`
/// accumulators (the four conv outputs of a pooling window) in registers: AVX-512 has 32
/// registers, AVX2 16. The same generic kernels of [`direct`] run at every level.
///
/// `NV` of layers 1 and 2 with AVX-512 (32 and 64 channels per block).
#[cfg(target_arch = "x86_64")]
const AVX512_NV: (usize, usize) = (2, 4);
/// `NV` of layers 1 and 2 with AVX2 (16 and 16 channels per block).
#[cfg(target_arch = "x86_64")]
const AVX2_NV: (usize, usize) = (2, 2);
/// Output positions per layer-2 tile at each level: 0 runs [`direct::conv2_pool_relu`]
/// (the four positions of a pooling window, pooled in registers), more runs
/// [`direct::conv2_tiles`] (that many positions, pooled afterwards). AVX-512's 32
/// registers fit 4 × 4 accumulators; AVX2's 16 fit 6 × 2 but not 4 × 3 with loads.
#[cfg(target_arch = "x86_64")]
const AVX512_R2: usize = 0;
/// See [`AVX512_R2`].
#[cfg(target_arch = "x86_64")]
const AVX2_R2: usize = 6;
/// The linear layers' tiles, `(R, NVC, KU)` of [`direct::linear`]: AVX-512 8 rows × 2
/// registers (16 accumulators), AVX2 6 rows × 2 registers (12, the classic 6 × 16 AVX2
/// gemm tile: with the 2 weight registers and a broadcast it fills the 16 registers
/// without spilling); single rows with 4 accumulator sets (8 chains).
#[cfg(target_arch = "x86_64")]
const AVX512_FC: (usize, usize, usize) = (8, 2, 4);
/// See [`AVX512_FC`].
#[cfg(target_arch = "x86_64")]
const AVX2_FC: (usize, usize, usize) = (6, 2, 4);

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
            // SAFETY: `level` is only ever set to a level the CPU supports.
            SimdLevel::Avx512 => unsafe { linear_avx512(x, packed, ks, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { linear_avx2(x, packed, ks, out) },
            // SAFETY: plain Rust lanes.
            _ => unsafe { direct::linear::<crate::simd::Portable, 1, 8, 2>(x, packed, ks, out) },
        }
    }

    /// Both convolution layers for a chunk of images, writing their flattened features.
    fn conv_chunk(&self, inputs: &[f32], features: &mut [f32]) {
        self.conv_rows(inputs, 0..self.h / 4, features);
    }

    /// Both convolution layers for a chunk of images, writing only the pooled layer-2
    /// rows `rows` (of `h / 4`) of each image's features. The portable path computes
    /// every row (it is only asked for all of them: see [`FastNet::splits_rows`]).
    fn conv_rows(&self, inputs: &[f32], rows: Range<usize>, features: &mut [f32]) {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            self.layout(&mut s);
            match self.level {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `level` is only ever set to a level the CPU supports.
                SimdLevel::Avx512 => unsafe {
                    self.conv_chunk_avx512(inputs, rows, features, &mut s)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                SimdLevel::Avx2 => unsafe { self.conv_chunk_avx2(inputs, rows, features, &mut s) },
                _ => self.conv_chunk_portable(inputs, features, &mut s),
            }
        })
    }

    /// Whether a batch too small to give every thread an image has each image's rows
    /// split over the threads instead (the SIMD paths, for images of enough rows).
    fn splits_rows(&self, n: usize, threads: usize) -> bool {
        n < threads && self.level != SimdLevel::Portable && self.h / 4 >= threads
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

    /// [`FastNet::conv_simd`] with the AVX-512 kernels.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn conv_chunk_avx512(
        &self,
        inputs: &[f32],
        rows: Range<usize>,
        features: &mut [f32],
        s: &mut Scratch,
    ) {
        self.conv_simd::<Avx512, { AVX512_NV.0 }, AVX512_R2, { AVX512_NV.1 }>(
            inputs, rows, features, s,
        )
    }

    /// [`FastNet::conv_simd`] with the AVX2 kernels.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn conv_chunk_avx2(
        &self,
        inputs: &[f32],
        rows: Range<usize>,
        features: &mut [f32],
        s: &mut Scratch,
    ) {
        self.conv_simd::<Avx2, { AVX2_NV.0 }, AVX2_R2, { AVX2_NV.1 }>(inputs, rows, features, s)
    }

    /// CHW → zero-padded HWC (the border stays zero from `layout`).
    #[inline(always)]
    fn pad_input(&self, img: &[f32], pad0: &mut [f32]) {
        let (h, w, c_in) = (self.h, self.w, self.c_in);
        for ch in 0..c_in {
            for y in 0..h {
                let src = &img[(ch * h + y) * w..][..w];
                let dst = &mut pad0[((y + 1) * (w + 2) + 1) * c_in..];
                for (x, v) in src.iter().enumerate() {
                    dst[x * c_in + ch] = *v;
                }
            }
        }
    }

    /// The body of [`FastNet::conv_chunk`] at a SIMD level: both layers as the direct
    /// kernels of [`direct`], `NV1` and `NV2` registers of output channels per block,
    /// layer 2 in tiles of `R2` positions (0: pooled in registers; see [`AVX512_R2`]).
    ///
    /// # Safety
    /// `S`'s CPU features must be available: only called from the `#[target_feature]`
    /// wrappers above, which the dispatch reaches only on CPUs that have them.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn conv_simd<S: Lanes, const NV1: usize, const R2: usize, const NV2: usize>(
        &self,
        inputs: &[f32],
        rows: Range<usize>,
        features: &mut [f32],
        s: &mut Scratch,
    ) {
        let (h, w, c_in, c1, c2) = (self.h, self.w, self.c_in, self.c1, self.c2);
        let (h1, w1) = (h / 2, w / 2);
        let len = self.input_len();
        let pad1 = &mut s.pad1[..(h1 + 2) * (w1 + 2) * c1];
        for (img, out) in inputs
            .chunks_exact(len)
            .zip(features.chunks_exact_mut(rows.len() * (w1 / 2) * c2))
        {
            self.pad_input(img, &mut s.pad0);
            direct::conv1_pool_relu::<S, NV1>(
                &s.pad0,
                (h, w, c_in),
                &self.conv1_w,
                &self.conv1_b,
                pad1,
            );
            let weights = (&self.conv2_blocks.0[..], self.conv2_blocks.1);
            let (rows, bias) = (rows.clone(), &self.conv2_b[..]);
            if R2 == 0 {
                direct::conv2_pool_relu::<S, NV2>(pad1, (h1, w1, c1), weights, bias, rows, out);
            } else {
                let conv_rows = 2 * rows.len();
                let conv = &mut s.conv2[..conv_rows * w1 * c2];
                let span = 2 * rows.start * w1..2 * rows.end * w1;
                direct::conv2_tiles::<S, R2, NV2>(pad1, (h1, w1, c1), weights, c2, span, conv);
                max_pool2_relu(conv, (conv_rows, w1, c2), Some(bias), out);
            }
        }
    }

    /// The body of [`FastNet::conv_chunk`] without hand-written SIMD: the plain layer 1,
    /// then im2col of the chunk and one `gemm` product for layer 2, pooled afterwards.
    fn conv_chunk_portable(&self, inputs: &[f32], features: &mut [f32], s: &mut Scratch) {
        let (h, w, c_in, c1, c2) = (self.h, self.w, self.c_in, self.c1, self.c2);
        let (h1, w1) = (h / 2, w / 2);
        let (h2, w2) = (h1 / 2, w1 / 2);
        let len = self.input_len();
        let m = inputs.len() / len;
        let pad1_len = (h1 + 2) * (w1 + 2) * c1;
        let k2 = 9 * c1;
        let rows = h1 * w1;
        for (i, img) in inputs.chunks_exact(len).enumerate() {
            self.pad_input(img, &mut s.pad0);
            let pad1 = &mut s.pad1[i * pad1_len..][..pad1_len];
            conv1_pool_relu(&s.pad0, (h, w, c_in), &self.conv1_w, &self.conv1_b, pad1);
            im2col(
                pad1,
                (h1, w1, c1),
                &mut s.patches[i * rows * k2..][..rows * k2],
            );
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

/// [`direct::linear`] with the AVX-512 tiles of the table.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn linear_avx512(x: &[f32], w: &direct::Packed, ks: Range<usize>, out: &mut [f32]) {
    direct::linear::<Avx512, { AVX512_FC.0 }, { AVX512_FC.1 }, { AVX512_FC.2 }>(x, w, ks, out)
}

/// [`direct::linear`] with the AVX2 tiles of the table.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_avx2(x: &[f32], w: &direct::Packed, ks: Range<usize>, out: &mut [f32]) {
    direct::linear::<Avx2, { AVX2_FC.0 }, { AVX2_FC.1 }, { AVX2_FC.2 }>(x, w, ks, out)
}

/// Layer 1 fused: 3×3 convolution (stride 1, the padding already in `pad`), 2×2
/// max-pool, bias, ReLU. `pad` is one zero-padded HWC image `(h+2, w+2, c_in)`; the
/// pooled `(h/2, w/2, c1)` result goes into the interior of `out`, itself padded by one
/// pixel for layer 2. `wt` is `(9 * c_in, c1)` with rows `(ky, kx, ci)`. Portable version
/// of [`direct::conv1_pool_relu`].
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

/// The hand-written SIMD kernels, each written once over [`Lanes`] and a block of `NV`
/// registers of output channels; [`FastNet::conv_chunk`] and the training op of
/// `crate::ops` run them monomorphised for AVX-512 or AVX2 inside `#[target_feature]`
/// wrappers (see each caller's kernel table), the training op also on portable lanes.
// Elsewhere than on x86-64 some run only in tests (with portable lanes).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) mod direct {
    use std::ops::Range;

    use crate::kernels::{Route, NO_ROUTE};
    use crate::simd::Lanes;

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

    /// The lane masks of one block of `NV` registers starting at channel `cb` of `c`.
    #[inline(always)]
    unsafe fn block_masks<S: Lanes, const NV: usize>(c: usize, cb: usize) -> [S::M; NV] {
        let mut m = [S::mask(0); NV];
        for (v, mv) in m.iter_mut().enumerate() {
            *mv = S::mask(c.saturating_sub(cb + v * S::N).min(S::N));
        }
        m
    }

    /// Stores register `v` at `p`, whole when `full`, else only the lanes of mask `m`:
    /// masked moves are far slower on some CPUs (microcoded on AMD Zen), so a full
    /// block of a partly masked loop stores plainly.
    #[inline(always)]
    unsafe fn store_lanes<S: Lanes>(p: *mut f32, m: S::M, full: bool, v: S::V) {
        if full {
            S::store(p, v)
        } else {
            S::store_masked(p, m, v)
        }
    }

    /// Loads `NV` registers from `p`: whole when `FULL`, else only the masked lanes.
    #[inline(always)]
    unsafe fn load_block<S: Lanes, const NV: usize, const FULL: bool>(
        p: *const f32,
        m: &[S::M; NV],
    ) -> [S::V; NV] {
        let mut out = [S::zero(); NV];
        for (v, o) in out.iter_mut().enumerate() {
            *o = if FULL {
                S::load(p.add(v * S::N))
            } else {
                S::load_masked(m[v], p.add(v * S::N))
            };
        }
        out
    }

    /// Max-pools the four conv outputs of a window, adds the bias, applies ReLU and
    /// stores the `NV` registers at `o` (masked unless `FULL`).
    #[inline(always)]
    unsafe fn pool_bias_relu_store<S: Lanes, const NV: usize, const FULL: bool>(
        acc: &[[S::V; NV]; 4],
        bias: &[S::V; NV],
        m: &[S::M; NV],
        o: *mut f32,
    ) {
        for v in 0..NV {
            let mx = S::max(S::max(acc[0][v], acc[1][v]), S::max(acc[2][v], acc[3][v]));
            let r = S::max(S::add(mx, bias[v]), S::zero());
            if FULL {
                S::store(o.add(v * S::N), r);
            } else {
                S::store_masked(o.add(v * S::N), m[v], r);
            }
        }
    }

    /// Layer 2 fused, without im2col: 3×3 convolution over the zero-padded layer-1 output
    /// `pad` (`(h1+2, w1+2, c1)`), 2×2 max-pool, bias, ReLU, into `out` (`(h1/2, w1/2, c2)`).
    ///
    /// For each pooling window and block of `NV` registers of output channels, `4 · NV`
    /// registers accumulate the window's four conv outputs; each step over the reduction
    /// (kernel row, then the `3 · c1` contiguous inputs of that row) loads `NV` weight
    /// registers and broadcasts 4 inputs into `4 · NV` fused multiply-adds. The
    /// accumulators are pooled in registers, so the conv output never reaches memory.
    ///
    /// `wt` holds the weights in blocks of `NV · N` columns, and `stride` is that width
    /// (see [`pack_blocks`]), so the weight loads of the hot loop are contiguous and never masked; the
    /// bias and the stores of channels beyond `c2` in the last block are. Only the pooled
    /// rows `rows` (of `h1 / 2`) are computed; `out` holds those rows.
    ///
    /// # Safety
    /// `S`'s CPU features must be available (see [`Lanes`]). Slice lengths are checked
    /// (panics, not UB).
    #[inline(always)]
    pub(super) unsafe fn conv2_pool_relu<S: Lanes, const NV: usize>(
        pad: &[f32],
        (h1, w1, c1): (usize, usize, usize),
        (wt, stride): (&[f32], usize),
        bias: &[f32],
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let c2 = bias.len();
        let bw = NV * S::N;
        assert_eq!(stride, bw, "weights packed for another block width");
        // The width of the padded matrix, which the blocks hold in all.
        let stride = c2.div_ceil(bw) * bw;
        assert!(rows.end <= h1 / 2, "pooled rows out of range");
        assert_lengths(
            pad,
            (h1, w1, c1),
            wt,
            stride,
            out,
            rows.len() * (w1 / 2) * c2,
        );
        let mut cb = 0;
        while cb < c2 {
            let rows = rows.clone();
            if cb + bw <= c2 {
                conv2_block::<S, NV, true>(pad, (w1, c1), wt, bias, rows, out, cb);
            } else {
                conv2_block::<S, NV, false>(pad, (w1, c1), wt, bias, rows, out, cb);
            }
            cb += bw;
        }
    }

    /// `(rows, c)` row-major values cut into blocks of `bw` columns, each block stored
    /// whole, `(rows, bw)` row-major, one after the other, the last padded with zeros.
    /// A kernel working on one block then walks its weights contiguously: with the row
    /// stride of the whole matrix, a narrow block's rows would fall into a few cache sets
    /// and evict each other.
    pub(crate) fn pack_blocks(w: &[f32], c: usize, bw: usize) -> Vec<f32> {
        let rows = w.len() / c.max(1);
        let blocks = c.div_ceil(bw);
        let mut out = vec![0f32; blocks * rows * bw];
        for (r, src) in w.chunks_exact(c).enumerate() {
            for (b, cols) in src.chunks(bw).enumerate() {
                out[(b * rows + r) * bw..][..cols.len()].copy_from_slice(cols);
            }
        }
        out
    }

    /// The first weight of block `cb / bw` of [`pack_blocks`]'s `(rows, c)` output.
    #[inline(always)]
    unsafe fn block_start(wt: &[f32], rows: usize, bw: usize, cb: usize) -> *const f32 {
        wt.as_ptr().add(cb / bw * rows * bw)
    }

    /// One block of output channels `cb..cb + NV · N` of [`conv2_pool_relu`] (stored
    /// whole when `FULL`, else cut at `c2` by masks). The caller checked the slice lengths.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv2_block<S: Lanes, const NV: usize, const FULL: bool>(
        pad: &[f32],
        (w1, c1): (usize, usize),
        wt: &[f32],
        bias: &[f32],
        rows: Range<usize>,
        out: &mut [f32],
        cb: usize,
    ) {
        let c2 = bias.len();
        let w2 = w1 / 2;
        let first = rows.start;
        let pw = w1 + 2;
        let run = 3 * c1;
        let bw = NV * S::N;
        let m = block_masks::<S, NV>(c2, cb);
        let b = load_block::<S, NV, FULL>(bias.as_ptr().add(cb), &m);
        for py in rows {
            for px in 0..w2 {
                let mut acc = [[S::zero(); NV]; 4];
                // Top-left input of the window's first conv output.
                let base = (2 * py * pw + 2 * px) * c1;
                for ky in 0..3 {
                    // SAFETY (all raw reads): the furthest input read is
                    // base + (ky + 1) * pw * c1 + c1 + run - 1 < (h1 + 2) * pw * c1, as
                    // 2 * py + 1 + 2 <= h1 + 1 and 2 * px + 1 + 3 <= w1 + 2; weight rows
                    // k < 9 * c1 of block cb / bw; the store is within the
                    // rows of `out` (checked by the caller).
                    let p = pad.as_ptr().add(base + ky * pw * c1);
                    let q = [p, p.add(c1), p.add(pw * c1), p.add((pw + 1) * c1)];
                    let wrow = block_start(wt, 9 * c1, bw, cb).add(ky * run * bw);
                    for j in 0..run {
                        let wv = load_block::<S, NV, true>(wrow.add(j * bw), &m);
                        for (a, qp) in acc.iter_mut().zip(q) {
                            let x = S::splat(*qp.add(j));
                            for (av, w) in a.iter_mut().zip(wv) {
                                *av = S::fmadd(x, w, *av);
                            }
                        }
                    }
                }
                let o = out.as_mut_ptr().add(((py - first) * w2 + px) * c2 + cb);
                pool_bias_relu_store::<S, NV, FULL>(&acc, &b, &m, o);
            }
        }
    }

    /// A 3×3 convolution (layer 2 of inference; both layers, and the input gradient's
    /// own kernel rows, of training) as register tiles of `R` output positions × `NV`
    /// registers of output channels, the shape of a gemm micro-kernel but without im2col (the inputs of one
    /// position's kernel row are `3 · c1` contiguous floats of `pad`, `(h1+2, w1+2, c1)`):
    /// each reduction step loads `NV` weight registers and broadcasts `R` inputs into
    /// `R · NV` fused multiply-adds. Writes the convolution before bias and pooling at
    /// the output positions `span` (`y · w1 + x`, of `h1 · w1`) to `conv`,
    /// `(span.len(), c2)`; the caller pools them.
    ///
    /// [`conv2_pool_relu`] pools in registers but holds only `4 · NV` accumulators; where
    /// registers are few (AVX2 has 16), 6 positions × 2 registers give 12 accumulators,
    /// enough independent chains to cover the FMA latency on both pipes (training on
    /// AVX-512 runs 12 × 2). The last tile
    /// of a block overlaps the one before it (recomputing the same values) instead of
    /// running a slower remainder.
    ///
    /// `wt` holds the weights in blocks of `NV · N` columns, and `stride` is that width
    /// (see [`pack_blocks`]); stores beyond `c2` are masked off.
    ///
    /// # Safety
    /// `S`'s CPU features must be available (see [`Lanes`]). Slice lengths are checked
    /// (panics, not UB).
    #[inline(always)]
    pub(crate) unsafe fn conv2_tiles<S: Lanes, const R: usize, const NV: usize>(
        pad: &[f32],
        (h1, w1, c1): (usize, usize, usize),
        (wt, stride): (&[f32], usize),
        c2: usize,
        span: Range<usize>,
        conv: &mut [f32],
    ) {
        let bw = NV * S::N;
        assert_eq!(stride, bw, "weights packed for another block width");
        assert!(
            span.start <= span.end && span.end <= h1 * w1,
            "positions out of range"
        );
        let positions = span.len();
        let padded = c2.div_ceil(bw) * bw;
        assert_lengths(pad, (h1, w1, c1), wt, padded, conv, positions * c2);
        let geometry = Conv2Tile {
            pad: pad.as_ptr(),
            origin: span.start,
            w1,
            c1,
            wt,
            conv: conv.as_mut_ptr(),
            c2,
        };
        let mut cb = 0;
        while cb < c2 {
            let masks = (&block_masks::<S, NV>(c2, cb), cb + bw <= c2);
            if positions < R {
                for first in 0..positions {
                    conv2_tile::<S, 1, NV>(&geometry, cb, masks, first);
                }
            } else {
                let mut first = 0;
                loop {
                    let start = first.min(positions - R);
                    conv2_tile::<S, R, NV>(&geometry, cb, masks, start);
                    if start + R >= positions {
                        break;
                    }
                    first += R;
                }
            }
            cb += bw;
        }
    }

    /// The buffers and geometry [`conv2_tile`] works on (checked by [`conv2_tiles`]).
    struct Conv2Tile<'a> {
        /// The zero-padded layer-1 output, `(h1+2, w1+2, c1)`.
        pad: *const f32,
        /// The first conv position computed, written at the start of `conv`.
        origin: usize,
        w1: usize,
        c1: usize,
        /// The weights in blocks (see [`pack_blocks`]).
        wt: &'a [f32],
        /// The output, `(positions, c2)`.
        conv: *mut f32,
        c2: usize,
    }

    /// Output positions `first..first + R`, channels `cb..cb + NV · N` (stores masked by
    /// `masks`) of [`conv2_tiles`].
    #[inline(always)]
    unsafe fn conv2_tile<S: Lanes, const R: usize, const NV: usize>(
        g: &Conv2Tile<'_>,
        cb: usize,
        (masks, full): (&[S::M; NV], bool),
        first: usize,
    ) {
        let (pw, c1, run) = (g.w1 + 2, g.c1, 3 * g.c1);
        // SAFETY (all raw accesses): position p = (y, x) reads pad rows y..y + 3 and
        // columns x..x + 3 of the (h1 + 2, w1 + 2) padded grid, weight rows < 9 * c1 and
        // of block cb / bw; it writes conv[p * c2 + cb + lane] only for lanes
        // below c2 (masks), p < h1 * w1.
        let mut q = [g.pad; R];
        for (r, qr) in q.iter_mut().enumerate() {
            let p = g.origin + first + r;
            *qr = g.pad.add(((p / g.w1) * pw + p % g.w1) * c1);
        }
        let bw = NV * S::N;
        let mut acc = [[S::zero(); NV]; R];
        for ky in 0..3 {
            let wrow = block_start(g.wt, 9 * c1, bw, cb).add(ky * run * bw);
            let row = ky * pw * c1;
            for j in 0..run {
                let mut wv = [S::zero(); NV];
                for (v, w) in wv.iter_mut().enumerate() {
                    *w = S::load(wrow.add(j * bw + v * S::N));
                }
                for (a, qr) in acc.iter_mut().zip(q) {
                    let x = S::splat(*qr.add(row + j));
                    for (av, w) in a.iter_mut().zip(wv) {
                        *av = S::fmadd(x, w, *av);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let o = g.conv.add((first + r) * g.c2 + cb);
            for (v, av) in a.iter().enumerate() {
                store_lanes::<S>(o.add(v * S::N), masks[v], full, *av);
            }
        }
    }

    /// The weight gradient of a 3×3 convolution for one image from its routed
    /// conv-output gradient (see [`RoutedGrads`]), added to `gwt`, the gradient
    /// *transposed*: `(c_out, 9 · c_in)`, row `co` holding `(ky, kx, ci)`. For each
    /// channel and kernel row, `CH` registers accumulate `g · (the 3 · c_in contiguous
    /// inputs of that row of the window)` over the channel's entries; the pooling leaves
    /// at most one conv output in four with a gradient (fewer after the ReLU), so this
    /// does a quarter of the dense product's work or less.
    ///
    /// # Safety
    /// `S`'s CPU features must be available (see [`Lanes`]). Slice lengths and the
    /// gradients' geometry are checked (panics, not UB).
    #[inline(always)]
    pub(crate) unsafe fn routed_weight_grad<S: Lanes, const CH: usize>(
        pad: &[f32],
        (h, w, c_in): (usize, usize, usize),
        grads: &RoutedGrads,
        gwt: &mut [f32],
    ) {
        let (pw, run, k) = (w + 2, 3 * c_in, 9 * c_in);
        let c_out = grads.channels();
        assert!(pad.len() >= (h + 2) * pw * c_in, "padded input too short");
        assert!(gwt.len() >= c_out * k, "weight gradient too short");
        grads.check_geometry((h, w));
        let step = CH * S::N;
        for co in 0..c_out {
            let (values, cells) = grads.entries(co);
            for ky in 0..3 {
                let mut j0 = 0;
                while j0 < run {
                    let lanes = (run - j0).min(step);
                    // SAFETY (all raw accesses): a cell (y, x) with y < h, x < w (as
                    // `gather` builds them; the geometry is checked) is a conv position's
                    // window; its row ky reads pad[(c + ky · pw) · c_in + j] for j < run,
                    // below (h + 2) · pw · c_in; lanes beyond `run` are masked off.
                    let origin = pad.as_ptr().add(ky * pw * c_in + j0);
                    let out = gwt.as_mut_ptr().add(co * k + ky * run + j0);
                    // A short remainder runs one register at a time, the last masked.
                    if lanes == step {
                        weight_grad_chunk::<S, CH, true>(values, cells, (origin, c_in), out, lanes);
                        j0 += step;
                    } else if lanes >= S::N {
                        weight_grad_chunk::<S, 1, true>(values, cells, (origin, c_in), out, lanes);
                        j0 += S::N;
                    } else {
                        weight_grad_chunk::<S, 1, false>(values, cells, (origin, c_in), out, lanes);
                        j0 += S::N;
                    }
                }
            }
        }
    }

    /// One chunk of `CH` registers (`lanes` floats, all of them when `FULL`) of one
    /// channel's kernel row in [`routed_weight_grad`]: `out[j] += Σ_e values[e] ·
    /// origin[cells[e] · c_in + j]`.
    #[inline(always)]
    unsafe fn weight_grad_chunk<S: Lanes, const CH: usize, const FULL: bool>(
        values: &[f32],
        cells: &[u32],
        (origin, c_in): (*const f32, usize),
        out: *mut f32,
        lanes: usize,
    ) {
        let m = block_masks::<S, CH>(lanes, 0);
        let mut acc = [S::zero(); CH];
        for (v, &cell) in values.iter().zip(cells) {
            let g = S::splat(*v);
            let x = origin.add(cell as usize * c_in);
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = if FULL {
                    S::load(x.add(j * S::N))
                } else {
                    S::load_masked(m[j], x.add(j * S::N))
                };
                *a = S::fmadd(g, xv, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let p = out.add(j * S::N);
            if FULL {
                S::store(p, S::add(S::load(p), *a));
            } else {
                S::store_masked(p, m[j], S::add(S::load_masked(m[j], p), *a));
            }
        }
    }

    /// The input gradient of a 3×3 convolution for one image from its routed
    /// conv-output gradient, added to the zero-padded `gxpad` (`(h+2, w+2, c_in)`; the
    /// caller keeps the interior): each entry `g` at a position adds `g · wᵀ[co, tap]`
    /// (the `c_in` weights of one channel and kernel tap, contiguous in `wt_t`, the
    /// weights transposed to `(c_out, 9 · c_in)`) to the input under each of its window's
    /// nine taps, `CH` registers of input channels at a time.
    ///
    /// # Safety
    /// As [`routed_weight_grad`].
    #[inline(always)]
    pub(crate) unsafe fn routed_input_grad<S: Lanes, const CH: usize>(
        wt_t: &[f32],
        (h, w, c_in): (usize, usize, usize),
        grads: &RoutedGrads,
        gxpad: &mut [f32],
    ) {
        let (pw, k) = (w + 2, 9 * c_in);
        let c_out = grads.channels();
        assert!(
            gxpad.len() >= (h + 2) * pw * c_in,
            "padded gradient too short"
        );
        assert!(wt_t.len() >= c_out * k, "weights too short");
        grads.check_geometry((h, w));
        let step = CH * S::N;
        for co in 0..c_out {
            let (values, cells) = grads.entries(co);
            if values.is_empty() {
                continue;
            }
            for tap in 0..9 {
                let shift = (tap / 3) * pw + tap % 3;
                let mut c0 = 0;
                while c0 < c_in {
                    let lanes = (c_in - c0).min(step);
                    // SAFETY (all raw accesses): weights of row co, tap, channels below
                    // c_in (masks); a cell (y, x) with y < h, x < w (as `gather`
                    // builds them; the geometry is checked) plus a tap's shift (at most
                    // 2 · pw + 2) stays below (h + 2) · pw, so the input position is
                    // inside `gxpad`.
                    let wp = wt_t.as_ptr().add(co * k + tap * c_in + c0);
                    let origin = gxpad.as_mut_ptr().add(shift * c_in + c0);
                    // A short remainder runs one register at a time, the last masked.
                    if lanes == step {
                        input_grad_chunk::<S, CH, true>(values, cells, wp, (origin, c_in), lanes);
                        c0 += step;
                    } else if lanes >= S::N {
                        input_grad_chunk::<S, 1, true>(values, cells, wp, (origin, c_in), lanes);
                        c0 += S::N;
                    } else {
                        input_grad_chunk::<S, 1, false>(values, cells, wp, (origin, c_in), lanes);
                        c0 += S::N;
                    }
                }
            }
        }
    }

    /// One chunk of `CH` registers (`lanes` input channels, all of them when `FULL`)
    /// of one channel and tap in [`routed_input_grad`]: `origin[cells[e] · c_in + j] +=
    /// values[e] · wp[j]`.
    #[inline(always)]
    unsafe fn input_grad_chunk<S: Lanes, const CH: usize, const FULL: bool>(
        values: &[f32],
        cells: &[u32],
        wp: *const f32,
        (origin, c_in): (*mut f32, usize),
        lanes: usize,
    ) {
        let m = block_masks::<S, CH>(lanes, 0);
        let mut wv = [S::zero(); CH];
        for (j, x) in wv.iter_mut().enumerate() {
            *x = if FULL {
                S::load(wp.add(j * S::N))
            } else {
                S::load_masked(m[j], wp.add(j * S::N))
            };
        }
        for (v, &cell) in values.iter().zip(cells) {
            let g = S::splat(*v);
            let p = origin.add(cell as usize * c_in);
            for (j, x) in wv.iter().enumerate() {
                let q = p.add(j * S::N);
                if FULL {
                    S::store(q, S::fmadd(g, *x, S::load(q)));
                } else {
                    S::store_masked(q, m[j], S::fmadd(g, *x, S::load_masked(m[j], q)));
                }
            }
        }
    }

    /// One image's conv-output gradient kept sparse: after 2×2 max-pooling and ReLU,
    /// each pooled value's gradient reaches at most one conv output (its [`Route`]), so
    /// per output channel this keeps the values that do and the cells of their
    /// positions (`y · (w + 2) + x`: the top-left of the position's 3×3 window in a
    /// zero-padded `(h+2, w+2)` grid). What [`routed_weight_grad`] and
    /// [`routed_input_grad`] read; filled by [`RoutedGrads::gather`].
    #[derive(Default)]
    pub(crate) struct RoutedGrads {
        /// Entries per channel.
        counts: Vec<usize>,
        /// Room per channel: the pooled positions.
        slots: usize,
        /// The `(h, w)` conv output the cells were gathered for: by construction every
        /// cell is a position `(y, x)` of it, `y < h`, `x < w`.
        geometry: (usize, usize),
        /// `(c_out, slots)`: channel `co`'s entries first.
        values: Vec<f32>,
        cells: Vec<u32>,
    }

    impl RoutedGrads {
        /// Output channels.
        fn channels(&self) -> usize {
            self.counts.len()
        }

        /// Channel `co`'s values and cells.
        #[inline(always)]
        fn entries(&self, co: usize) -> (&[f32], &[u32]) {
            let (start, n) = (co * self.slots, self.counts[co]);
            (
                &self.values[start..start + n],
                &self.cells[start..start + n],
            )
        }

        /// Panics unless the cells were gathered for an `(h, w)` conv output, so every
        /// cell is a position `(y, x)` with `y < h` and `x < w` (what the kernels' raw
        /// accesses rely on).
        fn check_geometry(&self, (h, w): (usize, usize)) {
            assert_eq!(
                self.geometry,
                (h, w),
                "gradients gathered for another shape"
            );
        }

        /// Gathers the pooled gradient `go` (`(h/2, w/2, c)`) along `routes` (as
        /// [`crate::kernels::max_pool2_bias_relu_routes`] recorded them), and adds the
        /// bias gradient to `gb`. Branch-free: every value is written, only the count
        /// of a channel that keeps it advances.
        pub(crate) fn gather(
            &mut self,
            go: &[f32],
            routes: &[Route],
            (h, w, c): (usize, usize, usize),
            gb: &mut [f32],
        ) {
            let (ho, wo, pw) = (h / 2, w / 2, w + 2);
            let slots = ho * wo;
            self.slots = slots;
            self.geometry = (h, w);
            self.counts.clear();
            self.counts.resize(c, 0);
            self.values.resize(c * slots, 0.0);
            self.cells.resize(c * slots, 0);
            let (go, routes, gb) = (&go[..slots * c], &routes[..slots * c], &mut gb[..c]);
            // The cell of each window's top-left conv output, and the step to each route.
            let window: Vec<u32> = (0..slots)
                .map(|q| (2 * (q / wo) * pw + 2 * (q % wo)) as u32)
                .collect();
            let step = [0, 1, pw as u32, pw as u32 + 1];
            for co in 0..c {
                let (values, cells) = (
                    &mut self.values[co * slots..][..slots],
                    &mut self.cells[co * slots..][..slots],
                );
                let (mut n, mut bias) = (0, 0f32);
                for (q, &cell) in window.iter().enumerate() {
                    let (g, route) = (go[q * c + co], routes[q * c + co]);
                    let keep = route != NO_ROUTE;
                    values[n] = g;
                    cells[n] = cell + step[usize::from(route & 3)];
                    n += usize::from(keep);
                    bias += if keep { g } else { 0.0 };
                }
                self.counts[co] = n;
                gb[co] += bias;
            }
            // A window's top-left (2 · qy, 2 · qx) plus a step of at most one row and
            // one column stays inside the (h, w) output.
            debug_assert!((0..c).all(|co| self.entries(co).1.iter().all(|&cell| {
                let cell = cell as usize;
                cell / pw < h && cell % pw < w
            })));
        }
    }

    /// Columns per panel of [`Packed`] weights (a multiple of every level's lanes).
    pub(super) const PANEL: usize = 32;
    /// Reduction steps per pass over the rows: a panel's slice of `KC · PANEL` weights
    /// (32 KiB) stays in the L1/L2 cache while every row tile runs over it.
    const KC: usize = 256;

    /// A linear layer's `(n, k)` weights (as stored: one row per output) repacked for
    /// [`linear`]: panels of [`PANEL`] outputs, each `k` rows of `PANEL` contiguous
    /// floats, zero beyond `n`.
    #[derive(Clone, Debug)]
    pub(super) struct Packed {
        /// Outputs.
        pub(super) n: usize,
        /// Inputs (the reduction length).
        pub(super) k: usize,
        /// `ceil(n / PANEL)` panels of `k · PANEL` floats.
        data: Vec<f32>,
    }

    impl Packed {
        /// Packs row-major `(n, k)` weights.
        pub(super) fn new(w: &[f32], n: usize, k: usize) -> Packed {
            assert_eq!(w.len(), n * k, "weights must be (n, k)");
            let panels = n.div_ceil(PANEL);
            let mut data = vec![0f32; panels * k * PANEL];
            for (o, row) in w.chunks_exact(k).enumerate() {
                let panel = &mut data[(o / PANEL) * k * PANEL..][..k * PANEL];
                for (kk, v) in row.iter().enumerate() {
                    panel[kk * PANEL + o % PANEL] = *v;
                }
            }
            Packed { n, k, data }
        }

        /// Panels of [`PANEL`] outputs.
        pub(super) fn panels(&self) -> usize {
            self.n.div_ceil(PANEL)
        }
    }

    /// `out (m × n) = x (m × k) · wᵀ` for a [`Packed`] `w`, row-major `x` and `out`.
    ///
    /// Blocked for the cache: for each panel, each part of it `NVC · N` columns wide
    /// (which must divide [`PANEL`]) and each slice of [`KC`] reduction steps, tiles of
    /// `R` rows keep `R · NVC` accumulators in registers; each step loads `NVC` weight
    /// registers and broadcasts `R` inputs into
    /// `R · NVC` fused multiply-adds. The rows left over (fewer than `R`) run as one
    /// smaller tile; a single row splits its reduction over `KU` independent accumulator
    /// sets so the FMA latency is covered.
    ///
    /// The reduction runs over the layer's inputs `ks` only (`x` holds those columns of
    /// each row): a thread that computed some of one image's features can sum over
    /// just those, reading just their share of the weights (see [`FastNet::logits`]).
    ///
    /// # Safety
    /// `S`'s CPU features must be available (see [`Lanes`]). Slice lengths are checked
    /// (panics, not UB).
    #[inline(always)]
    pub(super) unsafe fn linear<S: Lanes, const R: usize, const NVC: usize, const KU: usize>(
        x: &[f32],
        w: &Packed,
        ks: Range<usize>,
        out: &mut [f32],
    ) {
        let sub = NVC * S::N;
        assert_eq!(PANEL % sub, 0, "a tile must cover a part of a panel");
        let (n, k) = (w.n, w.k);
        let kr = ks.len();
        let m = x.len() / kr.max(1);
        assert!(
            ks.start <= ks.end && ks.end <= k && x.len() == m * kr && out.len() >= m * n,
            "linear: bad lengths"
        );
        let out_base = out.as_mut_ptr();
        for (p, c0) in (0..w.panels()).flat_map(|p| {
            (p * PANEL..(p + 1) * PANEL)
                .step_by(sub)
                .map(move |c| (p, c))
        }) {
            if c0 >= n {
                continue;
            }
            let masks = (&block_masks::<S, NVC>(n, c0), c0 + sub <= n);
            let mut k0 = ks.start;
            while k0 < ks.end {
                let kc = KC.min(ks.end - k0);
                // SAFETY: panel p's rows k0..k0 + kc lie within `data`; rows r < m of `x`
                // hold kr floats from r * kr, column k0 - ks.start onwards; outputs
                // r * n + c0 + lane < m * n unless masked off.
                let wp = w.data.as_ptr().add(p * k * PANEL + k0 * PANEL + c0 % PANEL);
                let mut r = 0;
                while r < m {
                    let rows = (m - r).min(R);
                    let t = (
                        x.as_ptr().add(r * kr + k0 - ks.start),
                        kr,
                        wp,
                        kc,
                        out_base.add(r * n + c0),
                        n,
                        masks,
                        k0 == ks.start,
                    );
                    // The leftover rows of a task in one smaller tile rather than one
                    // at a time (each single row streams the whole panel again), with
                    // enough accumulator sets for about 8 independent chains.
                    match rows {
                        _ if rows == R => tile::<S, R, NVC, 1>(t),
                        1 => tile::<S, 1, NVC, KU>(t),
                        2 => tile::<S, 2, NVC, 2>(t),
                        3 => tile::<S, 3, NVC, 2>(t),
                        4 => tile::<S, 4, NVC, 1>(t),
                        5 => tile::<S, 5, NVC, 1>(t),
                        6 => tile::<S, 6, NVC, 1>(t),
                        7 => tile::<S, 7, NVC, 1>(t),
                        _ => {
                            // Not in the kernel table (R is at most 8): rows one by one.
                            tile::<S, 1, NVC, KU>(t);
                            r += 1;
                            continue;
                        }
                    }
                    r += rows;
                }
                k0 += kc;
            }
        }
    }

    /// One tile of [`linear`]: `R` rows of `x` (stride `x_rs`) times `kc` rows of a panel
    /// (`wp`), added to the tile of `out` (stride `out_rs`, lanes of `masks`) unless
    /// `first`, when it is overwritten. The reduction is split over `KU` accumulator sets.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    unsafe fn tile<S: Lanes, const R: usize, const NVC: usize, const KU: usize>(
        (x, x_rs, wp, kc, out, out_rs, (masks, full), first): (
            *const f32,
            usize,
            *const f32,
            usize,
            *mut f32,
            usize,
            (&[S::M; NVC], bool),
            bool,
        ),
    ) {
        let mut acc = [[[S::zero(); NVC]; R]; KU];
        if !first {
            for (r, a) in acc[0].iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    let p = out.add(r * out_rs + v * S::N);
                    *av = if full {
                        S::load(p)
                    } else {
                        S::load_masked(masks[v], p)
                    };
                }
            }
        }
        let steps = kc / KU * KU;
        let mut kk = 0;
        while kk < steps {
            for (u, set) in acc.iter_mut().enumerate() {
                let wk = wp.add((kk + u) * PANEL);
                let mut wv = [S::zero(); NVC];
                for (v, w) in wv.iter_mut().enumerate() {
                    *w = S::load(wk.add(v * S::N));
                }
                for (r, a) in set.iter_mut().enumerate() {
                    let xv = S::splat(*x.add(r * x_rs + kk + u));
                    for (av, w) in a.iter_mut().zip(wv) {
                        *av = S::fmadd(xv, w, *av);
                    }
                }
            }
            kk += KU;
        }
        for kk in steps..kc {
            let wk = wp.add(kk * PANEL);
            for (r, a) in acc[0].iter_mut().enumerate() {
                let xv = S::splat(*x.add(r * x_rs + kk));
                for (v, av) in a.iter_mut().enumerate() {
                    *av = S::fmadd(xv, S::load(wk.add(v * S::N)), *av);
                }
            }
        }
        let (total, rest) = acc.split_at_mut(1);
        for set in rest.iter() {
            for (a, b) in total[0].iter_mut().zip(set) {
                for (av, bv) in a.iter_mut().zip(b) {
                    *av = S::add(*av, *bv);
                }
            }
        }
        for (r, a) in acc[0].iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                store_lanes::<S>(out.add(r * out_rs + v * S::N), masks[v], full, *av);
            }
        }
    }

    /// [`super::conv1_pool_relu`] with `NV` registers of output channels per block: for
    /// each pooling window and block, `4 · NV` accumulators (the window's four conv
    /// outputs) take one fused multiply-add per kernel tap, input channel and register.
    /// A tail block of fewer channels uses masked loads and stores.
    ///
    /// # Safety
    /// `S`'s CPU features must be available (see [`Lanes`]). Slice lengths are checked
    /// (panics, not UB).
    #[inline(always)]
    pub(super) unsafe fn conv1_pool_relu<S: Lanes, const NV: usize>(
        pad: &[f32],
        (h, w, c_in): (usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let c1 = bias.len();
        let (h1, w1) = (h / 2, w / 2);
        let pw = w + 2;
        assert_lengths(pad, (h, w, c_in), wt, c1, out, (h1 + 2) * (w1 + 2) * c1);
        // Offsets in `pad` of each tap, relative to a conv output's top-left input.
        let taps: Vec<usize> = (0..9 * c_in)
            .map(|t| ((t / (3 * c_in)) * pw + (t / c_in) % 3) * c_in + t % c_in)
            .collect();
        let bw = NV * S::N;
        let mut cb = 0;
        while cb < c1 {
            if cb + bw <= c1 {
                conv1_block::<S, NV, true>(pad, (h, w, c_in), wt, bias, out, cb, &taps);
            } else {
                conv1_block::<S, NV, false>(pad, (h, w, c_in), wt, bias, out, cb, &taps);
            }
            cb += bw;
        }
    }

    /// One block of output channels of [`conv1_pool_relu`] (whole when `FULL`, else cut
    /// at `c1` by masks). The caller checked the slice lengths.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv1_block<S: Lanes, const NV: usize, const FULL: bool>(
        pad: &[f32],
        (h, w, c_in): (usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        out: &mut [f32],
        cb: usize,
        taps: &[usize],
    ) {
        let c1 = bias.len();
        let (h1, w1) = (h / 2, w / 2);
        let pw = w + 2;
        let m = block_masks::<S, NV>(c1, cb);
        let b = load_block::<S, NV, FULL>(bias.as_ptr().add(cb), &m);
        for py in 0..h1 {
            for px in 0..w1 {
                let base = (2 * py * pw + 2 * px) * c_in;
                let p = pad.as_ptr().add(base);
                let mut acc = [[S::zero(); NV]; 4];
                for (t, &off) in taps.iter().enumerate() {
                    // SAFETY (all raw reads): base + off + (pw + 1) * c_in is within
                    // `pad` since 2 * py + 1 + 2 <= h + 1 and 2 * px + 1 + 2 <= w + 1;
                    // the weight row t * c1 + cb + lane < 9 * c_in * c1 unless masked.
                    let wv = load_block::<S, NV, FULL>(wt.as_ptr().add(t * c1 + cb), &m);
                    let q = p.add(off);
                    let x = [
                        S::splat(*q),
                        S::splat(*q.add(c_in)),
                        S::splat(*q.add(pw * c_in)),
                        S::splat(*q.add((pw + 1) * c_in)),
                    ];
                    for (a, xv) in acc.iter_mut().zip(x) {
                        for (av, wr) in a.iter_mut().zip(wv) {
                            *av = S::fmadd(xv, wr, *av);
                        }
                    }
                }
                let o = out
                    .as_mut_ptr()
                    .add(((py + 1) * (w1 + 2) + px + 1) * c1 + cb);
                pool_bias_relu_store::<S, NV, FULL>(&acc, &b, &m, o);
            }
        }
    }
}

/// The arguments of one direct-kernel test run: layer 2 if `layer2`, else layer 1.
#[cfg(test)]
struct DirectRun<'a> {
    layer2: bool,
    pad: &'a [f32],
    geometry: (usize, usize, usize),
    wt: &'a [f32],
    bias: &'a [f32],
    out: &'a mut [f32],
}

/// Which kernels a direct-kernel test runs: those of a SIMD level the CPU supports, or
/// the generic ones on [`Portable`](crate::simd::Portable) lanes, with layer 2 pooled in
/// registers or in tiles (both shapes run everywhere that way).
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
enum TestKernels {
    Level(SimdLevel),
    PortablePooled,
    PortableTiled,
}

/// Runs one direct kernel for tests.
#[cfg(test)]
fn run_direct(kernels: TestKernels, run: DirectRun) {
    use crate::simd::Portable;
    // SAFETY: only supported levels reach the wrappers (asserted); portable lanes are
    // plain Rust.
    unsafe {
        match kernels {
            TestKernels::Level(level) => {
                assert!(level.is_supported());
                match level {
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512 => direct_avx512(run),
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2 => direct_avx2(run),
                    _ => direct_with::<Portable, 2, 0, 4>(run),
                }
            }
            TestKernels::PortablePooled => direct_with::<Portable, 2, 0, 4>(run),
            TestKernels::PortableTiled => direct_with::<Portable, 2, 6, 2>(run),
        }
    }
}

/// One direct-kernel run on lanes `S`, with `NV1` and `NV2` vectors per tile in layers 1
/// and 2 and layer-2 tiles of `R2` positions (0: pooled in registers); inlined into each
/// level's `#[target_feature]` wrapper below. Layer 2 writes the pooled `(h/2, w/2, c)`.
#[cfg(test)]
#[inline(always)]
unsafe fn direct_with<
    S: crate::simd::Lanes,
    const NV1: usize,
    const R2: usize,
    const NV2: usize,
>(
    run: DirectRun,
) {
    let DirectRun {
        layer2,
        pad,
        geometry,
        wt,
        bias,
        out,
    } = run;
    let (h, w, _) = geometry;
    if layer2 {
        let (wp, stride) = (direct::pack_blocks(wt, bias.len(), NV2 * S::N), NV2 * S::N);
        if R2 == 0 {
            // In two ranges of pooled rows, as the batch-1 path does.
            let (rows, cut) = (h / 2, h / 2 / 2);
            let (a, b) = out.split_at_mut(cut * (w / 2) * bias.len());
            direct::conv2_pool_relu::<S, NV2>(pad, geometry, (&wp, stride), bias, 0..cut, a);
            direct::conv2_pool_relu::<S, NV2>(pad, geometry, (&wp, stride), bias, cut..rows, b);
        } else {
            let c = bias.len();
            // In two spans of positions, split off the tile grid, as the batch-1 path does.
            let positions = h / 2 * 2 * w;
            let cut = (positions / 3 + 1).min(positions);
            let mut conv = vec![0f32; positions * c];
            let (a, b) = conv.split_at_mut(cut * c);
            direct::conv2_tiles::<S, R2, NV2>(pad, geometry, (&wp, stride), c, 0..cut, a);
            direct::conv2_tiles::<S, R2, NV2>(pad, geometry, (&wp, stride), c, cut..positions, b);
            max_pool2_relu(&conv, (h / 2 * 2, w, c), Some(bias), out);
        }
    } else {
        direct::conv1_pool_relu::<S, NV1>(pad, geometry, wt, bias, out)
    }
}

/// [`run_direct`] with the AVX-512 kernels of the table.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn direct_avx512(run: DirectRun) {
    direct_with::<Avx512, { AVX512_NV.0 }, AVX512_R2, { AVX512_NV.1 }>(run)
}

/// [`run_direct`] with the AVX2 kernels of the table.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_avx2(run: DirectRun) {
    direct_with::<Avx2, { AVX2_NV.0 }, AVX2_R2, { AVX2_NV.1 }>(run)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::kernels::pad_image;
    use crate::model::{ModelMetadata, Net, Normalization};
    use crate::reference::{self, conv_weight_from_oihw, rel_err};
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
            augment: String::new(),
            label_smoothing: 0.0,
            best_epoch: 0,
        };
        Ok(Classifier::from_parts(meta, net).expect("consistent shapes"))
    }

    /// The layer kernels (the plain layer 1, the generic direct kernels with portable
    /// lanes, and with the lanes of every SIMD level the CPU has) against the reference
    /// layer on random inputs, with channel counts that leave partial blocks.
    #[test]
    fn layer_kernels_match_reference() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (h, w, c_in, c_out) in [
            (28, 28, 1, 32),
            (14, 14, 32, 64),
            (7, 9, 3, 5),
            (10, 6, 5, 70),
            (2, 2, 4, 9),
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
            check(&interior(&out), "plain layer 1");
            // The generic kernels with portable lanes run everywhere; then every SIMD level
            // this CPU has.
            let mut kernels = vec![
                super::TestKernels::PortablePooled,
                super::TestKernels::PortableTiled,
            ];
            kernels.extend(
                SimdLevel::supported()
                    .into_iter()
                    .skip(1)
                    .map(super::TestKernels::Level),
            );
            for level in kernels {
                let name = format!("{level:?}");
                for layer2 in [false, true] {
                    let size = if layer2 { h1 * w1 } else { (h1 + 2) * (w1 + 2) };
                    let mut out = vec![0f32; size * c_out];
                    let run = super::DirectRun {
                        layer2,
                        pad: &pad,
                        geometry: (h, w, c_in),
                        wt: &wk,
                        bias: &bv,
                        out: &mut out,
                    };
                    super::run_direct(level, run);
                    let ours = if layer2 { out } else { interior(&out) };
                    check(&ours, &format!("{name} layer {}", 1 + usize::from(layer2)));
                }
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
