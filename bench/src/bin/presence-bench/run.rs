//! The scenarios, as run by the coordinator.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::fleet::{ip_slice, share, Fleet};
use crate::kernel::{self, Slab};
use crate::report::{
    round3, ConnectResult, DensityPoint, DensityResult, HeartbeatResult, Pct, RecoverySample,
    Report, StormResult, TargetResult, UpgradeResult,
};
use crate::servers::{self, Mem, Peer, Presenced, SpawnOpts};
use crate::wire::{merge_into, new_hist, BackoffSpec, Cmd, Msg, TargetKind, WorkerInit};
use crate::{
    parse_source_ips, Common, DensityArgs, PeerArg, RampArgs, SteadyArgs, StormArgs,
    UndisturbedArgs, UpgradeArgs,
};

/// Most agents one process can hold here (hard open-files limit 20000).
const MAX_PER_WORKER: usize = 19_000;

struct Env {
    common: Common,
    ips: Vec<IpAddr>,
    workers: usize,
    progress: bool,
    /// Certificate and key the peers serve (copied from presenced's dev-init
    /// setup, or generated).
    material: tempfile::TempDir,
    peer_cert: Option<(PathBuf, PathBuf)>,
    notes: Vec<String>,
}

impl Env {
    fn new(common: Common, max_agents: usize) -> Result<Env> {
        if max_agents == 0 {
            bail!("--agents must be at least 1");
        }
        if common.per_worker == 0 || common.per_worker > MAX_PER_WORKER {
            bail!("--per-worker must be between 1 and {MAX_PER_WORKER}");
        }
        if let Some(addr) = common.addr {
            if !addr.ip().is_loopback() {
                bail!("--addr {addr}: the bench only targets loopback addresses");
            }
        }
        if common.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if !(common.rate >= 0.0 && common.rate.is_finite()) {
            bail!("--rate must be a non-negative number");
        }
        let ips = parse_source_ips(&common.source_ips)?;
        let auto = max_agents.div_ceil(common.per_worker).max(2);
        let workers = common.workers.unwrap_or(auto).clamp(1, max_agents);
        if max_agents.div_ceil(workers) > MAX_PER_WORKER {
            bail!(
                "{max_agents} agents over {workers} workers is more than {MAX_PER_WORKER} per process; use more --workers"
            );
        }
        let progress = !common.json && std::io::stderr().is_terminal();
        let material = tempfile::Builder::new()
            .prefix("pbench-tls")
            .tempdir()
            .context("creating temp dir")?;
        Ok(Env {
            common,
            ips,
            workers,
            progress,
            material,
            peer_cert: None,
            notes: Vec::new(),
        })
    }

    fn bar(&self, len: u64, msg: impl Into<String>) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>28} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
        ) {
            pb.set_style(style);
        }
        pb.set_message(msg.into());
        pb
    }

    fn report(&self, scenario: &str, agents: Vec<u64>, targets: Vec<TargetResult>) -> Report {
        Report {
            scenario: scenario.into(),
            bench_version: env!("CARGO_PKG_VERSION").into(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            agents,
            workers: self.workers,
            source_ips: self.ips.len(),
            targets,
            notes: self.notes.clone(),
        }
    }

    fn print(&self, report: &Report) -> Result<()> {
        if self.common.json {
            println!("{}", serde_json::to_string(report)?);
        } else {
            print!("{}", report.render());
        }
        Ok(())
    }
}

enum Server {
    Presenced(Presenced),
    Peer(Peer),
}

struct Target {
    kind: TargetKind,
    server: Server,
    ca_pem: String,
    fleet_key: Option<String>,
    version: String,
}

impl Target {
    fn addr(&self) -> std::net::SocketAddr {
        match &self.server {
            Server::Presenced(p) => p.addr,
            Server::Peer(p) => p.addr,
        }
    }

    fn mem(&self) -> Result<Mem> {
        match &self.server {
            Server::Presenced(p) => p.mem(),
            Server::Peer(p) => p.mem(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match &self.server {
            Server::Presenced(p) => p.pid().ok(),
            Server::Peer(p) => p.pid(),
        }
    }

    fn presenced(&mut self) -> Option<&mut Presenced> {
        match &mut self.server {
            Server::Presenced(p) => Some(p),
            Server::Peer(_) => None,
        }
    }

    fn stats(&mut self) -> Option<Value> {
        self.presenced().and_then(|p| p.stats().ok())
    }

    fn stop(&mut self) {
        match &mut self.server {
            Server::Presenced(p) => p.stop(),
            Server::Peer(p) => p.stop(),
        }
    }
}

fn find_presenced(common: &Common) -> Result<PathBuf> {
    if let Some(p) = &common.presenced_bin {
        return Ok(p.clone());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        candidates.push(dir.join("presenced"));
    }
    candidates.push(PathBuf::from("target/release/presenced"));
    candidates.push(PathBuf::from("target/debug/presenced"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!("no presenced binary found: build it (cargo build --release -p presenced) or pass --presenced-bin")
        })
}

fn start_presenced(env: &mut Env, offline_grace: Duration) -> Result<Target> {
    let p = match (
        &env.common.addr,
        &env.common.control,
        &env.common.ca,
        &env.common.fleet_key,
    ) {
        (Some(addr), Some(control), Some(ca), Some(key)) => {
            Presenced::attach(*addr, control.clone(), ca.clone(), key)?
        }
        _ => {
            let bin = find_presenced(&env.common)?;
            Presenced::spawn(&SpawnOpts {
                bin: &bin,
                shards: env.common.shards,
                heartbeat_interval: env.common.keepalive,
                offline_grace,
                legacy: env.common.legacy_config,
            })?
        }
    };
    let ca_pem =
        std::fs::read_to_string(&p.ca).with_context(|| format!("reading CA {}", p.ca.display()))?;
    if env.peer_cert.is_none() {
        if let Some(key) = &p.key {
            let cert = env.material.path().join("cert.pem");
            let k = env.material.path().join("key.pem");
            std::fs::copy(&p.ca, &cert).context("copying the dev-init certificate")?;
            std::fs::copy(key, &k).context("copying the dev-init key")?;
            env.peer_cert = Some((cert, k));
        }
    }
    let version = p
        .stats()
        .ok()
        .and_then(|s| s.get("version").and_then(Value::as_str).map(String::from))
        .unwrap_or_default();
    Ok(Target {
        kind: TargetKind::Presenced,
        fleet_key: Some(p.fleet_key_text.clone()),
        server: Server::Presenced(p),
        ca_pem,
        version,
    })
}

fn start_peer(env: &mut Env, peer: PeerArg) -> Result<Target> {
    let kind = match peer {
        PeerArg::Nats => TargetKind::Nats,
        PeerArg::Mqtt => TargetKind::Mqtt,
    };
    if env.peer_cert.is_none() {
        env.peer_cert = Some(servers::generate_cert(env.material.path())?);
    }
    let (cert, key) = env
        .peer_cert
        .clone()
        .ok_or_else(|| anyhow!("no certificate for peers"))?;
    let p = Peer::start(kind, &cert, &key)?;
    let ca_pem = std::fs::read_to_string(&cert)?;
    Ok(Target {
        kind,
        version: p.version.clone(),
        server: Server::Peer(p),
        ca_pem,
        fleet_key: None,
    })
}

fn spawn_fleet(env: &Env, t: &Target, agents: usize) -> Result<Fleet> {
    let w = env.workers;
    spawn_group(env, t, agents, w, &env.common.id_prefix, 0, |i| {
        ip_slice(&env.ips, w, i)
    })
}

/// `w` workers holding `agents` together, ids `PREFIX-wI-NNNNNNN`.
fn spawn_group(
    env: &Env,
    t: &Target,
    agents: usize,
    w: usize,
    prefix: &str,
    nice: i32,
    ips: impl Fn(usize) -> Vec<IpAddr>,
) -> Result<Fleet> {
    let inits = (0..w)
        .map(|i| WorkerInit {
            worker: i,
            target: t.kind,
            addr: t.addr(),
            server_name: "localhost".into(),
            ca_pem: t.ca_pem.clone(),
            fleet_key: t.fleet_key.clone(),
            id_prefix: format!("{prefix}-w{i}"),
            first_agent: (0..i).map(|j| share(agents, w, j)).sum(),
            agents: share(agents, w, i),
            source_ips: ips(i),
            keepalive_ms: env.common.keepalive.as_millis() as u64,
            connect_timeout_ms: env.common.connect_timeout.as_millis() as u64,
            resumption: env.common.resumption,
            connect_retries: env.common.connect_retries,
            retry_backoff: RETRY_BACKOFF,
            nice,
        })
        .collect();
    Fleet::spawn(inits)
}

/// Backoff of `--connect-retries`.
const RETRY_BACKOFF: BackoffSpec = BackoffSpec {
    initial_ms: 500,
    max_ms: 5000,
};

/// The undisturbed group: its own worker process, heartbeating from
/// `hold` to `release`.
struct Undisturbed {
    fleet: Fleet,
    agents: u64,
    interval: Duration,
}

impl Undisturbed {
    /// Connect the group (as fast as allowed, not at --rate).
    fn start(env: &Env, t: &Target, u: &UndisturbedArgs) -> Result<Option<Undisturbed>> {
        if u.undisturbed == 0 {
            return Ok(None);
        }
        if u.undisturbed_interval.is_zero() {
            bail!("--undisturbed-interval must be greater than 0");
        }
        let prefix = format!("{}-und", env.common.id_prefix);
        let mut fleet = spawn_group(
            env,
            t,
            u.undisturbed,
            1,
            &prefix,
            u.undisturbed_nice,
            |_| env.ips.clone(),
        )?;
        let (c, _, _) = connect(env, &mut fleet, t, u.undisturbed, 0, 0.0)?;
        if c.failed > 0 {
            bail!(
                "undisturbed group: {} of {} agents did not connect: {:?}",
                c.failed,
                u.undisturbed,
                c.errors
            );
        }
        Ok(Some(Undisturbed {
            fleet,
            agents: c.online,
            interval: u.undisturbed_interval,
        }))
    }

    /// Start heartbeating.
    fn hold(&mut self) -> Result<()> {
        let ms = self.interval.as_millis() as u64;
        self.fleet
            .run(&ProgressBar::hidden(), Duration::from_secs(30), |_| {
                Cmd::Hold { interval_ms: ms }
            })?;
        Ok(())
    }

    /// Stop heartbeating; what the group measured since `hold`.
    fn release(&mut self, held: Duration) -> Result<HeartbeatResult> {
        let replies = self
            .fleet
            .run(&ProgressBar::hidden(), Duration::from_secs(60), |_| {
                Cmd::Release
            })?;
        let mut r = heartbeats(replies, held.as_secs_f64());
        r.interval_ms = Some(self.interval.as_millis() as u64);
        Ok(r)
    }

    fn close(self) -> Result<()> {
        self.fleet.close()
    }
}

/// Poll `stats` until `key` reaches `want` (bounded); the last value.
fn wait_stat(p: &Presenced, key: &str, want: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut v = 0;
    while Instant::now() < deadline {
        v = p
            .stats()
            .ok()
            .and_then(|s| s.get(key).and_then(Value::as_u64))
            .unwrap_or(0);
        if v >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    v
}

fn stat(v: &Option<Value>, key: &str) -> Option<u64> {
    v.as_ref()?.get(key)?.as_u64()
}

/// Connect until the fleet holds `upto` agents.
fn connect(
    env: &Env,
    fleet: &mut Fleet,
    t: &Target,
    upto: usize,
    already: usize,
    total_rate: f64,
) -> Result<(ConnectResult, Histogram<u64>, Histogram<u64>)> {
    let name = t.kind.name();
    let pid = t.pid();
    let cpu0 = pid.and_then(servers::proc_cpu_s);
    let w = fleet.len();
    let pb = env.bar(
        upto.saturating_sub(already) as u64,
        format!("{name}: connect {upto}"),
    );
    let rate = total_rate / w as f64;
    let conc = env.common.concurrency.div_ceil(w).max(1);
    let retries = env.common.connect_retries;
    let per_try = env.common.connect_timeout + Duration::from_millis(RETRY_BACKOFF.max_ms);
    let limit = per_try * retries.saturating_add(1)
        + Duration::from_secs(120)
        + if rate > 0.0 {
            Duration::from_secs_f64(upto as f64 / total_rate)
        } else {
            Duration::ZERO
        };
    let start = Instant::now();
    let replies = fleet.run(&pb, limit, |i| Cmd::Connect {
        upto: share(upto, w, i),
        rate,
        concurrency: conc,
    })?;
    let wall = start.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(servers::proc_cpu_s);
    pb.finish_and_clear();
    let mut tls = new_hist();
    let mut full = new_hist();
    let mut r = ConnectResult {
        attempted: upto.saturating_sub(already) as u64,
        wall_s: (wall * 1000.0).round() / 1000.0,
        ..Default::default()
    };
    for m in replies {
        if let Msg::Connected {
            ok,
            failed,
            retried,
            online,
            tls_us,
            full_us,
            errors,
            ..
        } = m
        {
            r.ok += ok;
            r.failed += failed;
            r.retried += retried;
            r.online += online;
            merge_into(&mut tls, &tls_us);
            merge_into(&mut full, &full_us);
            merge_errors(&mut r.errors, errors);
        }
    }
    r.rate_per_s = (r.ok as f64 / wall.max(1e-6)).round();
    r.server_cpu_s = cpu0.zip(cpu1).map(|(a, b)| round3(b - a));
    r.per_server_cpu_s = r
        .server_cpu_s
        .filter(|c| *c > 0.0)
        .map(|c| (r.ok as f64 / c).round());
    r.tls_ms = Pct::from_us(&tls);
    r.full_ms = Pct::from_us(&full);
    Ok((r, tls, full))
}

fn merge_errors(into: &mut Vec<String>, from: Vec<String>) {
    for e in from {
        if into.len() < 10 && !into.contains(&e) {
            into.push(e);
        }
    }
}

fn heartbeats(replies: Vec<Msg>, seconds: f64) -> HeartbeatResult {
    let mut h = new_hist();
    let mut gaps = new_hist();
    let mut r = HeartbeatResult::default();
    for m in replies {
        if let Msg::Heartbeats {
            ok,
            failed,
            rtt_us,
            disconnects,
            reconnects,
            online,
            gap_us,
            errors,
        } = m
        {
            r.ok += ok;
            r.failed += failed;
            r.disconnects += disconnects;
            r.reconnects += reconnects;
            r.online += online;
            merge_into(&mut h, &rtt_us);
            merge_into(&mut gaps, &gap_us);
            merge_errors(&mut r.errors, errors);
        }
    }
    r.rate_per_s = (r.ok as f64 / seconds.max(1e-6)).round();
    r.rtt_ms = Pct::from_us(&h);
    r.gap_ms = (!gaps.is_empty()).then(|| Pct::from_us(&gaps));
    r
}

fn heartbeat_round(
    env: &Env,
    fleet: &mut Fleet,
    name: &str,
    online: u64,
    spread: Duration,
) -> Result<HeartbeatResult> {
    let pb = env.bar(online, format!("{name}: heartbeat round"));
    let replies = fleet.run(&pb, spread + Duration::from_secs(60), |_| {
        Cmd::HeartbeatRound {
            spread_ms: spread.as_millis() as u64,
        }
    })?;
    pb.finish_and_clear();
    Ok(heartbeats(replies, spread.as_secs_f64()))
}

const COUNTERS: &[&str] = &[
    "handshakes_total",
    "handshake_failures_total",
    "handshake_timeouts_total",
    "hellos_total",
    "heartbeats_total",
    "timeouts_total",
    "byes_total",
    "accepted_total",
    "handshakes_resumed_total",
    "admission_rejected_total",
];

fn counter_delta(before: &Option<Value>, after: &Option<Value>) -> Option<Value> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    let mut m = serde_json::Map::new();
    for k in COUNTERS {
        // Counters an older daemon does not have are left out.
        let Some(x) = a.get(*k).and_then(Value::as_u64) else {
            continue;
        };
        let y = b.get(*k).and_then(Value::as_u64).unwrap_or(0);
        m.insert((*k).to_owned(), json!(x.saturating_sub(y)));
    }
    for k in [
        "connections",
        "sessions",
        "agents_online",
        "rss_bytes",
        "heap_bytes",
    ] {
        if let Some(v) = a.get(k) {
            m.insert(format!("{k}_after"), v.clone());
        }
    }
    Some(Value::Object(m))
}

/// Run `f` against presenced and then each peer, one at a time.
fn each_target(
    env: &mut Env,
    offline_grace: Duration,
    mut f: impl FnMut(&mut Env, &mut Target) -> Result<TargetResult>,
) -> Result<Vec<TargetResult>> {
    let mut out = Vec::new();
    let mut t = start_presenced(env, offline_grace)?;
    let r = f(env, &mut t);
    t.stop();
    out.push(r?);
    let peers = env.common.peers.clone();
    for p in peers {
        let mut t = start_peer(env, p)?;
        let r = f(env, &mut t);
        t.stop();
        out.push(r.with_context(|| format!("against {}", t.kind.name()))?);
    }
    Ok(out)
}

fn base_result(t: &Target, agents: usize) -> TargetResult {
    TargetResult {
        target: t.kind.name().into(),
        version: t.version.clone(),
        agents: agents as u64,
        ..Default::default()
    }
}

pub fn ramp(a: RampArgs) -> Result<()> {
    let mut env = Env::new(a.common, a.agents)?;
    let n = a.agents;
    let und = a.undisturbed.clone();
    if und.undisturbed > 0 && und.undisturbed_nice != 0 {
        env.notes.push(format!(
            "the undisturbed group's worker ran at nice {}",
            und.undisturbed_nice
        ));
    }
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut group = Undisturbed::start(env, t, &und)?;
        let mut fleet = spawn_fleet(env, t, n)?;
        if let Some(g) = group.as_mut() {
            g.hold()?;
        }
        let held = Instant::now();
        let before = t.stats();
        let (c, _, _) = connect(env, &mut fleet, t, n, 0, env.common.rate)?;
        let after = t.stats();
        let mut r = base_result(t, n);
        if let Some(mut g) = group {
            r.undisturbed = Some(g.release(held.elapsed())?);
            g.close()?;
        }
        fleet.close()?;
        r.connect = Some(c);
        r.daemon = counter_delta(&before, &after);
        Ok(r)
    })?;
    let report = env.report("ramp", vec![n as u64], targets);
    env.print(&report)
}

pub fn steady(a: SteadyArgs) -> Result<()> {
    let mut env = Env::new(a.common, a.agents)?;
    let n = a.agents;
    if a.interval.is_zero() {
        bail!("--interval must be greater than 0");
    }
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut fleet = spawn_fleet(env, t, n)?;
        let (c, _, _) = connect(env, &mut fleet, t, n, 0, env.common.rate)?;
        let before = t.stats();
        let pb = env.bar(
            (n as f64 * a.duration.as_secs_f64() / a.interval.as_secs_f64()) as u64,
            format!("{}: steady", t.kind.name()),
        );
        let replies = fleet.run(&pb, a.duration + Duration::from_secs(60), |_| Cmd::Steady {
            duration_ms: a.duration.as_millis() as u64,
            interval_ms: a.interval.as_millis() as u64,
        })?;
        pb.finish_and_clear();
        let after = t.stats();
        let hb = heartbeats(replies, a.duration.as_secs_f64());
        fleet.close()?;
        let mut r = base_result(t, n);
        r.connect = Some(c);
        r.heartbeat = Some(hb);
        r.daemon = counter_delta(&before, &after);
        Ok(r)
    })?;
    let report = env.report("steady", vec![n as u64], targets);
    env.print(&report)
}

/// Exact percentile of sorted milliseconds (nearest rank).
fn rank(sorted: &[u32], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(u64::from(sorted[idx]))
}

/// Shortest `--recovery-interval`.
const MIN_RECOVERY_INTERVAL: Duration = Duration::from_millis(10);
/// Most recovery samples one storm keeps.
const MAX_RECOVERY_SAMPLES: usize = 20_000;

/// The daemon's side of a storm's recovery curve, read from `stats`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DaemonSample {
    /// Since the storm started.
    t: Duration,
    sessions: Option<u64>,
    agents_online: Option<u64>,
    agents_in_grace: Option<u64>,
}

/// Polls `stats` every interval on its own thread until finished (or
/// dropped), at most [`MAX_RECOVERY_SAMPLES`] times.
struct StatsSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<DaemonSample>>>,
}

impl StatsSampler {
    /// None when `every` is zero (no curve).
    fn start(control: &Path, t0: Instant, every: Duration) -> Option<StatsSampler> {
        if every.is_zero() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let control = control.to_owned();
        let limit = every.max(Duration::from_millis(200));
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            // The first tick is one interval in: the point at 0 is the
            // `stats` read just before the storm.
            std::thread::sleep(every.saturating_sub(t0.elapsed()));
            while !flag.load(Ordering::Relaxed) && out.len() < MAX_RECOVERY_SAMPLES {
                let t = t0.elapsed();
                // A daemon that is down (killed, restarting) gives None.
                let st = servers::control_within(&control, "stats", limit)
                    .ok()
                    .and_then(|text| serde_json::from_str::<Value>(text.trim()).ok());
                let get = |k: &str| st.as_ref().and_then(|v| v.get(k)).and_then(Value::as_u64);
                out.push(DaemonSample {
                    t,
                    sessions: get("sessions"),
                    agents_online: get("agents_online"),
                    agents_in_grace: get("agents_in_grace"),
                });
                // The next tick after now (a slow reply skips ticks).
                let now = t0.elapsed().as_nanos();
                let ticks = now / every.as_nanos() + 1;
                let next = Duration::from_nanos(
                    u64::try_from(ticks * every.as_nanos()).unwrap_or(u64::MAX),
                );
                std::thread::sleep(next.saturating_sub(t0.elapsed()));
            }
            out
        });
        Some(StatsSampler {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Vec<DaemonSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for StatsSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The recovery curve: each daemon sample with the number of agents back
/// by then. `back_ms` is sorted and counts from the workers' start, which
/// is `offset` after the storm's.
fn recovery_curve(
    samples: &[DaemonSample],
    back_ms: &[u32],
    offset: Duration,
) -> Vec<RecoverySample> {
    samples
        .iter()
        .map(|d| {
            let since_workers = d.t.saturating_sub(offset).as_millis();
            RecoverySample {
                t_s: round3(d.t.as_secs_f64()),
                back: back_ms.partition_point(|&b| u128::from(b) <= since_workers) as u64,
                sessions: d.sessions,
                agents_online: d.agents_online,
                agents_in_grace: d.agents_in_grace,
            }
        })
        .collect()
}

pub fn storm(a: StormArgs) -> Result<()> {
    if !a.recovery_interval.is_zero() && a.recovery_interval < MIN_RECOVERY_INTERVAL {
        bail!("--recovery-interval must be 0 or at least {MIN_RECOVERY_INTERVAL:?}");
    }
    let mut env = Env::new(a.common, a.agents)?;
    if !env.common.peers.is_empty() {
        env.notes.push(
            "storm runs against presenced only: the peers have no presence events to count".into(),
        );
        env.common.peers.clear();
    }
    if a.kill_daemon && a.restart_cmd.is_none() && env.common.addr.is_some() {
        bail!("--kill-daemon on an attached daemon needs --restart-cmd");
    }
    if !(a.drop_share > 0.0 && a.drop_share <= 1.0) {
        bail!("--drop-share must be in (0, 1]");
    }
    if a.kill_daemon && a.drop_share < 1.0 {
        bail!("--drop-share does not go with --kill-daemon (a killed daemon drops everyone)");
    }
    let n = a.agents;
    let und = a.undisturbed.clone();
    if und.undisturbed > 0 && und.undisturbed_nice != 0 {
        env.notes.push(format!(
            "the undisturbed group's worker ran at nice {}",
            und.undisturbed_nice
        ));
    }
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut fleet = spawn_fleet(env, t, n)?;
        let (c, _, _) = connect(env, &mut fleet, t, n, 0, env.common.rate)?;
        let hb = heartbeat_round(
            env,
            &mut fleet,
            t.kind.name(),
            c.online,
            Duration::from_secs(1),
        )?;
        let mut group = Undisturbed::start(env, t, &und)?;
        let group_n = group.as_ref().map_or(0, |g| g.agents);
        let p = t
            .presenced()
            .ok_or_else(|| anyhow!("storm needs presenced"))?;
        // Wait for the daemon to count every session.
        wait_stat(p, "sessions", c.online + group_n, Duration::from_secs(20));
        if let Some(g) = group.as_mut() {
            g.hold()?;
        }
        let held = Instant::now();
        let before = p.stats().ok();
        let seq = stat(&before, "events_next_seq").unwrap_or(0);
        let pid0 = stat(&before, "pid").and_then(|x| u32::try_from(x).ok());
        let cpu0 = pid0.and_then(servers::proc_cpu_s);
        let mut subs = vec![servers::EventSub::start(&p.control, seq)?];
        let backoff = BackoffSpec {
            initial_ms: a.backoff_initial.as_millis() as u64,
            max_ms: a.backoff_max.as_millis() as u64,
        };
        let cmd = Cmd::Storm {
            backoff,
            deadline_ms: a.deadline.as_millis() as u64,
            drop_share: a.drop_share,
        };
        let pb = env.bar(
            (c.online as f64 * a.drop_share).round() as u64,
            "presenced: storm, back online",
        );
        let limit = a.deadline + Duration::from_secs(30);
        let mut restart_ms = None;
        let mut restarted: Option<Value> = None;
        // After a restart: read the restarted daemon from 0 (the oldest it
        // holds). If its numbering went on from before the kill, events
        // below `seq` are from before the storm and dropped, and the
        // first subscription's duplicates are dropped by seq.
        let mut numbering_continued = false;
        // The recovery curve's clock starts at the drop (or the SIGKILL);
        // the workers' own clocks (`back_ms`) start when they get the
        // storm command, `offset` later.
        let sampler;
        let storm_t0;
        let offset;
        let replies = if a.kill_daemon {
            std::thread::sleep(a.kill_after);
            let t0 = Instant::now();
            storm_t0 = t0;
            sampler = StatsSampler::start(&p.control, t0, a.recovery_interval);
            p.kill9()?;
            offset = t0.elapsed();
            // The dead sockets are forgotten and redialled with backoff
            // while the daemon restarts.
            let (tx, rx) = std::sync::mpsc::channel();
            let started = std::thread::scope(|scope| -> Result<Vec<Msg>> {
                let fleet = &mut fleet;
                let pb2 = pb.clone();
                let h = scope.spawn(move || {
                    let r = fleet.run(&pb2, limit, |_| cmd.clone());
                    let _ = tx.send(());
                    r
                });
                p.restart(a.restart_cmd.as_deref())?;
                restart_ms = Some(t0.elapsed().as_millis() as u64);
                let st = p.stats()?;
                let next = st
                    .get("events_next_seq")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                numbering_continued = seq > 0 && next >= seq;
                restarted = Some(st);
                subs.push(servers::EventSub::start(&p.control, 0)?);
                let _ = rx.recv();
                h.join().map_err(|_| anyhow!("storm thread panicked"))?
            });
            started?
        } else {
            storm_t0 = Instant::now();
            offset = Duration::ZERO;
            sampler = StatsSampler::start(&p.control, storm_t0, a.recovery_interval);
            fleet.run(&pb, limit, |_| cmd.clone())?
        };
        let daemon_samples: Vec<DaemonSample> = match sampler {
            Some(smp) => {
                let pre = DaemonSample {
                    t: Duration::ZERO,
                    sessions: stat(&before, "sessions"),
                    agents_online: stat(&before, "agents_online"),
                    agents_in_grace: stat(&before, "agents_in_grace"),
                };
                let mut v: Vec<DaemonSample> = std::iter::once(pre).chain(smp.finish()).collect();
                // One more at the end, so the curve reaches the last agent back.
                let end = p.stats().ok();
                v.push(DaemonSample {
                    t: storm_t0.elapsed(),
                    sessions: stat(&end, "sessions"),
                    agents_online: stat(&end, "agents_online"),
                    agents_in_grace: stat(&end, "agents_in_grace"),
                });
                v
            }
            None => Vec::new(),
        };
        let storm_wall = storm_t0.elapsed();
        pb.finish_and_clear();
        let storm_s = held.elapsed();
        let undisturbed = match group.as_mut() {
            Some(g) => Some(g.release(storm_s)?),
            None => None,
        };
        let after = p.stats().ok();
        let pid1 = stat(&after, "pid").and_then(|x| u32::try_from(x).ok());
        let cpu1 = pid1.and_then(servers::proc_cpu_s);
        std::thread::sleep(a.events_grace);
        let mut events: Vec<Value> = subs.into_iter().flat_map(|s| s.finish()).collect();
        let events_error = events
            .iter()
            .find_map(|e| e.get("error").and_then(Value::as_str).map(String::from));
        if a.kill_daemon && numbering_continued {
            let mut seen = std::collections::HashSet::new();
            events.retain(|e| {
                e.get("seq")
                    .and_then(Value::as_u64)
                    .is_none_or(|q| q >= seq && seen.insert(q))
            });
        }
        let mut back: Vec<u32> = Vec::new();
        let mut s = StormResult {
            mode: if a.kill_daemon {
                "kill-daemon"
            } else if a.drop_share < 1.0 {
                "partial-drop"
            } else {
                "drop-all"
            }
            .into(),
            agents: c.online,
            drop_share: a.drop_share,
            resumption: env.common.resumption,
            restart_ms,
            events_error,
            presumed_online_after_restart: stat(&restarted, "presumed_online"),
            ..Default::default()
        };
        for m in replies {
            if let Msg::Storm {
                back_ms,
                not_back,
                dropped,
                failed_attempts,
                errors,
            } = m
            {
                back.extend(back_ms);
                s.not_back += not_back;
                s.dropped += dropped;
                s.failed_attempts += failed_attempts;
                merge_errors(&mut s.errors, errors);
            }
        }
        back.sort_unstable();
        s.recovery = recovery_curve(&daemon_samples, &back, offset);
        s.recovery_interval_ms =
            (!a.recovery_interval.is_zero()).then_some(a.recovery_interval.as_millis() as u64);
        if s.recovery.is_empty() && !a.recovery_interval.is_zero() {
            s.errors.push(format!(
                "no recovery samples in {:.1} s",
                storm_wall.as_secs_f64()
            ));
        }
        s.back = back.len() as u64;
        s.t50_ms = rank(&back, 0.5);
        s.t90_ms = rank(&back, 0.9);
        s.t99_ms = rank(&back, 0.99);
        s.t100_ms = (s.not_back == 0).then(|| rank(&back, 1.0)).flatten();
        let state = |e: &Value, st: &str| e.get("state").and_then(Value::as_str) == Some(st);
        s.events_total = events.iter().filter(|e| e.get("seq").is_some()).count() as u64;
        s.online_events = events.iter().filter(|e| state(e, "online")).count() as u64;
        s.offline_events = events.iter().filter(|e| state(e, "offline")).count() as u64;
        s.agents_online_after = stat(&after, "agents_online");
        // Counter deltas; a restarted daemon counts from zero.
        let base = if a.kill_daemon { &None } else { &before };
        let delta = |k: &str| stat(&after, k).map(|x| x.saturating_sub(stat(base, k).unwrap_or(0)));
        s.handshakes = delta("handshakes_total");
        s.handshakes_resumed = delta("handshakes_resumed_total");
        s.admission_rejected = delta("admission_rejected_total");
        s.resumed_share = match (s.handshakes_resumed, s.handshakes) {
            (Some(r), Some(h)) if h > 0 => Some(round3(r as f64 / h as f64)),
            _ => None,
        };
        s.server_cpu_s = if a.kill_daemon {
            cpu1.map(round3)
        } else {
            cpu0.zip(cpu1).map(|(x, y)| round3(y - x))
        };
        s.per_server_cpu_s = s
            .server_cpu_s
            .filter(|c| *c > 0.0)
            .map(|cpu| (s.back as f64 / cpu).round());
        s.bound_ms =
            (c.rate_per_s > 0.0).then(|| (s.dropped as f64 / c.rate_per_s * 1000.0).round() as u64);
        if let Some(g) = group {
            g.close()?;
        }
        fleet.close()?;
        let mut r = base_result(t, n);
        r.connect = Some(c);
        r.heartbeat = Some(hb);
        r.storm = Some(s);
        r.undisturbed = undisturbed;
        // A restarted daemon counts from zero: its figures are in `storm`.
        if !a.kill_daemon {
            r.daemon = counter_delta(&before, &after);
        }
        Ok(r)
    })?;
    let report = env.report("storm", vec![n as u64], targets);
    env.print(&report)
}

pub fn upgrade(a: UpgradeArgs) -> Result<()> {
    let mut env = Env::new(a.common, a.agents)?;
    if !env.common.peers.is_empty() {
        env.notes
            .push("upgrade runs against presenced only: the peers have no upgrade verb".into());
        env.common.peers.clear();
    }
    if a.interval.is_zero() {
        bail!("--interval must be greater than 0");
    }
    if let Some(b) = &a.binary {
        if !b.is_file() {
            bail!("--binary {}: no such file", b.display());
        }
    }
    let n = a.agents;
    servers::become_subreaper();
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut fleet = spawn_fleet(env, t, n)?;
        let (c, _, _) = connect(env, &mut fleet, t, n, 0, env.common.rate)?;
        let p = t
            .presenced()
            .ok_or_else(|| anyhow!("upgrade needs presenced"))?;
        wait_stat(p, "sessions", c.online, Duration::from_secs(20));
        let ms = a.interval.as_millis() as u64;
        fleet.run(&ProgressBar::hidden(), Duration::from_secs(30), |_| {
            Cmd::Hold { interval_ms: ms }
        })?;
        let held = Instant::now();
        std::thread::sleep(a.before);
        let before = p.stats().ok();
        let seq = stat(&before, "events_next_seq").unwrap_or(0);
        let mut u = UpgradeResult {
            binary: a.binary.as_ref().map(|b| b.display().to_string()),
            old_pid: stat(&before, "pid"),
            agents: c.online,
            ..Default::default()
        };
        let t0 = Instant::now();
        match p.upgrade(a.binary.as_deref(), a.upgrade_timeout) {
            Ok(v) => {
                u.ok = v.get("ok").and_then(Value::as_bool) == Some(true);
                u.new_pid = v.get("new_pid").and_then(Value::as_u64);
                u.elapsed_ms = v.get("elapsed_ms").and_then(Value::as_u64);
                u.connections = v.get("connections").and_then(Value::as_u64);
                u.records = v.get("records").and_then(Value::as_u64);
                u.uncarried = v.get("uncarried").and_then(Value::as_u64);
                u.error = v.get("error").and_then(Value::as_str).map(String::from);
            }
            Err(e) => u.error = Some(format!("{e:#}")),
        }
        u.request_ms = t0.elapsed().as_millis() as u64;
        std::thread::sleep(a.after);
        let replies = fleet.run(&ProgressBar::hidden(), Duration::from_secs(60), |_| {
            Cmd::Release
        })?;
        let mut hb = heartbeats(replies, held.elapsed().as_secs_f64());
        hb.interval_ms = Some(ms);
        u.disconnects = hb.disconnects;
        u.reconnects = hb.reconnects;
        // The new process holds the ring now: read from the seq before.
        let after = p.stats().ok();
        u.sessions_after = stat(&after, "sessions");
        u.pid_after = stat(&after, "pid");
        let next = stat(&after, "events_next_seq").unwrap_or(seq);
        let last = (next > seq).then(|| next - 1);
        let limit = if last.is_some() {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(1)
        };
        let events = servers::EventSub::read_upto(&p.control, seq, last, limit)?;
        u.events_error = events
            .iter()
            .find_map(|e| e.get("error").and_then(Value::as_str).map(String::from));
        let state = |e: &Value, st: &str| e.get("state").and_then(Value::as_str) == Some(st);
        u.events_total = events.iter().filter(|e| e.get("seq").is_some()).count() as u64;
        u.offline_events = events.iter().filter(|e| state(e, "offline")).count() as u64;
        u.online_events = events.iter().filter(|e| state(e, "online")).count() as u64;
        fleet.close()?;
        let mut r = base_result(t, n);
        r.connect = Some(c);
        r.heartbeat = Some(hb);
        // Counters start again in the new process: deltas only without a switch.
        if u.old_pid == u.pid_after {
            r.daemon = counter_delta(&before, &after);
        }
        r.upgrade = Some(u);
        Ok(r)
    })?;
    let report = env.report("upgrade", vec![n as u64], targets);
    env.print(&report)
}

fn measure_point(
    t: &Target,
    agents: u64,
    server_connections: Option<u64>,
    p99: f64,
) -> Result<(DensityPoint, Option<Slab>)> {
    let mem = t.mem()?;
    let slab = Slab::read();
    Ok((
        DensityPoint {
            agents,
            server_connections,
            rss_bytes: mem.rss_bytes,
            heap_bytes: mem.heap_bytes,
            slab_bytes: slab.as_ref().map(Slab::total),
            tcp_mem_pages: kernel::tcp_mem_pages(),
            heartbeat_p99_ms: p99,
        },
        slab,
    ))
}

fn slope(points: &[DensityPoint], y: impl Fn(&DensityPoint) -> Option<u64>) -> Option<f64> {
    let pts: Option<Vec<(f64, f64)>> = points
        .iter()
        .map(|p| y(p).map(|v| (p.agents as f64, v as f64)))
        .collect();
    kernel::fit(&pts?).map(|(s, _)| s.round())
}

pub fn density(a: DensityArgs) -> Result<()> {
    let mut steps = a.agents.clone();
    if steps.is_empty() || steps.contains(&0) {
        bail!("--agents needs a comma list of positive counts");
    }
    if steps.windows(2).any(|w| w[1] <= w[0]) {
        bail!("--agents must be strictly ascending");
    }
    steps.dedup();
    let max = *steps.last().unwrap_or(&1);
    let mut env = Env::new(a.common, max)?;
    if Slab::read().is_none() {
        env.notes
            .push("/proc/slabinfo is not readable (not root): no kernel figures".into());
    }
    env.notes.push(
        "kernel slab figures cover both ends of each loopback connection (bench client + server); the server side is taken as half".into(),
    );
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut fleet = spawn_fleet(env, t, max)?;
        std::thread::sleep(a.settle);
        let conns0 = t.stats().and_then(|s| s.get("connections")?.as_u64());
        let (p0, slab0) = measure_point(t, 0, conns0, 0.0)?;
        let mut points = vec![p0];
        let mut have = 0usize;
        let mut tls = new_hist();
        let mut full = new_hist();
        let mut total = ConnectResult::default();
        let mut last_hb = HeartbeatResult::default();
        let mut last_slab = slab0.clone();
        for &n in &steps {
            let (c, th, fh) = connect(env, &mut fleet, t, n, have, env.common.rate)?;
            have = n;
            tls.add(&th)
                .map_err(|e| anyhow!("merging histograms: {e}"))?;
            full.add(&fh)
                .map_err(|e| anyhow!("merging histograms: {e}"))?;
            total.attempted += c.attempted;
            total.ok += c.ok;
            total.failed += c.failed;
            total.online = c.online;
            total.wall_s += c.wall_s;
            total.server_cpu_s = match (total.server_cpu_s, c.server_cpu_s) {
                (Some(a), Some(b)) => Some(round3(a + b)),
                (None, b) => b,
                (a, None) => a,
            };
            merge_errors(&mut total.errors, c.errors);
            let hb = heartbeat_round(env, &mut fleet, t.kind.name(), c.online, a.hb_spread)?;
            std::thread::sleep(a.settle);
            let conns = t
                .stats()
                .and_then(|s| s.get("connections").and_then(Value::as_u64));
            let (p, slab) = measure_point(t, hb.online, conns, hb.rtt_ms.p99)?;
            points.push(p);
            last_slab = slab;
            last_hb = hb;
        }
        total.rate_per_s = (total.ok as f64 / total.wall_s.max(1e-6)).round();
        total.per_server_cpu_s = total
            .server_cpu_s
            .filter(|c| *c > 0.0)
            .map(|c| (total.ok as f64 / c).round());
        total.tls_ms = Pct::from_us(&tls);
        total.full_ms = Pct::from_us(&full);
        let kernel_both = slope(&points, |p| p.slab_bytes);
        let mut top: Vec<(String, i64)> = match (&slab0, &last_slab) {
            (Some(a), Some(b)) => b
                .caches
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        *v as i64 - a.caches.get(k).copied().unwrap_or(0) as i64,
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        top.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        top.truncate(8);
        let d = DensityResult {
            rss_per_conn: slope(&points, |p| Some(p.rss_bytes)),
            heap_per_conn: slope(&points, |p| p.heap_bytes),
            kernel_per_conn_both_ends: kernel_both,
            kernel_per_conn_server: kernel_both.map(|k| (k / 2.0).round()),
            kernel_top_caches: top,
            points,
        };
        fleet.close()?;
        let mut r = base_result(t, max);
        r.connect = Some(total);
        r.heartbeat = Some(last_hb);
        r.density = Some(d);
        Ok(r)
    })?;
    let report = env.report(
        "density",
        steps.iter().map(|&n| n as u64).collect(),
        targets,
    );
    env.print(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ms: u64, sessions: Option<u64>) -> DaemonSample {
        DaemonSample {
            t: Duration::from_millis(ms),
            sessions,
            agents_online: sessions.map(|_| 10),
            agents_in_grace: sessions.map(|s| 10 - s),
        }
    }

    #[test]
    fn recovery_curve_counts_agents_back_by_each_sample() {
        let back = [50, 120, 120, 250, 900];
        let samples = [
            sample(0, Some(10)),
            sample(100, None),
            sample(200, Some(2)),
            sample(300, Some(4)),
            sample(1000, Some(5)),
        ];
        // Workers started 30 ms after the storm: 120 ms on their clock is 150 ms.
        let c = recovery_curve(&samples, &back, Duration::from_millis(30));
        let backs: Vec<u64> = c.iter().map(|r| r.back).collect();
        assert_eq!(backs, [0, 1, 3, 4, 5]);
        assert_eq!(c[1].t_s, 0.1);
        assert_eq!(c[1].sessions, None);
        assert_eq!(c[2].agents_in_grace, Some(8));
        assert!(recovery_curve(&[], &back, Duration::ZERO).is_empty());
    }

    #[test]
    fn sampler_without_an_interval_does_not_start() {
        assert!(
            StatsSampler::start(Path::new("/nonexistent"), Instant::now(), Duration::ZERO)
                .is_none()
        );
    }

    #[test]
    fn sampler_records_a_down_daemon_as_none() {
        let t0 = Instant::now();
        let s = StatsSampler::start(
            Path::new("/nonexistent/control.sock"),
            t0,
            Duration::from_millis(10),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let got = s.finish();
        assert!(!got.is_empty());
        assert!(
            got[0].t >= Duration::from_millis(10),
            "first tick one interval in"
        );
        assert!(got.iter().all(|d| d.sessions.is_none()));
        assert!(got.windows(2).all(|w| w[0].t < w[1].t));
    }
}
