//! One framed TLS connection to presenced.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_proto::{ErrorCode, Frame, FrameDecoder, ProtocolError, TOKEN_LEN, VERSION};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long [`Connection::close`] waits for the server to close after our
/// close_notify before dropping the socket.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

const READ_CHUNK: usize = 2048;

/// Errors of a [`Connection`].
#[derive(Debug, Error)]
pub enum ConnError {
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {name:?}")]
    InvalidServerName { name: String },
    /// Creating or binding the local socket failed.
    #[error("cannot bind source address {local_ip}: {source}")]
    Bind { local_ip: IpAddr, source: io::Error },
    /// The TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    /// The TLS handshake failed (bad certificate, no common version, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: io::Error },
    /// Reading or writing the established connection failed.
    #[error("{op} failed: {source}")]
    Io { op: &'static str, source: io::Error },
    /// The server sent bytes that are not a valid frame.
    #[error("server sent an invalid frame: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server closed the connection where a frame was expected.
    #[error("server closed the connection while waiting for {waiting_for}")]
    Closed { waiting_for: &'static str },
    /// The server closed the connection in the middle of a frame.
    #[error("server closed the connection mid-frame ({pending} bytes of a partial frame)")]
    Truncated { pending: usize },
    /// The server sent ERROR.
    #[error("server error code={code} ({}): {message}", error_name(*code))]
    Server { code: u16, message: String },
    /// The server sent RECONNECT.
    #[error("server asked to reconnect in {min_delay_ms}..={max_delay_ms} ms")]
    Reconnect {
        min_delay_ms: u32,
        max_delay_ms: u32,
    },
    /// The server sent a frame that makes no sense at this point.
    #[error("unexpected frame while waiting for {waiting_for}: {frame:?}")]
    Unexpected {
        waiting_for: &'static str,
        frame: Frame,
    },
    /// The agent id does not fit in a HELLO frame (over 255 bytes).
    #[error("agent id is {0} bytes; HELLO allows at most 255")]
    IdTooLong(usize),
}

fn error_name(code: u16) -> &'static str {
    ErrorCode::from_u16(code).map_or("unknown", ErrorCode::name)
}

impl ConnError {
    /// The server's ERROR code, if this is an ERROR frame with a known code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ConnError::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }

    /// Map a frame that ends an exchange (ERROR / RECONNECT) to an error, or
    /// report it as unexpected.
    fn from_frame(frame: Frame, waiting_for: &'static str) -> Self {
        match frame {
            Frame::Error { code, message } => ConnError::Server { code, message },
            Frame::Reconnect {
                min_delay_ms,
                max_delay_ms,
            } => ConnError::Reconnect {
                min_delay_ms,
                max_delay_ms,
            },
            frame => ConnError::Unexpected { waiting_for, frame },
        }
    }
}

/// The server's WELCOME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// How often the agent must send HEARTBEAT.
    pub heartbeat_interval_ms: u32,
    /// Server-assigned session id.
    pub session_id: u64,
}

impl Welcome {
    /// The heartbeat interval as a [`Duration`].
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.into())
    }
}

/// A TLS connection speaking protocol v1 frames.
///
/// [`recv_frame`](Self::recv_frame) is cancel-safe (decoder state lives in the
/// struct), so it can be wrapped in `tokio::time::timeout` or `select!`. The
/// send methods are not cancel-safe: a cancelled send may leave a partial frame.
pub struct Connection {
    stream: TlsStream<TcpStream>,
    decoder: FrameDecoder,
    write_buf: Vec<u8>,
    peer: SocketAddr,
    local: SocketAddr,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .field("alpn", &self.alpn().map(String::from_utf8_lossy))
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// TCP connect to `addr` and perform the TLS handshake, verifying the
    /// server certificate for `server_name` (a DNS name or an IP literal).
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<ClientConfig>,
    ) -> Result<Self, ConnError> {
        Self::connect_from(addr, None, server_name, tls).await
    }

    /// Like [`connect`](Self::connect), but bind the local socket to
    /// `local_ip` (port chosen by the kernel) first when given.
    pub async fn connect_from(
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
        server_name: &str,
        tls: Arc<ClientConfig>,
    ) -> Result<Self, ConnError> {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            ConnError::InvalidServerName {
                name: server_name.to_owned(),
            }
        })?;
        let tcp = match local_ip {
            None => TcpStream::connect(addr)
                .await
                .map_err(|source| ConnError::Connect { addr, source })?,
            Some(ip) => {
                let bind_err = |source| ConnError::Bind {
                    local_ip: ip,
                    source,
                };
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(bind_err)?;
                socket.bind(SocketAddr::new(ip, 0)).map_err(bind_err)?;
                socket
                    .connect(addr)
                    .await
                    .map_err(|source| ConnError::Connect { addr, source })?
            }
        };
        // Frames are tiny and RTT is measured: never wait for Nagle.
        tcp.set_nodelay(true)
            .map_err(|source| ConnError::Connect { addr, source })?;
        let local = tcp
            .local_addr()
            .map_err(|source| ConnError::Connect { addr, source })?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| ConnError::Handshake { addr, source })?;
        Ok(Self {
            stream,
            decoder: FrameDecoder::new(),
            write_buf: Vec::with_capacity(64),
            peer: addr,
            local,
        })
    }

    /// The ALPN protocol the server selected, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.stream.get_ref().1.alpn_protocol()
    }

    /// The negotiated TLS version.
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.get_ref().1.protocol_version()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Our local socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The underlying TLS stream (for tests that need raw access).
    pub fn tls_stream_mut(&mut self) -> &mut TlsStream<TcpStream> {
        &mut self.stream
    }

    /// Encode and send one frame, flushing it to the socket.
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), ConnError> {
        let mut buf = std::mem::take(&mut self.write_buf);
        buf.clear();
        frame.encode(&mut buf);
        let res = self.send_raw(&buf).await;
        self.write_buf = buf;
        res
    }

    /// Send arbitrary bytes inside TLS (for tests: garbage, partial frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|source| ConnError::Io {
                op: "write",
                source,
            })?;
        self.stream.flush().await.map_err(|source| ConnError::Io {
            op: "flush",
            source,
        })
    }

    /// Receive the next frame. `Ok(None)` means the server closed cleanly
    /// (close_notify or EOF) between frames. Cancel-safe.
    ///
    /// After an `Err` the connection should be dropped.
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>, ConnError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            let n = match self.stream.read(&mut chunk).await {
                Ok(n) => n,
                // A peer that closes without close_notify: treat like EOF.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(source) => return Err(ConnError::Io { op: "read", source }),
            };
            if n == 0 {
                let pending = self.decoder.pending().len();
                return if pending == 0 {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated { pending })
                };
            }
            self.decoder.extend(&chunk[..n]);
        }
    }

    /// Receive a frame where EOF is an error.
    async fn expect_frame(&mut self, waiting_for: &'static str) -> Result<Frame, ConnError> {
        self.recv_frame()
            .await?
            .ok_or(ConnError::Closed { waiting_for })
    }

    /// Send HELLO (version 1) and wait for WELCOME. ERROR and RECONNECT
    /// replies become [`ConnError::Server`] / [`ConnError::Reconnect`].
    pub async fn hello(
        &mut self,
        id: &[u8],
        token: &[u8; TOKEN_LEN],
    ) -> Result<Welcome, ConnError> {
        self.hello_with_version(VERSION, id, token).await
    }

    /// Like [`hello`](Self::hello) with an arbitrary protocol version byte.
    pub async fn hello_with_version(
        &mut self,
        version: u8,
        id: &[u8],
        token: &[u8; TOKEN_LEN],
    ) -> Result<Welcome, ConnError> {
        if id.len() > usize::from(u8::MAX) {
            return Err(ConnError::IdTooLong(id.len()));
        }
        self.send_frame(&Frame::Hello {
            version,
            id: id.to_vec(),
            token: *token,
        })
        .await?;
        match self.expect_frame("WELCOME").await? {
            Frame::Welcome {
                heartbeat_interval_ms,
                session_id,
            } => Ok(Welcome {
                heartbeat_interval_ms,
                session_id,
            }),
            other => Err(ConnError::from_frame(other, "WELCOME")),
        }
    }

    /// Send HEARTBEAT `seq` and wait for the matching ACK, returning the
    /// round-trip time. ACKs for other sequence numbers are skipped.
    pub async fn heartbeat(&mut self, seq: u32) -> Result<Duration, ConnError> {
        let start = Instant::now();
        self.send_frame(&Frame::Heartbeat { seq }).await?;
        loop {
            match self.expect_frame("HEARTBEAT_ACK").await? {
                Frame::HeartbeatAck { seq: got } if got == seq => return Ok(start.elapsed()),
                Frame::HeartbeatAck { .. } => continue,
                other => return Err(ConnError::from_frame(other, "HEARTBEAT_ACK")),
            }
        }
    }

    /// Send BYE (the agent is shutting down). Follow with [`close`](Self::close).
    pub async fn bye(&mut self) -> Result<(), ConnError> {
        self.send_frame(&Frame::Bye).await
    }

    /// Send TLS close_notify and shut down our write side; reading stays
    /// possible (the server's remaining frames and its close).
    pub async fn shutdown_write(&mut self) -> Result<(), ConnError> {
        self.stream
            .shutdown()
            .await
            .map_err(|source| ConnError::Io {
                op: "shutdown",
                source,
            })
    }

    /// Close gracefully: close_notify, then discard whatever the server still
    /// sends until it closes too (at most [`CLOSE_LINGER`]), so unread data
    /// never turns our close into a TCP reset.
    pub async fn close(mut self) -> Result<(), ConnError> {
        self.shutdown_write().await?;
        let mut chunk = [0u8; READ_CHUNK];
        let drain = async {
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestServer;
    use crate::tls::{Alpn, ClientTls};
    use presence_proto::ALPN;

    async fn pair(server: &mut TestServer) -> (Connection, crate::testutil::ServerConn) {
        let conn = Connection::connect(server.addr(), "localhost", server.client_config())
            .await
            .unwrap();
        let sc = server.accept().await;
        (conn, sc)
    }

    #[tokio::test]
    async fn negotiates_tls13_and_alpn() {
        let mut server = TestServer::start().await;
        let (conn, sc) = pair(&mut server).await;
        assert_eq!(conn.alpn(), Some(ALPN));
        assert_eq!(sc.alpn(), Some(ALPN.to_vec()));
        assert_eq!(conn.tls_version(), Some(rustls::ProtocolVersion::TLSv1_3));

        // No ALPN offered: server (which does not require it) selects none.
        let cfg = ClientTls::from_ca_der([server.cert_der()])
            .unwrap()
            .alpn(Alpn::None)
            .build()
            .unwrap();
        let conn = Connection::connect(server.addr(), "localhost", cfg)
            .await
            .unwrap();
        assert_eq!(conn.alpn(), None);

        // IP-literal server name works for a cert with an IP SAN.
        let conn = Connection::connect(server.addr(), "127.0.0.1", server.client_config())
            .await
            .unwrap();
        assert_eq!(conn.alpn(), Some(ALPN));
    }

    #[tokio::test]
    async fn wrong_server_name_fails_handshake() {
        let server = TestServer::start().await;
        let err = Connection::connect(server.addr(), "example.com", server.client_config())
            .await
            .unwrap_err();
        assert!(matches!(err, ConnError::Handshake { .. }), "{err}");
        let err = Connection::connect(server.addr(), "bad name!", server.client_config())
            .await
            .unwrap_err();
        assert!(matches!(err, ConnError::InvalidServerName { .. }), "{err}");
    }

    #[tokio::test]
    async fn tls12_only_server_is_refused() {
        let server = TestServer::start_with_versions(&[&rustls::version::TLS12]).await;
        let err = Connection::connect(server.addr(), "localhost", server.client_config())
            .await
            .unwrap_err();
        assert!(matches!(err, ConnError::Handshake { .. }), "{err}");
    }

    #[tokio::test]
    async fn connect_refused_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let server = TestServer::start().await;
        let err = Connection::connect(addr, "localhost", server.client_config())
            .await
            .unwrap_err();
        assert!(matches!(err, ConnError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn connect_from_binds_source_ip() {
        let mut server = TestServer::start().await;
        let src: IpAddr = "127.0.0.2".parse().unwrap();
        let conn = Connection::connect_from(
            server.addr(),
            Some(src),
            "localhost",
            server.client_config(),
        )
        .await
        .unwrap();
        assert_eq!(conn.local_addr().ip(), src);
        let sc = server.accept().await;
        assert_eq!(sc.peer.ip(), src);
    }

    #[tokio::test]
    async fn frames_split_and_batched_across_reads() {
        let mut server = TestServer::start().await;
        let (mut conn, mut sc) = pair(&mut server).await;
        let frames = vec![
            Frame::Welcome {
                heartbeat_interval_ms: 1000,
                session_id: 77,
            },
            Frame::HeartbeatAck { seq: 1 },
            Frame::Reconnect {
                min_delay_ms: 1,
                max_delay_ms: 2,
            },
            Frame::error(ErrorCode::Overloaded, "busy"),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        // First: every byte in its own TLS record.
        for b in &wire {
            sc.send_raw(std::slice::from_ref(b)).await;
        }
        // Then: all frames in a single record.
        sc.send_raw(&wire).await;
        let mut got = Vec::new();
        for _ in 0..frames.len() * 2 {
            got.push(conn.recv_frame().await.unwrap().unwrap());
        }
        let mut want = frames.clone();
        want.extend(frames);
        assert_eq!(got, want);
        sc.close().await;
        assert_eq!(conn.recv_frame().await.unwrap(), None);
    }

    #[tokio::test]
    async fn recv_frame_is_cancel_safe_under_timeout() {
        let mut server = TestServer::start().await;
        let (mut conn, mut sc) = pair(&mut server).await;
        let wire = Frame::HeartbeatAck { seq: 0xdead_beef }.to_bytes();
        sc.send_raw(&wire[..4]).await;
        let r = tokio::time::timeout(Duration::from_millis(100), conn.recv_frame()).await;
        assert!(r.is_err(), "half a frame must not complete");
        sc.send_raw(&wire[4..]).await;
        let f = tokio::time::timeout(Duration::from_secs(5), conn.recv_frame())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f, Some(Frame::HeartbeatAck { seq: 0xdead_beef }));
    }

    #[tokio::test]
    async fn eof_mid_frame_and_garbage_are_errors() {
        let mut server = TestServer::start().await;
        let (mut conn, mut sc) = pair(&mut server).await;
        sc.send_raw(&[0x04, 0x00]).await;
        sc.close().await;
        let err = conn.recv_frame().await.unwrap_err();
        assert!(matches!(err, ConnError::Truncated { pending: 2 }), "{err}");

        let (mut conn, mut sc) = pair(&mut server).await;
        sc.send_raw(&[0x42, 0, 0]).await;
        let err = conn.recv_frame().await.unwrap_err();
        assert!(matches!(err, ConnError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn hello_welcome_heartbeat_bye() {
        let key = presence_proto::FleetKey::from_bytes([3; 32]);
        let mut server = TestServer::start().await;
        let (mut conn, mut sc) = pair(&mut server).await;
        let srv = tokio::spawn(async move {
            let hello = sc.recv().await.unwrap();
            let Frame::Hello { version, id, token } = hello else {
                panic!("not hello: {hello:?}")
            };
            assert_eq!(version, VERSION);
            assert_eq!(id, b"agent-1");
            assert!(presence_proto::FleetKey::from_bytes([3; 32]).verify(&id, &token));
            sc.send(&Frame::Welcome {
                heartbeat_interval_ms: 250,
                session_id: 5,
            })
            .await;
            assert_eq!(sc.recv().await, Some(Frame::Heartbeat { seq: 9 }));
            // A stale ack first, then the real one.
            sc.send(&Frame::HeartbeatAck { seq: 8 }).await;
            sc.send(&Frame::HeartbeatAck { seq: 9 }).await;
            assert_eq!(sc.recv().await, Some(Frame::Bye));
            assert_eq!(sc.recv().await, None, "close_notify after BYE");
            sc.close().await;
        });
        let w = conn
            .hello(b"agent-1", &key.token(b"agent-1"))
            .await
            .unwrap();
        assert_eq!(
            w,
            Welcome {
                heartbeat_interval_ms: 250,
                session_id: 5
            }
        );
        assert_eq!(w.heartbeat_interval(), Duration::from_millis(250));
        let rtt = conn.heartbeat(9).await.unwrap();
        assert!(rtt < Duration::from_secs(5));
        conn.bye().await.unwrap();
        conn.close().await.unwrap();
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn hello_reports_error_and_reconnect() {
        let mut server = TestServer::start().await;
        let (mut conn, mut sc) = pair(&mut server).await;
        let srv = tokio::spawn(async move {
            sc.recv().await.unwrap();
            sc.send(&Frame::error(ErrorCode::AuthenticationFailed, "bad token"))
                .await;
            sc.close().await;
        });
        let err = conn.hello(b"a", &[0; 32]).await.unwrap_err();
        assert_eq!(err.error_code(), Some(ErrorCode::AuthenticationFailed));
        assert!(err.to_string().contains("code=2"), "{err}");
        assert!(err.to_string().contains("bad token"), "{err}");
        srv.await.unwrap();

        let (mut conn, mut sc) = pair(&mut server).await;
        let srv = tokio::spawn(async move {
            sc.recv().await.unwrap();
            sc.send(&Frame::Reconnect {
                min_delay_ms: 10,
                max_delay_ms: 20,
            })
            .await;
        });
        let err = conn.hello(b"a", &[0; 32]).await.unwrap_err();
        assert!(
            matches!(
                err,
                ConnError::Reconnect {
                    min_delay_ms: 10,
                    max_delay_ms: 20
                }
            ),
            "{err}"
        );
        srv.await.unwrap();

        let (mut conn, sc) = pair(&mut server).await;
        drop(sc);
        let err = conn.hello(b"a", &[0; 32]).await.unwrap_err();
        assert!(
            matches!(err, ConnError::Closed { .. } | ConnError::Io { .. }),
            "{err}"
        );
        let err = conn.hello(&[b'a'; 300], &[0; 32]).await.unwrap_err();
        assert!(matches!(err, ConnError::IdTooLong(300)), "{err}");
    }
}
