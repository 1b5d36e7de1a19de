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
//!
//! **Authority.** Read-only verbs (`stats`, `agent`, `events`, `ping`,
//! `metrics`, `guard`) answer anyone who can connect (the owner, and with
//! `control_group` that group's members). Verbs that change the daemon
//! (`upgrade`, `reload`, `guard release`) need the peer (SO_PEERCRED) to be
//! the daemon's own user or root; others get
//! `{"error":"`<verb>` requires the daemon's user or root"}`.

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

use crate::control::stats::gather_stats;
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

/// Why a request line is not a command. The text is the `error` the client
/// gets.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("empty request; {USAGE}")]
    Empty,
    #[error("unknown command `{0}`; {USAGE}")]
    Unknown(String),
    #[error(transparent)]
    AgentId(#[from] presence_proto::ProtocolError),
    #[error("`{0}` is not a sequence number")]
    Seq(String),
}

/// Why no request line could be read.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("no request line within 5s")]
    Timeout,
    #[error("request is not UTF-8")]
    NotUtf8,
}

/// A reload that left the previous certificate and keys in service.
#[derive(Debug, Error)]
#[error("{reason}")]
pub struct ReloadError {
    pub reason: String,
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
    /// Cluster mode: this node, its bridge and every node it sees.
    Cluster,
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

impl Request {
    /// The verb as the client typed it (for errors and logs).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Stats => "stats",
            Request::Agent(_) => "agent",
            Request::Events { .. } => "events",
            Request::Ping => "ping",
            Request::Metrics => "metrics",
            Request::Reload => "reload",
            Request::Upgrade(_) => "upgrade",
            Request::Guard => "guard",
            Request::GuardRelease(_) => "guard release",
            Request::Cluster => "cluster",
        }
    }

    /// Whether this request changes the daemon (and so needs the owner).
    pub fn is_privileged(&self) -> bool {
        match self {
            Request::Stats
            | Request::Agent(_)
            | Request::Events { .. }
            | Request::Ping
            | Request::Metrics
            | Request::Guard
            | Request::Cluster => false,
            Request::Reload | Request::Upgrade(_) | Request::GuardRelease(_) => true,
        }
    }
}

/// A privileged request from someone other than the daemon's user or root.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("`{verb}` requires the daemon's user or root")]
pub struct NotAuthorized {
    pub verb: &'static str,
}

/// Who may do what: read-only verbs are open to any peer that could
/// connect; privileged ones need `peer_uid` to be `daemon_uid` or 0. An
/// unknown peer (no SO_PEERCRED) gets read-only verbs only.
pub fn authorize(
    req: &Request,
    peer_uid: Option<u32>,
    daemon_uid: u32,
) -> Result<(), NotAuthorized> {
    match peer_uid {
        _ if !req.is_privileged() => Ok(()),
        Some(uid) if uid == 0 || uid == daemon_uid => Ok(()),
        _ => Err(NotAuthorized { verb: req.verb() }),
    }
}

const USAGE: &str =
    "try: stats, agent <id>, events [from <seq>], metrics, reload, guard [release [<id>]], cluster, upgrade [<binary>], ping";

/// The `cluster` reply (docs/control-socket.md).
fn cluster(shard: &Shard) -> serde_json::Value {
    match &shard.rt.cluster {
        None => json!({"error": "cluster mode is off"}),
        Some(c) => {
            let stats = c.handle.stats();
            json!({
                "node_id": c.node_id,
                "epoch": c.epoch,
                "connected": stats.connected,
                "ready": stats.ready,
                "stats": stats,
                "nodes": c.handle.nodes(),
            })
        }
    }
}

/// Parse one request line.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => Ok(Request::Stats),
        ["ping"] => Ok(Request::Ping),
        ["metrics"] => Ok(Request::Metrics),
        ["reload"] => Ok(Request::Reload),
        ["guard"] => Ok(Request::Guard),
        ["cluster"] => Ok(Request::Cluster),
        ["guard", "release"] => Ok(Request::GuardRelease(None)),
        ["guard", "release", id] => Ok(Request::GuardRelease(Some((*id).to_owned()))),
        ["upgrade"] => Ok(Request::Upgrade(None)),
        ["upgrade", binary] => Ok(Request::Upgrade(Some(PathBuf::from(binary)))),
        ["agent", id] => {
            presence_proto::validate_id(id.as_bytes())?;
            Ok(Request::Agent((*id).to_owned()))
        }
        ["events"] => Ok(Request::Events { from: None }),
        ["events", "from", seq] => seq
            .parse()
            .map(|s| Request::Events { from: Some(s) })
            .map_err(|_| RequestError::Seq((*seq).to_owned())),
        [] => Err(RequestError::Empty),
        _ => Err(RequestError::Unknown(line.trim().to_owned())),
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
pub async fn serve(
    shard: Rc<Shard>,
    listener: StdUnixListener,
    notify: Notifier,
) -> Result<(), ControlError> {
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
                glommio::spawn_local(client(shard.clone(), stream, peer, notify)).detach();
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
async fn read_request(stream: &mut UnixStream) -> Result<String, ReadError> {
    let mut buf = Vec::new();
    let reading = async {
        let mut chunk = [0u8; 512];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.contains(&b'\n') {
                break;
            }
            if buf.len() > MAX_REQUEST {
                return Err(ReadError::TooLong);
            }
        }
        Ok(())
    }
    .fuse();
    let limit = sleep(REQUEST_TIMEOUT).fuse();
    pin_mut!(reading, limit);
    futures::select_biased! {
        r = reading => r?,
        _ = limit => return Err(ReadError::Timeout),
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    if line.len() > MAX_REQUEST {
        return Err(ReadError::TooLong);
    }
    String::from_utf8(line.to_vec()).map_err(|_| ReadError::NotUtf8)
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

async fn client(shard: Rc<Shard>, mut stream: UnixStream, peer: Option<Peer>, notify: Notifier) {
    let line = match read_request(&mut stream).await {
        Ok(l) => l,
        Err(e) => {
            reply(&mut stream, &json!({ "error": e.to_string() })).await;
            // Closing with unread input resets the peer before it reads the
            // error: discard what is still arriving, within bounds.
            drain(&mut stream).await;
            return;
        }
    };
    let req = match parse_request(&line) {
        Ok(r) => r,
        Err(e) => {
            reply(&mut stream, &json!({ "error": e.to_string() })).await;
            return;
        }
    };
    debug!(?req, "control request");
    let daemon_uid = nix::unistd::geteuid().as_raw();
    if let Err(e) = authorize(&req, peer.map(|p| p.uid), daemon_uid) {
        warn!(?peer, verb = req.verb(), "control request refused: {e}");
        reply(&mut stream, &json!({ "error": e.to_string() })).await;
        return;
    }
    match req {
        Request::Stats => {
            let stats = gather_stats(&shard).await;
            reply(&mut stream, &stats.to_json()).await;
        }
        Request::Ping => {
            let v = json!({"ok": true, "pid": std::process::id(), "version": env!("CARGO_PKG_VERSION")});
            reply(&mut stream, &v).await;
        }
        Request::Agent(id) => reply(&mut stream, &agent(&shard, &id).await).await,
        Request::Events { from } => stream_events(&shard, &mut stream, from).await,
        Request::Metrics => {
            let stats = gather_stats(&shard).await;
            let text = crate::control::prometheus::render(&stats);
            write_bounded(&mut stream, text.as_bytes()).await;
        }
        Request::Guard => reply(&mut stream, &guard(&shard)).await,
        Request::Cluster => reply(&mut stream, &cluster(&shard)).await,
        Request::GuardRelease(agent) => {
            info!(
                ?peer,
                ?agent,
                "guard release requested on the control socket"
            );
            let n = shard.guard_release(agent.as_deref());
            reply(&mut stream, &json!({"ok": true, "released": n})).await;
        }
        Request::Upgrade(binary) => upgrade(&shard, &mut stream, peer, binary).await,
        Request::Reload => {
            info!(?peer, "reload requested on the control socket");
            let v = match reload(&shard, notify) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            };
            reply(&mut stream, &v).await;
        }
    }
    let _ = stream.close().await;
}

/// `agent <id>`: the record from the shard that owns it.
async fn agent(shard: &Shard, id: &str) -> Value {
    match shard.request_agent(id).await {
        Ok(Some(info)) => serde_json::to_value(info).unwrap_or(Value::Null),
        Ok(None) => json!({ "error": format!("unknown agent `{id}`") }),
        Err(_) => json!({ "error": "owner shard did not answer" }),
    }
}

/// `guard`: status and held events (the guard lives on the event shard).
fn guard(shard: &Shard) -> Value {
    match &shard.guard {
        Some(g) => {
            let g = g.borrow();
            json!({
                "status": g.status(crate::shared::wall_ms()),
                "held": g.held_list(1000),
            })
        }
        None => json!({"error": "the guard runs on the event shard"}),
    }
}

/// `upgrade [<binary>]`: hand over, reply with the report, and on success
/// make this process stop.
async fn upgrade(
    shard: &Rc<Shard>,
    stream: &mut UnixStream,
    peer: Option<Peer>,
    binary: Option<PathBuf>,
) {
    let binary = binary.unwrap_or_else(|| shard.rt.binary.clone());
    info!(?peer, binary = %binary.display(), "upgrade requested on the control socket");
    let report = crate::control::upgrade::upgrade(shard, &binary).await;
    if report.ok {
        info!(new_pid = ?report.new_pid, connections = report.connections, "upgrade done; this process exits");
    } else {
        warn!(error = ?report.error, "upgrade failed; still serving");
    }
    reply(
        stream,
        &serde_json::to_value(&report).unwrap_or(Value::Null),
    )
    .await;
    if report.ok || report.committed {
        // `upgrade` already marked the hand-over (`handed_over`).
        use std::sync::atomic::Ordering::SeqCst;
        shard.rt.shutdown.store(true, SeqCst);
    }
}

/// What the control socket tells the service manager. Injected by the
/// process (`process::supervise::NOTIFIER`): control does not know systemd.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    /// A reload starts.
    pub reloading: fn(),
    /// A reload ended; the argument is the status line.
    pub reloaded: fn(&str),
}

impl Notifier {
    /// Tells nobody.
    pub const NONE: Notifier = Notifier {
        reloading: || {},
        reloaded: |_| {},
    };
}

/// Reload TLS material and the fleet key; log the outcome.
pub fn reload(shard: &Shard, notify: Notifier) -> Result<(), ReloadError> {
    (notify.reloading)();
    let r = shard.rt.reload().map_err(|e| ReloadError {
        reason: e.to_string(),
    });
    match &r {
        Ok(()) => {
            info!("reloaded certificate, key, fleet keys and deny-list");
            shard.revoke_everywhere();
        }
        Err(e) => warn!("reload failed, keeping the previous certificate and keys: {e}"),
    }
    (notify.reloaded)(if r.is_ok() {
        "reloaded"
    } else {
        "reload failed; previous certificate kept"
    });
    r
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
            .to_string()
            .contains("unknown command"));
    }

    #[test]
    fn only_the_owner_or_root_changes_the_daemon() {
        let owner = 998;
        let member = Some(1234);
        for line in [
            "stats",
            "agent a-1",
            "events",
            "events from 3",
            "ping",
            "metrics",
            "guard",
        ] {
            let req = parse_request(line).unwrap();
            assert_eq!(authorize(&req, member, owner), Ok(()), "{line}");
            assert_eq!(authorize(&req, None, owner), Ok(()), "{line}");
        }
        for line in [
            "upgrade",
            "upgrade /usr/bin/presenced",
            "reload",
            "guard release",
            "guard release a-1",
        ] {
            let req = parse_request(line).unwrap();
            let e = authorize(&req, member, owner).unwrap_err();
            assert!(
                e.to_string().contains("requires the daemon's user or root"),
                "{e}"
            );
            assert!(authorize(&req, None, owner).is_err(), "{line}");
            assert_eq!(authorize(&req, Some(owner), owner), Ok(()), "{line}");
            assert_eq!(authorize(&req, Some(0), owner), Ok(()), "{line}");
        }
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
