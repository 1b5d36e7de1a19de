//! The handshake phase of a connection: a short-lived task that drives the
//! lean TLS 1.3 handshake over the accepted glommio stream, then reports
//! its outcome (the socket and its TLS record state, ready to become a
//! session entry: see `table.rs` and `session.rs`) to its caller, the
//! shard's accept loop, and ends. Deadlines are not timers here: the
//! shard's wheel sends a [`ConnCmd`] when one passes, as does shutdown.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{pin_mut, FutureExt};
use glommio::net::TcpStream;
use glommio::timer::sleep;
use rustls::ServerConfig;

use crate::conn::agent::ConnCmd;
use crate::conn::table::NewSession;
use crate::tls::handshake::{Established, Handshake, HandshakeError as TlsError, Progress};

/// How long the alert after a failed handshake may take to send.
const ALERT_WRITE_LIMIT: Duration = Duration::from_secs(1);
/// Read chunk during the handshake (a client flight is a few KiB).
const HANDSHAKE_CHUNK: usize = 4096;

/// Why a handshake ended without a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A deadline or shutdown command.
    #[error("stopped by {0:?}")]
    Cmd(ConnCmd),
    /// No byte arrived within `tls.first_byte_timeout` of accept.
    #[error("no byte within the first-byte timeout")]
    FirstByteTimeout,
    /// The peer went away.
    #[error("the peer closed the connection")]
    Closed,
    /// TLS said no (bad ClientHello, wrong ALPN, not TLS at all...).
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl HandshakeError {
    /// The handshake deadline passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, HandshakeError::Cmd(ConnCmd::HandshakeTimeout))
    }
}

/// How a handshake task ended.
pub enum Handshaken {
    /// TLS completed and the peer closed at once: no session.
    PeerClosed,
    /// TLS completed. `session` is None when its socket could not be kept
    /// (the descriptor could not be duplicated).
    Done {
        resumed: bool,
        /// Accept to handshake complete.
        latency: Duration,
        session: Option<Box<NewSession>>,
    },
    Failed(HandshakeError),
}

/// Drive one accepted connection through its TLS handshake; `cmd` brings
/// the shard's deadline and shutdown commands.
pub async fn run(
    tls: Arc<ServerConfig>,
    mut tcp: TcpStream,
    first_byte_timeout: Duration,
    mut cmd: oneshot::Receiver<ConnCmd>,
) -> Handshaken {
    let accepted = Instant::now();
    let est = match handshake(tls, &mut tcp, first_byte_timeout, &mut cmd).await {
        Ok(est) if est.peer_closed => return Handshaken::PeerClosed,
        Ok(est) => est,
        Err(e) => return Handshaken::Failed(e),
    };
    let latency = accepted.elapsed();
    let resumed = est.resumed;
    // The session keeps a plain descriptor: duplicate it, then let
    // glommio's stream go (its drop only closes its own descriptor).
    // Close-on-exec: a binary started by an upgrade must receive the
    // sessions over the hand-over socket, not inherit them.
    let dup = nix::fcntl::fcntl(tcp.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0));
    let session = match dup {
        Ok(raw) => {
            let est = *est;
            Some(Box::new(NewSession {
                // SAFETY: fcntl returned a new descriptor that nothing else owns.
                fd: unsafe { OwnedFd::from_raw_fd(raw) },
                tls: est.session,
                input: est.leftover,
                early: est.early_plaintext,
            }))
        }
        Err(e) => {
            tracing::debug!("dup failed: {e}");
            None
        }
    };
    drop(tcp);
    Handshaken::Done {
        resumed,
        latency,
        session,
    }
}

async fn handshake(
    tls: Arc<ServerConfig>,
    tcp: &mut TcpStream,
    first_byte_timeout: Duration,
    mut cmd: &mut oneshot::Receiver<ConnCmd>,
) -> Result<Box<Established>, HandshakeError> {
    let mut hs = Handshake::new(tls)?;
    // An idle socket must not hold its handshake slot (and its source's)
    // for the whole handshake timeout: wait for its first byte only briefly.
    let mut first_read = true;
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
                return Err(HandshakeError::Tls(e));
            }
        };
        if !out.is_empty() {
            let write = tcp.write_all(&out).fuse();
            pin_mut!(write);
            let written = futures::select_biased! {
                c = cmd => return Err(HandshakeError::Cmd(c.unwrap_or(ConnCmd::Shutdown))),
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
                    Progress::NeedInput => Err(HandshakeError::Closed),
                };
            }
        }
        if let Progress::Done(est) = progress {
            return Ok(est);
        }
        let n = {
            let read = tcp.read(&mut buf).fuse();
            // Later reads: the shard's wheel enforces the handshake deadline.
            let first = async {
                if first_read {
                    sleep(first_byte_timeout).await
                } else {
                    futures::future::pending::<()>().await
                }
            }
            .fuse();
            pin_mut!(read, first);
            futures::select_biased! {
                c = cmd => return Err(HandshakeError::Cmd(c.unwrap_or(ConnCmd::Shutdown))),
                r = read => r.map_err(|_| HandshakeError::Closed)?,
                _ = first => return Err(HandshakeError::FirstByteTimeout),
            }
        };
        first_read = false;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        hs.feed(&buf[..n]);
    }
}
