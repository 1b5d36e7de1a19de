//! The optional Prometheus HTTP endpoint (`[metrics] listen`): `GET /metrics`.
//!
//! It runs on plain threads outside the shards and answers each request by
//! asking the daemon's own control socket for `metrics`, exactly as
//! `presencectl metrics` does. Nothing here touches a shard's hot path: the
//! shards only see one more control client.
//!
//! Bounds: one accepting thread hands connections to a fixed pool of
//! [`WORKERS`] threads through a queue of [`QUEUE`]; a connection that finds
//! the queue full gets `503` at once and is closed. A client has
//! [`READ_TIMEOUT`] from accept, in all, to send its request head (at most [`MAX_HEAD`]
//! bytes), then closes it; each connection carries one request
//! (`Connection: close`). Both kinds of closing are counted in
//! [`REJECTED`] (`metrics_http_rejected_total` in `stats`). The listening
//! socket carries a send timeout and TCP keepalive that every accepted
//! connection inherits, so a scraper that stops reading cannot hold a worker
//! for more than [`WRITE_TIMEOUT`]. The control socket round trip has
//! [`CONTROL_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};

/// A response write to a scraper that does not read gives up after this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The `metrics` round trip on the control socket gives up after this.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// A client has this long after being picked up to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads answering requests.
pub const WORKERS: usize = 4;
/// Accepted connections waiting for a worker; more get 503.
pub const QUEUE: usize = 16;
/// Largest request head read (request line and headers).
pub const MAX_HEAD: usize = 8192;
/// Largest control-socket reply accepted (the text for 1024 shards is < 8 MiB).
const MAX_REPLY: u64 = 64 << 20;

/// The `Content-Type` of the Prometheus text exposition (control/prometheus.rs).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections the endpoint closed because of its bounds: the worker queue
/// was full (answered 503), or no complete request head arrived within
/// [`READ_TIMEOUT`].
pub static REJECTED: AtomicU64 = AtomicU64::new(0);

/// Why a scrape got no metrics (answered with 503 and this text).
#[derive(Debug, Error)]
pub enum ScrapeError {
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSON error object instead of the text format.
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error("control socket {path}: empty reply")]
    Empty { path: PathBuf },
}

/// Bind `listen` now (so a bad address fails the start-up) and serve
/// `GET /metrics` on background threads named `metrics-http*`.
pub fn spawn(listen: SocketAddr, control_socket: PathBuf) -> std::io::Result<()> {
    let listener = bind(listen)?;
    let bound = listener.local_addr()?;
    let (tx, rx) = sync_channel::<(TcpStream, Instant)>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let control_socket = Arc::new(control_socket);
    for i in 0..WORKERS {
        let rx = rx.clone();
        let sock = control_socket.clone();
        std::thread::Builder::new()
            .name(format!("metrics-http-{i}"))
            .spawn(move || worker(&rx, &sock))?;
    }
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            info!(listen = %bound, "metrics endpoint listening on http://{bound}/metrics");
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                match tx.try_send((conn, Instant::now())) {
                    Ok(()) => {}
                    Err(TrySendError::Full((mut conn, _))) => {
                        REJECTED.fetch_add(1, Ordering::Relaxed);
                        // A fresh socket's send buffer takes this at once.
                        let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                        let _ = conn.write_all(&response(
                            503,
                            "text/plain; charset=utf-8",
                            b"busy: too many connections\n",
                            true,
                        ));
                    }
                    Err(TrySendError::Disconnected(_)) => break,
                }
            }
        })?;
    Ok(())
}

/// Take connections from the queue and answer each one's request.
fn worker(rx: &Mutex<Receiver<(TcpStream, Instant)>>, control_socket: &Path) {
    loop {
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((mut conn, accepted)) = next else {
            return;
        };
        match read_head(&mut conn, accepted + READ_TIMEOUT) {
            Some(head) => {
                let reply = handle(&head, control_socket);
                if let Err(e) = conn.write_all(&reply) {
                    warn!("metrics endpoint: writing the response: {e}");
                }
            }
            None => {
                REJECTED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The request head (up to the blank line), or None when the client did not
/// send one by `deadline` ([`READ_TIMEOUT`] after accept) in [`MAX_HEAD`] bytes.
fn read_head(conn: &mut TcpStream, deadline: Instant) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        conn.set_read_timeout(Some(left)).ok()?;
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return String::from_utf8(head).ok();
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
}

/// A complete `Connection: close` response.
fn response(code: u16, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
    let with_addr =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("metrics listen {listen}: {e}"));
    let sock = Socket::new(
        Domain::for_address(listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(with_addr)?;
    sock.set_cloexec(true).map_err(with_addr)?;
    sock.set_reuse_address(true).map_err(with_addr)?;
    // A live upgrade's new process binds this address while the old one
    // still holds it (both set SO_REUSEPORT); the old one's exit frees it.
    sock.set_reuse_port(true).map_err(with_addr)?;
    // Inherited by accepted sockets. (Not SO_RCVTIMEO: it would also make
    // the blocking accept() time out.)
    sock.set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(with_addr)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive).map_err(with_addr)?;
    sock.bind(&listen.into()).map_err(with_addr)?;
    sock.listen(64).map_err(with_addr)?;
    Ok(sock.into())
}

fn handle(head: &str, control_socket: &Path) -> Vec<u8> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let mut words = head.lines().next().unwrap_or_default().split(' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return response(400, PLAIN, b"bad request\n", true);
    };
    let path = target.split('?').next().unwrap_or_default();
    let with_body = method != "HEAD";
    if path != "/metrics" {
        response(
            404,
            PLAIN,
            b"not found; the metrics are at /metrics\n",
            with_body,
        )
    } else if !matches!(method, "GET" | "HEAD") {
        response(405, PLAIN, b"only GET and HEAD are allowed\n", with_body)
    } else {
        match query(control_socket) {
            Ok(body) => response(200, CONTENT_TYPE, body.as_bytes(), with_body),
            Err(e) => {
                warn!("metrics endpoint: {e}");
                response(503, PLAIN, format!("{e}\n").as_bytes(), with_body)
            }
        }
    }
}

/// Ask the control socket for `metrics`.
fn query(control_socket: &Path) -> Result<String, ScrapeError> {
    let err = |source| ScrapeError::Io {
        path: control_socket.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(control_socket).map_err(err)?;
    s.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(err)?;
    s.set_write_timeout(Some(CONTROL_TIMEOUT)).map_err(err)?;
    s.write_all(b"metrics\n").map_err(err)?;
    let mut body = String::new();
    s.take(MAX_REPLY).read_to_string(&mut body).map_err(err)?;
    if body.starts_with('{') {
        return Err(ScrapeError::Daemon(body.trim().to_owned()));
    }
    if body.is_empty() {
        return Err(ScrapeError::Empty {
            path: control_socket.to_owned(),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A fake control socket answering every client with `reply`.
    fn fake_control(dir: &Path, reply: &'static str) -> PathBuf {
        let path = dir.join("c.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(line, "metrics\n");
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        path
    }

    fn free_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_404_and_503() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_control(d.path(), "# TYPE x gauge\nx 1\n");
        let addr = free_port();
        spawn(addr, sock).unwrap();
        let r = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("version=0.0.4"), "{r}");
        assert!(r.ends_with("x 1\n"), "{r}");
        let r = get(
            addr,
            "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");

        // The daemon is gone: 503 naming the socket.
        let addr2 = free_port();
        spawn(addr2, d.path().join("missing.sock")).unwrap();
        let r = get(
            addr2,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("missing.sock"), "{r}");
    }

    #[test]
    fn bind_errors_surface_at_once() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = spawn(addr, PathBuf::from("/nonexistent")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
