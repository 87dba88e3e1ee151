//! The one poison-tolerant mutex lock of the workspace (the crates above use it too,
//! through `classifier_app::lock`).

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, carrying on with its data if a thread panicked while holding it. Every
/// critical section under these locks (broker queues and offsets, the server's shared
/// state, the client's pending requests) is a single assignment or a whole-entry insert
/// or remove, so the data is still consistent, and one panicked task must not take the
/// whole process down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
