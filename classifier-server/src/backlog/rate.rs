//! A group's recent throughput, from a count that grows as it consumes, and how long its
//! backlog takes to drain at that pace (`classifier_backlog_drain_seconds`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back the throughput is measured: long enough to smooth batches and polls, short
/// enough that a change of pace shows within a minute.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// What the drain time is when messages wait and nothing drains them (none consumed over
/// the window, or no pace known yet, e.g. no server runs): a day. Finite, because
/// Kubernetes quantities (what KEDA hands the HPA) have no infinity, and far above any
/// drain time an autoscaler would aim for, so it reads as "scale up".
pub const NOT_DRAINING_SECONDS: f64 = 86_400.0;

/// How long `unanswered` messages take to drain at `per_second`: 0 with nothing waiting,
/// [`NOT_DRAINING_SECONDS`] at most (and without a pace above 0).
pub fn drain_seconds(unanswered: u64, per_second: Option<f64>) -> f64 {
    if unanswered == 0 {
        return 0.0;
    }
    match per_second {
        Some(rate) if rate > 0.0 => (unanswered as f64 / rate).min(NOT_DRAINING_SECONDS),
        _ => NOT_DRAINING_SECONDS,
    }
}

/// Samples of a growing count over the last window, for its pace per second.
#[derive(Debug)]
pub(crate) struct Rate {
    window: Duration,
    /// (when, count), oldest first; the first may be older than the window, so the pace
    /// spans the whole of it.
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// No samples yet; the pace is measured over `window`.
    pub(crate) fn new(window: Duration) -> Rate {
        Rate {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records `count` at `now`. A count below the last one (the topic or group made
    /// anew) starts the samples over.
    pub(crate) fn observe(&mut self, now: Instant, count: u64) {
        if self.samples.back().is_some_and(|&(_, last)| count < last) {
            self.samples.clear();
        }
        self.samples.push_back((now, count));
        let Some(start) = now.checked_sub(self.window) else {
            return;
        };
        // Keep the newest sample at or before the window's start.
        while self.samples.get(1).is_some_and(|&(when, _)| when <= start) {
            self.samples.pop_front();
        }
    }

    /// Forgets every sample (the count is not known any more).
    pub(crate) fn clear(&mut self) {
        self.samples.clear();
    }

    /// Counted per second between the oldest and newest samples; `None` before two
    /// samples some time apart.
    pub(crate) fn per_second(&self) -> Option<f64> {
        let (&(first, start), &(last, end)) = (self.samples.front()?, self.samples.back()?);
        let seconds = last.duration_since(first).as_secs_f64();
        (seconds > 0.0).then(|| end.saturating_sub(start) as f64 / seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_spans_the_window_and_starts_over_when_the_count_goes_back() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut rate = Rate::new(Duration::from_secs(60));
        rate.observe(at(0), 100);
        assert_eq!(rate.per_second(), None, "one sample is no pace");
        rate.observe(at(10), 150);
        assert_eq!(rate.per_second(), Some(5.0));
        for second in (20..=120).step_by(10) {
            rate.observe(at(second), 150 + (second - 10) * 2);
        }
        assert_eq!(rate.per_second(), Some(2.0), "only the last minute counts");
        assert!(rate.samples.len() <= 8, "{:?}", rate.samples);
        rate.observe(at(130), 3);
        assert_eq!(
            rate.per_second(),
            None,
            "a count that went back starts over"
        );
        rate.observe(at(135), 3);
        assert_eq!(rate.per_second(), Some(0.0));
        rate.clear();
        assert_eq!(rate.per_second(), None);
    }

    #[test]
    fn drain_time_is_finite_and_zero_without_a_backlog() {
        assert_eq!(drain_seconds(0, None), 0.0);
        assert_eq!(drain_seconds(0, Some(0.0)), 0.0);
        assert_eq!(drain_seconds(100, Some(4.0)), 25.0);
        assert_eq!(drain_seconds(100, Some(0.0)), NOT_DRAINING_SECONDS);
        assert_eq!(drain_seconds(100, None), NOT_DRAINING_SECONDS);
        assert_eq!(drain_seconds(u64::MAX, Some(1e-9)), NOT_DRAINING_SECONDS);
    }
}
