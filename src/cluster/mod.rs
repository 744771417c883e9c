//! Several servers, one leader: the election runs in etcd, on a thread of
//! its own ([`election`]) that tells the event loop when this server leads,
//! until when its lease is safe, and which tokens it may issue. The timing
//! rules are in [`term`]; the etcd calls in [`etcd`].

pub mod election;
pub mod etcd;
pub mod term;
