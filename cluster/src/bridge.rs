//! The `cluster-nats` thread: a tokio current-thread runtime with
//! `async-nats`, fed by a bounded channel. See `docs/cluster.md`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Notify};

use crate::key::{decode_id, encode_id};
use crate::model::{
    EventMessage, NodeValue, PresenceValue, OFFLINE, ONLINE, REASON_HELLO, REASON_NODE_LOST,
};
use crate::{
    lock, now_ms, ClusterConfig, ClusterError, ClusterHandle, ClusterHooks, ClusterStats,
    LagSummary, LocalAgent, NodeInfo, NodeView, SessionId, ShutdownReport, SweepVerdict,
    EVENTS_STREAM, EVENTS_SUBJECT_PREFIX, NODES_BUCKET, PRESENCE_BUCKET,
};

pub(crate) const STOP_RUN: u8 = 0;
pub(crate) const STOP_FLUSH: u8 = 1;
pub(crate) const STOP_KILL: u8 = 2;

/// KV operations in flight at once (different agents).
const MAX_INFLIGHT: usize = 64;
/// Pause of the writer after a failed NATS operation.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// Timeout of one JetStream request/ack.
const JS_TIMEOUT: Duration = Duration::from_secs(3);
/// Retry period of stream/bucket setup while it fails.
const SETUP_RETRY: Duration = Duration::from_secs(1);
/// Upper bound of the channel from the shards.
const CHANNEL_MAX: usize = 65_536;
/// Duplicate window of the three streams (a retry after a timeout within it
/// is deduplicated by `Nats-Msg-Id`).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Prefix of sweep claim keys in `PRESENCE_NODES` (node keys never hold `.`).
const CLAIM_PREFIX: &str = "sweep.";
/// Reason of offlines written by a reconciliation for own agents that the
/// daemon no longer has (same epoch).
pub(crate) const REASON_RECONCILE: &str = "reconcile";
/// Reason when the stale own agent belongs to an older epoch of this node.
pub(crate) const REASON_NOT_RECONNECTED: &str = "not_reconnected";

pub(crate) enum Cmd {
    Online {
        id: Vec<u8>,
        session: SessionId,
        ts_ms: u64,
    },
    Offline {
        id: Vec<u8>,
        session: SessionId,
        reason: String,
        ts_ms: u64,
    },
}

pub(crate) struct Shared {
    pub(crate) node_id: String,
    pub(crate) epoch: u64,
    pub(crate) backlog_max: u64,
    pub(crate) stop: AtomicU8,
    pub(crate) stop_deadline: Mutex<Option<Instant>>,
    pub(crate) wake: Notify,
    pub(crate) agents: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) reconcile_wanted: AtomicBool,
    pub(crate) nodes: Mutex<Vec<NodeView>>,
    connected: AtomicBool,
    ready: AtomicBool,
    reconciling: AtomicBool,
    queued: AtomicU64,
    writes: AtomicU64,
    events: AtomicU64,
    conflicts: AtomicU64,
    suppressed_offlines: AtomicU64,
    stale_onlines: AtomicU64,
    node_lost_swept: AtomicU64,
    sweeps: AtomicU64,
    sweeps_deferred: AtomicU64,
    backlog: AtomicU64,
    backlog_full: AtomicU64,
    channel_full: AtomicU64,
    reconciles: AtomicU64,
    errors: AtomicU64,
    last_success_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    server_version: Mutex<Option<String>>,
    lags: Mutex<LagRing>,
}

#[derive(Default)]
struct LagRing {
    count: u64,
    last: u64,
    max: u64,
    recent: VecDeque<u64>,
}

impl Shared {
    pub(crate) fn stats(&self) -> ClusterStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag = {
            let l = lock(&self.lags);
            let mut v: Vec<u64> = l.recent.iter().copied().collect();
            v.sort_unstable();
            let pct = |p: f64| {
                if v.is_empty() {
                    0
                } else {
                    v[((v.len() - 1) as f64 * p).round() as usize]
                }
            };
            LagSummary {
                count: l.count,
                last_ms: l.last,
                p50_ms: pct(0.5),
                p99_ms: pct(0.99),
                max_ms: l.max,
            }
        };
        let last = r(&self.last_success_ms);
        ClusterStats {
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            connected: self.connected.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Relaxed),
            server_version: lock(&self.server_version).clone(),
            writes_total: r(&self.writes),
            events_total: r(&self.events),
            conflicts_total: r(&self.conflicts),
            suppressed_offlines_total: r(&self.suppressed_offlines),
            stale_onlines_total: r(&self.stale_onlines),
            node_lost_swept_total: r(&self.node_lost_swept),
            sweeps_total: r(&self.sweeps),
            sweeps_deferred_total: r(&self.sweeps_deferred),
            backlog: r(&self.backlog),
            backlog_max: self.backlog_max,
            backlog_full_total: r(&self.backlog_full),
            channel_full_total: r(&self.channel_full),
            reconciles_total: r(&self.reconciles),
            errors_total: r(&self.errors),
            last_error: lock(&self.last_error).clone(),
            last_success_ms: (last > 0).then_some(last),
            publish_lag_ms: lag,
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && self.connected.load(Ordering::Relaxed)
            && self.queued.load(Ordering::Relaxed) == 0
            && self.backlog.load(Ordering::Relaxed) == 0
            && !self.reconcile_wanted.load(Ordering::Relaxed)
            && !self.reconciling.load(Ordering::Relaxed)
    }

    fn success(&self) {
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(what);
    }

    fn lag(&self, ts_ms: u64) {
        let lag = now_ms().saturating_sub(ts_ms);
        let mut l = lock(&self.lags);
        l.count += 1;
        l.last = lag;
        l.max = l.max.max(lag);
        if l.recent.len() == 1024 {
            l.recent.pop_front();
        }
        l.recent.push_back(lag);
    }
}

pub(crate) struct HandleInner {
    tx: mpsc::Sender<Cmd>,
    pub(crate) shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    done: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl HandleInner {
    pub(crate) fn send(&self, cmd: Cmd) -> bool {
        if self.shared.stop.load(Ordering::Relaxed) != STOP_RUN {
            return false;
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(cmd) {
            Ok(()) => true,
            Err(_) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                let n = self.shared.channel_full.fetch_add(1, Ordering::Relaxed);
                self.shared.reconcile_wanted.store(true, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n + 1,
                        "cluster: channel to the NATS thread is full; intent dropped, a reconciliation will follow"
                    );
                }
                false
            }
        }
    }

    pub(crate) fn stop(&self, how: u8, timeout: Duration) -> ShutdownReport {
        let thread = lock(&self.thread).take();
        let Some(thread) = thread else {
            return ShutdownReport {
                flushed: self.shared.backlog.load(Ordering::Relaxed) == 0,
                left: self.shared.backlog.load(Ordering::Relaxed),
            };
        };
        *lock(&self.shared.stop_deadline) = Some(Instant::now() + timeout);
        self.shared.stop.store(how, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let finished = lock(&self.done)
            .recv_timeout(timeout + Duration::from_secs(2))
            .is_ok();
        if finished {
            let _ = thread.join();
        } else {
            tracing::error!("cluster: NATS thread did not stop in time; leaving it");
        }
        let left = self.shared.backlog.load(Ordering::Relaxed)
            + self.shared.queued.load(Ordering::Relaxed);
        ShutdownReport {
            flushed: finished && left == 0,
            left,
        }
    }
}

pub(crate) fn spawn(
    cfg: ClusterConfig,
    node: NodeInfo,
    hooks: Arc<dyn ClusterHooks>,
) -> Result<ClusterHandle, ClusterError> {
    let cap = cfg.backlog_max.clamp(16, CHANNEL_MAX);
    let (tx, rx) = mpsc::channel(cap);
    let shared = Arc::new(Shared {
        node_id: node.node_id.clone(),
        epoch: node.epoch,
        backlog_max: cfg.backlog_max as u64,
        stop: AtomicU8::new(STOP_RUN),
        stop_deadline: Mutex::new(None),
        wake: Notify::new(),
        agents: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        reconcile_wanted: AtomicBool::new(false),
        nodes: Mutex::new(Vec::new()),
        connected: AtomicBool::new(false),
        ready: AtomicBool::new(false),
        reconciling: AtomicBool::new(false),
        queued: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        events: AtomicU64::new(0),
        conflicts: AtomicU64::new(0),
        suppressed_offlines: AtomicU64::new(0),
        stale_onlines: AtomicU64::new(0),
        node_lost_swept: AtomicU64::new(0),
        sweeps: AtomicU64::new(0),
        sweeps_deferred: AtomicU64::new(0),
        backlog: AtomicU64::new(0),
        backlog_full: AtomicU64::new(0),
        channel_full: AtomicU64::new(0),
        reconciles: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_success_ms: AtomicU64::new(0),
        last_error: Mutex::new(None),
        server_version: Mutex::new(None),
        lags: Mutex::new(LagRing::default()),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClusterError::Spawn)?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let sh = shared.clone();
    let thread = std::thread::Builder::new()
        .name("cluster-nats".into())
        .spawn(move || {
            let bridge = Bridge::new(Arc::new(cfg), Arc::new(node), sh, hooks);
            rt.block_on(bridge.run(rx));
            drop(rt);
            let _ = done_tx.send(());
        })
        .map_err(ClusterError::Spawn)?;
    Ok(ClusterHandle {
        inner: Arc::new(HandleInner {
            tx,
            shared,
            thread: Mutex::new(Some(thread)),
            done: Mutex::new(done_rx),
        }),
    })
}

// ---------------------------------------------------------------------------
// Intents and the decision rule

#[derive(Debug, Clone)]
pub(crate) enum Intent {
    Online {
        session: SessionId,
        ts_ms: u64,
    },
    Offline {
        session: SessionId,
        reason: String,
        ts_ms: u64,
    },
}

/// The latest stored value of a key.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    value: PresenceValue,
    session: Option<SessionId>,
    revision: u64,
    raw: Bytes,
}

#[derive(Debug, Clone)]
struct EventDraft {
    state: &'static str,
    reason: String,
    ts_ms: u64,
    node: String,
    session: String,
}

/// One KV write, identical on every retry (so the server deduplicates it).
#[derive(Debug, Clone)]
pub(crate) struct KvWrite {
    expected: u64,
    payload: Bytes,
    msg_id: String,
    event: Option<EventDraft>,
    /// Sent at least once without a definite answer.
    retried: bool,
    ts_ms: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct EventPub {
    msg_id: String,
    payload: Bytes,
}

#[derive(Debug, Clone)]
pub(crate) enum Step {
    Kv(KvWrite),
    Event(EventPub),
}

#[derive(Debug)]
pub(crate) enum Decision {
    Write(KvWrite),
    /// Nothing to write: already stored.
    Noop,
    /// An offline whose session is not the stored one.
    SuppressedOffline,
    /// An online older than the stored session.
    StaleOnline,
}

pub(crate) fn decide(enc: &str, intent: &Intent, stored: Option<&Stored>) -> Decision {
    match intent {
        Intent::Online { session, ts_ms } => {
            let (expected, since_ms, event) = match stored {
                None => (0, *ts_ms, true),
                Some(st) => {
                    let newer = match &st.session {
                        Some(s) => session > s,
                        None => true,
                    };
                    if newer {
                        if st.value.is_online() {
                            // A move: silent, keeps since_ms.
                            (st.revision, st.value.since_ms, false)
                        } else {
                            (st.revision, *ts_ms, true)
                        }
                    } else if st.session.as_ref() == Some(session) {
                        if !st.value.is_online() && st.value.reason == REASON_NODE_LOST {
                            // Swept while this node was cut off; the agent is live.
                            (st.revision, *ts_ms, true)
                        } else {
                            return Decision::Noop;
                        }
                    } else {
                        return Decision::StaleOnline;
                    }
                }
            };
            let value = PresenceValue {
                state: ONLINE.into(),
                since_ms,
                node: session.node.clone(),
                session: session.to_string(),
                reason: REASON_HELLO.into(),
            };
            Decision::Write(kv_write(enc, expected, &value, event, *ts_ms))
        }
        Intent::Offline {
            session,
            reason,
            ts_ms,
        } => {
            let Some(st) = stored else {
                return Decision::SuppressedOffline;
            };
            if !st.value.is_online() || st.session.as_ref() != Some(session) {
                return Decision::SuppressedOffline;
            }
            let value = PresenceValue {
                state: OFFLINE.into(),
                since_ms: *ts_ms,
                node: st.value.node.clone(),
                session: st.value.session.clone(),
                reason: reason.clone(),
            };
            Decision::Write(kv_write(enc, st.revision, &value, true, *ts_ms))
        }
    }
}

fn kv_write(enc: &str, expected: u64, value: &PresenceValue, event: bool, ts_ms: u64) -> KvWrite {
    let payload = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
    KvWrite {
        expected,
        msg_id: format!("{enc}:{expected}:{}:{}", value.session, value.state),
        payload,
        event: event.then(|| EventDraft {
            state: if value.is_online() { ONLINE } else { OFFLINE },
            reason: value.reason.clone(),
            ts_ms,
            node: value.node.clone(),
            session: value.session.clone(),
        }),
        retried: false,
        ts_ms,
    }
}

fn event_pub(enc: &str, id: &[u8], seq: u64, d: &EventDraft) -> EventPub {
    let msg = EventMessage {
        seq,
        ts_ms: d.ts_ms,
        agent: String::from_utf8_lossy(id).into_owned(),
        state: d.state.to_string(),
        reason: d.reason.clone(),
        node: d.node.clone(),
        session: d.session.clone(),
    };
    EventPub {
        msg_id: format!("{enc}:{seq}"),
        payload: Bytes::from(serde_json::to_vec(&msg).unwrap_or_default()),
    }
}

// ---------------------------------------------------------------------------
// NATS context

pub(crate) struct Ctx {
    js: jetstream::Context,
    presence_stream: stream::Stream,
    nodes_stream: stream::Stream,
    shared: Arc<Shared>,
    cfg: Arc<ClusterConfig>,
    node: Arc<NodeInfo>,
}

#[derive(Debug)]
pub(crate) enum OpError {
    Conflict,
    Other(String),
}

fn headers(msg_id: &str, expected: Option<u64>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    if let Some(e) = expected {
        h.insert(
            "Nats-Expected-Last-Subject-Sequence",
            e.to_string().as_str(),
        );
    }
    h
}

impl Ctx {
    async fn publish(&self, subject: String, h: HeaderMap, payload: Bytes) -> Result<u64, OpError> {
        let ack = self
            .js
            .publish_with_headers(subject, h, payload)
            .await
            .map_err(|e| OpError::Other(format!("publish: {e}")))?;
        match ack.await {
            Ok(ack) => {
                self.shared.success();
                Ok(ack.sequence)
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(OpError::Conflict),
            Err(e) => Err(OpError::Other(format!("publish ack: {e}"))),
        }
    }

    /// The latest value of a key, read at the stream leader
    /// (`STREAM.MSG.GET`, not a direct get from any replica), so it reflects
    /// every acknowledged write. Deleted/purged keys read as absent.
    async fn leader_get(
        &self,
        st: &stream::Stream,
        subject: String,
    ) -> Result<Option<(Bytes, u64)>, OpError> {
        use jetstream::stream::LastRawMessageErrorKind as K;
        let got = tokio::time::timeout(JS_TIMEOUT, st.get_last_raw_message_by_subject(&subject))
            .await
            .map_err(|_| OpError::Other("kv get: timed out".into()))?;
        match got {
            Ok(m) => {
                let deleted = m
                    .headers
                    .get("KV-Operation")
                    .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
                Ok((!deleted).then_some((m.payload, m.sequence)))
            }
            Err(e) if e.kind() == K::NoMessageFound => Ok(None),
            Err(e) => Err(OpError::Other(format!("kv get: {e}"))),
        }
    }

    async fn read(&self, enc: &str) -> Result<Option<Stored>, OpError> {
        let got = self
            .leader_get(
                &self.presence_stream,
                format!("$KV.{PRESENCE_BUCKET}.{enc}"),
            )
            .await?;
        Ok(got.map(|(raw, rev)| stored_from(raw, rev)))
    }

    async fn node_entry(&self, key: &str) -> Result<Option<(Bytes, u64)>, String> {
        self.leader_get(&self.nodes_stream, format!("$KV.{NODES_BUCKET}.{key}"))
            .await
            .map_err(|e| format!("{NODES_BUCKET} {key}: {e:?}"))
    }
}

fn stored_from(raw: Bytes, revision: u64) -> Stored {
    let value = serde_json::from_slice::<PresenceValue>(&raw).unwrap_or(PresenceValue {
        state: OFFLINE.into(),
        since_ms: 0,
        node: String::new(),
        session: String::new(),
        reason: "unreadable".into(),
    });
    let session = value.session.parse().ok();
    Stored {
        value,
        session,
        revision,
        raw,
    }
}

/// Outcome of driving one agent.
pub(crate) enum OpOutcome {
    /// Finished; how many events this drive published.
    Done(u64),
    /// NATS failed; `step` is the write whose outcome is unknown (retried
    /// identically first).
    Failed { step: Option<Step>, error: String },
}

/// Drives `intent` for one agent to completion: finish `step` (left over
/// from a failed attempt) first, then decide against the stored value and
/// write with CAS, re-reading on conflict; publish the event.
async fn drive(
    ctx: Arc<Ctx>,
    enc: String,
    id: Vec<u8>,
    intent: Intent,
    mut step: Option<Step>,
    step_is_for_intent: bool,
) -> OpOutcome {
    let sh = &ctx.shared;
    let kv_subject = format!("$KV.{PRESENCE_BUCKET}.{enc}");
    let ev_subject = format!("{EVENTS_SUBJECT_PREFIX}{enc}");
    let mut own_step = step_is_for_intent;
    let mut published = 0u64;
    loop {
        match step.take() {
            None => {
                let stored = match ctx.read(&enc).await {
                    Ok(s) => s,
                    Err(e) => {
                        return OpOutcome::Failed {
                            step: None,
                            error: format!("{e:?}"),
                        }
                    }
                };
                match decide(&enc, &intent, stored.as_ref()) {
                    Decision::Write(w) => {
                        step = Some(Step::Kv(w));
                        own_step = true;
                    }
                    Decision::Noop => return OpOutcome::Done(published),
                    Decision::SuppressedOffline => {
                        sh.suppressed_offlines.fetch_add(1, Ordering::Relaxed);
                        return OpOutcome::Done(published);
                    }
                    Decision::StaleOnline => {
                        sh.stale_onlines.fetch_add(1, Ordering::Relaxed);
                        return OpOutcome::Done(published);
                    }
                }
            }
            Some(Step::Kv(mut w)) => {
                let h = headers(&w.msg_id, Some(w.expected));
                match ctx.publish(kv_subject.clone(), h, w.payload.clone()).await {
                    Ok(seq) => {
                        sh.writes.fetch_add(1, Ordering::Relaxed);
                        sh.lag(w.ts_ms);
                        match &w.event {
                            Some(d) => step = Some(Step::Event(event_pub(&enc, &id, seq, d))),
                            None if own_step => return OpOutcome::Done(published),
                            None => {}
                        }
                    }
                    Err(OpError::Conflict) => {
                        sh.conflicts.fetch_add(1, Ordering::Relaxed);
                        if w.retried {
                            // Did an earlier, unanswered send land (after the
                            // duplicate window, a resend conflicts with it)?
                            match ctx.read(&enc).await {
                                Ok(Some(st)) if st.raw == w.payload && st.revision > w.expected => {
                                    sh.writes.fetch_add(1, Ordering::Relaxed);
                                    match &w.event {
                                        Some(d) => {
                                            step = Some(Step::Event(event_pub(
                                                &enc,
                                                &id,
                                                st.revision,
                                                d,
                                            )))
                                        }
                                        None if own_step => return OpOutcome::Done(published),
                                        None => {}
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    return OpOutcome::Failed {
                                        step: None,
                                        error: format!("{e:?}"),
                                    }
                                }
                            }
                        }
                        // Otherwise: re-read and decide again (step = None).
                    }
                    Err(OpError::Other(e)) => {
                        w.retried = true;
                        return OpOutcome::Failed {
                            step: Some(Step::Kv(w)),
                            error: e,
                        };
                    }
                }
            }
            Some(Step::Event(ev)) => {
                let h = headers(&ev.msg_id, None);
                match ctx.publish(ev_subject.clone(), h, ev.payload.clone()).await {
                    Ok(_) => {
                        sh.events.fetch_add(1, Ordering::Relaxed);
                        published += 1;
                        if own_step {
                            return OpOutcome::Done(published);
                        }
                    }
                    Err(e) => {
                        return OpOutcome::Failed {
                            step: Some(Step::Event(ev)),
                            error: format!("event {e:?}"),
                        }
                    }
                }
            }
        }
    }
}

/// Latest value of every key of a bucket (ordered consumer, last per
/// subject), skipping deleted/purged keys. Returns (key, value, revision).
async fn scan(
    js: &jetstream::Context,
    st: &stream::Stream,
    bucket: &str,
) -> Result<Vec<(String, Bytes, u64)>, String> {
    let prefix = format!("$KV.{bucket}.");
    let consumer = st
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: format!("{prefix}>"),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("scan {bucket}: consumer: {e}"))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut msgs = consumer
        .messages()
        .await
        .map_err(|e| format!("scan {bucket}: messages: {e}"))?;
    loop {
        let next = tokio::time::timeout(JS_TIMEOUT, msgs.next())
            .await
            .map_err(|_| format!("scan {bucket}: timed out"))?;
        let Some(msg) = next else {
            return Err(format!("scan {bucket}: consumer ended"));
        };
        let msg = msg.map_err(|e| format!("scan {bucket}: {e}"))?;
        let info = msg.info().map_err(|e| format!("scan {bucket}: {e}"))?;
        let pending = info.pending;
        let seq = info.stream_sequence;
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
        if !deleted {
            if let Some(key) = msg.subject.as_str().strip_prefix(&prefix) {
                out.push((key.to_string(), msg.payload.clone(), seq));
            }
        }
        if pending == 0 {
            return Ok(out);
        }
    }
}

// ---------------------------------------------------------------------------
// Setup: streams and buckets, idempotent; a mismatch is an error.

fn kv_stream_config(bucket: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: Duration::ZERO,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: DUPLICATE_WINDOW,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

fn events_stream_config(cfg: &ClusterConfig) -> stream::Config {
    stream::Config {
        name: EVENTS_STREAM.to_string(),
        subjects: vec![format!("{EVENTS_SUBJECT_PREFIX}>")],
        max_messages_per_subject: -1,
        max_age: cfg.events_max_age,
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: DUPLICATE_WINDOW.min(cfg.events_max_age),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

fn check_same(existing: &stream::Config, wanted: &stream::Config) -> Result<(), ClusterError> {
    let mismatch = |field, e: String, w: String| ClusterError::Mismatch {
        object: wanted.name.clone(),
        field,
        existing: e,
        wanted: w,
    };
    if existing.subjects != wanted.subjects {
        return Err(mismatch(
            "subjects",
            format!("{:?}", existing.subjects),
            format!("{:?}", wanted.subjects),
        ));
    }
    if existing.max_messages_per_subject != wanted.max_messages_per_subject {
        return Err(mismatch(
            "max_msgs_per_subject (history)",
            existing.max_messages_per_subject.to_string(),
            wanted.max_messages_per_subject.to_string(),
        ));
    }
    if existing.num_replicas != wanted.num_replicas {
        return Err(mismatch(
            "replicas",
            existing.num_replicas.to_string(),
            wanted.num_replicas.to_string(),
        ));
    }
    if existing.max_age != wanted.max_age {
        return Err(mismatch(
            "max_age",
            humantime::format_duration(existing.max_age).to_string(),
            humantime::format_duration(wanted.max_age).to_string(),
        ));
    }
    if existing.storage != wanted.storage {
        return Err(mismatch(
            "storage",
            format!("{:?}", existing.storage),
            format!("{:?}", wanted.storage),
        ));
    }
    Ok(())
}

async fn ensure_stream(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Stream, ClusterError> {
    let nats = |context, e: &dyn std::fmt::Display| ClusterError::Nats {
        context,
        message: format!("{}: {e}", wanted.name),
    };
    for _ in 0..3 {
        match js.get_stream(&wanted.name).await {
            Ok(st) => {
                check_same(&st.cached_info().config, &wanted)?;
                return Ok(st);
            }
            Err(get_err) => match js.create_stream(wanted.clone()).await {
                Ok(_) => {
                    tracing::info!(stream = %wanted.name, "cluster: created stream");
                }
                // Another node created it meanwhile: compare on the next turn.
                Err(e) if e.to_string().contains("already in use") => {}
                Err(e) => {
                    return Err(nats(
                        "create stream",
                        &format!("{e} (after get: {get_err})"),
                    ))
                }
            },
        }
    }
    Err(ClusterError::Nats {
        context: "create stream",
        message: format!("{}: kept changing while being created", wanted.name),
    })
}

// ---------------------------------------------------------------------------
// The bridge task

struct Slot {
    id: Vec<u8>,
    /// The latest intent not yet being written.
    pending: Option<Intent>,
    /// The intent being written (kept to re-queue it on failure).
    current: Option<Intent>,
    /// A write left over from a failed attempt, resent identically first.
    unsure: Option<Step>,
    /// `unsure` belongs to `pending` (not to an older intent).
    unsure_own: bool,
    busy: bool,
    in_ready: bool,
}

#[derive(Debug, Clone)]
struct LostNode {
    node_id: String,
    enc: String,
    epoch: u64,
    revision: u64,
}

enum Done {
    Op {
        enc: String,
        outcome: OpOutcome,
    },
    Setup {
        client: Option<async_nats::Client>,
        result: Result<Arc<Ctx>, ClusterError>,
    },
    Maint {
        obs: Observations,
        result: Result<(Vec<LostNode>, HashSet<String>), String>,
    },
    Sweep(Result<(), String>),
    Reconcile {
        t0: u64,
        local: Vec<LocalAgent>,
        result: Result<Vec<(String, Bytes, u64)>, String>,
    },
}

struct Bridge {
    cfg: Arc<ClusterConfig>,
    node: Arc<NodeInfo>,
    shared: Arc<Shared>,
    hooks: Arc<dyn ClusterHooks>,
    client: Option<async_nats::Client>,
    ctx: Option<Arc<Ctx>>,
    slots: HashMap<String, Slot>,
    ready: VecDeque<String>,
    inflight: usize,
    tasks: FuturesUnordered<BoxFuture<'static, Done>>,
    setup_running: bool,
    maint_running: bool,
    sweep_running: bool,
    reconcile_running: bool,
    next_setup: Instant,
    next_maint: Instant,
    backoff_until: Option<Instant>,
    had_failure: bool,
    /// When a NATS operation last failed (offline writes wait until NATS
    /// has been healthy for a while: see `dispatch`).
    last_failure: Option<Instant>,
    obs: Observations,
    full_logged: Option<Instant>,
    full_since_log: u64,
    err_logged: Option<Instant>,
}

impl Bridge {
    fn new(
        cfg: Arc<ClusterConfig>,
        node: Arc<NodeInfo>,
        shared: Arc<Shared>,
        hooks: Arc<dyn ClusterHooks>,
    ) -> Self {
        let now = Instant::now();
        Self {
            cfg,
            node,
            shared,
            hooks,
            client: None,
            ctx: None,
            slots: HashMap::new(),
            ready: VecDeque::new(),
            inflight: 0,
            tasks: FuturesUnordered::new(),
            setup_running: false,
            maint_running: false,
            sweep_running: false,
            reconcile_running: false,
            next_setup: now,
            next_maint: now,
            backoff_until: None,
            had_failure: false,
            last_failure: None,
            obs: Observations::default(),
            full_logged: None,
            full_since_log: 0,
            err_logged: None,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rx_open = true;
        tracing::info!(node = %self.node.node_id, epoch = self.node.epoch, urls = ?self.cfg.nats_urls, "cluster: bridge started");
        loop {
            match self.shared.stop.load(Ordering::SeqCst) {
                STOP_KILL => return,
                STOP_FLUSH => {
                    while let Ok(cmd) = rx.try_recv() {
                        self.apply(cmd);
                    }
                    let deadline = *lock(&self.shared.stop_deadline);
                    if self.slots.is_empty() {
                        return;
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        tracing::warn!(
                            left = self.slots.len(),
                            "cluster: shutdown timeout with intents not written"
                        );
                        return;
                    }
                }
                _ => {}
            }
            self.dispatch();
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                cmd = rx.recv(), if rx_open => match cmd {
                    Some(cmd) => {
                        self.apply(cmd);
                        // Take whatever else is queued without a wake-up per command.
                        for _ in 0..1024 {
                            match rx.try_recv() {
                                Ok(cmd) => self.apply(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => {
                        // Every handle is gone: flush for up to 5 s.
                        rx_open = false;
                        *lock(&self.shared.stop_deadline) = Some(Instant::now() + Duration::from_secs(5));
                        let _ = self.shared.stop.compare_exchange(STOP_RUN, STOP_FLUSH, Ordering::SeqCst, Ordering::SeqCst);
                    }
                },
                Some(done) = self.tasks.next(), if !self.tasks.is_empty() => self.finish(done),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let (id, intent) = match cmd {
            Cmd::Online { id, session, ts_ms } => (id, Intent::Online { session, ts_ms }),
            Cmd::Offline {
                id,
                session,
                reason,
                ts_ms,
            } => (
                id,
                Intent::Offline {
                    session,
                    reason,
                    ts_ms,
                },
            ),
        };
        self.put_intent(id, intent, true);
    }

    /// Coalesces `intent` into the map (latest wins, except that an intent
    /// for an older session never replaces one for a newer session).
    fn put_intent(&mut self, id: Vec<u8>, intent: Intent, replace: bool) {
        let enc = encode_id(&id);
        let session_of = |i: &Intent| match i {
            Intent::Online { session, .. } | Intent::Offline { session, .. } => session.clone(),
        };
        if let Some(slot) = self.slots.get_mut(&enc) {
            if !replace {
                return;
            }
            let older = slot
                .pending
                .as_ref()
                .or(slot.current.as_ref())
                .is_some_and(|p| session_of(&intent) < session_of(p));
            if older {
                if matches!(intent, Intent::Offline { .. }) {
                    self.shared
                        .suppressed_offlines
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    self.shared.stale_onlines.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if slot.pending.is_some() {
                // The unsure write (if any) no longer belongs to the pending intent.
                slot.unsure_own = false;
            }
            slot.pending = Some(intent);
            if !slot.busy && !slot.in_ready {
                slot.in_ready = true;
                self.ready.push_back(enc);
            }
            return;
        }
        if self.slots.len() >= self.cfg.backlog_max {
            self.shared.backlog_full.fetch_add(1, Ordering::Relaxed);
            self.shared.reconcile_wanted.store(true, Ordering::Relaxed);
            self.full_since_log += 1;
            let now = Instant::now();
            if self
                .full_logged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                tracing::warn!(
                    dropped = self.full_since_log,
                    backlog_max = self.cfg.backlog_max,
                    "cluster: intent map full (NATS slow or unreachable); intents dropped, a reconciliation will follow"
                );
                self.full_logged = Some(now);
                self.full_since_log = 0;
            }
            return;
        }
        self.slots.insert(
            enc.clone(),
            Slot {
                id,
                pending: Some(intent),
                current: None,
                unsure: None,
                unsure_own: false,
                busy: false,
                in_ready: true,
            },
        );
        self.ready.push_back(enc);
        self.shared
            .backlog
            .store(self.slots.len() as u64, Ordering::Relaxed);
    }

    fn dispatch(&mut self) {
        let Some(ctx) = self.ctx.clone() else {
            return;
        };
        if let Some(t) = self.backoff_until {
            if Instant::now() < t {
                return;
            }
            self.backoff_until = None;
        }
        // After NATS was unreachable, every node's queued intents land at
        // once, in no particular order across nodes. An agent that moved
        // A -> B during the outage has A's offline and B's online queued on
        // two nodes; written in that order they would be a false offline and
        // an online. So offlines wait until NATS has been healthy for
        // `settle` (long enough for every node to reconnect and write its
        // onlines): B's newer session is then stored and A's offline is
        // dropped, as for a move without an outage.
        let settle = self.cfg.node_heartbeat * 3 + Duration::from_secs(2);
        let stopping = lock(&self.shared.stop_deadline).is_some();
        let hold_offlines = !stopping && self.last_failure.is_some_and(|t| t.elapsed() < settle);
        let mut held = Vec::new();
        while self.inflight < MAX_INFLIGHT {
            let Some(enc) = self.ready.pop_front() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(&enc) else {
                continue;
            };
            if hold_offlines && !slot.busy && matches!(slot.pending, Some(Intent::Offline { .. })) {
                held.push(enc);
                continue;
            }
            slot.in_ready = false;
            if slot.busy {
                continue;
            }
            let Some(intent) = slot.pending.take() else {
                continue;
            };
            let step = slot.unsure.take();
            let own = slot.unsure_own;
            slot.current = Some(intent.clone());
            slot.busy = true;
            self.inflight += 1;
            let fut = drive(ctx.clone(), enc.clone(), slot.id.clone(), intent, step, own);
            self.tasks
                .push(fut.map(move |outcome| Done::Op { enc, outcome }).boxed());
        }
        // Still in the ready queue (`in_ready` stays set): tried again on
        // the next tick.
        self.ready.extend(held);
    }

    fn finish(&mut self, done: Done) {
        match done {
            Done::Op { enc, outcome } => {
                self.inflight -= 1;
                let Some(slot) = self.slots.get_mut(&enc) else {
                    return;
                };
                slot.busy = false;
                let mut failure = None;
                let mut recovered = false;
                match outcome {
                    OpOutcome::Done(_) => {
                        slot.current = None;
                        recovered = self.had_failure;
                    }
                    OpOutcome::Failed { step, error } => {
                        if slot.pending.is_none() {
                            slot.pending = slot.current.take();
                            slot.unsure_own = true;
                        } else {
                            slot.current = None;
                            slot.unsure_own = false;
                        }
                        slot.unsure = step;
                        failure = Some(error);
                    }
                }
                if slot.pending.is_some() {
                    if !slot.in_ready {
                        slot.in_ready = true;
                        self.ready.push_back(enc);
                    }
                } else {
                    self.slots.remove(&enc);
                }
                if let Some(error) = failure {
                    self.note_failure(error);
                } else if recovered {
                    self.had_failure = false;
                    tracing::info!("cluster: NATS writes succeed again");
                    self.shared.reconcile_wanted.store(true, Ordering::Relaxed);
                }
                self.shared
                    .backlog
                    .store(self.slots.len() as u64, Ordering::Relaxed);
            }
            Done::Setup { client, result } => {
                self.setup_running = false;
                self.client = client.or(self.client.take());
                match result {
                    Ok(ctx) => {
                        tracing::info!("cluster: JetStream objects ready");
                        self.shared.ready.store(true, Ordering::Relaxed);
                        self.ctx = Some(ctx);
                        self.next_maint = Instant::now();
                        // Whatever happened before we were ready.
                        self.shared.reconcile_wanted.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.next_setup = Instant::now() + SETUP_RETRY;
                        let msg = e.to_string();
                        if matches!(e, ClusterError::Mismatch { .. }) {
                            if lock(&self.shared.last_error).as_deref() != Some(msg.as_str()) {
                                tracing::error!("cluster: {msg}");
                            }
                            self.shared.error(msg);
                        } else {
                            self.note_failure(msg);
                        }
                    }
                }
            }
            Done::Maint { obs, result } => {
                self.maint_running = false;
                self.obs = obs;
                match result {
                    Ok((lost, alive)) => {
                        if !lost.is_empty() && !self.sweep_running {
                            if let Some(ctx) = self.ctx.clone() {
                                self.sweep_running = true;
                                let hooks = self.hooks.clone();
                                self.tasks
                                    .push(sweep(ctx, hooks, lost, alive).map(Done::Sweep).boxed());
                            }
                        }
                    }
                    Err(e) => {
                        // A failed node heartbeat does not hold offlines back
                        // (only failed presence writes do: see `dispatch`).
                        let held_since = self.last_failure;
                        self.note_failure(e);
                        self.last_failure = held_since;
                    }
                }
            }
            Done::Sweep(result) => {
                self.sweep_running = false;
                if let Err(e) = result {
                    self.note_failure(e);
                }
            }
            Done::Reconcile { t0, local, result } => {
                self.reconcile_running = false;
                self.shared.reconciling.store(false, Ordering::Relaxed);
                match result {
                    Ok(entries) => self.reconcile(t0, local, entries),
                    Err(e) => {
                        self.shared.reconcile_wanted.store(true, Ordering::Relaxed);
                        self.note_failure(e);
                    }
                }
            }
        }
    }

    fn note_failure(&mut self, error: String) {
        self.shared.error(error.clone());
        self.had_failure = true;
        self.last_failure = Some(Instant::now());
        self.backoff_until = Some(Instant::now() + RETRY_BACKOFF);
        let now = Instant::now();
        if self
            .err_logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.err_logged = Some(now);
            tracing::warn!(
                backlog = self.slots.len(),
                "cluster: NATS operation failed (agents are not affected; retrying): {error}"
            );
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if let Some(client) = &self.client {
            let up = client.connection_state() == async_nats::connection::State::Connected;
            self.shared.connected.store(up, Ordering::Relaxed);
        }
        if self.ctx.is_none() && !self.setup_running && now >= self.next_setup {
            self.setup_running = true;
            let fut = setup(
                self.cfg.clone(),
                self.node.clone(),
                self.shared.clone(),
                self.client.clone(),
            );
            self.tasks.push(fut.boxed());
        }
        let Some(ctx) = self.ctx.clone() else {
            return;
        };
        if !self.maint_running && now >= self.next_maint {
            self.maint_running = true;
            self.next_maint = now + self.cfg.node_heartbeat;
            let obs = std::mem::take(&mut self.obs);
            self.tasks.push(maint(ctx.clone(), obs).boxed());
        }
        if self.shared.reconcile_wanted.load(Ordering::Relaxed)
            && !self.reconcile_running
            && self.backoff_until.is_none()
            && self.slots.len() < self.cfg.backlog_max / 2 + 1
        {
            self.shared.reconcile_wanted.store(false, Ordering::Relaxed);
            let t0 = now_ms();
            if let Some(local) = self.hooks.local_snapshot() {
                self.reconcile_running = true;
                self.shared.reconciling.store(true, Ordering::Relaxed);
                let fut = async move {
                    let result = scan(&ctx.js, &ctx.presence_stream, PRESENCE_BUCKET).await;
                    Done::Reconcile { t0, local, result }
                };
                self.tasks.push(fut.boxed());
            }
        }
    }

    fn reconcile(&mut self, t0: u64, local: Vec<LocalAgent>, entries: Vec<(String, Bytes, u64)>) {
        self.shared.reconciles.fetch_add(1, Ordering::Relaxed);
        let kv: HashMap<String, Stored> = entries
            .into_iter()
            .map(|(k, raw, rev)| (k, stored_from(raw, rev)))
            .collect();
        let mut local_keys = HashSet::with_capacity(local.len());
        let (mut onlines, mut offlines) = (0u64, 0u64);
        let now = now_ms();
        for agent in local {
            let enc = encode_id(&agent.id);
            let matches = kv.get(&enc).is_some_and(|st| {
                st.value.is_online() && st.session.as_ref() == Some(&agent.session)
            });
            local_keys.insert(enc.clone());
            if !matches && !self.slots.contains_key(&enc) {
                onlines += 1;
                self.put_intent(
                    agent.id,
                    Intent::Online {
                        session: agent.session,
                        ts_ms: now,
                    },
                    false,
                );
            }
        }
        for (enc, st) in kv {
            let Some(session) = st.session.clone() else {
                continue;
            };
            if !st.value.is_online()
                || session.node != self.node.node_id
                || session.accept_ms >= t0
                || local_keys.contains(&enc)
                || self.slots.contains_key(&enc)
            {
                continue;
            }
            let Ok(id) = decode_id(&enc) else {
                continue;
            };
            let reason = if session.epoch < self.node.epoch {
                REASON_NOT_RECONNECTED
            } else {
                REASON_RECONCILE
            };
            offlines += 1;
            self.put_intent(
                id,
                Intent::Offline {
                    session,
                    reason: reason.into(),
                    ts_ms: now,
                },
                false,
            );
        }
        tracing::info!(
            onlines,
            offlines,
            "cluster: reconciliation against the KV queued its differences"
        );
    }
}

async fn setup(
    cfg: Arc<ClusterConfig>,
    node: Arc<NodeInfo>,
    shared: Arc<Shared>,
    client: Option<async_nats::Client>,
) -> Done {
    let client = match client {
        Some(c) => c,
        None => match connect(&cfg, &node).await {
            Ok(c) => c,
            Err(e) => {
                return Done::Setup {
                    client: None,
                    result: Err(e),
                }
            }
        },
    };
    let result = setup_objects(&cfg, &node, &shared, &client).await;
    Done::Setup {
        client: Some(client),
        result,
    }
}

async fn connect(cfg: &ClusterConfig, node: &NodeInfo) -> Result<async_nats::Client, ClusterError> {
    let nats = |context, e: &dyn std::fmt::Display| ClusterError::Nats {
        context,
        message: e.to_string(),
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("presenced {}", node.node_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1000))
        });
    if let Some(t) = &cfg.nats_token {
        opts = opts.token(t.clone());
    }
    if let (Some(u), Some(p)) = (&cfg.nats_user, &cfg.nats_password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(path) = &cfg.nats_creds {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| nats("credentials file", &format!("{}: {e}", path.display())))?;
    }
    if let Some(ca) = &cfg.nats_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    opts.connect(cfg.nats_urls.clone())
        .await
        .map_err(|e| nats("connect", &e))
}

/// Parses `a.b.c` (ignoring any `-suffix`) for the version comparison.
pub(crate) fn version_at_least(version: &str, want: (u64, u64, u64)) -> bool {
    let core = version.trim_start_matches('v');
    let core = core.split(['-', '+']).next().unwrap_or("");
    let mut it = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    );
    v >= want
}

async fn setup_objects(
    cfg: &Arc<ClusterConfig>,
    node: &Arc<NodeInfo>,
    shared: &Arc<Shared>,
    client: &async_nats::Client,
) -> Result<Arc<Ctx>, ClusterError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while client.connection_state() != async_nats::connection::State::Connected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(ClusterError::Nats {
            context: "connect",
            message: format!("not connected to any of {:?}", cfg.nats_urls),
        });
    }
    let version = client.server_info().version;
    if cfg.replicas > 1 && !version_at_least(&version, (2, 10, 8)) {
        tracing::warn!(
            server = %version,
            replicas = cfg.replicas,
            "cluster: nats-server older than 2.10.8 with replicas > 1: KV update-with-revision is not atomic on replicated streams there (fixed in 2.9.21/2.10.8); concurrent moves of one agent may both win"
        );
    }
    *lock(&shared.server_version) = Some(version);
    let mut js = jetstream::new(client.clone());
    js.set_timeout(JS_TIMEOUT);
    let presence_stream =
        ensure_stream(&js, kv_stream_config(PRESENCE_BUCKET, cfg.replicas)).await?;
    let nodes_stream = ensure_stream(&js, kv_stream_config(NODES_BUCKET, cfg.replicas)).await?;
    ensure_stream(&js, events_stream_config(cfg)).await?;
    let kv = |e: &dyn std::fmt::Display| ClusterError::Nats {
        context: "key-value bucket",
        message: e.to_string(),
    };
    // Both are valid KV buckets for every KV client (the streams are made
    // here because async-nats' create_key_value() cannot parse the account
    // info of nats-server 2.9.10).
    js.get_key_value(PRESENCE_BUCKET)
        .await
        .map_err(|e| kv(&e))?;
    js.get_key_value(NODES_BUCKET).await.map_err(|e| kv(&e))?;
    Ok(Arc::new(Ctx {
        js,
        presence_stream,
        nodes_stream,
        shared: shared.clone(),
        cfg: cfg.clone(),
        node: node.clone(),
    }))
}

/// Heartbeat: refresh this node's entry, read every node's, find the lost.
/// What this node saw of the others: per node key, the revision of its
/// entry and since when (our clock) it has not changed.
#[derive(Default)]
struct Observations {
    seen: HashMap<String, (u64, Instant)>,
    /// The end of our previous successful scan.
    last_scan: Option<Instant>,
}

async fn maint(ctx: Arc<Ctx>, mut obs: Observations) -> Done {
    // Bounded: a heartbeat whose ack never comes (NATS restarting) must not
    // keep this node from heartbeating for a whole request timeout, or the
    // others would judge it lost while it is fine.
    let limit = (ctx.cfg.node_lost_after / 2).max(Duration::from_secs(2));
    let result = match tokio::time::timeout(limit, maint_inner(&ctx, &mut obs)).await {
        Ok(r) => r,
        Err(_) => Err(format!("node heartbeat: no answer within {limit:?}")),
    };
    Done::Maint { obs, result }
}

async fn maint_inner(
    ctx: &Ctx,
    state: &mut Observations,
) -> Result<(Vec<LostNode>, HashSet<String>), String> {
    let sh = &ctx.shared;
    let me = encode_id(ctx.node.node_id.as_bytes());
    let value = NodeValue {
        boot_ms: ctx.node.boot_ms,
        epoch: ctx.node.epoch,
        agents: sh.agents.load(Ordering::Relaxed),
        connections: sh.connections.load(Ordering::Relaxed),
        ts_ms: now_ms(),
        backlog: sh.backlog.load(Ordering::Relaxed),
        publish_lag_ms: lock(&sh.lags).last,
    };
    let payload = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
    let ack = ctx
        .js
        .publish(format!("$KV.{NODES_BUCKET}.{me}"), payload)
        .await
        .map_err(|e| format!("node heartbeat: {e}"))?;
    ack.await.map_err(|e| format!("node heartbeat ack: {e}"))?;
    sh.success();

    let entries = scan(&ctx.js, &ctx.nodes_stream, NODES_BUCKET).await?;
    let now = Instant::now();
    // If we ourselves could not look for a while (NATS outage, partition),
    // nobody can be judged by that time: every node's clock starts again.
    let gap_limit = (ctx.cfg.node_heartbeat * 3).max(Duration::from_secs(1));
    if state
        .last_scan
        .is_none_or(|t| now.duration_since(t) > gap_limit)
    {
        state.seen.clear();
    }
    state.last_scan = Some(now);
    let obs = &mut state.seen;
    let mut views = Vec::new();
    let mut lost = Vec::new();
    let mut alive_set = HashSet::new();
    let mut seen = HashSet::new();
    for (key, raw, rev) in entries {
        if key.contains('.') {
            continue; // sweep claims
        }
        let Ok(id) = decode_id(&key) else { continue };
        let node_id = String::from_utf8_lossy(&id).into_owned();
        let Ok(v) = serde_json::from_slice::<NodeValue>(&raw) else {
            continue;
        };
        let first = match obs.get(&key) {
            Some(&(r, t)) if r == rev => t,
            _ => now,
        };
        obs.insert(key.clone(), (rev, first));
        seen.insert(key.clone());
        let local = key == me;
        let alive = local || now.duration_since(first) < ctx.cfg.node_lost_after;
        if alive {
            alive_set.insert(node_id.clone());
        } else {
            lost.push(LostNode {
                node_id: node_id.clone(),
                enc: key.clone(),
                epoch: v.epoch,
                revision: rev,
            });
        }
        views.push(NodeView {
            node_id,
            boot_ms: v.boot_ms,
            epoch: v.epoch,
            agents: v.agents,
            connections: v.connections,
            ts_ms: v.ts_ms,
            backlog: v.backlog,
            publish_lag_ms: v.publish_lag_ms,
            alive,
            local,
        });
    }
    obs.retain(|k, _| seen.contains(k));
    views.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    *lock(&sh.nodes) = views;
    Ok((lost, alive_set))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claim {
    claimer: String,
    ts_ms: u64,
}

/// Sweeps lost nodes: win the claim (KV create), check the node is still
/// lost, gate through the hook, write `node_lost` offlines with CAS, then
/// remove the node's entry and the claim.
async fn sweep(
    ctx: Arc<Ctx>,
    hooks: Arc<dyn ClusterHooks>,
    lost: Vec<LostNode>,
    alive: HashSet<String>,
) -> Result<(), String> {
    let sh = &ctx.shared;
    let me = ctx.node.node_id.clone();
    for node in lost {
        let claim_key = format!("{CLAIM_PREFIX}{}.{}", node.enc, node.epoch);
        let claim_subject = format!("$KV.{NODES_BUCKET}.{claim_key}");
        let claim = Bytes::from(
            serde_json::to_vec(&Claim {
                claimer: me.clone(),
                ts_ms: now_ms(),
            })
            .unwrap_or_default(),
        );
        let h = headers(&format!("{claim_key}:{me}:0"), Some(0));
        let claim_rev = match ctx.publish(claim_subject.clone(), h, claim.clone()).await {
            Ok(rev) => rev,
            Err(OpError::Conflict) => {
                let entry = ctx.node_entry(&claim_key).await?;
                let Some((value, revision)) = entry else {
                    continue;
                };
                let Ok(c) = serde_json::from_slice::<Claim>(&value) else {
                    continue;
                };
                if c.claimer == me {
                    revision
                } else if alive.contains(&c.claimer)
                    || now_ms().saturating_sub(c.ts_ms) < ctx.cfg.node_lost_after.as_millis() as u64
                {
                    continue; // another node is on it
                } else {
                    // The claimer died mid-sweep: take the claim over.
                    let h = headers(&format!("{claim_key}:{me}:{revision}"), Some(revision));
                    match ctx.publish(claim_subject.clone(), h, claim.clone()).await {
                        Ok(rev) => rev,
                        Err(OpError::Conflict) => continue,
                        Err(OpError::Other(e)) => return Err(format!("sweep claim: {e}")),
                    }
                }
            }
            Err(OpError::Other(e)) => return Err(format!("sweep claim: {e}")),
        };
        // Still lost (not refreshed since it was judged lost)?
        let current = ctx.node_entry(&node.enc).await?;
        if current.as_ref().map(|e| e.1) != Some(node.revision) {
            release(&ctx, &claim_subject, claim_rev).await;
            continue;
        }
        let entries = scan(&ctx.js, &ctx.presence_stream, PRESENCE_BUCKET).await?;
        let mut victims = Vec::new();
        for (enc, raw, rev) in entries {
            let st = stored_from(raw, rev);
            let Some(session) = st.session.clone() else {
                continue;
            };
            if st.value.is_online() && session.node == node.node_id && session.epoch <= node.epoch {
                if let Ok(id) = decode_id(&enc) {
                    victims.push((enc, id, session));
                }
            }
        }
        let ids: Vec<Vec<u8>> = victims.iter().map(|v| v.1.clone()).collect();
        if hooks.node_lost(&node.node_id, &ids) == SweepVerdict::Defer {
            sh.sweeps_deferred.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.node_id, agents = ids.len(), "cluster: node lost; sweep deferred by the mass-offline guard");
            release(&ctx, &claim_subject, claim_rev).await;
            continue;
        }
        sh.sweeps.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %node.node_id, epoch = node.epoch, agents = ids.len(), "cluster: node lost; sweeping its agents offline (node_lost)");
        let ts = now_ms();
        let results: Vec<OpOutcome> =
            futures::stream::iter(victims.into_iter().map(|(enc, id, session)| {
                drive(
                    ctx.clone(),
                    enc,
                    id,
                    Intent::Offline {
                        session,
                        reason: REASON_NODE_LOST.into(),
                        ts_ms: ts,
                    },
                    None,
                    true,
                )
            }))
            .buffer_unordered(32)
            .collect()
            .await;
        let swept: u64 = results
            .iter()
            .map(|r| match r {
                OpOutcome::Done(n) => *n,
                OpOutcome::Failed { .. } => 0,
            })
            .sum();
        sh.node_lost_swept.fetch_add(swept, Ordering::Relaxed);
        if let Some(OpOutcome::Failed { error, .. }) = results
            .iter()
            .find(|r| matches!(r, OpOutcome::Failed { .. }))
        {
            // Keep the claim: our next heartbeat sweeps again.
            return Err(format!("sweep of {}: {error}", node.node_id));
        }
        // Remove the lost node's entry (unless it came back) and the claim.
        let mut h = headers(
            &format!("{}:purge:{}", node.enc, node.revision),
            Some(node.revision),
        );
        h.insert("KV-Operation", "PURGE");
        h.insert("Nats-Rollup", "sub");
        let _ = ctx
            .publish(format!("$KV.{NODES_BUCKET}.{}", node.enc), h, Bytes::new())
            .await;
        release(&ctx, &claim_subject, claim_rev).await;
    }
    Ok(())
}

/// Purges a sweep claim (CAS on its revision).
async fn release(ctx: &Ctx, subject: &str, rev: u64) {
    let mut h = headers(&format!("{subject}:release:{rev}"), Some(rev));
    h.insert("KV-Operation", "PURGE");
    h.insert("Nats-Rollup", "sub");
    let _ = ctx.publish(subject.to_string(), h, Bytes::new()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64, node: &str) -> SessionId {
        SessionId::new(ms, node, 1, 0)
    }

    fn stored(state: &str, session: &SessionId, reason: &str, rev: u64) -> Stored {
        let v = PresenceValue {
            state: state.into(),
            since_ms: 5,
            node: session.node.clone(),
            session: session.to_string(),
            reason: reason.into(),
        };
        stored_from(Bytes::from(serde_json::to_vec(&v).unwrap()), rev)
    }

    fn on(session: &SessionId) -> Intent {
        Intent::Online {
            session: session.clone(),
            ts_ms: 100,
        }
    }

    fn off(session: &SessionId) -> Intent {
        Intent::Offline {
            session: session.clone(),
            reason: "bye".into(),
            ts_ms: 200,
        }
    }

    fn write(d: Decision) -> KvWrite {
        match d {
            Decision::Write(w) => w,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn online_from_absent_or_offline_is_an_event() {
        let w = write(decide("k", &on(&s(10, "a")), None));
        assert_eq!(w.expected, 0);
        assert_eq!(w.event.as_ref().unwrap().state, ONLINE);
        let st = stored("offline", &s(5, "b"), "bye", 7);
        let w = write(decide("k", &on(&s(10, "a")), Some(&st)));
        assert_eq!(w.expected, 7);
        assert!(w.event.is_some());
        assert_eq!(w.msg_id, format!("k:7:{}:online", s(10, "a")));
    }

    #[test]
    fn newer_session_over_online_is_a_silent_move() {
        let st = stored("online", &s(5, "b"), "hello", 7);
        let w = write(decide("k", &on(&s(10, "a")), Some(&st)));
        assert!(w.event.is_none());
        let v: PresenceValue = serde_json::from_slice(&w.payload).unwrap();
        assert_eq!(v.since_ms, 5, "a move keeps since_ms");
        assert_eq!(v.node, "a");
    }

    #[test]
    fn stale_and_repeated_onlines_write_nothing() {
        let st = stored("online", &s(10, "b"), "hello", 7);
        assert!(matches!(
            decide("k", &on(&s(9, "z")), Some(&st)),
            Decision::StaleOnline
        ));
        assert!(matches!(
            decide("k", &on(&s(10, "b")), Some(&st)),
            Decision::Noop
        ));
        let ended = stored("offline", &s(10, "b"), "bye", 8);
        assert!(matches!(
            decide("k", &on(&s(10, "b")), Some(&ended)),
            Decision::Noop
        ));
        let swept = stored("offline", &s(10, "b"), REASON_NODE_LOST, 8);
        assert!(write(decide("k", &on(&s(10, "b")), Some(&swept)))
            .event
            .is_some());
    }

    #[test]
    fn offline_only_for_the_stored_session() {
        let st = stored("online", &s(10, "b"), "hello", 7);
        let w = write(decide("k", &off(&s(10, "b")), Some(&st)));
        assert_eq!(w.expected, 7);
        assert_eq!(w.event.as_ref().unwrap().reason, "bye");
        for other in [s(9, "b"), s(11, "b"), s(10, "a")] {
            assert!(matches!(
                decide("k", &off(&other), Some(&st)),
                Decision::SuppressedOffline
            ));
        }
        assert!(matches!(
            decide("k", &off(&s(1, "b")), None),
            Decision::SuppressedOffline
        ));
        let ended = stored("offline", &s(10, "b"), "bye", 8);
        assert!(matches!(
            decide("k", &off(&s(10, "b")), Some(&ended)),
            Decision::SuppressedOffline
        ));
    }

    #[test]
    fn server_versions() {
        assert!(!version_at_least("2.9.10", (2, 10, 8)));
        assert!(!version_at_least("2.10.7", (2, 10, 8)));
        assert!(version_at_least("2.10.8", (2, 10, 8)));
        assert!(version_at_least("v2.11.0-beta.1", (2, 10, 8)));
    }
}
