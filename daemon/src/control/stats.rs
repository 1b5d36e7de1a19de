//! Per-shard counters (plain cells: each shard owns its own), the
//! snapshots each shard reports, and [`Stats`]: the typed daemon-wide
//! aggregate that `stats` (as JSON) and `metrics` (as Prometheus text) both
//! render, so they can never disagree.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Serialize;

use crate::presence::guard::GuardStatus;
use crate::shard::Shard;
use crate::shared::ReloadStatus;
use crate::tls::tickets::TicketStats;

pub use crate::shard::counters::{LatencySummary, ShardSnapshot};

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

/// Live heap bytes allocated through jemalloc (None when jemalloc is not the
/// global allocator, e.g. in unit tests).
pub fn heap_bytes() -> Option<u64> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64;
    // Without jemalloc as the global allocator its own arenas are nearly empty.
    (allocated > 0).then_some(allocated)
}

/// The `stats` reply: process-wide figures, per-shard figures summed over
/// shards, and every shard's own [`ShardSnapshot`].
///
/// Serialized through `serde_json::Value` (whose maps sort their keys), the
/// JSON is the contract of docs/control-socket.md; `per_shard` keeps the
/// snapshots in shard order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub pid: u32,
    pub version: &'static str,
    pub listen: String,
    pub shards: usize,
    pub uptime_s: u64,
    pub connections: u64,
    pub sessions: u64,
    pub agents_online: u64,
    pub agents_in_grace: u64,
    pub agents_known: u64,
    pub accepted_total: u64,
    pub accept_errors_total: u64,
    pub handshakes_total: u64,
    pub handshakes_resumed_total: u64,
    pub tickets: TicketStats,
    pub handshake_failures_total: u64,
    pub handshake_timeouts_total: u64,
    pub hellos_total: u64,
    pub heartbeats_total: u64,
    pub timeouts_total: u64,
    pub byes_total: u64,
    pub admission_rejected_total: u64,
    pub admission_source_rejected_total: u64,
    pub first_byte_timeouts_total: u64,
    pub handshakes_in_flight: u64,
    /// ERROR frames sent, by code name, summed over shards.
    pub errors_sent: BTreeMap<&'static str, u64>,
    pub events_next_seq: u64,
    pub events_oldest_seq: u64,
    pub reload: ReloadStatus,
    /// Credentials in service: HELLOs per fleet key, revoked ids.
    pub auth: AuthStats,
    /// `notAfter` of the serving certificate, Unix ms (None: unknown).
    pub tls_cert_not_after_ms: Option<u64>,
    pub record_layer: String,
    /// Presence events published, keyed `online:<reason>` / `offline:<reason>`.
    pub events_by_reason: BTreeMap<String, u64>,
    pub presumed_online: u64,
    /// Per shard: how its presence records were loaded (None: no store).
    pub state: Vec<Option<&'static str>>,
    /// The mass-offline guard (None when this shard has none).
    pub guard: Option<GuardStatus>,
    pub rss_bytes: Option<u64>,
    pub heap_bytes: Option<u64>,
    /// Connections the metrics HTTP endpoint closed by its bounds (worker
    /// queue full, or no request within its read timeout).
    pub metrics_http_rejected_total: u64,
    /// Cluster mode: the NATS bridge's counters (None: standalone).
    pub cluster: Option<presence_cluster::ClusterStats>,
    pub per_shard: Vec<ShardSnapshot>,
}

/// `stats.auth`: which fleet key agents use, and the deny-list size.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AuthStats {
    /// HELLOs accepted since start, per configured fleet key (by file
    /// name): when an old key's count stops growing it can be removed.
    pub fleet_keys_used: BTreeMap<String, u64>,
    /// Agent ids on the deny-list in service.
    pub revoked_agents: u64,
}

/// The figures that are not per shard, read on the event shard.
#[derive(Debug, Clone, Default)]
pub struct ProcessFigures {
    pub pid: u32,
    pub version: &'static str,
    pub listen: String,
    pub shards: usize,
    pub uptime_s: u64,
    pub tickets: TicketStats,
    pub events_next_seq: u64,
    pub events_oldest_seq: u64,
    pub events_by_reason: BTreeMap<String, u64>,
    pub reload: ReloadStatus,
    pub auth: AuthStats,
    pub tls_cert_not_after_ms: Option<u64>,
    pub record_layer: String,
    pub guard: Option<GuardStatus>,
    pub rss_bytes: Option<u64>,
    pub heap_bytes: Option<u64>,
    pub metrics_http_rejected_total: u64,
    pub cluster: Option<presence_cluster::ClusterStats>,
}

impl Stats {
    /// Sum the shards' snapshots and add the process-wide figures.
    pub fn aggregate(p: ProcessFigures, per_shard: Vec<ShardSnapshot>) -> Stats {
        let sum = |f: fn(&ShardSnapshot) -> u64| per_shard.iter().map(f).sum::<u64>();
        let mut errors_sent: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (code, n) in per_shard.iter().flat_map(|s| s.errors_sent.iter()) {
            *errors_sent.entry(code).or_default() += n;
        }
        Stats {
            pid: p.pid,
            version: p.version,
            listen: p.listen,
            shards: p.shards,
            uptime_s: p.uptime_s,
            connections: sum(|s| s.connections),
            sessions: sum(|s| s.sessions),
            agents_online: sum(|s| s.agents_online),
            agents_in_grace: sum(|s| s.agents_in_grace),
            agents_known: sum(|s| s.agents_known),
            accepted_total: sum(|s| s.accepted_total),
            accept_errors_total: sum(|s| s.accept_errors_total),
            handshakes_total: sum(|s| s.handshakes_total),
            handshakes_resumed_total: sum(|s| s.handshakes_resumed_total),
            tickets: p.tickets,
            handshake_failures_total: sum(|s| s.handshake_failures_total),
            handshake_timeouts_total: sum(|s| s.handshake_timeouts_total),
            hellos_total: sum(|s| s.hellos_total),
            heartbeats_total: sum(|s| s.heartbeats_total),
            timeouts_total: sum(|s| s.timeouts_total),
            byes_total: sum(|s| s.byes_total),
            admission_rejected_total: sum(|s| s.admission_rejected_total),
            admission_source_rejected_total: sum(|s| s.admission_source_rejected_total),
            first_byte_timeouts_total: sum(|s| s.first_byte_timeouts_total),
            handshakes_in_flight: sum(|s| s.handshakes_in_flight),
            errors_sent,
            events_next_seq: p.events_next_seq,
            events_oldest_seq: p.events_oldest_seq,
            reload: p.reload,
            auth: p.auth,
            tls_cert_not_after_ms: p.tls_cert_not_after_ms,
            record_layer: p.record_layer,
            events_by_reason: p.events_by_reason,
            presumed_online: sum(|s| s.presumed_online),
            state: per_shard
                .iter()
                .map(|s| s.state.as_ref().map(|st| st.presence))
                .collect(),
            guard: p.guard,
            rss_bytes: p.rss_bytes,
            heap_bytes: p.heap_bytes,
            metrics_http_rejected_total: p.metrics_http_rejected_total,
            cluster: p.cluster,
            per_shard,
        }
    }

    /// The `stats` reply as JSON (keys sorted, as every reply so far).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Collect every shard's snapshot (a shard that does not answer counts as
/// empty) and the process-wide figures of `shard` (the event shard).
pub async fn gather_stats(shard: &Rc<Shard>) -> Stats {
    let mut per_shard: Vec<ShardSnapshot> = Vec::with_capacity(shard.nshards);
    for s in 0..shard.nshards {
        per_shard.push(
            shard
                .request_stats(s)
                .await
                .unwrap_or_else(|_| ShardSnapshot {
                    shard: s,
                    ..Default::default()
                }),
        );
    }
    Stats::aggregate(process_figures(shard), per_shard)
}

fn process_figures(shard: &Shard) -> ProcessFigures {
    let rt = &shard.rt;
    let (events_next_seq, events_oldest_seq, events_by_reason) = match shard.events.as_ref() {
        Some(log) => {
            let log = log.borrow();
            let by_reason = log
                .by_reason()
                .iter()
                .map(|((online, reason), n)| {
                    let state = if *online { "online" } else { "offline" };
                    (format!("{state}:{reason}"), *n)
                })
                .collect();
            (log.next_seq(), log.oldest_seq(), by_reason)
        }
        None => (0, 0, BTreeMap::new()),
    };
    ProcessFigures {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
        listen: rt.listen.to_string(),
        shards: shard.nshards,
        uptime_s: rt.started.elapsed().as_secs(),
        tickets: rt.ticketer.stats(),
        events_next_seq,
        events_oldest_seq,
        events_by_reason,
        reload: rt.reload_status(),
        auth: {
            let creds = rt.credentials();
            AuthStats {
                fleet_keys_used: creds.keys_used(),
                revoked_agents: creds.revoked_count() as u64,
            }
        },
        tls_cert_not_after_ms: rt.cert_not_after_ms(),
        record_layer: rt
            .record_layer
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default(),
        guard: shard
            .guard
            .as_ref()
            .map(|g| g.borrow().status(crate::shared::wall_ms())),
        rss_bytes: rss_bytes(),
        heap_bytes: heap_bytes(),
        metrics_http_rejected_total: crate::control::http::REJECTED
            .load(std::sync::atomic::Ordering::Relaxed),
        cluster: rt.cluster.as_ref().map(|c| c.handle.stats()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::counters::Counters;
    use presence_proto::ErrorCode;

    fn snapshot(shard: usize) -> ShardSnapshot {
        let c = Counters::default();
        c.heartbeats.inc();
        c.error_sent(ErrorCode::ALL[0]);
        c.snapshot(shard, 2, 1, 3, 1, 0)
    }

    #[test]
    fn sums_shards_and_keeps_the_documented_keys() {
        let stats = Stats::aggregate(
            ProcessFigures {
                shards: 2,
                ..Default::default()
            },
            vec![snapshot(0), snapshot(1)],
        );
        assert_eq!(stats.connections, 4);
        assert_eq!(stats.heartbeats_total, 2);
        assert_eq!(stats.errors_sent[ErrorCode::ALL[0].name()], 2);
        assert_eq!(stats.errors_sent.len(), ErrorCode::ALL.len());
        assert_eq!(stats.state, vec![None, None]);
        let json = stats.to_json();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // docs/control-socket.md, `stats`: every key, nothing more.
        let mut want = vec![
            "pid",
            "version",
            "listen",
            "shards",
            "uptime_s",
            "connections",
            "sessions",
            "agents_online",
            "agents_in_grace",
            "agents_known",
            "presumed_online",
            "accepted_total",
            "accept_errors_total",
            "handshakes_total",
            "handshakes_resumed_total",
            "handshakes_in_flight",
            "admission_rejected_total",
            "admission_source_rejected_total",
            "first_byte_timeouts_total",
            "handshake_failures_total",
            "handshake_timeouts_total",
            "hellos_total",
            "heartbeats_total",
            "timeouts_total",
            "byes_total",
            "errors_sent",
            "events_next_seq",
            "events_oldest_seq",
            "events_by_reason",
            "guard",
            "record_layer",
            "tickets",
            "state",
            "reload",
            "auth",
            "tls_cert_not_after_ms",
            "rss_bytes",
            "heap_bytes",
            "metrics_http_rejected_total",
            "cluster",
            "per_shard",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(json["per_shard"][1]["shard"], 1);
        assert!(json["guard"].is_null());
        assert!(json["cluster"].is_null(), "standalone: cluster is null");
    }
}
