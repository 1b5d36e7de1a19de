//! `[cluster]` in the daemon's TOML configuration (absent = standalone).
//! Every key and default is documented in `docs/cluster.md`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("cluster.{key}: {reason}")]
pub struct ClusterConfigError {
    /// The offending key of `[cluster]`.
    pub key: &'static str,
    pub reason: String,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ClusterConfigError {
    ClusterConfigError {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's id (default: the host name). Part of every session id.
    pub node_id: String,
    /// NATS servers, `nats://host:port` (or `tls://host:port`).
    pub nats_urls: Vec<String>,
    /// Token authentication.
    pub nats_token: Option<String>,
    /// User/password authentication (both or neither).
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub nats_creds: Option<PathBuf>,
    /// PEM CA bundle for TLS to NATS (also makes TLS required).
    pub nats_ca: Option<PathBuf>,
    /// How often this node refreshes its `PRESENCE_NODES` entry.
    #[serde(with = "humantime_serde")]
    pub node_heartbeat: Duration,
    /// A node whose entry is older than this is lost; its agents are swept.
    #[serde(with = "humantime_serde")]
    pub node_lost_after: Duration,
    /// JetStream replicas of the three streams (3 needs nats-server >= 2.10.8).
    pub replicas: usize,
    /// Retention of `PRESENCE_EVENTS`.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// Bound of the per-agent intent map (agents with a write not yet done).
    pub backlog_max: usize,
}

/// The host name, or `localhost` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: host_name(),
            nats_urls: Vec::new(),
            nats_token: None,
            nats_user: None,
            nats_password: None,
            nats_creds: None,
            nats_ca: None,
            node_heartbeat: Duration::from_secs(2),
            node_lost_after: Duration::from_secs(30),
            replicas: 1,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            backlog_max: 1_000_000,
        }
    }
}

/// Longest node id accepted (it is part of every session string and key).
pub const MAX_NODE_ID_LEN: usize = 128;

impl ClusterConfig {
    /// A config for `nats_urls` with every other key at its default.
    pub fn new(node_id: impl Into<String>, nats_urls: Vec<String>) -> Self {
        Self {
            node_id: node_id.into(),
            nats_urls,
            ..Self::default()
        }
    }

    /// Checks every key; the error names the key (`cluster.<key>: ...`).
    pub fn validate(&self) -> Result<(), ClusterConfigError> {
        if self.node_id.is_empty() {
            return Err(invalid("node_id", "must not be empty"));
        }
        if self.node_id.len() > MAX_NODE_ID_LEN {
            return Err(invalid(
                "node_id",
                format!("longer than {MAX_NODE_ID_LEN} bytes"),
            ));
        }
        if let Some(b) = self
            .node_id
            .bytes()
            .find(|b| !(b.is_ascii_graphic()) || *b == b'"' || *b == b'\\')
        {
            return Err(invalid(
                "node_id",
                format!("contains byte 0x{b:02x}; use printable ASCII without quotes or backslash"),
            ));
        }
        if self.nats_urls.is_empty() {
            return Err(invalid(
                "nats_urls",
                "at least one `nats://host:port` is required",
            ));
        }
        for url in &self.nats_urls {
            let rest = url
                .strip_prefix("nats://")
                .or_else(|| url.strip_prefix("tls://"))
                .ok_or_else(|| {
                    invalid(
                        "nats_urls",
                        format!("`{url}` must start with nats:// or tls://"),
                    )
                })?;
            let hostport = rest.rsplit('@').next().unwrap_or(rest);
            let ok = hostport
                .rsplit_once(':')
                .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                .unwrap_or(false);
            if !ok {
                return Err(invalid(
                    "nats_urls",
                    format!("`{url}` is not of the form nats://host:port"),
                ));
            }
        }
        match (&self.nats_user, &self.nats_password) {
            (Some(_), None) => return Err(invalid("nats_password", "required with nats_user")),
            (None, Some(_)) => return Err(invalid("nats_user", "required with nats_password")),
            _ => {}
        }
        let methods = usize::from(self.nats_token.is_some())
            + usize::from(self.nats_user.is_some())
            + usize::from(self.nats_creds.is_some());
        if methods > 1 {
            return Err(invalid(
                "nats_token",
                "choose one of nats_token, nats_user/nats_password, nats_creds",
            ));
        }
        if let Some(path) = &self.nats_creds {
            if !path.is_file() {
                return Err(invalid(
                    "nats_creds",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if let Some(path) = &self.nats_ca {
            if !path.is_file() {
                return Err(invalid(
                    "nats_ca",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if self.node_heartbeat < Duration::from_millis(50) {
            return Err(invalid("node_heartbeat", "must be at least 50ms"));
        }
        if self.node_lost_after < self.node_heartbeat * 3 {
            return Err(invalid(
                "node_lost_after",
                format!(
                    "must be at least 3 x node_heartbeat ({})",
                    humantime::format_duration(self.node_heartbeat * 3)
                ),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid("replicas", "must be between 1 and 5"));
        }
        if self.events_max_age < Duration::from_secs(60) {
            return Err(invalid("events_max_age", "must be at least 1m"));
        }
        if self.backlog_max == 0 {
            return Err(invalid("backlog_max", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            cluster: ClusterConfig,
        }
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(doc.cluster)
    }

    #[test]
    fn defaults() {
        let c = parse("[cluster]\nnats_urls = [\"nats://127.0.0.1:4222\"]\n").unwrap();
        assert_eq!(c.node_heartbeat, Duration::from_secs(2));
        assert_eq!(c.node_lost_after, Duration::from_secs(30));
        assert_eq!(c.replicas, 1);
        assert_eq!(c.events_max_age, Duration::from_secs(7 * 86400));
        assert!(!c.node_id.is_empty());
        c.validate().unwrap();
    }

    #[test]
    fn humantime_and_unknown_keys() {
        let c = parse(
            r#"
[cluster]
node_id = "a"
nats_urls = ["nats://h:1"]
node_heartbeat = "500ms"
node_lost_after = "3s"
events_max_age = "1h"
"#,
        )
        .unwrap();
        assert_eq!(c.node_heartbeat, Duration::from_millis(500));
        c.validate().unwrap();
        let e = parse("[cluster]\nnats_url = \"x\"\n").unwrap_err();
        assert!(e.contains("unknown field `nats_url`"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        let base = ClusterConfig::new("n1", vec!["nats://127.0.0.1:4222".into()]);
        let cases: Vec<(&str, ClusterConfig)> = vec![
            (
                "nats_urls",
                ClusterConfig {
                    nats_urls: vec![],
                    ..base.clone()
                },
            ),
            (
                "nats_urls",
                ClusterConfig {
                    nats_urls: vec!["http://x:1".into()],
                    ..base.clone()
                },
            ),
            (
                "nats_urls",
                ClusterConfig {
                    nats_urls: vec!["nats://x".into()],
                    ..base.clone()
                },
            ),
            (
                "node_id",
                ClusterConfig {
                    node_id: String::new(),
                    ..base.clone()
                },
            ),
            (
                "node_id",
                ClusterConfig {
                    node_id: "a b".into(),
                    ..base.clone()
                },
            ),
            (
                "nats_password",
                ClusterConfig {
                    nats_user: Some("u".into()),
                    ..base.clone()
                },
            ),
            (
                "replicas",
                ClusterConfig {
                    replicas: 0,
                    ..base.clone()
                },
            ),
            (
                "node_lost_after",
                ClusterConfig {
                    node_lost_after: Duration::from_secs(1),
                    ..base.clone()
                },
            ),
            (
                "backlog_max",
                ClusterConfig {
                    backlog_max: 0,
                    ..base.clone()
                },
            ),
            (
                "nats_creds",
                ClusterConfig {
                    nats_creds: Some("/nonexistent.creds".into()),
                    ..base.clone()
                },
            ),
        ];
        for (key, c) in cases {
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(
                e.to_string().starts_with(&format!("cluster.{key}: ")),
                "{e}"
            );
        }
    }
}
