//! pklock-testkit: test code shared by pklock's property tests
//! (`tests/fuzz_properties.rs`, `tests/lock_table_model.rs`) and its fuzz
//! targets (`fuzz/`), so that each check is written once and none of it is
//! part of the pklock library.
//!
//! - [`lock_model::Model`]: a deliberately naive reference model of
//!   `pklock::lock_table::LockTable`, which the real table must match step
//!   by step.
//! - [`harness`]: the checks themselves (the frame decoder, the request
//!   parser, the lock table against the model, the whole `commands::Core`),
//!   each returning `Err` with a message when a promise is broken.

#![deny(missing_docs)]

pub mod harness;
pub mod lock_model;
