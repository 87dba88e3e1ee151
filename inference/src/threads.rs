//! Which thread runs the model's fork-joins.
//!
//! The kernels of the native CNN (and the ONNX engine's per-image plans) fork and join on
//! rayon's global pool. Called from a thread outside that pool (the server's model
//! thread, a benchmark's main thread), every batch injects a job, wakes a pool thread,
//! and puts the caller to sleep until a pool thread wakes it again: three hand-offs
//! between threads per batch. At batch 1 those cost more than the model (on an Intel
//! Xeon, 2 vCPUs, a quarter of the time went to futex wake-ups and context switches).
//! [`adopt_calling_thread`] makes the calling thread one of the pool's workers instead:
//! its batches then start on it at once and only the other half of the work wakes a
//! thread (one hand-off, often none when the other worker is still spinning). Measured
//! in `docs/benchmarks.md` (2026-12-07): batch 1 about 1.4× as many images/s.

/// Makes the calling thread worker 0 of rayon's global pool, so that the model called
/// from it runs its fork-joins without handing each batch to another thread (see the
/// module docs). Call it first thing on the thread that will call the model.
///
/// Returns whether it did: not when the global pool already runs (some rayon work
/// started it; then batches are handed over as before), nor when the pool would have
/// fewer than two threads (`RAYON_NUM_THREADS`, else the CPUs). In a pool of one, work
/// that other threads hand to the pool would wait until this thread calls into rayon.
///
/// While this thread waits outside rayon (a model thread between batches), work that
/// other threads hand to the pool runs on its other workers only: time the model from
/// elsewhere with [`on_every_core`].
///
/// The thread stays a worker for good: rayon offers no way back. Should it end while the
/// process goes on, the pool keeps its other workers and rayon work still runs, on one
/// thread fewer, and `rayon::broadcast` (which needs every worker) would not return.
pub fn adopt_calling_thread() -> bool {
    if pool_size() < 2 {
        return false;
    }
    match rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
    {
        Ok(()) => {
            tracing::debug!("this thread is worker 0 of the compute pool");
            true
        }
        Err(error) => {
            tracing::debug!(%error, "the compute pool already runs; batches are handed to it");
            false
        }
    }
}

/// The size rayon gives its global pool: `RAYON_NUM_THREADS` when set to a positive
/// number, else the CPUs this process may use.
fn pool_size() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .filter(|&threads| threads > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `work` in a rayon pool of its own, as large as the global pool (see
/// [`pool_size`]), and returns what it returns: for timing the model from a thread other
/// than the adopted one. The global pool's worker 0 may be a server's model thread
/// waiting for its next batch outside rayon, and work handed to the pool from elsewhere
/// then runs on its other threads only (half the cores on a 2-core machine), which would
/// understate the model.
pub fn on_every_core<R: Send>(work: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(pool_size())
        .thread_name(|i| format!("timing-{i}"))
        .build()?;
    Ok(pool.install(work))
}
