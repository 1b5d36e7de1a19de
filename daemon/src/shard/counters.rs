//! Per-shard counters (plain cells: each shard owns its own) and the
//! snapshots a shard sends to the control socket.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::Serialize;

use presence_proto::ErrorCode;

/// A shard-local counter.
#[derive(Default)]
pub struct Counter(Cell<u64>);

impl Counter {
    pub fn inc(&self) {
        self.0.set(self.0.get() + 1);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A shard-local latency histogram in microseconds (1 us .. 60 s, 3 digits).
pub struct Latency(std::cell::RefCell<hdrhistogram::Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        let h = hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
            .expect("static histogram bounds are valid");
        Self(std::cell::RefCell::new(h))
    }
}

impl Latency {
    pub fn record(&self, d: std::time::Duration) {
        let us = (d.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.0.borrow_mut().record(us);
    }

    pub fn summary(&self) -> LatencySummary {
        let h = self.0.borrow();
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            sum_us: (h.mean() * h.len() as f64) as u64,
        }
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub sum_us: u64,
}

#[derive(Default)]
pub struct Counters {
    /// Accept to TLS handshake complete.
    pub handshake_latency: Latency,
    /// HEARTBEAT decoded to HEARTBEAT_ACK written (server-side service time).
    pub heartbeat_latency: Latency,
    pub accepted: Counter,
    pub accept_errors: Counter,
    pub handshakes: Counter,
    /// Handshakes that resumed a session with a ticket.
    pub handshakes_resumed: Counter,
    pub handshake_failures: Counter,
    pub handshake_timeouts: Counter,
    pub hellos: Counter,
    pub heartbeats: Counter,
    pub timeouts: Counter,
    pub byes: Counter,
    /// Connections closed before TLS by admission control.
    pub admission_rejected: Counter,
    /// Connections closed before TLS: their source address was over
    /// `admission.max_handshakes_per_source` (also in `admission_rejected`).
    pub admission_source_rejected: Counter,
    /// Handshakes ended by `tls.first_byte_timeout`: no byte ever arrived
    /// (also counted in `handshake_failures`).
    pub first_byte_timeouts: Counter,
    /// ERROR frames sent, by code (index = code).
    pub errors_sent: [Counter; 8],
}

impl Counters {
    pub fn error_sent(&self, code: ErrorCode) {
        self.errors_sent[code as usize].inc();
    }

    pub fn snapshot(
        &self,
        shard: usize,
        connections: u64,
        sessions: u64,
        agents_known: u64,
        agents_online: u64,
        agents_in_grace: u64,
    ) -> ShardSnapshot {
        ShardSnapshot {
            shard,
            connections,
            sessions,
            agents_known,
            agents_online,
            agents_in_grace,
            accepted_total: self.accepted.get(),
            accept_errors_total: self.accept_errors.get(),
            handshakes_total: self.handshakes.get(),
            handshakes_resumed_total: self.handshakes_resumed.get(),
            handshake_failures_total: self.handshake_failures.get(),
            handshake_timeouts_total: self.handshake_timeouts.get(),
            hellos_total: self.hellos.get(),
            heartbeats_total: self.heartbeats.get(),
            timeouts_total: self.timeouts.get(),
            byes_total: self.byes.get(),
            admission_rejected_total: self.admission_rejected.get(),
            admission_source_rejected_total: self.admission_source_rejected.get(),
            first_byte_timeouts_total: self.first_byte_timeouts.get(),
            handshakes_in_flight: 0,
            handshake_latency: self.handshake_latency.summary(),
            heartbeat_latency: self.heartbeat_latency.summary(),
            accept_queue: None,
            accept_backlog: None,
            presumed_online: 0,
            state: None,
            errors_sent: ErrorCode::ALL
                .iter()
                .map(|c| (c.name(), self.errors_sent[*c as usize].get()))
                .collect(),
        }
    }
}

/// One shard's figures, sent to the control socket over the mesh.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardSnapshot {
    pub shard: usize,
    /// Open TCP connections (any phase).
    pub connections: u64,
    /// Connections past HELLO.
    pub sessions: u64,
    /// Presence records this shard owns.
    pub agents_known: u64,
    pub agents_online: u64,
    pub agents_in_grace: u64,
    pub accepted_total: u64,
    pub accept_errors_total: u64,
    pub handshakes_total: u64,
    pub handshakes_resumed_total: u64,
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
    /// ERROR frames sent, by code name.
    pub errors_sent: BTreeMap<&'static str, u64>,
    pub handshake_latency: LatencySummary,
    pub heartbeat_latency: LatencySummary,
    /// Connections waiting in this shard's listen queue, and its backlog.
    pub accept_queue: Option<u32>,
    pub accept_backlog: Option<u32>,
    /// Agents presumed online after a restart, not back yet.
    pub presumed_online: u64,
    /// Persistence of this shard's presence records.
    pub state: Option<crate::store::durable::DurableStatus>,
}
