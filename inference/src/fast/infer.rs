//! The direct convolution kernels of inference: layer 1 and layer 2 fused with 2×2
//! max-pool, bias and ReLU (pooled in registers), and the register-tiled 3×3
//! convolution that layer 2 runs where registers are few (and the training op reuses).
//! Written once over [`Lanes`]; [`super::tables`] picks the block and tile sizes. Apart
//! from the linear-layer and gradient kernels, which share only the lane operations of
//! [`super::lanes`]. The tests check them against the reference layer.

use std::ops::Range;

#[cfg(test)]
use super::direct;
use super::lanes::{
    assert_lengths, block_masks, block_start, load_block, pool_bias_relu_store, store_lanes,
};
#[cfg(all(test, target_arch = "x86_64"))]
use super::tables::{AVX2_NV, AVX2_R2, AVX512_NV, AVX512_R2};
#[cfg(test)]
use crate::kernels::max_pool2_relu;
use crate::simd::Lanes;
#[cfg(test)]
use crate::simd::SimdLevel;
#[cfg(all(test, target_arch = "x86_64"))]
use crate::simd::{Avx2, Avx512};

/// [`super::chunk::conv1_pool_relu`] with `NV` registers of output channels per block: for
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
        // SAFETY: `S`'s features are available (this function's contract); the slice
        // lengths were checked above, `taps` are the window's offsets, `cb < c1`, and
        // the block runs whole only if it ends at or before `c1`.
        unsafe {
            if cb + bw <= c1 {
                conv1_block::<S, NV, true>(pad, (h, w, c_in), wt, bias, out, cb, &taps);
            } else {
                conv1_block::<S, NV, false>(pad, (h, w, c_in), wt, bias, out, cb, &taps);
            }
        }
        cb += bw;
    }
}

/// One block of output channels of [`conv1_pool_relu`] (whole when `FULL`, else cut
/// at `c1` by masks).
///
/// # Safety
/// As [`conv1_pool_relu`], and what it checks and builds: the slice lengths of
/// [`assert_lengths`], `taps` the offsets of the 3×3 window's `9 · c_in` inputs,
/// `cb < c1`, and `cb + NV · N <= c1` when `FULL`.
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
    // SAFETY: `S`'s features are available (this function's contract). Channel lanes
    // `cb + lane` are below `c1`: all of them when `FULL`, else those of the masks. So,
    // with the lengths checked by the caller (`pad` (h + 2, w + 2, c_in), `wt`
    // (9 · c_in, c1), `out` (h1 + 2, w1 + 2, c1)):
    // - the bias load reads `bias[cb + lane]`;
    // - the weight load of tap t < 9 · c_in reads `wt[t · c1 + cb + lane]`;
    // - the four input reads of pooled position (py, px) and tap (ky, kx, ci) are the
    //   pixels (2 · py + ky + dy, 2 · px + kx + dx), dy, dx in {0, 1}: at most row
    //   h + 1 and column w + 1 of `pad`, as 2 · py <= h - 2 and 2 · px <= w - 2;
    // - the store writes channels `cb + lane` of pixel (py + 1, px + 1) of `out`.
    unsafe {
        let m = block_masks::<S, NV>(c1, cb);
        let b = load_block::<S, NV, FULL>(bias.as_ptr().add(cb), &m);
        for py in 0..h1 {
            for px in 0..w1 {
                let base = (2 * py * pw + 2 * px) * c_in;
                let p = pad.as_ptr().add(base);
                let mut acc = [[S::zero(); NV]; 4];
                for (t, &off) in taps.iter().enumerate() {
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
/// (see [`pack_blocks`](super::lanes::pack_blocks)), so the weight loads of the hot loop
/// are contiguous and never masked; the bias and the stores of channels beyond `c2` in
/// the last block are. Only the pooled rows `rows` (of `h1 / 2`) are computed; `out`
/// holds those rows.
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
        // SAFETY: `S`'s features are available (this function's contract); the slice
        // lengths and the rows were checked above, `cb < c2`, and the block runs whole
        // only if it ends at or before `c2`.
        unsafe {
            if cb + bw <= c2 {
                conv2_block::<S, NV, true>(pad, (w1, c1), wt, bias, rows, out, cb);
            } else {
                conv2_block::<S, NV, false>(pad, (w1, c1), wt, bias, rows, out, cb);
            }
        }
        cb += bw;
    }
}

/// One block of output channels `cb..cb + NV · N` of [`conv2_pool_relu`] (stored
/// whole when `FULL`, else cut at `c2` by masks).
///
/// # Safety
/// As [`conv2_pool_relu`], and what it checks: the slice lengths (`wt` packed in
/// blocks of `NV · N` columns), `rows` within `h1 / 2`, `cb < c2` a multiple of
/// `NV · N`, and `cb + NV · N <= c2` when `FULL`.
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
    // SAFETY: `S`'s features are available (this function's contract). With the
    // lengths checked by the caller (`pad` (h1 + 2, w1 + 2, c1), `wt` the
    // `ceil(c2 / bw)` blocks of (9 · c1, bw) weights, `out` the `rows.len()` pooled
    // rows of (w1 / 2, c2)):
    // - the bias load reads `bias[cb + lane]` for lanes below `c2` (all when `FULL`);
    // - the input reads of pooled position (py, px) and kernel row ky cover pixels
    //   (2 · py + ky + dy, 2 · px + dx .. 2 · px + dx + 3), dy, dx in {0, 1}: at most
    //   row h1 + 1 and column w1 + 1 of `pad`, as 2 · py <= h1 - 2 (py < h1 / 2) and
    //   2 · px <= w1 - 2;
    // - the weight loads read whole rows k < 9 · c1 of block cb / bw, one of `wt`'s;
    // - the store writes channels `cb + lane` below `c2` of pooled row py - first
    //   (< rows.len()), column px of `out`.
    unsafe {
        let m = block_masks::<S, NV>(c2, cb);
        let b = load_block::<S, NV, FULL>(bias.as_ptr().add(cb), &m);
        for py in rows {
            for px in 0..w2 {
                let mut acc = [[S::zero(); NV]; 4];
                // Top-left input of the window's first conv output.
                let base = (2 * py * pw + 2 * px) * c1;
                for ky in 0..3 {
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
/// (see [`pack_blocks`](super::lanes::pack_blocks)); stores beyond `c2` are masked off.
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
        // SAFETY: `S`'s features are available (this function's contract); `geometry`
        // holds the buffers whose lengths were checked above, each tile's positions
        // lie in `0..positions`, `cb < c2`, the masks are those of the block, and it is
        // stored whole only if it ends at or before `c2`.
        unsafe {
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
    /// The weights in blocks (see [`pack_blocks`](super::lanes::pack_blocks)).
    wt: &'a [f32],
    /// The output, `(positions, c2)`.
    conv: *mut f32,
    c2: usize,
}

/// Output positions `first..first + R`, channels `cb..cb + NV · N` (stores masked by
/// `masks`) of [`conv2_tiles`].
///
/// # Safety
/// As [`conv2_tiles`], and what it checks and builds: `g` over buffers of the checked
/// lengths, `first + R` at most the span's length, `cb < c2` a multiple of `NV · N`,
/// `masks` those of [`block_masks`] for `(c2, cb)`, `full` only if
/// `cb + NV · N <= c2`.
#[inline(always)]
unsafe fn conv2_tile<S: Lanes, const R: usize, const NV: usize>(
    g: &Conv2Tile<'_>,
    cb: usize,
    (masks, full): (&[S::M; NV], bool),
    first: usize,
) {
    let (pw, c1, run) = (g.w1 + 2, g.c1, 3 * g.c1);
    let bw = NV * S::N;
    // SAFETY: `S`'s features are available (this function's contract). Position
    // p = origin + first + r (r < R) is below h1 · w1, so it is a pixel (y, x) with
    // y < h1, x < w1; with the lengths checked by `conv2_tiles`:
    // - its input reads cover rows y..y + 3 and columns x..x + 3 of the
    //   (h1 + 2, w1 + 2, c1) padded grid, ending at most at its last float;
    // - the weight loads read whole rows k < 9 · c1 of block cb / bw, one of `wt`'s
    //   `ceil(c2 / bw)` blocks;
    // - the stores write `conv[(first + r) · c2 + cb + lane]`, first + r < the span's
    //   length, for lanes below `c2` (all of them when `full`); a masked register's
    //   address is formed with `wrapping_add`, as one without lanes may lie past the
    //   end of `conv`.
    unsafe {
        let mut q = [g.pad; R];
        for (r, qr) in q.iter_mut().enumerate() {
            let p = g.origin + first + r;
            *qr = g.pad.add(((p / g.w1) * pw + p % g.w1) * c1);
        }
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
                store_lanes::<S>(o.wrapping_add(v * S::N), masks[v], full, *av);
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
///
/// # Safety
/// `S`'s CPU features must be available.
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
    // SAFETY: `S`'s features are available (this function's contract); the kernels
    // check the slice lengths themselves.
    unsafe {
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
                direct::conv2_tiles::<S, R2, NV2>(
                    pad,
                    geometry,
                    (&wp, stride),
                    c,
                    cut..positions,
                    b,
                );
                max_pool2_relu(&conv, (h / 2 * 2, w, c), Some(bias), out);
            }
        } else {
            direct::conv1_pool_relu::<S, NV1>(pad, geometry, wt, bias, out)
        }
    }
}

/// [`run_direct`] with the AVX-512 kernels of the table.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn direct_avx512(run: DirectRun) {
    // SAFETY: the CPU has AVX-512F (this function's contract), which `Avx512` needs.
    unsafe { direct_with::<Avx512, { AVX512_NV.0 }, AVX512_R2, { AVX512_NV.1 }>(run) }
}

/// [`run_direct`] with the AVX2 kernels of the table.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_avx2(run: DirectRun) {
    // SAFETY: the CPU has AVX2 and FMA (this function's contract), which `Avx2` needs.
    unsafe { direct_with::<Avx2, { AVX2_NV.0 }, AVX2_R2, { AVX2_NV.1 }>(run) }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::kernels::pad_image;
    use crate::reference::{self, conv_weight_from_oihw, rel_err};
    use crate::simd::SimdLevel;

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
            super::super::chunk::conv1_pool_relu(&pad, (h, w, c_in), &wk, &bv, &mut out);
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
}
