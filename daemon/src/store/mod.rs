//! Durable presence state: per-shard snapshot and append log, recovery after
//! a crash, and the event sequence reservation.
//!
//! | file | what |
//! | --- | --- |
//! | [`fs`] | the one atomic-write (0600) and private-directory (0700) helper |
//! | [`record`] | the persisted formats: records, frames, blobs, snapshot, log header |
//! | [`recovery`] | reading snapshot + log back (torn tails, corruption = unknown), restart rules |
//! | [`shard_store`] | a shard's snapshot + append-log writer, `events.seq`, `guard.held` |
//! | [`durable`] | a shard's durability on glommio: buffered changes, flushes, restart window |
//!
//! # Layout of the state directory
//!
//! Every owner shard persists only the records it owns, so no file is shared
//! between shards and no locking is needed. `N` is the shard index.
//!
//! | file | written by | what |
//! | --- | --- | --- |
//! | `shard-N.snap` | shard N, at compaction | every record the shard owned at compaction time |
//! | `shard-N.log` | shard N, every flush | record changes since that snapshot |
//! | `events.seq` | the event shard ([`crate::presence::events::EVENT_SHARD`]) | the event seq reservation (high-water mark) |
//! | `guard.held` | the event shard | agents whose offline the mass-offline guard holds |
//! | `tickets.keys` | any process ([`crate::tls::tickets`]) | TLS session ticket keys |
//! | `*.tmp.<pid>` | anyone, transiently | removed at open; a leftover is a crash mid-write |
//! | `*.corrupt` | [`shard_store::ShardStore::open`] | untrusted files moved aside for inspection |
//!
//! The directory is created (and tightened to) mode 0700, every file is
//! created with mode 0600 ([`fs`]).

pub mod durable;
pub mod fs;
pub mod record;
pub mod recovery;
pub mod shard_store;
