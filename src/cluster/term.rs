//! How long a leadership term is safe, and how often to renew and look:
//! pure arithmetic on the lease, no IO. The argument is in docs/SAFETY.md
//! ("Running several servers").

use std::time::{Duration, Instant};

/// Share of a lease, in percent, taken off for clocks that run at
/// different rates here and in etcd (real drift is well under 0.1%).
pub const CLOCK_RATE_PERCENT: u32 = 2;

/// Taken off besides: the longest the event loop may take to notice the
/// deadline (one loop turn) and close its connections.
pub const TURN_GUARD: Duration = Duration::from_millis(250);

/// Until when a leader whose lease renewal (or grant) was *sent* at
/// `sent_at`, for a lease of `ttl`, may act as the leader. etcd starts the
/// lease's time again when it receives the renewal, which is after
/// `sent_at`, so the key cannot expire in etcd before `sent_at + ttl` by
/// etcd's clock; the margins cover the clocks' rates and one loop turn.
pub fn safe_until(sent_at: Instant, ttl: Duration) -> Instant {
    let margin = ttl * CLOCK_RATE_PERCENT / 100 + TURN_GUARD;
    sent_at + ttl.saturating_sub(margin)
}

/// How often the lease is renewed: three tries before it could run out.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How often a server looks who leads: a tenth of the lease, from 50 ms
/// to 500 ms.
pub fn look_every(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// The longest one etcd call may take: a quarter of the lease, at most a
/// second, so that a hung call leaves time for another renewal.
pub fn call_timeout(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(1))
}

/// The lease to ask etcd for: whole seconds, rounded up.
pub fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX)
}

/// The lease a deadline is reckoned from: the shorter of the configured one
/// and what etcd granted (which it may round up, never down).
pub fn effective_ttl(configured: Duration, granted_secs: i64) -> Duration {
    let granted = Duration::from_secs(u64::try_from(granted_secs).unwrap_or(0));
    configured.min(granted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_ends_before_the_lease_could_expire_in_etcd() {
        let sent = Instant::now();
        for ms in [2_000, 3_000, 5_000, 60_000] {
            let ttl = Duration::from_millis(ms);
            let until = safe_until(sent, ttl);
            assert!(until < sent + ttl, "{ms} ms");
            // Room for at least two renewals before the term ends.
            assert!(until > sent + 2 * renew_every(ttl), "{ms} ms");
            // A hung renewal gives up with time left for another.
            assert!(
                sent + renew_every(ttl) + call_timeout(ttl) < until,
                "{ms} ms"
            );
        }
    }

    #[test]
    fn a_granted_lease_shorter_than_asked_counts_and_longer_does_not() {
        let asked = Duration::from_millis(2_500);
        assert_eq!(ttl_secs(asked), 3);
        assert_eq!(effective_ttl(asked, 3), asked);
        assert_eq!(effective_ttl(asked, 2), Duration::from_secs(2));
        assert_eq!(effective_ttl(asked, 0), Duration::ZERO);
    }
}
