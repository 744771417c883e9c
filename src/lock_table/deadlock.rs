//! The deadlock check: whether a wait about to be queued would leave some
//! connections waiting for each other for ever. Reads the table, changes
//! nothing.
//!
//! A waiting connection counts as waiting for all of its waits: it releases
//! nothing until they are all granted. A wait for a lock waits for the
//! lock's holders and for every wait ahead of it in the queue. The check
//! runs in three steps, each only if the one before found something:
//! 1. the connections the new wait leads to, following holders and waits
//!    ahead; unless that leads back to the asker, there is no cycle. Before
//!    any of it: if nobody waits for what the asker holds, and no wait is
//!    queued behind one of its own, nobody waits for it and no cycle can run
//!    through it; that is all the cost for nearly every wait;
//! 2. among those, the ones stuck for good: what is left once everyone who
//!    could be granted all its waits (were the others stuck) is taken out,
//!    over and over. This is exact for semaphores too, where a wait needs
//!    only enough permits back, not every holder gone;
//! 3. a cycle through the asker among the stuck, to report.
//!
//! Steps 1 and 2 look at no more than [`CHECK_STEPS`] entries: past that,
//! the wait is queued unchecked and counted, so that no peer can make one
//! request cost the loop more than a few milliseconds.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use super::{ClientId, LockTable, Mode};

/// The most holders and waiters one check looks at.
pub const CHECK_STEPS: usize = 5_000;

/// What the check found.
pub(super) enum Found {
    /// No cycle.
    Clear,
    /// The cycle the wait would close.
    Cycle(Vec<(ClientId, Arc<str>)>),
    /// Too much to look at within [`CHECK_STEPS`].
    TooBig,
}

/// A wait as the check sees it: the lock, the arrival number it stands
/// behind everything below (`u64::MAX` for the new one, not queued yet), its
/// mode and its permits.
#[derive(Clone, Copy)]
struct Wait<'a> {
    lock: &'a str,
    below: u64,
    mode: Mode,
    take: u32,
}

/// The request being checked: who asks, who runs it, and for what.
struct Asking<'a> {
    /// The asker, then the connection that runs it, and so on up.
    askers: Vec<ClientId>,
    /// The locks it would wait for: name, mode, permits.
    new: &'a [(&'a str, Mode, u32)],
}

impl Asking<'_> {
    /// Whether `x` waits for the new request: the asker, or one that runs it.
    fn covers(&self, x: ClientId) -> bool {
        self.askers.contains(&x)
    }
}

impl<T> LockTable<T> {
    /// If `client` waiting for `new` (lock, mode, permits; locks it does not
    /// hold or wait for yet) would close a cycle of waits, the cycle: the
    /// asker (or the connection that runs it) first, each connection with
    /// the lock it waits for, which the next one holds or waits for ahead
    /// of it.
    pub(super) fn find_deadlock(&self, client: ClientId, new: &[(&str, Mode, u32)]) -> Found {
        // A connection with another request waiting (the new one aside) is
        // taken as able to go on: it is checked once one is left.
        let others = if new.is_empty() { 1 } else { 0 };
        let linked = (!self.parents.is_empty() && self.parents.contains_key(&client))
            || (!self.children.is_empty() && self.children.contains_key(&client));
        if !linked {
            // Nobody waits for a connection when nobody waits for what it
            // holds and no wait is queued behind one of its own, so no cycle
            // can run through it. (The common case: checked first, cheaply.)
            let Some(holdings) = self.clients.holdings.get(&client) else {
                return Found::Clear;
            };
            let waited_for = holdings.behind > 0
                || holdings.held.len() > CHECK_STEPS
                || holdings.held.keys().any(|name| {
                    self.queues
                        .get(name)
                        .is_some_and(|queue| !queue.waiters.is_empty())
                });
            if holdings.requests != others || !waited_for {
                return Found::Clear;
            }
        }
        let mut askers = vec![client];
        while let Some(parent) = askers.last().and_then(|c| self.parents.get(c)) {
            askers.push(*parent);
        }
        if askers.iter().any(|a| self.requests_of(*a) != others) {
            return Found::Clear;
        }
        let asking = Asking { askers, new };
        let mut steps = CHECK_STEPS;
        let reached = match self.reach(&asking, &mut steps) {
            Ok(Some(reached)) => reached,
            Ok(None) => return Found::Clear,
            Err(TooBig) => return Found::TooBig,
        };
        let Ok(stuck) = self.stuck_among(&asking, reached, &mut steps) else {
            return Found::TooBig;
        };
        if !asking.askers.iter().any(|a| stuck.contains(a)) {
            return Found::Clear;
        }
        // Stuck only behind a cycle it is not part of (made while several
        // connections were left with one request each, or by a reclaim): that
        // cycle is told to one of its own, and this wait is not the one to
        // blame.
        match self.cycle_through(client, &asking, &stuck) {
            Some(cycle) => Found::Cycle(cycle),
            None => Found::Clear,
        }
    }

    /// The requests waiting of `x` and of the connections it runs.
    fn requests_of(&self, x: ClientId) -> usize {
        let own = self.clients.holdings.get(&x).map_or(0, |h| h.requests);
        let children = self.children.get(&x).map_or(0, |children| {
            children.iter().map(|c| self.requests_of(*c)).sum()
        });
        own + children
    }

    /// Whether `x` can be stuck: it (or what it runs) has exactly one
    /// request waiting. With several, it is taken as able to go on.
    fn may_be_stuck(&self, x: ClientId) -> bool {
        self.requests_of(x) == 1
    }

    /// The waits of `x`, of the connections it runs, and the new ones if it
    /// is the asker or runs it.
    fn waits_of<'a>(&'a self, x: ClientId, asking: &Asking<'a>) -> Vec<Wait<'a>> {
        let mut waits = Vec::new();
        if asking.covers(x) {
            waits.extend(asking.new.iter().map(|&(lock, mode, take)| Wait {
                lock,
                below: u64::MAX,
                mode,
                take,
            }));
        }
        self.own_waits(x, &mut waits);
        waits
    }

    /// Adds the queued waits of `x` and of the connections it runs.
    fn own_waits<'a>(&'a self, x: ClientId, waits: &mut Vec<Wait<'a>>) {
        if let Some(holdings) = self.clients.holdings.get(&x) {
            for (lock, &seq) in &holdings.waits {
                let Some(waiter) = self.queues.get(lock).and_then(|q| q.waiters.get(seq)) else {
                    continue;
                };
                waits.push(Wait {
                    lock,
                    below: seq,
                    mode: waiter.mode,
                    take: waiter.take,
                });
            }
        }
        for child in self.children.get(&x).into_iter().flatten() {
            self.own_waits(*child, waits);
        }
    }

    /// Step 1: every connection with waits that the asker's waits lead to,
    /// or `None` if they never lead back to the asker. Each queue's holders
    /// are looked at once, and each of its waiters once, however many waits
    /// stand behind them.
    fn reach(
        &self,
        asking: &Asking<'_>,
        steps: &mut usize,
    ) -> Result<Option<FxHashSet<ClientId>>, TooBig> {
        let mut seen = FxHashSet::default();
        // For each queue looked at: waiters below this arrival number are seen.
        let mut scanned: FxHashMap<&str, u64> = FxHashMap::default();
        let mut to_visit = asking.askers.clone();
        let mut back = false;
        while let Some(x) = to_visit.pop() {
            let waits = self.waits_of(x, asking);
            spend(steps, waits.len())?;
            for wait in waits {
                let Some(queue) = self.queues.get(wait.lock) else {
                    continue;
                };
                // A waiter ahead whose one wait is in this queue leads only
                // where this scan already looks: noted, not visited.
                let leads_elsewhere =
                    |y: ClientId| {
                        self.children.contains_key(&y)
                            || self.clients.holdings.get(&y).is_some_and(|h| {
                                h.waits.len() > 1 || !h.waits.contains_key(wait.lock)
                            })
                    };
                let mut meet = |y: ClientId, ahead: bool| {
                    if asking.covers(y) {
                        back = true;
                    } else if seen.insert(y)
                        && self.may_be_stuck(y)
                        && (!ahead || leads_elsewhere(y))
                    {
                        to_visit.push(y);
                    }
                };
                let from = match scanned.get(wait.lock) {
                    Some(&done) if done >= wait.below => continue,
                    Some(&done) => done,
                    None => {
                        spend(steps, queue.holders.len())?;
                        for (_, holder) in queue.holders.iter() {
                            meet(holder.client, false);
                        }
                        0
                    }
                };
                for (_, waiter) in queue.waiters.range(from, wait.below) {
                    spend(steps, 1)?;
                    if !self.clients.departed.contains(&waiter.client) {
                        meet(waiter.client, true);
                    }
                }
                scanned.insert(wait.lock, wait.below);
            }
        }
        Ok(back.then(|| {
            seen.retain(|y| self.may_be_stuck(*y));
            seen.extend(asking.askers.iter().copied());
            seen
        }))
    }

    /// Step 2: of `candidates` (every connection with waits that the asker
    /// leads to, and the asker), those that could never have all their waits
    /// granted, even if everyone else released everything.
    fn stuck_among(
        &self,
        asking: &Asking<'_>,
        mut stuck: FxHashSet<ClientId>,
        steps: &mut usize,
    ) -> Result<FxHashSet<ClientId>, TooBig> {
        loop {
            let mut free = Vec::new();
            for &x in &stuck {
                let mut could = true;
                for wait in self.waits_of(x, asking) {
                    let queue = self.queues.get(wait.lock);
                    spend(
                        steps,
                        queue.map_or(1, |q| q.holders.len() + q.waiters.len()),
                    )?;
                    if !self.could_be_granted(&wait, &stuck) {
                        could = false;
                        break;
                    }
                }
                if could {
                    free.push(x);
                }
            }
            if free.is_empty() {
                return Ok(stuck);
            }
            for x in free {
                stuck.remove(&x);
            }
        }
    }

    /// Whether `wait` could be granted some day if every connection outside
    /// `stuck` released everything and every one in it kept what it has.
    fn could_be_granted(&self, wait: &Wait<'_>, stuck: &FxHashSet<ClientId>) -> bool {
        let Some(queue) = self.queues.get(wait.lock) else {
            return true;
        };
        let stuck_ahead = queue
            .waiters
            .range(0, wait.below)
            .any(|(_, w)| stuck.contains(&w.client) && !self.clients.departed.contains(&w.client));
        if stuck_ahead {
            return false;
        }
        let mut kept = queue
            .holders
            .iter()
            .map(|(_, holder)| holder)
            .filter(|holder| stuck.contains(&holder.client));
        match queue.permits {
            Some(permits) => {
                let kept: u64 = kept.map(|holder| u64::from(holder.take)).sum();
                kept + u64::from(wait.take) <= u64::from(permits)
            }
            None => {
                !kept.any(|holder| wait.mode == Mode::Exclusive || holder.mode == Mode::Exclusive)
            }
        }
    }

    /// Step 3: a cycle through the asker, among the `stuck`, if there is
    /// one (there is when none was stuck before its new wait: every one of
    /// them then leads back to it). Breadth first, so the shortest.
    fn cycle_through(
        &self,
        asker: ClientId,
        asking: &Asking<'_>,
        stuck: &FxHashSet<ClientId>,
    ) -> Option<Vec<(ClientId, Arc<str>)>> {
        // For each connection reached: the one before it and the lock by which.
        let mut came_from: FxHashMap<ClientId, (ClientId, Arc<str>)> = FxHashMap::default();
        let mut frontier = VecDeque::from([asker]);
        let mut closing = None;
        'search: while let Some(x) = frontier.pop_front() {
            for (y, lock) in self.stuck_in_the_way(x, asking, stuck) {
                if asking.covers(y) {
                    closing = Some((x, lock, y));
                    break 'search;
                }
                if y != x && !came_from.contains_key(&y) {
                    came_from.insert(y, (x, lock));
                    frontier.push_back(y);
                }
            }
        }
        let (last, lock, closed_on) = closing?;
        let mut cycle = vec![(last, lock)];
        let mut at = last;
        while at != asker {
            let Some((before, lock)) = came_from.get(&at) else {
                break;
            };
            cycle.push((*before, Arc::clone(lock)));
            at = *before;
        }
        cycle.reverse();
        // Closed on the connection that runs the asker: it is the one that
        // waits, through the asker, and so starts the cycle.
        if let Some(first) = cycle.first_mut() {
            first.0 = closed_on;
        }
        Some(cycle)
    }

    /// The stuck connections in the way of `x`'s waits, each with the lock:
    /// holders that exclude the wait, and waits ahead of it.
    fn stuck_in_the_way(
        &self,
        x: ClientId,
        asking: &Asking<'_>,
        stuck: &FxHashSet<ClientId>,
    ) -> Vec<(ClientId, Arc<str>)> {
        let mut in_the_way = Vec::new();
        for wait in self.waits_of(x, asking) {
            let Some((name, queue)) = self.queues.get_key_value(wait.lock) else {
                continue;
            };
            // A shared holder is not in the way of a shared wait (what that
            // waits for is ahead of it); any holder may be of a semaphore's.
            let holders = queue
                .holders
                .iter()
                .map(|(_, h)| h)
                .filter(|h| {
                    queue.permits.is_some()
                        || wait.mode == Mode::Exclusive
                        || h.mode == Mode::Exclusive
                })
                .map(|h| h.client);
            let ahead = queue
                .waiters
                .range(0, wait.below)
                .map(|(_, w)| w.client)
                .filter(|y| !self.clients.departed.contains(y));
            for y in holders.chain(ahead) {
                if stuck.contains(&y) {
                    in_the_way.push((y, Arc::clone(name)));
                }
            }
        }
        in_the_way
    }
}

/// The check ran out of [`CHECK_STEPS`].
struct TooBig;

/// Counts `count` entries looked at against what is left.
fn spend(steps: &mut usize, count: usize) -> Result<(), TooBig> {
    *steps = steps.checked_sub(count).ok_or(TooBig)?;
    Ok(())
}
