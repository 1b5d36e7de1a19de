//! The accept loop and admission control: a shard takes a new connection
//! only while its handshake caps allow and its mesh queues are not
//! congested; each admitted connection gets a handshake task whose outcome
//! this module adopts into the connection table.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::FutureExt;
use glommio::channels::local_channel::LocalReceiver;
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::sleep;
use tracing::{debug, warn};

use crate::config::AdmissionConfig;
use crate::conn::agent::ConnCmd;
use crate::conn::handshake::{self, Handshaken};
use crate::shard::Shard;

/// What the accept loop is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptCtl {
    Pause,
    Resume,
    Stop,
}

/// Why admission closed a connection before TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over `max_concurrent_handshakes` or `max_handshakes_per_sec`.
    Shard,
    /// Its source address is over `max_handshakes_per_source`.
    Source,
}

/// Admission control state: handshakes running (in all, and per source
/// address), and this second's starts.
#[derive(Default)]
pub struct Admission {
    in_flight: Cell<usize>,
    second: Cell<(u64, u32)>,
    /// Handshakes in progress per source address (no entry at zero, so
    /// the map holds at most `max_concurrent_handshakes` entries).
    per_source: RefCell<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// May one more TLS handshake from `source` start at `now_ms`? Counts
    /// it when yes; [`Admission::done`] with the same `source` undoes it.
    pub fn admit(
        &self,
        caps: &AdmissionConfig,
        now_ms: u64,
        source: Option<IpAddr>,
    ) -> Result<(), Refused> {
        if self.in_flight.get() >= caps.max_concurrent_handshakes {
            return Err(Refused::Shard);
        }
        let second = now_ms / 1000;
        let (s, n) = self.second.get();
        let n = if s == second { n } else { 0 };
        if n >= caps.max_handshakes_per_sec {
            return Err(Refused::Shard);
        }
        if let Some(ip) = source {
            let mut per = self.per_source.borrow_mut();
            let c = per.entry(ip).or_insert(0);
            if *c >= caps.max_handshakes_per_source {
                return Err(Refused::Source);
            }
            *c += 1;
        }
        self.second.set((second, n + 1));
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(())
    }

    /// A handshake admitted earlier from `source` ended.
    pub fn done(&self, source: Option<IpAddr>) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        if let Some(ip) = source {
            let mut per = self.per_source.borrow_mut();
            if let Some(c) = per.get_mut(&ip) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    per.remove(&ip);
                }
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }
}

/// Accept until told to stop; handshakes run in the `handshakes` queue.
pub async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    ctl: LocalReceiver<AcceptCtl>,
    handshakes: glommio::TaskQueueHandle,
) {
    let mut last_warn: Option<Instant> = None;
    let mut paused = false;
    loop {
        if paused {
            // Nothing is pending on the listener: new connections wait in
            // the kernel's accept queue (or for the process taking over).
            match ctl.recv().await {
                Some(AcceptCtl::Resume) => paused = false,
                Some(AcceptCtl::Pause) => {}
                Some(AcceptCtl::Stop) | None => break,
            }
            continue;
        }
        let accepted = futures::select_biased! {
            c = ctl.recv().fuse() => match c {
                Some(AcceptCtl::Pause) => { paused = true; continue; }
                Some(AcceptCtl::Resume) => continue,
                Some(AcceptCtl::Stop) | None => break,
            },
            r = listener.accept().fuse() => r,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                shard.counters.accept_errors.inc();
                // Rate-limited: EMFILE in a storm must not flood the journal.
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    warn!(shard = shard.id, "accept failed: {e}");
                    last_warn = Some(Instant::now());
                }
                sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if shard.is_shutting_down() {
            break;
        }
        admit(&shard, stream, &handshakes);
    }
}

/// Admit one accepted connection (or close it before TLS).
fn admit(shard: &Rc<Shard>, stream: TcpStream, handshakes: &glommio::TaskQueueHandle) {
    shard.counters.accepted.inc();
    // Over the handshake caps, or the mesh is backed up: closed before
    // TLS; agents back off with jitter and come back.
    if shard.router.congested() {
        shard.counters.admission_rejected.inc();
        return;
    }
    let source = stream.peer_addr().ok().map(|a| a.ip());
    let admitted = shard
        .admission
        .admit(&shard.rt.config.admission, shard.table.now_ms(), source);
    if let Err(why) = admitted {
        shard.counters.admission_rejected.inc();
        if why == Refused::Source {
            shard.counters.admission_source_rejected.inc();
        }
        return;
    }
    let _ = stream.set_nodelay(true);
    // Not inherited by a binary an upgrade starts (glommio accepts
    // without SOCK_CLOEXEC).
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let (key, gen, cmd) = shard.table.register();
    let task = handshake_task(shard.clone(), stream, source, key, gen, cmd);
    if let Ok(t) = glommio::spawn_local_into(task, *handshakes) {
        t.detach();
    }
}

/// One connection's handshake; its outcome is counted and, when TLS is
/// up, the connection becomes a session in the table.
async fn handshake_task(
    shard: Rc<Shard>,
    stream: TcpStream,
    source: Option<IpAddr>,
    key: usize,
    gen: u32,
    cmd: oneshot::Receiver<ConnCmd>,
) {
    let first_byte = shard.rt.config.tls.first_byte_timeout;
    let outcome = handshake::run(shard.rt.tls(), stream, first_byte, cmd).await;
    shard.admission.done(source);
    let c = &shard.counters;
    match outcome {
        Handshaken::PeerClosed => {
            c.handshakes.inc();
            shard.table.handshake_failed(key, gen);
        }
        Handshaken::Done {
            resumed,
            latency,
            session,
        } => {
            c.handshakes.inc();
            if resumed {
                c.handshakes_resumed.inc();
            }
            c.handshake_latency.record(latency);
            match session {
                Some(new) => shard.adopt(key, gen, *new),
                None => shard.table.handshake_failed(key, gen),
            }
        }
        Handshaken::Failed(why) => {
            c.handshake_failures.inc();
            if why.is_timeout() {
                c.handshake_timeouts.inc();
            }
            if matches!(why, handshake::HandshakeError::FirstByteTimeout) {
                c.first_byte_timeouts.inc();
            }
            debug!(shard = shard.id, %why, "handshake ended without a session");
            shard.table.handshake_failed(key, gen);
        }
    }
}
