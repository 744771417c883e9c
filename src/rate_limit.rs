//! What a peer can do to the server's log: caps how many lines it can cause
//! (a fixed number per window, with a count of the ones left out), and
//! escapes what it wrote so it cannot forge lines or drive a terminal.
//! Takes `now`; reads no clock.

use std::borrow::Cow;
use std::time::{Duration, Instant};

/// `text` with control characters (newlines, escapes, C1 controls) written
/// as escapes, for a log line: a peer's client name or bad input cannot
/// start a line of its own or send terminal commands to whoever reads it.
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    Cow::Owned(out)
}

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
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escaped("backup job"), "backup job");
        assert!(matches!(escaped("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escaped("x\n[INFO] forged\u{1b}[2J\u{85}é"),
            "x\\n[INFO] forged\\u{1b}[2J\\u{85}é"
        );
    }

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
