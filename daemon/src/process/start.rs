//! Starting the shards: load TLS material and keys, take the listeners
//! (bound by [`crate::process::listen`], or handed over by a live upgrade),
//! then run one pinned glommio executor per shard until the shutdown flag is
//! raised.
//!
//! Like mini-redis's `run(listener, shutdown)`, [`run`] takes listeners that
//! are already bound, so a live upgrade can hand them in.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use thiserror::Error;
use tracing::info;

use crate::config::Config;
use crate::process::listen::{bind_listeners, ListenError};
use crate::shard;
use crate::shared::Runtime;

/// Messages a shard may queue towards one peer before the sender waits.
const MESH_CHANNEL_SIZE: usize = 4096;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start shard {shard}: {source}")]
    Executor {
        shard: usize,
        source: std::io::Error,
    },
    #[error("shard {shard} panicked")]
    ShardPanicked { shard: usize },
    #[error(transparent)]
    Tls(#[from] crate::tls::config::TlsError),
    #[error(transparent)]
    Auth(#[from] crate::shared::CredentialsError),
    #[error(transparent)]
    Control(#[from] crate::control::socket::ControlError),
    #[error("session ticket keys: {0}")]
    Tickets(#[from] crate::tls::tickets::TicketError),
}

/// The CPUs this process may run on (its affinity mask, which honours
/// cpusets and `taskset`), in order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|c| set.is_set(*c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Everything `serve` needs, loaded and checked before any thread starts.
pub struct Prepared {
    pub runtime: Arc<Runtime>,
    pub listeners: Vec<OwnedFd>,
    pub control: std::os::unix::net::UnixListener,
    /// Per shard: what a live upgrade handed over (empty on a fresh start).
    pub adopted: Vec<shard::Adopted>,
}

/// Load TLS material and the fleet key, bind listeners and check the control socket path.
pub fn prepare(
    config: Config,
    config_path: &std::path::Path,
    shutdown: Arc<AtomicBool>,
    reload_requested: Arc<AtomicBool>,
) -> Result<Prepared, ServerError> {
    let material = Material::load(&config)?;
    let shards = config.shard_count();
    let (listeners, listen) = bind_listeners(config.server.listen, shards, config.server.backlog)?;
    let control = crate::control::socket::bind(
        &config.server.control_socket,
        config.server.control_group.as_deref(),
    )?;
    assemble(
        config,
        config_path,
        shutdown,
        reload_requested,
        material,
        listeners,
        listen,
        control,
        Vec::new(),
    )
}

/// TLS configuration, session ticket keys and fleet key, loaded and checked.
pub struct Material {
    pub tls: Arc<rustls::ServerConfig>,
    pub credentials: crate::shared::Credentials,
    pub ticketer: Arc<crate::tls::tickets::PersistentTicketer>,
    /// The leaf certificate's `notAfter`, Unix seconds.
    pub cert_not_after_s: i64,
}

impl Material {
    pub fn load(config: &Config) -> Result<Self, ServerError> {
        Self::load_with_tickets(config, None)
    }

    /// With ticket keys handed over by a live upgrade (else from the state dir).
    pub fn load_with_tickets(
        config: &Config,
        handed: Option<crate::tls::tickets::TicketKeys>,
    ) -> Result<Self, ServerError> {
        crate::shared::check_key_files(config)?;
        let ticketer = open_ticketer(&config.state.dir, handed)?;
        let (tls, cert_not_after_s) = crate::tls::config::server_config_with_expiry(
            &config.tls.cert,
            &config.tls.key,
            &ticketer,
        )?;
        Ok(Self {
            tls,
            credentials: crate::shared::Credentials::load(config, None)?,
            ticketer,
            cert_not_after_s,
        })
    }
}

/// Session ticket keys: handed over, else from `<state dir>/tickets.keys`
/// (created, or replaced when unusable), else in memory only (logged).
fn open_ticketer(
    dir: &std::path::Path,
    handed: Option<crate::tls::tickets::TicketKeys>,
) -> Result<Arc<crate::tls::tickets::PersistentTicketer>, ServerError> {
    use crate::tls::tickets::{PersistentTicketer, TicketKeys};
    if let Err(e) = crate::store::fs::ensure_private_dir(dir) {
        tracing::warn!("state directory {}: {e}", dir.display());
    }
    if let Some(keys) = handed {
        match PersistentTicketer::new(keys, Some(dir.to_owned())) {
            Ok(t) => {
                if let Err(e) = t.save() {
                    tracing::warn!("saving handed-over ticket keys: {e}");
                }
                return Ok(Arc::new(t));
            }
            Err(e) => tracing::warn!("handed-over ticket keys unusable: {e}"),
        }
    }
    match PersistentTicketer::open(dir) {
        Ok((t, note)) => {
            info!("session ticket keys: {note}");
            Ok(t)
        }
        Err(e) => {
            tracing::warn!("session ticket keys: {e}; keeping them in memory only");
            let keys = TicketKeys::generate(std::time::SystemTime::now())?;
            Ok(Arc::new(PersistentTicketer::new(keys, None)?))
        }
    }
}

/// Rotate ticket keys when due (saving fsyncs: not on a shard).
fn spawn_ticket_rotation(rt: Arc<Runtime>) {
    let spawned = std::thread::Builder::new()
        .name("ticket-rotation".into())
        .spawn(move || loop {
            for _ in 0..60 {
                if rt.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            let now = std::time::SystemTime::now();
            if rt.ticketer.next_due() <= now {
                match rt.ticketer.rotate_if_due(now) {
                    Ok(true) => info!("session ticket keys rotated"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("rotating session ticket keys: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start ticket key rotation: {e}");
    }
}

/// Put together what `run` needs from parts already loaded and bound (a
/// live upgrade hands over listeners and state).
#[allow(clippy::too_many_arguments)]
pub fn assemble(
    config: Config,
    config_path: &std::path::Path,
    shutdown: Arc<AtomicBool>,
    reload_requested: Arc<AtomicBool>,
    material: Material,
    listeners: Vec<OwnedFd>,
    listen: SocketAddr,
    control: std::os::unix::net::UnixListener,
    adopted: Vec<shard::Adopted>,
) -> Result<Prepared, ServerError> {
    let Material {
        tls,
        credentials,
        ticketer,
        cert_not_after_s,
    } = material;
    let mut runtime = Runtime::new(
        config,
        tls,
        credentials,
        ticketer,
        listen,
        shutdown,
        reload_requested,
    );
    runtime.set_cert_not_after(cert_not_after_s);
    let took_over = adopted
        .iter()
        .any(|a| !a.conns.is_empty() || !a.records.is_empty() || a.events.is_some());
    runtime.cluster = start_cluster(&runtime.config, took_over);
    runtime.config_path =
        std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_owned());
    Ok(Prepared {
        runtime: Arc::new(runtime),
        listeners,
        control,
        adopted,
    })
}

/// The boot epoch of this node: `max(previous + 1, boot wall ms)`, kept in
/// `<state dir>/cluster.epoch` (decimal), so it increases across restarts
/// even if the clock goes back. A process that took over a live hand-over
/// keeps the previous epoch (same node, same sessions). Returns
/// `(epoch, previous epoch)`.
fn boot_epoch(state_dir: &std::path::Path, boot_ms: u64, took_over: bool) -> (u64, u64) {
    let path = state_dir.join("cluster.epoch");
    let prev = crate::store::fs::read_optional(&path)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| t.trim().parse::<u64>().ok());
    match prev {
        Some(p) if took_over => return (p, p),
        _ => {}
    }
    let prev = prev.unwrap_or(0);
    let epoch = prev.saturating_add(1).max(boot_ms);
    if let Err(e) = crate::store::fs::write_private(&path, format!("{epoch}\n").as_bytes()) {
        tracing::warn!(
            "cluster: cannot keep the boot epoch in {}: {e}",
            path.display()
        );
    }
    (epoch, prev)
}

/// `[cluster]`: start the NATS JetStream bridge. It connects in the
/// background: NATS being unreachable never stops the daemon.
fn start_cluster(config: &Config, took_over: bool) -> Option<crate::shared::ClusterLink> {
    let cfg = config.cluster.clone()?;
    let boot_ms = crate::shared::wall_ms();
    let (epoch, prev_epoch) = boot_epoch(&config.state.dir, boot_ms, took_over);
    let node_id = cfg.node_id.clone();
    let shared = Arc::new(crate::shared::ClusterShared::new(config.shard_count()));
    let hooks = Arc::new(crate::shared::DaemonHooks(shared.clone()));
    let node = presence_cluster::NodeInfo {
        node_id: node_id.clone(),
        epoch,
        boot_ms,
    };
    match presence_cluster::Cluster::start_with_hooks(cfg, node, hooks) {
        Ok(handle) => {
            info!(node = %node_id, epoch, "cluster mode: NATS JetStream bridge started");
            Some(crate::shared::ClusterLink {
                handle,
                node_id,
                epoch,
                prev_epoch,
                shared,
            })
        }
        Err(e) => {
            tracing::error!("cluster mode off: cannot start the NATS bridge: {e}");
            None
        }
    }
}

/// kTLS: detected once; the userspace record layer serves either way
/// (the kernel hand-off is not implemented; see `tls::ktls`).
fn set_record_layer(runtime: &Runtime) {
    let support = crate::tls::ktls::detect();
    let layer = match (&support, crate::tls::ktls::record_path(&support)) {
        (_, crate::tls::ktls::RecordPath::Kernel) => "kernel".to_owned(),
        (crate::tls::ktls::KtlsSupport::Available, _) => {
            "userspace (kTLS available; kernel hand-off not implemented)".to_owned()
        }
        (crate::tls::ktls::KtlsSupport::Unsupported(e), _) => {
            format!("userspace (kTLS unavailable: {e})")
        }
    };
    info!(record_layer = %layer, "TLS record layer");
    *runtime
        .record_layer
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = layer;
}

/// `[metrics] listen`: the HTTP endpoint. A bind failure stops the start,
/// except after a committed hand-over: this process is then the only one
/// left serving agents, and nothing optional may stop it.
fn start_metrics_endpoint(runtime: &Runtime, took_over: bool) -> Result<(), ServerError> {
    let Some(addr) = runtime.config.metrics.listen else {
        return Ok(());
    };
    match crate::control::http::spawn(addr, runtime.config.server.control_socket.clone()) {
        Ok(()) => Ok(()),
        Err(e) if took_over => {
            tracing::warn!("metrics endpoint not started: {e}");
            Ok(())
        }
        Err(source) => Err(ListenError { addr, source }.into()),
    }
}

/// How long the bridge may write its kept intents at exit.
const CLUSTER_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Run one executor per listener until `runtime.shutdown` is raised and every shard has stopped.
pub fn run(prepared: Prepared) -> Result<(), ServerError> {
    let Prepared {
        runtime,
        listeners,
        control,
        adopted,
    } = prepared;
    let control_ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&runtime.config.server.control_socket)
            .ok()
            .map(|m| m.ino())
    };
    let mut control = Some(control);
    let took_over = adopted
        .iter()
        .any(|a| !a.conns.is_empty() || !a.records.is_empty() || a.events.is_some());
    let mut adopted: Vec<Option<shard::Adopted>> = adopted.into_iter().map(Some).collect();
    spawn_ticket_rotation(runtime.clone());
    set_record_layer(&runtime);
    runtime.set_listener_fds(
        listeners
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect(),
    );
    let shards = listeners.len();
    let cpus = allowed_cpus();
    *runtime
        .startup_cpus
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = cpus.clone();
    info!(listen = %runtime.listen, shards, "presenced listening");
    start_metrics_endpoint(&runtime, took_over)?;
    let mesh = MeshBuilder::full(shards, MESH_CHANNEL_SIZE);
    let mut handles = Vec::with_capacity(shards);
    for (id, fd) in listeners.into_iter().enumerate() {
        let placement = if runtime.config.server.pin_cpus && !cpus.is_empty() {
            Placement::Fixed(cpus[id % cpus.len()])
        } else {
            Placement::Unbound
        };
        let rt = runtime.clone();
        let mesh = mesh.clone();
        let adoption = adopted
            .get_mut(id)
            .and_then(Option::take)
            .unwrap_or_default();
        // The event shard also serves the control socket and supervision.
        let hook: Option<Box<dyn shard::ShardHook>> = if id == shard::EVENT_SHARD {
            control
                .take()
                .map(|c| Box::new(crate::process::supervise::EventShardHook::new(c)) as Box<_>)
        } else {
            None
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(runtime.config.server.io_memory_kib * 1024)
            .spawn(move || shard::run(id, rt, mesh, fd, hook, adoption))
            .map_err(|e| ServerError::Executor {
                shard: id,
                source: e.into(),
            })?;
        handles.push(handle);
    }
    let mut result = Ok(());
    for (id, h) in handles.into_iter().enumerate() {
        if h.join().is_err() && result.is_ok() {
            result = Err(ServerError::ShardPanicked { shard: id });
        }
    }
    if let Some(c) = &runtime.cluster {
        let r = c.handle.shutdown(CLUSTER_FLUSH_TIMEOUT);
        info!("cluster: bridge stopped: {r:?}");
    }
    // After a hand-over the path is the new process's: never remove it (its
    // file may even have our old inode number, reused by the filesystem).
    if !runtime
        .handed_over
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        crate::control::socket::remove_if_ours(&runtime.config.server.control_socket, control_ino);
    }
    result
}
