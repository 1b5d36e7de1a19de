//! End-to-end test harness: spawns the real `presenced` binary on a fresh
//! dev setup bound to port 0, and talks to it over real TLS (the bench's
//! client library) and its real control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use presence_client::{Alpn, ClientTls, Connection, FleetKey, Welcome};
use serde_json::Value;

/// Path of a workspace binary next to the test executable (target/<profile>/NAME).
/// Builds the workspace binaries if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--workspace", "--bins"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    assert_fresh(&path);
    path
}

/// The spawned binary must not be older than its sources: `cargo test -p
/// presenced-tests` alone rebuilds the libraries but not the binaries, and a
/// test against a stale binary proves nothing.
fn assert_fresh(bin: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        let mut best = None;
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let p = entry.path();
            let t = if p.is_dir() {
                newest(&p)
            } else {
                entry.metadata().and_then(|m| m.modified()).ok()
            };
            best = best.max(t);
        }
        best
    }
    let Ok(bin_time) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // A binary depends on its own crate's sources and the protocol crate's.
    let name = bin.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let sources: &[&str] = if name.starts_with("presence-") {
        &["proto/src", "bench/src"]
    } else {
        &["proto/src", "daemon/src"]
    };
    for src in sources {
        if let Some(t) = newest(&root.join(src)) {
            assert!(
                t <= bin_time,
                "{} is older than {src}: run `cargo test --workspace` (or `cargo build --workspace --bins` first)",
                bin.display()
            );
        }
    }
}

/// Settings for a test daemon. Defaults are short so tests run quickly.
#[derive(Debug, Clone)]
pub struct Options {
    pub shards: usize,
    pub heartbeat_interval: &'static str,
    pub miss_limit: u32,
    pub offline_grace: &'static str,
    pub hello_timeout: &'static str,
    pub handshake_timeout: &'static str,
    pub event_ring_capacity: usize,
    /// Listen address ("127.0.0.1:0": any free port).
    pub listen: String,
    /// `[state] restart_grace`.
    pub restart_grace: &'static str,
    /// Extra TOML appended verbatim.
    pub extra: String,
    /// `[cluster]` (None: standalone).
    pub cluster: Option<ClusterOptions>,
}

/// `[cluster]` of a test daemon: short node liveness timings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub node_id: String,
    pub nats_url: String,
    pub node_heartbeat: &'static str,
    pub node_lost_after: &'static str,
}

impl ClusterOptions {
    /// Node `node_id` on the NATS server at `nats_url`, heartbeat 200ms,
    /// lost after 3s.
    pub fn new(node_id: &str, nats_url: &str) -> Self {
        Self {
            node_id: node_id.into(),
            nats_url: nats_url.into(),
            node_heartbeat: "200ms",
            node_lost_after: "3s",
        }
    }

    pub fn toml(&self) -> String {
        format!(
            "\n[cluster]\nnode_id = \"{}\"\nnats_urls = [\"{}\"]\nnode_heartbeat = \"{}\"\nnode_lost_after = \"{}\"\n",
            self.node_id, self.nats_url, self.node_heartbeat, self.node_lost_after
        )
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shards: 2,
            heartbeat_interval: "30s",
            miss_limit: 3,
            offline_grace: "60s",
            hello_timeout: "10s",
            handshake_timeout: "10s",
            event_ring_capacity: 100_000,
            listen: "127.0.0.1:0".into(),
            restart_grace: "120s",
            extra: String::new(),
            cluster: None,
        }
    }
}

/// A running daemon, killed (SIGKILL) on drop if still alive.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub control: PathBuf,
    pub fleet_key: FleetKey,
    pub ca: PathBuf,
    pub log: PathBuf,
    /// Processes that took over by a live upgrade (killed on drop too).
    pub successors: std::sync::Mutex<Vec<u32>>,
}

pub fn config_text(o: &Options) -> String {
    let cluster = o
        .cluster
        .as_ref()
        .map(ClusterOptions::toml)
        .unwrap_or_default();
    format!(
        r#"[server]
listen = "{listen}"
shards = {shards}
control_socket = "control.sock"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
handshake_timeout = "{hs}"

[auth]
fleet_key = "fleet.key"

[presence]
heartbeat_interval = "{hb}"
miss_limit = {miss}
offline_grace = "{grace}"
hello_timeout = "{hello}"
event_ring_capacity = {ring}

[state]
dir = "state"
restart_grace = "{restart_grace}"
{extra}
"#,
        shards = o.shards,
        hs = o.handshake_timeout,
        hb = o.heartbeat_interval,
        miss = o.miss_limit,
        grace = o.offline_grace,
        hello = o.hello_timeout,
        ring = o.event_ring_capacity,
        listen = o.listen,
        restart_grace = o.restart_grace,
        extra = o.extra,
    ) + &cluster
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// `presenced dev-init` into a temp dir, write the test config, spawn `serve`.
    pub fn start_with(o: Options) -> Self {
        Self::spawn_in(dev_setup(&config_text(&o)))
    }

    /// Spawn `presenced serve` on the setup already in `dir`.
    pub fn spawn_in(dir: tempfile::TempDir) -> Self {
        Self::spawn_in_env(dir, &[], false)
    }

    fn wait_ready(&mut self, limit: Duration) -> SocketAddr {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("presenced exited early ({status}):\n{}", self.log_text());
                }
            }
            if let Ok(v) = self.try_control_json("stats") {
                if let Some(addr) = v["listen"].as_str().and_then(|s| s.parse().ok()) {
                    return addr;
                }
            }
            assert!(
                Instant::now() < deadline,
                "presenced not ready in {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send one control command; return everything the daemon wrote until it closed.
    pub fn try_control(&self, cmd: &str) -> std::io::Result<String> {
        let mut s = StdUnixStream::connect(&self.control)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(cmd.as_bytes())?;
        s.write_all(b"\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    pub fn try_control_json(&self, cmd: &str) -> Result<Value, String> {
        let text = self.try_control(cmd).map_err(|e| e.to_string())?;
        serde_json::from_str(text.trim()).map_err(|e| format!("{e}: {text:?}"))
    }

    pub fn control_json(&self, cmd: &str) -> Value {
        self.try_control_json(cmd).unwrap_or_else(|e| {
            let shown: String = cmd.chars().take(60).collect();
            panic!("control `{shown}`: {e}\n{}", self.log_text())
        })
    }

    pub fn stats(&self) -> Value {
        self.control_json("stats")
    }

    /// Poll `stats` until `pred` holds or `limit` passes; returns the last stats.
    pub fn wait_stats(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "stats never matched: {s:#}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open an `events` subscription.
    pub fn events(&self, from: Option<u64>) -> EventStream {
        let s = StdUnixStream::connect(&self.control).expect("connect control socket");
        let mut w = s.try_clone().expect("clone");
        let cmd = match from {
            Some(seq) => format!("events from {seq}\n"),
            None => "events\n".to_owned(),
        };
        w.write_all(cmd.as_bytes()).expect("write events command");
        // The subscription is registered once the daemon has read the line;
        // a stats round trip on the same (single) control shard orders it.
        std::thread::sleep(Duration::from_millis(50));
        EventStream {
            reader: BufReader::new(s),
        }
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        self.client_tls_alpn(Alpn::Presence)
    }

    pub fn client_tls_alpn(&self, alpn: Alpn) -> Arc<rustls::ClientConfig> {
        ClientTls::from_ca_file(&self.ca)
            .expect("CA")
            .alpn(alpn)
            .build()
            .expect("client config")
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(self.addr, "localhost", self.client_tls())
            .await
            .expect("connect")
    }

    /// Connect and HELLO as `id`.
    pub async fn agent(&self, id: &str) -> (Connection, Welcome) {
        let mut c = self.connect().await;
        let token = self.fleet_key.token(id.as_bytes());
        let w = c.hello(id.as_bytes(), &token).await.expect("hello");
        (c, w)
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL without any clean-up, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Send `sig` to `pid`.
pub fn signal(pid: u32, sig: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let pids = self
            .successors
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        for pid in pids {
            let _ = signal(pid, Signal::SIGKILL);
        }
    }
}

/// `presenced serve` on the setup in `dir`, output to `log`. With
/// `watchdog_pid_self`, `WATCHDOG_PID` is set to the daemon's own pid (as
/// systemd does) by starting it through `sh -c 'WATCHDOG_PID=$$ exec ...'`.
fn spawn_serve(
    dir: &Path,
    log: std::fs::File,
    env: &[(&str, &str)],
    watchdog_pid_self: bool,
) -> Child {
    let mut cmd = if watchdog_pid_self {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$0" "$@""#)
            .arg(bin("presenced"));
        c
    } else {
        Command::new(bin("presenced"))
    };
    cmd.args(["serve", "--config"])
        .arg(dir.join("presenced.toml"))
        .env(
            "RUST_LOG",
            std::env::var("PRESENCED_TEST_LOG").unwrap_or_else(|_| "info,presenced=debug".into()),
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    cmd.spawn().expect("spawn presenced serve")
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").to_string()
}

impl Daemon {
    /// After `kill9` (or a crash): start `presenced serve` again on the same
    /// directory, state and config.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "respawn needs the daemon stopped");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("log file");
        self.child = Some(spawn_serve(self.dir.path(), log, &[], false));
        self.addr = self.wait_ready(Duration::from_secs(20));
    }

    /// `upgrade [binary]` on the control socket; remembers the new pid so
    /// it is cleaned up with this daemon.
    pub fn upgrade(&self, binary: Option<&Path>) -> Value {
        let cmd = match binary {
            Some(b) => format!("upgrade {}", b.display()),
            None => "upgrade".to_owned(),
        };
        let v = self.control_json(&cmd);
        if let Some(pid) = v["new_pid"].as_u64() {
            if let Ok(mut s) = self.successors.lock() {
                s.push(pid as u32);
            }
        }
        v
    }

    /// Whether the process that was spawned first still runs.
    pub fn original_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// A live `events` subscription.
pub struct EventStream {
    reader: BufReader<StdUnixStream>,
}

impl EventStream {
    /// The next event line within `limit`, or None.
    pub fn next(&mut self, limit: Duration) -> Option<Value> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(limit))
            .expect("set timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(line.trim()).expect("event line is JSON")),
        }
    }

    /// Every event that arrives within `window`.
    pub fn collect(&mut self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            match self.next(left) {
                Some(v) => out.push(v),
                None => break,
            }
        }
        out
    }
}

// --- operations tests (tests/ops.rs) -----------------------------------------

/// `presenced dev-init` into a fresh temp dir and write `config` as its
/// `presenced.toml`. The daemon is not started (see [`Daemon::spawn_in`]).
pub fn dev_setup(config: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pd")
        .tempdir_in(std::env::temp_dir())
        .expect("tempdir");
    let out = Command::new(bin("presenced"))
        .arg("dev-init")
        .arg(dir.path())
        .output()
        .expect("spawn presenced dev-init");
    assert!(out.status.success(), "dev-init failed: {out:?}");
    std::fs::write(dir.path().join("presenced.toml"), config).expect("write config");
    dir
}

impl Daemon {
    /// Start on a fresh dev setup with this exact config text.
    pub fn start_with_config(config: &str) -> Self {
        Self::spawn_in(dev_setup(config))
    }

    /// Like [`Daemon::spawn_in`], with extra environment variables. With
    /// `watchdog_pid_self`, `WATCHDOG_PID` is set to the daemon's own pid
    /// (as systemd does): it is started through `sh -c 'WATCHDOG_PID=$$ exec ...'`.
    pub fn spawn_in_env(
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        watchdog_pid_self: bool,
    ) -> Self {
        let log = dir.path().join("presenced.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = spawn_serve(dir.path(), log_file, env, watchdog_pid_self);
        let control = dir.path().join("control.sock");
        let fleet_key = FleetKey::load(&dir.path().join("fleet.key")).expect("fleet key");
        let ca = dir.path().join("tls/cert.pem");
        let mut d = Daemon {
            child: Some(child),
            dir,
            addr: "127.0.0.1:0".parse().expect("addr"),
            control,
            fleet_key,
            ca,
            log,
            successors: std::sync::Mutex::new(Vec::new()),
        };
        d.addr = d.wait_ready(Duration::from_secs(20));
        d
    }

    /// Wait up to `limit` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `presencectl --socket <this daemon's socket> ARGS`, run to completion.
    pub fn presencectl(&self, args: &[&str]) -> std::process::Output {
        presencectl_at(&self.control, args)
    }
}

/// `presencectl --socket SOCKET ARGS`, run to completion.
pub fn presencectl_at(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("presencectl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn presencectl")
}

impl Daemon {
    /// A process that took over from this daemon by an upgrade started some
    /// other way than [`Daemon::upgrade`] (e.g. `presencectl upgrade`):
    /// kill it with this daemon.
    pub fn track_successor(&self, pid: u32) {
        if let Ok(mut s) = self.successors.lock() {
            s.push(pid);
        }
    }
}
