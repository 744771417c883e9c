//! The lock table against the naive reference model
//! (`pklock_testkit::lock_model::Model`): operation sequences decoded from
//! the input (locks, semaphore permits, multi-locks, unlocks, departures and
//! the clock) must give exactly the model's effects, step by step, and keep
//! the table's invariants; a deadlock is answered exactly when the model
//! finds the asker would be stuck for good, with a cycle that is really
//! there; every request is answered once, to the client that asked; a token
//! is never granted to two clients, and new grants get strictly increasing
//! tokens; no unanswered request is forgotten. The checks are
//! `pklock_testkit::harness::check_against_model`.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock::lock_table::{ClientId, Mode};
use pklock_testkit::harness::{TableOp, check_against_model};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// Clients 0 to 4: enough for cycles of several connections.
const CLIENTS: u8 = 5;
/// The most locks one multi-lock or multi-unlock names.
const MAX_NAMED: usize = 4;

#[derive(Arbitrary, Debug)]
enum Timeout {
    Forever,
    Ms(u8),
    /// Too far for `Instant` to represent: waits for ever.
    Huge,
}

impl Timeout {
    fn duration(&self) -> Option<Duration> {
        match *self {
            Timeout::Forever => None,
            Timeout::Ms(ms) => Some(Duration::from_millis(u64::from(ms))),
            Timeout::Huge => Some(Duration::from_millis(u64::MAX)),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Lock {
        client: u8,
        name: u8,
        shared: bool,
        timeout: Timeout,
    },
    /// A semaphore of 1 to 4 permits, a take of 1 to that.
    Take {
        client: u8,
        name: u8,
        of: u8,
        take: u8,
        timeout: Timeout,
    },
    /// A multi-lock of the first lock and up to three more (a name twice
    /// is refused).
    LockAll {
        client: u8,
        first: (u8, bool),
        more: Vec<(u8, bool)>,
        timeout: Timeout,
    },
    Unlock {
        client: u8,
        name: u8,
    },
    UnlockAll {
        client: u8,
        first: u8,
        more: Vec<u8>,
    },
    Disconnect {
        client: u8,
    },
    Advance {
        ms: u8,
    },
}

fn client(c: u8) -> ClientId {
    ClientId(u64::from(c % CLIENTS))
}

fn name(n: u8) -> usize {
    usize::from(n) % NAMES.len()
}

fn mode(shared: bool) -> Mode {
    if shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    }
}

impl Op {
    /// The operation on clients 0 to 4 and the locks in `NAMES`.
    fn table_op(&self) -> TableOp {
        match self {
            &Op::Lock {
                client: c,
                name: n,
                shared,
                ref timeout,
            } => TableOp::Lock {
                client: client(c),
                name: name(n),
                mode: mode(shared),
                timeout: timeout.duration(),
            },
            &Op::Take {
                client: c,
                name: n,
                of,
                take,
                ref timeout,
            } => {
                let of = u32::from(of % 4) + 1;
                TableOp::Take {
                    client: client(c),
                    name: name(n),
                    of,
                    take: u32::from(take) % of + 1,
                    timeout: timeout.duration(),
                }
            }
            Op::LockAll {
                client: c,
                first,
                more,
                timeout,
            } => TableOp::LockAll {
                client: client(*c),
                locks: std::iter::once(first)
                    .chain(more)
                    .take(MAX_NAMED)
                    .map(|&(n, shared)| (name(n), mode(shared)))
                    .collect(),
                timeout: timeout.duration(),
            },
            &Op::Unlock { client: c, name: n } => TableOp::Unlock {
                client: client(c),
                name: name(n),
            },
            Op::UnlockAll {
                client: c,
                first,
                more,
            } => TableOp::UnlockAll {
                client: client(*c),
                names: std::iter::once(first)
                    .chain(more)
                    .take(MAX_NAMED)
                    .map(|&n| name(n))
                    .collect(),
            },
            &Op::Disconnect { client: c } => TableOp::Disconnect { client: client(c) },
            &Op::Advance { ms } => TableOp::Advance {
                by: Duration::from_millis(u64::from(ms)),
            },
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    first_token: u32,
    /// Per-client limit, 1 to 4.
    limit: u8,
    /// Limit over all clients, 1 to 12; none if absent.
    max_entries: Option<u8>,
    hold_ms: Option<u8>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let ops: Vec<TableOp> = input.ops.iter().map(Op::table_op).collect();
    let first_token = u64::from(input.first_token);
    let limit = usize::from(input.limit % 4) + 1;
    let max_entries = input
        .max_entries
        .map_or(usize::MAX, |n| usize::from(n % 12) + 1);
    let hold_ms = input.hold_ms.map(u64::from);
    check_against_model(first_token, limit, max_entries, hold_ms, &NAMES, &ops)
        .unwrap_or_else(|broken| panic!("{broken}"));
});
