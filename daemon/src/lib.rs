//! presenced: a thread-per-core TLS presence daemon.
//!
//! See `docs/architecture.md` for how a connection and its presence record
//! flow through the shards, and for what each of these rooms holds.

pub mod config;
pub mod conn;
pub mod control;
pub mod ops;
pub mod presence;
pub mod process;
pub mod shard;
pub mod shared;
pub mod store;
pub mod tls;
pub mod upgrade;
