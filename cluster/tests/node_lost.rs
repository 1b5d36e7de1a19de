//! Issue 11, criterion 4 (node lost), the restart case, and the sweep gate.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use presence_cluster::fixture::NatsServer;
use presence_cluster::{ClusterHooks, SweepVerdict};

const IDLE: Duration = Duration::from_secs(20);

/// kill -9 of node A with 300 agents; 240 reconnect to B: exactly 60
/// `node_lost` offlines after `node_lost_after` (3 s here), by one sweeper
/// (B and C both watch), none for the 240.
#[test]
fn kill_node_with_300_agents_240_reconnect_elsewhere() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let b = start("node-b", 1, vec![nats.url()]);
    let c = start("node-c", 1, vec![nats.url()]);
    let insp = Inspector::new(vec![nats.url()]);
    let ids: Vec<Vec<u8>> = (0..300).map(agent).collect();
    for id in &ids {
        a.online(id, session("node-a", 1), presence_cluster::now_ms());
    }
    a.set_local_counts(300, 300);
    idle(&[&a], IDLE);
    wait_for("B sees A with 300 agents", IDLE, || {
        b.nodes()
            .iter()
            .any(|n| n.node_id == "node-a" && n.agents == 300 && n.alive)
    });
    let before = insp.events_from(1).len();
    assert_eq!(before, 300);

    let killed_at = Instant::now();
    a.kill();
    for id in &ids[..240] {
        b.online(id, session("node-b", 1), presence_cluster::now_ms());
    }
    idle(&[&b], IDLE);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        insp.events_from(1).len(),
        300,
        "nothing before node_lost_after"
    );

    wait_for("the sweep of node-a", Duration::from_secs(30), || {
        b.stats().node_lost_swept_total + c.stats().node_lost_swept_total >= 60
    });
    assert!(killed_at.elapsed() >= Duration::from_secs(3));
    idle(&[&b, &c], IDLE);
    std::thread::sleep(Duration::from_millis(500));
    let events = insp.events_from(1);
    let after: Vec<_> = events[300..].iter().map(|e| &e.1).collect();
    assert_eq!(after.len(), 60, "{after:?}");
    for (e, id) in after.iter().zip(&ids[240..]) {
        assert_eq!(e.state, "offline");
        assert_eq!(e.reason, "node_lost");
        assert_eq!(e.node, "node-a");
        let _ = id;
    }
    let mut lost: Vec<String> = after.iter().map(|e| e.agent.clone()).collect();
    lost.sort();
    let mut want: Vec<String> = ids[240..]
        .iter()
        .map(|i| String::from_utf8(i.clone()).unwrap())
        .collect();
    want.sort();
    assert_eq!(lost, want);
    let values = insp.get_many(&ids);
    for v in &values[..240] {
        let v = v.as_ref().unwrap();
        assert_eq!((v.state.as_str(), v.node.as_str()), ("online", "node-b"));
    }
    for v in &values[240..] {
        let v = v.as_ref().unwrap();
        assert_eq!(
            (v.state.as_str(), v.reason.as_str()),
            ("offline", "node_lost")
        );
    }
    let (sb, sc) = (b.stats(), c.stats());
    assert_eq!(
        sb.sweeps_total + sc.sweeps_total,
        1,
        "one sweeper: {sb:?} {sc:?}"
    );
    assert_eq!(sb.node_lost_swept_total + sc.node_lost_swept_total, 60);
    wait_for("node-a gone from the node list", IDLE, || {
        b.nodes().iter().all(|n| n.node_id != "node-a")
    });
}

/// A node restarting with a new epoch inside `node_lost_after`: its agents
/// come back with new sessions (silent moves); no events at all.
#[test]
fn restart_with_new_epoch_in_time_is_silent() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let b = start("node-b", 1, vec![nats.url()]);
    let insp = Inspector::new(vec![nats.url()]);
    let ids: Vec<Vec<u8>> = (0..50).map(agent).collect();
    for id in &ids {
        a.online(id, session("node-a", 1), presence_cluster::now_ms());
    }
    idle(&[&a, &b], IDLE);
    a.kill();
    std::thread::sleep(Duration::from_secs(1));
    let a2 = start("node-a", 2, vec![nats.url()]);
    for id in &ids {
        a2.online(id, session("node-a", 2), presence_cluster::now_ms());
    }
    idle(&[&a2], IDLE);
    // Well past node_lost_after (3 s) from the kill.
    std::thread::sleep(Duration::from_secs(5));
    idle(&[&a2, &b], IDLE);
    assert_eq!(insp.events().len(), 50, "only the first onlines");
    for v in insp.get_many(&ids) {
        let v = v.unwrap();
        assert_eq!(v.state, "online");
        assert!(v.session.ends_with(&format!(
            "-node-a-2-{}",
            v.session.rsplit('-').next().unwrap()
        )));
    }
    assert_eq!(b.stats().sweeps_total, 0);
    let a_view = b
        .nodes()
        .into_iter()
        .find(|n| n.node_id == "node-a")
        .unwrap();
    assert_eq!(a_view.epoch, 2);
    assert!(a_view.alive);
}

struct Gate {
    allow: AtomicBool,
    asked: AtomicUsize,
}

impl ClusterHooks for Gate {
    fn node_lost(&self, node: &str, agents: &[Vec<u8>]) -> SweepVerdict {
        assert_eq!(node, "node-a");
        assert_eq!(agents.len(), 20);
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self.allow.load(Ordering::SeqCst) {
            SweepVerdict::Allow
        } else {
            SweepVerdict::Defer
        }
    }
}

/// The sweep goes through the daemon's gate (its mass-offline guard):
/// deferred sweeps write nothing and are retried.
#[test]
fn sweep_waits_for_the_gate() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let gate = Arc::new(Gate {
        allow: AtomicBool::new(false),
        asked: AtomicUsize::new(0),
    });
    let b = start_cfg(cfg("node-b", vec![nats.url()]), 1, Some(gate.clone()));
    let insp = Inspector::new(vec![nats.url()]);
    let ids: Vec<Vec<u8>> = (0..20).map(agent).collect();
    for id in &ids {
        a.online(id, session("node-a", 1), presence_cluster::now_ms());
    }
    idle(&[&a, &b], IDLE);
    a.kill();
    wait_for("the gate asked twice", Duration::from_secs(20), || {
        gate.asked.load(Ordering::SeqCst) >= 2
    });
    assert_eq!(insp.events().len(), 20, "deferred: nothing written");
    assert!(b.stats().sweeps_deferred_total >= 2);
    gate.allow.store(true, Ordering::SeqCst);
    wait_for("the sweep", Duration::from_secs(20), || {
        b.stats().node_lost_swept_total == 20
    });
    idle(&[&b], IDLE);
    let events = insp.events();
    assert_eq!(events.len(), 40);
    assert!(events[20..].iter().all(|e| e.reason == "node_lost"));
}
