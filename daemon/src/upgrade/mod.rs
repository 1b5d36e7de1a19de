//! Zero-drop binary upgrade: the running daemon starts the new binary and
//! hands it every listening socket, every established connection (socket and
//! TLS record state) and the presence/event state, over a Unix socket with
//! `SCM_RIGHTS`.
//!
//! This module is the mechanism only; it knows nothing about shards,
//! rustls or glommio. The daemon plugs in through two traits:
//!
//! - [`machine::Source`], implemented by the old process and driven by
//!   [`machine::run_source`] from a dedicated std thread while the shards
//!   freeze and quiesce through their own messages;
//! - [`machine::Target`], implemented by the new process and driven by
//!   [`machine::run_target`] before its shards start.
//!
//! Modules:
//! - [`wire`]: length-prefixed JSON frames with attached fds.
//! - [`manifest`]: the data that crosses, and the checks both sides run.
//! - [`machine`]: the state machine Prepare -> Listeners -> (Quiesce(i) ->
//!   Transfer(i))* -> Global -> Confirm -> Commit -> Exit, and
//!   Failed(step, reason) -> Resume.
//! - [`spawn`]: starting the new binary with the socket inherited, and
//!   handing the systemd main PID over.
//!
//! # systemd
//!
//! The unit runs `Type=notify` with `NotifyAccess=all`. The new process is a
//! child of the old one, so it is in the unit's cgroup. In `Target::commit`
//! it sends `MAINPID=<own pid>` and `READY=1` in one datagram
//! ([`spawn::notify_takeover`]) and only then reports Serving; the old
//! process exits only after Serving. systemd dispatches its notify socket
//! before SIGCHLD, so by the time it reaps the old main process the main PID
//! is already the new one and the unit stays active (`KillMode=mixed` would
//! otherwise SIGKILL the new process with the rest of the cgroup). If the
//! hand-over fails after the target claimed the main PID, the old process
//! sends `MAINPID=<own pid>` again when it resumes ([`spawn::notify_main_pid`]).
//!
//! # Connections that cannot be carried
//!
//! A connection in the TLS handshake or in the middle of a KeyUpdate is left
//! out of the snapshot (`ShardSnapshot::uncarried` counts them) and stays
//! with the old process, so it keeps working if the upgrade fails. After the
//! commit, `Source::finish` sends each of them RECONNECT with
//! [`RECONNECT_MIN_DELAY_MS`]..[`RECONNECT_MAX_DELAY_MS`] (the agent picks a
//! uniformly random delay in that window) and closes it; one still in the
//! handshake cannot receive a frame and is closed.

pub mod machine;
pub mod manifest;
pub mod spawn;
pub mod wire;

#[cfg(test)]
mod tests;

pub use machine::{
    run_source, run_target, FailKind, GlobalState, ListenerError, ShardSnapshot, Source,
    SourceOutcome, Target, TargetOutcome, UpgradeError, UpgradeStep,
};
pub use manifest::{
    ConnError, ConnHandoff, EventHandoff, Manifest, ManifestError, PresenceRecordHandoff,
    RecordError, TicketKeys, TlsState, TlsStateError, PROTOCOL,
};

/// How long each wait for the peer may take during a hand-over (both sides).
pub const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// RECONNECT window for connections that could not be handed over: short,
/// and wide enough to spread the reconnects of a busy shard.
pub const RECONNECT_MIN_DELAY_MS: u32 = 100;
pub const RECONNECT_MAX_DELAY_MS: u32 = 2_000;
