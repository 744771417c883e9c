//! Property test: random operation sequences on the lock table, checked
//! step by step against the deliberately naive reference model
//! ([`pklock_testkit::lock_model::Model`]), plus the table's own invariants
//! after every step. The checks are
//! `pklock_testkit::harness::check_against_model`, which the
//! `lock_table_ops` fuzz target runs too.

use std::time::Duration;

use pklock::lock_table::{ClientId, Mode};
use pklock_testkit::harness::{TableOp, check_against_model};
use proptest::prelude::*;

const FIRST_TOKEN: u64 = 1000;
const LIMIT: usize = 2;
const NAMES: [&str; 3] = ["a", "b", "c"];

fn op() -> impl Strategy<Value = TableOp> {
    prop_oneof![
        5 => (0..4u64, 0..3usize, any::<bool>(), prop_oneof![Just(None), (0..40u64).prop_map(Some)])
            .prop_map(|(client, name, shared, timeout)| TableOp::Lock {
                client: ClientId(client),
                name,
                mode: if shared { Mode::Shared } else { Mode::Exclusive },
                timeout: timeout.map(Duration::from_millis),
            }),
        3 => (0..4u64, 0..3usize)
            .prop_map(|(client, name)| TableOp::Unlock { client: ClientId(client), name }),
        1 => (0..4u64).prop_map(|client| TableOp::Disconnect { client: ClientId(client) }),
        2 => (0..30u64).prop_map(|ms| TableOp::Advance { by: Duration::from_millis(ms) }),
    ]
}

/// The checks of `pklock_testkit::harness::check_against_model`, as a test
/// case.
fn run(max_entries: usize, hold_ms: Option<u64>, ops: &[TableOp]) -> Result<(), TestCaseError> {
    check_against_model(FIRST_TOKEN, LIMIT, max_entries, hold_ms, &NAMES, ops)
        .map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn lock_table_matches_the_model(
        // Four clients with two locks each can ask for up to eight.
        max_entries in prop_oneof![3 => Just(usize::MAX), 1 => 1..8usize],
        hold_ms in prop_oneof![3 => Just(None), 1 => (0..60u64).prop_map(Some)],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(max_entries, hold_ms, &ops)?;
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
    run(usize::MAX, None, &ops).unwrap();
    run(usize::MAX, Some(15), &ops).unwrap();
    run(2, None, &ops).unwrap();
}
