//! The blocking client library: connect, `hello`, take locks as guards that
//! carry the fencing token and unlock on drop, `status`, `stats`, `ping`.
//! Replies are matched by id, so several locks can be held and waited for
//! on one connection. A lease watchdog declares the locks lost before the
//! server can release them (the timing argument is in docs/SAFETY.md).
//!
//! A closed connection is not a loss: the client connects again and
//! reclaims its locks from the restarted server ([`Client::on_resumed`]
//! says when); only if the lease runs out first, or a reclaim is refused,
//! are the locks lost.
//!
//! A client may be given several addresses ([`ServerList`]): the servers of
//! a cluster, of which one at a time is the leader. It uses the one that
//! answers `hello` as the leader (or as a single server, with no role),
//! follows a standby to the leader it names, and never sends a standby
//! anything but `hello`. When the leader steps down it closes the
//! connections, or answers `notLeader`; either way the client finds the new
//! leader and reclaims its locks there, as after a restart.
//!
//! With [`ClientOptions::tls`], it speaks TLS to every address (or to those
//! written `tls://HOST:PORT`), checking the server's certificate against the
//! host part of the address; with [`ClientOptions::auth`], its `hello`
//! presents a token, and the server's answer names the principal it acts as
//! ([`Client::principal`]). Every reconnect does the same.
//!
//! A loss tells the holder to stop; it does not release. The connection
//! stays open until every guard is dropped (or the client is), so if the
//! network only faltered the server hands the lock on only once the work is
//! over. If the server is really cut off it may release the lock from its
//! earliest release time on, which the lease leaves `stop_time` before:
//! stop the work at once, then drop the guard.
//!
//! ```no_run
//! use pklock::client::{Client, ClientOptions, LockOptions};
//! use std::time::Duration;
//!
//! // One address, or a cluster's: "locks-a:20934,locks-b:20934".
//! let client = Client::connect("127.0.0.1:20934", &ClientOptions::named("nightly-backup"))?;
//! let guard = client.lock("backup", &LockOptions::exclusive().wait(Duration::from_secs(30)))?;
//! println!("token {}", guard.token());
//! // ... work, checking guard.is_held() before anything irreversible ...
//! guard.unlock()?;
//! # Ok::<(), pklock::client::Error>(())
//! ```

mod leader;
mod session;
mod transport;

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use self::leader::Finder;
pub use self::leader::ServerList;
use self::session::{Dialed, Session};
pub use self::session::{LossReason, Resumed};
pub use self::transport::{ClientCert, Roots, TLS_SCHEME, TlsOptions, TlsProblem};
use self::transport::{DialError, Tls};
use crate::frame;
pub use crate::lock_table::Mode;
pub use crate::protocol::{HelloResult, StatsResult, StatusFilter, StatusResult};

/// The share (in percent) of the server's earliest release time that the
/// lease plus the time to stop may use at most; the rest covers clock-rate
/// differences, scheduling delays and one round trip.
pub const MAX_LEASE_PERCENT: u32 = 80;
/// The default lease, in percent of the server's earliest release time.
pub const DEFAULT_LEASE_PERCENT: u32 = 50;
/// The shortest lease, in percent of the server's earliest release time:
/// shorter ones give up on a healthy server for a late ping.
pub const MIN_LEASE_PERCENT: u32 = 10;
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
    /// it plus `stop_time` is above [`MAX_LEASE_PERCENT`] of it.
    pub lease: Option<Duration>,
    /// Ping this often. Default: a fifth of the lease.
    pub heartbeat: Option<Duration>,
    /// How long the caller may take, once a loss is declared, to stop the
    /// work the lock protects; the lease is shortened by it so that the work
    /// stops before the server may release the lock.
    pub stop_time: Duration,
    /// Take `stop_time` as an upper bound: against a server whose release
    /// time cannot cover it beside the default lease, shorten it until it
    /// can, instead of refusing ([`Client::stop_time`] says which was used).
    pub fit_stop_time: bool,
    /// TLS: for every address, or for those written `tls://HOST:PORT`
    /// (which need it). `None`: plain TCP.
    pub tls: Option<TlsOptions>,
    /// The token `hello` presents; `None`: the server's anonymous rights.
    pub auth: Option<AuthToken>,
}

/// A secret token for `hello` (its `auth` parameter). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(String);

impl AuthToken {
    /// A token.
    pub fn new(secret: impl Into<String>) -> AuthToken {
        AuthToken(secret.into())
    }

    /// The first line of the file at `path`, blanks trimmed; a file that is
    /// empty there is refused.
    pub fn from_file(path: &Path) -> Result<AuthToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the auth token from {}: {e}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim();
        match token.is_empty() {
            true => Err(format!(
                "{} holds no auth token: its first line is empty",
                path.display()
            )),
            false => Ok(AuthToken(token.to_string())),
        }
    }

    fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(..)")
    }
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
            fit_stop_time: false,
            tls: None,
            auth: None,
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
    /// No connection could be made (to any of the addresses, for a list:
    /// `source` then says what each one did).
    Connect {
        /// The address, or the list, asked for.
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
    /// The server refused this host: it is not in the server's `allowed`
    /// list.
    Denied(String),
    /// TLS with the server failed: its certificate, ours, or a port that
    /// does not speak TLS.
    Tls {
        /// The address.
        server: String,
        /// What went wrong.
        problem: TlsProblem,
    },
    /// The server speaks only TLS on that port (`tlsRequired`).
    TlsRequired {
        /// The address.
        server: String,
        /// The server's explanation.
        detail: String,
    },
    /// The TLS settings cannot be used (a CA or certificate file, or a
    /// `tls://` address without them).
    TlsConfig(String),
    /// The server refused the auth token (`authFailed`) and closed the
    /// connection.
    AuthFailed {
        /// The address.
        server: String,
        /// The server's explanation.
        detail: String,
    },
    /// The request is outside this client's rights (`denied`).
    PermissionDenied {
        /// What was asked: `lock "backup"`, `status`, ...
        request: String,
        /// Who the server took the client for (`anonymous` without a token).
        principal: String,
    },
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
            Error::Denied(detail) => {
                write!(
                    f,
                    "refused by the server: this host is not in its `allowed` list"
                )?;
                match detail.is_empty() {
                    true => Ok(()),
                    false => write!(f, " ({detail})"),
                }
            }
            Error::Tls { server, problem } => write!(f, "TLS with {server} failed: {problem}"),
            Error::TlsRequired { server, detail } => {
                let (_, host_port) = transport::split_scheme(server);
                write!(
                    f,
                    "{server} speaks only TLS: use --tls or {TLS_SCHEME}{host_port}"
                )?;
                match detail.is_empty() {
                    true => Ok(()),
                    false => write!(f, " (the server said: {detail})"),
                }
            }
            Error::TlsConfig(detail) => write!(f, "TLS settings: {detail}"),
            Error::AuthFailed { server, detail } => {
                write!(f, "the server at {server} refused the auth token")?;
                match detail.is_empty() {
                    true => Ok(()),
                    false => write!(f, ": {detail}"),
                }
            }
            Error::PermissionDenied { request, principal } => {
                write!(f, "denied: {principal:?} may not {request}")
            }
            Error::Refused { status, error } => write!(f, "refused ({status}): {error}"),
            Error::UnsafeLease {
                lease,
                stop_time,
                earliest_release,
            } => write!(
                f,
                "a lease of {} ms plus {} ms to stop does not fit safely in the server's earliest \
                 release time of {} ms: together they may take at most {MAX_LEASE_PERCENT}% of \
                 it, with a lease of at least {MIN_LEASE_PERCENT}%",
                lease.as_millis(),
                stop_time.as_millis(),
                earliest_release.as_millis(),
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
    /// Who the server takes this client for.
    principal: Arc<str>,
    stop_time: Duration,
    /// The restart grace has been mentioned on stderr.
    grace_told: std::sync::atomic::AtomicBool,
}

impl Client {
    /// Connects to the server at `servers` (`"host:port"`, or several of
    /// them: see [`ServerList`]), says `hello` and starts the lease watchdog.
    ///
    /// Of several addresses, the first that answers as a cluster's leader or
    /// as a single server is used; a standby's is left for the leader it
    /// names. While the servers that answer are all standbys between leaders,
    /// it tries again until [`ClientOptions::connect_timeout`]; once every
    /// address has failed otherwise, it gives up with the most telling of
    /// their errors, whose message names each address and what it did.
    pub fn connect(servers: impl ServerList, options: &ClientOptions) -> Result<Client, Error> {
        let addresses = servers.addresses();
        let list = addresses.join(",");
        if addresses.is_empty() || addresses.iter().any(String::is_empty) {
            return Err(Error::Connect {
                server: list,
                source: io::Error::new(io::ErrorKind::InvalidInput, "an empty address in the list"),
            });
        }
        let tls = match &options.tls {
            Some(settings) => Some(Arc::new(Tls::load(settings).map_err(Error::TlsConfig)?)),
            None => None,
        };
        if tls.is_none() {
            if let Some(address) = addresses.iter().find(|a| a.starts_with(TLS_SCHEME)) {
                return Err(Error::TlsConfig(format!(
                    "{address} asks for TLS, and no CA to check the server's certificate                      against was given (--ca)"
                )));
            }
        }
        let finder = Arc::new(Finder::new(
            addresses,
            &options.client_name,
            options.connect_timeout,
            tls,
            options.auth.clone(),
        ));
        let (dialed, hello) = find_first(&finder, options.connect_timeout)?;
        let principal: Arc<str> = Arc::from(dialed.principal.as_str());
        let found_at = dialed.server.clone();
        let connect_error = |source| Error::Connect {
            server: found_at.clone(),
            source,
        };

        let earliest = Duration::from_millis(hello.earliest_release_ms);
        let stop_time = match options.fit_stop_time {
            true => options
                .stop_time
                .min(share(earliest, MAX_LEASE_PERCENT - DEFAULT_LEASE_PERCENT)),
            false => options.stop_time,
        };
        let limit = share(earliest, MAX_LEASE_PERCENT).saturating_sub(stop_time);
        let lease = options
            .lease
            .unwrap_or(share(earliest, DEFAULT_LEASE_PERCENT).min(limit));
        if lease > limit || lease < share(earliest, MIN_LEASE_PERCENT) || lease.is_zero() {
            return Err(Error::UnsafeLease {
                lease,
                stop_time,
                earliest_release: earliest,
            });
        }
        let heartbeat = options
            .heartbeat
            .unwrap_or(lease / PINGS_PER_LEASE)
            .max(Duration::from_millis(10));

        let redial = Box::new(move |left: Duration, hint: Option<&str>| {
            let deadline = Instant::now() + left;
            match finder.round(deadline, hint) {
                Ok((dialed, _)) => Ok(dialed),
                Err(failed) => {
                    // Refused for good (not allowed, or a bad hello) by every
                    // server that answered.
                    let again = failed.worth_retrying();
                    let error = failed.into_error(&finder.list());
                    Err((
                        again,
                        match error {
                            Error::Refused { status, error } => format!("{status}: {error}"),
                            e => e.to_string(),
                        },
                    ))
                }
            }
        });
        let (session, reader) = Session::new(dialed, lease, heartbeat, redial);
        let session = Arc::new(session);
        session.spawn_threads(reader).map_err(connect_error)?;
        Ok(Client {
            session,
            hello,
            principal,
            stop_time,
            grace_told: Default::default(),
        })
    }

    /// The time to stop after a loss that the lease leaves room for: the
    /// one asked for, or with [`ClientOptions::fit_stop_time`] what fits
    /// beside the default lease if that is less.
    pub fn stop_time(&self) -> Duration {
        self.stop_time
    }

    /// How long until the server grants locks again after its restart
    /// (zero once it does).
    pub fn grants_resume_in(&self) -> Duration {
        self.session.grace_ends().map_or(Duration::ZERO, |end| {
            end.saturating_duration_since(Instant::now())
        })
    }

    /// Says once on stderr that the server is in its restart grace, with
    /// the time left counted from now: a caller waiting for a lock then
    /// knows why nothing comes.
    fn tell_grace_once(&self) {
        let left = self.grants_resume_in();
        if left.is_zero()
            || self
                .grace_told
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let what = if self.hello.cluster.is_some() {
            "took over the leadership"
        } else {
            "restarted"
        };
        // Never a panic for a closed stderr.
        let _ = writeln!(
            std::io::stderr(),
            "pklock: the server at {} {what} moments ago and grants locks again in {:.1} s \
             (restart grace)",
            self.server(),
            left.as_secs_f64()
        );
    }

    /// What the server said in `hello` when the client connected.
    pub fn hello(&self) -> &HelloResult {
        &self.hello
    }

    /// Who the server takes this client for: the principal of its token or
    /// client certificate, `anonymous`, or empty from a server that does not
    /// say (one without authentication).
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The address of the server the client talks to now: of a list, the
    /// one in use (a cluster's leader, perhaps not in the list), which
    /// changes when the client moves to a new leader.
    pub fn server(&self) -> String {
        self.session.server()
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
        self.tell_grace_once();
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
                _ => Err(self.refused(&result, || format!("lock {name:?}"))),
            });
        match outcome {
            Ok(token) => Ok(LockGuard {
                session: Arc::clone(&self.session),
                name: name.to_string(),
                mode: options.mode,
                token,
                released: false,
                principal: Arc::clone(&self.principal),
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
            _ => Err(self.refused(&result, || format!("unlock {name:?}"))),
        }
    }

    /// Closes the connection of every holder of `name` (the server's admin
    /// right is needed): the lock goes to the next in line.
    /// [`ForceRelease::NotHeld`] when nobody holds it.
    ///
    /// It is sent once: should the connection break before the answer, it
    /// is not sent again after the reconnect (by then the lock may have
    /// passed to someone else, whom a second release would close), and the
    /// error says the release may or may not have happened.
    pub fn force_release(&self, name: &str) -> Result<ForceRelease, Error> {
        let rx = self
            .session
            .send_once("forceRelease", json!({"lockName": name}))
            .map_err(Error::Lost)?;
        let Ok(reply) = rx.recv() else {
            return Err(match self.session.loss() {
                Some(reason) => Error::Lost(reason),
                None => Error::Refused {
                    status: "unanswered".to_string(),
                    error: format!(
                        "the connection broke before the server answered: {name:?} may or may \
                         not have been released; see `pklock status`"
                    ),
                },
            });
        };
        let result = result_of_reply("forceRelease", reply)?;
        match status(&result) {
            "ok" => {
                let closed = result.get("closed").cloned().unwrap_or(Value::Null);
                serde_json::from_value(closed)
                    .map(ForceRelease::Closed)
                    .map_err(|e| Error::Protocol(format!("forceRelease: {e}: {result}")))
            }
            "notFound" => Ok(ForceRelease::NotHeld),
            _ => Err(self.refused(&result, || format!("force the release of {name:?}"))),
        }
    }

    /// Locks with their holders and waiters: the first page (a reply is
    /// cut at about 64 KiB and marked `truncated`; see [`Client::status_after`]).
    pub fn status(
        &self,
        filter: &StatusFilter,
        limit: Option<usize>,
    ) -> Result<StatusResult, Error> {
        self.status_after(filter, None, limit)
    }

    /// Like [`Client::status`], only with locks whose names sort after
    /// `after`: pass the last name of a page cut short to get the next one.
    pub fn status_after(
        &self,
        filter: &StatusFilter,
        after: Option<&str>,
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
        if let Some(after) = after {
            parameters["after"] = json!(after);
        }
        let result = self.call("status", parameters)?;
        if status(&result) != "ok" {
            return Err(self.refused(&result, || "see the status of locks".to_string()));
        }
        parse(result)
    }

    /// Server counters.
    pub fn stats(&self) -> Result<StatsResult, Error> {
        let result = self.call("stats", Value::Null)?;
        if status(&result) != "ok" {
            return Err(self.refused(&result, || "see the server's counters".to_string()));
        }
        parse(result)
    }

    /// Round trip to the server.
    pub fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        let result = self.call("ping", Value::Null)?;
        match status(&result) {
            "ok" => Ok(start.elapsed()),
            _ => Err(self.refused(&result, || "ping".to_string())),
        }
    }

    /// Lets child processes started from now on inherit the connection, so
    /// that the locks stay held while they run even if this process dies
    /// (as flock(1) does with its file). Turn it off again once the children
    /// that should have it are started.
    pub fn set_inheritable(&self, inheritable: bool) -> io::Result<()> {
        self.session.set_inheritable(inheritable)
    }

    /// See [`Session::pause_lease`]: only while the guarded work is stopped.
    pub(crate) fn pause_lease(&self) {
        self.session.pause_lease();
    }

    /// See [`Session::resume_lease`].
    pub(crate) fn resume_lease(&self) -> Result<(), LossReason> {
        self.session.resume_lease()
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

    /// Calls `callback` once when the connection is lost (at once if it
    /// already is), on the thread that notices: the reader, the watchdog, or
    /// one of yours that sent a request or dropped the client. Keep it short,
    /// and take no lock such a thread may hold. Stop the work, then drop the
    /// guards: a connection that is still whole keeps the locks until then.
    pub fn on_lost(&self, callback: impl FnOnce(&LossReason) + Send + 'static) {
        self.session.on_lost(Box::new(callback));
    }

    /// Calls `callback` each time the server closed the connection and the
    /// client carried on over a new one, every lock reclaimed (after a
    /// server restart), on the client's reader thread. Keep it short.
    pub fn on_resumed(&self, callback: impl Fn(&Resumed) + Send + 'static) {
        self.session.on_resumed(Box::new(callback));
    }

    /// The error for a result that is not `ok`: `denied` names the request
    /// (`request` says it) and the principal.
    fn refused(&self, result: &Value, request: impl FnOnce() -> String) -> Error {
        match status(result) {
            "denied" => Error::PermissionDenied {
                request: request(),
                principal: shown_principal(&self.principal),
            },
            _ => refused(result),
        }
    }

    fn call(&self, command: &str, parameters: Value) -> Result<Value, Error> {
        let rx = self
            .session
            .send(command, parameters)
            .map_err(Error::Lost)?;
        let reply = self.session.wait_reply(&rx).map_err(Error::Lost)?;
        result_of_reply(command, reply)
    }
}

/// The `result` of an RPC's reply, or the error it is.
fn result_of_reply(command: &str, reply: Value) -> Result<Value, Error> {
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

impl Drop for Client {
    fn drop(&mut self) {
        self.session.shut();
    }
}

/// A held lock. Dropping it unlocks (without waiting for the answer).
pub struct LockGuard {
    session: Arc<Session>,
    name: String,
    mode: Mode,
    token: u64,
    released: bool,
    /// For a `denied` unlock's message.
    principal: Arc<str>,
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
    /// neither closed nor past its lease. Once false, stop the work and drop
    /// the guard: if the connection is still whole nobody else is granted
    /// the lock until then, but a server that is really cut off may release
    /// it from its earliest release time on.
    pub fn is_held(&self) -> bool {
        !self.released && self.session.loss().is_none()
    }

    /// Waits until the lock is lost or `timeout` passes (`None`: for ever);
    /// returns the reason if it was lost. Over a connection still whole, the
    /// lock is not handed on before every guard of its client is dropped.
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
            Some("denied") => Err(Error::PermissionDenied {
                request: format!("unlock {:?}", self.name),
                principal: shown_principal(&self.principal),
            }),
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

/// The first round of `finder`'s addresses, and more, backing off between
/// them as a reconnect does, while a standby says a cluster is there
/// without a leader yet, for at most `timeout`.
fn find_first(finder: &Finder, timeout: Duration) -> Result<(Dialed, HelloResult), Error> {
    let deadline = Instant::now() + timeout;
    let mut pause = session::FIRST_REDIAL_PAUSE;
    loop {
        let failed = match finder.round(deadline, None) {
            Ok(found) => return Ok(found),
            Err(failed) => failed,
        };
        let wait = session::jittered(pause);
        if !failed.standby_answered || Instant::now() + wait >= deadline {
            return Err(failed.into_error(&finder.list()));
        }
        std::thread::sleep(wait);
        pause = (pause * 2).min(session::MAX_REDIAL_PAUSE);
    }
}

/// Connects (over TLS when `tls` covers the address) and says `hello`,
/// with the token if there is one: the connection, ready for requests, and
/// the answer.
fn dial(
    server: &str,
    client_name: &str,
    auth: Option<&AuthToken>,
    tls: Option<&Tls>,
    timeout: Duration,
) -> Result<(Dialed, HelloResult), Error> {
    let connect_error = |source| Error::Connect {
        server: server.to_string(),
        source,
    };
    let (tls_asked, host_port) = transport::split_scheme(server);
    let tls = tls.filter(|tls| tls.covers(server));
    if tls_asked && tls.is_none() {
        return Err(Error::TlsConfig(format!(
            "{server} asks for TLS, and no CA to check the server's certificate against was given"
        )));
    }
    let connection = transport::connect(host_port, tls, timeout).map_err(|e| match e {
        DialError::Io(source) => connect_error(source),
        DialError::Tls(problem) => Error::Tls {
            server: server.to_string(),
            problem,
        },
        DialError::Refused(word, detail) => refusal(server, &word, detail),
    })?;
    let (mut reader, mut writer, control) = connection.split().map_err(connect_error)?;
    // A TLS alert after the handshake (a client certificate refused, in
    // TLS 1.3) comes with the answer to hello.
    let failed = |e: io::Error| match tls.and_then(|tls| tls.problem(&e, host_port)) {
        Some(problem) => Err(Error::Tls {
            server: server.to_string(),
            problem,
        }),
        None => Ok(e),
    };

    // hello, synchronously, before any thread uses the connection.
    let hello_sent_at = Instant::now();
    let mut request = json!({"command": "hello", "id": 0, "parameters": {"client": client_name}});
    if let Some(token) = auth {
        request["parameters"]["auth"] = json!(token.secret());
    }
    control
        .set_read_timeout(Some(timeout))
        .map_err(connect_error)?;
    if let Err(e) = writer.write_frame(request.to_string().as_bytes()) {
        return Err(connect_error(failed(e)?));
    }
    let not_pklock = |detail: String| {
        Error::Protocol(format!(
            "{server} does not answer as a pklock server ({detail})"
        ))
    };
    let body = match frame::read_blocking(&mut reader, 1 << 20) {
        Ok(body) => body,
        Err(e) => match failed(e)? {
            e if e.kind() == io::ErrorKind::InvalidData => return Err(not_pklock(e.to_string())),
            e if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
            {
                return Err(not_pklock(format!(
                    "no answer to hello within {} ms",
                    timeout.as_millis()
                )));
            }
            e if e.kind() == io::ErrorKind::UnexpectedEof => {
                let why = match tls.is_some_and(Tls::has_client_cert) {
                    // Some servers close at once instead of sending an alert.
                    true => {
                        "it closed the connection without answering hello; over TLS, it may \
                             have refused our client certificate"
                    }
                    false => "it closed the connection without answering hello",
                };
                return Err(not_pklock(why.to_string()));
            }
            e => return Err(connect_error(e)),
        },
    };
    control.set_read_timeout(None).map_err(connect_error)?;
    let reply: Value = serde_json::from_slice(&body).map_err(|e| not_pklock(e.to_string()))?;
    if let Some(word) = reply.get("error").and_then(Value::as_str) {
        let detail = reply
            .get("detail")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return Err(refusal(server, word, detail));
    }
    let result = reply
        .get("result")
        .ok_or_else(|| Error::Protocol(format!("hello: reply without a result: {reply}")))?;
    if status(result) != "ok" {
        return Err(refused(result));
    }
    let principal = result
        .get("principal")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let hello: HelloResult = parse(result.clone())?;
    let dialed = Dialed {
        server: server.to_string(),
        reader,
        writer,
        control,
        hello_sent_at,
        principal,
        earliest_release: Duration::from_millis(hello.earliest_release_ms),
        grants_resume_in: Duration::from_millis(hello.grants_resume_in_ms),
    };
    Ok((dialed, hello))
}

/// The error for an error message in answer to hello (or, in plain text,
/// to a TLS ClientHello): `denied` (the allow list), `tlsRequired`,
/// `authFailed`, `tooManyConnections`, or a refused hello.
fn refusal(server: &str, word: &str, detail: String) -> Error {
    let server = server.to_string();
    match word {
        "denied" => Error::Denied(detail),
        "tlsRequired" => Error::TlsRequired { server, detail },
        "authFailed" => Error::AuthFailed { server, detail },
        _ => Error::Refused {
            status: word.to_string(),
            error: detail,
        },
    }
}

/// The principal as messages show it: `anonymous` from a server that does
/// not name one.
fn shown_principal(principal: &str) -> String {
    match principal.is_empty() {
        true => "anonymous".to_string(),
        false => principal.to_string(),
    }
}

fn status(result: &Value) -> &str {
    result.get("status").and_then(Value::as_str).unwrap_or("")
}

/// `earliest` times `percent`/100, exactly (no float rounding at the limits).
fn share(earliest: Duration, percent: u32) -> Duration {
    earliest * percent / 100
}

/// The longest time to stop that still leaves the shortest lease within the
/// server's earliest release time.
pub fn longest_stop_time(earliest_release: Duration) -> Duration {
    share(earliest_release, MAX_LEASE_PERCENT - MIN_LEASE_PERCENT)
}

/// A refusal the protocol defines, or a protocol error for a status it
/// does not.
fn refused(result: &Value) -> Error {
    let error = result
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match status(result) {
        word @ ("invalid" | "tooMany" | "denied") => Error::Refused {
            status: word.to_string(),
            error,
        },
        _ => Error::Protocol(format!("unexpected answer: {result}")),
    }
}

fn parse<T: DeserializeOwned>(result: Value) -> Result<T, Error> {
    serde_json::from_value(result).map_err(|e| Error::Protocol(e.to_string()))
}

/// A holder whose connection [`Client::force_release`] closed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct ClosedHolder {
    /// Its connection's id, as `status` shows it.
    pub conn: u64,
    /// The client name it gave in `hello`.
    pub client: String,
    /// Its address, `ip:port`.
    pub peer: String,
}

/// What [`Client::force_release`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForceRelease {
    /// These holders' connections were closed.
    Closed(Vec<ClosedHolder>),
    /// Nobody held the lock.
    NotHeld,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Server};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    /// A server on `port` with a state file in `dir`, running on a thread.
    fn serve(
        port: u16,
        dir: &std::path::Path,
    ) -> (crate::server::ShutdownHandle, std::thread::JoinHandle<()>) {
        let config = Config {
            listen: vec![format!("127.0.0.1:{port}").parse().unwrap()],
            state_file: Some(dir.join("state")),
            ..Config::default()
        };
        let server = Server::bind(config).unwrap();
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().unwrap());
        (handle, thread)
    }

    #[test]
    fn a_token_is_the_first_line_of_its_file_trimmed_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("pklock-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "\t s3cret  \r\nnext\n").unwrap();
        let token = AuthToken::from_file(&file).unwrap();
        assert_eq!(token.secret(), "s3cret");
        assert_eq!(format!("{token:?}"), "AuthToken(..)");
        std::fs::write(&file, "   \ns3cret\n").unwrap();
        let error = AuthToken::from_file(&file).unwrap_err();
        assert!(
            error.ends_with("holds no auth token: its first line is empty"),
            "{error}"
        );
        let error = AuthToken::from_file(&dir.join("none")).unwrap_err();
        assert!(
            error.starts_with("cannot read the auth token from"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pause_across_a_restart_does_not_resume_even_with_the_lock_reclaimed() {
        let dir = std::env::temp_dir().join(format!("pklock-pause-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let (stop, thread) = serve(port, &dir);
        let addr = format!("127.0.0.1:{port}");
        let client = Client::connect(&addr, &ClientOptions::named("paused")).unwrap();
        let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
        client.pause_lease();
        stop.shutdown();
        thread.join().unwrap();
        let (stop, thread) = serve(port, &dir);
        // The reader dials again and reclaims the lock meanwhile.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = Client::connect(&addr, &ClientOptions::named("probe")).unwrap();
            let status = probe
                .status(&StatusFilter::Exact("x".into()), None)
                .unwrap();
            if status.locks.first().is_some_and(|l| !l.holders.is_empty()) {
                break;
            }
            assert!(Instant::now() < deadline, "never reclaimed");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Work stopped across a replaced connection must not go on: the lock
        // may have been someone else's while it was stopped.
        assert!(client.resume_lease().is_err());
        assert!(!guard.is_held());
        drop(guard);
        drop(client);
        stop.shutdown();
        thread.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
