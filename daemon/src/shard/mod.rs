//! One shard: a glommio executor pinned to a core, owning its SO_REUSEPORT
//! listener, its slab of connections, its deadline wheel and the presence
//! records of the agent ids it owns. Shards share nothing mutable; they talk
//! over a glommio channel mesh ([`ShardMsg`]).

pub mod sockstat;

use std::cell::{Cell, RefCell};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::{FutureExt, StreamExt};
use glommio::channels::channel_mesh::{FullMesh, Receivers, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpListener;
use glommio::timer::sleep;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::conn::handshake::{self as conn, ConnCmd};
use crate::conn::poller::Poller;
use crate::conn::table::{ConnEntry, Scratch};
use crate::conn::wheel::DeadlineWheel;
use crate::control::stats::{Counters, ShardSnapshot};
use crate::presence::events::EventLog;
use crate::presence::table::{owner_shard, ConnRef, GoneReason, PresenceTable, Transition};
use crate::shared::Runtime;

/// The shard that numbers events and serves the control socket.
pub use crate::presence::events::EVENT_SHARD;

/// What an agent's record looks like to `agent <id>`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentInfo {
    pub agent: String,
    pub state: crate::presence::table::State,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub session: u64,
    /// Shard holding the connection (absent when not connected).
    pub shard: Option<u16>,
    pub owner_shard: usize,
    pub offline_reason: Option<&'static str>,
}

/// Messages between shards.
pub enum ShardMsg {
    /// Connection shard -> owner: a HELLO was accepted.
    Hello {
        id: Box<str>,
        session: u64,
        conn: ConnRef,
        ts_ms: u64,
    },
    /// Connection shard -> owner: a session's connection ended.
    Gone {
        id: Box<str>,
        session: u64,
        reason: GoneReason,
        last_seen_ms: u64,
        ts_ms: u64,
    },
    /// Owner -> connection shard: send ERROR 5 and close.
    Supersede {
        conn: ConnRef,
    },
    /// Owner -> event shard: number and publish.
    Publish(Transition),
    /// Control -> owner.
    QueryAgent {
        id: Box<str>,
        reply: oneshot::Sender<Option<AgentInfo>>,
    },
    /// Owner -> connection shard: fill in the live last-seen time.
    QueryConn {
        conn: ConnRef,
        info: AgentInfo,
        reply: oneshot::Sender<Option<AgentInfo>>,
    },
    /// Control -> every shard.
    Stats {
        reply: oneshot::Sender<ShardSnapshot>,
    },
    /// Owner shard -> event shard, every tick: agents online on that shard
    /// and connections that dropped into grace since the last tick.
    Fleet {
        shard: usize,
        online: u64,
        drops: u32,
    },
    /// Live hand-over: stop accepting, applying frames, deadlines.
    Freeze {
        reply: oneshot::Sender<()>,
    },
    /// Live hand-over: make sure every message this shard sent earlier has
    /// been handled (pings every peer through the same channels).
    Barrier {
        reply: oneshot::Sender<()>,
    },
    Ping {
        reply: oneshot::Sender<()>,
    },
    /// Live hand-over: describe this shard's sessions and records.
    Quiesce {
        reply: oneshot::Sender<crate::upgrade::machine::ShardSnapshot>,
    },
    /// Live hand-over failed: serve again.
    Thaw,
    /// Live hand-over committed: let go of every connection and listener.
    Release {
        reply: oneshot::Sender<()>,
    },
}

/// What the accept loop is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptCtl {
    Pause,
    Resume,
    Stop,
}

/// Routes messages to shards: to itself through a local queue, to peers
/// through per-peer outboxes drained into the mesh. Never blocks the caller.
struct Router {
    me: usize,
    local: LocalSender<ShardMsg>,
    outboxes: Vec<Option<LocalSender<ShardMsg>>>,
}

impl Router {
    fn send(&self, to: usize, msg: ShardMsg) {
        let tx = if to == self.me {
            Some(&self.local)
        } else {
            self.outboxes.get(to).and_then(Option::as_ref)
        };
        if let Some(tx) = tx {
            if tx.try_send(msg).is_err() {
                warn!(to, "shard channel closed; message dropped");
            }
        }
    }
}

pub struct Shard {
    pub id: usize,
    pub nshards: usize,
    pub rt: Arc<Runtime>,
    pub(crate) conns: RefCell<Slab<ConnEntry>>,
    pub(crate) wheel: RefCell<DeadlineWheel<(u32, u32)>>,
    pub(crate) poller: Poller,
    pub(crate) scratch: RefCell<Scratch>,
    /// Start of this shard's millisecond clock.
    pub(crate) origin: Instant,
    pub presence: RefCell<PresenceTable>,
    pub events: Option<RefCell<EventLog>>,
    pub counters: Counters,
    router: Router,
    pub(crate) next_gen: Cell<u32>,
    shutting_down: Cell<bool>,
    frozen: Cell<bool>,
    accept_ctl: LocalSender<AcceptCtl>,
    /// Presence persistence (None when the state directory is unusable).
    pub(crate) durable: std::cell::OnceCell<crate::store::durable::Durable>,
    /// Connections that dropped into grace since the last tick.
    drops: Cell<u32>,
    /// Event shard: the mass-offline guard and the fleet it watches.
    pub(crate) guard: Option<RefCell<crate::presence::guard::MassOfflineGuard>>,
    fleet: RefCell<Vec<u64>>,
    last_held_saved: Cell<usize>,
    /// The listening descriptor while this shard accepts (-1 otherwise).
    listen_fd: Cell<i32>,
    /// A live hand-over committed: this process is on its way out.
    released: Cell<bool>,
    /// Admission control: handshakes running, and this second's starts.
    pub(crate) handshakes_in_flight: Cell<usize>,
    handshake_second: Cell<(u64, u32)>,
}

impl Shard {
    pub(crate) fn router_send(&self, to: usize, msg: ShardMsg) {
        self.router.send(to, msg);
    }

    fn publish(&self, t: Transition) {
        self.router.send(EVENT_SHARD, ShardMsg::Publish(t));
    }

    /// Handle one message from a shard (possibly this one). Never awaits.
    fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Hello {
                id,
                session,
                conn,
                ts_ms,
            } => {
                let out = self.presence.borrow_mut().hello(&id, session, conn, ts_ms);
                if let Some(d) = self.durable.get() {
                    d.on_hello(&id);
                    if let Some(rec) = self.presence.borrow().get(&id) {
                        d.record(&id, rec);
                    }
                }
                if let Some(old) = out.supersede {
                    self.router
                        .send(old.shard as usize, ShardMsg::Supersede { conn: old });
                }
                if let Some(t) = out.transition {
                    self.publish(t);
                }
            }
            ShardMsg::Gone {
                id,
                session,
                reason,
                last_seen_ms,
                ts_ms,
            } => {
                let t = self.presence.borrow_mut().gone(
                    &id,
                    session,
                    reason,
                    last_seen_ms,
                    ts_ms,
                    Instant::now(),
                );
                if let Some(rec) = self
                    .presence
                    .borrow()
                    .get(&id)
                    .filter(|r| r.session == session)
                {
                    if rec.state == crate::presence::table::State::Grace {
                        self.drops.set(self.drops.get() + 1);
                    }
                    if let Some(d) = self.durable.get() {
                        d.record(&id, rec);
                    }
                }
                if let Some(t) = t {
                    self.publish(t);
                }
            }
            ShardMsg::Supersede { conn } => {
                self.command(conn.key as usize, conn.gen, ConnCmd::Superseded);
            }
            ShardMsg::Publish(t) => self.publish_here(t),
            ShardMsg::Fleet {
                shard,
                online,
                drops,
            } => {
                let fleet = {
                    let mut f = self.fleet.borrow_mut();
                    if let Some(slot) = f.get_mut(shard) {
                        *slot = online;
                    }
                    f.iter().sum::<u64>()
                };
                if let (Some(g), true) = (&self.guard, drops > 0) {
                    g.borrow_mut()
                        .on_drops(crate::shared::wall_ms(), drops, fleet);
                }
            }
            ShardMsg::QueryAgent { id, reply } => {
                let presence = self.presence.borrow();
                let Some(rec) = presence.get(&id) else {
                    let _ = reply.send(None);
                    return;
                };
                let info = AgentInfo {
                    agent: id.to_string(),
                    state: rec.state,
                    since_ms: rec.since_ms,
                    last_seen_ms: rec.last_seen_ms,
                    session: rec.session,
                    shard: rec.conn.map(|c| c.shard),
                    owner_shard: self.id,
                    offline_reason: rec.offline_reason.map(|r| r.as_str()),
                };
                match rec.conn {
                    Some(conn) => self.router.send(
                        conn.shard as usize,
                        ShardMsg::QueryConn { conn, info, reply },
                    ),
                    None => {
                        let _ = reply.send(Some(info));
                    }
                }
            }
            ShardMsg::QueryConn {
                conn,
                mut info,
                reply,
            } => {
                if let Some(ms) = self.last_seen_wall_ms(conn) {
                    info.last_seen_ms = ms;
                }
                let _ = reply.send(Some(info));
            }
            ShardMsg::Stats { reply } => {
                let _ = reply.send(self.snapshot());
            }
            ShardMsg::Freeze { reply } => {
                self.frozen.set(true);
                let _ = self.accept_ctl.try_send(AcceptCtl::Pause);
                let _ = reply.send(());
            }
            ShardMsg::Barrier { reply } => {
                let pings: Vec<_> = (0..self.nshards)
                    .map(|peer| {
                        let (tx, rx) = oneshot::channel();
                        self.router.send(peer, ShardMsg::Ping { reply: tx });
                        rx
                    })
                    .collect();
                glommio::spawn_local(async move {
                    for p in pings {
                        let _ = p.await;
                    }
                    let _ = reply.send(());
                })
                .detach();
            }
            ShardMsg::Ping { reply } => {
                let _ = reply.send(());
            }
            ShardMsg::Quiesce { reply } => {
                let _ = reply.send(self.quiesce());
            }
            ShardMsg::Thaw => {
                self.frozen.set(false);
                let _ = self.accept_ctl.try_send(AcceptCtl::Resume);
            }
            ShardMsg::Release { reply } => {
                let _ = self.accept_ctl.try_send(AcceptCtl::Stop);
                self.listen_fd.set(-1);
                self.released.set(true);
                self.release_all();
                if let Some(d) = self.durable.get() {
                    d.shutdown();
                }
                // The next process holds them again (guard.held).
                self.last_held_saved.set(usize::MAX);
                self.save_held_if_changed();
                let _ = reply.send(());
            }
        }
    }

    /// Event shard: number, keep and announce a transition, unless the
    /// mass-offline guard holds it (or suppresses the return of an agent
    /// whose offline it held: the platform never saw it go).
    fn publish_here(&self, t: Transition) {
        let Some(log) = &self.events else {
            warn!("event published to a shard without the event log");
            return;
        };
        if let Some(g) = &self.guard {
            let now = crate::shared::wall_ms();
            let fleet = self.fleet.borrow().iter().sum::<u64>();
            let mut g = g.borrow_mut();
            if t.online {
                if g.on_online(&t.agent) == crate::presence::guard::OnlineVerdict::Suppress {
                    return;
                }
            } else if g.on_offline(now, &t, 0, fleet) == crate::presence::guard::Verdict::Hold {
                return;
            }
        }
        self.publish_numbered(log, t);
    }

    /// Number and keep a transition, within the durably reserved seqs.
    fn publish_numbered(&self, log: &RefCell<EventLog>, t: Transition) {
        let next = log.borrow().next_seq();
        if let Some(d) = self.durable.get() {
            // Never publish a seq that is not durably reserved: numbering
            // must keep increasing across a crash.
            if !crate::store::shard_store::seq_may_publish(next, d.seq_reserved())
                || crate::store::shard_store::seq_reservation_needed(next, d.seq_reserved())
                    .is_some()
            {
                d.reserve_seq_now(next + crate::store::shard_store::SEQ_HEADROOM);
            }
        }
        log.borrow_mut().publish(t);
    }

    /// Ask `shard` for its statistics.
    pub fn request_stats(&self, shard: usize) -> oneshot::Receiver<ShardSnapshot> {
        let (tx, rx) = oneshot::channel();
        self.router.send(shard, ShardMsg::Stats { reply: tx });
        rx
    }

    /// Ask the owner shard for an agent's record.
    pub fn request_agent(&self, id: &str) -> oneshot::Receiver<Option<AgentInfo>> {
        let (tx, rx) = oneshot::channel();
        let owner = owner_shard(id.as_bytes(), self.nshards);
        self.router.send(
            owner,
            ShardMsg::QueryAgent {
                id: id.into(),
                reply: tx,
            },
        );
        rx
    }

    pub fn snapshot(&self) -> ShardSnapshot {
        let (connections, sessions) = self.conn_counts();
        let presence = self.presence.borrow();
        let mut s = self.counters.snapshot(
            self.id,
            connections,
            sessions,
            presence.len() as u64,
            presence.online() as u64,
            presence.in_grace() as u64,
        );
        s.handshakes_in_flight = self.handshakes_in_flight.get() as u64;
        if let Some((q, b)) = crate::shard::sockstat::accept_queue(self.listen_fd.get()) {
            s.accept_queue = Some(q);
            s.accept_backlog = Some(b);
        }
        if let Some(d) = self.durable.get() {
            s.presumed_online = d.presumed_remaining() as u64;
            s.state = Some(d.status());
        }
        s
    }

    /// One tick: fire due deadlines, end due grace periods.
    fn on_tick(&self, fired: &mut Vec<(u64, (u32, u32))>, transitions: &mut Vec<Transition>) {
        self.expire_deadlines(fired);
        let now = Instant::now();
        let wall = crate::shared::wall_ms();
        self.presence.borrow_mut().expire(now, wall, transitions);
        if let Some(d) = self.durable.get() {
            for t in d.expire_presumed(wall) {
                let forced = self.presence.borrow_mut().force_offline(
                    &t.agent,
                    crate::presence::table::OfflineReason::NotReconnected,
                    wall,
                );
                transitions.extend(forced);
            }
            let presence = self.presence.borrow();
            for t in transitions.iter() {
                if let Some(rec) = presence.get(&t.agent) {
                    d.record(&t.agent, rec);
                }
            }
            d.tick(&presence, now);
        }
        for t in transitions.drain(..) {
            self.publish(t);
        }
        let online = self.presence.borrow().online() as u64;
        let drops = self.drops.replace(0);
        self.router.send(
            EVENT_SHARD,
            ShardMsg::Fleet {
                shard: self.id,
                online,
                drops,
            },
        );
        if let Some(g) = &self.guard {
            let fleet = self.fleet.borrow().iter().sum::<u64>();
            let released = g.borrow_mut().tick(wall, fleet);
            for h in released {
                self.publish_here(h.to_transition());
            }
            self.save_held_if_changed();
        }
    }

    /// Keep the held set on disk (so a crash during a surge keeps them presumed online).
    fn save_held_if_changed(&self) {
        let (Some(g), Some(_)) = (&self.guard, self.durable.get()) else {
            return;
        };
        let g = g.borrow();
        if g.held_len() == self.last_held_saved.get() {
            return;
        }
        self.last_held_saved.set(g.held_len());
        if let Err(e) =
            crate::store::shard_store::save_guard_held(&self.rt.config.state.dir, g.held_agents())
        {
            warn!("saving held guard events: {e}");
        }
    }

    /// Publish what the operator releases from the guard.
    pub fn guard_release(&self, agent: Option<&str>) -> usize {
        let Some(g) = &self.guard else { return 0 };
        let released: Vec<_> = {
            let mut g = g.borrow_mut();
            match agent {
                Some(a) => g.release_agent(a).into_iter().collect(),
                None => g.release_all(crate::shared::wall_ms()),
            }
        };
        let n = released.len();
        if let Some(log) = &self.events {
            for h in released {
                self.publish_numbered(log, h.to_transition());
            }
        }
        self.save_held_if_changed();
        n
    }

    /// Close every connection with ERROR 7 (no presence events).
    fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        self.close_all();
    }

    /// Admission control: may one more TLS handshake start now?
    fn admit_handshake(&self) -> bool {
        let adm = &self.rt.config.admission;
        if self.handshakes_in_flight.get() >= adm.max_concurrent_handshakes {
            return false;
        }
        let second = self.now_ms() / 1000;
        let (s, n) = self.handshake_second.get();
        let n = if s == second { n } else { 0 };
        if n >= adm.max_handshakes_per_sec {
            return false;
        }
        self.handshake_second.set((second, n + 1));
        self.handshakes_in_flight
            .set(self.handshakes_in_flight.get() + 1);
        true
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.get()
    }

    /// Ask `shard` something and get the answer (hand-over steps).
    pub fn ask<T>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.router.send(shard, make(tx));
        rx
    }

    /// Tell `shard` something.
    pub fn tell(&self, shard: usize, msg: ShardMsg) {
        self.router.send(shard, msg);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }
}

/// Wheel tick: fine enough for the shortest deadline, at most 100 ms.
fn wheel_tick(rt: &Runtime) -> Duration {
    let c = &rt.config;
    let shortest = c
        .presence
        .liveness_timeout()
        .min(c.presence.hello_timeout)
        .min(c.tls.handshake_timeout)
        .min(c.presence.offline_grace.max(Duration::from_millis(1)));
    (shortest / 20).clamp(Duration::from_millis(5), Duration::from_millis(100))
}

/// Run shard `id` until shutdown. `listener` is this shard's pre-bound,
/// listening SO_REUSEPORT socket.
pub async fn run(
    id: usize,
    rt: Arc<Runtime>,
    mesh: FullMesh<ShardMsg>,
    listener: OwnedFd,
    control: Option<std::os::unix::net::UnixListener>,
    mut adopted: Adopted,
) {
    let nshards = mesh.nr_peers();
    let (senders, mut receivers): (Senders<ShardMsg>, Receivers<ShardMsg>) = match mesh.join().await
    {
        Ok(x) => x,
        Err(e) => {
            warn!(shard = id, "could not join the shard mesh: {e}");
            return;
        }
    };
    let senders = Rc::new(senders);
    let (local_tx, local_rx) = local_channel::new_unbounded();
    let mut outboxes = Vec::with_capacity(nshards);
    let mut outbox_rxs = Vec::new();
    for peer in 0..nshards {
        if peer == id {
            outboxes.push(None);
        } else {
            let (tx, rx) = local_channel::new_unbounded();
            outboxes.push(Some(tx));
            outbox_rxs.push((peer, rx));
        }
    }
    let origin = Instant::now();
    let tick = wheel_tick(&rt);
    let per_shard = (rt.config.server.max_connections as usize / nshards.max(1)).min(1 << 22);
    let (accept_tx, accept_rx) = local_channel::new_unbounded::<AcceptCtl>();
    let poller = match Poller::new() {
        Ok(p) => p,
        Err(e) => {
            warn!(shard = id, "cannot create the session poller: {e}");
            return;
        }
    };
    let shard = Rc::new(Shard {
        id,
        nshards,
        // Sized for this shard's share of server.max_connections up front:
        // no reallocation of a huge table while serving.
        conns: RefCell::new(Slab::with_capacity(per_shard)),
        wheel: RefCell::new(DeadlineWheel::new(origin, tick, 1024)),
        poller,
        scratch: RefCell::new(Scratch::default()),
        origin,
        presence: RefCell::new(PresenceTable::new(
            origin,
            tick,
            rt.config.presence.offline_grace,
        )),
        events: (id == EVENT_SHARD)
            .then(|| RefCell::new(EventLog::new(rt.config.presence.event_ring_capacity, 1))),
        counters: Counters::default(),
        router: Router {
            me: id,
            local: local_tx,
            outboxes,
        },
        next_gen: Cell::new(0),
        shutting_down: Cell::new(false),
        frozen: Cell::new(false),
        accept_ctl: accept_tx,
        durable: std::cell::OnceCell::new(),
        drops: Cell::new(0),
        guard: (id == EVENT_SHARD).then(|| {
            let mut g = crate::presence::guard::MassOfflineGuard::new(rt.config.guard.clone());
            g.set_drop_feed(true);
            RefCell::new(g)
        }),
        fleet: RefCell::new(vec![0; nshards]),
        last_held_saved: Cell::new(0),
        listen_fd: Cell::new(-1),
        released: Cell::new(false),
        handshakes_in_flight: Cell::new(0),
        handshake_second: Cell::new((0, 0)),
        rt,
    });
    let handed_over =
        !adopted.conns.is_empty() || !adopted.records.is_empty() || adopted.events.is_some();
    if !adopted.conns.is_empty() {
        let n = adopted.conns.len();
        if let Err(e) = shard.adopt_handed(std::mem::take(&mut adopted.conns)) {
            warn!(shard = id, "cannot adopt handed-over connections: {e}");
        } else {
            info!(
                shard = id,
                connections = n,
                "adopted handed-over connections"
            );
        }
    }
    if !adopted.records.is_empty() {
        shard
            .presence
            .borrow_mut()
            .restore(std::mem::take(&mut adopted.records), Instant::now());
    }
    if let (Some(log), Some((events, next_seq))) = (&shard.events, adopted.events.take()) {
        log.borrow_mut().restore(events, next_seq);
    }
    let opened = crate::store::durable::Durable::open(
        &shard.rt.config.state,
        id,
        &mut shard.presence.borrow_mut(),
        handed_over,
        Instant::now(),
    );
    match opened {
        Ok((d, seq_high_water)) => {
            if let Some(log) = &shard.events {
                let mut log = log.borrow_mut();
                if !handed_over {
                    *log = EventLog::new(
                        shard.rt.config.presence.event_ring_capacity,
                        crate::store::shard_store::first_seq_after_restart(seq_high_water),
                    );
                }
                d.reserve_seq_now(log.next_seq() + crate::store::shard_store::SEQ_HEADROOM);
            }
            let _ = shard.durable.set(d);
            if let (true, Some(g)) = (handed_over, &shard.guard) {
                if let Ok(Ok(ids)) =
                    crate::store::shard_store::load_guard_held(&shard.rt.config.state.dir)
                {
                    let n = ids.len();
                    g.borrow_mut().restore_held(crate::shared::wall_ms(), ids);
                    shard.last_held_saved.set(n);
                    if n > 0 {
                        info!(
                            held = n,
                            "holding the previous process's held offline events"
                        );
                    }
                }
            }
        }
        Err(e) => warn!(
            shard = id,
            "state directory {}: {e}; presence will not survive a restart",
            shard.rt.config.state.dir.display()
        ),
    }

    // Mesh plumbing: outboxes drain into the mesh; inbound messages are handled.
    for (peer, rx) in outbox_rxs {
        let senders = senders.clone();
        glommio::spawn_local(forward(peer, rx, senders)).detach();
    }
    for (_, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut rx = rx;
            while let Some(msg) = rx.next().await {
                shard.handle(msg);
            }
        })
        .detach();
    }
    {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = local_rx.recv().await {
                shard.handle(msg);
            }
        })
        .detach();
    }

    // SAFETY-free: glommio takes ownership of the listening fd.
    shard
        .listen_fd
        .set(std::os::fd::AsRawFd::as_raw_fd(&listener));
    let listener = unsafe {
        use std::os::fd::FromRawFd;
        TcpListener::from_raw_fd(listener.into_raw_fd())
    };
    // Established agents first: sessions run in a queue that asks for quick
    // preemption; handshakes (a storm of new connections) get a tenth of
    // the shares, so they cannot delay heartbeats of connected agents.
    let ex = glommio::executor();
    let sessions_tq = ex.create_task_queue(
        glommio::Shares::Static(1000),
        glommio::Latency::Matters(Duration::from_millis(2)),
        "sessions",
    );
    let handshakes_tq = ex.create_task_queue(
        glommio::Shares::Static(100),
        glommio::Latency::NotImportant,
        "handshakes",
    );
    let accept_task = glommio::spawn_local(accept_loop(
        shard.clone(),
        listener,
        accept_rx,
        handshakes_tq,
    ))
    .detach();
    let sessions_task = match glommio::spawn_local_into(shard.clone().serve_sessions(), sessions_tq)
    {
        Ok(t) => t.detach(),
        Err(e) => {
            warn!(shard = id, "cannot start the session loop: {e}");
            return;
        }
    };

    if let Some(control) = control {
        let s = shard.clone();
        glommio::spawn_local(async move {
            if let Err(e) =
                crate::control::socket::serve(s, control, crate::process::supervise::NOTIFIER).await
            {
                warn!("control socket stopped: {e}");
            }
        })
        .detach();
        glommio::spawn_local(supervise(shard.clone())).detach();
    }

    info!(shard = id, tick_ms = tick.as_millis() as u64, "shard ready");
    shard.rt.shard_ready();

    // The ticker drives deadlines and watches for shutdown.
    let mut fired = Vec::new();
    let mut transitions = Vec::new();
    loop {
        sleep(tick).await;
        if !shard.is_frozen() {
            shard.on_tick(&mut fired, &mut transitions);
        }
        if shard.rt.shutdown.load(Ordering::Relaxed) {
            break;
        }
    }

    if shard.id == EVENT_SHARD && !shard.released.get() {
        // Tell systemd at once (`supervise` may wait on a stopped shard); not
        // after a hand-over: the unit now belongs to the new process.
        crate::process::supervise::stopping();
    }
    // Shutdown: stop accepting, ask every connection to close, wait briefly.
    let _ = shard.accept_ctl.try_send(AcceptCtl::Stop);
    shard.listen_fd.set(-1);
    accept_task.await;
    shard.begin_shutdown();
    sessions_task.await;
    let give_up = Instant::now() + Duration::from_secs(3);
    while !shard.conns.borrow().is_empty() && Instant::now() < give_up {
        sleep(Duration::from_millis(10)).await;
    }
    // Let queued mesh messages go out before the executor stops.
    sleep(Duration::from_millis(20)).await;
    if let Some(d) = shard.durable.get() {
        d.shutdown();
    }
    info!(shard = id, "shard stopped");
}

/// On the event shard: READY=1 once every shard listens, then STATUS= and
/// WATCHDOG=1 pings while every shard answers, and SIGHUP reloads.
async fn supervise(shard: Rc<Shard>) {
    let rt = shard.rt.clone();
    while rt.shards_ready() < shard.nshards {
        sleep(Duration::from_millis(5)).await;
    }
    crate::process::supervise::ready(&format!("listening on {}", rt.listen));
    let watchdog = crate::process::supervise::watchdog_interval().map(|d| d / 2);
    let status_every = watchdog
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    let mut next_status = Instant::now();
    while !shard.is_shutting_down() {
        if rt.reload_requested.swap(false, Ordering::SeqCst) {
            info!("SIGHUP: reloading");
            let _ = crate::control::socket::reload(&shard, crate::process::supervise::NOTIFIER);
        }
        if Instant::now() >= next_status {
            // Every shard must answer: a stuck shard stops the watchdog pings.
            let v = crate::control::stats::gather_stats(&shard).await;
            crate::process::supervise::status(&format!(
                "{} agents online, {} connections, {} shards",
                v.agents_online, v.connections, v.shards
            ));
            crate::process::supervise::watchdog();
            next_status = Instant::now() + status_every;
        }
        sleep(Duration::from_millis(50)).await;
    }
    if !shard.released.get() {
        crate::process::supervise::stopping();
    }
}

async fn forward(peer: usize, rx: LocalReceiver<ShardMsg>, senders: Rc<Senders<ShardMsg>>) {
    while let Some(msg) = rx.recv().await {
        if senders.send_to(peer, msg).await.is_err() {
            debug!(peer, "mesh peer gone");
            break;
        }
    }
}

async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    ctl: LocalReceiver<AcceptCtl>,
    handshakes: glommio::TaskQueueHandle,
) {
    let mut last_warn: Option<Instant> = None;
    let mut paused = false;
    loop {
        if paused {
            // Nothing is pending on the listener: new connections wait in
            // the kernel's accept queue (or for the process taking over).
            match ctl.recv().await {
                Some(AcceptCtl::Resume) => paused = false,
                Some(AcceptCtl::Pause) => {}
                Some(AcceptCtl::Stop) | None => break,
            }
            continue;
        }
        let accepted = futures::select_biased! {
            c = ctl.recv().fuse() => match c {
                Some(AcceptCtl::Pause) => { paused = true; continue; }
                Some(AcceptCtl::Resume) => continue,
                Some(AcceptCtl::Stop) | None => break,
            },
            r = listener.accept().fuse() => r,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                shard.counters.accept_errors.inc();
                // Rate-limited: EMFILE in a storm must not flood the journal.
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    warn!(shard = shard.id, "accept failed: {e}");
                    last_warn = Some(Instant::now());
                }
                sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if shard.is_shutting_down() {
            break;
        }
        shard.counters.accepted.inc();
        if !shard.admit_handshake() {
            // Over the handshake caps: closed before TLS; agents back off
            // with jitter and come back.
            shard.counters.admission_rejected.inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        // Not inherited by a binary an upgrade starts (glommio accepts
        // without SOCK_CLOEXEC).
        let _ = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let (key, gen, cmd) = shard.register();
        let task = conn::serve(shard.clone(), stream, key, gen, cmd);
        if let Ok(t) = glommio::spawn_local_into(task, handshakes) {
            t.detach();
        }
    }
}

/// What a shard of a new process takes over from the old one.
#[derive(Default)]
pub struct Adopted {
    pub conns: Vec<(crate::upgrade::manifest::ConnHandoff, OwnedFd)>,
    pub records: Vec<crate::upgrade::manifest::PresenceRecordHandoff>,
    /// Shard 0: the event ring and its next seq.
    pub events: Option<(Vec<crate::upgrade::manifest::EventHandoff>, u64)>,
}
