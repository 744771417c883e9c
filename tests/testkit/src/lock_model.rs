//! A deliberately naive reference model of [`pklock::lock_table::LockTable`],
//! used by the property tests and the fuzz targets to check the real table
//! step by step. It must stay obviously correct rather than fast.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pklock::lock_table::{ClientId, Effect, Mode, Permits, Refusal, Unlocked};

/// One request's place in one lock's list.
#[derive(Clone, Debug)]
struct Entry<T> {
    client: ClientId,
    /// Shared for a semaphore.
    mode: Mode,
    /// The semaphore's permits, `None` for a mutex.
    permits: Option<u32>,
    /// The permits the request takes: 1 for a mutex.
    take: u32,
    /// Order of arrival, which is also the order deadlines tie-break in.
    /// Every part of one multi-lock has the same.
    seq: u64,
    /// The grant's token, once held.
    token: Option<u64>,
    /// A single request's tag and deadline; `None` for a part of a
    /// multi-lock, whose tag and deadline are in [`Model::groups`] while it
    /// waits.
    single: Option<(T, Option<Instant>)>,
}

/// A multi-lock still waiting.
#[derive(Clone, Debug)]
struct Group<T> {
    client: ClientId,
    tag: T,
    deadline: Option<Instant>,
    /// The locks in the request's order.
    locks: Vec<(String, Mode)>,
}

/// A lock as a snapshot shows it: what the table's `LockView` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockState {
    /// The semaphore's permits, `None` for a mutex.
    pub permits: Option<u32>,
    /// (client, mode, token, take) of each holder, by token.
    pub holders: Vec<(ClientId, Mode, u64, u32)>,
    /// (client, mode, take) of each waiter, in arrival order.
    pub waiters: Vec<(ClientId, Mode, u32)>,
}

/// The expected behaviour of a lock table. Each operation takes `now` and
/// returns the [`Effect`]s the real table must emit, in the same order. A
/// [`Effect::Deadlock`] comes with an empty cycle: which cycle the table
/// names is checked apart, for validity.
///
/// Per lock it keeps one list of requests in arrival order. A request may
/// hold when every request before it holds and admits it: for a mutex, all
/// of them and it are shared; for a semaphore, their permits and its own are
/// at most the semaphore's. A single request is granted as soon as it may; a
/// multi-lock once it may in every one of its lists, and until then it is in
/// the way of everyone after it in each. Within one step, grants come in the
/// table's documented order: each list the step touches is settled in turn,
/// granting the single requests at its front one by one; a multi-lock met
/// at the front is tried once that stops, and if granted its lists are
/// settled in its order, the multi-lock each of them meets being tried
/// after, first met first.
///
/// Deadlocks follow their definition, by brute force: the connections stuck
/// for good are what is left of all the connections with exactly one
/// request waiting (a multi-lock counts once; one with several is taken as
/// able to go on) once every one whose waits could all be granted (were the
/// ones left stuck) is taken out, over and over. A new request from a
/// connection with none waiting is refused iff its asker would be among
/// them, on a cycle of them. A connection left with one request waiting,
/// after another was answered, is checked at the end of the step, first
/// left first: if stuck on a cycle, that request is answered deadlock and
/// leaves its lists (settled in its order).
#[derive(Clone, Debug)]
pub struct Model<T> {
    queues: BTreeMap<String, Vec<Entry<T>>>,
    /// Multi-locks still waiting, by arrival number.
    groups: BTreeMap<u64, Group<T>>,
    /// No grant before this (the hold after a restart).
    grants_from: Option<Instant>,
    next_token: u64,
    next_seq: u64,
    limit: usize,
    max_entries: usize,
    /// Connections left with one request waiting during this step.
    recheck: VecDeque<ClientId>,
}

/// Whether the request at `i` in `list` may hold: everyone before it holds
/// and admits it.
fn may_hold<T>(list: &[Entry<T>], i: usize) -> bool {
    let before = &list[..i];
    let me = &list[i];
    if before.iter().any(|e| e.token.is_none()) {
        return false;
    }
    match me.permits {
        Some(permits) => {
            let used: u64 = before.iter().map(|e| u64::from(e.take)).sum();
            used + u64::from(me.take) <= u64::from(permits)
        }
        None => before
            .iter()
            .all(|e| e.mode == Mode::Shared && me.mode == Mode::Shared),
    }
}

/// The connections stuck for good in `queues` (see [`Model`]).
fn stuck_in<T>(queues: &BTreeMap<String, Vec<Entry<T>>>) -> BTreeSet<ClientId> {
    let waiting: BTreeSet<ClientId> = queues
        .values()
        .flatten()
        .filter(|e| e.token.is_none())
        .map(|e| e.client)
        .collect();
    let mut stuck: BTreeSet<ClientId> = waiting
        .into_iter()
        .filter(|&x| requests_in(queues, x) == 1)
        .collect();
    loop {
        let free: Vec<ClientId> = stuck
            .iter()
            .copied()
            .filter(|&x| {
                queues.values().all(|list| {
                    list.iter()
                        .enumerate()
                        .filter(|(_, e)| e.client == x && e.token.is_none())
                        .all(|(i, _)| could_be_granted(list, i, &stuck))
                })
            })
            .collect();
        if free.is_empty() {
            return stuck;
        }
        for x in free {
            stuck.remove(&x);
        }
    }
}

/// Whether `x`, stuck, lies on a cycle of stuck connections each in the way
/// of the one before: a holder that excludes its wait (any holder, for a
/// semaphore) or a wait ahead of it.
fn on_a_stuck_cycle<T>(
    queues: &BTreeMap<String, Vec<Entry<T>>>,
    stuck: &BTreeSet<ClientId>,
    x: ClientId,
) -> bool {
    let in_the_way = |y: ClientId| -> BTreeSet<ClientId> {
        let mut found = BTreeSet::new();
        for list in queues.values() {
            for (i, me) in list.iter().enumerate() {
                if me.client != y || me.token.is_some() {
                    continue;
                }
                for (j, other) in list.iter().enumerate() {
                    let blocks = match other.token {
                        Some(_) => {
                            me.permits.is_some()
                                || me.mode == Mode::Exclusive
                                || other.mode == Mode::Exclusive
                        }
                        None => j < i,
                    };
                    if blocks && other.client != y && stuck.contains(&other.client) {
                        found.insert(other.client);
                    }
                }
            }
        }
        found
    };
    let mut seen = BTreeSet::new();
    let mut frontier = vec![x];
    while let Some(y) = frontier.pop() {
        for z in in_the_way(y) {
            if z == x {
                return true;
            }
            if seen.insert(z) {
                frontier.push(z);
            }
        }
    }
    false
}

/// How many requests `client` has waiting (a multi-lock's parts share one
/// arrival number).
fn requests_in<T>(queues: &BTreeMap<String, Vec<Entry<T>>>, client: ClientId) -> usize {
    queues
        .values()
        .flatten()
        .filter(|e| e.client == client && e.token.is_none())
        .map(|e| e.seq)
        .collect::<BTreeSet<u64>>()
        .len()
}

/// Whether the wait at `i` in `list` could be granted some day if everyone
/// outside `stuck` released everything and everyone in it kept what it has.
fn could_be_granted<T>(list: &[Entry<T>], i: usize, stuck: &BTreeSet<ClientId>) -> bool {
    let me = &list[i];
    let stuck_ahead = list[..i]
        .iter()
        .any(|e| e.token.is_none() && stuck.contains(&e.client));
    let kept = list
        .iter()
        .filter(|e| e.token.is_some() && stuck.contains(&e.client));
    let room = match me.permits {
        Some(permits) => {
            let kept: u64 = kept.map(|e| u64::from(e.take)).sum();
            kept + u64::from(me.take) <= u64::from(permits)
        }
        None => kept
            .into_iter()
            .all(|e| e.mode == Mode::Shared && me.mode == Mode::Shared),
    };
    !stuck_ahead && room
}

impl<T: Clone> Model<T> {
    /// An empty model whose first grant gets `first_token`, where a client
    /// may hold or wait for at most `limit_per_client` locks, and all clients
    /// together at most `max_entries`.
    pub fn new(first_token: u64, limit_per_client: usize, max_entries: usize) -> Self {
        Model {
            queues: BTreeMap::new(),
            groups: BTreeMap::new(),
            grants_from: None,
            next_token: first_token,
            next_seq: 0,
            limit: limit_per_client,
            max_entries,
            recheck: VecDeque::new(),
        }
    }

    /// Grants nothing before `until`; [`Model::expire`] at or after it serves
    /// the queues in name order.
    pub fn hold_grants_until(&mut self, until: Instant) {
        self.grants_from = Some(until);
    }

    /// The token the next grant will carry.
    pub fn next_token(&self) -> u64 {
        self.next_token
    }

    fn holding(&self, now: Instant) -> bool {
        self.grants_from.is_some_and(|from| now < from)
    }

    fn issue_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn drop_empty(&mut self) {
        self.queues.retain(|_, list| !list.is_empty());
    }

    /// The kind in force on `name`: `None` if nobody holds or waits for it,
    /// else its permits (`None` for a mutex).
    fn kind(&self, name: &str) -> Option<Option<u32>> {
        self.queues
            .get(name)
            .and_then(|list| list.first())
            .map(|e| e.permits)
    }

    fn entry_of(&self, client: ClientId, name: &str) -> Option<&Entry<T>> {
        self.queues
            .get(name)
            .and_then(|list| list.iter().find(|e| e.client == client))
    }

    fn entries_of(&self, client: ClientId) -> usize {
        self.queues
            .values()
            .filter(|list| list.iter().any(|e| e.client == client))
            .count()
    }

    fn entries(&self) -> usize {
        self.queues.values().map(Vec::len).sum()
    }

    /// Whether a new request would hold at once at the end of `name`'s list.
    fn free_for(&self, name: &str, mode: Mode, permits: Option<u32>, take: u32) -> bool {
        let mut list = self.queues.get(name).cloned().unwrap_or_default();
        list.push(Entry {
            client: ClientId(u64::MAX),
            mode,
            permits,
            take,
            seq: u64::MAX,
            token: None,
            single: None,
        });
        may_hold(&list, list.len() - 1)
    }

    /// The connections stuck for good now.
    pub fn stuck(&self) -> BTreeSet<ClientId> {
        stuck_in(&self.queues)
    }

    /// One of `client`'s requests was answered: with one left, it is to be
    /// checked at the end of the step.
    fn ended(&mut self, client: ClientId) {
        if requests_in(&self.queues, client) == 1 {
            self.recheck.push_back(client);
        }
    }

    /// Checks, first left first, the connections left with one request
    /// waiting: a stuck one's request is answered deadlock and leaves its
    /// lists, settled in its order.
    fn recheck_deadlocks(&mut self, now: Instant, out: &mut Vec<Effect<T>>) {
        while let Some(client) = self.recheck.pop_front() {
            let stuck = self.stuck();
            if requests_in(&self.queues, client) != 1
                || !stuck.contains(&client)
                || !on_a_stuck_cycle(&self.queues, &stuck, client)
            {
                continue;
            }
            let Some(entry) = self
                .queues
                .values()
                .flatten()
                .find(|e| e.client == client && e.token.is_none())
                .cloned()
            else {
                continue;
            };
            let (tag, names) = match self.withdraw_group(entry.seq) {
                Some(group) => (group.tag, group.locks.into_iter().map(|(n, _)| n).collect()),
                None => {
                    let Some((tag, _)) = entry.single else {
                        continue;
                    };
                    let mut names = Vec::new();
                    for (name, list) in self.queues.iter_mut() {
                        if list.iter().any(|e| e.seq == entry.seq) {
                            list.retain(|e| e.seq != entry.seq);
                            names.push(name.clone());
                        }
                    }
                    (tag, names)
                }
            };
            out.push(Effect::Deadlock {
                client,
                tag,
                cycle: Vec::new(),
            });
            for name in names {
                self.settle_name(&name, now, out);
            }
        }
    }

    /// The connections that would be stuck for good if `client` waited,
    /// besides its waits, for each of `waits` (name, mode, permits, take),
    /// at the end of its list.
    pub fn stuck_if_waiting(
        &self,
        client: ClientId,
        waits: &[(&str, Mode, Option<u32>, u32)],
    ) -> BTreeSet<ClientId> {
        stuck_in(&self.queues_if_waiting(client, waits))
    }

    /// Whether `client` waiting for `waits` would be stuck on a cycle: the
    /// request is then answered deadlock.
    fn deadlocked_if_waiting(
        &self,
        client: ClientId,
        waits: &[(&str, Mode, Option<u32>, u32)],
    ) -> bool {
        let queues = self.queues_if_waiting(client, waits);
        let stuck = stuck_in(&queues);
        stuck.contains(&client) && on_a_stuck_cycle(&queues, &stuck, client)
    }

    /// The lists as they would be if `client` waited for `waits`.
    fn queues_if_waiting(
        &self,
        client: ClientId,
        waits: &[(&str, Mode, Option<u32>, u32)],
    ) -> BTreeMap<String, Vec<Entry<T>>> {
        let mut queues = self.queues.clone();
        for &(name, mode, permits, take) in waits {
            queues.entry(name.to_string()).or_default().push(Entry {
                client,
                mode,
                permits,
                take,
                seq: u64::MAX,
                token: None,
                single: None,
            });
        }
        queues
    }

    /// Each lock with a holder or a waiter, as a table's `LockView` shows it.
    pub fn snapshot(&self) -> BTreeMap<String, LockState> {
        self.queues
            .iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(name, list)| {
                let mut holders: Vec<_> = list
                    .iter()
                    .filter_map(|e| e.token.map(|t| (e.client, e.mode, t, e.take)))
                    .collect();
                holders.sort_by_key(|h| h.2);
                let waiters = list
                    .iter()
                    .filter(|e| e.token.is_none())
                    .map(|e| (e.client, e.mode, e.take))
                    .collect();
                let state = LockState {
                    permits: list[0].permits,
                    holders,
                    waiters,
                };
                (name.clone(), state)
            })
            .collect()
    }

    /// Grants the single requests at the front of `name`'s waits for as long
    /// as they may hold; a multi-lock met there that may hold in this list
    /// stops it and is returned, for the caller to try.
    fn settle(&mut self, name: &str, now: Instant, out: &mut Vec<Effect<T>>) -> Option<u64> {
        if self.holding(now) {
            return None;
        }
        loop {
            let list = self.queues.get(name)?;
            let i = list.iter().position(|e| e.token.is_none())?;
            if !may_hold(list, i) {
                return None;
            }
            let Some((tag, _)) = list[i].single.clone() else {
                return Some(list[i].seq);
            };
            let token = self.issue_token();
            let entry = self.queues.get_mut(name).map(|list| &mut list[i])?;
            entry.token = Some(token);
            let client = entry.client;
            out.push(Effect::Granted {
                client,
                tag,
                lock: Arc::from(name),
                mode: entry.mode,
                token,
            });
            self.ended(client);
        }
    }

    /// Settles `name`, then tries the multi-lock that found, if any.
    fn settle_name(&mut self, name: &str, now: Instant, out: &mut Vec<Effect<T>>) {
        let multi = self.settle(name, now, out);
        self.drop_empty();
        if let Some(seq) = multi {
            self.grant_groups_from(seq, now, out);
        }
    }

    /// Grants the multi-lock `seq` if it may hold in every one of its lists,
    /// then settles those in its order; the multi-lock each of them finds is
    /// tried after, first found first.
    fn grant_groups_from(&mut self, seq: u64, now: Instant, out: &mut Vec<Effect<T>>) {
        let mut pending = VecDeque::from([seq]);
        while let Some(seq) = pending.pop_front() {
            let Some(group) = self.groups.get(&seq) else {
                continue;
            };
            let ready = !self.holding(now)
                && group.locks.iter().all(|(name, _)| {
                    self.queues.get(name).is_some_and(|list| {
                        list.iter()
                            .position(|e| e.seq == seq)
                            .is_some_and(|i| may_hold(list, i))
                    })
                });
            if !ready {
                continue;
            }
            let Some(group) = self.groups.remove(&seq) else {
                continue;
            };
            let token = self.issue_token();
            for (name, _) in &group.locks {
                for entry in self.queues.get_mut(name).into_iter().flatten() {
                    if entry.seq == seq {
                        entry.token = Some(token);
                    }
                }
            }
            out.push(Effect::GrantedAll {
                client: group.client,
                tag: group.tag,
                locks: group
                    .locks
                    .iter()
                    .map(|(name, mode)| (Arc::from(name.as_str()), *mode))
                    .collect(),
                token,
            });
            self.ended(group.client);
            for (name, _) in &group.locks {
                pending.extend(self.settle(name, now, out));
            }
        }
    }

    /// Settles every list in name order, then tries the multi-locks found,
    /// in the order found.
    fn settle_all(&mut self, now: Instant, out: &mut Vec<Effect<T>>) {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        let mut multis = Vec::new();
        for name in names {
            multis.extend(self.settle(&name, now, out));
        }
        self.drop_empty();
        for seq in multis {
            self.grant_groups_from(seq, now, out);
        }
    }

    /// Takes the waiting multi-lock `seq` out of all its lists.
    fn withdraw_group(&mut self, seq: u64) -> Option<Group<T>> {
        let group = self.groups.remove(&seq)?;
        for (name, _) in &group.locks {
            if let Some(list) = self.queues.get_mut(name) {
                list.retain(|e| e.seq != seq);
            }
        }
        Some(group)
    }

    /// Asks for a lock: `None` waits for ever, zero tries once, anything
    /// else waits at most that long (a deadline past what `Instant` can hold
    /// is no deadline).
    pub fn lock(
        &mut self,
        client: ClientId,
        name: &str,
        mode: Mode,
        timeout: Option<Duration>,
        tag: T,
        now: Instant,
    ) -> Vec<Effect<T>> {
        self.request(client, name, (mode, None), timeout, tag, now)
    }

    /// Asks for `permits.take` of the semaphore `name`'s `permits.of`
    /// permits: `timeout` as for [`Model::lock`].
    pub fn take(
        &mut self,
        client: ClientId,
        name: &str,
        permits: Permits,
        timeout: Option<Duration>,
        tag: T,
        now: Instant,
    ) -> Vec<Effect<T>> {
        self.request(
            client,
            name,
            (Mode::Shared, Some(permits)),
            timeout,
            tag,
            now,
        )
    }

    /// A lock request: in `mode`, or for a semaphore's permits (in `Shared`
    /// mode then).
    fn request(
        &mut self,
        client: ClientId,
        name: &str,
        (mode, semaphore): (Mode, Option<Permits>),
        timeout: Option<Duration>,
        tag: T,
        now: Instant,
    ) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        let (mode, permits, take) = match semaphore {
            Some(p) => (Mode::Shared, Some(p.of), p.take),
            None => (mode, None, 1),
        };
        let refused = |tag, reason| Effect::Refused {
            client,
            tag,
            reason,
        };
        let in_force = self.kind(name);
        if let Some(existing) = self.entry_of(client, name) {
            out.push(match existing.token {
                Some(_) if in_force != Some(permits) => refused(
                    tag,
                    Refusal::KindDiffers {
                        permits: in_force.flatten(),
                    },
                ),
                Some(_) if existing.mode != mode => {
                    refused(tag, Refusal::HeldInOtherMode(existing.mode))
                }
                Some(_) if existing.take != take => {
                    refused(tag, Refusal::HeldWithOtherTake(existing.take))
                }
                Some(token) => Effect::Granted {
                    client,
                    tag,
                    lock: Arc::from(name),
                    mode,
                    token,
                },
                None => refused(tag, Refusal::AlreadyWaiting),
            });
            return out;
        }
        if let Some(kind) = in_force.filter(|&kind| kind != permits) {
            out.push(refused(tag, Refusal::KindDiffers { permits: kind }));
            return out;
        }
        if self.entries_of(client) >= self.limit {
            out.push(refused(tag, Refusal::TooMany { limit: self.limit }));
            return out;
        }
        if self.entries() >= self.max_entries {
            out.push(refused(
                tag,
                Refusal::TableFull {
                    limit: self.max_entries,
                },
            ));
            return out;
        }
        let free = !self.holding(now) && self.free_for(name, mode, permits, take);
        if !free && timeout == Some(Duration::ZERO) {
            out.push(Effect::TimedOut { client, tag });
            return out;
        }
        if !free
            && requests_in(&self.queues, client) == 0
            && self.deadlocked_if_waiting(client, &[(name, mode, permits, take)])
        {
            out.push(Effect::Deadlock {
                client,
                tag,
                cycle: Vec::new(),
            });
            return out;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let token = free.then(|| self.issue_token());
        let deadline = timeout.and_then(|t| now.checked_add(t));
        self.queues
            .entry(name.to_string())
            .or_default()
            .push(Entry {
                client,
                mode,
                permits,
                take,
                seq,
                token,
                single: Some((tag.clone(), deadline)),
            });
        if let Some(token) = token {
            out.push(Effect::Granted {
                client,
                tag,
                lock: Arc::from(name),
                mode,
                token,
            });
        }
        out
    }

    /// Asks for several locks at once, all granted together with one token
    /// or none: `timeout` as for [`Model::lock`], for the whole request.
    pub fn lock_all(
        &mut self,
        client: ClientId,
        locks: &[(&str, Mode)],
        timeout: Option<Duration>,
        tag: T,
        now: Instant,
    ) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        let refused = |tag, reason| Effect::Refused {
            client,
            tag,
            reason,
        };
        for (i, &(name, _)) in locks.iter().enumerate() {
            let twice = locks[..i].iter().any(|&(earlier, _)| earlier == name);
            if twice || self.entry_of(client, name).is_some() {
                out.push(refused(tag, Refusal::AlreadyInvolved(Arc::from(name))));
                return out;
            }
            if let Some(Some(permits)) = self.kind(name) {
                out.push(refused(
                    tag,
                    Refusal::KindDiffers {
                        permits: Some(permits),
                    },
                ));
                return out;
            }
        }
        if self.entries_of(client) + locks.len() > self.limit {
            out.push(refused(tag, Refusal::TooMany { limit: self.limit }));
            return out;
        }
        if self.entries() + locks.len() > self.max_entries {
            out.push(refused(
                tag,
                Refusal::TableFull {
                    limit: self.max_entries,
                },
            ));
            return out;
        }
        let free = !self.holding(now)
            && locks
                .iter()
                .all(|&(name, mode)| self.free_for(name, mode, None, 1));
        if !free && timeout == Some(Duration::ZERO) {
            out.push(Effect::TimedOut { client, tag });
            return out;
        }
        let waits: Vec<(&str, Mode, Option<u32>, u32)> = locks
            .iter()
            .map(|&(name, mode)| (name, mode, None, 1))
            .collect();
        if !free
            && requests_in(&self.queues, client) == 0
            && self.deadlocked_if_waiting(client, &waits)
        {
            out.push(Effect::Deadlock {
                client,
                tag,
                cycle: Vec::new(),
            });
            return out;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let token = free.then(|| self.issue_token());
        for &(name, mode) in locks {
            self.queues
                .entry(name.to_string())
                .or_default()
                .push(Entry {
                    client,
                    mode,
                    permits: None,
                    take: 1,
                    seq,
                    token,
                    single: None,
                });
        }
        match token {
            Some(token) => out.push(Effect::GrantedAll {
                client,
                tag,
                locks: locks
                    .iter()
                    .map(|&(name, mode)| (Arc::from(name), mode))
                    .collect(),
                token,
            }),
            None => {
                let group = Group {
                    client,
                    tag,
                    deadline: timeout.and_then(|t| now.checked_add(t)),
                    locks: locks
                        .iter()
                        .map(|&(name, mode)| (name.to_string(), mode))
                        .collect(),
                };
                self.groups.insert(seq, group);
            }
        }
        out
    }

    /// Takes `client` out of `name`'s list, whether it holds or waits; a
    /// withdrawn wait is answered [`Effect::Cancelled`]. A multi-lock still
    /// waiting leaves all its lists; of a granted one, only this lock is
    /// released.
    pub fn unlock(
        &mut self,
        client: ClientId,
        name: &str,
        now: Instant,
    ) -> (Unlocked, Vec<Effect<T>>) {
        let mut out = Vec::new();
        let Some(list) = self.queues.get_mut(name) else {
            return (Unlocked::NotFound, out);
        };
        let Some(pos) = list.iter().position(|e| e.client == client) else {
            return (Unlocked::NotFound, out);
        };
        let entry = list.remove(pos);
        if entry.token.is_some() {
            self.settle_name(name, now, &mut out);
            self.recheck_deadlocks(now, &mut out);
            return (Unlocked::Released, out);
        }
        match entry.single {
            Some((tag, _)) => {
                out.push(Effect::Cancelled { client, tag });
                self.ended(client);
                self.settle_name(name, now, &mut out);
            }
            None => {
                if let Some(group) = self.withdraw_group(entry.seq) {
                    out.push(Effect::Cancelled {
                        client,
                        tag: group.tag,
                    });
                    self.ended(client);
                    self.settle_name(name, now, &mut out);
                    for (other, _) in &group.locks {
                        if other != name {
                            self.settle_name(other, now, &mut out);
                        }
                    }
                }
            }
        }
        self.recheck_deadlocks(now, &mut out);
        (Unlocked::Withdrawn, out)
    }

    /// Removes every request of `client`, without answering any of them:
    /// its waits all at once, then its holds one by one in name order, each
    /// lock it held or waited for settled in that order.
    pub fn disconnect(&mut self, client: ClientId, now: Instant) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        let touched: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, list)| list.iter().any(|e| e.client == client))
            .map(|(name, _)| name.clone())
            .collect();
        self.groups.retain(|_, group| group.client != client);
        for list in self.queues.values_mut() {
            list.retain(|e| e.client != client || e.token.is_some());
        }
        for name in touched {
            if let Some(list) = self.queues.get_mut(&name) {
                list.retain(|e| e.client != client);
            }
            self.settle_name(&name, now, &mut out);
        }
        self.drop_empty();
        self.recheck.retain(|c| *c != client);
        self.recheck_deadlocks(now, &mut out);
        out
    }

    /// Times out, earliest deadline first (ties in arrival order), every
    /// wait whose deadline is at or before `now` (a multi-lock as a whole,
    /// its locks settled in its order); then ends the hold on grants if its
    /// time has come.
    pub fn expire(&mut self, now: Instant) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        loop {
            let singles = self.queues.values().flatten().filter_map(|e| {
                let (_, deadline) = e.single.as_ref()?;
                let at = (*deadline)?;
                (e.token.is_none() && at <= now).then_some((at, e.seq))
            });
            let groups = self.groups.iter().filter_map(|(&seq, g)| {
                let at = g.deadline?;
                (at <= now).then_some((at, seq))
            });
            let Some((_, seq)) = singles.chain(groups).min() else {
                break;
            };
            if let Some(group) = self.withdraw_group(seq) {
                out.push(Effect::TimedOut {
                    client: group.client,
                    tag: group.tag,
                });
                self.ended(group.client);
                for (name, _) in &group.locks {
                    self.settle_name(name, now, &mut out);
                }
                continue;
            }
            let Some((name, pos)) = self.queues.iter().find_map(|(name, list)| {
                let pos = list.iter().position(|e| e.seq == seq)?;
                Some((name.clone(), pos))
            }) else {
                break;
            };
            let Some(entry) = self.queues.get_mut(&name).map(|list| list.remove(pos)) else {
                break;
            };
            if let Some((tag, _)) = entry.single {
                out.push(Effect::TimedOut {
                    client: entry.client,
                    tag,
                });
            }
            self.ended(entry.client);
            self.settle_name(&name, now, &mut out);
        }
        if self.grants_from.is_some_and(|from| from <= now) {
            self.grants_from = None;
            self.settle_all(now, &mut out);
        }
        self.recheck_deadlocks(now, &mut out);
        out
    }
}
