//! The TOML configuration file. Unknown keys are rejected; every default is
//! documented in `docs/configuration.md`. Relative paths are resolved against
//! the directory that holds the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where `presencectl` and friends look when no socket is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/presenced/presenced.toml";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/presenced/control.sock";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub presence: PresenceConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// `[cluster]`: NATS JetStream cluster mode (absent = standalone);
    /// keys in `docs/cluster.md`.
    #[serde(default)]
    pub cluster: Option<presence_cluster::ClusterConfig>,
}

/// `[guard]`: the mass-offline guard (see `presence::guard`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// On by default.
    pub enabled: bool,
    /// Length of the sliding window over which offline transitions are counted.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Share of the online fleet (0 < share <= 1) that may go offline within
    /// `window` before the guard activates.
    pub threshold_share: f64,
    /// The guard never activates with fewer offline transitions than this in
    /// the window (small fleets).
    pub min_offline: u32,
    /// How long the offline rate must stay at or below the threshold before
    /// held events are released.
    #[serde(with = "humantime_serde")]
    pub release_quiet: Duration,
    /// Also hold `bye` offlines during a surge. Off by default: BYE is the
    /// agent itself saying it stops, never a server or network artefact
    /// (a fleet-wide patch reboot is real).
    pub hold_bye: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(60),
            threshold_share: 0.05,
            min_offline: 20,
            release_quiet: Duration::from_secs(60),
            hold_bye: false,
        }
    }
}

/// Why a `[guard]` configuration is refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum GuardConfigError {
    #[error("guard.threshold_share must be in (0, 1], got {0}")]
    ThresholdShare(f64),
    #[error("guard.window must be positive")]
    Window,
}

impl GuardConfig {
    pub fn validate(&self) -> Result<(), GuardConfigError> {
        if !(self.threshold_share > 0.0 && self.threshold_share <= 1.0) {
            return Err(GuardConfigError::ThresholdShare(self.threshold_share));
        }
        if self.window.as_millis() == 0 {
            return Err(GuardConfigError::Window);
        }
        Ok(())
    }
}

/// `[state]`: where presence survives crashes and restarts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// State directory (0700): presence snapshots and logs, event seq,
    /// TLS ticket keys, held guard events.
    pub dir: PathBuf,
    /// How often changes are written and fsync'd (the crash window).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// After a restart (planned or not), agents that were online stay
    /// presumed online this long; those not back by then go offline
    /// `not_reconnected`. (A live upgrade needs none of this: presence is
    /// handed over.)
    #[serde(with = "humantime_serde")]
    pub restart_grace: Duration,
    /// Rewrite the snapshot once the log holds this many changes.
    pub compact_after_entries: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/presenced"),
            flush_interval: Duration::from_secs(1),
            restart_grace: Duration::from_secs(120),
            compact_after_entries: 100_000,
        }
    }
}

/// `[admission]`: how many TLS handshakes a shard takes on at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Handshakes in progress per shard; more are closed before TLS.
    pub max_concurrent_handshakes: usize,
    /// New handshakes started per second per shard; more are closed before TLS.
    pub max_handshakes_per_sec: u32,
    /// Handshakes in progress per shard from one source IP address; more
    /// from that address are closed before TLS. Sized so a fleet behind
    /// one NAT address still reconnects (agents back off with jitter).
    pub max_handshakes_per_source: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            // Sized so a reconnect storm is limited by CPU, not by rejections
            // (a closed attempt doubles the agent's backoff and burns its
            // TLS ticket); heartbeats are protected by task-queue priority.
            max_concurrent_handshakes: 4_096,
            max_handshakes_per_sec: 10_000,
            max_handshakes_per_source: 64,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus text on `http://LISTEN/metrics` (off when absent).
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address agents connect to. Port 0 picks a free port (logged, and in `stats`).
    pub listen: SocketAddr,
    /// Number of shards (executors, one per core). 0 = every online CPU.
    pub shards: usize,
    /// Pin each shard to its own CPU.
    pub pin_cpus: bool,
    /// Unix control socket path.
    pub control_socket: PathBuf,
    /// Group allowed to use the control socket (mode 0660); absent = owner only (0600).
    pub control_group: Option<String>,
    /// Listen backlog of each shard's SO_REUSEPORT socket.
    pub backlog: u32,
    /// io_uring registered buffer memory per shard, in KiB (glommio refuses < 512).
    pub io_memory_kib: usize,
    /// Connections the host is sized for (used for start-up capacity warnings).
    pub max_connections: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7443".parse().expect("valid default address"),
            shards: 0,
            pin_cpus: true,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            control_group: None,
            backlog: 4096,
            io_memory_kib: 512,
            max_connections: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// A client that has not completed the TLS handshake by then is dropped.
    #[serde(default = "default_10s", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A client that sends no byte at all this long after TCP accept is
    /// dropped (an idle socket must not hold a handshake slot for the whole
    /// `handshake_timeout`).
    #[serde(default = "default_3s", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// What to do when `key` or a fleet key file can be read by group or
    /// others: `warn` (log it, default) or `refuse` (fail start or reload).
    #[serde(default)]
    pub key_permissions: KeyPermissions,
}

/// `tls.key_permissions`: the policy for key files readable by group/other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPermissions {
    #[default]
    Warn,
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the 32-byte fleet key as 64 hex characters.
    #[serde(default)]
    pub fleet_key: Option<PathBuf>,
    /// More fleet key files, all accepted at once (rotation). With
    /// `fleet_key`, at least one key is required.
    #[serde(default)]
    pub fleet_keys: Vec<PathBuf>,
    /// Deny-list of agent ids, one per line, `#` comments (reloadable).
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

impl AuthConfig {
    /// Every configured fleet key file: `fleet_key` first, then `fleet_keys`
    /// (duplicates dropped).
    pub fn fleet_key_paths(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for p in self.fleet_key.iter().chain(self.fleet_keys.iter()) {
            if !out.contains(&p.as_path()) {
                out.push(p);
            }
        }
        out
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Interval agents are told to heartbeat at (sent in WELCOME).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Missed intervals before a silent connection is closed (reason `timeout`).
    pub miss_limit: u32,
    /// How long an agent whose connection dropped without BYE stays online.
    #[serde(with = "humantime_serde")]
    pub offline_grace: Duration,
    /// HELLO must arrive within this time of accept.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Events kept for consumers that resume from a sequence number.
    pub event_ring_capacity: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            miss_limit: 3,
            offline_grace: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            event_ring_capacity: 100_000,
        }
    }
}

fn default_10s() -> Duration {
    Duration::from_secs(10)
}

fn default_3s() -> Duration {
    Duration::from_secs(3)
}

impl PresenceConfig {
    /// Silence after which a connection is closed.
    pub fn liveness_timeout(&self) -> Duration {
        self.heartbeat_interval * self.miss_limit
    }
}

impl Config {
    /// Read, parse, resolve relative paths and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parse `text` (named `path` in messages), resolving relative paths against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let auth = &mut cfg.auth;
        let optional = auth.fleet_key.iter_mut().chain(auth.revoked.iter_mut());
        for p in [
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
            &mut cfg.server.control_socket,
            &mut cfg.state.dir,
        ]
        .into_iter()
        .chain(optional)
        .chain(auth.fleet_keys.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(c) = cfg.cluster.as_mut() {
            for p in [c.nats_creds.as_mut(), c.nats_ca.as_mut()]
                .into_iter()
                .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason: reason.to_owned(),
        };
        if self.auth.fleet_key_paths().is_empty() {
            return Err(invalid(
                "auth.fleet_key",
                "at least one fleet key is required (auth.fleet_key or auth.fleet_keys)",
            ));
        }
        let p = &self.presence;
        if p.heartbeat_interval < Duration::from_millis(10)
            || p.heartbeat_interval.as_millis() > u32::MAX as u128
        {
            return Err(invalid(
                "presence.heartbeat_interval",
                "must be between 10ms and 49 days",
            ));
        }
        if p.miss_limit == 0 {
            return Err(invalid("presence.miss_limit", "must be at least 1"));
        }
        if p.hello_timeout.is_zero() {
            return Err(invalid("presence.hello_timeout", "must be greater than 0"));
        }
        if self.tls.handshake_timeout.is_zero() {
            return Err(invalid("tls.handshake_timeout", "must be greater than 0"));
        }
        if self.tls.first_byte_timeout.is_zero() {
            return Err(invalid("tls.first_byte_timeout", "must be greater than 0"));
        }
        if self.admission.max_handshakes_per_source == 0 {
            return Err(invalid(
                "admission.max_handshakes_per_source",
                "must be at least 1",
            ));
        }
        if p.event_ring_capacity == 0 {
            return Err(invalid(
                "presence.event_ring_capacity",
                "must be at least 1",
            ));
        }
        if self.server.io_memory_kib < 512 {
            return Err(invalid(
                "server.io_memory_kib",
                "glommio needs at least 512 KiB",
            ));
        }
        if let Err(e) = self.guard.validate() {
            return Err(invalid("guard", &e.to_string()));
        }
        if let Some(Err(e)) = self.cluster.as_ref().map(|c| c.validate()) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "cluster",
                reason: e.to_string(),
            });
        }
        if self.state.flush_interval.is_zero() {
            return Err(invalid("state.flush_interval", "must be greater than 0"));
        }
        if self.admission.max_concurrent_handshakes == 0
            || self.admission.max_handshakes_per_sec == 0
        {
            return Err(invalid("admission", "limits must be at least 1"));
        }
        if self.server.shards > 1024 {
            return Err(invalid("server.shards", "at most 1024 shards"));
        }
        let sock_len = self.server.control_socket.as_os_str().len();
        if sock_len >= 108 {
            return Err(invalid(
                "server.control_socket",
                "path is longer than the 107 bytes a Unix socket address holds",
            ));
        }
        Ok(())
    }

    /// Number of shards to run: `server.shards`, or every online CPU when 0.
    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
[auth]
fleet_key = "fleet.key"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let c =
            Config::parse(MIN, Path::new("/etc/p/presenced.toml"), Path::new("/etc/p")).unwrap();
        assert_eq!(c.tls.cert, Path::new("/etc/p/tls/cert.pem"));
        assert_eq!(c.server.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.presence.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.presence.liveness_timeout(), Duration::from_secs(90));
        assert_eq!(c.presence.offline_grace, Duration::from_secs(60));
        assert_eq!(c.tls.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{MIN}\n[presence]\nheartbeat_intervall = \"5s\"\n");
        let e = Config::parse(&text, Path::new("x.toml"), Path::new(".")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("heartbeat_intervall"), "{msg}");
    }

    #[test]
    fn invalid_value_names_key() {
        let text = format!("{MIN}\n[presence]\nmiss_limit = 0\n");
        let e = Config::parse(&text, Path::new("x.toml"), Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("presence.miss_limit"), "{e}");
        let text = format!("{MIN}\n[presence]\nheartbeat_interval = \"often\"\n");
        let e = Config::parse(&text, Path::new("x.toml"), Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("heartbeat_interval"), "{e}");
    }

    #[test]
    fn fleet_keys_and_revoked_resolve_and_one_key_is_required() {
        let text = MIN.replace(
            "fleet_key = \"fleet.key\"",
            "fleet_keys = [\"new.key\", \"/abs/old.key\"]\nrevoked = \"revoked\"",
        );
        let c = Config::parse(&text, Path::new("/etc/p/x.toml"), Path::new("/etc/p")).unwrap();
        assert_eq!(c.auth.fleet_key, None);
        assert_eq!(
            c.auth.fleet_key_paths(),
            [Path::new("/etc/p/new.key"), Path::new("/abs/old.key")]
        );
        assert_eq!(c.auth.revoked.as_deref(), Some(Path::new("/etc/p/revoked")));
        assert_eq!(c.tls.key_permissions, KeyPermissions::Warn);

        let both = MIN.replace(
            "fleet_key = \"fleet.key\"",
            "fleet_key = \"fleet.key\"\nfleet_keys = [\"fleet.key\", \"b.key\"]",
        );
        let c = Config::parse(&both, Path::new("x.toml"), Path::new("/d")).unwrap();
        assert_eq!(
            c.auth.fleet_key_paths(),
            [Path::new("/d/fleet.key"), Path::new("/d/b.key")]
        );

        let none = MIN.replace("fleet_key = \"fleet.key\"", "fleet_keys = []");
        let e = Config::parse(&none, Path::new("x.toml"), Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("auth.fleet_key"), "{e}");

        let refuse = MIN.replace(
            "key = \"tls/key.pem\"",
            "key = \"k\"\nkey_permissions = \"refuse\"",
        );
        let c = Config::parse(&refuse, Path::new("x.toml"), Path::new(".")).unwrap();
        assert_eq!(c.tls.key_permissions, KeyPermissions::Refuse);
    }
}
