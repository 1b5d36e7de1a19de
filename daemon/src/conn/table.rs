//! The shard's connection table: every connection's slab entry (keyed by
//! slab key and generation), its phase, its one deadline-wheel entry, the
//! epoll set of established sessions, and the per-shard scratch buffers.
//!
//! A connection is a handshake task until its TLS handshake completes
//! (`conn/handshake.rs`), then a [`Session`] entry read when the poller
//! reports it ready. The protocol decisions are `conn/agent.rs`'s; what
//! the rest of the shard must do about them (tell an owner shard, count)
//! the table does not do itself: its methods push [`ConnEffect`]s into a
//! buffer the caller owns and applies (`shard/mod.rs`).

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use slab::Slab;
use tracing::{debug, warn};

use crate::conn::agent::{self, Close, ConnCmd, Effect, Ending, Phase, SessionEvent, Timeouts};
use crate::conn::poller::{Poller, PollerError};
use crate::conn::session::{Pending, Session};
use crate::conn::wheel::DeadlineWheel;
use crate::presence::table::{ConnRef, GoneReason};
use crate::shared::Runtime;
use crate::tls::record::{LeanSession, RecordError};
use crate::upgrade::machine::ConnFd;
use crate::upgrade::manifest::ConnHandoff;
use presence_proto::{ErrorCode, Frame, TOKEN_LEN};

/// Why the table could not be built or could not take connections over.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot create the session poller: {0}")]
    Poller(#[source] PollerError),
    #[error("connection {key}: unknown suite {suite:#06x}")]
    UnknownSuite { key: u32, suite: u16 },
    #[error("connection {key}: {source}")]
    Tls {
        key: u32,
        #[source]
        source: RecordError,
    },
    #[error("two handed-over connections share a slab key")]
    DuplicateKey,
    #[error("connection {key}: cannot watch its socket: {source}")]
    Watch {
        key: usize,
        #[source]
        source: PollerError,
    },
}

/// What the rest of the shard must do after a table operation, in order.
#[derive(Debug)]
pub enum ConnEffect {
    /// A HELLO was accepted: tell the agent's owner shard.
    Hello {
        id: Box<str>,
        session: u64,
        conn: ConnRef,
        ts_ms: u64,
    },
    /// A session (past HELLO) ended: tell the agent's owner shard.
    Gone {
        id: Box<str>,
        session: u64,
        reason: GoneReason,
        /// Wall-clock ms of the last frame.
        last_seen_ms: u64,
        ts_ms: u64,
    },
    /// A HEARTBEAT was acknowledged.
    Heartbeat,
    /// An agent said BYE.
    Bye,
    /// A session went silent past its deadline.
    Timeout,
    /// An ERROR frame was sent.
    ErrorSent(ErrorCode),
}

/// The effects of one operation; the caller's buffer, reused.
pub type Effects = Vec<ConnEffect>;

/// What a slab entry holds besides its bookkeeping.
pub enum Kind {
    /// The handshake task listens here for deadline and shutdown commands.
    Handshake(Option<oneshot::Sender<ConnCmd>>),
    Session(Box<Session>),
}

/// A connection's slot in the shard's slab.
pub struct ConnEntry {
    pub gen: u32,
    pub phase: Phase,
    /// Table-clock milliseconds (see [`ConnTable::now_ms`]).
    pub accepted_ms: u64,
    pub last_seen_ms: u64,
    /// Tick of this entry's live wheel entry (0 = none).
    pub(crate) wheel_tick: u64,
    pub kind: Kind,
}

/// Per-shard scratch space shared by every session: nothing per connection.
pub struct Scratch {
    /// Ciphertext read from one socket.
    pub read: Vec<u8>,
    /// Decrypted application data of one read.
    pub plain: Vec<u8>,
    /// Frames to send back (plaintext).
    pub reply: Vec<u8>,
    /// Sealed output.
    pub out: Vec<u8>,
    /// What one read asked for (frames, closes), acted on by `apply`.
    pub events: Vec<SessionEvent>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            read: vec![0u8; 64 * 1024],
            plain: Vec::with_capacity(16 * 1024),
            reply: Vec::with_capacity(4 * 1024),
            out: Vec::with_capacity(8 * 1024),
            events: Vec::with_capacity(64),
        }
    }
}

/// A completed TLS handshake, ready to become a session entry.
pub struct NewSession {
    pub fd: OwnedFd,
    pub tls: LeanSession,
    /// Ciphertext that arrived after the handshake.
    pub input: Vec<u8>,
    /// Application data that came with the handshake.
    pub early: Vec<u8>,
}

/// The live session at `key` with generation `gen`, if any.
fn session_mut(conns: &mut Slab<ConnEntry>, key: usize, gen: u32) -> Option<&mut Session> {
    match conns
        .get_mut(key)
        .filter(|e| e.gen == gen)
        .map(|e| &mut e.kind)
    {
        Some(Kind::Session(s)) => Some(s),
        _ => None,
    }
}

/// Epoll data: slab key in the low half, generation in the high half.
fn token(key: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | key as u64
}

fn untoken(t: u64) -> (usize, u32) {
    ((t & 0xffff_ffff) as usize, (t >> 32) as u32)
}

/// The agent rules' view of the runtime.
struct RuntimeContext<'a>(&'a Runtime);

impl agent::Context for RuntimeContext<'_> {
    fn authenticate(&self, id: &[u8], token: &[u8; TOKEN_LEN]) -> agent::HelloAuth {
        self.0.authenticate(id, token)
    }
    fn heartbeat_interval_ms(&self) -> u32 {
        self.0.config.presence.heartbeat_interval.as_millis() as u32
    }
    fn new_session_id(&mut self) -> u64 {
        crate::shared::new_session_id(crate::shared::wall_ms())
    }
}

/// Every connection of one shard.
pub struct ConnTable {
    shard: usize,
    rt: Arc<Runtime>,
    conns: RefCell<Slab<ConnEntry>>,
    wheel: RefCell<DeadlineWheel<(u32, u32)>>,
    poller: Poller,
    scratch: RefCell<Scratch>,
    /// Start of this table's millisecond clock.
    origin: Instant,
    next_gen: Cell<u32>,
}

impl ConnTable {
    /// A table for shard `shard` holding up to `capacity` connections
    /// without reallocating, its wheel ticking every `tick` from `origin`.
    pub fn new(
        shard: usize,
        rt: Arc<Runtime>,
        origin: Instant,
        tick: Duration,
        capacity: usize,
    ) -> Result<Self, ConnError> {
        Ok(Self {
            shard,
            rt,
            conns: RefCell::new(Slab::with_capacity(capacity)),
            wheel: RefCell::new(DeadlineWheel::new(origin, tick, 1024)),
            poller: Poller::new().map_err(ConnError::Poller)?,
            scratch: RefCell::new(Scratch::default()),
            origin,
            next_gen: Cell::new(0),
        })
    }

    /// Milliseconds on this table's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn instant_of(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    /// Wall-clock ms of a table-clock time.
    fn wall_ms_of(&self, ms: u64) -> u64 {
        crate::shared::wall_ms().saturating_sub(self.now_ms().saturating_sub(ms))
    }

    fn timeouts(&self) -> Timeouts {
        let c = &self.rt.config;
        Timeouts::new(
            c.tls.handshake_timeout,
            c.presence.hello_timeout,
            c.presence.liveness_timeout(),
        )
    }

    fn deadline_ms(&self, e: &ConnEntry) -> u64 {
        self.timeouts()
            .deadline_ms(e.phase, e.accepted_ms, e.last_seen_ms)
    }

    /// Give the entry a wheel entry at `at_ms`. Every live connection has
    /// exactly one live wheel entry, told apart from stale ones by its tick;
    /// an entry already waiting at that tick serves as it is.
    fn schedule(&self, key: usize, e: &mut ConnEntry, at_ms: u64) {
        let at = self.instant_of(at_ms);
        let mut wheel = self.wheel.borrow_mut();
        if e.wheel_tick != 0 && wheel.tick_for(at) == e.wheel_tick {
            return;
        }
        e.wheel_tick = wheel.insert(at, (key as u32, e.gen));
    }

    /// Register an accepted connection; returns its key, generation and command receiver.
    pub fn register(&self) -> (usize, u32, oneshot::Receiver<ConnCmd>) {
        let gen = self.next_gen.get().wrapping_add(1).max(1);
        self.next_gen.set(gen);
        let now = self.now_ms();
        let (tx, rx) = oneshot::channel();
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let key = entry.key();
        let mut e = ConnEntry {
            gen,
            phase: Phase::Handshake,
            accepted_ms: now,
            last_seen_ms: now,
            wheel_tick: 0,
            kind: Kind::Handshake(Some(tx)),
        };
        self.schedule(key, &mut e, self.timeouts().first_deadline_ms(now));
        entry.insert(e);
        (key, gen, rx)
    }

    /// A handshake task ended without a session.
    pub fn handshake_failed(&self, key: usize, gen: u32) {
        let mut conns = self.conns.borrow_mut();
        if conns.get(key).is_some_and(|e| e.gen == gen) {
            conns.remove(key);
        }
    }

    /// The TLS handshake completed: the connection becomes a session entry
    /// watched by the poller, and acts on the input that came with it
    /// (unless `frozen`: then the input waits in the session).
    pub fn adopt(&self, key: usize, gen: u32, new: NewSession, frozen: bool, fx: &mut Effects) {
        let NewSession {
            fd,
            tls,
            mut input,
            mut early,
        } = new;
        {
            let mut conns = self.conns.borrow_mut();
            let Some(e) = conns.get_mut(key).filter(|e| e.gen == gen) else {
                return; // deadline or shutdown took it meanwhile; fd closes here
            };
            if let Err(err) = self.poller.add(fd.as_fd(), token(key, gen), false) {
                warn!("cannot watch a new session: {err}");
                conns.remove(key);
                return;
            }
            e.phase = Phase::AwaitHello;
            let mut session = Box::new(Session::new(fd, tls));
            if frozen {
                // A live hand-over is under way: nothing may change now.
                // The input waits in the session (and travels with it).
                if !(input.is_empty() && early.is_empty()) {
                    session.pending = Some(Box::new(Pending {
                        record: input,
                        frames: early,
                        tx: Vec::new(),
                    }));
                }
                e.kind = Kind::Session(session);
                return;
            }
            e.kind = Kind::Session(session);
        }
        let mut events = Vec::new();
        {
            let mut conns = self.conns.borrow_mut();
            let mut scratch = self.scratch.borrow_mut();
            let Scratch { plain, out, .. } = &mut *scratch;
            out.clear();
            if let Some(s) = session_mut(&mut conns, key, gen) {
                let closing = !early.is_empty() && s.split_early(&mut early, &mut events);
                if !closing && !input.is_empty() {
                    s.ingest(&mut input, plain, out, &mut events);
                }
                // A KeyUpdate that came with the client Finished: its reply
                // goes out before anything sealed under the new key.
                if !out.is_empty() && !s.send(out) {
                    events.push(SessionEvent::Closed);
                }
            }
        }
        if !events.is_empty() {
            self.apply(key, gen, &mut events, fx);
        }
    }

    /// Wait (at most `timeout`) for sessions whose sockets are ready; the
    /// buffer comes back filled, for [`ConnTable::on_ready`].
    pub async fn wait_ready(&self, events: Vec<EpollEvent>, timeout: Duration) -> Vec<EpollEvent> {
        self.poller.wait(events, timeout).await
    }

    /// A session's socket is ready: flush, read, act.
    pub fn on_ready(&self, ev: &EpollEvent, fx: &mut Effects) {
        let (key, gen) = untoken(ev.data());
        let flags = ev.events();
        // The shard's event buffer, out of the scratch while `apply` borrows it.
        let mut events = std::mem::take(&mut self.scratch.borrow_mut().events);
        let close = {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = session_mut(&mut conns, key, gen) else {
                self.scratch.borrow_mut().events = events;
                return;
            };
            let mut close = false;
            if flags.contains(EpollFlags::EPOLLOUT) {
                close |= !s.flush();
                if s.pending_output() == 0 && s.want_write {
                    s.want_write = false;
                    let _ = self
                        .poller
                        .set_write_interest(s.fd.as_fd(), token(key, gen), false);
                }
            }
            let mut scratch = self.scratch.borrow_mut();
            let Scratch {
                read, plain, out, ..
            } = &mut *scratch;
            out.clear();
            s.read(read, plain, out, &mut events);
            // KeyUpdate replies and the like.
            if !out.is_empty() {
                close |= !s.send(out);
            }
            close
        };
        if close {
            self.close_session(key, gen, GoneReason::Disconnect, fx);
        } else if !events.is_empty() {
            self.apply(key, gen, &mut events, fx);
        }
        events.clear();
        self.scratch.borrow_mut().events = events;
    }

    /// Act on what a session's input asked for (the rules are
    /// `agent::on_event`'s); reply with one sealed record.
    fn apply(&self, key: usize, gen: u32, events: &mut Vec<SessionEvent>, fx: &mut Effects) {
        tracing::trace!(shard = self.shard, key, ?events, "session events");
        let now = self.now_ms();
        let mut end: Option<Ending> = None;
        let mut scratch = self.scratch.borrow_mut();
        let Scratch { reply, out, .. } = &mut *scratch;
        reply.clear();
        let mut conns = self.conns.borrow_mut();
        let Some(e) = conns.get_mut(key).filter(|e| e.gen == gen) else {
            return;
        };
        let mut ctx = RuntimeContext(&self.rt);
        for event in events.drain(..) {
            if let SessionEvent::TlsFailure { reason, .. } = &event {
                debug!(shard = self.shard, "closing after a TLS failure: {reason}");
            }
            let outcome = agent::on_event(e.phase, event, &mut ctx);
            if outcome.seen {
                e.last_seen_ms = now;
            }
            if let Some(f) = outcome.reply {
                f.encode(reply);
            }
            match outcome.effect {
                Effect::None => {}
                Effect::Heartbeat => fx.push(ConnEffect::Heartbeat),
                Effect::Welcomed { agent, session } => {
                    e.phase = Phase::Session;
                    if let Kind::Session(s) = &mut e.kind {
                        s.agent = Some(agent.clone());
                        s.session_id = session;
                    }
                    let at = self.deadline_ms(e);
                    self.schedule(key, e, at);
                    fx.push(ConnEffect::Hello {
                        id: agent,
                        session,
                        conn: ConnRef {
                            shard: self.shard as u16,
                            key: key as u32,
                            gen,
                        },
                        ts_ms: crate::shared::wall_ms(),
                    });
                }
                Effect::End(ending) => {
                    end = Some(ending);
                    break;
                }
            }
        }
        if let Kind::Session(s) = &mut e.kind {
            match &end {
                None if !reply.is_empty() => {
                    out.clear();
                    if !s.seal(reply, out) || !s.send(out) {
                        end = Some(Ending {
                            reason: GoneReason::Disconnect,
                            error: None,
                            close: Close::Goodbye,
                        });
                    } else if s.pending_output() > 0 && !s.want_write {
                        s.want_write = true;
                        let _ = self
                            .poller
                            .set_write_interest(s.fd.as_fd(), token(key, gen), true);
                    }
                }
                None => {}
                Some(ending) => goodbye(s, ending, reply, out, fx),
            }
        }
        drop((conns, scratch));
        if let Some(ending) = end {
            if ending.reason == GoneReason::Bye {
                fx.push(ConnEffect::Bye);
            }
            self.close_session(key, gen, ending.reason, fx);
        }
    }

    /// End a session as `ending` says: ERROR (when given) and close_notify.
    fn end_session(&self, key: usize, gen: u32, ending: &Ending, fx: &mut Effects) {
        {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = session_mut(&mut conns, key, gen) else {
                return;
            };
            let mut scratch = self.scratch.borrow_mut();
            let Scratch { reply, out, .. } = &mut *scratch;
            reply.clear();
            goodbye(s, ending, reply, out, fx);
        }
        self.close_session(key, gen, ending.reason, fx);
    }

    /// Free a session's slot and socket; a session past HELLO is gone.
    fn close_session(&self, key: usize, gen: u32, reason: GoneReason, fx: &mut Effects) {
        let e = {
            let mut conns = self.conns.borrow_mut();
            if conns.get(key).is_none_or(|e| e.gen != gen) {
                return;
            }
            conns.remove(key)
        };
        let Kind::Session(s) = e.kind else {
            return;
        };
        let _ = self.poller.remove(s.fd.as_fd());
        if let (Some(id), Phase::Session) = (s.agent, e.phase) {
            fx.push(ConnEffect::Gone {
                id,
                session: s.session_id,
                reason,
                last_seen_ms: self.wall_ms_of(e.last_seen_ms),
                ts_ms: crate::shared::wall_ms(),
            });
        }
        // `s.fd` closes here.
    }

    /// Close every session whose agent `creds` revokes: ERROR 2, then
    /// offline with reason `revoked` (see [`agent::revoked_ending`]).
    pub fn revoke(&self, creds: &crate::shared::Credentials, fx: &mut Effects) {
        let doomed: Vec<(usize, u32)> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, e)| e.phase == Phase::Session)
            .filter_map(|(key, e)| match &e.kind {
                Kind::Session(s) => s
                    .agent
                    .as_deref()
                    .filter(|id| creds.is_revoked(id.as_bytes()))
                    .map(|_| (key, e.gen)),
                _ => None,
            })
            .collect();
        let ending = agent::revoked_ending();
        for (key, gen) in doomed {
            self.end_session(key, gen, &ending, fx);
        }
    }

    /// Deliver a command to a connection, whatever its phase.
    pub fn command(&self, key: usize, gen: u32, cmd: ConnCmd, fx: &mut Effects) {
        {
            let mut conns = self.conns.borrow_mut();
            let Some(e) = conns.get_mut(key).filter(|e| e.gen == gen) else {
                return;
            };
            if let Kind::Handshake(tx) = &mut e.kind {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(cmd);
                }
                return;
            }
        }
        if cmd == ConnCmd::Timeout {
            fx.push(ConnEffect::Timeout);
        }
        self.end_session(key, gen, &agent::on_command(cmd), fx);
    }

    /// Fire due deadlines.
    pub fn expire_deadlines(&self, fired: &mut Vec<(u64, (u32, u32))>, fx: &mut Effects) {
        let now = Instant::now();
        self.wheel
            .borrow_mut()
            .expire_with_tick(now, |t, item| fired.push((t, item)));
        let now_ms = self.now_ms();
        for (tick, (key, gen)) in fired.drain(..) {
            let cmd = {
                let mut conns = self.conns.borrow_mut();
                let Some(e) = conns.get_mut(key as usize) else {
                    continue;
                };
                if e.gen != gen || e.wheel_tick != tick {
                    continue; // stale entry
                }
                e.wheel_tick = 0;
                let due = self.deadline_ms(e);
                if due > now_ms {
                    self.schedule(key as usize, e, due);
                    continue;
                }
                agent::expired(e.phase)
            };
            self.command(key as usize, gen, cmd, fx);
        }
    }

    /// Ask every connection to close with ERROR 7 (no presence events).
    pub fn close_all(&self, fx: &mut Effects) {
        let keys: Vec<(usize, u32)> = self
            .conns
            .borrow()
            .iter()
            .map(|(k, e)| (k, e.gen))
            .collect();
        for (key, gen) in keys {
            self.command(key, gen, ConnCmd::Shutdown, fx);
        }
    }

    /// Live hand-over, old process: describe every session whose TLS state
    /// can be carried (with its socket); returns them and how many were
    /// left out. The shard is frozen: nothing changes after.
    pub fn quiesce(&self) -> (Vec<(ConnHandoff, ConnFd)>, u64) {
        let now = self.now_ms();
        let mut conns = self.conns.borrow_mut();
        let mut carried = Vec::new();
        let mut uncarried = 0;
        for (key, e) in conns.iter_mut() {
            let (gen, last_seen_ms, accepted_ms, phase) =
                (e.gen, e.last_seen_ms, e.accepted_ms, e.phase);
            let Kind::Session(s) = &mut e.kind else {
                uncarried += 1; // mid-handshake: no TLS state yet
                continue;
            };
            if !s.tls.transferable() {
                uncarried += 1; // mid-KeyUpdate, or closing
                continue;
            }
            // The session keeps its descriptor open until release or thaw.
            let fd = ConnFd::Borrowed(std::os::fd::AsRawFd::as_raw_fd(&s.fd));
            s.carried = true;
            carried.push((
                handoff(
                    s,
                    self.shard,
                    key,
                    gen,
                    phase,
                    now,
                    last_seen_ms,
                    accepted_ms,
                ),
                fd,
            ));
        }
        (carried, uncarried)
    }

    /// Live hand-over committed, old process: let go of every connection.
    /// Carried ones are closed without a word (the new process has them);
    /// others get RECONNECT (when TLS is up) with a short jittered delay.
    pub fn release_all(&self) {
        use crate::upgrade::{RECONNECT_MAX_DELAY_MS, RECONNECT_MIN_DELAY_MS};
        let entries: Vec<ConnEntry> = self.conns.borrow_mut().drain().collect();
        let mut scratch = self.scratch.borrow_mut();
        let Scratch { reply, out, .. } = &mut *scratch;
        for e in entries {
            match e.kind {
                Kind::Session(mut s) => {
                    let _ = self.poller.remove(s.fd.as_fd());
                    if !s.carried {
                        reply.clear();
                        Frame::Reconnect {
                            min_delay_ms: RECONNECT_MIN_DELAY_MS,
                            max_delay_ms: RECONNECT_MAX_DELAY_MS,
                        }
                        .encode(reply);
                        s.goodbye(reply, out);
                    }
                    // Dropping closes this process's descriptor only: no
                    // shutdown(), so a carried connection stays open.
                }
                Kind::Handshake(Some(tx)) => {
                    let _ = tx.send(ConnCmd::Shutdown);
                }
                Kind::Handshake(None) => {}
            }
        }
    }

    /// Live hand-over, new process: take over sessions at their old slab
    /// keys and generations (the owners' references stay valid), before
    /// serving starts.
    pub fn adopt_handed(
        &self,
        handed: Vec<(ConnHandoff, OwnedFd)>,
        fx: &mut Effects,
    ) -> Result<(), ConnError> {
        let now = self.now_ms();
        let mut max_gen = 0;
        let mut entries = Vec::with_capacity(handed.len());
        for (h, fd) in handed {
            max_gen = max_gen.max(h.gen);
            let key = h.key as usize;
            entries.push((key, handed_entry(h, fd, now)?));
        }
        let n = entries.len();
        let slab: Slab<ConnEntry> = entries.into_iter().collect();
        if slab.len() != n {
            return Err(ConnError::DuplicateKey);
        }
        *self.conns.borrow_mut() = slab;
        self.next_gen.set(max_gen);
        // Deadlines and readiness.
        let keys: Vec<usize> = self.conns.borrow().iter().map(|(k, _)| k).collect();
        for &key in &keys {
            let mut conns = self.conns.borrow_mut();
            let Some(e) = conns.get_mut(key) else {
                continue;
            };
            let at = self.deadline_ms(e);
            self.schedule(key, e, at);
            let gen = e.gen;
            if let Kind::Session(s) = &mut e.kind {
                let want_write = s.pending_output() > 0;
                s.want_write = want_write;
                self.poller
                    .add(s.fd.as_fd(), token(key, gen), want_write)
                    .map_err(|source| ConnError::Watch { key, source })?;
            }
        }
        // Input the old process had read but not acted on (it was frozen):
        // act on it now, as no readiness event will announce it again.
        for key in keys {
            let gen = match self.conns.borrow().get(key) {
                Some(e) => e.gen,
                None => continue,
            };
            self.kick(key, gen, fx);
        }
        Ok(())
    }

    /// Process input already held in a session's pending buffers.
    fn kick(&self, key: usize, gen: u32, fx: &mut Effects) {
        let mut events = {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = session_mut(&mut conns, key, gen) else {
                return;
            };
            let Some(p) = s.pending.as_mut() else {
                return;
            };
            let mut frames = std::mem::take(&mut p.frames);
            let mut events = Vec::new();
            let mut scratch = self.scratch.borrow_mut();
            let Scratch { plain, out, .. } = &mut *scratch;
            out.clear();
            let mut closing = false;
            if !frames.is_empty() {
                closing = s.split_early(&mut frames, &mut events);
            }
            if !closing {
                s.ingest(&mut [], plain, out, &mut events);
            }
            if !out.is_empty() && !s.send(out) {
                events.push(SessionEvent::Closed);
            }
            events
        };
        if !events.is_empty() {
            self.apply(key, gen, &mut events, fx);
        }
    }

    /// (connections, sessions past HELLO)
    pub fn counts(&self) -> (u64, u64) {
        let conns = self.conns.borrow();
        let sessions = conns
            .iter()
            .filter(|(_, e)| e.phase == Phase::Session)
            .count();
        (conns.len() as u64, sessions as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.conns.borrow().is_empty()
    }

    /// Live last-seen (wall ms) of a connection, for `agent <id>`.
    pub fn last_seen_wall_ms(&self, conn: ConnRef) -> Option<u64> {
        let conns = self.conns.borrow();
        let e = conns.get(conn.key as usize).filter(|e| e.gen == conn.gen)?;
        Some(self.wall_ms_of(e.last_seen_ms))
    }
}

/// Send `ending`'s ERROR (if any) then close as it says; `reply` may
/// already hold frames to send first.
fn goodbye(
    s: &mut Session,
    ending: &Ending,
    reply: &mut Vec<u8>,
    out: &mut Vec<u8>,
    fx: &mut Effects,
) {
    if let Some((code, msg)) = &ending.error {
        fx.push(ConnEffect::ErrorSent(*code));
        Frame::error(*code, msg.as_ref()).encode(reply);
    }
    match ending.close {
        Close::Alert(alert) => {
            out.clear();
            s.seal_alert(alert, out);
            let _ = s.send(out);
        }
        Close::Goodbye => s.goodbye(reply, out),
    }
}

/// A session described for the process taking over.
#[allow(clippy::too_many_arguments)]
fn handoff(
    s: &Session,
    shard: usize,
    key: usize,
    gen: u32,
    phase: Phase,
    now: u64,
    last_seen_ms: u64,
    accepted_ms: u64,
) -> ConnHandoff {
    use crate::upgrade::manifest::{phase, TlsState};
    let (suite, rx_secret, rx_seq, tx_secret, tx_seq) = s.tls.export();
    let pending = s.pending.as_deref();
    ConnHandoff {
        shard: shard as u16,
        key: key as u32,
        gen,
        agent: s.agent.as_deref().map(str::to_owned),
        session_id: s.session_id,
        last_seen_age_ms: now.saturating_sub(last_seen_ms),
        accepted_age_ms: now.saturating_sub(accepted_ms),
        phase: if phase == Phase::Session {
            phase::SESSION
        } else {
            phase::AWAIT_HELLO
        },
        tls: TlsState {
            suite: suite.iana(),
            rx_secret,
            tx_secret,
            rx_seq,
            tx_seq,
        },
        rx_pending: pending.map(|p| p.record.clone()).unwrap_or_default(),
        rx_plain: pending.map(|p| p.frames.clone()).unwrap_or_default(),
        tx_pending: pending.map(|p| p.tx.clone()).unwrap_or_default(),
    }
}

/// A handed-over session's slab entry.
fn handed_entry(h: ConnHandoff, fd: OwnedFd, now: u64) -> Result<ConnEntry, ConnError> {
    use crate::upgrade::manifest::phase;
    let suite =
        crate::tls::record::Suite::from_iana(h.tls.suite).ok_or(ConnError::UnknownSuite {
            key: h.key,
            suite: h.tls.suite,
        })?;
    let tls = LeanSession::new(
        suite,
        &h.tls.rx_secret,
        h.tls.rx_seq,
        &h.tls.tx_secret,
        h.tls.tx_seq,
    )
    .map_err(|source| ConnError::Tls { key: h.key, source })?;
    let mut s = Session::new(fd, tls);
    s.agent = h.agent.map(Into::into);
    s.session_id = h.session_id;
    if !(h.rx_pending.is_empty() && h.rx_plain.is_empty() && h.tx_pending.is_empty()) {
        s.pending = Some(Box::new(Pending {
            record: h.rx_pending,
            frames: h.rx_plain,
            tx: h.tx_pending,
        }));
    }
    let phase = if h.phase == phase::SESSION {
        Phase::Session
    } else {
        Phase::AwaitHello
    };
    Ok(ConnEntry {
        gen: h.gen,
        phase,
        accepted_ms: now.saturating_sub(h.accepted_age_ms),
        last_seen_ms: now.saturating_sub(h.last_seen_age_ms),
        wheel_tick: 0,
        kind: Kind::Session(Box::new(s)),
    })
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// The per-connection budget (issue: <= 512 B user memory per idle
    /// agent, presence record included) is spent here; keep it visible.
    #[test]
    fn per_connection_structures_stay_small() {
        let sizes = [
            ("Session", std::mem::size_of::<Session>()),
            ("LeanSession", std::mem::size_of::<LeanSession>()),
            ("ConnEntry", std::mem::size_of::<ConnEntry>()),
            (
                "slab slot (ConnEntry in slab::Entry)",
                std::mem::size_of::<ConnEntry>() + 8,
            ),
            (
                "presence Record",
                std::mem::size_of::<crate::presence::table::Record>(),
            ),
        ];
        for (name, size) in sizes {
            println!("{name}: {size} B");
        }
    }
}
