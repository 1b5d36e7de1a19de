//! Results: serialisable structs (the `--json` output) and readable tables.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, Table};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pct {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Pct {
    pub fn from_us(h: &Histogram<u64>) -> Pct {
        let ms = |q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
        if h.is_empty() {
            return Pct::default();
        }
        Pct {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: round3(h.max() as f64 / 1000.0),
        }
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectResult {
    /// Agents asked to connect in this step.
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failed attempts that were retried (--connect-retries).
    #[serde(default)]
    pub retried: u64,
    /// Agents online across all workers afterwards.
    pub online: u64,
    pub wall_s: f64,
    /// Successful handshakes (to the protocol's welcome) per second of wall time.
    pub rate_per_s: f64,
    /// CPU seconds the server used meanwhile (user + system).
    pub server_cpu_s: Option<f64>,
    /// Successful handshakes per server CPU second: the rate the server
    /// would reach with a core to itself per CPU second spent.
    pub per_server_cpu_s: Option<f64>,
    /// TCP connect + TLS handshake.
    pub tls_ms: Pct,
    /// TCP connect up to WELCOME / CONNACK / PONG.
    pub full_ms: Pct,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatResult {
    pub ok: u64,
    pub failed: u64,
    pub disconnects: u64,
    /// Sessions re-established after a loss.
    #[serde(default)]
    pub reconnects: u64,
    pub online: u64,
    pub rate_per_s: f64,
    pub rtt_ms: Pct,
    /// Per agent, the longest time between two acknowledged heartbeats
    /// (phase start and end count as acknowledgements); percentiles over
    /// agents. `max` is the worst agent.
    #[serde(default)]
    pub gap_ms: Option<Pct>,
    /// Heartbeat interval of this phase (ms), for reading the gaps.
    #[serde(default)]
    pub interval_ms: Option<u64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormResult {
    pub mode: String,
    pub agents: u64,
    /// Share of the agents that dropped (1 = all).
    #[serde(default = "one")]
    pub drop_share: f64,
    /// Agents that dropped.
    #[serde(default)]
    pub dropped: u64,
    /// Agents kept their client config (session cache) across reconnects.
    #[serde(default)]
    pub resumption: bool,
    /// presenced `handshakes_total` delta over the storm.
    #[serde(default)]
    pub handshakes: Option<u64>,
    /// presenced `handshakes_resumed_total` delta over the storm.
    #[serde(default)]
    pub handshakes_resumed: Option<u64>,
    /// handshakes_resumed / handshakes.
    #[serde(default)]
    pub resumed_share: Option<f64>,
    /// presenced `admission_rejected_total` delta over the storm.
    #[serde(default)]
    pub admission_rejected: Option<u64>,
    /// CPU seconds the daemon used during the storm.
    #[serde(default)]
    pub server_cpu_s: Option<f64>,
    /// Reconnects per daemon CPU second.
    #[serde(default)]
    pub per_server_cpu_s: Option<f64>,
    /// The handshake-rate bound: dropped agents ÷ the handshakes/s measured
    /// in this run's initial connect (ms).
    #[serde(default)]
    pub bound_ms: Option<u64>,
    /// After a restart: `presumed_online` the restarted daemon reported.
    #[serde(default)]
    pub presumed_online_after_restart: Option<u64>,
    /// An error from reading the events (e.g. no longer held).
    #[serde(default)]
    pub events_error: Option<String>,
    pub back: u64,
    pub not_back: u64,
    pub failed_attempts: u64,
    pub t50_ms: Option<u64>,
    pub t90_ms: Option<u64>,
    pub t99_ms: Option<u64>,
    pub t100_ms: Option<u64>,
    /// Milliseconds from SIGKILL until the restarted daemon answered `stats`.
    pub restart_ms: Option<u64>,
    pub events_total: u64,
    pub online_events: u64,
    /// `offline` events: each one is a false offline.
    pub offline_events: u64,
    pub agents_online_after: Option<u64>,
    pub errors: Vec<String>,
    /// The recovery curve, one sample every `recovery_interval_ms` from the
    /// storm's start (the drop, or the SIGKILL) until the last agent is
    /// back or the deadline (empty with `--recovery-interval 0`).
    #[serde(default)]
    pub recovery: Vec<RecoverySample>,
    /// Sampling interval of `recovery` (ms).
    #[serde(default)]
    pub recovery_interval_ms: Option<u64>,
}

/// One point of a storm's recovery curve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoverySample {
    /// Seconds since the storm started.
    pub t_s: f64,
    /// Dropped agents back (their own WELCOME came back) by then, as the
    /// bench saw it.
    pub back: u64,
    /// The daemon's `sessions`, `agents_online` and `agents_in_grace` at
    /// that moment (None while it was down or did not answer within the
    /// interval).
    pub sessions: Option<u64>,
    pub agents_online: Option<u64>,
    pub agents_in_grace: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DensityPoint {
    /// Agents the bench holds online.
    pub agents: u64,
    /// The server's own count of connections (presenced `stats`).
    pub server_connections: Option<u64>,
    pub rss_bytes: u64,
    pub heap_bytes: Option<u64>,
    /// Counted slab caches, both ends of every connection.
    pub slab_bytes: Option<u64>,
    pub tcp_mem_pages: Option<u64>,
    pub heartbeat_p99_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DensityResult {
    pub points: Vec<DensityPoint>,
    /// Least-squares slopes, bytes per connection.
    pub rss_per_conn: Option<f64>,
    pub heap_per_conn: Option<f64>,
    /// Kernel slab growth per connection, client and server socket together.
    pub kernel_per_conn_both_ends: Option<f64>,
    /// Half of the above: the server socket's share (both ends are alike).
    pub kernel_per_conn_server: Option<f64>,
    /// Slab caches that grew most between the first and last point (bytes).
    pub kernel_top_caches: Vec<(String, i64)>,
}

/// Everything measured for one server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetResult {
    pub target: String,
    pub version: String,
    pub agents: u64,
    pub connect: Option<ConnectResult>,
    pub heartbeat: Option<HeartbeatResult>,
    pub storm: Option<StormResult>,
    pub density: Option<DensityResult>,
    /// Deltas of presenced counters over the run.
    pub daemon: Option<Value>,
    /// The undisturbed group (--undisturbed): heartbeats through the storm
    /// or the ramp, on connections that were not touched.
    #[serde(default)]
    pub undisturbed: Option<HeartbeatResult>,
    #[serde(default)]
    pub upgrade: Option<UpgradeResult>,
}

/// The `upgrade` scenario: the daemon's own report and what the agents saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpgradeResult {
    /// The binary passed with `upgrade` (None: the daemon's own).
    pub binary: Option<String>,
    pub ok: bool,
    pub old_pid: Option<u64>,
    pub new_pid: Option<u64>,
    /// The daemon's `elapsed_ms`.
    pub elapsed_ms: Option<u64>,
    /// Wall time of the `upgrade` request as the bench saw it.
    pub request_ms: u64,
    pub connections: Option<u64>,
    pub records: Option<u64>,
    pub uncarried: Option<u64>,
    pub error: Option<String>,
    /// Agents held through the upgrade.
    pub agents: u64,
    /// Sessions the agents lost during the window, and re-established.
    pub disconnects: u64,
    pub reconnects: u64,
    /// Presence events from the seq before the upgrade (read from the new process).
    pub events_total: u64,
    pub offline_events: u64,
    pub online_events: u64,
    pub events_error: Option<String>,
    /// `sessions` and `pid` from the new process's `stats` afterwards.
    pub sessions_after: Option<u64>,
    pub pid_after: Option<u64>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub bench_version: String,
    pub started_unix: u64,
    pub agents: Vec<u64>,
    pub workers: usize,
    pub source_ips: usize,
    pub targets: Vec<TargetResult>,
    pub notes: Vec<String>,
}

fn bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn opt_bytes(b: Option<f64>) -> String {
    b.map_or("n/a".into(), bytes)
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.iter().map(Cell::new).collect::<Vec<_>>());
    t
}

fn pct_cells(p: &Pct) -> Vec<String> {
    vec![
        format!("{:.2}", p.p50),
        format!("{:.2}", p.p90),
        format!("{:.2}", p.p99),
        format!("{:.2}", p.max),
    ]
}

impl Report {
    /// The readable summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let agents: Vec<String> = self.agents.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "presence-bench {} - {} agents, {} worker processes, {} source IPs\n",
            self.scenario,
            agents.join(","),
            self.workers,
            self.source_ips
        ));
        match self.scenario.as_str() {
            "ramp" => out.push_str(&self.render_connect()),
            "steady" => {
                out.push_str(&self.render_connect());
                out.push_str(&self.render_heartbeat());
            }
            "storm" => {
                out.push_str(&self.render_connect());
                out.push_str(&self.render_storm());
            }
            "upgrade" => {
                out.push_str(&self.render_connect());
                out.push_str(&self.render_heartbeat());
                out.push_str(&self.render_upgrade());
            }
            "density" => {
                out.push_str(&self.render_density());
            }
            _ => {}
        }
        out.push_str(&self.render_undisturbed());
        out.push_str(&self.render_daemon_counters());
        if self.targets.len() > 1 || self.scenario == "density" {
            out.push_str(&self.render_comparison());
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }

    fn render_connect(&self) -> String {
        let retried = self
            .targets
            .iter()
            .any(|r| r.connect.as_ref().is_some_and(|c| c.retried > 0));
        let mut head = vec!["target", "ok", "failed"];
        if retried {
            head.push("retried attempts");
        }
        head.extend([
            "wall s",
            "handshakes/s",
            "per server CPU-s",
            "TLS p50 ms",
            "p90",
            "p99",
            "max",
            "to welcome p50 ms",
            "p90",
            "p99",
            "max",
        ]);
        let mut t = table(&head);
        for r in &self.targets {
            if let Some(c) = &r.connect {
                let mut row = vec![r.target.clone(), c.ok.to_string(), c.failed.to_string()];
                if retried {
                    row.push(c.retried.to_string());
                }
                row.extend([
                    format!("{:.1}", c.wall_s),
                    format!("{:.0}", c.rate_per_s),
                    c.per_server_cpu_s
                        .map_or("n/a".into(), |x| format!("{x:.0}")),
                ]);
                row.extend(pct_cells(&c.tls_ms));
                row.extend(pct_cells(&c.full_ms));
                t.add_row(row);
            }
        }
        format!("\nconnect (ramp)\n{t}\n")
    }

    fn render_heartbeat(&self) -> String {
        let rows: Vec<(&str, &HeartbeatResult)> = self
            .targets
            .iter()
            .filter_map(|r| r.heartbeat.as_ref().map(|h| (r.target.as_str(), h)))
            .collect();
        let title = if self.scenario == "upgrade" {
            "heartbeats through the upgrade window"
        } else {
            "heartbeats (steady)"
        };
        hb_table(title, &rows)
    }

    fn render_undisturbed(&self) -> String {
        let rows: Vec<(&str, &HeartbeatResult)> = self
            .targets
            .iter()
            .filter_map(|r| r.undisturbed.as_ref().map(|h| (r.target.as_str(), h)))
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let during = if self.scenario == "ramp" {
            "ramp"
        } else {
            "storm"
        };
        hb_table(
            &format!("undisturbed group (untouched connections heartbeating through the {during})"),
            &rows,
        )
    }

    fn render_daemon_counters(&self) -> String {
        let mut out = String::new();
        for r in &self.targets {
            let Some(d) = r.daemon.as_ref().and_then(Value::as_object) else {
                continue;
            };
            let pick = |k: &str| d.get(k).and_then(Value::as_u64);
            let mut parts = Vec::new();
            for k in [
                "handshakes_total",
                "handshakes_resumed_total",
                "admission_rejected_total",
                "handshake_failures_total",
                "timeouts_total",
            ] {
                if let Some(v) = pick(k) {
                    parts.push(format!("{k} +{v}"));
                }
            }
            if !parts.is_empty() && self.scenario != "density" {
                out.push_str(&format!(
                    "{} counters over the run: {}\n",
                    r.target,
                    parts.join(", ")
                ));
            }
        }
        out
    }

    fn render_upgrade(&self) -> String {
        let mut t = table(&[
            "target",
            "ok",
            "old pid",
            "new pid",
            "elapsed ms (daemon)",
            "request ms",
            "connections",
            "records",
            "uncarried",
            "disconnects",
            "reconnects",
            "offline events",
            "online events",
            "sessions after",
        ]);
        let o = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        let mut errors = String::new();
        for r in &self.targets {
            if let Some(u) = &r.upgrade {
                t.add_row(vec![
                    r.target.clone(),
                    u.ok.to_string(),
                    o(u.old_pid),
                    o(u.new_pid),
                    o(u.elapsed_ms),
                    u.request_ms.to_string(),
                    o(u.connections),
                    o(u.records),
                    o(u.uncarried),
                    u.disconnects.to_string(),
                    u.reconnects.to_string(),
                    u.offline_events.to_string(),
                    u.online_events.to_string(),
                    o(u.sessions_after),
                ]);
                if let Some(e) = &u.error {
                    errors.push_str(&format!("upgrade error: {e}\n"));
                }
                if let Some(e) = &u.events_error {
                    errors.push_str(&format!("events: {e}\n"));
                }
            }
        }
        format!("\nupgrade\n{t}\n{errors}")
    }

    fn render_storm(&self) -> String {
        let mut t = table(&[
            "target",
            "mode",
            "agents",
            "dropped",
            "back",
            "not back",
            "50% back",
            "90%",
            "99%",
            "100%",
            "bound",
            "failed attempts",
            "resumed share",
            "offline events",
            "online events",
        ]);
        let ms = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v} ms"));
        let mut extra = String::new();
        for r in &self.targets {
            if let Some(s) = &r.storm {
                let mut mode = s.mode.clone();
                if s.drop_share < 1.0 {
                    mode.push_str(&format!(" {:.0}%", s.drop_share * 100.0));
                }
                if s.resumption {
                    mode.push_str(" +resumption");
                }
                t.add_row(vec![
                    r.target.clone(),
                    mode,
                    s.agents.to_string(),
                    s.dropped.to_string(),
                    s.back.to_string(),
                    s.not_back.to_string(),
                    ms(s.t50_ms),
                    ms(s.t90_ms),
                    ms(s.t99_ms),
                    ms(s.t100_ms),
                    ms(s.bound_ms),
                    s.failed_attempts.to_string(),
                    s.resumed_share
                        .map_or("n/a".into(), |x| format!("{:.1}%", x * 100.0)),
                    s.offline_events.to_string(),
                    s.online_events.to_string(),
                ]);
                let o = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
                extra.push_str(&format!(
                    "{}: daemon handshakes {} (resumed {}), admission rejected {}, daemon CPU {} s ({} reconnects per CPU-s)",
                    r.target,
                    o(s.handshakes),
                    o(s.handshakes_resumed),
                    o(s.admission_rejected),
                    s.server_cpu_s.map_or("n/a".into(), |c| format!("{c:.2}")),
                    s.per_server_cpu_s.map_or("n/a".into(), |c| format!("{c:.0}")),
                ));
                if let Some(ms) = s.restart_ms {
                    extra.push_str(&format!(
                        ", restarted daemon answered {ms} ms after SIGKILL, presumed online {}",
                        o(s.presumed_online_after_restart)
                    ));
                }
                extra.push('\n');
                if let Some(e) = &s.events_error {
                    extra.push_str(&format!("events: {e}\n"));
                }
            }
        }
        format!(
            "\nreconnect storm (bound = dropped ÷ this run's connect handshakes/s)\n{t}\n{extra}"
        )
    }

    fn render_density(&self) -> String {
        let mut out = String::new();
        for r in &self.targets {
            let Some(d) = &r.density else { continue };
            let mut t = table(&[
                "agents",
                "server conns",
                "RSS",
                "heap",
                "kernel slab (both ends)",
                "hb p99 ms",
            ]);
            for p in &d.points {
                t.add_row(vec![
                    p.agents.to_string(),
                    p.server_connections.map_or("-".into(), |c| c.to_string()),
                    bytes(p.rss_bytes as f64),
                    opt_bytes(p.heap_bytes.map(|h| h as f64)),
                    opt_bytes(p.slab_bytes.map(|h| h as f64)),
                    format!("{:.2}", p.heartbeat_p99_ms),
                ]);
            }
            out.push_str(&format!("\n{} ({})\n{t}\n", r.target, r.version));
            out.push_str(&format!(
                "fitted per connection: RSS {}, heap {}, kernel {} both ends (~{} server side)\n",
                opt_bytes(d.rss_per_conn),
                opt_bytes(d.heap_per_conn),
                opt_bytes(d.kernel_per_conn_both_ends),
                opt_bytes(d.kernel_per_conn_server),
            ));
            if let Some(rss) = d.rss_per_conn {
                let kern = d.kernel_per_conn_server.unwrap_or(0.0);
                out.push_str(&format!(
                    "=> 1,000,000 agents: ~{:.2} GiB process RSS + ~{:.2} GiB kernel (server side)\n",
                    rss * 1e6 / (1u64 << 30) as f64,
                    kern * 1e6 / (1u64 << 30) as f64
                ));
            }
        }
        out
    }

    fn render_comparison(&self) -> String {
        let base = self.targets.iter().find(|t| t.target == "presenced");
        let mem = |t: &TargetResult| t.density.as_ref().and_then(|d| d.rss_per_conn);
        let kern = |t: &TargetResult| t.density.as_ref().and_then(|d| d.kernel_per_conn_server);
        let rate = |t: &TargetResult| t.connect.as_ref().map(|c| c.rate_per_s);
        let per_cpu = |t: &TargetResult| t.connect.as_ref().and_then(|c| c.per_server_cpu_s);
        let p99 = |t: &TargetResult| {
            t.heartbeat
                .as_ref()
                .filter(|h| h.rtt_ms.count > 0)
                .map(|h| h.rtt_ms.p99)
        };
        let mut t = table(&[
            "target",
            "agents",
            "RSS/conn",
            "presenced ÷",
            "kernel/conn (server side)",
            "handshakes/s",
            "presenced ÷",
            "per server CPU-s",
            "presenced ÷",
            "heartbeat p99 ms",
            "presenced ÷",
        ]);
        for r in &self.targets {
            let b = base.unwrap_or(r);
            t.add_row(vec![
                format!("{} {}", r.target, short_version(&r.version)),
                r.agents.to_string(),
                opt_bytes(mem(r)),
                ratio(mem(b), mem(r)),
                opt_bytes(kern(r)),
                rate(r).map_or("n/a".into(), |x| format!("{x:.0}")),
                ratio(rate(b), rate(r)),
                per_cpu(r).map_or("n/a".into(), |x| format!("{x:.0}")),
                ratio(per_cpu(b), per_cpu(r)),
                p99(r).map_or("n/a".into(), |x| format!("{x:.2}")),
                ratio(p99(b), p99(r)),
            ]);
        }
        format!("\ncomparison (ratio = presenced value ÷ this row's value)\n{t}\n")
    }
}

fn hb_table(title: &str, rows: &[(&str, &HeartbeatResult)]) -> String {
    let mut t = table(&[
        "target",
        "agents",
        "heartbeats",
        "failed",
        "disconnects",
        "hb/s",
        "RTT p50 ms",
        "p90",
        "p99",
        "max",
        "hb gap p99 ms",
        "max",
    ]);
    for (target, h) in rows {
        let mut row = vec![
            (*target).to_owned(),
            h.online.to_string(),
            h.ok.to_string(),
            h.failed.to_string(),
            h.disconnects.to_string(),
            format!("{:.0}", h.rate_per_s),
        ];
        row.extend(pct_cells(&h.rtt_ms));
        match &h.gap_ms {
            Some(g) if g.count > 0 => {
                row.push(format!("{:.0}", g.p99));
                row.push(format!("{:.0}", g.max));
            }
            _ => {
                row.push("-".into());
                row.push("-".into());
            }
        }
        t.add_row(row);
    }
    format!("\n{title}\n{t}\n")
}

fn short_version(v: &str) -> String {
    v.split_whitespace()
        .find(|w| {
            w.trim_start_matches('v')
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .unwrap_or("")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_readable() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(2048.0), "2.0 KiB");
        assert_eq!(bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25");
        assert_eq!(ratio(Some(1.0), None), "n/a");
        assert_eq!(short_version("mosquitto version 2.0.11"), "2.0.11");
        assert_eq!(short_version("nats-server: v2.9.10"), "v2.9.10");
    }
}
