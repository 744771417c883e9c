//! The lock table: one FIFO queue of holders and waiters per lock name, with
//! exclusive and shared modes, wait deadlines and fencing tokens.
//! A pure state machine: no IO and no clock (callers pass `now`); every reply
//! it decides on comes back as an [`Effect`], in the order it must be sent.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Keys are small integers the server itself picks: no peer controls them,
// so a fast non-keyed hash is safe here.
use rustc_hash::FxHashMap;

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
        /// The fencing token of this grant.
        token: u64,
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

/// A request for a lock.
#[derive(Debug)]
pub struct LockRequest<'a, T> {
    /// Who asks.
    pub client: ClientId,
    /// The lock's name.
    pub lock: &'a str,
    /// Exclusive or shared.
    pub mode: Mode,
    /// `None` waits for ever, zero tries once, anything else waits at most that long.
    pub timeout: Option<Duration>,
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
    /// When the request arrived.
    pub since: Instant,
    deadline: Option<Instant>,
    wait_id: u64,
    tag: T,
}

#[derive(Debug)]
struct Queue<T> {
    /// One exclusive holder, or any number of shared ones.
    holders: Vec<Holder>,
    waiters: VecDeque<Waiter<T>>,
}

impl<T> Queue<T> {
    fn new() -> Self {
        Queue {
            holders: Vec::new(),
            waiters: VecDeque::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty()
    }

    /// Whether a request in `mode` may join the current holders.
    fn admits(&self, mode: Mode) -> bool {
        match self.holders.first() {
            None => true,
            Some(holder) => holder.mode == Mode::Shared && mode == Mode::Shared,
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
}

/// Everything a grant or a departure touches besides the queue itself.
#[derive(Debug)]
struct Books {
    next_token: u64,
    /// No grant before this instant (after a restart); `None` once passed.
    grants_from: Option<Instant>,
    /// Wait id -> lock name, for queued requests with a deadline.
    timed_waits: FxHashMap<u64, Arc<str>>,
    /// Deadlines, possibly stale (an entry whose wait id is no longer in
    /// `timed_waits` is skipped when it comes up).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    totals: Totals,
}

impl Books {
    fn holding_grants(&self, now: Instant) -> bool {
        self.grants_from.is_some_and(|from| now < from)
    }

    fn issue_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        token
    }

    /// Grants to the head of the queue for as long as the head may join the
    /// holders: shared heads are granted together, and a shared request behind
    /// a waiting exclusive one stays behind it.
    fn promote<T>(
        &mut self,
        queue: &mut Queue<T>,
        lock: &Arc<str>,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) {
        if self.holding_grants(now) {
            return;
        }
        while queue.waiters.front().is_some_and(|w| queue.admits(w.mode)) {
            let Some(waiter) = queue.waiters.pop_front() else {
                break;
            };
            if waiter.deadline.is_some() {
                self.timed_waits.remove(&waiter.wait_id);
            }
            let token = self.issue_token();
            queue.holders.push(Holder {
                client: waiter.client,
                mode: waiter.mode,
                token,
                since: now,
            });
            self.totals.waiting -= 1;
            self.totals.held += 1;
            self.totals.grants += 1;
            out.push(Effect::Granted {
                client: waiter.client,
                tag: waiter.tag,
                lock: Arc::clone(lock),
                token,
            });
        }
    }
}

/// The lock table. `T` tags each request so its reply can name it.
#[derive(Debug)]
pub struct LockTable<T> {
    queues: BTreeMap<Arc<str>, Queue<T>>,
    /// The names each connection holds or waits for.
    by_client: FxHashMap<ClientId, BTreeSet<Arc<str>>>,
    books: Books,
    next_wait_id: u64,
    max_per_client: usize,
}

impl<T> LockTable<T> {
    /// An empty table whose first grant gets `first_token`, and where a
    /// connection may hold or wait for at most `max_per_client` locks.
    pub fn new(first_token: u64, max_per_client: usize) -> Self {
        LockTable {
            queues: BTreeMap::new(),
            by_client: FxHashMap::default(),
            books: Books {
                next_token: first_token,
                grants_from: None,
                timed_waits: FxHashMap::default(),
                deadlines: BinaryHeap::new(),
                totals: Totals::default(),
            },
            next_wait_id: 0,
            max_per_client,
        }
    }

    /// Asks for a lock. Exactly one effect answers the request, now or later.
    pub fn lock(&mut self, request: LockRequest<'_, T>, now: Instant, out: &mut Vec<Effect<T>>) {
        let LockRequest {
            client,
            lock,
            mode,
            timeout,
            tag,
        } = request;
        if let Some((name, queue)) = self.queues.get_key_value(lock) {
            if let Some(holder) = queue.holders.iter().find(|h| h.client == client) {
                out.push(if holder.mode == mode {
                    Effect::Granted {
                        client,
                        tag,
                        lock: Arc::clone(name),
                        token: holder.token,
                    }
                } else {
                    Effect::Refused {
                        client,
                        tag,
                        reason: Refusal::HeldInOtherMode(holder.mode),
                    }
                });
                return;
            }
            if queue.waiters.iter().any(|w| w.client == client) {
                out.push(Effect::Refused {
                    client,
                    tag,
                    reason: Refusal::AlreadyWaiting,
                });
                return;
            }
        }
        let count = self.by_client.get(&client).map_or(0, BTreeSet::len);
        if count >= self.max_per_client {
            out.push(Effect::Refused {
                client,
                tag,
                reason: Refusal::TooMany {
                    limit: self.max_per_client,
                },
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
            .or_insert_with(Queue::new);
        self.by_client
            .entry(client)
            .or_default()
            .insert(Arc::clone(&name));
        if queue.waiters.is_empty() && queue.admits(mode) && !self.books.holding_grants(now) {
            // Nobody to wait behind: granted at once, without queueing.
            let token = self.books.issue_token();
            queue.holders.push(Holder {
                client,
                mode,
                token,
                since: now,
            });
            self.books.totals.held += 1;
            self.books.totals.grants += 1;
            out.push(Effect::Granted {
                client,
                tag,
                lock: name,
                token,
            });
            return;
        }

        let try_once = timeout.is_some_and(|t| t.is_zero());
        // A deadline too far to represent is no deadline.
        let deadline = timeout.and_then(|t| now.checked_add(t));
        let wait_id = self.next_wait_id;
        self.next_wait_id += 1;
        queue.waiters.push_back(Waiter {
            client,
            mode,
            since: now,
            deadline: None,
            wait_id,
            tag,
        });
        self.books.totals.waiting += 1;
        self.books.promote(queue, &name, now, out);

        let still_waiting = queue.waiters.back().is_some_and(|w| w.wait_id == wait_id);
        if !still_waiting {
            return;
        }
        if try_once {
            // Last in line, so leaving cannot unblock anyone behind it; the
            // queue may be empty now if grants are held back.
            if let Some(waiter) = queue.waiters.pop_back() {
                self.books.totals.waiting -= 1;
                self.books.totals.timeouts += 1;
                self.forget(client, &name);
                self.drop_if_empty(&name);
                out.push(Effect::TimedOut {
                    client,
                    tag: waiter.tag,
                });
            }
        } else if let Some(at) = deadline {
            if let Some(waiter) = queue.waiters.back_mut() {
                waiter.deadline = Some(at);
            }
            self.books.timed_waits.insert(wait_id, name);
            self.books.deadlines.push(Reverse((at, wait_id)));
        }
    }

    /// Takes `client` out of `lock`'s queue, whether it holds the lock or waits
    /// for it; a withdrawn wait is answered [`Effect::Cancelled`]. Waiters that
    /// may now have the lock are granted it.
    pub fn unlock(
        &mut self,
        client: ClientId,
        lock: &str,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) -> Unlocked {
        let Some(name) = self
            .queues
            .get_key_value(lock)
            .map(|(name, _)| Arc::clone(name))
        else {
            return Unlocked::NotFound;
        };
        let Some(queue) = self.queues.get_mut(lock) else {
            return Unlocked::NotFound;
        };
        let outcome = if let Some(pos) = queue.holders.iter().position(|h| h.client == client) {
            queue.holders.remove(pos);
            self.books.totals.held -= 1;
            Unlocked::Released
        } else if let Some(pos) = queue.waiters.iter().position(|w| w.client == client) {
            let Some(waiter) = queue.waiters.remove(pos) else {
                return Unlocked::NotFound;
            };
            self.books.totals.waiting -= 1;
            if waiter.deadline.is_some() {
                self.books.timed_waits.remove(&waiter.wait_id);
            }
            out.push(Effect::Cancelled {
                client,
                tag: waiter.tag,
            });
            Unlocked::Withdrawn
        } else {
            return Unlocked::NotFound;
        };
        self.books.promote(queue, &name, now, out);
        self.drop_if_empty(&name);
        self.forget(client, &name);
        outcome
    }

    /// Releases every lock `client` holds and drops every wait it has (no
    /// replies go to it), granting the next waiters in the same call.
    pub fn disconnect(
        &mut self,
        client: ClientId,
        now: Instant,
        out: &mut Vec<Effect<T>>,
    ) -> Departure {
        let mut departure = Departure::default();
        let Some(names) = self.by_client.remove(&client) else {
            return departure;
        };
        for name in names {
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            let held_before = queue.holders.len();
            queue.holders.retain(|h| h.client != client);
            let released = held_before - queue.holders.len();
            let waiting_before = queue.waiters.len();
            let books = &mut self.books;
            queue.waiters.retain(|w| {
                let keep = w.client != client;
                if !keep && w.deadline.is_some() {
                    books.timed_waits.remove(&w.wait_id);
                }
                keep
            });
            let withdrawn = waiting_before - queue.waiters.len();
            self.books.totals.held -= released;
            self.books.totals.waiting -= withdrawn;
            self.books.totals.released_by_disconnect += released as u64;
            departure.withdrawn += withdrawn;
            self.books.promote(queue, &name, now, out);
            if released > 0 {
                departure.released.push(Arc::clone(&name));
            }
            self.drop_if_empty(&name);
        }
        departure
    }

    /// Answers every wait whose deadline is at or before `now` with
    /// [`Effect::TimedOut`], granting whoever that unblocks.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Effect<T>>) {
        while let Some(&Reverse((at, wait_id))) = self.books.deadlines.peek() {
            if at > now {
                break;
            }
            self.books.deadlines.pop();
            let Some(name) = self.books.timed_waits.remove(&wait_id) else {
                continue;
            };
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            let Some(pos) = queue.waiters.iter().position(|w| w.wait_id == wait_id) else {
                continue;
            };
            let Some(waiter) = queue.waiters.remove(pos) else {
                continue;
            };
            self.books.totals.waiting -= 1;
            self.books.totals.timeouts += 1;
            out.push(Effect::TimedOut {
                client: waiter.client,
                tag: waiter.tag,
            });
            self.books.promote(queue, &name, now, out);
            self.drop_if_empty(&name);
            self.forget(waiter.client, &name);
        }
        if self.books.grants_from.is_some_and(|from| from <= now) {
            self.books.grants_from = None;
            for (name, queue) in self.queues.iter_mut() {
                self.books.promote(queue, name, now, out);
            }
        }
        self.compact_deadlines();
    }

    /// The earliest wait deadline, if any wait has one.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        let mut wait_deadline = None;
        while let Some(&Reverse((at, wait_id))) = self.books.deadlines.peek() {
            if self.books.timed_waits.contains_key(&wait_id) {
                wait_deadline = Some(at);
                break;
            }
            self.books.deadlines.pop();
        }
        wait_deadline
            .into_iter()
            .chain(self.books.grants_from)
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

    /// The token the next grant will carry.
    pub fn next_token(&self) -> u64 {
        self.books.next_token
    }

    /// Running totals.
    pub fn totals(&self) -> Totals {
        self.books.totals
    }

    /// Lock names with a holder or a waiter.
    pub fn lock_count(&self) -> usize {
        self.queues.len()
    }

    /// How many locks `client` holds or waits for.
    pub fn entries_of(&self, client: ClientId) -> usize {
        self.by_client.get(&client).map_or(0, BTreeSet::len)
    }

    /// The lock named `lock`, if anyone holds or waits for it.
    pub fn get(&self, lock: &str) -> Option<LockView<'_, T>> {
        self.queues
            .get_key_value(lock)
            .map(|(name, queue)| LockView { name, queue })
    }

    /// Locks in name order, starting at the first name `>= from`.
    pub fn iter_from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = LockView<'a, T>> + 'a {
        self.queues
            .range::<str, _>((Bound::Included(from), Bound::Unbounded))
            .map(|(name, queue)| LockView { name, queue })
    }

    /// Checks every structural promise of the table; `Err` names the first
    /// broken one. For tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held = 0;
        let mut waiting = 0;
        let mut timed = 0;
        for (name, queue) in &self.queues {
            if queue.is_empty() {
                return Err(format!("empty queue for {name:?} was kept"));
            }
            if queue.holders.len() > 1 && queue.holders.iter().any(|h| h.mode == Mode::Exclusive) {
                return Err(format!(
                    "{name:?}: an exclusive holder beside another holder"
                ));
            }
            if let Some(head) = queue
                .waiters
                .front()
                .filter(|_| self.books.grants_from.is_none())
            {
                if queue.admits(head.mode) {
                    return Err(format!("{name:?}: head waiter could be granted but waits"));
                }
            }
            let mut seen = BTreeSet::new();
            let clients = queue
                .holders
                .iter()
                .map(|h| h.client)
                .chain(queue.waiters.iter().map(|w| w.client));
            for client in clients {
                if !seen.insert(client) {
                    return Err(format!("{name:?}: client {client} appears twice"));
                }
                if !self
                    .by_client
                    .get(&client)
                    .is_some_and(|s| s.contains(name))
                {
                    return Err(format!("{name:?}: client {client} missing from its index"));
                }
            }
            if let Some(h) = queue
                .holders
                .iter()
                .find(|h| h.token >= self.books.next_token)
            {
                return Err(format!(
                    "{name:?}: token {} not below the next token",
                    h.token
                ));
            }
            for waiter in &queue.waiters {
                if waiter.deadline.is_some() {
                    timed += 1;
                    if self.books.timed_waits.get(&waiter.wait_id) != Some(name) {
                        return Err(format!("{name:?}: a deadline is not tracked"));
                    }
                }
            }
            held += queue.holders.len();
            waiting += queue.waiters.len();
        }
        for (client, names) in &self.by_client {
            if names.is_empty() {
                return Err(format!("client {client} kept with no locks"));
            }
            if names.len() > self.max_per_client {
                return Err(format!("client {client} is over the per-connection limit"));
            }
            for name in names {
                let present = self.queues.get(name).is_some_and(|q| {
                    q.holders.iter().any(|h| h.client == *client)
                        || q.waiters.iter().any(|w| w.client == *client)
                });
                if !present {
                    return Err(format!("client {client} indexed under {name:?} but absent"));
                }
            }
        }
        if timed != self.books.timed_waits.len() {
            return Err("a tracked deadline has no waiter".to_string());
        }
        let totals = self.books.totals;
        if totals.held != held || totals.waiting != waiting {
            return Err(format!(
                "totals say {} held and {} waiting, queues {held} and {waiting}",
                totals.held, totals.waiting
            ));
        }
        Ok(())
    }

    /// Removes `name` from `client`'s index after it left that queue.
    fn forget(&mut self, client: ClientId, name: &str) {
        if let Some(names) = self.by_client.get_mut(&client) {
            names.remove(name);
            if names.is_empty() {
                self.by_client.remove(&client);
            }
        }
    }

    fn drop_if_empty(&mut self, name: &str) {
        if self.queues.get(name).is_some_and(Queue::is_empty) {
            self.queues.remove(name);
        }
    }

    /// Stale deadline entries pile up when waits end early; rebuild the heap
    /// once they outnumber the live ones, so memory follows live waits.
    fn compact_deadlines(&mut self) {
        let books = &mut self.books;
        if books.deadlines.len() > 64 + 2 * books.timed_waits.len() {
            let live = &books.timed_waits;
            books
                .deadlines
                .retain(|Reverse((_, wait_id))| live.contains_key(wait_id));
        }
    }
}

/// A read-only look at one lock, for `status`.
pub struct LockView<'a, T> {
    name: &'a Arc<str>,
    queue: &'a Queue<T>,
}

impl<'a, T> LockView<'a, T> {
    /// The lock's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// Current holders, in grant order.
    pub fn holders(&self) -> &'a [Holder] {
        &self.queue.holders
    }

    /// Queued requests, head first.
    pub fn waiters(&self) -> impl Iterator<Item = &'a Waiter<T>> + 'a {
        self.queue.waiters.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                table: LockTable::new(100, 10),
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
                timeout: timeout.map(Duration::from_millis),
                tag,
            };
            self.table.lock(request, self.now, &mut self.out);
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
        Effect::Granted {
            client,
            tag,
            lock: Arc::from(lock),
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
            vec![granted(A, 2, "x", 100)]
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
        assert_eq!(f.table.get("x").map(|v| v.holders().len()), Some(1));
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
                granted(C, 3, "x", 101)
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
            vec![granted(B, 2, "x", 101), granted(C, 3, "x", 102)]
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
        assert_eq!(effects, vec![granted(C, 3, "x", 102)]);
    }

    #[test]
    fn disconnect_releases_holds_drops_waits_and_grants_the_next() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 1);
        f.lock(A, "y", Mode::Exclusive, None, 2);
        f.lock(B, "x", Mode::Exclusive, None, 3);
        f.lock(B, "z", Mode::Exclusive, None, 4);
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
        f.table = LockTable::new(1, 2);
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
    fn stale_deadlines_do_not_pile_up() {
        let mut f = Fixture::new();
        f.lock(A, "x", Mode::Exclusive, None, 0);
        for i in 0..1000 {
            f.lock(B, "x", Mode::Exclusive, Some(60_000), i);
            f.unlock(B, "x");
        }
        f.advance(1);
        assert!(f.table.books.deadlines.len() <= 64);
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
            vec![granted(C, 3, "w", 100), granted(A, 1, "x", 101)]
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
    }
}
