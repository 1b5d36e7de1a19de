//! The optional Prometheus HTTP endpoint (`[metrics] listen`): `GET /metrics`.
//!
//! It runs on one plain thread outside the shards and answers each request by
//! asking the daemon's own control socket for `metrics`, exactly as
//! `presencectl metrics` does. Nothing here touches a shard's hot path: the
//! shards only see one more control client. Requests are answered one at a
//! time (a scrape is a few milliseconds).
//!
//! Bounds: the listening socket carries a send timeout and TCP keepalive that
//! every accepted connection inherits, so a scraper that stops reading cannot
//! hold the answering thread for more than [`WRITE_TIMEOUT`], and a vanished
//! peer is detected. The control socket round trip has [`CONTROL_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};

use crate::control::prometheus::CONTENT_TYPE;

/// A response write to a scraper that does not read gives up after this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The `metrics` round trip on the control socket gives up after this.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest control-socket reply accepted (the text for 1024 shards is < 8 MiB).
const MAX_REPLY: u64 = 64 << 20;

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
/// `GET /metrics` on a background thread named `metrics-http`.
pub fn spawn(listen: SocketAddr, control_socket: PathBuf) -> std::io::Result<()> {
    let listener = bind(listen)?;
    let bound = listener.local_addr()?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| std::io::Error::other(format!("metrics listener {bound}: {e}")))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            info!(listen = %bound, "metrics endpoint listening on http://{bound}/metrics");
            for request in server.incoming_requests() {
                handle(request, &control_socket);
            }
        })?;
    Ok(())
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
    // the blocking accept() time out, which stops tiny_http's accept loop.)
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

fn handle(request: tiny_http::Request, control_socket: &Path) {
    let path = request.url().split('?').next().unwrap_or_default();
    let is_read = matches!(
        request.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    );
    let response = if path != "/metrics" {
        text(404, "not found; the metrics are at /metrics\n".to_owned())
    } else if !is_read {
        text(405, "only GET and HEAD are allowed\n".to_owned())
    } else {
        match query(control_socket) {
            Ok(body) => match header("Content-Type", CONTENT_TYPE) {
                Some(h) => tiny_http::Response::from_string(body).with_header(h),
                None => tiny_http::Response::from_string(body),
            },
            Err(e) => {
                warn!("metrics endpoint: {e}");
                text(503, format!("{e}\n"))
            }
        }
    };
    if let Err(e) = request.respond(response) {
        warn!("metrics endpoint: writing the response: {e}");
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn text(code: u16, body: String) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let r = tiny_http::Response::from_string(body).with_status_code(code);
    match header("Content-Type", "text/plain; charset=utf-8") {
        Some(h) => r.with_header(h),
        None => r,
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
