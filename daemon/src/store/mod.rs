//! Durable presence state: per-shard snapshot and append log, recovery after
//! a crash, and the event sequence reservation.

pub mod durable;
pub mod shard_store;
