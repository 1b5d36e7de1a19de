//! The process: start-up (listeners, shards, signals) and its conversation
//! with systemd.

pub mod start;
pub mod supervise;
