//! Issue 11, criteria 1, 2, 3 and 6, against a real nats-server.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use presence_cluster::fixture::NatsServer;
use presence_cluster::{Cluster, ClusterConfig, NodeInfo};

const IDLE: Duration = Duration::from_secs(20);

#[test]
fn start_does_not_need_nats_and_keeps_intents() {
    init_tracing();
    let port = presence_cluster::fixture::free_port().unwrap();
    let h = start("solo", 1, vec![format!("nats://127.0.0.1:{port}")]);
    assert!(h.online(b"a1", session("solo", 1), 1));
    assert!(h.offline(b"a2", session("solo", 1), "bye", 2));
    wait_for("intents in the backlog", Duration::from_secs(5), || {
        h.stats().backlog == 2
    });
    let st = h.stats();
    assert!(!st.connected && !st.ready, "{st:?}");
    let report = h.shutdown(Duration::from_millis(300));
    assert!(!report.flushed);
    assert_eq!(report.left, 2);
    assert!(
        !h.online(b"a3", session("solo", 1), 3),
        "refused after shutdown"
    );
}

#[test]
fn start_rejects_bad_config_naming_the_key() {
    let cfg = ClusterConfig::new("n", vec![]);
    let info = NodeInfo {
        node_id: "n".into(),
        epoch: 1,
        boot_ms: 0,
    };
    let err = Cluster::start(cfg, info.clone()).err().unwrap();
    assert!(err.to_string().starts_with("cluster.nats_urls: "), "{err}");
    let cfg = ClusterConfig::new("other", vec!["nats://127.0.0.1:4222".into()]);
    let err = Cluster::start(cfg, info).err().unwrap();
    assert!(err.to_string().contains("node id mismatch"), "{err}");
}

/// Criterion 1: A -> B within grace, then A's grace expires: online on B,
/// no event for the move; also when A's offline comes after B's write.
#[test]
fn move_within_grace_is_silent() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let b = start("node-b", 1, vec![nats.url()]);
    let insp = Inspector::new(vec![nats.url()]);

    // (1) A's grace expires a little after B's HELLO was sent (not awaited).
    let id1 = b"host.01@x".to_vec();
    let sa = session("node-a", 1);
    assert!(a.online(&id1, sa.clone(), 1000));
    idle(&[&a], IDLE);
    assert_eq!(insp.events().len(), 1, "the first online is an event");
    let sb = session("node-b", 1);
    assert!(b.online(&id1, sb.clone(), 2000));
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.offline(&id1, sa, "disconnect", 3000));
    idle(&[&a, &b], IDLE);

    // (2) A's offline arrives after B's write is visible in the KV.
    let id2 = b"host.02@x".to_vec();
    let sa2 = session("node-a", 1);
    a.online(&id2, sa2.clone(), 1000);
    idle(&[&a], IDLE);
    let sb2 = session("node-b", 1);
    b.online(&id2, sb2.clone(), 2000);
    idle(&[&b], IDLE);
    wait_for("B's write visible", IDLE, || {
        insp.get(&id2).is_some_and(|v| v.node == "node-b")
    });
    a.offline(&id2, sa2, "disconnect", 3000);
    idle(&[&a, &b], IDLE);

    for (id, sb) in [(&id1, &sb), (&id2, &sb2)] {
        let v = insp.get(id).unwrap();
        assert_eq!(v.state, "online");
        assert_eq!(v.node, "node-b");
        assert_eq!(v.session, sb.to_string());
        assert_eq!(v.since_ms, 1000, "a move keeps since_ms");
    }
    let events = insp.events();
    assert_eq!(events.len(), 2, "only the two first onlines: {events:?}");
    assert!(events
        .iter()
        .all(|e| e.state == "online" && e.node == "node-a"));
    assert_eq!(events[0].agent, "host.01@x");
    assert_eq!(a.stats().suppressed_offlines_total, 2);
    assert_eq!(b.stats().events_total, 0);
    a.shutdown(Duration::from_secs(2));
    b.shutdown(Duration::from_secs(2));
}

/// Criterion 2: an agent that leaves for good: exactly one offline in the
/// stream and in the KV (repeated or late offlines change nothing).
#[test]
fn leaving_for_good_is_one_offline() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let b = start("node-b", 1, vec![nats.url()]);
    let insp = Inspector::new(vec![nats.url()]);
    let id = b"leaver".to_vec();
    let s = session("node-a", 1);
    a.online(&id, s.clone(), 10);
    idle(&[&a], IDLE);
    a.offline(&id, s.clone(), "bye", 20);
    idle(&[&a], IDLE);
    // A duplicate from A and a stale one from B (B never held the session).
    a.offline(&id, s.clone(), "bye", 21);
    b.offline(&id, s.clone(), "timeout", 22);
    idle(&[&a, &b], IDLE);
    let v = insp.get(&id).unwrap();
    assert_eq!(
        (v.state.as_str(), v.reason.as_str(), v.since_ms),
        ("offline", "bye", 20)
    );
    assert_eq!(v.session, s.to_string());
    let events = insp.events_from(1);
    assert_eq!(events.len(), 2, "{events:?}");
    let (seq1, on, msg_id1) = &events[0];
    let (_, off, msg_id2) = &events[1];
    assert_eq!((on.state.as_str(), on.reason.as_str()), ("online", "hello"));
    assert_eq!(
        (off.state.as_str(), off.reason.as_str()),
        ("offline", "bye")
    );
    assert_eq!(*seq1, 1);
    assert!(off.seq > on.seq);
    assert_eq!(off.ts_ms, 20);
    assert_eq!(off.node, "node-a");
    assert_eq!(off.session, s.to_string());
    assert_eq!(msg_id1, &format!("leaver:{}", on.seq));
    assert_eq!(msg_id2, &format!("leaver:{}", off.seq));
    assert_eq!(a.stats().suppressed_offlines_total, 1);
    assert_eq!(b.stats().suppressed_offlines_total, 1);
}

/// Criterion 3: 200 agents bounce between A and B 20 times. Each hop is a
/// HELLO on the new node, and the old node's grace expiry after the new
/// write. Final owner = the node of the last HELLO; every agent's stored
/// session only increases; no events besides the first onlines.
#[test]
fn bounce_200_agents_20_times() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let b = start("node-b", 1, vec![nats.url()]);
    let insp = Inspector::new(vec![nats.url()]);
    let watch = KvWatch::start(nats.url());
    let ids: Vec<Vec<u8>> = (0..200).map(agent).collect();
    let mut prev: Vec<Option<presence_cluster::SessionId>> = vec![None; ids.len()];
    let mut last_node = "";
    for round in 0..20 {
        let (new, old, name) = if round % 2 == 0 {
            (&a, &b, "node-a")
        } else {
            (&b, &a, "node-b")
        };
        let sessions: Vec<_> = ids.iter().map(|_| session(name, 1)).collect();
        for (id, s) in ids.iter().zip(&sessions) {
            assert!(new.online(id, s.clone(), presence_cluster::now_ms()));
        }
        idle(&[new], IDLE);
        for (id, p) in ids.iter().zip(&prev) {
            if let Some(p) = p {
                assert!(old.offline(id, p.clone(), "disconnect", presence_cluster::now_ms()));
            }
        }
        prev = sessions.into_iter().map(Some).collect();
        last_node = name;
    }
    idle(&[&a, &b], IDLE);
    let values = insp.get_many(&ids);
    for (v, s) in values.iter().zip(&prev) {
        let v = v.as_ref().unwrap();
        assert_eq!(v.state, "online");
        assert_eq!(v.node, last_node);
        assert_eq!(&v.session, &s.as_ref().unwrap().to_string());
    }
    let events = insp.events();
    assert_eq!(events.len(), 200, "only the first onlines");
    assert!(events.iter().all(|e| e.state == "online"));
    let writes = watch.stop();
    let mut per_key: HashMap<String, Vec<presence_cluster::SessionId>> = HashMap::new();
    for (k, v) in writes {
        per_key
            .entry(k)
            .or_default()
            .push(v.session.parse().unwrap());
        assert_eq!(v.state, "online", "no offline was ever written");
    }
    assert_eq!(per_key.len(), 200);
    for (k, s) in per_key {
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "{k}: sessions not increasing: {s:?}"
        );
    }
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.events_total + sb.events_total, 200);
    // Old-session offlines were either dropped at the KV (suppressed) or
    // replaced in the intent map by the next HELLO (coalesced); none wrote.
    assert!(sa.suppressed_offlines_total + sb.suppressed_offlines_total > 0);
    assert_eq!(sa.stale_onlines_total + sb.stale_onlines_total, 0);
}

/// Criterion 6: a consumer that read part of the stream, went away, and
/// comes back from its next stream seq gets every transition, in order.
#[test]
fn consumer_resumes_from_a_seq() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let a = start("node-a", 1, vec![nats.url()]);
    let insp = Inspector::new(vec![nats.url()]);
    let ids: Vec<Vec<u8>> = (0..50).map(agent).collect();
    let mut expected: HashMap<String, Vec<&'static str>> = HashMap::new();
    let mut live: Vec<Option<presence_cluster::SessionId>> = vec![None; ids.len()];
    let mut step = |round: usize, expected: &mut HashMap<String, Vec<&'static str>>| {
        for (i, id) in ids.iter().enumerate() {
            if (i + round).is_multiple_of(3) {
                continue;
            }
            let name = String::from_utf8(id.clone()).unwrap();
            match live[i].take() {
                None => {
                    let s = session("node-a", 1);
                    a.online(id, s.clone(), presence_cluster::now_ms());
                    live[i] = Some(s);
                    expected.entry(name).or_default().push("online");
                }
                Some(s) => {
                    a.offline(id, s, "bye", presence_cluster::now_ms());
                    expected.entry(name).or_default().push("offline");
                }
            }
        }
        idle(&[&a], IDLE);
    };
    step(0, &mut expected);
    step(1, &mut expected);
    let first = insp.events_from(1);
    let resume_at = first.last().unwrap().0 + 1;
    // Away: more transitions happen.
    for round in 2..6 {
        step(round, &mut expected);
    }
    let rest = insp.events_from(resume_at);
    assert_eq!(rest.first().unwrap().0, resume_at);
    let all: Vec<_> = first.into_iter().chain(rest).collect();
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "no gap in stream seqs"
    );
    let events: Vec<_> = all.into_iter().map(|e| e.1).collect();
    assert!(
        events.windows(2).all(|w| w[0].seq < w[1].seq),
        "one node: seq order = stream order"
    );
    check_event_chains(&events);
    let mut got: HashMap<String, Vec<&'static str>> = HashMap::new();
    for e in &events {
        got.entry(e.agent.clone())
            .or_default()
            .push(if e.state == "online" {
                "online"
            } else {
                "offline"
            });
    }
    assert_eq!(got, expected);
}

/// An existing stream with another configuration is a clear error (in
/// `stats.last_error` and the log), and nothing is written.
#[test]
fn mismatching_existing_stream_is_a_clear_error() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "PRESENCE_EVENTS".into(),
            subjects: vec!["presence.events.>".into()],
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let a = start("node-a", 1, vec![nats.url()]);
    a.online(b"x", session("node-a", 1), 1);
    wait_for("the mismatch error", IDLE, || {
        a.stats()
            .last_error
            .is_some_and(|e| e.contains("PRESENCE_EVENTS") && e.contains("max_age"))
    });
    let st = a.stats();
    assert!(
        !st.ready && st.backlog == 1 && st.writes_total == 0,
        "{st:?}"
    );
    let e = st.last_error.unwrap();
    assert!(
        e.contains("existing max_age is 1h, configured 7days"),
        "{e}"
    );
}
