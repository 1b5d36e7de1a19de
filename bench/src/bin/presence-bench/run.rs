//! The scenarios, as run by the coordinator.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::fleet::{ip_slice, share, Fleet};
use crate::kernel::{self, Slab};
use crate::report::{
    round3, ConnectResult, DensityPoint, DensityResult, HeartbeatResult, Pct, Report, StormResult,
    TargetResult,
};
use crate::servers::{self, Mem, Peer, Presenced, SpawnOpts};
use crate::wire::{merge_into, new_hist, BackoffSpec, Cmd, Msg, TargetKind, WorkerInit};
use crate::{parse_source_ips, Common, DensityArgs, PeerArg, RampArgs, SteadyArgs, StormArgs};

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
    let inits = (0..w)
        .map(|i| WorkerInit {
            worker: i,
            target: t.kind,
            addr: t.addr(),
            server_name: "localhost".into(),
            ca_pem: t.ca_pem.clone(),
            fleet_key: t.fleet_key.clone(),
            id_prefix: format!("{}-w{i}", env.common.id_prefix),
            first_agent: (0..i).map(|j| share(agents, w, j)).sum(),
            agents: share(agents, w, i),
            source_ips: ip_slice(&env.ips, w, i),
            keepalive_ms: env.common.keepalive.as_millis() as u64,
            connect_timeout_ms: env.common.connect_timeout.as_millis() as u64,
            resumption: env.common.resumption,
        })
        .collect();
    Fleet::spawn(inits)
}

/// Connect until the fleet holds `upto` agents.
fn connect(
    env: &Env,
    fleet: &mut Fleet,
    t: &Target,
    upto: usize,
    already: usize,
) -> Result<(ConnectResult, Histogram<u64>, Histogram<u64>)> {
    let name = t.kind.name();
    let pid = t.pid();
    let cpu0 = pid.and_then(servers::proc_cpu_s);
    let w = fleet.len();
    let pb = env.bar(
        upto.saturating_sub(already) as u64,
        format!("{name}: connect {upto}"),
    );
    let rate = env.common.rate / w as f64;
    let conc = env.common.concurrency.div_ceil(w).max(1);
    let limit = env.common.connect_timeout
        + Duration::from_secs(120)
        + if rate > 0.0 {
            Duration::from_secs_f64(upto as f64 / env.common.rate)
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
            online,
            tls_us,
            full_us,
            errors,
            ..
        } = m
        {
            r.ok += ok;
            r.failed += failed;
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
    let mut r = HeartbeatResult::default();
    for m in replies {
        if let Msg::Heartbeats {
            ok,
            failed,
            rtt_us,
            disconnects,
            online,
            errors,
        } = m
        {
            r.ok += ok;
            r.failed += failed;
            r.disconnects += disconnects;
            r.online += online;
            merge_into(&mut h, &rtt_us);
            merge_errors(&mut r.errors, errors);
        }
    }
    r.rate_per_s = (r.ok as f64 / seconds.max(1e-6)).round();
    r.rtt_ms = Pct::from_us(&h);
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
];

fn counter_delta(before: &Option<Value>, after: &Option<Value>) -> Option<Value> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    let mut m = serde_json::Map::new();
    for k in COUNTERS {
        let x = a.get(*k).and_then(Value::as_u64).unwrap_or(0);
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
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut fleet = spawn_fleet(env, t, n)?;
        let before = t.stats();
        let (c, _, _) = connect(env, &mut fleet, t, n, 0)?;
        let after = t.stats();
        fleet.close()?;
        let mut r = base_result(t, n);
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
        let (c, _, _) = connect(env, &mut fleet, t, n, 0)?;
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

pub fn storm(a: StormArgs) -> Result<()> {
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
    let n = a.agents;
    let targets = each_target(&mut env, Duration::from_secs(60), |env, t| {
        let mut fleet = spawn_fleet(env, t, n)?;
        let (c, _, _) = connect(env, &mut fleet, t, n, 0)?;
        let hb = heartbeat_round(
            env,
            &mut fleet,
            t.kind.name(),
            c.online,
            Duration::from_secs(1),
        )?;
        let p = t
            .presenced()
            .ok_or_else(|| anyhow!("storm needs presenced"))?;
        // Wait for the daemon to count every session.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut online_before = 0;
        while Instant::now() < deadline {
            let s = p.stats()?;
            online_before = s.get("agents_online").and_then(Value::as_u64).unwrap_or(0);
            if online_before >= c.online {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let seq = p
            .stats()?
            .get("events_next_seq")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mut subs = vec![servers::EventSub::start(&p.control, seq)?];
        let backoff = BackoffSpec {
            initial_ms: a.backoff_initial.as_millis() as u64,
            max_ms: a.backoff_max.as_millis() as u64,
        };
        let cmd = Cmd::Storm {
            backoff,
            deadline_ms: a.deadline.as_millis() as u64,
        };
        let pb = env.bar(c.online, "presenced: storm, back online");
        let limit = a.deadline + Duration::from_secs(30);
        let mut restart_ms = None;
        let mut durable_seq = false;
        let replies = if a.kill_daemon {
            let t0 = Instant::now();
            p.kill9()?;
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
                // A daemon that keeps its event sequence across restarts
                // still holds `seq`: read on from there (duplicates of what
                // the first subscription saw are dropped below). Otherwise
                // its numbering restarted: read everything it holds.
                let st = p.stats()?;
                let get = |k: &str| st.get(k).and_then(Value::as_u64).unwrap_or(0);
                let (oldest, next) = (get("events_oldest_seq"), get("events_next_seq"));
                durable_seq = oldest <= seq && seq <= next && next > 0;
                let from = if durable_seq { seq } else { 0 };
                subs.push(servers::EventSub::start(&p.control, from)?);
                let _ = rx.recv();
                h.join().map_err(|_| anyhow!("storm thread panicked"))?
            });
            started?
        } else {
            fleet.run(&pb, limit, |_| cmd.clone())?
        };
        pb.finish_and_clear();
        std::thread::sleep(a.events_grace);
        let mut events: Vec<Value> = subs.into_iter().flat_map(|s| s.finish()).collect();
        if durable_seq {
            let mut seen = std::collections::HashSet::new();
            events.retain(|e| {
                e.get("seq")
                    .and_then(Value::as_u64)
                    .is_none_or(|q| seen.insert(q))
            });
        }
        let after = p.stats().ok();
        let mut back: Vec<u32> = Vec::new();
        let mut s = StormResult {
            mode: if a.kill_daemon {
                "kill-daemon"
            } else {
                "drop-all"
            }
            .into(),
            agents: c.online,
            restart_ms,
            ..Default::default()
        };
        for m in replies {
            if let Msg::Storm {
                back_ms,
                not_back,
                failed_attempts,
                errors,
            } = m
            {
                back.extend(back_ms);
                s.not_back += not_back;
                s.failed_attempts += failed_attempts;
                merge_errors(&mut s.errors, errors);
            }
        }
        back.sort_unstable();
        s.back = back.len() as u64;
        s.t50_ms = rank(&back, 0.5);
        s.t90_ms = rank(&back, 0.9);
        s.t99_ms = rank(&back, 0.99);
        s.t100_ms = (s.not_back == 0).then(|| rank(&back, 1.0)).flatten();
        let state = |e: &Value, st: &str| e.get("state").and_then(Value::as_str) == Some(st);
        s.events_total = events.iter().filter(|e| e.get("seq").is_some()).count() as u64;
        s.online_events = events.iter().filter(|e| state(e, "online")).count() as u64;
        s.offline_events = events.iter().filter(|e| state(e, "offline")).count() as u64;
        s.agents_online_after = after
            .as_ref()
            .and_then(|v| v.get("agents_online"))
            .and_then(Value::as_u64);
        let _ = online_before;
        fleet.close()?;
        let mut r = base_result(t, n);
        r.connect = Some(c);
        r.heartbeat = Some(hb);
        r.storm = Some(s);
        Ok(r)
    })?;
    let report = env.report("storm", vec![n as u64], targets);
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
            let (c, th, fh) = connect(env, &mut fleet, t, n, have)?;
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
