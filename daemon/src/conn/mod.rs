//! One connection, from accept to close: the handshake task, the task-free
//! session on the shard's epoll set, the slab that holds them and the
//! deadline wheel.

pub mod handshake;
pub mod poller;
pub mod session;
pub mod table;
pub mod wheel;
