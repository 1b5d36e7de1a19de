//! presenced cluster mode: presence shared between nodes through NATS
//! JetStream (issue 11). Design, objects and semantics: `docs/cluster.md`.
//!
//! The daemon starts one [`Cluster`] per process. [`Cluster::start`] spawns
//! one OS thread (`cluster-nats`) running a tokio current-thread runtime with
//! `async-nats`; the daemon's shards talk to it only through
//! [`ClusterHandle`], whose calls never block (a bounded channel with
//! `try_send`). NATS being slow or unreachable never affects agents: intents
//! are kept in a bounded, coalesced per-agent map and written when NATS is
//! back.

mod bridge;
pub mod config;
pub mod fixture;
pub mod key;
pub mod model;
pub mod session;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

pub use config::{host_name, ClusterConfig, ClusterConfigError};
pub use key::{decode_id, encode_id, KeyError};
pub use model::{EventMessage, NodeValue, PresenceValue};
pub use session::{SessionId, SessionParseError};

/// Name of the presence KV bucket (stream `KV_PRESENCE`).
pub const PRESENCE_BUCKET: &str = "PRESENCE";
/// Name of the node KV bucket (stream `KV_PRESENCE_NODES`).
pub const NODES_BUCKET: &str = "PRESENCE_NODES";
/// Name of the event stream.
pub const EVENTS_STREAM: &str = "PRESENCE_EVENTS";
/// Subject prefix of the event stream: `presence.events.<encoded id>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "presence.events.";

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error(transparent)]
    Config(#[from] ClusterConfigError),
    #[error("node id mismatch: NodeInfo says `{info}`, cluster.node_id says `{config}`")]
    NodeMismatch { info: String, config: String },
    #[error("cannot start the cluster thread: {0}")]
    Spawn(std::io::Error),
    #[error("JetStream object {object}: existing {field} is {existing}, configured {wanted}; fix the config or update the stream (docs/cluster.md)")]
    Mismatch {
        object: String,
        field: &'static str,
        existing: String,
        wanted: String,
    },
    #[error("NATS {context}: {message}")]
    Nats {
        context: &'static str,
        message: String,
    },
}

/// Who this node is. `epoch` must increase with every start of the node
/// (e.g. a boot counter kept in the state directory, or `boot_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub epoch: u64,
    pub boot_ms: u64,
}

/// An agent the node considers online (connected, in grace, or presumed
/// online after a restart), with the session it passed to `online()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAgent {
    pub id: Vec<u8>,
    pub session: SessionId,
}

/// Answer of [`ClusterHooks::node_lost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepVerdict {
    /// Write the `node_lost` offlines now.
    Allow,
    /// Not now (e.g. the mass-offline guard is active); the sweep is tried
    /// again at a later heartbeat, by whichever node wins the claim then.
    Defer,
}

/// What the daemon supplies to the bridge. Both methods run on the
/// `cluster-nats` thread (never on a shard) and should return quickly.
pub trait ClusterHooks: Send + Sync + 'static {
    /// Gate of a node-lost sweep: `node` is lost and `agents` (ids) are still
    /// online on it in the KV. The daemon feeds this through its mass-offline
    /// guard. The default allows every sweep.
    fn node_lost(&self, node: &str, agents: &[Vec<u8>]) -> SweepVerdict {
        let _ = (node, agents);
        SweepVerdict::Allow
    }

    /// Every agent this node considers online, for a reconciliation after a
    /// NATS outage, a full intent map or a full channel. `None` (the
    /// default) skips reconciliation: only the intents kept in the map are
    /// written.
    fn local_snapshot(&self) -> Option<Vec<LocalAgent>> {
        None
    }
}

/// Hooks that allow every sweep and supply no snapshot.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultHooks;
impl ClusterHooks for DefaultHooks {}

/// Latency summary of intents: from the `ts_ms` given to `online`/`offline`
/// to the acknowledged KV write (the last 1024 writes).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LagSummary {
    pub count: u64,
    pub last_ms: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// Counters for `stats` / metrics (all `*_total` since start).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterStats {
    pub node_id: String,
    pub epoch: u64,
    /// Connected to a NATS server now.
    pub connected: bool,
    /// Streams and buckets verified/created (JetStream usable).
    pub ready: bool,
    pub server_version: Option<String>,
    /// KV writes acknowledged (cluster-level transitions and silent moves).
    pub writes_total: u64,
    /// Of which transitions that produced an event (`PRESENCE_EVENTS`).
    pub events_total: u64,
    /// CAS conflicts (wrong last sequence), each followed by a re-read.
    pub conflicts_total: u64,
    /// Offlines dropped because the stored session was not the one ending.
    pub suppressed_offlines_total: u64,
    /// Onlines dropped because a newer session was already stored.
    pub stale_onlines_total: u64,
    /// `node_lost` offlines written by sweeps this node ran.
    pub node_lost_swept_total: u64,
    /// Sweeps run by this node (claims won and allowed).
    pub sweeps_total: u64,
    /// Sweeps the hook deferred.
    pub sweeps_deferred_total: u64,
    /// Agents with an intent not yet written (the intent map's size).
    pub backlog: u64,
    pub backlog_max: u64,
    /// Intents dropped because the map was full (a reconciliation follows).
    pub backlog_full_total: u64,
    /// Intents dropped because the channel to the thread was full.
    pub channel_full_total: u64,
    pub reconciles_total: u64,
    /// NATS operations that failed (timeouts, disconnects, ...).
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// Unix ms of the last acknowledged NATS write.
    pub last_success_ms: Option<u64>,
    pub publish_lag_ms: LagSummary,
}

/// One node of `PRESENCE_NODES`, for `presencectl cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub node_id: String,
    pub boot_ms: u64,
    pub epoch: u64,
    pub agents: u64,
    pub connections: u64,
    pub ts_ms: u64,
    /// Its intent backlog and last publish lag (ms), as it last published them.
    pub backlog: u64,
    pub publish_lag_ms: u64,
    /// Its entry changed within `node_lost_after` (as observed by this node).
    pub alive: bool,
    /// This node itself.
    pub local: bool,
}

/// Result of [`ClusterHandle::shutdown`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShutdownReport {
    /// Every intent was written before the timeout.
    pub flushed: bool,
    /// Intents left unwritten.
    pub left: u64,
}

/// Entry point.
pub struct Cluster;

impl Cluster {
    /// Starts the bridge with [`DefaultHooks`].
    pub fn start(cfg: ClusterConfig, node: NodeInfo) -> Result<ClusterHandle, ClusterError> {
        Self::start_with_hooks(cfg, node, Arc::new(DefaultHooks))
    }

    /// Validates `cfg` and spawns the `cluster-nats` thread. Does not wait
    /// for NATS: an unreachable server is retried in the background.
    pub fn start_with_hooks(
        cfg: ClusterConfig,
        node: NodeInfo,
        hooks: Arc<dyn ClusterHooks>,
    ) -> Result<ClusterHandle, ClusterError> {
        cfg.validate()?;
        if node.node_id != cfg.node_id {
            return Err(ClusterError::NodeMismatch {
                info: node.node_id,
                config: cfg.node_id,
            });
        }
        bridge::spawn(cfg, node, hooks)
    }
}

/// The daemon's side of the bridge: `Send + Sync + Clone`, never blocks
/// (except [`ClusterHandle::shutdown`] and [`ClusterHandle::kill`]).
#[derive(Clone)]
pub struct ClusterHandle {
    inner: Arc<bridge::HandleInner>,
}

impl ClusterHandle {
    /// The agent `id` is online with `session` (its HELLO was accepted at
    /// `ts_ms`). Returns false if the intent was dropped (channel full or
    /// shut down; counted, and a reconciliation is scheduled).
    pub fn online(&self, id: &[u8], session: SessionId, ts_ms: u64) -> bool {
        self.inner.send(bridge::Cmd::Online {
            id: id.to_vec(),
            session,
            ts_ms,
        })
    }

    /// The agent's `session` ended for good (`reason`: `bye`, `timeout`,
    /// `disconnect` (grace elapsed), `not_reconnected`, `revoked`, ...).
    pub fn offline(&self, id: &[u8], session: SessionId, reason: &str, ts_ms: u64) -> bool {
        self.inner.send(bridge::Cmd::Offline {
            id: id.to_vec(),
            session,
            reason: reason.to_string(),
            ts_ms,
        })
    }

    /// Local figures published in this node's `PRESENCE_NODES` entry.
    pub fn set_local_counts(&self, agents: u64, connections: u64) {
        let s = &self.inner.shared;
        s.agents.store(agents, Ordering::Relaxed);
        s.connections.store(connections, Ordering::Relaxed);
    }

    /// Asks for a reconciliation (uses [`ClusterHooks::local_snapshot`]).
    pub fn request_reconcile(&self) {
        self.inner
            .shared
            .reconcile_wanted
            .store(true, Ordering::Relaxed);
        self.inner.shared.wake.notify_one();
    }

    pub fn stats(&self) -> ClusterStats {
        self.inner.shared.stats()
    }

    /// The nodes of `PRESENCE_NODES` as of this node's last heartbeat.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.inner
            .shared
            .nodes
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }

    /// True when the bridge is ready, connected, and has nothing queued.
    pub fn is_idle(&self) -> bool {
        self.inner.shared.is_idle()
    }

    /// Polls [`ClusterHandle::is_idle`] until it holds or `timeout` passes
    /// (for tests and tools; do not call from a shard).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_idle() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops accepting intents, writes those kept (up to `timeout`), then
    /// stops the thread. The node's `PRESENCE_NODES` entry stays: a restart
    /// within `node_lost_after` produces no events. Blocks the caller.
    pub fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.inner.stop(bridge::STOP_FLUSH, timeout)
    }

    /// Stops the thread at once: no flush, no further heartbeat, the NATS
    /// connection is dropped. Models a crash (`kill -9`) of the node.
    pub fn kill(&self) {
        self.inner.stop(bridge::STOP_KILL, Duration::from_secs(5));
    }
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
