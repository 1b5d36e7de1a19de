//! What crosses from the old process to the new one, as plain serde data.
//!
//! The connection layer fills these in; nothing here knows about slabs,
//! rustls or glommio. Byte strings (secrets, pending bytes, ticket keys) are
//! hex strings on the wire: compact enough, and readable when debugging.
//!
//! Every type has a `validate` used on **both** sides: the source runs it on
//! what its shards produced before sending (a bug in the old binary fails
//! the upgrade instead of corrupting the new one), the target runs it on
//! what it received (a broken or foreign peer is refused).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the hand-over protocol (messages and these types). A target
/// refuses any other value.
pub const PROTOCOL: u32 = 1;

/// Phases a connection can be handed over in (`ConnHandoff::phase`).
/// A connection still in the TLS handshake cannot be carried.
pub mod phase {
    /// TLS done, HELLO not yet received. `agent` is `None`.
    pub const AWAIT_HELLO: u8 = 1;
    /// HELLO accepted. `agent` is `Some`.
    pub const SESSION: u8 = 2;
}

/// TLS 1.3 cipher suites (IANA ids) a connection's record state may use.
pub mod suite {
    pub const TLS13_AES_128_GCM_SHA256: u16 = 0x1301;
    pub const TLS13_AES_256_GCM_SHA384: u16 = 0x1302;
    pub const TLS13_CHACHA20_POLY1305_SHA256: u16 = 0x1303;

    /// Traffic secret length (the suite's hash length), or `None` for a
    /// suite that cannot be carried.
    pub fn secret_len(suite: u16) -> Option<usize> {
        match suite {
            TLS13_AES_128_GCM_SHA256 | TLS13_CHACHA20_POLY1305_SHA256 => Some(32),
            TLS13_AES_256_GCM_SHA384 => Some(48),
            _ => None,
        }
    }
}

// A record lives on `owner_shard(id, shards)`: this is why the new process
// must run exactly as many shards as listeners were handed over; with
// another count, every record would live on the wrong shard.
use crate::presence::owner::owner_shard;

/// A check on handed-over data failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("protocol {got} is not supported (this binary speaks {supported})")]
    Protocol { got: u32, supported: u32 },
    #[error("shard count mismatch: handed-over state has {handed} shards, this process is configured for {local} (owner shard = FNV-1a(id) % shards must agree)")]
    Shards { handed: usize, local: usize },
    #[error("shard count {0} is out of range (1..=65535)")]
    ShardRange(usize),
    #[error("listen address mismatch: handed-over listeners are bound to {handed}, configuration says {configured}")]
    Listen { handed: String, configured: String },
    #[error("connection {index} of shard {shard}: {what}")]
    Conn {
        shard: usize,
        index: usize,
        what: ConnError,
    },
    #[error("presence record {agent:?} of shard {shard}: {what}")]
    Record {
        shard: usize,
        agent: String,
        what: RecordError,
    },
    #[error("event ring: {0}")]
    Events(String),
    #[error("{what}: announced {expected}, got {got}")]
    Count {
        what: &'static str,
        expected: u64,
        got: u64,
    },
}

/// Why a connection cannot be carried as described.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConnError {
    #[error("belongs to shard {owner}, sent with shard {sent}")]
    WrongShard { owner: u16, sent: usize },
    #[error("awaiting HELLO but has an agent id")]
    AgentBeforeHello,
    #[error("in a session but has no agent id")]
    SessionWithoutAgent,
    #[error("phase {0} cannot be carried")]
    Phase(u8),
    #[error(transparent)]
    Tls(#[from] TlsStateError),
}

/// Why a connection's TLS record state cannot be carried.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TlsStateError {
    #[error("cipher suite {0:#06x} cannot be carried")]
    Suite(u16),
    #[error("suite {suite:#06x} needs {len}-byte secrets, got rx {rx} / tx {tx}")]
    SecretLength {
        suite: u16,
        len: usize,
        rx: usize,
        tx: usize,
    },
    #[error("sequence number exhausted")]
    SeqExhausted,
}

/// Why a presence record is not acceptable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("unknown state {0:?}")]
    State(String),
    #[error("grace_remaining_ms must be set exactly in state grace")]
    Grace,
    #[error("owned by shard {owner} (FNV-1a % {shards}), sent with shard {sent}")]
    WrongShard {
        owner: usize,
        shards: usize,
        sent: usize,
    },
}

/// Sent first. Describes the old process and the totals the rest of the
/// transfer must add up to.
///
/// The totals are exact: the source freezes all shards (`Source::prepare`)
/// before building the manifest, so nothing can open, close or change state
/// between the manifest and the snapshots. The target compares them with
/// what actually arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`PROTOCOL`] when sent by this code.
    pub protocol: u32,
    /// `CARGO_PKG_VERSION` (and whatever build id) of the old binary; logged.
    pub from_version: String,
    pub from_pid: u32,
    /// The address the listeners are actually bound to (resolved port).
    pub listen: String,
    /// Number of shards = number of listening sockets handed over.
    pub shards: usize,
    /// The config file the old process runs with; the new one is started
    /// with the same path.
    pub config_path: String,
    /// Open connections at the freeze, summed over shards: the ones that
    /// will be handed over plus the ones that cannot be carried
    /// (`ShardSnapshot::uncarried`).
    pub connections_total: u64,
    /// Presence records that will be handed over, summed over shards.
    pub agents_total: u64,
    /// The event ring's next sequence number.
    pub next_event_seq: u64,
}

impl Manifest {
    /// Structural checks that need nothing from the local process: the
    /// protocol version and a sane shard count.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.protocol != PROTOCOL {
            return Err(ManifestError::Protocol {
                got: self.protocol,
                supported: PROTOCOL,
            });
        }
        if self.shards == 0 || self.shards > usize::from(u16::MAX) {
            return Err(ManifestError::ShardRange(self.shards));
        }
        Ok(())
    }

    /// The checks a target's `check_manifest` should make against its own
    /// configuration: same shard count, and a listen address that matches
    /// the configured one (see [`listen_matches`]).
    pub fn check_local(
        &self,
        local_shards: usize,
        configured_listen: &str,
    ) -> Result<(), ManifestError> {
        self.validate()?;
        if self.shards != local_shards {
            return Err(ManifestError::Shards {
                handed: self.shards,
                local: local_shards,
            });
        }
        if !listen_matches(configured_listen, &self.listen) {
            return Err(ManifestError::Listen {
                handed: self.listen.clone(),
                configured: configured_listen.to_string(),
            });
        }
        Ok(())
    }
}

/// Does a handed-over bound address satisfy a configured listen address?
/// Equal socket addresses match; a configured port 0 ("kernel picks") matches
/// any port on the same IP, since the handed-over address is the resolved one.
/// Unparseable strings must be equal verbatim.
pub fn listen_matches(configured: &str, handed: &str) -> bool {
    match (
        configured.parse::<SocketAddr>(),
        handed.parse::<SocketAddr>(),
    ) {
        (Ok(c), Ok(h)) => c == h || (c.port() == 0 && c.ip() == h.ip()),
        _ => configured == handed,
    }
}

/// Record-layer state of one TLS 1.3 connection, enough to keep protecting
/// and unprotecting records in the new process: the current application
/// traffic secrets (keys and IVs are derived from them with HKDF-Expand-Label,
/// RFC 8446 7.3) and the next record sequence number in each direction.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsState {
    /// IANA cipher suite id, see [`suite`].
    pub suite: u16,
    /// client_application_traffic_secret_N (we read with it).
    #[serde(with = "hexbytes")]
    pub rx_secret: Vec<u8>,
    /// server_application_traffic_secret_N (we write with it).
    #[serde(with = "hexbytes")]
    pub tx_secret: Vec<u8>,
    /// Sequence number of the next record we will read.
    pub rx_seq: u64,
    /// Sequence number of the next record we will write.
    pub tx_seq: u64,
}

impl std::fmt::Debug for TlsState {
    /// Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("suite", &format_args!("{:#06x}", self.suite))
            .field(
                "rx_secret",
                &format_args!("<{} bytes>", self.rx_secret.len()),
            )
            .field(
                "tx_secret",
                &format_args!("<{} bytes>", self.tx_secret.len()),
            )
            .field("rx_seq", &self.rx_seq)
            .field("tx_seq", &self.tx_seq)
            .finish()
    }
}

impl TlsState {
    pub fn validate(&self) -> Result<(), TlsStateError> {
        let Some(len) = suite::secret_len(self.suite) else {
            return Err(TlsStateError::Suite(self.suite));
        };
        if self.rx_secret.len() != len || self.tx_secret.len() != len {
            return Err(TlsStateError::SecretLength {
                suite: self.suite,
                len,
                rx: self.rx_secret.len(),
                tx: self.tx_secret.len(),
            });
        }
        // TLS 1.3 forbids wrapping the sequence number (RFC 8446 5.3).
        if self.rx_seq == u64::MAX || self.tx_seq == u64::MAX {
            return Err(TlsStateError::SeqExhausted);
        }
        Ok(())
    }
}

/// One established connection. Its socket travels next to it as an fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnHandoff {
    /// The shard that accepted it (the shard being transferred).
    pub shard: u16,
    /// Slab key and generation on that shard: kept across the hand-over so
    /// the owner shards' references to the connection stay valid.
    #[serde(default)]
    pub key: u32,
    #[serde(default)]
    pub gen: u32,
    /// Agent id after HELLO (`phase::SESSION`), `None` before.
    pub agent: Option<String>,
    /// Session id after HELLO, 0 before.
    pub session_id: u64,
    /// Milliseconds since the last frame from the agent, at quiesce. The
    /// heartbeat deadline is recomputed from it: `now - age + liveness`.
    pub last_seen_age_ms: u64,
    /// Milliseconds since accept, at quiesce (the HELLO deadline counts from
    /// accept).
    #[serde(default)]
    pub accepted_age_ms: u64,
    /// See [`phase`].
    pub phase: u8,
    pub tls: TlsState,
    /// Ciphertext read from the socket but not yet consumed by the record
    /// layer (a partial record).
    #[serde(with = "hexbytes")]
    pub rx_pending: Vec<u8>,
    /// Plaintext already decrypted (so counted in `tls.rx_seq`) but not yet
    /// consumed by the frame decoder (a partial frame).
    #[serde(with = "hexbytes", default)]
    pub rx_plain: Vec<u8>,
    /// Ciphertext already sealed (counted in `tls.tx_seq`) but not yet
    /// written to the socket. The new process writes it first.
    #[serde(with = "hexbytes")]
    pub tx_pending: Vec<u8>,
}

impl ConnHandoff {
    pub fn validate(&self, shard: usize) -> Result<(), ConnError> {
        if usize::from(self.shard) != shard {
            return Err(ConnError::WrongShard {
                owner: self.shard,
                sent: shard,
            });
        }
        match self.phase {
            phase::AWAIT_HELLO => {
                if self.agent.is_some() {
                    return Err(ConnError::AgentBeforeHello);
                }
            }
            phase::SESSION => {
                if self.agent.as_deref().is_none_or(str::is_empty) {
                    return Err(ConnError::SessionWithoutAgent);
                }
            }
            p => return Err(ConnError::Phase(p)),
        }
        Ok(self.tls.validate()?)
    }
}

/// Presence states as they appear in events and `agent` replies.
pub const STATES: [&str; 3] = ["online", "grace", "offline"];

/// One presence record, sent with its owner shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecordHandoff {
    pub agent: String,
    /// "online" | "grace" | "offline"
    pub state: String,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub session: u64,
    /// Time left in grace; `Some` exactly when `state == "grace"`.
    pub grace_remaining_ms: Option<u64>,
    pub offline_reason: Option<String>,
    /// The connection of an online agent: (shard, slab key, generation).
    #[serde(default)]
    pub conn: Option<(u16, u32, u32)>,
}

impl PresenceRecordHandoff {
    pub fn validate(&self, shard: usize, shards: usize) -> Result<(), RecordError> {
        if !STATES.contains(&self.state.as_str()) {
            return Err(RecordError::State(self.state.clone()));
        }
        if (self.state == "grace") != self.grace_remaining_ms.is_some() {
            return Err(RecordError::Grace);
        }
        let owner = owner_shard(self.agent.as_bytes(), shards);
        if owner != shard {
            return Err(RecordError::WrongShard {
                owner,
                shards,
                sent: shard,
            });
        }
        Ok(())
    }
}

/// One event of the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHandoff {
    pub seq: u64,
    pub ts_ms: u64,
    pub agent: String,
    pub state: String,
    pub reason: String,
}

/// TLS session ticket keys, oldest first; opaque to the hand-over.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketKeys {
    #[serde(with = "hexvec")]
    pub keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TicketKeys(<{} keys>)", self.keys.len())
    }
}

/// Check the event ring: strictly increasing seqs, all below `next_seq`.
pub fn validate_events(events: &[EventHandoff], next_seq: u64) -> Result<(), ManifestError> {
    let mut prev = 0u64;
    for e in events {
        if e.seq == 0 || e.seq <= prev {
            return Err(ManifestError::Events(format!(
                "seq {} after {prev}: not strictly increasing",
                e.seq
            )));
        }
        if e.seq >= next_seq {
            return Err(ManifestError::Events(format!(
                "seq {} is not below next seq {next_seq}",
                e.seq
            )));
        }
        prev = e.seq;
    }
    Ok(())
}

/// Bytes as a lowercase hex string.
mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        hex::decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// A list of byte strings as a list of hex strings.
mod hexvec {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(&hex::encode(b))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tls() -> TlsState {
        TlsState {
            suite: suite::TLS13_AES_128_GCM_SHA256,
            rx_secret: vec![1; 32],
            tx_secret: vec![2; 32],
            rx_seq: 5,
            tx_seq: 7,
        }
    }

    #[test]
    fn conn_roundtrip_hex_and_no_secret_in_debug() {
        let c = ConnHandoff {
            shard: 3,
            key: 0,
            gen: 0,
            agent: Some("laptop-42".into()),
            session_id: 99,
            last_seen_age_ms: 1200,
            accepted_age_ms: 50_000,
            phase: phase::SESSION,
            tls: tls(),
            rx_pending: vec![0x17, 0x03, 0x03],
            rx_plain: vec![],
            tx_pending: vec![0xab; 4],
        };
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"rx_pending\":\"170303\""), "{j}");
        let back: ConnHandoff = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
        assert!(!format!("{c:?}").contains("0101"));
        c.validate(3).unwrap();
        assert!(c.validate(2).is_err());
        let mut bad = c.clone();
        bad.tls.rx_secret.pop();
        assert!(bad.validate(3).unwrap_err().to_string().contains("32-byte"));
        let mut hs = c.clone();
        hs.phase = 0;
        assert!(hs
            .validate(3)
            .unwrap_err()
            .to_string()
            .contains("cannot be carried"));
        // Bad hex from a broken peer is an error, not a panic.
        let broken = j.replace("170303", "17030z");
        assert!(serde_json::from_str::<ConnHandoff>(&broken).is_err());
    }

    #[test]
    fn manifest_checks() {
        let m = Manifest {
            protocol: PROTOCOL,
            from_version: "0.1.0".into(),
            from_pid: 1,
            listen: "127.0.0.1:7443".into(),
            shards: 4,
            config_path: "/etc/presenced/presenced.toml".into(),
            connections_total: 0,
            agents_total: 0,
            next_event_seq: 1,
        };
        m.check_local(4, "127.0.0.1:7443").unwrap();
        m.check_local(4, "127.0.0.1:0").unwrap();
        assert!(matches!(
            m.check_local(8, "127.0.0.1:7443"),
            Err(ManifestError::Shards {
                handed: 4,
                local: 8
            })
        ));
        assert!(matches!(
            m.check_local(4, "127.0.0.1:7444"),
            Err(ManifestError::Listen { .. })
        ));
        assert!(matches!(
            m.check_local(4, "0.0.0.0:7443"),
            Err(ManifestError::Listen { .. })
        ));
        let p = Manifest {
            protocol: 99,
            ..m.clone()
        };
        assert_eq!(
            p.validate(),
            Err(ManifestError::Protocol {
                got: 99,
                supported: PROTOCOL
            })
        );
        let z = Manifest { shards: 0, ..m };
        assert!(z.validate().is_err());
    }

    #[test]
    fn record_and_event_checks() {
        let shards = 4;
        let agent = "laptop-42".to_string();
        let owner = owner_shard(agent.as_bytes(), shards);
        let r = PresenceRecordHandoff {
            agent,
            state: "grace".into(),
            since_ms: 1,
            last_seen_ms: 2,
            session: 3,
            grace_remaining_ms: Some(5000),
            offline_reason: None,
            conn: None,
        };
        r.validate(owner, shards).unwrap();
        assert!(r
            .validate((owner + 1) % shards, shards)
            .unwrap_err()
            .to_string()
            .contains("owned by shard"));
        let bad = PresenceRecordHandoff {
            grace_remaining_ms: None,
            ..r.clone()
        };
        assert!(bad.validate(owner, shards).is_err());
        let bad = PresenceRecordHandoff {
            state: "away".into(),
            ..r
        };
        assert!(bad.validate(owner, shards).is_err());

        let ev = |seq| EventHandoff {
            seq,
            ts_ms: 0,
            agent: "a".into(),
            state: "online".into(),
            reason: "hello".into(),
        };
        validate_events(&[ev(3), ev(4), ev(9)], 10).unwrap();
        assert!(validate_events(&[ev(3), ev(3)], 10).is_err());
        assert!(validate_events(&[ev(3), ev(10)], 10).is_err());
        validate_events(&[], 1).unwrap();
    }

    #[test]
    fn ticket_keys_hex() {
        let k = TicketKeys {
            keys: vec![vec![0xde, 0xad], vec![]],
        };
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, r#"{"keys":["dead",""]}"#);
        assert_eq!(serde_json::from_str::<TicketKeys>(&j).unwrap(), k);
    }
}
