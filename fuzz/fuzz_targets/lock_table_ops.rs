//! The lock table against the naive reference model
//! (`pklock_testkit::lock_model::Model`): operation sequences decoded from
//! the input must give exactly the model's effects, step by step, and keep
//! the table's invariants; every request is answered once, to the client
//! that asked; a token is never granted to two clients, and new grants get
//! strictly increasing tokens; no unanswered request is forgotten. The checks are
//! `pklock_testkit::harness::check_against_model`.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock::lock_table::{ClientId, Mode};
use pklock_testkit::harness::{TableOp, check_against_model};

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

impl Op {
    /// The operation on clients 0 to 3 and the locks in `NAMES`.
    fn table_op(&self) -> TableOp {
        let client = |c: u8| ClientId(u64::from(c % 4));
        let name = |n: u8| usize::from(n) % NAMES.len();
        match *self {
            Op::Lock {
                client: c,
                name: n,
                shared,
                ref timeout,
            } => TableOp::Lock {
                client: client(c),
                name: name(n),
                mode: if shared {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                },
                timeout: match timeout {
                    Timeout::Forever => None,
                    Timeout::Ms(ms) => Some(Duration::from_millis(u64::from(*ms))),
                    Timeout::Huge => Some(Duration::from_millis(u64::MAX)),
                },
            },
            Op::Unlock { client: c, name: n } => TableOp::Unlock {
                client: client(c),
                name: name(n),
            },
            Op::Disconnect { client: c } => TableOp::Disconnect { client: client(c) },
            Op::Advance { ms } => TableOp::Advance {
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
    /// Limit over all clients, 1 to 8; none if absent.
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
        .map_or(usize::MAX, |n| usize::from(n % 8) + 1);
    let hold_ms = input.hold_ms.map(u64::from);
    check_against_model(first_token, limit, max_entries, hold_ms, &NAMES, &ops)
        .unwrap_or_else(|broken| panic!("{broken}"));
});
