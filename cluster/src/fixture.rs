//! Real `nats-server` processes on loopback, for tests and benchmarks
//! (`-js -a 127.0.0.1 -p <free port> -sd <dir>`). Each fixture kills its
//! process and removes its directory on drop.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FixtureError {
    #[error("nats-server not found in PATH (nor /usr/sbin, /usr/bin); install it: apt-get install -y nats-server")]
    NotInstalled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("nats-server on port {port} did not accept within {secs}s (log: {log})")]
    NotReady { port: u16, secs: u64, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FixtureError {
    let what = what.into();
    move |source| FixtureError::Io { what, source }
}

/// The `nats-server` binary: `PATH`, then `/usr/sbin` and `/usr/bin`.
pub fn nats_server_binary() -> Result<PathBuf, FixtureError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/bin".into());
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or(FixtureError::NotInstalled)
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16, FixtureError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind 127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(io("local_addr"))?.port())
}

fn temp_dir(tag: &str) -> Result<PathBuf, FixtureError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "presence-cluster-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(io(format!("mkdir {}", dir.display())))?;
    Ok(dir)
}

/// One `nats-server -js` process.
pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// A standalone JetStream server on a free loopback port.
    pub fn start() -> Result<Self, FixtureError> {
        let port = free_port()?;
        let dir = temp_dir("nats")?;
        let mut s = Self::with_args(port, dir, Vec::new());
        s.spawn()?;
        Ok(s)
    }

    fn with_args(port: u16, dir: PathBuf, extra: Vec<String>) -> Self {
        let mut args = vec![
            "-js".to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-sd".into(),
            dir.join("js").display().to_string(),
            "-l".into(),
            dir.join("server.log").display().to_string(),
        ];
        args.extend(extra);
        Self {
            port,
            dir,
            args,
            child: None,
        }
    }

    fn spawn(&mut self) -> Result<(), FixtureError> {
        let bin = nats_server_binary()?;
        let child = Command::new(&bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("spawn {}", bin.display())))?;
        self.child = Some(child);
        self.wait_accepting(Duration::from_secs(10))
    }

    fn wait_accepting(&self, limit: Duration) -> Result<(), FixtureError> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(FixtureError::NotReady {
            port: self.port,
            secs: limit.as_secs(),
            log: self.log_path().display().to_string(),
        })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process (SIGKILL) and waits for it. Data stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), FixtureError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JetStream cluster of `n` servers with routes on loopback.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(n: usize) -> Result<Self, FixtureError> {
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_, FixtureError>>()?;
        let routes = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::with_capacity(n);
        for (i, (port, cport)) in ports.iter().enumerate() {
            let dir = temp_dir(&format!("natsc{i}"))?;
            let extra = vec![
                "--name".to_string(),
                format!("n{i}"),
                "--cluster_name".into(),
                "presence".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{cport}"),
                "--routes".into(),
                routes.clone(),
            ];
            let mut s = NatsServer::with_args(*port, dir, extra);
            // Do not wait for each one: a JetStream cluster member waits for
            // its peers before it serves; spawn all, then wait.
            let bin = nats_server_binary()?;
            let child = Command::new(&bin)
                .args(&s.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(io(format!("spawn {}", bin.display())))?;
            s.child = Some(child);
            servers.push(s);
        }
        for s in &servers {
            s.wait_accepting(Duration::from_secs(15))?;
        }
        Ok(Self { servers })
    }

    /// Every server's URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url()).collect()
    }
}
