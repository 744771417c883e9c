//! Reclaims after a restart: which claims to a grant of the previous run are
//! honoured (while the window lasts, for a token of an earlier run, with a
//! proof that verifies, and once per grant) and what the clean stop, if
//! any, said was held. No IO and no lock table: the core asks here, then
//! hands an honoured claim to the table, which checks it excludes nobody.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::lock_table::Mode;
use crate::proof::ProofKey;
use crate::tokens::{HeldLock, PreviousRun};

/// Why a reclaim is not honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotHonoured {
    /// Not during the restart grace: locks may have been granted since.
    WindowClosed,
    /// The token is of this run, not an earlier one.
    NotEarlier,
    /// The proof is not the one this server's key gives that grant.
    BadProof,
    /// The previous run stopped cleanly without that grant in force.
    NotHeldAtStop,
    /// That grant has been reclaimed already during this run.
    AlreadyReclaimed,
}

impl fmt::Display for NotHonoured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotHonoured::WindowClosed => {
                "the server gives back locks of an earlier run only during its restart grace, \
                 and that is over (or never was: this run granted the lock, or started fresh)"
            }
            NotHonoured::NotEarlier => "the token is of this run, not of an earlier one",
            NotHonoured::BadProof => {
                "the proof does not match this lock, mode and token (or the server's grant key \
                 changed)"
            }
            NotHonoured::NotHeldAtStop => {
                "the previous run stopped cleanly, and this grant was not in force then"
            }
            NotHonoured::AlreadyReclaimed => "this grant has been reclaimed already",
        })
    }
}

/// Grants of an earlier run that a stop must not forget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StillOwed {
    /// None: the window is closed (or never opened).
    Nothing,
    /// Any grant of the run before a crash may still be reclaimed: the next
    /// run must take this stop for a crash too.
    Unknown,
    /// These grants, listed at the last clean stop and not reclaimed yet.
    Listed(Vec<HeldLock>),
}

/// Grants by token: the locks (with their modes) each token was granted for.
type GrantsByToken = HashMap<u64, Vec<(Box<str>, Mode)>>;

/// The rules for reclaims during one run.
#[derive(Debug)]
pub struct Recovery {
    key: ProofKey,
    /// Tokens below this are of an earlier run.
    first_token: u64,
    /// Reclaims are honoured before this; `None` when they never are, or no longer.
    until: Option<Instant>,
    /// After a clean stop: the grants in force then, by token (a
    /// multi-lock's one token covers several locks). `None` after a crash,
    /// when any grant of an earlier run may be reclaimed.
    listed: Option<GrantsByToken>,
    /// Grants reclaimed so far, by token and lock; each is given back once.
    reclaimed: HashSet<(u64, Box<str>)>,
}

impl Recovery {
    /// The rules for a run whose first token is `first_token`, started at
    /// `now` after `previous`, honouring reclaims for `window`.
    pub fn new(
        key: ProofKey,
        first_token: u64,
        previous: &PreviousRun,
        now: Instant,
        window: Duration,
    ) -> Recovery {
        let (until, listed) = match previous {
            PreviousRun::None => (None, None),
            PreviousRun::Stopped(held) if held.is_empty() => (None, None),
            PreviousRun::Stopped(held) => (now.checked_add(window), Some(by_token(held))),
            PreviousRun::Unknown => (now.checked_add(window), None),
        };
        Recovery {
            key,
            first_token,
            until: until.filter(|_| !window.is_zero()),
            listed,
            reclaimed: HashSet::new(),
        }
    }

    /// The key that signs this run's grants.
    pub fn key(&self) -> &ProofKey {
        &self.key
    }

    /// Whether a claim to the grant of `lock` in `mode` with `token` may be
    /// honoured at `now`, as far as these rules go.
    pub fn check(
        &self,
        lock: &str,
        mode: Mode,
        token: u64,
        proof: &str,
        now: Instant,
    ) -> Result<(), NotHonoured> {
        if self.until.is_none_or(|until| now >= until) {
            return Err(NotHonoured::WindowClosed);
        }
        if token >= self.first_token {
            return Err(NotHonoured::NotEarlier);
        }
        if !self.key.verify(lock, mode, token, proof) {
            return Err(NotHonoured::BadProof);
        }
        if let Some(listed) = &self.listed {
            let held = listed.get(&token).is_some_and(|grants| {
                grants
                    .iter()
                    .any(|(name, listed_mode)| **name == *lock && *listed_mode == mode)
            });
            if !held {
                return Err(NotHonoured::NotHeldAtStop);
            }
        }
        if self.reclaimed.contains(&(token, Box::from(lock))) {
            return Err(NotHonoured::AlreadyReclaimed);
        }
        Ok(())
    }

    /// Records that the grant of `lock` with `token` was given back.
    pub fn honoured(&mut self, token: u64, lock: &str) {
        self.reclaimed.insert((token, Box::from(lock)));
    }

    /// How much longer reclaims are honoured, from `now`.
    pub fn open_for(&self, now: Instant) -> Duration {
        self.until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }

    /// When the window closes, while it is open.
    pub fn closes_at(&self) -> Option<Instant> {
        self.until
    }

    /// Grants listed at the clean stop and not reclaimed (yet); `None` after
    /// a crash, when nobody knows.
    pub fn listed_left(&self) -> Option<usize> {
        let listed = self.listed.as_ref()?;
        Some(
            listed
                .iter()
                .flat_map(|(token, grants)| grants.iter().map(move |(name, _)| (*token, name)))
                .filter(|(token, name)| !self.reclaimed.contains(&(*token, (*name).clone())))
                .count(),
        )
    }

    /// What a stop at `now` must pass on to the next run, beside the grants
    /// then in force: while the window is open, grants of the previous run
    /// that may still be reclaimed.
    pub fn still_owed(&self, now: Instant) -> StillOwed {
        if self.until.is_none_or(|until| until <= now) {
            return StillOwed::Nothing;
        }
        let Some(listed) = &self.listed else {
            return StillOwed::Unknown;
        };
        let mut owed: Vec<HeldLock> = listed
            .iter()
            .flat_map(|(&token, grants)| grants.iter().map(move |grant| (token, grant)))
            .filter(|(token, (name, _))| !self.reclaimed.contains(&(*token, name.clone())))
            .map(|(token, (name, mode))| HeldLock {
                lock_name: name.to_string(),
                mode: *mode,
                token,
            })
            .collect();
        owed.sort_unstable_by(|a, b| (a.token, &a.lock_name).cmp(&(b.token, &b.lock_name)));
        StillOwed::Listed(owed)
    }

    /// Closes the window once its time has come, forgetting the lists;
    /// true when this call closed it.
    pub fn close_if_due(&mut self, now: Instant) -> bool {
        if self.until.is_none_or(|until| until > now) {
            return false;
        }
        self.until = None;
        self.listed = None;
        self.reclaimed = HashSet::new();
        true
    }
}

fn by_token(held: &[HeldLock]) -> GrantsByToken {
    let mut by_token = GrantsByToken::new();
    for lock in held {
        by_token
            .entry(lock.token)
            .or_default()
            .push((Box::from(lock.lock_name.as_str()), lock.mode));
    }
    by_token
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: u64 = 1_000;
    const WINDOW: Duration = Duration::from_secs(10);

    fn held(name: &str, mode: Mode, token: u64) -> HeldLock {
        HeldLock {
            lock_name: name.to_string(),
            mode,
            token,
        }
    }

    #[test]
    fn after_a_crash_any_genuine_earlier_grant_is_honoured_once_within_the_window() {
        let now = Instant::now();
        let key = ProofKey::ephemeral();
        let mut recovery = Recovery::new(key.clone(), FIRST, &PreviousRun::Unknown, now, WINDOW);
        let proof = key.sign("a", Mode::Exclusive, 5);
        assert_eq!(recovery.check("a", Mode::Exclusive, 5, &proof, now), Ok(()));
        assert_eq!(
            recovery.check("a", Mode::Shared, 5, &proof, now),
            Err(NotHonoured::BadProof),
            "the mode is part of the grant"
        );
        assert_eq!(
            recovery.check("b", Mode::Exclusive, 5, &proof, now),
            Err(NotHonoured::BadProof)
        );
        let late = key.sign("a", Mode::Exclusive, FIRST);
        assert_eq!(
            recovery.check("a", Mode::Exclusive, FIRST, &late, now),
            Err(NotHonoured::NotEarlier)
        );
        recovery.honoured(5, "a");
        assert_eq!(
            recovery.check("a", Mode::Exclusive, 5, &proof, now),
            Err(NotHonoured::AlreadyReclaimed)
        );
        let proof6 = key.sign("c", Mode::Shared, 6);
        assert_eq!(
            recovery.check("c", Mode::Shared, 6, &proof6, now + WINDOW),
            Err(NotHonoured::WindowClosed)
        );
        assert!(recovery.close_if_due(now + WINDOW));
        assert_eq!(recovery.open_for(now), Duration::ZERO);
    }

    #[test]
    fn each_lock_of_a_multi_lock_grant_is_reclaimed_once_with_the_one_token() {
        let now = Instant::now();
        let key = ProofKey::ephemeral();
        let previous = PreviousRun::Stopped(vec![
            held("a", Mode::Exclusive, 9),
            held("b", Mode::Shared, 9),
        ]);
        let mut recovery = Recovery::new(key.clone(), FIRST, &previous, now, WINDOW);
        assert_eq!(recovery.listed_left(), Some(2));
        for (name, mode) in [("a", Mode::Exclusive), ("b", Mode::Shared)] {
            let proof = key.sign(name, mode, 9);
            assert_eq!(recovery.check(name, mode, 9, &proof, now), Ok(()), "{name}");
            recovery.honoured(9, name);
            assert_eq!(
                recovery.check(name, mode, 9, &proof, now),
                Err(NotHonoured::AlreadyReclaimed)
            );
        }
        assert_eq!(recovery.listed_left(), Some(0));
    }

    #[test]
    fn after_a_clean_stop_only_the_grants_then_in_force_are_honoured() {
        let now = Instant::now();
        let key = ProofKey::ephemeral();
        let previous = PreviousRun::Stopped(vec![
            held("a", Mode::Exclusive, 5),
            held("s", Mode::Shared, 7),
        ]);
        let mut recovery = Recovery::new(key.clone(), FIRST, &previous, now, WINDOW);
        assert_eq!(recovery.listed_left(), Some(2));
        let stale = key.sign("a", Mode::Exclusive, 3);
        assert_eq!(
            recovery.check("a", Mode::Exclusive, 3, &stale, now),
            Err(NotHonoured::NotHeldAtStop),
            "an older grant of the same lock, released before the stop"
        );
        let proof = key.sign("s", Mode::Shared, 7);
        assert_eq!(recovery.check("s", Mode::Shared, 7, &proof, now), Ok(()));
        recovery.honoured(7, "s");
        assert_eq!(recovery.listed_left(), Some(1));
        assert_eq!(
            recovery.still_owed(now),
            StillOwed::Listed(vec![held("a", Mode::Exclusive, 5)]),
            "a stop now passes on what is not reclaimed yet"
        );
        assert_eq!(recovery.still_owed(now + WINDOW), StillOwed::Nothing);
        let after_crash = Recovery::new(key, FIRST, &PreviousRun::Unknown, now, WINDOW);
        assert_eq!(after_crash.still_owed(now), StillOwed::Unknown);
    }

    #[test]
    fn a_first_start_or_a_stop_holding_nothing_honours_no_reclaim() {
        let now = Instant::now();
        let key = ProofKey::ephemeral();
        let proof = key.sign("a", Mode::Exclusive, 5);
        for previous in [PreviousRun::None, PreviousRun::Stopped(Vec::new())] {
            let recovery = Recovery::new(key.clone(), FIRST, &previous, now, WINDOW);
            assert_eq!(
                recovery.check("a", Mode::Exclusive, 5, &proof, now),
                Err(NotHonoured::WindowClosed)
            );
        }
    }
}
