//! Property test: random operation sequences on the lock table, checked
//! step by step against the deliberately naive reference model
//! ([`pklock_testkit::lock_model::Model`]), plus the table's own invariants
//! after every step. The checks are
//! `pklock_testkit::harness::check_against_model`, which the
//! `lock_table_ops` fuzz target runs too.
//!
//! Few clients and few names, so that requests collide, semaphores fill up,
//! multi-locks overlap and waits close cycles often: "a" and "b" are mostly
//! mutexes, "d" mostly a semaphore, "c" either (so the kinds clash too).

use std::time::Duration;

use pklock::lock_table::{ClientId, Mode};
use pklock_testkit::harness::{TableOp, check_against_model};
use proptest::prelude::*;

const FIRST_TOKEN: u64 = 1000;
const CLIENTS: u64 = 5;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn client() -> impl Strategy<Value = ClientId> {
    (0..CLIENTS).prop_map(ClientId)
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Exclusive), Just(Mode::Shared)]
}

fn timeout() -> impl Strategy<Value = Option<Duration>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Duration::ZERO)),
        2 => (1..40u64).prop_map(|ms| Some(Duration::from_millis(ms))),
    ]
}

/// A semaphore's permits (mostly two, so that everyone under one name
/// agrees) and a take of them.
fn permits() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![4 => Just(2u32), 1 => 1..=3u32].prop_flat_map(|of| (Just(of), 1..=of))
}

fn op() -> impl Strategy<Value = TableOp> {
    prop_oneof![
        5 => (client(), prop_oneof![3 => 0..3usize, 1 => 0..4usize], mode(), timeout())
            .prop_map(|(client, name, mode, timeout)| TableOp::Lock { client, name, mode, timeout }),
        3 => (client(), prop_oneof![3 => 2..4usize, 1 => 0..4usize], permits(), timeout())
            .prop_map(|(client, name, (of, take), timeout)| TableOp::Take {
                client,
                name,
                of,
                take,
                timeout,
            }),
        3 => (client(), proptest::collection::vec((prop_oneof![4 => 0..3usize, 1 => 0..4usize], mode()), 1..=3), timeout())
            .prop_map(|(client, locks, timeout)| TableOp::LockAll { client, locks, timeout }),
        4 => (client(), 0..4usize).prop_map(|(client, name)| TableOp::Unlock { client, name }),
        1 => (client(), proptest::collection::vec(0..4usize, 1..=3))
            .prop_map(|(client, names)| TableOp::UnlockAll { client, names }),
        1 => client().prop_map(|client| TableOp::Disconnect { client }),
        2 => (0..30u64).prop_map(|ms| TableOp::Advance { by: Duration::from_millis(ms) }),
    ]
}

/// The checks of `pklock_testkit::harness::check_against_model`, as a test
/// case.
fn run(
    limit: usize,
    max_entries: usize,
    hold_ms: Option<u64>,
    ops: &[TableOp],
) -> Result<(), TestCaseError> {
    check_against_model(FIRST_TOKEN, limit, max_entries, hold_ms, &NAMES, ops)
        .map_err(TestCaseError::fail)
}

/// 512 cases, or `PROPTEST_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn lock_table_matches_the_model(
        // Three locks each let a connection hold some and wait for more.
        limit in prop_oneof![3 => Just(3usize), 1 => 1..=4usize],
        // Five clients with three locks each can ask for up to fifteen.
        max_entries in prop_oneof![3 => Just(usize::MAX), 1 => 1..12usize],
        hold_ms in prop_oneof![3 => Just(None), 1 => (0..60u64).prop_map(Some)],
        ops in proptest::collection::vec(op(), 1..100),
    ) {
        run(limit, max_entries, hold_ms, &ops)?;
    }
}

#[test]
fn model_agrees_on_a_hand_written_mix() {
    let lock = |client, mode, timeout: Option<u64>| TableOp::Lock {
        client: ClientId(client),
        name: 0,
        mode,
        timeout: timeout.map(Duration::from_millis),
    };
    let ops = [
        lock(0, Mode::Shared, None),
        lock(1, Mode::Exclusive, Some(10)),
        lock(2, Mode::Shared, None),
        TableOp::Advance {
            by: Duration::from_millis(10),
        },
        TableOp::Disconnect {
            client: ClientId(0),
        },
        lock(3, Mode::Exclusive, Some(0)),
        TableOp::Unlock {
            client: ClientId(2),
            name: 0,
        },
        lock(3, Mode::Exclusive, Some(0)),
    ];
    run(2, usize::MAX, None, &ops).unwrap();
    run(2, usize::MAX, Some(15), &ops).unwrap();
    run(2, 2, None, &ops).unwrap();
}

/// Client 1 asking for "b" closes 1 -b-> 0 -a-> 2 -a-> 1 (0 waits for "a"
/// behind 2, who waits for 1's shared hold). 1 -d-> 2 -a-> 1 is shorter,
/// through the semaphore "d" that 1 waits for, but 3's permit will come back:
/// the cycle must start with the lock asked for.
#[test]
fn a_deadlock_names_the_cycle_its_new_wait_closes() {
    let lock = |client, name, mode| TableOp::Lock {
        client: ClientId(client),
        name,
        mode,
        timeout: None,
    };
    let take = |client| TableOp::Take {
        client: ClientId(client),
        name: 3,
        of: 2,
        take: 1,
        timeout: None,
    };
    let ops = [
        lock(3, 0, Mode::Shared),
        lock(0, 1, Mode::Exclusive),
        lock(1, 0, Mode::Shared),
        lock(2, 0, Mode::Exclusive),
        lock(0, 0, Mode::Shared),
        take(3),
        take(2),
        take(1),
        lock(1, 1, Mode::Exclusive),
        TableOp::Unlock {
            client: ClientId(3),
            name: 3,
        },
    ];
    run(3, usize::MAX, None, &ops).unwrap();
}
