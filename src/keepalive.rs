//! Dead-peer detection: the keepalive and TCP_USER_TIMEOUT values the kernel
//! really applies (Linux counts keepalive times in whole seconds), how long a
//! vanished peer can keep its locks as a result, and setting them on a socket.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::config::KeepaliveConfig;

/// Keepalive settings as the kernel applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe (whole seconds).
    pub idle: Duration,
    /// Time between probes (whole seconds).
    pub interval: Duration,
    /// Unanswered probes before the kernel gives up (when no user timeout is set).
    pub probes: u32,
    /// TCP_USER_TIMEOUT, if set.
    pub user_timeout: Option<Duration>,
}

impl Keepalive {
    /// The values the kernel will use for `config`: keepalive times rounded
    /// up to whole seconds, never down, so detection is never faster than asked.
    pub fn effective(config: &KeepaliveConfig) -> Keepalive {
        Keepalive {
            idle: whole_seconds_up(config.idle_ms),
            interval: whole_seconds_up(config.interval_ms),
            probes: config.probes,
            user_timeout: (config.user_timeout_ms > 0)
                .then(|| Duration::from_millis(config.user_timeout_ms)),
        }
    }

    /// The longest a silent, vanished peer keeps its connection (and so its
    /// locks) when the server has nothing in flight to it.
    ///
    /// Linux checks a silent connection when its keepalive timer fires: first
    /// after `idle`, then every `interval`. Without a user timeout it drops the
    /// connection once `probes` probes went unanswered; with one, at the first
    /// check that finds at least one probe out and the peer silent for at
    /// least the user timeout.
    pub fn release_after(&self) -> Duration {
        match self.user_timeout {
            None => self.idle + self.interval * self.probes,
            Some(user_timeout) => {
                let first_check = self.idle + self.interval;
                let short = user_timeout.saturating_sub(first_check);
                let extra_checks = short.as_nanos().div_ceil(self.interval.as_nanos().max(1));
                first_check + self.interval * u32::try_from(extra_checks).unwrap_or(u32::MAX)
            }
        }
    }

    /// The soonest the server can drop a silent peer, counted from the last
    /// exchange with it: with a user timeout, unacknowledged data in flight is
    /// given up after that timeout even before keepalive would act. A client
    /// that must learn of a loss before the server releases its locks has to
    /// give up sooner than this.
    pub fn earliest_release(&self) -> Duration {
        match self.user_timeout {
            Some(user_timeout) => user_timeout.min(self.release_after()),
            None => self.release_after(),
        }
    }

    /// Sets these values on an accepted connection.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        let params = TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.interval)
            .with_retries(self.probes);
        socket.set_tcp_keepalive(&params)?;
        socket.set_tcp_user_timeout(self.user_timeout)
    }
}

fn whole_seconds_up(ms: u64) -> Duration {
    Duration::from_secs(ms.div_ceil(1000).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(
        idle_ms: u64,
        interval_ms: u64,
        probes: u32,
        user_timeout_ms: u64,
    ) -> KeepaliveConfig {
        KeepaliveConfig {
            idle_ms,
            interval_ms,
            probes,
            user_timeout_ms,
        }
    }

    #[test]
    fn keepalive_times_round_up_to_whole_seconds() {
        let k = Keepalive::effective(&config(1500, 200, 3, 2500));
        assert_eq!(k.idle, Duration::from_secs(2));
        assert_eq!(k.interval, Duration::from_secs(1));
        assert_eq!(k.user_timeout, Some(Duration::from_millis(2500)));
        let k = Keepalive::effective(&config(5000, 1000, 5, 0));
        assert_eq!(
            (k.idle, k.interval, k.user_timeout),
            (Duration::from_secs(5), Duration::from_secs(1), None)
        );
    }

    #[test]
    fn defaults_release_after_ten_seconds_either_way() {
        let k = Keepalive::effective(&KeepaliveConfig::default());
        assert_eq!(k.release_after(), Duration::from_secs(10));
        assert_eq!(k.earliest_release(), Duration::from_secs(10));
    }

    #[test]
    fn without_user_timeout_all_probes_must_go_unanswered() {
        let k = Keepalive::effective(&config(7000, 2000, 4, 0));
        assert_eq!(k.release_after(), Duration::from_secs(15));
        assert_eq!(k.earliest_release(), Duration::from_secs(15));
    }

    #[test]
    fn user_timeout_drop_waits_for_the_next_keepalive_check() {
        // Checks at 5, 7, 9, 11 s: the first at or past 10 s with a probe out is 11 s.
        let k = Keepalive::effective(&config(5000, 2000, 9, 10_000));
        assert_eq!(k.release_after(), Duration::from_secs(11));
        assert_eq!(k.earliest_release(), Duration::from_secs(10));
        // A user timeout shorter than idle + interval: the first check after a probe decides.
        let k = Keepalive::effective(&config(5000, 1000, 5, 2000));
        assert_eq!(k.release_after(), Duration::from_secs(6));
        assert_eq!(k.earliest_release(), Duration::from_secs(2));
    }

    #[test]
    fn applied_values_are_what_the_kernel_reports() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let k = Keepalive::effective(&config(1500, 2500, 4, 7000));
        k.apply(SockRef::from(&stream)).unwrap();
        let socket = SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(2));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(7000))
        );
    }
}
