//! The `presenced` command line.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use presence_proto::FleetKey;
use presenced::config::Config;
use presenced::ops::cli::daemon::{Cli, Command, TuningCommand};
use presenced::ops::devinit;
use presenced::process::start as server;

const DEV_DIR: &str = "presenced-dev";

/// jemalloc: low fragmentation for millions of small per-connection
/// allocations, and live-heap statistics for `stats` (`heap_bytes`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options, read once at its start (C `const char *malloc_conf`,
/// prefixed `_rjem_` by tikv-jemalloc-sys): a background thread returns
/// freed pages to the kernel within about a second, so the memory a burst
/// of TLS handshakes used does not stay resident once it is over.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            dev,
            upgrade_fd,
        } => {
            init_logging();
            let path = match (config, dev) {
                (Some(p), false) => p,
                (None, true) => {
                    let dir = Path::new(DEV_DIR);
                    if !devinit::is_initialised(dir) {
                        devinit::dev_init(dir, false)?;
                        tracing::info!(dir = %dir.display(), "wrote a development setup");
                    }
                    dir.join(devinit::CONFIG_FILE)
                }
                _ => bail!("serve needs --config FILE or --dev"),
            };
            serve(&path, upgrade_fd)
        }
        Command::DevInit { dir, force } => {
            devinit::dev_init(&dir, force)?;
            println!("wrote a development setup to {}", dir.display());
            println!(
                "run it with: presenced serve --config {}",
                dir.join(devinit::CONFIG_FILE).display()
            );
            Ok(())
        }
        Command::Tuning {
            command:
                TuningCommand::Check {
                    profile,
                    proc_root,
                    pid,
                    cores,
                    max_connections,
                    kernel_bytes_per_conn,
                    user_bytes_per_conn,
                },
        } => {
            use presenced::ops::tuning;
            let profile: tuning::Profile = match profile.parse() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("presenced tuning check: {e}");
                    std::process::exit(2);
                }
            };
            let mut input = tuning::CheckInput::new(profile);
            input.proc_root = proc_root;
            input.pid = pid;
            input.cores = cores;
            input.max_connections = max_connections;
            input.per_conn_kernel_bytes = kernel_bytes_per_conn;
            input.per_conn_user_bytes = user_bytes_per_conn;
            match tuning::check(&input) {
                Ok(report) => {
                    print!("{report}");
                    std::process::exit(if report.problems() == 0 { 0 } else { 1 });
                }
                Err(e) => {
                    eprintln!("presenced tuning check: {e}");
                    std::process::exit(2);
                }
            }
        }
        Command::Token { fleet_key, id } => {
            presence_proto::validate_id(id.as_bytes())
                .with_context(|| format!("agent id `{id}`"))?;
            let key = FleetKey::load(&fleet_key)?;
            println!("{}", hex::encode(key.token(id.as_bytes())));
            Ok(())
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_thread_names(true)
        .init();
}

fn serve(path: &Path, upgrade_fd: Option<i32>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // Every agent is a socket: use all the descriptors the hard limit allows
    // (a shell's soft limit is often 1024).
    raise_nofile_limit();
    // Files the daemon creates (control socket, state) are private by default.
    // SAFETY: umask has no preconditions; no other thread runs yet.
    unsafe { libc::umask(0o077) };
    let shutdown = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for (sig, flag) in [
        (signal_hook::consts::SIGTERM, &shutdown),
        (signal_hook::consts::SIGINT, &shutdown),
        (signal_hook::consts::SIGHUP, &reload),
    ] {
        signal_hook::flag::register(sig, flag.clone())
            .with_context(|| format!("installing the handler for signal {sig}"))?;
    }
    if let Some(w) = presenced::ops::tuning::host_capacity_warning(
        Path::new(presenced::ops::tuning::DEFAULT_PROC_ROOT),
        config.server.max_connections,
        presenced::ops::tuning::DEFAULT_PER_CONN_USER_BYTES,
        presenced::ops::tuning::DEFAULT_PER_CONN_KERNEL_BYTES,
    ) {
        tracing::warn!("{w}");
    }
    let prepared = match presenced::upgrade::spawn::target_socket(upgrade_fd)? {
        None => server::prepare(config, path, shutdown.clone(), reload)?,
        Some(sock) => take_over(sock, config, path, shutdown.clone(), reload)?,
    };
    server::run(prepared)?;
    if shutdown.load(Ordering::Relaxed) {
        tracing::info!("stopped");
    }
    Ok(())
}

/// Live upgrade, new process: receive everything from the old process
/// before any shard starts, then serve it.
fn take_over(
    sock: std::os::unix::net::UnixStream,
    config: Config,
    path: &Path,
    shutdown: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
) -> anyhow::Result<server::Prepared> {
    use presenced::process::adopt::DaemonTarget;
    use presenced::upgrade::STEP_TIMEOUT;
    let mut target = DaemonTarget::new(config.clone());
    let outcome = presenced::upgrade::machine::run_target(sock, &mut target, STEP_TIMEOUT)
        .context("taking over from the running daemon")?;
    tracing::info!(
        from_pid = outcome.manifest.from_pid,
        connections = outcome.connections,
        records = outcome.records,
        events = outcome.events,
        "took over from the previous process"
    );
    let listen = target
        .listeners
        .first()
        .and_then(presenced::process::listen::bound_addr)
        .context("handed-over listener has no address")?;
    let listeners = std::mem::take(&mut target.listeners);
    let adopted = std::mem::take(&mut target.adopted);
    let material = target
        .material
        .take()
        .context("handover ended without TLS material")?;
    let control = target
        .control
        .take()
        .context("handover ended without the control socket")?;
    Ok(server::assemble(
        config, path, shutdown, reload, material, listeners, listen, control, adopted,
    )?)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("open files limit stays at {soft}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("reading the open files limit: {e}"),
    }
}
