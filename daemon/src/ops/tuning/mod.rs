//! Host tuning checks: `presenced tuning check --profile NAME` and the
//! start-up capacity warning of `presenced serve`.
//!
//! The sysctl profiles in `tuning/presenced-*.conf` are embedded in the binary
//! and parsed (sysctl.d(5) syntax). [`check`] compares them with the live
//! values under a proc root (default `/proc`; tests point it at a fake tree),
//! checks the process limits (`<root>/self/limits` or `<root>/<pid>/limits`)
//! and estimates how many idle connections this host can hold.
//!
//! | file | what |
//! | --- | --- |
//! | [`profiles`] | the embedded profiles, sysctl.d parsing, the comparison rule of each key |
//! | [`checks`] | reading the live host, comparing it, limits and the capacity estimate |
//! | [`report`] | the [`Report`] of a check and its human output |

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub mod checks;
pub mod profiles;
pub mod report;
#[cfg(test)]
mod tests;

pub use checks::{
    check, count_cpuinfo_processors, estimate_capacity, host_capacity, host_capacity_warning,
    parse_limits, parse_meminfo_total, Bound, Capacity, CheckInput, LimitFinding, ProcessLimits,
    Status, SysctlFinding,
};
pub use profiles::{parse_sysctl_conf, ConfLineError, Profile, Rule, SysctlEntry};
pub use report::Report;

/// Where the live sysctls, limits, meminfo and cpuinfo are read from.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// Kernel memory per idle TLS connection (socket, inode, file, io_uring
/// bookkeeping). Placeholder until measured by the bench.
pub const DEFAULT_PER_CONN_KERNEL_BYTES: u64 = 4096;
/// Daemon (user space) memory per idle connection: TLS state, buffers,
/// presence record. Placeholder until measured by the bench.
pub const DEFAULT_PER_CONN_USER_BYTES: u64 = 10_000;
/// File descriptors that are not agent connections: listeners (one per
/// shard), io_uring rings, eventfds, control socket, log files.
pub const NOFILE_RESERVE: u64 = 1024;
/// RLIMIT_MEMLOCK needed per shard: glommio's registered io_uring buffer
/// memory (`server.io_memory_kib`, default 512 KiB).
pub const MEMLOCK_PER_SHARD_BYTES: u64 = 512 * 1024;
/// Unit of `net.ipv4.tcp_mem` (the profiles assume 4 KiB pages, x86_64).
pub const PAGE_SIZE: u64 = 4096;
/// RAM kept back for the OS, page cache and the daemon's fixed footprint:
/// the larger of this and a tenth of MemTotal.
pub const MIN_RAM_RESERVE_BYTES: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum TuningError {
    #[error("unknown tuning profile `{0}` (expected one of: 100k, 1m, 10m)")]
    UnknownProfile(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: sysctl `{key}`: {message}")]
    BadValue {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("built-in profile {profile}, line {line}: {message}")]
    Profile {
        profile: &'static str,
        line: usize,
        message: String,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
}
