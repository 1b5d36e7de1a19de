//! Client library for the presenced wire protocol v1.
//!
//! * [`tls`] builds the rustls client configuration (TLS 1.3 only, ALPN
//!   `presence/1` by default, ring crypto provider).
//! * [`conn`] is one framed TLS connection to the daemon ([`Connection`]).
//! * [`agent`] is the reconnecting agent state machine ([`Agent`]) used by the
//!   `presence-agent` binary and the load generator.
//! * [`backoff`] holds the retry delay policies.
//! * [`shutdown`] is the signal that asks a running agent to say BYE and stop.

pub mod agent;
pub mod backoff;
pub mod conn;
pub mod shutdown;
pub mod tls;

#[cfg(test)]
pub(crate) mod testutil;

pub use agent::{Agent, AgentConfig, AgentError, AgentEvent, AgentExit, DisconnectReason};
pub use backoff::Backoff;
pub use conn::{ConnError, Connection, Welcome};
pub use shutdown::{shutdown_channel, ShutdownHandle, ShutdownSignal};
pub use tls::{Alpn, ClientTls, TlsError};

/// Re-export of the daemon's wire codec and fleet key, for convenience.
pub use presence_proto as protocol;
pub use presence_proto::FleetKey;
