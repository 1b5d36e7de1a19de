//! A worker process: holds up to a few thousand agents on one
//! current-thread tokio runtime (one task per agent, no thread per agent),
//! obeys the coordinator's commands from stdin and answers on stdout.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use presence_client::{Alpn, Backoff, ClientTls, FleetKey};
use rand::Rng;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::link::{Link, LinkCtx};
use crate::wire::{hist_to_data, new_hist, record, Cmd, Msg, TargetKind, WorkerInit};

/// A heartbeat without an answer within this time counts as a lost session.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a polite close when the worker is told to stop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often progress is reported while a command runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Most distinct error messages kept per command.
const MAX_ERRORS: usize = 5;

fn send(msg: &Msg) {
    let mut line = serde_json::to_string(msg).unwrap_or_else(|e| {
        format!("{{\"msg\":\"fatal\",\"error\":\"cannot encode reply: {e}\"}}")
    });
    line.push('\n');
    let mut out = std::io::stdout().lock();
    // The coordinator going away ends the worker via stdin EOF.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Raise the soft open-files limit to the hard limit.
pub fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(NOFILE)")?;
    }
    Ok(hard)
}

#[derive(Debug, Clone, Copy)]
enum PhaseKind {
    Idle,
    Round {
        spread: Duration,
    },
    Steady {
        interval: Duration,
        until: Instant,
    },
    Storm {
        t0: Instant,
        backoff: Backoff,
        deadline: Instant,
        share: f64,
    },
    Close,
}

/// Whether agent `local` is one of the `share` that drop in a storm: a
/// fixed pseudo-random choice per index, so a given share always picks
/// the same agents and is spread over ids (and so over shards).
pub fn selected(local: usize, share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    let h = (local as u64 ^ 0x5DEE_CE66_D1CE_4E5B).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < share
}

#[derive(Debug, Clone, Copy)]
struct Phase {
    epoch: u64,
    kind: PhaseKind,
}

/// Per-agent behaviour between phase changes.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Idle,
    Once,
    Steady { interval: Duration, until: Instant },
}

struct Shared {
    init: WorkerInit,
    ctx: LinkCtx,
    keepalive: Duration,
    connect_timeout: Duration,
    phase: watch::Sender<Phase>,
    spawned: Cell<usize>,
    online: Cell<u64>,
    ok: Cell<u64>,
    failed: Cell<u64>,
    disconnects: Cell<u64>,
    reconnects: Cell<u64>,
    retried: Cell<u64>,
    failed_attempts: Cell<u64>,
    not_back: Cell<u64>,
    dropped: Cell<u64>,
    /// Agents measuring heartbeat gaps right now (Steady / Hold).
    tracking: Cell<u64>,
    /// Which agents hold a session, by local index.
    alive: RefCell<Vec<bool>>,
    tls_h: RefCell<Histogram<u64>>,
    full_h: RefCell<Histogram<u64>>,
    rtt_h: RefCell<Histogram<u64>>,
    gap_h: RefCell<Histogram<u64>>,
    back_ms: RefCell<Vec<u32>>,
    errors: RefCell<Vec<String>>,
}

impl Shared {
    fn agent_id(&self, local: usize) -> String {
        format!(
            "{}-{:07}",
            self.init.id_prefix,
            self.init.first_agent + local
        )
    }

    fn source(&self, local: usize) -> Option<IpAddr> {
        let ips = &self.init.source_ips;
        (!ips.is_empty()).then(|| ips[local % ips.len()])
    }

    fn error(&self, e: impl std::fmt::Display) {
        let mut errs = self.errors.borrow_mut();
        if errs.len() < MAX_ERRORS {
            let s = e.to_string();
            if !errs.contains(&s) {
                errs.push(s);
            }
        }
    }

    fn reset(&self) {
        self.ok.set(0);
        self.failed.set(0);
        self.disconnects.set(0);
        self.reconnects.set(0);
        self.retried.set(0);
        self.failed_attempts.set(0);
        self.not_back.set(0);
        self.dropped.set(0);
        self.tls_h.borrow_mut().reset();
        self.full_h.borrow_mut().reset();
        self.rtt_h.borrow_mut().reset();
        self.gap_h.borrow_mut().reset();
        self.back_ms.borrow_mut().clear();
        self.errors.borrow_mut().clear();
    }

    fn publish(&self, kind: PhaseKind) {
        self.phase.send_modify(|p| {
            p.epoch += 1;
            p.kind = kind;
        });
    }

    fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.errors.borrow_mut())
    }

    /// Agent `local` lost (or closed) its session.
    fn down(&self, local: usize) {
        self.online.set(self.online.get().saturating_sub(1));
        if let Some(a) = self.alive.borrow_mut().get_mut(local) {
            *a = false;
        }
    }

    /// Agent `local` holds a session (its WELCOME came back).
    fn up(&self, local: usize) {
        self.online.set(self.online.get() + 1);
        if let Some(a) = self.alive.borrow_mut().get_mut(local) {
            *a = true;
        }
    }

    /// The client config agent `local` uses for all its connects: shared
    /// without resumption; its own (with its own session cache) with it.
    fn agent_tls(&self) -> Arc<ClientConfig> {
        if self.init.resumption {
            let mut cfg = (*self.ctx.tls).clone();
            cfg.resumption = rustls::client::Resumption::in_memory_sessions(4);
            Arc::new(cfg)
        } else {
            self.ctx.tls.clone()
        }
    }
}

/// Heartbeat-gap bookkeeping of one agent during Steady / Hold.
#[derive(Debug, Clone, Copy)]
struct Gap {
    last: Instant,
    max: Duration,
}

impl Gap {
    fn start(sh: &Shared) -> Gap {
        sh.tracking.set(sh.tracking.get() + 1);
        Gap {
            last: Instant::now(),
            max: Duration::ZERO,
        }
    }

    fn ack(&mut self) {
        let now = Instant::now();
        self.max = self.max.max(now - self.last);
        self.last = now;
    }

    /// End of the phase: the open interval counts too.
    fn finish(mut self, sh: &Shared) {
        self.ack();
        record(&mut sh.gap_h.borrow_mut(), self.max.as_micros() as u64);
        sh.tracking.set(sh.tracking.get().saturating_sub(1));
    }
}

fn jitter(d: Duration) -> Duration {
    // +-10 %
    d.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
}

fn random_upto(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    d.mul_f64(rand::thread_rng().gen_range(0.0..1.0))
}

/// Reconnect with full-jitter backoff until `deadline`; None if the worker
/// is closing or the deadline passed.
async fn reconnect(
    sh: &Shared,
    tls: &Arc<ClientConfig>,
    id: &str,
    src: Option<IpAddr>,
    backoff: Backoff,
    deadline: Instant,
    rx: &mut watch::Receiver<Phase>,
) -> Option<Link> {
    let mut attempt = 0u32;
    loop {
        let delay = backoff.delay(attempt, &mut rand::thread_rng());
        let wake = (Instant::now() + delay).min(deadline);
        loop {
            tokio::select! {
                _ = sleep_until(wake) => break,
                r = rx.changed() => {
                    if r.is_err() || matches!(rx.borrow().kind, PhaseKind::Close) {
                        return None;
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(
            sh.connect_timeout.min(left),
            Link::connect(&sh.ctx, tls, id, src),
        )
        .await
        {
            Ok(Ok((link, _))) => return Some(link),
            Ok(Err(e)) => sh.error(format!("{e:#}")),
            Err(_) => sh.error("connect timed out"),
        }
        sh.failed_attempts.set(sh.failed_attempts.get() + 1);
        attempt = attempt.saturating_add(1);
    }
}

async fn agent(sh: Rc<Shared>, local: usize, permit: OwnedSemaphorePermit) {
    let id = sh.agent_id(local);
    let src = sh.source(local);
    let tls = sh.agent_tls();
    let mut rx = sh.phase.subscribe();
    let mut seen = rx.borrow_and_update().epoch;
    let mut permit = Some(permit);
    let retries = sh.init.connect_retries;
    let retry_backoff = Backoff {
        initial: Duration::from_millis(sh.init.retry_backoff.initial_ms),
        max: Duration::from_millis(sh.init.retry_backoff.max_ms),
    };
    let mut attempt = 0u32;
    let mut link = loop {
        let res = timeout(sh.connect_timeout, Link::connect(&sh.ctx, &tls, &id, src)).await;
        permit.take();
        match res {
            Ok(Ok((link, times))) => {
                record(&mut sh.tls_h.borrow_mut(), times.tls.as_micros() as u64);
                record(&mut sh.full_h.borrow_mut(), times.full.as_micros() as u64);
                sh.ok.set(sh.ok.get() + 1);
                sh.up(local);
                break link;
            }
            Ok(Err(e)) => sh.error(format!("{e:#}")),
            Err(_) => sh.error("connect timed out"),
        }
        if attempt >= retries {
            sh.failed.set(sh.failed.get() + 1);
            return;
        }
        sh.retried.set(sh.retried.get() + 1);
        sleep(retry_backoff.delay(attempt, &mut rand::thread_rng())).await;
        attempt += 1;
    };
    let mut mode = Mode::Idle;
    let mut gap: Option<Gap> = None;
    let mut next = Instant::now() + random_upto(sh.keepalive);
    let mut seq = 0u32;
    loop {
        let phase = *rx.borrow_and_update();
        if phase.epoch != seen {
            seen = phase.epoch;
            let keeps_link =
                matches!(phase.kind, PhaseKind::Storm { share, .. } if !selected(local, share));
            if !keeps_link {
                if let Some(g) = gap.take() {
                    g.finish(&sh);
                }
            }
            match phase.kind {
                PhaseKind::Close => {
                    let _ = timeout(CLOSE_TIMEOUT, link.close()).await;
                    sh.down(local);
                    return;
                }
                PhaseKind::Idle => mode = Mode::Idle,
                PhaseKind::Round { spread } => {
                    mode = Mode::Once;
                    next = Instant::now() + random_upto(spread);
                }
                PhaseKind::Steady { interval, until } => {
                    mode = Mode::Steady { interval, until };
                    gap = Some(Gap::start(&sh));
                    next = Instant::now() + random_upto(interval);
                }
                PhaseKind::Storm { .. } if keeps_link => {}
                PhaseKind::Storm {
                    t0,
                    backoff,
                    deadline,
                    ..
                } => {
                    link.abort();
                    sh.down(local);
                    sh.dropped.set(sh.dropped.get() + 1);
                    match reconnect(&sh, &tls, &id, src, backoff, deadline, &mut rx).await {
                        Some(l) => {
                            let ms = u32::try_from(t0.elapsed().as_millis()).unwrap_or(u32::MAX);
                            sh.back_ms.borrow_mut().push(ms);
                            sh.up(local);
                            link = l;
                        }
                        None => {
                            sh.not_back.set(sh.not_back.get() + 1);
                            return;
                        }
                    }
                    mode = Mode::Idle;
                    next = Instant::now() + random_upto(sh.keepalive);
                    continue;
                }
            }
        }
        tokio::select! {
            _ = sleep_until(next) => {}
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        }
        seq = seq.wrapping_add(1);
        match timeout(HEARTBEAT_TIMEOUT, link.heartbeat(seq)).await {
            Ok(Ok(rtt)) => match mode {
                Mode::Once | Mode::Steady { .. } => {
                    record(&mut sh.rtt_h.borrow_mut(), rtt.as_micros() as u64);
                    sh.ok.set(sh.ok.get() + 1);
                    if let Some(g) = gap.as_mut() {
                        g.ack();
                    }
                    if matches!(mode, Mode::Once) {
                        mode = Mode::Idle;
                    }
                }
                Mode::Idle => {}
            },
            r => {
                match r {
                    Ok(Err(e)) => sh.error(format!("heartbeat: {e:#}")),
                    _ => sh.error("heartbeat timed out"),
                }
                sh.disconnects.set(sh.disconnects.get() + 1);
                sh.down(local);
                if !matches!(mode, Mode::Idle) {
                    sh.failed.set(sh.failed.get() + 1);
                }
                if matches!(mode, Mode::Once) {
                    mode = Mode::Idle;
                }
                let deadline = Instant::now() + Duration::from_secs(60);
                match reconnect(&sh, &tls, &id, src, Backoff::default(), deadline, &mut rx).await {
                    Some(l) => {
                        link = l;
                        sh.up(local);
                        sh.reconnects.set(sh.reconnects.get() + 1);
                    }
                    None => {
                        if let Some(g) = gap.take() {
                            g.finish(&sh);
                        }
                        return;
                    }
                }
            }
        }
        let now = Instant::now();
        next = match mode {
            Mode::Steady { interval, until } => {
                let n = now + jitter(interval);
                if n >= until {
                    mode = Mode::Idle;
                    if let Some(g) = gap.take() {
                        g.finish(&sh);
                    }
                    now + jitter(sh.keepalive)
                } else {
                    n
                }
            }
            _ => now + jitter(sh.keepalive),
        };
    }
}

/// Wait until `done()` or `limit`, reporting progress.
async fn wait_for(
    limit: Duration,
    done: impl Fn() -> bool,
    progress: impl Fn() -> (u64, u64),
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        let (d, f) = progress();
        send(&Msg::Progress { done: d, failed: f });
        sleep(PROGRESS_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

async fn do_connect(sh: &Rc<Shared>, upto: usize, rate: f64, concurrency: usize) -> Msg {
    sh.reset();
    let start = Instant::now();
    let upto = upto.min(sh.init.agents);
    let first = sh.spawned.get();
    let n = upto.saturating_sub(first);
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut last = Instant::now();
    for k in 0..n {
        if rate > 0.0 {
            sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        tokio::task::spawn_local(agent(sh.clone(), first + k, permit));
        sh.spawned.set(first + k + 1);
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            send(&Msg::Progress {
                done: sh.ok.get(),
                failed: sh.failed.get(),
            });
        }
    }
    let total = n as u64;
    let retries = sh.init.connect_retries;
    let per_try = sh.connect_timeout + Duration::from_millis(sh.init.retry_backoff.max_ms);
    wait_for(
        per_try * retries.saturating_add(1) + Duration::from_secs(5),
        || sh.ok.get() + sh.failed.get() >= total,
        || (sh.ok.get(), sh.failed.get()),
    )
    .await;
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let pending = total.saturating_sub(sh.ok.get() + sh.failed.get());
    Msg::Connected {
        ok: sh.ok.get(),
        failed: sh.failed.get() + pending,
        retried: sh.retried.get(),
        online: sh.online.get(),
        elapsed_ms,
        tls_us: hist_to_data(&sh.tls_h.borrow()),
        full_us: hist_to_data(&sh.full_h.borrow()),
        errors: sh.take_errors(),
    }
}

fn heartbeats_msg(sh: &Shared) -> Msg {
    Msg::Heartbeats {
        ok: sh.ok.get(),
        failed: sh.failed.get(),
        rtt_us: hist_to_data(&sh.rtt_h.borrow()),
        disconnects: sh.disconnects.get(),
        reconnects: sh.reconnects.get(),
        online: sh.online.get(),
        gap_us: hist_to_data(&sh.gap_h.borrow()),
        errors: sh.take_errors(),
    }
}

async fn handle(sh: &Rc<Shared>, cmd: Cmd) -> Msg {
    match cmd {
        Cmd::Connect {
            upto,
            rate,
            concurrency,
        } => do_connect(sh, upto, rate, concurrency).await,
        Cmd::HeartbeatRound { spread_ms } => {
            sh.reset();
            let expected = sh.online.get();
            let spread = Duration::from_millis(spread_ms);
            sh.publish(PhaseKind::Round { spread });
            wait_for(
                spread + HEARTBEAT_TIMEOUT + Duration::from_secs(2),
                || sh.ok.get() + sh.failed.get() >= expected,
                || (sh.ok.get(), sh.failed.get()),
            )
            .await;
            heartbeats_msg(sh)
        }
        Cmd::Steady {
            duration_ms,
            interval_ms,
        } => {
            sh.reset();
            let duration = Duration::from_millis(duration_ms);
            let until = Instant::now() + duration;
            sh.publish(PhaseKind::Steady {
                interval: Duration::from_millis(interval_ms.max(1)),
                until,
            });
            // Heartbeats started before `until` get time to be answered.
            wait_for(
                duration + Duration::from_secs(1),
                || false,
                || (sh.ok.get(), sh.failed.get()),
            )
            .await;
            heartbeats_msg(sh)
        }
        Cmd::Hold { interval_ms } => {
            sh.reset();
            sh.publish(PhaseKind::Steady {
                interval: Duration::from_millis(interval_ms.max(1)),
                // Until `Release`.
                until: Instant::now() + Duration::from_secs(86_400),
            });
            Msg::Holding {
                online: sh.online.get(),
            }
        }
        Cmd::Release => {
            sh.publish(PhaseKind::Idle);
            // Agents waiting for an answer see the change when it comes.
            wait_for(
                HEARTBEAT_TIMEOUT + Duration::from_secs(1),
                || sh.tracking.get() == 0,
                || (sh.ok.get(), sh.failed.get()),
            )
            .await;
            heartbeats_msg(sh)
        }
        Cmd::Storm {
            backoff,
            deadline_ms,
            drop_share,
        } => {
            sh.reset();
            let share = drop_share.clamp(0.0, 1.0);
            let expected = sh
                .alive
                .borrow()
                .iter()
                .enumerate()
                .filter(|(i, a)| **a && selected(*i, share))
                .count() as u64;
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_millis(deadline_ms);
            sh.publish(PhaseKind::Storm {
                t0,
                backoff: Backoff {
                    initial: Duration::from_millis(backoff.initial_ms),
                    max: Duration::from_millis(backoff.max_ms),
                },
                deadline,
                share,
            });
            wait_for(
                Duration::from_millis(deadline_ms) + Duration::from_secs(2),
                || sh.back_ms.borrow().len() as u64 + sh.not_back.get() >= expected,
                || (sh.back_ms.borrow().len() as u64, sh.failed_attempts.get()),
            )
            .await;
            let back_ms = std::mem::take(&mut *sh.back_ms.borrow_mut());
            let not_back = expected.saturating_sub(back_ms.len() as u64);
            Msg::Storm {
                back_ms,
                not_back,
                dropped: sh.dropped.get(),
                failed_attempts: sh.failed_attempts.get(),
                errors: sh.take_errors(),
            }
        }
        Cmd::Close => {
            sh.publish(PhaseKind::Close);
            wait_for(
                CLOSE_TIMEOUT + Duration::from_secs(1),
                || sh.online.get() == 0,
                || (0, 0),
            )
            .await;
            Msg::Closed
        }
    }
}

fn build_shared(init: WorkerInit) -> Result<Shared> {
    let alpn = match init.target {
        TargetKind::Presenced => Alpn::Presence,
        TargetKind::Nats | TargetKind::Mqtt => Alpn::None,
    };
    let tls = ClientTls::from_ca_pem(init.ca_pem.as_bytes())
        .context("CA certificate")?
        .alpn(alpn)
        .build()
        .context("TLS client config")?;
    let tls = if init.resumption {
        tls
    } else {
        let mut cfg = (*tls).clone();
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    };
    let fleet_key = match &init.fleet_key {
        Some(text) => Some(FleetKey::parse(text).map_err(|e| anyhow::anyhow!("fleet key: {e}"))?),
        None => None,
    };
    let server_name = ServerName::try_from(init.server_name.clone())
        .with_context(|| format!("invalid server name {:?}", init.server_name))?;
    let keepalive = Duration::from_millis(init.keepalive_ms.max(100));
    let ctx = LinkCtx {
        target: init.target,
        addr: init.addr,
        server_name,
        server_name_str: init.server_name.clone(),
        tls,
        fleet_key,
        mqtt_keepalive_s: u16::try_from((keepalive.as_secs() * 2).max(1)).unwrap_or(u16::MAX),
    };
    let (phase, _) = watch::channel(Phase {
        epoch: 0,
        kind: PhaseKind::Idle,
    });
    let agents = init.agents;
    Ok(Shared {
        connect_timeout: Duration::from_millis(init.connect_timeout_ms.max(100)),
        keepalive,
        init,
        ctx,
        phase,
        spawned: Cell::new(0),
        online: Cell::new(0),
        ok: Cell::new(0),
        failed: Cell::new(0),
        disconnects: Cell::new(0),
        reconnects: Cell::new(0),
        retried: Cell::new(0),
        failed_attempts: Cell::new(0),
        not_back: Cell::new(0),
        dropped: Cell::new(0),
        tracking: Cell::new(0),
        alive: RefCell::new(vec![false; agents]),
        tls_h: RefCell::new(new_hist()),
        full_h: RefCell::new(new_hist()),
        rtt_h: RefCell::new(new_hist()),
        gap_h: RefCell::new(new_hist()),
        back_ms: RefCell::new(Vec::new()),
        errors: RefCell::new(Vec::new()),
    })
}

async fn main_loop() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .context("reading init")?
        .context("no init line on stdin")?;
    let init: WorkerInit = serde_json::from_str(&first).context("parsing init")?;
    if init.nice != 0 {
        // SAFETY: setpriority has no memory preconditions.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, init.nice) };
        if r != 0 {
            anyhow::bail!(
                "setpriority({}): {}",
                init.nice,
                std::io::Error::last_os_error()
            );
        }
    }
    let sh = Rc::new(build_shared(init)?);
    send(&Msg::Ready {
        pid: std::process::id(),
    });
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if line.trim().is_empty() {
            continue;
        }
        let cmd: Cmd =
            serde_json::from_str(&line).with_context(|| format!("parsing command {line:?}"))?;
        let is_close = matches!(cmd, Cmd::Close);
        let reply = handle(&sh, cmd).await;
        send(&reply);
        if is_close {
            break;
        }
    }
    Ok(())
}

/// Entry point of `presence-bench worker`.
pub fn run() -> Result<()> {
    let result = (|| {
        raise_nofile()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, main_loop())
    })();
    if let Err(e) = &result {
        send(&Msg::Fatal {
            error: format!("{e:#}"),
        });
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_share_picks_about_that_share() {
        let n = 10_000;
        let half = (0..n).filter(|&i| selected(i, 0.5)).count();
        assert!((4_700..=5_300).contains(&half), "{half}");
        assert_eq!((0..n).filter(|&i| selected(i, 1.0)).count(), n);
        assert_eq!((0..n).filter(|&i| selected(i, 0.0)).count(), 0);
        // A smaller share is a subset of a larger one.
        assert!((0..n).all(|i| !selected(i, 0.2) || selected(i, 0.6)));
    }
}
