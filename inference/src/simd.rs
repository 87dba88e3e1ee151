//! Which SIMD instruction set the CNN kernels use (inference and training alike), chosen
//! once per process at run time, and the lane operations the kernels are written against.
//!
//! The crate is built for baseline x86-64 (or any other target); the hand-written kernels
//! of [`crate::fast`] (and the training op of `crate::ops`, which reuses them) are generic over [`Lanes`], a handful of vector operations
//! implemented for AVX-512 (`__m512`, 16 lanes), AVX2 + FMA (`__m256`, 8 lanes) and plain
//! arrays ([`Portable`]), and monomorphised inside `#[target_feature]` wrappers, so each
//! kernel shape has one source for every instruction set.
//!
//! [`simd_level`] picks the best level the CPU reports, unless the environment variable
//! `CLASSIFIER_SIMD` (`avx512`, `avx2`, `portable` or `auto`) asks for another; asking for
//! a level the CPU lacks falls back to the best one it has, with a warning. The choice is
//! logged once. [`fma_peak_gflops`] measures what a tight FMA loop reaches at a level, the
//! physical ceiling that benchmarks compare the model's FLOP rate with.

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable that forces a SIMD level (see the module documentation).
pub const SIMD_ENV: &str = "CLASSIFIER_SIMD";

/// An instruction set the CNN kernels (inference and training) can run on, from the
/// most portable up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// No hand-written SIMD: inference runs a direct layer 1 in plain Rust, layer 2 and
    /// the linear layers through the `gemm` crate (which does its own CPU dispatch);
    /// training runs the generic kernels on plain 4-float lanes. Builds on every target.
    Portable,
    /// x86-64 AVX2 + FMA, 8 floats per register.
    Avx2,
    /// x86-64 AVX-512F, 16 floats per register.
    Avx512,
}

impl SimdLevel {
    /// Every level, from the most portable up.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512];

    /// The name used by `CLASSIFIER_SIMD` and in logs: `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Parses a `CLASSIFIER_SIMD` value (case-insensitive); `None` for anything else.
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Some(SimdLevel::Portable),
            "avx2" | "avx2+fma" | "avx2fma" => Some(SimdLevel::Avx2),
            "avx512" | "avx-512" | "avx512f" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// Whether this CPU can run the level's kernels.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best level this CPU supports.
    pub fn detected() -> SimdLevel {
        Self::supported()
            .last()
            .copied()
            .unwrap_or(SimdLevel::Portable)
    }

    /// The levels this CPU supports, from the most portable up (always starts with
    /// [`SimdLevel::Portable`]).
    pub fn supported() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|l| l.is_supported()).collect()
    }

    /// This level if the CPU supports it, else the best supported level below it.
    pub fn or_supported(self) -> SimdLevel {
        self.min(Self::detected())
    }

    /// Floats per vector register at this level (the portable lanes are 4-float arrays).
    pub fn lanes(self) -> usize {
        match self {
            SimdLevel::Portable => 4,
            SimdLevel::Avx2 => 8,
            SimdLevel::Avx512 => 16,
        }
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The level chosen from a `CLASSIFIER_SIMD` value (`None`: unset) and the best level
/// the CPU has, with a warning to log when the request could not be honoured.
pub fn resolve(requested: Option<&str>, detected: SimdLevel) -> (SimdLevel, Option<String>) {
    let Some(raw) = requested.map(str::trim).filter(|s| !s.is_empty()) else {
        return (detected, None);
    };
    if raw.eq_ignore_ascii_case("auto") {
        return (detected, None);
    }
    match SimdLevel::parse(raw) {
        None => (
            detected,
            Some(format!(
                "{SIMD_ENV}={raw:?} is not one of avx512, avx2, portable, auto; using {detected}"
            )),
        ),
        Some(level) if level > detected => (
            detected,
            Some(format!(
                "{SIMD_ENV}={raw}: this CPU lacks {level}; falling back to {detected}"
            )),
        ),
        Some(level) => (level, None),
    }
}

/// The SIMD level of this process: chosen on first use from the CPU and
/// `CLASSIFIER_SIMD` (see [`resolve`]), logged once, the same afterwards.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = SimdLevel::detected();
        let requested = std::env::var(SIMD_ENV).ok();
        let (level, warning) = resolve(requested.as_deref(), detected);
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        tracing::info!(
            simd = level.name(),
            cpu_best = detected.name(),
            "CNN kernels (inference and training): {level} (CPU supports up to {detected}{})",
            if requested.is_some() {
                format!("; {SIMD_ENV} set")
            } else {
                String::new()
            }
        );
        level
    })
}

/// The vector operations the hand-written kernels use, for one instruction set. `V` is
/// one register of [`Lanes::N`] floats; `M` selects the first few lanes for loads and
/// stores of a partial block.
///
/// # Safety
/// For callers: implementations may use instructions the CPU lacks, so every method is
/// `unsafe` and may only be called on a CPU that supports the implementation's SIMD
/// level, from a function compiled with those features (the kernels are
/// `#[inline(always)]` and reached through `#[target_feature]` wrappers). Pointers must
/// be valid for the lanes touched: all `N` floats for [`Lanes::load`] and
/// [`Lanes::store`], the masked lanes only for the masked ones (no alignment needed).
///
/// For implementations: the kernels' bounds reasoning rests on the methods touching no
/// other memory than that: `load` and `store` exactly `N` floats from `p`, the masked
/// versions only the lanes [`Lanes::mask`] selected (the first `min(lanes, N)`).
pub(crate) unsafe trait Lanes {
    /// Floats per register.
    const N: usize;
    /// One register.
    type V: Copy;
    /// A lane mask for partial loads and stores.
    type M: Copy;
    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `N` floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Stores `N` floats.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// A mask of the first `lanes` lanes (`lanes <= N`).
    unsafe fn mask(lanes: usize) -> Self::M;
    /// Loads the masked lanes (only those are read), zero in the others.
    unsafe fn load_masked(m: Self::M, p: *const f32) -> Self::V;
    /// Stores the masked lanes only.
    unsafe fn store_masked(p: *mut f32, m: Self::M, v: Self::V);
    /// `a * b + c` (fused where the instruction set has it).
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
}

/// Plain 4-float arrays: the lane operations for any target, left to the compiler's
/// vectoriser (multiply and add are not fused).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

// SAFETY: plain Rust: `load` and `store` move one `[f32; 4]`, the masked versions the
// first `min(m, 4)` floats (the loops stop at the array's end); nothing needs a CPU feature.
unsafe impl Lanes for Portable {
    const N: usize = 4;
    type V = [f32; 4];
    type M = usize;
    #[inline(always)]
    unsafe fn zero() -> [f32; 4] {
        [0.0; 4]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 4] {
        [x; 4]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 4] {
        // SAFETY: the caller guarantees `p` is valid for reads of 4 floats (the trait's
        // contract); an unaligned read needs no alignment.
        unsafe { p.cast::<[f32; 4]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 4]) {
        // SAFETY: the caller guarantees `p` is valid for writes of 4 floats (the trait's
        // contract); an unaligned write needs no alignment.
        unsafe { p.cast::<[f32; 4]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> usize {
        lanes
    }
    #[inline(always)]
    unsafe fn load_masked(m: usize, p: *const f32) -> [f32; 4] {
        let mut v = [0.0; 4];
        for (i, x) in v.iter_mut().enumerate().take(m) {
            // SAFETY: `i` is one of the first `m` lanes, which the caller guarantees `p`
            // is valid to read (the trait's contract).
            *x = unsafe { *p.add(i) };
        }
        v
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: usize, v: [f32; 4]) {
        for (i, x) in v.iter().enumerate().take(m) {
            // SAFETY: `i` is one of the first `m` lanes, which the caller guarantees `p`
            // is valid to write (the trait's contract).
            unsafe { *p.add(i) = *x };
        }
    }
    #[inline(always)]
    unsafe fn fmadd(a: [f32; 4], b: [f32; 4], c: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn max(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| if b[i] > a[i] { b[i] } else { a[i] })
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

/// The x86-64 lane operations.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// AVX-512F: `__m512`, native lane masks.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    // SAFETY: `loadu`/`storeu` move exactly 16 floats; the masked forms (`maskz_loadu`,
    // `mask_storeu`) touch only the lanes of the mask, `mask` sets the first
    // `min(lanes, 16)` bits, and masked-off lanes never fault.
    unsafe impl Lanes for Avx512 {
        const N: usize = 16;
        type V = __m512;
        type M = __mmask16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F (the trait's contract).
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F (the trait's contract).
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F and `p` is valid for reads of 16
            // floats (the trait's contract); `loadu` needs no alignment.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: the caller runs on a CPU with AVX-512F and `p` is valid for writes of 16
            // floats (the trait's contract); `storeu` needs no alignment.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn mask(lanes: usize) -> __mmask16 {
            ((1u32 << lanes.min(16)) - 1) as u16
        }
        #[inline(always)]
        unsafe fn load_masked(m: __mmask16, p: *const f32) -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F and `p` is valid for reads of the
            // lanes of `m` (the trait's contract); the others are not read (no fault either).
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, m: __mmask16, v: __m512) {
            // SAFETY: the caller runs on a CPU with AVX-512F and `p` is valid for writes of the
            // lanes of `m` (the trait's contract); the others are not written.
            unsafe { _mm512_mask_storeu_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F (the trait's contract).
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F (the trait's contract).
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            // SAFETY: the caller runs on a CPU with AVX-512F (the trait's contract).
            unsafe { _mm512_max_ps(a, b) }
        }
    }

    /// AVX2 + FMA: `__m256`, masks as integer vectors for `vmaskmovps`.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    /// Eight all-ones lanes then eight zero lanes: the mask of the first `n` lanes is
    /// the eight words starting at `8 - n`.
    static MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    // SAFETY: `loadu`/`storeu` move exactly 8 floats; `vmaskmovps` (`maskload`,
    // `maskstore`) touches only the lanes whose mask word has its sign bit set, `mask`
    // sets the first `min(lanes, 8)` words to -1 and the others to 0, and masked-off lanes
    // never fault.
    unsafe impl Lanes for Avx2 {
        const N: usize = 8;
        type V = __m256;
        type M = __m256i;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and FMA (the trait's contract).
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and FMA (the trait's contract).
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and `p` is valid for reads of 8 floats
            // (the trait's contract); `loadu` needs no alignment.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: the caller runs on a CPU with AVX2 and `p` is valid for writes of 8 floats
            // (the trait's contract); `storeu` needs no alignment.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn mask(lanes: usize) -> __m256i {
            // SAFETY: the caller runs on a CPU with AVX2 (the trait's contract); the eight words
            // from `8 - min(lanes, 8)`, at most index 15, lie inside the 16 of `MASKS`.
            unsafe { _mm256_loadu_si256(MASKS.as_ptr().add(8 - lanes.min(8)).cast()) }
        }
        #[inline(always)]
        unsafe fn load_masked(m: __m256i, p: *const f32) -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and `p` is valid for reads of the lanes
            // of `m` (the trait's contract); the others are not read (no fault either).
            unsafe { _mm256_maskload_ps(p, m) }
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, m: __m256i, v: __m256) {
            // SAFETY: the caller runs on a CPU with AVX2 and `p` is valid for writes of the lanes
            // of `m` (the trait's contract); the others are not written.
            unsafe { _mm256_maskstore_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and FMA (the trait's contract).
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and FMA (the trait's contract).
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            // SAFETY: the caller runs on a CPU with AVX2 and FMA (the trait's contract).
            unsafe { _mm256_max_ps(a, b) }
        }
    }
}

/// Steps of [`fma_chains`] between clock reads.
const PEAK_STEPS: u64 = 1 << 16;

/// `ACC` independent chains `acc = acc · a + b`, `steps` times: `2 · ACC · N · steps`
/// FLOPs with nothing but FMAs in the loop (enough chains to cover the FMA latency on
/// every pipe). Returns a lane of the result so the work cannot be optimised away.
///
/// # Safety
/// `S`'s CPU features must be available (see [`Lanes`]).
#[inline(always)]
unsafe fn fma_chains<S: Lanes, const ACC: usize>(steps: u64) -> f32 {
    const { assert!(S::N <= 16, "the result buffer holds 16 lanes") };
    // SAFETY: `S`'s features are available (this function's contract); the one store
    // writes `S::N` <= 16 floats (checked at compile time) into the 16 of `out`.
    unsafe {
        let a = S::splat(0.999_9);
        let b = S::splat(1e-4);
        let mut acc = [S::zero(); ACC];
        for (i, v) in acc.iter_mut().enumerate() {
            *v = S::splat(i as f32);
        }
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = S::fmadd(*v, a, b);
            }
        }
        let mut sum = S::zero();
        for v in acc {
            sum = S::add(sum, v);
        }
        let mut out = [0f32; 16];
        S::store(out.as_mut_ptr(), sum);
        out[0]
    }
}

/// One thread's FMA rate at `level` over about `duration`, in GFLOP/s.
fn fma_rate(level: SimdLevel, duration: Duration) -> f64 {
    let start = Instant::now();
    let mut steps = 0u64;
    let mut sink = 0f32;
    while start.elapsed() < duration {
        sink += match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the only caller, `fma_peak_gflops`, passes a supported level
            // (`or_supported`), so the CPU has AVX-512F, AVX2 and FMA.
            SimdLevel::Avx512 => unsafe { peak_avx512(PEAK_STEPS) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above: the CPU has AVX2 and FMA.
            SimdLevel::Avx2 => unsafe { peak_avx2(PEAK_STEPS) },
            // SAFETY: portable lanes are plain Rust and need no CPU feature.
            _ => unsafe { fma_chains::<Portable, 12>(PEAK_STEPS) },
        };
        steps += PEAK_STEPS;
    }
    std::hint::black_box(sink);
    let chains = match level {
        SimdLevel::Avx512 => 16,
        _ => 12,
    };
    let flops = 2.0 * (steps * chains * level.lanes() as u64) as f64;
    flops / start.elapsed().as_secs_f64() / 1e9
}

/// 16 chains of `__m512` (of the 32 registers), the AVX-512 peak loop.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn peak_avx512(steps: u64) -> f32 {
    // SAFETY: the CPU has AVX-512F (this function's contract), which `Avx512` needs.
    unsafe { fma_chains::<Avx512, 16>(steps) }
}

/// 12 chains of `__m256` (of the 16 registers), the AVX2 peak loop.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn peak_avx2(steps: u64) -> f32 {
    // SAFETY: the CPU has AVX2 and FMA (this function's contract), which `Avx2` needs.
    unsafe { fma_chains::<Avx2, 12>(steps) }
}

/// The machine's float32 FMA peak at `level` (an unsupported level is measured at
/// [`SimdLevel::or_supported`]), in GFLOP/s: a tight loop of independent FMA chains
/// run for about `duration` on every thread of the current rayon pool at once, the
/// threads' rates added up. For [`SimdLevel::Portable`] it is what the compiler makes of
/// plain multiply-adds on this target.
pub fn fma_peak_gflops(level: SimdLevel, duration: Duration) -> f64 {
    let level = level.or_supported();
    rayon::broadcast(|_| fma_rate(level, duration)).iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_honours_supported_requests_and_falls_back_otherwise() {
        use SimdLevel::*;
        assert_eq!(resolve(None, Avx512), (Avx512, None));
        assert_eq!(resolve(Some(""), Avx2), (Avx2, None));
        assert_eq!(resolve(Some("auto"), Avx2), (Avx2, None));
        assert_eq!(resolve(Some("AVX2"), Avx512), (Avx2, None));
        assert_eq!(resolve(Some("portable"), Avx512), (Portable, None));
        assert_eq!(resolve(Some("avx512"), Avx512), (Avx512, None));
        let (level, warning) = resolve(Some("avx512"), Avx2);
        assert_eq!(level, Avx2);
        assert!(warning.expect("a warning").contains("lacks avx512"));
        let (level, warning) = resolve(Some("avx2"), Portable);
        assert_eq!(level, Portable);
        assert!(warning.is_some());
        let (level, warning) = resolve(Some("sse9"), Avx2);
        assert_eq!(level, Avx2);
        assert!(warning.expect("a warning").contains("not one of"));
    }

    #[test]
    fn levels_parse_their_names_and_portable_is_always_supported() {
        for l in SimdLevel::ALL {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::supported()[0], SimdLevel::Portable);
        assert!(SimdLevel::detected().is_supported());
        assert!(simd_level().is_supported());
        assert_eq!(SimdLevel::Avx512.or_supported(), SimdLevel::detected());
    }

    #[test]
    fn fma_peak_is_positive_at_every_supported_level() {
        for l in SimdLevel::supported() {
            let g = fma_peak_gflops(l, Duration::from_millis(20));
            assert!(g > 0.0 && g.is_finite(), "{l}: {g}");
        }
    }
}
