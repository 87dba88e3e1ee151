//! Test oracles: the network's layers through candle's generic tensor ops (`conv2d` on
//! NCHW, pooling as a reshape and `max`), slow but plainly right, with candle's autograd
//! for their gradients. The candle custom op ([`crate::ops`]) is checked against them
//! forward and backward, the fast inference kernels ([`crate::fast`]) forward.
//!
//! (candle's own `max_pool2d` agrees with [`max_pool2`] forward, which a test here checks,
//! but its backward is no oracle: it scales the gradient by 1/4.)

use candle_core::{Result, Tensor};

/// Converts `(c_out, c_in, 3, 3)` convolution weights (candle / PyTorch layout) into the
/// kernels' `(9 * c_in, c_out)` layout (see [`crate::model::names`]).
pub(crate) fn conv_weight_from_oihw(w: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("expected a 3x3 kernel, got {kh}x{kw}");
    }
    // (o, i, ky, kx) -> (ky, kx, i, o)
    w.permute((2, 3, 1, 0))?
        .contiguous()?
        .reshape((9 * c_in, c_out))
}

/// 3×3 convolution (stride 1, zero padding 1) plus bias of an NHWC batch, with `w` in
/// `(c_out, c_in, 3, 3)` layout, through candle's `conv2d`.
pub(crate) fn conv3x3(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c_out = b.dim(0)?;
    x.permute((0, 3, 1, 2))?
        .conv2d(w, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, c_out, 1, 1))?)?
        .permute((0, 2, 3, 1))
}

/// 2×2 max pooling with stride 2 of an NHWC batch (an odd last row or column is dropped),
/// as a reshape and two `max` reductions.
pub(crate) fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    x.narrow(1, 0, h / 2 * 2)?
        .narrow(2, 0, w / 2 * 2)?
        .contiguous()?
        .reshape((n, h / 2, 2, w / 2, 2, c))?
        .max(4)?
        .max(2)
}

/// One convolution layer of the network: `relu(max_pool2(conv3x3(x, w, b)))`, NHWC.
pub(crate) fn conv3x3_pool2_relu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    max_pool2(&conv3x3(x, w, b)?)?.relu()
}

/// Largest absolute difference relative to the largest magnitude of `reference`:
/// `max |a - b| / max |b|`.
pub(crate) fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "compared lengths differ");
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = reference.iter().map(|y| y.abs()).fold(0f32, f32::max);
    diff / scale.max(1e-12)
}

/// [`rel_err`] of two tensors of the same shape.
pub(crate) fn rel_err_tensors(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    assert_eq!(ours.dims(), reference.dims(), "compared shapes differ");
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    Ok(rel_err(&flat(ours)?, &flat(reference)?))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor};

    use super::*;

    #[test]
    fn max_pool2_matches_candle_max_pool2d() -> Result<()> {
        for (n, h, w, c) in [(2, 6, 4, 3), (3, 7, 5, 2), (1, 28, 28, 8)] {
            let x = Tensor::randn(0f32, 1.0, (n, h, w, c), &Device::Cpu)?;
            let candle = x
                .permute((0, 3, 1, 2))?
                .max_pool2d(2)?
                .permute((0, 2, 3, 1))?;
            let e = rel_err_tensors(&max_pool2(&x)?, &candle)?;
            assert!(e < 1e-6, "{n}x{h}x{w}x{c}: rel err {e}");
        }
        Ok(())
    }
}
