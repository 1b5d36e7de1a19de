//! What every shard reads and nobody mutates on the hot path: the config,
//! the TLS server configuration, the fleet key, the bound address and the
//! shutdown flag.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;

use presence_proto::{FleetKey, FleetKeyError};
use thiserror::Error;

use crate::config::Config;
use crate::tls::config::TlsError;

/// Why a reload kept the old material.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    FleetKey(#[from] FleetKeyError),
}

pub struct Runtime {
    pub config: Config,
    /// The config file this process runs with (an upgrade reuses it).
    pub config_path: std::path::PathBuf,
    /// The binary this process was started from (default upgrade target).
    pub binary: std::path::PathBuf,
    /// The shards' listening descriptors (for a live hand-over).
    listener_fds: Mutex<Vec<i32>>,
    /// The TLS record layer in use, and why ("userspace: kTLS unavailable: ...").
    pub record_layer: Mutex<String>,
    /// CPUs the process could use at start (before shards pinned threads):
    /// a new binary started by an upgrade gets the same.
    pub startup_cpus: Mutex<Vec<usize>>,
    tls: RwLock<Arc<ServerConfig>>,
    fleet_key: RwLock<FleetKey>,
    /// Session ticket keys (persisted, rotated, handed over on upgrade).
    pub ticketer: Arc<crate::tls::tickets::PersistentTicketer>,
    /// The address actually bound (port 0 resolved).
    pub listen: SocketAddr,
    pub shutdown: Arc<AtomicBool>,
    /// A live upgrade committed: the control socket path belongs to the new
    /// process now, whatever the file there looks like.
    pub handed_over: AtomicBool,
    /// Raised by SIGHUP; the event shard reloads and lowers it.
    pub reload_requested: Arc<AtomicBool>,
    pub started: Instant,
    shards_ready: AtomicUsize,
    reload: Mutex<ReloadStatus>,
    /// `notAfter` of the serving leaf certificate, Unix ms (0: unknown).
    cert_not_after_ms: AtomicU64,
    /// `[cluster]`: the NATS JetStream bridge (None: standalone).
    pub cluster: Option<ClusterLink>,
}

/// Bits of a session id below its accept time (random).
const SESSION_RANDOM_BITS: u32 = 22;

/// A new session id: accept time (Unix ms) in the high 42 bits, 22 random
/// bits below, so that the cluster [`presence_cluster::SessionId`] of a
/// session can be derived from the id alone (also after a restart).
pub fn new_session_id(now_ms: u64) -> u64 {
    (now_ms << SESSION_RANDOM_BITS) | (rand::random::<u64>() & ((1 << SESSION_RANDOM_BITS) - 1))
}

/// The accept time (Unix ms) a session id carries.
pub fn session_accept_ms(session: u64) -> u64 {
    session >> SESSION_RANDOM_BITS
}

/// What the daemon's hooks read on the bridge thread: kept current by the
/// event shard, never waited for.
pub struct ClusterShared {
    /// The mass-offline guard is active (or holds offlines).
    pub guard_active: AtomicBool,
    /// Shards whose part the snapshot needs.
    pub shards: usize,
    /// Agents each owner shard considers online, refreshed by that shard
    /// every [`CLUSTER_SNAPSHOT_EVERY_MS`] (one slot per shard).
    pub parts: Mutex<std::collections::HashMap<usize, Vec<presence_cluster::LocalAgent>>>,
    /// Connections of each shard, refreshed with its part.
    pub connections: Mutex<std::collections::HashMap<usize, u64>>,
}

/// How often each owner shard refreshes its part of the local snapshot.
pub const CLUSTER_SNAPSHOT_EVERY_MS: u64 = 2000;

impl ClusterShared {
    pub fn new(shards: usize) -> Self {
        Self {
            guard_active: AtomicBool::new(false),
            shards,
            parts: Mutex::new(std::collections::HashMap::new()),
            connections: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Every shard's part, or None until each shard gave one (a partial
    /// snapshot would make a reconciliation end agents that are online).
    pub fn snapshot(&self) -> Option<Vec<presence_cluster::LocalAgent>> {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        if parts.len() < self.shards {
            return None;
        }
        Some(parts.values().flatten().cloned().collect())
    }
}

/// The daemon's answers to the bridge: sweeps are deferred while the local
/// guard is active; the snapshot is the event shard's latest mirror.
pub struct DaemonHooks(pub Arc<ClusterShared>);

impl presence_cluster::ClusterHooks for DaemonHooks {
    fn node_lost(&self, node: &str, agents: &[Vec<u8>]) -> presence_cluster::SweepVerdict {
        if self.0.guard_active.load(Ordering::Relaxed) {
            tracing::warn!(
                node,
                agents = agents.len(),
                "cluster: node-lost sweep deferred: the mass-offline guard is active"
            );
            presence_cluster::SweepVerdict::Defer
        } else {
            presence_cluster::SweepVerdict::Allow
        }
    }

    fn local_snapshot(&self) -> Option<Vec<presence_cluster::LocalAgent>> {
        self.0.snapshot()
    }
}

/// The running bridge and this node's identity.
pub struct ClusterLink {
    pub handle: presence_cluster::ClusterHandle,
    pub node_id: String,
    /// This process's boot epoch.
    pub epoch: u64,
    /// The epoch of the process before this one (sessions presumed online
    /// after a restart belong to it).
    pub prev_epoch: u64,
    pub shared: Arc<ClusterShared>,
}

impl ClusterLink {
    /// The cluster session of a local session of epoch `epoch`.
    pub fn session_of(&self, session: u64, epoch: u64) -> presence_cluster::SessionId {
        presence_cluster::SessionId::new(
            session_accept_ms(session),
            self.node_id.as_str(),
            epoch,
            session,
        )
    }
}

/// Outcome of the reloads so far, reported by `stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub reloads_total: u64,
    pub reload_failures_total: u64,
    pub last_reload_ms: Option<u64>,
    /// Why the last reload failed (None when it succeeded or none happened).
    pub last_reload_error: Option<String>,
}

impl Runtime {
    pub fn new(
        config: Config,
        tls: Arc<ServerConfig>,
        fleet_key: FleetKey,
        ticketer: Arc<crate::tls::tickets::PersistentTicketer>,
        listen: SocketAddr,
        shutdown: Arc<AtomicBool>,
        reload_requested: Arc<AtomicBool>,
    ) -> Self {
        Self {
            config,
            config_path: std::path::PathBuf::new(),
            binary: std::env::current_exe().unwrap_or_default(),
            listener_fds: Mutex::new(Vec::new()),
            startup_cpus: Mutex::new(Vec::new()),
            record_layer: Mutex::new(String::new()),
            tls: RwLock::new(tls),
            fleet_key: RwLock::new(fleet_key),
            ticketer,
            listen,
            shutdown,
            reload_requested,
            handed_over: AtomicBool::new(false),
            started: Instant::now(),
            shards_ready: AtomicUsize::new(0),
            reload: Mutex::new(ReloadStatus::default()),
            cert_not_after_ms: AtomicU64::new(0),
            cluster: None,
        }
    }

    /// Check an agent's HELLO token against the current fleet key.
    pub fn verify_token(&self, id: &[u8], token: &[u8; presence_proto::TOKEN_LEN]) -> bool {
        match self.fleet_key.read() {
            Ok(k) => k.verify(id, token),
            Err(poisoned) => poisoned.into_inner().verify(id, token),
        }
    }

    /// Reload the certificate, key and fleet key from the configured paths.
    /// Everything is loaded and validated first; on any error nothing
    /// changes and the old material stays in service. Established
    /// connections are never touched.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let result = self.load_and_swap();
        let mut st = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        st.reloads_total += 1;
        st.last_reload_ms = Some(wall_ms());
        match &result {
            Ok(()) => st.last_reload_error = None,
            Err(e) => {
                st.reload_failures_total += 1;
                st.last_reload_error = Some(e.to_string());
            }
        }
        result
    }

    /// Load and validate the new material, then swap it in (all or nothing).
    fn load_and_swap(&self) -> Result<(), ReloadError> {
        let c = &self.config;
        let (tls, not_after) =
            crate::tls::config::server_config_with_expiry(&c.tls.cert, &c.tls.key, &self.ticketer)?;
        let key = FleetKey::load(&c.auth.fleet_key)?;
        self.set_tls(tls);
        self.set_cert_not_after(not_after);
        match self.fleet_key.write() {
            Ok(mut g) => *g = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        Ok(())
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The TLS configuration new handshakes use. Read once per handshake.
    pub fn tls(&self) -> Arc<ServerConfig> {
        match self.tls.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swap the TLS configuration for new handshakes; established connections keep theirs.
    pub fn set_tls(&self, tls: Arc<ServerConfig>) {
        match self.tls.write() {
            Ok(mut g) => *g = tls,
            Err(poisoned) => *poisoned.into_inner() = tls,
        }
    }

    /// Record the serving certificate's `notAfter` (Unix seconds).
    pub fn set_cert_not_after(&self, unix_s: i64) {
        let ms = u64::try_from(unix_s).map_or(0, |s| s.saturating_mul(1000));
        self.cert_not_after_ms.store(ms, Ordering::Relaxed);
    }

    /// The serving certificate's `notAfter`, Unix ms (`None` if unknown).
    pub fn cert_not_after_ms(&self) -> Option<u64> {
        Some(self.cert_not_after_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    pub fn set_listener_fds(&self, fds: Vec<i32>) {
        *self.listener_fds.lock().unwrap_or_else(|p| p.into_inner()) = fds;
    }

    pub fn listener_fds(&self) -> Vec<i32> {
        self.listener_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn shard_ready(&self) {
        self.shards_ready.fetch_add(1, Ordering::SeqCst);
    }

    pub fn shards_ready(&self) -> usize {
        self.shards_ready.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
