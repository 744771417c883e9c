//! Caps how many warnings a peer can make the server log: a fixed number per
//! window, with a count of the ones left out. Takes `now`; reads no clock.

use std::time::{Duration, Instant};

/// A per-window budget of log lines.
#[derive(Debug)]
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// At most `per_window` lines every `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogLimiter {
            per_window,
            window,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were left
    /// out since the last one logged; `None` when this one must be left out.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= self.per_window {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_budget_per_window_and_counts_the_rest() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(limiter.admit(start), Some(0));
        assert_eq!(limiter.admit(start), Some(0));
        assert_eq!(limiter.admit(start), None);
        assert_eq!(limiter.admit(start + Duration::from_millis(999)), None);
        assert_eq!(limiter.admit(start + Duration::from_secs(1)), Some(2));
        assert_eq!(limiter.admit(start + Duration::from_secs(1)), Some(0));
    }
}
