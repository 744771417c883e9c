//! Property test: random operation sequences on the lock table, checked
//! step by step against the deliberately naive reference model
//! ([`pklock::lock_model::Model`]), plus the table's own invariants after
//! every step.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pklock::lock_model::Model;
use pklock::lock_table::{ClientId, Effect, LockRequest, LockTable, Mode};
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

fn run(hold_ms: Option<u64>, ops: &[Op]) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let mut now = start;
    let mut table: LockTable<u32> = LockTable::new(FIRST_TOKEN, LIMIT);
    let mut model: Model<u32> = Model::new(FIRST_TOKEN, LIMIT);
    if let Some(ms) = hold_ms {
        let until = start + Duration::from_millis(ms);
        table.hold_grants_until(until);
        model.hold_grants_until(until);
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
                model.lock(
                    client,
                    NAMES[name],
                    mode,
                    timeout.map(Duration::from_millis),
                    tag,
                    now,
                )
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
        prop_assert_eq!(
            table.next_token(),
            model.next_token(),
            "next token at step {}",
            step
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
