//! Helpers shared by the cluster tests: bridges ("nodes") in this process
//! against real nats-server processes, and an inspector that reads the KV and
//! the event stream directly with async-nats.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use presence_cluster::{
    now_ms, Cluster, ClusterConfig, ClusterHandle, ClusterHooks, EventMessage, NodeInfo,
    PresenceValue, SessionId,
};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "presence_cluster=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Test timings: heartbeat 200 ms, node lost after 3 s.
pub fn cfg(node: &str, urls: Vec<String>) -> ClusterConfig {
    ClusterConfig {
        node_heartbeat: Duration::from_millis(200),
        node_lost_after: Duration::from_secs(3),
        ..ClusterConfig::new(node, urls)
    }
}

pub fn start(node: &str, epoch: u64, urls: Vec<String>) -> ClusterHandle {
    start_cfg(cfg(node, urls), epoch, None)
}

pub fn start_cfg(
    cfg: ClusterConfig,
    epoch: u64,
    hooks: Option<Arc<dyn ClusterHooks>>,
) -> ClusterHandle {
    let info = NodeInfo {
        node_id: cfg.node_id.clone(),
        epoch,
        boot_ms: now_ms(),
    };
    match hooks {
        Some(h) => Cluster::start_with_hooks(cfg, info, h).unwrap(),
        None => Cluster::start(cfg, info).unwrap(),
    }
}

/// Strictly increasing accept times across the test process, so that a
/// later session is newer whatever its node id.
pub fn session(node: &str, epoch: u64) -> SessionId {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut ms = now_ms();
    loop {
        let last = LAST.load(Ordering::SeqCst);
        let next = ms.max(last + 1);
        if LAST
            .compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            ms = next;
            break;
        }
    }
    SessionId::new(ms, node, epoch, COUNTER.fetch_add(1, Ordering::SeqCst))
}

pub fn agent(i: usize) -> Vec<u8> {
    format!("host.{i:04}@site").into_bytes()
}

pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn idle(nodes: &[&ClusterHandle], limit: Duration) {
    for n in nodes {
        assert!(
            n.wait_idle(limit),
            "node {} not idle within {limit:?}: {:?}",
            n.stats().node_id,
            n.stats()
        );
    }
}

/// Reads the JetStream objects directly (as a consumer of them would).
pub struct Inspector {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
}

impl Inspector {
    pub fn new(urls: Vec<String>) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let js = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(urls)
                .await
                .unwrap();
            jetstream::new(client)
        });
        Self { rt, js }
    }

    /// The bucket, retried for up to 10 s (the server may be restarting).
    async fn kv(&self) -> Option<kv::Store> {
        for _ in 0..100 {
            if let Ok(kv) = self.js.get_key_value("PRESENCE").await {
                return Some(kv);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    pub fn get(&self, id: &[u8]) -> Option<PresenceValue> {
        let key = presence_cluster::encode_id(id);
        self.rt.block_on(async {
            let kv = self.kv().await?;
            let v = kv.get(key).await.ok()??;
            serde_json::from_slice(&v).ok()
        })
    }

    pub fn get_many(&self, ids: &[Vec<u8>]) -> Vec<Option<PresenceValue>> {
        self.rt.block_on(async {
            let Some(kv) = self.kv().await else {
                return vec![None; ids.len()];
            };
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let key = presence_cluster::encode_id(id);
                let mut tries = 0;
                let v = loop {
                    match kv.get(key.clone()).await {
                        Ok(v) => break v,
                        Err(e) if tries < 50 => {
                            tries += 1;
                            eprintln!("inspector: get {key}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("inspector: get {key}: {e}"),
                    }
                };
                out.push(v.and_then(|v| serde_json::from_slice(&v).ok()));
            }
            out
        })
    }

    /// Events with stream seq >= `from` (an ordered consumer by start
    /// sequence, read until nothing is pending): (stream seq, message).
    pub fn events_from(&self, from: u64) -> Vec<(u64, EventMessage, String)> {
        self.rt.block_on(async {
            let mut stream = None;
            for _ in 0..100 {
                if let Ok(s) = self.js.get_stream("PRESENCE_EVENTS").await {
                    stream = Some(s);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let Some(stream) = stream else {
                return Vec::new();
            };
            let mut tries = 0;
            let c = loop {
                let made = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: from.max(1),
                        },
                        ..Default::default()
                    })
                    .await;
                match made {
                    Ok(c) => break c,
                    Err(e) if tries < 20 => {
                        tries += 1;
                        eprintln!("inspector: consumer: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => panic!("inspector: consumer: {e}"),
                }
            };
            let mut out = Vec::new();
            if c.cached_info().num_pending == 0 {
                return out;
            }
            let mut msgs = c.messages().await.unwrap();
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), msgs.next()).await
            {
                let m = m.unwrap();
                let info = m.info().unwrap();
                let (seq, pending) = (info.stream_sequence, info.pending);
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                out.push((seq, serde_json::from_slice(&m.payload).unwrap(), id));
                if pending == 0 {
                    break;
                }
            }
            out
        })
    }

    pub fn events(&self) -> Vec<EventMessage> {
        self.events_from(1).into_iter().map(|e| e.1).collect()
    }

    /// Every KV value, keyed by agent id.
    pub fn all(&self) -> HashMap<String, PresenceValue> {
        self.rt.block_on(async {
            let Some(kv) = self.kv().await else {
                return HashMap::new();
            };
            let mut out = HashMap::new();
            let Ok(mut keys) = kv.keys().await else {
                return out;
            };
            let mut names = Vec::new();
            while let Some(Ok(k)) = keys.next().await {
                names.push(k);
            }
            for k in names {
                if let Ok(Some(v)) = kv.get(&k).await {
                    let id = presence_cluster::decode_id(&k).unwrap();
                    out.insert(
                        String::from_utf8(id).unwrap(),
                        serde_json::from_slice(&v).unwrap(),
                    );
                }
            }
            out
        })
    }
}

/// Per agent, the events must alternate online/offline starting with
/// online, and their `seq` (KV revision) must increase; returns the last
/// state per agent.
pub fn check_event_chains(events: &[EventMessage]) -> HashMap<String, String> {
    let mut last: HashMap<String, (String, u64)> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for e in events {
        assert!(
            seen.insert((e.agent.clone(), e.seq)),
            "duplicate event {e:?}"
        );
        match last.get(&e.agent) {
            None => assert_eq!(e.state, "online", "first event of {} is {e:?}", e.agent),
            Some((state, seq)) => {
                assert_ne!(
                    &e.state, state,
                    "two {state} in a row for {}: {e:?}",
                    e.agent
                );
                assert!(e.seq > *seq, "seq went back for {}: {e:?}", e.agent);
            }
        }
        last.insert(e.agent.clone(), (e.state.clone(), e.seq));
    }
    last.into_iter().map(|(k, v)| (k, v.0)).collect()
}

/// Records every PRESENCE write (key, value) as it happens, on its own thread.
pub struct KvWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(String, PresenceValue)>>>,
}

impl KvWatch {
    pub fn start(url: String) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = async_nats::connect(url).await.unwrap();
                let js = jetstream::new(client);
                let kv = loop {
                    if let Ok(kv) = js.get_key_value("PRESENCE").await {
                        break kv;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let mut w = kv.watch_all().await.unwrap();
                let _ = ready_tx.send(());
                let mut out = Vec::new();
                while !st.load(Ordering::SeqCst) {
                    if let Ok(Some(Ok(e))) =
                        tokio::time::timeout(Duration::from_millis(100), w.next()).await
                    {
                        out.push((e.key.clone(), serde_json::from_slice(&e.value).unwrap()));
                    }
                }
                out
            })
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(20));
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops after draining what arrived within 1 s; returns the writes.
    pub fn stop(mut self) -> Vec<(String, PresenceValue)> {
        std::thread::sleep(Duration::from_secs(1));
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}
