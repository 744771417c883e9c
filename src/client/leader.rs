//! Finding the server to talk to among several addresses: the leader of a
//! cluster, or a single server (one whose `hello` names no role).
//!
//! A round tries the addresses once each, starting with the leader a
//! `notLeader` reply named and the address that last worked. A standby is
//! never kept: its connection is closed after `hello`, and the leader it
//! names is dialed next, in the list or not. A round that finds nobody to
//! use says whether trying again may help; the caller backs off between
//! rounds.
//!
//! Every dial uses the client's TLS settings and token. A leader named
//! without a scheme is dialed as its list entry says, else as the server
//! that named it was (a standby reached over TLS names a TLS leader).

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::session::Dialed;
use super::transport::{TLS_SCHEME, Tls, TlsProblem};
use super::{Error, Greeting, dial};
use crate::protocol::{ClusterRole, HelloResult, Role};

/// One or more server addresses, for [`Client::connect`](super::Client::connect):
/// a `&str` or `String` holding one `host:port` or several separated by
/// commas (`"a:20934,b:20934"`, as `--server` takes them), or a slice, array
/// or `Vec` of such strings. Blanks around each address are ignored; an
/// empty one is refused when connecting.
pub trait ServerList {
    /// The addresses, in the order given.
    fn addresses(&self) -> Vec<String>;
}

impl ServerList for str {
    fn addresses(&self) -> Vec<String> {
        self.split(',').map(|a| a.trim().to_string()).collect()
    }
}

impl ServerList for String {
    fn addresses(&self) -> Vec<String> {
        self.as_str().addresses()
    }
}

impl<S: ServerList> ServerList for [S] {
    fn addresses(&self) -> Vec<String> {
        self.iter().flat_map(ServerList::addresses).collect()
    }
}

impl<S: ServerList, const N: usize> ServerList for [S; N] {
    fn addresses(&self) -> Vec<String> {
        self[..].addresses()
    }
}

impl<S: ServerList> ServerList for Vec<S> {
    fn addresses(&self) -> Vec<String> {
        self[..].addresses()
    }
}

impl<T: ServerList + ?Sized> ServerList for &T {
    fn addresses(&self) -> Vec<String> {
        (**self).addresses()
    }
}

/// The addresses of one client, and where it found a server to use last.
pub(crate) struct Finder {
    addresses: Vec<String>,
    greeting: Greeting,
    connect_timeout: Duration,
    tls: Option<Arc<Tls>>,
    /// The address that last answered as one to use; it may be outside the
    /// list (a leader a standby named), and is tried first next time.
    last: Mutex<Option<String>>,
}

/// A round that found no server to use.
pub(crate) struct Failed {
    /// Each address tried, with why it would not do.
    failures: Vec<(String, Error)>,
    /// Some address answered as a standby: a cluster is there, between
    /// leaders, and may have one soon.
    pub(crate) standby_answered: bool,
}

impl Finder {
    /// With TLS for every address, each is written `tls://HOST:PORT`, as
    /// messages and [`Client::server`](super::Client::server) show it.
    pub(crate) fn new(
        addresses: Vec<String>,
        greeting: Greeting,
        connect_timeout: Duration,
        tls: Option<Arc<Tls>>,
    ) -> Finder {
        let every = tls.as_ref().is_some_and(|tls| tls.every_address());
        let addresses = addresses
            .into_iter()
            .map(|a| match every && !a.starts_with(TLS_SCHEME) {
                true => format!("{TLS_SCHEME}{a}"),
                false => a,
            })
            .collect();
        Finder {
            addresses,
            greeting,
            connect_timeout,
            tls,
            last: Mutex::new(None),
        }
    }

    /// A leader's address as a server named it, with the scheme to dial it
    /// by: its own, its list entry's, else that of the server `by` that
    /// named it.
    fn resolve(&self, leader: &str, by: Option<&str>) -> String {
        if leader.starts_with(TLS_SCHEME) {
            return leader.to_string();
        }
        let with_tls = format!("{TLS_SCHEME}{leader}");
        if self.addresses.contains(&with_tls) {
            return with_tls;
        }
        if self.addresses.iter().any(|a| a == leader) {
            return leader.to_string();
        }
        match by.is_some_and(|by| by.starts_with(TLS_SCHEME)) {
            true => with_tls,
            false => leader.to_string(),
        }
    }

    /// The list as given, for messages.
    pub(crate) fn list(&self) -> String {
        self.addresses.join(",")
    }

    /// Tries each address once, `hint` first, until one answers as a leader
    /// or a single server; gives up on the rest at `deadline`.
    pub(crate) fn round(
        &self,
        deadline: Instant,
        hint: Option<&str>,
    ) -> Result<(Dialed, HelloResult), Failed> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A notLeader answer came from the server that last worked.
        let hint = hint.map(|hint| self.resolve(hint, last.as_deref()));
        let mut queue = candidates(hint.as_deref(), last.as_deref(), &self.addresses);
        let mut tried = HashSet::new();
        let mut failures = Vec::new();
        let mut standby_answered = false;
        while !queue.is_empty() {
            let address = queue.remove(0);
            if !tried.insert(address.clone()) {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                failures.push((
                    address.clone(),
                    connect_error(
                        &address,
                        io::ErrorKind::TimedOut,
                        "not tried: out of time".to_string(),
                    ),
                ));
                continue;
            }
            match dial(
                &address,
                &self.greeting,
                self.tls.as_deref(),
                self.connect_timeout.min(left),
            ) {
                Ok((dialed, hello)) => match &hello.cluster {
                    Some(ClusterRole {
                        role: Role::Standby,
                        leader,
                    }) => {
                        // Closed here: nothing but hello ever goes to a standby.
                        drop(dialed);
                        standby_answered = true;
                        let why = match leader {
                            Some(leader) => {
                                queue.insert(0, self.resolve(leader, Some(&address)));
                                format!("a standby; the leader is at {leader}")
                            }
                            None => "a standby, and no leader is elected".to_string(),
                        };
                        failures.push((
                            address.clone(),
                            connect_error(&address, io::ErrorKind::Other, why),
                        ));
                    }
                    _ => {
                        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(address);
                        return Ok((dialed, hello));
                    }
                },
                Err(e) => failures.push((address, e)),
            }
        }
        Err(Failed {
            failures,
            standby_answered,
        })
    }
}

/// The order of a round: the named leader, the address that last worked,
/// then the list; each once.
fn candidates(hint: Option<&str>, last: Option<&str>, addresses: &[String]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for address in hint
        .into_iter()
        .chain(last)
        .chain(addresses.iter().map(String::as_str))
    {
        if !order.iter().any(|a| a == address) {
            order.push(address.to_string());
        }
    }
    order
}

fn connect_error(address: &str, kind: io::ErrorKind, why: String) -> Error {
    Error::Connect {
        server: address.to_string(),
        source: io::Error::new(kind, why),
    }
}

impl Failed {
    /// Whether another round may find a server: not when every server that
    /// answered refused this client for good (not allowed, or a bad hello).
    pub(crate) fn worth_retrying(&self) -> bool {
        self.failures.iter().any(|(_, e)| match e {
            Error::Denied(_)
            | Error::AuthFailed { .. }
            | Error::TlsRequired { .. }
            | Error::TlsConfig(_) => false,
            // A server closing while it stops may cut a handshake short;
            // a certificate will not change by itself.
            Error::Tls { problem, .. } => matches!(problem, TlsProblem::Handshake(_)),
            Error::Refused { status, .. } => status == "tooManyConnections",
            _ => true,
        })
    }

    /// One error of the kind a single address would have given: the most
    /// telling of them (a refusal over an answer that is not pklock's over
    /// no answer), naming every address that failed and why.
    pub(crate) fn into_error(mut self, list: &str) -> Error {
        if self.failures.len() <= 1 {
            return match self.failures.pop() {
                Some((_, e)) => e,
                None => connect_error(
                    list,
                    io::ErrorKind::InvalidInput,
                    "no address given".to_string(),
                ),
            };
        }
        let rank = |e: &Error| match e {
            Error::Denied(_) | Error::AuthFailed { .. } | Error::TlsConfig(_) => 0,
            Error::Tls { .. } | Error::TlsRequired { .. } | Error::Refused { .. } => 1,
            Error::Protocol(_) => 2,
            _ => 3,
        };
        let details: Vec<String> = self
            .failures
            .iter()
            .map(|(address, e)| match e {
                Error::Connect { source, .. } => format!("{address}: {source}"),
                // Already names the address.
                Error::Protocol(detail) => detail.clone(),
                other => format!("{address}: {other}"),
            })
            .collect();
        let all = details.join("; ");
        let best = (0..self.failures.len())
            .min_by_key(|&i| rank(&self.failures[i].1))
            .unwrap_or(0);
        let (_, primary) = self.failures.swap_remove(best);
        let also = |detail: String| match detail.is_empty() {
            true => format!("tried {all}"),
            false => format!("{detail}; tried {all}"),
        };
        match primary {
            Error::Connect { source, .. } => Error::Connect {
                server: list.to_string(),
                source: io::Error::new(source.kind(), all),
            },
            Error::Denied(detail) => Error::Denied(also(detail)),
            Error::AuthFailed { server, detail } => Error::AuthFailed {
                server,
                detail: also(detail),
            },
            Error::Refused { status, error } => Error::Refused {
                status,
                error: also(error),
            },
            Error::Protocol(_) => Error::Protocol(format!("no server to use: {all}")),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lists_come_as_text_with_commas_or_as_collections() {
        assert_eq!("a:1".addresses(), ["a:1"]);
        assert_eq!("a:1, b:2 ,c:3".addresses(), ["a:1", "b:2", "c:3"]);
        assert_eq!("a:1,,b:2".addresses(), ["a:1", "", "b:2"]);
        assert_eq!(["a:1", "b:2"].addresses(), ["a:1", "b:2"]);
        assert_eq!(
            strings(&["a:1,b:2", "c:3"]).addresses(),
            ["a:1", "b:2", "c:3"]
        );
        let borrowed: &[&str] = &["a:1"];
        assert_eq!(borrowed.addresses(), ["a:1"]);
        assert_eq!((&&"a:1").addresses(), ["a:1"]);
    }

    #[test]
    fn a_round_starts_with_the_named_leader_then_the_last_that_worked() {
        let list = strings(&["a:1", "b:2", "c:3"]);
        assert_eq!(candidates(None, None, &list), ["a:1", "b:2", "c:3"]);
        assert_eq!(candidates(None, Some("b:2"), &list), ["b:2", "a:1", "c:3"]);
        assert_eq!(
            candidates(Some("z:9"), Some("c:3"), &list),
            ["z:9", "c:3", "a:1", "b:2"]
        );
        assert_eq!(
            candidates(Some("c:3"), Some("c:3"), &list),
            ["c:3", "a:1", "b:2"]
        );
    }

    #[test]
    fn a_failed_list_names_every_address_and_keeps_the_most_telling_kind() {
        let refused =
            |a: &str| connect_error(a, io::ErrorKind::ConnectionRefused, "refused".into());
        let failed = Failed {
            failures: vec![
                ("a:1".into(), refused("a:1")),
                ("b:2".into(), refused("b:2")),
            ],
            standby_answered: false,
        };
        assert!(failed.worth_retrying());
        match failed.into_error("a:1,b:2") {
            Error::Connect { server, source } => {
                assert_eq!(server, "a:1,b:2");
                assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
                assert_eq!(source.to_string(), "a:1: refused; b:2: refused");
            }
            other => panic!("{other:?}"),
        }
        let failed = Failed {
            failures: vec![
                ("a:1".into(), refused("a:1")),
                ("b:2".into(), Error::Denied(String::new())),
            ],
            standby_answered: false,
        };
        assert!(failed.worth_retrying());
        match failed.into_error("a:1,b:2") {
            Error::Denied(detail) => assert!(
                detail.starts_with("tried a:1: refused; b:2: refused by the server"),
                "{detail}"
            ),
            other => panic!("{other:?}"),
        }
        let failed = Failed {
            failures: vec![("b:2".into(), Error::Denied(String::new()))],
            standby_answered: false,
        };
        assert!(!failed.worth_retrying());
        assert!(matches!(failed.into_error("b:2"), Error::Denied(d) if d.is_empty()));
    }
}
