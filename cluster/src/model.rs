//! The JSON documents stored in JetStream (see `docs/cluster.md`).

use serde::{Deserialize, Serialize};

/// Value of a `PRESENCE` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceValue {
    /// `"online"` or `"offline"`.
    pub state: String,
    /// Unix ms of the last cluster-level transition (a silent move keeps it).
    pub since_ms: u64,
    /// The node that holds (or held) `session`.
    pub node: String,
    /// The session, `<accept_ms>-<node>-<epoch>-<counter>`.
    pub session: String,
    /// `hello` when online; the offline reason otherwise.
    pub reason: String,
}

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";
/// Reason of the offlines written by a node-lost sweep.
pub const REASON_NODE_LOST: &str = "node_lost";
/// Reason of the onlines.
pub const REASON_HELLO: &str = "hello";

impl PresenceValue {
    pub fn is_online(&self) -> bool {
        self.state == ONLINE
    }
}

/// Value of a `PRESENCE_NODES` key (key = encoded node id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeValue {
    pub boot_ms: u64,
    pub epoch: u64,
    /// Agents online on the node (connected, in grace or presumed online).
    pub agents: u64,
    /// Open connections on the node.
    pub connections: u64,
    /// Unix ms of this refresh (the writer's clock).
    pub ts_ms: u64,
    /// Extension: the node's intent backlog (agents not yet written).
    #[serde(default)]
    pub backlog: u64,
    /// Extension: the node's last publish lag (intent to acknowledged write), ms.
    #[serde(default)]
    pub publish_lag_ms: u64,
}

/// One message of `PRESENCE_EVENTS`: the control socket's event line plus
/// `node` and `session`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    /// Sequence of the KV write in the `KV_PRESENCE` stream (the global event seq).
    pub seq: u64,
    pub ts_ms: u64,
    pub agent: String,
    pub state: String,
    pub reason: String,
    pub node: String,
    pub session: String,
}
