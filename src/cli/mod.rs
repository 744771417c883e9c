//! The `pklock` command's subcommands, for ops scripts: `run` a command under
//! a lock, `lock` and hold, `status`, `stats`, `ping`. Exit codes follow
//! flock(1) where they apply; bin/pklock.rs only parses arguments.

pub mod hold;
pub mod report;
pub mod run;

use std::fmt;
use std::time::Duration;

use crate::client::{Client, ClientOptions, Error, LockGuard, LockOptions, Mode};

/// The default server address, as the original.
pub const DEFAULT_SERVER: &str = "127.0.0.1:20934";

/// Exit codes.
pub mod exit {
    /// The lock was not granted in time (flock -E's default).
    pub const CONFLICT: u8 = 1;
    /// Bad arguments (EX_USAGE, as flock).
    pub const USAGE: u8 = 64;
    /// The server cannot be reached or refused the request (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// The server answered something unexpected (EX_SOFTWARE).
    pub const SOFTWARE: u8 = 70;
    /// The lock was lost while held: server gone, connection broken, lease
    /// expired (EX_TEMPFAIL: try again later).
    pub const LOST: u8 = 75;
    /// The command was found but could not be run.
    pub const CANNOT_RUN: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// A subcommand that ends with a message on stderr and an exit code.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// How to take the lock, for `run` and `lock`.
#[derive(Clone, Debug)]
pub struct Acquire {
    /// Server address.
    pub server: String,
    /// Lock name.
    pub name: String,
    /// `None` waits for ever; zero tries once.
    pub wait: Option<Duration>,
    /// Shared instead of exclusive.
    pub shared: bool,
    /// Exit code when the lock is not granted.
    pub conflict_code: u8,
    /// Exit code when the lock is lost while held.
    pub lost_code: u8,
}

/// Connects with a client name that says who is asking, from where.
pub fn connect(server: &str, what: &str, stop_time: Duration) -> Result<Client, Failure> {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let options = ClientOptions {
        stop_time,
        ..ClientOptions::named(format!("{what} ({host} pid {})", std::process::id()))
    };
    Client::connect(server, &options).map_err(|e| match e {
        Error::UnsafeLease { .. } => Failure::new(exit::USAGE, e.to_string()),
        Error::Connect { .. } => Failure::new(exit::UNAVAILABLE, e.to_string()),
        _ => Failure::new(exit::SOFTWARE, e.to_string()),
    })
}

/// Takes the lock as `acquire` says, or fails with the conflict code.
pub fn take(client: &Client, acquire: &Acquire) -> Result<LockGuard, Failure> {
    let options = LockOptions {
        mode: if acquire.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        },
        wait: acquire.wait,
    };
    client.lock(&acquire.name, &options).map_err(|e| match e {
        Error::NotGranted => {
            let how = match acquire.wait {
                Some(wait) if wait.is_zero() => "it is held elsewhere".to_string(),
                Some(wait) => format!("not granted within {}", human(wait)),
                None => "not granted".to_string(),
            };
            Failure::new(
                acquire.conflict_code,
                format!("lock {:?}: {how}", acquire.name),
            )
        }
        Error::Lost(reason) => Failure::new(
            exit::UNAVAILABLE,
            format!("lock {:?}: {reason}", acquire.name),
        ),
        Error::Refused { .. } => {
            Failure::new(exit::UNAVAILABLE, format!("lock {:?}: {e}", acquire.name))
        }
        other => Failure::new(exit::SOFTWARE, format!("lock {:?}: {other}", acquire.name)),
    })
}

/// `1.5s`, `250ms`, `2m3s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 if ms % 1000 == 0 => format!("{}s", ms / 1000),
        1000..60_000 => format!("{:.1}s", d.as_secs_f64()),
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(123)), "2m3s");
    }
}
