//! The handshake phase of a connection: a short-lived task that drives the
//! lean TLS 1.3 handshake over the accepted glommio stream, then hands the
//! socket and its TLS record state to the shard as a session entry (see
//! `conns.rs` and `session.rs`) and ends. Deadlines are not timers here: the
//! shard's wheel sends a [`ConnCmd`] when one passes, as does shutdown.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{pin_mut, FutureExt};
use glommio::net::TcpStream;
use glommio::timer::sleep;
use tracing::debug;

use crate::shard::Shard;
use crate::tls::handshake::{Established, Handshake, Progress};

/// Something the shard asks a connection to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCmd {
    HandshakeTimeout,
    HelloTimeout,
    /// No frame within heartbeat_interval * miss_limit.
    Timeout,
    /// A newer session of the same agent took over.
    Superseded,
    Shutdown,
}

/// How long the alert after a failed handshake may take to send.
const ALERT_WRITE_LIMIT: Duration = Duration::from_secs(1);
/// Read chunk during the handshake (a client flight is a few KiB).
const HANDSHAKE_CHUNK: usize = 4096;

/// Why a handshake ended without a session.
#[derive(Debug)]
enum Failed {
    /// A deadline or shutdown command.
    Cmd(ConnCmd),
    /// The peer went away.
    Closed,
    /// TLS said no (bad ClientHello, wrong ALPN, not TLS at all...).
    Tls(#[allow(dead_code)] String),
}

/// Serve one accepted connection through its handshake, then adopt it.
pub async fn serve(
    shard: Rc<Shard>,
    mut tcp: TcpStream,
    key: usize,
    gen: u32,
    mut cmd: oneshot::Receiver<ConnCmd>,
) {
    let accepted = Instant::now();
    let result = handshake(&shard, &mut tcp, &mut cmd).await;
    shard
        .handshakes_in_flight
        .set(shard.handshakes_in_flight.get().saturating_sub(1));
    match result {
        Ok(est) if est.peer_closed => {
            shard.counters.handshakes.inc();
            shard.handshake_failed(key, gen);
        }
        Ok(est) => {
            shard.counters.handshakes.inc();
            if est.resumed {
                shard.counters.handshakes_resumed.inc();
            }
            shard.counters.handshake_latency.record(accepted.elapsed());
            // The session keeps a plain descriptor: duplicate it, then let
            // glommio's stream go (its drop only closes its own descriptor).
            // Close-on-exec: a binary started by an upgrade must receive
            // the sessions over the hand-over socket, not inherit them.
            let dup = nix::fcntl::fcntl(tcp.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0));
            let fd = match dup {
                // SAFETY: fcntl returned a new descriptor that nothing else owns.
                Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
                Err(e) => {
                    debug!(shard = shard.id, "dup failed: {e}");
                    shard.handshake_failed(key, gen);
                    return;
                }
            };
            drop(tcp);
            let est = *est;
            shard.adopt(key, gen, fd, est.session, est.leftover, est.early_plaintext);
        }
        Err(why) => {
            shard.counters.handshake_failures.inc();
            if why == Failed::Cmd(ConnCmd::HandshakeTimeout) {
                shard.counters.handshake_timeouts.inc();
            }
            debug!(shard = shard.id, ?why, "handshake ended without a session");
            shard.handshake_failed(key, gen);
        }
    }
}

impl PartialEq for Failed {
    fn eq(&self, other: &Self) -> bool {
        matches!((self, other), (Failed::Cmd(a), Failed::Cmd(b)) if a == b)
    }
}

async fn handshake(
    shard: &Shard,
    tcp: &mut TcpStream,
    mut cmd: &mut oneshot::Receiver<ConnCmd>,
) -> Result<Box<Established>, Failed> {
    let mut hs = Handshake::new(shard.rt.tls()).map_err(|e| Failed::Tls(e.to_string()))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; HANDSHAKE_CHUNK];
    loop {
        out.clear();
        let progress = match hs.step(&mut out) {
            Ok(p) => p,
            Err(e) => {
                // `out` may hold an alert for the peer: best effort, bounded.
                if !out.is_empty() {
                    let write = tcp.write_all(&out).fuse();
                    let limit = sleep(ALERT_WRITE_LIMIT).fuse();
                    pin_mut!(write, limit);
                    futures::select_biased! {
                        _ = write => {},
                        _ = limit => {},
                    }
                }
                return Err(Failed::Tls(e.to_string()));
            }
        };
        if !out.is_empty() {
            let write = tcp.write_all(&out).fuse();
            pin_mut!(write);
            let written = futures::select_biased! {
                c = cmd => return Err(Failed::Cmd(c.unwrap_or(ConnCmd::Shutdown))),
                r = write => r,
            };
            if written.is_err() {
                return match progress {
                    // The handshake completed; the peer left before its
                    // session tickets went out: a disconnect, not a failure.
                    Progress::Done(mut est) => {
                        est.peer_closed = true;
                        Ok(est)
                    }
                    Progress::NeedInput => Err(Failed::Closed),
                };
            }
        }
        if let Progress::Done(est) = progress {
            return Ok(est);
        }
        let n = {
            let read = tcp.read(&mut buf).fuse();
            pin_mut!(read);
            futures::select_biased! {
                c = cmd => return Err(Failed::Cmd(c.unwrap_or(ConnCmd::Shutdown))),
                r = read => r.map_err(|_| Failed::Closed)?,
            }
        };
        if n == 0 {
            return Err(Failed::Closed);
        }
        hs.feed(&buf[..n]);
    }
}
