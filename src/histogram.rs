//! A fixed-bucket histogram of durations, as Prometheus histograms count
//! them: cumulative counts per upper bound, a count and a sum. Plain data,
//! cheap to record into on every grant and release.

use std::time::Duration;

/// Bucket upper bounds, in seconds: lock waits and holds run from
/// microseconds (uncontended) to hours (a nightly job).
pub const BOUNDS_SECONDS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0,
];

/// Durations counted into [`BOUNDS_SECONDS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durations {
    /// Per bucket, the durations at most its bound and above the one
    /// before (not cumulative; the last counts those above every bound).
    buckets: [u64; BOUNDS_SECONDS.len() + 1],
    sum_micros: u64,
}

impl Durations {
    /// Counts one duration.
    pub fn record(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let at = BOUNDS_SECONDS.partition_point(|&bound| bound < seconds);
        if let Some(bucket) = self.buckets.get_mut(at) {
            *bucket += 1;
        }
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }

    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Their sum, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros as f64 / 1e6
    }

    /// Each bound with how many durations were at most it (cumulative).
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BOUNDS_SECONDS
            .iter()
            .zip(self.buckets.iter())
            .scan(0u64, |running, (&bound, &n)| {
                *running += n;
                Some((bound, *running))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_that_holds_them_and_add_up() {
        let mut d = Durations::default();
        d.record(Duration::from_micros(500));
        d.record(Duration::from_millis(1));
        d.record(Duration::from_millis(7));
        d.record(Duration::from_secs(100_000));
        assert_eq!(d.count(), 4);
        let cumulative: Vec<(f64, u64)> = d.cumulative().collect();
        assert_eq!(cumulative[0], (0.001, 2), "at most 1 ms: 0.5 ms and 1 ms");
        assert_eq!(cumulative[1], (0.005, 2));
        assert_eq!(cumulative[2], (0.01, 3));
        assert_eq!(
            cumulative.last(),
            Some(&(86400.0, 3)),
            "100,000 s is above all"
        );
        assert!((d.sum_seconds() - 100_000.008_5).abs() < 1e-6);
    }
}
