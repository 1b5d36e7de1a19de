//! The shard's connection table: every connection's slab entry, its one
//! deadline-wheel entry, and what happens to established sessions when
//! their socket is readable or a deadline passes.
//!
//! A connection is a handshake task until its TLS handshake completes
//! (see `conn.rs`), then a [`Session`] entry driven from the shard's epoll
//! set by [`session_loop`].

use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use nix::sys::epoll::EpollFlags;
use tracing::{debug, warn};

use crate::conn::handshake::ConnCmd;
use crate::conn::session::{Session, Step};
use crate::presence::table::{owner_shard, ConnRef, GoneReason};
use crate::shard::{Shard, ShardMsg};
use crate::tls::record::{AlertDescription, LeanSession};
use presence_proto::{ErrorCode, Frame};

/// Connection lifecycle phase, which decides the entry's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Handshake,
    AwaitHello,
    Session,
}

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
    /// Shard-clock milliseconds (see [`Shard::now_ms`]).
    pub accepted_ms: u64,
    pub last_seen_ms: u64,
    /// Tick of this entry's live wheel entry (0 = none).
    pub(crate) wheel_tick: u64,
    pub kind: Kind,
}

impl ConnEntry {
    pub fn session(&self) -> Option<&Session> {
        match &self.kind {
            Kind::Session(s) => Some(s),
            Kind::Handshake(_) => None,
        }
    }
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
    pub steps: Vec<Step>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            read: vec![0u8; 64 * 1024],
            plain: Vec::with_capacity(16 * 1024),
            reply: Vec::with_capacity(4 * 1024),
            out: Vec::with_capacity(8 * 1024),
            steps: Vec::with_capacity(64),
        }
    }
}

/// The live session at `key` with generation `gen`, if any.
fn session_mut(conns: &mut slab::Slab<ConnEntry>, key: usize, gen: u32) -> Option<&mut Session> {
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

impl Shard {
    /// Milliseconds on this shard's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn instant_of(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    /// Wall-clock ms of a shard-clock time.
    pub fn wall_ms_of(&self, ms: u64) -> u64 {
        crate::shared::wall_ms().saturating_sub(self.now_ms().saturating_sub(ms))
    }

    fn deadline_ms(&self, e: &ConnEntry) -> u64 {
        let c = &self.rt.config;
        let ms = |d: Duration| d.as_millis() as u64;
        match e.phase {
            Phase::Handshake => e.accepted_ms + ms(c.tls.handshake_timeout),
            Phase::AwaitHello => e.accepted_ms + ms(c.presence.hello_timeout),
            Phase::Session => e.last_seen_ms + ms(c.presence.liveness_timeout()),
        }
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
        let c = &self.rt.config;
        let first = c.tls.handshake_timeout.min(c.presence.hello_timeout);
        self.schedule(key, &mut e, now + first.as_millis() as u64);
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
    /// watched by the epoll set. `input` is ciphertext that arrived after
    /// the handshake; `early` is application data that came with it.
    pub fn adopt(
        &self,
        key: usize,
        gen: u32,
        fd: OwnedFd,
        tls: LeanSession,
        input: Vec<u8>,
        early: Vec<u8>,
    ) {
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
            if self.is_frozen() {
                // A live hand-over is under way: nothing may change now.
                // The input waits in the session (and travels with it).
                if !(input.is_empty() && early.is_empty()) {
                    session.pending = Some(Box::new(crate::conn::session::Pending {
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
        let mut steps = Vec::new();
        let closing = {
            let mut conns = self.conns.borrow_mut();
            let mut scratch = self.scratch.borrow_mut();
            let Scratch { plain, out, .. } = &mut *scratch;
            out.clear();
            match conns.get_mut(key).map(|e| &mut e.kind) {
                Some(Kind::Session(s)) => {
                    let mut closing = false;
                    if !early.is_empty() {
                        let mut early = early;
                        closing = s.split_early(&mut early, &mut steps);
                    }
                    if !closing && !input.is_empty() {
                        let mut input = input;
                        s.ingest(&mut input, plain, out, &mut steps);
                    }
                    // A KeyUpdate that came with the client Finished: its
                    // reply goes out before anything sealed under the new key.
                    if !out.is_empty() && !s.send(out) {
                        steps.push(Step::Closed);
                    }
                    closing
                }
                _ => false,
            }
        };
        let _ = closing;
        if !steps.is_empty() {
            self.apply(key, gen, &mut steps);
        }
    }

    /// The loop that serves every established session of this shard.
    pub async fn serve_sessions(self: Rc<Self>) {
        let mut events = Vec::with_capacity(crate::conn::poller::BATCH);
        while !self.is_shutting_down() {
            if self.is_frozen() {
                // Level-triggered: readiness waits until the thaw.
                glommio::timer::sleep(Duration::from_millis(5)).await;
                continue;
            }
            events = self.poller.wait(events, Duration::from_millis(50)).await;
            if self.is_frozen() {
                continue;
            }
            for ev in &events {
                let (key, gen) = untoken(ev.data());
                self.on_ready(key, gen, ev.events());
            }
        }
    }

    /// A session's socket is ready.
    fn on_ready(&self, key: usize, gen: u32, flags: EpollFlags) {
        // The shard's step buffer, out of the scratch while `apply` borrows it.
        let mut steps = std::mem::take(&mut self.scratch.borrow_mut().steps);
        let close = {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = session_mut(&mut conns, key, gen) else {
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
            s.read(read, plain, out, &mut steps);
            // KeyUpdate replies and the like.
            if !out.is_empty() {
                close |= !s.send(out);
            }
            close
        };
        if close {
            self.close_session(key, gen, GoneReason::Disconnect);
        } else if !steps.is_empty() {
            self.apply(key, gen, &mut steps);
        }
        steps.clear();
        self.scratch.borrow_mut().steps = steps;
    }

    /// Act on what a session's input asked for; reply with one sealed record.
    fn apply(&self, key: usize, gen: u32, steps: &mut Vec<Step>) {
        tracing::trace!(shard = self.id, key, ?steps, "session steps");
        let now = self.now_ms();
        let mut hello: Option<(Box<str>, u64)> = None;
        #[allow(clippy::type_complexity)]
        let mut end: Option<(
            GoneReason,
            Option<(ErrorCode, String)>,
            Option<Option<AlertDescription>>,
        )> = None;
        let mut scratch = self.scratch.borrow_mut();
        let Scratch { reply, out, .. } = &mut *scratch;
        reply.clear();
        {
            let mut conns = self.conns.borrow_mut();
            let Some(e) = conns.get_mut(key).filter(|e| e.gen == gen) else {
                return;
            };
            for step in steps.drain(..) {
                if matches!(step, Step::Frame(_)) {
                    e.last_seen_ms = now;
                }
                match (e.phase, step) {
                    (Phase::AwaitHello, Step::Frame(Frame::Hello { id, token, .. })) => {
                        if !self.rt.verify_token(&id, &token) {
                            end = Some((
                                GoneReason::Disconnect,
                                Some((
                                    ErrorCode::AuthenticationFailed,
                                    "token does not match the agent id".into(),
                                )),
                                None,
                            ));
                            break;
                        }
                        let id: Box<str> = String::from_utf8_lossy(&id).into();
                        let session: u64 = rand::random();
                        self.counters.hellos.inc();
                        Frame::Welcome {
                            heartbeat_interval_ms: self
                                .rt
                                .config
                                .presence
                                .heartbeat_interval
                                .as_millis()
                                as u32,
                            session_id: session,
                        }
                        .encode(reply);
                        e.phase = Phase::Session;
                        if let Kind::Session(s) = &mut e.kind {
                            s.agent = Some(id.clone());
                            s.session_id = session;
                        }
                        let at = self.deadline_ms(e);
                        self.schedule(key, e, at);
                        hello = Some((id, session));
                    }
                    (Phase::AwaitHello, Step::Frame(other)) => {
                        let msg =
                            format!("expected HELLO as the first frame, got {}", other.name());
                        end = Some((
                            GoneReason::Disconnect,
                            Some((ErrorCode::MalformedFrame, msg)),
                            None,
                        ));
                        break;
                    }
                    (Phase::Session, Step::Frame(Frame::Heartbeat { seq })) => {
                        self.counters.heartbeats.inc();
                        Frame::HeartbeatAck { seq }.encode(reply);
                    }
                    (Phase::Session, Step::Frame(Frame::Bye)) => {
                        self.counters.byes.inc();
                        end = Some((GoneReason::Bye, None, None));
                        break;
                    }
                    (Phase::Session, Step::Frame(other)) => {
                        let msg = match other {
                            Frame::Hello { .. } => "HELLO was already received".to_owned(),
                            f => format!("{} is not a frame an agent sends", f.name()),
                        };
                        end = Some((
                            GoneReason::Disconnect,
                            Some((ErrorCode::MalformedFrame, msg)),
                            None,
                        ));
                        break;
                    }
                    (_, Step::Violation(code, msg)) => {
                        end = Some((GoneReason::Disconnect, Some((code, msg)), None));
                        break;
                    }
                    (_, Step::Closed) => {
                        end = Some((GoneReason::Disconnect, None, None));
                        break;
                    }
                    (_, Step::TlsFailure { alert, reason }) => {
                        debug!(shard = self.id, "closing after a TLS failure: {reason}");
                        end = Some((GoneReason::Disconnect, None, Some(alert)));
                        break;
                    }
                    (Phase::Handshake, Step::Frame(_)) => {}
                }
            }
            if let Kind::Session(s) = &mut e.kind {
                match &end {
                    None if !reply.is_empty() => {
                        out.clear();
                        if !s.seal(reply, out) || !s.send(out) {
                            end = Some((GoneReason::Disconnect, None, None));
                        } else if s.pending_output() > 0 && !s.want_write {
                            s.want_write = true;
                            let _ =
                                self.poller
                                    .set_write_interest(s.fd.as_fd(), token(key, gen), true);
                        }
                    }
                    None => {}
                    Some((_, error, alert)) => {
                        if let Some((code, msg)) = error {
                            self.counters.error_sent(*code);
                            Frame::error(*code, msg.clone()).encode(reply);
                        }
                        match alert {
                            Some(a) => {
                                out.clear();
                                s.seal_alert(*a, out);
                                let _ = s.send(out);
                            }
                            None => s.goodbye(reply, out),
                        }
                    }
                }
            }
        }
        drop(scratch);
        if let Some((id, session)) = hello {
            let owner = owner_shard(id.as_bytes(), self.nshards);
            self.router_send(
                owner,
                ShardMsg::Hello {
                    id,
                    session,
                    conn: ConnRef {
                        shard: self.id as u16,
                        key: key as u32,
                        gen,
                    },
                    ts_ms: crate::shared::wall_ms(),
                },
            );
        }
        if let Some((reason, _, _)) = end {
            self.close_session(key, gen, reason);
        }
    }

    /// End a session with ERROR `code` (when given) and close_notify.
    pub fn end_session(
        &self,
        key: usize,
        gen: u32,
        code: Option<(ErrorCode, &str)>,
        reason: GoneReason,
    ) {
        {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = session_mut(&mut conns, key, gen) else {
                return;
            };
            let mut scratch = self.scratch.borrow_mut();
            let Scratch { reply, out, .. } = &mut *scratch;
            reply.clear();
            if let Some((code, msg)) = code {
                self.counters.error_sent(code);
                Frame::error(code, msg).encode(reply);
            }
            s.goodbye(reply, out);
        }
        self.close_session(key, gen, reason);
    }

    /// Free a session's slot and socket; tell the owner shard.
    pub fn close_session(&self, key: usize, gen: u32, reason: GoneReason) {
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
            let owner = owner_shard(id.as_bytes(), self.nshards);
            self.router_send(
                owner,
                ShardMsg::Gone {
                    id,
                    session: s.session_id,
                    reason,
                    last_seen_ms: self.wall_ms_of(e.last_seen_ms),
                    ts_ms: crate::shared::wall_ms(),
                },
            );
        }
        // `s.fd` closes here.
    }

    /// Deliver a command to a connection, whatever its phase.
    pub fn command(&self, key: usize, gen: u32, cmd: ConnCmd) {
        let phase = {
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
            e.phase
        };
        match (cmd, phase) {
            (ConnCmd::Timeout, _) => {
                self.counters.timeouts.inc();
                self.end_session(key, gen, None, GoneReason::Timeout);
            }
            (ConnCmd::HelloTimeout | ConnCmd::HandshakeTimeout, _) => {
                self.end_session(
                    key,
                    gen,
                    Some((ErrorCode::HelloTimeout, "no HELLO in time")),
                    GoneReason::Disconnect,
                );
            }
            (ConnCmd::Superseded, _) => {
                // The owner already moved to the new session: no event for this one.
                self.end_session(
                    key,
                    gen,
                    Some((
                        ErrorCode::Superseded,
                        "superseded by a newer session of this agent",
                    )),
                    GoneReason::Shutdown,
                );
            }
            (ConnCmd::Shutdown, _) => {
                self.end_session(
                    key,
                    gen,
                    Some((ErrorCode::ShuttingDown, "server shutting down")),
                    GoneReason::Shutdown,
                );
            }
        }
    }

    /// Fire due deadlines.
    pub fn expire_deadlines(&self, fired: &mut Vec<(u64, (u32, u32))>) {
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
                if due <= now_ms {
                    match e.phase {
                        Phase::Handshake => ConnCmd::HandshakeTimeout,
                        Phase::AwaitHello => ConnCmd::HelloTimeout,
                        Phase::Session => ConnCmd::Timeout,
                    }
                } else {
                    self.schedule(key as usize, e, due);
                    continue;
                }
            };
            self.command(key as usize, gen, cmd);
        }
    }

    /// Ask every connection to close with ERROR 7 (no presence events).
    pub fn close_all(&self) {
        let keys: Vec<(usize, u32)> = self
            .conns
            .borrow()
            .iter()
            .map(|(k, e)| (k, e.gen))
            .collect();
        for (key, gen) in keys {
            self.command(key, gen, ConnCmd::Shutdown);
        }
    }

    /// Live hand-over, old process: describe every session whose TLS state
    /// can be carried (with a duplicate of its socket) and every presence
    /// record this shard owns. The shard is frozen: nothing changes after.
    pub fn quiesce(&self) -> crate::upgrade::machine::ShardSnapshot {
        use crate::upgrade::manifest::{phase, ConnHandoff, TlsState};
        let now = self.now_ms();
        let mut conns = self.conns.borrow_mut();
        let mut snap = crate::upgrade::machine::ShardSnapshot {
            conns: Vec::new(),
            records: Vec::new(),
            uncarried: 0,
        };
        for (key, e) in conns.iter_mut() {
            let (gen, last_seen_ms, accepted_ms, phase) =
                (e.gen, e.last_seen_ms, e.accepted_ms, e.phase);
            let Kind::Session(s) = &mut e.kind else {
                snap.uncarried += 1; // mid-handshake: no TLS state yet
                continue;
            };
            if !s.tls.transferable() {
                snap.uncarried += 1; // mid-KeyUpdate, or closing
                continue;
            }
            // The session keeps its descriptor open until release or thaw.
            let fd =
                crate::upgrade::machine::ConnFd::Borrowed(std::os::fd::AsRawFd::as_raw_fd(&s.fd));
            let (suite, rx_secret, rx_seq, tx_secret, tx_seq) = s.tls.export();
            let pending = s.pending.as_deref();
            s.carried = true;
            snap.conns.push((
                ConnHandoff {
                    shard: self.id as u16,
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
                },
                fd,
            ));
        }
        drop(conns);
        snap.records = self.presence.borrow().export(Instant::now());
        snap
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
        handed: Vec<(crate::upgrade::manifest::ConnHandoff, OwnedFd)>,
    ) -> Result<(), String> {
        use crate::upgrade::manifest::phase;
        let now = self.now_ms();
        let mut max_gen = 0;
        let mut entries = Vec::with_capacity(handed.len());
        for (h, fd) in handed {
            let suite = crate::tls::record::Suite::from_iana(h.tls.suite).ok_or_else(|| {
                format!("connection {}: unknown suite {:#06x}", h.key, h.tls.suite)
            })?;
            let tls = LeanSession::new(
                suite,
                &h.tls.rx_secret,
                h.tls.rx_seq,
                &h.tls.tx_secret,
                h.tls.tx_seq,
            )
            .map_err(|e| format!("connection {}: {e}", h.key))?;
            let mut s = Session::new(fd, tls);
            s.agent = h.agent.map(Into::into);
            s.session_id = h.session_id;
            if !(h.rx_pending.is_empty() && h.rx_plain.is_empty() && h.tx_pending.is_empty()) {
                s.pending = Some(Box::new(crate::conn::session::Pending {
                    record: h.rx_pending,
                    frames: h.rx_plain,
                    tx: h.tx_pending,
                }));
            }
            max_gen = max_gen.max(h.gen);
            let phase = if h.phase == phase::SESSION {
                Phase::Session
            } else {
                Phase::AwaitHello
            };
            entries.push((
                h.key as usize,
                ConnEntry {
                    gen: h.gen,
                    phase,
                    accepted_ms: now.saturating_sub(h.accepted_age_ms),
                    last_seen_ms: now.saturating_sub(h.last_seen_age_ms),
                    wheel_tick: 0,
                    kind: Kind::Session(Box::new(s)),
                },
            ));
        }
        let n = entries.len();
        let slab: slab::Slab<ConnEntry> = entries.into_iter().collect();
        if slab.len() != n {
            return Err("two handed-over connections share a slab key".into());
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
                    .map_err(|e| e.to_string())?;
            }
        }
        // Input the old process had read but not acted on (it was frozen):
        // act on it now, as no readiness event will announce it again.
        for key in keys {
            let gen = match self.conns.borrow().get(key) {
                Some(e) => e.gen,
                None => continue,
            };
            self.kick(key, gen);
        }
        Ok(())
    }

    /// Process input already held in a session's pending buffers.
    fn kick(&self, key: usize, gen: u32) {
        let mut steps = {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = session_mut(&mut conns, key, gen) else {
                return;
            };
            let Some(p) = s.pending.as_mut() else {
                return;
            };
            let mut frames = std::mem::take(&mut p.frames);
            let mut steps = Vec::new();
            let mut scratch = self.scratch.borrow_mut();
            let Scratch { plain, out, .. } = &mut *scratch;
            out.clear();
            let mut closing = false;
            if !frames.is_empty() {
                closing = s.split_early(&mut frames, &mut steps);
            }
            if !closing {
                s.ingest(&mut [], plain, out, &mut steps);
            }
            if !out.is_empty() && !s.send(out) {
                steps.push(Step::Closed);
            }
            steps
        };
        if !steps.is_empty() {
            self.apply(key, gen, &mut steps);
        }
    }

    /// (connections, sessions past HELLO)
    pub fn conn_counts(&self) -> (u64, u64) {
        let conns = self.conns.borrow();
        let sessions = conns
            .iter()
            .filter(|(_, e)| e.phase == Phase::Session)
            .count();
        (conns.len() as u64, sessions as u64)
    }

    /// Live last-seen (wall ms) of a connection, for `agent <id>`.
    pub fn last_seen_wall_ms(&self, conn: ConnRef) -> Option<u64> {
        let conns = self.conns.borrow();
        let e = conns.get(conn.key as usize).filter(|e| e.gen == conn.gen)?;
        Some(self.wall_ms_of(e.last_seen_ms))
    }
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
