//! Zero-drop binary upgrade, wired into the daemon.
//!
//! The mechanism (wire format, manifests, the prepare → quiesce → transfer
//! → confirm → commit state machine) is in [`crate::upgrade`]; this module
//! is the daemon's side of it:
//!
//! - Old process: `upgrade [<binary>]` on the control socket starts the new
//!   binary and runs [`crate::upgrade::machine::run_source`] on a std thread.
//!   That thread cannot touch the shards (they are glommio executors), so
//!   it asks the event shard over a socketpair ([`Step`] lines); the event
//!   shard performs each step over the shard mesh (freeze, barrier,
//!   quiesce, thaw, release) and leaves results in a shared [`Slot`].
//! - New process: `serve --upgrade-fd N` runs
//!   [`crate::upgrade::machine::run_target`] before any shard starts
//!   ([`DaemonTarget`]), then starts the shards with what it adopted.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{AsyncBufReadExt, AsyncWriteExt};
use glommio::net::UnixStream;
use tracing::{info, warn};

use crate::shard::{Adopted, Shard, UpgradeMsg};
use crate::upgrade::machine::{GlobalState, ShardSnapshot, Source, Target};
use crate::upgrade::manifest::{
    ConnHandoff, EventHandoff, Manifest, PresenceRecordHandoff, TicketKeys, PROTOCOL,
};

/// How long each wait for the peer may take during a hand-over.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// What the source thread asks the event shard to do, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Prepare,
    Quiesce(usize),
    Global,
    Thaw,
    Release,
}

impl Step {
    fn line(&self) -> String {
        match self {
            Step::Prepare => "prepare\n".into(),
            Step::Quiesce(i) => format!("quiesce {i}\n"),
            Step::Global => "global\n".into(),
            Step::Thaw => "thaw\n".into(),
            Step::Release => "release\n".into(),
        }
    }

    fn parse(line: &str) -> Option<Step> {
        let mut w = line.split_whitespace();
        match (w.next()?, w.next()) {
            ("prepare", None) => Some(Step::Prepare),
            ("quiesce", Some(i)) => i.parse().ok().map(Step::Quiesce),
            ("global", None) => Some(Step::Global),
            ("thaw", None) => Some(Step::Thaw),
            ("release", None) => Some(Step::Release),
            _ => None,
        }
    }
}

/// Results the event shard leaves for the source thread.
#[derive(Default)]
struct Slot {
    manifest_counts: (u64, u64, u64),
    snapshot: Option<ShardSnapshot>,
    global: Option<GlobalState>,
}

/// The old process's side, run on a std thread.
struct DaemonSource {
    ctl: BufReader<StdUnixStream>,
    slot: Arc<Mutex<Slot>>,
    child: Option<std::process::Child>,
    listen: String,
    shards: usize,
    config_path: PathBuf,
    listener_fds: Vec<i32>,
}

impl DaemonSource {
    fn ask(&mut self, step: Step) -> Result<(), String> {
        self.ctl
            .get_mut()
            .write_all(step.line().as_bytes())
            .map_err(|e| format!("{step:?}: event shard: {e}"))?;
        let mut line = String::new();
        self.ctl
            .read_line(&mut line)
            .map_err(|e| format!("{step:?}: event shard: {e}"))?;
        match line.trim() {
            "ok" => Ok(()),
            other => Err(format!("{step:?}: {other}")),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Source for DaemonSource {
    fn prepare(&mut self) -> Result<(), String> {
        self.ask(Step::Prepare)
    }

    fn manifest(&mut self) -> Manifest {
        let (connections_total, agents_total, next_event_seq) = self.slot().manifest_counts;
        Manifest {
            protocol: PROTOCOL,
            from_version: env!("CARGO_PKG_VERSION").into(),
            from_pid: std::process::id(),
            listen: self.listen.clone(),
            shards: self.shards,
            config_path: self.config_path.display().to_string(),
            connections_total,
            agents_total,
            next_event_seq,
        }
    }

    fn listeners(&mut self) -> Result<Vec<OwnedFd>, String> {
        self.listener_fds
            .iter()
            .map(|fd| {
                // SAFETY: the shards' listeners own these descriptors and
                // keep them open until this process exits.
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                borrowed
                    .try_clone_to_owned()
                    .map_err(|e| format!("dup listener {fd}: {e}"))
            })
            .collect()
    }

    fn quiesce_shard(&mut self, shard: usize) -> Result<ShardSnapshot, String> {
        self.ask(Step::Quiesce(shard))?;
        self.slot()
            .snapshot
            .take()
            .ok_or_else(|| format!("shard {shard} left no snapshot"))
    }

    fn global_state(&mut self) -> Result<GlobalState, String> {
        self.ask(Step::Global)?;
        self.slot()
            .global
            .take()
            .ok_or_else(|| "no global state".into())
    }

    fn stop_target(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn resume_all(&mut self, reason: &str) {
        warn!("upgrade failed, serving everything again: {reason}");
        if let Err(e) = self.ask(Step::Thaw) {
            warn!("thaw: {e}");
        }
        let _ = crate::upgrade::spawn::notify_main_pid(std::process::id());
    }

    fn finish(&mut self) {
        if let Err(e) = self.ask(Step::Release) {
            warn!("release: {e}");
        }
        // The child now serves; it is not ours to wait for.
        self.child.take();
    }
}

/// The outcome the control socket reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpgradeReport {
    pub ok: bool,
    pub new_pid: Option<u32>,
    pub connections: u64,
    pub records: u64,
    pub uncarried: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

/// Run a hand-over from the event shard: start `binary`, drive the source
/// machine on a std thread, perform its steps here. Returns the report;
/// on success the caller makes this process exit.
pub async fn upgrade(shard: &Rc<Shard>, binary: &Path) -> UpgradeReport {
    let started = std::time::Instant::now();
    let fail = |e: String| UpgradeReport {
        ok: false,
        new_pid: None,
        connections: 0,
        records: 0,
        uncarried: 0,
        elapsed_ms: started.elapsed().as_millis() as u64,
        error: Some(e),
    };
    let (ours, theirs) = match StdUnixStream::pair() {
        Ok(p) => p,
        Err(e) => return fail(format!("socketpair: {e}")),
    };
    let slot = Arc::new(Mutex::new(Slot::default()));
    let mut source = DaemonSource {
        ctl: BufReader::new(theirs),
        slot: slot.clone(),
        child: None,
        listen: shard.rt.listen.to_string(),
        shards: shard.nshards,
        config_path: shard.rt.config_path.clone(),
        listener_fds: shard.rt.listener_fds(),
    };
    let binary = binary.to_owned();
    let cpus = shard
        .rt
        .startup_cpus
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (done_tx, done_rx) = futures::channel::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("upgrade-source".into())
        .spawn(move || {
            // This thread inherited the event shard's pinning; the new
            // process must see the CPUs this one started with.
            unpin_current_thread(&cpus);
            let r = match crate::upgrade::spawn::spawn_target(&binary, &source.config_path) {
                Ok(spawned) => {
                    info!(binary = %binary.display(), pid = spawned.child.id(), "upgrade: new process started");
                    source.child = Some(spawned.child);
                    crate::upgrade::machine::run_source(spawned.sock, &mut source, STEP_TIMEOUT)
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            // Closing our end tells the event shard the machine is done.
            drop(source);
            let _ = done_tx.send(r);
        });
    if let Err(e) = thread {
        return fail(format!("upgrade thread: {e}"));
    }
    // Serve the machine's steps until it hangs up.
    // SAFETY: `ours` is a connected Unix stream socket we own.
    let ctl = unsafe { UnixStream::from_raw_fd(ours.into_raw_fd()) };
    let mut ctl = futures::io::BufReader::new(ctl);
    let mut uncarried = 0;
    loop {
        let mut line = String::new();
        match ctl.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let answer = match Step::parse(&line) {
            Some(step) => match perform(shard, &step, &slot).await {
                Ok(n) => {
                    uncarried += n;
                    "ok\n".to_owned()
                }
                Err(e) => format!("{}\n", e.replace('\n', " ")),
            },
            None => format!("unknown step {line:?}\n"),
        };
        if ctl.get_mut().write_all(answer.as_bytes()).await.is_err() {
            break;
        }
    }
    let outcome = done_rx.await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(Ok(o)) => UpgradeReport {
            ok: true,
            new_pid: Some(o.target_pid),
            connections: o.connections,
            records: o.records,
            uncarried,
            elapsed_ms,
            error: None,
        },
        Ok(Err(e)) => fail(e),
        Err(_) => fail("upgrade thread ended without a result".into()),
    }
}

/// Let the calling thread run on `cpus` (empty: leave it as it is).
fn unpin_current_thread(cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for c in cpus {
        let _ = set.set(*c);
    }
    if !cpus.is_empty() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Perform one step on the shards. Returns connections not carried.
async fn perform(shard: &Rc<Shard>, step: &Step, slot: &Arc<Mutex<Slot>>) -> Result<u64, String> {
    let n = shard.nshards;
    let gone = |what: &str| format!("{what}: a shard did not answer");
    match step {
        Step::Prepare => {
            for i in 0..n {
                shard
                    .ask(i, |reply| UpgradeMsg::Freeze { reply })
                    .await
                    .map_err(|_| gone("freeze"))?;
            }
            // Everything sent before the freeze has been handled.
            for i in 0..n {
                shard
                    .ask(i, |reply| UpgradeMsg::Barrier { reply })
                    .await
                    .map_err(|_| gone("barrier"))?;
            }
            let v = crate::control::socket::gather_stats(shard).await;
            let connections = v["connections"].as_u64().unwrap_or(0);
            let agents = v["agents_known"].as_u64().unwrap_or(0);
            let next_seq = v["events_next_seq"].as_u64().unwrap_or(0);
            slot.lock()
                .unwrap_or_else(|p| p.into_inner())
                .manifest_counts = (connections, agents, next_seq);
            Ok(0)
        }
        Step::Quiesce(i) if *i < n => {
            let snap = shard
                .ask(*i, |reply| UpgradeMsg::Quiesce { reply })
                .await
                .map_err(|_| gone("quiesce"))?;
            let uncarried = snap.uncarried;
            slot.lock().unwrap_or_else(|p| p.into_inner()).snapshot = Some(snap);
            Ok(uncarried)
        }
        Step::Quiesce(i) => Err(format!("no shard {i}")),
        Step::Global => {
            let log = shard.events.as_ref().ok_or("no event log on this shard")?;
            let (events, next_event_seq) = {
                let log = log.borrow();
                (log.export(), log.next_seq())
            };
            slot.lock().unwrap_or_else(|p| p.into_inner()).global = Some(GlobalState {
                events,
                next_event_seq,
                ticket_keys: TicketKeys {
                    keys: shard.rt.ticketer.keys().to_handoff(),
                },
            });
            Ok(0)
        }
        Step::Thaw => {
            for i in 0..n {
                shard.tell(i, UpgradeMsg::Thaw);
            }
            Ok(0)
        }
        Step::Release => {
            for i in 0..n {
                shard
                    .ask(i, |reply| UpgradeMsg::Release { reply })
                    .await
                    .map_err(|_| gone("release"))?;
            }
            Ok(0)
        }
    }
}

/// The new process's side: collects what the old one hands over, before
/// any shard runs.
pub struct DaemonTarget {
    config: crate::config::Config,
    shards: usize,
    pub listeners: Vec<OwnedFd>,
    pub adopted: Vec<Adopted>,
    /// Loaded in `ready` (before Confirm): a bad certificate aborts the
    /// hand-over while the old process can still resume.
    pub material: Option<crate::process::start::Material>,
    /// Bound in `commit`: the control socket path moves to this process.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// Session ticket keys from the old process (resumption keeps working).
    ticket_keys: Option<crate::tls::tickets::TicketKeys>,
}

impl DaemonTarget {
    pub fn new(config: crate::config::Config) -> Self {
        let shards = config.shard_count();
        Self {
            config,
            shards,
            listeners: Vec::new(),
            adopted: (0..shards).map(|_| Adopted::default()).collect(),
            material: None,
            control: None,
            ticket_keys: None,
        }
    }
}

impl Target for DaemonTarget {
    fn check_manifest(&mut self, manifest: &Manifest) -> Result<(), String> {
        manifest
            .check_local(self.shards, &self.config.server.listen.to_string())
            .map_err(|e| e.to_string())
    }

    fn adopt_listeners(&mut self, listeners: Vec<OwnedFd>) -> Result<(), String> {
        if listeners.len() != self.shards {
            return Err(format!(
                "{} listeners for {} shards",
                listeners.len(),
                self.shards
            ));
        }
        self.listeners = listeners;
        Ok(())
    }

    fn adopt_shard(
        &mut self,
        shard: usize,
        conns: Vec<(ConnHandoff, OwnedFd)>,
        records: Vec<PresenceRecordHandoff>,
    ) -> Result<(), String> {
        let a = self
            .adopted
            .get_mut(shard)
            .ok_or_else(|| format!("no shard {shard}"))?;
        a.conns = conns;
        a.records = records;
        if std::env::var("PRESENCED_TEST_FAIL_ADOPT_SHARD")
            .ok()
            .as_deref()
            == Some(&shard.to_string())
        {
            return Err(format!(
                "adopt shard {shard}: failing on purpose (PRESENCED_TEST_FAIL_ADOPT_SHARD)"
            ));
        }
        Ok(())
    }

    fn adopt_global(&mut self, global: GlobalState) -> Result<(), String> {
        let events: Vec<EventHandoff> = global.events;
        if !global.ticket_keys.keys.is_empty() {
            match crate::tls::tickets::TicketKeys::from_handoff(&global.ticket_keys.keys) {
                Ok(k) => self.ticket_keys = Some(k),
                Err(e) => {
                    warn!("handed-over ticket keys unusable, loading from the state dir: {e}")
                }
            }
        }
        self.adopted[0].events = Some((events, global.next_event_seq));
        Ok(())
    }

    fn ready(&mut self) -> Result<(), String> {
        let material = crate::process::start::Material::load_with_tickets(
            &self.config,
            self.ticket_keys.take(),
        )
        .map_err(|e| e.to_string())?;
        if std::env::var_os("PRESENCED_TEST_FAIL_READY").is_some() {
            return Err("ready: failing on purpose (PRESENCED_TEST_FAIL_READY)".into());
        }
        self.material = Some(material);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        let s = &self.config.server;
        let control =
            crate::control::socket::bind_with(&s.control_socket, s.control_group.as_deref(), true)
                .map_err(|e| e.to_string())?;
        self.control = Some(control);
        let _ = crate::upgrade::spawn::notify_takeover("took over from the previous process");
        Ok(())
    }
}
