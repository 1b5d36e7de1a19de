//! Never drop an agent: zero-drop binary upgrade with live connection
//! hand-over, its failure paths, and hot certificate reload — all against
//! the spawned daemon with a few hundred live agents heartbeating.

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_client::{ClientTls, Connection};
use presenced_tests::{config_text, dev_setup, Daemon, Options};
use tokio::task::JoinSet;

const SECOND: Duration = Duration::from_secs(1);
const AGENTS: usize = 300;

/// What one heartbeating agent saw.
#[derive(Debug, Default)]
struct Report {
    acked: u64,
    failure: Option<String>,
    /// Longest time between two acknowledged heartbeats.
    max_gap: Duration,
}

/// A fleet of agents heartbeating every `interval` until stopped.
struct Fleet {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<(String, Report)>,
    acked: Arc<AtomicU64>,
}

impl Fleet {
    async fn start(d: &Daemon, prefix: &str, n: usize, interval: Duration) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let (mut c, _) = d.agent(&id).await;
            let stop = stop.clone();
            let acked = acked.clone();
            tasks.spawn(async move {
                let mut r = Report::default();
                let mut seq = 0u32;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    match tokio::time::timeout(5 * SECOND, c.heartbeat(seq)).await {
                        Ok(Ok(_)) => {
                            r.acked += 1;
                            acked.fetch_add(1, Ordering::Relaxed);
                            r.max_gap = r.max_gap.max(last.elapsed());
                            last = Instant::now();
                        }
                        Ok(Err(e)) => {
                            r.failure = Some(e.to_string());
                            break;
                        }
                        Err(_) => {
                            r.failure = Some(format!("heartbeat {seq} not acked in 5 s"));
                            break;
                        }
                    }
                    tokio::time::sleep(interval).await;
                }
                if r.failure.is_none() {
                    let _ = c.bye().await;
                }
                (id, r)
            });
        }
        Fleet { stop, tasks, acked }
    }

    async fn stop(mut self) -> Vec<(String, Report)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            out.push(r.expect("agent task"));
        }
        out
    }
}

fn assert_no_failures(reports: &[(String, Report)]) {
    let failed: Vec<_> = reports
        .iter()
        .filter_map(|(id, r)| r.failure.as_ref().map(|f| format!("{id}: {f}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} agents failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_over_every_live_agent() {
    let mut d = Daemon::start();
    let old_pid = d.pid();
    let fleet = Fleet::start(&d, "held", AGENTS, Duration::from_millis(100)).await;
    d.wait_stats(10 * SECOND, |s| s["sessions"] == AGENTS as u64);
    let seq_before = d.stats()["events_next_seq"].as_u64().unwrap();

    // New connections keep arriving throughout the switch.
    let arriving = Arc::new(AtomicBool::new(true));
    let newcomers = {
        let (addr, tls, key) = (d.addr, d.client_tls(), d.fleet_key.clone());
        let arriving = arriving.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut kept) = (0, Vec::new(), Vec::new());
            let mut i = 0;
            while arriving.load(Ordering::Relaxed) {
                let id = format!("late-{i}");
                i += 1;
                // Like any agent, obey RECONNECT (what a connection caught
                // mid-handshake by the switch is told).
                let r = async {
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        let mut c = Connection::connect(addr, "localhost", tls.clone()).await?;
                        match c.hello(id.as_bytes(), &key.token(id.as_bytes())).await {
                            Err(presence_client::ConnError::Reconnect { max_delay_ms, .. })
                                if attempt < 3 =>
                            {
                                tokio::time::sleep(Duration::from_millis(max_delay_ms.into()))
                                    .await;
                            }
                            other => return other.map(|_| c),
                        }
                    }
                };
                match tokio::time::timeout(5 * SECOND, r).await {
                    Ok(Ok(c)) => {
                        ok += 1;
                        kept.push(c);
                    }
                    Ok(Err(e)) => failed.push(format!("{id}: {e}")),
                    Err(_) => failed.push(format!("{id}: no WELCOME in 5 s")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, kept)
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked_before = fleet.acked.load(Ordering::Relaxed);
    let report = d.upgrade(None);
    assert_eq!(
        report["ok"],
        true,
        "upgrade failed: {report}\n{}",
        d.log_text()
    );
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, old_pid);
    assert_eq!(report["uncarried"], 0, "{report}");
    assert!(
        report["connections"].as_u64().unwrap() >= AGENTS as u64,
        "{report}"
    );

    // Heartbeats keep being acknowledged by the new process.
    tokio::time::sleep(SECOND).await;
    assert!(fleet.acked.load(Ordering::Relaxed) > acked_before + AGENTS as u64);
    arriving.store(false, Ordering::Relaxed);
    let (ok, failed, kept) = newcomers.await.unwrap();
    assert!(
        failed.is_empty(),
        "new connections refused during the switch: {failed:?}"
    );
    assert!(ok >= 10, "only {ok} new connections");

    let s = d.stats();
    assert_eq!(
        s["pid"], new_pid,
        "the control socket now answers from the new process"
    );
    assert_eq!(s["sessions"], (AGENTS + ok) as u64);

    // Zero presence events for the held agents: the only events since are
    // the newcomers' onlines.
    let mut ev = d.events(Some(seq_before));
    let events = ev.collect(Duration::from_millis(500));
    let held: Vec<_> = events
        .iter()
        .filter(|e| e["agent"].as_str().is_some_and(|a| a.starts_with("held-")))
        .collect();
    assert!(held.is_empty(), "events for held agents: {held:?}");
    assert!(events.iter().all(|e| e["state"] == "online"), "{events:?}");

    // The old process is gone.
    let deadline = Instant::now() + 10 * SECOND;
    while d.original_alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !d.original_alive() && process_gone(old_pid),
        "old process still running"
    );

    let reports = fleet.stop().await;
    assert_no_failures(&reports);
    let worst = reports.iter().map(|(_, r)| r.max_gap).max().unwrap();
    eprintln!("upgrade: {report}; longest heartbeat gap {worst:?}");
    drop(kept);
    // BYE after the upgrade: offline events from the new process, seq continuing.
    let mut ev = d.events(Some(seq_before));
    let offline: HashSet<String> = ev
        .collect(2 * SECOND)
        .iter()
        .filter(|e| e["state"] == "offline" && e["reason"] == "bye")
        .filter_map(|e| e["agent"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        offline.len(),
        AGENTS,
        "every held agent's BYE is an event in the new process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_binary_leaves_the_old_daemon_serving_everything() {
    let d = Daemon::start();
    let pid = d.pid();
    let fleet = Fleet::start(&d, "a", 100, Duration::from_millis(100)).await;
    d.wait_stats(10 * SECOND, |s| s["sessions"] == 100);
    let report = d.upgrade(Some(Path::new("/bin/false")));
    assert_eq!(report["ok"], false, "{report}");
    assert!(report["error"].as_str().unwrap().len() > 5, "{report}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(d.stats()["pid"], pid);
    assert_eq!(d.stats()["sessions"], 100);
    // Still accepting.
    let (_c, _) = d.agent("after-failed-upgrade").await;
    assert_no_failures(&fleet.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_failing_mid_handover_leaves_the_old_one_serving() {
    // The new process fails while adopting shard 1 (after shard 0 was
    // already transferred); then one that fails at `ready`.
    for (var, step) in [
        ("PRESENCED_TEST_FAIL_ADOPT_SHARD", "adopt shard 1"),
        ("PRESENCED_TEST_FAIL_READY", "ready"),
    ] {
        let dir = dev_setup(&config_text(&Options::default()));
        let d = Daemon::spawn_in_env(dir, &[(var, "1")], false);
        let pid = d.pid();
        let fleet = Fleet::start(&d, "m", 100, Duration::from_millis(100)).await;
        d.wait_stats(10 * SECOND, |s| s["sessions"] == 100);
        let seq = d.stats()["events_next_seq"].as_u64().unwrap();
        let report = d.upgrade(None);
        assert_eq!(report["ok"], false, "{report}");
        assert!(report["error"].as_str().unwrap().contains(step), "{report}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = d.stats();
        assert_eq!(
            (s["pid"].as_u64(), s["sessions"].as_u64()),
            (Some(pid as u64), Some(100))
        );
        assert_eq!(
            s["events_next_seq"], seq,
            "no events from a failed hand-over"
        );
        let (_c, _) = d.agent("still-accepting").await;
        assert_no_failures(&fleet.stop().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_follows_the_new_main_pid() {
    let dir = dev_setup(&config_text(&Options::default()));
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let d = Daemon::spawn_in_env(dir, &[("NOTIFY_SOCKET", notify.to_str().unwrap())], false);
    let report = d.upgrade(None);
    assert_eq!(report["ok"], true, "{report}");
    let new_pid = report["new_pid"].as_u64().unwrap();
    let deadline = Instant::now() + 5 * SECOND;
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline
        && !(got.contains(&format!("MAINPID={new_pid}")) && got.matches("READY=1").count() >= 2)
    {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
            got.push('\n');
        }
    }
    assert!(
        got.contains(&format!("MAINPID={new_pid}")),
        "no MAINPID for the new process: {got}"
    );
    let after = &got[got.find("MAINPID=").unwrap()..];
    assert!(
        after.contains("READY=1"),
        "the new process did not report READY: {got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_under_load() {
    let d = Daemon::start();
    let fleet = Fleet::start(&d, "r", 100, Duration::from_millis(100)).await;
    d.wait_stats(10 * SECOND, |s| s["sessions"] == 100);
    let old_ca = ClientTls::from_ca_file(&d.ca).unwrap().build().unwrap();

    // A renewed certificate (a different key) replaces the files.
    let renewed = dev_setup(&config_text(&Options::default()));
    for f in ["tls/cert.pem", "tls/key.pem"] {
        std::fs::copy(renewed.path().join(f), d.dir.path().join(f)).unwrap();
    }
    let v = d.control_json("reload");
    assert_eq!(v["ok"], true, "{v}");
    let new_ca = ClientTls::from_ca_file(renewed.path().join("tls/cert.pem"))
        .unwrap()
        .build()
        .unwrap();
    assert!(
        Connection::connect(d.addr, "localhost", new_ca.clone())
            .await
            .is_ok(),
        "new handshakes see the new certificate"
    );
    assert!(
        Connection::connect(d.addr, "localhost", old_ca)
            .await
            .is_err(),
        "the old certificate is out of service"
    );

    // A broken certificate is refused and the renewed one stays in service.
    std::fs::write(d.dir.path().join("tls/cert.pem"), "not a certificate\n").unwrap();
    let v = d.control_json("reload");
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cert.pem"), "{v}");
    assert!(d.stats()["reload"]["last_reload_error"].is_string());
    assert!(Connection::connect(d.addr, "localhost", new_ca)
        .await
        .is_ok());

    // Established agents never noticed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reports = fleet.stop().await;
    assert_no_failures(&reports);
    assert!(reports.iter().all(|(_, r)| r.acked >= 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_the_metrics_endpoint_and_held_guard_events() {
    let metrics = presenced_tests::free_addr();
    let d = Daemon::start_with(Options {
        offline_grace: "300ms",
        extra: format!(
            "[metrics]\nlisten = \"{metrics}\"\n\n[guard]\nmin_offline = 10\nwindow = \"10s\"\nrelease_quiet = \"60s\"\n"
        ),
        ..Options::default()
    });
    let mut conns = Vec::new();
    for i in 0..100 {
        conns.push(d.agent(&format!("gu-{i}")).await.0);
    }
    // A surge the guard holds.
    conns.truncate(60);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held_before = d.control_json("guard")["held"].as_array().unwrap().len();
    assert_eq!(held_before, 40);

    let report = d.upgrade(None);
    assert_eq!(report["ok"], true, "{report}\n{}", d.log_text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The new process serves (its metrics endpoint too) ...
    let s = d.stats();
    assert_eq!(s["pid"], report["new_pid"], "{s}");
    let body = {
        use std::io::{Read, Write};
        let mut c =
            std::net::TcpStream::connect(&metrics).expect("metrics endpoint after the upgrade");
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        c.read_to_string(&mut b).unwrap();
        b
    };
    assert!(body.contains("presenced_connections"), "{body}");
    // ... and still holds what the old one held.
    let g = d.control_json("guard");
    assert_eq!(g["held"].as_array().unwrap().len(), 40, "{g}");
    assert_eq!(g["status"]["state"], "active", "{g}");
}
