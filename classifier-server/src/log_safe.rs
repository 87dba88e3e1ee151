//! Logging what untrusted peers send, safely.
//!
//! Request ids, reply topics, file names and model names come from whoever can write to
//! the request topic. Logged verbatim, a newline forges a log line, a terminal escape
//! sequence rewrites the operator's screen, and a 1 MB id makes a 1 MB line. So every
//! such string is logged through [`Untrusted`] (escaped, cut to [`MAX_LOGGED_CHARS`]),
//! and warnings a peer can trigger at will go through a [`LogLimiter`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// How many characters of an untrusted string are logged; the rest is summarised by its
/// length. Enough for any id or topic name this system makes (a reply topic is 49).
pub const MAX_LOGGED_CHARS: usize = 128;

/// An untrusted string as it may appear in a log line: control characters (newlines,
/// ESC, NUL, …) and other non-printing characters escaped as Rust escapes them
/// (`\n`, `\u{1b}`), at most [`MAX_LOGGED_CHARS`] characters, then `…(N bytes)`.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, c) in self.0.chars().enumerate() {
            if shown == MAX_LOGGED_CHARS {
                return write!(f, "…({} bytes)", self.0.len());
            }
            if c.is_control() || c == '\u{7f}' {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{}", c.escape_debug())?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// [`Untrusted`] as an owned string, for reasons that are stored (error replies,
/// dead-letter attributes) rather than logged at once.
pub fn escaped(text: &str) -> String {
    Untrusted(text).to_string()
}

/// At most `per_interval` log lines per `interval` for one kind of warning that peers
/// can trigger as often as they like (one limiter per call site). What was held back
/// is counted and reported with the next line let through, so nothing is hidden, only
/// summarised.
pub struct LogLimiter {
    per_interval: u64,
    interval: Duration,
    /// Start of the current window, in milliseconds after [`EPOCH`].
    window_ms: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

/// The origin of [`LogLimiter`]'s clock (a `const` constructor cannot read the time).
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl LogLimiter {
    /// A limiter letting `per_interval` lines through per `interval`.
    pub const fn new(per_interval: u64, interval: Duration) -> Self {
        LogLimiter {
            per_interval,
            interval,
            window_ms: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were held back since
    /// the last one let through; `None` if this one is to be held back (and counted).
    pub fn allow(&self) -> Option<u64> {
        let now = EPOCH.elapsed().as_millis() as u64;
        let start = self.window_ms.load(Ordering::Relaxed);
        let next = start + self.interval.as_millis() as u64;
        // One caller opens the new window; the others see it opened.
        if now >= next
            && self
                .window_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < self.per_interval {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs a warning through `$limiter` (a `static` [`LogLimiter`]), adding `suppressed =
/// n` when earlier ones were held back. Same arguments as `tracing::warn!` after it.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            tracing::warn!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_escapes_cannot_forge_lines() {
        let forged = "id\nERROR classifier_server: FORGED\u{1b}[2J\0\r\u{7f}";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(
            shown,
            "id\\nERROR classifier_server: FORGED\\u{1b}[2J\\u{0}\\r\\u{7f}"
        );
    }

    #[test]
    fn long_strings_are_cut_with_their_size() {
        let huge = "a".repeat(1_000_000);
        let shown = Untrusted(&huge).to_string();
        assert!(shown.len() < 200, "{} bytes", shown.len());
        assert!(shown.ends_with("…(1000000 bytes)"));
        let fits = "b".repeat(MAX_LOGGED_CHARS);
        assert_eq!(Untrusted(&fits).to_string(), fits);
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        assert_eq!(
            escaped("classify-replies-0d5e/ä.png"),
            "classify-replies-0d5e/ä.png"
        );
    }

    #[test]
    fn the_limiter_lets_a_few_through_and_counts_the_rest() {
        let limiter = LogLimiter::new(3, Duration::from_secs(3600));
        let let_through: Vec<_> = (0..10).map(|_| limiter.allow()).collect();
        assert_eq!(&let_through[..3], &[Some(0), Some(0), Some(0)]);
        assert!(let_through[3..].iter().all(Option::is_none));
        let limiter = LogLimiter::new(1, Duration::from_millis(1));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(limiter.allow(), Some(1), "the held-back line is reported");
    }
}
