//! presenced: a thread-per-core TLS presence daemon.
//!
//! See `docs/architecture.md` for how a connection and its presence record
//! flow through the shards.

pub mod auth;
pub mod config;
pub mod conn;
pub mod conns;
pub mod control;
pub mod devinit;
pub mod durable;
pub mod events;
pub mod guard;
pub mod handoff;
pub mod lean;
pub mod metrics;
pub mod metrics_http;
pub mod notify;
pub mod persist;
pub mod poller;
pub mod presence;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod session;
pub mod shard;
pub mod sockstat;
pub mod stats;
pub mod tickets;
pub mod tls;
pub mod tuning;
pub mod upgrade;
pub mod wheel;
