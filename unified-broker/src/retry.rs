//! Waiting for a broker: the one backoff schedule ([`Backoff`]) and retry loop
//! ([`retry`]) of the workspace.
//!
//! Every place that retries a broker operation (connecting, creating topics,
//! subscribing, publishing replies or requests, re-subscribing after a restart) waits
//! with a [`Backoff`]: the first delay, a growth factor and a cap. Loops use [`retry`]
//! (or [`retry_while_unavailable`] for "until the broker answers, or we stop");
//! state machines that cannot be a loop (such as [`crate::Resubscribing`]) keep a
//! [`Backoff`] themselves.

use std::future::Future;
use std::time::Duration;

use crate::BrokerError;

/// Delays between attempts: `initial`, then multiplied by `factor` after each failed
/// attempt, never above `max`. A value is the schedule; a copy in use keeps its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    factor: u32,
    max: Duration,
    current: Duration,
}

/// Waiting for a broker to come (back): connecting, creating topics and subscriptions,
/// subscribing, re-subscribing after a restart. 250 ms doubling to 10 s.
pub const BROKER_WAIT: Backoff =
    Backoff::new(Duration::from_millis(250), 2, Duration::from_secs(10));

impl Backoff {
    /// A schedule starting at `initial`, growing by `factor`, capped at `max`.
    pub const fn new(initial: Duration, factor: u32, max: Duration) -> Self {
        Backoff {
            initial,
            factor,
            max,
            current: initial,
        }
    }

    /// The delay to wait before the next attempt.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Moves to the next, longer delay (after another failed attempt).
    pub fn grow(&mut self) {
        self.current = self.current.saturating_mul(self.factor).min(self.max);
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Runs `operation` until it succeeds or `should_retry` refuses an error, sleeping the
/// backoff's delays in between. `should_retry` sees each error and the delay that will
/// follow (for its log line), and may count it; the last error is returned.
pub async fn retry<T, E, F, Fut>(
    mut backoff: Backoff,
    mut operation: F,
    mut should_retry: impl FnMut(&E, Duration) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match operation().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                let delay = backoff.current();
                if !should_retry(&error, delay) {
                    return Err(error);
                }
                tokio::time::sleep(delay).await;
                backoff.grow();
            }
        }
    }
}

/// Runs `operation` until it succeeds or fails for good, retrying transient broker
/// errors ([`BrokerError::is_retryable`]) with [`BROKER_WAIT`] and logging what it
/// waits for (`what`: "a connection", "the request topic"...). `None` if `stop`
/// (e.g. a cancellation token's `cancelled()`) completes first.
pub async fn retry_while_unavailable<T, F, Fut>(
    what: &str,
    stop: impl Future<Output = ()>,
    operation: F,
) -> Option<Result<T, BrokerError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BrokerError>>,
{
    let attempts = retry(BROKER_WAIT, operation, |error: &BrokerError, delay| {
        let transient = error.is_retryable();
        if transient {
            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "waiting for the broker to serve {what}");
        }
        transient
    });
    tokio::select! {
        result = attempts => Some(result),
        () = stop => None,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::time::Instant;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_grow_by_the_factor_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(ms(50), 2, ms(300));
        let mut delays = Vec::new();
        for _ in 0..5 {
            delays.push(backoff.current());
            backoff.grow();
        }
        assert_eq!(delays, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        backoff.reset();
        assert_eq!(backoff.current(), ms(50));
        assert_eq!(BROKER_WAIT.current(), ms(250));
    }

    #[tokio::test]
    async fn stops_at_the_first_success_after_sleeping_each_delay() {
        let attempts = Cell::new(0);
        let delays = RefCell::new(Vec::new());
        let started = Instant::now();
        let result = retry(
            Backoff::new(ms(10), 3, ms(40)),
            || {
                attempts.set(attempts.get() + 1);
                let n = attempts.get();
                async move {
                    if n < 4 {
                        Err(BrokerError::Unavailable("down".into()))
                    } else {
                        Ok(n)
                    }
                }
            },
            |_, delay| {
                delays.borrow_mut().push(delay);
                true
            },
        )
        .await;
        assert_eq!(result.ok(), Some(4));
        assert_eq!(*delays.borrow(), [ms(10), ms(30), ms(40)]);
        assert!(started.elapsed() >= ms(80), "slept {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_refused_error_ends_the_loop_at_once() {
        let attempts = Cell::new(0);
        let result: Option<Result<(), BrokerError>> =
            retry_while_unavailable("nothing", std::future::pending(), || {
                attempts.set(attempts.get() + 1);
                async { Err(BrokerError::Config("bad".into())) }
            })
            .await;
        assert!(matches!(result, Some(Err(BrokerError::Config(_)))));
        assert_eq!(attempts.get(), 1);
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let attempts = Cell::new(0);
        let result = retry_while_unavailable("a test", std::future::pending(), || {
            attempts.set(attempts.get() + 1);
            let n = attempts.get();
            async move {
                match n {
                    1 => Err(BrokerError::Unavailable("down".into())),
                    _ => Ok("up"),
                }
            }
        })
        .await;
        assert!(matches!(result, Some(Ok("up"))));
        assert_eq!(attempts.get(), 2);
    }

    #[tokio::test]
    async fn stop_ends_the_wait_with_none() {
        let started = Instant::now();
        let result: Option<Result<(), BrokerError>> =
            retry_while_unavailable("a test", tokio::time::sleep(ms(20)), || async {
                Err(BrokerError::Unavailable("down".into()))
            })
            .await;
        assert!(result.is_none());
        // Stopped during the first 250 ms delay, not after it.
        assert!(started.elapsed() < ms(240), "took {:?}", started.elapsed());
    }
}
