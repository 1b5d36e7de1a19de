//! Reference agent: keeps one presence session with presenced alive, logging
//! every state change to stderr. Sends BYE on SIGINT/SIGTERM and exits 0.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Parser};
use presence_client::protocol::{ErrorCode, TOKEN_LEN};
use presence_client::{
    shutdown_channel, Agent, AgentConfig, AgentEvent, AgentExit, Backoff, ClientTls,
    DisconnectReason, FleetKey, ShutdownHandle,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Keep an RMM agent's presence session with presenced alive.
#[derive(Debug, Parser)]
#[command(name = "presence-agent", version)]
#[command(group(ArgGroup::new("credential").required(true).args(["fleet_key", "token"])))]
struct Args {
    /// Daemon address, HOST:PORT (e.g. 127.0.0.1:7443).
    #[arg(long)]
    addr: String,
    /// PEM file with the CA (or the server's own self-signed cert.pem).
    #[arg(long, value_name = "PATH")]
    ca: PathBuf,
    /// Fleet key file (64 hex characters); the token is derived from it.
    #[arg(long, value_name = "PATH")]
    fleet_key: Option<PathBuf>,
    /// HELLO token as 64 hex characters, instead of --fleet-key.
    #[arg(long, value_name = "HEX")]
    token: Option<String>,
    /// Agent id: 1 to 128 of A-Z a-z 0-9 . _ : @ -
    #[arg(long)]
    id: String,
    /// Name the server certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Bind this local source address before connecting.
    #[arg(long, value_name = "IP")]
    source_ip: Option<IpAddr>,
    /// Initial reconnect backoff ceiling, in milliseconds.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    backoff_initial_ms: u64,
    /// Largest reconnect backoff ceiling, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    backoff_max_ms: u64,
}

fn parse_token(hex_text: &str) -> Result<[u8; TOKEN_LEN]> {
    let mut token = [0u8; TOKEN_LEN];
    hex::decode_to_slice(hex_text.trim(), &mut token)
        .with_context(|| format!("--token: expected {} hex characters", TOKEN_LEN * 2))?;
    Ok(token)
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--addr {addr:?}: cannot resolve (expected HOST:PORT)"))?;
    match addrs.next() {
        Some(a) => Ok(a),
        None => bail!("--addr {addr:?}: resolves to no address"),
    }
}

fn log_event(ev: &AgentEvent) {
    match ev {
        AgentEvent::Connecting { attempt } => tracing::info!("connecting attempt={attempt}"),
        AgentEvent::Online {
            session_id,
            heartbeat_interval,
            local_addr,
        } => tracing::info!(
            "online session={session_id} heartbeat_interval_ms={} local={local_addr}",
            heartbeat_interval.as_millis()
        ),
        AgentEvent::HeartbeatAcked { seq, rtt } => tracing::info!(
            "heartbeat ack seq={seq} rtt_ms={:.3}",
            rtt.as_secs_f64() * 1000.0
        ),
        AgentEvent::Disconnected {
            reason: reason @ DisconnectReason::ServerError { .. },
        } => tracing::warn!("{reason}"),
        AgentEvent::Disconnected { reason } => tracing::info!("disconnected: {reason}"),
        AgentEvent::Backoff {
            delay,
            server_requested,
        } => tracing::info!(
            "reconnect in {}ms ({})",
            delay.as_millis(),
            if *server_requested {
                "server requested"
            } else {
                "backoff"
            }
        ),
    }
}

async fn next_signal(int: &mut Signal, term: &mut Signal) -> &'static str {
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// First SIGINT/SIGTERM: graceful shutdown (BYE). Second: exit at once.
fn spawn_signal_handler(handle: ShutdownHandle) -> Result<()> {
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    tokio::spawn(async move {
        let sig = next_signal(&mut int, &mut term).await;
        tracing::info!("{sig} received; sending bye");
        handle.trigger();
        let sig = next_signal(&mut int, &mut term).await;
        tracing::warn!("second signal {sig}; exiting without waiting");
        std::process::exit(130);
    });
    Ok(())
}

async fn run(args: Args) -> Result<AgentExit> {
    let addr = resolve(&args.addr).await?;
    let tls = ClientTls::from_ca_file(&args.ca)?.build()?;
    let token = match (&args.fleet_key, &args.token) {
        (Some(path), _) => FleetKey::load(path)?.token(args.id.as_bytes()),
        (None, Some(hex_text)) => parse_token(hex_text)?,
        (None, None) => bail!("one of --fleet-key or --token is required"),
    };
    let mut cfg = AgentConfig::with_token(addr, tls, args.id.clone(), token)?;
    cfg.server_name = args.server_name;
    cfg.source_ip = args.source_ip;
    cfg.backoff = Backoff {
        initial: Duration::from_millis(args.backoff_initial_ms),
        max: Duration::from_millis(args.backoff_max_ms),
    };

    let (handle, signal) = shutdown_channel();
    spawn_signal_handler(handle)?;
    tracing::info!("agent id={} server={addr} name={}", cfg.id, cfg.server_name);
    let agent = Agent::new(cfg).on_event(log_event);
    Ok(agent.run(signal).await?)
}

/// The error chain on one line, skipping causes already spelled out by the
/// message above them (our error types include their source's text).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args).await {
        Ok(AgentExit::Shutdown) => {
            tracing::info!("shutdown complete");
            ExitCode::SUCCESS
        }
        Ok(AgentExit::Superseded { message }) => {
            tracing::info!("superseded by a newer session of this agent ({message}); exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let Some(presence_client::AgentError::Rejected { code, .. }) = e.downcast_ref() {
                if *code == ErrorCode::AuthenticationFailed as u16 {
                    eprintln!("presence-agent: fatal: authentication failed: check --fleet-key/--token and --id");
                }
            }
            eprintln!("presence-agent: fatal: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}
