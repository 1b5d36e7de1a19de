//! One shard: a glommio executor pinned to a core, owning its SO_REUSEPORT
//! listener, its connection table and the presence records of the agent
//! ids it owns. Shards share nothing mutable; they talk over the mesh
//! (`mesh.rs`). This file holds the [`Shard`] and its boot; the accept loop
//! is `accept.rs`, the counters `counters.rs`.

pub mod accept;
pub mod counters;
pub mod mesh;
pub mod sockstat;

use std::cell::{Cell, OnceCell, RefCell};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::StreamExt;
use glommio::channels::channel_mesh::{FullMesh, Receivers, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpListener;
use glommio::task::JoinHandle;
use glommio::timer::sleep;
use tracing::{info, warn};

use crate::conn::agent::ConnCmd;
use crate::conn::table::{ConnEffect, ConnTable, Effects, NewSession};
use crate::presence::events::EventLog;
use crate::presence::guard::MassOfflineGuard;
use crate::presence::table::{owner_shard, PresenceTable, Transition};
use crate::shared::Runtime;
use accept::{AcceptCtl, Admission};
use counters::{Counters, ShardSnapshot};
use mesh::{MeshMsg, OutboxRx, Router};

pub use mesh::{AgentInfo, ShardMsg, UpgradeMsg};

/// The shard that numbers events and serves the control socket.
pub use crate::presence::events::EVENT_SHARD;

/// What the process adds to a shard (the event shard's control socket and
/// service-manager tasks), so that the shard knows nothing of them.
pub trait ShardHook: Send {
    /// The shard serves: spawn what runs beside it.
    fn started(&mut self, shard: &Rc<Shard>);
    /// The shard stops serving (not after a hand-over).
    fn stopping(&mut self, shard: &Shard);
}

pub struct Shard {
    pub id: usize,
    pub nshards: usize,
    pub rt: Arc<Runtime>,
    pub(crate) table: ConnTable,
    /// The table's effects buffer, reused by every operation.
    fx: RefCell<Effects>,
    pub presence: RefCell<PresenceTable>,
    pub events: Option<RefCell<EventLog>>,
    pub counters: Counters,
    pub(crate) router: Router,
    shutting_down: Cell<bool>,
    frozen: Cell<bool>,
    accept_ctl: LocalSender<AcceptCtl>,
    /// Presence persistence (None when the state directory is unusable).
    pub(crate) durable: OnceCell<crate::store::durable::Durable>,
    /// Connections that dropped into grace since the last tick.
    drops: Cell<u32>,
    /// Event shard: the mass-offline guard and the fleet it watches.
    pub guard: Option<RefCell<MassOfflineGuard>>,
    fleet: RefCell<Vec<u64>>,
    last_held_saved: Cell<usize>,
    /// Wall ms of the last refresh of this shard's cluster snapshot part.
    cluster_refreshed: Cell<u64>,
    /// The listening descriptor while this shard accepts (-1 otherwise).
    listen_fd: Cell<i32>,
    /// A live hand-over committed: this process is on its way out.
    released: Cell<bool>,
    pub(crate) admission: Admission,
}

impl Shard {
    /// Run one connection-table operation, then carry out its effects.
    fn conn_op<R>(&self, op: impl FnOnce(&ConnTable, &mut Effects) -> R) -> R {
        let mut fx = std::mem::take(&mut *self.fx.borrow_mut());
        let r = op(&self.table, &mut fx);
        self.apply_effects(&mut fx);
        *self.fx.borrow_mut() = fx;
        r
    }

    fn apply_effects(&self, fx: &mut Effects) {
        for e in fx.drain(..) {
            match e {
                ConnEffect::Hello {
                    id,
                    session,
                    conn,
                    ts_ms,
                } => {
                    self.counters.hellos.inc();
                    let owner = owner_shard(id.as_bytes(), self.nshards);
                    let msg = ShardMsg::Hello {
                        id,
                        session,
                        conn,
                        ts_ms,
                    };
                    self.router.send(owner, msg);
                }
                ConnEffect::Gone {
                    id,
                    session,
                    reason,
                    last_seen_ms,
                    ts_ms,
                } => {
                    let owner = owner_shard(id.as_bytes(), self.nshards);
                    let msg = ShardMsg::Gone {
                        id,
                        session,
                        reason,
                        last_seen_ms,
                        ts_ms,
                    };
                    self.router.send(owner, msg);
                }
                ConnEffect::Heartbeat => self.counters.heartbeats.inc(),
                ConnEffect::Bye => self.counters.byes.inc(),
                ConnEffect::Timeout => self.counters.timeouts.inc(),
                ConnEffect::ErrorSent(code) => self.counters.error_sent(code),
            }
        }
    }

    /// A handshake completed: the connection becomes a session.
    pub(crate) fn adopt(&self, key: usize, gen: u32, new: NewSession) {
        let frozen = self.is_frozen();
        self.conn_op(|t, fx| t.adopt(key, gen, new, frozen, fx));
    }

    fn publish(&self, t: Transition) {
        self.router.send(EVENT_SHARD, ShardMsg::Publish(t));
    }

    /// Handle one message from a shard (possibly this one). Never awaits.
    fn handle(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Domain(m) => self.handle_domain(m),
            MeshMsg::Upgrade(m) => self.handle_upgrade(m),
        }
    }

    fn handle_domain(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Hello {
                id,
                session,
                conn,
                ts_ms,
            } => self.on_hello(&id, session, conn, ts_ms),
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
                self.after_gone(&id, session);
                if let Some(t) = t {
                    self.cluster_offline(&t, false);
                    self.publish(t);
                }
            }
            ShardMsg::Supersede { conn } => self
                .conn_op(|t, fx| t.command(conn.key as usize, conn.gen, ConnCmd::Superseded, fx)),
            ShardMsg::Publish(t) => self.publish_here(t),
            ShardMsg::Fleet {
                shard,
                online,
                drops,
            } => self.on_fleet(shard, online, drops),
            ShardMsg::QueryAgent { id, reply } => self.query_agent(&id, reply),
            ShardMsg::QueryConn {
                conn,
                mut info,
                reply,
            } => {
                if let Some(ms) = self.table.last_seen_wall_ms(conn) {
                    info.last_seen_ms = ms;
                }
                let _ = reply.send(Some(info));
            }
            ShardMsg::Stats { reply } => {
                let _ = reply.send(self.snapshot());
            }
            ShardMsg::Revoke => {
                let creds = self.rt.credentials();
                if creds.revoked_count() > 0 {
                    self.conn_op(|t, fx| t.revoke(&creds, fx));
                }
            }
        }
    }

    /// Owner: a HELLO was accepted on some shard.
    fn on_hello(&self, id: &str, session: u64, conn: crate::presence::table::ConnRef, ts: u64) {
        let out = self.presence.borrow_mut().hello(id, session, conn, ts);
        if let Some(d) = self.durable.get() {
            d.on_hello(id);
            if let Some(rec) = self.presence.borrow().get(id) {
                d.record(id, rec);
            }
        }
        if let Some(c) = &self.rt.cluster {
            // Every accepted HELLO (also a supersede or a silent return).
            c.handle
                .online(id.as_bytes(), c.session_of(session, c.epoch), ts);
        }
        if let Some(old) = out.supersede {
            self.router
                .send(old.shard as usize, ShardMsg::Supersede { conn: old });
        }
        if let Some(t) = out.transition {
            self.publish(t);
        }
    }

    /// Owner: tell the cluster that the session of `t.agent` ended (the
    /// record still names it). `presumed`: a session of the previous boot.
    fn cluster_offline(&self, t: &Transition, presumed: bool) {
        let Some(c) = &self.rt.cluster else {
            return;
        };
        let Some(rec) = self.presence.borrow().get(&t.agent).map(|r| r.session) else {
            return;
        };
        let epoch = if presumed { c.prev_epoch } else { c.epoch };
        c.handle.offline(
            t.agent.as_bytes(),
            c.session_of(rec, epoch),
            t.reason,
            t.ts_ms,
        );
    }

    /// Owner: count a drop into grace and keep the record on disk.
    fn after_gone(&self, id: &str, session: u64) {
        let presence = self.presence.borrow();
        let Some(rec) = presence.get(id).filter(|r| r.session == session) else {
            return;
        };
        if rec.state == crate::presence::table::State::Grace {
            self.drops.set(self.drops.get() + 1);
        }
        if let Some(d) = self.durable.get() {
            d.record(id, rec);
        }
    }

    /// Event shard: a shard's online count and drops since its last tick.
    fn on_fleet(&self, shard: usize, online: u64, drops: u32) {
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

    /// Owner: answer `agent <id>`, asking the connection's shard for its
    /// live last-seen time when it is connected.
    fn query_agent(&self, id: &str, reply: oneshot::Sender<Option<AgentInfo>>) {
        let presence = self.presence.borrow();
        let Some(rec) = presence.get(id) else {
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

    fn handle_upgrade(&self, msg: UpgradeMsg) {
        match msg {
            UpgradeMsg::Freeze { reply } => {
                self.frozen.set(true);
                let _ = self.accept_ctl.try_send(AcceptCtl::Pause);
                let _ = reply.send(());
            }
            UpgradeMsg::Barrier { reply } => {
                let pings: Vec<_> = (0..self.nshards)
                    .map(|peer| {
                        let (tx, rx) = oneshot::channel();
                        self.router.send(peer, UpgradeMsg::Ping { reply: tx });
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
            UpgradeMsg::Ping { reply } => {
                let _ = reply.send(());
            }
            UpgradeMsg::Quiesce { reply } => {
                let (conns, uncarried) = self.table.quiesce();
                let records = self.presence.borrow().export(Instant::now());
                let _ = reply.send(crate::upgrade::machine::ShardSnapshot {
                    conns,
                    records,
                    uncarried,
                });
            }
            UpgradeMsg::Thaw => {
                self.frozen.set(false);
                let _ = self.accept_ctl.try_send(AcceptCtl::Resume);
            }
            UpgradeMsg::Release { reply } => {
                let _ = self.accept_ctl.try_send(AcceptCtl::Stop);
                self.listen_fd.set(-1);
                self.released.set(true);
                self.table.release_all();
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

    /// Tell every shard to close the sessions of revoked agents (after a reload).
    pub fn revoke_everywhere(&self) {
        for s in 0..self.nshards {
            self.router.send(s, ShardMsg::Revoke);
        }
    }

    /// Ask `shard` for its statistics.
    pub fn request_stats(&self, shard: usize) -> oneshot::Receiver<ShardSnapshot> {
        self.ask(shard, |reply| ShardMsg::Stats { reply })
    }

    /// Ask the owner shard for an agent's record.
    pub fn request_agent(&self, id: &str) -> oneshot::Receiver<Option<AgentInfo>> {
        let owner = owner_shard(id.as_bytes(), self.nshards);
        self.ask(owner, |reply| ShardMsg::QueryAgent {
            id: id.into(),
            reply,
        })
    }

    /// This shard's figures.
    pub fn snapshot(&self) -> ShardSnapshot {
        let (connections, sessions) = self.table.counts();
        let presence = self.presence.borrow();
        let mut s = self.counters.snapshot(
            self.id,
            connections,
            sessions,
            presence.len() as u64,
            presence.online() as u64,
            presence.in_grace() as u64,
        );
        s.handshakes_in_flight = self.admission.in_flight() as u64;
        if let Some((q, b)) = sockstat::accept_queue(self.listen_fd.get()) {
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
        self.conn_op(|t, fx| t.expire_deadlines(fired, fx));
        let now = Instant::now();
        let wall = crate::shared::wall_ms();
        self.presence.borrow_mut().expire(now, wall, transitions);
        for t in transitions.iter() {
            self.cluster_offline(t, false);
        }
        if let Some(d) = self.durable.get() {
            for t in d.expire_presumed(wall) {
                let forced = self.presence.borrow_mut().force_offline(
                    &t.agent,
                    crate::presence::table::OfflineReason::NotReconnected,
                    wall,
                );
                if let Some(f) = &forced {
                    self.cluster_offline(f, true);
                }
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
        self.send_fleet();
        self.cluster_tick(wall);
        if let Some(g) = &self.guard {
            let fleet = self.fleet.borrow().iter().sum::<u64>();
            let released = g.borrow_mut().tick(wall, fleet);
            for h in released {
                self.publish_here(h.to_transition());
            }
            self.save_held_if_changed();
        }
    }

    /// Cluster mode: refresh this shard's part of the local snapshot every
    /// few seconds; the event shard also gives the bridge the node's counts
    /// and the guard's state (read by the node-lost gate).
    fn cluster_tick(&self, wall: u64) {
        let Some(c) = &self.rt.cluster else {
            return;
        };
        if wall.saturating_sub(self.cluster_refreshed.get())
            >= crate::shared::CLUSTER_SNAPSHOT_EVERY_MS
        {
            self.cluster_refreshed.set(wall);
            let part: Vec<_> = self
                .presence
                .borrow()
                .iter()
                .filter(|(_, r)| r.state != crate::presence::table::State::Offline)
                .map(|(id, r)| {
                    // Online without a connection: presumed online since
                    // the previous boot.
                    let presumed =
                        r.state == crate::presence::table::State::Online && r.conn.is_none();
                    let epoch = if presumed { c.prev_epoch } else { c.epoch };
                    presence_cluster::LocalAgent {
                        id: id.as_bytes().to_vec(),
                        session: c.session_of(r.session, epoch),
                    }
                })
                .collect();
            c.shared
                .parts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.id, part);
            c.shared
                .connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.id, self.table.counts().0);
        }
        if let Some(g) = &self.guard {
            let g = g.borrow();
            c.shared
                .guard_active
                .store(g.is_active() || g.held_len() > 0, Ordering::Relaxed);
            let agents = self.fleet.borrow().iter().sum::<u64>();
            let connections = c
                .shared
                .connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .sum();
            c.handle.set_local_counts(agents, connections);
        }
    }

    /// Tell the event shard this shard's online count and drops. Safe to
    /// skip while its queue is congested: the drops wait for the next tick.
    fn send_fleet(&self) {
        if self.router.congested_to(EVENT_SHARD) {
            return;
        }
        let online = self.presence.borrow().online() as u64;
        let drops = self.drops.replace(0);
        let msg = ShardMsg::Fleet {
            shard: self.id,
            online,
            drops,
        };
        self.router.send(EVENT_SHARD, msg);
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
        self.conn_op(|t, fx| t.close_all(fx));
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.get()
    }

    /// A live hand-over committed: the new process serves now.
    pub fn is_released(&self) -> bool {
        self.released.get()
    }

    /// Ask `shard` something and get the answer (statistics, queries,
    /// hand-over steps).
    pub fn ask<T, M: Into<MeshMsg>>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> M,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.router.send(shard, make(tx));
        rx
    }

    /// Tell `shard` something.
    pub fn tell(&self, shard: usize, msg: impl Into<MeshMsg>) {
        self.router.send(shard, msg);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// The loop that serves every established session of this shard.
    async fn serve_sessions(self: Rc<Self>) {
        let mut events = Vec::with_capacity(crate::conn::poller::BATCH);
        while !self.is_shutting_down() {
            if self.is_frozen() || self.router.congested() {
                // Level-triggered: readiness waits until the thaw, or until
                // the mesh queues drain (backpressure).
                sleep(Duration::from_millis(5)).await;
                continue;
            }
            events = self
                .table
                .wait_ready(events, Duration::from_millis(50))
                .await;
            if self.is_frozen() {
                continue;
            }
            for ev in &events {
                self.conn_op(|t, fx| t.on_ready(ev, fx));
            }
        }
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

/// What a shard of a new process takes over from the old one.
#[derive(Default)]
pub struct Adopted {
    pub conns: Vec<(crate::upgrade::manifest::ConnHandoff, OwnedFd)>,
    pub records: Vec<crate::upgrade::manifest::PresenceRecordHandoff>,
    /// Shard 0: the event ring and its next seq.
    pub events: Option<(Vec<crate::upgrade::manifest::EventHandoff>, u64)>,
}

impl Adopted {
    fn is_hand_over(&self) -> bool {
        !self.conns.is_empty() || !self.records.is_empty() || self.events.is_some()
    }
}

/// The boot's loose ends: queues to drain once the shard exists.
struct Plumbing {
    senders: Rc<Senders<MeshMsg>>,
    receivers: Receivers<MeshMsg>,
    outboxes: Vec<OutboxRx>,
    accept_rx: LocalReceiver<AcceptCtl>,
}

/// The running tasks a shutdown waits for.
struct Serving {
    accept: JoinHandle<()>,
    sessions: JoinHandle<()>,
}

/// Run shard `id` until shutdown. `listener` is this shard's pre-bound,
/// listening SO_REUSEPORT socket; `hook` adds what the process runs beside
/// the shard (the event shard's control socket and supervision).
pub async fn run(
    id: usize,
    rt: Arc<Runtime>,
    mesh: FullMesh<MeshMsg>,
    listener: OwnedFd,
    mut hook: Option<Box<dyn ShardHook>>,
    adopted: Adopted,
) {
    let Some((shard, plumbing)) = boot(id, rt, mesh).await else {
        return;
    };
    shard.take_over(adopted);
    let accept_rx = plumbing.spawn(&shard);
    let Some(serving) = start_serving(&shard, listener, accept_rx) else {
        return;
    };
    if let Some(h) = hook.as_mut() {
        h.started(&shard);
    }
    info!(
        shard = id,
        tick_ms = wheel_tick(&shard.rt).as_millis() as u64,
        "shard ready"
    );
    shard.rt.shard_ready();
    tick_loop(&shard).await;
    if let (Some(h), false) = (hook.as_mut(), shard.is_released()) {
        // At once (a supervising task may wait on a stopped shard); not
        // after a hand-over: the service now belongs to the new process.
        h.stopping(&shard);
    }
    shut_down(&shard, serving).await;
    info!(shard = id, "shard stopped");
}

/// Join the mesh and build the shard.
async fn boot(
    id: usize,
    rt: Arc<Runtime>,
    mesh: FullMesh<MeshMsg>,
) -> Option<(Rc<Shard>, Plumbing)> {
    let nshards = mesh.nr_peers();
    let (senders, receivers) = match mesh.join().await {
        Ok(x) => x,
        Err(e) => {
            warn!(shard = id, "could not join the shard mesh: {e}");
            return None;
        }
    };
    let origin = Instant::now();
    let tick = wheel_tick(&rt);
    let max_connections = rt.config.server.max_connections;
    let per_shard = (max_connections as usize / nshards.max(1)).min(1 << 22);
    // Sized for this shard's share of server.max_connections up front:
    // no reallocation of a huge table while serving.
    let table = match ConnTable::new(id, rt.clone(), origin, tick, per_shard) {
        Ok(t) => t,
        Err(e) => {
            warn!(shard = id, "{e}");
            return None;
        }
    };
    let (router, outboxes) = Router::new(id, nshards, mesh::outbox_bound(max_connections));
    let (accept_tx, accept_rx) = local_channel::new_bounded::<AcceptCtl>(16);
    let is_event_shard = id == EVENT_SHARD;
    let shard = Rc::new(Shard {
        id,
        nshards,
        table,
        fx: RefCell::new(Vec::with_capacity(64)),
        presence: RefCell::new(PresenceTable::new(
            origin,
            tick,
            rt.config.presence.offline_grace,
        )),
        events: is_event_shard
            .then(|| RefCell::new(EventLog::new(rt.config.presence.event_ring_capacity, 1))),
        counters: Counters::default(),
        router,
        shutting_down: Cell::new(false),
        frozen: Cell::new(false),
        accept_ctl: accept_tx,
        durable: OnceCell::new(),
        drops: Cell::new(0),
        guard: is_event_shard.then(|| {
            let mut g = MassOfflineGuard::new(rt.config.guard.clone());
            g.set_drop_feed(true);
            RefCell::new(g)
        }),
        fleet: RefCell::new(vec![0; nshards]),
        last_held_saved: Cell::new(0),
        cluster_refreshed: Cell::new(0),
        listen_fd: Cell::new(-1),
        released: Cell::new(false),
        admission: Admission::default(),
        rt,
    });
    let plumbing = Plumbing {
        senders: Rc::new(senders),
        receivers,
        outboxes,
        accept_rx,
    };
    Some((shard, plumbing))
}

impl Plumbing {
    /// Outboxes drain into the mesh (or, for this shard's own, into its
    /// handler); inbound messages are handled.
    fn spawn(self, shard: &Rc<Shard>) -> LocalReceiver<AcceptCtl> {
        let Plumbing {
            senders,
            mut receivers,
            outboxes,
            accept_rx,
        } = self;
        for rx in outboxes {
            if rx.peer() == shard.id {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    while let Some(msg) = rx.next().await {
                        shard.handle(msg);
                    }
                })
                .detach();
            } else {
                glommio::spawn_local(mesh::forward(rx, senders.clone())).detach();
            }
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
        accept_rx
    }
}

impl Shard {
    /// Take over what a previous process handed over (sessions, records,
    /// events), then open the state directory (restoring after a restart).
    fn take_over(&self, mut adopted: Adopted) {
        let handed_over = adopted.is_hand_over();
        if !adopted.conns.is_empty() {
            let n = adopted.conns.len();
            let handed = std::mem::take(&mut adopted.conns);
            match self.conn_op(|t, fx| t.adopt_handed(handed, fx)) {
                Err(e) => warn!(shard = self.id, "cannot adopt handed-over connections: {e}"),
                Ok(()) => info!(
                    shard = self.id,
                    connections = n,
                    "adopted handed-over connections"
                ),
            }
        }
        if !adopted.records.is_empty() {
            self.presence
                .borrow_mut()
                .restore(std::mem::take(&mut adopted.records), Instant::now());
        }
        if let (Some(log), Some((events, next_seq))) = (&self.events, adopted.events.take()) {
            log.borrow_mut().restore(events, next_seq);
        }
        self.open_state(handed_over);
    }

    /// Open this shard's presence persistence.
    fn open_state(&self, handed_over: bool) {
        use crate::store::shard_store::{first_seq_after_restart, load_guard_held, SEQ_HEADROOM};
        let opened = crate::store::durable::Durable::open(
            &self.rt.config.state,
            self.id,
            &mut self.presence.borrow_mut(),
            handed_over,
            Instant::now(),
        );
        let d = match opened {
            Ok((d, seq_high_water)) => {
                if let Some(log) = &self.events {
                    let mut log = log.borrow_mut();
                    if !handed_over {
                        *log = EventLog::new(
                            self.rt.config.presence.event_ring_capacity,
                            first_seq_after_restart(seq_high_water),
                        );
                    }
                    d.reserve_seq_now(log.next_seq() + SEQ_HEADROOM);
                }
                d
            }
            Err(e) => {
                warn!(
                    shard = self.id,
                    "state directory {}: {e}; presence will not survive a restart",
                    self.rt.config.state.dir.display()
                );
                return;
            }
        };
        let _ = self.durable.set(d);
        let (true, Some(g)) = (handed_over, &self.guard) else {
            return;
        };
        if let Ok(Ok(ids)) = load_guard_held(&self.rt.config.state.dir) {
            let n = ids.len();
            g.borrow_mut().restore_held(crate::shared::wall_ms(), ids);
            self.last_held_saved.set(n);
            if n > 0 {
                info!(
                    held = n,
                    "holding the previous process's held offline events"
                );
            }
        }
    }
}

/// Start accepting and serving sessions.
fn start_serving(
    shard: &Rc<Shard>,
    listener: OwnedFd,
    accept_rx: LocalReceiver<AcceptCtl>,
) -> Option<Serving> {
    shard
        .listen_fd
        .set(std::os::fd::AsRawFd::as_raw_fd(&listener));
    // SAFETY: the descriptor is a listening socket this shard owns;
    // glommio takes ownership of it.
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
    let accept = glommio::spawn_local(accept::accept_loop(
        shard.clone(),
        listener,
        accept_rx,
        handshakes_tq,
    ))
    .detach();
    let sessions = match glommio::spawn_local_into(shard.clone().serve_sessions(), sessions_tq) {
        Ok(t) => t.detach(),
        Err(e) => {
            warn!(shard = shard.id, "cannot start the session loop: {e}");
            return None;
        }
    };
    Some(Serving { accept, sessions })
}

/// The ticker drives deadlines and watches for shutdown.
async fn tick_loop(shard: &Shard) {
    let tick = wheel_tick(&shard.rt);
    let mut fired = Vec::new();
    let mut transitions = Vec::new();
    loop {
        sleep(tick).await;
        if !shard.is_frozen() {
            shard.on_tick(&mut fired, &mut transitions);
        }
        // A hand-over in flight is sending this shard's sockets: let it
        // commit or resume before closing anything (SIGTERM mid-upgrade).
        if shard.rt.shutdown.load(Ordering::Relaxed) && !shard.rt.upgrading.load(Ordering::SeqCst) {
            break;
        }
    }
}

/// Stop accepting, ask every connection to close, wait briefly.
async fn shut_down(shard: &Shard, serving: Serving) {
    let _ = shard.accept_ctl.try_send(AcceptCtl::Stop);
    shard.listen_fd.set(-1);
    serving.accept.await;
    shard.begin_shutdown();
    serving.sessions.await;
    let give_up = Instant::now() + Duration::from_secs(3);
    while !shard.table.is_empty() && Instant::now() < give_up {
        sleep(Duration::from_millis(10)).await;
    }
    // Let queued mesh messages go out before the executor stops.
    sleep(Duration::from_millis(20)).await;
    if let Some(d) = shard.durable.get() {
        d.shutdown();
    }
}
