//! The control socket: a Unix stream socket (mode 0600) served by the event
//! shard. A client writes one line; the daemon answers JSON.
//!
//! - `stats`: one JSON object, then close.
//! - `agent <id>`: that agent's record, then close.
//! - `events [from <seq>]`: event lines from that seq (or from now), then new
//!   ones as they happen, until the client closes.
//! - `ping`: `{"ok":true,...}`, then close.
//!
//! Unknown commands get `{"error":"..."}`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{pin_mut, FutureExt};
use glommio::net::{UnixListener, UnixStream};
use glommio::timer::sleep;
use serde_json::{json, Value};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::shard::{Shard, EVENT_SHARD};
use crate::stats::ShardSnapshot;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 4096;
/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A write to a client that does not read gives up after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {path}: another daemon is answering there")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
}

/// Remove a stale socket file; refuse if a live daemon answers on it.
pub fn prepare_path(path: &Path) -> Result<(), ControlError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse {
            path: path.to_owned(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ControlError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Stats,
    Agent(String),
    Events { from: Option<u64> },
    Ping,
}

/// Parse one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => Ok(Request::Stats),
        ["ping"] => Ok(Request::Ping),
        ["agent", id] => {
            crate::protocol::validate_id(id.as_bytes()).map_err(|e| e.to_string())?;
            Ok(Request::Agent((*id).to_owned()))
        }
        ["events"] => Ok(Request::Events { from: None }),
        ["events", "from", seq] => seq
            .parse()
            .map(|s| Request::Events { from: Some(s) })
            .map_err(|_| format!("`{seq}` is not a sequence number")),
        [] => Err("empty request; try: stats, agent <id>, events [from <seq>], ping".into()),
        _ => Err(format!(
            "unknown command `{}`; try: stats, agent <id>, events [from <seq>], ping",
            line.trim()
        )),
    }
}

/// Serve the control socket on the event shard until the daemon stops.
pub async fn serve(shard: Rc<Shard>) -> Result<(), ControlError> {
    let path = shard.rt.config.server.control_socket.clone();
    let listener = UnixListener::bind(&path).map_err(|e| ControlError::Bind {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Io {
            path: path.clone(),
            source,
        }
    })?;
    info!(path = %path.display(), "control socket listening");
    loop {
        if shard.is_shutting_down() {
            break;
        }
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(client(shard.clone(), stream)).detach();
            }
            Err(e) => {
                warn!("control accept failed: {e}");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Read one line (at most MAX_REQUEST bytes) within REQUEST_TIMEOUT.
async fn read_request(stream: &mut UnixStream) -> Result<String, String> {
    let mut buf = Vec::new();
    let reading = async {
        let mut chunk = [0u8; 512];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.contains(&b'\n') {
                break;
            }
            if buf.len() > MAX_REQUEST {
                return Err(format!("request longer than {MAX_REQUEST} bytes"));
            }
        }
        Ok(())
    }
    .fuse();
    let limit = sleep(REQUEST_TIMEOUT).fuse();
    pin_mut!(reading, limit);
    futures::select_biased! {
        r = reading => r?,
        _ = limit => return Err("no request line within 5s".into()),
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    String::from_utf8(line.to_vec()).map_err(|_| "request is not UTF-8".to_owned())
}

/// Read and discard input for at most 1 s or 1 MiB, until the client closes.
async fn drain(stream: &mut UnixStream) {
    let draining = async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }
    .fuse();
    let limit = sleep(Duration::from_secs(1)).fuse();
    pin_mut!(draining, limit);
    futures::select_biased! {
        _ = draining => {},
        _ = limit => {},
    }
}

async fn write_bounded(stream: &mut UnixStream, data: &[u8]) -> bool {
    let writing = async {
        stream.write_all(data).await?;
        stream.flush().await
    }
    .fuse();
    let limit = sleep(WRITE_TIMEOUT).fuse();
    pin_mut!(writing, limit);
    futures::select_biased! {
        r = writing => r.is_ok(),
        _ = limit => false,
    }
}

async fn reply(stream: &mut UnixStream, v: &Value) {
    let mut line = v.to_string();
    line.push('\n');
    write_bounded(stream, line.as_bytes()).await;
}

async fn client(shard: Rc<Shard>, mut stream: UnixStream) {
    let line = match read_request(&mut stream).await {
        Ok(l) => l,
        Err(e) => {
            reply(&mut stream, &json!({ "error": e })).await;
            // Closing with unread input resets the peer before it reads the
            // error: discard what is still arriving, within bounds.
            drain(&mut stream).await;
            return;
        }
    };
    let req = match parse_request(&line) {
        Ok(r) => r,
        Err(e) => {
            reply(&mut stream, &json!({ "error": e })).await;
            return;
        }
    };
    debug!(?req, "control request");
    match req {
        Request::Stats => {
            let v = gather_stats(&shard).await;
            reply(&mut stream, &v).await;
        }
        Request::Ping => {
            let v = json!({"ok": true, "pid": std::process::id(), "version": env!("CARGO_PKG_VERSION")});
            reply(&mut stream, &v).await;
        }
        Request::Agent(id) => {
            let v = match shard.request_agent(&id).await {
                Ok(Some(info)) => serde_json::to_value(info).unwrap_or(Value::Null),
                Ok(None) => json!({ "error": format!("unknown agent `{id}`") }),
                Err(_) => json!({ "error": "owner shard did not answer" }),
            };
            reply(&mut stream, &v).await;
        }
        Request::Events { from } => stream_events(&shard, &mut stream, from).await,
    }
    let _ = stream.close().await;
}

/// Collect every shard's snapshot and sum them.
pub async fn gather_stats(shard: &Rc<Shard>) -> Value {
    let mut per_shard: Vec<ShardSnapshot> = Vec::with_capacity(shard.nshards);
    for s in 0..shard.nshards {
        match shard.request_stats(s).await {
            Ok(snap) => per_shard.push(snap),
            Err(_) => per_shard.push(ShardSnapshot {
                shard: s,
                ..Default::default()
            }),
        }
    }
    let sum = |f: fn(&ShardSnapshot) -> u64| per_shard.iter().map(f).sum::<u64>();
    let mut errors_sent = serde_json::Map::new();
    for snap in &per_shard {
        for (k, v) in &snap.errors_sent {
            let cur = errors_sent.get(*k).and_then(Value::as_u64).unwrap_or(0);
            errors_sent.insert((*k).to_owned(), json!(cur + v));
        }
    }
    let (next_seq, oldest_seq) = shard
        .events
        .as_ref()
        .map(|l| {
            let l = l.borrow();
            (l.next_seq(), l.oldest_seq())
        })
        .unwrap_or((0, 0));
    let rt = &shard.rt;
    json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "listen": rt.listen.to_string(),
        "shards": shard.nshards,
        "uptime_s": rt.started.elapsed().as_secs(),
        "connections": sum(|s| s.connections),
        "sessions": sum(|s| s.sessions),
        "agents_online": sum(|s| s.agents_online),
        "agents_in_grace": sum(|s| s.agents_in_grace),
        "agents_known": sum(|s| s.agents_known),
        "accepted_total": sum(|s| s.accepted_total),
        "accept_errors_total": sum(|s| s.accept_errors_total),
        "handshakes_total": sum(|s| s.handshakes_total),
        "handshake_failures_total": sum(|s| s.handshake_failures_total),
        "handshake_timeouts_total": sum(|s| s.handshake_timeouts_total),
        "hellos_total": sum(|s| s.hellos_total),
        "heartbeats_total": sum(|s| s.heartbeats_total),
        "timeouts_total": sum(|s| s.timeouts_total),
        "byes_total": sum(|s| s.byes_total),
        "errors_sent": errors_sent,
        "events_next_seq": next_seq,
        "events_oldest_seq": oldest_seq,
        "rss_bytes": crate::stats::rss_bytes(),
        "heap_bytes": crate::stats::heap_bytes(),
        "per_shard": per_shard,
    })
}

/// Stream events from `from` (or from now) until the client closes.
async fn stream_events(shard: &Rc<Shard>, stream: &mut UnixStream, from: Option<u64>) {
    let Some(log) = shard.events.as_ref() else {
        reply(stream, &json!({"error": "events are served by shard 0"})).await;
        return;
    };
    debug_assert_eq!(shard.id, EVENT_SHARD);
    let bell = log.borrow_mut().subscribe();
    let mut next = from.unwrap_or_else(|| log.borrow().next_seq());
    loop {
        let batch = log.borrow().read_from(next, 512);
        match batch {
            Err(gap) => {
                let v = json!({
                    "error": format!("events from seq {next} are no longer held; the oldest held is {}", gap.oldest),
                    "oldest": gap.oldest,
                });
                reply(stream, &v).await;
                return;
            }
            Ok(events) if events.is_empty() => {
                // Wait for a publish, or for the client to go away.
                let mut probe = [0u8; 64];
                let rung = bell.recv().fuse();
                let eof = stream.read(&mut probe).fuse();
                pin_mut!(rung, eof);
                let go_on = futures::select_biased! {
                    r = rung => r.is_some(),
                    r = eof => matches!(r, Ok(n) if n > 0),
                };
                if !go_on || shard.is_shutting_down() {
                    return;
                }
            }
            Ok(events) => {
                let mut out = String::new();
                for e in &events {
                    out.push_str(&e.to_line());
                }
                next = events.last().map_or(next, |e| e.seq + 1);
                if !write_bounded(stream, out.as_bytes()).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request("stats"), Ok(Request::Stats));
        assert_eq!(parse_request("stats\r"), Ok(Request::Stats));
        assert_eq!(parse_request("agent a-1"), Ok(Request::Agent("a-1".into())));
        assert_eq!(parse_request("events"), Ok(Request::Events { from: None }));
        assert_eq!(
            parse_request("events from 17"),
            Ok(Request::Events { from: Some(17) })
        );
        assert!(parse_request("events from x").is_err());
        assert!(parse_request("agent bad id").is_err());
        assert!(parse_request("agent b!d").is_err());
        assert!(parse_request("frobnicate")
            .unwrap_err()
            .contains("unknown command"));
    }

    #[test]
    fn stale_socket_file_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sock");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        prepare_path(&p).unwrap();
        assert!(!p.exists());
        let _live = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(matches!(prepare_path(&p), Err(ControlError::InUse { .. })));
    }
}
