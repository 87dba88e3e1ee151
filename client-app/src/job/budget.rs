//! The bytes a job may have in flight: the window's second bound.
//!
//! The window bounds requests unanswered; each is kept (to be sent again) until its
//! answer comes. For small images a wide window is what keeps a broker like Kafka busy,
//! but for photos of several MB the same window would hold gigabytes. So every request
//! also takes its size from this budget, and gives it back with its answer: a job holds
//! at most `window` requests and at most `max_in_flight_bytes` of them (one request
//! larger than the whole budget still goes, alone).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget's unit: sizes are counted in whole KiB, so a semaphore's `u32` permits
/// cover terabytes.
const UNIT_BYTES: usize = 1024;

/// The bytes of unanswered requests a job may hold, shared by the sender (which takes a
/// request's size before publishing it) and the waiting job (which gives it back with
/// the answer).
#[derive(Clone)]
pub(super) struct ByteBudget {
    free: Arc<Semaphore>,
    /// The whole budget, in units.
    units: u32,
}

impl ByteBudget {
    /// A budget of `max_bytes` (at least one unit, at most what a semaphore holds).
    pub fn new(max_bytes: usize) -> Self {
        let most = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let units = u32::try_from(max_bytes.div_ceil(UNIT_BYTES))
            .unwrap_or(u32::MAX)
            .clamp(1, most);
        ByteBudget {
            free: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// What a request of `size` bytes takes: its size in units, at most the whole
    /// budget (so a request larger than the budget waits for all of it, then goes alone).
    fn cost(&self, size: usize) -> u32 {
        u32::try_from(size.div_ceil(UNIT_BYTES))
            .unwrap_or(u32::MAX)
            .clamp(1, self.units)
    }

    /// Room for a request of `size` bytes if there is some right now.
    pub fn try_take(&self, size: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.free)
            .try_acquire_many_owned(self.cost(size))
            .ok()
    }

    /// Room for a request of `size` bytes, once answers have freed it. `None` if the
    /// budget was closed.
    pub async fn take(&self, size: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.free)
            .acquire_many_owned(self.cost(size))
            .await
            .ok()
    }

    /// Gives back what a request of `size` bytes took (its permit was forgotten when it
    /// was published).
    pub fn give_back(&self, size: usize) {
        self.free.add_permits(self.cost(size) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_wait_for_the_bytes_answers_give_back() {
        let budget = ByteBudget::new(10 * UNIT_BYTES);
        let first = budget
            .try_take(6 * UNIT_BYTES)
            .expect("room for 6 of 10 KiB");
        first.forget();
        assert!(
            budget.try_take(5 * UNIT_BYTES).is_none(),
            "5 KiB do not fit in 4"
        );
        budget.give_back(6 * UNIT_BYTES);
        assert!(
            budget.try_take(5 * UNIT_BYTES).is_some(),
            "the answer freed 6 KiB"
        );
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_takes_all_of_it_and_goes_alone() {
        let budget = ByteBudget::new(4 * UNIT_BYTES);
        let small = budget.try_take(1).expect("a byte takes one unit");
        assert!(
            budget.try_take(100 * UNIT_BYTES).is_none(),
            "waits for the whole budget"
        );
        drop(small);
        let large = budget
            .take(100 * UNIT_BYTES)
            .await
            .expect("the whole budget");
        assert!(budget.try_take(1).is_none(), "nothing beside it");
        drop(large);
        assert!(budget.try_take(4 * UNIT_BYTES).is_some());
    }
}
