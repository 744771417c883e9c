//! Semaphores, multi-locks and the deadlock check, one rule per test.

use super::*;

const E: ClientId = ClientId(5);

impl Fixture {
    fn take(
        &mut self,
        client: ClientId,
        name: &str,
        of: u32,
        take: u32,
        tag: u32,
    ) -> Vec<Effect<u32>> {
        let request = LockRequest {
            client,
            lock: name,
            mode: Mode::Shared,
            semaphore: Some(Permits { of, take }),
            timeout: None,
            tag,
        };
        self.table.lock(request, self.now, &mut self.out);
        self.check()
    }

    fn lock_all(
        &mut self,
        client: ClientId,
        locks: &[(&str, Mode)],
        timeout: Option<u64>,
        tag: u32,
    ) -> Vec<Effect<u32>> {
        let request = MultiLockRequest {
            client,
            locks,
            timeout: timeout.map(Duration::from_millis),
            tag,
        };
        self.table.lock_all(request, self.now, &mut self.out);
        self.check()
    }
}

fn granted_all(client: ClientId, tag: u32, locks: &[(&str, Mode)], token: u64) -> Effect<u32> {
    Effect::GrantedAll {
        client,
        tag,
        locks: locks
            .iter()
            .map(|&(name, mode)| (Arc::from(name), mode))
            .collect(),
        token,
    }
}

fn shared(client: ClientId, tag: u32, lock: &str, token: u64) -> Effect<u32> {
    granted_in(Mode::Shared, client, tag, lock, token)
}

fn cycle_of(effects: &[Effect<u32>]) -> Vec<(ClientId, &str)> {
    match effects {
        [Effect::Deadlock { cycle, .. }] => cycle.iter().map(|(c, n)| (*c, &**n)).collect(),
        other => panic!("expected one deadlock answer, got {other:?}"),
    }
}

const X: Mode = Mode::Exclusive;

#[test]
fn a_semaphore_grants_up_to_its_permits_and_then_queues_in_order() {
    let mut t = Fixture::new();
    assert_eq!(t.take(A, "s", 3, 2, 1), [shared(A, 1, "s", 100)]);
    assert_eq!(t.take(B, "s", 3, 1, 2), [shared(B, 2, "s", 101)]);
    assert_eq!(t.take(C, "s", 3, 1, 3), [], "3 of 3 held: waits");
    assert_eq!(t.take(D, "s", 3, 2, 4), []);
    let (_, effects) = t.unlock(B, "s");
    assert_eq!(
        effects,
        [shared(C, 3, "s", 102)],
        "one permit back: the head gets it"
    );
    let (_, effects) = t.unlock(A, "s");
    assert_eq!(effects, [shared(D, 4, "s", 103)]);
}

#[test]
fn a_big_take_at_the_head_keeps_smaller_ones_behind_it() {
    let mut t = Fixture::new();
    t.take(A, "s", 3, 2, 1);
    assert_eq!(t.take(B, "s", 3, 2, 2), [], "needs 2, 1 free");
    assert_eq!(t.take(C, "s", 3, 1, 3), [], "1 is free, but B is ahead");
    let (_, effects) = t.unlock(A, "s");
    assert_eq!(effects, [shared(B, 2, "s", 101), shared(C, 3, "s", 102)]);
}

#[test]
fn everyone_under_one_name_agrees_on_the_permits_and_the_kind() {
    let mut t = Fixture::new();
    t.take(A, "s", 3, 1, 1);
    let refused = |reason| {
        vec![Effect::Refused {
            client: B,
            tag: 2,
            reason,
        }]
    };
    let in_force = Refusal::KindDiffers { permits: Some(3) };
    assert_eq!(t.take(B, "s", 4, 1, 2), refused(in_force.clone()));
    assert_eq!(
        t.lock(B, "s", Mode::Shared, None, 2),
        refused(in_force.clone())
    );
    assert_eq!(t.lock_all(B, &[("s", X)], None, 2), refused(in_force));
    t.lock(A, "m", X, None, 3);
    let mutex = Refusal::KindDiffers { permits: None };
    assert_eq!(t.take(B, "m", 2, 1, 2), refused(mutex));
    // Once nobody holds or waits for it, a name starts afresh.
    t.unlock(A, "s");
    assert_eq!(t.take(B, "s", 4, 4, 2), [shared(B, 2, "s", 102)]);
}

#[test]
fn asking_again_for_held_permits_returns_the_grant_or_names_the_take_held() {
    let mut t = Fixture::new();
    t.take(A, "s", 3, 2, 1);
    assert_eq!(t.take(A, "s", 3, 2, 2), [shared(A, 2, "s", 100)]);
    let refused = Effect::Refused {
        client: A,
        tag: 3,
        reason: Refusal::HeldWithOtherTake(2),
    };
    assert_eq!(t.take(A, "s", 3, 1, 3), [refused]);
}

#[test]
fn a_semaphore_grant_is_reclaimed_only_if_the_permits_allow() {
    let mut t = Fixture::new();
    t.take(A, "s", 2, 1, 1);
    let reclaim = |t: &mut Fixture, client, take, token, tag| {
        let request = Reclaim {
            client,
            lock: "s",
            mode: Mode::Shared,
            semaphore: Some(Permits { of: 2, take }),
            token,
            tag,
        };
        t.table.reclaim(request, t.now, &mut t.out);
        t.check()
    };
    assert_eq!(reclaim(&mut t, B, 1, 7, 2), [shared(B, 2, "s", 7)]);
    let got = reclaim(&mut t, C, 1, 8, 3);
    assert!(
        matches!(
            got[..],
            [Effect::Refused {
                reason: Refusal::ReclaimConflict { .. },
                ..
            }]
        ),
        "a third permit of two: {got:?}"
    );
}

#[test]
fn a_multi_lock_waits_holding_nothing_and_is_granted_all_at_once_with_one_token() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    let locks = [("x", X), ("y", Mode::Shared)];
    assert_eq!(t.lock_all(B, &locks, None, 2), [], "x is held");
    assert!(
        t.table.get("y").is_some_and(|v| v.holders().count() == 0),
        "holds nothing"
    );
    // C came after B: FIFO per name puts it behind B's wait on y.
    assert_eq!(t.lock(C, "y", X, None, 3), []);
    let (_, effects) = t.unlock(A, "x");
    assert_eq!(effects, [granted_all(B, 2, &locks, 101)]);
    let (_, effects) = t.unlock(B, "y");
    assert_eq!(
        effects,
        [granted(C, 3, "y", 102)],
        "releasing one lock of a multi-grant"
    );
    assert!(
        t.table
            .get("x")
            .is_some_and(|v| v.holders().any(|h| h.client == B && h.token == 101))
    );
}

#[test]
fn a_free_multi_lock_is_granted_at_once_and_a_try_that_cannot_be_is_a_timeout() {
    let mut t = Fixture::new();
    let locks = [("x", X), ("y", X)];
    assert_eq!(
        t.lock_all(A, &locks, Some(0), 1),
        [granted_all(A, 1, &locks, 100)]
    );
    assert_eq!(
        t.lock_all(B, &[("z", X), ("y", X)], Some(0), 2),
        [Effect::TimedOut { client: B, tag: 2 }]
    );
    assert!(
        t.table.get("z").is_none(),
        "a try that fails leaves no trace"
    );
}

#[test]
fn unlocking_one_name_of_a_waiting_multi_lock_withdraws_all_of_it() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock_all(B, &[("x", X), ("y", X)], None, 2);
    let (unlocked, effects) = t.unlock(B, "y");
    assert_eq!(unlocked, Unlocked::Withdrawn);
    assert_eq!(effects, [Effect::Cancelled { client: B, tag: 2 }]);
    assert_eq!(t.table.entries(), 1, "only A's hold is left");
    assert_eq!(t.lock(C, "y", X, None, 3), [granted(C, 3, "y", 101)]);
}

#[test]
fn a_multi_lock_times_out_as_a_whole_once() {
    let mut t = Fixture::new();
    t.lock(A, "y", X, None, 1);
    t.lock_all(B, &[("x", X), ("y", X)], Some(50), 2);
    assert_eq!(t.lock(C, "x", X, None, 3), [], "behind B's wait on x");
    assert_eq!(
        t.advance(60),
        [
            Effect::TimedOut { client: B, tag: 2 },
            granted(C, 3, "x", 101)
        ]
    );
    assert_eq!(t.advance(60), []);
}

#[test]
fn a_departing_multi_lock_is_never_granted_and_lets_the_others_in() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock_all(B, &[("x", X), ("y", X)], None, 2);
    t.lock(C, "y", X, None, 3);
    let (departure, effects) = t.disconnect(B);
    assert_eq!(departure.withdrawn, 2);
    assert_eq!(effects, [granted(C, 3, "y", 101)]);
    // A multi-lock whose owner leaves while its releases grant others:
    // D holds y and waits for x with z; its departure grants E y, not D x.
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock(D, "y", X, None, 2);
    t.lock_all(D, &[("x", X), ("z", X)], None, 3);
    t.lock(E, "y", X, None, 4);
    let (_, effects) = t.disconnect(D);
    assert_eq!(effects, [granted(E, 4, "y", 102)]);
    let (_, effects) = t.unlock(A, "x");
    assert_eq!(effects, []);
}

#[test]
fn a_wait_that_closes_a_cycle_is_answered_deadlock_and_never_queued() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock(B, "y", X, None, 2);
    assert_eq!(
        t.lock(A, "y", X, None, 3),
        [],
        "A waits for B: no cycle yet"
    );
    let effects = t.lock(B, "x", X, Some(60_000), 4);
    assert_eq!(cycle_of(&effects), [(B, "x"), (A, "y")]);
    assert_eq!(t.table.totals().waiting, 1, "B's request was not queued");
    // Ending the cycle some other way lets everyone go on.
    let (_, effects) = t.unlock(B, "y");
    assert_eq!(effects, [granted(A, 3, "y", 102)]);
}

#[test]
fn waiting_behind_a_queued_request_counts_as_waiting_for_it() {
    // A holds x shared; B waits for x exclusive; C holds y and asks for x
    // shared: it queues behind B. Then A asking for y closes A, C, B.
    let mut t = Fixture::new();
    t.lock(A, "x", Mode::Shared, None, 1);
    t.lock(B, "x", X, None, 2);
    t.lock(C, "y", X, None, 3);
    assert_eq!(t.lock(C, "x", Mode::Shared, None, 4), []);
    let effects = t.lock(A, "y", X, None, 5);
    assert_eq!(cycle_of(&effects), [(A, "y"), (C, "x"), (B, "x")]);
}

#[test]
fn a_semaphore_wait_is_a_deadlock_only_when_the_stuck_hold_too_many_permits() {
    let mut t = Fixture::new();
    t.take(A, "s", 2, 1, 1);
    t.take(B, "s", 2, 1, 2);
    t.lock(C, "x", X, None, 3);
    assert_eq!(t.lock(A, "x", X, None, 4), [], "A waits for C");
    // C waits for a permit: A's is stuck behind C, but B's will come back.
    assert_eq!(t.take(C, "s", 2, 1, 5), [], "not a deadlock: B can release");
    // Now B waits for x too: both permits are held by stuck connections.
    let effects = t.lock(B, "x", X, None, 6);
    let cycle = cycle_of(&effects);
    assert_eq!(cycle.first(), Some(&(B, "x")));
    assert!(cycle.contains(&(C, "s")), "{cycle:?}");
}

#[test]
fn shared_holders_of_a_lock_do_not_make_a_cycle_between_shared_waiters() {
    let mut t = Fixture::new();
    t.lock(A, "x", Mode::Shared, None, 1);
    t.lock(B, "y", X, None, 2);
    assert_eq!(t.lock(A, "y", X, None, 3), []);
    // B asks x shared: A holds it shared, so B is granted at once.
    assert_eq!(
        t.lock(B, "x", Mode::Shared, None, 4),
        [shared(B, 4, "x", 102)]
    );
}

#[test]
fn multi_locks_in_opposite_orders_never_deadlock_each_other() {
    let mut t = Fixture::new();
    t.lock(C, "x", X, None, 1);
    assert_eq!(t.lock_all(A, &[("x", X), ("y", X)], None, 2), []);
    assert_eq!(t.lock_all(B, &[("y", X), ("x", X)], None, 3), []);
    let (_, effects) = t.unlock(C, "x");
    assert_eq!(effects, [granted_all(A, 2, &[("x", X), ("y", X)], 101)]);
    let (_, effects) = t.unlock(A, "x");
    assert_eq!(effects, []);
    let (_, effects) = t.unlock(A, "y");
    assert_eq!(effects, [granted_all(B, 3, &[("y", X), ("x", X)], 102)]);
}

#[test]
fn a_multi_lock_closing_a_cycle_is_a_deadlock_too() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock(B, "y", X, None, 2);
    t.lock(A, "y", X, None, 3);
    let effects = t.lock_all(B, &[("z", X), ("x", X)], None, 4);
    assert_eq!(cycle_of(&effects), [(B, "x"), (A, "y")]);
    assert!(t.table.get("z").is_none(), "nothing of it was queued");
}

#[test]
fn with_the_check_off_a_cycle_is_queued() {
    let mut t = Fixture::new();
    t.table.set_deadlock_detection(false);
    t.lock(A, "x", X, None, 1);
    t.lock(B, "y", X, None, 2);
    t.lock(A, "y", X, None, 3);
    assert_eq!(t.lock(B, "x", X, None, 4), []);
    assert_eq!(t.table.totals().waiting, 2);
}

#[test]
fn a_connection_run_by_a_holder_makes_the_holder_wait_for_its_waits() {
    // `pklock run x -- pklock run y -- ...` (A holds x, its child C waits
    // for y) against `pklock run y -- pklock run x -- ...` (B holds y, its
    // child D asks for x): D's wait closes A -> C -> B -> D -> A.
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.table.link(C, A);
    t.lock(B, "y", X, None, 2);
    t.table.link(D, B);
    assert_eq!(
        t.lock(C, "y", X, None, 3),
        [],
        "C waits for B: no cycle yet"
    );
    let effects = t.lock(D, "x", X, None, 4);
    // B waits for x through D; A, holding x, waits for y through C.
    assert_eq!(cycle_of(&effects), [(B, "x"), (A, "y")]);
    // Without the links the server cannot tell: D's wait is queued.
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock(B, "y", X, None, 2);
    t.lock(C, "y", X, None, 3);
    assert_eq!(t.lock(D, "x", X, None, 4), []);
}

#[test]
fn only_a_connection_that_holds_nothing_can_be_linked_once_and_links_go_with_it() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock(C, "z", X, None, 2);
    t.table.link(C, A);
    t.table.link(A, C);
    t.lock(B, "y", X, None, 3);
    t.table.link(D, B);
    t.table.disconnect(B, t.now, &mut t.out);
    t.check();
    // D is no longer run by anyone: B's departure took the link with it.
    t.lock(B, "w", X, None, 4);
    t.lock(D, "w", X, None, 5);
    assert_eq!(t.lock(B, "w2", X, None, 6).len(), 1);
    // C held z when asked to be linked: not linked. So A asking for z,
    // held by C, while C waits for x, held by A, is the only cycle.
    assert_eq!(t.lock(C, "x", X, None, 7), []);
    let effects = t.lock(A, "z", X, None, 8);
    assert_eq!(cycle_of(&effects), [(A, "z"), (C, "x")]);
}

#[test]
fn a_check_too_big_to_finish_queues_the_wait_unchecked_and_counts_it() {
    let mut table: LockTable<u32> = LockTable::new(1, 10, 100_000);
    let now = Instant::now();
    let mut out = Vec::new();
    let mut ask = |table: &mut LockTable<u32>, client: u64, lock: &str| {
        let request = LockRequest {
            client: ClientId(client),
            lock,
            mode: X,
            semaphore: None,
            timeout: None,
            tag: 0,
        };
        table.lock(request, now, &mut out);
    };
    ask(&mut table, 1, "big");
    let crowd = super::deadlock::CHECK_STEPS as u64 + 10;
    for client in 10..10 + crowd {
        ask(&mut table, client, "big");
    }
    assert_eq!(
        table.totals().deadlock_checks_cut,
        0,
        "waiters holding nothing: passed at once"
    );
    ask(&mut table, 2, "mine");
    ask(&mut table, 2, "big");
    assert_eq!(
        table.totals().deadlock_checks_cut,
        0,
        "nobody waits for 2: passed at once"
    );
    ask(&mut table, 3, "theirs");
    ask(&mut table, 4, "theirs");
    ask(&mut table, 3, "big");
    assert_eq!(
        table.totals().deadlock_checks_cut,
        1,
        "4 waits for 3: the walk ran out"
    );
    assert_eq!(
        table.totals().waiting,
        crowd as usize + 3,
        "queued all the same"
    );
    table.check_invariants().unwrap();
}

#[test]
fn a_connection_with_several_requests_waiting_is_checked_once_one_is_left() {
    let mut t = Fixture::new();
    t.lock(A, "x", X, None, 1);
    t.lock(B, "y", X, None, 2);
    t.lock(C, "z", X, None, 3);
    assert_eq!(t.lock(B, "z", X, None, 4), []);
    // B's second request: it may come from another thread, not waiting for
    // the first; B is taken as able to go on.
    assert_eq!(t.lock(B, "x", X, None, 5), []);
    assert_eq!(
        t.lock(A, "y", X, None, 6),
        [],
        "B is not stuck while it has two"
    );
    // z goes to B: its one request left, for x, now closes B -> A -> B.
    let (_, effects) = t.unlock(C, "z");
    assert_eq!(effects[0], granted(B, 4, "z", 103));
    match &effects[1..] {
        [Effect::Deadlock { client, tag, cycle }] => {
            assert_eq!((*client, *tag), (B, 5));
            let cycle: Vec<(ClientId, &str)> = cycle.iter().map(|(c, n)| (*c, &**n)).collect();
            assert_eq!(cycle, [(B, "x"), (A, "y")]);
        }
        other => panic!("expected B's wait for x answered deadlock, got {other:?}"),
    }
    assert!(
        t.table.get("x").is_some_and(|v| v.waiters().count() == 0),
        "and out of the queue"
    );
    let (_, effects) = t.unlock(B, "y");
    assert_eq!(effects, [granted(A, 6, "y", 104)]);
}

#[test]
fn a_cycle_starts_with_the_lock_asked_for_even_when_an_older_wait_closes_a_shorter_one() {
    // A waits for a permit of s, where B (and E, who waits for nothing)
    // hold one each: not stuck, as E's permit will come back. B waits for m,
    // which A holds: A -s-> B -m-> A is a cycle of edges, but no deadlock.
    let mut t = Fixture::new();
    t.take(B, "s", 2, 1, 1);
    t.take(E, "s", 2, 1, 2);
    t.lock(A, "m", X, None, 3);
    assert_eq!(t.take(A, "s", 2, 1, 4), []);
    assert_eq!(t.lock(B, "m", X, None, 5), []);
    t.lock(C, "n", X, None, 6);
    t.lock(D, "o", X, None, 7);
    assert_eq!(t.lock(C, "o", X, None, 8), []);
    assert_eq!(t.lock(D, "m", X, None, 9), []);
    // A asking for n would close A -n-> C -o-> D -m-> A; but A has another
    // request waiting, so it is taken as able to go on, until E's permit
    // comes back and its request for s is granted. Then n closes the cycle
    // to report: A -s-> B -m-> A was shorter, but s kept nobody waiting.
    assert_eq!(t.lock(A, "n", X, None, 10), []);
    let (_, effects) = t.unlock(E, "s");
    assert_eq!(effects[0], shared(A, 4, "s", 105));
    assert_eq!(cycle_of(&effects[1..]), [(A, "n"), (C, "o"), (D, "m")]);
}
