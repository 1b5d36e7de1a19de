//! The process: start-up (listeners, shards, signals), its conversation
//! with systemd, and taking over from a previous process (live upgrade).

pub mod adopt;
pub mod listen;
pub mod start;
pub mod supervise;
