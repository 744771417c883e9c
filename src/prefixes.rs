//! A set of lock-name prefixes, kept as the disjoint ranges of names they
//! cover: what ACL rules and per-lock metrics series are given on.

/// Sorted prefixes, none of which starts with another (it would add
/// nothing): the lock names they cover are disjoint ranges in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prefixes(Vec<String>);

impl From<Vec<String>> for Prefixes {
    fn from(mut all: Vec<String>) -> Prefixes {
        all.sort();
        all.dedup();
        let mut kept: Vec<String> = Vec::with_capacity(all.len());
        for prefix in all {
            // Sorted, so a shorter prefix covering this one came just before.
            if kept
                .last()
                .is_some_and(|last| prefix.starts_with(last.as_str()))
            {
                continue;
            }
            kept.push(prefix);
        }
        Prefixes(kept)
    }
}

impl Prefixes {
    /// The prefixes, in name order.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Whether a prefix starts `name`.
    pub fn covers(&self, name: &str) -> bool {
        // The one candidate is the last prefix sorting at or before `name`.
        let at = self.0.partition_point(|prefix| prefix.as_str() <= name);
        at > 0
            && self
                .0
                .get(at - 1)
                .is_some_and(|prefix| name.starts_with(prefix.as_str()))
    }
}
