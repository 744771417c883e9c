//! Requests in, replies out: parses each frame body and dispatches it to
//! `command_lock`, `command_unlock`, ... over the lock table. Also keeps what
//! the table does not (peer names, counters). No IO: the server hands it
//! bytes and `now`, and sends the [`Outgoing`] replies it returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use rustc_hash::FxHashMap;

use std::sync::Arc;

use crate::acl::{Acl, Grants, Right};
use crate::auth::Tokens;
use crate::frame::TooLarge;
use crate::keepalive::Keepalive;
use crate::lock_table::{
    ClientId, Departure, Effect, LockRequest, LockTable, LockView, Mode, MultiLockRequest, Permits,
    Reclaim, Refusal, Unlocked,
};
use crate::metrics::{self, Snapshot};
use crate::proof::ProofKey;
use crate::protocol::{
    self, ANONYMOUS, ClosedHolder, ClusterRole, CycleStep, ErrorCode, HelloResult, HolderStatus,
    KeepaliveInfo, LockStatus, Outcome, ReclaimClaim, Reply, Request, RequestId, Role, ServerName,
    StatsResult, StatusFilter, StatusResult, UnlockForm, UnlockResult, WaiterStatus,
};
use crate::rate_limit::{LogLimiter, escaped};
use crate::recovery::{Recovery, StillOwed};
use crate::tokens;
use crate::tokens::PreviousRun;

/// Far enough ahead to mean never, near enough not to overflow an `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The last token a term whose reservation ends below `ceiling` may grant,
/// within what a restart can continue after.
fn last_grantable(ceiling: u64) -> u64 {
    ceiling
        .saturating_sub(1)
        .min(tokens::MAX_TOKEN - tokens::RESERVATION - 1)
}

/// A reply and the connection it goes to.
#[derive(Debug)]
pub struct Outgoing {
    /// The connection.
    pub to: ClientId,
    /// The message.
    pub reply: Reply,
}

/// What became of a frame handed to [`Core::handle_with_room`].
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Handled: answered, or queued as a lock request.
    Done,
    /// A `status` answered with a reply of about this many bytes.
    StatusBuilt(usize),
    /// A `status` that would not fit in the room the caller has now: nothing
    /// was built or answered; hand the same frame again once there is room
    /// for [`Core::status_room_needed`] bytes.
    StatusWaits,
}

/// What the core needs from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Locks one connection may hold plus wait for.
    pub max_locks_per_connection: usize,
    /// Locks all connections together may hold plus wait for.
    pub max_lock_entries: usize,
    /// Whether waits that would close a cycle are answered `deadlock`.
    pub detect_deadlocks: bool,
    /// Keepalive as applied, for `hello`.
    pub keepalive: Keepalive,
    /// Roughly the most bytes one `status` reply may take; longer lists are
    /// cut and marked truncated, so a reply never trips the output limit.
    pub status_budget_bytes: usize,
}

/// Who may act as whom, and do what.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The `[[acl]]` rules.
    pub acl: Acl,
    /// The principals' token hashes.
    pub tokens: Tokens,
    /// Tokens are taken over plain TCP from other hosts too.
    pub allow_plaintext_auth: bool,
}

/// Why the core wants a connection closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseAsked {
    /// Its `hello` token was refused (the answer goes out first).
    AuthFailed,
    /// An admin force-released a lock it held: it is closed like a dead
    /// holder.
    ForceReleased {
        /// The admin, for the log.
        by: String,
        /// The lock.
        lock: String,
    },
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    name: String,
    /// Said `hello`, so it can use the proofs of its grants (the original
    /// v1 client never does, and gets the replies it always got).
    proofs: bool,
    /// Came over TLS, where a token cannot be read on the way.
    tls: bool,
    /// Whom it acts for, from its certificate or token; `None`: anonymous.
    principal: Option<String>,
    /// The token it gave, by which it acts for `principal`.
    token: Option<String>,
    /// What that principal may do.
    grants: Arc<Grants>,
}

/// The lock service without its sockets.
#[derive(Debug)]
pub struct Core {
    table: LockTable<RequestId>,
    peers: FxHashMap<ClientId, Peer>,
    settings: Settings,
    next_client: u64,
    started: Instant,
    rejected_connections: u64,
    frame_timeouts: u64,
    bad_messages: u64,
    bad_message_log: LogLimiter,
    table_full_log: LogLimiter,
    effects: Vec<Effect<RequestId>>,
    recovery: Recovery,
    reclaims_refused: u64,
    reclaim_conflicts: u64,
    reclaim_log: LogLimiter,
    /// The grants listed at the last clean stop have all been reclaimed
    /// (and this was logged).
    told_all_reclaimed: bool,
    /// In cluster mode, this server's role; `None` for a single server.
    cluster: Option<ClusterRole>,
    /// When this server last took the leadership.
    term_started: Option<Instant>,
    access: Access,
    /// Connections to close, for the server to take.
    closes: Vec<(ClientId, CloseAsked)>,
    auth_log: LogLimiter,
    admin_log: LogLimiter,
}

impl Core {
    /// A core whose first grant carries `first_token`.
    pub fn new(settings: Settings, first_token: u64, now: Instant) -> Core {
        let mut table = LockTable::new(
            first_token,
            settings.max_locks_per_connection,
            settings.max_lock_entries,
        );
        table.set_deadlock_detection(settings.detect_deadlocks);
        // The ceiling a grant makes the state file store (its token plus a
        // reservation) must stay within what the next start accepts.
        table.stop_granting_after(tokens::MAX_TOKEN - tokens::RESERVATION - 1);
        Core {
            table,
            peers: FxHashMap::default(),
            settings,
            next_client: 1,
            started: now,
            rejected_connections: 0,
            frame_timeouts: 0,
            bad_messages: 0,
            bad_message_log: LogLimiter::new(20, Duration::from_secs(10)),
            table_full_log: LogLimiter::new(20, Duration::from_secs(10)),
            effects: Vec::new(),
            recovery: Recovery::new(
                ProofKey::ephemeral(),
                first_token,
                &PreviousRun::None,
                now,
                Duration::ZERO,
            ),
            reclaims_refused: 0,
            reclaim_conflicts: 0,
            reclaim_log: LogLimiter::new(50, Duration::from_secs(10)),
            told_all_reclaimed: false,
            cluster: None,
            term_started: None,
            access: Access {
                acl: Acl::new(&[]),
                ..Access::default()
            },
            closes: Vec::new(),
            auth_log: LogLimiter::new(20, Duration::from_secs(10)),
            admin_log: LogLimiter::new(50, Duration::from_secs(10)),
        }
    }

    /// Sets who may act as whom and do what; open connections get the
    /// rights of their principal under the new rules. A connection whose
    /// token the new tokens no longer take (removed, given to another
    /// principal, or now refused in plain text) is told so and closed, with
    /// all it holds: removing a leaked token must cut off its user.
    pub fn set_access(&mut self, access: Access, out: &mut Vec<Outgoing>) {
        self.access = access;
        let mut revoked = Vec::new();
        for (&client, peer) in &mut self.peers {
            if let Some(token) = &peer.token {
                let still = self.access.tokens.principal_of(token) == peer.principal.as_deref()
                    && (peer.tls
                        || peer.addr.ip().to_canonical().is_loopback()
                        || self.access.allow_plaintext_auth);
                if !still {
                    // Nothing more until the server has closed it.
                    peer.token = None;
                    peer.principal = None;
                    peer.grants = Arc::new(Grants::default());
                    revoked.push(client);
                    continue;
                }
            }
            peer.grants = self
                .access
                .acl
                .grants(peer.principal.as_deref().unwrap_or(ANONYMOUS));
        }
        for client in revoked {
            warn!(
                "{}: its token is no longer taken (the tokens changed); closing it",
                self.describe(client)
            );
            out.push(Outgoing {
                to: client,
                reply: Reply::error(
                    ErrorCode::AuthFailed,
                    "the token this connection gave is no longer taken (the server's tokens \
                     changed): it is closed, and every lock it held released"
                        .to_string(),
                ),
            });
            self.closes.push((client, CloseAsked::AuthFailed));
        }
    }

    /// The connections to close that requests asked for, oldest first.
    pub fn take_closes(&mut self) -> Vec<(ClientId, CloseAsked)> {
        std::mem::take(&mut self.closes)
    }

    /// Sets the role `hello` reports; a standby answers `notLeader` to
    /// every request but `hello`, `ping` and `stats`.
    pub fn set_cluster_role(&mut self, role: ClusterRole) {
        self.cluster = Some(role);
    }

    /// Leads from now on, as a new term: a fresh lock table (a standby
    /// holds nothing) whose tokens start at `first_token` and stay below
    /// `ceiling`, with the reclaim rules of `recovery` (see [`Core::recover`]).
    pub fn lead(
        &mut self,
        first_token: u64,
        ceiling: u64,
        recovery: Recovery,
        previous: &PreviousRun,
        advertise: String,
        now: Instant,
    ) {
        self.term_started = Some(now);
        self.table = LockTable::new(
            first_token,
            self.settings.max_locks_per_connection,
            self.settings.max_lock_entries,
        );
        self.table.stop_granting_after(last_grantable(ceiling));
        self.recover(recovery, previous);
        self.told_all_reclaimed = false;
        self.cluster = Some(ClusterRole {
            role: Role::Leader,
            leader: Some(advertise),
        });
    }

    /// Grants nothing from now on and answers `notLeader`, naming `leader`.
    /// The caller closes the connections of a term that ended.
    pub fn stand_by(&mut self, leader: Option<String>, now: Instant) {
        self.table.hold_grants_until(now + NEVER);
        self.cluster = Some(ClusterRole {
            role: Role::Standby,
            leader,
        });
    }

    /// More tokens were reserved: grants may go on up to below `ceiling`.
    pub fn allow_tokens_below(&mut self, ceiling: u64, now: Instant, out: &mut Vec<Outgoing>) {
        self.table
            .grant_tokens_up_to(last_grantable(ceiling), now, &mut self.effects);
        self.send_effects(out);
    }

    /// The role set by [`Core::set_cluster_role`], if any.
    pub fn cluster_role(&self) -> Option<&ClusterRole> {
        self.cluster.as_ref()
    }

    /// Sets the rules for reclaims after a restart, and holds back what
    /// they need: after a crash every grant until the window closes; after
    /// a clean stop only the locks held then, until their holders have
    /// reclaimed them or the window closes. Call before any request.
    pub fn recover(&mut self, recovery: Recovery, previous: &PreviousRun) {
        if let Some(until) = recovery.closes_at() {
            match previous {
                PreviousRun::Stopped(held) => self
                    .table
                    .reserve_until(held.iter().map(|lock| lock.lock_name.as_str()), until),
                PreviousRun::Unknown | PreviousRun::None => self.table.hold_grants_until(until),
            }
        }
        self.recovery = recovery;
    }

    /// Ends the window for reclaims once its time has come; returns what
    /// the clean stop listed and nobody reclaimed, when that call ended it.
    pub fn close_reclaims_if_due(&mut self, now: Instant) -> Option<Option<usize>> {
        let left = self.recovery.listed_left();
        self.recovery.close_if_due(now).then_some(left)
    }

    /// Grants of the previous run that a stop now must pass on.
    pub fn still_owed(&self, now: Instant) -> StillOwed {
        self.recovery.still_owed(now)
    }

    /// Applies new settings (a configuration reload): the limits count for
    /// requests from now on, and nothing held or queued is dropped (see
    /// [`LockTable::set_limits`]); `hello` reports the new keepalive.
    pub fn set_settings(&mut self, settings: Settings) {
        self.table
            .set_limits(settings.max_locks_per_connection, settings.max_lock_entries);
        self.table.set_deadlock_detection(settings.detect_deadlocks);
        self.settings = settings;
    }

    /// Registers a new plain-TCP connection from `addr`.
    pub fn connect(&mut self, addr: SocketAddr) -> ClientId {
        self.connect_over(addr, false)
    }

    /// Registers a new connection from `addr`, over TLS or not.
    pub fn connect_over(&mut self, addr: SocketAddr, tls: bool) -> ClientId {
        let client = ClientId(self.next_client);
        self.next_client += 1;
        self.peers.insert(
            client,
            Peer {
                addr,
                name: String::new(),
                proofs: false,
                tls,
                principal: None,
                token: None,
                grants: self.access.acl.grants(ANONYMOUS),
            },
        );
        client
    }

    /// The principal a connection's verified client certificate names.
    pub fn certificate_names(&mut self, client: ClientId, principal: String) {
        if let Some(peer) = self.peers.get_mut(&client) {
            peer.grants = self.access.acl.grants(&principal);
            peer.principal = Some(principal);
        }
    }

    fn grants_of(&self, client: ClientId) -> Arc<Grants> {
        grants_in(&self.peers, client)
    }

    /// Forgets a closed connection: its locks are released and its waits
    /// dropped, and whoever is next is granted in `out`.
    pub fn disconnect(
        &mut self,
        client: ClientId,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Departure {
        self.peers.remove(&client);
        let departure = self.table.disconnect(client, now, &mut self.effects);
        self.send_effects(out);
        departure
    }

    /// Handles one frame body from `from`, with room for any reply.
    pub fn handle(&mut self, from: ClientId, body: &[u8], now: Instant, out: &mut Vec<Outgoing>) {
        let _always_done = self.handle_with_room(from, body, now, usize::MAX, out);
    }

    /// The room a `status` needs: the most bytes its reply may take.
    pub fn status_room_needed(&self) -> usize {
        self.settings.status_budget_bytes
    }

    /// Handles one frame body from `from`, where a `status` reply may take
    /// at most `status_room` bytes: the caller's output limit, and its share
    /// of the work of this turn. A `status` is built only when the whole of
    /// [`Core::status_room_needed`] fits, so that its cost is bounded by
    /// what the caller can take.
    pub fn handle_with_room(
        &mut self,
        from: ClientId,
        body: &[u8],
        now: Instant,
        status_room: usize,
        out: &mut Vec<Outgoing>,
    ) -> Handled {
        let parsed = protocol::parse(body);
        if let (
            Some(ClusterRole {
                role: Role::Standby,
                leader,
            }),
            Ok(request),
        ) = (&self.cluster, &parsed)
        {
            let id = match request {
                Request::Hello { .. } | Request::Ping { .. } | Request::Stats { .. } => None,
                Request::Lock { id, .. }
                | Request::LockAll { id, .. }
                | Request::UnlockAll { id, .. }
                | Request::Status { id, .. }
                | Request::ForceRelease { id, .. } => Some(Some(id.clone())),
                Request::Unlock {
                    form: UnlockForm::Rpc { id },
                    ..
                } => Some(Some(id.clone())),
                Request::Unlock {
                    form: UnlockForm::V1 { .. },
                    ..
                } => Some(None),
            };
            if let Some(id) = id {
                out.push(Outgoing {
                    to: from,
                    reply: Reply::NotLeader {
                        leader: leader.clone(),
                        id,
                    },
                });
                return Handled::Done;
            }
        }
        match parsed {
            Ok(Request::Lock { id, lock, .. })
                if !self.grants_of(from).allows(Right::Lock, &lock) =>
            {
                self.reply(from, id, Outcome::Denied, out);
            }
            Ok(Request::LockAll { id, locks, .. })
                if !locks
                    .iter()
                    .all(|(lock, _)| self.grants_of(from).allows(Right::Lock, lock)) =>
            {
                self.reply(from, id, Outcome::Denied, out);
            }
            Ok(Request::Lock {
                id,
                lock,
                mode,
                semaphore,
                reclaim: Some(claim),
                ..
            }) => self.command_reclaim(from, id, &lock, (mode, semaphore), claim, now, out),
            Ok(Request::Lock {
                id,
                lock,
                timeout,
                mode,
                semaphore,
                reclaim: None,
            }) => {
                let request = LockRequest {
                    client: from,
                    lock: &lock,
                    mode,
                    semaphore,
                    timeout,
                    tag: id,
                };
                self.command_lock(request, now, out);
            }
            Ok(Request::LockAll { id, locks, timeout }) => {
                let locks: Vec<(&str, Mode)> =
                    locks.iter().map(|(lock, mode)| (&**lock, *mode)).collect();
                let request = MultiLockRequest {
                    client: from,
                    locks: &locks,
                    timeout,
                    tag: id,
                };
                self.table.lock_all(request, now, &mut self.effects);
                self.send_effects(out);
            }
            Ok(Request::Unlock { form, lock }) => self.command_unlock(from, form, &lock, now, out),
            Ok(Request::UnlockAll { id, locks }) => {
                let mut found = false;
                for lock in &locks {
                    found |=
                        self.table.unlock(from, lock, now, &mut self.effects) != Unlocked::NotFound;
                }
                self.send_effects(out);
                let result = if found {
                    Outcome::Ok
                } else {
                    Outcome::NotFound
                };
                self.reply(from, id, result, out);
            }
            Ok(Request::Hello {
                id,
                client,
                auth,
                within,
            }) => {
                self.command_hello(from, id, client, auth, now, out);
                if let Some((lock, token)) = within {
                    self.link_within(from, &lock, token);
                }
            }
            Ok(Request::ForceRelease { id, lock }) => {
                self.command_force_release(from, id, &lock, now, out);
            }
            Ok(Request::Ping { id }) => self.command_ping(from, id, out),
            Ok(Request::Status { .. }) if status_room < self.status_room_needed() => {
                return Handled::StatusWaits;
            }
            Ok(Request::Status {
                id,
                filter,
                limit,
                after,
            }) => {
                let built = self.command_status(from, id, &filter, limit, after, now, out);
                return Handled::StatusBuilt(built);
            }
            Ok(Request::Stats { id }) if !self.grants_of(from).has(Right::Admin) => {
                self.reply(from, id, Outcome::Denied, out);
            }
            Ok(Request::Stats { id }) => self.command_stats(from, id, now, out),
            Err(bad) => {
                self.count_bad_message(from, bad.detail(), now);
                out.push(Outgoing {
                    to: from,
                    reply: bad.into_reply(),
                });
            }
        }
        Handled::Done
    }

    /// Answers a length prefix over the limit. The caller closes the connection.
    pub fn message_too_large(
        &mut self,
        from: ClientId,
        error: TooLarge,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        self.count_bad_message(from, &error.to_string(), now);
        out.push(Outgoing {
            to: from,
            reply: Reply::message_too_large(error.limit),
        });
    }

    /// Times out the waits whose deadline has come.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        self.table.expire(now, &mut self.effects);
        self.send_effects(out);
    }

    /// When [`Core::expire`] or [`Core::close_reclaims_if_due`] next has work.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.table
            .next_deadline()
            .into_iter()
            .chain(self.recovery.closes_at())
            .min()
    }

    /// The token the next grant will carry.
    pub fn next_token(&self) -> u64 {
        self.table.next_token()
    }

    /// Grants nothing before `until` (see [`LockTable::hold_grants_until`]).
    pub fn hold_grants_until(&mut self, until: Instant) {
        self.table.hold_grants_until(until);
    }

    /// Counts a connection refused at accept.
    pub fn connection_rejected(&mut self) {
        self.rejected_connections += 1;
    }

    /// Counts a connection closed for not sending a frame in time.
    pub fn frame_timed_out(&mut self) {
        self.frame_timeouts += 1;
    }

    /// The lock table, read-only.
    pub fn table(&self) -> &LockTable<RequestId> {
        &self.table
    }

    /// `"conn 7 127.0.0.1:5000 (name)"`, for logs.
    pub fn describe(&self, client: ClientId) -> String {
        match self.peers.get(&client) {
            Some(peer) if peer.name.is_empty() => format!("conn {client} {}", peer.addr),
            Some(peer) => format!("conn {client} {} ({})", peer.addr, escaped(&peer.name)),
            None => format!("conn {client}"),
        }
    }

    fn command_lock(
        &mut self,
        request: LockRequest<'_, RequestId>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let from = request.client;
        self.table.lock(request, now, &mut self.effects);
        let table_full = self.effects.iter().any(|effect| {
            matches!(
                effect,
                Effect::Refused {
                    reason: Refusal::TableFull { .. },
                    ..
                }
            )
        });
        if table_full {
            self.log_table_full(from, now);
        }
        self.send_effects(out);
    }

    /// A lock request that claims a grant of the previous run back: given
    /// back at once if the rules allow and it excludes nobody, else refused.
    #[allow(clippy::too_many_arguments)]
    fn command_reclaim(
        &mut self,
        from: ClientId,
        id: RequestId,
        lock: &str,
        (mode, semaphore): (Mode, Option<Permits>),
        claim: ReclaimClaim,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let ReclaimClaim { token, proof } = claim;
        // A semaphore's grants are signed as shared: its holders share it.
        let mode = if semaphore.is_some() {
            Mode::Shared
        } else {
            mode
        };
        if let Err(why) = self.recovery.check(lock, mode, token, &proof, now) {
            self.reclaims_refused += 1;
            if let Some(suppressed) = self.reclaim_log.admit(now) {
                if suppressed > 0 {
                    warn!("{suppressed} more reclaim lines were not logged");
                }
                warn!(
                    "refused {}'s reclaim of {} (token {token}): {why}",
                    self.describe(from),
                    quoted(lock)
                );
            }
            self.reply(from, id, Outcome::Refused(why.to_string()), out);
            return;
        }
        let request = Reclaim {
            client: from,
            lock,
            mode,
            semaphore,
            token,
            tag: id,
        };
        self.table.reclaim(request, now, &mut self.effects);
        let mut honoured = false;
        for effect in &self.effects {
            match effect {
                Effect::Granted { client, .. } if *client == from => honoured = true,
                Effect::Refused { reason, .. } => {
                    self.reclaims_refused += 1;
                    if let Refusal::ReclaimConflict { holder, .. } = reason {
                        self.reclaim_conflicts += 1;
                        // Two clients believe they hold this lock: one of
                        // them is not what it claims, or ran past its lease.
                        error!(
                            "reclaim conflict on {}: {} claims token {token} while {} holds it; \
                             refused",
                            quoted(lock),
                            self.describe(from),
                            self.describe(*holder)
                        );
                    }
                }
                _ => {}
            }
        }
        if honoured {
            self.recovery.honoured(token, lock);
            if let Some(suppressed) = self.reclaim_log.admit(now) {
                if suppressed > 0 {
                    info!("{suppressed} more reclaim lines were not logged");
                }
                info!(
                    "{} reclaimed {} (token {token})",
                    self.describe(from),
                    quoted(lock)
                );
            }
            if !self.told_all_reclaimed && self.recovery.listed_left() == Some(0) {
                self.told_all_reclaimed = true;
                info!(
                    "every lock held at the last stop has been reclaimed, {} ms after {}",
                    millis(
                        now.saturating_duration_since(self.term_started.unwrap_or(self.started))
                    ),
                    if self.term_started.is_some() {
                        "taking the leadership"
                    } else {
                        "the start"
                    }
                );
            }
        }
        self.send_effects(out);
    }

    fn log_table_full(&mut self, from: ClientId, now: Instant) {
        if let Some(suppressed) = self.table_full_log.admit(now) {
            if suppressed > 0 {
                warn!(
                    "{suppressed} more lock requests refused on a full lock table were not logged"
                );
            }
            warn!(
                "lock table full: refused a lock request from {}: {} requests held or queued, the most allowed (max_lock_entries)",
                self.describe(from),
                self.table.max_entries()
            );
        }
    }

    fn command_unlock(
        &mut self,
        from: ClientId,
        form: UnlockForm,
        lock: &str,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let unlocked = self.table.unlock(from, lock, now, &mut self.effects);
        // A withdrawn wait's `cancelled` goes out before the unlock's own answer.
        self.send_effects(out);
        let found = unlocked != Unlocked::NotFound;
        let reply = match form {
            UnlockForm::V1 { lock_name } => Reply::Unlock {
                result: if found {
                    UnlockResult::Ok
                } else {
                    UnlockResult::NotFound
                },
                lock_name: Some(lock_name),
            },
            UnlockForm::Rpc { id } => Reply::Rpc {
                id,
                result: if found {
                    Outcome::Ok
                } else {
                    Outcome::NotFound
                },
            },
        };
        out.push(Outgoing { to: from, reply });
    }

    #[allow(clippy::too_many_arguments)]
    fn command_hello(
        &mut self,
        from: ClientId,
        id: RequestId,
        client: String,
        auth: Option<String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(token) = auth
            && let Err(detail) = self.authenticate(from, &token)
        {
            if let Some(suppressed) = self.auth_log.admit(now) {
                if suppressed > 0 {
                    warn!("{suppressed} more refused tokens were not logged");
                }
                warn!("{}: token refused: {detail}", self.describe(from));
            }
            out.push(Outgoing {
                to: from,
                reply: Reply::Error {
                    error: ErrorCode::AuthFailed,
                    detail: Some(detail),
                    limit: None,
                    id: Some(id),
                },
            });
            self.closes.push((from, CloseAsked::AuthFailed));
            return;
        }
        let mut principal = ANONYMOUS.to_string();
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.name = client;
            peer.proofs = true;
            if let Some(name) = &peer.principal {
                principal.clone_from(name);
            }
        }
        let keepalive = self.settings.keepalive;
        let result = HelloResult {
            server: ServerName {
                name: "pklock".to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            protocol: protocol::PROTOCOL_VERSION,
            conn: from.0,
            keepalive: KeepaliveInfo {
                idle_ms: millis(keepalive.idle),
                interval_ms: millis(keepalive.interval),
                probes: keepalive.probes,
                user_timeout_ms: keepalive.user_timeout.map_or(0, millis),
            },
            release_after_ms: millis(keepalive.release_after()),
            earliest_release_ms: millis(keepalive.earliest_release()),
            // A standby grants nothing, but says so with `role`, not a wait.
            grants_resume_in_ms: match &self.cluster {
                Some(ClusterRole {
                    role: Role::Standby,
                    ..
                }) => 0,
                _ => millis(self.table.grants_resume_in(now)),
            },
            reclaim_for_ms: millis(self.recovery.open_for(now)),
            cluster: self.cluster.clone(),
            principal,
        };
        self.reply(from, id, Outcome::Hello(Box::new(result)), out);
    }

    /// Files `from` as run by the holder of `lock` with `token`, for the
    /// deadlock check, if that grant is in force and its holder acts for
    /// the same principal; otherwise nothing (the grant may be gone, as
    /// when the lock was lost). A connection holding or waiting for nothing
    /// yet can be nobody's parent, so the links never form a loop.
    fn link_within(&mut self, from: ClientId, lock: &str, token: u64) {
        let Some(parent) = self
            .table
            .get(lock)
            .and_then(|view| view.holders().find(|h| h.token == token).map(|h| h.client))
        else {
            return;
        };
        let principal = |client: &ClientId| self.peers.get(client).map(|p| p.principal.clone());
        if parent != from && principal(&parent) == principal(&from) {
            self.table.link(from, parent);
        }
    }

    /// Makes the connection act for the principal `token` names.
    fn authenticate(&mut self, from: ClientId, token: &str) -> Result<(), String> {
        let Some(peer) = self.peers.get(&from) else {
            return Err("unknown connection".to_string());
        };
        if !peer.tls
            && !peer.addr.ip().to_canonical().is_loopback()
            && !self.access.allow_plaintext_auth
        {
            return Err(
                "tokens are not taken over plain TCP from another host, where anyone on the \
                 path can read them (take this one as seen): connect to the server's TLS \
                 port, or set [auth] allow_plaintext_auth"
                    .to_string(),
            );
        }
        if self.access.tokens.is_empty() {
            return Err("this server takes no tokens (it has no [auth] tokens_file)".to_string());
        }
        let Some(name) = self.access.tokens.principal_of(token) else {
            return Err("the token matches no principal".to_string());
        };
        if let Some(current) = &peer.principal
            && current != name
        {
            return Err(format!(
                "this connection acts for `{}` already (its certificate or an earlier hello); \
                 a token cannot change that",
                escaped(current)
            ));
        }
        let grants = self.access.acl.grants(name);
        let name = name.to_string();
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.principal = Some(name);
            peer.token = Some(token.to_string());
            peer.grants = grants;
        }
        Ok(())
    }

    /// Closes the connection of every holder of `lock`: they lose it the way
    /// a dead holder does, and the next in line is granted.
    fn command_force_release(
        &mut self,
        from: ClientId,
        id: RequestId,
        lock: &str,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let grants = self.grants_of(from);
        if !grants.allows(Right::Admin, lock) {
            self.reply(from, id, Outcome::Denied, out);
            return;
        }
        let holders: Vec<ClientId> = self
            .table
            .get(lock)
            .map(|view| view.holders().map(|holder| holder.client).collect())
            .unwrap_or_default();
        if holders.is_empty() {
            let outcome = match self.table.reserved_until(lock) {
                // Its waiters wait for the previous run's holder, which no
                // connection here holds: there is nobody to close.
                Some(until) => Outcome::Invalid(format!(
                    "nobody holds it: it is kept for its holder before the restart to reclaim, \
                     for {} ms more at the most",
                    millis(until.saturating_duration_since(now))
                )),
                None => Outcome::NotFound,
            };
            self.reply(from, id, outcome, out);
            return;
        }
        if holders.contains(&from) {
            self.reply(
                from,
                id,
                Outcome::Invalid("this connection holds the lock: unlock it".to_string()),
                out,
            );
            return;
        }
        // Closing a holder's connection gives up all it holds and waits
        // for: the caller needs the right to release every one of those.
        let beyond_rights = holders.iter().any(|&holder| {
            self.table
                .names_of(holder)
                .any(|name| !grants.allows(Right::Admin, name))
        });
        if beyond_rights {
            self.reply(from, id, Outcome::Denied, out);
            return;
        }
        let by = match self.peers.get(&from).and_then(|p| p.principal.as_deref()) {
            Some(principal) => format!("{} for {}", self.describe(from), escaped(principal)),
            None => format!("{} (anonymous)", self.describe(from)),
        };
        let mut closed = Vec::with_capacity(holders.len());
        for holder in holders {
            let (client, peer) = self.peer_labels(holder);
            if let Some(suppressed) = self.admin_log.admit(now) {
                if suppressed > 0 {
                    warn!("{suppressed} more force-release lines were not logged");
                }
                warn!(
                    "{by} force-released {}: closing {}",
                    escaped(lock),
                    self.describe(holder)
                );
            }
            closed.push(ClosedHolder {
                conn: holder.0,
                client,
                peer,
            });
            self.closes.push((
                holder,
                CloseAsked::ForceReleased {
                    by: by.clone(),
                    lock: lock.to_string(),
                },
            ));
        }
        self.reply(from, id, Outcome::Closed(closed), out);
    }

    fn command_ping(&mut self, from: ClientId, id: RequestId, out: &mut Vec<Outgoing>) {
        self.reply(from, id, Outcome::Ok, out);
    }

    /// Answers a `status`; returns about how many bytes the reply takes.
    #[allow(clippy::too_many_arguments)]
    fn command_status(
        &mut self,
        from: ClientId,
        id: RequestId,
        filter: &StatusFilter,
        limit: usize,
        after: Option<String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> usize {
        let grants = self.grants_of(from);
        if !grants.has(Right::Status) {
            self.reply(from, id, Outcome::Denied, out);
            return 0;
        }
        let after = after.unwrap_or_default();
        // Only the name ranges the caller may see are walked, so a status
        // costs what it shows, not the size of the table.
        let scopes = grants.scopes(Right::Status);
        let (exact, ranges): (Option<&String>, Vec<&str>) = match filter {
            StatusFilter::Exact(name) => (
                grants.allows(Right::Status, name).then_some(name),
                Vec::new(),
            ),
            StatusFilter::All => (None, scopes.iter().map(String::as_str).collect()),
            StatusFilter::Prefix(asked) => (
                None,
                scopes
                    .iter()
                    .filter_map(|scope| {
                        if asked.starts_with(scope.as_str()) {
                            Some(asked.as_str())
                        } else if scope.starts_with(asked.as_str()) {
                            Some(scope.as_str())
                        } else {
                            None
                        }
                    })
                    .collect(),
            ),
        };
        let table = &self.table;
        let after_ref = after.as_str();
        let views =
            exact
                .and_then(|name| table.get(name))
                .into_iter()
                .chain(ranges.iter().flat_map(move |&prefix| {
                    table
                        .iter_from(prefix.max(after_ref))
                        .take_while(move |view| view.name().starts_with(prefix))
                }));
        let after_cut = after.clone();
        let views =
            views.filter(move |view| after_cut.is_empty() || view.name() > after_cut.as_str());
        // `{"id":ID,"result":{"status":"ok","locks":[],"truncated":false}}`
        let envelope = 64 + id.get().len();
        let mut budget = Budget {
            left: self.settings.status_budget_bytes.saturating_sub(envelope),
        };
        let mut locks = Vec::new();
        let mut truncated = false;
        for view in views {
            if locks.len() == limit {
                truncated = true;
                break;
            }
            match self.lock_status(&view, now, &mut budget) {
                Some((entry, complete)) => {
                    locks.push(entry);
                    if !complete {
                        truncated = true;
                        break;
                    }
                }
                None => {
                    truncated = true;
                    break;
                }
            }
        }
        let result = StatusResult { locks, truncated };
        self.reply(from, id, Outcome::Status(Box::new(result)), out);
        self.settings.status_budget_bytes - budget.left
    }

    /// A metrics walk over the lock table, with series for the locks under
    /// `prefixes`. It visits at most the locks there now plus as many as
    /// the table can hold: more would be a peer adding locks ahead of it.
    pub fn metrics_walk(&self, prefixes: &[String], now: Instant) -> metrics::Walk {
        let visits = self.table.lock_count() + self.table.max_entries();
        metrics::Walk::new(prefixes, now, visits)
    }

    /// Takes `walk` over up to `max_locks` more locks, from where it
    /// stopped.
    pub fn metrics_step(&self, walk: &mut metrics::Walk, now: Instant, max_locks: usize) {
        let after = walk.take_cursor();
        let mut locks = self.table.iter_after(after.as_deref());
        let mut last = None;
        for view in locks.by_ref().take(max_locks.min(walk.visits_left())) {
            let oldest = view.holders().map(|h| h.since).min();
            let (holders, waiters) = (view.holders().count(), view.waiters().count());
            walk.visit(view.name(), oldest, holders, waiters, now);
            last = Some(view.name());
        }
        let last = last.map(str::to_string);
        let more = locks.next().is_some();
        drop(locks);
        walk.end_slice(last.or(after), more);
    }

    /// What a metrics scrape shows from the core: the table's totals and
    /// state now, and what `walk` gathered over the locks.
    pub fn metrics(&self, walk: metrics::Walk, now: Instant) -> Snapshot {
        let mut snapshot = Snapshot {
            totals: self.table.totals(),
            connections: self.peers.len(),
            locks: self.table.lock_count(),
            lock_entries: self.table.entries(),
            max_lock_entries: self.table.max_entries(),
            grants_resume_in: self.table.grants_resume_in(now).as_secs_f64(),
            reclaim_window: self.recovery.open_for(now).as_secs_f64(),
            awaiting_reclaim: self.table.reserved(),
            tokens_left: self.table.tokens_left(),
            serving: !matches!(
                self.cluster,
                Some(ClusterRole {
                    role: Role::Standby,
                    ..
                })
            ),
            uptime: now.saturating_duration_since(self.started).as_secs_f64(),
            ..Snapshot::default()
        };
        walk.fill(&mut snapshot);
        snapshot
    }

    fn command_stats(
        &mut self,
        from: ClientId,
        id: RequestId,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let totals = self.table.totals();
        let result = StatsResult {
            uptime_ms: millis(now.saturating_duration_since(self.started)),
            connections: self.peers.len(),
            locks: self.table.lock_count(),
            locks_held: totals.held,
            waiters: totals.waiting,
            lock_entries: self.table.entries(),
            grants: totals.grants,
            timeouts: totals.timeouts,
            released_by_disconnect: totals.released_by_disconnect,
            rejected_connections: self.rejected_connections,
            frame_timeouts: self.frame_timeouts,
            bad_messages: self.bad_messages,
            reclaims: totals.reclaims,
            reclaims_refused: self.reclaims_refused,
            reclaim_conflicts: self.reclaim_conflicts,
            awaiting_reclaim: self.table.reserved(),
            deadlocks: totals.deadlocks,
            deadlock_checks_cut: totals.deadlock_checks_cut,
        };
        self.reply(from, id, Outcome::Stats(Box::new(result)), out);
    }

    /// One lock's entry, as much of it as `budget` allows: `None` when not
    /// even its name fits, `false` beside it when holders or waiters were cut.
    fn lock_status(
        &self,
        view: &LockView<'_, RequestId>,
        now: Instant,
        budget: &mut Budget,
    ) -> Option<(LockStatus, bool)> {
        let mut entry = LockStatus {
            lock_name: view.name().to_string(),
            permits: view.permits(),
            holders: Vec::new(),
            waiters: Vec::new(),
        };
        if !budget.take(&entry) {
            return None;
        }
        for h in view.holders() {
            let (client, peer) = self.peer_labels(h.client);
            let holder = HolderStatus {
                conn: h.client.0,
                client,
                peer,
                mode: h.mode,
                token: h.token,
                take: view.permits().map(|_| h.take),
                held_ms: millis(now.saturating_duration_since(h.since)),
            };
            if !budget.take(&holder) {
                return Some((entry, false));
            }
            entry.holders.push(holder);
        }
        for w in view.waiters() {
            let (client, peer) = self.peer_labels(w.client);
            let waiter = WaiterStatus {
                conn: w.client.0,
                client,
                peer,
                mode: w.mode,
                take: view.permits().map(|_| w.take),
                waiting_ms: millis(now.saturating_duration_since(w.since)),
            };
            if !budget.take(&waiter) {
                return Some((entry, false));
            }
            entry.waiters.push(waiter);
        }
        Some((entry, true))
    }

    fn peer_labels(&self, client: ClientId) -> (String, String) {
        self.peers
            .get(&client)
            .map(|p| (p.name.clone(), p.addr.to_string()))
            .unwrap_or_default()
    }

    fn reply(&self, to: ClientId, id: RequestId, result: Outcome, out: &mut Vec<Outgoing>) {
        out.push(Outgoing {
            to,
            reply: Reply::Rpc { id, result },
        });
    }

    /// Turns the table's effects into replies, in order.
    fn send_effects(&mut self, out: &mut Vec<Outgoing>) {
        for effect in self.effects.drain(..) {
            let (to, id, result) = match effect {
                Effect::Granted {
                    client,
                    tag,
                    lock,
                    mode,
                    token,
                } => {
                    debug!("granted {lock:?} to conn {client}, token {token}");
                    let proof = self
                        .peers
                        .get(&client)
                        .is_some_and(|peer| peer.proofs)
                        .then(|| self.recovery.key().sign(&lock, mode, token));
                    (client, tag, Outcome::Granted { token, proof })
                }
                Effect::GrantedAll {
                    client,
                    tag,
                    locks,
                    token,
                } => {
                    debug!(
                        "granted {} locks at once to conn {client}, token {token}",
                        locks.len()
                    );
                    let proofs = self
                        .peers
                        .get(&client)
                        .is_some_and(|peer| peer.proofs)
                        .then(|| {
                            let key = self.recovery.key();
                            let proof = |(lock, mode): &(Arc<str>, Mode)| {
                                (lock.to_string(), key.sign(lock, *mode, token))
                            };
                            locks.iter().map(proof).collect()
                        });
                    (client, tag, Outcome::GrantedAll { token, proofs })
                }
                Effect::Deadlock { client, tag, cycle } => {
                    // What the asker may not see with `status` stays unnamed
                    // (the step is there, its lock and client are not),
                    // except its own wait: the first step, made by it or by
                    // the run it belongs to (`within`, the same principal).
                    // Not grants_of: the effects being drained borrow self.
                    let grants = grants_in(&self.peers, client);
                    let cycle = cycle
                        .into_iter()
                        .enumerate()
                        .map(|(i, (conn, lock))| {
                            let visible = i == 0 || grants.allows(Right::Status, &lock);
                            CycleStep {
                                conn: conn.0,
                                client: self
                                    .peers
                                    .get(&conn)
                                    .filter(|_| visible)
                                    .map(|peer| peer.name.clone())
                                    .unwrap_or_default(),
                                lock_name: if visible {
                                    lock.to_string()
                                } else {
                                    String::new()
                                },
                            }
                        })
                        .collect();
                    (client, tag, Outcome::Deadlock(cycle))
                }
                Effect::TimedOut { client, tag } => (client, tag, Outcome::Timeout),
                Effect::Cancelled { client, tag } => (client, tag, Outcome::Cancelled),
                Effect::Refused {
                    client,
                    tag,
                    reason,
                } => (client, tag, refusal_outcome(reason)),
            };
            out.push(Outgoing {
                to,
                reply: Reply::Rpc { id, result },
            });
        }
    }

    fn count_bad_message(&mut self, from: ClientId, detail: &str, now: Instant) {
        self.bad_messages += 1;
        if let Some(suppressed) = self.bad_message_log.admit(now) {
            if suppressed > 0 {
                warn!("{suppressed} more bad messages were not logged");
            }
            warn!(
                "bad message from {}: {}",
                self.describe(from),
                escaped(detail)
            );
        }
    }
}

/// What `client` may do (nothing, if it is gone).
fn grants_in(peers: &FxHashMap<ClientId, Peer>, client: ClientId) -> Arc<Grants> {
    peers
        .get(&client)
        .map_or_else(|| Arc::new(Grants::default()), |peer| peer.grants.clone())
}

fn refusal_outcome(reason: Refusal) -> Outcome {
    match reason {
        Refusal::AlreadyWaiting => {
            Outcome::Invalid("this connection already waits for this lock".to_string())
        }
        Refusal::HeldInOtherMode(mode) => Outcome::Invalid(format!(
            "this connection already holds this lock in {} mode; unlock it first",
            mode.as_str()
        )),
        Refusal::TooMany { limit } => Outcome::TooMany(format!(
            "this connection holds or waits for {limit} locks, the most allowed (max_locks_per_connection)"
        )),
        Refusal::TableFull { limit } => Outcome::TooMany(format!(
            "the server holds or queues {limit} lock requests, the most allowed (max_lock_entries)"
        )),
        Refusal::KindDiffers {
            permits: Some(permits),
        } => Outcome::PermitsDiffer {
            error: format!(
                "this lock is a semaphore of {permits} permits: ask with \"permits\": {permits} \
                 (and no mode)"
            ),
            permits,
        },
        Refusal::KindDiffers { permits: None } => Outcome::Invalid(
            "this lock is held or awaited as a mutex (exclusive or shared), not as a semaphore"
                .to_string(),
        ),
        Refusal::HeldWithOtherTake(take) => Outcome::Invalid(format!(
            "this connection already holds {take} permits of this semaphore; unlock it first"
        )),
        Refusal::AlreadyInvolved(lock) => Outcome::Invalid(format!(
            "this connection already holds or waits for {}",
            quoted(&lock)
        )),
        Refusal::ReclaimConflict { holder, mode, .. } => Outcome::Refused(format!(
            "conn {holder} holds this lock in {} mode: two clients believe they hold it, and \
             the one that reclaimed first keeps it",
            mode.as_str()
        )),
    }
}

/// A lock name for a log line: quoted, control characters escaped.
fn quoted(lock: &str) -> String {
    format!("\"{}\"", escaped(lock))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Bytes left for a `status` reply.
struct Budget {
    left: usize,
}

impl Budget {
    /// Counts `item` (as JSON, with a separator) against the budget if it fits.
    fn take<T: serde::Serialize>(&mut self, item: &T) -> bool {
        let size = protocol::encoded_len(item) + 1;
        match self.left.checked_sub(size) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeepaliveConfig;
    use serde_json::{Value, json};

    fn core() -> Core {
        let settings = Settings {
            max_locks_per_connection: 100,
            detect_deadlocks: true,
            max_lock_entries: 1000,
            keepalive: Keepalive::effective(&KeepaliveConfig::default()),
            status_budget_bytes: 64 << 10,
        };
        Core::new(settings, 100, Instant::now())
    }

    fn ask(core: &mut Core, from: ClientId, message: Value) -> Vec<Value> {
        let mut out = Vec::new();
        core.handle(
            from,
            message.to_string().as_bytes(),
            Instant::now(),
            &mut out,
        );
        out.iter()
            .map(|o| {
                let mut bytes = Vec::new();
                o.reply.encode(&mut bytes);
                serde_json::from_slice(bytes.get(4..).unwrap_or_default()).unwrap_or(Value::Null)
            })
            .collect()
    }

    fn lock(id: u64, name: &str) -> Value {
        json!({"command": "lock", "id": id, "parameters": {"lockName": name}})
    }

    /// Tokens `<principal>-token` for each of `principals`; what the new
    /// access made the core say.
    fn with_tokens_of(
        core: &mut Core,
        principals: &[&str],
        allow_plaintext_auth: bool,
    ) -> Vec<Outgoing> {
        let text: String = principals
            .iter()
            .map(|p| {
                format!(
                    "{p} = \"{}\"\n",
                    crate::auth::token_hash(&format!("{p}-token"))
                )
            })
            .collect();
        let mut out = Vec::new();
        core.set_access(
            Access {
                acl: Acl::new(&[]),
                tokens: Tokens::parse(&text).unwrap(),
                allow_plaintext_auth,
            },
            &mut out,
        );
        out
    }

    fn with_tokens(core: &mut Core, allow_plaintext_auth: bool) {
        with_tokens_of(core, &["deploy", "ops"], allow_plaintext_auth);
    }

    fn unlock(id: u64, name: &str) -> Value {
        json!({"command": "unlock", "id": id, "parameters": {"lockName": name}})
    }

    /// The series names a finished walk gathered, and the dropped count.
    fn walked(core: &Core, walk: metrics::Walk) -> (Vec<String>, usize) {
        let snapshot = core.metrics(walk, Instant::now());
        let names = snapshot.lock_series.into_iter().map(|s| s.name).collect();
        (names, snapshot.lock_series_dropped)
    }

    #[test]
    fn a_metrics_walk_in_slices_sees_each_lock_there_throughout_once() {
        let mut core = core();
        let holder = core.connect("127.0.0.1:5000".parse().unwrap());
        for (id, name) in ["j/1", "j/2", "j/3", "j/5", "j/6"].iter().enumerate() {
            ask(&mut core, holder, lock(id as u64, name));
        }
        let mut walk = core.metrics_walk(&["j/".to_string()], Instant::now());
        core.metrics_step(&mut walk, Instant::now(), 2);
        assert!(!walk.is_done());
        // The lock the slice stopped at goes, one is added behind the walk
        // and one ahead of it.
        ask(&mut core, holder, unlock(10, "j/2"));
        ask(&mut core, holder, lock(11, "j/0"));
        ask(&mut core, holder, lock(12, "j/4"));
        core.metrics_step(&mut walk, Instant::now(), 2);
        assert!(!walk.is_done());
        core.metrics_step(&mut walk, Instant::now(), 2);
        assert!(walk.is_done(), "the last slice saw the last lock");
        let (names, dropped) = walked(&core, walk);
        assert_eq!(names, ["j/1", "j/2", "j/3", "j/4", "j/5", "j/6"]);
        assert_eq!(dropped, 0);
    }

    #[test]
    fn a_metrics_walk_ends_however_fast_locks_are_added_ahead_of_it() {
        let mut core = core();
        let holder = core.connect("127.0.0.1:5000".parse().unwrap());
        ask(&mut core, holder, lock(0, "a"));
        let mut walk = core.metrics_walk(&[String::new()], Instant::now());
        let mut slices = 0;
        let mut next = 1;
        while !walk.is_done() {
            // Three new names ahead of the walk for every two it visits,
            // the oldest released to stay under the table's limits.
            for _ in 0..3 {
                ask(&mut core, holder, lock(next, &format!("b/{next:06}")));
                if next > 50 {
                    ask(&mut core, holder, unlock(0, &format!("b/{:06}", next - 50)));
                }
                next += 1;
            }
            core.metrics_step(&mut walk, Instant::now(), 2);
            slices += 1;
            assert!(slices < 10_000, "the walk never ended");
        }
        // The table holds at most 1,000 entries: the walk stopped after the
        // one lock there at its start and 1,000 more.
        let (names, dropped) = walked(&core, walk);
        assert_eq!(names.len() + dropped, 1 + 1000);
    }

    #[test]
    fn a_token_taken_away_by_a_reload_closes_the_connections_that_gave_it() {
        let mut core = core();
        with_tokens(&mut core, false);
        let deploy = core.connect("127.0.0.1:5000".parse().unwrap());
        let ops = core.connect("127.0.0.1:5001".parse().unwrap());
        ask(&mut core, deploy, hello_with("deploy-token"));
        ask(&mut core, ops, hello_with("ops-token"));
        assert_eq!(
            ask(&mut core, deploy, lock(2, "deploy/web"))[0]["result"]["status"],
            "ok"
        );
        let told = with_tokens_of(&mut core, &["ops"], false);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].to, deploy);
        assert!(matches!(
            told[0].reply,
            Reply::Error {
                error: ErrorCode::AuthFailed,
                ..
            }
        ));
        assert_eq!(core.take_closes(), [(deploy, CloseAsked::AuthFailed)]);
        // A token now refused in plain text from another host goes too.
        let remote = core.connect("10.0.0.9:5002".parse().unwrap());
        with_tokens_of(&mut core, &["ops"], true);
        ask(&mut core, remote, hello_with("ops-token"));
        with_tokens_of(&mut core, &["ops"], false);
        assert_eq!(core.take_closes(), [(remote, CloseAsked::AuthFailed)]);
    }

    #[test]
    fn force_release_needs_admin_on_all_that_the_closed_connections_hold() {
        use crate::acl::{AclRule, Right};
        let mut core = core();
        let rule = |principal: &str, prefix: &str, rights: Vec<Right>| AclRule {
            principal: principal.to_string(),
            prefixes: vec![prefix.to_string()],
            rights,
        };
        let text = format!(
            "jobs-admin = \"{}\"\n",
            crate::auth::token_hash("admin-token")
        );
        core.set_access(
            Access {
                acl: Acl::new(&[
                    rule(ANONYMOUS, "", vec![Right::Lock]),
                    rule("jobs-admin", "jobs/", vec![Right::Admin]),
                ]),
                tokens: Tokens::parse(&text).unwrap(),
                allow_plaintext_auth: false,
            },
            &mut Vec::new(),
        );
        let holder = core.connect("127.0.0.1:5000".parse().unwrap());
        ask(&mut core, holder, lock(1, "jobs/a"));
        ask(&mut core, holder, lock(2, "payments/ledger"));
        let admin = core.connect("127.0.0.1:5001".parse().unwrap());
        ask(&mut core, admin, hello_with("admin-token"));
        let force = |name: &str| json!({"command": "forceRelease", "id": 3, "parameters": {"lockName": name}});
        let said = ask(&mut core, admin, force("jobs/a"));
        assert_eq!(said[0]["result"]["status"], "denied", "{said:?}");
        assert!(core.take_closes().is_empty());
        let other = core.connect("127.0.0.1:5002".parse().unwrap());
        ask(&mut core, other, lock(1, "jobs/b"));
        let said = ask(&mut core, admin, force("jobs/b"));
        assert_eq!(said[0]["result"]["status"], "ok", "{said:?}");
        assert_eq!(core.take_closes().len(), 1);
    }

    fn hello_with(token: &str) -> Value {
        json!({"command": "hello", "id": 1, "parameters": {"auth": token}})
    }

    #[test]
    fn a_token_in_plain_text_from_another_host_is_refused_unless_allowed() {
        let mut core = core();
        with_tokens(&mut core, false);
        let remote = core.connect("10.1.2.3:5000".parse().unwrap());
        let said = ask(&mut core, remote, hello_with("deploy-token"));
        assert_eq!(said[0]["error"], "authFailed", "{said:?}");
        assert!(said[0]["detail"].as_str().unwrap().contains("TLS"));
        assert_eq!(core.take_closes(), [(remote, CloseAsked::AuthFailed)]);
        // The same token is fine over TLS, from loopback, or when allowed.
        let over_tls = core.connect_over("10.1.2.3:5001".parse().unwrap(), true);
        let loopback = core.connect("127.0.0.1:5002".parse().unwrap());
        for client in [over_tls, loopback] {
            let said = ask(&mut core, client, hello_with("deploy-token"));
            assert_eq!(said[0]["result"]["principal"], "deploy", "{said:?}");
        }
        with_tokens(&mut core, true);
        let allowed = core.connect("10.1.2.3:5003".parse().unwrap());
        let said = ask(&mut core, allowed, hello_with("deploy-token"));
        assert_eq!(said[0]["result"]["principal"], "deploy", "{said:?}");
        assert!(core.take_closes().is_empty());
    }

    #[test]
    fn a_connection_cannot_change_whom_it_acts_for() {
        let mut core = core();
        with_tokens(&mut core, false);
        let by_certificate = core.connect_over("127.0.0.1:5000".parse().unwrap(), true);
        core.certificate_names(by_certificate, "deploy".to_string());
        let said = ask(&mut core, by_certificate, hello_with("deploy-token"));
        assert_eq!(
            said[0]["result"]["principal"], "deploy",
            "the same name is fine"
        );
        let said = ask(&mut core, by_certificate, hello_with("ops-token"));
        assert_eq!(said[0]["error"], "authFailed", "{said:?}");
        assert!(
            said[0]["detail"]
                .as_str()
                .unwrap()
                .contains("`deploy` already")
        );
        let by_token = core.connect("127.0.0.1:5001".parse().unwrap());
        ask(&mut core, by_token, hello_with("ops-token"));
        let said = ask(&mut core, by_token, hello_with("deploy-token"));
        assert_eq!(said[0]["error"], "authFailed", "{said:?}");
    }

    #[test]
    fn a_reload_that_takes_a_right_away_keeps_the_locks_held_and_lets_them_go() {
        use crate::acl::{AclRule, Right};
        let mut core = core();
        let holder = core.connect("127.0.0.1:5000".parse().unwrap());
        assert_eq!(
            ask(&mut core, holder, lock(1, "jobs/a"))[0]["result"]["status"],
            "ok"
        );
        core.set_access(
            Access {
                acl: Acl::new(&[AclRule {
                    principal: "ops".to_string(),
                    prefixes: vec![String::new()],
                    rights: vec![Right::Admin],
                }]),
                ..Access::default()
            },
            &mut Vec::new(),
        );
        assert_eq!(
            ask(&mut core, holder, lock(2, "jobs/b"))[0]["result"]["status"],
            "denied"
        );
        assert!(
            core.table().get("jobs/a").is_some(),
            "nothing held is dropped"
        );
        let unlocked = ask(
            &mut core,
            holder,
            json!({"command": "unlock", "lockName": "jobs/a"}),
        );
        assert_eq!(unlocked[0]["result"], "ok", "{unlocked:?}");
    }

    #[test]
    fn a_standby_sends_every_lock_request_to_the_leader_and_answers_the_rest() {
        let mut core = core();
        let now = Instant::now();
        core.stand_by(Some("10.0.0.5:20934".to_string()), now);
        let a = core.connect("127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()));
        let not_leader = json!([{"error": "notLeader", "leader": "10.0.0.5:20934", "id": 1}]);
        assert_eq!(json!(ask(&mut core, a, lock(1, "x"))), not_leader);
        let unlock = json!({"command": "unlock", "id": 1, "parameters": {"lockName": "x"}});
        assert_eq!(json!(ask(&mut core, a, unlock)), not_leader);
        let status = json!({"command": "status", "id": 1});
        assert_eq!(json!(ask(&mut core, a, status)), not_leader);
        // The original client's unlock has no id.
        let v1 = json!({"command": "unlock", "lockName": "x"});
        assert_eq!(
            json!(ask(&mut core, a, v1)),
            json!([{"error": "notLeader", "leader": "10.0.0.5:20934"}])
        );
        let hello = ask(&mut core, a, json!({"command": "hello", "id": 2}));
        assert_eq!(hello[0]["result"]["role"], "standby");
        assert_eq!(hello[0]["result"]["leader"], "10.0.0.5:20934");
        assert_eq!(hello[0]["result"]["grantsResumeInMs"], 0);
        let ping = ask(&mut core, a, json!({"command": "ping", "id": 3}));
        assert_eq!(ping[0]["result"]["status"], "ok");
        let stats = ask(&mut core, a, json!({"command": "stats", "id": 4}));
        assert_eq!(stats[0]["result"]["status"], "ok");
        assert_eq!(core.table().totals().held, 0);

        core.stand_by(None, now);
        assert_eq!(
            json!(ask(&mut core, a, lock(5, "x"))),
            json!([{"error": "notLeader", "leader": null, "id": 5}])
        );
    }

    #[test]
    fn force_release_of_a_lock_kept_for_a_reclaim_says_so() {
        use crate::tokens::HeldLock;
        let mut core = core();
        let now = Instant::now();
        let previous = PreviousRun::Stopped(vec![HeldLock {
            lock_name: "nightly".to_string(),
            mode: Mode::Exclusive,
            token: 50,
        }]);
        let recovery = Recovery::new(
            ProofKey::ephemeral(),
            100,
            &previous,
            now,
            Duration::from_secs(10),
        );
        core.recover(recovery, &previous);
        let admin = core.connect("127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()));
        let force = |name: &str| json!({"command": "forceRelease", "id": 1, "parameters": {"lockName": name}});
        let kept = ask(&mut core, admin, force("nightly"));
        assert_eq!(kept[0]["result"]["status"], "invalid", "{kept:?}");
        assert!(
            kept[0]["result"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("kept for its holder before the restart")),
            "{kept:?}"
        );
        let free = ask(&mut core, admin, force("other"));
        assert_eq!(free[0]["result"]["status"], "notFound", "{free:?}");
    }

    #[test]
    fn a_new_term_grants_from_its_first_token_and_waits_for_more_tokens_at_its_ceiling() {
        let mut core = core();
        let now = Instant::now();
        core.stand_by(None, now);
        let a = core.connect("127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!()));
        let recovery = Recovery::new(
            ProofKey::ephemeral(),
            5_000,
            &PreviousRun::None,
            now,
            Duration::ZERO,
        );
        // Two tokens reserved: 5000 and 5001.
        core.lead(
            5_000,
            5_002,
            recovery,
            &PreviousRun::None,
            "a:1".to_string(),
            now,
        );
        let hello = ask(&mut core, a, json!({"command": "hello", "id": 1}));
        assert_eq!(hello[0]["result"]["role"], "leader");
        assert_eq!(hello[0]["result"]["leader"], "a:1");
        assert_eq!(ask(&mut core, a, lock(2, "x"))[0]["result"]["token"], 5_000);
        assert_eq!(ask(&mut core, a, lock(3, "y"))[0]["result"]["token"], 5_001);
        // The reservation is used up: the request waits, it is not refused.
        assert_eq!(ask(&mut core, a, lock(4, "z")), Vec::<Value>::new());
        let mut out = Vec::new();
        core.allow_tokens_below(6_000, now, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let mut bytes = Vec::new();
        out[0].reply.encode(&mut bytes);
        let granted: Value =
            serde_json::from_slice(bytes.get(4..).unwrap_or_default()).unwrap_or(Value::Null);
        assert_eq!(granted["id"], 4);
        assert_eq!(granted["result"]["token"], 5_002);
    }
}
