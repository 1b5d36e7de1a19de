//! Host tuning checks: `presenced tuning check --profile NAME` and the
//! start-up capacity warning of `presenced serve`.
//!
//! The sysctl profiles in `tuning/presenced-*.conf` are embedded in the binary
//! and parsed (sysctl.d(5) syntax). [`check`] compares them with the live
//! values under a proc root (default `/proc`; tests point it at a fake tree),
//! checks the process limits (`<root>/self/limits` or `<root>/<pid>/limits`)
//! and estimates how many idle connections this host can hold.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

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

/// A sysctl profile shipped in `tuning/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    Agents100k,
    Agents1m,
    Agents10m,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Agents100k, Profile::Agents1m, Profile::Agents10m];

    /// The name used on the command line and in the file name.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Agents100k => "100k",
            Profile::Agents1m => "1m",
            Profile::Agents10m => "10m",
        }
    }

    /// Number of agents the profile is sized for.
    pub fn agents(self) -> u64 {
        match self {
            Profile::Agents100k => 100_000,
            Profile::Agents1m => 1_000_000,
            Profile::Agents10m => 10_000_000,
        }
    }

    /// The embedded sysctl.d file.
    pub fn source(self) -> &'static str {
        match self {
            Profile::Agents100k => include_str!("../../../tuning/presenced-100k.conf"),
            Profile::Agents1m => include_str!("../../../tuning/presenced-1m.conf"),
            Profile::Agents10m => include_str!("../../../tuning/presenced-10m.conf"),
        }
    }

    /// The profile's settings, in file order.
    pub fn entries(self) -> Result<Vec<SysctlEntry>, TuningError> {
        parse_sysctl_conf(self.source()).map_err(|(line, message)| TuningError::Profile {
            profile: self.name(),
            line,
            message,
        })
    }
}

impl FromStr for Profile {
    type Err = TuningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == wanted)
            .ok_or_else(|| TuningError::UnknownProfile(s.to_string()))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One `key = value` line of a sysctl.d file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlEntry {
    /// Dotted form (`net.ipv4.tcp_mem`), whatever separator the file used.
    pub key: String,
    /// Whitespace-normalised value (`"4096 16384 6291456"`).
    pub value: String,
    /// Written with a leading `-`: failure to set it (key absent because the
    /// module is not loaded) is fine.
    pub optional: bool,
    /// 1-based line number in the file.
    pub line: usize,
}

impl SysctlEntry {
    /// The file holding this sysctl under `proc_root` (`<root>/sys/net/ipv4/tcp_mem`).
    pub fn path_under(&self, proc_root: &Path) -> PathBuf {
        proc_root.join("sys").join(self.key.replace('.', "/"))
    }
}

/// Parses sysctl.d(5) text: `key = value`, comments start with `#` or `;`,
/// a leading `-` marks an assignment whose failure is ignored. Keys may use
/// `/` as separator (then `.` inside a component is literal). Glob patterns and
/// `-key` exclusions (no `=`) are rejected: the profiles do not use them.
/// Errors carry the 1-based line number.
pub fn parse_sysctl_conf(text: &str) -> Result<Vec<SysctlEntry>, (usize, String)> {
    let mut entries: Vec<SysctlEntry> = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (optional, line) = match line.strip_prefix('-') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        let Some((key, value)) = line.split_once('=') else {
            return Err((line_no, format!("expected `key = value`, got `{raw}`")));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err((line_no, "empty key".to_string()));
        }
        if key.contains(['*', '?', '[']) {
            return Err((line_no, format!("glob patterns are not supported: `{key}`")));
        }
        let key = dotted_key(key);
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        if value.is_empty() {
            return Err((line_no, format!("`{key}` has no value")));
        }
        // Like systemd-sysctl, a later assignment of the same key wins.
        entries.retain(|e| e.key != key);
        entries.push(SysctlEntry {
            key,
            value,
            optional,
            line: line_no,
        });
    }
    Ok(entries)
}

/// sysctl.d: if the first separator is `/`, dots and slashes are swapped.
fn dotted_key(key: &str) -> String {
    match key.find(['.', '/']) {
        Some(i) if key.as_bytes()[i] == b'/' => key
            .chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                c => c,
            })
            .collect(),
        _ => key.to_string(),
    }
}

/// How one field of a sysctl value is judged against the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Live must be >= wanted (a limit: more is fine).
    AtLeast,
    /// Live must be <= wanted (a cap or timeout: less is fine).
    AtMost,
    /// Live must equal wanted (a switch).
    Exact,
    /// Not compared (e.g. the buffer maximums, which only matter to other traffic).
    Any,
    /// Shown for information, never a problem.
    Info,
}

/// The rule for each field of a key (a single rule applies to every field)
/// and the field names used in the output. Keys not listed must match exactly.
fn explicit_rules(key: &str) -> Option<(&'static [Rule], &'static [&'static str])> {
    const AT_LEAST: &[Rule] = &[Rule::AtLeast];
    const BUF: &[Rule] = &[Rule::AtMost, Rule::AtMost, Rule::Any];
    const BUF_NAMES: &[&str] = &["min", "default", "max"];
    Some(match key {
        "fs.nr_open"
        | "fs.file-max"
        | "net.core.somaxconn"
        | "net.ipv4.tcp_max_syn_backlog"
        | "net.core.netdev_max_backlog"
        | "net.netfilter.nf_conntrack_max" => (AT_LEAST, &[]),
        "net.ipv4.tcp_mem" => (AT_LEAST, &["min", "pressure", "max"]),
        "net.ipv4.tcp_rmem" | "net.ipv4.tcp_wmem" => (BUF, BUF_NAMES),
        "net.ipv4.tcp_fin_timeout" => (&[Rule::AtMost], &[]),
        "net.ipv4.ip_local_port_range" => (&[Rule::Info], &["low", "high"]),
        "net.ipv4.tcp_migrate_req" | "net.ipv4.tcp_syncookies" => (&[Rule::Exact], &[]),
        _ => return None,
    })
}

fn rules_for(key: &str) -> (&'static [Rule], &'static [&'static str]) {
    explicit_rules(key).unwrap_or((&[Rule::Exact], &[]))
}

/// Outcome for one sysctl or limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Below an "at least" value (or a switch set lower).
    Low,
    /// Above an "at most" value (or a switch set higher).
    High,
    /// Different shape or text (field count, non-numeric value).
    Differs,
    /// A required key does not exist on this kernel.
    Missing,
    /// An optional key does not exist (module not loaded): fine.
    Absent,
    /// Shown for information only.
    Info,
}

impl Status {
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            Status::Low | Status::High | Status::Differs | Status::Missing
        )
    }

    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Low => "LOW",
            Status::High => "HIGH",
            Status::Differs => "DIFFERS",
            Status::Missing => "MISSING",
            Status::Absent => "ok (absent)",
            Status::Info => "info",
        }
    }
}

/// One profile key compared with the live host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlFinding {
    pub key: String,
    /// The profile value with its comparison, e.g. `>=1000000` or `<=16384`.
    pub wanted: String,
    /// The live value (whitespace-normalised), `None` if the key does not exist.
    pub live: Option<String>,
    pub status: Status,
    /// Which fields are off, or why a key is missing; may be empty.
    pub detail: String,
}

/// A process limit compared with what the profile needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitFinding {
    /// As in /proc/PID/limits, e.g. `Max open files`.
    pub name: &'static str,
    pub wanted_at_least: u64,
    /// Why that much, e.g. `1000000 agents + 1024 reserve`.
    pub reason: String,
    /// `u64::MAX` = unlimited.
    pub soft: u64,
    pub hard: u64,
    pub status: Status,
}

/// The two limits of `/proc/PID/limits` that matter here. `u64::MAX` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub memlock_soft: u64,
    pub memlock_hard: u64,
}

/// Parses the text of `/proc/PID/limits` (`path` only names it in errors).
pub fn parse_limits(path: &Path, text: &str) -> Result<ProcessLimits, TuningError> {
    let find = |name: &str| -> Result<(u64, u64), TuningError> {
        let parse_err = |message: String| TuningError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| parse_err(format!("no `{name}` line")))?;
        let mut fields = line.split_whitespace();
        let mut next = |which: &str| -> Result<u64, TuningError> {
            match fields.next() {
                Some("unlimited") => Ok(u64::MAX),
                Some(v) => v
                    .parse::<u64>()
                    .map_err(|_| parse_err(format!("`{name}`: bad {which} limit `{v}`"))),
                None => Err(parse_err(format!("`{name}`: missing {which} limit"))),
            }
        };
        let soft = next("soft")?;
        let hard = next("hard")?;
        Ok((soft, hard))
    };
    let (nofile_soft, nofile_hard) = find("Max open files")?;
    let (memlock_soft, memlock_hard) = find("Max locked memory")?;
    Ok(ProcessLimits {
        nofile_soft,
        nofile_hard,
        memlock_soft,
        memlock_hard,
    })
}

/// Parses `MemTotal:  24684092 kB` out of `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_total(path: &Path, text: &str) -> Result<u64, TuningError> {
    let parse_err = |message: String| TuningError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .ok_or_else(|| parse_err("no `MemTotal:` line".to_string()))?;
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| parse_err(format!("bad MemTotal `{}`", rest.trim())))?;
    let factor = match fields.next() {
        Some("kB") => 1024,
        None => 1,
        Some(unit) => return Err(parse_err(format!("unknown MemTotal unit `{unit}`"))),
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| parse_err(format!("MemTotal {value} out of range")))
}

/// Counts `processor : N` lines of `/proc/cpuinfo` text.
pub fn count_cpuinfo_processors(path: &Path, text: &str) -> Result<usize, TuningError> {
    let n = text
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    if n == 0 {
        return Err(TuningError::Parse {
            path: path.to_path_buf(),
            message: "no `processor` lines".to_string(),
        });
    }
    Ok(n)
}

/// How many idle connections the host can hold, and what limits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub mem_total_bytes: u64,
    pub ram_reserve_bytes: u64,
    pub nofile_soft: u64,
    /// Third field of `net.ipv4.tcp_mem`, in pages; `None` if unknown.
    pub tcp_mem_max_pages: Option<u64>,
    pub per_conn_kernel_bytes: u64,
    pub per_conn_user_bytes: u64,
    /// nofile soft limit - [`NOFILE_RESERVE`].
    pub by_nofile: u64,
    /// (MemTotal - reserve) / (kernel + user bytes per connection).
    pub by_memory: u64,
    /// tcp_mem max pages x [`PAGE_SIZE`] / kernel bytes per connection.
    /// Conservative: tcp_mem only counts buffer memory, not the socket itself.
    pub by_tcp_mem: Option<u64>,
}

impl Capacity {
    /// The estimate: the smallest of the three bounds.
    pub fn connections(&self) -> u64 {
        self.by_nofile
            .min(self.by_memory)
            .min(self.by_tcp_mem.unwrap_or(u64::MAX))
    }

    /// Which bound is the smallest.
    pub fn limited_by(&self) -> Bound {
        let c = self.connections();
        if c == self.by_nofile {
            Bound::OpenFiles
        } else if c == self.by_memory {
            Bound::Memory
        } else {
            Bound::TcpMem
        }
    }
}

/// What limits the [`Capacity`] estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The process's RLIMIT_NOFILE (LimitNOFILE= in the unit).
    OpenFiles,
    /// RAM.
    Memory,
    /// The hard limit of net.ipv4.tcp_mem.
    TcpMem,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bound::OpenFiles => "the open files limit",
            Bound::Memory => "memory",
            Bound::TcpMem => "net.ipv4.tcp_mem",
        })
    }
}

/// The capacity arithmetic (no I/O). Zero per-connection costs count as 1 byte.
pub fn estimate_capacity(
    mem_total_bytes: u64,
    nofile_soft: u64,
    tcp_mem_max_pages: Option<u64>,
    per_conn_kernel_bytes: u64,
    per_conn_user_bytes: u64,
) -> Capacity {
    let kernel = per_conn_kernel_bytes.max(1);
    let per_conn = kernel.saturating_add(per_conn_user_bytes).max(1);
    let ram_reserve_bytes = MIN_RAM_RESERVE_BYTES.max(mem_total_bytes / 10);
    Capacity {
        mem_total_bytes,
        ram_reserve_bytes,
        nofile_soft,
        tcp_mem_max_pages,
        per_conn_kernel_bytes,
        per_conn_user_bytes,
        by_nofile: nofile_soft.saturating_sub(NOFILE_RESERVE),
        by_memory: mem_total_bytes.saturating_sub(ram_reserve_bytes) / per_conn,
        by_tcp_mem: tcp_mem_max_pages.map(|p| p.saturating_mul(PAGE_SIZE) / kernel),
    }
}

/// What `presenced tuning check` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckInput {
    /// Normally `/proc`.
    pub proc_root: PathBuf,
    pub profile: Profile,
    pub per_conn_user_bytes: u64,
    pub per_conn_kernel_bytes: u64,
    /// Connections the host must hold; default: the profile's agent count.
    pub max_connections: Option<u64>,
    /// Shard count (for RLIMIT_MEMLOCK); default: available parallelism when
    /// `proc_root` is `/proc`, else the `processor` lines of `<root>/cpuinfo`.
    pub cores: Option<usize>,
    /// Read the limits of this process (`<root>/<pid>/limits`, e.g. the running
    /// service) instead of `<root>/self/limits`.
    pub pid: Option<u32>,
}

impl CheckInput {
    /// Defaults: `/proc`, the default per-connection costs, no overrides.
    pub fn new(profile: Profile) -> Self {
        Self {
            proc_root: PathBuf::from(DEFAULT_PROC_ROOT),
            profile,
            per_conn_user_bytes: DEFAULT_PER_CONN_USER_BYTES,
            per_conn_kernel_bytes: DEFAULT_PER_CONN_KERNEL_BYTES,
            max_connections: None,
            cores: None,
            pid: None,
        }
    }
}

/// The result of [`check`]; `Display` is the human output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub profile: Profile,
    pub proc_root: PathBuf,
    pub limits_path: PathBuf,
    /// True when limits were read from `self` (this CLI process, not the service).
    pub limits_of_self: bool,
    pub cores: usize,
    pub sysctls: Vec<SysctlFinding>,
    pub limits: Vec<LimitFinding>,
    pub capacity: Capacity,
    /// Connections the host should hold (`max_connections` or the profile's agents).
    pub target_connections: u64,
}

impl Report {
    /// Number of things that are off; the CLI exits 1 when this is not 0.
    pub fn problems(&self) -> usize {
        self.sysctls
            .iter()
            .filter(|f| f.status.is_problem())
            .count()
            + self.limits.iter().filter(|f| f.status.is_problem()).count()
            + usize::from(self.capacity_short())
    }

    /// The capacity estimate is below the target.
    pub fn capacity_short(&self) -> bool {
        self.capacity.connections() < self.target_connections
    }
}

fn read_file(path: &Path) -> Result<String, TuningError> {
    std::fs::read_to_string(path).map_err(|source| TuningError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a sysctl; `Ok(None)` if the file does not exist.
fn read_sysctl(path: &Path) -> Result<Option<String>, TuningError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.split_whitespace().collect::<Vec<_>>().join(" "))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TuningError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Third field of `net.ipv4.tcp_mem`, `Ok(None)` if the file does not exist.
fn read_tcp_mem_max(proc_root: &Path) -> Result<Option<u64>, TuningError> {
    let path = proc_root.join("sys/net/ipv4/tcp_mem");
    let Some(text) = read_sysctl(&path)? else {
        return Ok(None);
    };
    let field = text.split_whitespace().nth(2);
    field
        .and_then(|v| v.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| TuningError::BadValue {
            path,
            key: "net.ipv4.tcp_mem".to_string(),
            message: format!("expected three page counts, got `{text}`"),
        })
}

fn compare_entry(
    entry: &SysctlEntry,
    live: Option<String>,
    path: &Path,
) -> Result<SysctlFinding, TuningError> {
    let (rules, names) = rules_for(&entry.key);
    let wanted_fields: Vec<&str> = entry.value.split(' ').collect();
    let rule_at = |i: usize| -> Rule {
        if rules.len() == 1 {
            rules[0]
        } else {
            rules.get(i).copied().unwrap_or(Rule::Exact)
        }
    };
    let field_name = |i: usize| -> String {
        names
            .get(i)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("field {}", i + 1))
    };
    let wanted = wanted_fields
        .iter()
        .enumerate()
        .map(|(i, v)| match rule_at(i) {
            Rule::AtLeast => format!(">={v}"),
            Rule::AtMost => format!("<={v}"),
            Rule::Exact | Rule::Info => (*v).to_string(),
            Rule::Any => format!("({v})"),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut finding = SysctlFinding {
        key: entry.key.clone(),
        wanted,
        live: live.clone(),
        status: Status::Ok,
        detail: String::new(),
    };
    let Some(live) = live else {
        if entry.optional {
            finding.status = Status::Absent;
            finding.detail = "not present (module not loaded)".to_string();
        } else {
            finding.status = Status::Missing;
            finding.detail = format!("{} does not exist on this kernel", path.display());
        }
        return Ok(finding);
    };
    if rules.iter().all(|r| *r == Rule::Info) {
        finding.status = Status::Info;
        return Ok(finding);
    }
    let live_fields: Vec<&str> = live.split(' ').collect();
    if live_fields.len() != wanted_fields.len() {
        finding.status = Status::Differs;
        finding.detail = format!(
            "{} field(s) live, {} wanted",
            live_fields.len(),
            wanted_fields.len()
        );
        return Ok(finding);
    }
    let mut low = Vec::new();
    let mut high = Vec::new();
    let mut differs = Vec::new();
    for (i, (w, l)) in wanted_fields.iter().zip(&live_fields).enumerate() {
        let rule = rule_at(i);
        if matches!(rule, Rule::Any | Rule::Info) {
            continue;
        }
        let Ok(w_num) = w.parse::<i128>() else {
            // Non-numeric profile value: compare as text.
            if w != l {
                differs.push(field_name(i));
            }
            continue;
        };
        let l_num = l.parse::<i128>().map_err(|_| TuningError::BadValue {
            path: path.to_path_buf(),
            key: entry.key.clone(),
            message: format!("expected a number, got `{l}`"),
        })?;
        let bad_low = l_num < w_num && matches!(rule, Rule::AtLeast | Rule::Exact);
        let bad_high = l_num > w_num && matches!(rule, Rule::AtMost | Rule::Exact);
        if bad_low {
            low.push(field_name(i));
        } else if bad_high {
            high.push(field_name(i));
        }
    }
    let several = wanted_fields.len() > 1;
    let mut details = Vec::new();
    if several && !low.is_empty() {
        details.push(format!("low: {}", low.join(", ")));
    }
    if several && !high.is_empty() {
        details.push(format!("high: {}", high.join(", ")));
    }
    if !differs.is_empty() {
        details.push(format!("differs: {}", differs.join(", ")));
    }
    finding.detail = details.join("; ");
    finding.status = if !differs.is_empty() || (!low.is_empty() && !high.is_empty()) {
        Status::Differs
    } else if !low.is_empty() {
        Status::Low
    } else if !high.is_empty() {
        Status::High
    } else {
        Status::Ok
    };
    Ok(finding)
}

fn count_cores(proc_root: &Path) -> Result<usize, TuningError> {
    if proc_root == Path::new(DEFAULT_PROC_ROOT) {
        if let Ok(n) = std::thread::available_parallelism() {
            return Ok(n.get());
        }
    }
    let path = proc_root.join("cpuinfo");
    let text = read_file(&path)?;
    count_cpuinfo_processors(&path, &text)
}

fn limit_finding(
    name: &'static str,
    wanted: u64,
    reason: String,
    soft: u64,
    hard: u64,
) -> LimitFinding {
    LimitFinding {
        name,
        wanted_at_least: wanted,
        reason,
        soft,
        hard,
        status: if soft >= wanted {
            Status::Ok
        } else {
            Status::Low
        },
    }
}

/// Compares the live host under `input.proc_root` with `input.profile`.
pub fn check(input: &CheckInput) -> Result<Report, TuningError> {
    if input.per_conn_kernel_bytes == 0 || input.per_conn_user_bytes == 0 {
        return Err(TuningError::Invalid(
            "per-connection kernel and user bytes must be greater than 0".to_string(),
        ));
    }
    if input.cores == Some(0) {
        return Err(TuningError::Invalid(
            "cores must be greater than 0".to_string(),
        ));
    }
    let root = input.proc_root.as_path();
    let target = input
        .max_connections
        .unwrap_or_else(|| input.profile.agents());

    let mut sysctls = Vec::new();
    for entry in input.profile.entries()? {
        let path = entry.path_under(root);
        let live = read_sysctl(&path)?;
        sysctls.push(compare_entry(&entry, live, &path)?);
    }

    let limits_path = match input.pid {
        Some(pid) => root.join(pid.to_string()).join("limits"),
        None => root.join("self/limits"),
    };
    let limits = parse_limits(&limits_path, &read_file(&limits_path)?)?;
    let cores = match input.cores {
        Some(n) => n,
        None => count_cores(root)?,
    };
    let nofile_wanted = target.saturating_add(NOFILE_RESERVE);
    let memlock_wanted = (cores as u64).saturating_mul(MEMLOCK_PER_SHARD_BYTES);
    let limit_findings = vec![
        limit_finding(
            "Max open files",
            nofile_wanted,
            format!("{} connections + {} reserve", group(target), NOFILE_RESERVE),
            limits.nofile_soft,
            limits.nofile_hard,
        ),
        limit_finding(
            "Max locked memory",
            memlock_wanted,
            format!(
                "{cores} shards x {} KiB io_memory",
                MEMLOCK_PER_SHARD_BYTES / 1024
            ),
            limits.memlock_soft,
            limits.memlock_hard,
        ),
    ];

    let meminfo_path = root.join("meminfo");
    let mem_total = parse_meminfo_total(&meminfo_path, &read_file(&meminfo_path)?)?;
    let capacity = estimate_capacity(
        mem_total,
        limits.nofile_soft,
        read_tcp_mem_max(root)?,
        input.per_conn_kernel_bytes,
        input.per_conn_user_bytes,
    );

    Ok(Report {
        profile: input.profile,
        proc_root: input.proc_root.clone(),
        limits_path,
        limits_of_self: input.pid.is_none(),
        cores,
        sysctls,
        limits: limit_findings,
        capacity,
        target_connections: target,
    })
}

/// Capacity of this host from `<root>/meminfo`, `<root>/self/limits` and
/// `<root>/sys/net/ipv4/tcp_mem`.
pub fn host_capacity(
    proc_root: &Path,
    per_conn_user_bytes: u64,
    per_conn_kernel_bytes: u64,
) -> Result<Capacity, TuningError> {
    let limits_path = proc_root.join("self/limits");
    let limits = parse_limits(&limits_path, &read_file(&limits_path)?)?;
    let meminfo_path = proc_root.join("meminfo");
    let mem_total = parse_meminfo_total(&meminfo_path, &read_file(&meminfo_path)?)?;
    Ok(estimate_capacity(
        mem_total,
        limits.nofile_soft,
        read_tcp_mem_max(proc_root)?,
        per_conn_kernel_bytes,
        per_conn_user_bytes,
    ))
}

/// For `presenced serve` at start-up (call it in the daemon process, so
/// `self/limits` are the service's limits). `Some(message)` when the host
/// cannot hold `max_connections`, or when the capacity cannot be estimated;
/// `None` when it fits.
pub fn host_capacity_warning(
    proc_root: &Path,
    max_connections: u64,
    per_conn_user_bytes: u64,
    per_conn_kernel_bytes: u64,
) -> Option<String> {
    let cap = match host_capacity(proc_root, per_conn_user_bytes, per_conn_kernel_bytes) {
        Ok(cap) => cap,
        Err(e) => return Some(format!("cannot estimate host capacity: {e}")),
    };
    if cap.connections() >= max_connections {
        return None;
    }
    let hint = match cap.limited_by() {
        Bound::OpenFiles => "raise LimitNOFILE= (presenced.service) and fs.nr_open",
        Bound::Memory => "add RAM or lower server.max_connections",
        Bound::TcpMem => "install a tuning/presenced-*.conf sysctl profile",
    };
    Some(format!(
        "this host can hold about {} connections (limited by {}), below server.max_connections = {}: {}; run `presenced tuning check --profile NAME` for details",
        group(cap.connections()),
        cap.limited_by(),
        group(max_connections),
        hint
    ))
}

/// 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    // Walk the digits from the right, a comma before every third one
    // (written without `%` so it builds on the workspace MSRV, 1.80).
    let digits = n.to_string();
    let mut out: Vec<char> = Vec::with_capacity(digits.len() + digits.len() / 3);
    let mut in_group = 0;
    for c in digits.chars().rev() {
        if in_group == 3 {
            out.push(',');
            in_group = 0;
        }
        out.push(c);
        in_group += 1;
    }
    out.into_iter().rev().collect()
}

fn limit_str(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "presenced tuning check: profile {} ({} agents), proc root {}",
            self.profile,
            group(self.profile.agents()),
            self.proc_root.display()
        )?;
        writeln!(f)?;
        writeln!(f, "{:<32} {:<32} {:<28} status", "sysctl", "wanted", "live")?;
        for s in &self.sysctls {
            let live = s.live.as_deref().unwrap_or("-");
            write!(
                f,
                "{:<32} {:<32} {:<28} {}",
                s.key,
                s.wanted,
                live,
                s.status.label()
            )?;
            if !s.detail.is_empty() {
                write!(f, " ({})", s.detail)?;
            }
            writeln!(f)?;
        }
        writeln!(f)?;
        writeln!(f, "process limits from {}", self.limits_path.display())?;
        if self.limits_of_self {
            writeln!(
                f,
                "  (limits of this command, not of the service; the service gets LimitNOFILE=/LimitMEMLOCK= from presenced.service:"
            )?;
            writeln!(
                f,
                "   check it with --pid \"$(systemctl show -P MainPID presenced)\")"
            )?;
        }
        for l in &self.limits {
            let wanted = format!(">={}", l.wanted_at_least);
            let live = format!("{} (hard {})", limit_str(l.soft), limit_str(l.hard));
            writeln!(
                f,
                "{:<32} {:<32} {:<28} {} ({})",
                format!("{} (soft)", l.name),
                wanted,
                live,
                l.status.label(),
                l.reason
            )?;
        }
        writeln!(f)?;
        let c = &self.capacity;
        writeln!(
            f,
            "capacity estimate ({} B kernel + {} B user per connection, {} cores):",
            c.per_conn_kernel_bytes, c.per_conn_user_bytes, self.cores
        )?;
        writeln!(
            f,
            "  open files  {} soft limit - {} reserve = {}",
            limit_str(c.nofile_soft),
            NOFILE_RESERVE,
            group(c.by_nofile)
        )?;
        writeln!(
            f,
            "  memory      ({} MemTotal - {} reserve) / {} B = {}",
            gib(c.mem_total_bytes),
            gib(c.ram_reserve_bytes),
            c.per_conn_kernel_bytes
                .saturating_add(c.per_conn_user_bytes),
            group(c.by_memory)
        )?;
        match (c.tcp_mem_max_pages, c.by_tcp_mem) {
            (Some(pages), Some(n)) => writeln!(
                f,
                "  tcp_mem     {} pages (max) x {} B / {} B = {}",
                pages,
                PAGE_SIZE,
                c.per_conn_kernel_bytes,
                group(n)
            )?,
            _ => writeln!(f, "  tcp_mem     not available")?,
        }
        writeln!(
            f,
            "  => about {} connections (limited by {}); target {}: {}",
            group(c.connections()),
            c.limited_by(),
            group(self.target_connections),
            if self.capacity_short() {
                "TOO LOW"
            } else {
                "OK"
            }
        )?;
        writeln!(f)?;
        match self.problems() {
            0 => write!(f, "all OK"),
            1 => write!(f, "1 problem"),
            n => write!(f, "{n} problems"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const KERNEL: u64 = DEFAULT_PER_CONN_KERNEL_BYTES;
    const USER: u64 = DEFAULT_PER_CONN_USER_BYTES;

    fn limits_text(nofile: &str, memlock: &str) -> String {
        format!(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max cpu time              unlimited            unlimited            seconds   \n\
             Max open files            {nofile:<20} {nofile:<20} files     \n\
             Max locked memory         {memlock:<20} {memlock:<20} bytes     \n\
             Max address space         unlimited            unlimited            bytes     \n"
        )
    }

    /// A fake proc tree where every key of `profile` has exactly the profile
    /// value, limits fit the profile, 256 GiB RAM and 16 CPUs.
    fn good_tree(profile: Profile) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for e in profile.entries().unwrap() {
            // Live files are tab-separated, like the kernel's.
            write(&e.path_under(dir.path()), &e.value.replace(' ', "\t"));
        }
        let nofile = (profile.agents() * 2).to_string();
        write(
            &dir.path().join("self/limits"),
            &limits_text(&nofile, "67108864"),
        );
        write(
            &dir.path().join("meminfo"),
            &format!("MemTotal:       {} kB\nMemFree:  1 kB\n", 256u64 << 20),
        );
        let cpuinfo: String = (0..16)
            .map(|i| format!("processor\t: {i}\nmodel name\t: test\n\n"))
            .collect();
        write(&dir.path().join("cpuinfo"), &cpuinfo);
        dir
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("{text}\n")).unwrap();
    }

    fn input(root: &Path, profile: Profile) -> CheckInput {
        CheckInput {
            proc_root: root.to_path_buf(),
            ..CheckInput::new(profile)
        }
    }

    fn finding<'a>(r: &'a Report, key: &str) -> &'a SysctlFinding {
        r.sysctls.iter().find(|f| f.key == key).unwrap()
    }

    #[test]
    fn profiles_parse_and_every_key_has_an_explicit_rule() {
        for p in Profile::ALL {
            let entries = p.entries().unwrap();
            assert!(entries.len() >= 10, "{p}: {entries:?}");
            for e in &entries {
                assert!(
                    explicit_rules(&e.key).is_some(),
                    "{p}: no rule for {}",
                    e.key
                );
            }
            let conntrack = entries
                .iter()
                .find(|e| e.key == "net.netfilter.nf_conntrack_max")
                .unwrap();
            assert!(conntrack.optional);
            assert_eq!(p.name().parse::<Profile>().unwrap(), p);
        }
        assert!("1M".parse::<Profile>().is_ok());
        assert!(matches!(
            "2m".parse::<Profile>(),
            Err(TuningError::UnknownProfile(_))
        ));
    }

    #[test]
    fn profile_tcp_mem_is_sized_for_its_agents() {
        for p in Profile::ALL {
            let e = p.entries().unwrap();
            let tcp_mem = &e
                .iter()
                .find(|e| e.key == "net.ipv4.tcp_mem")
                .unwrap()
                .value;
            let max: u64 = tcp_mem.split(' ').nth(2).unwrap().parse().unwrap();
            // At least one 4 KiB page per agent in the hard limit.
            assert!(max * PAGE_SIZE >= p.agents() * KERNEL, "{p}: {tcp_mem}");
            let nr_open = &e.iter().find(|e| e.key == "fs.nr_open").unwrap().value;
            assert!(nr_open.parse::<u64>().unwrap() >= p.agents() + NOFILE_RESERVE);
        }
    }

    #[test]
    fn sysctl_conf_syntax() {
        let text = "# c\n; c\n\n  net.core.somaxconn =  4096 \n-net/netfilter/nf_conntrack_max=5\n\
                    net.ipv4.tcp_mem = 1   2\t3\nnet.core.somaxconn = 8192\n";
        let e = parse_sysctl_conf(text).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].key, "net.netfilter.nf_conntrack_max");
        assert!(e[0].optional);
        assert_eq!(e[1].value, "1 2 3");
        assert_eq!(e[2].value, "8192");
        assert_eq!(e[2].line, 7);
        assert_eq!(
            e[0].path_under(Path::new("/p")),
            PathBuf::from("/p/sys/net/netfilter/nf_conntrack_max")
        );
        assert_eq!(
            dotted_key("net/ipv4/conf/eth0.100/rp_filter"),
            "net.ipv4.conf.eth0/100.rp_filter"
        );
        assert_eq!(parse_sysctl_conf("junk\n").unwrap_err().0, 1);
        assert!(parse_sysctl_conf("a.b =\n").is_err());
        assert!(parse_sysctl_conf("net.*.x = 1\n").is_err());
    }

    #[test]
    fn all_good_tree_has_no_problems() {
        for p in Profile::ALL {
            let dir = good_tree(p);
            let r = check(&input(dir.path(), p)).unwrap();
            assert_eq!(r.problems(), 0, "{p}:\n{r}");
            assert_eq!(r.cores, 16);
            assert!(r.to_string().ends_with("all OK"), "{r}");
        }
    }

    #[test]
    fn low_nr_open_is_reported() {
        let dir = good_tree(Profile::Agents1m);
        write(&dir.path().join("sys/fs/nr_open"), "1048576");
        let r = check(&input(dir.path(), Profile::Agents1m)).unwrap();
        assert_eq!(r.problems(), 1, "{r}");
        let f = finding(&r, "fs.nr_open");
        assert_eq!(f.status, Status::Low);
        assert_eq!(f.live.as_deref(), Some("1048576"));
        let out = r.to_string();
        assert!(out.contains("fs.nr_open") && out.contains("LOW"), "{out}");
        assert!(out.ends_with("1 problem"), "{out}");
    }

    #[test]
    fn higher_limits_and_lower_caps_are_fine_other_directions_are_not() {
        let p = Profile::Agents1m;
        let dir = good_tree(p);
        let root = dir.path();
        // More than wanted for an "at least" key, less for an "at most" key,
        // and a different (unchecked) buffer max: all fine.
        write(&root.join("sys/fs/nr_open"), "1073741816");
        write(&root.join("sys/net/ipv4/tcp_fin_timeout"), "5");
        write(&root.join("sys/net/ipv4/tcp_wmem"), "4096\t8192\t33554432");
        write(
            &root.join("sys/net/ipv4/ip_local_port_range"),
            "1024\t65535",
        );
        let r = check(&input(root, p)).unwrap();
        assert_eq!(r.problems(), 0, "{r}");
        assert_eq!(
            finding(&r, "net.ipv4.ip_local_port_range").status,
            Status::Info
        );

        // Kernel defaults: 131072 rmem default is above the profile's cap,
        // tcp_mem is far below, tcp_migrate_req is off.
        write(&root.join("sys/net/ipv4/tcp_rmem"), "4096\t131072\t6291456");
        write(&root.join("sys/net/ipv4/tcp_mem"), "287901\t383868\t575802");
        write(&root.join("sys/net/ipv4/tcp_migrate_req"), "0");
        let r = check(&input(root, p)).unwrap();
        let rmem = finding(&r, "net.ipv4.tcp_rmem");
        assert_eq!(rmem.status, Status::High);
        assert_eq!(rmem.detail, "high: default");
        let tcp_mem = finding(&r, "net.ipv4.tcp_mem");
        assert_eq!(tcp_mem.status, Status::Low);
        assert_eq!(tcp_mem.detail, "low: min, pressure, max");
        assert_eq!(finding(&r, "net.ipv4.tcp_migrate_req").status, Status::Low);
        // 575802 pages x 4096 / 4096 B = 575802 < 1M: capacity is short too.
        assert_eq!(r.capacity.by_tcp_mem, Some(575_802));
        assert!(r.capacity_short());
        assert_eq!(r.problems(), 4, "{r}");
    }

    #[test]
    fn missing_conntrack_is_not_a_problem_but_missing_required_key_is() {
        let p = Profile::Agents10m;
        let dir = good_tree(p);
        let root = dir.path();
        fs::remove_dir_all(root.join("sys/net/netfilter")).unwrap();
        let r = check(&input(root, p)).unwrap();
        assert_eq!(r.problems(), 0, "{r}");
        let f = finding(&r, "net.netfilter.nf_conntrack_max");
        assert_eq!(f.status, Status::Absent);
        assert_eq!(f.live, None);

        // Loaded but too small: a problem.
        write(&root.join("sys/net/netfilter/nf_conntrack_max"), "262144");
        let r = check(&input(root, p)).unwrap();
        assert_eq!(
            finding(&r, "net.netfilter.nf_conntrack_max").status,
            Status::Low
        );

        // Old kernel without tcp_migrate_req: a problem.
        fs::remove_file(root.join("sys/net/ipv4/tcp_migrate_req")).unwrap();
        let r = check(&input(root, p)).unwrap();
        assert_eq!(
            finding(&r, "net.ipv4.tcp_migrate_req").status,
            Status::Missing
        );
        assert_eq!(r.problems(), 2, "{r}");
    }

    #[test]
    fn limits_file_parsing() {
        let path = Path::new("/x/self/limits");
        let l = parse_limits(path, &limits_text("1024", "unlimited")).unwrap();
        assert_eq!(l.nofile_soft, 1024);
        assert_eq!(l.nofile_hard, 1024);
        assert_eq!(l.memlock_soft, u64::MAX);
        // Real kernel layout with differing soft/hard.
        let real = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max open files            20000                1048576              files     \n\
                    Max locked memory         8388608              8388608              bytes     \n";
        let l = parse_limits(path, real).unwrap();
        assert_eq!((l.nofile_soft, l.nofile_hard), (20000, 1_048_576));
        assert_eq!(l.memlock_hard, 8_388_608);

        let err = parse_limits(
            path,
            "Max open files  lots  lots files\nMax locked memory 1 1 bytes\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("/x/self/limits"), "{err}");
        let err = parse_limits(path, "Max open files 1 1 files\n").unwrap_err();
        assert!(err.to_string().contains("Max locked memory"), "{err}");
        assert!(parse_limits(path, "Max open files 1\nMax locked memory 1 1\n").is_err());
    }

    #[test]
    fn low_limits_and_pid_limits() {
        let p = Profile::Agents100k;
        let dir = good_tree(p);
        let root = dir.path();
        write(&root.join("self/limits"), &limits_text("1024", "65536"));
        let r = check(&input(root, p)).unwrap();
        assert!(r.limits.iter().all(|l| l.status == Status::Low), "{r}");
        assert_eq!(r.limits[0].wanted_at_least, 100_000 + NOFILE_RESERVE);
        assert_eq!(r.limits[1].wanted_at_least, 16 * 512 * 1024);
        assert_eq!(r.capacity.by_nofile, 0);
        assert_eq!(r.problems(), 3, "{r}");
        assert!(r.to_string().contains("--pid"));

        write(
            &root.join("4242/limits"),
            &limits_text("16777216", "67108864"),
        );
        let r = check(&CheckInput {
            pid: Some(4242),
            cores: Some(4),
            ..input(root, p)
        })
        .unwrap();
        assert_eq!(r.problems(), 0, "{r}");
        assert_eq!(r.cores, 4);
        assert!(!r.to_string().contains("--pid"));
    }

    #[test]
    fn thousands_grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn capacity_arithmetic() {
        // 64 GiB, nofile 16M, tcp_mem max 2M pages.
        let c = estimate_capacity(64 << 30, 16_777_216, Some(2_000_000), 4096, 10_000);
        assert_eq!(c.ram_reserve_bytes, (64u64 << 30) / 10);
        assert_eq!(c.by_nofile, 16_777_216 - 1024);
        assert_eq!(c.by_memory, ((64u64 << 30) - (64u64 << 30) / 10) / 14_096);
        assert_eq!(c.by_memory, 4_387_594);
        assert_eq!(c.by_tcp_mem, Some(2_000_000));
        assert_eq!(c.connections(), 2_000_000);
        assert_eq!(c.limited_by(), Bound::TcpMem);

        // Small box: 4 GiB -> 1 GiB reserve (more than 10%).
        let c = estimate_capacity(4 << 30, 16_777_216, None, 4096, 10_000);
        assert_eq!(c.ram_reserve_bytes, 1 << 30);
        assert_eq!(c.by_memory, (3u64 << 30) / 14_096);
        assert_eq!(c.limited_by(), Bound::Memory);

        let c = estimate_capacity(64 << 30, 1024, Some(u64::MAX), 4096, 10_000);
        assert_eq!(c.connections(), 0);
        assert_eq!(c.limited_by(), Bound::OpenFiles);
        // Tiny RAM, zero costs, huge pages: no panic.
        let c = estimate_capacity(1, u64::MAX, Some(u64::MAX), 0, 0);
        assert_eq!(c.by_memory, 0);
    }

    #[test]
    fn host_capacity_warning_cases() {
        let dir = good_tree(Profile::Agents1m);
        let root = dir.path();
        // 256 GiB, nofile 2M, tcp_mem max 2M pages: 1M fits.
        assert_eq!(host_capacity_warning(root, 1_000_000, USER, KERNEL), None);
        let w = host_capacity_warning(root, 5_000_000, USER, KERNEL).unwrap();
        assert!(
            w.contains("open files limit") && w.contains("LimitNOFILE"),
            "{w}"
        );
        fs::remove_file(root.join("meminfo")).unwrap();
        let w = host_capacity_warning(root, 1, USER, KERNEL).unwrap();
        assert!(w.contains("meminfo"), "{w}");
    }

    #[test]
    fn malformed_files_name_the_file() {
        let p = Profile::Agents1m;
        let dir = good_tree(p);
        let root = dir.path();
        write(&root.join("sys/net/core/somaxconn"), "lots");
        let err = check(&input(root, p)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sys/net/core/somaxconn") && msg.contains("net.core.somaxconn"),
            "{msg}"
        );

        let dir = good_tree(p);
        let root = dir.path();
        write(&root.join("meminfo"), "MemTotal: many kB");
        let msg = check(&input(root, p)).unwrap_err().to_string();
        assert!(msg.contains("meminfo"), "{msg}");

        let dir = good_tree(p);
        let root = dir.path();
        write(&root.join("cpuinfo"), "nothing here");
        let msg = check(&input(root, p)).unwrap_err().to_string();
        assert!(msg.contains("cpuinfo"), "{msg}");

        let dir = good_tree(p);
        let root = dir.path();
        fs::remove_file(root.join("self/limits")).unwrap();
        let msg = check(&input(root, p)).unwrap_err().to_string();
        assert!(msg.contains("self/limits"), "{msg}");

        let zero = CheckInput {
            per_conn_user_bytes: 0,
            ..input(root, p)
        };
        assert!(matches!(check(&zero), Err(TuningError::Invalid(_))));
    }

    #[test]
    fn field_count_mismatch_differs() {
        let p = Profile::Agents1m;
        let dir = good_tree(p);
        let root = dir.path();
        write(&root.join("sys/net/ipv4/tcp_mem"), "1000000 2000000");
        // check() still reads tcp_mem for capacity: a two-field tcp_mem is malformed.
        let msg = check(&input(root, p)).unwrap_err().to_string();
        assert!(msg.contains("tcp_mem"), "{msg}");
        write(
            &root.join("sys/net/ipv4/tcp_mem"),
            "1000000 1500000 2000000",
        );
        write(&root.join("sys/net/ipv4/tcp_rmem"), "4096 16384");
        let r = check(&input(root, p)).unwrap();
        assert_eq!(finding(&r, "net.ipv4.tcp_rmem").status, Status::Differs);
    }
}
