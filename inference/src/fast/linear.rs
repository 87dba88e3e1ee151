//! The linear layers' kernel: weights repacked once into panels ([`Packed`]) and a
//! cache-blocked product over them in register tiles ([`linear`]), written once over
//! [`Lanes`]. Separate from the convolution kernels, with which it shares only the lane
//! operations of [`super::lanes`].

use std::ops::Range;

use super::lanes::{block_masks, store_lanes};
use crate::simd::Lanes;

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
/// just those, reading just their share of the weights (see [`FastNet::logits`](super::FastNet::logits)).
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
        // SAFETY: `S`'s features are available (this function's contract); the masks
        // are those of outputs c0.. below n, and the part is stored whole only if it
        // ends at or before n. With the lengths checked above, each tile's accesses
        // are in bounds:
        // - weights: `wp` is row k0 of panel p, at column c0 % PANEL, a multiple of
        //   `sub` (which divides PANEL), so each of the tile's `kc` rows (k0 + kc <=
        //   ks.end <= k) reads `sub` floats of the panel's row, inside `data`'s
        //   `panels() · k · PANEL` floats;
        // - inputs: rows r .. r + rows <= m of `x` (kr floats each), columns
        //   k0 - ks.start .. + kc <= kr;
        // - outputs: rows r .. r + rows <= m of `out` (>= m · n floats, rows of n),
        //   columns c0 + lane below n (all `sub` of them only when whole).
        unsafe {
            let masks = (&block_masks::<S, NVC>(n, c0), c0 + sub <= n);
            let mut k0 = ks.start;
            while k0 < ks.end {
                let kc = KC.min(ks.end - k0);
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
}

/// One tile of [`linear`]: `R` rows of `x` (stride `x_rs`) times `kc` rows of a panel
/// (`wp`), added to the tile of `out` (stride `out_rs`, lanes of `masks`) unless
/// `first`, when it is overwritten. The reduction is split over `KU` accumulator sets.
///
/// # Safety
/// `S`'s CPU features must be available. For each of the `R` rows, `x + r · x_rs` must
/// be valid for reads of `kc` floats, and `out + r · out_rs` for reads and writes of
/// `NVC · N` floats when `full`, else of the lanes of `masks` (at `+ v · N` for
/// register `v`; a register without lanes may lie past the end). `wp + kk · PANEL`
/// must be valid for reads of `NVC · N` floats for each `kk < kc`. `out` must not
/// overlap `x` or `wp`.
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
    // SAFETY: `S`'s features are available, and every access is one this function's
    // contract makes valid: input row r at columns kk + u < kc; weight row kk + u < kc
    // at floats v · N .. (v + 1) · N of its `NVC · N`; output row r at register v,
    // whole when `full`, else the lanes of `masks[v]` (the address by `wrapping_add`).
    unsafe {
        let mut acc = [[[S::zero(); NVC]; R]; KU];
        if !first {
            for (r, a) in acc[0].iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    let p = out.wrapping_add(r * out_rs + v * S::N);
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
                let p = out.wrapping_add(r * out_rs + v * S::N);
                store_lanes::<S>(p, masks[v], full, *av);
            }
        }
    }
}
