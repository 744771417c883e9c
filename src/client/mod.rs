//! The blocking client library: connect, `hello`, take locks as guards that
//! carry the fencing token and unlock on drop, `status`, `stats`, `ping`.
//! Replies are matched by id, so several locks can be held and waited for
//! on one connection. A lease watchdog declares the locks lost before the
//! server can release them (the timing argument is in docs/SAFETY.md).
//!
//! ```no_run
//! use pklock::client::{Client, ClientOptions, LockOptions};
//! use std::time::Duration;
//!
//! let client = Client::connect("127.0.0.1:20934", &ClientOptions::named("nightly-backup"))?;
//! let guard = client.lock("backup", &LockOptions::exclusive().wait(Duration::from_secs(30)))?;
//! println!("token {}", guard.token());
//! // ... work, checking guard.is_held() before anything irreversible ...
//! guard.unlock()?;
//! # Ok::<(), pklock::client::Error>(())
//! ```

mod session;

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use self::session::LossReason;
use self::session::Session;
use crate::frame;
pub use crate::lock_table::Mode;
pub use crate::protocol::{HelloResult, StatsResult, StatusFilter, StatusResult};

/// The share of the server's earliest release time a lease may use at most;
/// the rest covers clock-rate differences, scheduling delays and the time a
/// caller needs to stop its work.
pub const MAX_LEASE_SHARE: f64 = 0.8;
/// The default lease, as a share of the server's earliest release time.
pub const DEFAULT_LEASE_SHARE: f64 = 0.5;
/// The shortest lease, as a share of the server's earliest release time:
/// shorter ones give up on a healthy server for a late ping.
pub const MIN_LEASE_SHARE: f64 = 0.1;
/// Pings per lease by default.
pub const PINGS_PER_LEASE: u32 = 5;

/// How to connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The name `status` shows for this connection.
    pub client_name: String,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Declare the locks lost after this long without an answer from the
    /// server. Default: half the server's `earliestReleaseMs`; refused when
    /// it plus `stop_time` is above [`MAX_LEASE_SHARE`] of it.
    pub lease: Option<Duration>,
    /// Ping this often. Default: a fifth of the lease.
    pub heartbeat: Option<Duration>,
    /// How long the caller may take, once a loss is declared, to stop the
    /// work the lock protects; the lease is shortened by it so that the work
    /// stops before the server may release the lock.
    pub stop_time: Duration,
}

impl ClientOptions {
    /// Defaults, with a client name.
    pub fn named(client_name: impl Into<String>) -> ClientOptions {
        ClientOptions {
            client_name: client_name.into(),
            ..ClientOptions::default()
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_name: String::new(),
            connect_timeout: Duration::from_secs(5),
            lease: None,
            heartbeat: None,
            stop_time: Duration::ZERO,
        }
    }
}

/// How to ask for a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// Exclusive or shared.
    pub mode: Mode,
    /// Give up after this long (`None`: wait for ever; zero: try once).
    pub wait: Option<Duration>,
}

impl LockOptions {
    /// An exclusive lock, waiting for ever.
    pub fn exclusive() -> LockOptions {
        LockOptions {
            mode: Mode::Exclusive,
            wait: None,
        }
    }

    /// A shared lock, waiting for ever.
    pub fn shared() -> LockOptions {
        LockOptions {
            mode: Mode::Shared,
            wait: None,
        }
    }

    /// Waits at most `wait`.
    pub fn wait(self, wait: Duration) -> LockOptions {
        LockOptions {
            wait: Some(wait),
            ..self
        }
    }
}

/// What went wrong.
#[derive(Debug)]
pub enum Error {
    /// No connection could be made.
    Connect {
        /// The address asked for.
        server: String,
        /// Why.
        source: io::Error,
    },
    /// The connection is gone, and with it every lock it held.
    Lost(LossReason),
    /// The lock was not granted within the wait.
    NotGranted,
    /// The wait was withdrawn (by an unlock of the same name).
    Cancelled,
    /// This client already holds the lock through another guard.
    AlreadyHeld(String),
    /// The server refused the request (`invalid` or `tooMany`).
    Refused {
        /// The status word.
        status: String,
        /// The server's explanation.
        error: String,
    },
    /// The lease plus the time to stop does not fit safely in the server's
    /// earliest release time.
    UnsafeLease {
        /// The lease asked for (or the one that would be left).
        lease: Duration,
        /// The time to stop after a loss ([`ClientOptions::stop_time`]).
        stop_time: Duration,
        /// The server's `earliestReleaseMs`.
        earliest_release: Duration,
    },
    /// The server's answer was not what the protocol promises.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { server, source } => write!(f, "cannot connect to {server}: {source}"),
            Error::Lost(reason) => write!(f, "connection lost: {reason}"),
            Error::NotGranted => f.write_str("the lock was not granted in time"),
            Error::Cancelled => f.write_str("the wait was cancelled by an unlock"),
            Error::AlreadyHeld(name) => write!(f, "this client already holds {name:?}"),
            Error::Refused { status, error } => write!(f, "refused ({status}): {error}"),
            Error::UnsafeLease {
                lease,
                stop_time,
                earliest_release,
            } => write!(
                f,
                "a lease of {} ms plus {} ms to stop does not fit safely in the server's earliest \
                 release time of {} ms: together they may take at most {:.0}% of it, with a lease \
                 of at least {:.0}%",
                lease.as_millis(),
                stop_time.as_millis(),
                earliest_release.as_millis(),
                MAX_LEASE_SHARE * 100.0,
                MIN_LEASE_SHARE * 100.0
            ),
            Error::Protocol(detail) => write!(f, "unexpected answer from the server: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A connection to a pklock server.
///
/// Dropping it closes the connection, which releases every lock it holds.
pub struct Client {
    session: Arc<Session>,
    hello: HelloResult,
    server: String,
}

impl Client {
    /// Connects to `server` (`host:port`), says `hello` and starts the lease
    /// watchdog.
    pub fn connect(server: &str, options: &ClientOptions) -> Result<Client, Error> {
        let connect_error = |source| Error::Connect {
            server: server.to_string(),
            source,
        };
        let mut stream = connect(server, options.connect_timeout).map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;

        // hello, synchronously, before any thread exists.
        let sent_at = Instant::now();
        let request =
            json!({"command": "hello", "id": 0, "parameters": {"client": options.client_name}});
        stream
            .set_read_timeout(Some(options.connect_timeout))
            .map_err(connect_error)?;
        frame::write_blocking(&mut stream, request.to_string().as_bytes())
            .map_err(connect_error)?;
        let not_pklock = |detail: String| {
            Error::Protocol(format!(
                "{server} does not answer as a pklock server ({detail})"
            ))
        };
        let body = match frame::read_blocking(&mut stream, 1 << 20) {
            Ok(body) => body,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(not_pklock(e.to_string()));
            }
            Err(e) => return Err(connect_error(e)),
        };
        stream.set_read_timeout(None).map_err(connect_error)?;
        let reply: Value = serde_json::from_slice(&body).map_err(|e| not_pklock(e.to_string()))?;
        if let Some(word) = reply.get("error").and_then(Value::as_str) {
            // tooManyConnections, or a refused hello.
            return Err(Error::Refused {
                status: word.to_string(),
                error: reply
                    .get("detail")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        let hello: HelloResult = result_of(reply)?;

        let earliest = Duration::from_millis(hello.earliest_release_ms);
        let limit = earliest
            .mul_f64(MAX_LEASE_SHARE)
            .saturating_sub(options.stop_time);
        let lease = options
            .lease
            .unwrap_or(earliest.mul_f64(DEFAULT_LEASE_SHARE).min(limit));
        if lease > limit || lease < earliest.mul_f64(MIN_LEASE_SHARE) || lease.is_zero() {
            return Err(Error::UnsafeLease {
                lease,
                stop_time: options.stop_time,
                earliest_release: earliest,
            });
        }
        let heartbeat = options
            .heartbeat
            .unwrap_or(lease / PINGS_PER_LEASE)
            .max(Duration::from_millis(10));

        let reader = stream.try_clone().map_err(connect_error)?;
        let session =
            Arc::new(Session::new(stream, lease, heartbeat, sent_at).map_err(connect_error)?);
        session.spawn_threads(reader).map_err(connect_error)?;
        Ok(Client {
            session,
            hello,
            server: server.to_string(),
        })
    }

    /// What the server said in `hello`.
    pub fn hello(&self) -> &HelloResult {
        &self.hello
    }

    /// The address this client connected to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// How long without an answer before the locks are declared lost.
    pub fn lease(&self) -> Duration {
        self.session.lease()
    }

    /// How often the watchdog pings.
    pub fn heartbeat(&self) -> Duration {
        self.session.heartbeat()
    }

    /// Takes a lock, waiting as `options` says.
    pub fn lock(&self, name: &str, options: &LockOptions) -> Result<LockGuard, Error> {
        if !self.session.claim(name) {
            return Err(Error::AlreadyHeld(name.to_string()));
        }
        let mut parameters = json!({"lockName": name, "mode": options.mode});
        if let Some(wait) = options.wait {
            parameters["timeoutMs"] = json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        }
        let outcome = self
            .call("lock", parameters)
            .and_then(|result| match status(&result) {
                "ok" => result
                    .get("token")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| Error::Protocol(format!("grant without a token: {result}"))),
                "timeout" => Err(Error::NotGranted),
                "cancelled" => Err(Error::Cancelled),
                _ => Err(refused(&result)),
            });
        match outcome {
            Ok(token) => Ok(LockGuard {
                session: Arc::clone(&self.session),
                name: name.to_string(),
                mode: options.mode,
                token,
                released: false,
            }),
            Err(e) => {
                self.session.release(name);
                Err(e)
            }
        }
    }

    /// Takes a lock if it is free now; `Ok(None)` if it is not.
    pub fn try_lock(&self, name: &str, mode: Mode) -> Result<Option<LockGuard>, Error> {
        let options = LockOptions {
            mode,
            wait: Some(Duration::ZERO),
        };
        match self.lock(name, &options) {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::NotGranted) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Releases a lock, or withdraws a wait for it; `false` when this
    /// connection neither held nor waited for it. Prefer [`LockGuard::unlock`].
    pub fn unlock(&self, name: &str) -> Result<bool, Error> {
        let result = self.call("unlock", json!({"lockName": name}))?;
        self.session.release(name);
        match status(&result) {
            "ok" => Ok(true),
            "notFound" => Ok(false),
            _ => Err(refused(&result)),
        }
    }

    /// Locks with their holders and waiters.
    pub fn status(
        &self,
        filter: &StatusFilter,
        limit: Option<usize>,
    ) -> Result<StatusResult, Error> {
        let mut parameters = match filter {
            StatusFilter::All => json!({}),
            StatusFilter::Exact(name) => json!({"lockName": name}),
            StatusFilter::Prefix(prefix) => json!({"prefix": prefix}),
        };
        if let Some(limit) = limit {
            parameters["limit"] = json!(limit);
        }
        self.call("status", parameters).and_then(ok_result)
    }

    /// Server counters.
    pub fn stats(&self) -> Result<StatsResult, Error> {
        self.call("stats", Value::Null).and_then(ok_result)
    }

    /// Round trip to the server.
    pub fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        let result = self.call("ping", Value::Null)?;
        match status(&result) {
            "ok" => Ok(start.elapsed()),
            _ => Err(refused(&result)),
        }
    }

    /// Lets child processes started from now on inherit the connection, so
    /// that the locks stay held while they run even if this process dies
    /// (as flock(1) does with its file). Turn it off again once the children
    /// that should have it are started.
    pub fn set_inheritable(&self, inheritable: bool) -> io::Result<()> {
        self.session.set_inheritable(inheritable)
    }

    /// Why the connection is gone, if it is.
    pub fn loss(&self) -> Option<LossReason> {
        self.session.loss()
    }

    /// Waits until the connection is lost or `timeout` passes (`None`: for
    /// ever); returns the reason if it was lost.
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<LossReason> {
        self.session.wait_lost(timeout)
    }

    /// Calls `callback` once, from a client thread, when the connection is
    /// lost (at once if it already is).
    pub fn on_lost(&self, callback: impl FnOnce(&LossReason) + Send + 'static) {
        self.session.on_lost(Box::new(callback));
    }

    fn call(&self, command: &str, parameters: Value) -> Result<Value, Error> {
        let rx = self
            .session
            .send(command, parameters)
            .map_err(Error::Lost)?;
        let reply = self.session.wait_reply(&rx).map_err(Error::Lost)?;
        if let Some(word) = reply.get("error").and_then(Value::as_str) {
            let detail = reply.get("detail").and_then(Value::as_str).unwrap_or("");
            return Err(Error::Refused {
                status: word.to_string(),
                error: detail.to_string(),
            });
        }
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| Error::Protocol(format!("{command}: reply without a result: {reply}")))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.session.declare_lost(LossReason::ClientClosed);
    }
}

/// A held lock. Dropping it unlocks (without waiting for the answer).
pub struct LockGuard {
    session: Arc<Session>,
    name: String,
    mode: Mode,
    token: u64,
    released: bool,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it is held.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether the lock is still ours: not unlocked, and the connection
    /// neither closed nor past its lease.
    pub fn is_held(&self) -> bool {
        !self.released && self.session.loss().is_none()
    }

    /// Waits until the lock is lost or `timeout` passes (`None`: for ever);
    /// returns the reason if it was lost.
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<LossReason> {
        self.session.wait_lost(timeout)
    }

    /// Releases the lock and waits for the server to confirm.
    pub fn unlock(mut self) -> Result<(), Error> {
        self.released = true;
        self.session.release(&self.name);
        let rx = self
            .session
            .send("unlock", json!({"lockName": self.name}))
            .map_err(Error::Lost)?;
        let reply = self.session.wait_reply(&rx).map_err(Error::Lost)?;
        match reply.get("result").map(status) {
            Some("ok") => Ok(()),
            _ => Err(Error::Protocol(format!("unlock: {reply}"))),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.session.release(&self.name);
            // If the connection is gone, so is the lock.
            let _ = self
                .session
                .send_untracked("unlock", json!({"lockName": self.name}));
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("token", &self.token)
            .field("held", &self.is_held())
            .finish()
    }
}

fn connect(server: &str, timeout: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = server.to_socket_addrs()?.collect();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

fn status(result: &Value) -> &str {
    result.get("status").and_then(Value::as_str).unwrap_or("")
}

fn refused(result: &Value) -> Error {
    Error::Refused {
        status: status(result).to_string(),
        error: result
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

fn ok_result<T: DeserializeOwned>(result: Value) -> Result<T, Error> {
    if status(&result) != "ok" {
        return Err(refused(&result));
    }
    serde_json::from_value(result).map_err(|e| Error::Protocol(e.to_string()))
}

fn result_of<T: DeserializeOwned>(mut reply: Value) -> Result<T, Error> {
    let result = reply
        .get_mut("result")
        .map(Value::take)
        .ok_or_else(|| Error::Protocol(format!("reply without a result: {reply}")))?;
    ok_result(result)
}
