//! One agent connection: TLS handshake, HELLO, then heartbeats until the
//! connection ends. Deadlines are not timers here: the shard's wheel sends a
//! [`ConnCmd`] when one passes, as do supersede and shutdown.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{pin_mut, FutureExt};
use futures_rustls::server::TlsStream;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use glommio::timer::sleep;
use tracing::debug;

use crate::presence::GoneReason;
use crate::protocol::{ErrorCode, Frame, FrameDecoder, ProtocolError, VERSION};
use crate::shard::Shard;

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

/// How long closing writes (ERROR, close_notify) may take.
const CLOSE_WRITE_LIMIT: Duration = Duration::from_secs(2);
/// Read chunk; frames are at most 1027 bytes and the decoder joins chunks.
const READ_CHUNK: usize = 1024;

/// What woke the connection up.
enum Wake {
    Frame(Frame),
    Cmd(ConnCmd),
    Malformed(ProtocolError),
    Closed,
}

struct Conn {
    tls: TlsStream<TcpStream>,
    decoder: FrameDecoder,
    out: Vec<u8>,
}

impl Conn {
    /// The next frame, command or end of stream.
    async fn next(&mut self, mut cmd: &mut oneshot::Receiver<ConnCmd>) -> Wake {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => return Wake::Frame(f),
                Ok(None) => {}
                Err(e) => return Wake::Malformed(e),
            }
            let mut buf = [0u8; READ_CHUNK];
            let n = {
                let read = self.tls.read(&mut buf).fuse();
                pin_mut!(read);
                futures::select_biased! {
                    c = cmd => return Wake::Cmd(c.unwrap_or(ConnCmd::Shutdown)),
                    r = read => r,
                }
            };
            match n {
                Ok(0) | Err(_) => return Wake::Closed,
                Ok(n) => self.decoder.extend(&buf[..n]),
            }
        }
    }

    /// Write queued frames; a blocked write yields to a command.
    async fn flush(
        &mut self,
        mut cmd: &mut oneshot::Receiver<ConnCmd>,
    ) -> Result<(), Option<ConnCmd>> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let r = {
            let tls = &mut self.tls;
            let write = async move {
                tls.write_all(&out).await?;
                tls.flush().await
            }
            .fuse();
            pin_mut!(write);
            futures::select_biased! {
                c = cmd => return Err(Some(c.unwrap_or(ConnCmd::Shutdown))),
                r = write => r,
            }
        };
        r.map_err(|_| None)
    }

    /// Send an ERROR frame and close_notify, bounded in time.
    async fn fail(&mut self, shard: &Shard, code: ErrorCode, message: &str) {
        shard.counters.error_sent(code);
        Frame::error(code, message).encode(&mut self.out);
        self.close().await;
    }

    /// Send what is queued, then close_notify, bounded in time.
    async fn close(&mut self) {
        let out = std::mem::take(&mut self.out);
        let tls = &mut self.tls;
        let closing = async move {
            if !out.is_empty() {
                let _ = tls.write_all(&out).await;
            }
            let _ = tls.close().await;
        }
        .fuse();
        let limit = sleep(CLOSE_WRITE_LIMIT).fuse();
        pin_mut!(closing, limit);
        futures::select_biased! {
            _ = closing => {},
            _ = limit => {},
        }
    }
}

/// Serve one accepted connection until it ends, then free its slot.
pub async fn serve(
    shard: Rc<Shard>,
    tcp: TcpStream,
    key: usize,
    gen: u32,
    mut cmd: oneshot::Receiver<ConnCmd>,
) {
    let reason = drive(&shard, tcp, key, gen, &mut cmd).await;
    shard.connection_closed(key, gen, reason);
}

async fn drive(
    shard: &Rc<Shard>,
    tcp: TcpStream,
    key: usize,
    gen: u32,
    mut cmd: &mut oneshot::Receiver<ConnCmd>,
) -> GoneReason {
    // 1. TLS handshake, ended early by the handshake deadline or shutdown.
    let accepted = Instant::now();
    let acceptor = TlsAcceptor::from(shard.rt.tls());
    let handshake = acceptor.accept(tcp).fuse();
    pin_mut!(handshake);
    let tls = futures::select_biased! {
        c = cmd => {
            let c = c.unwrap_or(ConnCmd::Shutdown);
            if c == ConnCmd::HandshakeTimeout {
                shard.counters.handshake_timeouts.inc();
            }
            shard.counters.handshake_failures.inc();
            debug!(shard = shard.id, ?c, "closed during handshake");
            return GoneReason::Disconnect;
        }
        r = handshake => r,
    };
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            shard.counters.handshake_failures.inc();
            debug!(shard = shard.id, "handshake failed: {e}");
            return GoneReason::Disconnect;
        }
    };
    shard.counters.handshakes.inc();
    shard.counters.handshake_latency.record(accepted.elapsed());
    shard.handshake_done(key, gen);
    let mut conn = Conn {
        tls,
        decoder: FrameDecoder::new(),
        out: Vec::new(),
    };

    // 2. HELLO must be the first frame.
    let id = match conn.next(cmd).await {
        Wake::Frame(Frame::Hello { version, id, token }) => {
            if version != VERSION {
                let msg = format!(
                    "protocol version {version} is not supported; this server speaks {VERSION}"
                );
                conn.fail(shard, ErrorCode::UnsupportedVersion, &msg).await;
                return GoneReason::Disconnect;
            }
            if !shard.rt.verify_token(&id, &token) {
                conn.fail(
                    shard,
                    ErrorCode::AuthenticationFailed,
                    "token does not match the agent id",
                )
                .await;
                return GoneReason::Disconnect;
            }
            // validate_id guaranteed ASCII.
            String::from_utf8_lossy(&id).into_owned()
        }
        Wake::Frame(other) => {
            let msg = format!(
                "expected HELLO as the first frame, got {}",
                frame_name(&other)
            );
            conn.fail(shard, ErrorCode::MalformedFrame, &msg).await;
            return GoneReason::Disconnect;
        }
        Wake::Malformed(e @ ProtocolError::UnsupportedVersion(_)) => {
            conn.fail(shard, ErrorCode::UnsupportedVersion, &e.to_string())
                .await;
            return GoneReason::Disconnect;
        }
        Wake::Malformed(e) => {
            conn.fail(shard, ErrorCode::MalformedFrame, &e.to_string())
                .await;
            return GoneReason::Disconnect;
        }
        Wake::Cmd(ConnCmd::Shutdown) => {
            conn.fail(shard, ErrorCode::ShuttingDown, "server shutting down")
                .await;
            return GoneReason::Disconnect;
        }
        Wake::Cmd(_) => {
            conn.fail(shard, ErrorCode::HelloTimeout, "no HELLO in time")
                .await;
            return GoneReason::Disconnect;
        }
        Wake::Closed => return GoneReason::Disconnect,
    };

    // 3. Session.
    shard.counters.hellos.inc();
    let session: u64 = rand::random();
    shard.session_started(key, gen, &id, session);
    let interval_ms = shard.rt.config.presence.heartbeat_interval.as_millis() as u32;
    Frame::Welcome {
        heartbeat_interval_ms: interval_ms,
        session_id: session,
    }
    .encode(&mut conn.out);
    if let Err(c) = conn.flush(cmd).await {
        return end_on_command(shard, &mut conn, c).await;
    }
    loop {
        let wake = conn.next(cmd).await;
        let now = Instant::now();
        if let Wake::Frame(_) = wake {
            shard.touch(key, gen, now);
        }
        match wake {
            Wake::Frame(Frame::Heartbeat { seq }) => {
                shard.counters.heartbeats.inc();
                Frame::HeartbeatAck { seq }.encode(&mut conn.out);
                // Batched frames are all answered with one write.
                if conn.decoder.has_frame() {
                    continue;
                }
                if let Err(c) = conn.flush(cmd).await {
                    return end_on_command(shard, &mut conn, c).await;
                }
                shard.counters.heartbeat_latency.record(now.elapsed());
            }
            Wake::Frame(Frame::Bye) => {
                shard.counters.byes.inc();
                conn.close().await;
                return GoneReason::Bye;
            }
            Wake::Frame(other) => {
                let msg = match other {
                    Frame::Hello { .. } => "HELLO was already received".to_owned(),
                    f => format!("{} is not a frame an agent sends", frame_name(&f)),
                };
                conn.fail(shard, ErrorCode::MalformedFrame, &msg).await;
                return GoneReason::Disconnect;
            }
            Wake::Malformed(e) => {
                conn.fail(shard, ErrorCode::MalformedFrame, &e.to_string())
                    .await;
                return GoneReason::Disconnect;
            }
            Wake::Cmd(c) => return end_on_command(shard, &mut conn, Some(c)).await,
            Wake::Closed => return GoneReason::Disconnect,
        }
    }
}

async fn end_on_command(shard: &Shard, conn: &mut Conn, c: Option<ConnCmd>) -> GoneReason {
    match c {
        Some(ConnCmd::Timeout) => {
            shard.counters.timeouts.inc();
            conn.close().await;
            GoneReason::Timeout
        }
        Some(ConnCmd::Superseded) => {
            conn.fail(
                shard,
                ErrorCode::Superseded,
                "superseded by a newer session of this agent",
            )
            .await;
            // The owner already moved to the new session: this one is stale.
            GoneReason::Shutdown
        }
        Some(ConnCmd::Shutdown) => {
            conn.fail(shard, ErrorCode::ShuttingDown, "server shutting down")
                .await;
            GoneReason::Shutdown
        }
        Some(ConnCmd::HandshakeTimeout | ConnCmd::HelloTimeout) | None => GoneReason::Disconnect,
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "HELLO",
        Frame::Welcome { .. } => "WELCOME",
        Frame::Heartbeat { .. } => "HEARTBEAT",
        Frame::HeartbeatAck { .. } => "HEARTBEAT_ACK",
        Frame::Bye => "BYE",
        Frame::Reconnect { .. } => "RECONNECT",
        Frame::Error { .. } => "ERROR",
    }
}
