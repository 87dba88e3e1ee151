//! The network's expensive layer as a candle custom op with its own backward pass:
//! [`conv3x3_pool2_relu`], `relu(max_pool2(conv3x3(x, w, b)))` on NHWC tensors. It is what
//! [`crate::model::Net::forward`] runs, so training and the candle reference of inference
//! ([`crate::Classifier::predict_candle`]) go through it; candle's generic `conv2d` /
//! `max_pool2d` are slow on CPU, especially their backward passes (and `max_pool2d`'s
//! backward scales gradients by 1/4).
//!
//! Each image is padded and unfolded (im2col) into per-thread buffers that stay in cache and
//! multiplied with the weight matrix by `gemm`; images are spread over rayon threads. The
//! slice kernels are shared with the fast inference path ([`crate::kernels`]); the tests
//! check forward and backward against candle's generic ops (`reference`).
//!
//! Weight layout: a `(9 * c_in, c_out)` matrix whose row `(ky * 3 + kx) * c_in + ci` holds
//! the weights applied to input channel `ci` at kernel offset `(ky, kx)` (see
//! [`crate::model::names`]).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::{col2im, im2col, max_pool2_relu, max_pool2_relu_grad, pad_image, sgemm};

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

/// One rayon thread's buffers for the convolution of one image at a time.
struct ConvScratch {
    /// The image, zero-padded by one pixel (the border is never written, so stays zero).
    pad: Vec<f32>,
    /// Its im2col patches, `(h * w, 9 * c_in)`.
    patches: Vec<f32>,
    /// The convolution output `(h * w, c_out)`, bias included.
    conv: Vec<f32>,
}

impl ConvScratch {
    /// Buffers for `(h, w, c_in)` images and `c_out` output channels.
    fn new((h, w, c_in): (usize, usize, usize), c_out: usize) -> Self {
        ConvScratch {
            pad: vec![0f32; (h + 2) * (w + 2) * c_in],
            patches: vec![0f32; h * w * 9 * c_in],
            conv: vec![0f32; h * w * c_out],
        }
    }

    /// Computes one HWC image's conv output into `conv`, leaving its patches in `patches`.
    fn conv_image(&mut self, img: &[f32], dims: (usize, usize, usize), wt: &[f32], b: &[f32]) {
        let (h, w, c_in) = dims;
        let k = 9 * c_in;
        let c_out = b.len();
        pad_image(img, dims, &mut self.pad);
        im2col(&self.pad, dims, &mut self.patches);
        for row in self.conv.chunks_exact_mut(c_out) {
            row.copy_from_slice(b);
        }
        sgemm(
            h * w,
            c_out,
            k,
            &mut self.conv,
            true,
            &self.patches,
            k,
            1,
            wt,
            c_out,
            1,
        );
    }
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
                    || ConvScratch::new((h, w, c_in), c_out),
                    |scratch, (o, img)| {
                        scratch.conv_image(img, (h, w, c_in), wt, b);
                        max_pool2_relu(&scratch.conv, (h, w, c_out), None, o);
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
                ConvScratch::new((h, w, c_in), c_out),
                vec![0f32; hw * c_out],
                vec![0f32; (k + 1) * c_out],
            )
        };
        let step = |(mut s, mut gconv, mut acc): (ConvScratch, Vec<f32>, Vec<f32>),
                    (gxi, (img, gi)): (&mut [f32], (&[f32], &[f32]))| {
            s.conv_image(img, (h, w, c_in), wt, b);
            max_pool2_relu_grad(&s.conv, gi, (h, w, c_out), &mut gconv);
            sgemm(
                k, c_out, hw, &mut acc, true, &s.patches, 1, k, &gconv, c_out, 1,
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
                    &mut s.patches,
                    false,
                    &gconv,
                    c_out,
                    1,
                    wt,
                    1,
                    c_out,
                );
                col2im(&s.patches, (h, w, c_in), gxi);
            }
            (s, gconv, acc)
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
                .map(|s| s.2)
                .reduce(|| vec![0f32; (k + 1) * c_out], sum)
        } else {
            imgs.map(|p| (<&mut [f32]>::default(), p))
                .fold(init, step)
                .map(|s| s.2)
                .reduce(|| vec![0f32; (k + 1) * c_out], sum)
        };
        gwb.copy_from_slice(&total);
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
/// network's input) to skip that work, a third of the backward cost.
pub(crate) fn conv3x3_pool2_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    input_grad: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let b = b.contiguous()?;
    x.apply_op3(&w, &b, ConvPoolRelu { input_grad })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    use super::conv3x3_pool2_relu;
    use crate::reference::{self, conv_weight_from_oihw, rel_err_tensors};

    /// The fused op against the reference layer on random data of shape
    /// `(n, h, w, c_in) → c_out`: the output, and the gradients of a random projection of it
    /// for `w`, `b` and, if `input_grad`, `x` (which must have none otherwise).
    fn check_fused(
        (n, h, w, c_in, c_out): (usize, usize, usize, usize, usize),
        input_grad: bool,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (n, h, w, c_in), &dev)?;
        let wt = Var::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
        let b = Var::randn(0f32, 0.5, c_out, &dev)?;
        let shape = format!("{n}x{h}x{w}x{c_in}->{c_out}, input_grad {input_grad}");
        let ours = conv3x3_pool2_relu(&x, &conv_weight_from_oihw(&wt)?, &b, input_grad)?;
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
        ] {
            check_fused(dims, true)?;
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
