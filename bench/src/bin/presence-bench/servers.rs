//! The servers under test: presenced (started by the bench from a
//! `presenced dev-init` setup, or attached to with --addr/--control), and
//! the peers nats-server and mosquitto, started with a generated config on
//! loopback using the same ECDSA P-256 certificate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::wire::TargetKind;

/// How long a started server may take to accept connections.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Resident set size of a process, from /proc/PID/status (VmRSS).
pub fn proc_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("{path}: bad VmRSS line {line:?}"))?;
            return Ok(kb * 1024);
        }
    }
    bail!("{path}: no VmRSS line")
}

/// CPU time (user + system) of a process in seconds, from /proc/PID/stat.
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) / (hz.max(1) as f64))
}

/// Memory of a server process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Mem {
    pub rss_bytes: u64,
    /// Allocator-reported live heap (presenced's jemalloc), when known.
    pub heap_bytes: Option<u64>,
}

/// Talk to a presenced control socket.
pub fn control(socket: &Path, cmd: &str) -> Result<String> {
    control_within(socket, cmd, Duration::from_secs(15))
}

/// Like [`control`], with a limit on the reply.
pub fn control_within(socket: &Path, cmd: &str, limit: Duration) -> Result<String> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to control socket {}", socket.display()))?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(cmd.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("reading reply to `{cmd}`"))?;
    Ok(out)
}

pub fn control_json(socket: &Path, cmd: &str) -> Result<Value> {
    let text = control(socket, cmd)?;
    let v: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("control `{cmd}` replied with non-JSON {text:?}"))?;
    if let Some(e) = v.get("error") {
        bail!("control `{cmd}`: {e}");
    }
    Ok(v)
}

/// A live `events from SEQ` subscription, read by a thread.
pub struct EventSub {
    stream: UnixStream,
    events: Arc<Mutex<Vec<Value>>>,
    thread: Option<JoinHandle<()>>,
}

impl EventSub {
    pub fn start(socket: &Path, from: u64) -> Result<Self> {
        let mut s = UnixStream::connect(socket)
            .with_context(|| format!("connecting to control socket {}", socket.display()))?;
        s.write_all(format!("events from {from}\n").as_bytes())?;
        let reader = s.try_clone()?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let thread = std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                    if let Ok(mut g) = sink.lock() {
                        g.push(v);
                    }
                }
            }
        });
        Ok(Self {
            stream: s,
            events,
            thread: Some(thread),
        })
    }

    /// Lines received so far.
    pub fn len(&self) -> usize {
        self.events.lock().map(|g| g.len()).unwrap_or(0)
    }

    /// Whether an event with seq >= `seq` or an error line has arrived.
    fn reached(&self, seq: u64) -> bool {
        self.events.lock().is_ok_and(|g| {
            g.iter().any(|v| {
                v.get("error").is_some() || v.get("seq").and_then(Value::as_u64) >= Some(seq)
            })
        })
    }

    /// Read `events from FROM` until the event with seq `last` (inclusive)
    /// has arrived, an error line came, or `limit` passed; then stop.
    pub fn read_upto(
        socket: &Path,
        from: u64,
        last: Option<u64>,
        limit: Duration,
    ) -> Result<Vec<Value>> {
        let sub = Self::start(socket, from)?;
        let deadline = Instant::now() + limit;
        loop {
            let done = match last {
                Some(l) => sub.reached(l),
                // Nothing to wait for: a moment for an error line.
                None => sub.len() > 0,
            };
            if done || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sub.finish())
    }

    /// End the subscription and return every line received.
    pub fn finish(mut self) -> Vec<Value> {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.events.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// How the bench reaches presenced.
pub struct Presenced {
    child: Option<Child>,
    /// Temp dir of a bench-started daemon (kept for its lifetime).
    _dir: Option<tempfile::TempDir>,
    spawn: Option<(PathBuf, PathBuf, PathBuf)>,
    pub addr: SocketAddr,
    pub control: PathBuf,
    pub ca: PathBuf,
    /// TLS key next to the CA (bench-started only), reused by peers.
    pub key: Option<PathBuf>,
    pub fleet_key_text: String,
    /// A bench-owned daemon that took over by `upgrade` (not our child).
    adopted: Option<u32>,
}

/// Settings of a bench-started presenced.
pub struct SpawnOpts<'a> {
    pub bin: &'a Path,
    pub shards: usize,
    pub heartbeat_interval: Duration,
    pub offline_grace: Duration,
    /// No [state] section (a presenced from before persistence rejects it).
    pub legacy: bool,
}

impl Presenced {
    /// `presenced dev-init` into a temp dir, write a config for a free
    /// loopback port, start `presenced serve` and wait for `stats`.
    pub fn spawn(o: &SpawnOpts) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pbench")
            .tempdir()
            .context("creating temp dir")?;
        let out = Command::new(o.bin)
            .arg("dev-init")
            .arg(dir.path())
            .output()
            .with_context(|| format!("running {} dev-init", o.bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} dev-init failed: {}",
                o.bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = free_port()?;
        let config = format!(
            r#"# written by presence-bench
[server]
listen = "127.0.0.1:{port}"
shards = {shards}
control_socket = "control.sock"
backlog = 8192

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
handshake_timeout = "10s"

[auth]
fleet_key = "fleet.key"

[presence]
heartbeat_interval = "{hb}ms"
miss_limit = 3
offline_grace = "{grace}ms"
hello_timeout = "10s"
event_ring_capacity = 200000
{state}"#,
            shards = o.shards,
            hb = o.heartbeat_interval.as_millis(),
            grace = o.offline_grace.as_millis(),
            // Each bench daemon keeps its state in its own temp dir, so a
            // run never restores another run's presence.
            state = if o.legacy {
                ""
            } else {
                "\n[state]\ndir = \"state\"\n"
            },
        );
        let config_path = dir.path().join("presenced.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.path().join("presenced.log");
        let fleet_key_text = std::fs::read_to_string(dir.path().join("fleet.key"))
            .context("reading the dev-init fleet key")?;
        let mut p = Presenced {
            child: None,
            spawn: Some((o.bin.to_owned(), config_path, log)),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            control: dir.path().join("control.sock"),
            ca: dir.path().join("tls/cert.pem"),
            key: Some(dir.path().join("tls/key.pem")),
            fleet_key_text,
            _dir: Some(dir),
            adopted: None,
        };
        p.respawn()?;
        Ok(p)
    }

    /// Start (again) the bench-owned daemon and wait until it answers.
    pub fn respawn(&mut self) -> Result<()> {
        let (bin, config, log) = self
            .spawn
            .clone()
            .ok_or_else(|| anyhow!("presenced was not started by the bench"))?;
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        self.child = Some(child);
        self.wait_ready(START_LIMIT)?;
        Ok(())
    }

    /// Attach to a running daemon.
    pub fn attach(
        addr: SocketAddr,
        control: PathBuf,
        ca: PathBuf,
        fleet_key: &Path,
    ) -> Result<Self> {
        let fleet_key_text = std::fs::read_to_string(fleet_key)
            .with_context(|| format!("reading fleet key {}", fleet_key.display()))?;
        presence_client::FleetKey::parse(&fleet_key_text)
            .map_err(|e| anyhow!("fleet key {}: {e}", fleet_key.display()))?;
        std::fs::metadata(&ca).with_context(|| format!("CA file {}", ca.display()))?;
        let p = Presenced {
            child: None,
            _dir: None,
            spawn: None,
            addr,
            control,
            ca,
            key: None,
            fleet_key_text,
            adopted: None,
        };
        p.stats()
            .context("attached daemon does not answer `stats`")?;
        Ok(p)
    }

    fn log_tail(&self) -> String {
        let Some((_, _, log)) = &self.spawn else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Backtrace frames are indented: keep the messages.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("  ") && !l.trim().is_empty())
            .collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Poll `stats` until it answers (after start or restart).
    pub fn wait_ready(&mut self, limit: Duration) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.child = None;
                    let tail = self.log_tail();
                    let full = self
                        .spawn
                        .as_ref()
                        .and_then(|(_, _, log)| std::fs::read_to_string(log).ok())
                        .unwrap_or_default();
                    let hint = if full.contains("unknown field") {
                        "\n(an older presenced that does not know a config section? try --legacy-config)"
                    } else {
                        ""
                    };
                    bail!("presenced exited at start ({st}):\n{tail}{hint}");
                }
            }
            if let Ok(v) = self.stats() {
                if v.get("listen").and_then(Value::as_str).is_some() {
                    return Ok(v);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "presenced did not answer in {limit:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stats(&self) -> Result<Value> {
        control_json(&self.control, "stats")
    }

    pub fn pid(&self) -> Result<u32> {
        self.stats()?
            .get("pid")
            .and_then(Value::as_u64)
            .map(|p| p as u32)
            .ok_or_else(|| anyhow!("stats has no pid"))
    }

    pub fn mem(&self) -> Result<Mem> {
        let s = self.stats()?;
        let rss_bytes = s
            .get("rss_bytes")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("stats has no rss_bytes"))?;
        Ok(Mem {
            rss_bytes,
            heap_bytes: s.get("heap_bytes").and_then(Value::as_u64),
        })
    }

    /// SIGKILL the daemon (pid read from `stats`); returns the pid.
    pub fn kill9(&mut self) -> Result<u32> {
        let pid = self.pid()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .with_context(|| format!("SIGKILL {pid}"))?;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        } else {
            // Not our child: wait for the pid to disappear.
            if self.adopted == Some(pid) {
                self.adopted = None;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !pid_gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(pid)
    }

    /// Run the restart command (or respawn the bench-owned daemon).
    pub fn restart(&mut self, cmd: Option<&str>) -> Result<()> {
        match cmd {
            Some(cmd) => {
                // The command may stay in the foreground (it is the daemon)
                // or return (a service manager); either way poll `stats`.
                let child = Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(Stdio::null())
                    .spawn()
                    .with_context(|| format!("running restart command {cmd:?}"))?;
                self.child = Some(child);
                self.wait_ready(START_LIMIT)?;
                Ok(())
            }
            None => self.respawn(),
        }
    }

    /// Send `upgrade [binary]` and wait for the daemon's report (JSON).
    /// On success a bench-owned daemon is now the new pid: it is adopted
    /// (stopped by [`stop`](Self::stop)), and the old child is reaped.
    pub fn upgrade(&mut self, binary: Option<&Path>, limit: Duration) -> Result<Value> {
        let cmd = match binary {
            Some(b) => format!("upgrade {}", b.display()),
            None => "upgrade".to_owned(),
        };
        let text = control_within(&self.control, &cmd, limit)?;
        let v: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("`{cmd}` replied with non-JSON {text:?}"))?;
        let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
        let new_pid = v.get("new_pid").and_then(Value::as_u64);
        if ok && self.spawn.is_some() {
            if let Some(pid) = new_pid.and_then(|p| u32::try_from(p).ok()) {
                self.adopted = Some(pid);
            }
            // The old process exits by itself: reap it (bounded).
            if let Some(mut c) = self.child.take() {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match c.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() > deadline => {
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
        }
        Ok(v)
    }

    /// Stop a bench-started daemon (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            stop_pid(pid);
        }
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(text) => text
            .rfind(')')
            .and_then(|i| text.get(i + 2..i + 3))
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// SIGTERM a process that is not our child, wait, then SIGKILL.
fn stop_pid(pid: u32) {
    let p = nix::unistd::Pid::from_raw(pid as i32);
    if nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid_gone(pid) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Reaped here when the bench is its subreaper (see `become_subreaper`).
    let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Make orphaned descendants (a daemon started by `upgrade`, whose
/// parent exits) children of this process, so they can be reaped.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

impl Drop for Presenced {
    fn drop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A started nats-server or mosquitto.
pub struct Peer {
    pub kind: TargetKind,
    child: Option<Child>,
    pub addr: SocketAddr,
    pub version: String,
    _dir: tempfile::TempDir,
}

/// Path of an executable: the name as found in PATH or in the usual sbin dirs.
fn find_exe(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn package_of(kind: TargetKind) -> (&'static str, &'static str) {
    match kind {
        TargetKind::Nats => ("nats-server", "nats-server"),
        TargetKind::Mqtt => ("mosquitto", "mosquitto"),
        TargetKind::Presenced => ("presenced", "presenced"),
    }
}

impl Peer {
    /// Start `kind` on a free loopback port with TLS from `cert`/`key`.
    pub fn start(kind: TargetKind, cert: &Path, key: &Path) -> Result<Self> {
        let (exe_name, package) = package_of(kind);
        let exe = find_exe(exe_name)
            .ok_or_else(|| anyhow!("{exe_name} is not installed: apt-get install -y {package}"))?;
        let dir = tempfile::Builder::new()
            .prefix("pbench-peer")
            .tempdir()
            .context("creating temp dir")?;
        let port = free_port()?;
        let log = dir.path().join(format!("{exe_name}.log"));
        let (config_path, args, version): (PathBuf, Vec<String>, String) = match kind {
            TargetKind::Nats => {
                let conf = format!(
                    r#"# written by presence-bench
listen: "127.0.0.1:{port}"
max_connections: 1000000
ping_interval: "5m"
write_deadline: "10s"
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  timeout: 10
}}
"#,
                    cert = cert.display(),
                    key = key.display()
                );
                let p = dir.path().join("nats.conf");
                std::fs::write(&p, conf)?;
                let v = Command::new(&exe)
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    .unwrap_or_default();
                (p.clone(), vec!["-c".into(), p.display().to_string()], v)
            }
            TargetKind::Mqtt => {
                let conf = format!(
                    r#"# written by presence-bench
per_listener_settings false
allow_anonymous true
persistence false
user root
log_dest file {log}
log_type error
log_type warning
connection_messages false
max_keepalive 65535
listener {port} 127.0.0.1
certfile {cert}
keyfile {key}
tls_version tlsv1.3
"#,
                    log = log.display(),
                    cert = cert.display(),
                    key = key.display()
                );
                let p = dir.path().join("mosquitto.conf");
                std::fs::write(&p, conf)?;
                let v = Command::new(&exe)
                    .arg("-h")
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .trim()
                            .to_owned()
                    })
                    .unwrap_or_default();
                (p.clone(), vec!["-c".into(), p.display().to_string()], v)
            }
            TargetKind::Presenced => bail!("presenced is not a peer"),
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} -c {}", exe.display(), config_path.display()))?;
        let mut peer = Peer {
            kind,
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            version,
            _dir: dir,
        };
        peer.wait_ready(&log)?;
        Ok(peer)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    bail!(
                        "{} exited at start ({st}):\n{}",
                        self.kind.name(),
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {} in {START_LIMIT:?}",
                    self.kind.name(),
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn mem(&self) -> Result<Mem> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.kind.name()))?;
        Ok(Mem {
            rss_bytes: proc_rss(pid)?,
            heap_bytes: None,
        })
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Write a fresh self-signed ECDSA P-256 certificate for localhost /
/// 127.0.0.1 into `dir` (for peers when presenced was not started by us).
pub fn generate_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "presence-bench peer");
    let cert = params.self_signed(&key_pair)?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key_pair.serialize_pem())?;
    Ok((cert_path, key_path))
}
