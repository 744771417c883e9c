//! [`Lane`]: entries kept in increasing key order, found by binary search and
//! removed from anywhere in O(log n) amortized time. A lock's holders (keyed
//! by token) and its waiters (keyed by arrival) each sit in one.

use std::collections::VecDeque;

// A lane's memory per entry is bounded: at most 2 * len + SPARE_HOLES slots
// after any removal, in at most four times that capacity (or KEPT_CAPACITY).
// Both are small so that a few entries left in a lane that once held many,
// or with holes between them, cost little more than their own slots (see
// max_lock_entries in config/settings.example.toml).

/// Holes tolerated beyond one per entry before they are squeezed out: a
/// squeeze is a pass over the lane, so it waits until enough holes pay for it.
const SPARE_HOLES: usize = 4;

/// Below this capacity a lane keeps its memory when it shrinks.
const KEPT_CAPACITY: usize = 8;

/// Entries in increasing key order. Removing one leaves a hole where it was,
/// so that nothing moves and a lookup stays a binary search; holes at either
/// end are dropped at once, and the others are squeezed out when they
/// outnumber the entries. The memory follows the entries down as well as up.
#[derive(Clone, Debug)]
pub(super) struct Lane<V> {
    slots: VecDeque<Slot<V>>,
    /// Slots that are not holes.
    len: usize,
}

#[derive(Clone, Debug)]
struct Slot<V> {
    key: u64,
    /// `None` is a hole.
    value: Option<V>,
}

impl<V> Lane<V> {
    pub(super) const fn new() -> Self {
        Lane {
            slots: VecDeque::new(),
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends an entry, whose key must be above every key in the lane.
    pub(super) fn push_back(&mut self, key: u64, value: V) {
        debug_assert!(
            self.slots.back().is_none_or(|last| last.key < key),
            "lane keys must increase"
        );
        self.slots.push_back(Slot {
            key,
            value: Some(value),
        });
        self.len += 1;
    }

    /// Puts an entry in its place by key; false (and nothing changes) if an
    /// entry with that key is there already. Costs a shift of the entries
    /// after it, so it is for the rare entry that comes out of order.
    pub(super) fn insert(&mut self, key: u64, value: V) -> bool {
        match self.slots.binary_search_by_key(&key, |slot| slot.key) {
            Ok(index) => match self.slots.get_mut(index) {
                Some(slot) if slot.value.is_none() => {
                    slot.value = Some(value);
                    self.len += 1;
                    true
                }
                _ => false,
            },
            Err(index) => {
                self.slots.insert(
                    index,
                    Slot {
                        key,
                        value: Some(value),
                    },
                );
                self.len += 1;
                true
            }
        }
    }

    /// The first entry (never a hole: holes at the ends are dropped).
    pub(super) fn front(&self) -> Option<(u64, &V)> {
        let slot = self.slots.front()?;
        slot.value.as_ref().map(|value| (slot.key, value))
    }

    /// The entry with the highest key (never a hole: holes at the ends go
    /// at once).
    pub(super) fn back(&self) -> Option<(u64, &V)> {
        let slot = self.slots.back()?;
        slot.value.as_ref().map(|value| (slot.key, value))
    }

    pub(super) fn pop_front(&mut self) -> Option<(u64, V)> {
        let slot = self.slots.pop_front()?;
        let value = slot.value?;
        self.len -= 1;
        self.tidy();
        Some((slot.key, value))
    }

    pub(super) fn get(&self, key: u64) -> Option<&V> {
        let index = self.find(key)?;
        self.slots.get(index)?.value.as_ref()
    }

    pub(super) fn remove(&mut self, key: u64) -> Option<V> {
        let index = self.find(key)?;
        let value = self.slots.get_mut(index)?.value.take()?;
        self.len -= 1;
        self.tidy();
        Some(value)
    }

    /// The entries in key order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.slots
            .iter()
            .filter_map(|slot| slot.value.as_ref().map(|value| (slot.key, value)))
    }

    /// The entries whose keys are in `from..to`, in key order.
    pub(super) fn range(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, &V)> + '_ {
        let start = self.slots.partition_point(|slot| slot.key < from);
        self.slots
            .range(start..)
            .take_while(move |slot| slot.key < to)
            .filter_map(|slot| slot.value.as_ref().map(|value| (slot.key, value)))
    }

    /// Checks the lane's own promises; `Err` names the first broken one.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.slots.front().is_some_and(|s| s.value.is_none())
            || self.slots.back().is_some_and(|s| s.value.is_none())
        {
            return Err("a hole at an end of a lane".to_string());
        }
        if self.slots.iter().filter(|s| s.value.is_some()).count() != self.len {
            return Err("a lane's length is off".to_string());
        }
        if self.slots.len() > 2 * self.len + SPARE_HOLES {
            return Err("holes outnumber a lane's entries".to_string());
        }
        let capacity = self.slots.capacity();
        if capacity > KEPT_CAPACITY && capacity > 4 * self.slots.len() {
            return Err(format!(
                "a lane keeps room for {capacity} with {} slots",
                self.slots.len()
            ));
        }
        let keys = self.slots.iter().map(|s| s.key);
        if keys.clone().zip(keys.skip(1)).any(|(a, b)| a >= b) {
            return Err("a lane's keys are out of order".to_string());
        }
        Ok(())
    }

    fn find(&self, key: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&key, |slot| slot.key).ok()
    }

    /// Drops holes at the ends, squeezes out the others once they outnumber
    /// the entries, and gives memory back once three quarters of it is unused.
    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|s| s.value.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|s| s.value.is_none()) {
            self.slots.pop_back();
        }
        if self.slots.len() > 2 * self.len + SPARE_HOLES {
            self.slots.retain(|slot| slot.value.is_some());
        }
        let capacity = self.slots.capacity();
        if capacity > KEPT_CAPACITY && capacity > 4 * self.slots.len() {
            self.slots.shrink_to(2 * self.slots.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<V>(lane: &Lane<V>) -> Vec<u64> {
        lane.iter().map(|(key, _)| key).collect()
    }

    #[test]
    fn entries_come_out_in_key_order_wherever_they_are_removed() {
        let mut lane = Lane::new();
        for key in 0..10u64 {
            lane.push_back(key * 10, key);
        }
        assert_eq!(lane.remove(50), Some(5));
        assert_eq!(lane.remove(50), None, "removed once");
        assert_eq!(lane.remove(55), None, "never there");
        assert_eq!(lane.remove(0), Some(0));
        assert_eq!(lane.remove(90), Some(9));
        lane.check().unwrap();
        assert_eq!(keys(&lane), [10, 20, 30, 40, 60, 70, 80]);
        assert_eq!(lane.front(), Some((10, &1)));
        assert_eq!(lane.get(60), Some(&6));
        assert_eq!(lane.pop_front(), Some((10, 1)));
        assert_eq!(lane.len(), 6);
        lane.push_back(100, 10);
        assert_eq!(keys(&lane), [20, 30, 40, 60, 70, 80, 100]);
        lane.check().unwrap();
        let between: Vec<u64> = lane.range(25, 70).map(|(key, _)| key).collect();
        assert_eq!(
            between,
            [30, 40, 60],
            "from inclusive, to exclusive, holes skipped"
        );
        assert_eq!(lane.range(101, u64::MAX).count(), 0);
    }

    #[test]
    fn an_entry_out_of_order_is_inserted_in_its_place_once() {
        let mut lane = Lane::new();
        for key in [10u64, 20, 30, 40] {
            lane.push_back(key, key);
        }
        assert_eq!(lane.remove(20), Some(20));
        assert!(lane.insert(20, 21), "into the hole");
        assert!(lane.insert(5, 5), "before the first");
        assert!(lane.insert(35, 35), "between two");
        assert!(!lane.insert(30, 0), "a key already there");
        assert_eq!(lane.get(30), Some(&30));
        lane.check().unwrap();
        assert_eq!(keys(&lane), [5, 10, 20, 30, 35, 40]);
        assert_eq!(lane.len(), 6);
    }

    #[test]
    fn holes_do_not_pile_up_and_memory_follows_the_entries_down() {
        let mut lane = Lane::new();
        for key in 0..100_000u64 {
            lane.push_back(key, ());
        }
        // Every entry but the first and the last ten, every other one first,
        // so that holes cannot just fall off an end.
        let odd = (1..99_990u64).filter(|key| key % 2 == 1);
        let even = (1..99_990u64).filter(|key| key % 2 == 0);
        for (i, key) in odd.chain(even).enumerate() {
            assert!(lane.remove(key).is_some());
            if i % 1000 == 0 {
                lane.check().unwrap();
            }
        }
        lane.check().unwrap();
        assert_eq!(lane.len(), 11);
        assert!(lane.slots.len() <= 2 * 11 + SPARE_HOLES);
        assert!(
            lane.slots.capacity() <= 4 * lane.slots.len(),
            "capacity {} kept for {} entries",
            lane.slots.capacity(),
            lane.len()
        );
        while lane.pop_front().is_some() {}
        assert!(lane.is_empty());
        assert!(lane.slots.capacity() <= KEPT_CAPACITY);
    }
}
