//! Fast CPU kernels for the CNN, as candle custom ops with their own backward passes.
//!
//! candle's generic `conv2d` / `max_pool2d` are slow on CPU (especially their backward
//! passes), so the two expensive layers are written here on NHWC tensors:
//!
//! * [`conv3x3`]: 3×3 convolution, stride 1, zero padding 1 ("same" size), with bias.
//!   Each image is unfolded (im2col) into a per-thread buffer that stays in cache and
//!   multiplied with the weight matrix by `gemm`; images are spread over rayon threads.
//! * [`max_pool2`]: 2×2 max pooling with stride 2 (odd trailing rows/columns are dropped).
//!
//! Weight layout of [`conv3x3`]: a `(9 * c_in, c_out)` matrix whose row
//! `(ky * 3 + kx) * c_in + ci` holds the weights applied to input channel `ci` at kernel
//! offset `(ky, kx)`. [`conv_weight_from_oihw`] converts candle/PyTorch `(c_out, c_in, 3, 3)`
//! weights to it.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)` on row/column strided f32 buffers, single
/// threaded (the callers already run one image per thread).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above guarantee every index gemm touches is inside the slices,
    // and `dst` is a unique borrow so it cannot alias `lhs`/`rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Unfolds one HWC image into `(h*w, 9*c)` patches for a 3×3 "same" convolution.
fn im2col(img: &[f32], h: usize, w: usize, c: usize, patches: &mut [f32]) {
    let row_len = 9 * c;
    for y in 0..h {
        for x in 0..w {
            let row = &mut patches[(y * w + x) * row_len..][..row_len];
            for ky in 0..3 {
                let iy = y as isize + ky as isize - 1;
                for kx in 0..3 {
                    let ix = x as isize + kx as isize - 1;
                    let dst = &mut row[(ky * 3 + kx) * c..][..c];
                    if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                        let src = (iy as usize * w + ix as usize) * c;
                        dst.copy_from_slice(&img[src..src + c]);
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
        }
    }
}

/// Adds `(h*w, 9*c)` patch gradients back onto one HWC image gradient (inverse of [`im2col`]).
fn col2im(patches: &[f32], h: usize, w: usize, c: usize, img: &mut [f32]) {
    let row_len = 9 * c;
    img.fill(0.0);
    for y in 0..h {
        for x in 0..w {
            let row = &patches[(y * w + x) * row_len..][..row_len];
            for ky in 0..3 {
                let iy = y as isize + ky as isize - 1;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..3 {
                    let ix = x as isize + kx as isize - 1;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let dst = &mut img[(iy as usize * w + ix as usize) * c..][..c];
                    let src = &row[(ky * 3 + kx) * c..][..c];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// Forward op of [`conv3x3`]: arguments (input NHWC, weight `(9*c_in, c_out)`, bias `(c_out)`).
struct Conv3x3 {
    /// Whether the backward pass must produce a gradient for the input (false for the first
    /// layer, whose input is data, which saves a third of its backward cost).
    input_grad: bool,
}

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3-nhwc"
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
        let (n, h, w, c_in) = nhwc(l1, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let k = 9 * c_in;
        let c_out = b.len();
        if l2.shape().dims() != [k, c_out] {
            candle_core::bail!(
                "conv3x3: weight shape {:?} does not match ({k}, {c_out})",
                l2.shape().dims()
            );
        }
        let hw = h * w;
        let mut out = vec![0f32; n * hw * c_out];
        if n > 0 && hw > 0 && c_out > 0 {
            out.par_chunks_mut(hw * c_out)
                .zip(x.par_chunks(hw * c_in))
                .for_each_init(
                    || vec![0f32; hw * k],
                    |patches, (o, img)| {
                        im2col(img, h, w, c_in, patches);
                        for row in o.chunks_exact_mut(c_out) {
                            row.copy_from_slice(b);
                        }
                        sgemm(hw, c_out, k, o, true, patches, k, 1, wt, c_out, 1);
                    },
                );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gwb = x.apply_op2_no_bwd(&grad, &Conv3x3GradWeight)?;
        let k = w.dim(0)?;
        let gw = gwb.narrow(0, 0, k)?;
        let gb = gwb.narrow(0, k, 1)?.squeeze(0)?;
        let gx = if self.input_grad {
            Some(grad.apply_op2_no_bwd(w, &Conv3x3GradInput)?)
        } else {
            None
        };
        Ok((gx, Some(gw), Some(gb)))
    }
}

/// Backward op: (input NHWC, output gradient NHWC) → `(9*c_in + 1, c_out)`: the weight
/// gradient with the bias gradient appended as the last row.
struct Conv3x3GradWeight;

impl CustomOp2 for Conv3x3GradWeight {
    fn name(&self) -> &'static str {
        "conv3x3-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c_in) = nhwc(l1, self.name())?;
        let (_, _, _, c_out) = nhwc(l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let k = 9 * c_in;
        let hw = h * w;
        let total = (0..n)
            .into_par_iter()
            .fold(
                || (vec![0f32; hw * k], vec![0f32; (k + 1) * c_out]),
                |(mut patches, mut acc), i| {
                    let img = &x[i * hw * c_in..][..hw * c_in];
                    let gi = &g[i * hw * c_out..][..hw * c_out];
                    im2col(img, h, w, c_in, &mut patches);
                    // acc[0..k] += patches^T · g_i
                    sgemm(k, c_out, hw, &mut acc, true, &patches, 1, k, gi, c_out, 1);
                    let gb = &mut acc[k * c_out..];
                    for row in gi.chunks_exact(c_out) {
                        for (a, v) in gb.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    (patches, acc)
                },
            )
            .map(|(_, acc)| acc)
            .reduce(
                || vec![0f32; (k + 1) * c_out],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += y;
                    }
                    a
                },
            );
        Ok((CpuStorage::F32(total), Shape::from((k + 1, c_out))))
    }
}

/// Backward op: (output gradient NHWC, weight) → input gradient NHWC.
struct Conv3x3GradInput;

impl CustomOp2 for Conv3x3GradInput {
    fn name(&self) -> &'static str {
        "conv3x3-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c_out) = nhwc(l1, self.name())?;
        let g = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let k = l2.shape().dims()[0];
        let c_in = k / 9;
        let hw = h * w;
        let mut gx = vec![0f32; n * hw * c_in];
        if n > 0 && hw > 0 && c_in > 0 {
            gx.par_chunks_mut(hw * c_in)
                .zip(g.par_chunks(hw * c_out))
                .for_each_init(
                    || vec![0f32; hw * k],
                    |patches, (gxi, gi)| {
                        // patches (hw×k) = g_i (hw×c_out) · w^T (c_out×k)
                        sgemm(hw, k, c_out, patches, false, gi, c_out, 1, wt, 1, c_out);
                        col2im(patches, h, w, c_in, gxi);
                    },
                );
        }
        Ok((CpuStorage::F32(gx), Shape::from((n, h, w, c_in))))
    }
}

/// 3×3 convolution, stride 1, zero padding 1, on an NHWC f32 tensor.
///
/// `w` is `(9 * c_in, c_out)` (see the module docs), `b` is `(c_out)`. Set `input_grad` to
/// false when `x` never needs a gradient (the network's input) to skip that work.
pub fn conv3x3(x: &Tensor, w: &Tensor, b: &Tensor, input_grad: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let b = b.contiguous()?;
    x.apply_op3(&w, &b, Conv3x3 { input_grad })
}

/// Converts `(c_out, c_in, 3, 3)` convolution weights (candle / PyTorch layout) into the
/// `(9 * c_in, c_out)` layout used by [`conv3x3`].
pub fn conv_weight_from_oihw(w: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("expected a 3x3 kernel, got {kh}x{kw}");
    }
    // (o, i, ky, kx) -> (ky, kx, i, o)
    w.permute((2, 3, 1, 0))?
        .contiguous()?
        .reshape((9 * c_in, c_out))
}

/// 2×2 max pooling forward op on NHWC.
struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "maxpool2-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = nhwc(l, self.name())?;
        let x = contiguous_f32(s, l, self.name())?;
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![0f32; n * ho * wo * c];
        if !out.is_empty() {
            out.par_chunks_mut(ho * wo * c)
                .zip(x.par_chunks(h * w * c))
                .for_each(|(o, img)| {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let dst = &mut o[(oy * wo + ox) * c..][..c];
                            let p00 = &img[((2 * oy) * w + 2 * ox) * c..][..c];
                            let p01 = &img[((2 * oy) * w + 2 * ox + 1) * c..][..c];
                            let p10 = &img[((2 * oy + 1) * w + 2 * ox) * c..][..c];
                            let p11 = &img[((2 * oy + 1) * w + 2 * ox + 1) * c..][..c];
                            for ch in 0..c {
                                dst[ch] = p00[ch].max(p01[ch]).max(p10[ch].max(p11[ch]));
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, &MaxPool2Grad)?))
    }
}

/// Backward op of [`max_pool2`]: (input, output gradient) → input gradient; the gradient
/// of each window goes to its first maximal element.
struct MaxPool2Grad;

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "maxpool2-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = nhwc(l1, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let (ho, wo) = (h / 2, w / 2);
        let mut gx = vec![0f32; n * h * w * c];
        if ho * wo * c > 0 {
            gx.par_chunks_mut(h * w * c)
                .zip(x.par_chunks(h * w * c))
                .zip(g.par_chunks(ho * wo * c))
                .for_each(|((gxi, img), gi)| {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let offs = [
                                ((2 * oy) * w + 2 * ox) * c,
                                ((2 * oy) * w + 2 * ox + 1) * c,
                                ((2 * oy + 1) * w + 2 * ox) * c,
                                ((2 * oy + 1) * w + 2 * ox + 1) * c,
                            ];
                            let go = &gi[(oy * wo + ox) * c..][..c];
                            for ch in 0..c {
                                let mut best = offs[0];
                                for &o in &offs[1..] {
                                    if img[o + ch] > img[best + ch] {
                                        best = o;
                                    }
                                }
                                gxi[best + ch] += go[ch];
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(gx), Shape::from((n, h, w, c))))
    }
}

/// 2×2 max pooling, stride 2, on an NHWC f32 tensor (trailing odd row/column dropped).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool2)
}

/// Pools one image's `(h*w, c)` conv output into `(h/2 * w/2, c)` with ReLU applied.
fn pool_relu(conv: &[f32], h: usize, w: usize, c: usize, out: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    for oy in 0..ho {
        for ox in 0..wo {
            let dst = &mut out[(oy * wo + ox) * c..][..c];
            let p00 = &conv[((2 * oy) * w + 2 * ox) * c..][..c];
            let p01 = &conv[((2 * oy) * w + 2 * ox + 1) * c..][..c];
            let p10 = &conv[((2 * oy + 1) * w + 2 * ox) * c..][..c];
            let p11 = &conv[((2 * oy + 1) * w + 2 * ox + 1) * c..][..c];
            for ch in 0..c {
                dst[ch] = p00[ch].max(p01[ch]).max(p10[ch].max(p11[ch])).max(0.0);
            }
        }
    }
}

/// Routes the pooled+ReLU gradient `go` back to the conv output positions (`gconv`, fully
/// overwritten): each window's gradient goes to its first maximum, if that maximum is > 0.
/// Written branch-free over exact-length slices so the channel loop vectorises.
fn pool_relu_grad(conv: &[f32], go: &[f32], h: usize, w: usize, c: usize, gconv: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    if h % 2 == 1 || w % 2 == 1 {
        gconv.fill(0.0); // positions outside every window get no gradient
    }
    let row = w * c;
    for oy in 0..ho {
        let (g_top, g_bot) = gconv[2 * oy * row..(2 * oy + 2) * row].split_at_mut(row);
        let x_top = &conv[2 * oy * row..(2 * oy + 1) * row];
        let x_bot = &conv[(2 * oy + 1) * row..(2 * oy + 2) * row];
        for ox in 0..wo {
            let span = 2 * ox * c..(2 * ox + 2) * c;
            let (x00, x01) = x_top[span.clone()].split_at(c);
            let (x10, x11) = x_bot[span.clone()].split_at(c);
            let (g00, g01) = g_top[span.clone()].split_at_mut(c);
            let (g10, g11) = g_bot[span].split_at_mut(c);
            let g = &go[(oy * wo + ox) * c..][..c];
            for ch in 0..c {
                let (a, b, cc, d) = (x00[ch], x01[ch], x10[ch], x11[ch]);
                let m01 = if a > b { a } else { b };
                let m23 = if cc > d { cc } else { d };
                let m = if m01 > m23 { m01 } else { m23 };
                let gv = if m > 0.0 { g[ch] } else { 0.0 };
                // one-hot of the first maximum, as integer masks (no branches)
                let t0 = (a == m) as u32;
                let t1 = (b == m) as u32 & (t0 ^ 1);
                let t2 = (cc == m) as u32 & ((t0 | t1) ^ 1);
                let t3 = (t0 | t1 | t2) ^ 1;
                g00[ch] = gv * t0 as f32;
                g01[ch] = gv * t1 as f32;
                g10[ch] = gv * t2 as f32;
                g11[ch] = gv * t3 as f32;
            }
        }
    }
}

/// Computes one image's conv output `(h*w, c_out)` into `conv`, leaving its im2col
/// patches in `patches`.
#[allow(clippy::too_many_arguments)]
fn conv_image(
    img: &[f32],
    (h, w, c_in): (usize, usize, usize),
    wt: &[f32],
    b: &[f32],
    patches: &mut [f32],
    conv: &mut [f32],
) {
    let k = 9 * c_in;
    let c_out = b.len();
    im2col(img, h, w, c_in, patches);
    for row in conv.chunks_exact_mut(c_out) {
        row.copy_from_slice(b);
    }
    sgemm(h * w, c_out, k, conv, true, patches, k, 1, wt, c_out, 1);
}

/// Fused `relu(max_pool2(conv3x3(x)))`: the full-resolution conv output only ever lives in
/// a per-thread, cache-sized buffer, in both the forward and the backward pass (which
/// recomputes it rather than storing it).
struct ConvPoolRelu {
    /// Whether the backward pass must produce a gradient for the input.
    input_grad: bool,
}

/// Validates the (x, w, b) arguments shared by the fused op and its backward op.
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
        let hw = h * w;
        let mut out = vec![0f32; n * ho * wo * c_out];
        if !out.is_empty() {
            out.par_chunks_mut(ho * wo * c_out)
                .zip(x.par_chunks(hw * c_in))
                .for_each_init(
                    || (vec![0f32; hw * 9 * c_in], vec![0f32; hw * c_out]),
                    |(patches, conv), (o, img)| {
                        conv_image(img, (h, w, c_in), wt, b, patches, conv);
                        pool_relu(conv, h, w, c_out, o);
                    },
                );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let packed = x.apply_op3_no_bwd(
            w,
            &Tensor::cat(&[b, &grad.flatten_all()?], 0)?,
            &ConvPoolReluGrad {
                input_grad: self.input_grad,
                grad_dims: grad.dims().to_vec(),
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

/// Backward of [`ConvPoolRelu`]. Arguments: x, w, and `[b, grad_out.flatten()]` (custom ops
/// take at most three tensors). Result, flat: weight grad `(9*c_in*c_out)`, bias grad
/// `(c_out)`, then the input grad `(n*h*w*c_in)` when requested.
struct ConvPoolReluGrad {
    input_grad: bool,
    grad_dims: Vec<usize>,
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
        let bg = contiguous_f32(s3, l3, self.name())?;
        let c_out = match self.grad_dims[..] {
            [_, _, _, c] => c,
            _ => candle_core::bail!("{}: bad grad dims", self.name()),
        };
        let (n, h, w, c_in) = conv_args(l1, l2, c_out, self.name())?;
        let (b, g) = bg.split_at(c_out);
        let (ho, wo) = (h / 2, w / 2);
        let (hw, k) = (h * w, 9 * c_in);
        if self.grad_dims != [n, ho, wo, c_out] || g.len() != n * ho * wo * c_out {
            candle_core::bail!("{}: gradient shape mismatch", self.name());
        }
        let gx_len = if self.input_grad { n * hw * c_in } else { 0 };
        let mut packed = vec![0f32; (k + 1) * c_out + gx_len];
        let (gwb, gx) = packed.split_at_mut((k + 1) * c_out);
        let input_grad = self.input_grad;
        let init = || {
            (
                vec![0f32; hw * k],
                vec![0f32; hw * c_out],
                vec![0f32; hw * c_out],
                vec![0f32; (k + 1) * c_out],
            )
        };
        let step = |(mut patches, mut conv, mut gconv, mut acc): (
            Vec<f32>,
            Vec<f32>,
            Vec<f32>,
            Vec<f32>,
        ),
                    (gxi, (img, gi)): (&mut [f32], (&[f32], &[f32]))| {
            conv_image(img, (h, w, c_in), wt, b, &mut patches, &mut conv);
            pool_relu_grad(&conv, gi, h, w, c_out, &mut gconv);
            sgemm(
                k, c_out, hw, &mut acc, true, &patches, 1, k, &gconv, c_out, 1,
            );
            let gb = &mut acc[k * c_out..];
            for row in gconv.chunks_exact(c_out) {
                for (a, v) in gb.iter_mut().zip(row) {
                    *a += v;
                }
            }
            if input_grad {
                sgemm(
                    hw,
                    k,
                    c_out,
                    &mut patches,
                    false,
                    &gconv,
                    c_out,
                    1,
                    wt,
                    1,
                    c_out,
                );
                col2im(&patches, h, w, c_in, gxi);
            }
            (patches, conv, gconv, acc)
        };
        let imgs = x.par_chunks(hw * c_in).zip(g.par_chunks(ho * wo * c_out));
        let sum = |mut a: Vec<f32>, b: Vec<f32>| {
            for (x, y) in a.iter_mut().zip(&b) {
                *x += y;
            }
            a
        };
        let total = if n == 0 {
            vec![0f32; (k + 1) * c_out]
        } else if input_grad {
            gx.par_chunks_mut(hw * c_in)
                .zip(imgs)
                .fold(init, step)
                .map(|s| s.3)
                .reduce(|| vec![0f32; (k + 1) * c_out], sum)
        } else {
            imgs.map(|p| (<&mut [f32]>::default(), p))
                .fold(init, step)
                .map(|s| s.3)
                .reduce(|| vec![0f32; (k + 1) * c_out], sum)
        };
        gwb.copy_from_slice(&total);
        Ok((
            CpuStorage::F32(packed),
            Shape::from((k + 1) * c_out + gx_len),
        ))
    }
}

/// Fused `relu(max_pool2(conv3x3(x, w, b)))` on NHWC tensors: same result as the three
/// separate ops but much less memory traffic, which is what limits the separate ops on CPU.
/// Weight layout as in [`conv3x3`]; `input_grad` as in [`conv3x3`].
pub fn conv3x3_pool2_relu(x: &Tensor, w: &Tensor, b: &Tensor, input_grad: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let b = b.contiguous()?;
    x.apply_op3(&w, &b, ConvPoolRelu { input_grad })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// max |a - b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        let scale = b
            .abs()
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("scale");
        diff / scale.max(1e-12)
    }

    /// Reference 2x2 max pool built from reshapes and `max` reductions. candle's own
    /// `max_pool2d` forward is used as a reference too, but its backward scales the gradient
    /// by 1/4 (it multiplies by the window's mean mask instead of dividing by the count), so
    /// gradients are checked against this instead.
    fn ref_pool_nhwc(x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        x.narrow(1, 0, h / 2 * 2)?
            .narrow(2, 0, w / 2 * 2)?
            .contiguous()?
            .reshape((n, h / 2, 2, w / 2, 2, c))?
            .max(4)?
            .max(2)
    }

    fn check_conv(n: usize, h: usize, w: usize, c_in: usize, c_out: usize) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (n, h, w, c_in), &dev)?;
        let wt = Var::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
        let b = Var::randn(0f32, 1.0, c_out, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (n, h, w, c_out), &dev)?;

        let ours = conv3x3(
            x.as_tensor(),
            &conv_weight_from_oihw(wt.as_tensor())?,
            &b,
            true,
        )?;
        let reference = x
            .permute((0, 3, 1, 2))?
            .conv2d(wt.as_tensor(), 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, c_out, 1, 1))?)?
            .permute((0, 2, 3, 1))?;
        assert!(rel_err(&ours, &reference) < 1e-4, "forward mismatch");

        let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
        let g_ref = (&reference * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &wt), ("b", &b)] {
            let a = g_ours.get(v).expect("grad ours");
            let r = g_ref.get(v).expect("grad ref");
            let e = rel_err(a, r);
            assert!(e < 1e-4, "grad {name} mismatch: {e}");
        }
        Ok(())
    }

    #[test]
    fn conv3x3_matches_candle_conv2d() -> Result<()> {
        check_conv(3, 6, 5, 1, 4)?;
        check_conv(2, 7, 7, 5, 3)?;
        check_conv(2, 4, 8, 8, 16)
    }

    #[test]
    fn conv3x3_without_input_grad_skips_it() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 4, 4, 1), &dev)?;
        let w = Var::randn(0f32, 1.0, (9, 2), &dev)?;
        let b = Var::zeros(2, candle_core::DType::F32, &dev)?;
        let g = conv3x3(&x, &w, &b, false)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_none());
        assert!(g.get(&w).is_some());
        Ok(())
    }

    #[test]
    fn max_pool2_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (n, h, w, c) in [(2, 6, 4, 3), (3, 7, 5, 2), (1, 28, 28, 8)] {
            let x = Var::randn(0f32, 1.0, (n, h, w, c), &dev)?;
            let ours = max_pool2(&x)?;
            let reference = x
                .permute((0, 3, 1, 2))?
                .max_pool2d(2)?
                .permute((0, 2, 3, 1))?;
            assert!(rel_err(&ours, &reference) < 1e-6, "forward mismatch");
            let reference = ref_pool_nhwc(&x)?;
            assert!(
                rel_err(&ours, &reference) < 1e-6,
                "forward mismatch (reshape ref)"
            );
            let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
            let a = (&ours * &probe)?.sum_all()?.backward()?;
            let r = (&reference * &probe)?.sum_all()?.backward()?;
            let (a, r) = (a.get(&x).expect("ours"), r.get(&x).expect("ref"));
            assert!(rel_err(a, r) < 1e-6, "grad mismatch");
        }
        Ok(())
    }
    fn check_fused(n: usize, h: usize, w: usize, c_in: usize, c_out: usize) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (n, h, w, c_in), &dev)?;
        let wt = Var::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
        let b = Var::randn(0f32, 0.5, c_out, &dev)?;
        let ours = conv3x3_pool2_relu(&x, &conv_weight_from_oihw(&wt)?, &b, true)?;
        let conv = x
            .permute((0, 3, 1, 2))?
            .conv2d(&wt, 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, c_out, 1, 1))?)?;
        let candle_pooled = conv.max_pool2d(2)?.relu()?.permute((0, 2, 3, 1))?;
        assert!(rel_err(&ours, &candle_pooled) < 1e-4, "forward mismatch");
        let reference = ref_pool_nhwc(&conv.permute((0, 2, 3, 1))?)?.relu()?;
        assert!(rel_err(&ours, &reference) < 1e-4, "forward mismatch");
        let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
        let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
        let g_ref = (&reference * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &wt), ("b", &b)] {
            let e = rel_err(
                g_ours.get(v).expect("grad ours"),
                g_ref.get(v).expect("grad ref"),
            );
            assert!(e < 1e-4, "grad {name} mismatch: {e}");
        }
        Ok(())
    }

    #[test]
    fn fused_conv_pool_relu_matches_candle() -> Result<()> {
        check_fused(3, 8, 6, 1, 4)?;
        check_fused(2, 7, 9, 5, 3)?;
        check_fused(4, 14, 14, 8, 16)
    }

    #[test]
    fn fused_without_input_grad() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 6, 6, 1), &dev)?;
        let w = Var::randn(0f32, 1.0, (9, 4), &dev)?;
        let b = Var::randn(0f32, 1.0, 4, &dev)?;
        let fused = conv3x3_pool2_relu(&x, &w, &b, false)?;
        let separate = max_pool2(&conv3x3(&x, &w, &b, false)?)?.relu()?;
        assert!(rel_err(&fused, &separate) < 1e-5);
        let gf = fused.sum_all()?.backward()?;
        let gs = separate.sum_all()?.backward()?;
        assert!(gf.get(&x).is_none());
        for v in [&w, &b] {
            let (a, r) = (gf.get(v).expect("fused"), gs.get(v).expect("separate"));
            assert!(rel_err(a, r) < 1e-4);
        }
        Ok(())
    }
}
