//! The result of a tuning check and its human output.

use std::fmt;
use std::path::PathBuf;

use super::checks::{Capacity, LimitFinding, SysctlFinding};
use super::profiles::Profile;
use super::{NOFILE_RESERVE, PAGE_SIZE};

/// The result of [`super::check`]; `Display` is the human output.
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
/// 1234567 -> "1,234,567".
pub(super) fn group(n: u64) -> String {
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
        self.fmt_sysctls(f)?;
        writeln!(f)?;
        self.fmt_limits(f)?;
        writeln!(f)?;
        self.fmt_capacity(f)?;
        writeln!(f)?;
        match self.problems() {
            0 => write!(f, "all OK"),
            1 => write!(f, "1 problem"),
            n => write!(f, "{n} problems"),
        }
    }
}

impl Report {
    fn fmt_sysctls(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
    }

    fn fmt_limits(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
    }

    fn fmt_capacity(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
    }
}
