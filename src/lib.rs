//! pklock: a distributed lock server. A client holds a named lock for exactly
//! as long as its TCP connection lives; when it dies the kernel closes the
//! socket and the lock goes at once to the next in line, in FIFO order.
//! There are no lease timeouts: a live holder never loses its lock.
//!
//! Data flows one way, one module per step:
//!
//! ```text
//! socket bytes -> frame (length prefix) -> protocol (JSON -> Request)
//!   -> commands (command_lock, ...) -> lock_table (pure state machine)
//!   -> effects -> protocol (Reply -> JSON) -> frame -> socket bytes
//! ```
//!
//! Only [`server`] (the `mio` event loop) and [`connection`] touch sockets.
//! [`lock_table::LockTable`] does no IO and reads no clock, so it can be
//! tested and fuzzed alone. Invariants it keeps: never an exclusive holder
//! beside any other holder; grants in arrival order; every queued request
//! answered exactly once (granted, timed out, cancelled) unless its
//! connection closed; fencing tokens strictly increasing ([`tokens`] keeps
//! them so across restarts, and [`cluster`] across leaders).
//!
//! In cluster mode one more thread runs: the election ([`cluster::election`]),
//! which talks to etcd and tells the event loop when it leads and until
//! when; the event loop still owns every socket and the lock table.

#![deny(missing_docs)]

pub mod acl;
pub mod allow_list;
pub mod auth;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod connection;
pub mod durable;
pub mod duration;
pub mod frame;
pub mod histogram;
pub mod keepalive;
pub mod lock_table;
pub mod log_level;
pub mod metrics;
pub mod metrics_endpoint;
pub mod prefixes;
pub mod proof;
pub mod protocol;
pub mod rate_limit;
pub mod recovery;
pub mod reload;
pub mod server;
pub mod state_location;
pub mod tls;
pub mod tokens;

pub use config::Config;
pub use server::{Server, ServerError, ShutdownHandle};
