//! Messages between the coordinator and its worker processes: one JSON
//! object per line, commands on the worker's stdin, replies on its stdout.

use std::net::{IpAddr, SocketAddr};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What the agents talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// presenced itself (HELLO / HEARTBEAT).
    Presenced,
    /// nats-server (INFO / CONNECT / PING).
    Nats,
    /// mosquitto (MQTT 3.1.1 CONNECT / PINGREQ).
    Mqtt,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Presenced => "presenced",
            TargetKind::Nats => "nats-server",
            TargetKind::Mqtt => "mosquitto",
        }
    }
}

/// First line sent to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInit {
    pub worker: usize,
    pub target: TargetKind,
    pub addr: SocketAddr,
    pub server_name: String,
    /// PEM text of the CA that signed the server certificate.
    pub ca_pem: String,
    /// Fleet key file text (presenced only).
    pub fleet_key: Option<String>,
    pub id_prefix: String,
    /// Global index of this worker's first agent (ids are unique across workers).
    pub first_agent: usize,
    /// Most agents this worker will ever hold.
    pub agents: usize,
    /// Source addresses this worker binds, round-robin per agent.
    pub source_ips: Vec<IpAddr>,
    /// Heartbeat interval while idle for peers (MQTT keepalive is twice this).
    pub keepalive_ms: u64,
    pub connect_timeout_ms: u64,
    /// Allow TLS session resumption (off: every handshake is a full one).
    /// On: every agent keeps its own client config (and session cache)
    /// across reconnects, so its tickets are its own.
    pub resumption: bool,
    /// Retries of a failed first connect (full-jitter backoff); 0 = a
    /// failed connect counts as failed.
    #[serde(default)]
    pub connect_retries: u32,
    /// Backoff of those retries.
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: BackoffSpec,
    /// Scheduling priority (nice) of the worker process; 0 = unchanged.
    #[serde(default)]
    pub nice: i32,
}

fn default_retry_backoff() -> BackoffSpec {
    BackoffSpec {
        initial_ms: 500,
        max_ms: 5000,
    }
}

fn one() -> f64 {
    1.0
}

/// Reconnect policy (full-jitter exponential backoff).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BackoffSpec {
    pub initial_ms: u64,
    pub max_ms: u64,
}

/// Commands to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Connect agents until this worker holds `upto` (local count).
    Connect {
        upto: usize,
        /// Handshakes per second for this worker; 0 = as fast as possible.
        rate: f64,
        /// Connection attempts in flight at most.
        concurrency: usize,
    },
    /// Every online agent sends one heartbeat at a random moment within `spread_ms`.
    HeartbeatRound { spread_ms: u64 },
    /// Heartbeat every `interval_ms` (+-10 % jitter) for `duration_ms`, recording RTTs.
    Steady { duration_ms: u64, interval_ms: u64 },
    /// Drop every connection at once (TCP reset, no BYE) and reconnect with backoff.
    Storm {
        backoff: BackoffSpec,
        deadline_ms: u64,
        /// Share of the online agents that drop (the same agents in every
        /// worker for a given share); the rest keep their connection.
        #[serde(default = "one")]
        drop_share: f64,
    },
    /// Every online agent heartbeats every `interval_ms` (+-10 %) until
    /// `Release`; answered at once with `Holding`.
    Hold { interval_ms: u64 },
    /// End a `Hold`; answered with `Heartbeats` for the whole hold.
    Release,
    /// Close every connection politely and exit.
    Close,
}

/// A histogram as (value, count) pairs, microseconds.
pub type HistData = Vec<(u64, u64)>;

/// Replies from a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    Ready {
        pid: u32,
    },
    /// Cumulative progress of the current command.
    Progress {
        done: u64,
        failed: u64,
    },
    Connected {
        ok: u64,
        failed: u64,
        /// Failed attempts that were retried (--connect-retries).
        #[serde(default)]
        retried: u64,
        /// Agents this worker now holds online.
        online: u64,
        elapsed_ms: u64,
        /// TCP connect + TLS handshake.
        tls_us: HistData,
        /// TCP connect to the protocol's welcome (WELCOME / CONNACK / PONG).
        full_us: HistData,
        errors: Vec<String>,
    },
    Heartbeats {
        ok: u64,
        failed: u64,
        rtt_us: HistData,
        /// Sessions lost while the command ran.
        disconnects: u64,
        /// Sessions re-established after such a loss.
        #[serde(default)]
        reconnects: u64,
        online: u64,
        /// Per agent, the longest time between two acknowledged heartbeats
        /// (from the start of the phase to its end).
        #[serde(default)]
        gap_us: HistData,
        errors: Vec<String>,
    },
    /// A `Hold` started.
    Holding {
        online: u64,
    },
    Storm {
        /// Per agent back online, milliseconds after the drop.
        back_ms: Vec<u32>,
        /// Agents that were not back before the deadline.
        not_back: u64,
        /// Agents that dropped (all online agents unless `drop_share` < 1).
        #[serde(default)]
        dropped: u64,
        /// Failed connection attempts during the storm.
        failed_attempts: u64,
        errors: Vec<String>,
    },
    Closed,
    Fatal {
        error: String,
    },
}

pub fn new_hist() -> Histogram<u64> {
    // 1 us .. 10 min, 3 significant digits; bounds are constants.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn hist_to_data(h: &Histogram<u64>) -> HistData {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn merge_into(h: &mut Histogram<u64>, data: &HistData) {
    for &(v, n) in data {
        h.saturating_record_n(v, n);
    }
}

/// Record a value, clamping it into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_round_trips() {
        let mut h = new_hist();
        for v in [5, 5, 100, 2000, 1_000_000] {
            record(&mut h, v);
        }
        let data = hist_to_data(&h);
        let mut g = new_hist();
        merge_into(&mut g, &data);
        assert_eq!(g.len(), 5);
        assert_eq!(g.value_at_quantile(1.0), h.value_at_quantile(1.0));
    }

    #[test]
    fn commands_are_tagged_json() {
        let c = Cmd::Connect {
            upto: 3,
            rate: 0.0,
            concurrency: 8,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"cmd\":\"connect\""), "{s}");
        let back: Cmd = serde_json::from_str(&s).unwrap();
        assert!(matches!(back, Cmd::Connect { upto: 3, .. }));
    }
}
