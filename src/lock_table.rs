//! The lock table: one FIFO queue of holders and waiters per lock name, with
//! exclusive and shared modes, wait deadlines and fencing tokens.
//! A pure state machine: no IO and no clock (callers pass `now`); every reply
//! it decides on comes back as an [`Effect`], in the order it must be sent.
//!
//! Every request is filed twice: in its lock's queue, in order (holders by
//! token, waiters by arrival, each found by binary search: see `lane.rs`), and
//! in its connection's holdings, by name. So unlock, cancel, timeout and the
//! duplicate check cost O(log n), never a walk along a queue.
//!
//! When a connection goes, its holds, and its waits at the head of a queue
//! that no exclusive holder blocks, are dealt with at once, since they may
//! let others in. Its other waits can let nobody in: they are counted out at
//! once and cleared later, a bounded batch per [`LockTable::expire`] call,
//! like waits that time out together. So a thousand connections each
//! waiting on a thousand locks can leave, or time out, at the same moment
//! without stalling the caller's event loop.
//!
//! The table keeps at most `max_entries` requests (held, waiting, or left by
//! a departed connection and not yet cleared), so its memory has a ceiling.

mod deadlock;
mod lane;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Keys are small integers the server itself picks: no peer controls them,
// so a fast non-keyed hash is safe here.
use rustc_hash::{FxHashMap, FxHashSet};

use lane::Lane;

use crate::histogram::Durations;

/// The most waits one [`LockTable::expire`] call times out or clears. Each
/// costs about a microsecond (more in a debug build), so a call stays within
/// a few milliseconds however many waits end together; the rest are left for
/// the next call, which [`LockTable::next_deadline`] then asks for at once.
pub const WAITS_PER_EXPIRE: usize = 1024;

/// A connection as the lock table knows it: a number never reused while the
/// server runs (unlike socket slots).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How a lock is held.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The only holder.
    Exclusive,
    /// One of any number of shared holders.
    Shared,
}

impl Mode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }
}

/// Why a lock request was turned down without waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The connection already waits for this lock.
    AlreadyWaiting,
    /// The connection already holds this lock in the other mode.
    HeldInOtherMode(Mode),
    /// The connection holds or waits for as many locks as it may.
    TooMany {
        /// The per-connection limit.
        limit: usize,
    },
    /// The table holds or queues as many requests as it may, over all
    /// connections.
    TableFull {
        /// The table's limit.
        limit: usize,
    },
    /// The lock is in force as a semaphore of `permits` (or, with `None`,
    /// as a mutex: exclusive or shared), and the request asks otherwise.
    KindDiffers {
        /// The permits in force; `None` for a mutex.
        permits: Option<u32>,
    },
    /// The connection holds these permits of the semaphore, and asks again
    /// for another number.
    HeldWithOtherTake(u32),
    /// A multi-lock names a lock the connection already holds or waits for
    /// (or names it twice).
    AlreadyInvolved(Arc<str>),
    /// A reclaim of a lock someone holds in a way that excludes it (two
    /// clients both believe they hold it: one of them is wrong).
    ReclaimConflict {
        /// Who holds it.
        holder: ClientId,
        /// How.
        mode: Mode,
        /// With what token.
        token: u64,
    },
}

/// A reply the table decided on. `T` is the caller's tag for the request
/// (the RPC id), handed back so the reply can name it.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect<T> {
    /// The lock is granted (now, or later to a waiter).
    Granted {
        /// Who gets it.
        client: ClientId,
        /// The request being answered.
        tag: T,
        /// The lock's name.
        lock: Arc<str>,
        /// How it is granted.
        mode: Mode,
        /// The fencing token of this grant.
        token: u64,
    },
    /// A multi-lock is granted: all of its locks at once, with one token.
    GrantedAll {
        /// Who gets them.
        client: ClientId,
        /// The request being answered.
        tag: T,
        /// The locks, in the request's order, each with its mode.
        locks: Vec<(Arc<str>, Mode)>,
        /// The fencing token of this grant.
        token: u64,
    },
    /// The request would wait for ever: its wait would close a cycle of
    /// connections each waiting for the next. Refused, never queued.
    Deadlock {
        /// Who asked.
        client: ClientId,
        /// The request being answered.
        tag: T,
        /// The cycle, starting with the asker: each connection with a lock
        /// it waits for, held (or awaited ahead of it) by the next one; the
        /// last one's by the first.
        cycle: Vec<(ClientId, Arc<str>)>,
    },
    /// The wait ran out before the lock could be granted.
    TimedOut {
        /// Whose wait.
        client: ClientId,
        /// The request being answered.
        tag: T,
    },
    /// The wait was withdrawn by an unlock from the same connection.
    Cancelled {
        /// Whose wait.
        client: ClientId,
        /// The request being answered.
        tag: T,
    },
    /// The request was turned down.
    Refused {
        /// Who asked.
        client: ClientId,
        /// The request being answered.
        tag: T,
        /// Why.
        reason: Refusal,
    },
}

/// How many permits a semaphore has, and how many of them a request takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Permits {
    /// The semaphore's permits: at most this many are held at once.
    pub of: u32,
    /// How many the request takes, from 1 to `of`.
    pub take: u32,
}

/// A request for a lock.
#[derive(Debug)]
pub struct LockRequest<'a, T> {
    /// Who asks.
    pub client: ClientId,
    /// The lock's name.
    pub lock: &'a str,
    /// Exclusive or shared (for a semaphore: shared).
    pub mode: Mode,
    /// For a semaphore, its permits and the request's take; `None` for a
    /// mutex.
    pub semaphore: Option<Permits>,
    /// `None` waits for ever, zero tries once, anything else waits at most that long.
    pub timeout: Option<Duration>,
    /// The caller's tag, handed back in the answering effect.
    pub tag: T,
}

/// A request for several locks at once, granted all together or not at all.
#[derive(Debug)]
pub struct MultiLockRequest<'a, T> {
    /// Who asks.
    pub client: ClientId,
    /// The locks, each with its mode, no name twice.
    pub locks: &'a [(&'a str, Mode)],
    /// `None` waits for ever, zero tries once, anything else waits at most that long.
    pub timeout: Option<Duration>,
    /// The caller's tag, handed back in the answering effect.
    pub tag: T,
}

/// A grant of an earlier run that its holder asks to have back, with the
/// grant's own token and mode. Whether it is genuine is for the caller to
/// check; the table only makes sure it excludes nobody.
#[derive(Debug)]
pub struct Reclaim<'a, T> {
    /// Who asks.
    pub client: ClientId,
    /// The lock's name.
    pub lock: &'a str,
    /// The mode it was granted in.
    pub mode: Mode,
    /// For a semaphore grant, its permits and take.
    pub semaphore: Option<Permits>,
    /// The token it was granted with, below every token of this table.
    pub token: u64,
    /// The caller's tag, handed back in the answering effect.
    pub tag: T,
}

/// What an unlock did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Unlocked {
    /// The connection held the lock and no longer does.
    Released,
    /// The connection was waiting and has left the queue.
    Withdrawn,
    /// The connection neither held nor waited for the lock.
    NotFound,
}

/// What a disconnect released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Departure {
    /// Locks the connection held, now released.
    pub released: Vec<Arc<str>>,
    /// Waits the connection had, now dropped.
    pub withdrawn: usize,
}

/// A granted lock.
#[derive(Clone, Debug)]
pub struct Holder {
    /// Who holds it.
    pub client: ClientId,
    /// How.
    pub mode: Mode,
    /// The fencing token of the grant.
    pub token: u64,
    /// The permits it holds: 1 for a mutex.
    pub take: u32,
    /// When it was granted.
    pub since: Instant,
}

/// A queued request.
#[derive(Clone, Debug)]
pub struct Waiter<T> {
    /// Who waits.
    pub client: ClientId,
    /// The mode asked for.
    pub mode: Mode,
    /// The permits asked for: 1 for a mutex.
    pub take: u32,
    /// When the request arrived.
    pub since: Instant,
    /// For a multi-lock, on its first lock only.
    deadline: Option<Instant>,
    /// `None` for a part of a multi-lock, whose tag is in its [`Group`].
    tag: Option<T>,
}

/// A multi-lock still waiting: a waiter with this arrival number in each
/// of its locks' queues.
#[derive(Debug)]
struct Group<T> {
    client: ClientId,
    tag: T,
    locks: Vec<(Arc<str>, Mode)>,
    since: Instant,
}

#[derive(Debug)]
struct Queue<T> {
    /// One exclusive holder, or any number of shared ones, by token (so in
    /// grant order).
    holders: Lane<Holder>,
    /// Requests waiting, by arrival number. Departed connections' waits
    /// stay until cleared, but head the queue only behind an exclusive
    /// holder: any change that could let a waiter in clears them off the
    /// head first.
    waiters: Lane<Waiter<T>>,
    /// The head waiter (arrival number, connection) unless an exclusive
    /// holder blocks it, as filed in that connection's [`Holdings::heads`].
    head: Option<(u64, ClientId)>,
    /// A semaphore's permits, fixed while the queue lives; `None` for a mutex.
    permits: Option<u32>,
    /// The permits held: the sum of the holders' takes.
    used: u64,
}

impl<T> Queue<T> {
    fn new(permits: Option<u32>) -> Self {
        Queue {
            holders: Lane::new(),
            waiters: Lane::new(),
            head: None,
            permits,
            used: 0,
        }
    }

    /// Adds a holder whose token is above every holder's.
    fn push_holder(&mut self, holder: Holder) {
        self.used += u64::from(holder.take);
        self.holders.push_back(holder.token, holder);
    }

    /// Adds a holder in its place by token; false if the token is there.
    fn insert_holder(&mut self, holder: Holder) -> bool {
        let take = holder.take;
        let inserted = self.holders.insert(holder.token, holder);
        if inserted {
            self.used += u64::from(take);
        }
        inserted
    }

    fn remove_holder(&mut self, token: u64) -> Option<Holder> {
        let holder = self.holders.remove(token)?;
        self.used -= u64::from(holder.take);
        Some(holder)
    }

    fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty()
    }

    /// The head waiter (arrival number, connection), unless an exclusive
    /// holder blocks it.
    fn unblocked_head(&self) -> Option<(u64, ClientId)> {
        if self
            .holders
            .front()
            .is_some_and(|(_, holder)| holder.mode == Mode::Exclusive)
        {
            return None;
        }
        self.waiters
            .front()
            .map(|(seq, waiter)| (seq, waiter.client))
    }

    /// Whether a request in `mode` for `take` permits may join the current
    /// holders.
    fn admits(&self, mode: Mode, take: u32) -> bool {
        if let Some(permits) = self.permits {
            return self.used + u64::from(take) <= u64::from(permits);
        }
        match self.holders.front() {
            None => true,
            Some((_, holder)) => holder.mode == Mode::Shared && mode == Mode::Shared,
        }
    }
}

/// What one connection holds and waits for, by lock name.
#[derive(Debug, Default)]
struct Holdings {
    /// Locks held: the grant's token and mode. (Hash maps: a lock and an
    /// unlock touch one name each, and a map that empties keeps its room
    /// for the next; only a departure needs name order, and sorts.)
    held: FxHashMap<Arc<str>, (u64, Mode)>,
    /// Locks waited for: the wait's arrival number.
    waits: FxHashMap<Arc<str>, u64>,
    /// Those of the waits that head a queue without an exclusive holder.
    /// When the connection goes, these and its holds are all that can let
    /// anyone else in.
    heads: FxHashSet<Arc<str>>,
    /// How many of the waits have a wait queued behind them. With this at
    /// zero and nothing held, nobody waits for the connection, so no cycle
    /// of waits can run through it: the deadlock check is skipped at once.
    behind: usize,
    /// Lock requests waiting: a multi-lock counts once. The deadlock check
    /// takes a connection with several as able to go on (they may come from
    /// threads that do not wait for each other); once one is left, it is
    /// checked again.
    requests: usize,
}

impl Holdings {
    /// Counts one waiting request answered; true when one is left.
    fn request_answered(&mut self) -> bool {
        self.requests = self.requests.saturating_sub(1);
        self.requests == 1
    }

    fn len(&self) -> usize {
        self.held.len() + self.waits.len()
    }

    /// Halves what a map keeps once three quarters of it are unused, so that
    /// a connection that held thousands of locks gives their room back.
    fn give_back_memory(&mut self) {
        fn roomy(capacity: usize, len: usize) -> bool {
            capacity > 64 && capacity > 4 * len
        }
        if roomy(self.held.capacity(), self.held.len()) {
            self.held.shrink_to(2 * self.held.len());
        }
        if roomy(self.waits.capacity(), self.waits.len()) {
            self.waits.shrink_to(2 * self.waits.len());
        }
        if roomy(self.heads.capacity(), self.heads.len()) {
            self.heads.shrink_to(2 * self.heads.len());
        }
    }
}

/// Queues `waiter` at the tail of `queue`: the wait it joins behind now has
/// one behind it.
fn push_wait<T>(queue: &mut Queue<T>, seq: u64, waiter: Waiter<T>, clients: &mut Clients) {
    if let Some((_, tail)) = queue.waiters.back() {
        if let Some(holdings) = clients.holdings.get_mut(&tail.client) {
            holdings.behind += 1;
        }
    }
    queue.waiters.push_back(seq, waiter);
}

/// Takes wait `seq` out of `queue`: if it was the tail, the new tail has
/// nobody behind it any more; if not, it had someone behind it.
fn take_wait<T>(queue: &mut Queue<T>, seq: u64, clients: &mut Clients) -> Option<Waiter<T>> {
    let was_tail = queue.waiters.back().is_some_and(|(last, _)| last == seq);
    let waiter = if queue.waiters.front().is_some_and(|(first, _)| first == seq) {
        queue.waiters.pop_front().map(|(_, waiter)| waiter)
    } else {
        queue.waiters.remove(seq)
    }?;
    let relieved = if was_tail {
        queue.waiters.back().map(|(_, tail)| tail.client)
    } else {
        Some(waiter.client)
    };
    if let Some(holdings) = relieved.and_then(|client| clients.holdings.get_mut(&client)) {
        holdings.behind = holdings.behind.saturating_sub(1);
    }
    Some(waiter)
}

/// A departed connection's waits still in queues: the lock name and the
/// wait's arrival number, in no particular order.
type DeadWaits = Vec<(Arc<str>, u64)>;

/// The connections' holdings, and what departed connections left behind.
#[derive(Debug, Default)]
struct Clients {
    /// Kept from a connection's first lock request to its departure, even
    /// when empty: a connection that locks and unlocks in a loop reuses
    /// them instead of allocating anew each time. At most one per live
    /// connection.
    holdings: FxHashMap<ClientId, Holdings>,
    /// Departed connections with waits still in queues. Such a wait is dead:
    /// counted nowhere but in `dead_waits`, shown to nobody, never granted.
    departed: FxHashSet<ClientId>,
    /// The dead waits to clear, by connection, in departure order (some may
    /// be gone already: cleared at a queue's head, or timed out).
    to_clear: VecDeque<(ClientId, DeadWaits)>,
    /// Dead waits still in queues.
    dead_waits: usize,
    /// Since when clearing is due, while `to_clear` is not empty.
    clear_due: Option<Instant>,
    /// Connections left with one request waiting, to check for deadlock.
    recheck: Vec<ClientId>,
}

impl Clients {
    /// One of `client`'s waiting requests has been answered; with one left,
    /// it is due for a deadlock check.
    fn request_ended(&mut self, client: ClientId) {
        if self
            .holdings
            .get_mut(&client)
            .is_some_and(Holdings::request_answered)
        {
            self.recheck.push(client);
        }
    }
}

/// Running totals, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Holder entries now (a shared lock with three holders counts three).
    pub held: usize,
    /// Queued requests now.
    pub waiting: usize,
    /// Grants since start.
    pub grants: u64,
    /// Requests that ran out of time since start (`timeoutMs: 0` misses included).
    pub timeouts: u64,
    /// Locks released because their holder's connection closed, since start.
    pub released_by_disconnect: u64,
    /// Grants of an earlier run given back to their holders, since start.
    pub reclaims: u64,
    /// Requests withdrawn by an unlock while they waited, since start.
    pub cancels: u64,
    /// Locks given up by an unlock, since start.
    pub released_by_unlock: u64,
    /// Requests answered `deadlock`, since start.
    pub deadlocks: u64,
    /// Waits queued without a deadlock check, for the part of the table
    /// they depend on was too big to look at, since start.
    pub deadlock_checks_cut: u64,
    /// From request to grant, for every grant (reclaims aside).
    pub waits: Durations,
    /// From grant to release, for every grant released.
    pub holds: Durations,
}

/// Everything a grant or a departure touches besides the queue itself.
#[derive(Debug)]
struct Books {
    next_token: u64,
    /// The last token that may be granted: past it nothing is granted.
    last_token: u64,
    /// No grant before this instant (after a restart); `None` once passed.
    grants_from: Option<Instant>,
    /// Locks held when the previous run stopped, with how many of their
    /// grants are not reclaimed yet: nothing else is granted on them until
    /// every one is, or until `reserved_until`.
    reserved: HashMap<Box<str>, usize>,
    /// When the reservations end; `None` once they have.
    reserved_until: Option<Instant>,
    /// Queued requests with a deadline, earliest first: (deadline, arrival
    /// number) -> lock name. A wait that leaves takes its entry with it, so
    /// this follows the waits down as well as up.
    deadlines: BTreeMap<(Instant, u64), Arc<str>>,
    totals: Totals,
}

impl Books {
    fn holding_grants(&self, now: Instant) -> bool {
        self.grants_from.is_some_and(|from| now < from) || self.next_token > self.last_token
    }

    /// Whether nothing may be granted on `name` at `now`.
    fn holding_back(&self, name: &str, now: Instant) -> bool {
        self.holding_grants(now) || (!self.reserved.is_empty() && self.reserved.contains_key(name))
    }

    /// Forgets the deadline of a wait that has left its queue.
    fn forget_deadline<T>(&mut self, seq: u64, waiter: &Waiter<T>) {
        if let Some(at) = waiter.deadline {
            self.deadlines.remove(&(at, seq));
        }
    }

    fn issue_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        token
    }
}

/// Brings `queue` to rest after a change: clears departed connections' waits
/// off its head; grants to the head for as long as the head may join the
/// holders (shared heads are granted together, and a request behind a
/// waiting one stays behind it); files the new head in its connection's
/// holdings, unless an exclusive holder blocks it (then its departure could
/// let nobody in).
///
/// A multi-lock at the head that may join the holders here is granted only
/// with its other locks: its arrival number is returned, for the caller to
/// try, and until it is granted it blocks those behind it.
fn settle<T>(
    queue: &mut Queue<T>,
    name: &Arc<str>,
    books: &mut Books,
    clients: &mut Clients,
    now: Instant,
    out: &mut Vec<Effect<T>>,
) -> Option<u64> {
    let holding = books.holding_back(name, now);
    let mut multi_head = None;
    while let Some((seq, head)) = queue.waiters.front() {
        let (client, mode, take) = (head.client, head.mode, head.take);
        let departed = !clients.departed.is_empty() && clients.departed.contains(&client);
        if departed && queue.unblocked_head().is_none() {
            // Behind an exclusive holder it is in nobody's way: left for
            // the batches of `LockTable::expire`.
            break;
        }
        if !departed && (holding || !queue.admits(mode, take)) {
            break;
        }
        if !departed && head.tag.is_none() {
            multi_head = Some(seq);
            break;
        }
        let Some(waiter) = take_wait(queue, seq, clients) else {
            break;
        };
        books.forget_deadline(seq, &waiter);
        let (false, Some(tag)) = (departed, waiter.tag) else {
            clients.dead_waits -= 1;
            continue;
        };
        let token = books.issue_token();
        queue.push_holder(Holder {
            client,
            mode,
            token,
            take,
            since: now,
        });
        // One lookup on this path, the busiest of the table.
        if let Some(holdings) = clients.holdings.get_mut(&client) {
            holdings.waits.remove(&**name);
            holdings.held.insert(Arc::clone(name), (token, mode));
            if holdings.request_answered() {
                clients.recheck.push(client);
            }
        }
        books.totals.waiting -= 1;
        books.totals.held += 1;
        books.totals.grants += 1;
        books
            .totals
            .waits
            .record(now.saturating_duration_since(waiter.since));
        out.push(Effect::Granted {
            client,
            tag,
            lock: Arc::clone(name),
            mode,
            token,
        });
    }
    let head = queue.unblocked_head();
    if head != queue.head {
        if let Some((_, client)) = queue.head {
            if let Some(holdings) = clients.holdings.get_mut(&client) {
                holdings.heads.remove(&**name);
            }
        }
        if let Some((_, client)) = head {
            if let Some(holdings) = clients.holdings.get_mut(&client) {
                holdings.heads.insert(Arc::clone(name));
            }
        }
        queue.head = head;
    }
    multi_head
}

/// Where a connection stands in a queue.
#[derive(Clone, Copy)]
enum Place {
    /// Holds the lock, with this token.
    Held(u64),
    /// Waits, with this arrival number.
    Waiting(u64),
}

/// The lock table. `T` tags each request so its reply can name it.
#[derive(Debug)]
pub struct LockTable<T> {
    queues: BTreeMap<Arc<str>, Queue<T>>,
    clients: Clients,
    books: Books,
    /// Multi-locks still waiting, by arrival number.
    groups: FxHashMap<u64, Group<T>>,
    /// Connections run by the holder of another's grant (a `pklock` inside
    /// `pklock run`): child to parent, and parent to children. The parent
    /// counts as waiting for whatever its children wait for.
    parents: FxHashMap<ClientId, ClientId>,
    children: FxHashMap<ClientId, Vec<ClientId>>,
    next_wait_seq: u64,
    max_per_client: usize,
    max_entries: usize,
    detect_deadlocks: bool,
}

impl<T> LockTable<T> {
    /// An empty table whose first grant gets `first_token`, where a
    /// connection may hold or wait for at most `max_per_client` locks, and
    /// all connections together at most `max_entries`.
    pub fn new(first_token: u64, max_per_client: usize, max_entries: usize) -> Self {
        LockTable {
            queues: BTreeMap::new(),
            clients: Clients::default(),
            books: Books {
                next_token: first_token,
                last_token: u64::MAX,
                grants_from: None,
                reserved: HashMap::new(),
                reserved_until: None,
                deadlines: BTreeMap::new(),
                totals: Totals::default(),
            },
            groups: FxHashMap::default(),
            parents: FxHashMap::default(),
            children: FxHashMap::default(),
            next_wait_seq: 0,
            max_per_client,
            max_entries,
            detect_deadlocks: true,
        }
    }

    /// Files `child` as run by `parent` (the holder of a grant that started
    /// it), for the deadlock check: `parent` releases nothing before
    /// `child`'s waits are granted. Only a connection that holds and waits
    /// for nothing yet, and is not filed already, can be filed: so nobody
    /// is its parent yet, and the links never loop.
    pub fn link(&mut self, child: ClientId, parent: ClientId) {
        let idle = self
            .clients
            .holdings
            .get(&child)
            .is_none_or(|h| h.len() == 0);
        if child == parent || !idle || self.parents.contains_key(&child) {
            return;
        }
        self.parents.insert(child, parent);
        self.children.entry(parent).or_default().push(child);
    }

    /// Forgets `client`'s links, both ways.
    fn unlink(&mut self, client: ClientId) {
        if let Some(parent) = self.parents.remove(&client) {
            if let Some(siblings) = self.children.get_mut(&parent) {
                siblings.retain(|c| *c != client);
                if siblings.is_empty() {
                    self.children.remove(&parent);
                }
            }
        }
        for child in self.children.remove(&client).unwrap_or_default() {
            self.parents.remove(&child);
        }
    }

    /// Turns the deadlock check of waits on or off (on by default). With it
    /// off, a wait that closes a cycle is queued like any other.
    pub fn set_deadlock_detection(&mut self, on: bool) {
        self.detect_deadlocks = on;
    }

    /// Changes the limits for requests from now on (a configuration
    /// reload). Lowering one below what is in use drops nothing: what is held
    /// or queued stays, and requests are refused until use falls below the
    /// new limit. Until then `check_invariants` reports the excess, as it
    /// assumes limits that were in force when every entry came.
    pub fn set_limits(&mut self, max_per_client: usize, max_entries: usize) {
        self.max_per_client = max_per_client;
        self.max_entries = max_entries;
    }

    /// Asks for a lock. Exactly one effect answers the request, now or later.
    pub fn lock(&mut self, request: LockRequest<'_, T>, now: Instant, out: &mut Vec<Effect<T>>) {
        let LockRequest {
            client,
            lock,
            mode,
            semaphore,
            timeout,
            tag,
        } = request;
        let (mode, take) = match semaphore {
            Some(permits) => (Mode::Shared, permits.take),
            None => (mode, 1),
        };
        let permits = semaphore.map(|p| p.of);
        if self.clients.departed.contains(&client) {
            // A connection id in use again (the server never does this;
            // tests do): what the old connection left goes first.
            self.clear_departed_now(client);
        }
        let queue = self.queues.get_key_value(lock);
        let holdings = self.clients.holdings.get(&client);
        if let Some(holdings) = holdings {
            if let Some((name, &(token, held_mode))) = holdings.held.get_key_value(lock) {
                let in_force = queue.and_then(|(_, q)| q.permits);
                let held_take = queue
                    .and_then(|(_, q)| q.holders.get(token))
                    .map_or(1, |h| h.take);
                let reason = if in_force != permits {
                    Some(Refusal::KindDiffers { permits: in_force })
                } else if held_mode != mode {
                    Some(Refusal::HeldInOtherMode(held_mode))
                } else if held_take != take {
                    Some(Refusal::HeldWithOtherTake(held_take))
                } else {
                    None
                };
                out.push(match reason {
                    Some(reason) => Effect::Refused {
                        client,
                        tag,
                        reason,
                    },
                    None => Effect::Granted {
                        client,
                        tag,
                        lock: Arc::clone(name),
                        mode,
                        token,
                    },
                });
                return;
            }
        }
        let refusal = if holdings.is_some_and(|h| h.waits.contains_key(lock)) {
            Some(Refusal::AlreadyWaiting)
        } else if let Some((_, queue)) = queue.filter(|(_, q)| q.permits != permits) {
            Some(Refusal::KindDiffers {
                permits: queue.permits,
            })
        } else if holdings.map_or(0, Holdings::len) >= self.max_per_client {
            Some(Refusal::TooMany {
                limit: self.max_per_client,
            })
        } else if !self.make_room(1) {
            Some(Refusal::TableFull {
                limit: self.max_entries,
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            out.push(Effect::Refused {
                client,
                tag,
                reason,
            });
            return;
        }

        let holding = self.books.holding_back(lock, now);
        let (name, free) = match self.queues.get_key_value(lock) {
            Some((name, queue)) => (
                Arc::clone(name),
                !holding && queue.waiters.is_empty() && queue.admits(mode, take),
            ),
            None => (Arc::from(lock), !holding),
        };
        // Nothing is granted below but at once: if the queue has waiters, its
        // head cannot be granted (or it would have been), so neither can a
        // request behind it.
        if !free && timeout.is_some_and(|t| t.is_zero()) {
            self.books.totals.timeouts += 1;
            out.push(Effect::TimedOut { client, tag });
            return;
        }
        if !free && self.detect_deadlocks {
            if let Some(cycle) = self.check_wait(client, &[(&name, mode, take)]) {
                out.push(Effect::Deadlock { client, tag, cycle });
                return;
            }
        }
        let queue = self
            .queues
            .entry(Arc::clone(&name))
            .or_insert_with(|| Queue::new(permits));
        if free {
            let token = self.books.issue_token();
            queue.push_holder(Holder {
                client,
                mode,
                token,
                take,
                since: now,
            });
            let holdings = self.clients.holdings.entry(client).or_default();
            holdings.held.insert(Arc::clone(&name), (token, mode));
            self.books.totals.held += 1;
            self.books.totals.grants += 1;
            self.books.totals.waits.record(Duration::ZERO);
            out.push(Effect::Granted {
                client,
                tag,
                lock: name,
                mode,
                token,
            });
            return;
        }

        let seq = self.next_wait_seq;
        self.next_wait_seq += 1;
        // A deadline too far to represent is no deadline.
        let deadline = timeout.and_then(|t| now.checked_add(t));
        let first = queue.waiters.is_empty();
        let waiter = Waiter {
            client,
            mode,
            take,
            since: now,
            deadline,
            tag: Some(tag),
        };
        push_wait(queue, seq, waiter, &mut self.clients);
        let holdings = self.clients.holdings.entry(client).or_default();
        holdings.waits.insert(Arc::clone(&name), seq);
        holdings.requests += 1;
        self.books.totals.waiting += 1;
        if let Some(at) = deadline {
            self.books.deadlines.insert((at, seq), Arc::clone(&name));
        }
        if first && queue.unblocked_head().is_some() {
            // The new head, and no exclusive holder blocks it.
            queue.head = Some((seq, client));
            holdings.heads.insert(name);
        }
    }

    /// Asks for several locks at once. They are granted together, with one
    /// token, once the request is at the head of every one of their queues
    /// and each admits it; until then it holds none of them. It joins the
    /// tail of every queue at once, so two multi-locks stand in the same
    /// order in every queue they share. Exactly one effect answers it, now or
    /// later: [`Effect::GrantedAll`], or a wait's other answers.
    pub fn lock_all(
        &mut self,
        request: MultiLockRequest<'_, T>,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) {
        let MultiLockRequest {
            client,
            locks,
            timeout,
            tag,
        } = request;
        if self.clients.departed.contains(&client) {
            self.clear_departed_now(client);
        }
        let holdings = self.clients.holdings.get(&client);
        let mut refusal = None;
        for (index, &(lock, _)) in locks.iter().enumerate() {
            let involved = holdings
                .is_some_and(|h| h.held.contains_key(lock) || h.waits.contains_key(lock))
                || locks[..index].iter().any(|&(earlier, _)| earlier == lock);
            if involved {
                refusal = Some(Refusal::AlreadyInvolved(Arc::from(lock)));
                break;
            }
            if let Some(permits) = self.queues.get(lock).and_then(|q| q.permits) {
                refusal = Some(Refusal::KindDiffers {
                    permits: Some(permits),
                });
                break;
            }
        }
        if refusal.is_none()
            && holdings
                .map_or(0, Holdings::len)
                .saturating_add(locks.len())
                > self.max_per_client
        {
            refusal = Some(Refusal::TooMany {
                limit: self.max_per_client,
            });
        }
        if refusal.is_none() && !self.make_room(locks.len()) {
            refusal = Some(Refusal::TableFull {
                limit: self.max_entries,
            });
        }
        if let Some(reason) = refusal {
            out.push(Effect::Refused {
                client,
                tag,
                reason,
            });
            return;
        }
        let named: Vec<(Arc<str>, Mode)> = locks
            .iter()
            .map(|&(lock, mode)| match self.queues.get_key_value(lock) {
                Some((name, _)) => (Arc::clone(name), mode),
                None => (Arc::from(lock), mode),
            })
            .collect();
        let free = named.iter().all(|(name, mode)| {
            !self.books.holding_back(name, now)
                && self
                    .queues
                    .get(name)
                    .is_none_or(|q| q.waiters.is_empty() && q.admits(*mode, 1))
        });
        if !free && timeout.is_some_and(|t| t.is_zero()) {
            self.books.totals.timeouts += 1;
            out.push(Effect::TimedOut { client, tag });
            return;
        }
        if !free && self.detect_deadlocks {
            let waits: Vec<(&str, Mode, u32)> = named
                .iter()
                .map(|(name, mode)| (&**name, *mode, 1))
                .collect();
            if let Some(cycle) = self.check_wait(client, &waits) {
                out.push(Effect::Deadlock { client, tag, cycle });
                return;
            }
        }
        if free {
            let token = self.books.issue_token();
            let holdings = self.clients.holdings.entry(client).or_default();
            for (name, mode) in &named {
                let queue = self
                    .queues
                    .entry(Arc::clone(name))
                    .or_insert_with(|| Queue::new(None));
                queue.push_holder(Holder {
                    client,
                    mode: *mode,
                    token,
                    take: 1,
                    since: now,
                });
                holdings.held.insert(Arc::clone(name), (token, *mode));
            }
            self.books.totals.held += named.len();
            self.books.totals.grants += 1;
            self.books.totals.waits.record(Duration::ZERO);
            out.push(Effect::GrantedAll {
                client,
                tag,
                locks: named,
                token,
            });
            return;
        }
        let seq = self.next_wait_seq;
        self.next_wait_seq += 1;
        let deadline = timeout.and_then(|t| now.checked_add(t));
        for (index, (name, mode)) in named.iter().enumerate() {
            let queue = self
                .queues
                .entry(Arc::clone(name))
                .or_insert_with(|| Queue::new(None));
            let first = queue.waiters.is_empty();
            let waiter = Waiter {
                client,
                mode: *mode,
                take: 1,
                since: now,
                // One deadline for the whole request, on its first lock.
                deadline: deadline.filter(|_| index == 0),
                tag: None,
            };
            push_wait(queue, seq, waiter, &mut self.clients);
            let holdings = self.clients.holdings.entry(client).or_default();
            holdings.waits.insert(Arc::clone(name), seq);
            if first && queue.unblocked_head().is_some() {
                queue.head = Some((seq, client));
                holdings.heads.insert(Arc::clone(name));
            }
        }
        self.books.totals.waiting += named.len();
        if let Some(holdings) = self.clients.holdings.get_mut(&client) {
            holdings.requests += 1;
        }
        if let (Some(at), Some((first, _))) = (deadline, named.first()) {
            self.books.deadlines.insert((at, seq), Arc::clone(first));
        }
        self.groups.insert(
            seq,
            Group {
                client,
                tag,
                locks: named,
                since: now,
            },
        );
    }

    /// Gives a grant of an earlier run back to `client`, with its own token,
    /// ahead of any waiter, unless it would exclude a holder or break a
    /// limit. Answered at once: [`Effect::Granted`] with the grant's token,
    /// or [`Effect::Refused`]. A reclaim of a reserved lock counts towards
    /// ending its reservation.
    pub fn reclaim(&mut self, request: Reclaim<'_, T>, now: Instant, out: &mut Vec<Effect<T>>) {
        let Reclaim {
            client,
            lock,
            mode,
            semaphore,
            token,
            tag,
        } = request;
        let (mode, take) = match semaphore {
            Some(permits) => (Mode::Shared, permits.take),
            None => (mode, 1),
        };
        let permits = semaphore.map(|p| p.of);
        if self.clients.departed.contains(&client) {
            self.clear_departed_now(client);
        }
        let holdings = self.clients.holdings.get(&client);
        let refusal = if let Some(&(_, held_mode)) = holdings.and_then(|h| h.held.get(lock)) {
            Some(Refusal::HeldInOtherMode(held_mode))
        } else if holdings.is_some_and(|h| h.waits.contains_key(lock)) {
            Some(Refusal::AlreadyWaiting)
        } else if holdings.map_or(0, Holdings::len) >= self.max_per_client {
            Some(Refusal::TooMany {
                limit: self.max_per_client,
            })
        } else if let Some(queue) = self.queues.get(lock).filter(|q| q.permits != permits) {
            Some(Refusal::KindDiffers {
                permits: queue.permits,
            })
        } else if let Some(holder) = self.queues.get(lock).and_then(|queue| {
            let (_, holder) = queue.holders.front()?;
            let excludes = match permits {
                Some(_) => !queue.admits(mode, take),
                None => holder.mode == Mode::Exclusive || mode == Mode::Exclusive,
            };
            excludes.then_some(holder)
        }) {
            Some(Refusal::ReclaimConflict {
                holder: holder.client,
                mode: holder.mode,
                token: holder.token,
            })
        } else if token >= self.books.next_token {
            // Not of an earlier run; the caller checks this first.
            Some(Refusal::ReclaimConflict {
                holder: client,
                mode,
                token,
            })
        } else if !self.make_room(1) {
            Some(Refusal::TableFull {
                limit: self.max_entries,
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            out.push(Effect::Refused {
                client,
                tag,
                reason,
            });
            return;
        }
        let name = match self.queues.get_key_value(lock) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(lock),
        };
        let queue = self
            .queues
            .entry(Arc::clone(&name))
            .or_insert_with(|| Queue::new(permits));
        let holder = Holder {
            client,
            mode,
            token,
            take,
            since: now,
        };
        if !queue.insert_holder(holder) {
            // Only shared holders can be there, none of them with this token
            // (tokens are unique, and a token is reclaimed once).
            out.push(Effect::Refused {
                client,
                tag,
                reason: Refusal::ReclaimConflict {
                    holder: client,
                    mode,
                    token,
                },
            });
            return;
        }
        self.clients
            .holdings
            .entry(client)
            .or_default()
            .held
            .insert(Arc::clone(&name), (token, mode));
        self.books.totals.held += 1;
        self.books.totals.reclaims += 1;
        out.push(Effect::Granted {
            client,
            tag,
            lock: Arc::clone(&name),
            mode,
            token,
        });
        if let Some(left) = self.books.reserved.get_mut(lock) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.books.reserved.remove(lock);
                if self.books.reserved.is_empty() {
                    self.books.reserved_until = None;
                }
            }
        }
        self.settle_name(&name, now, out);
        self.recheck_deadlocks(now, out);
    }

    /// Reserves the locks the previous run held when it stopped, one entry
    /// per grant: nothing is granted on them until each of their grants is
    /// reclaimed, or until `until`.
    pub fn reserve_until<'a>(&mut self, grants: impl IntoIterator<Item = &'a str>, until: Instant) {
        for name in grants {
            *self.books.reserved.entry(Box::from(name)).or_default() += 1;
        }
        if !self.books.reserved.is_empty() {
            self.books.reserved_until = Some(until);
        }
    }

    /// Locks still reserved for holders of the previous run.
    pub fn reserved(&self) -> usize {
        self.books.reserved.len()
    }

    /// Until when `lock` is kept for a holder of the previous run to
    /// reclaim, if it is.
    pub fn reserved_until(&self, lock: &str) -> Option<Instant> {
        self.books
            .reserved_until
            .filter(|_| self.books.reserved.contains_key(lock))
    }

    /// Takes `client` out of `lock`'s queue, whether it holds the lock or waits
    /// for it; a withdrawn wait is answered [`Effect::Cancelled`] (for a
    /// multi-lock still waiting, the whole request is withdrawn; of one
    /// granted, only this lock is released). Waiters that may now have the
    /// lock are granted it.
    pub fn unlock(
        &mut self,
        client: ClientId,
        lock: &str,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) -> Unlocked {
        let Some(holdings) = self.clients.holdings.get_mut(&client) else {
            return Unlocked::NotFound;
        };
        let (name, place) = if let Some((name, (token, _))) = holdings.held.remove_entry(lock) {
            (name, Place::Held(token))
        } else if let Some((name, seq)) = holdings.waits.remove_entry(lock) {
            (name, Place::Waiting(seq))
        } else {
            return Unlocked::NotFound;
        };
        holdings.give_back_memory();
        let Some(queue) = self.queues.get_mut(&name) else {
            return Unlocked::NotFound;
        };
        let mut group = None;
        let outcome = match place {
            Place::Held(token) => {
                if let Some(holder) = queue.remove_holder(token) {
                    self.books.totals.held -= 1;
                    self.books.totals.released_by_unlock += 1;
                    self.books
                        .totals
                        .holds
                        .record(now.saturating_duration_since(holder.since));
                }
                Unlocked::Released
            }
            Place::Waiting(seq) => {
                if let Some(waiter) = take_wait(queue, seq, &mut self.clients) {
                    self.books.totals.waiting -= 1;
                    self.books.totals.cancels += 1;
                    self.books.forget_deadline(seq, &waiter);
                    self.clients.request_ended(client);
                    match waiter.tag {
                        Some(tag) => out.push(Effect::Cancelled { client, tag }),
                        None => group = Some(seq),
                    }
                }
                Unlocked::Withdrawn
            }
        };
        let others = match group.and_then(|seq| self.withdraw_group(seq, &name)) {
            Some((tag, others)) => {
                out.push(Effect::Cancelled { client, tag });
                others
            }
            None => Vec::new(),
        };
        self.settle_name(&name, now, out);
        for other in others {
            self.settle_name(&other, now, out);
        }
        self.recheck_deadlocks(now, out);
        outcome
    }

    /// Takes what is left of a waiting multi-lock (all but `taken`, already
    /// out; `""` for none) out of its queues, handing back its tag and the
    /// locks to settle.
    fn withdraw_group(&mut self, seq: u64, taken: &str) -> Option<(T, Vec<Arc<str>>)> {
        let group = self.groups.remove(&seq)?;
        let mut others = Vec::with_capacity(group.locks.len());
        for (name, _) in group.locks {
            if &*name == taken {
                continue;
            }
            if let Some(holdings) = self.clients.holdings.get_mut(&group.client) {
                holdings.waits.remove(&name);
                holdings.heads.remove(&name);
            }
            if let Some(waiter) = self
                .queues
                .get_mut(&name)
                .and_then(|q| take_wait(q, seq, &mut self.clients))
            {
                self.books.totals.waiting -= 1;
                self.books.forget_deadline(seq, &waiter);
            }
            others.push(name);
        }
        Some((group.tag, others))
    }

    /// Settles `name`'s queue (see [`settle`]), dropping it once empty, and
    /// grants the multi-locks that this lets in, settling their queues in
    /// turn.
    fn settle_name(&mut self, name: &Arc<str>, now: Instant, out: &mut Vec<Effect<T>>) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        let multi = settle(queue, name, &mut self.books, &mut self.clients, now, out);
        if queue.is_empty() {
            self.queues.remove(name);
        }
        if let Some(seq) = multi {
            self.grant_groups_from(seq, now, out);
        }
    }

    /// Grants the multi-lock `seq` if every one of its queues admits it,
    /// then settles its queues in its order; multi-locks those settles find
    /// at a head are tried after, in the order found.
    fn grant_groups_from(&mut self, seq: u64, now: Instant, out: &mut Vec<Effect<T>>) {
        let mut pending = VecDeque::from([seq]);
        while let Some(seq) = pending.pop_front() {
            let Some(names) = self.grant_group(seq, now, out) else {
                continue;
            };
            for name in names {
                let Some(queue) = self.queues.get_mut(&name) else {
                    continue;
                };
                let multi = settle(queue, &name, &mut self.books, &mut self.clients, now, out);
                pending.extend(multi);
            }
        }
    }

    /// Grants the waiting multi-lock `seq`, with one token, if it heads
    /// every one of its queues and each admits it; returns its locks then.
    fn grant_group(
        &mut self,
        seq: u64,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) -> Option<Vec<Arc<str>>> {
        let group = self.groups.get(&seq)?;
        let ready = group.locks.iter().all(|(name, mode)| {
            !self.books.holding_back(name, now)
                && self.queues.get(name).is_some_and(|queue| {
                    queue.waiters.front().is_some_and(|(first, _)| first == seq)
                        && queue.admits(*mode, 1)
                })
        });
        if !ready {
            return None;
        }
        let group = self.groups.remove(&seq)?;
        let token = self.books.issue_token();
        for (name, mode) in &group.locks {
            let Some(queue) = self.queues.get_mut(name) else {
                continue;
            };
            if let Some(waiter) = take_wait(queue, seq, &mut self.clients) {
                self.books.forget_deadline(seq, &waiter);
            }
            queue.push_holder(Holder {
                client: group.client,
                mode: *mode,
                token,
                take: 1,
                since: now,
            });
            if let Some(holdings) = self.clients.holdings.get_mut(&group.client) {
                holdings.waits.remove(name);
                holdings.heads.remove(name);
                holdings.held.insert(Arc::clone(name), (token, *mode));
            }
        }
        let count = group.locks.len();
        self.clients.request_ended(group.client);
        self.books.totals.waiting -= count;
        self.books.totals.held += count;
        self.books.totals.grants += 1;
        self.books
            .totals
            .waits
            .record(now.saturating_duration_since(group.since));
        let names = group
            .locks
            .iter()
            .map(|(name, _)| Arc::clone(name))
            .collect();
        out.push(Effect::GrantedAll {
            client: group.client,
            tag: group.tag,
            locks: group.locks,
            token,
        });
        Some(names)
    }

    /// Releases every lock `client` holds and drops every wait it has (no
    /// replies go to it), granting the next waiters in the same call. Waits
    /// that stand behind someone else's are only counted out here; their
    /// memory is cleared by later [`LockTable::expire`] calls.
    pub fn disconnect(
        &mut self,
        client: ClientId,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) -> Departure {
        let mut departure = Departure::default();
        if !self.parents.is_empty() || !self.children.is_empty() {
            self.unlink(client);
        }
        let Some(Holdings {
            held,
            mut waits,
            heads,
            ..
        }) = self.clients.holdings.remove(&client)
        else {
            return departure;
        };
        // Every wait is dead from here on, before anything moves: a
        // multi-lock of this connection must not be granted by the grants
        // that its releases cause.
        let dead = waits.len();
        if dead > 0 {
            self.books.totals.waiting -= dead;
            departure.withdrawn = dead;
            self.clients.dead_waits += dead;
            self.clients.departed.insert(client);
            if !self.groups.is_empty() {
                for seq in waits.values() {
                    self.groups.remove(seq);
                }
            }
        }
        // In name order, the order of the grants this may cause: the holds,
        // and the waits at the head of a queue that no exclusive holder
        // blocks.
        let mut held: Vec<_> = held.into_iter().collect();
        held.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut heads: Vec<_> = heads.into_iter().collect();
        heads.sort_unstable();
        let mut held = held.into_iter().peekable();
        let mut heads = heads.into_iter().peekable();
        loop {
            let next_is_held = match (held.peek(), heads.peek()) {
                (Some((held_name, _)), Some(head_name)) => held_name < head_name,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let (name, place) = if next_is_held {
                let Some((name, (token, _))) = held.next() else {
                    break;
                };
                (name, Place::Held(token))
            } else {
                let Some(name) = heads.next() else {
                    break;
                };
                let Some(seq) = waits.remove(&name) else {
                    continue;
                };
                (name, Place::Waiting(seq))
            };
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            match place {
                Place::Held(token) => {
                    if let Some(holder) = queue.remove_holder(token) {
                        self.books.totals.held -= 1;
                        self.books.totals.released_by_disconnect += 1;
                        self.books
                            .totals
                            .holds
                            .record(now.saturating_duration_since(holder.since));
                        departure.released.push(Arc::clone(&name));
                    }
                }
                Place::Waiting(seq) => {
                    if let Some(waiter) = take_wait(queue, seq, &mut self.clients) {
                        self.clients.dead_waits -= 1;
                        self.books.forget_deadline(seq, &waiter);
                    }
                }
            }
            self.settle_name(&name, now, out);
        }
        if dead > 0 {
            if waits.is_empty() {
                self.clients.departed.remove(&client);
            } else {
                self.clients
                    .to_clear
                    .push_back((client, waits.into_iter().collect()));
                self.clients.clear_due.get_or_insert(now);
            }
        }
        self.give_back_memory();
        self.recheck_deadlocks(now, out);
        departure
    }

    /// Answers waits whose deadline is at or before `now` with
    /// [`Effect::TimedOut`], earliest first, granting whoever that unblocks;
    /// ends the hold on grants when its time has come; clears waits that
    /// departed connections left. Does at most [`WAITS_PER_EXPIRE`] waits;
    /// [`LockTable::next_deadline`] is then already due.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Effect<T>>) {
        let due = |books: &Books| {
            books
                .deadlines
                .first_key_value()
                .is_some_and(|((at, _), _)| *at <= now)
        };
        if !due(&self.books)
            && self.books.grants_from.is_none()
            && self.books.reserved_until.is_none()
            && self.clients.to_clear.is_empty()
        {
            return;
        }
        let mut budget = WAITS_PER_EXPIRE;
        while budget > 0 {
            let Some(entry) = self.books.deadlines.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), name) = entry.remove_entry();
            budget -= 1;
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            let Some(waiter) = take_wait(queue, seq, &mut self.clients) else {
                continue;
            };
            if self.clients.departed.contains(&waiter.client) {
                // Already counted out; an exclusive holder blocks whoever is
                // behind it, so nobody else moves.
                self.clients.dead_waits -= 1;
                continue;
            }
            self.books.totals.waiting -= 1;
            self.books.totals.timeouts += 1;
            if let Some(holdings) = self.clients.holdings.get_mut(&waiter.client) {
                holdings.waits.remove(&name);
            }
            self.clients.request_ended(waiter.client);
            let (tag, others) = match waiter.tag {
                Some(tag) => (tag, Vec::new()),
                None => match self.withdraw_group(seq, &name) {
                    Some(group) => group,
                    None => continue,
                },
            };
            out.push(Effect::TimedOut {
                client: waiter.client,
                tag,
            });
            self.settle_name(&name, now, out);
            for other in others {
                self.settle_name(&other, now, out);
            }
        }
        // The hold ends after the waits that ran out before it.
        if !due(&self.books) && self.books.grants_from.is_some_and(|from| from <= now) {
            self.books.grants_from = None;
            self.settle_all(now, out);
        }
        if !due(&self.books) && self.books.reserved_until.is_some_and(|until| until <= now) {
            self.books.reserved_until = None;
            let mut names: Vec<Box<str>> =
                self.books.reserved.drain().map(|(name, _)| name).collect();
            names.sort_unstable();
            for name in names {
                let Some(name) = self
                    .queues
                    .get_key_value(&*name)
                    .map(|(n, _)| Arc::clone(n))
                else {
                    continue;
                };
                self.settle_name(&name, now, out);
            }
        }
        self.clear_departed(budget);
        self.recheck_deadlocks(now, out);
    }

    /// The earliest instant [`LockTable::expire`] has work: a wait's
    /// deadline, the end of the hold on grants, or (already passed) waits to
    /// clear.
    pub fn next_deadline(&self) -> Option<Instant> {
        let wait_deadline = self
            .books
            .deadlines
            .first_key_value()
            .map(|((at, _), _)| *at);
        wait_deadline
            .into_iter()
            .chain(self.books.grants_from)
            .chain(self.books.reserved_until)
            .chain(self.clients.clear_due)
            .min()
    }

    /// Grants nothing before `until`: requests queue (and time out) as
    /// usual, and the queues are served in name order when it comes, through
    /// [`LockTable::expire`]. After a restart this gives clients of the
    /// previous instance time to notice that their locks are gone.
    pub fn hold_grants_until(&mut self, until: Instant) {
        self.books.grants_from = Some(until);
    }

    /// Whether grants are being held back at `now`.
    pub fn holding_grants(&self, now: Instant) -> bool {
        self.books.holding_grants(now)
    }

    /// How much longer grants are held back, from `now`.
    pub fn grants_resume_in(&self, now: Instant) -> Duration {
        self.books
            .grants_from
            .map_or(Duration::ZERO, |from| from.saturating_duration_since(now))
    }

    /// Grants nothing once `last` has been granted: tokens past it would
    /// not survive a restart, or not read back exactly in JSON clients.
    /// Requests queue and time out as during a restart grace.
    pub fn stop_granting_after(&mut self, last: u64) {
        self.books.last_token = last;
    }

    /// Raises the last token that may be granted to `last` (more tokens
    /// were reserved), serving the queues that waited for want of tokens.
    pub fn grant_tokens_up_to(&mut self, last: u64, now: Instant, out: &mut Vec<Effect<T>>) {
        let was_exhausted = self.tokens_exhausted();
        self.books.last_token = self.books.last_token.max(last);
        if was_exhausted && !self.tokens_exhausted() {
            self.settle_all(now, out);
        }
        self.recheck_deadlocks(now, out);
    }

    /// Settles every queue, in name order, when grants resume.
    fn settle_all(&mut self, now: Instant, out: &mut Vec<Effect<T>>) {
        let mut multis = Vec::new();
        for (name, queue) in self.queues.iter_mut() {
            multis.extend(settle(
                queue,
                name,
                &mut self.books,
                &mut self.clients,
                now,
                out,
            ));
        }
        self.queues.retain(|_, queue| !queue.is_empty());
        for seq in multis {
            self.grant_groups_from(seq, now, out);
        }
    }

    /// Whether every token up to the last allowed has been granted.
    pub fn tokens_exhausted(&self) -> bool {
        self.books.next_token > self.books.last_token
    }

    /// How many more grants the token space and reservation allow.
    pub fn tokens_left(&self) -> u64 {
        (self.books.last_token.saturating_add(1)).saturating_sub(self.books.next_token)
    }

    /// The token the next grant will carry.
    pub fn next_token(&self) -> u64 {
        self.books.next_token
    }

    /// Running totals.
    pub fn totals(&self) -> Totals {
        self.books.totals
    }

    /// Requests the table keeps, at most its limit: held, waiting, and waits
    /// of departed connections not cleared yet.
    pub fn entries(&self) -> usize {
        self.books.totals.held + self.books.totals.waiting + self.clients.dead_waits
    }

    /// The most requests the table keeps.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Lock names with a holder or a waiter.
    pub fn lock_count(&self) -> usize {
        self.queues.len()
    }

    /// How many locks `client` holds or waits for.
    pub fn entries_of(&self, client: ClientId) -> usize {
        self.clients.holdings.get(&client).map_or(0, Holdings::len)
    }

    /// The names `client` holds or waits for, in no order.
    pub fn names_of(&self, client: ClientId) -> impl Iterator<Item = &str> + '_ {
        self.clients
            .holdings
            .get(&client)
            .into_iter()
            .flat_map(|holdings| holdings.held.keys().chain(holdings.waits.keys()))
            .map(|name| &**name)
    }

    /// The lock named `lock`, if anyone holds or waits for it.
    pub fn get(&self, lock: &str) -> Option<LockView<'_, T>> {
        self.queues
            .get_key_value(lock)
            .map(|(name, queue)| LockView {
                name,
                queue,
                departed: &self.clients.departed,
            })
    }

    /// Locks in name order, starting at the first name `>= from`.
    pub fn iter_from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = LockView<'a, T>> + 'a {
        self.iter_starting(Bound::Included(from))
    }

    /// Locks in name order, after the name `after` (`None`: from the
    /// first lock).
    pub fn iter_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = LockView<'a, T>> + 'a {
        self.iter_starting(after.map_or(Bound::Unbounded, Bound::Excluded))
    }

    fn iter_starting<'a>(
        &'a self,
        start: Bound<&'a str>,
    ) -> impl Iterator<Item = LockView<'a, T>> + 'a {
        let departed = &self.clients.departed;
        self.queues
            .range::<str, _>((start, Bound::Unbounded))
            .map(move |(name, queue)| LockView {
                name,
                queue,
                departed,
            })
    }

    /// Checks every structural promise of the table; `Err` names the first
    /// broken one. For tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        let clients = &self.clients;
        let (mut held, mut waiting, mut dead, mut timed) = (0, 0, 0, 0);
        let listed_dead: FxHashSet<(ClientId, &str, u64)> = clients
            .to_clear
            .iter()
            .flat_map(|(c, waits)| waits.iter().map(move |(n, s)| (*c, &**n, *s)))
            .collect();
        for (name, queue) in &self.queues {
            queue
                .holders
                .check()
                .and(queue.waiters.check())
                .map_err(|e| format!("{name:?}: {e}"))?;
            if queue.is_empty() {
                return Err(format!("empty queue for {name:?} was kept"));
            }
            if queue.holders.len() > 1
                && queue.holders.iter().any(|(_, h)| h.mode == Mode::Exclusive)
            {
                return Err(format!(
                    "{name:?}: an exclusive holder beside another holder"
                ));
            }
            let used: u64 = queue.holders.iter().map(|(_, h)| u64::from(h.take)).sum();
            if used != queue.used {
                return Err(format!(
                    "{name:?}: {used} permits held, {} counted",
                    queue.used
                ));
            }
            match queue.permits {
                Some(permits) => {
                    if used > u64::from(permits) {
                        return Err(format!("{name:?}: {used} of {permits} permits held"));
                    }
                    let entries = queue.holders.iter().map(|(_, h)| (h.mode, h.take));
                    let asked = queue.waiters.iter().map(|(_, w)| (w.mode, w.take));
                    if entries
                        .chain(asked)
                        .any(|(mode, take)| mode != Mode::Shared || take == 0 || take > permits)
                    {
                        return Err(format!("{name:?}: a semaphore entry out of shape"));
                    }
                }
                None => {
                    let entries = queue.holders.iter().map(|(_, h)| h.take);
                    if entries
                        .chain(queue.waiters.iter().map(|(_, w)| w.take))
                        .any(|t| t != 1)
                    {
                        return Err(format!("{name:?}: a mutex entry takes permits"));
                    }
                }
            }
            let head = queue.unblocked_head();
            if head != queue.head {
                return Err(format!("{name:?}: the head on file is not the head"));
            }
            if head.is_some_and(|(_, client)| clients.departed.contains(&client)) {
                return Err(format!(
                    "{name:?}: a departed connection's wait heads, and no exclusive holder"
                ));
            }
            let first_live = queue
                .waiters
                .iter()
                .find(|(_, w)| !clients.departed.contains(&w.client));
            if let Some((seq, w)) = first_live {
                let reserved = self.books.reserved.contains_key(&**name);
                if self.books.grants_from.is_none()
                    && !reserved
                    && !self.tokens_exhausted()
                    && queue.admits(w.mode, w.take)
                    && (w.tag.is_some() || self.group_ready(seq))
                {
                    return Err(format!("{name:?}: head waiter could be granted but waits"));
                }
            }
            let mut seen = BTreeSet::new();
            for (token, h) in queue.holders.iter() {
                if token != h.token || token >= self.books.next_token {
                    return Err(format!("{name:?}: holder token {} out of place", h.token));
                }
                if !seen.insert(h.client) {
                    return Err(format!("{name:?}: client {} appears twice", h.client));
                }
                let filed = clients
                    .holdings
                    .get(&h.client)
                    .and_then(|s| s.held.get(name));
                if filed != Some(&(token, h.mode)) {
                    return Err(format!("{name:?}: holder {} not in its holdings", h.client));
                }
                held += 1;
            }
            for (seq, w) in queue.waiters.iter() {
                if let Some(at) = w.deadline {
                    timed += 1;
                    if self.books.deadlines.get(&(at, seq)) != Some(name) {
                        return Err(format!("{name:?}: a deadline is not tracked"));
                    }
                }
                if w.tag.is_none() && !clients.departed.contains(&w.client) {
                    let part = self.groups.get(&seq).and_then(|g| {
                        let index = g.locks.iter().position(|(n, _)| n == name)?;
                        Some((g.client, g.locks[index].1, index))
                    });
                    if part != Some((w.client, w.mode, part.map_or(0, |p| p.2))) {
                        return Err(format!("{name:?}: a multi-lock's wait is not in its group"));
                    }
                    let first = part.is_some_and(|p| p.2 == 0);
                    if !first && w.deadline.is_some() {
                        return Err(format!(
                            "{name:?}: a multi-lock deadline off its first lock"
                        ));
                    }
                }
                if clients.departed.contains(&w.client) {
                    if !listed_dead.contains(&(w.client, &**name, seq)) {
                        return Err(format!("{name:?}: a dead wait is not listed to clear"));
                    }
                    dead += 1;
                    continue;
                }
                if !seen.insert(w.client) {
                    return Err(format!("{name:?}: client {} appears twice", w.client));
                }
                let Some(holdings) = clients.holdings.get(&w.client) else {
                    return Err(format!("{name:?}: waiter {} has no holdings", w.client));
                };
                if holdings.waits.get(name) != Some(&seq) {
                    return Err(format!("{name:?}: waiter {} not in its holdings", w.client));
                }
                if holdings.heads.contains(name) != (head.map(|(s, _)| s) == Some(seq)) {
                    return Err(format!("{name:?}: waiter {} misfiled as head", w.client));
                }
                waiting += 1;
            }
        }
        for (client, holdings) in &clients.holdings {
            if clients.departed.contains(client) {
                return Err(format!("departed client {client} has holdings"));
            }
            if holdings.len() > self.max_per_client {
                return Err(format!("client {client} is over the per-connection limit"));
            }
            for (name, &(token, _)) in &holdings.held {
                let present = self
                    .queues
                    .get(name)
                    .and_then(|q| q.holders.get(token))
                    .is_some_and(|h| h.client == *client);
                if !present {
                    return Err(format!("client {client} filed as holding {name:?}"));
                }
            }
            for (name, &seq) in &holdings.waits {
                let present = self
                    .queues
                    .get(name)
                    .and_then(|q| q.waiters.get(seq))
                    .is_some_and(|w| w.client == *client);
                if !present {
                    return Err(format!("client {client} filed as waiting for {name:?}"));
                }
            }
            let behind = holdings
                .waits
                .iter()
                .filter(|(name, seq)| {
                    self.queues
                        .get(*name)
                        .and_then(|q| q.waiters.back())
                        .is_some_and(|(last, _)| last != **seq)
                })
                .count();
            let requests: FxHashSet<u64> = holdings.waits.values().copied().collect();
            if requests.len() != holdings.requests {
                return Err(format!(
                    "client {client} has {} requests waiting, {} counted",
                    requests.len(),
                    holdings.requests
                ));
            }
            if behind != holdings.behind {
                return Err(format!(
                    "client {client} has {behind} waits with one behind, {} counted",
                    holdings.behind
                ));
            }
            if let Some(name) = holdings
                .heads
                .iter()
                .find(|n| !holdings.waits.contains_key(*n))
            {
                return Err(format!("client {client} filed as heading {name:?}"));
            }
        }
        for (seq, group) in &self.groups {
            if clients.departed.contains(&group.client) {
                return Err(format!("multi-lock {seq} of a departed client is kept"));
            }
            for (name, _) in &group.locks {
                let queued = self
                    .queues
                    .get(name)
                    .and_then(|q| q.waiters.get(*seq))
                    .is_some_and(|w| w.client == group.client && w.tag.is_none());
                if !queued {
                    return Err(format!("multi-lock {seq} is not queued for {name:?}"));
                }
            }
        }
        let listed: FxHashSet<ClientId> = clients.to_clear.iter().map(|(c, _)| *c).collect();
        if listed != clients.departed || listed.len() != clients.to_clear.len() {
            return Err("departed clients and the clearing list disagree".to_string());
        }
        if clients.to_clear.is_empty() != clients.clear_due.is_none() {
            return Err("clearing due, or not, wrongly".to_string());
        }
        if dead != clients.dead_waits {
            return Err(format!(
                "{} dead waits counted, {dead} in queues",
                clients.dead_waits
            ));
        }
        if timed != self.books.deadlines.len() {
            return Err("a tracked deadline has no waiter".to_string());
        }
        let totals = self.books.totals;
        if totals.held != held || totals.waiting != waiting {
            return Err(format!(
                "totals say {} held and {} waiting, queues {held} and {waiting}",
                totals.held, totals.waiting
            ));
        }
        if self.entries() > self.max_entries {
            return Err(format!(
                "{} entries, over the limit of {}",
                self.entries(),
                self.max_entries
            ));
        }
        Ok(())
    }

    /// Checks the connections left with one request waiting (several had
    /// been, taken as able to go on): a request whose wait now closes a cycle
    /// is answered [`Effect::Deadlock`] and leaves its queues.
    fn recheck_deadlocks(&mut self, now: Instant, out: &mut Vec<Effect<T>>) {
        while !self.clients.recheck.is_empty() {
            let due = std::mem::take(&mut self.clients.recheck);
            if !self.detect_deadlocks {
                continue;
            }
            for client in due {
                let Some(holdings) = self.clients.holdings.get(&client) else {
                    continue;
                };
                let Some((name, &seq)) = holdings.waits.iter().next() else {
                    continue;
                };
                if holdings.requests != 1 {
                    continue;
                }
                let name = Arc::clone(name);
                let Some(cycle) = self.check_wait(client, &[]) else {
                    continue;
                };
                if let Some(holdings) = self.clients.holdings.get_mut(&client) {
                    holdings.requests = 0;
                }
                // A multi-lock leaves all its queues, settled in its order.
                let (tag, names) = if self.groups.contains_key(&seq) {
                    match self.withdraw_group(seq, "") {
                        Some(group) => group,
                        None => continue,
                    }
                } else {
                    let Some(waiter) = self
                        .queues
                        .get_mut(&name)
                        .and_then(|queue| take_wait(queue, seq, &mut self.clients))
                    else {
                        continue;
                    };
                    self.books.totals.waiting -= 1;
                    self.books.forget_deadline(seq, &waiter);
                    if let Some(holdings) = self.clients.holdings.get_mut(&client) {
                        holdings.waits.remove(&name);
                        holdings.heads.remove(&name);
                    }
                    let Some(tag) = waiter.tag else {
                        continue;
                    };
                    (tag, vec![name])
                };
                out.push(Effect::Deadlock { client, tag, cycle });
                for name in names {
                    self.settle_name(&name, now, out);
                }
            }
        }
    }

    /// The cycle that `client` waiting for `new` would close, if any; counts
    /// what the check found.
    fn check_wait(
        &mut self,
        client: ClientId,
        new: &[(&str, Mode, u32)],
    ) -> Option<Vec<(ClientId, Arc<str>)>> {
        match self.find_deadlock(client, new) {
            deadlock::Found::Clear => None,
            deadlock::Found::TooBig => {
                self.books.totals.deadlock_checks_cut += 1;
                None
            }
            deadlock::Found::Cycle(cycle) => {
                self.books.totals.deadlocks += 1;
                Some(cycle)
            }
        }
    }

    /// Whether the waiting multi-lock `seq` heads each of its queues, and
    /// each admits it.
    fn group_ready(&self, seq: u64) -> bool {
        self.groups.get(&seq).is_some_and(|group| {
            group.locks.iter().all(|(name, mode)| {
                self.queues.get(name).is_some_and(|queue| {
                    queue.waiters.front().is_some_and(|(first, _)| first == seq)
                        && queue.admits(*mode, 1)
                })
            })
        })
    }

    /// Whether `count` more requests fit, clearing dead waits to make room
    /// if need be (so only live requests ever count against the limit).
    fn make_room(&mut self, count: usize) -> bool {
        let fits = |table: &Self| table.entries().saturating_add(count) <= table.max_entries;
        // Each listed wait is taken once, so this loop's work over all calls
        // is at most what departures listed.
        while !fits(self) && self.clients.dead_waits > 0 && !self.clients.to_clear.is_empty() {
            self.clear_departed(1);
        }
        fits(self)
    }

    /// Clears up to `budget` waits that departed connections left.
    fn clear_departed(&mut self, mut budget: usize) {
        while budget > 0 {
            let Some((client, waits)) = self.clients.to_clear.front_mut() else {
                break;
            };
            let Some((name, seq)) = waits.pop() else {
                let client = *client;
                self.clients.departed.remove(&client);
                self.clients.to_clear.pop_front();
                continue;
            };
            budget -= 1;
            self.clear_dead_wait(&name, seq);
        }
        if self.clients.to_clear.is_empty() {
            self.clients.clear_due = None;
        }
        self.give_back_memory();
    }

    /// Clears at once every wait `client` left when it departed.
    fn clear_departed_now(&mut self, client: ClientId) {
        let Some(index) = self.clients.to_clear.iter().position(|(c, _)| *c == client) else {
            return;
        };
        if let Some((_, waits)) = self.clients.to_clear.remove(index) {
            for (name, seq) in waits {
                self.clear_dead_wait(&name, seq);
            }
        }
        self.clients.departed.remove(&client);
        if self.clients.to_clear.is_empty() {
            self.clients.clear_due = None;
        }
    }

    /// Takes a departed connection's wait out of its queue, if it is still
    /// there. At the head it could only be behind an exclusive holder, so
    /// nobody else moves.
    fn clear_dead_wait(&mut self, name: &str, seq: u64) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        if let Some(waiter) = take_wait(queue, seq, &mut self.clients) {
            self.clients.dead_waits -= 1;
            self.books.forget_deadline(seq, &waiter);
        }
    }

    /// Hash tables and deques keep their largest size; once three quarters
    /// of one is unused, halve what it keeps, so that memory taken in a burst
    /// goes back. Each shrink costs a pass over what is left, paid for by the
    /// removals that made room; these are per connection, so small. (The
    /// B-trees and lanes give memory back by themselves, and a connection's
    /// own maps in [`Holdings::give_back_memory`].)
    fn give_back_memory(&mut self) {
        fn roomy(capacity: usize, len: usize) -> bool {
            capacity > 1024 && capacity > 4 * len
        }
        let clients = &mut self.clients;
        if roomy(clients.holdings.capacity(), clients.holdings.len()) {
            clients.holdings.shrink_to(2 * clients.holdings.len());
        }
        if roomy(clients.to_clear.capacity(), clients.to_clear.len()) {
            clients.to_clear.shrink_to(2 * clients.to_clear.len());
        }
        if roomy(clients.departed.capacity(), clients.departed.len()) {
            clients.departed.shrink_to(2 * clients.departed.len());
        }
    }
}

/// A read-only look at one lock, for `status`.
pub struct LockView<'a, T> {
    name: &'a Arc<str>,
    queue: &'a Queue<T>,
    departed: &'a FxHashSet<ClientId>,
}

impl<'a, T> LockView<'a, T> {
    /// The lock's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// For a semaphore, its permits; `None` for a mutex.
    pub fn permits(&self) -> Option<u32> {
        self.queue.permits
    }

    /// Current holders, in grant order.
    pub fn holders(&self) -> impl Iterator<Item = &'a Holder> + 'a {
        self.queue.holders.iter().map(|(_, holder)| holder)
    }

    /// Queued requests, head first (departed connections' left out).
    pub fn waiters(&self) -> impl Iterator<Item = &'a Waiter<T>> + 'a {
        let departed = self.departed;
        self.queue
            .waiters
            .iter()
            .map(|(_, waiter)| waiter)
            .filter(move |waiter| !departed.contains(&waiter.client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod primitives;

    const A: ClientId = ClientId(1);
    const B: ClientId = ClientId(2);
    const C: ClientId = ClientId(3);
    const D: ClientId = ClientId(4);

    struct Fixture {
        table: LockTable<u32>,
        now: Instant,
        out: Vec<Effect<u32>>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                table: LockTable::new(100, 10, 1000),
                now: Instant::now(),
                out: Vec::new(),
            }
        }

        fn lock(
            &mut self,
            client: ClientId,
            name: &str,
            mode: Mode,
            timeout: Option<u64>,
            tag: u32,
        ) -> Vec<Effect<u32>> {
            let request = LockRequest {
                client,
                lock: name,
                mode,
                semaphore: None,
                timeout: timeout.map(Duration::from_millis),
                tag,
            };
            self.table.lock(request, self.now, &mut self.out);
            self.check()
        }

        fn reclaim(
            &mut self,
            client: ClientId,
            name: &str,
            mode: Mode,
            token: u64,
            tag: u32,
        ) -> Vec<Effect<u32>> {
            let request = Reclaim {
                client,
                lock: name,
                mode,
                semaphore: None,
                token,
                tag,
            };
            self.table.reclaim(request, self.now, &mut self.out);
            self.check()
        }

        fn unlock(&mut self, client: ClientId, name: &str) -> (Unlocked, Vec<Effect<u32>>) {
            let result = self.table.unlock(client, name, self.now, &mut self.out);
            (result, self.check())
        }

        fn disconnect(&mut self, client: ClientId) -> (Departure, Vec<Effect<u32>>) {
            let departure = self.table.disconnect(client, self.now, &mut self.out);
            (departure, self.check())
        }

        fn advance(&mut self, ms: u64) -> Vec<Effect<u32>> {
            self.now += Duration::from_millis(ms);
            self.table.expire(self.now, &mut self.out);
            self.check()
        }

        fn check(&mut self) -> Vec<Effect<u32>> {
            self.table.check_invariants().unwrap();
            std::mem::take(&mut self.out)
        }
    }

    fn granted(client: ClientId, tag: u32, lock: &str, token: u64) -> Effect<u32> {
        granted_in(Mode::Exclusive, client, tag, lock, token)
    }

    fn granted_in(mode: Mode, client: ClientId, tag: u32, lock: &str, token: u64) -> Effect<u32> {
        Effect::Granted {
            client,
            tag,
            lock: Arc::from(lock),
            mode,
            token,
        }
    }

    #[test]
    fn free_lock_is_granted_at_once_with_the_first_token() {
        let mut f = Fixture::new();
        assert_eq!(
            f.lock(A, "x", Mode::Exclusive, None, 7),
            vec![granted(A, 7, "x", 100)]
        );
        assert_eq!(f.table.next_token(), 101);
    }

    #[test]
    fn reclaims_go_ahead_of_waiters_keep_their_tokens_and_exclude_nobody() {
        let mut f = Fixture::new();
        f.table
            .hold_grants_until(f.now + Duration::from_millis(100));
        assert!(f.lock(B, "x", Mode::Exclusive, None, 1).is_empty());
        assert_eq!(
            f.reclaim(A, "x", Mode::Exclusive, 5, 2),
            vec![granted(A, 2, "x", 5)],
            "ahead of the waiter, with its own token"
        );
        assert_eq!(
            f.reclaim(C, "x", Mode::Shared, 7, 3),
            vec![Effect::Refused {
                client: C,
                tag: 3,
                reason: Refusal::ReclaimConflict {
                    holder: A,
                    mode: Mode::Exclusive,
                    token: 5
                }
            }],
            "the later of two conflicting reclaims is refused"
        );
        // Shared grants come back in any order and still sit by token.
        assert_eq!(
            f.reclaim(C, "s", Mode::Shared, 9, 4),
            vec![granted_in(Mode::Shared, C, 4, "s", 9)]
        );
        assert_eq!(
            f.reclaim(D, "s", Mode::Shared, 3, 5),
            vec![granted_in(Mode::Shared, D, 5, "s", 3)]
        );
        let tokens: Vec<u64> = f
            .table
            .get("s")
            .unwrap()
            .holders()
            .map(|h| h.token)
            .collect();
        assert_eq!(tokens, [3, 9]);
        assert!(
            matches!(
                f.reclaim(D, "y", Mode::Exclusive, 100, 6).as_slice(),
                [Effect::Refused { .. }]
            ),
            "a token of this table is no reclaim"
        );
        assert_eq!(f.table.totals().reclaims, 3);
        assert_eq!(f.table.totals().grants, 0, "a reclaim is not a new grant");
        assert!(
            f.advance(100).is_empty(),
            "the waiter stays behind the holder"
        );
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 1, "x", 100)]);
    }

    #[test]
    fn a_reserved_lock_goes_to_no_one_else_until_reclaimed_or_its_time_is_up() {
        let mut f = Fixture::new();
        let until = f.now + Duration::from_millis(100);
        f.table.reserve_until(["x", "x", "y"], until);
        assert_eq!(f.table.next_deadline(), Some(until));
        assert_eq!(
            f.lock(B, "z", Mode::Exclusive, None, 1),
            vec![granted(B, 1, "z", 100)],
            "a lock nobody held at the stop is granted at once"
        );
        assert!(f.lock(B, "x", Mode::Shared, None, 2).is_empty());
        assert_eq!(
            f.lock(C, "y", Mode::Exclusive, Some(0), 3),
            vec![Effect::TimedOut { client: C, tag: 3 }]
        );
        assert!(f.lock(C, "y", Mode::Exclusive, None, 4).is_empty());
        assert_eq!(
            f.reclaim(A, "x", Mode::Shared, 5, 5),
            vec![granted_in(Mode::Shared, A, 5, "x", 5)],
            "one of the two shared grants of x: x stays reserved"
        );
        assert_eq!(
            f.reclaim(D, "x", Mode::Shared, 6, 6),
            vec![
                granted_in(Mode::Shared, D, 6, "x", 6),
                granted_in(Mode::Shared, B, 2, "x", 101)
            ],
            "both reclaimed: the shared waiter joins them"
        );
        assert_eq!(f.table.reserved(), 1);
        assert_eq!(
            f.advance(100),
            vec![granted(C, 4, "y", 102)],
            "y was never reclaimed: free once its time is up"
        );
        assert_eq!(f.table.reserved(), 0);
        assert_eq!(f.table.next_deadline(), None);
    }

    #[test]
    fn held_lock_queues_and_unlock_hands_it_over_in_fifo_order() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        assert!(f.lock(B, "x", Mode::Exclusive, None, 2).is_empty());
        assert!(f.lock(C, "x", Mode::Exclusive, None, 3).is_empty());
        let (result, effects) = f.unlock(A, "x");
        assert_eq!(result, Unlocked::Released);
        assert_eq!(effects, vec![granted(B, 2, "x", 101)]);
        let (_, effects) = f.unlock(B, "x");
        assert_eq!(effects, vec![granted(C, 3, "x", 102)]);
    }

    #[test]
    fn asking_again_in_the_same_mode_returns_the_same_token() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Shared, None, 1);
        assert_eq!(
            f.lock(A, "x", Mode::Shared, None, 2),
            vec![granted_in(Mode::Shared, A, 2, "x", 100)]
        );
        assert_eq!(f.table.totals().grants, 1);
        assert_eq!(
            f.lock(A, "x", Mode::Exclusive, None, 3),
            vec![Effect::Refused {
                client: A,
                tag: 3,
                reason: Refusal::HeldInOtherMode(Mode::Shared)
            }]
        );
    }

    #[test]
    fn second_wait_on_the_same_lock_is_refused_and_the_first_stays() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        assert_eq!(
            f.lock(B, "x", Mode::Exclusive, None, 3),
            vec![Effect::Refused {
                client: B,
                tag: 3,
                reason: Refusal::AlreadyWaiting
            }]
        );
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 2, "x", 101)]);
    }

    #[test]
    fn unlock_by_a_waiter_cancels_its_wait() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, Some(5000), 2);
        let (result, effects) = f.unlock(B, "x");
        assert_eq!(result, Unlocked::Withdrawn);
        assert_eq!(effects, vec![Effect::Cancelled { client: B, tag: 2 }]);
        assert!(
            f.advance(6000).is_empty(),
            "a cancelled wait must not time out later"
        );
    }

    #[test]
    fn unlock_of_something_not_held_is_not_found() {
        let mut f = Fixture::new();
        assert_eq!(f.unlock(A, "x").0, Unlocked::NotFound);
        f.lock(B, "x", Mode::Exclusive, None, 1);
        assert_eq!(f.unlock(A, "x").0, Unlocked::NotFound);
        assert_eq!(f.table.get("x").map(|v| v.holders().count()), Some(1));
    }

    #[test]
    fn try_once_fails_at_once_and_leaves_no_trace() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        assert_eq!(
            f.lock(B, "x", Mode::Exclusive, Some(0), 2),
            vec![Effect::TimedOut { client: B, tag: 2 }]
        );
        assert_eq!(f.table.entries_of(B), 0);
        assert_eq!(f.table.totals().timeouts, 1);
        assert_eq!(
            f.lock(C, "y", Mode::Exclusive, Some(0), 3),
            vec![granted(C, 3, "y", 101)]
        );
    }

    #[test]
    fn wait_times_out_at_its_deadline_and_not_before() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, Some(100), 2);
        assert_eq!(
            f.table.next_deadline(),
            Some(f.now + Duration::from_millis(100))
        );
        assert!(f.advance(99).is_empty());
        assert_eq!(f.advance(1), vec![Effect::TimedOut { client: B, tag: 2 }]);
        assert_eq!(f.table.next_deadline(), None);
        assert_eq!(f.table.get("x").map(|v| v.waiters().count()), Some(0));
    }

    #[test]
    fn timeout_of_a_head_exclusive_lets_shared_waiters_behind_it_in() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Shared, None, 1);
        f.lock(B, "x", Mode::Exclusive, Some(100), 2);
        f.lock(C, "x", Mode::Shared, None, 3);
        assert_eq!(
            f.advance(100),
            vec![
                Effect::TimedOut { client: B, tag: 2 },
                granted_in(Mode::Shared, C, 3, "x", 101)
            ]
        );
    }

    #[test]
    fn huge_timeout_waits_for_ever_instead_of_overflowing() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, Some(u64::MAX), 2);
        assert_eq!(f.advance(1_000_000), vec![]);
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 2, "x", 101)]);
    }

    #[test]
    fn shared_heads_are_granted_together() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Shared, None, 2);
        f.lock(C, "x", Mode::Shared, None, 3);
        f.lock(D, "x", Mode::Exclusive, None, 4);
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(
            effects,
            vec![
                granted_in(Mode::Shared, B, 2, "x", 101),
                granted_in(Mode::Shared, C, 3, "x", 102)
            ]
        );
        let (_, effects) = f.unlock(B, "x");
        assert!(
            effects.is_empty(),
            "exclusive waits for every shared holder"
        );
        let (_, effects) = f.unlock(C, "x");
        assert_eq!(effects, vec![granted(D, 4, "x", 103)]);
    }

    #[test]
    fn shared_request_behind_a_waiting_exclusive_waits() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Shared, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        assert!(
            f.lock(C, "x", Mode::Shared, None, 3).is_empty(),
            "writer must not starve"
        );
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 2, "x", 101)]);
        let (_, effects) = f.unlock(B, "x");
        assert_eq!(effects, vec![granted_in(Mode::Shared, C, 3, "x", 102)]);
    }

    #[test]
    fn disconnect_releases_holds_drops_waits_and_grants_the_next() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(A, "y", Mode::Exclusive, None, 2);
        f.lock(B, "x", Mode::Exclusive, None, 3);
        f.lock(C, "z", Mode::Exclusive, None, 4);
        f.lock(A, "z", Mode::Exclusive, Some(1000), 5);
        let (departure, effects) = f.disconnect(A);
        assert_eq!(
            departure.released,
            vec![Arc::<str>::from("x"), Arc::from("y")]
        );
        assert_eq!(departure.withdrawn, 1);
        assert_eq!(effects, vec![granted(B, 3, "x", 103)]);
        assert!(f.table.get("y").is_none(), "empty queue must be freed");
        assert_eq!(f.table.totals().released_by_disconnect, 2);
        assert!(f.advance(2000).is_empty());
    }

    #[test]
    fn waiter_disconnect_leaves_the_queue_clean() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        f.lock(C, "x", Mode::Exclusive, None, 3);
        let (_, effects) = f.disconnect(B);
        assert!(effects.is_empty());
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(C, 3, "x", 101)]);
    }

    #[test]
    fn per_connection_limit_counts_holds_and_waits() {
        let mut f = Fixture::new();
        f.table = LockTable::new(1, 2, 1000);
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "y", Mode::Exclusive, None, 2);
        f.lock(A, "y", Mode::Exclusive, None, 3);
        assert_eq!(
            f.lock(A, "z", Mode::Exclusive, None, 4),
            vec![Effect::Refused {
                client: A,
                tag: 4,
                reason: Refusal::TooMany { limit: 2 }
            }]
        );
        f.unlock(A, "x");
        assert_eq!(
            f.lock(A, "z", Mode::Exclusive, None, 5),
            vec![granted(A, 5, "z", 3)]
        );
    }

    #[test]
    fn cancelled_waits_leave_no_deadlines_behind() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 0);
        for i in 0..1000 {
            f.lock(B, "x", Mode::Exclusive, Some(60_000), i);
            f.unlock(B, "x");
        }
        assert!(f.table.books.deadlines.is_empty());
        assert_eq!(f.table.next_deadline(), None);
    }

    #[test]
    fn held_back_grants_queue_time_out_and_are_served_in_order_when_the_hold_ends() {
        let mut f = Fixture::new();
        let until = f.now + Duration::from_millis(100);
        f.table.hold_grants_until(until);
        assert_eq!(f.table.next_deadline(), Some(until));
        assert!(f.lock(A, "x", Mode::Exclusive, None, 1).is_empty());
        assert!(f.lock(B, "x", Mode::Exclusive, None, 2).is_empty());
        assert!(f.lock(C, "w", Mode::Shared, None, 3).is_empty());
        assert!(f.lock(D, "w", Mode::Shared, Some(50), 4).is_empty());
        assert_eq!(
            f.lock(D, "y", Mode::Exclusive, Some(0), 5),
            vec![Effect::TimedOut { client: D, tag: 5 }],
            "nothing can be had at once while grants are held"
        );
        assert_eq!(f.advance(50), vec![Effect::TimedOut { client: D, tag: 4 }]);
        assert!(f.table.holding_grants(f.now));
        assert_eq!(
            f.advance(50),
            vec![
                granted_in(Mode::Shared, C, 3, "w", 100),
                granted(A, 1, "x", 101)
            ]
        );
        assert!(!f.table.holding_grants(f.now));
        assert_eq!(f.table.next_deadline(), None);
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 2, "x", 102)]);
    }

    #[test]
    fn iter_from_walks_names_in_order() {
        let mut f = Fixture::new();
        for (i, name) in ["b", "a/2", "a/1", "c"].into_iter().enumerate() {
            f.lock(A, name, Mode::Exclusive, None, i as u32);
        }
        let names: Vec<_> = f
            .table
            .iter_from("a/")
            .map(|v| v.name().to_string())
            .collect();
        assert_eq!(names, ["a/1", "a/2", "b", "c"]);
        let after: Vec<_> = f
            .table
            .iter_after(Some("a/2"))
            .map(|v| v.name().to_string())
            .collect();
        assert_eq!(after, ["b", "c"]);
    }

    #[test]
    fn departed_waits_behind_others_are_counted_out_at_once_and_cleared_later() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        f.lock(C, "x", Mode::Exclusive, Some(1000), 3);
        f.lock(C, "y", Mode::Exclusive, None, 4);
        let (departure, effects) = f.disconnect(C);
        assert_eq!((departure.withdrawn, effects), (1, vec![]));
        assert_eq!(departure.released, vec![Arc::<str>::from("y")]);
        assert_eq!(f.table.totals().waiting, 1);
        let waiters: Vec<ClientId> = f
            .table
            .get("x")
            .unwrap()
            .waiters()
            .map(|w| w.client)
            .collect();
        assert_eq!(
            waiters,
            [B],
            "a departed connection's wait is shown to nobody"
        );
        // Still in memory, so still counted against the table's limit, and
        // clearing it is due at once.
        assert_eq!(f.table.entries(), 3);
        assert_eq!(f.table.next_deadline(), Some(f.now));
        assert!(f.advance(0).is_empty());
        assert_eq!(f.table.entries(), 2);
        assert_eq!(f.table.next_deadline(), None, "its deadline went with it");
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 2, "x", 102)]);
    }

    #[test]
    fn a_departed_wait_reaching_the_head_is_passed_over() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        f.lock(C, "x", Mode::Exclusive, None, 3);
        f.lock(D, "x", Mode::Exclusive, None, 4);
        f.disconnect(C);
        let (_, effects) = f.unlock(A, "x");
        assert_eq!(effects, vec![granted(B, 2, "x", 101)]);
        let (_, effects) = f.unlock(B, "x");
        assert_eq!(effects, vec![granted(D, 4, "x", 102)]);
        f.unlock(D, "x");
        assert!(f.table.get("x").is_none(), "empty queue must be freed");
        assert_eq!(f.table.entries(), 0);
    }

    #[test]
    fn a_departing_head_waiter_lets_the_shared_waiters_behind_it_in_at_once() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Shared, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        f.lock(C, "x", Mode::Shared, None, 3);
        f.lock(D, "x", Mode::Shared, None, 4);
        let (departure, effects) = f.disconnect(B);
        assert_eq!(departure.withdrawn, 1);
        assert_eq!(
            effects,
            vec![
                granted_in(Mode::Shared, C, 3, "x", 101),
                granted_in(Mode::Shared, D, 4, "x", 102)
            ]
        );
    }

    #[test]
    fn the_table_limit_counts_every_connection_and_departed_waits_make_room() {
        let mut f = Fixture::new();
        f.table = LockTable::new(1, 10, 3);
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(B, "x", Mode::Exclusive, None, 2);
        f.lock(C, "x", Mode::Exclusive, None, 3);
        let full = Effect::Refused {
            client: D,
            tag: 4,
            reason: Refusal::TableFull { limit: 3 },
        };
        assert_eq!(f.lock(D, "y", Mode::Exclusive, None, 4), vec![full]);
        assert_eq!(
            f.lock(A, "x", Mode::Exclusive, None, 5),
            vec![granted(A, 5, "x", 1)],
            "asking again for a held lock takes no room"
        );
        // C's wait is dead but not cleared yet; a new request clears it.
        f.disconnect(C);
        assert_eq!(f.table.entries(), 3);
        assert_eq!(
            f.lock(D, "y", Mode::Exclusive, None, 6),
            vec![granted(D, 6, "y", 2)]
        );
        assert_eq!(f.table.entries(), 3);
    }

    #[test]
    fn expire_answers_a_bounded_batch_and_asks_to_be_called_again() {
        let mut f = Fixture::new();
        let waits = WAITS_PER_EXPIRE as u64 + 10;
        f.table = LockTable::new(1, 10, usize::MAX);
        f.lock(A, "x", Mode::Exclusive, None, 0);
        for i in 0..waits {
            f.lock(ClientId(100 + i), "x", Mode::Exclusive, Some(100), 1);
        }
        assert_eq!(f.advance(100).len(), WAITS_PER_EXPIRE);
        assert_eq!(f.table.next_deadline(), Some(f.now), "the rest are due");
        assert_eq!(f.advance(0).len(), 10);
        assert_eq!(f.table.next_deadline(), None);
        assert_eq!(f.table.totals().timeouts, waits);
    }

    /// A thousand connections each waiting on the same thousand locks all
    /// leave, then the same waits all time out: what the event loop would
    /// spend on it in one turn (every departure, and one `expire` call) is
    /// timed, and the longest `expire` call. A table that walks a queue per
    /// departed wait spends seconds on this in a release build (minutes in a
    /// debug one); this one spends milliseconds. The bound is wide enough
    /// for a debug build on a loaded machine.
    #[test]
    fn a_thousand_by_a_thousand_waits_leave_or_time_out_in_short_steps() {
        const CLIENTS: u64 = 1000;
        const NAMES: usize = 1000;
        const BOUND: Duration = Duration::from_millis(250);
        let names: Vec<String> = (0..NAMES).map(|i| format!("wanted/{i}")).collect();
        let now = Instant::now();
        let mut out = Vec::new();
        for timeout in [None, Some(Duration::from_secs(1))] {
            let mut table: LockTable<u32> = LockTable::new(1, NAMES, usize::MAX);
            for client in 0..=CLIENTS {
                for (i, name) in names.iter().enumerate() {
                    let request = LockRequest {
                        client: ClientId(client),
                        lock: name,
                        mode: Mode::Exclusive,
                        semaphore: None,
                        timeout: timeout.filter(|_| client > 0),
                        tag: i as u32,
                    };
                    table.lock(request, now, &mut out);
                }
            }
            assert_eq!(table.totals().waiting, CLIENTS as usize * NAMES);
            out.clear();
            let started = Instant::now();
            let mut later = now;
            if timeout.is_none() {
                for client in 1..=CLIENTS {
                    table.disconnect(ClientId(client), now, &mut out);
                }
            } else {
                later += Duration::from_secs(1);
            }
            let mut longest_expire = Duration::ZERO;
            let mut first_turn = None;
            let mut calls = 0;
            while table.entries() > NAMES {
                let call = Instant::now();
                table.expire(later, &mut out);
                longest_expire = longest_expire.max(call.elapsed());
                first_turn.get_or_insert(started.elapsed());
                calls += 1;
                assert!(calls < 10 * CLIENTS * NAMES as u64 / WAITS_PER_EXPIRE as u64);
            }
            let first_turn = first_turn.unwrap_or_default();
            println!(
                "{CLIENTS} x {NAMES} waits {}: first loop turn {first_turn:?}, longest expire call {longest_expire:?}, {calls} calls, {:?} in all",
                if timeout.is_none() {
                    "departing"
                } else {
                    "timing out"
                },
                started.elapsed()
            );
            table.check_invariants().unwrap();
            assert_eq!(table.totals().waiting, 0);
            assert_eq!(table.totals().held, NAMES);
            assert!(first_turn < BOUND, "first loop turn {first_turn:?}");
            assert!(longest_expire < BOUND, "longest expire {longest_expire:?}");
        }
    }
}
