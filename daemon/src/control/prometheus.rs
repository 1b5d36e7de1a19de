//! Prometheus text exposition (format 0.0.4) rendered from the typed
//! [`Stats`] that `stats` also serializes (`control::stats::gather_stats`),
//! so `metrics` and `stats` can never disagree.
//!
//! Naming (documented in `docs/operations.md`):
//!
//! - `presenced_<name>`: the daemon-wide value (the sum over shards for
//!   per-shard figures). No `shard` label, so `sum()` never double-counts.
//! - `presenced_shard_<name>{shard="N"}`: the same figure for one shard.
//! - Latency summaries (`presenced_handshake_latency_seconds`,
//!   `presenced_heartbeat_latency_seconds`) exist per shard only: quantiles
//!   of different shards cannot be added.
//! - Counters end in `_total`; breakdowns use the labels `reason`, `code`
//!   and `state`.
//!
//! A family with no sample (e.g. the guard's on a daemon without one, or a
//! figure that is `None`) is not emitted.

use std::fmt::Write;

use crate::control::stats::{LatencySummary, ShardSnapshot, Stats};

/// A figure every shard reports, emitted as a daemon-wide family and a
/// per-shard one.
struct Figure {
    /// Metric name without the `presenced_` / `presenced_shard_` prefix.
    name: &'static str,
    help: &'static str,
    /// The daemon-wide value; `None`: the sum of the shards' values (for
    /// figures `stats` reports per shard only, like the accept queue).
    total: Option<fn(&Stats) -> u64>,
    shard: fn(&ShardSnapshot) -> Option<u64>,
}

/// Per-shard gauges.
const GAUGES: &[Figure] = &[
    Figure {
        name: "connections",
        help: "Open agent TCP connections, in any phase.",
        total: Some(|s| s.connections),
        shard: |s| Some(s.connections),
    },
    Figure {
        name: "sessions",
        help: "Open connections past HELLO.",
        total: Some(|s| s.sessions),
        shard: |s| Some(s.sessions),
    },
    Figure {
        name: "agents_online",
        help: "Agents reported online (connected or in grace).",
        total: Some(|s| s.agents_online),
        shard: |s| Some(s.agents_online),
    },
    Figure {
        name: "agents_in_grace",
        help: "Agents whose connection dropped without BYE, within offline_grace.",
        total: Some(|s| s.agents_in_grace),
        shard: |s| Some(s.agents_in_grace),
    },
    Figure {
        name: "agents_known",
        help: "Presence records held (online, grace and offline).",
        total: Some(|s| s.agents_known),
        shard: |s| Some(s.agents_known),
    },
    Figure {
        name: "accept_queue",
        help: "Connections waiting in the listen socket's accept queue.",
        total: None,
        shard: |s| s.accept_queue.map(u64::from),
    },
    Figure {
        name: "accept_backlog",
        help: "Capacity of the listen socket's accept queue (backlog, capped by somaxconn).",
        total: None,
        shard: |s| s.accept_backlog.map(u64::from),
    },
    Figure {
        name: "handshakes_in_flight",
        help: "TLS handshakes in progress.",
        total: Some(|s| s.handshakes_in_flight),
        shard: |s| Some(s.handshakes_in_flight),
    },
    Figure {
        name: "presumed_online",
        help: "Agents presumed online after a restart that have not reconnected yet.",
        total: Some(|s| s.presumed_online),
        shard: |s| Some(s.presumed_online),
    },
];

/// Per-shard counters.
const COUNTERS: &[Figure] = &[
    Figure {
        name: "accepted_total",
        help: "TCP connections accepted.",
        total: Some(|s| s.accepted_total),
        shard: |s| Some(s.accepted_total),
    },
    Figure {
        name: "accept_errors_total",
        help: "accept() failures (e.g. EMFILE: raise LimitNOFILE).",
        total: Some(|s| s.accept_errors_total),
        shard: |s| Some(s.accept_errors_total),
    },
    Figure {
        name: "handshakes_total",
        help: "Completed TLS handshakes.",
        total: Some(|s| s.handshakes_total),
        shard: |s| Some(s.handshakes_total),
    },
    Figure {
        name: "handshake_failures_total",
        help: "Failed TLS handshakes (bad TLS, wrong ALPN, closed, timed out, shutdown).",
        total: Some(|s| s.handshake_failures_total),
        shard: |s| Some(s.handshake_failures_total),
    },
    Figure {
        name: "handshake_timeouts_total",
        help: "TLS handshakes ended by tls.handshake_timeout (also counted in failures).",
        total: Some(|s| s.handshake_timeouts_total),
        shard: |s| Some(s.handshake_timeouts_total),
    },
    Figure {
        name: "first_byte_timeouts_total",
        help: "Connections closed by tls.first_byte_timeout: no byte arrived after accept (also counted in handshake failures).",
        total: Some(|s| s.first_byte_timeouts_total),
        shard: |s| Some(s.first_byte_timeouts_total),
    },
    Figure {
        name: "admission_source_rejected_total",
        help: "Connections closed before TLS because their source address was over admission.max_handshakes_per_source (also in admission_rejected_total).",
        total: Some(|s| s.admission_source_rejected_total),
        shard: |s| Some(s.admission_source_rejected_total),
    },
    Figure {
        name: "hellos_total",
        help: "HELLOs accepted (sessions started).",
        total: Some(|s| s.hellos_total),
        shard: |s| Some(s.hellos_total),
    },
    Figure {
        name: "heartbeats_total",
        help: "HEARTBEAT frames received.",
        total: Some(|s| s.heartbeats_total),
        shard: |s| Some(s.heartbeats_total),
    },
    Figure {
        name: "session_timeouts_total",
        help: "Sessions closed for silence (offline reason timeout).",
        total: Some(|s| s.timeouts_total),
        shard: |s| Some(s.timeouts_total),
    },
    Figure {
        name: "byes_total",
        help: "BYE frames received.",
        total: Some(|s| s.byes_total),
        shard: |s| Some(s.byes_total),
    },
    Figure {
        name: "handshakes_resumed_total",
        help:
            "TLS handshakes that resumed a session with a ticket (full = handshakes_total - this).",
        total: Some(|s| s.handshakes_resumed_total),
        shard: |s| Some(s.handshakes_resumed_total),
    },
    Figure {
        name: "admission_rejected_total",
        help: "Connections closed before TLS by admission control (handshake caps).",
        total: Some(|s| s.admission_rejected_total),
        shard: |s| Some(s.admission_rejected_total),
    },
];

/// Quantiles of a latency summary, with the field of `LatencySummary` for each.
/// Reads one figure of a latency summary.
type LatencyField = fn(&LatencySummary) -> u64;

const QUANTILES: [(&str, LatencyField); 4] = [
    ("0.5", |l| l.p50_us),
    ("0.9", |l| l.p90_us),
    ("0.99", |l| l.p99_us),
    ("0.999", |l| l.p999_us),
];

/// Label pairs of one sample, in output order.
type Labels = Vec<(&'static str, String)>;

/// One metric family: HELP, TYPE and its samples, emitted together.
struct Family {
    name: String,
    help: &'static str,
    kind: &'static str,
    /// (name suffix, labels, value)
    samples: Vec<(&'static str, Labels, String)>,
}

impl Family {
    fn new(name: &str, kind: &'static str, help: &'static str) -> Self {
        Self {
            name: format!("presenced_{name}"),
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// A family of one unlabelled sample (none when `value` is `None`).
    fn single(
        name: &str,
        kind: &'static str,
        help: &'static str,
        value: Option<impl ToString>,
    ) -> Self {
        let mut f = Self::new(name, kind, help);
        if let Some(v) = value {
            f.push(vec![], v.to_string());
        }
        f
    }

    fn push(&mut self, labels: Labels, value: impl Into<String>) {
        self.samples.push(("", labels, value.into()));
    }

    fn push_suffixed(&mut self, suffix: &'static str, labels: Labels, value: impl Into<String>) {
        self.samples.push((suffix, labels, value.into()));
    }

    fn write(&self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (suffix, labels, value) in &self.samples {
            out.push_str(&self.name);
            out.push_str(suffix);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {value}");
        }
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn fmt_f64(f: f64) -> String {
    // Rust's Display never uses an exponent and round-trips; Go parses it.
    format!("{f}")
}

fn micros_to_seconds(us: u64) -> String {
    fmt_f64(us as f64 / 1e6)
}

fn shard_label(snap: &ShardSnapshot) -> (&'static str, String) {
    ("shard", snap.shard.to_string())
}

/// Render `stats` as Prometheus text (format 0.0.4).
pub fn render(stats: &Stats) -> String {
    let mut families = process_families(stats);
    families.extend(guard_families(stats));
    families.extend(cluster_families(stats));
    for (figures, kind) in [(GAUGES, "gauge"), (COUNTERS, "counter")] {
        for figure in figures {
            families.extend(figure_families(stats, figure, kind));
        }
    }
    families.extend(breakdown_families(stats));
    families.extend(reload_families(stats));
    families.extend(auth_families(stats));
    families.extend(latency_families(stats));
    let mut out = String::with_capacity(8192 + stats.per_shard.len() * 4096);
    for f in &families {
        f.write(&mut out);
    }
    out
}

/// Version, address, shard count, uptime, memory, event sequence numbers.
fn process_families(stats: &Stats) -> Vec<Family> {
    let mut info = Family::new(
        "info",
        "gauge",
        "Daemon version and bound address (value 1).",
    );
    info.push(
        vec![
            ("version", stats.version.to_owned()),
            ("listen", stats.listen.clone()),
        ],
        "1",
    );
    vec![
        info,
        Family::single(
            "shards",
            "gauge",
            "Number of shards (executor threads).",
            Some(stats.shards),
        ),
        Family::single(
            "uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            Some(stats.uptime_s),
        ),
        Family::single(
            "resident_memory_bytes",
            "gauge",
            "Resident set size of the daemon process.",
            stats.rss_bytes,
        ),
        Family::single(
            "heap_bytes",
            "gauge",
            "Live heap bytes allocated through jemalloc.",
            stats.heap_bytes,
        ),
        Family::single(
            "events_next_seq",
            "gauge",
            "The seq the next presence event will get.",
            Some(stats.events_next_seq),
        ),
        Family::single(
            "events_oldest_seq",
            "gauge",
            "The oldest presence event seq still held for `events from`.",
            Some(stats.events_oldest_seq),
        ),
        Family::single(
            "metrics_http_rejected_total",
            "counter",
            "Connections the metrics HTTP endpoint closed by its bounds (all workers busy: 503; no request within its read timeout).",
            Some(stats.metrics_http_rejected_total),
        ),
    ]
}

/// The mass-offline guard (event shard); no samples without a guard.
fn guard_families(stats: &Stats) -> Vec<Family> {
    let g = stats.guard.as_ref();
    vec![
        Family::single(
            "guard_active",
            "gauge",
            "1 while the mass-offline guard holds offline events as suspect.",
            g.map(|g| if g.state == "active" { "1" } else { "0" }),
        ),
        Family::single(
            "guard_held",
            "gauge",
            "Offline events held as suspect now.",
            g.map(|g| g.held),
        ),
        Family::single(
            "guard_activations_total",
            "counter",
            "Times the guard activated.",
            g.map(|g| g.activations_total),
        ),
        Family::single(
            "guard_held_events_total",
            "counter",
            "Offline events ever held.",
            g.map(|g| g.held_total),
        ),
        Family::single(
            "guard_released_total",
            "counter",
            "Held offline events published after the surge (or by an operator).",
            g.map(|g| g.released_total),
        ),
        Family::single(
            "guard_suppressed_total",
            "counter",
            "Held offline events dropped because the agent came back.",
            g.map(|g| g.suppressed_total),
        ),
    ]
}

/// Cluster mode (docs/cluster.md); no samples when standalone.
fn cluster_families(stats: &Stats) -> Vec<Family> {
    let c = stats.cluster.as_ref();
    let flag = |b: bool| if b { "1" } else { "0" };
    vec![
        Family::single(
            "cluster_connected",
            "gauge",
            "1 while the NATS bridge is connected to a NATS server.",
            c.map(|c| flag(c.connected)),
        ),
        Family::single(
            "cluster_ready",
            "gauge",
            "1 once the JetStream streams and buckets are verified or created.",
            c.map(|c| flag(c.ready)),
        ),
        Family::single(
            "cluster_backlog",
            "gauge",
            "Agents whose latest intent is not yet written to the PRESENCE bucket.",
            c.map(|c| c.backlog),
        ),
        Family::single(
            "cluster_writes_total",
            "counter",
            "KV writes acknowledged (transitions and silent moves).",
            c.map(|c| c.writes_total),
        ),
        Family::single(
            "cluster_events_total",
            "counter",
            "Events published to PRESENCE_EVENTS.",
            c.map(|c| c.events_total),
        ),
        Family::single(
            "cluster_conflicts_total",
            "counter",
            "CAS conflicts on the PRESENCE bucket (each followed by a re-read).",
            c.map(|c| c.conflicts_total),
        ),
        Family::single(
            "cluster_suppressed_offlines_total",
            "counter",
            "Offlines dropped because the stored session was not the one ending.",
            c.map(|c| c.suppressed_offlines_total),
        ),
        Family::single(
            "cluster_node_lost_swept_total",
            "counter",
            "node_lost offlines written by sweeps this node ran.",
            c.map(|c| c.node_lost_swept_total),
        ),
        Family::single(
            "cluster_errors_total",
            "counter",
            "NATS operations that failed.",
            c.map(|c| c.errors_total),
        ),
        Family::single(
            "cluster_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last acknowledged NATS write.",
            c.and_then(|c| c.last_success_ms)
                .map(|ms| format!("{:.3}", ms as f64 / 1000.0)),
        ),
        Family::single(
            "cluster_publish_lag_p99_seconds",
            "gauge",
            "p99 of intent to acknowledged KV write, over the last 1024 writes.",
            c.map(|c| format!("{:.3}", c.publish_lag_ms.p99_ms as f64 / 1000.0)),
        ),
    ]
}

/// A per-shard figure: the daemon-wide family, then the per-shard one.
fn figure_families(stats: &Stats, figure: &Figure, kind: &'static str) -> [Family; 2] {
    let mut total = Family::new(figure.name, kind, figure.help);
    let mut shard = Family::new(&format!("shard_{}", figure.name), kind, figure.help);
    let values: Vec<(&ShardSnapshot, u64)> = stats
        .per_shard
        .iter()
        .filter_map(|s| (figure.shard)(s).map(|v| (s, v)))
        .collect();
    let sum = match figure.total {
        Some(total) => Some(total(stats)),
        None => (!values.is_empty()).then(|| values.iter().map(|(_, v)| v).sum()),
    };
    if let Some(v) = sum {
        total.push(vec![], v.to_string());
    }
    for (snap, v) in values {
        shard.push(vec![shard_label(snap)], v.to_string());
    }
    [total, shard]
}

/// Handshake failures by reason, protocol errors by code, presence events
/// by state and reason.
fn breakdown_families(stats: &Stats) -> Vec<Family> {
    let help = "Failed TLS handshakes by reason (`other` = not a timeout, when the daemon does not break it down further).";
    let mut hs_total = Family::new("handshake_failures_by_reason_total", "counter", help);
    let mut hs_shard = Family::new("shard_handshake_failures_by_reason_total", "counter", help);
    let by_reason = |failures: u64, timeouts: u64| {
        [
            ("timeout", timeouts),
            ("other", failures.saturating_sub(timeouts)),
        ]
    };
    for (reason, v) in by_reason(
        stats.handshake_failures_total,
        stats.handshake_timeouts_total,
    ) {
        hs_total.push(vec![("reason", reason.to_owned())], v.to_string());
    }
    for snap in &stats.per_shard {
        for (reason, v) in by_reason(snap.handshake_failures_total, snap.handshake_timeouts_total) {
            hs_shard.push(
                vec![shard_label(snap), ("reason", reason.to_owned())],
                v.to_string(),
            );
        }
    }

    let help = "ERROR frames sent to agents, by protocol error code name.";
    let mut err_total = Family::new("protocol_errors_sent_total", "counter", help);
    let mut err_shard = Family::new("shard_protocol_errors_sent_total", "counter", help);
    for (code, v) in &stats.errors_sent {
        err_total.push(vec![("code", (*code).to_owned())], v.to_string());
    }
    for snap in &stats.per_shard {
        for (code, v) in &snap.errors_sent {
            err_shard.push(
                vec![shard_label(snap), ("code", (*code).to_owned())],
                v.to_string(),
            );
        }
    }

    // Presence events are counted on the event shard: daemon-wide only.
    let mut events = Family::new(
        "presence_events_total",
        "counter",
        "Presence events published, by new state and reason (hello; bye, timeout, disconnect).",
    );
    for (key, v) in &stats.events_by_reason {
        let (state, reason) = key.split_once(':').unwrap_or(("", key));
        events.push(
            vec![("state", state.to_owned()), ("reason", reason.to_owned())],
            v.to_string(),
        );
    }
    vec![hs_total, hs_shard, err_total, err_shard, events]
}

/// Credentials: HELLOs accepted per fleet key, revoked ids configured.
fn auth_families(stats: &Stats) -> Vec<Family> {
    let mut by_key = Family::new(
        "hellos_by_fleet_key_total",
        "counter",
        "HELLOs accepted, by the fleet key (file name) their token verified against.",
    );
    for (key, v) in &stats.auth.fleet_keys_used {
        by_key.push(vec![("key", key.clone())], v.to_string());
    }
    vec![
        by_key,
        Family::single(
            "revoked_agents",
            "gauge",
            "Agent ids on the deny-list (auth.revoked) in service.",
            Some(stats.auth.revoked_agents),
        ),
    ]
}

/// Reloads of certificate, key and fleet key.
fn reload_families(stats: &Stats) -> Vec<Family> {
    let r = &stats.reload;
    vec![
        Family::single(
            "reloads_total",
            "counter",
            "Reloads of certificate, key and fleet key attempted.",
            Some(r.reloads_total),
        ),
        Family::single(
            "reload_failures_total",
            "counter",
            "Reloads that failed (the previous material stayed in service).",
            Some(r.reload_failures_total),
        ),
        Family::single(
            "reload_last_success",
            "gauge",
            "1 if the last reload succeeded or none happened, 0 if it failed.",
            Some(if r.last_reload_error.is_some() {
                "0"
            } else {
                "1"
            }),
        ),
        Family::single(
            "reload_last_timestamp_seconds",
            "gauge",
            "Unix time of the last reload attempt.",
            r.last_reload_ms.map(|ms| fmt_f64(ms as f64 / 1e3)),
        ),
        Family::single(
            "tls_cert_not_after_seconds",
            "gauge",
            "Unix time of the serving certificate's notAfter (updated by a successful reload).",
            stats
                .tls_cert_not_after_ms
                .map(|ms| fmt_f64(ms as f64 / 1e3)),
        ),
    ]
}

/// Picks a shard's handshake or heartbeat latency.
type LatencyOf = fn(&ShardSnapshot) -> &LatencySummary;

/// Latency summaries and maxima, per shard.
fn latency_families(stats: &Stats) -> Vec<Family> {
    let kinds: [(&str, &str, &'static str, LatencyOf); 2] = [
        (
            "handshake_latency_seconds",
            "handshake_latency_max_seconds",
            "TCP accept to TLS handshake complete, per shard (hdrhistogram quantiles).",
            |s| &s.handshake_latency,
        ),
        (
            "heartbeat_latency_seconds",
            "heartbeat_latency_max_seconds",
            "HEARTBEAT decoded to HEARTBEAT_ACK written, per shard (hdrhistogram quantiles).",
            |s| &s.heartbeat_latency,
        ),
    ];
    let mut out = Vec::with_capacity(4);
    for (name, max_name, help, latency) in kinds {
        let mut f = Family::new(name, "summary", help);
        let mut max = Family::new(
            max_name,
            "gauge",
            "Largest latency recorded since start, per shard.",
        );
        for snap in &stats.per_shard {
            let l = latency(snap);
            let shard = shard_label(snap);
            for (q, value) in QUANTILES {
                f.push(
                    vec![shard.clone(), ("quantile", q.to_owned())],
                    micros_to_seconds(value(l)),
                );
            }
            f.push_suffixed("_sum", vec![shard.clone()], micros_to_seconds(l.sum_us));
            f.push_suffixed("_count", vec![shard.clone()], l.count.to_string());
            max.push(vec![shard], micros_to_seconds(l.max_us));
        }
        out.push(f);
        out.push(max);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::stats::ProcessFigures;
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn latency(p50: u64) -> LatencySummary {
        LatencySummary {
            count: 10,
            p50_us: p50,
            p90_us: p50 * 2,
            p99_us: p50 * 3,
            p999_us: p50 * 4,
            max_us: p50 * 5,
            sum_us: p50 * 10,
        }
    }

    fn shard(i: u64) -> ShardSnapshot {
        ShardSnapshot {
            shard: i as usize,
            connections: 3 + i,
            sessions: 2,
            agents_known: 4,
            agents_online: 2,
            agents_in_grace: 1,
            accepted_total: 10,
            accept_errors_total: i,
            handshakes_total: 9,
            handshake_failures_total: 3,
            handshake_timeouts_total: 1,
            hellos_total: 8,
            heartbeats_total: 100,
            timeouts_total: 1,
            byes_total: 2,
            accept_queue: Some(i as u32),
            accept_backlog: Some(4096),
            errors_sent: BTreeMap::from([
                ("malformed_frame", 1),
                ("authentication_failed", 0),
                ("superseded", i),
            ]),
            handshake_latency: latency(1500),
            heartbeat_latency: latency(20),
            ..Default::default()
        }
    }

    fn sample() -> Stats {
        let process = ProcessFigures {
            pid: 42,
            version: "0.1.0",
            listen: "127.0.0.1:7443".into(),
            shards: 2,
            uptime_s: 12,
            events_next_seq: 15,
            events_oldest_seq: 1,
            events_by_reason: BTreeMap::from([
                ("online:hello".to_owned(), 10),
                ("offline:bye".to_owned(), 4),
            ]),
            reload: crate::shared::ReloadStatus {
                reloads_total: 2,
                reload_failures_total: 1,
                last_reload_ms: Some(1_795_507_720_584),
                last_reload_error: Some("certificate file /x: \"bad\"\nPEM".into()),
            },
            tls_cert_not_after_ms: Some(1_798_761_600_000),
            rss_bytes: Some(1_234_567),
            heap_bytes: None,
            ..Default::default()
        };
        Stats::aggregate(process, vec![shard(0), shard(1)])
    }

    /// Samples by full series text (`name{labels}`), checking the format
    /// rules a scraper enforces: HELP/TYPE before samples, one TYPE per
    /// family, families not interleaved, no duplicate series, numeric values.
    fn parse_strict(text: &str) -> HashMap<String, f64> {
        let mut typed: HashMap<String, String> = HashMap::new();
        let mut closed: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashMap::new();
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "summary"].contains(&kind), "{line}");
                assert!(typed.insert(name.into(), kind.into()).is_none(), "{line}");
                if let Some(c) = current.replace(name.to_owned()) {
                    closed.insert(c);
                }
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series_text, value) = line.rsplit_once(' ').unwrap();
            let name = series_text.split('{').next().unwrap();
            let fam = current.as_deref().unwrap();
            let kind = &typed[fam];
            let ok = name == fam
                || (kind == "summary"
                    && [format!("{fam}_sum"), format!("{fam}_count")].contains(&name.to_owned()));
            assert!(ok, "{name} outside its family {fam}");
            assert!(!closed.contains(fam));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            } else {
                assert!(!name.ends_with("_total"), "{name}");
            }
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            assert!(
                series.insert(series_text.to_owned(), v).is_none(),
                "dup {line}"
            );
        }
        series
    }

    #[test]
    fn renders_valid_text_with_totals_shards_and_summaries() {
        let text = render(&sample());
        let s = parse_strict(&text);
        assert_eq!(s["presenced_connections"], 7.0);
        assert_eq!(s["presenced_shard_connections{shard=\"1\"}"], 4.0);
        assert_eq!(s["presenced_agents_online"], 4.0);
        assert_eq!(s["presenced_heartbeats_total"], 200.0);
        assert_eq!(s["presenced_shard_heartbeats_total{shard=\"0\"}"], 100.0);
        assert_eq!(
            s["presenced_protocol_errors_sent_total{code=\"malformed_frame\"}"],
            2.0
        );
        assert_eq!(
            s["presenced_shard_protocol_errors_sent_total{shard=\"1\",code=\"superseded\"}"],
            1.0
        );
        assert_eq!(
            s["presenced_handshake_failures_by_reason_total{reason=\"timeout\"}"],
            2.0
        );
        assert_eq!(
            s["presenced_handshake_failures_by_reason_total{reason=\"other\"}"],
            4.0
        );
        // Presence events are counted daemon-wide only.
        assert_eq!(
            s["presenced_presence_events_total{state=\"online\",reason=\"hello\"}"],
            10.0
        );
        assert_eq!(
            s["presenced_presence_events_total{state=\"offline\",reason=\"bye\"}"],
            4.0
        );
        assert!(!text.contains("presenced_shard_presence_events_total"));
        assert_eq!(s["presenced_accept_queue"], 1.0);
        assert_eq!(s["presenced_shard_accept_backlog{shard=\"0\"}"], 4096.0);
        assert_eq!(
            s["presenced_handshake_latency_seconds{shard=\"0\",quantile=\"0.5\"}"],
            0.0015
        );
        assert_eq!(
            s["presenced_handshake_latency_seconds{shard=\"1\",quantile=\"0.999\"}"],
            0.006
        );
        assert_eq!(
            s["presenced_handshake_latency_seconds_sum{shard=\"1\"}"],
            0.015
        );
        assert_eq!(
            s["presenced_heartbeat_latency_seconds_count{shard=\"0\"}"],
            10.0
        );
        assert_eq!(
            s["presenced_heartbeat_latency_max_seconds{shard=\"0\"}"],
            0.0001
        );
        assert_eq!(s["presenced_resident_memory_bytes"], 1_234_567.0);
        assert_eq!(s["presenced_reload_last_success"], 0.0);
        assert_eq!(s["presenced_reload_failures_total"], 1.0);
        assert_eq!(
            s["presenced_reload_last_timestamp_seconds"],
            1_795_507_720.584
        );
        assert_eq!(s["presenced_tls_cert_not_after_seconds"], 1_798_761_600.0);
        assert_eq!(
            s["presenced_info{version=\"0.1.0\",listen=\"127.0.0.1:7443\"}"],
            1.0
        );
        // null values are skipped, not rendered as 0 or "null".
        assert!(!text.contains("presenced_heap_bytes"));
        assert!(!text.contains("null"));
    }

    #[test]
    fn a_real_parser_agrees() {
        let text = render(&sample());
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
        let find = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .unwrap_or_else(|| panic!("{name} {labels:?} missing"))
                .value
                .clone()
        };
        assert!(matches!(
            find("presenced_agents_online", &[]),
            prometheus_parse::Value::Gauge(v) if v == 4.0
        ));
        assert!(matches!(
            find("presenced_shard_hellos_total", &[("shard", "1")]),
            prometheus_parse::Value::Counter(v) if v == 8.0
        ));
        match find("presenced_handshake_latency_seconds", &[("shard", "0")]) {
            prometheus_parse::Value::Summary(qs) => {
                assert_eq!(qs.len(), 4);
                assert!(qs.iter().any(|q| q.quantile == 0.99 && q.count == 0.0045));
            }
            other => panic!("not a summary: {other:?}"),
        }
    }

    #[test]
    fn escapes_and_skips_absent_figures() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
        let stats = Stats {
            version: "1\"2",
            connections: 1,
            per_shard: vec![ShardSnapshot::default()],
            ..Default::default()
        };
        let text = render(&stats);
        let s = parse_strict(&text);
        assert_eq!(s["presenced_connections"], 1.0);
        assert!(text.contains(r#"version="1\"2""#), "{text}");
        // No guard, no accept queue, no memory figures: no family at all.
        for absent in [
            "presenced_guard_active",
            "presenced_accept_queue",
            "presenced_shard_accept_backlog",
            "presenced_resident_memory_bytes",
            "presenced_reload_last_timestamp_seconds",
        ] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }

    #[test]
    fn guard_figures_when_the_shard_has_a_guard() {
        let guard = crate::presence::guard::MassOfflineGuard::new(Default::default());
        let stats = Stats {
            guard: Some(guard.status(0)),
            ..sample()
        };
        let s = parse_strict(&render(&stats));
        assert_eq!(s["presenced_guard_active"], 0.0);
        assert_eq!(s["presenced_guard_held"], 0.0);
        assert_eq!(s["presenced_guard_activations_total"], 0.0);
    }
}
