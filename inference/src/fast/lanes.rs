//! The lane operations the direct kernels share, written once over [`Lanes`]: the masks
//! of a block of registers, whole or masked loads and stores, the pooling epilogue, the
//! slice-length checks, and the packing of weights into column blocks. Separate so the
//! inference, linear and gradient kernels can each use them from their own file.

use crate::simd::Lanes;

/// The slice lengths the raw reads and writes of a kernel rely on: `pad` holds one
/// zero-padded `(h, w, c_in)` image, `wt` a `(9 * c_in, c_out)` matrix, `out` at least
/// `out_len` floats. Panics otherwise.
pub(super) fn assert_lengths(
    pad: &[f32],
    (h, w, c_in): (usize, usize, usize),
    wt: &[f32],
    c_out: usize,
    out: &[f32],
    out_len: usize,
) {
    assert!(
        pad.len() >= (h + 2) * (w + 2) * c_in,
        "padded input too short"
    );
    assert!(wt.len() >= 9 * c_in * c_out, "weights too short");
    assert!(out.len() >= out_len, "output too short");
}

/// The lane masks of one block of `NV` registers starting at channel `cb` of `c`:
/// register `v` selects the channels `cb + v · N + lane` below `c` (none past `c`).
///
/// # Safety
/// `S`'s CPU features must be available (see [`Lanes`]).
#[inline(always)]
pub(super) unsafe fn block_masks<S: Lanes, const NV: usize>(c: usize, cb: usize) -> [S::M; NV] {
    // SAFETY: `S`'s features are available (this function's contract); `mask` touches
    // no memory.
    unsafe {
        let mut m = [S::mask(0); NV];
        for (v, mv) in m.iter_mut().enumerate() {
            *mv = S::mask(c.saturating_sub(cb + v * S::N).min(S::N));
        }
        m
    }
}

/// Stores register `v` at `p`, whole when `full`, else only the lanes of mask `m`:
/// masked moves are far slower on some CPUs (microcoded on AMD Zen), so a full
/// block of a partly masked loop stores plainly.
///
/// # Safety
/// `S`'s CPU features must be available, and `p` valid for writes of `N` floats when
/// `full`, else of the lanes of `m` (see [`Lanes`]).
#[inline(always)]
pub(super) unsafe fn store_lanes<S: Lanes>(p: *mut f32, m: S::M, full: bool, v: S::V) {
    // SAFETY: this function's contract is that of the store it picks.
    unsafe {
        if full {
            S::store(p, v)
        } else {
            S::store_masked(p, m, v)
        }
    }
}

/// Loads `NV` registers from `p`: whole when `FULL`, else only the masked lanes.
///
/// # Safety
/// `S`'s CPU features must be available (see [`Lanes`]). When `FULL`, `p` must be valid
/// for reads of `NV · N` floats; else, for each register `v`, `p + v · N` for reads of
/// the lanes of `m[v]` (a register without lanes may point past the buffer's end).
#[inline(always)]
pub(super) unsafe fn load_block<S: Lanes, const NV: usize, const FULL: bool>(
    p: *const f32,
    m: &[S::M; NV],
) -> [S::V; NV] {
    // SAFETY: `S`'s features are available and each load reads only floats this
    // function's contract makes readable. The masked registers' addresses are formed
    // with `wrapping_add`: one without lanes may lie past the end of `p`'s buffer.
    unsafe {
        let mut out = [S::zero(); NV];
        for (v, o) in out.iter_mut().enumerate() {
            *o = if FULL {
                S::load(p.add(v * S::N))
            } else {
                S::load_masked(m[v], p.wrapping_add(v * S::N))
            };
        }
        out
    }
}

/// Max-pools the four conv outputs of a window, adds the bias, applies ReLU and
/// stores the `NV` registers at `o` (masked unless `FULL`).
///
/// # Safety
/// As [`load_block`], for writes at `o`.
#[inline(always)]
pub(super) unsafe fn pool_bias_relu_store<S: Lanes, const NV: usize, const FULL: bool>(
    acc: &[[S::V; NV]; 4],
    bias: &[S::V; NV],
    m: &[S::M; NV],
    o: *mut f32,
) {
    // SAFETY: as in `load_block`: `S`'s features are available and each store writes
    // only floats this function's contract makes writable (masked registers' addresses
    // by `wrapping_add`).
    unsafe {
        for v in 0..NV {
            let mx = S::max(S::max(acc[0][v], acc[1][v]), S::max(acc[2][v], acc[3][v]));
            let r = S::max(S::add(mx, bias[v]), S::zero());
            if FULL {
                S::store(o.add(v * S::N), r);
            } else {
                S::store_masked(o.wrapping_add(v * S::N), m[v], r);
            }
        }
    }
}

/// `(rows, c)` row-major values cut into blocks of `bw` columns, each block stored
/// whole, `(rows, bw)` row-major, one after the other, the last padded with zeros.
/// A kernel working on one block then walks its weights contiguously: with the row
/// stride of the whole matrix, a narrow block's rows would fall into a few cache sets
/// and evict each other.
pub(crate) fn pack_blocks(w: &[f32], c: usize, bw: usize) -> Vec<f32> {
    let rows = w.len() / c.max(1);
    let blocks = c.div_ceil(bw);
    let mut out = vec![0f32; blocks * rows * bw];
    for (r, src) in w.chunks_exact(c).enumerate() {
        for (b, cols) in src.chunks(bw).enumerate() {
            out[(b * rows + r) * bw..][..cols.len()].copy_from_slice(cols);
        }
    }
    out
}

/// The first weight of block `cb / bw` of [`pack_blocks`]'s `(rows, c)` output.
///
/// # Safety
/// `cb / bw · rows · bw` must not exceed `wt.len()` (the block is one of `wt`'s).
#[inline(always)]
pub(super) unsafe fn block_start(wt: &[f32], rows: usize, bw: usize, cb: usize) -> *const f32 {
    // SAFETY: the offset stays within `wt` (this function's contract).
    unsafe { wt.as_ptr().add(cb / bw * rows * bw) }
}
