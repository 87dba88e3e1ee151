//! [`FastNet`]'s two convolution layers over one chunk of images: the per-thread scratch
//! buffers, the dispatch to the SIMD level's kernels, the body that runs the direct
//! kernels at a SIMD level, and the portable path (plain layer 1, im2col + `gemm` for
//! layer 2). Separate from [`super`] so the batch scheduling there reads without the
//! per-image buffer handling.

use std::cell::RefCell;
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::direct;
use super::{FastNet, CHUNK};
use crate::kernels::{fmax, im2col, max_pool2_relu, sgemm};
#[cfg(target_arch = "x86_64")]
use crate::simd::Lanes;
use crate::simd::SimdLevel;

/// Per-thread buffers, reused across chunks and calls.
#[derive(Default)]
pub(super) struct Scratch {
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
    /// Both convolution layers for a chunk of images, writing their flattened features.
    pub(super) fn conv_chunk(&self, inputs: &[f32], features: &mut [f32]) {
        self.conv_rows(inputs, 0..self.h / 4, features);
    }

    /// Both convolution layers for a chunk of images, writing only the pooled layer-2
    /// rows `rows` (of `h / 4`) of each image's features. The portable path computes
    /// every row (it is only asked for all of them: see [`FastNet::splits_rows`]).
    pub(super) fn conv_rows(&self, inputs: &[f32], rows: Range<usize>, features: &mut [f32]) {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            self.layout(&mut s);
            match self.level {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `level` is only ever set by `set_level`, to a level the CPU
                // supports (`or_supported`): here AVX-512F, AVX2 and FMA.
                SimdLevel::Avx512 => unsafe {
                    self.conv_chunk_avx512(inputs, rows, features, &mut s)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above: the CPU has AVX2 and FMA.
                SimdLevel::Avx2 => unsafe { self.conv_chunk_avx2(inputs, rows, features, &mut s) },
                _ => self.conv_chunk_portable(inputs, features, &mut s),
            }
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
    /// layer 2 in tiles of `R2` positions (0: pooled in registers; see
    /// [`AVX512_R2`](super::tables::AVX512_R2)).
    ///
    /// # Safety
    /// `S`'s CPU features must be available: only called from the `#[target_feature]`
    /// wrappers of [`super::tables`], which the dispatch reaches only on CPUs that have them.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) unsafe fn conv_simd<
        S: Lanes,
        const NV1: usize,
        const R2: usize,
        const NV2: usize,
    >(
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
            // SAFETY: `S`'s features are available (this function's contract); the
            // kernels (this one and the two below) check the slice lengths and the rows
            // or positions asked for themselves (panics, not UB).
            unsafe {
                direct::conv1_pool_relu::<S, NV1>(
                    &s.pad0,
                    (h, w, c_in),
                    &self.conv1_w,
                    &self.conv1_b,
                    pad1,
                )
            };
            let weights = (&self.conv2_blocks.0[..], self.conv2_blocks.1);
            let (rows, bias) = (rows.clone(), &self.conv2_b[..]);
            if R2 == 0 {
                // SAFETY: as above.
                unsafe {
                    direct::conv2_pool_relu::<S, NV2>(pad1, (h1, w1, c1), weights, bias, rows, out)
                };
            } else {
                let conv_rows = 2 * rows.len();
                let conv = &mut s.conv2[..conv_rows * w1 * c2];
                let span = 2 * rows.start * w1..2 * rows.end * w1;
                // SAFETY: as above.
                unsafe {
                    direct::conv2_tiles::<S, R2, NV2>(pad1, (h1, w1, c1), weights, c2, span, conv)
                };
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

/// Layer 1 fused: 3×3 convolution (stride 1, the padding already in `pad`), 2×2
/// max-pool, bias, ReLU. `pad` is one zero-padded HWC image `(h+2, w+2, c_in)`; the
/// pooled `(h/2, w/2, c1)` result goes into the interior of `out`, itself padded by one
/// pixel for layer 2. `wt` is `(9 * c_in, c1)` with rows `(ky, kx, ci)`. Portable version
/// of [`direct::conv1_pool_relu`].
pub(super) fn conv1_pool_relu(
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
