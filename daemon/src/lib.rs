//! presenced: a thread-per-core TLS presence daemon.
//!
//! See `docs/architecture.md` for how a connection and its presence record
//! flow through the shards.

pub mod auth;
pub mod config;
pub mod protocol;
pub mod tuning;
