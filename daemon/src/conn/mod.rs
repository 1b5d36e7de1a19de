//! One connection, from accept to close: the protocol rules (`agent`, pure),
//! the handshake task, the task-free session on the shard's epoll set, the
//! table that holds them and the deadline wheel.

pub mod agent;
pub mod handshake;
pub mod poller;
pub mod session;
pub mod table;
pub mod wheel;
