//! The reconnecting agent: connect, HELLO, heartbeat, obey RECONNECT and
//! ERROR, back off on failures, say BYE on shutdown.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use presence_proto::FleetKey;
use presence_proto::{validate_id, ErrorCode, Frame, ProtocolError, TOKEN_LEN};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::backoff::{reconnect_delay, Backoff};
use crate::conn::{ConnError, Connection, Welcome};
use crate::shutdown::ShutdownSignal;
use crate::tls::{client_config, TlsError};

/// Bound on sending BYE + close_notify (and waiting for the server's close)
/// at shutdown, and on closing after a server-initiated disconnect.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors that stop an agent for good.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The agent id is not a valid protocol id.
    #[error("invalid agent id {id:?}: {source}")]
    InvalidId { id: String, source: ProtocolError },
    /// The TLS server name is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    /// The CA file could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server refused the agent with ERROR 2 (authentication failed) or
    /// 3 (unsupported version); retrying cannot help.
    #[error("server rejected the agent: error code={code} ({}): {message}",
        ErrorCode::from_u16(*code).map_or("unknown", ErrorCode::name))]
    Rejected { code: u16, message: String },
}

/// How an agent ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    /// The shutdown signal fired (BYE was sent if a session was up).
    Shutdown,
    /// ERROR 5: a newer session of the same agent id took over.
    Superseded { message: String },
}

/// Why a connection attempt or session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// TCP connect, source bind or TLS handshake failed.
    ConnectFailed(String),
    /// A step took too long ("connect" = TCP + TLS, "WELCOME" = HELLO reply).
    Timeout(&'static str),
    /// The server sent ERROR.
    ServerError { code: u16, message: String },
    /// The server sent RECONNECT.
    Reconnect {
        min_delay_ms: u32,
        max_delay_ms: u32,
    },
    /// HEARTBEAT `seq` got no ACK within two heartbeat intervals.
    HeartbeatTimeout { seq: u32 },
    /// The server closed the connection without ERROR/RECONNECT.
    Closed,
    /// Reading or writing failed.
    Io(String),
    /// The server broke the protocol.
    Protocol(String),
    /// We are shutting down (BYE sent).
    Shutdown,
}

impl DisconnectReason {
    /// The ERROR code, if the server sent ERROR with a known code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            DisconnectReason::ServerError { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }

    fn from_conn(e: ConnError) -> Self {
        match e {
            ConnError::Server { code, message } => DisconnectReason::ServerError { code, message },
            ConnError::Reconnect {
                min_delay_ms,
                max_delay_ms,
            } => DisconnectReason::Reconnect {
                min_delay_ms,
                max_delay_ms,
            },
            ConnError::Closed { .. } => DisconnectReason::Closed,
            e @ (ConnError::InvalidServerName { .. }
            | ConnError::Bind { .. }
            | ConnError::Connect { .. }
            | ConnError::Handshake { .. }) => DisconnectReason::ConnectFailed(e.to_string()),
            e @ ConnError::Io { .. } => DisconnectReason::Io(e.to_string()),
            e @ (ConnError::Protocol(_)
            | ConnError::Truncated { .. }
            | ConnError::Unexpected { .. }
            | ConnError::IdTooLong(_)) => DisconnectReason::Protocol(e.to_string()),
        }
    }

    /// Whether the server ended the exchange (so a graceful close is polite).
    fn server_initiated(&self) -> bool {
        matches!(
            self,
            DisconnectReason::ServerError { .. }
                | DisconnectReason::Reconnect { .. }
                | DisconnectReason::Closed
        )
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            DisconnectReason::Timeout(what) => write!(f, "timed out waiting for {what}"),
            DisconnectReason::ServerError { code, message } => write!(
                f,
                "error code={code} name={} message={message:?}",
                ErrorCode::from_u16(*code).map_or("unknown", ErrorCode::name)
            ),
            DisconnectReason::Reconnect {
                min_delay_ms,
                max_delay_ms,
            } => write!(
                f,
                "server requested reconnect min_ms={min_delay_ms} max_ms={max_delay_ms}"
            ),
            DisconnectReason::HeartbeatTimeout { seq } => {
                write!(f, "no heartbeat ack for seq={seq} within 2 intervals")
            }
            DisconnectReason::Closed => f.write_str("server closed the connection"),
            DisconnectReason::Io(e) => write!(f, "i/o error: {e}"),
            DisconnectReason::Protocol(e) => write!(f, "protocol error: {e}"),
            DisconnectReason::Shutdown => f.write_str("shutdown (bye sent)"),
        }
    }
}

/// State changes reported while an agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Starting connection attempt number `attempt`, counted since the last
    /// WELCOME (so 1 for the first attempt and right after a lost session).
    Connecting { attempt: u32 },
    /// WELCOME received.
    Online {
        session_id: u64,
        heartbeat_interval: Duration,
        local_addr: SocketAddr,
    },
    /// HEARTBEAT `seq` was acknowledged after `rtt`.
    HeartbeatAcked { seq: u32, rtt: Duration },
    /// The connection (or attempt) ended.
    Disconnected { reason: DisconnectReason },
    /// Waiting `delay` before reconnecting; `server_requested` if the delay
    /// comes from RECONNECT rather than our own backoff.
    Backoff {
        delay: Duration,
        server_requested: bool,
    },
}

/// Everything an [`Agent`] needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Daemon address.
    pub addr: SocketAddr,
    /// Name the server certificate is verified against (default "localhost").
    pub server_name: String,
    /// TLS client configuration (see [`crate::tls::ClientTls`]).
    pub tls: Arc<ClientConfig>,
    /// Agent id, `[A-Za-z0-9._:@-]{1,128}`.
    pub id: String,
    /// HELLO token, HMAC-SHA256(fleet key, id).
    pub token: [u8; TOKEN_LEN],
    /// Bind this source address before connecting.
    pub source_ip: Option<IpAddr>,
    /// Retry policy for failures (default 500 ms .. 30 s, full jitter).
    pub backoff: Backoff,
    /// Limit on TCP connect + TLS handshake (default 10 s).
    pub connect_timeout: Duration,
    /// Limit on waiting for WELCOME after HELLO (default 10 s).
    pub hello_timeout: Duration,
}

impl AgentConfig {
    /// Config for agent `id`, deriving its token from the fleet key.
    pub fn new(
        addr: SocketAddr,
        tls: Arc<ClientConfig>,
        id: impl Into<String>,
        key: &FleetKey,
    ) -> Result<Self, AgentError> {
        let id = id.into();
        let token = key.token(id.as_bytes());
        Self::with_token(addr, tls, id, token)
    }

    /// Config for agent `id` with an explicit token.
    pub fn with_token(
        addr: SocketAddr,
        tls: Arc<ClientConfig>,
        id: impl Into<String>,
        token: [u8; TOKEN_LEN],
    ) -> Result<Self, AgentError> {
        let id = id.into();
        check_id(&id)?;
        Ok(Self {
            addr,
            server_name: "localhost".to_owned(),
            tls,
            id,
            token,
            source_ip: None,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
        })
    }

    /// Config trusting the CA PEM file at `ca_path` (default ALPN).
    pub fn from_ca_file(
        addr: SocketAddr,
        ca_path: impl AsRef<Path>,
        id: impl Into<String>,
        key: &FleetKey,
    ) -> Result<Self, AgentError> {
        Self::new(addr, client_config(ca_path)?, id, key)
    }
}

fn check_id(id: &str) -> Result<(), AgentError> {
    validate_id(id.as_bytes()).map_err(|source| AgentError::InvalidId {
        id: id.to_owned(),
        source,
    })
}

type EventFn = Arc<dyn Fn(&AgentEvent) + Send + Sync>;

/// A reconnecting agent. Build with [`Agent::new`], observe with
/// [`on_event`](Agent::on_event) or [`with_event_channel`](Agent::with_event_channel),
/// then [`run`](Agent::run).
#[derive(Clone)]
pub struct Agent {
    cfg: AgentConfig,
    on_event: Option<EventFn>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent").field("cfg", &self.cfg).finish()
    }
}

/// How a session that reached WELCOME ended.
enum SessionEnd {
    Shutdown,
    Lost(DisconnectReason),
}

enum Step {
    Shutdown,
    Frame(Result<Option<Frame>, ConnError>),
    Tick,
    Dead,
}

impl Agent {
    /// An agent with no event observer.
    pub fn new(cfg: AgentConfig) -> Self {
        Self {
            cfg,
            on_event: None,
        }
    }

    /// Call `f` synchronously for every event (replaces earlier observers).
    /// Keep it cheap: it runs on the agent's task.
    pub fn on_event(mut self, f: impl Fn(&AgentEvent) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// Deliver events to an unbounded channel (replaces earlier observers).
    pub fn with_event_channel(self) -> (Self, mpsc::UnboundedReceiver<AgentEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let agent = self.on_event(move |ev| {
            let _ = tx.send(ev.clone());
        });
        (agent, rx)
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    fn emit(&self, ev: AgentEvent) {
        tracing::debug!(id = %self.cfg.id, event = ?ev, "agent event");
        if let Some(f) = &self.on_event {
            f(&ev);
        }
    }

    /// Run until shutdown (`Ok(Shutdown)`), supersession (`Ok(Superseded)`)
    /// or a fatal rejection (`Err`). Connection failures never end the loop;
    /// they are retried with backoff.
    pub async fn run(&self, mut shutdown: ShutdownSignal) -> Result<AgentExit, AgentError> {
        check_id(&self.cfg.id)?;
        if ServerName::try_from(self.cfg.server_name.as_str()).is_err() {
            return Err(AgentError::InvalidServerName(self.cfg.server_name.clone()));
        }
        // Failures since the last WELCOME (drives backoff) and connection
        // attempts since the last WELCOME (reported in Connecting).
        let mut failures: u32 = 0;
        let mut attempt: u32 = 0;
        loop {
            if shutdown.is_triggered() {
                return Ok(AgentExit::Shutdown);
            }
            attempt = attempt.saturating_add(1);
            self.emit(AgentEvent::Connecting { attempt });
            let established = tokio::select! {
                biased;
                _ = shutdown.wait() => return Ok(AgentExit::Shutdown),
                r = self.establish() => r,
            };
            let (conn, reason) = match established {
                Err((conn, reason)) => (conn, reason),
                Ok((mut conn, welcome)) => {
                    failures = 0;
                    attempt = 0;
                    self.emit(AgentEvent::Online {
                        session_id: welcome.session_id,
                        heartbeat_interval: welcome.heartbeat_interval(),
                        local_addr: conn.local_addr(),
                    });
                    match self.session(&mut conn, welcome, &mut shutdown).await {
                        SessionEnd::Shutdown => {
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                                if conn.bye().await.is_ok() {
                                    let _ = conn.close().await;
                                }
                            })
                            .await;
                            self.emit(AgentEvent::Disconnected {
                                reason: DisconnectReason::Shutdown,
                            });
                            return Ok(AgentExit::Shutdown);
                        }
                        SessionEnd::Lost(reason) => (Some(conn), reason),
                    }
                }
            };
            if let Some(conn) = conn {
                if reason.server_initiated() {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
                }
            }
            self.emit(AgentEvent::Disconnected {
                reason: reason.clone(),
            });
            let (delay, server_requested) = match reason {
                DisconnectReason::ServerError { code, message }
                    if code == ErrorCode::AuthenticationFailed as u16
                        || code == ErrorCode::UnsupportedVersion as u16 =>
                {
                    return Err(AgentError::Rejected { code, message });
                }
                DisconnectReason::ServerError { code, message }
                    if code == ErrorCode::Superseded as u16 =>
                {
                    return Ok(AgentExit::Superseded { message });
                }
                DisconnectReason::Reconnect {
                    min_delay_ms,
                    max_delay_ms,
                } => (
                    reconnect_delay(min_delay_ms, max_delay_ms, &mut rand::thread_rng()),
                    true,
                ),
                _ => {
                    let d = self.cfg.backoff.delay(failures, &mut rand::thread_rng());
                    failures = failures.saturating_add(1);
                    (d, false)
                }
            };
            self.emit(AgentEvent::Backoff {
                delay,
                server_requested,
            });
            tokio::select! {
                biased;
                _ = shutdown.wait() => return Ok(AgentExit::Shutdown),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Connect, handshake, HELLO → WELCOME. On failure, returns the
    /// connection too if it got that far.
    #[allow(clippy::type_complexity)]
    async fn establish(
        &self,
    ) -> Result<(Connection, Welcome), (Option<Connection>, DisconnectReason)> {
        let cfg = &self.cfg;
        let connect =
            Connection::connect_from(cfg.addr, cfg.source_ip, &cfg.server_name, cfg.tls.clone());
        let mut conn = match tokio::time::timeout(cfg.connect_timeout, connect).await {
            Err(_) => return Err((None, DisconnectReason::Timeout("connect"))),
            Ok(Err(e)) => return Err((None, DisconnectReason::from_conn(e))),
            Ok(Ok(conn)) => conn,
        };
        let hello = conn.hello(cfg.id.as_bytes(), &cfg.token);
        let welcome = match tokio::time::timeout(cfg.hello_timeout, hello).await {
            Err(_) => return Err((Some(conn), DisconnectReason::Timeout("WELCOME"))),
            Ok(Err(e)) => return Err((Some(conn), DisconnectReason::from_conn(e))),
            Ok(Ok(w)) => w,
        };
        if welcome.heartbeat_interval_ms == 0 {
            return Err((
                Some(conn),
                DisconnectReason::Protocol("WELCOME with heartbeat interval 0".into()),
            ));
        }
        Ok((conn, welcome))
    }

    /// Heartbeat until the session ends.
    async fn session(
        &self,
        conn: &mut Connection,
        welcome: Welcome,
        shutdown: &mut ShutdownSignal,
    ) -> SessionEnd {
        let interval = welcome.heartbeat_interval();
        let dead_after = interval.saturating_mul(2);
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq: u32 = 0;
        // Unacknowledged heartbeats, oldest first.
        let mut outstanding: VecDeque<(u32, Instant)> = VecDeque::new();
        loop {
            let deadline = outstanding.front().map(|(_, sent)| *sent + dead_after);
            let step = tokio::select! {
                biased;
                _ = shutdown.wait() => Step::Shutdown,
                _ = sleep_until_opt(deadline) => Step::Dead,
                r = conn.recv_frame() => Step::Frame(r),
                _ = ticker.tick() => Step::Tick,
            };
            match step {
                Step::Shutdown => return SessionEnd::Shutdown,
                Step::Dead => {
                    let seq = outstanding.front().map_or(0, |(s, _)| *s);
                    return SessionEnd::Lost(DisconnectReason::HeartbeatTimeout { seq });
                }
                Step::Tick => {
                    seq = seq.wrapping_add(1);
                    let frame = Frame::Heartbeat { seq };
                    let send = conn.send_frame(&frame);
                    match tokio::time::timeout(dead_after, send).await {
                        Err(_) => {
                            return SessionEnd::Lost(DisconnectReason::HeartbeatTimeout { seq })
                        }
                        Ok(Err(e)) => return SessionEnd::Lost(DisconnectReason::from_conn(e)),
                        Ok(Ok(())) => outstanding.push_back((seq, Instant::now())),
                    }
                }
                Step::Frame(Ok(Some(Frame::HeartbeatAck { seq: acked }))) => {
                    match outstanding.iter().position(|(s, _)| *s == acked) {
                        Some(pos) => {
                            let sent = outstanding[pos].1;
                            // An ACK also settles every older heartbeat.
                            outstanding.drain(..=pos);
                            self.emit(AgentEvent::HeartbeatAcked {
                                seq: acked,
                                rtt: sent.elapsed(),
                            });
                        }
                        None => tracing::debug!(
                            id = %self.cfg.id,
                            seq = acked,
                            "ack for a heartbeat that is not outstanding"
                        ),
                    }
                }
                Step::Frame(Ok(Some(frame))) => {
                    let reason = match frame {
                        Frame::Error { code, message } => {
                            DisconnectReason::ServerError { code, message }
                        }
                        Frame::Reconnect {
                            min_delay_ms,
                            max_delay_ms,
                        } => DisconnectReason::Reconnect {
                            min_delay_ms,
                            max_delay_ms,
                        },
                        other => DisconnectReason::Protocol(format!(
                            "unexpected frame while online: {other:?}"
                        )),
                    };
                    return SessionEnd::Lost(reason);
                }
                Step::Frame(Ok(None)) => return SessionEnd::Lost(DisconnectReason::Closed),
                Step::Frame(Err(e)) => return SessionEnd::Lost(DisconnectReason::from_conn(e)),
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::shutdown_channel;
    use crate::testutil::{ServerConn, TestServer};

    const WAIT: Duration = Duration::from_secs(10);

    fn key() -> FleetKey {
        FleetKey::from_bytes([9; 32])
    }

    fn config(server: &TestServer) -> AgentConfig {
        let mut cfg =
            AgentConfig::new(server.addr(), server.client_config(), "agent-7", &key()).unwrap();
        cfg.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        };
        cfg
    }

    async fn next_event(rx: &mut mpsc::UnboundedReceiver<AgentEvent>) -> AgentEvent {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no agent event within 10 s")
            .expect("agent dropped its event sender")
    }

    /// Skip events until one matches.
    async fn until(
        rx: &mut mpsc::UnboundedReceiver<AgentEvent>,
        pred: impl Fn(&AgentEvent) -> bool,
    ) -> AgentEvent {
        loop {
            let ev = next_event(rx).await;
            if pred(&ev) {
                return ev;
            }
        }
    }

    async fn welcome(sc: &mut ServerConn, interval_ms: u32, session_id: u64) {
        match sc.recv().await {
            Some(Frame::Hello { version, id, token }) => {
                assert_eq!(version, 1);
                assert_eq!(id, b"agent-7");
                assert!(key().verify(&id, &token), "bad token");
            }
            other => panic!("expected HELLO, got {other:?}"),
        }
        sc.send(&Frame::Welcome {
            heartbeat_interval_ms: interval_ms,
            session_id,
        })
        .await;
    }

    #[test]
    fn config_rejects_bad_ids() {
        let cfg =
            crate::tls::ClientTls::from_ca_der([crate::testutil::TestCert::generate().cert_der()])
                .unwrap()
                .build()
                .unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = AgentConfig::new(addr, cfg.clone(), "has space", &key()).unwrap_err();
        assert!(err.to_string().contains("has space"), "{err}");
        assert!(AgentConfig::new(addr, cfg.clone(), "", &key()).is_err());
        assert!(AgentConfig::new(addr, cfg, "ok-id_1@x:y.z", &key()).is_ok());
    }

    #[test]
    fn from_ca_file_error_names_file() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = AgentConfig::from_ca_file(addr, "/nonexistent/ca.pem", "a", &key()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let server_cfg =
            crate::tls::ClientTls::from_ca_der([crate::testutil::TestCert::generate().cert_der()])
                .unwrap()
                .build()
                .unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let agent = Agent::new(AgentConfig::new(addr, server_cfg, "a", &key()).unwrap());
        let fut = agent.run(ShutdownSignal::never());
        assert_send(&fut);
    }

    #[tokio::test]
    async fn online_heartbeats_reconnect_then_superseded() {
        let mut server = TestServer::start().await;
        let (agent, mut rx) = Agent::new(config(&server)).with_event_channel();
        let run = tokio::spawn(async move { agent.run(ShutdownSignal::never()).await });

        assert_eq!(
            next_event(&mut rx).await,
            AgentEvent::Connecting { attempt: 1 }
        );
        let mut sc = server.accept().await;
        welcome(&mut sc, 50, 11).await;
        let ev = next_event(&mut rx).await;
        assert!(
            matches!(ev, AgentEvent::Online { session_id: 11, heartbeat_interval, .. }
                if heartbeat_interval == Duration::from_millis(50)),
            "{ev:?}"
        );
        // Heartbeats arrive with increasing seq, roughly every 50 ms.
        for want in 1..=3u32 {
            assert_eq!(sc.recv().await, Some(Frame::Heartbeat { seq: want }));
            sc.send(&Frame::HeartbeatAck { seq: want }).await;
            let ev = next_event(&mut rx).await;
            assert!(
                matches!(ev, AgentEvent::HeartbeatAcked { seq, .. } if seq == want),
                "{ev:?}"
            );
        }
        sc.send(&Frame::Reconnect {
            min_delay_ms: 150,
            max_delay_ms: 200,
        })
        .await;
        let t0 = std::time::Instant::now();
        assert_eq!(
            sc.recv().await,
            None,
            "agent closes after RECONNECT (close_notify)"
        );
        sc.close().await;
        let ev = until(&mut rx, |e| matches!(e, AgentEvent::Backoff { .. })).await;
        match ev {
            AgentEvent::Backoff {
                delay,
                server_requested: true,
            } => assert!(
                delay >= Duration::from_millis(150) && delay <= Duration::from_millis(200),
                "{delay:?}"
            ),
            other => panic!("{other:?}"),
        }
        let mut sc = server.accept().await;
        assert!(
            t0.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t0.elapsed()
        );
        welcome(&mut sc, 1000, 12).await;
        until(&mut rx, |e| {
            matches!(e, AgentEvent::Online { session_id: 12, .. })
        })
        .await;
        sc.send(&Frame::error(ErrorCode::Superseded, "newer session"))
            .await;
        sc.close().await;
        let exit = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
        assert_eq!(
            exit.unwrap(),
            AgentExit::Superseded {
                message: "newer session".into()
            }
        );
    }

    #[tokio::test]
    async fn auth_failure_and_bad_version_are_fatal() {
        for code in [
            ErrorCode::AuthenticationFailed,
            ErrorCode::UnsupportedVersion,
        ] {
            let mut server = TestServer::start().await;
            let agent = Agent::new(config(&server));
            let run = tokio::spawn(async move { agent.run(ShutdownSignal::never()).await });
            let mut sc = server.accept().await;
            sc.recv().await.unwrap();
            sc.send(&Frame::error(code, "no")).await;
            sc.close().await;
            let res = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
            match res {
                Err(AgentError::Rejected { code: c, message }) => {
                    assert_eq!(c, code as u16);
                    assert_eq!(message, "no");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn overloaded_and_drops_back_off_then_recover() {
        let mut server = TestServer::start().await;
        let (agent, mut rx) = Agent::new(config(&server)).with_event_channel();
        let (handle, signal) = shutdown_channel();
        let run = tokio::spawn(async move { agent.run(signal).await });

        // 1: overloaded during HELLO.
        let mut sc = server.accept().await;
        sc.recv().await.unwrap();
        sc.send(&Frame::error(ErrorCode::Overloaded, "busy")).await;
        sc.close().await;
        let ev = until(&mut rx, |e| matches!(e, AgentEvent::Disconnected { .. })).await;
        assert_eq!(
            ev,
            AgentEvent::Disconnected {
                reason: DisconnectReason::ServerError {
                    code: 6,
                    message: "busy".into()
                }
            }
        );
        let ev = next_event(&mut rx).await;
        assert!(
            matches!(ev, AgentEvent::Backoff { delay, server_requested: false }
                if delay <= Duration::from_millis(20)),
            "{ev:?}"
        );
        // 2: plain close before WELCOME: second failure, ceiling doubles.
        assert_eq!(
            next_event(&mut rx).await,
            AgentEvent::Connecting { attempt: 2 }
        );
        let sc = server.accept().await;
        sc.close().await;
        let ev = until(&mut rx, |e| matches!(e, AgentEvent::Backoff { .. })).await;
        assert!(
            matches!(ev, AgentEvent::Backoff { delay, server_requested: false }
                if delay <= Duration::from_millis(40)),
            "{ev:?}"
        );
        // 3: success resets the attempt counter.
        assert_eq!(
            next_event(&mut rx).await,
            AgentEvent::Connecting { attempt: 3 }
        );
        let mut sc = server.accept().await;
        welcome(&mut sc, 10_000, 3).await;
        until(&mut rx, |e| matches!(e, AgentEvent::Online { .. })).await;
        sc.close().await;
        until(&mut rx, |e| matches!(e, AgentEvent::Backoff { .. })).await;
        assert_eq!(
            next_event(&mut rx).await,
            AgentEvent::Connecting { attempt: 1 }
        );
        let _sc = server.accept().await;
        handle.trigger();
        let res = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
        assert_eq!(res.unwrap(), AgentExit::Shutdown);
    }

    #[tokio::test]
    async fn missing_acks_mark_connection_dead() {
        let mut server = TestServer::start().await;
        let (agent, mut rx) = Agent::new(config(&server)).with_event_channel();
        let run = tokio::spawn(async move { agent.run(ShutdownSignal::never()).await });
        let mut sc = server.accept().await;
        welcome(&mut sc, 40, 1).await;
        let t0 = std::time::Instant::now();
        // Read heartbeats but never ACK.
        let reader = tokio::spawn(async move { while sc.recv().await.is_some() {} });
        let ev = until(&mut rx, |e| matches!(e, AgentEvent::Disconnected { .. })).await;
        assert_eq!(
            ev,
            AgentEvent::Disconnected {
                reason: DisconnectReason::HeartbeatTimeout { seq: 1 }
            }
        );
        // First heartbeat at 40 ms, dead 80 ms later.
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        // It reconnects.
        let _sc2 = server.accept().await;
        run.abort();
        reader.abort();
    }

    #[tokio::test]
    async fn shutdown_sends_bye_and_close_notify() {
        let mut server = TestServer::start().await;
        let (agent, mut rx) = Agent::new(config(&server)).with_event_channel();
        let (handle, signal) = shutdown_channel();
        let run = tokio::spawn(async move { agent.run(signal).await });
        let mut sc = server.accept().await;
        welcome(&mut sc, 10_000, 99).await;
        until(&mut rx, |e| matches!(e, AgentEvent::Online { .. })).await;
        handle.trigger();
        assert_eq!(sc.recv().await, Some(Frame::Bye));
        assert_eq!(sc.recv().await, None);
        sc.close().await;
        let res = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
        assert_eq!(res.unwrap(), AgentExit::Shutdown);
        let ev = until(&mut rx, |e| matches!(e, AgentEvent::Disconnected { .. })).await;
        assert_eq!(
            ev,
            AgentEvent::Disconnected {
                reason: DisconnectReason::Shutdown
            }
        );
    }

    #[tokio::test]
    async fn shutdown_during_backoff_returns_promptly() {
        // Nothing listens: connect fails, agent backs off (up to 30 s).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let server = TestServer::start().await;
        let mut cfg = config(&server);
        cfg.addr = addr;
        cfg.backoff = Backoff {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(30),
        };
        let (agent, mut rx) = Agent::new(cfg).with_event_channel();
        let (handle, signal) = shutdown_channel();
        let run = tokio::spawn(async move { agent.run(signal).await });
        let ev = until(&mut rx, |e| matches!(e, AgentEvent::Disconnected { .. })).await;
        assert!(
            matches!(
                ev,
                AgentEvent::Disconnected {
                    reason: DisconnectReason::ConnectFailed(_)
                }
            ),
            "{ev:?}"
        );
        handle.trigger();
        let res = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.unwrap(), AgentExit::Shutdown);
    }
}
