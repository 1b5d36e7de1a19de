//! Reading the live host under a proc root, comparing it with a profile,
//! the process limits and the connection capacity estimate.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::profiles::{rules_for, Profile, Rule, SysctlEntry};
use super::report::{group, Report};
use super::{
    TuningError, DEFAULT_PER_CONN_KERNEL_BYTES, DEFAULT_PER_CONN_USER_BYTES, DEFAULT_PROC_ROOT,
    MEMLOCK_PER_SHARD_BYTES, MIN_RAM_RESERVE_BYTES, NOFILE_RESERVE, PAGE_SIZE,
};

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

    pub(super) fn label(self) -> &'static str {
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

/// The comparison rules of one key's fields and their names.
struct FieldRules {
    rules: &'static [Rule],
    names: &'static [&'static str],
}

impl FieldRules {
    fn of(key: &str) -> Self {
        let (rules, names) = rules_for(key);
        Self { rules, names }
    }

    /// The rule of field `i` (a single rule applies to every field).
    fn at(&self, i: usize) -> Rule {
        if self.rules.len() == 1 {
            self.rules[0]
        } else {
            self.rules.get(i).copied().unwrap_or(Rule::Exact)
        }
    }

    fn name(&self, i: usize) -> String {
        self.names
            .get(i)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("field {}", i + 1))
    }

    /// The profile value with its comparison, e.g. `>=1000000` or `<=16384`.
    fn wanted_text(&self, wanted_fields: &[&str]) -> String {
        wanted_fields
            .iter()
            .enumerate()
            .map(|(i, v)| match self.at(i) {
                Rule::AtLeast => format!(">={v}"),
                Rule::AtMost => format!("<={v}"),
                Rule::Exact | Rule::Info => (*v).to_string(),
                Rule::Any => format!("({v})"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn compare_entry(
    entry: &SysctlEntry,
    live: Option<String>,
    path: &Path,
) -> Result<SysctlFinding, TuningError> {
    let rules = FieldRules::of(&entry.key);
    let wanted_fields: Vec<&str> = entry.value.split(' ').collect();
    let mut finding = SysctlFinding {
        key: entry.key.clone(),
        wanted: rules.wanted_text(&wanted_fields),
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
    if rules.rules.iter().all(|r| *r == Rule::Info) {
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
    let (status, detail) = judge_fields(entry, &rules, &wanted_fields, &live_fields, path)?;
    finding.status = status;
    finding.detail = detail;
    Ok(finding)
}

/// Compare the live fields with the wanted ones (same count): the status
/// and which fields are off.
fn judge_fields(
    entry: &SysctlEntry,
    rules: &FieldRules,
    wanted_fields: &[&str],
    live_fields: &[&str],
    path: &Path,
) -> Result<(Status, String), TuningError> {
    let mut low = Vec::new();
    let mut high = Vec::new();
    let mut differs = Vec::new();
    for (i, (w, l)) in wanted_fields.iter().zip(live_fields).enumerate() {
        let rule = rules.at(i);
        if matches!(rule, Rule::Any | Rule::Info) {
            continue;
        }
        let Ok(w_num) = w.parse::<i128>() else {
            // Non-numeric profile value: compare as text.
            if w != l {
                differs.push(rules.name(i));
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
            low.push(rules.name(i));
        } else if bad_high {
            high.push(rules.name(i));
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
    let status = if !differs.is_empty() || (!low.is_empty() && !high.is_empty()) {
        Status::Differs
    } else if !low.is_empty() {
        Status::Low
    } else if !high.is_empty() {
        Status::High
    } else {
        Status::Ok
    };
    Ok((status, details.join("; ")))
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
