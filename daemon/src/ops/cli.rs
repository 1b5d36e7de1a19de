//! The command lines of `presenced` and `presencectl`, as clap definitions.
//! They live in the library so that `presenced-assets` can render man pages
//! and shell completions from the same definitions the binaries parse with.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// `presenced`'s command line.
pub mod daemon {
    use super::*;

    /// Thread-per-core TLS presence daemon for RMM agent fleets.
    #[derive(Parser)]
    #[command(name = "presenced", version)]
    pub struct Cli {
        #[command(subcommand)]
        pub command: Command,
    }

    #[derive(Subcommand)]
    pub enum Command {
        /// Run the daemon.
        Serve {
            /// Configuration file.
            #[arg(long, conflicts_with = "dev")]
            config: Option<PathBuf>,
            /// Run on a development setup in ./presenced-dev (created if missing).
            #[arg(long)]
            dev: bool,
            /// Take over from a running daemon over this inherited socket
            /// (set by `presencectl upgrade`; not for direct use).
            #[arg(long, hide = true)]
            upgrade_fd: Option<i32>,
        },
        /// Write a working development setup (config, TLS cert and key, fleet key) into DIR.
        DevInit {
            dir: PathBuf,
            /// Overwrite an existing setup.
            #[arg(long)]
            force: bool,
        },
        /// Print an agent's HELLO token (hex) for the given fleet key.
        Token {
            #[arg(long)]
            fleet_key: PathBuf,
            id: String,
        },
        /// Host tuning for a fleet size.
        Tuning {
            #[command(subcommand)]
            command: TuningCommand,
        },
    }

    #[derive(Subcommand)]
    pub enum TuningCommand {
        /// Compare live sysctls and limits with a profile; estimate this host's capacity.
        /// Exit 0 when all is well, 1 when something is off, 2 on error.
        Check {
            /// Profile: 100k, 1m or 10m.
            #[arg(long)]
            profile: String,
            /// Where /proc is (a fake tree for tests).
            #[arg(long, default_value = crate::ops::tuning::DEFAULT_PROC_ROOT)]
            proc_root: PathBuf,
            /// Read the limits of this process instead of our own (e.g. the running daemon).
            #[arg(long)]
            pid: Option<u32>,
            /// Shards (for the locked-memory check); default: online CPUs.
            #[arg(long)]
            cores: Option<usize>,
            /// Connections the host should hold.
            #[arg(long)]
            max_connections: Option<u64>,
            /// Kernel bytes per idle connection.
            #[arg(long, default_value_t = crate::ops::tuning::DEFAULT_PER_CONN_KERNEL_BYTES)]
            kernel_bytes_per_conn: u64,
            /// Daemon (user-space) bytes per idle connection.
            #[arg(long, default_value_t = crate::ops::tuning::DEFAULT_PER_CONN_USER_BYTES)]
            user_bytes_per_conn: u64,
        },
    }
}

/// `presencectl`'s command line.
pub mod ctl {
    use super::*;

    /// Talk to a running presenced over its control socket.
    #[derive(Parser)]
    #[command(name = "presencectl", version)]
    pub struct CtlCli {
        /// Control socket of the daemon ([server] control_socket).
        #[arg(
            long,
            global = true,
            env = "PRESENCECTL_SOCKET",
            default_value = crate::config::DEFAULT_CONTROL_SOCKET
        )]
        pub socket: PathBuf,
        #[command(subcommand)]
        pub command: Cmd,
    }

    #[derive(Subcommand)]
    pub enum Cmd {
        /// Totals and per-shard counters.
        Stats {
            /// Print the daemon's JSON as is.
            #[arg(long)]
            json: bool,
        },
        /// A live per-shard view: connections, rates, accept queue, memory, latency.
        Top {
            /// Refresh interval (e.g. 1s, 500ms).
            #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
            interval: Duration,
            /// Stop after this many refreshes (default: run until interrupted).
            #[arg(long)]
            iterations: Option<u64>,
        },
        /// One agent's presence record.
        Agent {
            id: String,
            /// Print the daemon's JSON as is.
            #[arg(long)]
            json: bool,
        },
        /// Follow presence events (one JSON line each), like `journalctl -f`.
        Events {
            /// Start at this seq (replays held events first); default: only new events.
            #[arg(long)]
            from: Option<u64>,
        },
        /// Reload the TLS certificate, key and fleet key.
        Reload,
        /// Check that the daemon answers.
        Ping,
        /// The Prometheus text exposition.
        Metrics,
        /// Hand every connection, presence record and the event ring to a new
        /// process started from BINARY (default: the binary the daemon runs
        /// from); the old process exits once the new one serves.
        Upgrade {
            /// The new presenced binary (default: the path the running daemon
            /// was started from, i.e. the file now installed there).
            #[arg(long, value_name = "PATH")]
            binary: Option<PathBuf>,
            /// Print the daemon's JSON report as is.
            #[arg(long)]
            json: bool,
        },
        /// The mass-offline guard: its state and the offline events it holds.
        Guard {
            /// Print the daemon's JSON as is.
            #[arg(long)]
            json: bool,
            #[command(subcommand)]
            action: Option<GuardAction>,
        },
        /// Cluster mode: this node's NATS bridge and every node of the
        /// cluster (agents, liveness, publish lag, backlog).
        Cluster {
            /// Print the daemon's JSON as is.
            #[arg(long)]
            json: bool,
        },
    }

    #[derive(Subcommand)]
    pub enum GuardAction {
        /// Publish held offline events now: all of them (and reset the guard),
        /// or only the one of agent ID.
        Release {
            /// Release only this agent's held offline event.
            id: Option<String>,
            /// Print the daemon's JSON as is.
            #[arg(long)]
            json: bool,
        },
    }
}
