//! The network's convolution layers as a candle custom op with its own backward pass:
//! [`conv3x3_pool2_relu`], `relu(max_pool2(conv3x3(x, w, b)))` on NHWC tensors. It is what
//! [`crate::model::Net::forward`] runs, so training and the candle reference of inference
//! ([`crate::Classifier::predict_candle`]) go through it; candle's generic `conv2d` /
//! `max_pool2d` are slow on CPU, especially their backward passes (and `max_pool2d`'s
//! backward scales gradients by 1/4).
//!
//! The forward pass is a direct convolution over zero-padded images in the register
//! tiles of the inference kernels ([`direct::conv2_tiles`]), then pooling, bias and ReLU,
//! which also record each pooled value's [`Route`] (which position of its window it came
//! from, if any: one byte per pooled value). The backward pass needs nothing else: after
//! pooling at most one conv output in four gets a gradient (none where the ReLU cut the
//! pooled value off), so it gathers those ([`direct::RoutedGrads`]) and runs the two
//! gradient products over just them ([`direct::routed_weight_grad`],
//! [`direct::routed_input_grad`]): a quarter of the dense products' work or less, with
//! no second forward pass and no im2col. One image at a
//! time per rayon thread, at the SIMD level chosen at run time ([`crate::simd_level`];
//! the register counts per level are the table below).
//!
//! The tests check forward and backward against candle's generic ops (`reference`) at
//! every level the CPU has and on portable lanes.
//!
//! Weight layout: a `(9 * c_in, c_out)` matrix whose row `(ky * 3 + kx) * c_in + ci` holds
//! the weights applied to input channel `ci` at kernel offset `(ky, kx)` (see
//! [`crate::model::names`]).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fast::direct::{self, RoutedGrads};
use crate::kernels::{max_pool2_bias_relu_routes, pad_image, unpad_image, Route};
use crate::simd::{simd_level, Lanes, Portable, SimdLevel};
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};

/// The kernel table of the training convolutions at one SIMD level.
#[derive(Clone, Copy, Debug)]
struct Table {
    /// `(R, NV)` of the forward [`direct::conv2_tiles`]: `R` positions × `NV`
    /// registers of output channels.
    conv: (usize, usize),
    /// Registers of inputs per entry of [`direct::routed_weight_grad`].
    weight_grad: usize,
    /// Registers of input channels per entry of [`direct::routed_input_grad`].
    input_grad: usize,
}

/// AVX-512 (32 registers): 12 × 2 tiles (24 accumulators, 32-channel blocks that fit
/// both layers), then 6 and 2 registers (a kernel row of 32 channels, 96 floats; one
/// tap of 32 channels).
#[cfg(target_arch = "x86_64")]
const AVX512: Table = Table {
    conv: (12, 2),
    weight_grad: 6,
    input_grad: 2,
};
/// AVX2 (16 registers): 6 × 2 tiles (12 accumulators, as in inference), then 12 and 4
/// registers (the same 96 and 32 floats).
#[cfg(target_arch = "x86_64")]
const AVX2: Table = Table {
    conv: (6, 2),
    weight_grad: 12,
    input_grad: 4,
};
/// Plain Rust lanes of 4.
const PORTABLE: Table = Table {
    conv: (6, 2),
    weight_grad: 8,
    input_grad: 8,
};

/// The training convolutions at one SIMD level: each method runs the generic kernel
/// monomorphised for the level's lanes and its entry of the table ([`Table`]).
#[derive(Clone, Copy, Debug)]
struct Tiles(SimdLevel);

impl Tiles {
    /// The level's kernels, or those of the best level below it the CPU supports.
    fn at(level: SimdLevel) -> Tiles {
        Tiles(level.or_supported())
    }

    /// Output channels per block: the width [`direct::pack_blocks`] packs weights for.
    fn block(self) -> usize {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => AVX512.conv.1 * Avx512::N,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => AVX2.conv.1 * Avx2::N,
            _ => PORTABLE.conv.1 * Portable::N,
        }
    }

    /// `out (h·w, c_out) = conv3x3(pad)`, without bias: `pad` is one zero-padded
    /// `(h+2, w+2, c_in)` image, `weights` packed by [`direct::pack_blocks`] for
    /// [`Tiles::block`].
    fn conv(
        self,
        pad: &[f32],
        dims: (usize, usize, usize),
        weights: &[f32],
        c_out: usize,
        out: &mut [f32],
    ) {
        let wt = (weights, self.block());
        // SAFETY: `Tiles::at` only picks levels the CPU supports (`or_supported`), which
        // the wrappers' CPU features are; portable lanes are plain Rust. The kernels
        // check the slice lengths themselves.
        unsafe {
            match self.0 {
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx512 => conv_avx512(pad, dims, wt, c_out, out),
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx2 => conv_avx2(pad, dims, wt, c_out, out),
                _ => conv_with::<Portable, { PORTABLE.conv.0 }, { PORTABLE.conv.1 }>(
                    pad, dims, wt, c_out, out,
                ),
            }
        }
    }

    /// Both gradient products of one image: [`direct::routed_weight_grad`] into `gwt`
    /// and, given `wt_t` and `gxpad`, [`direct::routed_input_grad`].
    fn grads(
        self,
        pad: &[f32],
        dims: (usize, usize, usize),
        grads: &RoutedGrads,
        gwt: &mut [f32],
        input: Option<(&[f32], &mut [f32])>,
    ) {
        // SAFETY: as in `conv`.
        unsafe {
            match self.0 {
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx512 => grads_avx512(pad, dims, grads, gwt, input),
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx2 => grads_avx2(pad, dims, grads, gwt, input),
                _ => grads_with::<Portable, { PORTABLE.weight_grad }, { PORTABLE.input_grad }>(
                    pad, dims, grads, gwt, input,
                ),
            }
        }
    }
}

/// [`direct::conv2_tiles`] over every position of one image.
///
/// # Safety
/// `S`'s CPU features must be available.
#[inline(always)]
unsafe fn conv_with<S: Lanes, const R: usize, const NV: usize>(
    pad: &[f32],
    (h, w, c_in): (usize, usize, usize),
    wt: (&[f32], usize),
    c_out: usize,
    out: &mut [f32],
) {
    // SAFETY: `S`'s features are available (this function's contract); `conv2_tiles`
    // checks the slice lengths and positions itself.
    unsafe { direct::conv2_tiles::<S, R, NV>(pad, (h, w, c_in), wt, c_out, 0..h * w, out) }
}

/// The body of [`Tiles::grads`] on lanes `S`.
///
/// # Safety
/// `S`'s CPU features must be available.
#[inline(always)]
unsafe fn grads_with<S: Lanes, const WG: usize, const IG: usize>(
    pad: &[f32],
    dims: (usize, usize, usize),
    grads: &RoutedGrads,
    gwt: &mut [f32],
    input: Option<(&[f32], &mut [f32])>,
) {
    // SAFETY: `S`'s features are available (this function's contract); the kernels
    // check the slice lengths and the gradients' geometry themselves.
    unsafe {
        direct::routed_weight_grad::<S, WG>(pad, dims, grads, gwt);
        if let Some((wt_t, gxpad)) = input {
            direct::routed_input_grad::<S, IG>(wt_t, dims, grads, gxpad);
        }
    }
}

/// [`conv_with`] with the AVX-512 entry of the table.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn conv_avx512(
    pad: &[f32],
    dims: (usize, usize, usize),
    wt: (&[f32], usize),
    c_out: usize,
    out: &mut [f32],
) {
    // SAFETY: the CPU has AVX-512F, AVX2 and FMA (this function's contract), which
    // `Avx512` lanes need.
    unsafe { conv_with::<Avx512, { AVX512.conv.0 }, { AVX512.conv.1 }>(pad, dims, wt, c_out, out) }
}

/// [`conv_with`] with the AVX2 entry of the table.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv_avx2(
    pad: &[f32],
    dims: (usize, usize, usize),
    wt: (&[f32], usize),
    c_out: usize,
    out: &mut [f32],
) {
    // SAFETY: the CPU has AVX2 and FMA (this function's contract), which `Avx2` lanes
    // need.
    unsafe { conv_with::<Avx2, { AVX2.conv.0 }, { AVX2.conv.1 }>(pad, dims, wt, c_out, out) }
}

/// [`grads_with`] with the AVX-512 entry of the table.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn grads_avx512(
    pad: &[f32],
    dims: (usize, usize, usize),
    grads: &RoutedGrads,
    gwt: &mut [f32],
    input: Option<(&[f32], &mut [f32])>,
) {
    // SAFETY: the CPU has AVX-512F, AVX2 and FMA (this function's contract), which
    // `Avx512` lanes need.
    unsafe {
        grads_with::<Avx512, { AVX512.weight_grad }, { AVX512.input_grad }>(
            pad, dims, grads, gwt, input,
        )
    }
}

/// [`grads_with`] with the AVX2 entry of the table.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grads_avx2(
    pad: &[f32],
    dims: (usize, usize, usize),
    grads: &RoutedGrads,
    gwt: &mut [f32],
    input: Option<(&[f32], &mut [f32])>,
) {
    // SAFETY: the CPU has AVX2 and FMA (this function's contract), which `Avx2` lanes
    // need.
    unsafe {
        grads_with::<Avx2, { AVX2.weight_grad }, { AVX2.input_grad }>(pad, dims, grads, gwt, input)
    }
}

/// Returns the contiguous f32 slice behind a custom-op argument, or an error if the
/// tensor is not f32 or not contiguous (callers make inputs contiguous first).
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Reads an NHWC shape out of a layout.
fn nhwc(l: &Layout, op: &str) -> Result<(usize, usize, usize, usize)> {
    match l.shape().dims() {
        &[n, h, w, c] => Ok((n, h, w, c)),
        d => candle_core::bail!("{op}: expected an NHWC tensor, got shape {d:?}"),
    }
}

/// One rayon thread's buffers for one image at a time. The padding borders of `pad`
/// are never written, so stay zero.
struct Scratch {
    /// The input image, zero-padded by one pixel, `(h+2, w+2, c_in)`.
    pad: Vec<f32>,
    /// The convolution output `(h·w, c_out)`, before bias (forward pass).
    conv: Vec<f32>,
    /// The routed conv-output gradient (backward pass).
    grads: RoutedGrads,
    /// The input gradient, zero-padded, `(h+2, w+2, c_in)` (backward pass, when the
    /// input needs one).
    gxpad: Vec<f32>,
}

impl Scratch {
    /// Buffers for `(h, w, c_in)` images and `c_out` output channels, for the forward
    /// pass or the backward pass.
    fn new((h, w, c_in): (usize, usize, usize), c_out: usize, pass: Pass) -> Self {
        let padded = (h + 2) * (w + 2) * c_in;
        let backward = pass != Pass::Forward;
        Scratch {
            pad: vec![0f32; padded],
            conv: if backward {
                Vec::new()
            } else {
                vec![0f32; h * w * c_out]
            },
            grads: RoutedGrads::default(),
            gxpad: if pass == Pass::BackwardWithInput {
                vec![0f32; padded]
            } else {
                Vec::new()
            },
        }
    }
}

/// Which pass a [`Scratch`] serves (what it needs buffers for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
    /// The backward pass with an input gradient.
    BackwardWithInput,
}

/// The `(rows, cols)` row-major matrix `m` transposed.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    if cols == 0 {
        return out;
    }
    for (r, row) in m.chunks_exact(cols).enumerate().take(rows) {
        for (c, v) in row.iter().enumerate() {
            out[c * rows + r] = *v;
        }
    }
    out
}

/// Fused `relu(max_pool2(conv3x3(x)))`. The forward pass keeps each pooled value's
/// [`Route`] for the backward pass, which needs nothing else of it.
struct ConvPoolRelu {
    /// Whether the backward pass must produce a gradient for the input.
    input_grad: bool,
    tiles: Tiles,
    /// The routes of the forward pass, `(n, h/2, w/2, c_out)`, once it ran.
    routes: Mutex<Option<Arc<Vec<Route>>>>,
}

/// Validates the (x, w) arguments shared by the fused op and its backward op.
fn conv_args(
    l1: &Layout,
    l2: &Layout,
    c_out: usize,
    op: &str,
) -> Result<(usize, usize, usize, usize)> {
    let (n, h, w, c_in) = nhwc(l1, op)?;
    if l2.shape().dims() != [9 * c_in, c_out] {
        candle_core::bail!(
            "{op}: weight shape {:?} does not match ({}, {c_out})",
            l2.shape().dims(),
            9 * c_in
        );
    }
    Ok((n, h, w, c_in))
}

impl CustomOp3 for ConvPoolRelu {
    fn name(&self) -> &'static str {
        "conv3x3-pool2-relu-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let c_out = b.len();
        let (n, h, w, c_in) = conv_args(l1, l2, c_out, self.name())?;
        let (ho, wo) = (h / 2, w / 2);
        let (hw, pooled) = (h * w, ho * wo * c_out);
        let mut out = vec![0f32; n * pooled];
        let mut routes = vec![0 as Route; n * pooled];
        if pooled > 0 && c_in > 0 {
            let tiles = self.tiles;
            let blocks = direct::pack_blocks(wt, c_out, tiles.block());
            out.par_chunks_mut(pooled)
                .zip(routes.par_chunks_mut(pooled))
                .zip(x.par_chunks(hw * c_in))
                .for_each_init(
                    || Scratch::new((h, w, c_in), c_out, Pass::Forward),
                    |s, ((o, r), img)| {
                        pad_image(img, (h, w, c_in), &mut s.pad);
                        tiles.conv(&s.pad, (h, w, c_in), &blocks, c_out, &mut s.conv);
                        max_pool2_bias_relu_routes(&s.conv, (h, w, c_out), b, o, r);
                    },
                );
        }
        if let Ok(mut saved) = self.routes.lock() {
            *saved = Some(Arc::new(routes));
        }
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let routes = match self.routes.lock() {
            Ok(saved) => saved.clone(),
            Err(_) => None,
        };
        let Some(routes) = routes else {
            candle_core::bail!("{}: backward pass before the forward pass", self.name());
        };
        let grad = grad.contiguous()?;
        let packed = x.apply_op3_no_bwd(
            w,
            &grad,
            &ConvPoolReluGrad {
                input_grad: self.input_grad,
                tiles: self.tiles,
                routes,
            },
        )?;
        let (k, c_out) = w.dims2()?;
        let gw = packed.narrow(0, 0, k * c_out)?.reshape((k, c_out))?;
        let gb = packed.narrow(0, k * c_out, c_out)?;
        let gx = if self.input_grad {
            Some(
                packed
                    .narrow(0, (k + 1) * c_out, x.elem_count())?
                    .reshape(x.shape())?,
            )
        } else {
            None
        };
        Ok((gx, Some(gw), Some(gb)))
    }
}

/// One image's share of the backward pass's inputs: its input, its pooled output's
/// gradient and the forward pass's routes.
type ImageGrad<'a> = ((&'a [f32], &'a [f32]), &'a [Route]);

/// Backward of [`ConvPoolRelu`]. Arguments: x, w and the gradient of the pooled output.
/// Result, flat: weight grad `(9*c_in*c_out)`, bias grad `(c_out)`, then the input grad
/// `(n*h*w*c_in)` when requested.
struct ConvPoolReluGrad {
    input_grad: bool,
    tiles: Tiles,
    /// The forward pass's routes.
    routes: Arc<Vec<Route>>,
}

impl CustomOp3 for ConvPoolReluGrad {
    fn name(&self) -> &'static str {
        "conv3x3-pool2-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let (n, ho, wo, c_out) = nhwc(l3, self.name())?;
        let (_, h, w, c_in) = conv_args(l1, l2, c_out, self.name())?;
        if nhwc(l1, self.name())?.0 != n
            || (ho, wo) != (h / 2, w / 2)
            || self.routes.len() != g.len()
        {
            candle_core::bail!("{}: gradient shape mismatch", self.name());
        }
        let (hw, k, pooled) = (h * w, 9 * c_in, ho * wo * c_out);
        let gx_len = if self.input_grad { n * hw * c_in } else { 0 };
        let mut packed = vec![0f32; (k + 1) * c_out + gx_len];
        let (gwb, gx) = packed.split_at_mut((k + 1) * c_out);
        let (tiles, input_grad) = (self.tiles, self.input_grad);
        // The input gradient's weights, `(c_out, k)`, only when it is wanted.
        let wt_t = if input_grad {
            transposed(wt, k, c_out)
        } else {
            Vec::new()
        };
        let pass = if input_grad {
            Pass::BackwardWithInput
        } else {
            Pass::Backward
        };
        let init = || {
            (
                Scratch::new((h, w, c_in), c_out, pass),
                vec![0f32; (k + 1) * c_out],
            )
        };
        let step = |(mut s, mut acc): (Scratch, Vec<f32>),
                    (gxi, ((img, gi), ri)): (&mut [f32], ImageGrad<'_>)| {
            pad_image(img, (h, w, c_in), &mut s.pad);
            // `acc` holds the weight gradient transposed, `(c_out, k)`, then the bias's.
            let (gwt, gb) = acc.split_at_mut(k * c_out);
            s.grads.gather(gi, ri, (h, w, c_out), gb);
            if input_grad {
                s.gxpad.fill(0.0);
                let input = Some((&wt_t[..], &mut s.gxpad[..]));
                tiles.grads(&s.pad, (h, w, c_in), &s.grads, gwt, input);
                unpad_image(&s.gxpad, (h, w, c_in), gxi);
            } else {
                tiles.grads(&s.pad, (h, w, c_in), &s.grads, gwt, None);
            }
            (s, acc)
        };
        // (Chunks of zero elements are refused: an empty pooled output or input has no
        // gradient to compute.)
        let (chunk_x, chunk_g) = (hw * c_in, pooled);
        if n == 0 || chunk_x == 0 || chunk_g == 0 {
            return Ok((
                CpuStorage::F32(packed),
                Shape::from((k + 1) * c_out + gx_len),
            ));
        }
        let imgs = x
            .par_chunks(chunk_x)
            .zip(g.par_chunks(chunk_g))
            .zip(self.routes.par_chunks(chunk_g));
        let sum = |mut a: Vec<f32>, b: Vec<f32>| {
            for (x, y) in a.iter_mut().zip(&b) {
                *x += y;
            }
            a
        };
        let total = if input_grad {
            gx.par_chunks_mut(hw * c_in)
                .zip(imgs)
                .fold(init, step)
                .map(|s| s.1)
                .reduce(|| vec![0f32; (k + 1) * c_out], sum)
        } else {
            imgs.map(|p| (<&mut [f32]>::default(), p))
                .fold(init, step)
                .map(|s| s.1)
                .reduce(|| vec![0f32; (k + 1) * c_out], sum)
        };
        let (gw, gb) = gwb.split_at_mut(k * c_out);
        gw.copy_from_slice(&transposed(&total[..k * c_out], c_out, k));
        gb.copy_from_slice(&total[k * c_out..]);
        Ok((
            CpuStorage::F32(packed),
            Shape::from((k + 1) * c_out + gx_len),
        ))
    }
}

/// Fused `relu(max_pool2(conv3x3(x, w, b)))` on NHWC tensors: 3×3 convolution (stride 1,
/// zero padding 1, with bias), 2×2 max pooling with stride 2 (an odd last row or column is
/// dropped), ReLU. Same result as three separate ops but much less memory traffic, which
/// is what limits separate ops on CPU. `w` is `(9 * c_in, c_out)` (see the module docs),
/// `b` is `(c_out)`. Set `input_grad` to false when `x` never needs a gradient (the
/// network's input) to skip that work.
pub(crate) fn conv3x3_pool2_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    input_grad: bool,
) -> Result<Tensor> {
    conv3x3_pool2_relu_at(simd_level(), x, w, b, input_grad)
}

/// [`conv3x3_pool2_relu`] with the kernels of `level` (or the best supported level
/// below it), for tests that run every level.
pub(crate) fn conv3x3_pool2_relu_at(
    level: SimdLevel,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    input_grad: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let b = b.contiguous()?;
    x.apply_op3(
        &w,
        &b,
        ConvPoolRelu {
            input_grad,
            tiles: Tiles::at(level),
            routes: Mutex::new(None),
        },
    )
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    use super::conv3x3_pool2_relu_at;
    use crate::reference::{self, conv_weight_from_oihw, rel_err_tensors};
    use crate::simd::SimdLevel;

    /// [`check_fused_at`] at every SIMD level the CPU has (the portable level included).
    fn check_fused(dims: (usize, usize, usize, usize, usize), input_grad: bool) -> Result<()> {
        for level in SimdLevel::supported() {
            check_fused_at(level, dims, input_grad)?;
        }
        Ok(())
    }

    /// The fused op at `level` against the reference layer on random data of shape
    /// `(n, h, w, c_in) → c_out`: the output, and the gradients of a random projection of it
    /// for `w`, `b` and, if `input_grad`, `x` (which must have none otherwise).
    fn check_fused_at(
        level: SimdLevel,
        (n, h, w, c_in, c_out): (usize, usize, usize, usize, usize),
        input_grad: bool,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (n, h, w, c_in), &dev)?;
        let wt = Var::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
        let b = Var::randn(0f32, 0.5, c_out, &dev)?;
        let shape = format!("{level}: {n}x{h}x{w}x{c_in}->{c_out}, input_grad {input_grad}");
        let wk = conv_weight_from_oihw(&wt)?;
        let ours = conv3x3_pool2_relu_at(level, &x, &wk, &b, input_grad)?;
        let reference = reference::conv3x3_pool2_relu(&x, &wt, &b)?;
        let e = rel_err_tensors(&ours, &reference)?;
        assert!(e < 1e-4, "{shape}: forward rel err {e}");
        let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
        let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
        let g_ref = (&reference * &probe)?.sum_all()?.backward()?;
        assert_eq!(
            g_ours.get(&x).is_some(),
            input_grad,
            "{shape}: input gradient"
        );
        let mut checked = vec![("w", &wt), ("b", &b)];
        if input_grad {
            checked.push(("x", &x));
        }
        for (name, v) in checked {
            let (a, r) = (
                g_ours.get(v).expect("ours"),
                g_ref.get(v).expect("reference"),
            );
            let e = rel_err_tensors(a, r)?;
            assert!(e < 1e-4, "{shape}: grad {name} rel err {e}");
        }
        Ok(())
    }

    /// Odd sizes check that pooling drops the last row / column in both passes.
    #[test]
    fn fused_conv_pool_relu_matches_reference() -> Result<()> {
        for dims in [
            (3, 8, 6, 1, 4),
            (3, 6, 5, 1, 4),
            (2, 7, 9, 5, 3),
            (2, 4, 8, 8, 16),
            (4, 14, 14, 8, 16),
            (3, 14, 14, 32, 64),
            (2, 28, 28, 1, 32),
            (2, 5, 3, 7, 37),
        ] {
            check_fused(dims, true)?;
        }
        Ok(())
    }

    /// An input too small to pool (fewer than 2 rows or columns) has an empty output,
    /// and the backward pass gives zero gradients instead of failing.
    #[test]
    fn inputs_too_small_to_pool_get_zero_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for level in SimdLevel::supported() {
            for (h, w) in [(1, 5), (4, 1)] {
                let x = Var::randn(0f32, 1.0, (2, h, w, 3), &dev)?;
                let wt = Var::randn(0f32, 0.3, (27, 4), &dev)?;
                let b = Var::randn(0f32, 0.5, 4, &dev)?;
                let y = conv3x3_pool2_relu_at(level, &x, &wt, &b, true)?;
                assert_eq!(y.dims(), &[2, h / 2, w / 2, 4], "{level} {h}x{w}");
                let grads = y.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("w", &wt), ("b", &b)] {
                    let g = grads.get(v).expect("a gradient");
                    let max = g.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert_eq!(max, 0.0, "{level} {h}x{w}: grad {name}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fused_without_input_grad_matches_reference() -> Result<()> {
        for dims in [(3, 6, 6, 1, 4), (2, 7, 9, 5, 3)] {
            check_fused(dims, false)?;
        }
        Ok(())
    }
}
