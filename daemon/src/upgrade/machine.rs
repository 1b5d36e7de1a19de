//! The hand-over state machine, both sides.
//!
//! ```text
//!  source (old process)                              target (new process)
//!  Prepare   freeze, Manifest ---------------------> check protocol, check_manifest
//!            <---------------------------------------- Ack{prepare}      | Fail
//!  Listeners Listeners{first,count}+fds (x batches) -> verify fds, adopt_listeners
//!            <---------------------------------------- Ack{listeners, n} | Fail
//!  for each shard i:
//!  Quiesce(i) quiesce_shard(i)
//!  Transfer(i) Conns{batch}+fds .. Records{batch} .. ShardDone{counts} -> check, adopt_shard(i)
//!            <---------------------------------------- Ack{transfer i, n} | Fail
//!  Global    Events{batch} .. GlobalDone{seq,keys,totals} -> check, adopt_global, ready
//!  Confirm   <---------------------------------------- Confirm{pid}      | Fail
//!  Commit    Commit -----------------------------------> commit (MAINPID=, READY=1, serve)
//!            <---------------------------------------- Serving{pid}      | Fail
//!  Exit      finish(), the old process exits
//!
//!  any error before Commit is sent:  Failed(step, reason) -> Abort (best
//!            effort), stop_target, Resume (resume_all(reason)); the target exits non-zero.
//!  any error after Commit is sent:  no resume; finish(), the old process exits.
//! ```
//!
//! **Why Commit after Confirm.** If the target started serving as soon as it
//! confirmed, a source whose timeout fired while the Confirm was in flight
//! would resume too, and both processes would drive the same sockets (TLS
//! sequence numbers diverge, agents see bad records). So the target only
//! *prepares* in `ready()`, says Confirm, and touches no connection until it
//! has the source's Commit. The source decides exactly once: it sends
//! Commit, or it aborts and resumes. Once Commit is sent it never resumes:
//! if the target then dies or stalls before Serving, the source neither
//! thaws its shards nor re-sends `MAINPID=<old>` (the target may already
//! serve, or a later hand-over may have claimed the unit); it releases like
//! a finished hand-over (`finish`) and stops, and the error says
//! `committed`. The service manager restarts the unit if nobody serves.
//!
//! Every wait for the peer has its own deadline of `timeout`.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

use super::manifest::{
    validate_events, ConnHandoff, EventHandoff, Manifest, ManifestError, PresenceRecordHandoff,
    TicketKeys,
};
use super::wire::{self, WireError, SCM_MAX_FD};

/// Presence records per `Records` message (about 150 bytes each as JSON).
pub const RECORDS_PER_MSG: usize = 4096;
/// Events per `Events` message.
pub const EVENTS_PER_MSG: usize = 4096;
/// How long a side waits for the peer's `Fail` after a failed send, to
/// report the peer's reason instead of "peer closed".
const FAIL_GRACE: Duration = Duration::from_millis(500);

/// Steps of the hand-over; also the `step` field of every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeStep {
    Prepare,
    Listeners,
    Quiesce(usize),
    Transfer(usize),
    Global,
    Confirm,
    Commit,
    Exit,
}

impl fmt::Display for UpgradeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeStep::Prepare => f.write_str("prepare"),
            UpgradeStep::Listeners => f.write_str("listeners"),
            UpgradeStep::Quiesce(i) => write!(f, "quiesce shard {i}"),
            UpgradeStep::Transfer(i) => write!(f, "transfer shard {i}"),
            UpgradeStep::Global => f.write_str("global state"),
            UpgradeStep::Confirm => f.write_str("confirm"),
            UpgradeStep::Commit => f.write_str("commit"),
            UpgradeStep::Exit => f.write_str("exit"),
        }
    }
}

/// The messages. Source -> target first, then target -> source.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// First message. No fds.
    Manifest {
        step: UpgradeStep,
        manifest: Manifest,
    },
    /// Listening sockets `first .. first+count` (shard order); `count` fds.
    Listeners {
        step: UpgradeStep,
        first: usize,
        count: usize,
    },
    /// A batch of a shard's connections; one fd per entry, same order.
    Conns {
        step: UpgradeStep,
        shard: usize,
        batch: u32,
        conns: Vec<ConnHandoff>,
    },
    /// A batch of the presence records a shard owns. No fds.
    Records {
        step: UpgradeStep,
        shard: usize,
        batch: u32,
        records: Vec<PresenceRecordHandoff>,
    },
    /// End of a shard: what the batches must add up to.
    ShardDone {
        step: UpgradeStep,
        shard: usize,
        conns: u64,
        records: u64,
        batches: u32,
        /// Connections the source could not carry (mid handshake / key
        /// update); they stay with the source, which sends them RECONNECT
        /// after the commit. Informational.
        uncarried: u64,
    },
    /// A batch of the event ring, oldest first.
    Events {
        step: UpgradeStep,
        batch: u32,
        events: Vec<EventHandoff>,
    },
    /// End of the transfer, with the totals the manifest announced.
    GlobalDone {
        step: UpgradeStep,
        events: u64,
        batches: u32,
        next_event_seq: u64,
        ticket_keys: TicketKeys,
        /// Connections sent (carried).
        connections_total: u64,
        /// Connections left with the source.
        uncarried_total: u64,
        agents_total: u64,
    },
    /// Source: the target may start serving; the source will not resume
    /// unless the target fails before Serving.
    Commit { step: UpgradeStep },
    /// Source: giving up at `step`; the target must exit.
    Abort { step: UpgradeStep, reason: String },
    /// Target: `step` done, `items` adopted.
    Ack { step: UpgradeStep, items: u64 },
    /// Target: refusing at `step`; the target exits after sending this.
    Fail { step: UpgradeStep, reason: String },
    /// Target: everything adopted and ready; waiting for Commit.
    Confirm { step: UpgradeStep, pid: u32 },
    /// Target: serving (MAINPID sent); the source may exit.
    Serving { step: UpgradeStep, pid: u32 },
}

impl Msg {
    fn describe(&self) -> String {
        match self {
            Msg::Manifest { step, .. } => format!("manifest ({step})"),
            Msg::Listeners { step, first, count } => format!("listeners {first}+{count} ({step})"),
            Msg::Conns { shard, batch, .. } => format!("conns of shard {shard} batch {batch}"),
            Msg::Records { shard, batch, .. } => format!("records of shard {shard} batch {batch}"),
            Msg::ShardDone { shard, .. } => format!("shard done {shard}"),
            Msg::Events { batch, .. } => format!("events batch {batch}"),
            Msg::GlobalDone { .. } => "global done".into(),
            Msg::Commit { step } => format!("commit ({step})"),
            Msg::Abort { step, .. } => format!("abort ({step})"),
            Msg::Ack { step, items } => format!("ack {step} ({items} items)"),
            Msg::Fail { step, .. } => format!("fail ({step})"),
            Msg::Confirm { .. } => "confirm".into(),
            Msg::Serving { .. } => "serving".into(),
        }
    }
}

/// Why a hand-over step failed.
#[derive(Debug, Error)]
pub enum FailKind {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("target failed: {0}")]
    TargetFailed(String),
    #[error("source aborted: {0}")]
    SourceAborted(String),
    /// The local side's own trait method failed.
    #[error("{what}: {reason}")]
    Local { what: String, reason: String },
    #[error("protocol violation: expected {expected}, got {got}")]
    Protocol { expected: String, got: String },
    #[error(transparent)]
    Check(#[from] ManifestError),
    #[error("{0}")]
    Invalid(String),
    #[error("listener {index}: {source}")]
    Listener { index: usize, source: ListenerError },
}

/// A hand-over that did not complete, and the step it stopped at.
#[derive(Debug, Error)]
#[error("upgrade failed at {step}: {kind}")]
pub struct UpgradeError {
    pub step: UpgradeStep,
    pub kind: FailKind,
    /// The source had sent Commit when this happened: the decision is
    /// taken, nothing was resumed (no thaw, no `MAINPID=<old>`), and the
    /// old process must stop as after a successful hand-over.
    pub committed: bool,
}

impl UpgradeError {
    fn new(step: UpgradeStep, kind: impl Into<FailKind>) -> Self {
        UpgradeError {
            step,
            kind: kind.into(),
            committed: false,
        }
    }
}

/// A connection's socket as the source hands it to the machine.
#[derive(Debug)]
pub enum ConnFd {
    /// A descriptor the machine closes once sent (e.g. a duplicate).
    Owned(OwnedFd),
    /// The daemon's own descriptor, sent as it is (SCM_RIGHTS installs a
    /// new one in the target; nothing is duplicated here, which matters when
    /// the process holds most of its open-files limit). The daemon keeps it
    /// open until `finish` or `resume_all`.
    Borrowed(std::os::fd::RawFd),
}

impl ConnFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ConnFd::Owned(fd) => fd.as_fd(),
            // SAFETY: the source keeps the descriptor open for the whole
            // hand-over (until `finish` or `resume_all`), see `Borrowed`.
            ConnFd::Borrowed(raw) => unsafe { BorrowedFd::borrow_raw(*raw) },
        }
    }
}

impl From<OwnedFd> for ConnFd {
    fn from(fd: OwnedFd) -> Self {
        ConnFd::Owned(fd)
    }
}

/// One shard's share of the state, produced by `Source::quiesce_shard`.
#[derive(Debug, Default)]
pub struct ShardSnapshot {
    /// Connections accepted by this shard with their sockets.
    pub conns: Vec<(ConnHandoff, ConnFd)>,
    /// Presence records owned by this shard (owner_shard(id) == shard).
    pub records: Vec<PresenceRecordHandoff>,
    /// Connections left out because their TLS state cannot be carried.
    pub uncarried: u64,
}

/// State that is not per shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalState {
    /// The event ring, oldest first.
    pub events: Vec<EventHandoff>,
    pub next_event_seq: u64,
    pub ticket_keys: TicketKeys,
}

/// The old daemon's side. Called from one std thread, in order.
pub trait Source {
    /// The daemon's own failure; its text becomes the Abort reason.
    type Error: std::error::Error;
    /// Freeze every shard: stop accepting, stop applying frames, closes and
    /// timers, so that presence, events and connection state stop changing
    /// (and no mesh message is in flight) until `resume_all` or `finish`.
    /// The manifest is built right after, and its totals must be exact.
    fn prepare(&mut self) -> Result<(), Self::Error>;
    fn manifest(&mut self) -> Manifest;
    /// Duplicates of the listening sockets, shard order, `manifest.shards`
    /// of them. The machine closes the duplicates; the daemon keeps its own.
    fn listeners(&mut self) -> Result<Vec<OwnedFd>, Self::Error>;
    /// Stop shard `shard` for good (cancel its pending socket I/O, so no
    /// byte is consumed after the snapshot) and describe it.
    fn quiesce_shard(&mut self, shard: usize) -> Result<ShardSnapshot, Self::Error>;
    /// Event ring, next seq, ticket keys; called after every shard is
    /// quiesced.
    fn global_state(&mut self) -> Result<GlobalState, Self::Error>;
    /// A step failed: make sure the target is gone (kill and reap the child)
    /// before anything is resumed, so two processes never serve one socket.
    fn stop_target(&mut self);
    /// A step failed before Commit was sent: serve everything again. The
    /// daemon's own fds were never closed. Never called once Commit is
    /// out (then `finish` is, see the module docs).
    fn resume_all(&mut self, reason: &str);
    /// The target serves: close every listener and connection fd WITHOUT
    /// shutdown() (the sockets stay open in the target), send RECONNECT to
    /// the uncarried connections, then return so the process can exit.
    fn finish(&mut self);
}

/// The new daemon's side. Called before its shards start.
pub trait Target {
    /// The daemon's own failure; its text becomes the Fail reason.
    type Error: std::error::Error;
    /// Beyond protocol and structure (checked by the machine): the shard
    /// count and listen address against the local config, e.g. with
    /// `Manifest::check_local`.
    fn check_manifest(&mut self, manifest: &Manifest) -> Result<(), Self::Error>;
    /// The listening sockets, shard order. Do not accept yet.
    fn adopt_listeners(&mut self, listeners: Vec<OwnedFd>) -> Result<(), Self::Error>;
    /// A shard's connections (with their sockets) and owned records. Do not
    /// read or write the sockets yet.
    fn adopt_shard(
        &mut self,
        shard: usize,
        conns: Vec<(ConnHandoff, OwnedFd)>,
        records: Vec<PresenceRecordHandoff>,
    ) -> Result<(), Self::Error>;
    fn adopt_global(&mut self, global: GlobalState) -> Result<(), Self::Error>;
    /// Last step that may fail: build everything needed to serve, without
    /// touching any socket. Confirm is sent when this succeeds.
    fn ready(&mut self) -> Result<(), Self::Error>;
    /// The source committed: send `MAINPID=<own pid>` and `READY=1`, start
    /// serving. If this fails it must not have touched any socket.
    fn commit(&mut self) -> Result<(), Self::Error>;
}

/// What a successful hand-over moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOutcome {
    pub target_pid: u32,
    pub shards: usize,
    pub connections: u64,
    pub records: u64,
    pub events: u64,
    pub uncarried: u64,
    pub transitions: Vec<UpgradeStep>,
    pub elapsed: Duration,
}

/// What the target adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOutcome {
    pub manifest: Manifest,
    pub connections: u64,
    pub records: u64,
    pub events: u64,
    pub transitions: Vec<UpgradeStep>,
}

/// Shared plumbing: the socket, the current step, the transition log.
struct Side {
    sock: UnixStream,
    timeout: Duration,
    step: UpgradeStep,
    transitions: Vec<UpgradeStep>,
    role: &'static str,
}

impl Side {
    /// A side of the hand-over, at its first step.
    fn start(sock: UnixStream, timeout: Duration, role: &'static str) -> Side {
        info!(role, step = %UpgradeStep::Prepare, "upgrade: start");
        Side {
            sock,
            timeout,
            step: UpgradeStep::Prepare,
            transitions: vec![UpgradeStep::Prepare],
            role,
        }
    }

    fn enter(&mut self, step: UpgradeStep) {
        info!(role = self.role, from = %self.step, to = %step, "upgrade: step");
        self.step = step;
        self.transitions.push(step);
    }

    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.timeout)
    }

    fn err(&self, kind: impl Into<FailKind>) -> UpgradeError {
        UpgradeError::new(self.step, kind)
    }

    fn local(&self, what: impl Into<String>, reason: impl fmt::Display) -> UpgradeError {
        self.err(FailKind::Local {
            what: what.into(),
            reason: reason.to_string(),
        })
    }

    fn protocol(&self, expected: impl Into<String>, got: &Msg) -> UpgradeError {
        match got {
            Msg::Fail { reason, .. } => self.err(FailKind::TargetFailed(reason.clone())),
            Msg::Abort { reason, .. } => self.err(FailKind::SourceAborted(reason.clone())),
            _ => self.err(FailKind::Protocol {
                expected: expected.into(),
                got: got.describe(),
            }),
        }
    }

    /// Send; if the peer is gone, pick up the `Fail`/`Abort` it may have
    /// left behind so the error names the peer's reason.
    fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), UpgradeError> {
        match wire::send_deadline(&self.sock, msg, fds, self.deadline()) {
            Ok(()) => Ok(()),
            Err(e) if e.is_closed() => {
                let grace = Some(Instant::now() + FAIL_GRACE.min(self.timeout));
                match wire::recv_no_fds::<Msg>(&self.sock, grace) {
                    Ok(m @ (Msg::Fail { .. } | Msg::Abort { .. })) => Err(self.protocol("", &m)),
                    _ => Err(self.err(e)),
                }
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn recv(&self) -> Result<Msg, UpgradeError> {
        wire::recv_no_fds(&self.sock, self.deadline()).map_err(|e| self.err(e))
    }

    fn recv_fds(&self) -> Result<(Msg, Vec<OwnedFd>), UpgradeError> {
        wire::recv_deadline(&self.sock, self.deadline()).map_err(|e| self.err(e))
    }

    fn no_fds(&self, m: &Msg, fds: &[OwnedFd]) -> Result<(), UpgradeError> {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(self.err(FailKind::Invalid(format!(
                "{} carried {} fds, expected none",
                m.describe(),
                fds.len()
            ))))
        }
    }

    fn expect_ack(&self, items: u64) -> Result<(), UpgradeError> {
        match self.recv()? {
            Msg::Ack { step, items: n } if step == self.step && n == items => Ok(()),
            m => Err(self.protocol(format!("ack {} ({items} items)", self.step), &m)),
        }
    }
}

// ---------------------------------------------------------------- source

/// Run the old daemon's side over `sock` (connected to the target). On any
/// failure before the target reports Serving: Abort is sent, `stop_target`
/// and `resume_all(reason)` are called, and the error names the step.
/// On success `finish` has been called and the process should exit.
pub fn run_source<S: Source>(
    sock: UnixStream,
    src: &mut S,
    timeout: Duration,
) -> Result<SourceOutcome, UpgradeError> {
    let started = Instant::now();
    let mut side = Side::start(sock, timeout, "source");
    match drive_source(&mut side, src) {
        Ok(mut out) => {
            side.enter(UpgradeStep::Exit);
            src.finish();
            out.transitions = side.transitions;
            out.elapsed = started.elapsed();
            info!(
                target_pid = out.target_pid,
                connections = out.connections,
                records = out.records,
                events = out.events,
                uncarried = out.uncarried,
                elapsed_ms = out.elapsed.as_millis() as u64,
                "upgrade: handed over"
            );
            Ok(out)
        }
        Err(e) if e.committed => {
            // Commit is out: the target may serve already. Resuming here
            // would make two processes drive the same sockets (and claim
            // the unit with MAINPID=<old>), so never thaw after Commit:
            // release like a finished hand-over and let this process stop.
            warn!(step = %e.step, "upgrade: {e} after commit; not resuming, this process stops");
            let _ = side.sock.shutdown(std::net::Shutdown::Both);
            src.finish();
            Err(e)
        }
        Err(e) => {
            let reason = e.to_string();
            warn!(step = %e.step, "upgrade: {reason}; resuming");
            if !matches!(
                e.kind,
                FailKind::TargetFailed(_) | FailKind::Wire(WireError::Closed)
            ) {
                let abort = Msg::Abort {
                    step: e.step,
                    reason: reason.clone(),
                };
                let _ = wire::send_deadline(
                    &side.sock,
                    &abort,
                    &[],
                    Some(Instant::now() + FAIL_GRACE.min(timeout)),
                );
            }
            let _ = side.sock.shutdown(std::net::Shutdown::Both);
            src.stop_target();
            src.resume_all(&reason);
            info!(step = %e.step, "upgrade: resumed");
            Err(e)
        }
    }
}

/// Connections and records moved so far, and connections left behind.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    conns: u64,
    records: u64,
    uncarried: u64,
}

impl Moved {
    fn add(&mut self, other: Moved) {
        self.conns += other.conns;
        self.records += other.records;
        self.uncarried = self.uncarried.saturating_add(other.uncarried);
    }
}

/// Every `(what, announced, got)` must agree.
fn check_counts(side: &Side, counts: &[(&'static str, u64, u64)]) -> Result<(), UpgradeError> {
    for &(what, expected, got) in counts {
        if expected != got {
            return Err(side.err(ManifestError::Count {
                what,
                expected,
                got,
            }));
        }
    }
    Ok(())
}

fn drive_source<S: Source>(side: &mut Side, src: &mut S) -> Result<SourceOutcome, UpgradeError> {
    let m = source_prepare(side, src)?;
    source_listeners(side, src, m.shards)?;
    let mut moved = Moved::default();
    for shard in 0..m.shards {
        moved.add(source_shard(side, src, shard, m.shards)?);
    }
    let events = source_global(side, src, &m, moved)?;
    let pid = source_commit(side)?;
    Ok(SourceOutcome {
        target_pid: pid,
        shards: m.shards,
        connections: moved.conns,
        records: moved.records,
        events,
        uncarried: moved.uncarried,
        transitions: Vec::new(),
        elapsed: Duration::ZERO,
    })
}

/// Prepare: freeze, then describe the frozen state.
fn source_prepare<S: Source>(side: &mut Side, src: &mut S) -> Result<Manifest, UpgradeError> {
    src.prepare().map_err(|r| side.local("prepare", r))?;
    let m = src.manifest();
    m.validate().map_err(|e| side.err(e))?;
    side.send(
        &Msg::Manifest {
            step: side.step,
            manifest: m.clone(),
        },
        &[],
    )?;
    side.expect_ack(0)?;
    Ok(m)
}

/// Listeners: one per shard, in batches of at most `SCM_MAX_FD`.
fn source_listeners<S: Source>(
    side: &mut Side,
    src: &mut S,
    shards: usize,
) -> Result<(), UpgradeError> {
    side.enter(UpgradeStep::Listeners);
    let listeners = src.listeners().map_err(|r| side.local("listeners", r))?;
    check_counts(
        side,
        &[("listeners", shards as u64, listeners.len() as u64)],
    )?;
    for (i, chunk) in listeners.chunks(SCM_MAX_FD).enumerate() {
        let fds: Vec<BorrowedFd> = chunk.iter().map(|f| f.as_fd()).collect();
        let msg = Msg::Listeners {
            step: side.step,
            first: i * SCM_MAX_FD,
            count: chunk.len(),
        };
        side.send(&msg, &fds)?;
    }
    drop(listeners);
    side.expect_ack(shards as u64)
}

/// Quiesce(shard), then Transfer(shard): its connections (with their fds),
/// its records, and ShardDone with the counts.
fn source_shard<S: Source>(
    side: &mut Side,
    src: &mut S,
    shard: usize,
    shards: usize,
) -> Result<Moved, UpgradeError> {
    side.enter(UpgradeStep::Quiesce(shard));
    let snap = src
        .quiesce_shard(shard)
        .map_err(|r| side.local(format!("quiesce shard {shard}"), r))?;
    check_snapshot(side, &snap, shard, shards)?;
    side.enter(UpgradeStep::Transfer(shard));
    let moved = Moved {
        conns: snap.conns.len() as u64,
        records: snap.records.len() as u64,
        uncarried: snap.uncarried,
    };
    let mut batch = 0u32;
    let mut conns = snap.conns.into_iter();
    loop {
        let (hand, fds): (Vec<ConnHandoff>, Vec<ConnFd>) = conns.by_ref().take(SCM_MAX_FD).unzip();
        if hand.is_empty() {
            break;
        }
        let borrowed: Vec<BorrowedFd> = fds.iter().map(|f| f.as_fd()).collect();
        debug!(shard, batch, conns = hand.len(), "upgrade: sending conns");
        let msg = Msg::Conns {
            step: side.step,
            shard,
            batch,
            conns: hand,
        };
        side.send(&msg, &borrowed)?;
        batch += 1;
    }
    for chunk in snap.records.chunks(RECORDS_PER_MSG) {
        let msg = Msg::Records {
            step: side.step,
            shard,
            batch,
            records: chunk.to_vec(),
        };
        side.send(&msg, &[])?;
        batch += 1;
    }
    side.send(
        &Msg::ShardDone {
            step: side.step,
            shard,
            conns: moved.conns,
            records: moved.records,
            batches: batch,
            uncarried: moved.uncarried,
        },
        &[],
    )?;
    side.expect_ack(moved.conns + moved.records)?;
    info!(
        shard,
        conns = moved.conns,
        records = moved.records,
        uncarried = moved.uncarried,
        "upgrade: shard handed over"
    );
    Ok(moved)
}

/// Check our own output before it leaves: a bug in this binary must fail
/// the upgrade here, not in the new process.
fn check_snapshot(
    side: &Side,
    snap: &ShardSnapshot,
    shard: usize,
    shards: usize,
) -> Result<(), UpgradeError> {
    for (index, (c, _)) in snap.conns.iter().enumerate() {
        c.validate(shard)
            .map_err(|what| side.err(ManifestError::Conn { shard, index, what }))?;
    }
    for r in &snap.records {
        r.validate(shard, shards).map_err(|what| {
            side.err(ManifestError::Record {
                shard,
                agent: r.agent.clone(),
                what,
            })
        })?;
    }
    Ok(())
}

/// Global state, and the manifest's totals checked on this side too.
/// Returns the number of events sent.
fn source_global<S: Source>(
    side: &mut Side,
    src: &mut S,
    m: &Manifest,
    moved: Moved,
) -> Result<u64, UpgradeError> {
    side.enter(UpgradeStep::Global);
    let g = src
        .global_state()
        .map_err(|r| side.local("global state", r))?;
    check_counts(
        side,
        &[
            (
                "connections (carried + uncarried)",
                m.connections_total,
                moved.conns + moved.uncarried,
            ),
            ("presence records", m.agents_total, moved.records),
            ("next event seq", m.next_event_seq, g.next_event_seq),
        ],
    )?;
    validate_events(&g.events, g.next_event_seq).map_err(|e| side.err(e))?;
    let mut batch = 0u32;
    for chunk in g.events.chunks(EVENTS_PER_MSG) {
        let msg = Msg::Events {
            step: side.step,
            batch,
            events: chunk.to_vec(),
        };
        side.send(&msg, &[])?;
        batch += 1;
    }
    let events = g.events.len() as u64;
    side.send(
        &Msg::GlobalDone {
            step: side.step,
            events,
            batches: batch,
            next_event_seq: g.next_event_seq,
            ticket_keys: g.ticket_keys,
            connections_total: moved.conns,
            uncarried_total: moved.uncarried,
            agents_total: moved.records,
        },
        &[],
    )?;
    Ok(events)
}

/// Confirm (the target adopted everything and is ready), then Commit: from
/// here on the target may touch the sockets. Returns the target's pid.
fn source_commit(side: &mut Side) -> Result<u32, UpgradeError> {
    side.enter(UpgradeStep::Confirm);
    let pid = match side.recv()? {
        Msg::Confirm {
            step: UpgradeStep::Confirm,
            pid,
        } => pid,
        m => return Err(side.protocol("confirm", &m)),
    };
    side.enter(UpgradeStep::Commit);
    side.send(
        &Msg::Commit {
            step: UpgradeStep::Commit,
        },
        &[],
    )?;
    // From here on the decision is taken: whatever happens, no resume.
    let committed = |mut e: UpgradeError| {
        e.committed = true;
        e
    };
    match side.recv().map_err(committed)? {
        Msg::Serving {
            step: UpgradeStep::Commit,
            pid: p,
        } if p == pid => Ok(pid),
        m => Err(committed(
            side.protocol(format!("serving from pid {pid}"), &m),
        )),
    }
}

// ---------------------------------------------------------------- target

/// Run the new daemon's side over `sock` (from `spawn::target_socket`).
/// Returns once the target serves. On error a `Fail` has been sent (if the
/// socket still works) and the process must exit non-zero without having
/// touched any handed-over socket.
pub fn run_target<T: Target>(
    sock: UnixStream,
    tgt: &mut T,
    timeout: Duration,
) -> Result<TargetOutcome, UpgradeError> {
    let mut side = Side::start(sock, timeout, "target");
    match drive_target(&mut side, tgt) {
        Ok(mut out) => {
            side.enter(UpgradeStep::Exit);
            out.transitions = side.transitions;
            info!(
                connections = out.connections,
                records = out.records,
                events = out.events,
                "upgrade: took over from pid {}",
                out.manifest.from_pid
            );
            Ok(out)
        }
        Err(e) => {
            warn!(step = %e.step, "upgrade: {e}; exiting");
            let peer_gone = matches!(
                e.kind,
                FailKind::SourceAborted(_) | FailKind::Wire(WireError::Closed)
            );
            if !peer_gone {
                let fail = Msg::Fail {
                    step: e.step,
                    reason: e.kind.to_string(),
                };
                let _ = wire::send_deadline(
                    &side.sock,
                    &fail,
                    &[],
                    Some(Instant::now() + FAIL_GRACE.min(timeout)),
                );
            }
            Err(e)
        }
    }
}

fn drive_target<T: Target>(side: &mut Side, tgt: &mut T) -> Result<TargetOutcome, UpgradeError> {
    let m = target_prepare(side, tgt)?;
    target_listeners(side, tgt, &m)?;
    let mut moved = Moved::default();
    for shard in 0..m.shards {
        side.enter(UpgradeStep::Transfer(shard));
        let got = receive_shard(side, shard, &m, moved)?;
        let items = (got.conns.len() + got.records.len()) as u64;
        moved.add(Moved {
            conns: got.conns.len() as u64,
            records: got.records.len() as u64,
            uncarried: got.uncarried,
        });
        tgt.adopt_shard(shard, got.conns, got.records)
            .map_err(|r| side.local(format!("adopt shard {shard}"), r))?;
        side.send(
            &Msg::Ack {
                step: side.step,
                items,
            },
            &[],
        )?;
    }
    side.enter(UpgradeStep::Global);
    let global = receive_global(side, &m, moved)?;
    let events = global.events.len() as u64;
    tgt.adopt_global(global)
        .map_err(|r| side.local("adopt global state", r))?;
    tgt.ready().map_err(|r| side.local("ready", r))?;
    target_commit(side, tgt)?;
    Ok(TargetOutcome {
        manifest: m,
        connections: moved.conns,
        records: moved.records,
        events,
        transitions: Vec::new(),
    })
}

/// Prepare: the manifest, checked structurally and against the local config.
fn target_prepare<T: Target>(side: &mut Side, tgt: &mut T) -> Result<Manifest, UpgradeError> {
    let (msg, fds) = side.recv_fds()?;
    side.no_fds(&msg, &fds)?;
    let m = match msg {
        Msg::Manifest {
            step: UpgradeStep::Prepare,
            manifest,
        } => manifest,
        m => return Err(side.protocol("manifest", &m)),
    };
    info!(
        from_pid = m.from_pid,
        from_version = %m.from_version,
        shards = m.shards,
        connections = m.connections_total,
        agents = m.agents_total,
        "upgrade: manifest"
    );
    m.validate().map_err(|e| side.err(e))?;
    tgt.check_manifest(&m)
        .map_err(|r| side.local("check manifest", r))?;
    side.send(
        &Msg::Ack {
            step: side.step,
            items: 0,
        },
        &[],
    )?;
    Ok(m)
}

/// Listeners: every one a listening stream socket on the manifest's address.
fn target_listeners<T: Target>(
    side: &mut Side,
    tgt: &mut T,
    m: &Manifest,
) -> Result<(), UpgradeError> {
    let shards = m.shards;
    let want_addr = m.listen.parse::<std::net::SocketAddr>().ok();
    side.enter(UpgradeStep::Listeners);
    let mut listeners: Vec<OwnedFd> = Vec::with_capacity(shards);
    while listeners.len() < shards {
        let (msg, fds) = side.recv_fds()?;
        match msg {
            Msg::Listeners {
                step: UpgradeStep::Listeners,
                first,
                count,
            } if first == listeners.len()
                && count == fds.len()
                && count > 0
                && first + count <= shards => {}
            m => {
                return Err(side.protocol(
                    format!(
                        "listeners {}.. with matching fds ({} arrived)",
                        listeners.len(),
                        fds.len()
                    ),
                    &m,
                ))
            }
        }
        for fd in fds {
            check_listener(fd.as_fd(), want_addr).map_err(|source| {
                side.err(FailKind::Listener {
                    index: listeners.len(),
                    source,
                })
            })?;
            listeners.push(fd);
        }
    }
    tgt.adopt_listeners(listeners)
        .map_err(|r| side.local("adopt listeners", r))?;
    side.send(
        &Msg::Ack {
            step: side.step,
            items: shards as u64,
        },
        &[],
    )
}

/// One shard's transfer as received.
#[derive(Default)]
struct ShardIn {
    conns: Vec<(ConnHandoff, OwnedFd)>,
    records: Vec<PresenceRecordHandoff>,
    uncarried: u64,
}

/// Transfer(shard): batches of connections and records, then ShardDone.
/// `before` is what earlier shards brought (the manifest caps the totals).
fn receive_shard(
    side: &mut Side,
    shard: usize,
    m: &Manifest,
    before: Moved,
) -> Result<ShardIn, UpgradeError> {
    let mut got = ShardIn::default();
    let mut next_batch = 0u32;
    loop {
        let (msg, fds) = side.recv_fds()?;
        match msg {
            Msg::Conns {
                step: UpgradeStep::Transfer(s),
                shard: sh,
                batch,
                conns,
            } if s == shard && sh == shard && batch == next_batch => {
                take_conns(side, shard, batch, m, before, &mut got, conns, fds)?;
            }
            Msg::Records {
                step: UpgradeStep::Transfer(s),
                shard: sh,
                batch,
                records,
            } if s == shard && sh == shard && batch == next_batch && fds.is_empty() => {
                take_records(side, shard, m, before, &mut got, records)?;
            }
            Msg::ShardDone {
                step: UpgradeStep::Transfer(s),
                shard: sh,
                conns,
                records,
                batches,
                uncarried,
            } if s == shard && sh == shard && fds.is_empty() => {
                check_counts(
                    side,
                    &[
                        ("batches", u64::from(batches), u64::from(next_batch)),
                        ("connections", conns, got.conns.len() as u64),
                        ("presence records", records, got.records.len() as u64),
                    ],
                )?;
                debug!(shard, uncarried, "upgrade: shard received");
                got.uncarried = uncarried;
                return Ok(got);
            }
            m => {
                return Err(side.protocol(
                    format!("batch {next_batch} or shard done of shard {shard}"),
                    &m,
                ))
            }
        }
        next_batch += 1;
    }
}

/// A `Conns` batch: one fd per entry, within the manifest's total, each
/// connection valid for this shard.
#[allow(clippy::too_many_arguments)]
fn take_conns(
    side: &Side,
    shard: usize,
    batch: u32,
    m: &Manifest,
    before: Moved,
    got: &mut ShardIn,
    conns: Vec<ConnHandoff>,
    fds: Vec<OwnedFd>,
) -> Result<(), UpgradeError> {
    if conns.len() != fds.len() || conns.is_empty() {
        return Err(side.err(FailKind::Invalid(format!(
            "conns batch {batch} of shard {shard}: {} entries but {} fds",
            conns.len(),
            fds.len()
        ))));
    }
    if before.conns + (got.conns.len() + conns.len()) as u64 > m.connections_total {
        return Err(side.err(FailKind::Invalid(format!(
            "more connections than the manifest's {}",
            m.connections_total
        ))));
    }
    for (c, fd) in conns.into_iter().zip(fds) {
        c.validate(shard).map_err(|what| {
            side.err(ManifestError::Conn {
                shard,
                index: got.conns.len(),
                what,
            })
        })?;
        got.conns.push((c, fd));
    }
    Ok(())
}

/// A `Records` batch: within the manifest's total, each record owned by
/// this shard.
fn take_records(
    side: &Side,
    shard: usize,
    m: &Manifest,
    before: Moved,
    got: &mut ShardIn,
    records: Vec<PresenceRecordHandoff>,
) -> Result<(), UpgradeError> {
    if before.records + (got.records.len() + records.len()) as u64 > m.agents_total {
        return Err(side.err(FailKind::Invalid(format!(
            "more presence records than the manifest's {}",
            m.agents_total
        ))));
    }
    for r in records {
        r.validate(shard, m.shards).map_err(|what| {
            side.err(ManifestError::Record {
                shard,
                agent: r.agent.clone(),
                what,
            })
        })?;
        got.records.push(r);
    }
    Ok(())
}

/// Global: event batches, then GlobalDone with totals that must match what
/// arrived and what the manifest announced.
fn receive_global(
    side: &mut Side,
    m: &Manifest,
    moved: Moved,
) -> Result<GlobalState, UpgradeError> {
    let mut events: Vec<EventHandoff> = Vec::new();
    let mut next_batch = 0u32;
    loop {
        let (msg, fds) = side.recv_fds()?;
        side.no_fds(&msg, &fds)?;
        match msg {
            Msg::Events {
                step: UpgradeStep::Global,
                batch,
                events: ev,
            } if batch == next_batch => {
                events.extend(ev);
                next_batch += 1;
            }
            Msg::GlobalDone {
                step: UpgradeStep::Global,
                events: n_events,
                batches,
                next_event_seq,
                ticket_keys,
                connections_total,
                uncarried_total,
                agents_total,
            } => {
                check_counts(
                    side,
                    &[
                        ("event batches", u64::from(batches), u64::from(next_batch)),
                        ("events", n_events, events.len() as u64),
                        ("connections (sent)", connections_total, moved.conns),
                        ("uncarried connections", uncarried_total, moved.uncarried),
                        ("presence records (sent)", agents_total, moved.records),
                        (
                            "connections (carried + uncarried)",
                            m.connections_total,
                            moved.conns.saturating_add(moved.uncarried),
                        ),
                        ("presence records", m.agents_total, moved.records),
                        ("next event seq", m.next_event_seq, next_event_seq),
                    ],
                )?;
                validate_events(&events, next_event_seq).map_err(|e| side.err(e))?;
                return Ok(GlobalState {
                    events,
                    next_event_seq,
                    ticket_keys,
                });
            }
            m => return Err(side.protocol(format!("events batch {next_batch} or global done"), &m)),
        }
    }
}

/// Confirm, wait for the source's Commit, commit, report Serving.
fn target_commit<T: Target>(side: &mut Side, tgt: &mut T) -> Result<(), UpgradeError> {
    side.enter(UpgradeStep::Confirm);
    let pid = std::process::id();
    side.send(
        &Msg::Confirm {
            step: UpgradeStep::Confirm,
            pid,
        },
        &[],
    )?;
    side.enter(UpgradeStep::Commit);
    match side.recv()? {
        Msg::Commit {
            step: UpgradeStep::Commit,
        } => {}
        m => return Err(side.protocol("commit", &m)),
    }
    tgt.commit().map_err(|r| side.local("commit", r))?;
    // Best effort: the source treats EOF after Commit as a failed target
    // and resumes, so a lost Serving is not harmless; report it.
    side.send(
        &Msg::Serving {
            step: UpgradeStep::Commit,
            pid,
        },
        &[],
    )
}

/// Why a handed-over listening socket is refused.
#[derive(Debug, Error)]
pub enum ListenerError {
    #[error("not a socket ({0})")]
    NotSocket(nix::Error),
    #[error("not listening")]
    NotListening,
    #[error("SO_TYPE: {0}")]
    SockType(nix::Error),
    #[error("socket type {0:?}, expected stream")]
    NotStream(SockType),
    #[error("getsockname: {0}")]
    Name(nix::Error),
    #[error("not an inet socket")]
    NotInet,
    #[error("bound to {got}, manifest says {want}")]
    Address {
        got: std::net::SocketAddr,
        want: std::net::SocketAddr,
    },
}

/// A handed-over listener must be a listening stream socket bound to the
/// manifest's address.
fn check_listener(
    fd: BorrowedFd<'_>,
    want: Option<std::net::SocketAddr>,
) -> Result<(), ListenerError> {
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(ListenerError::NotSocket)?;
    if !listening {
        return Err(ListenerError::NotListening);
    }
    let ty = getsockopt(&fd, sockopt::SockType).map_err(ListenerError::SockType)?;
    if ty != SockType::Stream {
        return Err(ListenerError::NotStream(ty));
    }
    if let Some(want) = want {
        let ss: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(ListenerError::Name)?;
        let got = if let Some(v4) = ss.as_sockaddr_in() {
            std::net::SocketAddr::V4((*v4).into())
        } else if let Some(v6) = ss.as_sockaddr_in6() {
            std::net::SocketAddr::V6((*v6).into())
        } else {
            return Err(ListenerError::NotInet);
        };
        if got != want {
            return Err(ListenerError::Address { got, want });
        }
    }
    Ok(())
}
