//! A deliberately naive reference model of [`pklock::lock_table::LockTable`],
//! used by the property tests and the fuzz targets to check the real table
//! step by step. It must stay obviously correct rather than fast.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pklock::lock_table::{ClientId, Effect, Mode, Refusal, Unlocked};

#[derive(Clone, Debug)]
struct Request<T> {
    client: ClientId,
    mode: Mode,
    tag: T,
    /// Order of arrival, which is also the order deadlines tie-break in.
    seq: u64,
    deadline: Option<Instant>,
    token: Option<u64>,
}

/// The expected behaviour of a lock table. Each operation takes `now` and
/// returns the [`Effect`]s the real table must emit, in the same order.
///
/// Per lock it keeps one list of requests in arrival order and derives who
/// holds from it: a request holds when every request before it holds and is
/// compatible with it (all shared). Grants are the requests whose derived
/// state flips to held, in list order.
#[derive(Clone, Debug)]
pub struct Model<T> {
    queues: BTreeMap<String, Vec<Request<T>>>,
    /// No grant before this (the hold after a restart).
    grants_from: Option<Instant>,
    next_token: u64,
    next_seq: u64,
    limit: usize,
    max_entries: usize,
}

impl<T: Clone> Model<T> {
    /// An empty model whose first grant gets `first_token`, where a client
    /// may hold or wait for at most `limit_per_client` locks, and all clients
    /// together at most `max_entries`.
    pub fn new(first_token: u64, limit_per_client: usize, max_entries: usize) -> Self {
        Model {
            queues: BTreeMap::new(),
            grants_from: None,
            next_token: first_token,
            next_seq: 0,
            limit: limit_per_client,
            max_entries,
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

    fn compatible(earlier: &Request<T>, later: &Request<T>) -> bool {
        earlier.mode == Mode::Shared && later.mode == Mode::Shared
    }

    /// Grants every request whose place in the list now entitles it to hold.
    fn grant(&mut self, name: &str, now: Instant, out: &mut Vec<Effect<T>>) {
        let holding = self.grants_from.is_some_and(|from| now < from);
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        for i in 0..queue.len() {
            if holding {
                break;
            }
            let entitled =
                (0..i).all(|j| queue[j].token.is_some() && Self::compatible(&queue[j], &queue[i]));
            if entitled && queue[i].token.is_none() {
                let token = self.next_token;
                self.next_token += 1;
                queue[i].token = Some(token);
                out.push(Effect::Granted {
                    client: queue[i].client,
                    tag: queue[i].tag.clone(),
                    lock: Arc::from(name),
                    mode: queue[i].mode,
                    token,
                });
            }
        }
        if queue.is_empty() {
            self.queues.remove(name);
        }
    }

    fn entries_of(&self, client: ClientId) -> usize {
        self.queues
            .values()
            .filter(|q| q.iter().any(|r| r.client == client))
            .count()
    }

    /// Asks for a lock: `None` waits for ever, zero tries once, anything else
    /// waits at most that long (a deadline past what `Instant` can hold is
    /// no deadline).
    pub fn lock(
        &mut self,
        client: ClientId,
        name: &str,
        mode: Mode,
        timeout: Option<Duration>,
        tag: T,
        now: Instant,
    ) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        if let Some(existing) = self
            .queues
            .get(name)
            .and_then(|q| q.iter().find(|r| r.client == client))
        {
            out.push(match existing.token {
                Some(token) if existing.mode == mode => Effect::Granted {
                    client,
                    tag,
                    lock: Arc::from(name),
                    mode,
                    token,
                },
                Some(_) => Effect::Refused {
                    client,
                    tag,
                    reason: Refusal::HeldInOtherMode(existing.mode),
                },
                None => Effect::Refused {
                    client,
                    tag,
                    reason: Refusal::AlreadyWaiting,
                },
            });
            return out;
        }
        if self.entries_of(client) >= self.limit {
            out.push(Effect::Refused {
                client,
                tag,
                reason: Refusal::TooMany { limit: self.limit },
            });
            return out;
        }
        if self.queues.values().map(Vec::len).sum::<usize>() >= self.max_entries {
            out.push(Effect::Refused {
                client,
                tag,
                reason: Refusal::TableFull {
                    limit: self.max_entries,
                },
            });
            return out;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = timeout.and_then(|t| now.checked_add(t));
        self.queues
            .entry(name.to_string())
            .or_default()
            .push(Request {
                client,
                mode,
                tag,
                seq,
                deadline,
                token: None,
            });
        self.grant(name, now, &mut out);
        if timeout == Some(Duration::ZERO) {
            if let Some(queue) = self.queues.get_mut(name) {
                if let Some(pos) = queue.iter().position(|r| r.seq == seq && r.token.is_none()) {
                    let request = queue.remove(pos);
                    out.push(Effect::TimedOut {
                        client,
                        tag: request.tag,
                    });
                }
                if queue.is_empty() {
                    self.queues.remove(name);
                }
            }
        }
        out
    }

    /// Takes `client` out of `name`'s list, whether it holds or waits; a
    /// withdrawn wait is answered [`Effect::Cancelled`].
    pub fn unlock(
        &mut self,
        client: ClientId,
        name: &str,
        now: Instant,
    ) -> (Unlocked, Vec<Effect<T>>) {
        let mut out = Vec::new();
        let Some(queue) = self.queues.get_mut(name) else {
            return (Unlocked::NotFound, out);
        };
        let Some(pos) = queue.iter().position(|r| r.client == client) else {
            return (Unlocked::NotFound, out);
        };
        let request = queue.remove(pos);
        let result = if request.token.is_some() {
            Unlocked::Released
        } else {
            out.push(Effect::Cancelled {
                client,
                tag: request.tag,
            });
            Unlocked::Withdrawn
        };
        self.grant(name, now, &mut out);
        (result, out)
    }

    /// Removes every request of `client`, without answering any of them.
    pub fn disconnect(&mut self, client: ClientId, now: Instant) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            let before = queue.len();
            queue.retain(|r| r.client != client);
            if queue.len() != before {
                self.grant(&name, now, &mut out);
            }
        }
        out
    }

    /// Times out, earliest deadline first (ties in arrival order), every
    /// wait whose deadline is at or before `now`; then ends the hold on
    /// grants if its time has come.
    pub fn expire(&mut self, now: Instant) -> Vec<Effect<T>> {
        let mut out = Vec::new();
        loop {
            let due = self
                .queues
                .iter()
                .flat_map(|(name, q)| q.iter().map(move |r| (name, r)))
                .filter(|(_, r)| r.token.is_none() && r.deadline.is_some_and(|d| d <= now))
                .min_by_key(|(_, r)| (r.deadline, r.seq))
                .map(|(name, r)| (name.clone(), r.seq));
            let Some((name, seq)) = due else { break };
            let Some(queue) = self.queues.get_mut(&name) else {
                break;
            };
            let Some(pos) = queue.iter().position(|r| r.seq == seq) else {
                break;
            };
            let request = queue.remove(pos);
            out.push(Effect::TimedOut {
                client: request.client,
                tag: request.tag,
            });
            self.grant(&name, now, &mut out);
        }
        if self.grants_from.is_some_and(|from| from <= now) {
            self.grants_from = None;
            let names: Vec<String> = self.queues.keys().cloned().collect();
            for name in names {
                self.grant(&name, now, &mut out);
            }
        }
        out
    }
}
