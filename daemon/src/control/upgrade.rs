//! Zero-drop binary upgrade, the old process's (source) side.
//!
//! The mechanism (wire format, manifests, the prepare → quiesce → transfer
//! → confirm → commit state machine) is in [`crate::upgrade`]. Here,
//! `upgrade [<binary>]` on the control socket starts the new binary and
//! runs [`crate::upgrade::machine::run_source`] on a std thread. That thread
//! cannot touch the shards (they are glommio executors), so it asks the
//! event shard over a socketpair ([`SourceCommand`] lines); the event shard
//! performs each command over the shard mesh (freeze, barrier, quiesce,
//! thaw, release) and leaves results in a shared [`Slot`].
//!
//! The new process's (target) side is `process::adopt::DaemonTarget`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use futures::io::{AsyncBufReadExt, AsyncWriteExt};
use glommio::net::UnixStream;
use thiserror::Error;
use tracing::{info, warn};

use crate::shard::{Shard, UpgradeMsg};
use crate::upgrade::machine::{GlobalState, ShardSnapshot, Source, SourceOutcome, UpgradeError};
use crate::upgrade::manifest::{Manifest, TicketKeys, PROTOCOL};
use crate::upgrade::spawn::SpawnError;
use crate::upgrade::STEP_TIMEOUT;

/// What the source thread asks the event shard to do, one line each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCommand {
    Prepare,
    Quiesce(usize),
    Global,
    Thaw,
    Release,
}

impl SourceCommand {
    fn line(&self) -> String {
        match self {
            SourceCommand::Prepare => "prepare\n".into(),
            SourceCommand::Quiesce(i) => format!("quiesce {i}\n"),
            SourceCommand::Global => "global\n".into(),
            SourceCommand::Thaw => "thaw\n".into(),
            SourceCommand::Release => "release\n".into(),
        }
    }

    fn parse(line: &str) -> Option<SourceCommand> {
        let mut w = line.split_whitespace();
        match (w.next()?, w.next()) {
            ("prepare", None) => Some(SourceCommand::Prepare),
            ("quiesce", Some(i)) => i.parse().ok().map(SourceCommand::Quiesce),
            ("global", None) => Some(SourceCommand::Global),
            ("thaw", None) => Some(SourceCommand::Thaw),
            ("release", None) => Some(SourceCommand::Release),
            _ => None,
        }
    }
}

/// The source thread's failures (their text becomes the Abort reason).
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{command:?}: event shard: {source}")]
    EventShard {
        command: SourceCommand,
        source: std::io::Error,
    },
    /// The event shard answered with this instead of `ok`.
    #[error("{command:?}: {answer}")]
    Refused {
        command: SourceCommand,
        answer: String,
    },
    #[error("dup listener {fd}: {source}")]
    DupListener { fd: i32, source: std::io::Error },
    #[error("shard {0} left no snapshot")]
    NoSnapshot(usize),
    #[error("no global state")]
    NoGlobalState,
}

/// Why the event shard could not perform a command.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("{0}: a shard did not answer")]
    ShardGone(&'static str),
    #[error("no shard {0}")]
    NoShard(usize),
    #[error("no event log on this shard")]
    NoEventLog,
}

/// Why a hand-over did not happen (the report's `error`).
#[derive(Debug, Error)]
pub enum UpgradeFailure {
    #[error("socketpair: {0}")]
    Socketpair(std::io::Error),
    #[error("upgrade thread: {0}")]
    Thread(std::io::Error),
    #[error("upgrade thread ended without a result")]
    NoResult,
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Machine(#[from] UpgradeError),
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
    fn ask(&mut self, command: SourceCommand) -> Result<(), SourceError> {
        let io = |source| SourceError::EventShard { command, source };
        self.ctl
            .get_mut()
            .write_all(command.line().as_bytes())
            .map_err(io)?;
        let mut line = String::new();
        self.ctl.read_line(&mut line).map_err(io)?;
        match line.trim() {
            "ok" => Ok(()),
            other => Err(SourceError::Refused {
                command,
                answer: other.to_owned(),
            }),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Source for DaemonSource {
    type Error = SourceError;

    fn prepare(&mut self) -> Result<(), SourceError> {
        self.ask(SourceCommand::Prepare)
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

    fn listeners(&mut self) -> Result<Vec<OwnedFd>, SourceError> {
        self.listener_fds
            .iter()
            .map(|fd| {
                // SAFETY: the shards' listeners own these descriptors and
                // keep them open until this process exits.
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                borrowed
                    .try_clone_to_owned()
                    .map_err(|source| SourceError::DupListener { fd: *fd, source })
            })
            .collect()
    }

    fn quiesce_shard(&mut self, shard: usize) -> Result<ShardSnapshot, SourceError> {
        self.ask(SourceCommand::Quiesce(shard))?;
        self.slot()
            .snapshot
            .take()
            .ok_or(SourceError::NoSnapshot(shard))
    }

    fn global_state(&mut self) -> Result<GlobalState, SourceError> {
        self.ask(SourceCommand::Global)?;
        self.slot().global.take().ok_or(SourceError::NoGlobalState)
    }

    fn stop_target(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn resume_all(&mut self, reason: &str) {
        warn!("upgrade failed, serving everything again: {reason}");
        if let Err(e) = self.ask(SourceCommand::Thaw) {
            warn!("thaw: {e}");
        }
        let _ = crate::upgrade::spawn::notify_main_pid(std::process::id());
    }

    fn finish(&mut self) {
        if let Err(e) = self.ask(SourceCommand::Release) {
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
/// machine on a std thread, perform its commands here. Returns the report;
/// on success the caller makes this process exit.
pub async fn upgrade(shard: &Rc<Shard>, binary: &Path) -> UpgradeReport {
    let started = std::time::Instant::now();
    let fail = |e: UpgradeFailure| UpgradeReport {
        ok: false,
        new_pid: None,
        connections: 0,
        records: 0,
        uncarried: 0,
        elapsed_ms: started.elapsed().as_millis() as u64,
        error: Some(e.to_string()),
    };
    let (ours, theirs) = match StdUnixStream::pair() {
        Ok(p) => p,
        Err(e) => return fail(UpgradeFailure::Socketpair(e)),
    };
    let slot = Arc::new(Mutex::new(Slot::default()));
    let source = DaemonSource {
        ctl: BufReader::new(theirs),
        slot: slot.clone(),
        child: None,
        listen: shard.rt.listen.to_string(),
        shards: shard.nshards,
        config_path: shard.rt.config_path.clone(),
        listener_fds: shard.rt.listener_fds(),
    };
    let cpus = shard
        .rt
        .startup_cpus
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let done_rx = match spawn_source_thread(source, binary.to_owned(), cpus) {
        Ok(rx) => rx,
        Err(e) => return fail(UpgradeFailure::Thread(e)),
    };
    // SAFETY: `ours` is a connected Unix stream socket we own.
    let ctl = unsafe { UnixStream::from_raw_fd(ours.into_raw_fd()) };
    let uncarried = serve_commands(shard, ctl, &slot).await;
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
        Err(_) => fail(UpgradeFailure::NoResult),
    }
}

type SourceResult = Result<SourceOutcome, UpgradeFailure>;

/// Start `binary` and run the source machine on a std thread; its result
/// arrives on the returned channel once it closed its end of the commands.
fn spawn_source_thread(
    mut source: DaemonSource,
    binary: PathBuf,
    cpus: Vec<usize>,
) -> std::io::Result<futures::channel::oneshot::Receiver<SourceResult>> {
    let (done_tx, done_rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
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
                        .map_err(UpgradeFailure::from)
                }
                Err(e) => Err(e.into()),
            };
            // Closing our end tells the event shard the machine is done.
            drop(source);
            let _ = done_tx.send(r);
        })?;
    Ok(done_rx)
}

/// Perform the source thread's commands until it hangs up. Returns the
/// connections not carried.
async fn serve_commands(shard: &Rc<Shard>, ctl: UnixStream, slot: &Arc<Mutex<Slot>>) -> u64 {
    let mut ctl = futures::io::BufReader::new(ctl);
    let mut uncarried = 0;
    loop {
        let mut line = String::new();
        match ctl.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let answer = match SourceCommand::parse(&line) {
            Some(command) => match perform(shard, command, slot).await {
                Ok(n) => {
                    uncarried += n;
                    "ok\n".to_owned()
                }
                Err(e) => format!("{}\n", e.to_string().replace('\n', " ")),
            },
            None => format!("unknown step {line:?}\n"),
        };
        if ctl.get_mut().write_all(answer.as_bytes()).await.is_err() {
            break;
        }
    }
    uncarried
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
async fn perform(
    shard: &Rc<Shard>,
    command: SourceCommand,
    slot: &Arc<Mutex<Slot>>,
) -> Result<u64, CommandError> {
    let n = shard.nshards;
    let gone = CommandError::ShardGone;
    match command {
        SourceCommand::Prepare => {
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
            let stats = crate::control::stats::gather_stats(shard).await;
            slot.lock()
                .unwrap_or_else(|p| p.into_inner())
                .manifest_counts = (stats.connections, stats.agents_known, stats.events_next_seq);
            Ok(0)
        }
        SourceCommand::Quiesce(i) if i < n => {
            let snap = shard
                .ask(i, |reply| UpgradeMsg::Quiesce { reply })
                .await
                .map_err(|_| gone("quiesce"))?;
            let uncarried = snap.uncarried;
            slot.lock().unwrap_or_else(|p| p.into_inner()).snapshot = Some(snap);
            Ok(uncarried)
        }
        SourceCommand::Quiesce(i) => Err(CommandError::NoShard(i)),
        SourceCommand::Global => {
            let log = shard.events.as_ref().ok_or(CommandError::NoEventLog)?;
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
        SourceCommand::Thaw => {
            for i in 0..n {
                shard.tell(i, UpgradeMsg::Thaw);
            }
            Ok(0)
        }
        SourceCommand::Release => {
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
