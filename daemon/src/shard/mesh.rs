//! What shards say to each other, and the [`Router`] that carries it.
//!
//! Two message families share one channel per pair of shards (so a barrier
//! really follows every earlier message): [`ShardMsg`], the presence domain
//! (HELLO and GONE to the owner, supersede, publish, queries, stats, fleet
//! counts), and [`UpgradeMsg`], the live hand-over's steps.
//!
//! Every queue here is bounded; see docs/architecture.md section 2 for the
//! bounds and what happens when one fills.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use futures::channel::oneshot;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use tracing::{debug, warn};

use crate::presence::table::{ConnRef, GoneReason, Transition};
use crate::shard::counters::ShardSnapshot;

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

/// Presence-domain messages between shards.
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
    Supersede { conn: ConnRef },
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
    /// Control -> every shard, after a reload: close the sessions of
    /// agents the deny-list in service now holds (ERROR 2, reason `revoked`).
    Revoke,
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
}

/// Live hand-over (old process) steps, sent by the control socket's
/// upgrade driver to every shard.
pub enum UpgradeMsg {
    /// Stop accepting, applying frames, deadlines.
    Freeze { reply: oneshot::Sender<()> },
    /// Make sure every message this shard sent earlier has been handled
    /// (pings every peer through the same channels).
    Barrier { reply: oneshot::Sender<()> },
    /// A barrier's probe: answered on arrival.
    Ping { reply: oneshot::Sender<()> },
    /// Describe this shard's sessions and records.
    Quiesce {
        reply: oneshot::Sender<crate::upgrade::machine::ShardSnapshot>,
    },
    /// The hand-over failed: serve again.
    Thaw,
    /// The hand-over committed: let go of every connection and listener.
    Release { reply: oneshot::Sender<()> },
}

/// What travels on the mesh: one of both families.
pub enum MeshMsg {
    Domain(ShardMsg),
    Upgrade(UpgradeMsg),
}

impl From<ShardMsg> for MeshMsg {
    fn from(m: ShardMsg) -> Self {
        MeshMsg::Domain(m)
    }
}

impl From<UpgradeMsg> for MeshMsg {
    fn from(m: UpgradeMsg) -> Self {
        MeshMsg::Upgrade(m)
    }
}

/// Queued messages to one shard above which this shard is congested: it
/// stops accepting and reading until the queue drains (backpressure).
pub const HIGH_WATER: usize = 8192;

/// The hard bound of one queue for a daemon of `max_connections`.
///
/// While a shard is congested it accepts no connection and reads no
/// socket, so what it still queues comes from connections that already
/// exist: each one at most a HELLO and a GONE, and at its owner at most
/// the transition and the supersede they cause; plus one poller batch in
/// progress and the backlog up to [`HIGH_WATER`]. Queues grow on demand
/// (nothing is reserved up front), so a generous bound costs nothing.
pub fn outbox_bound(max_connections: u64) -> usize {
    let per_conn = usize::try_from(max_connections)
        .unwrap_or(usize::MAX / 8)
        .min(usize::MAX / 8);
    per_conn * 2 + 2 * crate::conn::poller::BATCH + HIGH_WATER
}

/// One destination's FIFO queue, bounded at `cap`, drained by a task.
struct Outbox {
    queue: RefCell<VecDeque<MeshMsg>>,
    /// Rung when the queue turns non-empty (capacity 1: one ring is enough).
    bell: LocalSender<()>,
}

/// Routes messages to shards: to itself through a local queue, to peers
/// through per-peer outboxes drained into the mesh. Never blocks (a message
/// handler must not await); see [`Router::send`] for a full queue.
pub struct Router {
    me: usize,
    outboxes: Vec<Rc<Outbox>>,
    cap: usize,
    /// Messages dropped because a queue was at its bound (never expected).
    dropped: Cell<u64>,
}

/// The receiving half of one outbox, handed to its drain task.
pub struct OutboxRx {
    peer: usize,
    outbox: Rc<Outbox>,
    bell: LocalReceiver<()>,
}

impl Router {
    /// A router for shard `me` of `nshards`, each queue bounded at `cap`.
    pub fn new(me: usize, nshards: usize, cap: usize) -> (Self, Vec<OutboxRx>) {
        let mut outboxes = Vec::with_capacity(nshards);
        let mut rxs = Vec::with_capacity(nshards);
        for peer in 0..nshards {
            let (bell, bell_rx) = local_channel::new_bounded(1);
            let outbox = Rc::new(Outbox {
                queue: RefCell::new(VecDeque::new()),
                bell,
            });
            rxs.push(OutboxRx {
                peer,
                outbox: outbox.clone(),
                bell: bell_rx,
            });
            outboxes.push(outbox);
        }
        let router = Self {
            me,
            outboxes,
            cap: cap.max(HIGH_WATER * 2),
            dropped: Cell::new(0),
        };
        (router, rxs)
    }

    /// Queue `msg` for shard `to`. At the bound the message is dropped,
    /// counted and logged: the bound is sized so that this cannot happen
    /// while backpressure works (docs/architecture.md section 2).
    pub fn send(&self, to: usize, msg: impl Into<MeshMsg>) {
        let Some(outbox) = self.outboxes.get(to) else {
            warn!(to, "message for a shard that does not exist dropped");
            return;
        };
        let mut q = outbox.queue.borrow_mut();
        if q.len() >= self.cap {
            let n = self.dropped.get() + 1;
            self.dropped.set(n);
            if n.is_power_of_two() {
                warn!(
                    from = self.me,
                    to,
                    dropped_total = n,
                    "shard queue full; message dropped"
                );
            }
            return;
        }
        let was_empty = q.is_empty();
        q.push_back(msg.into());
        drop(q);
        if was_empty {
            let _ = outbox.bell.try_send(());
        }
    }

    /// Whether the queue to `to` is above [`HIGH_WATER`].
    pub fn congested_to(&self, to: usize) -> bool {
        self.outboxes
            .get(to)
            .is_some_and(|o| o.queue.borrow().len() > HIGH_WATER)
    }

    /// Whether any queue is above [`HIGH_WATER`]: stop taking new work.
    pub fn congested(&self) -> bool {
        (0..self.outboxes.len()).any(|to| self.congested_to(to))
    }

    /// Messages dropped at a full queue so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

impl OutboxRx {
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// The next queued message, waiting for one; None when the router is gone.
    pub async fn next(&self) -> Option<MeshMsg> {
        loop {
            if let Some(m) = self.outbox.queue.borrow_mut().pop_front() {
                return Some(m);
            }
            self.bell.recv().await?;
        }
    }
}

/// Drain a peer's outbox into the mesh (the mesh channel's own bound makes
/// this task wait, never the sender).
pub async fn forward(rx: OutboxRx, senders: Rc<Senders<MeshMsg>>) {
    let peer = rx.peer();
    while let Some(msg) = rx.next().await {
        if senders.send_to(peer, msg).await.is_err() {
            debug!(peer, "mesh peer gone");
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: u64) -> ShardMsg {
        ShardMsg::Fleet {
            shard: 1,
            online: n,
            drops: 0,
        }
    }

    fn online(m: MeshMsg) -> u64 {
        match m {
            MeshMsg::Domain(ShardMsg::Fleet { online, .. }) => online,
            _ => panic!("unexpected message"),
        }
    }

    #[test]
    fn outboxes_are_fifo_bounded_and_report_congestion() {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(512 << 10)
            .make()
            .expect("executor");
        ex.run(async {
            let (router, rxs) = Router::new(0, 2, 0);
            let cap = HIGH_WATER * 2; // the smallest bound allowed
            assert!(!router.congested());
            for i in 0..=HIGH_WATER as u64 {
                router.send(1, fleet(i));
            }
            assert!(router.congested_to(1) && router.congested());
            assert!(!router.congested_to(0));
            for i in HIGH_WATER as u64 + 1..cap as u64 + 10 {
                router.send(1, fleet(i));
            }
            assert_eq!(router.dropped(), 10, "messages past the bound are dropped");
            // Upgrade steps share the queue, in order.
            router.send(1, UpgradeMsg::Thaw);
            assert_eq!(router.dropped(), 11);
            let rx = &rxs[1];
            for i in 0..cap as u64 {
                assert_eq!(online(rx.next().await.expect("queued")), i);
            }
            assert!(!router.congested());
            router.send(1, UpgradeMsg::Thaw);
            assert!(matches!(
                rx.next().await,
                Some(MeshMsg::Upgrade(UpgradeMsg::Thaw))
            ));
        });
    }

    #[test]
    fn the_bound_covers_every_connection_twice() {
        assert!(outbox_bound(1_000_000) >= 2_000_000 + HIGH_WATER);
        assert!(outbox_bound(u64::MAX) > HIGH_WATER);
    }
}
