//! What every shard reads and nobody mutates on the hot path: the config,
//! the TLS server configuration, the fleet key, the bound address and the
//! shutdown flag.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;

use crate::auth::FleetKey;
use crate::config::Config;

pub struct Runtime {
    pub config: Config,
    tls: RwLock<Arc<ServerConfig>>,
    pub fleet_key: FleetKey,
    /// The address actually bound (port 0 resolved).
    pub listen: SocketAddr,
    pub shutdown: Arc<AtomicBool>,
    pub started: Instant,
    shards_ready: AtomicUsize,
}

impl Runtime {
    pub fn new(
        config: Config,
        tls: Arc<ServerConfig>,
        fleet_key: FleetKey,
        listen: SocketAddr,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        Self {
            config,
            tls: RwLock::new(tls),
            fleet_key,
            listen,
            shutdown,
            started: Instant::now(),
            shards_ready: AtomicUsize::new(0),
        }
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
