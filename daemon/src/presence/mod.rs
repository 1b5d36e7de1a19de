//! Presence: the records of the agent ids a shard owns, the numbered event
//! log and the mass-offline guard.

pub mod events;
pub mod guard;
pub mod owner;
pub mod table;
