//! The operator's side: the Unix control socket, the `stats` it gathers, the
//! Prometheus text and its optional HTTP endpoint, and the live upgrade the
//! socket starts.

pub mod http;
pub mod prometheus;
pub mod socket;
pub mod stats;
pub mod upgrade;
