//! Cluster mode end to end (issue 11): a real nats-server and two real
//! presenced daemons with real agents over TLS; the JetStream objects are
//! read directly with async-nats, as a platform consumer would.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use presence_cluster::fixture::NatsServer;
use presence_cluster::{EventMessage, PresenceValue};
use presenced_tests::{ClusterOptions, Daemon, Options};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

fn node(id: &str, nats: &NatsServer, grace: &'static str) -> Daemon {
    Daemon::start_with(Options {
        offline_grace: grace,
        cluster: Some(ClusterOptions::new(id, &nats.url())),
        ..Options::default()
    })
}

/// Wait until the node's bridge has its streams.
fn wait_ready(d: &Daemon) {
    d.wait_stats(20 * SECOND, |s| s["cluster"]["ready"] == true);
}

async fn js(nats: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(nats.url()).await.expect("connect nats");
    jetstream::new(client)
}

async fn bucket(js: &jetstream::Context) -> kv::Store {
    js.get_key_value("PRESENCE").await.expect("PRESENCE bucket")
}

async fn get(kv: &kv::Store, id: &str) -> Option<PresenceValue> {
    let v = kv
        .get(presence_cluster::encode_id(id.as_bytes()))
        .await
        .expect("kv get")?;
    Some(serde_json::from_slice(&v).expect("presence value"))
}

/// Poll the KV until `pred` holds for `id` (or panic after `limit`).
async fn wait_kv(
    kv: &kv::Store,
    id: &str,
    limit: Duration,
    pred: impl Fn(&PresenceValue) -> bool,
) -> PresenceValue {
    let deadline = Instant::now() + limit;
    loop {
        let v = get(kv, id).await;
        if let Some(v) = v.as_ref().filter(|v| pred(v)) {
            return v.clone();
        }
        assert!(Instant::now() < deadline, "KV of {id} never matched: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message of PRESENCE_EVENTS.
async fn events(js: &jetstream::Context) -> Vec<EventMessage> {
    let stream = js
        .get_stream("PRESENCE_EVENTS")
        .await
        .expect("PRESENCE_EVENTS");
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::new();
    if c.cached_info().num_pending == 0 {
        return out;
    }
    let mut msgs = c.messages().await.expect("messages");
    while let Ok(Some(m)) = tokio::time::timeout(5 * SECOND, msgs.next()).await {
        let m = m.expect("message");
        let pending = m.info().expect("info").pending;
        out.push(serde_json::from_slice(&m.payload).expect("event json"));
        if pending == 0 {
            break;
        }
    }
    out
}

fn of<'a>(evs: &'a [EventMessage], agent: &str) -> Vec<&'a EventMessage> {
    evs.iter().filter(|e| e.agent == agent).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_within_grace_is_silent_and_bye_is_one_offline() {
    let nats = NatsServer::start().expect("nats-server");
    let a = node("node-a", &nats, "1500ms");
    let b = node("node-b", &nats, "1500ms");
    wait_ready(&a);
    wait_ready(&b);
    let js = js(&nats).await;
    let kv = bucket(&js).await;

    // (a) online on A, dropped (no BYE), back on B within A's grace.
    let (c, _) = a.agent("mover.01@x").await;
    let v = wait_kv(&kv, "mover.01@x", 10 * SECOND, |v| v.is_online()).await;
    assert_eq!(v.node, "node-a");
    drop(c);
    a.wait_stats(5 * SECOND, |s| s["agents_in_grace"] == 1);
    let (mut c2, _) = b.agent("mover.01@x").await;
    c2.heartbeat(1).await.expect("heartbeat on B");
    wait_kv(&kv, "mover.01@x", 10 * SECOND, |v| v.node == "node-b").await;
    // A's grace ends: its `disconnect` offline names an older session and
    // is dropped by the cluster.
    a.wait_stats(10 * SECOND, |s| s["agents_in_grace"] == 0);
    a.wait_stats(10 * SECOND, |s| {
        s["cluster"]["suppressed_offlines_total"].as_u64() >= Some(1)
    });
    let v = get(&kv, "mover.01@x").await.expect("kv value");
    assert!(v.is_online(), "still online: {v:?}");
    assert_eq!(v.node, "node-b");
    let evs = events(&js).await;
    let mine = of(&evs, "mover.01@x");
    assert_eq!(mine.len(), 1, "only the first online: {mine:?}");
    assert_eq!(
        (mine[0].state.as_str(), mine[0].node.as_str()),
        ("online", "node-a")
    );

    // (b) leaves for good with BYE: exactly one offline, in KV and stream.
    let (mut c3, _) = a.agent("leaver").await;
    wait_kv(&kv, "leaver", 10 * SECOND, |v| v.is_online()).await;
    c3.bye().await.expect("bye");
    let v = wait_kv(&kv, "leaver", 10 * SECOND, |v| !v.is_online()).await;
    assert_eq!((v.reason.as_str(), v.node.as_str()), ("bye", "node-a"));
    tokio::time::sleep(SECOND).await;
    let evs = events(&js).await;
    let mine: Vec<_> = of(&evs, "leaver")
        .into_iter()
        .map(|e| (e.state.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        mine,
        vec![
            ("online".to_owned(), "hello".to_owned()),
            ("offline".to_owned(), "bye".to_owned())
        ]
    );
    drop(c2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_node_sweeps_exactly_the_agents_that_did_not_come_back() {
    const N: usize = 30;
    const BACK: usize = 20;
    let nats = NatsServer::start().expect("nats-server");
    let mut a = node("node-a", &nats, "60s");
    let b = node("node-b", &nats, "60s");
    wait_ready(&a);
    wait_ready(&b);
    let js = js(&nats).await;
    let kv = bucket(&js).await;
    let ids: Vec<String> = (0..N).map(|i| format!("swept-{i:02}")).collect();
    let mut on_a = Vec::new();
    for id in &ids {
        on_a.push(a.agent(id).await.0);
    }
    for id in &ids {
        wait_kv(&kv, id, 10 * SECOND, |v| {
            v.is_online() && v.node == "node-a"
        })
        .await;
    }
    a.kill9();
    drop(on_a);
    let mut on_b = Vec::new();
    for id in &ids[..BACK] {
        on_b.push(b.agent(id).await.0);
    }
    for id in &ids[..BACK] {
        wait_kv(&kv, id, 10 * SECOND, |v| v.node == "node-b").await;
    }
    // node_lost_after is 3s: the rest are swept by B.
    for id in &ids[BACK..] {
        let v = wait_kv(&kv, id, 20 * SECOND, |v| !v.is_online()).await;
        assert_eq!(
            (v.reason.as_str(), v.node.as_str()),
            ("node_lost", "node-a")
        );
    }
    tokio::time::sleep(SECOND).await;
    for id in &ids[..BACK] {
        let v = get(&kv, id).await.expect("kv");
        assert!(v.is_online() && v.node == "node-b", "{id}: {v:?}");
    }
    let evs = events(&js).await;
    let lost: Vec<_> = evs.iter().filter(|e| e.reason == "node_lost").collect();
    assert_eq!(lost.len(), N - BACK, "{lost:?}");
    assert!(lost.iter().all(|e| ids[BACK..].contains(&e.agent)));
    let onlines = evs.iter().filter(|e| e.state == "online").count();
    assert_eq!(onlines, N, "one online each, none for the moves");
    assert_eq!(
        b.stats()["cluster"]["node_lost_swept_total"],
        (N - BACK) as u64
    );
    drop(on_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presencectl_cluster_and_stats_key() {
    // Standalone: the key is there and null; the command says cluster mode is off.
    let solo = Daemon::start();
    assert!(solo.stats()["cluster"].is_null());
    assert_eq!(
        solo.control_json("cluster"),
        serde_json::json!({"error": "cluster mode is off"})
    );
    let out = solo.presencectl(&["cluster"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster mode is off"));

    let nats = NatsServer::start().expect("nats-server");
    let a = node("node-a", &nats, "60s");
    let b = node("node-b", &nats, "60s");
    wait_ready(&a);
    wait_ready(&b);
    let (_c, _) = a.agent("shown").await;
    // Both nodes see each other, A with its agent.
    let deadline = Instant::now() + 20 * SECOND;
    let v = loop {
        let v = b.control_json("cluster");
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        let a_row = nodes.iter().find(|n| n["node_id"] == "node-a");
        if nodes.len() == 2 && a_row.is_some_and(|n| n["agents"] == 1 && n["alive"] == true) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "cluster never showed both: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["node_id"], "node-b");
    assert_eq!(v["connected"], true);
    assert!(v["stats"]["writes_total"].is_u64());
    let s = a.stats();
    assert_eq!(s["cluster"]["node_id"], "node-a");
    assert!(s["cluster"]["writes_total"].as_u64() >= Some(1), "{s:#}");

    let out = b.presencectl(&["cluster"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node-b (epoch"), "{text}");
    assert!(text.contains("NODE"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("node-a "))
        .unwrap_or_else(|| panic!("no row for node-a: {text}"));
    assert!(row.contains(" yes "), "{row}");
    let out = b.presencectl(&["cluster", "--json"]);
    assert!(out.status.success());
    let j: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["node_id"], "node-b");

    // Metrics in cluster mode.
    let m = a.try_control("metrics").expect("metrics");
    for name in [
        "presenced_cluster_backlog ",
        "presenced_cluster_writes_total ",
        "presenced_cluster_conflicts_total ",
        "presenced_cluster_suppressed_offlines_total ",
        "presenced_cluster_last_success_timestamp_seconds ",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
}
