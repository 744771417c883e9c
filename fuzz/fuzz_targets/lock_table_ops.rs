//! The lock table against the naive reference model
//! (`pklock::lock_model::Model`): operation sequences decoded from the input
//! must give exactly the model's effects, step by step, and keep the table's
//! invariants; every request is answered once, to the client that asked;
//! a token is never granted to two clients, and new grants get strictly
//! increasing tokens; no unanswered request is forgotten.

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock::lock_model::Model;
use pklock::lock_table::{ClientId, Effect, LockRequest, LockTable, Mode};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Arbitrary, Debug)]
enum Timeout {
    Forever,
    Ms(u8),
    /// Too far for `Instant` to represent: waits for ever.
    Huge,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Lock {
        client: u8,
        name: u8,
        shared: bool,
        timeout: Timeout,
    },
    Unlock {
        client: u8,
        name: u8,
    },
    Disconnect {
        client: u8,
    },
    Advance {
        ms: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    first_token: u32,
    /// Per-client limit, 1 to 4.
    limit: u8,
    hold_ms: Option<u8>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| run(input));

fn run(input: Input) {
    let first_token = u64::from(input.first_token);
    let limit = usize::from(input.limit % 4) + 1;
    let start = Instant::now();
    let mut now = start;
    let mut table: LockTable<u32> = LockTable::new(first_token, limit);
    let mut model: Model<u32> = Model::new(first_token, limit);
    if let Some(ms) = input.hold_ms {
        let until = start + Duration::from_millis(u64::from(ms));
        table.hold_grants_until(until);
        model.hold_grants_until(until);
    }
    let mut out = Vec::new();
    let mut pending: HashMap<u32, ClientId> = HashMap::new();
    let mut issued: HashMap<u64, ClientId> = HashMap::new();
    let mut highest: Option<u64> = None;
    for (step, op) in input.ops.iter().enumerate() {
        let tag = step as u32;
        let expected = match *op {
            Op::Lock {
                client,
                name,
                shared,
                ref timeout,
            } => {
                let client = ClientId(u64::from(client % 4));
                let name = NAMES[usize::from(name) % NAMES.len()];
                let mode = if shared {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                };
                let timeout = match timeout {
                    Timeout::Forever => None,
                    Timeout::Ms(ms) => Some(Duration::from_millis(u64::from(*ms))),
                    Timeout::Huge => Some(Duration::from_millis(u64::MAX)),
                };
                let request = LockRequest {
                    client,
                    lock: name,
                    mode,
                    timeout,
                    tag,
                };
                table.lock(request, now, &mut out);
                pending.insert(tag, client);
                model.lock(client, name, mode, timeout, tag, now)
            }
            Op::Unlock { client, name } => {
                let client = ClientId(u64::from(client % 4));
                let name = NAMES[usize::from(name) % NAMES.len()];
                let got = table.unlock(client, name, now, &mut out);
                let (want, effects) = model.unlock(client, name, now);
                assert_eq!(got, want, "unlock result at step {step}");
                effects
            }
            Op::Disconnect { client } => {
                let client = ClientId(u64::from(client % 4));
                table.disconnect(client, now, &mut out);
                pending.retain(|_, c| *c != client);
                model.disconnect(client, now)
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(u64::from(ms));
                table.expire(now, &mut out);
                model.expire(now)
            }
        };
        assert_eq!(out, expected, "effects at step {step} ({op:?})");
        assert_eq!(
            table.next_token(),
            model.next_token(),
            "next token at step {step}"
        );
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
            assert_eq!(pending.remove(&tag), Some(client), "answer to tag {tag}");
            if let Some(token) = token {
                match issued.get(&token) {
                    // Asking again for a held lock returns its token.
                    Some(&holder) => {
                        assert_eq!(holder, client, "token {token} reused for another client")
                    }
                    None => {
                        assert!(
                            highest.is_none_or(|h| token > h) && token >= first_token,
                            "token {token} not above {highest:?}"
                        );
                        issued.insert(token, client);
                        highest = Some(token);
                    }
                }
            }
        }
        if let Err(broken) = table.check_invariants() {
            panic!("after step {step} ({op:?}): {broken}");
        }
        // Whoever is still unanswered is really waiting in the table.
        for (&tag, &client) in &pending {
            let waiting = NAMES.iter().any(|n| {
                table
                    .get(n)
                    .is_some_and(|v| v.waiters().any(|w| w.client == client))
            });
            assert!(waiting, "request {tag} of client {client} was forgotten");
        }
    }
}
