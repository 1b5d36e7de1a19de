//! Small runs of every `presence-bench` scenario against a presenced the
//! bench starts itself (and, for the peer comparison, nats-server and
//! mosquitto), so the load generator cannot silently rot. The big runs
//! (18k agents) are documented in bench/README.md and are not run here.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use presenced_tests::bin;
use serde_json::Value;

/// Run `presence-bench ARGS --json` against a bench-started presenced; the
/// parsed report. Bounded: the bench's own limits end every phase, and the
/// test gives up after `limit`.
fn bench(args: &[&str], limit: Duration) -> Value {
    let presenced = bin("presenced");
    let mut child = Command::new(bin("presence-bench"))
        .args(args)
        .arg("--json")
        .arg("--presenced-bin")
        .arg(&presenced)
        .arg("--id-prefix")
        .arg(format!("smoke{}", std::process::id()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn presence-bench");
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "presence-bench {args:?} ran over {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "presence-bench {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--json output is not one JSON object ({e}): {stdout}"))
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing or not a count in {v:#}"))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {v:#}"))
}

fn presenced(report: &Value) -> &Value {
    let t = &report["targets"][0];
    assert_eq!(t["target"], "presenced", "{report:#}");
    t
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn ramp_connects_every_agent() {
    let r = bench(&["ramp", "--agents", "200", "--concurrency", "64"], LIMIT);
    assert_eq!(r["scenario"], "ramp");
    assert_eq!(u(&r, "/workers"), 2, "fans out over worker processes");
    let t = presenced(&r);
    assert_eq!(u(t, "/connect/ok"), 200, "{t:#}");
    assert_eq!(u(t, "/connect/failed"), 0, "{t:#}");
    assert!(f(t, "/connect/rate_per_s") > 0.0, "{t:#}");
    let p50 = f(t, "/connect/full_ms/p50");
    let p99 = f(t, "/connect/full_ms/p99");
    assert!(p50 > 0.0 && p50 <= p99 && p99.is_finite(), "{t:#}");
    assert!(
        f(t, "/connect/tls_ms/p50") <= p50,
        "TLS is part of the full connect: {t:#}"
    );
    // The daemon's own counters agree with the bench.
    assert_eq!(u(t, "/daemon/handshakes_total"), 200, "{t:#}");
    assert_eq!(u(t, "/daemon/hellos_total"), 200, "{t:#}");
    assert_eq!(u(t, "/daemon/sessions_after"), 200, "{t:#}");
}

#[test]
fn steady_heartbeats_without_disconnects() {
    let r = bench(
        &[
            "steady",
            "--agents",
            "200",
            "--duration",
            "3s",
            "--interval",
            "500ms",
        ],
        LIMIT,
    );
    let t = presenced(&r);
    assert_eq!(u(t, "/connect/ok"), 200, "{t:#}");
    assert_eq!(u(t, "/heartbeat/disconnects"), 0, "{t:#}");
    assert_eq!(u(t, "/heartbeat/failed"), 0, "{t:#}");
    assert_eq!(u(t, "/heartbeat/online"), 200, "{t:#}");
    // ~6 heartbeats per agent in 3 s at 500 ms; allow a slow machine.
    let ok = u(t, "/heartbeat/ok");
    assert!(ok >= 600, "only {ok} heartbeats: {t:#}");
    assert!(f(t, "/heartbeat/rtt_ms/p99") > 0.0, "{t:#}");
    assert!(u(t, "/daemon/heartbeats_total") >= ok, "{t:#}");
    assert_eq!(u(t, "/daemon/timeouts_total"), 0, "{t:#}");
}

fn assert_storm_clean(r: &Value, mode: &str) {
    let t = presenced(r);
    assert_eq!(u(t, "/connect/ok"), 200, "{t:#}");
    assert_eq!(t["storm"]["mode"], mode, "{t:#}");
    assert_eq!(u(t, "/storm/agents"), 200, "{t:#}");
    assert_eq!(u(t, "/storm/back"), 200, "everyone back online: {t:#}");
    assert_eq!(u(t, "/storm/not_back"), 0, "{t:#}");
    let (t50, t100) = (u(t, "/storm/t50_ms"), u(t, "/storm/t100_ms"));
    assert!(
        t50 <= u(t, "/storm/t90_ms") && u(t, "/storm/t99_ms") <= t100,
        "{t:#}"
    );
    assert_eq!(u(t, "/storm/offline_events"), 0, "no false offline: {t:#}");
    assert_eq!(u(t, "/storm/agents_online_after"), 200, "{t:#}");
    // The recovery curve: from the stats read before the storm to everyone back.
    let curve = t["storm"]["recovery"].as_array().expect("recovery curve");
    assert!(curve.len() >= 2, "{t:#}");
    assert_eq!(curve[0]["t_s"].as_f64(), Some(0.0), "{t:#}");
    assert_eq!(curve[0]["back"].as_u64(), Some(0), "{t:#}");
    assert_eq!(curve.last().unwrap()["back"].as_u64(), Some(200), "{t:#}");
    assert!(
        curve
            .windows(2)
            .all(|w| w[0]["t_s"].as_f64() <= w[1]["t_s"].as_f64()),
        "{t:#}"
    );
}

#[test]
fn storm_drop_all_comes_back_without_false_offline() {
    let r = bench(
        &["storm", "--agents", "200", "--backoff-initial", "300ms"],
        LIMIT,
    );
    assert_storm_clean(&r, "drop-all");
    // Resumed sessions in grace emit no presence events at all.
    assert_eq!(u(presenced(&r), "/storm/online_events"), 0, "{r:#}");
}

#[test]
fn storm_kill_daemon_restarts_and_everyone_returns() {
    let r = bench(
        &[
            "storm",
            "--agents",
            "200",
            "--kill-daemon",
            "--backoff-initial",
            "300ms",
        ],
        LIMIT,
    );
    assert_storm_clean(&r, "kill-daemon");
    let t = presenced(&r);
    assert!(u(t, "/storm/restart_ms") > 0, "{t:#}");
    // A daemon that starts empty reports each agent `online` once; one that
    // restores its presence state may report none. Never more than once each.
    assert!(u(t, "/storm/online_events") <= 200, "{t:#}");
}

#[test]
fn density_reports_a_fitted_slope() {
    let r = bench(
        &[
            "density",
            "--agents",
            "100,200,300",
            "--settle",
            "500ms",
            "--hb-spread",
            "500ms",
        ],
        LIMIT,
    );
    let t = presenced(&r);
    let pts = t["density"]["points"].as_array().expect("points");
    assert_eq!(pts.len(), 4, "baseline + 3 steps: {t:#}");
    for (p, n) in pts.iter().zip([0u64, 100, 200, 300]) {
        assert_eq!(u(p, "/agents"), n, "{t:#}");
        assert_eq!(u(p, "/server_connections"), n, "{t:#}");
        assert!(u(p, "/rss_bytes") > 0, "{t:#}");
    }
    // At a few hundred agents RSS moves by less than its noise (jemalloc
    // returns freed handshake pages within a second): the slope must be a
    // number here; its value is what the 1k..18k runs are for.
    let rss = f(t, "/density/rss_per_conn");
    assert!(rss.is_finite(), "RSS slope {rss}: {t:#}");
    // jemalloc's count is reported; its slope may be ~0 when connection
    // state lives outside the allocator, but it must be a number.
    let heap = f(t, "/density/heap_per_conn");
    assert!(heap.is_finite(), "heap slope {heap}: {t:#}");
    if let Some(k) = t["density"]["kernel_per_conn_both_ends"].as_f64() {
        assert!(k.is_finite(), "{t:#}");
    }
    // Every agent heartbeated before memory was read.
    assert_eq!(u(t, "/heartbeat/ok"), 300, "{t:#}");
}

fn require_installed(exe: &str, package: &str) {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(exe).is_file());
    assert!(
        found,
        "{exe} is not installed; the peer comparison needs it: apt-get install -y {package} \
         (.ci/run installs nats-server and mosquitto)"
    );
}

#[test]
fn peers_nats_and_mosquitto_side_by_side() {
    require_installed("nats-server", "nats-server");
    require_installed("mosquitto", "mosquitto");
    let r = bench(
        &[
            "density",
            "--agents",
            "50,100",
            "--settle",
            "500ms",
            "--hb-spread",
            "500ms",
            "--peer",
            "nats",
            "--peer",
            "mqtt",
        ],
        Duration::from_secs(180),
    );
    let targets = r["targets"].as_array().expect("targets");
    let names: Vec<&str> = targets
        .iter()
        .filter_map(|t| t["target"].as_str())
        .collect();
    assert_eq!(names, ["presenced", "nats-server", "mosquitto"], "{r:#}");
    for t in targets {
        assert_eq!(u(t, "/connect/ok"), 100, "{t:#}");
        assert_eq!(u(t, "/connect/failed"), 0, "{t:#}");
        assert_eq!(u(t, "/heartbeat/ok"), 100, "one heartbeat each: {t:#}");
        assert!(f(t, "/heartbeat/rtt_ms/p99") > 0.0, "{t:#}");
        assert!(f(t, "/density/rss_per_conn").is_finite(), "{t:#}");
        assert!(f(t, "/connect/rate_per_s") > 0.0, "{t:#}");
    }
}

/// Whether a process is still running (not gone, not a zombie).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|t| {
        t.rfind(')')
            .and_then(|i| t.get(i + 2..i + 3))
            .is_some_and(|s| s != "Z" && s != "X")
    })
}

#[test]
fn upgrade_hands_over_every_agent_without_a_drop() {
    let r = bench(
        &[
            "upgrade",
            "--agents",
            "200",
            "--interval",
            "500ms",
            "--before",
            "1s",
            "--after",
            "2s",
        ],
        LIMIT,
    );
    assert_eq!(r["scenario"], "upgrade");
    let t = presenced(&r);
    let up = &t["upgrade"];
    assert_eq!(up["ok"], true, "{t:#}");
    let (old, new) = (u(up, "/old_pid"), u(up, "/new_pid"));
    assert_ne!(old, new, "{t:#}");
    assert_eq!(
        u(up, "/pid_after"),
        new,
        "stats come from the new process: {t:#}"
    );
    assert_eq!(u(up, "/connections"), 200, "{t:#}");
    assert_eq!(u(up, "/uncarried"), 0, "{t:#}");
    assert_eq!(u(up, "/sessions_after"), 200, "{t:#}");
    assert_eq!(u(up, "/disconnects"), 0, "{t:#}");
    assert_eq!(u(up, "/reconnects"), 0, "{t:#}");
    assert_eq!(u(up, "/offline_events"), 0, "{t:#}");
    assert!(up["events_error"].is_null(), "{t:#}");
    assert!(up["elapsed_ms"].as_u64().is_some(), "{t:#}");
    // Heartbeats went on across the switch: ~8 per agent in 4 s at 500 ms.
    assert_eq!(u(t, "/heartbeat/failed"), 0, "{t:#}");
    assert!(u(t, "/heartbeat/ok") >= 800, "{t:#}");
    let gap = f(t, "/heartbeat/gap_ms/max");
    assert!(gap > 0.0 && gap < 5000.0, "gap {gap} ms: {t:#}");
    assert!(f(t, "/heartbeat/rtt_ms/max") >= f(t, "/heartbeat/rtt_ms/p99"));
    // The bench cleaned up: neither process is left running.
    for pid in [old, new] {
        assert!(!running(pid), "presenced {pid} still running");
    }
}

#[test]
fn storm_partial_blip_with_undisturbed_group_and_resumption() {
    let r = bench(
        &[
            "storm",
            "--agents",
            "200",
            "--drop-share",
            "0.5",
            "--undisturbed",
            "50",
            "--resumption",
            "--backoff-initial",
            "300ms",
        ],
        LIMIT,
    );
    let t = presenced(&r);
    let s = &t["storm"];
    assert_eq!(s["mode"], "partial-drop", "{t:#}");
    assert_eq!(s["resumption"], true, "{t:#}");
    let dropped = u(s, "/dropped");
    assert!((50..=150).contains(&dropped), "about half drop: {t:#}");
    assert_eq!(u(s, "/back"), dropped, "{t:#}");
    assert_eq!(u(s, "/not_back"), 0, "{t:#}");
    assert_eq!(u(s, "/offline_events"), 0, "no false offline: {t:#}");
    assert_eq!(u(s, "/agents_online_after"), 250, "{t:#}");
    // Every reconnect resumed its own session (each agent keeps its ticket).
    assert_eq!(u(s, "/handshakes"), dropped, "{t:#}");
    let share = f(s, "/resumed_share");
    assert!(share > 0.9, "resumed share {share}: {t:#}");
    assert!(u(s, "/bound_ms") > 0, "{t:#}");
    // The undisturbed group heartbeated through the storm, untouched.
    let g = &t["undisturbed"];
    assert_eq!(u(g, "/online"), 50, "{t:#}");
    assert_eq!(u(g, "/disconnects"), 0, "{t:#}");
    assert_eq!(u(g, "/failed"), 0, "{t:#}");
    assert!(u(g, "/ok") > 0, "{t:#}");
    assert!(f(g, "/rtt_ms/p99") > 0.0, "{t:#}");
}

#[test]
fn storm_kill_daemon_reads_the_restarted_daemon_from_its_oldest_event() {
    let r = bench(
        &[
            "storm",
            "--agents",
            "200",
            "--kill-daemon",
            "--undisturbed",
            "20",
            "--backoff-initial",
            "300ms",
        ],
        LIMIT,
    );
    assert_storm_clean_with(&r, "kill-daemon", 200, 220);
    let s = &presenced(&r)["storm"];
    // The restarted daemon restored the presence state: the agents were
    // presumed online, and came back without a presence event.
    assert!(u(s, "/presumed_online_after_restart") > 0, "{s:#}");
    assert_eq!(u(s, "/online_events"), 0, "{s:#}");
    assert!(s["events_error"].is_null(), "{s:#}");
    // The group lost its connections with the daemon, and came back.
    let g = &presenced(&r)["undisturbed"];
    assert_eq!(u(g, "/disconnects"), 20, "{g:#}");
}

fn assert_storm_clean_with(r: &Value, mode: &str, n: u64, online_after: u64) {
    let t = presenced(r);
    assert_eq!(u(t, "/connect/ok"), n, "{t:#}");
    assert_eq!(t["storm"]["mode"], mode, "{t:#}");
    assert_eq!(u(t, "/storm/back"), n, "everyone back online: {t:#}");
    assert_eq!(u(t, "/storm/not_back"), 0, "{t:#}");
    assert_eq!(u(t, "/storm/offline_events"), 0, "no false offline: {t:#}");
    assert_eq!(u(t, "/storm/agents_online_after"), online_after, "{t:#}");
}

#[test]
fn morning_ramp_with_an_undisturbed_group() {
    let r = bench(
        &[
            "ramp",
            "--agents",
            "300",
            "--rate",
            "1000",
            "--connect-retries",
            "5",
            "--undisturbed",
            "50",
        ],
        LIMIT,
    );
    let t = presenced(&r);
    assert_eq!(u(t, "/connect/ok"), 300, "{t:#}");
    assert_eq!(u(t, "/connect/failed"), 0, "{t:#}");
    // The daemon's rejections are reported (0 at this rate).
    let rejected = u(t, "/daemon/admission_rejected_total");
    assert!(rejected <= u(t, "/connect/retried"), "{t:#}");
    let g = &t["undisturbed"];
    assert_eq!(u(g, "/online"), 50, "{t:#}");
    assert_eq!(u(g, "/disconnects"), 0, "{t:#}");
    assert!(u(g, "/ok") > 0, "{t:#}");
    assert_eq!(u(g, "/interval_ms"), 200, "{t:#}");
}
