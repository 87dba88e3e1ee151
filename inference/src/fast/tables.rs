//! The kernel tables: how many registers of output channels, and which tile shapes, the
//! generic kernels of [`super::direct`] use at each SIMD level, and the
//! `#[target_feature]` wrappers that instantiate them with those values (for
//! [`FastNet`]'s convolutions and linear layers). Kept apart from the kernels so tuning
//! a level touches one small file and the kernels stay level-independent.

use std::ops::Range;

use super::chunk::Scratch;
use super::{direct, FastNet};
use crate::simd::{Avx2, Avx512};

/// The kernel table: registers of output channels per block (`NV`) of the two direct
/// convolutions at each SIMD level, `(layer 1, layer 2)`. Each block keeps `4 · NV`
/// accumulators (the four conv outputs of a pooling window) in registers: AVX-512 has 32
/// registers, AVX2 16. The same generic kernels of [`direct`] run at every level.
///
/// `NV` of layers 1 and 2 with AVX-512 (32 and 32 channels per block).
#[cfg(target_arch = "x86_64")]
pub(super) const AVX512_NV: (usize, usize) = (2, 2);
/// `NV` of layers 1 and 2 with AVX2 (16 and 16 channels per block).
#[cfg(target_arch = "x86_64")]
pub(super) const AVX2_NV: (usize, usize) = (2, 2);
/// Output positions per layer-2 tile at each level: 0 runs [`direct::conv2_pool_relu`]
/// (the four positions of a pooling window, pooled in registers), more runs
/// [`direct::conv2_tiles`] (that many positions, pooled afterwards). AVX-512's 32
/// registers fit 14 × 2 accumulators beside the 2 weight registers and a broadcast: one
/// whole conv row of a 28×28 input per tile, 28 independent chains. On an Intel Xeon
/// (2026-12-07, `docs/benchmarks.md`) that ran batches of 32 and 512 about 25% faster
/// than pooling 4 × 4 accumulators in registers (the table before), and faster than
/// 4 × 4, 6 × 4, 7 × 4, 8 × 2 and 12 × 2 tiles. AVX2's 16 registers fit 6 × 2 but not
/// 4 × 3 with loads.
#[cfg(target_arch = "x86_64")]
pub(super) const AVX512_R2: usize = 14;
/// See [`AVX512_R2`].
#[cfg(target_arch = "x86_64")]
pub(super) const AVX2_R2: usize = 6;
/// The linear layers' tiles, `(R, NVC, KU)` of [`direct::linear`]: AVX-512 8 rows × 2
/// registers (16 accumulators), AVX2 6 rows × 2 registers (12, the classic 6 × 16 AVX2
/// gemm tile: with the 2 weight registers and a broadcast it fills the 16 registers
/// without spilling); single rows with 4 accumulator sets (8 chains).
#[cfg(target_arch = "x86_64")]
pub(super) const AVX512_FC: (usize, usize, usize) = (8, 2, 4);
/// See [`AVX512_FC`].
#[cfg(target_arch = "x86_64")]
pub(super) const AVX2_FC: (usize, usize, usize) = (6, 2, 4);

impl FastNet {
    /// [`FastNet::conv_simd`] with the AVX-512 kernels.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn conv_chunk_avx512(
        &self,
        inputs: &[f32],
        rows: Range<usize>,
        features: &mut [f32],
        s: &mut Scratch,
    ) {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (this function's contract), which
        // `Avx512` lanes need.
        unsafe {
            self.conv_simd::<Avx512, { AVX512_NV.0 }, AVX512_R2, { AVX512_NV.1 }>(
                inputs, rows, features, s,
            )
        }
    }

    /// [`FastNet::conv_simd`] with the AVX2 kernels.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn conv_chunk_avx2(
        &self,
        inputs: &[f32],
        rows: Range<usize>,
        features: &mut [f32],
        s: &mut Scratch,
    ) {
        // SAFETY: the CPU has AVX2 and FMA (this function's contract), which `Avx2` lanes
        // need.
        unsafe {
            self.conv_simd::<Avx2, { AVX2_NV.0 }, AVX2_R2, { AVX2_NV.1 }>(inputs, rows, features, s)
        }
    }
}

/// [`direct::linear`] with the AVX-512 tiles of the table.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn linear_avx512(
    x: &[f32],
    w: &direct::Packed,
    ks: Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: the CPU has AVX-512F, AVX2 and FMA (this function's contract), which
    // `Avx512` lanes need; `linear` checks the slice lengths itself.
    unsafe {
        direct::linear::<Avx512, { AVX512_FC.0 }, { AVX512_FC.1 }, { AVX512_FC.2 }>(x, w, ks, out)
    }
}

/// [`direct::linear`] with the AVX2 tiles of the table.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn linear_avx2(x: &[f32], w: &direct::Packed, ks: Range<usize>, out: &mut [f32]) {
    // SAFETY: the CPU has AVX2 and FMA (this function's contract), which `Avx2` lanes
    // need; `linear` checks the slice lengths itself.
    unsafe { direct::linear::<Avx2, { AVX2_FC.0 }, { AVX2_FC.1 }, { AVX2_FC.2 }>(x, w, ks, out) }
}
