//! Prometheus text exposition (format 0.0.4) rendered from the `stats` object
//! (`control::gather_stats`), so `metrics` and `stats` can never disagree.
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
//! Keys missing from the stats object are skipped (a family with no sample is
//! not emitted), so an older or newer daemon still renders valid text.

use std::fmt::Write;

use serde_json::{Map, Value};

/// The `Content-Type` of the text this module renders.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Quantiles of a latency summary, with the `LatencySummary` key for each.
const QUANTILES: [(&str, &str); 4] = [
    ("0.5", "p50_us"),
    ("0.9", "p90_us"),
    ("0.99", "p99_us"),
    ("0.999", "p999_us"),
];

/// Per-shard counters: (stats key, metric name without prefix, help).
const COUNTERS: &[(&str, &str, &str)] = &[
    (
        "accepted_total",
        "accepted_total",
        "TCP connections accepted.",
    ),
    (
        "accept_errors_total",
        "accept_errors_total",
        "accept() failures (e.g. EMFILE: raise LimitNOFILE).",
    ),
    (
        "handshakes_total",
        "handshakes_total",
        "Completed TLS handshakes.",
    ),
    (
        "handshake_failures_total",
        "handshake_failures_total",
        "Failed TLS handshakes (bad TLS, wrong ALPN, closed, timed out, shutdown).",
    ),
    (
        "handshake_timeouts_total",
        "handshake_timeouts_total",
        "TLS handshakes ended by tls.handshake_timeout (also counted in failures).",
    ),
    (
        "hellos_total",
        "hellos_total",
        "HELLOs accepted (sessions started).",
    ),
    (
        "heartbeats_total",
        "heartbeats_total",
        "HEARTBEAT frames received.",
    ),
    (
        "timeouts_total",
        "session_timeouts_total",
        "Sessions closed for silence (offline reason timeout).",
    ),
    ("byes_total", "byes_total", "BYE frames received."),
    (
        "handshakes_resumed_total",
        "handshakes_resumed_total",
        "TLS handshakes that resumed a session with a ticket (full = handshakes_total - this).",
    ),
    (
        "admission_rejected_total",
        "admission_rejected_total",
        "Connections closed before TLS by admission control (handshake caps).",
    ),
];

/// Per-shard gauges: (stats key, metric name without prefix, help).
const GAUGES: &[(&str, &str, &str)] = &[
    (
        "connections",
        "connections",
        "Open agent TCP connections, in any phase.",
    ),
    ("sessions", "sessions", "Open connections past HELLO."),
    (
        "agents_online",
        "agents_online",
        "Agents reported online (connected or in grace).",
    ),
    (
        "agents_in_grace",
        "agents_in_grace",
        "Agents whose connection dropped without BYE, within offline_grace.",
    ),
    (
        "agents_known",
        "agents_known",
        "Presence records held (online, grace and offline).",
    ),
    (
        "accept_queue",
        "accept_queue",
        "Connections waiting in the listen socket's accept queue.",
    ),
    (
        "accept_backlog",
        "accept_backlog",
        "Capacity of the listen socket's accept queue (backlog, capped by somaxconn).",
    ),
    (
        "handshakes_in_flight",
        "handshakes_in_flight",
        "TLS handshakes in progress.",
    ),
    (
        "presumed_online",
        "presumed_online",
        "Agents presumed online after a restart that have not reconnected yet.",
    ),
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

/// A JSON number as a sample value (`None` for anything else, e.g. null).
fn num(v: &Value) -> Option<String> {
    if let Some(u) = v.as_u64() {
        Some(u.to_string())
    } else if let Some(i) = v.as_i64() {
        Some(i.to_string())
    } else {
        v.as_f64().filter(|f| f.is_finite()).map(fmt_f64)
    }
}

fn fmt_f64(f: f64) -> String {
    // Rust's Display never uses an exponent and round-trips; Go parses it.
    format!("{f}")
}

fn micros_to_seconds(v: &Value) -> Option<String> {
    v.as_u64().map(|us| fmt_f64(us as f64 / 1e6))
}

fn shard_label(snap: &Value, index: usize) -> String {
    snap["shard"]
        .as_u64()
        .map_or_else(|| index.to_string(), |s| s.to_string())
}

/// Split "online:hello" into ("online", "hello"); a key without a colon is a bare reason.
fn state_reason(key: &str) -> (String, String) {
    match key.split_once(':') {
        Some((state, reason)) => (state.to_owned(), reason.to_owned()),
        None => (String::new(), key.to_owned()),
    }
}

/// Handshake failures of one stats object (totals or one shard) by reason:
/// the `handshake_failures_by_reason` map when the daemon reports one, else
/// `timeout` and `other` from the two counters every daemon has.
fn handshake_failures_by_reason(obj: &Value) -> Vec<(String, String)> {
    if let Some(map) = obj["handshake_failures_by_reason"].as_object() {
        return map
            .iter()
            .filter_map(|(k, v)| num(v).map(|n| (k.clone(), n)))
            .collect();
    }
    let (Some(all), Some(timeouts)) = (
        obj["handshake_failures_total"].as_u64(),
        obj["handshake_timeouts_total"].as_u64(),
    ) else {
        return Vec::new();
    };
    vec![
        ("timeout".to_owned(), timeouts.to_string()),
        ("other".to_owned(), all.saturating_sub(timeouts).to_string()),
    ]
}

fn map_entries(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .map(Map::iter)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| num(v).map(|n| (k.clone(), n)))
        .collect()
}

/// Sum of a per-shard map key over every shard (for daemons that report a
/// breakdown per shard only).
fn summed_map(per_shard: &[Value], key: &str) -> Option<Value> {
    let mut acc = Map::new();
    let mut any = false;
    for snap in per_shard {
        if let Some(m) = snap[key].as_object() {
            any = true;
            for (k, v) in m {
                let cur = acc.get(k).and_then(Value::as_u64).unwrap_or(0);
                acc.insert(k.clone(), Value::from(cur + v.as_u64().unwrap_or(0)));
            }
        }
    }
    any.then_some(Value::Object(acc))
}

/// Render the `stats` JSON as Prometheus text (format 0.0.4).
pub fn render(stats: &Value) -> String {
    let per_shard: Vec<Value> = stats["per_shard"].as_array().cloned().unwrap_or_default();
    let mut families: Vec<Family> = Vec::new();

    // --- process-wide ------------------------------------------------------
    let mut info = Family::new(
        "info",
        "gauge",
        "Daemon version and bound address (value 1).",
    );
    let mut labels = Vec::new();
    if let Some(v) = stats["version"].as_str() {
        labels.push(("version", v.to_owned()));
    }
    if let Some(l) = stats["listen"].as_str() {
        labels.push(("listen", l.to_owned()));
    }
    if stats.is_object() {
        info.push(labels, "1");
    }
    families.push(info);

    for (key, name, help) in [
        ("shards", "shards", "Number of shards (executor threads)."),
        (
            "uptime_s",
            "uptime_seconds",
            "Seconds since the daemon started.",
        ),
        (
            "rss_bytes",
            "resident_memory_bytes",
            "Resident set size of the daemon process.",
        ),
        (
            "heap_bytes",
            "heap_bytes",
            "Live heap bytes allocated through jemalloc.",
        ),
        (
            "events_next_seq",
            "events_next_seq",
            "The seq the next presence event will get.",
        ),
        (
            "events_oldest_seq",
            "events_oldest_seq",
            "The oldest presence event seq still held for `events from`.",
        ),
    ] {
        let mut f = Family::new(name, "gauge", help);
        if let Some(v) = num(&stats[key]) {
            f.push(vec![], v);
        }
        families.push(f);
    }

    // --- the mass-offline guard (event shard) ---------------------------------
    {
        let g = &stats["guard"];
        let active = match g["state"].as_str() {
            Some("active") => Some("1"),
            Some(_) => Some("0"),
            None => None,
        };
        let mut f = Family::new(
            "guard_active",
            "gauge",
            "1 while the mass-offline guard holds offline events as suspect.",
        );
        if let Some(v) = active {
            f.push(vec![], v);
        }
        families.push(f);
        for (key, name, kind, help) in [
            (
                "held",
                "guard_held",
                "gauge",
                "Offline events held as suspect now.",
            ),
            (
                "activations_total",
                "guard_activations_total",
                "counter",
                "Times the guard activated.",
            ),
            (
                "held_total",
                "guard_held_events_total",
                "counter",
                "Offline events ever held.",
            ),
            (
                "released_total",
                "guard_released_total",
                "counter",
                "Held offline events published after the surge (or by an operator).",
            ),
            (
                "suppressed_total",
                "guard_suppressed_total",
                "counter",
                "Held offline events dropped because the agent came back.",
            ),
        ] {
            let mut f = Family::new(name, kind, help);
            if let Some(v) = num(&g[key]) {
                f.push(vec![], v);
            }
            families.push(f);
        }
    }

    // --- gauges and counters: total + per shard ------------------------------
    for (key, name, help) in GAUGES {
        let mut total = Family::new(name, "gauge", help);
        let mut shard = Family::new(&format!("shard_{name}"), "gauge", help);
        match num(&stats[key]) {
            Some(v) => total.push(vec![], v),
            None => {
                // Some figures (accept queue) are per shard only: sum them.
                let vals: Vec<u64> = per_shard.iter().filter_map(|s| s[key].as_u64()).collect();
                if !vals.is_empty() {
                    total.push(vec![], vals.iter().sum::<u64>().to_string());
                }
            }
        }
        for (i, snap) in per_shard.iter().enumerate() {
            if let Some(v) = num(&snap[key]) {
                shard.push(vec![("shard", shard_label(snap, i))], v);
            }
        }
        families.push(total);
        families.push(shard);
    }
    for (key, name, help) in COUNTERS {
        let mut total = Family::new(name, "counter", help);
        let mut shard = Family::new(&format!("shard_{name}"), "counter", help);
        if let Some(v) = num(&stats[key]) {
            total.push(vec![], v);
        }
        for (i, snap) in per_shard.iter().enumerate() {
            if let Some(v) = num(&snap[key]) {
                shard.push(vec![("shard", shard_label(snap, i))], v);
            }
        }
        families.push(total);
        families.push(shard);
    }

    // --- breakdowns ---------------------------------------------------------
    {
        let help = "Failed TLS handshakes by reason (`other` = not a timeout, when the daemon does not break it down further).";
        let mut total = Family::new("handshake_failures_by_reason_total", "counter", help);
        let mut shard = Family::new("shard_handshake_failures_by_reason_total", "counter", help);
        for (reason, v) in handshake_failures_by_reason(stats) {
            total.push(vec![("reason", reason)], v);
        }
        for (i, snap) in per_shard.iter().enumerate() {
            for (reason, v) in handshake_failures_by_reason(snap) {
                shard.push(vec![("shard", shard_label(snap, i)), ("reason", reason)], v);
            }
        }
        families.push(total);
        families.push(shard);
    }
    {
        let help = "ERROR frames sent to agents, by protocol error code name.";
        let mut total = Family::new("protocol_errors_sent_total", "counter", help);
        let mut shard = Family::new("shard_protocol_errors_sent_total", "counter", help);
        for (code, v) in map_entries(&stats["errors_sent"]) {
            total.push(vec![("code", code)], v);
        }
        for (i, snap) in per_shard.iter().enumerate() {
            for (code, v) in map_entries(&snap["errors_sent"]) {
                shard.push(vec![("shard", shard_label(snap, i)), ("code", code)], v);
            }
        }
        families.push(total);
        families.push(shard);
    }
    {
        let help =
            "Presence events published, by new state and reason (hello; bye, timeout, disconnect).";
        let mut total = Family::new("presence_events_total", "counter", help);
        let mut shard = Family::new("shard_presence_events_total", "counter", help);
        let totals = match stats.get("events_by_reason") {
            Some(v) if v.is_object() => Some(v.clone()),
            _ => summed_map(&per_shard, "events_by_reason"),
        };
        if let Some(map) = totals {
            for (key, v) in map_entries(&map) {
                let (state, reason) = state_reason(&key);
                total.push(vec![("state", state), ("reason", reason)], v);
            }
        }
        for (i, snap) in per_shard.iter().enumerate() {
            for (key, v) in map_entries(&snap["events_by_reason"]) {
                let (state, reason) = state_reason(&key);
                shard.push(
                    vec![
                        ("shard", shard_label(snap, i)),
                        ("state", state),
                        ("reason", reason),
                    ],
                    v,
                );
            }
        }
        families.push(total);
        families.push(shard);
    }

    // --- reload -------------------------------------------------------------
    let reload = &stats["reload"];
    for (key, name, kind, help) in [
        (
            "reloads_total",
            "reloads_total",
            "counter",
            "Reloads of certificate, key and fleet key attempted.",
        ),
        (
            "reload_failures_total",
            "reload_failures_total",
            "counter",
            "Reloads that failed (the previous material stayed in service).",
        ),
    ] {
        let mut f = Family::new(name, kind, help);
        if let Some(v) = num(&reload[key]) {
            f.push(vec![], v);
        }
        families.push(f);
    }
    let mut last_ok = Family::new(
        "reload_last_success",
        "gauge",
        "1 if the last reload succeeded or none happened, 0 if it failed.",
    );
    let mut last_ts = Family::new(
        "reload_last_timestamp_seconds",
        "gauge",
        "Unix time of the last reload attempt.",
    );
    if reload.is_object() {
        let failed = reload["last_reload_error"].is_string();
        last_ok.push(vec![], if failed { "0" } else { "1" });
        if let Some(ms) = reload["last_reload_ms"].as_u64() {
            last_ts.push(vec![], fmt_f64(ms as f64 / 1e3));
        }
    }
    families.push(last_ok);
    families.push(last_ts);

    // --- latency summaries (per shard) -------------------------------------
    for (key, name, help) in [
        (
            "handshake_latency",
            "handshake_latency_seconds",
            "TCP accept to TLS handshake complete, per shard (hdrhistogram quantiles).",
        ),
        (
            "heartbeat_latency",
            "heartbeat_latency_seconds",
            "HEARTBEAT decoded to HEARTBEAT_ACK written, per shard (hdrhistogram quantiles).",
        ),
    ] {
        let mut f = Family::new(name, "summary", help);
        let mut max = Family::new(
            &format!("{}_max_seconds", name.trim_end_matches("_seconds")),
            "gauge",
            "Largest latency recorded since start, per shard.",
        );
        for (i, snap) in per_shard.iter().enumerate() {
            let l = &snap[key];
            if !l.is_object() {
                continue;
            }
            let shard = shard_label(snap, i);
            for (q, k) in QUANTILES {
                if let Some(v) = micros_to_seconds(&l[k]) {
                    f.push(
                        vec![("shard", shard.clone()), ("quantile", q.to_owned())],
                        v,
                    );
                }
            }
            if let Some(v) = micros_to_seconds(&l["sum_us"]) {
                f.push_suffixed("_sum", vec![("shard", shard.clone())], v);
            }
            if let Some(v) = num(&l["count"]) {
                f.push_suffixed("_count", vec![("shard", shard.clone())], v);
            }
            if let Some(v) = micros_to_seconds(&l["max_us"]) {
                max.push(vec![("shard", shard)], v);
            }
        }
        families.push(f);
        families.push(max);
    }

    let mut out = String::with_capacity(8192 + per_shard.len() * 4096);
    for f in &families {
        f.write(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::{HashMap, HashSet};

    fn latency(p50: u64) -> Value {
        json!({"count": 10, "p50_us": p50, "p90_us": p50 * 2, "p99_us": p50 * 3,
               "p999_us": p50 * 4, "max_us": p50 * 5, "sum_us": p50 * 10})
    }

    fn shard(i: u64) -> Value {
        json!({
            "shard": i, "connections": 3 + i, "sessions": 2, "agents_known": 4,
            "agents_online": 2, "agents_in_grace": 1, "accepted_total": 10,
            "accept_errors_total": i, "handshakes_total": 9, "handshake_failures_total": 3,
            "handshake_timeouts_total": 1, "hellos_total": 8, "heartbeats_total": 100,
            "timeouts_total": 1, "byes_total": 2, "accept_queue": i, "accept_backlog": 4096,
            "errors_sent": {"malformed_frame": 1, "authentication_failed": 0, "superseded": i},
            "events_by_reason": {"online:hello": 5, "offline:bye": 2},
            "handshake_latency": latency(1500), "heartbeat_latency": latency(20),
        })
    }

    fn sample() -> Value {
        json!({
            "pid": 42, "version": "0.1.0", "listen": "127.0.0.1:7443", "shards": 2,
            "uptime_s": 12, "connections": 7, "sessions": 4, "agents_online": 4,
            "agents_in_grace": 2, "agents_known": 8, "accepted_total": 20,
            "accept_errors_total": 1, "handshakes_total": 18, "handshake_failures_total": 6,
            "handshake_timeouts_total": 2, "hellos_total": 16, "heartbeats_total": 200,
            "timeouts_total": 2, "byes_total": 4,
            "errors_sent": {"malformed_frame": 2, "authentication_failed": 0, "superseded": 1},
            "events_next_seq": 15, "events_oldest_seq": 1,
            "reload": {"reloads_total": 2, "reload_failures_total": 1,
                       "last_reload_ms": 1_795_507_720_584u64,
                       "last_reload_error": "certificate file /x: \"bad\"\nPEM"},
            "rss_bytes": 1_234_567, "heap_bytes": null,
            "per_shard": [shard(0), shard(1)],
        })
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
        // events_by_reason per shard only: the total is their sum.
        assert_eq!(
            s["presenced_presence_events_total{state=\"online\",reason=\"hello\"}"],
            10.0
        );
        assert_eq!(
            s["presenced_shard_presence_events_total{shard=\"0\",state=\"offline\",reason=\"bye\"}"],
            2.0
        );
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
    fn escapes_and_tolerates_missing_keys() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
        let text = render(&json!({"version": "1\"2", "connections": 1, "per_shard": [{}]}));
        let s = parse_strict(&text);
        assert_eq!(s["presenced_connections"], 1.0);
        assert!(text.contains(r#"version="1\"2""#), "{text}");
        // Not an object at all: still valid (empty) text.
        assert_eq!(render(&Value::Null), "");
    }
}
