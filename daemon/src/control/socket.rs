//! The control socket: a Unix stream socket (mode 0600) served by the event
//! shard. A client writes one line; the daemon answers JSON.
//!
//! - `stats`: one JSON object, then close.
//! - `agent <id>`: that agent's record, then close.
//! - `events [from <seq>]`: event lines from that seq (or from now), then new
//!   ones as they happen, until the client closes.
//! - `ping`: `{"ok":true,...}`, then close.
//! - `metrics`: the Prometheus text exposition format, then close.
//! - `reload`: reload certificate, key and fleet key; `{"ok":...}`.
//!
//! Unknown commands get `{"error":"..."}`.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{pin_mut, FutureExt};
use glommio::net::UnixStream;
use glommio::timer::sleep;
use serde_json::{json, Value};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::control::stats::ShardSnapshot;
use crate::shard::{Shard, EVENT_SHARD};

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
    #[error("control socket {path}: group `{group}` does not exist")]
    NoSuchGroup { path: PathBuf, group: String },
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

/// Bind the control socket: mode 0600, or 0660 owned by `group`.
/// With `takeover` (a live upgrade) the path is taken from the process
/// still answering on it, which keeps serving its already-open clients.
pub fn bind_with(
    path: &Path,
    group: Option<&str>,
    takeover: bool,
) -> Result<StdUnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    if takeover {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    } else {
        prepare_path(path)?;
    }
    let listener = StdUnixListener::bind(path).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    let mode = match group {
        Some(name) => {
            let gid = nix::unistd::Group::from_name(name)
                .map_err(|e| io(std::io::Error::from(e)))?
                .ok_or_else(|| ControlError::NoSuchGroup {
                    path: path.to_owned(),
                    group: name.to_owned(),
                })?
                .gid;
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| io(std::io::Error::from(e)))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// Bind the control socket (refusing a path a live daemon answers on).
pub fn bind(path: &Path, group: Option<&str>) -> Result<StdUnixListener, ControlError> {
    bind_with(path, group, false)
}

/// Remove the socket file at exit, unless another process bound the path
/// since (a live upgrade): compare the file with our listener's inode.
pub fn remove_if_ours(path: &Path, listener_ino: Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(meta), Some(ino)) = (std::fs::metadata(path), listener_ino) {
        if meta.ino() == ino {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Stats,
    Agent(String),
    Events {
        from: Option<u64>,
    },
    Ping,
    Metrics,
    Reload,
    /// Hand everything to a new process (`upgrade [<binary>]`).
    Upgrade(Option<PathBuf>),
    /// The mass-offline guard: status and held events.
    Guard,
    /// Release held events (all, or one agent's).
    GuardRelease(Option<String>),
}

const USAGE: &str =
    "try: stats, agent <id>, events [from <seq>], metrics, reload, guard [release [<id>]], upgrade [<binary>], ping";

/// Parse one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => Ok(Request::Stats),
        ["ping"] => Ok(Request::Ping),
        ["metrics"] => Ok(Request::Metrics),
        ["reload"] => Ok(Request::Reload),
        ["guard"] => Ok(Request::Guard),
        ["guard", "release"] => Ok(Request::GuardRelease(None)),
        ["guard", "release", id] => Ok(Request::GuardRelease(Some((*id).to_owned()))),
        ["upgrade"] => Ok(Request::Upgrade(None)),
        ["upgrade", binary] => Ok(Request::Upgrade(Some(PathBuf::from(binary)))),
        ["agent", id] => {
            presence_proto::validate_id(id.as_bytes()).map_err(|e| e.to_string())?;
            Ok(Request::Agent((*id).to_owned()))
        }
        ["events"] => Ok(Request::Events { from: None }),
        ["events", "from", seq] => seq
            .parse()
            .map(|s| Request::Events { from: Some(s) })
            .map_err(|_| format!("`{seq}` is not a sequence number")),
        [] => Err(format!("empty request; {USAGE}")),
        _ => Err(format!("unknown command `{}`; {USAGE}", line.trim())),
    }
}

/// How often the (non-blocking) control listener is polled for clients.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Who is on the other end of a control connection (SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

fn peer_of(fd: &OwnedFd) -> Option<Peer> {
    let c = nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// Serve the control socket on the event shard until the daemon stops.
/// The listener was bound (and its mode set) before any shard started.
pub async fn serve(shard: Rc<Shard>, listener: StdUnixListener) -> Result<(), ControlError> {
    let path = shard.rt.config.server.control_socket.clone();
    info!(path = %path.display(), "control socket listening");
    while !shard.is_shutting_down() {
        match listener.accept() {
            Ok((stream, _)) => {
                let fd = OwnedFd::from(stream);
                let peer = peer_of(&fd);
                if let Err(e) = nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                ) {
                    warn!("control client: {e}");
                    continue;
                }
                // SAFETY: the fd is a connected Unix stream socket we own.
                let stream = unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) };
                glommio::spawn_local(client(shard.clone(), stream, peer)).detach();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sleep(ACCEPT_POLL).await,
            Err(e) => {
                warn!("control accept failed: {e}");
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
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

async fn client(shard: Rc<Shard>, mut stream: UnixStream, peer: Option<Peer>) {
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
        Request::Metrics => {
            let v = gather_stats(&shard).await;
            let text = crate::control::prometheus::render(&v);
            write_bounded(&mut stream, text.as_bytes()).await;
        }
        Request::Guard => {
            let v = match &shard.guard {
                Some(g) => {
                    let g = g.borrow();
                    json!({
                        "status": g.status(crate::shared::wall_ms()),
                        "held": g.held_list(1000),
                    })
                }
                None => json!({"error": "the guard runs on the event shard"}),
            };
            reply(&mut stream, &v).await;
        }
        Request::GuardRelease(agent) => {
            info!(
                ?peer,
                ?agent,
                "guard release requested on the control socket"
            );
            let n = shard.guard_release(agent.as_deref());
            reply(&mut stream, &json!({"ok": true, "released": n})).await;
        }
        Request::Upgrade(binary) => {
            let binary = binary.unwrap_or_else(|| shard.rt.binary.clone());
            info!(?peer, binary = %binary.display(), "upgrade requested on the control socket");
            let report = crate::control::upgrade::upgrade(&shard, &binary).await;
            if report.ok {
                info!(new_pid = ?report.new_pid, connections = report.connections, "upgrade done; this process exits");
            } else {
                warn!(error = ?report.error, "upgrade failed; still serving");
            }
            reply(
                &mut stream,
                &serde_json::to_value(&report).unwrap_or(Value::Null),
            )
            .await;
            if report.ok {
                shard
                    .rt
                    .handed_over
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                shard
                    .rt
                    .shutdown
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Request::Reload => {
            info!(?peer, "reload requested on the control socket");
            let v = match reload(&shard) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e}),
            };
            reply(&mut stream, &v).await;
        }
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
    let events_by_reason: serde_json::Map<String, Value> = shard
        .events
        .as_ref()
        .map(|l| {
            l.borrow()
                .by_reason()
                .iter()
                .map(|((on, r), n)| {
                    (
                        format!("{}:{r}", if *on { "online" } else { "offline" }),
                        json!(n),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let guard = shard.guard.as_ref().map(|g| {
        serde_json::to_value(g.borrow().status(crate::shared::wall_ms())).unwrap_or(Value::Null)
    });
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
        "handshakes_resumed_total": sum(|s| s.handshakes_resumed_total),
        "tickets": serde_json::to_value(rt.ticketer.stats()).unwrap_or(Value::Null),
        "handshake_failures_total": sum(|s| s.handshake_failures_total),
        "handshake_timeouts_total": sum(|s| s.handshake_timeouts_total),
        "hellos_total": sum(|s| s.hellos_total),
        "heartbeats_total": sum(|s| s.heartbeats_total),
        "timeouts_total": sum(|s| s.timeouts_total),
        "byes_total": sum(|s| s.byes_total),
        "admission_rejected_total": sum(|s| s.admission_rejected_total),
        "handshakes_in_flight": sum(|s| s.handshakes_in_flight),
        "errors_sent": errors_sent,
        "events_next_seq": next_seq,
        "events_oldest_seq": oldest_seq,
        "reload": rt.reload_status(),
        "record_layer": rt.record_layer.lock().map(|l| l.clone()).unwrap_or_default(),
        "events_by_reason": events_by_reason,
        "presumed_online": sum(|s| s.presumed_online),
        "state": per_shard.iter().map(|s| s.state.as_ref().map(|st| st.presence)).collect::<Vec<_>>(),
        "guard": guard,
        "rss_bytes": crate::control::stats::rss_bytes(),
        "heap_bytes": crate::control::stats::heap_bytes(),
        "per_shard": per_shard,
    })
}

/// Reload TLS material and the fleet key; log the outcome.
pub fn reload(shard: &Shard) -> Result<(), String> {
    crate::process::supervise::reloading();
    let r = shard.rt.reload();
    match &r {
        Ok(()) => info!("reloaded certificate, key and fleet key"),
        Err(e) => warn!("reload failed, keeping the previous certificate and keys: {e}"),
    }
    crate::process::supervise::reloaded(if r.is_ok() {
        "reloaded"
    } else {
        "reload failed; previous certificate kept"
    });
    r.map_err(|e| e.to_string())
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
                let v = match gap {
                    crate::presence::events::Gap::Gone { oldest } => json!({
                        "error": format!("events from seq {next} are no longer held; the oldest held is {oldest}"),
                        "oldest": oldest,
                    }),
                    crate::presence::events::Gap::Future { next: upcoming } => json!({
                        "error": format!("seq {next} has not been issued; the next event gets {upcoming} (did the daemon restart?)"),
                        "next": upcoming,
                    }),
                };
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
    fn bound_socket_is_private() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sock");
        let _l = bind(&p, None).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&p, None), Err(ControlError::InUse { .. })));
        let q = d.path().join("g.sock");
        assert!(matches!(
            bind(&q, Some("no-such-group-presenced")),
            Err(ControlError::NoSuchGroup { .. })
        ));
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
