//! presenced wire protocol v1, as docs/protocol.md specifies it: the frame
//! codec ([`frame`]) and the agent token ([`token`]). The daemon, the bench's
//! agent library and every Rust agent use this crate; it has no runtime
//! dependency (no glommio, no TLS).

pub mod frame;
pub mod token;

pub use frame::*;
pub use token::{FleetKey, FleetKeyError, KeyFormatError};
