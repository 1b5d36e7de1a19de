//! No false offline: kill -9 and restart, a mass connection drop, the
//! mass-offline guard, a corrupted state file, session resumption and
//! admission control — against the spawned daemon over real TLS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_client::{Agent, AgentConfig, Backoff, Connection, ShutdownHandle};
use presenced_tests::{free_addr, Daemon, Options};
use serde_json::Value;
use tokio::task::JoinHandle;

const SECOND: Duration = Duration::from_secs(1);

/// Reconnecting agents (the reference agent's state machine).
struct Agents {
    handles: Vec<(String, ShutdownHandle, JoinHandle<()>)>,
}

impl Agents {
    fn start(d: &Daemon, prefix: &str, n: usize) -> Agents {
        let tls = d.client_tls();
        let mut handles = Vec::new();
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let mut cfg =
                AgentConfig::new(d.addr, tls.clone(), &id, &d.fleet_key).expect("agent config");
            cfg.backoff = Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(800),
            };
            let (handle, signal) = presence_client::shutdown_channel();
            let agent = Agent::new(cfg);
            let task = tokio::spawn(async move {
                let _ = agent.run(signal).await;
            });
            handles.push((id, handle, task));
        }
        Agents { handles }
    }

    /// Stop one agent abruptly: no BYE, the process is just gone.
    fn vanish(&mut self, id: &str) {
        if let Some(pos) = self.handles.iter().position(|(i, _, _)| i == id) {
            let (_, _, task) = self.handles.remove(pos);
            task.abort();
        }
    }

    async fn stop(self) {
        for (_, h, _) in &self.handles {
            h.trigger();
        }
        for (_, _, t) in self.handles {
            let _ = tokio::time::timeout(5 * SECOND, t).await;
        }
    }
}

fn offline(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["state"] == "offline")
        .map(|e| {
            (
                e["agent"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_produce_no_false_offline() {
    let mut d = Daemon::start_with(Options {
        listen: free_addr(),
        restart_grace: "4s",
        ..Options::default()
    });
    let agents = Agents::start(&d, "k", 200);
    let mut leaver = Agents::start(&d, "leaver", 1);
    d.wait_stats(20 * SECOND, |s| s["sessions"] == 201);
    // Give the persistence a flush (state.flush_interval = 1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seq_before = d.stats()["events_next_seq"].as_u64().unwrap();

    leaver.vanish("leaver-0");
    d.kill9();
    let down = Instant::now();
    d.respawn();
    let s = d.stats();
    // Presumed online (not back yet) plus already back: nobody is offline.
    assert_eq!(s["agents_online"], 201, "after restart: {s}");
    assert!(
        s["state"]
            .as_array()
            .unwrap()
            .iter()
            .all(|st| st == "restored"),
        "{s}"
    );

    // Everyone but the leaver is back: silently.
    let back = d.wait_stats(20 * SECOND, |s| s["sessions"] == 200);
    eprintln!("all 200 back {:?} after kill -9", down.elapsed());
    assert!(
        back["events_next_seq"].as_u64().unwrap() > seq_before,
        "seq keeps increasing: {back}"
    );

    // When restart grace ends, only the leaver goes offline.
    let mut ev = d.events(Some(0));
    let events = ev.collect(6 * SECOND);
    assert_eq!(
        offline(&events),
        [("leaver-0".to_owned(), "not_reconnected".to_owned())],
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| e["agent"] == "leaver-0"),
        "no online events for presumed agents: {events:?}"
    );
    assert!(events[0]["seq"].as_u64().unwrap() > seq_before);
    agents.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_fleet_dropping_at_once_is_not_offline() {
    let d = Daemon::start();
    let mut conns = Vec::new();
    for i in 0..200 {
        conns.push(d.agent(&format!("h-{i}")).await.0);
    }
    let mut ev = d.events(None);
    // 100 connections die at once (no BYE), then come back.
    conns.truncate(100);
    d.wait_stats(10 * SECOND, |s| s["agents_in_grace"] == 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 100..200 {
        conns.push(d.agent(&format!("h-{i}")).await.0);
    }
    d.wait_stats(10 * SECOND, |s| s["sessions"] == 200);
    let events = ev.collect(SECOND);
    assert!(events.is_empty(), "events during a 50 % drop: {events:?}");
    assert_eq!(d.stats()["agents_online"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_holds_a_surge_and_releases_it() {
    let d = Daemon::start_with(Options {
        offline_grace: "300ms",
        extra: "[guard]\nmin_offline = 10\nwindow = \"5s\"\nrelease_quiet = \"60s\"\n".into(),
        ..Options::default()
    });
    let mut conns = Vec::new();
    for i in 0..100 {
        conns.push(d.agent(&format!("g-{i}")).await.0);
    }
    let mut ev = d.events(None);
    // 40 connections vanish: past grace they would be offline.
    conns.truncate(60);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = d.stats();
    assert_eq!(s["guard"]["state"], "active", "{s}");
    let held = d.control_json("guard");
    assert_eq!(held["held"].as_array().unwrap().len(), 40, "{held}");
    // 10 of them come back during the hold: no event at all for them.
    for i in 60..70 {
        conns.push(d.agent(&format!("g-{i}")).await.0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        d.control_json("guard")["held"].as_array().unwrap().len(),
        30
    );
    let events = ev.collect(Duration::from_millis(300));
    assert!(
        events.is_empty(),
        "nothing is published while held: {events:?}"
    );
    // The operator releases the rest: offline for those still absent only.
    let r = d.control_json("guard release");
    assert_eq!(r["released"], 30, "{r}");
    let events = ev.collect(SECOND);
    let off = offline(&events);
    assert_eq!(off.len(), 30, "{events:?}");
    assert!(
        off.iter()
            .all(|(a, r)| r == "disconnect" && a.as_str() >= "g-70"),
        "{off:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_state_file_means_presence_unknown_not_offline() {
    let mut d = Daemon::start();
    let mut conns = Vec::new();
    for i in 0..50 {
        conns.push(d.agent(&format!("c-{i}")).await.0);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(conns);
    d.kill9();
    // Flip bytes in the middle of every shard's log.
    let state = d.dir.path().join("state");
    let mut corrupted = 0;
    for entry in std::fs::read_dir(&state).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") {
            let mut bytes = std::fs::read(&p).unwrap();
            if bytes.len() > 64 {
                let mid = bytes.len() / 2;
                for b in &mut bytes[mid..mid + 8] {
                    *b ^= 0xA5;
                }
                std::fs::write(&p, bytes).unwrap();
                corrupted += 1;
            }
        }
    }
    assert!(
        corrupted >= 1,
        "no state log to corrupt in {}",
        state.display()
    );
    d.respawn();
    let s = d.stats();
    assert!(
        s["state"]
            .as_array()
            .unwrap()
            .iter()
            .any(|st| st == "unknown"),
        "{s}"
    );
    assert!(
        d.log_text().contains("presence unknown"),
        "the daemon says so"
    );
    let mut ev = d.events(Some(0));
    let events = ev.collect(2 * SECOND);
    assert!(
        offline(&events).is_empty(),
        "unknown is not offline: {events:?}"
    );
    // It serves normally.
    let (mut c, _) = d.agent("after-corruption").await;
    c.heartbeat(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resume_tls_sessions_even_across_a_restart() {
    let mut d = Daemon::start_with(Options {
        listen: free_addr(),
        ..Options::default()
    });
    let tls = d.client_tls(); // one client config: its session cache keeps the tickets
    let token = d.fleet_key.token(b"resumer");
    // The client takes in the session tickets when it reads (the WELCOME).
    let connect = |tls| async move {
        let mut c = Connection::connect(d.addr, "localhost", tls).await.unwrap();
        c.hello(b"resumer", &token).await.unwrap();
        c
    };
    drop(connect(tls.clone()).await);
    drop(connect(tls.clone()).await);
    d.wait_stats(5 * SECOND, |s| s["handshakes_total"] == 2);
    assert_eq!(d.stats()["handshakes_resumed_total"], 1);
    // Ticket keys live in the state directory: a restarted daemon still resumes.
    d.stop();
    d.respawn();
    let mut c3 = Connection::connect(d.addr, "localhost", tls).await.unwrap();
    c3.hello(b"resumer", &token).await.unwrap();
    d.wait_stats(5 * SECOND, |s| s["handshakes_total"] == 1);
    assert_eq!(
        d.stats()["handshakes_resumed_total"],
        1,
        "{}",
        d.stats()["tickets"]
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.dir.path().join("state/tickets.keys"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_control_sheds_a_handshake_storm_but_not_heartbeats() {
    let d = Arc::new(Daemon::start_with(Options {
        extra: "[admission]\nmax_handshakes_per_sec = 20\n".into(),
        ..Options::default()
    }));
    let (mut steady, _) = d.agent("steady").await;
    // 200 connection attempts at once.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (addr, tls) = (d.addr, d.client_tls());
        tasks.push(tokio::spawn(async move {
            Connection::connect(addr, "localhost", tls).await.is_ok()
        }));
    }
    // The connected agent keeps getting quick answers meanwhile.
    let mut worst = Duration::ZERO;
    for seq in 1..=20 {
        let rtt = steady
            .heartbeat(seq)
            .await
            .expect("heartbeat during the storm");
        worst = worst.max(rtt);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    let s = d.stats();
    assert!(s["admission_rejected_total"].as_u64().unwrap() > 0, "{s}");
    assert!((20..200).contains(&ok), "{ok} handshakes completed");
    eprintln!("storm: {ok} admitted, worst heartbeat rtt {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "heartbeat delayed {worst:?}"
    );
}
