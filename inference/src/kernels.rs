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

/// Adds `(h*w, 9*c)` patch gradients back onto one HWC image gradient (the adjoint of [`im2col`], into an unpadded
/// image).
pub(crate) fn col2im(patches: &[f32], (h, w, c): (usize, usize, usize), img: &mut [f32]) {
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

/// Max-pools one image's `(h, w, c)` map by 2 (an odd last row or column is dropped), adds
/// `bias` if given and applies ReLU, writing the `(h/2, w/2, c)` result to `out`.
///
/// The fast path adds the bias here, after pooling (`max(a + b) = max(a) + b` holds exactly,
/// as rounding `x + b` is monotonic in `x`); the candle op adds it in the convolution.
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

/// The backward pass of [`max_pool2_relu`] (without bias): routes the pooled+ReLU gradient `go` back to the conv output positions (`gconv`, fully
/// overwritten): each window's gradient goes to its first maximum, if that maximum is > 0.
/// Written branch-free over exact-length slices so the channel loop vectorises.
pub(crate) fn max_pool2_relu_grad(
    conv: &[f32],
    go: &[f32],
    (h, w, c): (usize, usize, usize),
    gconv: &mut [f32],
) {
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
