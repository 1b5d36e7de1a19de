//! Issue 11, criterion 5: NATS stopped while agents come and go (8 s here
//! instead of 30 s, to keep the test short), then restarted; plus the
//! bounded intent map and the reconciliation that follows an overflow.

#![allow(clippy::needless_range_loop)] // agents are addressed by index in the scenario

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use presence_cluster::fixture::NatsServer;
use presence_cluster::{now_ms, ClusterConfig, ClusterHooks, LocalAgent, SessionId};

const IDLE: Duration = Duration::from_secs(20);

/// What the test expects the KV to hold per agent at the end.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    Online(SessionId),
    Offline(SessionId),
    Absent,
}

#[test]
fn nats_outage_while_agents_come_and_go() {
    init_tracing();
    let mut nats = NatsServer::start().unwrap();
    // node_lost_after 6 s: shorter than the 8 s outage (so the observers'
    // own-outage reset is what keeps them from sweeping each other), and long
    // enough for both nodes to reconnect and refresh their entries after it.
    let lost_after = |node| ClusterConfig {
        node_lost_after: Duration::from_secs(6),
        ..cfg(node, vec![nats.url()])
    };
    let a = start_cfg(lost_after("node-a"), 1, None);
    let b = start_cfg(lost_after("node-b"), 1, None);
    let insp = Inspector::new(vec![nats.url()]);
    let ids: Vec<Vec<u8>> = (0..130).map(agent).collect();
    let mut want: HashMap<usize, Want> = HashMap::new();
    let mut live: HashMap<usize, SessionId> = HashMap::new();
    for i in 0..100 {
        let (h, n) = if i < 50 {
            (&a, "node-a")
        } else {
            (&b, "node-b")
        };
        let s = session(n, 1);
        h.online(&ids[i], s.clone(), now_ms());
        live.insert(i, s.clone());
        want.insert(i, Want::Online(s));
    }
    idle(&[&a, &b], IDLE);
    assert_eq!(insp.events().len(), 100);

    nats.stop();
    let outage = Instant::now();
    // Every call is accepted at once while NATS is down.
    let ok = |r: bool| assert!(r, "intent refused during the outage");
    // 0..10 leave for good.
    for i in 0..10 {
        ok(a.offline(&ids[i], live[&i].clone(), "bye", now_ms()));
        want.insert(i, Want::Offline(live[&i].clone()));
    }
    // 10..20 move A -> B, A's grace expires later.
    for i in 10..20 {
        let s = session("node-b", 1);
        ok(b.online(&ids[i], s.clone(), now_ms()));
        want.insert(i, Want::Online(s));
    }
    std::thread::sleep(Duration::from_secs(1));
    for i in 10..20 {
        ok(a.offline(&ids[i], live[&i].clone(), "disconnect", now_ms()));
    }
    // 100..120 new on A.
    for i in 100..120 {
        let s = session("node-a", 1);
        ok(a.online(&ids[i], s.clone(), now_ms()));
        want.insert(i, Want::Online(s));
    }
    // 120..130 come and go on B within the outage (coalesced: never seen).
    for i in 120..130 {
        let s = session("node-b", 1);
        ok(b.online(&ids[i], s.clone(), now_ms()));
        ok(b.offline(&ids[i], s, "bye", now_ms()));
        want.insert(i, Want::Absent);
    }
    // 50..60 time out on B, then come back on A.
    for i in 50..60 {
        ok(b.offline(&ids[i], live[&i].clone(), "timeout", now_ms()));
        let s = session("node-a", 1);
        ok(a.online(&ids[i], s.clone(), now_ms()));
        want.insert(i, Want::Online(s));
    }
    assert!(!a.stats().connected && !b.stats().connected);
    assert!(a.stats().backlog > 0 && b.stats().backlog > 0);
    let left = Duration::from_secs(8).saturating_sub(outage.elapsed());
    std::thread::sleep(left);

    nats.restart().unwrap();
    let back = Instant::now();
    idle(&[&a, &b], Duration::from_secs(10));
    let settled = back.elapsed();
    // Everyone's heartbeats stopped during the outage: that is not a node loss.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a.stats().sweeps_total + b.stats().sweeps_total, 0);
    assert!(settled <= Duration::from_secs(10));

    let values = insp.get_many(&ids);
    for (i, v) in values.iter().enumerate() {
        match (&want[&i], v) {
            (Want::Absent, None) => {}
            (Want::Online(s), Some(v)) if v.state == "online" && v.session == s.to_string() => {}
            (Want::Offline(s), Some(v)) if v.state == "offline" && v.session == s.to_string() => {}
            (w, v) => panic!("agent {i}: want {w:?}, KV has {v:?}"),
        }
    }
    let events = insp.events();
    let last = check_event_chains(&events);
    for (i, id) in ids.iter().enumerate() {
        let name = String::from_utf8(id.clone()).unwrap();
        let got = last.get(&name).map(String::as_str);
        let expect = match &want[&i] {
            Want::Online(_) => Some("online"),
            Want::Offline(_) => Some("offline"),
            Want::Absent => None,
        };
        assert_eq!(got, expect, "agent {i}: last event");
    }
    let moved: usize = events
        .iter()
        .filter(|e| (10..20).any(|i| ids[i] == e.agent.as_bytes()))
        .count();
    assert_eq!(moved, 10, "moves during the outage produced no events");
    let offs = events.iter().filter(|e| e.state == "offline").count();
    assert!(offs >= 10, "the 10 byes are in the stream");
    eprintln!(
        "settled {settled:?} after the restart; {} events",
        events.len()
    );
}

struct Snapshot(Mutex<Vec<LocalAgent>>);

impl ClusterHooks for Snapshot {
    fn local_snapshot(&self) -> Option<Vec<LocalAgent>> {
        Some(self.0.lock().unwrap().clone())
    }
}

/// The intent map is bounded; what it drops is recovered by the
/// reconciliation against the daemon's snapshot when NATS is back.
#[test]
fn full_intent_map_is_reconciled() {
    init_tracing();
    let mut nats = NatsServer::start().unwrap();
    let snap = Arc::new(Snapshot(Mutex::new(Vec::new())));
    let cfg = ClusterConfig {
        backlog_max: 10,
        ..cfg("node-a", vec![nats.url()])
    };
    let a = start_cfg(cfg, 1, Some(snap.clone()));
    let insp = Inspector::new(vec![nats.url()]);
    let x = b"agent-x".to_vec();
    let sx = session("node-a", 1);
    a.online(&x, sx.clone(), now_ms());
    snap.0.lock().unwrap().push(LocalAgent {
        id: x.clone(),
        session: sx.clone(),
    });
    idle(&[&a], IDLE);

    nats.stop();
    let ids: Vec<Vec<u8>> = (0..50).map(agent).collect();
    for id in &ids {
        let s = session("node-a", 1);
        a.online(id, s.clone(), now_ms());
        snap.0.lock().unwrap().push(LocalAgent {
            id: id.clone(),
            session: s,
        });
    }
    // X leaves; its offline finds the map full.
    a.offline(&x, sx.clone(), "bye", now_ms());
    snap.0.lock().unwrap().retain(|l| l.id != x);
    wait_for("the map to fill", IDLE, || {
        let s = a.stats();
        s.backlog_full_total + s.channel_full_total == 41
    });
    assert_eq!(a.stats().backlog, 10);
    nats.restart().unwrap();
    // Reconciliation runs in passes (each one bounded by the map): wait
    // until the KV matches the node, not merely until the map is empty.
    wait_for("the KV to match the node", IDLE, || {
        insp.get(&x).is_some_and(|v| v.state == "offline")
            && insp
                .get_many(&ids)
                .iter()
                .all(|v| v.as_ref().is_some_and(|v| v.state == "online"))
    });
    idle(&[&a], IDLE);
    let vx = insp.get(&x).unwrap();
    assert_eq!(
        (vx.state.as_str(), vx.reason.as_str()),
        ("offline", "reconcile")
    );
    assert!(a.stats().reconciles_total >= 1);
    let events = insp.events();
    check_event_chains(&events);
    assert_eq!(events.len(), 52);
}
