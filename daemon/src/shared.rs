//! What every shard reads and nobody mutates on the hot path: the config,
//! the TLS server configuration, the credentials (fleet keys and the
//! deny-list of agent ids), the bound address and the shutdown flag.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;

use presence_proto::{FleetKey, FleetKeyError};
use thiserror::Error;

use crate::config::{Config, KeyPermissions};
use crate::conn::agent::{self, HelloAuth};
use crate::tls::config::TlsError;

/// Why a reload kept the old material.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// Why the credentials (fleet keys, deny-list, key file modes) were refused.
#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error(transparent)]
    FleetKey(#[from] FleetKeyError),
    #[error("cannot read the revoked-agents file {path}: {source}")]
    Revoked {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}: group or others can read it \
         (chmod 0600; tls.key_permissions = \"refuse\")"
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("cannot stat key file {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Check that a key file is not readable by group or others: `Ok(None)`
/// when tight, `Ok(Some(warning))` when loose under `warn` (the caller
/// logs it), an error when loose under `refuse`. The message names the
/// file and its mode.
pub fn check_key_file(
    path: &Path,
    policy: KeyPermissions,
) -> Result<Option<String>, CredentialsError> {
    let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Stat {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o044 == 0 {
        return Ok(None);
    }
    let err = CredentialsError::LoosePermissions {
        path: path.to_owned(),
        mode,
    };
    match policy {
        KeyPermissions::Warn => Ok(Some(err.to_string())),
        KeyPermissions::Refuse => Err(err),
    }
}

/// Check `tls.key` and every fleet key file (start and reload); loose
/// modes are logged as warnings, or refused under `tls.key_permissions =
/// "refuse"`.
pub fn check_key_files(config: &Config) -> Result<(), CredentialsError> {
    let policy = config.tls.key_permissions;
    let paths = std::iter::once(config.tls.key.as_path()).chain(config.auth.fleet_key_paths());
    for p in paths {
        if let Some(w) = check_key_file(p, policy)? {
            tracing::warn!("{w}");
        }
    }
    Ok(())
}

/// The name a fleet key is counted under: its file name (the full path
/// when two keys share a file name).
fn key_names(paths: &[&Path]) -> Vec<String> {
    let short = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    paths
        .iter()
        .map(|p| {
            let name = short(p);
            if paths.iter().filter(|q| short(q) == name).count() > 1 {
                p.display().to_string()
            } else {
                name
            }
        })
        .collect()
}

/// The fleet keys HELLO tokens verify against, and the revoked agent ids.
/// Read-only once built; a reload builds a new one and swaps it in.
pub struct Credentials {
    keys: Vec<FleetKey>,
    /// Per key (same order): its name and how many HELLOs it accepted.
    used: Vec<(String, Arc<AtomicU64>)>,
    revoked: HashSet<Box<[u8]>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "keys",
                &self.used.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

impl Credentials {
    /// One key, nothing revoked.
    pub fn single(key: FleetKey, name: &str) -> Self {
        Self {
            keys: vec![key],
            used: vec![(name.to_owned(), Arc::new(AtomicU64::new(0)))],
            revoked: HashSet::new(),
        }
    }

    /// Load every configured fleet key and the deny-list. Counters of keys
    /// of the same name in `previous` carry on (a reload does not reset them).
    pub fn load(config: &Config, previous: Option<&Credentials>) -> Result<Self, CredentialsError> {
        let paths = config.auth.fleet_key_paths();
        let names = key_names(&paths);
        let mut keys = Vec::with_capacity(paths.len());
        let mut used = Vec::with_capacity(paths.len());
        for (path, name) in paths.iter().zip(names) {
            keys.push(FleetKey::load(path)?);
            let counter = previous
                .and_then(|p| p.used.iter().find(|(n, _)| *n == name))
                .map(|(_, c)| c.clone())
                .unwrap_or_default();
            used.push((name, counter));
        }
        let revoked = match &config.auth.revoked {
            None => HashSet::new(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| CredentialsError::Revoked {
                        path: path.clone(),
                        source,
                    })?;
                agent::parse_revoked(&text)
                    .map(|id| id.as_bytes().into())
                    .collect()
            }
        };
        Ok(Self {
            keys,
            used,
            revoked,
        })
    }

    /// Check a HELLO and count which key accepted it.
    pub fn authenticate(&self, id: &[u8], token: &[u8; presence_proto::TOKEN_LEN]) -> HelloAuth {
        let auth = agent::authenticate(&self.keys, self.is_revoked(id), id, token);
        if let HelloAuth::Accepted { key } = auth {
            if let Some((_, n)) = self.used.get(key) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        auth
    }

    pub fn is_revoked(&self, id: &[u8]) -> bool {
        !self.revoked.is_empty() && self.revoked.contains(id)
    }

    /// HELLOs accepted per fleet key, by key name.
    pub fn keys_used(&self) -> BTreeMap<String, u64> {
        self.used
            .iter()
            .map(|(n, c)| (n.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }
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
    credentials: RwLock<Arc<Credentials>>,
    /// Session ticket keys (persisted, rotated, handed over on upgrade).
    pub ticketer: Arc<crate::tls::tickets::PersistentTicketer>,
    /// The address actually bound (port 0 resolved).
    pub listen: SocketAddr,
    pub shutdown: Arc<AtomicBool>,
    /// A live upgrade committed: the control socket path belongs to the new
    /// process now, whatever the file there looks like.
    pub handed_over: AtomicBool,
    /// A live upgrade is in flight (from the lock to its outcome): shutdown
    /// waits for it, so no socket is closed while its fd is being sent.
    pub upgrading: AtomicBool,
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
        credentials: Credentials,
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
            credentials: RwLock::new(Arc::new(credentials)),
            ticketer,
            listen,
            shutdown,
            reload_requested,
            handed_over: AtomicBool::new(false),
            upgrading: AtomicBool::new(false),
            started: Instant::now(),
            shards_ready: AtomicUsize::new(0),
            reload: Mutex::new(ReloadStatus::default()),
            cert_not_after_ms: AtomicU64::new(0),
            cluster: None,
        }
    }

    /// The credentials in service (fleet keys, deny-list).
    pub fn credentials(&self) -> Arc<Credentials> {
        match self.credentials.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Check an agent's HELLO id and token against the current credentials.
    pub fn authenticate(&self, id: &[u8], token: &[u8; presence_proto::TOKEN_LEN]) -> HelloAuth {
        self.credentials().authenticate(id, token)
    }

    /// Reload the certificate, key, fleet keys and deny-list from the configured paths.
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
        check_key_files(c)?;
        let (tls, not_after) =
            crate::tls::config::server_config_with_expiry(&c.tls.cert, &c.tls.key, &self.ticketer)?;
        let creds = Arc::new(Credentials::load(c, Some(&self.credentials()))?);
        self.set_tls(tls);
        self.set_cert_not_after(not_after);
        match self.credentials.write() {
            Ok(mut g) => *g = creds,
            Err(poisoned) => *poisoned.into_inner() = creds,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_file_names_unless_ambiguous() {
        let a = Path::new("/etc/p/fleet.key");
        let b = Path::new("/etc/p/fleet-2027.key");
        let c = Path::new("/other/fleet.key");
        assert_eq!(key_names(&[a, b]), ["fleet.key", "fleet-2027.key"]);
        assert_eq!(
            key_names(&[a, b, c]),
            ["/etc/p/fleet.key", "fleet-2027.key", "/other/fleet.key"]
        );
    }

    #[test]
    fn loose_key_modes_warn_or_refuse_naming_file_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fleet.key");
        std::fs::write(&p, "x").unwrap();
        let set = |m| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        set(0o600);
        assert!(check_key_file(&p, KeyPermissions::Refuse)
            .unwrap()
            .is_none());
        set(0o400);
        assert!(check_key_file(&p, KeyPermissions::Refuse)
            .unwrap()
            .is_none());
        set(0o640);
        let w = check_key_file(&p, KeyPermissions::Warn).unwrap().unwrap();
        assert!(w.contains("fleet.key") && w.contains("0640"), "{w}");
        set(0o604);
        let e = check_key_file(&p, KeyPermissions::Refuse).unwrap_err();
        assert!(matches!(
            e,
            CredentialsError::LoosePermissions { mode: 0o604, .. }
        ));
        assert!(e.to_string().contains("0604"), "{e}");
    }
}
