//! The blocking client library: connect, `hello`, take locks as guards that
//! carry the fencing token and unlock on drop, `status`, `stats`, `ping`.
//! Replies are matched by id, so several locks can be held and waited for
//! on one connection. A lease watchdog declares the locks lost before the
//! server can release them (the timing argument is in docs/SAFETY.md).
//!
//! Beyond a mutex: [`LockOptions::permits`] takes some of a counting
//! semaphore's permits, and [`Client::lock_all`] takes several locks at
//! once, all or none, under one token ([`MultiGuard`]). A wait that would
//! close a cycle of clients waiting for each other is refused at once as
//! [`Error::Deadlock`], which names the cycle.
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
use self::session::{Ask, Dialed, Session};
pub use self::session::{LossReason, Resumed};
pub use self::transport::{ClientCert, Roots, TLS_SCHEME, TlsOptions, TlsProblem};
use self::transport::{DialError, Tls};
use crate::frame;
pub use crate::lock_table::Mode;
pub use crate::protocol::{CycleStep, HelloResult, StatsResult, StatusFilter, StatusResult};

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
    /// A grant whose holder runs this client (a `pklock` inside `pklock
    /// run` takes it from `PKLOCK_NAMES` and `PKLOCK_TOKEN`): the server
    /// then counts that holder as waiting for whatever this client waits
    /// for, so that a deadlock between nested runs is seen.
    pub within: Option<Within>,
}

/// A grant, named by its lock and token, whose holder runs this client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Within {
    /// One of the grant's locks.
    pub lock_name: String,
    /// The grant's token.
    pub token: u64,
}

impl Within {
    /// From the environment `pklock run` gives its command: the first of
    /// `PKLOCK_NAMES` (or `PKLOCK_NAME`) and `PKLOCK_TOKEN`; `None` outside
    /// one.
    pub fn from_env() -> Option<Within> {
        let names = std::env::var("PKLOCK_NAMES")
            .or_else(|_| std::env::var("PKLOCK_NAME"))
            .ok()?;
        let lock_name = names.lines().next().filter(|n| !n.is_empty())?.to_string();
        let token = std::env::var("PKLOCK_TOKEN").ok()?.trim().parse().ok()?;
        Some(Within { lock_name, token })
    }
}

/// What `hello` says on every connection of one client.
#[derive(Clone, Debug)]
pub(crate) struct Greeting {
    client_name: String,
    auth: Option<AuthToken>,
    within: Option<Within>,
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
            within: None,
        }
    }
}

/// How to ask for a lock.
///
/// A mutex by default ([`LockOptions::exclusive`], [`LockOptions::shared`]);
/// with [`LockOptions::permits`], a counting semaphore: at most `permits`
/// permits are held under the name at once, `take` of them by this grant.
/// Everyone asking for one name must agree on `permits` while anyone holds
/// or waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// Exclusive or shared; not sent for a semaphore, whose grants count
    /// as shared.
    pub mode: Mode,
    /// Give up after this long (`None`: wait for ever; zero: try once).
    pub wait: Option<Duration>,
    /// `Some(n)`: take the lock as a semaphore of `n` permits (1 to
    /// 1,000,000), in place of `mode`.
    pub permits: Option<u32>,
    /// How many of the semaphore's permits to take: 1 to `permits`
    /// (default 1). The server refuses anything but 1 without `permits`.
    pub take: u32,
}

impl Default for LockOptions {
    /// An exclusive lock, waiting for ever.
    fn default() -> Self {
        LockOptions::exclusive()
    }
}

impl LockOptions {
    /// An exclusive lock, waiting for ever.
    pub fn exclusive() -> LockOptions {
        LockOptions {
            mode: Mode::Exclusive,
            wait: None,
            permits: None,
            take: 1,
        }
    }

    /// A shared lock, waiting for ever.
    pub fn shared() -> LockOptions {
        LockOptions {
            mode: Mode::Shared,
            ..LockOptions::exclusive()
        }
    }

    /// One permit of a semaphore of `permits`, waiting for ever.
    pub fn semaphore(permits: u32) -> LockOptions {
        LockOptions::shared().permits(permits)
    }

    /// Waits at most `wait`.
    pub fn wait(self, wait: Duration) -> LockOptions {
        LockOptions {
            wait: Some(wait),
            ..self
        }
    }

    /// Takes the lock as a semaphore of `permits` permits (the mode is
    /// then not sent: a semaphore's grants count as shared).
    pub fn permits(self, permits: u32) -> LockOptions {
        LockOptions {
            mode: Mode::Shared,
            permits: Some(permits),
            ..self
        }
    }

    /// Takes `take` of the semaphore's permits (with [`LockOptions::permits`]).
    pub fn take(self, take: u32) -> LockOptions {
        LockOptions { take, ..self }
    }

    /// `timeoutMs`, when there is a wait.
    fn add_timeout(&self, parameters: &mut Value) {
        if let Some(wait) = self.wait {
            parameters["timeoutMs"] = json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        }
    }

    /// The parameters of a `lock` request for `name`: `permits` and
    /// `take` for a semaphore, else `mode`.
    fn parameters(&self, name: &str) -> Value {
        let mut parameters = json!({"lockName": name});
        match self.permits {
            Some(permits) => {
                parameters["permits"] = json!(permits);
                parameters["take"] = json!(self.take);
            }
            None => {
                parameters["mode"] = json!(self.mode);
                if self.take != 1 {
                    // For the server to refuse: a take without permits.
                    parameters["take"] = json!(self.take);
                }
            }
        }
        self.add_timeout(&mut parameters);
        parameters
    }

    /// How the session reclaims a grant asked for this way.
    fn ask(&self) -> Ask {
        match self.permits {
            Some(permits) => Ask::Permits {
                permits,
                take: self.take,
            },
            None => Ask::Mode(self.mode),
        }
    }
}

/// One lock of a [`Client::lock_all`] request: a name, in the request's
/// mode (`mode: None`) or in a mode of its own. Made from a name
/// (`"a"`, `&String`) or a pair (`("a", Mode::Shared)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockSpec<'a> {
    /// The lock's name.
    pub name: &'a str,
    /// Its mode; `None`: the [`LockOptions::mode`] of the request.
    pub mode: Option<Mode>,
}

impl<'a> From<&'a str> for LockSpec<'a> {
    fn from(name: &'a str) -> Self {
        LockSpec { name, mode: None }
    }
}

impl<'a> From<&&'a str> for LockSpec<'a> {
    fn from(name: &&'a str) -> Self {
        LockSpec::from(*name)
    }
}

impl<'a> From<&'a String> for LockSpec<'a> {
    fn from(name: &'a String) -> Self {
        LockSpec::from(name.as_str())
    }
}

impl<'a> From<(&'a str, Mode)> for LockSpec<'a> {
    fn from((name, mode): (&'a str, Mode)) -> Self {
        LockSpec {
            name,
            mode: Some(mode),
        }
    }
}

impl<'a> From<&(&'a str, Mode)> for LockSpec<'a> {
    fn from(pair: &(&'a str, Mode)) -> Self {
        LockSpec::from(*pair)
    }
}

/// The parameters of a `lock` request for several names at once: each name
/// a string (the request's mode) or `{"lockName", "mode"}`; or why it
/// cannot be sent.
fn multi_parameters(locks: &[LockSpec<'_>], options: &LockOptions) -> Result<Value, Error> {
    if options.permits.is_some() || options.take != 1 {
        return Err(Error::InvalidRequest(
            "a semaphore cannot be taken together with other locks: lock it on its own".to_string(),
        ));
    }
    if locks.is_empty() {
        return Err(Error::InvalidRequest(
            "no lock names given: lock_all needs at least one".to_string(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = locks.iter().find(|spec| !seen.insert(spec.name)) {
        return Err(Error::InvalidRequest(format!(
            "lock {:?} is named twice in one request",
            twice.name
        )));
    }
    let names: Vec<Value> = locks
        .iter()
        .map(|spec| match spec.mode {
            None => json!(spec.name),
            Some(mode) => json!({"lockName": spec.name, "mode": mode}),
        })
        .collect();
    let mut parameters = json!({"lockNames": names, "mode": options.mode});
    options.add_timeout(&mut parameters);
    Ok(parameters)
}

/// `conn 7 (A) waits for "y", held by conn 9 (B), which waits for "x",
/// held by conn 7`: a deadlock's cycle on one line.
fn cycle_text(cycle: &[CycleStep]) -> String {
    // Client names are the peers' own words: no line breaks from them.
    let who = |step: &CycleStep| {
        let client: String = step
            .client
            .chars()
            .flat_map(|c| match c.is_control() {
                true => c.escape_default().collect::<Vec<_>>(),
                false => vec![c],
            })
            .collect();
        match client.is_empty() {
            true => format!("conn {}", step.conn),
            false => format!("conn {} ({client})", step.conn),
        }
    };
    let mut text = String::new();
    for (i, step) in cycle.iter().enumerate() {
        if i == 0 {
            text += &who(step);
        } else {
            text += &format!(", held by {}, which", who(step));
        }
        // The server leaves out the names of locks the asker may not see.
        match step.lock_name.is_empty() {
            true => text += " waits for a lock you may not see",
            false => text += &format!(" waits for {:?}", step.lock_name),
        }
    }
    if let Some(first) = cycle.first() {
        text += &format!(", held by conn {}", first.conn);
    }
    text
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
    /// Waiting would close a cycle of connections waiting for each other
    /// for ever (`deadlock`): the request was answered at once and not
    /// queued. Release something, or give up, rather than ask again.
    Deadlock {
        /// The cycle, starting with this request: each step's connection
        /// waits for its lock, held (or awaited ahead of it) by the next
        /// step's connection, the last step's by the first's.
        cycle: Vec<CycleStep>,
    },
    /// The lock is a semaphore of another number of permits than asked
    /// (or none were asked): everyone must agree on it while the name is
    /// held or awaited.
    PermitsMismatch {
        /// The lock.
        lock: String,
        /// The number of permits in force.
        permits: u32,
        /// The server's explanation.
        error: String,
    },
    /// The request cannot be made as asked (checked before sending): a
    /// name given twice, none at all, a semaphore among several locks.
    InvalidRequest(String),
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
            Error::Deadlock { cycle } => {
                f.write_str("deadlock: this wait would close a cycle")?;
                match cycle.is_empty() {
                    true => Ok(()),
                    false => write!(f, ": {}", cycle_text(cycle)),
                }
            }
            Error::PermitsMismatch {
                lock,
                permits,
                error,
            } => match error.is_empty() {
                true => write!(f, "lock {lock:?} is a semaphore of {permits} permits"),
                false => f.write_str(error),
            },
            Error::InvalidRequest(detail) => write!(f, "invalid request: {detail}"),
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
        let greeting = Greeting {
            client_name: options.client_name.clone(),
            auth: options.auth.clone(),
            within: options.within.clone(),
        };
        let finder = Arc::new(Finder::new(
            addresses,
            greeting,
            options.connect_timeout,
            tls,
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

    /// Takes a lock, waiting as `options` says: a mutex, or with
    /// [`LockOptions::permits`] some of a semaphore's permits.
    ///
    /// [`Error::Deadlock`] when waiting would close a cycle of connections
    /// waiting for each other; [`Error::PermitsMismatch`] when the name is
    /// a semaphore of another number of permits than asked.
    pub fn lock(&self, name: &str, options: &LockOptions) -> Result<LockGuard, Error> {
        if let Err(held) = self.session.claim(&[(name, options.ask())]) {
            return Err(Error::AlreadyHeld(held));
        }
        self.tell_grace_once();
        let outcome = self
            .call("lock", options.parameters(name))
            .and_then(|result| self.granted(&result, Some(name), || format!("lock {name:?}")));
        match outcome {
            Ok(token) => Ok(LockGuard {
                session: Arc::clone(&self.session),
                name: name.to_string(),
                mode: match options.permits {
                    Some(_) => Mode::Shared,
                    None => options.mode,
                },
                semaphore: options.permits.map(|permits| (permits, options.take)),
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

    /// Takes several locks in one request, all at once or none: the
    /// server grants them together, with one fencing token, once every one
    /// of them is free for this request (it waits in each name's queue
    /// meanwhile, holding none). Each lock is a name in `options.mode`, or
    /// a name with its own mode:
    ///
    /// ```no_run
    /// # use pklock::client::{Client, ClientOptions, LockOptions, Mode};
    /// # let client = Client::connect("127.0.0.1:20934", &ClientOptions::named("x"))?;
    /// let both = client.lock_all(["accounts", "ledger"], &LockOptions::exclusive())?;
    /// let mixed = client.lock_all([("schema", Mode::Shared), ("table-7", Mode::Exclusive)],
    ///                             &LockOptions::exclusive())?;
    /// # Ok::<(), pklock::client::Error>(())
    /// ```
    ///
    /// Names are distinct (1 to 64 of them), and none may be held or
    /// awaited by this client already; a semaphore ([`LockOptions::permits`])
    /// cannot be among them. After a server restart each name is reclaimed
    /// on its own, with the common token.
    pub fn lock_all<'a, I>(&self, locks: I, options: &LockOptions) -> Result<MultiGuard, Error>
    where
        I: IntoIterator,
        I::Item: Into<LockSpec<'a>>,
    {
        let specs: Vec<LockSpec<'a>> = locks.into_iter().map(Into::into).collect();
        let parameters = multi_parameters(&specs, options)?;
        let locks: Vec<(String, Mode)> = specs
            .iter()
            .map(|spec| (spec.name.to_string(), spec.mode.unwrap_or(options.mode)))
            .collect();
        let asks: Vec<(&str, Ask)> = locks
            .iter()
            .map(|(name, mode)| (name.as_str(), Ask::Mode(*mode)))
            .collect();
        if let Err(held) = self.session.claim(&asks) {
            return Err(Error::AlreadyHeld(held));
        }
        self.tell_grace_once();
        let what = || {
            let names: Vec<String> = locks.iter().map(|(n, _)| format!("{n:?}")).collect();
            format!("lock {}", names.join(", "))
        };
        let outcome = self
            .call("lock", parameters)
            .and_then(|result| self.granted(&result, None, what));
        match outcome {
            Ok(token) => Ok(MultiGuard {
                session: Arc::clone(&self.session),
                locks,
                token,
                released: false,
                principal: Arc::clone(&self.principal),
            }),
            Err(e) => {
                for (name, _) in &locks {
                    self.session.release(name);
                }
                Err(e)
            }
        }
    }

    /// The token of a `lock` request's result, or the error it is. `name`:
    /// the lock, for a single-name request.
    fn granted(
        &self,
        result: &Value,
        name: Option<&str>,
        request: impl FnOnce() -> String,
    ) -> Result<u64, Error> {
        match status(result) {
            "ok" => result
                .get("token")
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::Protocol(format!("grant without a token: {result}"))),
            "timeout" => Err(Error::NotGranted),
            "cancelled" => Err(Error::Cancelled),
            "deadlock" => {
                let cycle = result.get("cycle").cloned().unwrap_or(Value::Null);
                Err(match serde_json::from_value(cycle) {
                    Ok(cycle) => Error::Deadlock { cycle },
                    Err(e) => Error::Protocol(format!("deadlock: {e}: {result}")),
                })
            }
            "invalid" => match (name, permits_in_force(result)) {
                (Some(lock), Some(permits)) => Err(Error::PermitsMismatch {
                    lock: lock.to_string(),
                    permits,
                    error: result
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                }),
                _ => Err(self.refused(result, request)),
            },
            _ => Err(self.refused(result, request)),
        }
    }

    /// Takes a lock if it is free now; `Ok(None)` if it is not.
    pub fn try_lock(&self, name: &str, mode: Mode) -> Result<Option<LockGuard>, Error> {
        let options = LockOptions {
            mode,
            wait: Some(Duration::ZERO),
            ..LockOptions::default()
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
    /// For a semaphore: its permits, and how many this grant took.
    semaphore: Option<(u32, u32)>,
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

    /// How it is held (a semaphore's grant counts as shared).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// For a semaphore: how many permits it has.
    pub fn permits(&self) -> Option<u32> {
        self.semaphore.map(|(permits, _)| permits)
    }

    /// For a semaphore: how many of its permits this grant holds.
    pub fn take(&self) -> Option<u32> {
        self.semaphore.map(|(_, take)| take)
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
            .field("semaphore", &self.semaphore)
            .field("token", &self.token)
            .field("held", &self.is_held())
            .finish()
    }
}

/// Locks taken together by [`Client::lock_all`], under one fencing token.
/// Dropping it unlocks them all in one request (without waiting for the
/// answer).
pub struct MultiGuard {
    session: Arc<Session>,
    /// The names, in the order asked, with their modes.
    locks: Vec<(String, Mode)>,
    token: u64,
    released: bool,
    /// For a `denied` unlock's message.
    principal: Arc<str>,
}

impl MultiGuard {
    /// The locks, in the order asked, each with its mode.
    pub fn locks(&self) -> &[(String, Mode)] {
        &self.locks
    }

    /// The locks' names, in the order asked.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locks.iter().map(|(name, _)| name.as_str())
    }

    /// The fencing token of this grant, the same for every lock of it.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether the locks are still ours: not unlocked, and the connection
    /// neither closed nor past its lease (see [`LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        !self.released && self.session.loss().is_none()
    }

    /// Waits until the locks are lost or `timeout` passes (`None`: for
    /// ever); returns the reason if they were lost.
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<LossReason> {
        self.session.wait_lost(timeout)
    }

    /// The parameters of the unlock of every name.
    fn unlock_parameters(&self) -> Value {
        json!({"lockNames": self.names().collect::<Vec<_>>()})
    }

    fn forget(&mut self) {
        self.released = true;
        for (name, _) in &self.locks {
            self.session.release(name);
        }
    }

    /// Releases every lock and waits for the server to confirm.
    pub fn unlock(mut self) -> Result<(), Error> {
        self.forget();
        let rx = self
            .session
            .send("unlock", self.unlock_parameters())
            .map_err(Error::Lost)?;
        let reply = self.session.wait_reply(&rx).map_err(Error::Lost)?;
        match reply.get("result").map(status) {
            Some("ok") => Ok(()),
            Some("denied") => {
                let names: Vec<String> = self.names().map(|n| format!("{n:?}")).collect();
                Err(Error::PermissionDenied {
                    request: format!("unlock {}", names.join(", ")),
                    principal: shown_principal(&self.principal),
                })
            }
            _ => Err(Error::Protocol(format!("unlock: {reply}"))),
        }
    }
}

impl Drop for MultiGuard {
    fn drop(&mut self) {
        if !self.released {
            self.forget();
            // If the connection is gone, so are the locks.
            let _ = self
                .session
                .send_untracked("unlock", self.unlock_parameters());
        }
    }
}

impl fmt::Debug for MultiGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiGuard")
            .field("locks", &self.locks)
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
    greeting: &Greeting,
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
    let mut request =
        json!({"command": "hello", "id": 0, "parameters": {"client": greeting.client_name}});
    if let Some(token) = &greeting.auth {
        request["parameters"]["auth"] = json!(token.secret());
    }
    if let Some(within) = &greeting.within {
        request["parameters"]["within"] =
            json!({"lockName": within.lock_name, "token": within.token});
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

/// The number of permits an `invalid` answer says is in force for a
/// semaphore (`"permits":N` beside the error).
fn permits_in_force(result: &Value) -> Option<u32> {
    result
        .get("permits")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
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

    #[test]
    fn a_semaphore_is_asked_with_permits_and_take_and_no_mode() {
        let mutex = LockOptions::shared().wait(Duration::from_millis(1500));
        assert_eq!(
            mutex.parameters("db"),
            json!({"lockName": "db", "mode": "shared", "timeoutMs": 1500})
        );
        let semaphore = LockOptions::exclusive().permits(5).take(2);
        assert_eq!(
            semaphore.parameters("api"),
            json!({"lockName": "api", "permits": 5, "take": 2})
        );
        assert_eq!(
            LockOptions::semaphore(3).parameters("api"),
            json!({"lockName": "api", "permits": 3, "take": 1})
        );
        // Sent as asked, for the server to refuse: not dropped unseen.
        assert_eq!(
            LockOptions::exclusive().take(2).parameters("x"),
            json!({"lockName": "x", "mode": "exclusive", "take": 2})
        );
        assert_eq!(LockOptions::default(), LockOptions::exclusive());
    }

    #[test]
    fn several_locks_go_in_one_request_each_in_its_mode() {
        let specs = [
            LockSpec::from("a"),
            LockSpec::from(("b", Mode::Shared)),
            LockSpec::from(&"c"),
        ];
        let options = LockOptions::exclusive().wait(Duration::ZERO);
        assert_eq!(
            multi_parameters(&specs, &options).unwrap(),
            json!({
                "lockNames": ["a", {"lockName": "b", "mode": "shared"}, "c"],
                "mode": "exclusive",
                "timeoutMs": 0,
            })
        );
        let refused = |specs: &[LockSpec<'_>], options: &LockOptions| match multi_parameters(
            specs, options,
        ) {
            Err(Error::InvalidRequest(detail)) => detail,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(&["a".into(), "b".into(), "a".into()], &options),
            "lock \"a\" is named twice in one request"
        );
        assert!(refused(&[], &options).starts_with("no lock names given"));
        assert!(
            refused(&["a".into(), "b".into()], &LockOptions::semaphore(2))
                .starts_with("a semaphore cannot be taken together with other locks")
        );
    }

    fn step(conn: u64, client: &str, lock: &str) -> CycleStep {
        CycleStep {
            conn,
            client: client.to_string(),
            lock_name: lock.to_string(),
        }
    }

    #[test]
    fn a_deadlock_reads_as_one_line_around_the_cycle() {
        let two = Error::Deadlock {
            cycle: vec![step(7, "A", "y"), step(9, "B", "x")],
        };
        assert_eq!(
            two.to_string(),
            "deadlock: this wait would close a cycle: conn 7 (A) waits for \"y\", held by conn \
             9 (B), which waits for \"x\", held by conn 7"
        );
        let three = Error::Deadlock {
            cycle: vec![
                step(1, "pklock run a (h pid 4)", "a"),
                step(2, "", "b"),
                step(3, "evil\nname", "c\nd"),
            ],
        };
        let text = three.to_string();
        assert_eq!(
            text,
            "deadlock: this wait would close a cycle: conn 1 (pklock run a (h pid 4)) waits for \
             \"a\", held by conn 2, which waits for \"b\", held by conn 3 (evil\\nname), which \
             waits for \"c\\nd\", held by conn 1"
        );
        assert!(!text.contains('\n'));
        let hidden = Error::Deadlock {
            cycle: vec![step(4, "me", "a/2"), step(5, "", "")],
        };
        assert_eq!(
            hidden.to_string(),
            "deadlock: this wait would close a cycle: conn 4 (me) waits for \"a/2\", held by \
             conn 5, which waits for a lock you may not see, held by conn 4"
        );
    }

    #[test]
    fn a_permits_mismatch_names_the_permits_in_force() {
        let e = Error::PermitsMismatch {
            lock: "api".into(),
            permits: 5,
            error: "lock \"api\" is a semaphore of 5 permits, not 3".into(),
        };
        assert_eq!(
            e.to_string(),
            "lock \"api\" is a semaphore of 5 permits, not 3"
        );
        let e = Error::PermitsMismatch {
            lock: "api".into(),
            permits: 5,
            error: String::new(),
        };
        assert_eq!(e.to_string(), "lock \"api\" is a semaphore of 5 permits");
    }

    /// What a scripted server was sent (hello and pings aside), and what it
    /// does with a request: answer with a result, or close the connection.
    type Script = Box<dyn FnMut(&Value) -> Option<Value> + Send>;

    /// A server that answers hello and ping as pklock does and everything
    /// else as `script` says, over as many connections as are made; returns
    /// its address and the requests it was sent, in order.
    fn scripted_server(script: Script) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let script = Arc::new(std::sync::Mutex::new(script));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (script, log) = (Arc::clone(&script), Arc::clone(&log));
                std::thread::spawn(move || {
                    while let Ok(body) = frame::read_blocking(&mut stream, 1 << 20) {
                        let request: Value = serde_json::from_slice(&body).unwrap();
                        let result = match request["command"].as_str() {
                            Some("hello") => Some(json!({
                                "status": "ok",
                                "server": {"name": "pklock", "version": "0.1.0"},
                                "protocol": 2,
                                "conn": 1,
                                "keepalive": {"idleMs": 5000, "intervalMs": 1000,
                                              "probes": 5, "userTimeoutMs": 10000},
                                "releaseAfterMs": 10000,
                                "earliestReleaseMs": 10000,
                            })),
                            Some("ping") => Some(json!({"status": "ok"})),
                            _ => {
                                log.lock().unwrap().push(request["parameters"].clone());
                                (script.lock().unwrap())(&request)
                            }
                        };
                        let Some(result) = result else {
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            return;
                        };
                        let reply = json!({"id": request["id"], "result": result});
                        if frame::write_blocking(&mut stream, reply.to_string().as_bytes()).is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// Waits until `seen` holds `n` requests; returns them.
    fn sent(seen: &std::sync::Mutex<Vec<Value>>, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = seen.lock().unwrap().clone();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn multi_and_semaphore_grants_are_reclaimed_name_by_name_after_a_restart() {
        let mut status_asked = 0;
        let (addr, seen) = scripted_server(Box::new(move |request| {
            let parameters = &request["parameters"];
            match request["command"].as_str().unwrap() {
                "lock" if parameters.get("reclaim").is_some() => Some(json!({
                    "status": "ok",
                    "token": parameters["reclaim"]["token"],
                })),
                "lock" if parameters.get("lockNames").is_some() => Some(json!({
                    "status": "ok", "token": 5, "proofs": {"a": "pa", "b": "pb"},
                })),
                "lock" => Some(json!({"status": "ok", "token": 6, "proof": "ps"})),
                // The first status closes the connection, as a restart does.
                "status" => {
                    status_asked += 1;
                    (status_asked > 1)
                        .then(|| json!({"status": "ok", "locks": [], "truncated": false}))
                }
                _ => Some(json!({"status": "ok"})),
            }
        }));
        let client = Client::connect(&addr, &ClientOptions::named("t")).unwrap();
        let (tx, resumed) = std::sync::mpsc::channel();
        client.on_resumed(move |r| {
            let _ = tx.send(r.reclaimed.clone());
        });
        let both = client
            .lock_all(
                ["a", "b"].map(|n| (n, Mode::Exclusive)),
                &LockOptions::default(),
            )
            .unwrap();
        let both = {
            // Each in a mode of its own this time.
            drop(both);
            client
                .lock_all(
                    [("a", Mode::Exclusive), ("b", Mode::Shared)],
                    &LockOptions::shared(),
                )
                .unwrap()
        };
        assert_eq!(both.token(), 5);
        assert_eq!(both.names().collect::<Vec<_>>(), ["a", "b"]);
        assert!(matches!(
            client.lock("b", &LockOptions::exclusive()),
            Err(Error::AlreadyHeld(name)) if name == "b"
        ));
        let permits = client
            .lock("s", &LockOptions::semaphore(5).take(2))
            .unwrap();
        assert_eq!((permits.token(), permits.mode()), (6, Mode::Shared));
        assert_eq!((permits.permits(), permits.take()), (Some(5), Some(2)));

        client.status(&StatusFilter::All, None).unwrap();
        let mut reclaimed = resumed.recv_timeout(Duration::from_secs(5)).unwrap();
        reclaimed.sort();
        assert_eq!(reclaimed, ["a", "b", "s"]);
        let requests = sent(&seen, 9);
        assert_eq!(
            requests[..4],
            [
                json!({"lockNames": [{"lockName": "a", "mode": "exclusive"},
                                     {"lockName": "b", "mode": "exclusive"}],
                       "mode": "exclusive"}),
                json!({"lockNames": ["a", "b"]}),
                json!({"lockNames": [{"lockName": "a", "mode": "exclusive"},
                                     {"lockName": "b", "mode": "shared"}],
                       "mode": "shared"}),
                json!({"lockName": "s", "permits": 5, "take": 2}),
            ]
        );
        assert_eq!(requests[4], json!({}), "the status that met the close");
        let mut reclaims = requests[5..8].to_vec();
        reclaims.sort_by_key(|r| r["lockName"].as_str().unwrap().to_string());
        assert_eq!(
            reclaims,
            [
                json!({"lockName": "a", "mode": "exclusive",
                       "reclaim": {"token": 5, "proof": "pa"}}),
                json!({"lockName": "b", "mode": "shared",
                       "reclaim": {"token": 5, "proof": "pb"}}),
                json!({"lockName": "s", "permits": 5, "take": 2,
                       "reclaim": {"token": 6, "proof": "ps"}}),
            ]
        );
        assert_eq!(requests[8], json!({}), "the status sent again");
        drop(both);
        permits.unlock().unwrap();
        let requests = sent(&seen, 11);
        assert_eq!(
            requests[9..],
            [json!({"lockNames": ["a", "b"]}), json!({"lockName": "s"})]
        );
        assert!(client.loss().is_none());
    }

    #[test]
    fn deadlocks_and_permit_mismatches_come_back_as_their_own_errors() {
        let (addr, _) = scripted_server(Box::new(|request| {
            let parameters = &request["parameters"];
            Some(match parameters["lockName"].as_str() {
                Some("api") => json!({
                    "status": "invalid",
                    "error": "lock \"api\" is a semaphore of 5 permits, not 3",
                    "permits": 5,
                }),
                Some("mutex") => json!({
                    "status": "invalid",
                    "error": "lock \"mutex\" is held as a mutex (exclusive or shared), not as \
                              a semaphore",
                }),
                _ => json!({
                    "status": "deadlock",
                    "cycle": [{"conn": 7, "client": "A", "lockName": "y"},
                              {"conn": 9, "client": "B", "lockName": "x"}],
                }),
            })
        }));
        let client = Client::connect(&addr, &ClientOptions::named("t")).unwrap();
        match client.lock("y", &LockOptions::exclusive()) {
            Err(Error::Deadlock { cycle }) => {
                assert_eq!(cycle, [step(7, "A", "y"), step(9, "B", "x")]);
            }
            other => panic!("{other:?}"),
        }
        match client.lock_all(["y", "z"], &LockOptions::exclusive()) {
            Err(Error::Deadlock { cycle }) => assert_eq!(cycle.len(), 2),
            other => panic!("{other:?}"),
        }
        match client.lock("api", &LockOptions::semaphore(3)) {
            Err(Error::PermitsMismatch { lock, permits, .. }) => {
                assert_eq!((lock.as_str(), permits), ("api", 5));
            }
            other => panic!("{other:?}"),
        }
        match client.lock("mutex", &LockOptions::semaphore(3)) {
            Err(e @ Error::Refused { .. }) => {
                assert!(e.to_string().contains("held as a mutex"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // None of it is held: every name can be asked for again.
        assert!(matches!(
            client.lock_all(["y", "z"], &LockOptions::exclusive()),
            Err(Error::Deadlock { .. })
        ));
    }
}
