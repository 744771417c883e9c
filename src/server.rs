//! The event loop: one thread, one `mio::Poll` owning the listeners, every
//! connection and the core. Accepts, reads, cuts frames, hands them to the
//! core, writes the replies it returns, and reaps closed connections once per
//! turn. No lock rules and no JSON here.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustc_hash::FxHashMap;
use slab::Slab;
use socket2::{Domain, SockRef, Socket, Type};

use crate::acl::Acl;
use crate::allow_list::AllowList;
use crate::auth::Tokens;
use crate::cluster::election::{Ask, Election, News};
use crate::commands::{Access, CloseAsked, Core, Handled, Outgoing, Settings};
use crate::config::{ClusterConfig, Config};
use crate::connection::{self, Connection, PlainTextOnTls, State};
use crate::frame;
use crate::keepalive::Keepalive;
use crate::lock_table::ClientId;
use crate::log_level;
use crate::metrics::{self, Counters};
use crate::metrics_endpoint::MetricsEndpoint;
use crate::proof::{ProofKey, ProofKeyError};
use crate::protocol::{ErrorCode, Reply};
use crate::rate_limit::{LogLimiter, escaped};
use crate::recovery::{Recovery, StillOwed};
use crate::reload::{self, Reloaded};
use crate::tls;
use crate::tokens::{HeldLock, MAX_TOKEN, PreviousRun, RESERVATION, TokenStore, TokenStoreError};

const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const RELOAD_SIGNAL: Token = Token(usize::MAX - 2);
/// Listener `i` has token `FIRST_LISTENER - i`; connections use small slab keys.
const FIRST_LISTENER: usize = usize::MAX - 3;
/// The metrics endpoint's tokens start here, far above connection keys.
const FIRST_METRICS_TOKEN: usize = usize::MAX / 2;
/// A metrics scrape shows what the loop gathered at most this long ago: a
/// scrape walks the whole lock table, so a peer scraping in a loop costs
/// one walk a second.
const METRICS_FRESH_FOR: Duration = Duration::from_secs(1);
/// Locks a metrics walk visits per loop turn: about 1 ms of a release
/// build's turn (a walk of a million locks in one turn held everyone up
/// for 0.7 s in a debug build).
const METRICS_WALK_PER_TURN: usize = 10_000;

/// Bytes read from one connection per loop turn before others get a go.
const READ_BUDGET: usize = 256 * 1024;
/// Size of one read.
const READ_CHUNK: usize = 64 * 1024;
/// How long a closing connection gets to take its last replies.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// When accepting failed for want of resources, try again after this.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Listen backlog.
const BACKLOG: i32 = 1024;
/// Requests one connection may have handled per loop turn; the rest wait
/// for the next turn, so that one busy peer cannot hold everyone up.
const REQUESTS_PER_TURN: usize = 32;
/// `status` reply bytes built per loop turn, after which a `status` waits
/// for the next turn: a status costs CPU in proportion to its size, and
/// nobody else is served while one is built.
const TURN_STATUS_BUDGET: usize = 64 << 10;
/// The most one `status` reply takes (less with a small `max_output_bytes`);
/// a longer list is cut, marked truncated, and continued with `after`.
const STATUS_REPLY_BYTES: usize = 64 << 10;
/// Unsent reply bytes, over all connections, past which a `status` waits
/// until some are taken: peers that ask for status and never read cannot
/// make the server hold more than this for them.
const STATUS_OUTPUT_CEILING: usize = 64 << 20;
/// Kernel send buffer per connection: what a peer that never reads can make
/// the kernel hold for it (Linux doubles it for its bookkeeping).
const SEND_BUFFER_BYTES: usize = 64 << 10;
/// Reads of connections in a TLS handshake per loop turn: each may cost a
/// key exchange and a signature (tens of microseconds to a millisecond),
/// so a flood of new TLS connections is spread over turns instead of
/// holding up everyone else's requests.
const HANDSHAKE_READS_PER_TURN: usize = 16;
/// Lock-table entries from which a shrink to a quarter hands memory back.
const TRIM_AFTER_ENTRIES: usize = 50_000;
/// The longest a stopping leader waits for etcd to take its resignation
/// before closing its connections anyway.
const RESIGN_WAIT: Duration = Duration::from_secs(2);
/// At most this often, connections owing a frame past `frame_timeout_ms`
/// are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Why the server could not start or had to stop.
#[derive(Debug)]
pub enum ServerError {
    /// A listen address could not be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The token state file could not be used.
    Tokens(TokenStoreError),
    /// The key that signs grant proofs could not be read or made.
    Key(ProofKeyError),
    /// Cluster mode could not be set up.
    Cluster(String),
    /// The TLS certificate or key, the tokens file or the ACL could not be
    /// used.
    Security(String),
    /// The event loop failed.
    Io {
        /// What was being done.
        doing: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind { addr, source } if source.kind() == io::ErrorKind::AddrInUse => {
                write!(
                    f,
                    "cannot listen on {addr}: the address is already in use (is another server running on that port?)"
                )
            }
            ServerError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            ServerError::Tokens(e) => e.fmt(f),
            ServerError::Key(e) => e.fmt(f),
            ServerError::Cluster(e) | ServerError::Security(e) => f.write_str(e),
            ServerError::Io { doing, source } => write!(f, "{doing}: {source}"),
        }
    }
}

impl std::error::Error for ServerError {}

fn io_error(doing: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Io { doing, source }
}

/// Stops a running server from another thread: it stops accepting, closes
/// every connection and saves the token state.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Asks the server to stop; returns at once.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the server to stop it: {e}");
        }
    }
}

/// Why a connection is being closed, for the log.
enum CloseReason {
    PeerClosed,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    MessageTooLarge,
    NotReading { unsent: usize, stalled: Duration },
    FrameTimeout(Duration),
    NoLongerAllowed,
    SteppedDown,
    PlainTextOnTls,
    AuthFailed,
    ForceReleased { by: String, lock: String },
}

impl CloseReason {
    /// The cause the metrics give the locks this close releases.
    fn release_cause(&self) -> &'static str {
        // ETIMEDOUT: keepalive probes or TCP_USER_TIMEOUT gave up on the peer.
        let timed_out = |e: &io::Error| e.raw_os_error() == Some(110);
        match self {
            CloseReason::ReadFailed(e) | CloseReason::WriteFailed(e) if timed_out(e) => "keepalive",
            CloseReason::NotReading { .. } => "not_reading",
            CloseReason::ForceReleased { .. } => "force",
            CloseReason::SteppedDown => "stepped_down",
            _ => "disconnect",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("peer closed"),
            CloseReason::ReadFailed(e) => write!(f, "read failed: {e}"),
            CloseReason::WriteFailed(e) => write!(f, "write failed: {e}"),
            CloseReason::MessageTooLarge => f.write_str("message over max_message_bytes"),
            CloseReason::NotReading { unsent, stalled } => write!(
                f,
                "not reading: {unsent} reply bytes unsent, over max_output_bytes, none taken for {} ms",
                stalled.as_millis()
            ),
            CloseReason::FrameTimeout(limit) => write!(
                f,
                "no whole frame within frame_timeout_ms ({} ms), holding no lock",
                limit.as_millis()
            ),
            CloseReason::NoLongerAllowed => {
                f.write_str("not in `allowed` since the configuration was reloaded")
            }
            CloseReason::SteppedDown => f.write_str("this server stepped down as the leader"),
            CloseReason::PlainTextOnTls => f.write_str("plain text sent to a TLS port"),
            CloseReason::AuthFailed => f.write_str("its token was refused"),
            CloseReason::ForceReleased { by, lock } => {
                write!(f, "{by} force-released {}", escaped(lock))
            }
        }
    }
}

/// Re-reads the configuration on SIGHUP: the file as it is now, with its
/// state file located, or the error to log (as `server --check-config`
/// words it).
pub type ConfigSource = Box<dyn FnMut() -> Result<Config, String> + Send>;

/// What reloading the configuration needs between SIGHUPs.
#[derive(Default)]
struct Reload {
    /// Readable when SIGHUP arrived.
    signal: Option<UnixStream>,
    /// None without a file to re-read.
    source: Option<ConfigSource>,
    /// A SIGHUP arrived; the reload runs once this turn's events are handled.
    asked: bool,
    /// The keepalive the core's `hello` reports, when it is not the one for
    /// new connections: that of an older connection, handled last.
    hello_keepalive: Option<Keepalive>,
}

/// Cluster mode: the election, and the term this server leads, if any.
struct Cluster {
    election: Election,
    advertise: String,
    term: Option<Term>,
}

/// A term as leader.
struct Term {
    number: u64,
    /// Safe until then, unless the election says it was renewed.
    until: Instant,
    /// Tokens below this are reserved in etcd.
    ceiling: u64,
    /// More tokens have been asked for.
    reserving: bool,
}

/// The lock server.
pub struct Server {
    poll: Poll,
    /// The plain listeners, then the TLS ones from `first_tls_listener`.
    listeners: Vec<(TcpListener, SocketAddr)>,
    first_tls_listener: usize,
    /// For new TLS connections; each connection keeps the one it began with.
    tls_config: Option<Arc<rustls::ServerConfig>>,
    /// `/metrics`, when `metrics_listen` is set.
    metrics: Option<MetricsEndpoint>,
    /// What the loop counts for the metrics besides the lock table.
    counters: Counters,
    /// The last metrics text, and when its walk began.
    metrics_text: Option<(Instant, String)>,
    /// The walk gathering the next metrics text, while scrapes wait for it.
    metrics_walk: Option<metrics::Walk>,
    conns: Slab<Connection>,
    keys: FxHashMap<ClientId, usize>,
    core: Core,
    config: Config,
    keepalive: Keepalive,
    tokens: TokenStore,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<UnixStream>,
    /// Kept open so that, out of descriptors, one can be freed to accept
    /// and close a pending connection instead of spinning on it.
    spare_fd: Option<File>,
    outgoing: Vec<Outgoing>,
    to_flush: Vec<usize>,
    to_reap: Vec<usize>,
    closing: Vec<usize>,
    /// Connections whose unsent replies are over the limit and not moving.
    /// Each may stay stalled as long as the kernel would wait for it, were it
    /// a vanished peer: the earliest release of its own keepalive.
    stalled: Vec<usize>,
    backlog: Vec<usize>,
    /// When to try accepting again after a failure for want of resources.
    accept_retry_at: Option<Instant>,
    /// When the restart grace ends, until that moment is logged.
    grace_ends: Option<Instant>,
    /// Open connections per peer IP (loopback not counted).
    per_ip: FxHashMap<IpAddr, usize>,
    /// Loop turns so far, for the per-connection request budget.
    turn: u64,
    /// When to look next for connections that owe a frame for too long.
    next_sweep: Instant,
    /// Rate limit for the connect and close lines.
    conn_log: LogLimiter,
    /// Rate limit for the lines of closes that released locks.
    release_log: LogLimiter,
    /// The most lock-table entries since memory was last handed back.
    entries_peak: usize,
    /// Lock-table entries at the last sweep, to see a release settle.
    entries_at_sweep: usize,
    /// Reads of connections in a TLS handshake left this turn.
    handshake_reads_left: usize,
    /// The end of the token space has been logged.
    told_tokens_exhausted: bool,
    /// Reply bytes not yet written, over all connections.
    total_unsent: usize,
    /// `status` reply bytes that may still be built this turn.
    turn_status_left: usize,
    /// Connections whose `status` waits for a turn with room for it (and
    /// for `total_unsent` to come down), first come first served.
    status_queue: VecDeque<usize>,
    scratch: Vec<u8>,
    reject_log: LogLimiter,
    reload: Reload,
    cluster: Option<Cluster>,
}

impl Server {
    /// Binds every listen address and opens the token state; nothing is
    /// accepted until [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let keepalive = config.effective_keepalive();
        let (tokens, first_token) =
            TokenStore::open(config.state_file.as_deref()).map_err(ServerError::Tokens)?;
        let key = match tokens.path() {
            Some(path) => ProofKey::open(&ProofKey::path_beside(path)).map_err(ServerError::Key)?,
            None => ProofKey::ephemeral(),
        };
        raise_fd_limit(config.max_connections);

        let poll = Poll::new().map_err(io_error("cannot create the event loop"))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(io_error("cannot create the waker"))?,
        );
        let tls_config = config
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()
            .map_err(ServerError::Security)?;
        let access = access_for(&config).map_err(ServerError::Security)?;
        let mut listeners = Vec::new();
        let tls_listen = config.tls.as_ref().map(|tls| tls.listen.as_slice());
        let first_tls_listener = config.listen.len();
        let all_listen = config.listen.iter().chain(tls_listen.unwrap_or_default());
        for (i, &addr) in all_listen.enumerate() {
            let mut listener = listen(addr).map_err(|source| ServerError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            poll.registry()
                .register(&mut listener, Token(FIRST_LISTENER - i), Interest::READABLE)
                .map_err(|source| ServerError::Bind { addr, source })?;
            listeners.push((listener, bound));
        }

        let now = Instant::now();
        let grace = config.restart_grace();
        let settings = Settings {
            max_locks_per_connection: config.max_locks_per_connection,
            max_lock_entries: config.max_lock_entries,
            detect_deadlocks: config.detect_deadlocks,
            keepalive,
            status_budget_bytes: (config.max_output_bytes / 2).min(STATUS_REPLY_BYTES),
        };
        let metrics = if config.metrics_listen.is_empty() {
            None
        } else {
            Some(
                MetricsEndpoint::bind(&config.metrics_listen, poll.registry(), FIRST_METRICS_TOKEN)
                    .map_err(|(addr, source)| ServerError::Bind { addr, source })?,
            )
        };
        let mut core = Core::new(settings, first_token, now);
        // No connection yet: nothing to tell.
        core.set_access(access, &mut Vec::new());
        let mut server = Server {
            poll,
            listeners,
            first_tls_listener,
            tls_config,
            metrics,
            counters: Counters::default(),
            metrics_text: None,
            metrics_walk: None,
            conns: Slab::new(),
            keys: FxHashMap::default(),
            core,
            keepalive,
            tokens,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            spare_fd: File::open("/dev/null").ok(),
            outgoing: Vec::new(),
            to_flush: Vec::new(),
            to_reap: Vec::new(),
            closing: Vec::new(),
            stalled: Vec::new(),
            backlog: Vec::new(),
            accept_retry_at: None,
            grace_ends: None,
            per_ip: FxHashMap::default(),
            turn: 0,
            next_sweep: now + SWEEP_EVERY,
            conn_log: LogLimiter::new(50, Duration::from_secs(10)),
            release_log: LogLimiter::new(100, Duration::from_secs(10)),
            entries_peak: 0,
            entries_at_sweep: 0,
            handshake_reads_left: HANDSHAKE_READS_PER_TURN,
            told_tokens_exhausted: false,
            total_unsent: 0,
            turn_status_left: TURN_STATUS_BUDGET,
            status_queue: VecDeque::new(),
            scratch: vec![0; READ_CHUNK],
            reject_log: LogLimiter::new(20, Duration::from_secs(10)),
            reload: Reload::default(),
            cluster: None,
            config,
        };
        server.log_start(first_token);
        if let Some(cluster) = &server.config.cluster {
            let credentials = etcd_credentials(cluster)?;
            server.core.stand_by(None, now);
            server.cluster = Some(Cluster {
                election: Election::start(
                    cluster,
                    credentials,
                    server.config.restart_grace(),
                    Arc::clone(&server.waker),
                ),
                advertise: cluster.advertise.clone().unwrap_or_default(),
                term: None,
            });
            return Ok(server);
        }
        let previous = server.tokens.previous_run().clone();
        let recovery = Recovery::new(key, first_token, &previous, now, grace);
        let window = recovery.closes_at().is_some();
        server.core.recover(recovery, &previous);
        let ms = grace.as_millis();
        match (&previous, window) {
            (PreviousRun::None, _) => {
                let path = server.tokens.path().map(|p| p.display().to_string());
                warn!(
                    "no state file at {} yet: taking this for the first run here, and granting \
                     at once. If a server ran here moments ago with another state file, the \
                     locks its clients hold may be granted again (see docs/SAFETY.md)",
                    path.unwrap_or_default()
                );
            }
            (PreviousRun::Stopped(held), _) if held.is_empty() => {
                info!("the previous run stopped holding no lock: granting at once");
            }
            (PreviousRun::Stopped(held), true) => info!(
                "the previous run stopped cleanly, listing {} grant(s) of its own or still owed \
                 from the run before: their holders may reclaim them for the next {ms} ms, and \
                 nothing else is granted on those locks meanwhile; other locks are granted at once",
                held.len()
            ),
            (PreviousRun::Unknown, true) => {
                info!(
                    "no lock is granted for the first {ms} ms, so that clients of an earlier \
                     run that could not see it stop have given up their locks, or reclaimed \
                     them (restart_grace_ms)"
                );
                server.grace_ends = Some(now + grace);
            }
            (_, false) => {}
        }
        if server.tokens.path().is_none() && window {
            info!(
                "without a state file, grant proofs do not survive a restart: holders of the \
                 previous run cannot reclaim their locks"
            );
        }
        Ok(server)
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(_, addr)| *addr).collect()
    }

    /// The addresses the metrics endpoint listens on, as bound.
    pub fn metrics_addrs(&self) -> Vec<SocketAddr> {
        self.metrics
            .as_ref()
            .map(|m| m.local_addrs().collect())
            .unwrap_or_default()
    }

    /// A handle that stops the server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stop: Arc::clone(&self.stop),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Makes SIGTERM and SIGINT stop the server gracefully, and SIGHUP
    /// reload its configuration (see [`Server::reload_from`]). Process-wide:
    /// for the server binary, not for servers embedded in tests.
    pub fn handle_signals(&mut self) -> Result<(), ServerError> {
        let fail = io_error("cannot install the signal handlers");
        let (read_end, write_end) =
            std::os::unix::net::UnixStream::pair().map_err(io_error("cannot create a pipe"))?;
        read_end
            .set_nonblocking(true)
            .map_err(io_error("cannot set up the signal pipe"))?;
        let second = write_end
            .try_clone()
            .map_err(io_error("cannot set up the signal pipe"))?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, write_end)
            .map_err(fail)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGINT, second)
            .map_err(io_error("cannot install the signal handlers"))?;
        let mut read_end = UnixStream::from_std(read_end);
        self.poll
            .registry()
            .register(&mut read_end, SIGNALS, Interest::READABLE)
            .map_err(io_error("cannot watch the signal pipe"))?;
        self.signals = Some(read_end);

        let (read_end, write_end) =
            std::os::unix::net::UnixStream::pair().map_err(io_error("cannot create a pipe"))?;
        read_end
            .set_nonblocking(true)
            .map_err(io_error("cannot set up the signal pipe"))?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, write_end)
            .map_err(io_error("cannot install the signal handlers"))?;
        let mut read_end = UnixStream::from_std(read_end);
        self.poll
            .registry()
            .register(&mut read_end, RELOAD_SIGNAL, Interest::READABLE)
            .map_err(io_error("cannot watch the signal pipe"))?;
        self.reload.signal = Some(read_end);
        Ok(())
    }

    /// What SIGHUP re-reads: `source` returns the configuration file as it
    /// is now, or the error to log. Without one, SIGHUP only logs that there
    /// is no file to re-read.
    pub fn reload_from(&mut self, source: ConfigSource) {
        self.reload.source = Some(source);
    }

    /// Serves until shut down (by handle or signal), then closes every
    /// connection and saves the token state.
    pub fn run(mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let outcome = loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(ServerError::Io {
                    doing: "waiting for events failed",
                    source: e,
                });
            }
            let now = Instant::now();
            self.turn += 1;
            self.turn_status_left = TURN_STATUS_BUDGET;
            self.handshake_reads_left = HANDSHAKE_READS_PER_TURN;
            // Before any request of this turn: a term that has run out
            // grants nothing more, and a new one serves this turn's requests.
            self.follow_election(now);
            self.wake_status_waiters();
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    SIGNALS => self.drain_signals(),
                    RELOAD_SIGNAL => self.drain_reload_signal(),
                    Token(t)
                        if t <= FIRST_LISTENER && FIRST_LISTENER - t < self.listeners.len() =>
                    {
                        self.accept(FIRST_LISTENER - t, now);
                    }
                    token if self.metrics.as_ref().is_some_and(|m| m.owns(token)) => {
                        self.on_metrics_event(token, now);
                    }
                    Token(key) => {
                        let closing = event.is_read_closed() || event.is_error();
                        if event.is_readable() || closing {
                            self.on_readable(key, closing, now);
                        }
                        if event.is_writable() {
                            self.list_for_flush(key);
                        }
                    }
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            if std::mem::take(&mut self.reload.asked) {
                self.reload_config(now);
            }
            self.resume_backlog(now);
            self.note_grace_end(now);
            self.note_reclaims_end(now);
            self.core.expire(now, &mut self.outgoing);
            self.note_tokens_exhausted();
            self.reserve_tokens_ahead();
            self.close_stalled(now);
            self.close_silent(now);
            self.advance_metrics_walk(now);
            if let Some(endpoint) = self.metrics.as_mut() {
                endpoint.close_overdue(now, self.poll.registry());
            }
            // A turn may have taken a while: no reply of a term leaves after
            // its end.
            self.end_term_if_due(Instant::now());
            if let Err(e) = self.write_replies(now) {
                break Err(e);
            }
            self.retry_accept(now);
            self.reap(now);
            self.entries_peak = self.entries_peak.max(self.core.table().entries());
        };
        // Replies queued this turn may carry tokens not yet on disk.
        let outcome = outcome.and_then(|()| {
            self.tokens
                .cover(self.core.next_token())
                .map_err(ServerError::Tokens)
        });
        match outcome {
            Ok(()) if self.cluster.is_some() => {
                self.resign();
                self.shut_down(true);
                info!("stopped");
                Ok(())
            }
            Ok(()) => {
                // Listed before any client sees its connection close, so
                // that the next run knows every lock it may be asked back.
                let held = self.held_locks(Instant::now());
                let saved = self
                    .tokens
                    .save_final(self.core.next_token(), held.as_deref());
                self.shut_down(true);
                saved.map_err(ServerError::Tokens)?;
                info!("stopped");
                Ok(())
            }
            Err(e) => {
                error!("{e}; stopping so that no fencing token can repeat");
                // Drop replies unsent: they may carry tokens not on disk.
                self.shut_down(false);
                Err(e)
            }
        }
    }

    /// Applies what the election says, and steps down once the term is no
    /// longer safe.
    fn follow_election(&mut self, now: Instant) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let news: Vec<News> = cluster.election.news().collect();
        for news in news {
            self.apply_news(news, now);
        }
        self.end_term_if_due(now);
    }

    /// Steps down once the term is no longer safe.
    fn end_term_if_due(&mut self, now: Instant) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        if let Some(term) = &cluster.term
            && now >= term.until
        {
            let number = term.number;
            cluster.election.ask(Ask::SteppedDown { term: number });
            self.step_down(
                "the leadership lease in etcd could not be renewed in time, so another server \
                 may lead soon",
                now,
            );
        }
    }

    fn apply_news(&mut self, news: News, now: Instant) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let current = cluster.term.as_ref().map(|t| t.number);
        match news {
            News::Leading(leadership) => {
                if current.is_some() {
                    // Not sent while a term is current; if it were, that
                    // term's connections must not carry over.
                    self.step_down("a new term began before the last one ended", now);
                }
                let Some(cluster) = &mut self.cluster else {
                    return;
                };
                // The previous leader's clients may count on its grace.
                let grace = self
                    .config
                    .restart_grace()
                    .max(leadership.previous_grace.unwrap_or_default());
                let ms = grace.as_millis();
                let recovery = Recovery::new(
                    leadership.key,
                    leadership.first_token,
                    &leadership.previous,
                    now,
                    grace,
                );
                let window = recovery.closes_at().is_some();
                self.core.lead(
                    leadership.first_token,
                    leadership.ceiling,
                    recovery,
                    &leadership.previous,
                    cluster.advertise.clone(),
                    now,
                );
                cluster.term = Some(Term {
                    number: leadership.term,
                    until: leadership.until,
                    ceiling: leadership.ceiling,
                    reserving: false,
                });
                self.told_tokens_exhausted = false;
                info!(
                    "leading now, as {}: fencing tokens from {}",
                    cluster.advertise, leadership.first_token
                );
                match (&leadership.previous, window) {
                    (PreviousRun::None, _) => {
                        info!("the first leader of this election: granting at once")
                    }
                    (PreviousRun::Stopped(held), _) if held.is_empty() => {
                        info!("the previous leader resigned holding no lock: granting at once");
                    }
                    (PreviousRun::Stopped(held), true) => info!(
                        "the previous leader resigned, listing {} grant(s): their holders may \
                         reclaim them for the next {ms} ms, and nothing else is granted on those \
                         locks meanwhile; other locks are granted at once",
                        held.len()
                    ),
                    (PreviousRun::Unknown, true) => {
                        info!(
                            "the previous leader did not resign: no lock is granted for the \
                             first {ms} ms, so that its clients have reclaimed their locks here \
                             or given them up (restart_grace_ms)"
                        );
                        self.grace_ends = Some(now + grace);
                    }
                    (_, false) => {}
                }
            }
            News::Renewed { term, until } => {
                if let Some(t) = cluster.term.as_mut().filter(|t| t.number == term) {
                    t.until = until;
                }
            }
            News::Reserved { term, ceiling } => {
                if let Some(t) = cluster.term.as_mut().filter(|t| t.number == term) {
                    t.ceiling = ceiling;
                    t.reserving = false;
                    self.core
                        .allow_tokens_below(ceiling, now, &mut self.outgoing);
                    self.deliver();
                }
            }
            News::Lost { term, why } => {
                if current == Some(term) {
                    self.step_down(&why, now);
                }
            }
            News::Following(leader) => {
                if current.is_none() {
                    match &leader {
                        Some(leader) => info!("standing by: the leader is {leader}"),
                        None => warn!("standing by: no leader is known"),
                    }
                    self.core.stand_by(leader, now);
                }
            }
            News::Resigned(_) => {}
        }
    }

    /// Ends this server's term: grants nothing more, and closes every
    /// connection at once, so that clients go to the next leader and
    /// reclaim their locks there.
    fn step_down(&mut self, why: &str, now: Instant) {
        if let Some(cluster) = &mut self.cluster {
            cluster.term = None;
        }
        self.core.stand_by(None, now);
        self.grace_ends = None;
        let open: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Open)
            .map(|(key, _)| key)
            .collect();
        error!(
            "stepping down as the leader: {why}; closing {} connection(s) so that their \
             clients reclaim their locks at the next leader",
            open.len()
        );
        for key in open {
            self.begin_close(key, CloseReason::SteppedDown, now);
            // Closed now, replies unsent: nothing of this term after its end.
            if let Some(conn) = self.conns.get(key) {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
            self.to_reap.push(key);
        }
    }

    /// Asks etcd for more tokens when half the term's reservation is used,
    /// long before grants would have to wait for them.
    fn reserve_tokens_ahead(&mut self) {
        let next_token = self.core.next_token();
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(term) = &mut cluster.term else {
            return;
        };
        if !term.reserving
            && term.ceiling < MAX_TOKEN
            && next_token.saturating_add(RESERVATION / 2) > term.ceiling
        {
            term.reserving = cluster.election.ask(Ask::Reserve { term: term.number });
        }
    }

    /// On a stop in cluster mode: leaves the grants in force for the next
    /// leader (when leading), then resigns, before any connection closes.
    fn resign(&mut self) {
        let leading = self.cluster.as_ref().is_some_and(|c| c.term.is_some());
        let held = if leading {
            self.held_locks(Instant::now())
        } else {
            None
        };
        // Never longer than the lease, nor than clients' pings can wait.
        let ttl = Duration::from_millis(self.config.cluster.as_ref().map_or(0, |c| c.lease_ttl_ms))
            .min(RESIGN_WAIT);
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        if !cluster.election.ask(Ask::Resign { held }) {
            warn!("the election thread has ended: leaving the leadership to its lease in etcd");
            return;
        }
        match cluster.election.wait_resigned(ttl) {
            Ok(()) if leading => info!("resigned the leadership in etcd"),
            Ok(()) => info!("left the election"),
            Err(e) => warn!(
                "could not resign cleanly ({e}): the next leader takes over when the lease \
                 runs out, and waits out the restart grace"
            ),
        }
    }

    fn log_start(&self, first_token: u64) {
        for (i, (_, addr)) in self.listeners.iter().enumerate() {
            if i < self.first_tls_listener {
                info!("listening on {addr}");
            } else {
                info!("listening for TLS on {addr}");
            }
        }
        for addr in self.metrics_addrs() {
            info!("serving metrics on {addr}");
        }
        // The first summary line lists the configured addresses; the bound ones are above.
        for line in self.config.summary().iter().skip(1) {
            info!("{line}");
        }
        if let Some(cluster) = &self.config.cluster {
            info!(
                "cluster mode: campaigning in etcd ({}) as {}; fencing tokens come from etcd",
                cluster.etcd_endpoints.join(", "),
                cluster.advertise.as_deref().unwrap_or_default()
            );
            return;
        }
        match self.tokens.path() {
            Some(path) => info!(
                "fencing tokens start at {first_token}, ceiling kept in {}",
                path.display()
            ),
            None => info!(
                "fencing tokens start at {first_token} (clock-based; set state_file to survive clock steps)"
            ),
        }
    }

    fn poll_timeout(&mut self, now: Instant) -> Option<Duration> {
        let status_waiters_ready = !self.status_queue.is_empty() && self.status_room_free();
        if !self.backlog.is_empty()
            || !self.to_reap.is_empty()
            || self.metrics_walk.is_some()
            || !self.to_flush.is_empty()
            || status_waiters_ready
        {
            return Some(Duration::ZERO);
        }
        let conns = &self.conns;
        let closing = self
            .closing
            .iter()
            .filter_map(|&key| match conns.get(key)?.state {
                State::Closing { deadline, .. } => Some(deadline),
                State::Open => None,
            });
        let stalled = self.stalled.iter().filter_map(|&key| {
            let conn = conns.get(key)?;
            Some(conn.stalled_since? + conn.keepalive.earliest_release())
        });
        let earliest = closing
            .chain(stalled)
            .chain(self.accept_retry_at)
            .chain(self.grace_ends)
            // Sweeps look for silent connections, and hand memory back
            // after a mass release, also once the last connection is gone.
            .chain(
                (!self.conns.is_empty() || self.entries_peak >= TRIM_AFTER_ENTRIES)
                    .then_some(self.next_sweep),
            )
            .chain(self.core.next_deadline())
            .chain(
                self.metrics
                    .as_ref()
                    .and_then(MetricsEndpoint::next_deadline),
            )
            .chain(
                self.cluster
                    .as_ref()
                    .and_then(|c| c.term.as_ref())
                    .map(|t| t.until),
            )
            .min()?;
        Some(earliest.saturating_duration_since(now))
    }

    /// Logs, once, that no lock can be granted any more for want of tokens.
    fn note_tokens_exhausted(&mut self) {
        // In cluster mode the table also stops at the end of a reservation,
        // until the next one arrives: that is no end of the token space.
        let at_end = self.core.next_token() > MAX_TOKEN - RESERVATION - 1;
        if !self.told_tokens_exhausted && at_end && self.core.table().tokens_exhausted() {
            self.told_tokens_exhausted = true;
            let restart = if self.cluster.is_some() {
                "Tokens restart lower only if the ceiling in etcd (<election>.tokens) is \
                 lowered by hand"
            } else {
                "Tokens restart from the clock only with a new state file"
            };
            error!(
                "fencing tokens have reached {}, the last one under 2^53 that a restart can \
                 continue after: no lock is granted any more. {restart} (and every protected \
                 resource must then forget the tokens it has seen)",
                self.core.next_token() - 1
            );
        }
    }

    /// Every grant the next run may be asked back: those in force, and,
    /// while this run's own window for reclaims is open, those of the
    /// previous run not reclaimed yet. `None` when that is not known (this
    /// run followed a crash and still honours reclaims).
    fn held_locks(&self, now: Instant) -> Option<Vec<HeldLock>> {
        let mut held = match self.core.still_owed(now) {
            StillOwed::Unknown => return None,
            StillOwed::Nothing => Vec::new(),
            StillOwed::Listed(owed) => owed,
        };
        for view in self.core.table().iter_from("") {
            for holder in view.holders() {
                held.push(HeldLock {
                    lock_name: view.name().to_string(),
                    mode: holder.mode,
                    token: holder.token,
                });
            }
        }
        Some(held)
    }

    /// Logs the end of the window for reclaims.
    fn note_reclaims_end(&mut self, now: Instant) {
        match self.core.close_reclaims_if_due(now) {
            Some(Some(0)) | None => {}
            Some(Some(left)) => info!(
                "reclaims are over: {left} lock(s) held at the last stop were not reclaimed, and \
                 may be granted to others from now"
            ),
            Some(None) => {
                info!("reclaims are over: locks of the previous run are not given back any more")
            }
        }
    }

    /// Logs the moment the restart grace ends and grants resume.
    fn note_grace_end(&mut self, now: Instant) {
        if self.grace_ends.is_some_and(|end| end <= now) {
            self.grace_ends = None;
            let totals = self.core.table().totals();
            info!(
                "restart grace over: granting locks again ({} held, {} waiting to be served now)",
                totals.held, totals.waiting
            );
        }
    }

    fn drain_signals(&mut self) {
        let Some(signals) = &mut self.signals else {
            return;
        };
        let mut buf = [0u8; 64];
        loop {
            match signals.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    info!("signal received, shutting down");
                    self.stop.store(true, Ordering::SeqCst);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn drain_reload_signal(&mut self) {
        let Some(signal) = &mut self.reload.signal else {
            return;
        };
        let mut buf = [0u8; 64];
        loop {
            match signal.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => self.reload.asked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Re-reads the configuration (SIGHUP) and applies what can change while
    /// running; a file that cannot be used changes nothing.
    fn reload_config(&mut self, now: Instant) {
        let Some(source) = self.reload.source.as_mut() else {
            info!(
                "SIGHUP: no configuration file to re-read (started without --config); nothing changes"
            );
            return;
        };
        let read = match source() {
            Ok(read) => read,
            Err(e) => {
                error!("SIGHUP: {e}; the configuration in effect stays as it was");
                return;
            }
        };
        // What the next start will wait, by the file as it is now.
        let next_start_grace = read.restart_grace();
        let Reloaded {
            config,
            needs_restart,
        } = reload::merge(&self.config, read);
        for key in &needs_restart {
            warn!("SIGHUP: {key} changed in the file, but only a restart applies it");
        }
        if self.apply_config(config, next_start_grace, now) {
            info!("configuration reloaded; in effect now:");
        } else {
            info!("configuration reloaded but for what is logged above; in effect now:");
        }
        for line in self.config.summary() {
            info!("in effect: {line}");
        }
    }

    /// Runs on `config` from now on. Nothing held or queued is dropped:
    /// lowered limits refuse new requests and connections only, and a changed
    /// `[keepalive]` applies to connections accepted from now on, each
    /// connection keeping (and being told in its `hello`) the values it was
    /// set up with. Only connections from peers `allowed` no longer admits
    /// are closed, releasing their locks.
    ///
    /// Returns false when TLS files, the tokens file or the rules could not
    /// be used: those stay as they were, the rest applies.
    fn apply_config(
        &mut self,
        mut config: Config,
        next_start_grace: Duration,
        now: Instant,
    ) -> bool {
        let mut whole = true;
        let keepalive = config.effective_keepalive();
        if keepalive != self.keepalive {
            let open = self.conns.len();
            info!(
                "SIGHUP: [keepalive] changed: connections accepted from now on get it; the {open} \
                 open one(s) keep what they were set up with"
            );
            let longest = self
                .conns
                .iter()
                .map(|(_, conn)| conn.keepalive.earliest_release())
                .max()
                .unwrap_or_default();
            let next_grace = next_start_grace;
            if next_grace < longest {
                // A crash now would start the next run with a grace shorter
                // than what open connections were told.
                warn!(
                    "SIGHUP: open connections were told their locks are released {} ms at the \
                     earliest, more than the {} ms restart grace the new values give; should the \
                     server restart while they are open, set restart_grace_ms to at least {} ms \
                     for that start",
                    longest.as_millis(),
                    next_grace.as_millis(),
                    longest.as_millis()
                );
            }
        }
        self.keepalive = keepalive;
        self.core.set_settings(settings_for(&config, keepalive));
        self.reload.hello_keepalive = None;
        if config.max_connections > self.config.max_connections {
            raise_fd_limit(config.max_connections);
        }
        log_level::set(config.log_level);
        self.close_not_allowed(&config.allowed, now);
        if let Some(tls) = &config.tls {
            match tls::server_config(tls) {
                Ok(server_config) => {
                    self.tls_config = Some(server_config);
                    info!(
                        "SIGHUP: TLS certificate, key and client CA read again: new connections \
                         get them, open ones keep theirs"
                    );
                    let had_client_ca = self
                        .config
                        .tls
                        .as_ref()
                        .is_some_and(|t| t.client_ca_file.is_some());
                    if had_client_ca && tls.client_ca_file.is_none() {
                        warn!(
                            "SIGHUP: client_ca_file is gone: new TLS connections are no longer \
                             asked for a certificate, and act as anonymous unless they give a token"
                        );
                    }
                }
                Err(e) => {
                    error!("SIGHUP: {e}; the TLS files in effect stay as they were");
                    config.tls.clone_from(&self.config.tls);
                    whole = false;
                }
            }
        }
        match access_for(&config) {
            Ok(access) => {
                self.core.set_access(access, &mut self.outgoing);
                self.deliver();
                self.close_asked(now);
            }
            Err(e) => {
                error!("SIGHUP: {e}; the tokens and [[acl]] rules in effect stay as they were");
                config.auth.clone_from(&self.config.auth);
                config.acl.clone_from(&self.config.acl);
                whole = false;
            }
        }
        self.config = config;
        whole
    }

    /// Closes the connections of peers `allowed` does not admit, telling
    /// each why first, as a refusal at accept does.
    fn close_not_allowed(&mut self, allowed: &AllowList, now: Instant) {
        let refused: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.state == State::Open && !allowed.permits(conn.peer.ip()))
            .map(|(key, _)| key)
            .collect();
        if refused.is_empty() {
            return;
        }
        warn!(
            "SIGHUP: closing {} connection(s) from peers the new `allowed` list refuses",
            refused.len()
        );
        for key in refused {
            if let Some(conn) = self.conns.get_mut(key) {
                let before = conn.unsent();
                Reply::Error {
                    error: ErrorCode::Denied,
                    detail: Some(not_allowed(conn.peer.ip())),
                    limit: None,
                    id: None,
                }
                .encode(conn.output());
                self.total_unsent += conn.unsent() - before;
            }
            self.begin_close(key, CloseReason::NoLongerAllowed, now);
        }
    }

    /// Makes the core's `hello` report `keepalive`, that of the connection
    /// about to be handled: after a reload changed it, a connection set up
    /// before is still told the values its socket has, so that it never
    /// counts on a later release than the server gives it.
    fn hello_reports(&mut self, keepalive: Keepalive) {
        let reported = self.reload.hello_keepalive.unwrap_or(self.keepalive);
        if reported != keepalive {
            self.core
                .set_settings(settings_for(&self.config, keepalive));
            self.reload.hello_keepalive = (keepalive != self.keepalive).then_some(keepalive);
        }
    }

    fn accept(&mut self, index: usize, now: Instant) {
        loop {
            let Some((listener, _)) = self.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.admit(stream, peer, index >= self.first_tls_listener, now)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The peer gave up, or a protocol error on that one connection.
                Err(e) if is_transient_accept_error(&e) => {}
                Err(e) if e.raw_os_error().is_some_and(is_fd_exhaustion) => {
                    if !self.shed_one_pending(index, now) {
                        self.accept_retry_at = Some(now + ACCEPT_RETRY);
                        return;
                    }
                }
                Err(e) => {
                    // Out of memory or buffers: the listener will not say again
                    // that connections are waiting, so come back for them.
                    self.log_rejection(now, format_args!("accept failed: {e}; retrying"));
                    self.accept_retry_at = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    fn retry_accept(&mut self, now: Instant) {
        if self.accept_retry_at.is_some_and(|at| at <= now) {
            self.accept_retry_at = None;
            for index in 0..self.listeners.len() {
                self.accept(index, now);
            }
        }
    }

    /// Out of descriptors: frees the spare one to accept and close the
    /// connection at the head of the backlog, so the listener does not stay
    /// ready for ever. Returns whether one was shed (and so whether to try
    /// again: the kernel says EMFILE even when nothing is pending).
    fn shed_one_pending(&mut self, index: usize, now: Instant) -> bool {
        if self.spare_fd.take().is_none() {
            warn!("out of file descriptors and no spare one; new connections wait");
            return false;
        }
        let shed = match self
            .listeners
            .get(index)
            .map(|(listener, _)| listener.accept())
        {
            Some(Ok((stream, peer))) => {
                drop(stream);
                self.count_refusal("out_of_descriptors");
                self.log_rejection(now, format_args!("refused {peer}: out of file descriptors"));
                true
            }
            _ => false,
        };
        self.spare_fd = File::open("/dev/null").ok();
        shed && self.spare_fd.is_some()
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr, tls: bool, now: Instant) {
        if !self.config.allowed.permits(peer.ip()) {
            self.count_refusal("not_allowed");
            self.log_rejection(now, format_args!("refused {peer}: not in `allowed`"));
            refuse(
                stream,
                ErrorCode::Denied,
                Some(not_allowed(peer.ip())),
                None,
            );
            return;
        }
        let per_ip = self.config.max_connections_per_ip;
        let ip = peer.ip().to_canonical();
        let counted = !ip.is_loopback();
        if counted && self.per_ip.get(&ip).is_some_and(|&n| n >= per_ip) {
            self.count_refusal("max_connections_per_ip");
            self.log_rejection(
                now,
                format_args!("refused {peer}: max_connections_per_ip ({per_ip}) reached"),
            );
            refuse(
                stream,
                ErrorCode::TooManyConnections,
                Some(format!(
                    "{} has {per_ip} connections open, the most allowed from one address \
                         (max_connections_per_ip)",
                    peer.ip()
                )),
                Some(per_ip),
            );
            return;
        }
        let max = self.config.max_connections;
        if self.conns.len() >= max {
            self.count_refusal("max_connections");
            self.log_rejection(
                now,
                format_args!("refused {peer}: max_connections ({max}) reached"),
            );
            refuse(stream, ErrorCode::TooManyConnections, None, Some(max));
            return;
        }
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES))
            .and_then(|()| self.keepalive.apply(SockRef::from(&stream)));
        if let Err(e) = setup {
            warn!("dropped {peer}: cannot set socket options: {e}");
            return;
        }
        let client = self.core.connect_over(peer, tls);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let tls_config = self.tls_config.clone().filter(|_| tls);
        let registered = Connection::register(
            stream,
            client,
            peer,
            self.poll.registry(),
            Token(key),
            now,
            self.keepalive,
        )
        .and_then(|mut conn| {
            if let Some(config) = tls_config {
                conn.start_tls(config)?;
            }
            Ok(conn)
        });
        match registered {
            Ok(conn) => {
                entry.insert(conn);
                self.keys.insert(client, key);
                self.counters.accepted += 1;
                if counted {
                    *self.per_ip.entry(ip).or_default() += 1;
                }
                if let Some(suppressed) = self.conn_log.admit(now) {
                    if suppressed > 0 {
                        info!("{suppressed} more connect and close lines were not logged");
                    }
                    info!("{} connected", self.core.describe(client));
                }
            }
            Err(e) => {
                warn!("dropped {peer}: cannot register it: {e}");
                self.core.disconnect(client, now, &mut self.outgoing);
            }
        }
    }

    /// Counts a connection refused at accept, for `stats` and the metrics.
    fn count_refusal(&mut self, reason: &'static str) {
        self.core.connection_rejected();
        Counters::add(&mut self.counters.refused, reason, 1);
    }

    fn log_rejection(&mut self, now: Instant, message: fmt::Arguments<'_>) {
        if let Some(suppressed) = self.reject_log.admit(now) {
            if suppressed > 0 {
                warn!("{suppressed} more refused connections were not logged");
            }
            warn!("{message}");
        }
    }

    /// Reads what the peer sent, handling each whole frame as it comes.
    ///
    /// A read that returns less than asked has taken everything there was,
    /// and any byte arriving later raises a new event, so reading stops there
    /// and saves the read that would only say WouldBlock; except when the
    /// peer has closed (`to_the_end`), since a close that came before the
    /// event raises no new one.
    fn on_readable(&mut self, key: usize, to_the_end: bool, now: Instant) {
        let mut budget = READ_BUDGET;
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            let max_output = self.config.max_output_bytes;
            let Some(conn) = self.conns.get_mut(key) else {
                break;
            };
            if let State::Closing { .. } = conn.state {
                self.discard_input(key, &mut scratch);
                break;
            }
            if conn.unsent() > max_output {
                // Resumed once its replies drain (see flush_listed).
                conn.paused = true;
                conn.unread = true;
                break;
            }
            let spent =
                conn.budget_turn == self.turn && conn.requests_this_turn >= REQUESTS_PER_TURN;
            let handshaking = conn.is_handshaking();
            if budget == 0 || spent || (handshaking && self.handshake_reads_left == 0) {
                // Others get a go; come back next turn.
                conn.unread = true;
                self.backlog.push(key);
                break;
            }
            if handshaking {
                self.handshake_reads_left -= 1;
            }
            match conn.read(&mut scratch) {
                Ok(0) => {
                    self.begin_close(key, CloseReason::PeerClosed, now);
                    break;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(conn.read_cost(n));
                    conn.input.extend_from_slice(&scratch[..n]);
                    if let Some(certificate) = conn.handshake_done() {
                        let client = conn.client;
                        match certificate.as_ref().map(tls::principal_of) {
                            Some(Some(principal)) => self.core.certificate_names(client, principal),
                            Some(None) => {
                                let label = self.core.describe(client);
                                self.log_rejection(
                                    now,
                                    format_args!(
                                        "{label}: its client certificate names no principal (no \
                                         CN or DNS, email or URI name of at most 256 bytes): it \
                                         acts as anonymous"
                                    ),
                                );
                            }
                            None => {}
                        }
                    }
                    let Some(conn) = self.conns.get_mut(key) else {
                        break;
                    };
                    let drained = conn.drained_after(n, scratch.len()) && !to_the_end;
                    if drained {
                        conn.unread = false;
                    }
                    self.handle_input(key, now);
                    if drained {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.unread = false;
                    break;
                }
                Err(e) if connection::is_read_again_later(&e) => {
                    conn.unread = true;
                    self.backlog.push(key);
                    break;
                }
                Err(e) if is_plain_text_on_tls(&e) => {
                    self.refuse_plain_text(key, now);
                    break;
                }
                Err(e) => {
                    self.begin_close(key, CloseReason::ReadFailed(e), now);
                    break;
                }
            }
        }
        if self.conns.get(key).is_some_and(Connection::wants_write) {
            // The TLS handshake's answers.
            self.list_for_flush(key);
        }
        self.scratch = scratch;
    }

    /// Serves the metrics endpoint: scrapes whose request is whole get the
    /// metrics of at most a second ago, or wait for a walk to gather them.
    fn on_metrics_event(&mut self, token: Token, now: Instant) {
        let Some(endpoint) = self.metrics.as_mut() else {
            return;
        };
        let whole = endpoint.on_event(token, self.poll.registry(), &self.config.allowed, now);
        for (key, request) in whole {
            let fresh = self
                .metrics_text
                .as_ref()
                .is_some_and(|(made, _)| now.saturating_duration_since(*made) < METRICS_FRESH_FOR);
            if request == metrics::Request::Metrics && !fresh {
                endpoint.wait(key);
                if self.metrics_walk.is_none() {
                    let prefixes = &self.config.metrics_lock_prefixes;
                    self.metrics_walk = Some(self.core.metrics_walk(prefixes, now));
                }
                continue;
            }
            let body = self
                .metrics_text
                .as_ref()
                .map_or("", |(_, text)| text.as_str());
            endpoint.answer(key, &request, body, self.poll.registry());
        }
    }

    /// Takes the metrics walk a slice further; once it has ended, makes
    /// the text and answers the scrapes waiting for it.
    fn advance_metrics_walk(&mut self, now: Instant) {
        let Some(walk) = self.metrics_walk.as_mut() else {
            return;
        };
        self.core.metrics_step(walk, now, METRICS_WALK_PER_TURN);
        if let Some(walk) = self.metrics_walk.take_if(|walk| walk.is_done()) {
            let started = walk.started();
            let mut snapshot = self.core.metrics(walk, now);
            snapshot.counters = self.counters.clone();
            let text = metrics::render(&snapshot);
            if let Some(endpoint) = self.metrics.as_mut() {
                endpoint.answer_waiting(&text, self.poll.registry(), now);
            }
            self.metrics_text = Some((started, text));
        }
    }

    /// Answers plain text on a TLS port in plain text, so that a client
    /// pointed at the wrong port is told so, then closes.
    fn refuse_plain_text(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.drop_tls();
        let client = conn.client;
        self.outgoing.push(Outgoing {
            to: client,
            reply: Reply::error(
                ErrorCode::TlsRequired,
                "this port speaks TLS: connect with TLS (pklock --tls, or a tls:// address), \
                 or to the server's plain port"
                    .to_string(),
            ),
        });
        self.deliver();
        self.begin_close(key, CloseReason::PlainTextOnTls, now);
    }

    /// Closes the connections that requests asked to be closed: a refused
    /// token's, and the holders an admin force-released.
    fn close_asked(&mut self, now: Instant) {
        for (client, asked) in self.core.take_closes() {
            let Some(&key) = self.keys.get(&client) else {
                continue;
            };
            let reason = match asked {
                CloseAsked::AuthFailed => CloseReason::AuthFailed,
                CloseAsked::ForceReleased { by, lock } => {
                    // Told first, so that its client says why it stops
                    // instead of trying to have the lock back.
                    self.outgoing.push(Outgoing {
                        to: client,
                        reply: Reply::error(
                            ErrorCode::ForceReleased,
                            format!(
                                "an admin force-released {}: this connection is closed and \
                                 every lock it held released",
                                escaped(&lock)
                            ),
                        ),
                    });
                    self.deliver();
                    CloseReason::ForceReleased { by, lock }
                }
            };
            self.begin_close(key, reason, now);
        }
    }

    /// A closing connection's input is read and dropped, undecrypted and a
    /// budget at a time; its close ends it.
    fn discard_input(&mut self, key: usize, scratch: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                // Others get a go; come back next turn.
                conn.unread = true;
                self.backlog.push(key);
                return;
            }
            match conn.discard(scratch) {
                Ok(0) => {
                    if !conn.wants_write() {
                        self.to_reap.push(key);
                    } else if let State::Closing {
                        deadline,
                        write_shut,
                        ..
                    } = conn.state
                    {
                        // Reaped once the rest is written (flush_listed).
                        conn.state = State::Closing {
                            deadline,
                            write_shut,
                            peer_closed: true,
                        };
                    }
                    return;
                }
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.unread = false;
                    return;
                }
                Err(e) if connection::is_read_again_later(&e) => {
                    conn.unread = true;
                    self.backlog.push(key);
                    return;
                }
                Err(_) => {
                    self.to_reap.push(key);
                    return;
                }
            }
        }
    }

    /// Cuts whole frames out of the connection's input and hands each to the
    /// core, stopping while its unsent replies are over the limit.
    fn handle_input(&mut self, key: usize, now: Instant) {
        if let Some(conn) = self.conns.get(key) {
            let keepalive = conn.keepalive;
            self.hello_reports(keepalive);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let input = std::mem::take(&mut conn.input);
        let client = conn.client;
        if conn.budget_turn != self.turn {
            conn.budget_turn = self.turn;
            conn.requests_this_turn = 0;
        }
        let mut handled = conn.requests_this_turn;
        let mut offset = 0;
        let mut paused = false;
        let mut deferred = false;
        while let Some(conn) = self.conns.get(key) {
            if conn.state != State::Open {
                break;
            }
            if conn.unsent() > self.config.max_output_bytes {
                // Its own requests must not grow its replies further.
                paused = true;
                break;
            }
            if handled >= REQUESTS_PER_TURN {
                deferred = offset < input.len();
                break;
            }
            let own_room = self.config.max_output_bytes.saturating_sub(conn.unsent());
            let shared_room = STATUS_OUTPUT_CEILING.saturating_sub(self.total_unsent);
            let room = own_room.min(shared_room).min(self.turn_status_left);
            match frame::decode(&input[offset..], self.config.max_message_bytes) {
                Ok(Some(frame)) => {
                    let handled_now = self.core.handle_with_room(
                        client,
                        frame.body,
                        now,
                        room,
                        &mut self.outgoing,
                    );
                    if let Handled::StatusBuilt(bytes) = handled_now {
                        self.turn_status_left = self.turn_status_left.saturating_sub(bytes);
                    }
                    if handled_now == Handled::StatusWaits {
                        let needed = self.core.status_room_needed();
                        paused = true;
                        if own_room >= needed {
                            // Waits its turn among the status requests.
                            if let Some(conn) = self.conns.get_mut(key) {
                                if !conn.waits_for_room {
                                    conn.waits_for_room = true;
                                    self.status_queue.push_back(key);
                                }
                            }
                        }
                        // Otherwise it is resumed once its replies drain
                        // (flush_listed).
                        break;
                    }
                    offset += frame.consumed;
                    handled += 1;
                    self.deliver();
                    self.close_asked(now);
                }
                Ok(None) => break,
                Err(too_large) => {
                    self.core
                        .message_too_large(client, too_large, now, &mut self.outgoing);
                    self.deliver();
                    self.begin_close(key, CloseReason::MessageTooLarge, now);
                    break;
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.state == State::Open {
                conn.requests_this_turn = handled;
                if offset > 0 {
                    // A whole frame came: the clock restarts for the next.
                    conn.frame_due_since = None;
                }
                conn.input = input;
                conn.consume_input(offset);
                if !conn.input.is_empty() && conn.frame_due_since.is_none() {
                    conn.frame_due_since = Some(now);
                }
                conn.paused |= paused;
                if deferred {
                    self.backlog.push(key);
                }
            }
        }
    }

    /// Whether a whole `status` reply fits under the server-wide ceiling of
    /// unsent replies.
    fn status_room_free(&self) -> bool {
        self.total_unsent + self.core.status_room_needed() <= STATUS_OUTPUT_CEILING
    }

    /// Lets as many waiting `status` requests go this turn as its budget
    /// allows, oldest first, while the server-wide ceiling leaves room.
    fn wake_status_waiters(&mut self) {
        if !self.status_room_free() {
            return;
        }
        let mut places = TURN_STATUS_BUDGET / self.core.status_room_needed().max(1);
        while places > 0 {
            let Some(key) = self.status_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if !conn.waits_for_room {
                // The slot was reused by another connection.
                continue;
            }
            conn.waits_for_room = false;
            conn.paused = false;
            self.backlog.push(key);
            places -= 1;
        }
    }

    /// Hands memory back to the system once the lock table has shrunk to a
    /// quarter of a large peak and stopped shrinking: the allocator keeps
    /// freed memory for reuse, so a server that once held a million locks
    /// would otherwise keep the memory they took for ever. Waiting for the
    /// release to settle trims once, after it, rather than halfway through
    /// and never again.
    fn return_freed_memory(&mut self) {
        let entries = self.core.table().entries();
        let settled = entries >= std::mem::replace(&mut self.entries_at_sweep, entries);
        if self.entries_peak >= TRIM_AFTER_ENTRIES && entries < self.entries_peak / 4 && settled {
            self.entries_peak = entries;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free heap pages; it takes no
            // pointer and is safe to call at any time.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Closes connections that have owed a frame for longer than
    /// `frame_timeout_ms` (a started frame not completed, or no first frame
    /// at all), unless they hold or wait for a lock: such a peer only takes
    /// up a slot, and the promise to lock holders comes first.
    fn close_silent(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_EVERY;
        self.return_freed_memory();
        let limit = Duration::from_millis(self.config.frame_timeout_ms);
        let table = self.core.table();
        let silent: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| {
                conn.state == State::Open
                    && !conn.paused
                    && conn.unsent() == 0
                    && conn
                        .frame_due_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= limit)
                    && table.entries_of(conn.client) == 0
            })
            .map(|(key, _)| key)
            .collect();
        for key in silent {
            self.core.frame_timed_out();
            self.begin_close(key, CloseReason::FrameTimeout(limit), now);
        }
    }

    /// Picks up connections that stopped early: frames left in their input,
    /// or bytes left in their socket.
    fn resume_backlog(&mut self, now: Instant) {
        let mut backlog = std::mem::take(&mut self.backlog);
        backlog.sort_unstable();
        backlog.dedup();
        for key in backlog.drain(..) {
            let Some(conn) = self.conns.get(key) else {
                continue;
            };
            // A closing connection's input is only dropped, paused or not.
            if conn.paused && conn.state == State::Open {
                continue;
            }
            let unread = conn.unread;
            self.handle_input(key, now);
            if unread {
                self.on_readable(key, true, now);
            }
        }
        if self.backlog.is_empty() {
            self.backlog = backlog;
        }
    }

    /// Appends the core's replies to their connections' output.
    fn deliver(&mut self) {
        for Outgoing { to, reply } in self.outgoing.drain(..) {
            if let Some(word) = reply.error_word() {
                Counters::add(&mut self.counters.errors, word, 1);
            }
            let Some(&key) = self.keys.get(&to) else {
                continue;
            };
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let before = conn.unsent();
            reply.encode(conn.output());
            let grown = conn.unsent() - before;
            self.total_unsent += grown;
            if !conn.flush_listed {
                conn.flush_listed = true;
                self.to_flush.push(key);
            }
        }
    }

    fn list_for_flush(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.flush_listed {
                conn.flush_listed = true;
                self.to_flush.push(key);
            }
        }
    }

    /// Releases the connection's locks now and queues it for closing; it
    /// keeps its socket only to deliver its last replies.
    fn begin_close(&mut self, key: usize, reason: CloseReason, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state != State::Open {
            return;
        }
        let client = conn.client;
        let peer_closed = matches!(reason, CloseReason::PeerClosed);
        let flush_first = peer_closed
            || matches!(
                reason,
                CloseReason::MessageTooLarge
                    | CloseReason::NoLongerAllowed
                    | CloseReason::PlainTextOnTls
                    | CloseReason::AuthFailed
                    | CloseReason::ForceReleased { .. }
            );
        conn.state = State::Closing {
            deadline: now + CLOSE_GRACE,
            write_shut: false,
            peer_closed,
        };
        conn.input = Vec::new();
        let label = self.core.describe(client);
        let departure = self.core.disconnect(client, now, &mut self.outgoing);
        Counters::add(
            &mut self.counters.released,
            reason.release_cause(),
            departure.released.len() as u64,
        );
        self.keys.remove(&client);
        self.deliver();
        if departure.released.is_empty() && departure.withdrawn == 0 {
            // Ordinary closes are many; those that released something are
            // always logged.
            if let Some(suppressed) = self.conn_log.admit(now) {
                if suppressed > 0 {
                    info!("{suppressed} more connect and close lines were not logged");
                }
                info!("{label} closed: {reason}");
            }
        } else if let Some(suppressed) = self.release_log.admit(now) {
            // Closes that released locks get a budget of their own, so that
            // ordinary closes cannot crowd them out.
            if suppressed > 0 {
                info!("{suppressed} more closes that released locks were not logged");
            }
            let shown: Vec<&str> = departure
                .released
                .iter()
                .take(5)
                .map(|name| &**name)
                .collect();
            let more = departure.released.len().saturating_sub(shown.len());
            info!(
                "{label} closed: {reason}; released {} lock(s) {shown:?}{}, dropped {} wait(s)",
                departure.released.len(),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
                departure.withdrawn
            );
        }
        if flush_first {
            self.closing.push(key);
            self.list_for_flush(key);
        } else {
            self.to_reap.push(key);
        }
    }

    /// Writes every reply queued so far. No reply leaves before the tokens it
    /// carries are on disk. Closing a connection whose socket failed can
    /// grant its locks to others, whose replies are written in a further
    /// round; a round that closes nothing ends it.
    fn write_replies(&mut self, now: Instant) -> Result<(), ServerError> {
        loop {
            self.deliver();
            self.tokens
                .cover(self.core.next_token())
                .map_err(ServerError::Tokens)?;
            let failed = self.flush_listed(now);
            if failed.is_empty() {
                return Ok(());
            }
            for (key, reason) in failed {
                self.begin_close(key, reason, now);
            }
        }
    }

    /// Writes every listed connection; returns the open ones whose socket
    /// failed, for the caller to close (closing here would grant locks after
    /// the tokens were covered).
    fn flush_listed(&mut self, now: Instant) -> Vec<(usize, CloseReason)> {
        debug_assert!(
            self.tokens.covers(self.core.next_token()),
            "replies may carry fencing tokens that are not on disk yet"
        );
        let mut failed = Vec::new();
        let mut listed = std::mem::take(&mut self.to_flush);
        let max_output = self.config.max_output_bytes;
        for &key in &listed {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.flush_listed = false;
            let before = conn.unsent();
            let flushed = conn.flush();
            self.total_unsent -= before - conn.unsent();
            let written = match flushed {
                Ok(written) => written,
                Err(e) => {
                    match conn.state {
                        State::Open => failed.push((key, CloseReason::WriteFailed(e))),
                        State::Closing { .. } => self.to_reap.push(key),
                    }
                    continue;
                }
            };
            let unsent = conn.unsent();
            match conn.state {
                State::Open if unsent > max_output => {
                    // Over the limit: stalled since its last progress.
                    if conn.stalled_since.is_none() {
                        self.stalled.push(key);
                        conn.stalled_since = Some(now);
                    } else if written > 0 {
                        conn.stalled_since = Some(now);
                    }
                }
                State::Open => {
                    conn.stalled_since = None;
                    if conn.paused {
                        conn.paused = false;
                        self.backlog.push(key);
                    }
                }
                State::Closing {
                    peer_closed: true, ..
                } if !conn.wants_write() => {
                    self.to_reap.push(key);
                    continue;
                }
                State::Closing {
                    deadline,
                    write_shut: false,
                    peer_closed,
                } if !conn.wants_write() => {
                    // The peer reads to the end, then sees EOF; its close ends the grace.
                    conn.shut_write();
                    conn.state = State::Closing {
                        deadline,
                        write_shut: true,
                        peer_closed,
                    };
                }
                State::Closing { .. } => {}
            }
            if let Err(e) = conn.update_interest(self.poll.registry(), Token(key)) {
                match conn.state {
                    State::Open => failed.push((key, CloseReason::WriteFailed(e))),
                    State::Closing { .. } => self.to_reap.push(key),
                }
            }
        }
        listed.clear();
        if self.to_flush.is_empty() {
            self.to_flush = listed;
        }
        failed
    }

    /// Closes connections whose replies have gone unread for as long as a
    /// vanished peer is given: they stopped reading.
    fn close_stalled(&mut self, now: Instant) {
        let mut over = Vec::new();
        let conns = &self.conns;
        self.stalled.retain(|&key| {
            let Some(conn) = conns.get(key).filter(|c| c.state == State::Open) else {
                return false;
            };
            let Some(since) = conn.stalled_since else {
                return false;
            };
            let stalled = now.saturating_duration_since(since);
            if stalled < conn.keepalive.earliest_release() {
                return true;
            }
            over.push((key, conn.unsent(), stalled));
            false
        });
        for (key, unsent, stalled) in over {
            if let Some(conn) = self.conns.get(key) {
                warn!(
                    "{} is not reading its replies",
                    self.core.describe(conn.client)
                );
            }
            self.begin_close(key, CloseReason::NotReading { unsent, stalled }, now);
        }
    }

    /// Drops connections that are done: flagged this turn, or closing past
    /// their grace period.
    fn reap(&mut self, now: Instant) {
        let conns = &self.conns;
        let to_reap = &mut self.to_reap;
        self.closing
            .retain(|&key| match conns.get(key).map(|c| c.state) {
                Some(State::Closing { deadline, .. }) if deadline <= now => {
                    to_reap.push(key);
                    false
                }
                Some(State::Closing { .. }) => true,
                _ => false,
            });
        for key in std::mem::take(&mut self.to_reap) {
            // Every path here went through begin_close, which released the locks.
            if let Some(mut conn) = self.conns.try_remove(key) {
                self.total_unsent -= conn.unsent();
                let _ = self.poll.registry().deregister(&mut conn.stream);
                let ip = conn.peer.ip().to_canonical();
                if let Some(n) = self.per_ip.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_ip.remove(&ip);
                    }
                }
            }
        }
    }

    /// Stops accepting and closes every connection, with a last try at
    /// writing their replies when `flush` is set. The lock table goes with
    /// the process, so nothing is granted on the way out.
    fn shut_down(&mut self, flush: bool) {
        for (mut listener, _) in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let open = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Open)
            .count();
        let held = self.core.table().totals().held;
        info!("shutting down: closing {open} connection(s), {held} lock(s) held");
        for (_, conn) in self.conns.iter_mut() {
            if flush {
                let _ = conn.flush();
            }
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        self.conns.clear();
        self.keys.clear();
    }
}

/// The etcd user and the password from its file, if the cluster has them.
fn etcd_credentials(cluster: &ClusterConfig) -> Result<Option<(String, String)>, ServerError> {
    let (Some(user), Some(path)) = (&cluster.etcd_user, &cluster.etcd_password_file) else {
        return Ok(None);
    };
    let password = std::fs::read_to_string(path).map_err(|e| {
        ServerError::Cluster(format!(
            "cannot read cluster.etcd_password_file {}: {e}",
            path.display()
        ))
    })?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(ServerError::Cluster(format!(
            "cluster.etcd_password_file {} is empty",
            path.display()
        )));
    }
    Ok(Some((user.clone(), password)))
}

/// Tells a peer why it is turned away, then closes. Best effort and never
/// blocking: a fresh socket has room for these few bytes, and they reach the
/// peer ahead of the close (also ahead of a reset, when the peer had
/// already sent something).
fn refuse(stream: TcpStream, error: ErrorCode, detail: Option<String>, limit: Option<usize>) {
    let reply = Reply::Error {
        error,
        detail,
        limit,
        id: None,
    };
    let mut bytes = Vec::new();
    reply.encode(&mut bytes);
    let _ = (&stream).write(&bytes);
}

/// Why a peer outside `allowed` is turned away, as it is told.
fn not_allowed(ip: IpAddr) -> String {
    format!("{ip} is not in the server's `allowed` list")
}

/// What the core needs from `config`, with `hello` reporting `keepalive`.
fn settings_for(config: &Config, keepalive: Keepalive) -> Settings {
    Settings {
        max_locks_per_connection: config.max_locks_per_connection,
        max_lock_entries: config.max_lock_entries,
        detect_deadlocks: config.detect_deadlocks,
        keepalive,
        status_budget_bytes: (config.max_output_bytes / 2).min(STATUS_REPLY_BYTES),
    }
}

/// Reads what `[tls]` and `[auth]` name as a start would, for
/// `server --check-config`: the error names the file at fault.
pub fn check_security(config: &Config) -> Result<(), String> {
    if let Some(tls) = &config.tls {
        tls::server_config(tls)?;
    }
    access_for(config).map(|_| ())
}

/// Who may act as whom and do what, by `config`: the error names the file.
fn access_for(config: &Config) -> Result<Access, String> {
    let tokens = match &config.auth.tokens_file {
        Some(path) => Tokens::load(path)?,
        None => Tokens::default(),
    };
    Ok(Access {
        acl: Acl::new(&config.acl),
        tokens,
        allow_plaintext_auth: config.auth.allow_plaintext_auth,
    })
}

fn is_plain_text_on_tls(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<PlainTextOnTls>())
}

fn is_fd_exhaustion(errno: i32) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux.
    errno == 24 || errno == 23
}

/// Errors about the one connection being accepted, not the listener: the
/// next accept may well succeed.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error() == Some(71) // EPROTO
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // So that 0.0.0.0 and [::] on one port can both be listed.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Raises the soft open-file limit as far as the hard limit allows, and
/// warns when `max_connections` still cannot be reached.
fn raise_fd_limit(max_connections: usize) {
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(64);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => warn!(
            "the open-file limit is {limit}, too low for max_connections {max_connections}; \
             raise it (ulimit -n, or LimitNOFILE= in the systemd unit)"
        ),
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}
