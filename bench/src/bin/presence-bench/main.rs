//! `presence-bench`: load generator for presenced, and for the usual
//! alternatives (nats-server, mosquitto) on the same machine in the same run.
//!
//! The coordinator (this process) starts the servers, spreads the agents
//! over worker processes (`presence-bench worker`, hidden) and over a range
//! of loopback source addresses, and aggregates what they measure. Server
//! figures come from the server: presenced's control socket (`stats`,
//! `events`), /proc/PID/status for the peers, /proc/slabinfo for the kernel.

mod chart;
mod fleet;
mod kernel;
mod link;
mod report;
mod run;
mod servers;
mod wire;
mod worker;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Load generator for presenced and its peers (nats-server, mosquitto).
#[derive(Debug, Parser)]
#[command(name = "presence-bench", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Connect N agents at a target rate with a concurrency cap; report
    /// handshakes/s and handshake latency percentiles.
    Ramp(RampArgs),
    /// Hold N agents heartbeating at an interval; report heartbeat RTT
    /// percentiles and disconnects.
    Steady(SteadyArgs),
    /// Drop all N connections at once (or SIGKILL the daemon) and reconnect
    /// with jittered backoff; report time to 50/90/99/100 % back online and
    /// the presence events the daemon emitted meanwhile (presenced only).
    Storm(StormArgs),
    /// Hold N agents that have heartbeated, at several N; report the
    /// server's memory per connection (fitted slope) and the kernel's share.
    Density(DensityArgs),
    /// Hold N agents heartbeating, send `upgrade` on the control socket,
    /// keep heartbeating; report disconnects, presence events, the
    /// heartbeat gap across the switch and the daemon's upgrade report
    /// (presenced only).
    Upgrade(UpgradeArgs),
    /// Print the tables of reports saved with --json (files, or - for
    /// stdin), or with --svg draw charts of them.
    Report {
        /// The saved JSON reports.
        #[arg(required = true, num_args = 1..)]
        file: Vec<PathBuf>,
        /// Write density.svg, handshakes.svg and storm.svg into DIR (each
        /// from the reports that have its data) instead of printing tables.
        #[arg(long, value_name = "DIR")]
        svg: Option<PathBuf>,
    },
    /// Internal: one worker process (spawned by the coordinator).
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerArg {
    /// nats-server (Debian package nats-server).
    Nats,
    /// mosquitto (Debian package mosquitto).
    Mqtt,
}

/// Options every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Also measure this peer, started by the bench with the same TLS setup (repeatable).
    #[arg(long = "peer", value_enum)]
    pub peers: Vec<PeerArg>,
    /// Worker processes (default: 2, or more so each holds at most --per-worker agents).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Most agents one worker process holds.
    #[arg(long, default_value_t = 9000)]
    pub per_worker: usize,
    /// Loopback source addresses agents bind, e.g. 127.0.0.2-127.0.0.60,
    /// a comma list, or `none` (the kernel picks 127.0.0.1).
    #[arg(long, default_value = "127.0.0.2-127.0.0.60")]
    pub source_ips: String,
    /// Handshakes per second to aim for, all workers together (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Connection attempts in flight at most, all workers together.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Limit on one connect (TCP + TLS + welcome).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Heartbeat interval of idle agents (presenced: the daemon's
    /// heartbeat_interval when the bench starts it; MQTT keepalive is twice this).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// Allow TLS session resumption (default: every handshake is a full one).
    /// Each agent keeps its own client config, so its tickets resume.
    #[arg(long)]
    pub resumption: bool,
    /// Retry a failed first connect up to N times (full-jitter backoff,
    /// 500 ms doubling to 5 s), like an agent would; 0 = a failed connect
    /// counts as failed.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub connect_retries: u32,
    /// Write a config an older presenced accepts (no [state] section; the
    /// state then goes to the daemon's default directory, if it has one).
    #[arg(long)]
    pub legacy_config: bool,
    /// Agent ids are PREFIX-NNNNNNN.
    #[arg(long, default_value = "bench")]
    pub id_prefix: String,
    /// presenced binary to start (default: next to this binary, then release/debug builds).
    #[arg(long, value_name = "PATH")]
    pub presenced_bin: Option<PathBuf>,
    /// Shards of a bench-started presenced (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    pub shards: usize,
    /// Attach to a running presenced at this address instead of starting one
    /// (needs --control, --ca, --fleet-key).
    #[arg(long, requires_all = ["control", "ca", "fleet_key"])]
    pub addr: Option<SocketAddr>,
    /// Control socket of the attached presenced.
    #[arg(long, value_name = "PATH", requires = "addr")]
    pub control: Option<PathBuf>,
    /// CA (or self-signed cert.pem) of the attached presenced.
    #[arg(long, value_name = "PATH", requires = "addr")]
    pub ca: Option<PathBuf>,
    /// Fleet key file of the attached presenced.
    #[arg(long, value_name = "PATH", requires = "addr")]
    pub fleet_key: Option<PathBuf>,
    /// Print one JSON object instead of tables (and no progress bars).
    #[arg(long)]
    pub json: bool,
}

/// An extra group of agents whose connections are never touched, heartbeating
/// through the storm or the ramp (their own worker process).
#[derive(Debug, Clone, Args)]
pub struct UndisturbedArgs {
    /// Agents in the undisturbed group (0 = none).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub undisturbed: usize,
    /// Heartbeat interval of the undisturbed group (+-10 %).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub undisturbed_interval: Duration,
    /// Nice value of the undisturbed group's worker process (negative =
    /// higher priority, needs root): separates the bench's own CPU
    /// contention from the daemon's latency. 0 = same as the other workers.
    #[arg(
        long,
        default_value_t = 0,
        allow_hyphen_values = true,
        value_name = "N"
    )]
    pub undisturbed_nice: i32,
}

#[derive(Debug, Args)]
pub struct RampArgs {
    /// Agents to connect.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    #[command(flatten)]
    pub undisturbed: UndisturbedArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct SteadyArgs {
    /// Agents to hold.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// How long to measure.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Each agent's heartbeat interval while measuring (+-10 % jitter).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct StormArgs {
    /// Agents to hold and then drop.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// SIGKILL the daemon (pid from `stats`) instead of dropping the connections, then restart it.
    #[arg(long)]
    pub kill_daemon: bool,
    /// Shell command that restarts the daemon after --kill-daemon (default:
    /// start the bench-owned daemon again with the same config).
    #[arg(long, value_name = "CMD", requires = "kill_daemon")]
    pub restart_cmd: Option<String>,
    /// First reconnect backoff ceiling (full jitter, doubling).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub backoff_initial: Duration,
    /// Largest reconnect backoff ceiling.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Give up on agents not back by then.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Keep reading presence events this long after the last agent is back.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub events_grace: Duration,
    /// With --kill-daemon: wait this long after everyone is connected
    /// before the kill, so the daemon's state flush (state.flush_interval,
    /// 1 s by default) has them; 0 = kill at once.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    pub kill_after: Duration,
    /// Share of the agents that drop at once (a partial blip); the others
    /// keep their connection and keep heartbeating.
    #[arg(long, default_value_t = 1.0, value_name = "SHARE")]
    pub drop_share: f64,
    /// Sample the recovery curve this often during the storm (agents back,
    /// and the daemon's sessions / agents online / in grace from `stats`);
    /// 0 = no curve.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub recovery_interval: Duration,
    #[command(flatten)]
    pub undisturbed: UndisturbedArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Agents to hold through the upgrade.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Each agent's heartbeat interval during the window (+-10 % jitter).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Heartbeating before the `upgrade` request.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// Heartbeating after the upgrade report came back.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    /// Binary to upgrade to (default: the daemon's own binary).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Limit on the `upgrade` request.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub upgrade_timeout: Duration,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct DensityArgs {
    /// Agent counts to measure at, ascending, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,18000")]
    pub agents: Vec<usize>,
    /// Wait this long after the heartbeats before reading memory.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Each step's heartbeats are spread over this window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hb_spread: Duration,
    #[command(flatten)]
    pub common: Common,
}

/// Most source addresses a range may name.
const MAX_SOURCE_IPS: u32 = 4096;

/// Parse `A-B`, `A,B,C`, a single address or `none`; every address must be loopback.
pub fn parse_source_ips(text: &str) -> Result<Vec<IpAddr>> {
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("--source-ips: bad address {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("--source-ips: bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                bail!("--source-ips: range {part} is reversed");
            }
            if b - a >= MAX_SOURCE_IPS {
                bail!("--source-ips: range {part} has more than {MAX_SOURCE_IPS} addresses");
            }
            out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
        } else {
            let ip: IpAddr = part
                .parse()
                .with_context(|| format!("--source-ips: bad address {part:?}"))?;
            out.push(ip);
        }
    }
    if let Some(bad) = out.iter().find(|ip| !ip.is_loopback()) {
        bail!("--source-ips: {bad} is not a loopback address (the bench only uses loopback)");
    }
    Ok(out)
}

fn read_saved(file: &std::path::Path) -> Result<chart::Input> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let report: report::Report = serde_json::from_str(text.trim())
        .with_context(|| format!("{} is not a presence-bench --json report", file.display()))?;
    let label = if file.as_os_str() == "-" {
        "stdin".to_owned()
    } else {
        file.file_stem().map_or_else(
            || file.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        )
    };
    Ok(chart::Input { label, report })
}

fn render_saved(files: &[PathBuf], svg: Option<&std::path::Path>) -> Result<()> {
    if files.iter().filter(|f| f.as_os_str() == "-").count() > 1 {
        bail!("stdin (-) can be given once");
    }
    let inputs = files
        .iter()
        .map(|f| read_saved(f))
        .collect::<Result<Vec<_>>>()?;
    let Some(dir) = svg else {
        for (i, input) in inputs.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print!("{}", input.report.render());
        }
        return Ok(());
    };
    let written = chart::write_all(dir, &inputs)?;
    for s in &written.skipped {
        eprintln!("presence-bench: skipped {s}");
    }
    if written.files.is_empty() {
        bail!("no chart has data in these reports (density, ramp/steady, or storm with a recovery curve)");
    }
    for (path, series) in &written.files {
        println!("wrote {} ({})", path.display(), series.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.scenario {
        Scenario::Worker => worker::run(),
        Scenario::Ramp(a) => run::ramp(a),
        Scenario::Steady(a) => run::steady(a),
        Scenario::Storm(a) => run::storm(a),
        Scenario::Density(a) => run::density(a),
        Scenario::Upgrade(a) => run::upgrade(a),
        Scenario::Report { file, svg } => render_saved(&file, svg.as_deref()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presence-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ip_ranges() {
        let v = parse_source_ips("127.0.0.2-127.0.0.60").unwrap();
        assert_eq!(v.len(), 59);
        assert_eq!(v[0], IpAddr::from([127, 0, 0, 2]));
        assert!(parse_source_ips("none").unwrap().is_empty());
        assert_eq!(parse_source_ips("127.0.0.5,127.0.0.9").unwrap().len(), 2);
        assert!(parse_source_ips("10.0.0.1").is_err());
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("127.0.0.1-127.1.0.0").is_err());
        assert!(parse_source_ips("nonsense").is_err());
    }
}
