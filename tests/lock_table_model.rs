//! Property test: random operation sequences on the lock table, checked
//! step by step against a deliberately naive reference model, plus the
//! table's own invariants after every step.
//!
//! The model keeps, per lock, one list of requests in arrival order and
//! derives who holds from it: a request holds when every request before it
//! holds and is compatible with it (all shared). Grants are the requests
//! whose derived state flips to held, in list order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pklock::lock_table::{ClientId, Effect, LockRequest, LockTable, Mode, Refusal, Unlocked};
use proptest::prelude::*;

const FIRST_TOKEN: u64 = 1000;
const LIMIT: usize = 2;
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Debug)]
enum Op {
    Lock {
        client: u64,
        name: usize,
        shared: bool,
        timeout: Option<u64>,
    },
    Unlock {
        client: u64,
        name: usize,
    },
    Disconnect {
        client: u64,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..4u64, 0..3usize, any::<bool>(), prop_oneof![Just(None), (0..40u64).prop_map(Some)])
            .prop_map(|(client, name, shared, timeout)| Op::Lock { client, name, shared, timeout }),
        3 => (0..4u64, 0..3usize).prop_map(|(client, name)| Op::Unlock { client, name }),
        1 => (0..4u64).prop_map(|client| Op::Disconnect { client }),
        2 => (0..30u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Clone, Debug)]
struct Request {
    client: ClientId,
    mode: Mode,
    tag: u32,
    /// Order of arrival, which is also the order deadlines tie-break in.
    seq: u64,
    deadline: Option<Instant>,
    token: Option<u64>,
}

#[derive(Default)]
struct Model {
    queues: BTreeMap<String, Vec<Request>>,
    /// No grant before this (the hold after a restart).
    grants_from: Option<Instant>,
    next_token: u64,
    next_seq: u64,
}

impl Model {
    fn compatible(earlier: &Request, later: &Request) -> bool {
        earlier.mode == Mode::Shared && later.mode == Mode::Shared
    }

    /// Grants every request whose place in the list now entitles it to hold.
    fn grant(&mut self, name: &str, now: Instant, out: &mut Vec<Effect<u32>>) {
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
                    tag: queue[i].tag,
                    lock: Arc::from(name),
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

    fn lock(
        &mut self,
        client: ClientId,
        name: &str,
        mode: Mode,
        timeout: Option<u64>,
        tag: u32,
        now: Instant,
    ) -> Vec<Effect<u32>> {
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
        if self.entries_of(client) >= LIMIT {
            out.push(Effect::Refused {
                client,
                tag,
                reason: Refusal::TooMany { limit: LIMIT },
            });
            return out;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = timeout.map(|ms| now + Duration::from_millis(ms));
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
        if timeout == Some(0) {
            let queue = self.queues.get_mut(name).unwrap();
            if let Some(pos) = queue.iter().position(|r| r.seq == seq && r.token.is_none()) {
                queue.remove(pos);
                out.push(Effect::TimedOut { client, tag });
            }
            if queue.is_empty() {
                self.queues.remove(name);
            }
        }
        out
    }

    fn unlock(
        &mut self,
        client: ClientId,
        name: &str,
        now: Instant,
    ) -> (Unlocked, Vec<Effect<u32>>) {
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

    fn disconnect(&mut self, client: ClientId, now: Instant) -> Vec<Effect<u32>> {
        let mut out = Vec::new();
        let names: BTreeSet<String> = self.queues.keys().cloned().collect();
        for name in names {
            let queue = self.queues.get_mut(&name).unwrap();
            let before = queue.len();
            queue.retain(|r| r.client != client);
            if queue.len() != before {
                self.grant(&name, now, &mut out);
            }
        }
        out
    }

    fn expire(&mut self, now: Instant) -> Vec<Effect<u32>> {
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
            let queue = self.queues.get_mut(&name).unwrap();
            let pos = queue.iter().position(|r| r.seq == seq).unwrap();
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

fn run(hold_ms: Option<u64>, ops: &[Op]) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let mut now = start;
    let mut table: LockTable<u32> = LockTable::new(FIRST_TOKEN, LIMIT);
    let mut model = Model {
        next_token: FIRST_TOKEN,
        ..Model::default()
    };
    if let Some(ms) = hold_ms {
        let until = start + Duration::from_millis(ms);
        table.hold_grants_until(until);
        model.grants_from = Some(until);
    }
    let mut out = Vec::new();
    let mut pending: HashMap<u32, ClientId> = HashMap::new();
    let mut issued: HashMap<u64, ClientId> = HashMap::new();
    for (step, op) in ops.iter().enumerate() {
        let tag = step as u32;
        let expected = match *op {
            Op::Lock {
                client,
                name,
                shared,
                timeout,
            } => {
                let (client, mode) = (
                    ClientId(client),
                    if shared {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    },
                );
                let request = LockRequest {
                    client,
                    lock: NAMES[name],
                    mode,
                    timeout: timeout.map(Duration::from_millis),
                    tag,
                };
                table.lock(request, now, &mut out);
                pending.insert(tag, client);
                model.lock(client, NAMES[name], mode, timeout, tag, now)
            }
            Op::Unlock { client, name } => {
                let got = table.unlock(ClientId(client), NAMES[name], now, &mut out);
                let (want, effects) = model.unlock(ClientId(client), NAMES[name], now);
                prop_assert_eq!(got, want, "unlock result at step {}", step);
                effects
            }
            Op::Disconnect { client } => {
                table.disconnect(ClientId(client), now, &mut out);
                pending.retain(|_, c| *c != ClientId(client));
                model.disconnect(ClientId(client), now)
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(ms);
                table.expire(now, &mut out);
                model.expire(now)
            }
        };
        prop_assert_eq!(&out, &expected, "effects at step {} ({:?})", step, op);
        for effect in out.drain(..) {
            let (tag, client, token) = match effect {
                Effect::Granted {
                    tag, client, token, ..
                } => (tag, client, Some(token)),
                Effect::TimedOut { tag, client }
                | Effect::Cancelled { tag, client }
                | Effect::Refused { tag, client, .. } => (tag, client, None),
            };
            // Every request is answered once, to the client that asked.
            prop_assert_eq!(pending.remove(&tag), Some(client), "answer to tag {}", tag);
            if let Some(token) = token {
                match issued.get(&token) {
                    // Asking again for a held lock returns its token.
                    Some(&holder) => {
                        prop_assert_eq!(holder, client, "token {} reused for another client", token)
                    }
                    None => {
                        let highest = issued.keys().max().copied().unwrap_or(FIRST_TOKEN - 1);
                        prop_assert!(token > highest, "token {} not above {}", token, highest);
                        issued.insert(token, client);
                    }
                }
            }
        }
        if let Err(broken) = table.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "after step {step} ({op:?}): {broken}"
            )));
        }
        // Whoever is still unanswered is really waiting in the table.
        for (&tag, &client) in &pending {
            let waiting = NAMES.iter().any(|n| {
                table
                    .get(n)
                    .is_some_and(|v| v.waiters().any(|w| w.client == client))
            });
            prop_assert!(
                waiting,
                "request {} of client {} was forgotten",
                tag,
                client
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn lock_table_matches_the_model(
        hold_ms in prop_oneof![3 => Just(None), 1 => (0..60u64).prop_map(Some)],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(hold_ms, &ops)?;
    }
}

#[test]
fn model_agrees_on_a_hand_written_mix() {
    use Op::*;
    let ops = [
        Lock {
            client: 0,
            name: 0,
            shared: true,
            timeout: None,
        },
        Lock {
            client: 1,
            name: 0,
            shared: false,
            timeout: Some(10),
        },
        Lock {
            client: 2,
            name: 0,
            shared: true,
            timeout: None,
        },
        Advance { ms: 10 },
        Disconnect { client: 0 },
        Lock {
            client: 3,
            name: 0,
            shared: false,
            timeout: Some(0),
        },
        Unlock { client: 2, name: 0 },
        Lock {
            client: 3,
            name: 0,
            shared: false,
            timeout: Some(0),
        },
    ];
    run(None, &ops).unwrap();
    run(Some(15), &ops).unwrap();
}
