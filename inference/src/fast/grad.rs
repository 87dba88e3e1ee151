//! The training-gradient kernels that `crate::ops` runs for the backward pass of its
//! fused convolution: the routed (sparse after pooling and ReLU) conv-output gradient
//! [`RoutedGrads`], and the weight and input gradients computed from it. Written once
//! over [`Lanes`] like the inference kernels, but used only by training, so kept apart
//! from them.

use super::lanes::block_masks;
use crate::kernels::{Route, NO_ROUTE};
use crate::simd::Lanes;

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
                // SAFETY: `S`'s features are available (this function's contract). A
                // cell is a conv position (y, x) with y < h, x < w (the geometry is
                // checked above, and `gather` builds no other cells); row ky of its
                // window is the `run` floats from pad pixel (y + ky, x), ending at most
                // at the last float of `pad` (length checked above), as y + ky <= h + 1
                // and x + 3 <= w + 2; `origin + cell · c_in` is float j0 of that row.
                // Each chunk reads `lanes <= run - j0` of those floats (a whole set of
                // registers only when that many remain, else one masked register) and
                // updates as many of row co < c_out of `gwt` (length checked above).
                unsafe {
                    let origin = pad.as_ptr().add(ky * pw * c_in + j0);
                    let out = gwt.as_mut_ptr().add(co * k + ky * run + j0);
                    let input = (origin, c_in);
                    // A short remainder runs one register at a time, the last masked.
                    if lanes == step {
                        weight_grad_chunk::<S, CH, true>(values, cells, input, out, lanes);
                        j0 += step;
                    } else if lanes >= S::N {
                        weight_grad_chunk::<S, 1, true>(values, cells, input, out, lanes);
                        j0 += S::N;
                    } else {
                        weight_grad_chunk::<S, 1, false>(values, cells, input, out, lanes);
                        j0 += S::N;
                    }
                }
            }
        }
    }
}

/// One chunk of `CH` registers (`lanes` floats, all of them when `FULL`) of one
/// channel's kernel row in [`routed_weight_grad`]: `out[j] += Σ_e values[e] ·
/// origin[cells[e] · c_in + j]`.
///
/// # Safety
/// `S`'s CPU features must be available. For each cell, `origin + cell · c_in` must
/// be valid for reads, and `out` (not overlapping them) for reads and writes, of
/// `CH · N` floats when `FULL`, else of the first `lanes` floats with `CH == 1`.
#[inline(always)]
unsafe fn weight_grad_chunk<S: Lanes, const CH: usize, const FULL: bool>(
    values: &[f32],
    cells: &[u32],
    (origin, c_in): (*const f32, usize),
    out: *mut f32,
    lanes: usize,
) {
    // SAFETY: `S`'s features are available, and every access is one this function's
    // contract makes valid: register j of a whole chunk covers floats j · N .. (j + 1)
    // · N of the `CH · N`; a masked chunk is the one register j = 0 with the mask of
    // its first `lanes` floats.
    unsafe {
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
                // SAFETY: `S`'s features are available (this function's contract).
                // `wp` is channel c0 of tap `tap` in row co < c_out of `wt_t` (length
                // checked above), with `lanes <= c_in - c0` channels after it in the
                // tap. A cell is a conv position (y, x) with y < h, x < w (the geometry
                // is checked above, and `gather` builds no other cells); plus the tap's
                // shift it is the input pixel (y + ky, x + kx) <= (h + 1, w + 1) of
                // `gxpad` (length checked above, not overlapping `wt_t`), whose channels
                // c0 .. c0 + lanes <= c_in start at `origin + cell · c_in`. Each chunk
                // touches `lanes` channels: a whole set of registers only when that
                // many remain, else one masked register.
                unsafe {
                    let wp = wt_t.as_ptr().add(co * k + tap * c_in + c0);
                    let origin = gxpad.as_mut_ptr().add(shift * c_in + c0);
                    let pixels = (origin, c_in);
                    // A short remainder runs one register at a time, the last masked.
                    if lanes == step {
                        input_grad_chunk::<S, CH, true>(values, cells, wp, pixels, lanes);
                        c0 += step;
                    } else if lanes >= S::N {
                        input_grad_chunk::<S, 1, true>(values, cells, wp, pixels, lanes);
                        c0 += S::N;
                    } else {
                        input_grad_chunk::<S, 1, false>(values, cells, wp, pixels, lanes);
                        c0 += S::N;
                    }
                }
            }
        }
    }
}

/// One chunk of `CH` registers (`lanes` input channels, all of them when `FULL`)
/// of one channel and tap in [`routed_input_grad`]: `origin[cells[e] · c_in + j] +=
/// values[e] · wp[j]`.
///
/// # Safety
/// `S`'s CPU features must be available. `wp` must be valid for reads, and for each
/// cell `origin + cell · c_in` (not overlapping `wp`'s floats) for reads and writes,
/// of `CH · N` floats when `FULL`, else of the first `lanes` floats with `CH == 1`.
#[inline(always)]
unsafe fn input_grad_chunk<S: Lanes, const CH: usize, const FULL: bool>(
    values: &[f32],
    cells: &[u32],
    wp: *const f32,
    (origin, c_in): (*mut f32, usize),
    lanes: usize,
) {
    // SAFETY: `S`'s features are available, and every access is one this function's
    // contract makes valid: register j of a whole chunk covers floats j · N .. (j + 1)
    // · N of the `CH · N`; a masked chunk is the one register j = 0 with the mask of
    // its first `lanes` floats.
    unsafe {
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
