//! TLS: the rustls server configuration ([`config`]), session tickets
//! ([`tickets`]) and the lean TLS 1.3 record layer: rustls drives the handshake, then each
//! connection keeps only its two traffic secrets and sequence numbers.
//!
//! - [`handshake`]: a sans-I/O server handshake over rustls's unbuffered API
//!   that hands back a [`record::LeanSession`] once the handshake is done.
//! - [`record`]: TLS 1.3 record protection (RFC 8446 section 5) from those
//!   secrets, the record splitter and post-handshake messages (alerts,
//!   KeyUpdate).
//! - [`ktls`]: kernel TLS detection; userspace is the fallback.
//!
//! Per connection after the handshake: `size_of::<LeanSession>()` bytes
//! inline and no heap, plus the caller's partial-record buffer, which is empty
//! (no capacity) while a connection is idle between whole records.

pub mod config;
pub mod handshake;
pub mod ktls;
pub mod record;
pub mod tickets;

#[cfg(test)]
mod interop;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
