//! The monitoring bundle in `contrib/`: the Grafana dashboard against its
//! JSON Schema and layout rules, the Prometheus alert rules' annotations and
//! runbook anchors, every `presenced_*` name they use against the metrics a
//! real daemon exports, the certificate expiry gauge across reloads, and a
//! real Prometheus server scraping a real daemon, evaluating the rules and
//! every dashboard query.
//!
//! `promtool check rules` / `promtool test rules` on the rules file run in
//! `.ci/run`. Prometheus (`apt-get install prometheus`) is required under CI
//! (CI=true or PRESENCED_REQUIRE_PROMTOOL=1); elsewhere its test is skipped
//! when the binary is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use presence_cluster::fixture::NatsServer;
use presenced_tests::{ClusterOptions, Daemon, Options};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// Metrics the dashboard and the rules use that the daemon exports only in
/// cluster mode (`[cluster]`, docs/cluster.md): the live-daemon tests below
/// run their daemon with a cluster section and a real nats-server.
const CLUSTER_METRICS: &[&str] = &[
    "presenced_cluster_backlog",
    "presenced_cluster_writes_total",
    "presenced_cluster_conflicts_total",
    "presenced_cluster_suppressed_offlines_total",
    "presenced_cluster_last_success_timestamp_seconds",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn read_json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn dashboard() -> Value {
    read_json("contrib/grafana/presenced.json")
}

fn rules_text() -> String {
    read("contrib/prometheus/presenced.rules.yml")
}

/// Every `presenced_*` metric name in `text`: a word starting with
/// `presenced_`, not part of a recording rule name (`level:presenced_x:op`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("presenced_") {
        let start = from + pos;
        let mut end = start + "presenced_".len();
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        let free_before = start == 0 || !(word(b[start - 1]) || b[start - 1] == b':');
        let free_after = end == b.len() || b[end] != b':';
        if free_before && free_after {
            out.insert(text[start..end].to_owned());
        }
        from = end;
    }
    out
}

/// Every (panel title, target) of the dashboard, rows' nested panels included.
fn targets(dash: &Value) -> Vec<(String, Value)> {
    fn walk(panels: &Value, out: &mut Vec<(String, Value)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((p["title"].as_str().unwrap_or("").to_owned(), t.clone()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

// --- dashboard: schema and layout ----------------------------------------------

fn schema_errors(instance: &Value) -> Vec<String> {
    let schema = read_json("contrib/grafana/dashboard.schema.json");
    let validator = jsonschema::validator_for(&schema).expect("the schema itself is valid");
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn dashboard_matches_its_schema() {
    let errors = schema_errors(&dashboard());
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn schema_rejects_a_dashboard_without_what_we_rely_on() {
    let good = dashboard();
    let first_query = good["panels"]
        .as_array()
        .unwrap()
        .iter()
        .position(|p| p["type"] != "row")
        .unwrap();
    type Breakage = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Breakage)> = vec![
        (
            "no uid",
            Box::new(|d| drop(d.as_object_mut().unwrap().remove("uid"))),
        ),
        (
            "old schemaVersion",
            Box::new(|d| d["schemaVersion"] = 16.into()),
        ),
        ("a numeric id", Box::new(|d| d["id"] = 7.into())),
        (
            "no datasource variable",
            Box::new(|d| {
                d["templating"]["list"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|v| v["type"] != "datasource")
            }),
        ),
        (
            "a fixed datasource",
            Box::new(move |d| {
                d["panels"][first_query]["targets"][0]["datasource"]["uid"] = "abc123".into()
            }),
        ),
        (
            "a target without expr",
            Box::new(move |d| {
                let t = d["panels"][first_query]["targets"][0]
                    .as_object_mut()
                    .unwrap();
                t.remove("expr");
            }),
        ),
        (
            "a query ignoring $instance",
            Box::new(move |d| {
                d["panels"][first_query]["targets"][0]["expr"] = "presenced_agents_online".into()
            }),
        ),
        (
            "a panel without targets",
            Box::new(move |d| {
                d["panels"][first_query]["targets"] = Value::Array(vec![]);
            }),
        ),
    ];
    for (what, break_it) in cases {
        let mut bad = good.clone();
        break_it(&mut bad);
        assert!(!schema_errors(&bad).is_empty(), "schema accepts {what}");
    }
}

#[test]
fn dashboard_layout_is_consistent() {
    let dash = dashboard();
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, i64, i64, i64, i64)> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap().to_owned();
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().unwrap(),
            g["y"].as_i64().unwrap(),
            g["w"].as_i64().unwrap(),
            g["h"].as_i64().unwrap(),
        );
        assert!(x + w <= 24, "{title} is wider than the grid");
        for (other, ox, oy, ow, oh) in &boxes {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), x, y, w, h));
        let refs: Vec<&str> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        let unique: BTreeSet<&&str> = refs.iter().collect();
        assert_eq!(unique.len(), refs.len(), "{title}: duplicate refId");
    }
    // The panels the dashboard promises (docs/operations.md#dashboards-and-alerts).
    let exprs: String = targets(&dash)
        .iter()
        .map(|(_, t)| t["expr"].as_str().unwrap().to_owned() + "\n")
        .collect();
    for needed in [
        "presenced_agents_online",
        "presenced_handshakes_resumed_total",
        "presenced_admission_rejected_total",
        "presenced_heartbeat_latency_seconds",
        "presenced_guard_active",
        "presenced_guard_held",
        "presenced_reload_last_success",
        "presenced_tls_cert_not_after_seconds",
        "presenced_connections",
        "presenced_presence_events_total",
        "presenced_resident_memory_bytes",
        "presenced_heap_bytes",
    ]
    .iter()
    .chain(CLUSTER_METRICS)
    {
        assert!(exprs.contains(needed), "no panel queries {needed}");
    }
}

// --- rules: annotations and runbooks -------------------------------------------

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_a_summary_a_description_and_a_runbook_that_exists() {
    let text = rules_text();
    let ops = read("docs/operations.md");
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let mut alerts = BTreeMap::new();
    // A rule ends where the next list item of the file starts.
    for block in text.split("\n      - ").skip(1) {
        let Some(name) = block.strip_prefix("alert: ") else {
            continue;
        };
        let name = name.lines().next().unwrap().trim().to_owned();
        for key in [
            "summary:",
            "description:",
            "runbook_url:",
            "severity:",
            "expr:",
        ] {
            assert!(block.contains(key), "{name}: no {key}");
        }
        let url = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url: "))
            .unwrap()
            .trim_matches('"');
        let target = url
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{name}: runbook {url} is not in docs/operations.md"));
        assert!(
            anchors.contains(target),
            "{name}: docs/operations.md has no heading for #{target}"
        );
        alerts.insert(name, target.to_owned());
    }
    for name in [
        "PresencedDown",
        "PresencedGuardActive",
        "PresencedReloadFailed",
        "PresencedCertificateExpiringSoon",
        "PresencedAdmissionRejecting",
        "PresencedClusterBacklogGrowing",
    ] {
        assert!(alerts.contains_key(name), "no alert {name}: {alerts:?}");
    }
}

// --- against a real daemon ------------------------------------------------------

/// Sample names (and family names) in a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            out.insert(rest.split(' ').next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_owned());
        }
    }
    out
}

fn metrics_text(d: &Daemon) -> String {
    let o = d.presencectl(&["metrics"]);
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_use_only_metrics_the_daemon_exports() {
    let nats = NatsServer::start().expect("nats-server");
    let d = Daemon::start_with(Options {
        cluster: Some(ClusterOptions::new("monitored", &nats.url())),
        ..Options::default()
    });
    // An agent online (a presence event) with heartbeats, so every family
    // that appears only once it has a sample is there.
    let (mut c, _) = d.agent("watched").await;
    c.heartbeat(1).await.unwrap();
    c.heartbeat(2).await.unwrap();
    d.wait_stats(5 * SECOND, |s| s["heartbeats_total"] == 2);
    // The cluster families appear with the first acknowledged NATS write.
    d.wait_stats(20 * SECOND, |s| s["cluster"]["last_success_ms"].is_u64());
    let exported = exported_names(&metrics_text(&d));

    let mut used = metric_names(&dashboard().to_string());
    used.extend(metric_names(&rules_text()));
    assert!(used.len() > 30, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used in contrib/ but not exported by the daemon: {missing:?}"
    );
    for name in CLUSTER_METRICS {
        assert!(used.contains(*name), "{name} is listed but not used");
    }
}

/// `openssl req -x509`: a fresh self-signed certificate for `localhost`
/// valid for `days`, with its key, written over the daemon's files.
fn install_certificate(d: &Daemon, days: u32) {
    let tls = d.dir.path().join("tls");
    let staged = d.dir.path().join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost", "-days"])
        .arg(days.to_string())
        .arg("-keyout")
        .arg(staged.join("key.pem"))
        .arg("-out")
        .arg(staged.join("cert.pem"))
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(o.status.success(), "{o:?}");
    std::fs::rename(staged.join("cert.pem"), tls.join("cert.pem")).unwrap();
    std::fs::rename(staged.join("key.pem"), tls.join("key.pem")).unwrap();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn cert_not_after(d: &Daemon) -> (u64, f64) {
    let ms = d.stats()["tls_cert_not_after_ms"]
        .as_u64()
        .expect("stats has tls_cert_not_after_ms");
    let text = metrics_text(d);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == "presenced_tls_cert_not_after_seconds")
        .unwrap_or_else(|| panic!("no presenced_tls_cert_not_after_seconds:\n{text}"));
    match s.value {
        prometheus_parse::Value::Gauge(v) => (ms, v),
        ref other => panic!("not a gauge: {other:?}"),
    }
}

#[test]
fn certificate_expiry_is_exported_and_follows_reloads() {
    const DAY_MS: u64 = 86_400_000;
    let d = Daemon::start();
    // The dev-init certificate is long-lived.
    let (ms, secs) = cert_not_after(&d);
    assert!(ms > now_ms() + 365 * DAY_MS, "{ms}");
    assert_eq!(secs, (ms / 1000) as f64);

    // Renewed with a certificate valid for 10 days: reported after the reload.
    install_certificate(&d, 10);
    let (before, _) = cert_not_after(&d);
    assert_eq!(before, ms, "not re-read before the reload");
    let o = d.presencectl(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    let (ms, secs) = cert_not_after(&d);
    let expected = now_ms() + 10 * DAY_MS;
    assert!(ms.abs_diff(expected) < 3_600_000, "{ms} vs {expected}");
    assert_eq!(secs, (ms / 1000) as f64);

    // A reload that fails keeps the certificate in service, and its date.
    std::fs::write(d.dir.path().join("tls/cert.pem"), "not a certificate\n").unwrap();
    let o = d.presencectl(&["reload"]);
    assert!(!o.status.success(), "{o:?}");
    assert_eq!(cert_not_after(&d), (ms, secs));
}

// --- a real Prometheus ------------------------------------------------------------

fn prometheus_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| v != "false" && !v.is_empty())
        || std::env::var_os("PRESENCED_REQUIRE_PROMTOOL").is_some()
}

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Prometheus {
    /// Scrape `target` every second and evaluate the rules file every second.
    /// `None` when the binary is missing and not required.
    fn start(target: SocketAddr) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let rules = repo().join("contrib/prometheus/presenced.rules.yml");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: presenced\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
            rules.display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !prometheus_required() => {
                eprintln!("prometheus not found (apt-get install prometheus): skipping");
                return None;
            }
            Err(e) => panic!("prometheus: {e} (apt-get install prometheus)"),
        };
        let p = Self {
            child,
            addr,
            _dir: dir,
        };
        p.wait(30 * SECOND, "ready", || {
            http_get(p.addr, "/-/ready").is_some_and(|(status, _)| status == 200)
        });
        Some(p)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait(&self, limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "prometheus: not {what} within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `GET /api/v1/<path>`: the `data` of a successful reply, or the error.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/{path}")).ok_or("no reply")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status == 200 && v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("{status}: {body}"))
        }
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("query?query={}", percent_encode(promql)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A bare HTTP/1.0 GET on loopback: (status, body), or None if it failed.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, SECOND).ok()?;
    s.set_read_timeout(Some(10 * SECOND)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_the_rules_and_every_dashboard_query_on_a_live_daemon() {
    let metrics = free_port();
    let nats = NatsServer::start().expect("nats-server");
    let d = Daemon::start_with(Options {
        extra: format!("\n[metrics]\nlisten = \"{metrics}\"\n"),
        cluster: Some(ClusterOptions::new("scraped-node", &nats.url())),
        ..Options::default()
    });
    let Some(prom) = Prometheus::start(metrics) else {
        return;
    };
    // Traffic for the rates, and a certificate 10 days from expiry.
    let (mut c, _) = d.agent("scraped").await;
    install_certificate(&d, 10);
    assert!(d.presencectl(&["reload"]).status.success());
    let instance = metrics.to_string();
    let selector = format!("instance=\"{instance}\",job=\"presenced\"");
    // Heartbeats until there are enough scrapes for a rate over the
    // dashboard's interval.
    let deadline = Instant::now() + 30 * SECOND;
    for seq in 1.. {
        c.heartbeat(seq).await.unwrap();
        let scraped = prom.query(&format!(
            "count_over_time(presenced_heartbeats_total{{{selector}}}[1m]) >= 4"
        ));
        if scraped.is_ok_and(|r| !r.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "not scraped:\n{}", prom.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every rule of the file loaded and evaluates without error.
    prom.wait(20 * SECOND, "evaluating every rule", || {
        let groups = prom.api("rules").unwrap();
        let rules: Vec<&Value> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert!(rules.len() >= 15, "{groups:#}");
        for r in &rules {
            assert_ne!(r["health"], "err", "{r:#}");
        }
        rules.iter().all(|r| r["health"] == "ok")
    });

    // The certificate alert is pending (for: 10m) on this daemon, and only
    // it: the guard is inactive, the reload succeeded.
    prom.wait(20 * SECOND, "alerting on the certificate", || {
        let alerts = prom.api("alerts").unwrap();
        let mine: Vec<(String, String)> = alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["instance"] == instance.as_str())
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_owned(),
                    a["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for (name, _) in &mine {
            assert!(
                ![
                    "PresencedGuardActive",
                    "PresencedReloadFailed",
                    "PresencedDown"
                ]
                .contains(&name.as_str()),
                "{mine:?}"
            );
        }
        mine.contains(&(
            "PresencedCertificateExpiringSoon".to_owned(),
            "pending".to_owned(),
        ))
    });
    let left = prom
        .query(&format!(
            "instance:presenced_tls_cert_expiry:seconds{{{selector}}}"
        ))
        .unwrap();
    let left: f64 = left[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((left - 10.0 * 86400.0).abs() < 3600.0, "{left}");

    // Every dashboard query runs and returns data (cluster ones too: the
    // daemon runs in cluster mode).
    let dash = dashboard();
    let mut queries = vec![("instance variable".to_owned(), "presenced_info".to_owned())];
    for (title, t) in targets(&dash) {
        let expr = t["expr"]
            .as_str()
            .unwrap()
            .replace("$instance", &instance)
            .replace("$__rate_interval", "1m");
        queries.push((title, expr));
    }
    for (title, expr) in queries {
        let result = prom
            .query(&expr)
            .unwrap_or_else(|e| panic!("{title}: {expr}: {e}"));
        // A trailing `> 0` hides zero series: the unfiltered query has data.
        let data = match expr.strip_suffix(" > 0") {
            Some(unfiltered) => prom.query(unfiltered).unwrap(),
            None => result,
        };
        assert!(!data.is_empty(), "{title}: {expr}: no data");
    }
}
