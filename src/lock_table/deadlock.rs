//! The deadlock check: whether a wait about to be queued would leave some
//! connections waiting for each other for ever. Reads the table, changes
//! nothing.
//!
//! A waiting connection counts as waiting for all of its waits: it releases
//! nothing until they are all granted. A wait for a lock waits for the
//! lock's holders and for every wait ahead of it in the queue. The check
//! runs in three steps, each only if the one before found something:
//! 1. the connections the new wait leads to, following holders and waits
//!    ahead; unless that leads back to the asker, there is no cycle (this is
//!    all the cost for nearly every wait, and none at all for a connection
//!    that holds and waits for nothing);
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
pub const CHECK_STEPS: usize = 200_000;

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

impl<T> LockTable<T> {
    /// If `client` waiting for `new` (lock, mode, permits; locks it does not
    /// hold or wait for yet) would close a cycle of waits, the cycle: the
    /// asker first, each connection with the lock it waits for, which the
    /// next one holds or waits for ahead of it.
    pub(super) fn find_deadlock(&self, client: ClientId, new: &[(&str, Mode, u32)]) -> Found {
        // Nobody waits for a connection that holds nothing and has no wait
        // queued behind its own, so no cycle can run through it.
        let Some(holdings) = self.clients.holdings.get(&client) else {
            return Found::Clear;
        };
        if holdings.held.is_empty() && holdings.behind == 0 {
            return Found::Clear;
        }
        let mut steps = CHECK_STEPS;
        let reached = match self.reach(client, new, &mut steps) {
            Ok(Some(reached)) => reached,
            Ok(None) => return Found::Clear,
            Err(TooBig) => return Found::TooBig,
        };
        let Ok(stuck) = self.stuck_among(client, new, reached, &mut steps) else {
            return Found::TooBig;
        };
        if !stuck.contains(&client) {
            return Found::Clear;
        }
        Found::Cycle(self.cycle_through(client, new, &stuck))
    }

    /// The waits of `x` (with `new` for the asker).
    fn waits_of<'a>(
        &'a self,
        x: ClientId,
        asker: ClientId,
        new: &'a [(&'a str, Mode, u32)],
    ) -> Vec<Wait<'a>> {
        let mut waits = Vec::new();
        if x == asker {
            waits.extend(new.iter().map(|&(lock, mode, take)| Wait {
                lock,
                below: u64::MAX,
                mode,
                take,
            }));
        }
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
        waits
    }

    /// Step 1: every connection with waits that the asker's waits lead to,
    /// or `None` if they never lead back to the asker. Each queue's holders
    /// are looked at once, and each of its waiters once, however many waits
    /// stand behind them.
    fn reach(
        &self,
        asker: ClientId,
        new: &[(&str, Mode, u32)],
        steps: &mut usize,
    ) -> Result<Option<FxHashSet<ClientId>>, TooBig> {
        let mut seen = FxHashSet::default();
        // For each queue looked at: waiters below this arrival number are seen.
        let mut scanned: FxHashMap<&str, u64> = FxHashMap::default();
        let mut to_visit = vec![asker];
        let mut back = false;
        while let Some(x) = to_visit.pop() {
            let waits = self.waits_of(x, asker, new);
            spend(steps, waits.len())?;
            for wait in waits {
                let Some(queue) = self.queues.get(wait.lock) else {
                    continue;
                };
                let mut meet = |y: ClientId| {
                    if y == asker {
                        back = true;
                    } else if seen.insert(y)
                        && self
                            .clients
                            .holdings
                            .get(&y)
                            .is_some_and(|h| !h.waits.is_empty())
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
                            meet(holder.client);
                        }
                        0
                    }
                };
                for (_, waiter) in queue.waiters.range(from, wait.below) {
                    spend(steps, 1)?;
                    if !self.clients.departed.contains(&waiter.client) {
                        meet(waiter.client);
                    }
                }
                scanned.insert(wait.lock, wait.below);
            }
        }
        Ok(back.then(|| {
            seen.retain(|y| {
                self.clients
                    .holdings
                    .get(y)
                    .is_some_and(|h| !h.waits.is_empty())
            });
            seen.insert(asker);
            seen
        }))
    }

    /// Step 2: of `candidates` (every connection with waits that the asker
    /// leads to, and the asker), those that could never have all their waits
    /// granted, even if everyone else released everything.
    fn stuck_among(
        &self,
        asker: ClientId,
        new: &[(&str, Mode, u32)],
        mut stuck: FxHashSet<ClientId>,
        steps: &mut usize,
    ) -> Result<FxHashSet<ClientId>, TooBig> {
        loop {
            let mut free = Vec::new();
            for &x in &stuck {
                let mut could = true;
                for wait in self.waits_of(x, asker, new) {
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

    /// Step 3: a cycle through the asker, out of it by a lock it asks for,
    /// among the `stuck` (every one of them leads back to it: none was stuck
    /// before its new wait). Breadth first, so the shortest.
    fn cycle_through(
        &self,
        asker: ClientId,
        new: &[(&str, Mode, u32)],
        stuck: &FxHashSet<ClientId>,
    ) -> Vec<(ClientId, Arc<str>)> {
        // For each connection reached: the one before it and the lock by which.
        let mut came_from: FxHashMap<ClientId, (ClientId, Arc<str>)> = FxHashMap::default();
        let mut frontier = VecDeque::from([asker]);
        let mut closing = None;
        'search: while let Some(x) = frontier.pop_front() {
            let mut waits = self.waits_of(x, asker, new);
            if x == asker {
                // Out of the asker by a lock it asks for (they come first):
                // only those made it stuck. A shorter cycle through one of
                // its older waits may run through a semaphore with room,
                // which keeps nobody waiting.
                waits.truncate(new.len());
            }
            for wait in waits {
                let Some((name, queue)) = self.queues.get_key_value(wait.lock) else {
                    continue;
                };
                // Only holders in the way: a shared holder is not in the
                // way of a shared wait (what it waits for is ahead of it).
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
                    if !stuck.contains(&y) {
                        continue;
                    }
                    if y == asker {
                        closing = Some((x, Arc::clone(name)));
                        break 'search;
                    }
                    if y != x && !came_from.contains_key(&y) {
                        came_from.insert(y, (x, Arc::clone(name)));
                        frontier.push_back(y);
                    }
                }
            }
        }
        let Some((last, lock)) = closing else {
            // Only a cycle already there (made by a reclaim after a restart)
            // can leave the asker stuck without one through it: name the
            // first thing it waits for.
            let lock = new
                .first()
                .map_or_else(|| Arc::from(""), |(l, _, _)| Arc::from(*l));
            return vec![(asker, lock)];
        };
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
        cycle
    }
}

/// The check ran out of [`CHECK_STEPS`].
struct TooBig;

/// Counts `count` entries looked at against what is left.
fn spend(steps: &mut usize, count: usize) -> Result<(), TooBig> {
    *steps = steps.checked_sub(count).ok_or(TooBig)?;
    Ok(())
}
