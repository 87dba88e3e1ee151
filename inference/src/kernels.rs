//! The plain-slice kernels of the network's layers, written once and shared by the two
//! ways the network runs: the candle custom op of training and of the reference forward
//! pass ([`crate::ops`]) and the fast inference path ([`crate::fast`]).
//!
//! Images are HWC (`(h, w, c)`, channels innermost). A 3×3 "same" convolution reads a
//! zero-padded image `(h + 2, w + 2, c)`, so the three inputs of one kernel row are
//! `3 · c` contiguous floats.

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

/// The larger of two floats (`a` if they compare equal), without `f32::max`'s NaN
/// handling, so it compiles to one `max` instruction.
#[inline(always)]
pub(crate) fn fmax(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// Copies one HWC image `(h, w, c)` into the interior of the zero-padded `(h + 2, w + 2, c)`
/// buffer `pad`, whose one-pixel border the caller keeps zero (nothing here writes it).
pub(crate) fn pad_image(img: &[f32], (h, w, c): (usize, usize, usize), pad: &mut [f32]) {
    let row = w * c;
    for y in 0..h {
        pad[((y + 1) * (w + 2) + 1) * c..][..row].copy_from_slice(&img[y * row..][..row]);
    }
}

/// Copies the interior of the zero-padded `(h + 2, w + 2, c)` buffer `pad` into the HWC
/// image `img` (the inverse of [`pad_image`]).
pub(crate) fn unpad_image(pad: &[f32], (h, w, c): (usize, usize, usize), img: &mut [f32]) {
    let row = w * c;
    for y in 0..h {
        img[y * row..][..row].copy_from_slice(&pad[((y + 1) * (w + 2) + 1) * c..][..row]);
    }
}

/// Unfolds a zero-padded image `pad` (`(h + 2, w + 2, c)`) into the `(h * w, 9 * c)` patches
/// of a 3×3 "same" convolution: row `y * w + x`, column `(ky * 3 + kx) * c + ci` holds input
/// `(y + ky - 1, x + kx - 1, ci)`, zero outside the image.
#[inline(always)]
pub(crate) fn im2col(pad: &[f32], (h, w, c): (usize, usize, usize), patches: &mut [f32]) {
    let (k, run) = (9 * c, 3 * c);
    for y in 0..h {
        for x in 0..w {
            let row = &mut patches[(y * w + x) * k..][..k];
            for ky in 0..3 {
                let src = &pad[((y + ky) * (w + 2) + x) * c..][..run];
                row[ky * run..][..run].copy_from_slice(src);
            }
        }
    }
}

/// Max-pools one image's `(h, w, c)` map by 2 (an odd last row or column is dropped), adds
/// `bias` if given and applies ReLU, writing the `(h/2, w/2, c)` result to `out`.
///
/// The fast path adds the bias here, after pooling (`max(a + b) = max(a) + b` holds exactly,
/// as rounding `x + b` is monotonic in `x`); so does the candle op, in
/// [`max_pool2_bias_relu_routes`].
#[inline(always)]
pub(crate) fn max_pool2_relu(
    conv: &[f32],
    (h, w, c): (usize, usize, usize),
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let row = w * c;
    for oy in 0..h / 2 {
        let top = &conv[2 * oy * row..][..row];
        let bottom = &conv[(2 * oy + 1) * row..][..row];
        for ox in 0..w / 2 {
            let dst = &mut out[(oy * (w / 2) + ox) * c..][..c];
            let (p00, p01) = top[2 * ox * c..][..2 * c].split_at(c);
            let (p10, p11) = bottom[2 * ox * c..][..2 * c].split_at(c);
            let window = |ch: usize| fmax(fmax(p00[ch], p01[ch]), fmax(p10[ch], p11[ch]));
            match bias {
                Some(bias) => {
                    for (ch, (d, b)) in dst.iter_mut().zip(&bias[..c]).enumerate() {
                        *d = fmax(window(ch) + b, 0.0);
                    }
                }
                None => {
                    for (ch, d) in dst.iter_mut().enumerate() {
                        *d = fmax(window(ch), 0.0);
                    }
                }
            }
        }
    }
}

/// Which conv output of its 2×2 window a pooled value came from (`dy · 2 + dx`), as
/// [`max_pool2_bias_relu_routes`] records it for the backward pass, or [`NO_ROUTE`] when
/// the ReLU cut the value off (it passes no gradient).
pub(crate) type Route = u8;

/// The [`Route`] of a pooled value the ReLU set to zero.
pub(crate) const NO_ROUTE: Route = 4;

/// [`max_pool2_relu`] with the bias, recording per pooled value the [`Route`] its
/// gradient takes back (the window's first maximum, if the biased maximum is > 0), so
/// the backward pass needs neither the conv output nor a second convolution. `routes`
/// is `(h/2, w/2, c)` like `out`. Written branch-free so the channel loop vectorises.
pub(crate) fn max_pool2_bias_relu_routes(
    conv: &[f32],
    (h, w, c): (usize, usize, usize),
    bias: &[f32],
    out: &mut [f32],
    routes: &mut [Route],
) {
    let (ho, wo) = (h / 2, w / 2);
    let row = w * c;
    let bias = &bias[..c];
    for oy in 0..ho {
        let top = &conv[2 * oy * row..][..row];
        let bottom = &conv[(2 * oy + 1) * row..][..row];
        for ox in 0..wo {
            let o = (oy * wo + ox) * c;
            let (dst, route) = (&mut out[o..][..c], &mut routes[o..][..c]);
            let (p00, p01) = top[2 * ox * c..][..2 * c].split_at(c);
            let (p10, p11) = bottom[2 * ox * c..][..2 * c].split_at(c);
            for ch in 0..c {
                let (a, b, cc, d) = (p00[ch], p01[ch], p10[ch], p11[ch]);
                let m = fmax(fmax(a, b), fmax(cc, d));
                let v = m + bias[ch];
                // The first maximum: 0 unless a < m, and so on (integer selects).
                let first = if a == m {
                    0
                } else if b == m {
                    1
                } else if cc == m {
                    2
                } else {
                    3
                };
                let positive = v > 0.0;
                dst[ch] = if positive { v } else { 0.0 };
                route[ch] = if positive { first } else { NO_ROUTE };
            }
        }
    }
}
