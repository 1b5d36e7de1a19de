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
//!
//! **One hand-over at a time.** A request while one is in flight in this
//! process is refused at once (`Runtime::upgrading`); across processes the
//! source holds an exclusive `flock` on `upgrade.lock` next to the control
//! socket (see [`lock_dir`]) from
//! before the new binary starts until this process exits (after a
//! successful hand-over) or the hand-over failed and resumed. The new
//! process therefore cannot start a hand-over of its own until the old one
//! is gone (it waits up to [`LOCK_WAIT`] for that, then refuses); a crash releases the lock with the process.
//!
//! **Which binary.** `upgrade <path>` needs an absolute path to a regular
//! file owned by root or the daemon's user and writable by neither group nor
//! other ([`check_binary`]); there is no PATH lookup.

use std::io::{BufRead, BufReader, Read, Seek, Write};
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

/// The lock file that makes hand-overs exclusive, next to the control socket.
pub const LOCK_FILE: &str = "upgrade.lock";

/// Why `upgrade <path>` refuses a binary.
#[derive(Debug, Error)]
pub enum BinaryError {
    #[error("binary `{0}`: an absolute path is required (no PATH lookup)")]
    NotAbsolute(PathBuf),
    #[error("binary `{path}`: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binary `{0}`: not a regular file")]
    NotRegular(PathBuf),
    #[error("binary `{path}`: owned by uid {uid}; it must be owned by root or the daemon's user (uid {daemon})")]
    Owner {
        path: PathBuf,
        uid: u32,
        daemon: u32,
    },
    #[error("binary `{path}`: mode {mode:04o} is writable by group or other")]
    Writable { path: PathBuf, mode: u32 },
}

/// The binary `upgrade` may start: `path` absolute, resolving to a regular
/// file owned by root or `daemon_uid`, not writable by group or other.
/// Returns the resolved path (the one started).
pub fn check_binary(path: &Path, daemon_uid: u32) -> Result<PathBuf, BinaryError> {
    use std::os::unix::fs::MetadataExt;
    if !path.is_absolute() {
        return Err(BinaryError::NotAbsolute(path.to_owned()));
    }
    let stat = |source| BinaryError::Stat {
        path: path.to_owned(),
        source,
    };
    let real = std::fs::canonicalize(path).map_err(stat)?;
    let meta = std::fs::metadata(&real).map_err(stat)?;
    if !meta.file_type().is_file() {
        return Err(BinaryError::NotRegular(real));
    }
    if meta.uid() != 0 && meta.uid() != daemon_uid {
        return Err(BinaryError::Owner {
            path: real,
            uid: meta.uid(),
            daemon: daemon_uid,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(BinaryError::Writable {
            path: real,
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(real)
}

/// The exclusive hand-over lock (released when dropped or at exit).
#[derive(Debug)]
pub struct UpgradeLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Where the lock lives: next to the control socket (the runtime
/// directory, `/run/presenced` under systemd), which the daemon could
/// create its socket in, so it is usable whenever the daemon runs.
pub fn lock_dir(control_socket: &Path) -> PathBuf {
    match control_socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The lock of a committed hand-over, held until this process exits.
static HELD: Mutex<Option<UpgradeLock>> = Mutex::new(None);

/// Take `<dir>/upgrade.lock` exclusively, without waiting.
pub fn lock(dir: &Path) -> Result<UpgradeLock, UpgradeFailure> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let io = |source| UpgradeFailure::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io)?;
    let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(f) => f,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(UpgradeFailure::Busy {
                holder: format!("{} is locked by pid {}", path.display(), holder.trim()),
            });
        }
        Err((_, e)) => return Err(io(e.into())),
    };
    // The holder's pid, for the error others get. Best effort: the flock is
    // what excludes, and a full disk must not block an upgrade.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()));
    Ok(UpgradeLock { _file: file })
}

/// How long `upgrade` waits for a lock held by another process: enough
/// for the previous process to exit right after handing over to this one.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// [`lock`], retried while another process holds it, for up to [`LOCK_WAIT`].
async fn lock_waiting(dir: &Path) -> Result<UpgradeLock, UpgradeFailure> {
    let give_up = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match lock(dir) {
            Err(UpgradeFailure::Busy { .. }) if std::time::Instant::now() < give_up => {
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// Why a hand-over did not happen (the report's `error`).
#[derive(Debug, Error)]
pub enum UpgradeFailure {
    /// Another hand-over is in flight (this process or another one).
    #[error("an upgrade is already in progress ({holder}); try again when it is over")]
    Busy { holder: String },
    #[error("upgrade lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Binary(#[from] BinaryError),
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
    /// The source had sent Commit when the hand-over failed: nothing was
    /// resumed and this process stops anyway (see `upgrade::machine`).
    pub committed: bool,
}

/// Run a hand-over from the event shard: start `binary`, drive the source
/// machine on a std thread, perform its commands here. Returns the report;
/// on success (or a failure after commit) the caller makes this process
/// exit. Refused while another hand-over is in flight.
pub async fn upgrade(shard: &Rc<Shard>, binary: &Path) -> UpgradeReport {
    use std::sync::atomic::Ordering::SeqCst;
    let started = std::time::Instant::now();
    let refuse = |e: UpgradeFailure| failed(started, e);
    if shard.rt.shutdown.load(SeqCst) {
        return refuse(UpgradeFailure::ShuttingDown);
    }
    if shard
        .rt
        .upgrading
        .compare_exchange(false, true, SeqCst, SeqCst)
        .is_err()
    {
        return refuse(UpgradeFailure::Busy {
            holder: format!("in this process, pid {}", std::process::id()),
        });
    }
    let report = match lock_waiting(&lock_dir(&shard.rt.config.server.control_socket)).await {
        Ok(held) => {
            let report = upgrade_locked(shard, binary, started).await;
            if report.ok || report.committed {
                // The new process serves (or may): keep the lock until exit,
                // and mark the hand-over before shutdown may proceed.
                shard.rt.handed_over.store(true, SeqCst);
                *HELD.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
            }
            report
        }
        Err(e) => refuse(e),
    };
    shard.rt.upgrading.store(false, SeqCst);
    report
}

fn failed(started: std::time::Instant, e: UpgradeFailure) -> UpgradeReport {
    UpgradeReport {
        ok: false,
        new_pid: None,
        connections: 0,
        records: 0,
        uncarried: 0,
        elapsed_ms: started.elapsed().as_millis() as u64,
        committed: matches!(&e, UpgradeFailure::Machine(m) if m.committed),
        error: Some(e.to_string()),
    }
}

/// [`upgrade`] with the lock held.
async fn upgrade_locked(
    shard: &Rc<Shard>,
    binary: &Path,
    started: std::time::Instant,
) -> UpgradeReport {
    let fail = |e: UpgradeFailure| failed(started, e);
    let daemon_uid = nix::unistd::geteuid().as_raw();
    let binary = match check_binary(binary, daemon_uid) {
        Ok(b) => b,
        Err(e) => return fail(e.into()),
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
    let done_rx = match spawn_source_thread(source, binary, cpus) {
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
            committed: true,
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
