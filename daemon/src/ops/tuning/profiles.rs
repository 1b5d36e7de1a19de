//! The sysctl profiles shipped in `tuning/presenced-*.conf` (embedded in the
//! binary), their sysctl.d(5) parsing, and how each key is compared.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use super::TuningError;

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
            Profile::Agents100k => include_str!("../../../../tuning/presenced-100k.conf"),
            Profile::Agents1m => include_str!("../../../../tuning/presenced-1m.conf"),
            Profile::Agents10m => include_str!("../../../../tuning/presenced-10m.conf"),
        }
    }

    /// The profile's settings, in file order.
    pub fn entries(self) -> Result<Vec<SysctlEntry>, TuningError> {
        parse_sysctl_conf(self.source()).map_err(|e| TuningError::Profile {
            profile: self.name(),
            line: e.line,
            message: e.message,
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

/// A line of a sysctl.d file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct ConfLineError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

/// Parses sysctl.d(5) text: `key = value`, comments start with `#` or `;`,
/// a leading `-` marks an assignment whose failure is ignored. Keys may use
/// `/` as separator (then `.` inside a component is literal). Glob patterns and
/// `-key` exclusions (no `=`) are rejected: the profiles do not use them.
/// Errors carry the 1-based line number.
pub fn parse_sysctl_conf(text: &str) -> Result<Vec<SysctlEntry>, ConfLineError> {
    let err = |line: usize, message: String| ConfLineError { line, message };
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
            return Err(err(line_no, format!("expected `key = value`, got `{raw}`")));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(err(line_no, "empty key".to_string()));
        }
        if key.contains(['*', '?', '[']) {
            return Err(err(
                line_no,
                format!("glob patterns are not supported: `{key}`"),
            ));
        }
        let key = dotted_key(key);
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        if value.is_empty() {
            return Err(err(line_no, format!("`{key}` has no value")));
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
pub(super) fn dotted_key(key: &str) -> String {
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
pub(super) fn explicit_rules(key: &str) -> Option<(&'static [Rule], &'static [&'static str])> {
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

pub(super) fn rules_for(key: &str) -> (&'static [Rule], &'static [&'static str]) {
    explicit_rules(key).unwrap_or((&[Rule::Exact], &[]))
}
