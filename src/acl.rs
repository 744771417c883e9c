//! Who may do what to which locks: the `[[acl]]` rules, each giving a
//! principal rights (`lock`, `status`, `admin`) on lock-name prefixes, and
//! the [`Grants`] one principal ends up with. Pure data; the core asks.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::prefixes::Prefixes;
use crate::protocol::ANONYMOUS;

/// What a rule allows on its prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Take locks and wait for them.
    Lock,
    /// See holders and waiters in `status`.
    Status,
    /// `stats`, and `forceRelease`.
    Admin,
}

/// One `[[acl]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// A principal's name, or `anonymous`.
    pub principal: String,
    /// Lock-name prefixes (`""` is every name).
    pub prefixes: Vec<String>,
    /// What the principal may do under them.
    pub rights: Vec<Right>,
}

/// The rules in force. Without any rule every connection may do
/// everything, as before there were rules; with rules, only what they give.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    /// `None`: no rules, everything allowed.
    by_principal: Option<HashMap<String, Arc<Grants>>>,
    /// What a principal without rules of its own gets (anonymous's).
    fallback: Arc<Grants>,
}

impl Acl {
    /// The rules of a configuration (none: everything allowed).
    pub fn new(rules: &[AclRule]) -> Acl {
        if rules.is_empty() {
            return Acl {
                by_principal: None,
                fallback: Arc::new(Grants::everything()),
            };
        }
        let mut given: HashMap<&str, Vec<(&str, Right)>> = HashMap::new();
        for rule in rules {
            let entry = given.entry(rule.principal.as_str()).or_default();
            for prefix in &rule.prefixes {
                for &right in &rule.rights {
                    entry.push((prefix, right));
                }
            }
        }
        // A named principal may do at least what anonymous may: it could
        // always leave its token out.
        let anonymous = given.get(ANONYMOUS).cloned().unwrap_or_default();
        let fallback = Arc::new(Grants::from_pairs(&anonymous));
        let by_principal = given
            .iter()
            .map(|(&principal, pairs)| {
                let mut all = pairs.clone();
                all.extend_from_slice(&anonymous);
                (principal.to_string(), Arc::new(Grants::from_pairs(&all)))
            })
            .collect();
        Acl {
            by_principal: Some(by_principal),
            fallback,
        }
    }

    /// What `principal` may do.
    pub fn grants(&self, principal: &str) -> Arc<Grants> {
        self.by_principal
            .as_ref()
            .and_then(|map| map.get(principal))
            .unwrap_or(&self.fallback)
            .clone()
    }

    /// Whether there are rules at all (without, everything is allowed).
    pub fn has_rules(&self) -> bool {
        self.by_principal.is_some()
    }
}

/// One principal's rights, each as a set of prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    lock: Prefixes,
    status: Prefixes,
    admin: Prefixes,
}

impl Grants {
    /// Every right on every name.
    pub fn everything() -> Grants {
        let all = Prefixes::from(vec![String::new()]);
        Grants {
            lock: all.clone(),
            status: all.clone(),
            admin: all,
        }
    }

    fn from_pairs(pairs: &[(&str, Right)]) -> Grants {
        let of = |wanted: Right| {
            Prefixes::from(
                pairs
                    .iter()
                    .filter(|(_, right)| *right == wanted)
                    .map(|(prefix, _)| prefix.to_string())
                    .collect::<Vec<_>>(),
            )
        };
        Grants {
            lock: of(Right::Lock),
            status: of(Right::Status),
            admin: of(Right::Admin),
        }
    }

    fn prefixes(&self, right: Right) -> &Prefixes {
        match right {
            Right::Lock => &self.lock,
            Right::Status => &self.status,
            Right::Admin => &self.admin,
        }
    }

    /// Whether `right` covers the lock `name`.
    pub fn allows(&self, right: Right, name: &str) -> bool {
        self.prefixes(right).covers(name)
    }

    /// Whether `right` is given on any prefix at all.
    pub fn has(&self, right: Right) -> bool {
        !self.prefixes(right).as_slice().is_empty()
    }

    /// The prefixes `right` is given on, in name order, none inside another:
    /// the name ranges it covers, each once.
    pub fn scopes(&self, right: Right) -> &[String] {
        self.prefixes(right).as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(principal: &str, prefixes: &[&str], rights: &[Right]) -> AclRule {
        AclRule {
            principal: principal.to_string(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            rights: rights.to_vec(),
        }
    }

    #[test]
    fn without_rules_everyone_may_do_everything() {
        let acl = Acl::new(&[]);
        for principal in [ANONYMOUS, "alice"] {
            let grants = acl.grants(principal);
            for right in [Right::Lock, Right::Status, Right::Admin] {
                assert!(grants.allows(right, "any/name"));
                assert!(grants.allows(right, ""));
            }
        }
    }

    #[test]
    fn rules_give_only_what_they_say_and_anonymous_rules_apply_to_everyone() {
        let acl = Acl::new(&[
            rule("deploy", &["deploy/", "shared/"], &[Right::Lock]),
            rule("ops", &[""], &[Right::Status, Right::Admin]),
            rule(ANONYMOUS, &["public/"], &[Right::Lock, Right::Status]),
        ]);
        let deploy = acl.grants("deploy");
        assert!(deploy.allows(Right::Lock, "deploy/web"));
        assert!(deploy.allows(Right::Lock, "shared/x"));
        assert!(
            deploy.allows(Right::Lock, "public/x"),
            "anonymous's rights too"
        );
        assert!(
            !deploy.allows(Right::Lock, "deploy"),
            "a prefix, not a stem"
        );
        assert!(!deploy.allows(Right::Lock, "other/x"));
        assert!(!deploy.allows(Right::Status, "deploy/web"));
        assert!(!deploy.has(Right::Admin));
        let ops = acl.grants("ops");
        assert!(ops.allows(Right::Admin, "deploy/web"));
        assert!(!ops.allows(Right::Lock, "deploy/web"));
        let nobody = acl.grants("someone-without-rules");
        assert_eq!(nobody, acl.grants(ANONYMOUS));
        assert!(nobody.allows(Right::Lock, "public/a"));
        assert!(!nobody.allows(Right::Lock, "deploy/web"));
        assert!(!nobody.has(Right::Admin));
    }

    #[test]
    fn scopes_are_disjoint_and_in_name_order() {
        let acl = Acl::new(&[
            rule("a", &["b/", "a/x/", "a/", "c"], &[Right::Status]),
            rule("a", &["b/deep/"], &[Right::Status]),
        ]);
        assert_eq!(acl.grants("a").scopes(Right::Status), ["a/", "b/", "c"]);
        assert!(acl.grants("a").allows(Right::Status, "cat"));
        assert!(!acl.grants("a").allows(Right::Status, "bb"));
    }
}
