//! Reading a shard's persisted presence back after a stop or a crash, and
//! the pure restart rules that turn it into the initial presence table.
//!
//! # What is trusted at open
//!
//! - A **torn tail** (the last frames of the log are incomplete or fail
//!   their checksum and no valid frame follows them) is the normal result of
//!   a crash during a flush: the frames before it are kept, the file is
//!   truncated to the last good frame and the dropped bytes are reported as
//!   [`LoadReport::truncated_tail_bytes`].
//! - **Corruption** (a bad frame followed by a valid one, a frame with a good
//!   checksum but undecodable content, a bad log header, a bad snapshot, the
//!   generation mismatches described in [`crate::store`]) makes the shard's
//!   whole persisted state untrusted: [`Loaded::records`] is empty,
//!   [`LoadReport::corrupt`] says why and where, the files are renamed to
//!   `*.corrupt`, and a fresh empty log is started. The caller must treat
//!   presence as **unknown** (start with an empty table and publish no
//!   offline events for anyone), and log and report it. Reading never panics
//!   on bad input.
//!
//! Reading here only reads: [`read_shard`] says which repair the files need
//! ([`Repair`]) and [`crate::store::shard_store::ShardStore::open`] carries
//! it out.
//!
//! # After a restart
//!
//! [`recover_with_held`] presumes the agents that were online (or whose
//! offline the guard held) online until the restart grace ends;
//! [`RestartWindow`] then tracks which of them came back.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::presence::table::{OfflineReason, RecoveredRecord, State, Transition};
use crate::store::fs::{self, FsError};
use crate::store::record::{
    corrupt, decode_entry, decode_seq, decode_snapshot, frame_at, parse_log_header, Corruption,
    Entry, FrameAt, PersistedRecord, Snapshot, LOG_HEADER_LEN,
};

/// What [`crate::store::shard_store::ShardStore::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// A snapshot file was present.
    pub snapshot_present: bool,
    /// The snapshot was present and valid (false when absent).
    pub snapshot_ok: bool,
    pub snapshot_records: usize,
    /// Record frames replayed from the log.
    pub log_records: usize,
    /// Bytes dropped from the end of the log (a torn final write).
    pub truncated_tail_bytes: u64,
    /// The log predated the snapshot (crash mid-compaction) and was dropped.
    pub stale_log_discarded: bool,
    /// The last thing the log recorded was a clean shutdown.
    pub clean_shutdown: bool,
    /// Set when the persisted presence is not trusted: presence is unknown.
    pub corrupt: Option<String>,
    /// Set when `events.seq` could not be trusted (event shard only).
    pub seq_problem: Option<String>,
}

impl LoadReport {
    /// The persisted presence can be used (it may still be empty).
    pub fn trusted(&self) -> bool {
        self.corrupt.is_none()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.corrupt {
            Some(why) => write!(f, "state corrupt, presence unknown: {why}")?,
            None if !self.snapshot_present && self.log_records == 0 && !self.clean_shutdown => {
                write!(f, "no persisted presence")?
            }
            None => write!(
                f,
                "snapshot {} ({} records), log {} records{}{}{}",
                if !self.snapshot_present {
                    "absent"
                } else if self.snapshot_ok {
                    "ok"
                } else {
                    "bad"
                },
                self.snapshot_records,
                self.log_records,
                if self.truncated_tail_bytes > 0 {
                    format!(
                        ", truncated tail: {} bytes dropped",
                        self.truncated_tail_bytes
                    )
                } else {
                    String::new()
                },
                if self.stale_log_discarded {
                    ", stale log discarded"
                } else {
                    ""
                },
                if self.clean_shutdown {
                    ", clean shutdown"
                } else {
                    ", unplanned stop"
                },
            )?,
        }
        if let Some(p) = &self.seq_problem {
            write!(f, "; event seq: {p}")?;
        }
        Ok(())
    }
}

/// What [`crate::store::shard_store::ShardStore::open`] loaded.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The shard's records (empty when the report says corrupt), by agent id.
    pub records: Vec<PersistedRecord>,
    pub report: LoadReport,
    /// Highest seq that may have been published before (0 on non-event shards
    /// and on first start). Numbering resumes at `event_seq_high_water + 1`.
    pub event_seq_high_water: u64,
}

// ---------------------------------------------------------------------------
// Reading a shard's files
// ---------------------------------------------------------------------------

pub(crate) struct LogScan {
    pub entries: Vec<Entry>,
    /// End of the last good frame.
    pub valid_end: usize,
    pub torn_bytes: usize,
}

/// Is there a frame with a valid checksum and content anywhere after `from`?
fn valid_frame_after(buf: &[u8], from: usize) -> bool {
    (from..buf.len().saturating_sub(8)).any(|off| match frame_at(buf, off) {
        FrameAt::Ok { payload, .. } => decode_entry(payload).is_ok(),
        _ => false,
    })
}

/// Scan the frames of a log body starting at `start`.
pub(crate) fn scan_log(path: &Path, buf: &[u8], start: usize) -> Result<LogScan, Corruption> {
    let mut entries = Vec::new();
    let mut off = start;
    while off < buf.len() {
        match frame_at(buf, off) {
            FrameAt::Ok { payload, next } => {
                let e = decode_entry(payload).map_err(|w| corrupt(path, off, w))?;
                entries.push(e);
                off = next;
            }
            FrameAt::Incomplete | FrameAt::Bad(_) if !valid_frame_after(buf, off + 1) => {
                return Ok(LogScan {
                    entries,
                    valid_end: off,
                    torn_bytes: buf.len() - off,
                });
            }
            FrameAt::Incomplete => {
                return Err(corrupt(
                    path,
                    off,
                    "incomplete frame followed by valid ones",
                ))
            }
            FrameAt::Bad(w) => return Err(corrupt(path, off, format!("{w}, valid frames follow"))),
        }
    }
    Ok(LogScan {
        entries,
        valid_end: off,
        torn_bytes: 0,
    })
}

/// Outcome of reading a shard's files, before any repair.
enum Found {
    Fresh,
    Good {
        snapshot: Option<Snapshot>,
        log_generation: u64,
        scan: LogScan,
    },
    StaleLog {
        snapshot: Snapshot,
    },
}

/// What the files of a shard need before the log can be appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repair {
    /// Nothing: append after the last good frame.
    None,
    /// Cut the log back to its last good frame (a torn tail).
    Truncate { len: u64 },
    /// Start an empty log of this generation (no log yet, or a stale one).
    NewLog { generation: u64 },
    /// Untrusted: move snapshot and log aside, start an empty log of
    /// generation 0.
    MoveAside,
}

/// A shard's files as read back: what to load and what to repair.
pub(crate) struct ShardRead {
    /// The records, later entries winning, sorted by agent id.
    pub records: Vec<PersistedRecord>,
    pub report: LoadReport,
    pub generation: u64,
    /// Bytes of the log that are good (after the repair).
    pub log_len: u64,
    /// Entries in the log since the last compaction.
    pub log_entries: u64,
    pub repair: Repair,
}

/// Read shard `shard`'s snapshot and log. Only I/O failures are errors;
/// corruption is reported in [`ShardRead::report`] with [`Repair::MoveAside`].
pub(crate) fn read_shard(
    snap_path: &Path,
    log_path: &Path,
    shard: usize,
) -> Result<ShardRead, FsError> {
    let mut report = LoadReport::default();
    let found = find(snap_path, log_path, shard, &mut report)?;
    let mut records: HashMap<Box<str>, PersistedRecord> = HashMap::new();
    let mut put = |r: PersistedRecord| {
        records.insert(r.agent.clone(), r);
    };
    let mut read = ShardRead {
        records: Vec::new(),
        report: LoadReport::default(),
        generation: 0,
        log_len: LOG_HEADER_LEN as u64,
        log_entries: 0,
        repair: Repair::None,
    };
    match found {
        Err(c) => {
            report.corrupt = Some(c.to_string());
            report.snapshot_ok = false;
            report.snapshot_records = 0;
            report.log_records = 0;
            report.truncated_tail_bytes = 0;
            report.clean_shutdown = false;
            read.repair = Repair::MoveAside;
        }
        Ok(Found::Fresh) => read.repair = Repair::NewLog { generation: 0 },
        Ok(Found::StaleLog { snapshot }) => {
            report.stale_log_discarded = true;
            read.generation = snapshot.generation;
            snapshot.records.into_iter().for_each(&mut put);
            read.repair = Repair::NewLog {
                generation: read.generation,
            };
        }
        Ok(Found::Good {
            snapshot,
            log_generation,
            scan,
        }) => {
            read.generation = log_generation;
            if let Some(s) = snapshot {
                s.records.into_iter().for_each(&mut put);
            }
            read.log_entries = scan.entries.len() as u64;
            for e in scan.entries {
                match e {
                    Entry::Record(r) => {
                        report.log_records += 1;
                        report.clean_shutdown = false;
                        put(r);
                    }
                    Entry::CleanShutdown => report.clean_shutdown = true,
                }
            }
            read.log_len = scan.valid_end as u64;
            if scan.torn_bytes > 0 {
                report.truncated_tail_bytes = scan.torn_bytes as u64;
                report.clean_shutdown = false;
                read.repair = Repair::Truncate { len: read.log_len };
            }
        }
    }
    let mut records: Vec<PersistedRecord> = records.into_values().collect();
    records.sort_unstable_by(|a, b| a.agent.cmp(&b.agent));
    read.records = records;
    read.report = report;
    Ok(read)
}

/// Decode both files and check their generations against each other.
fn find(
    snap_path: &Path,
    log_path: &Path,
    shard: usize,
    report: &mut LoadReport,
) -> Result<Result<Found, Corruption>, FsError> {
    let snap = fs::read_optional(snap_path)?;
    let log = fs::read_optional(log_path)?;
    report.snapshot_present = snap.is_some();
    let snapshot = match snap {
        None => None,
        Some(b) => match decode_snapshot(snap_path, &b, shard) {
            Ok(s) => {
                report.snapshot_ok = true;
                report.snapshot_records = s.records.len();
                Some(s)
            }
            Err(c) => return Ok(Err(c)),
        },
    };
    let Some(log) = log else {
        return Ok(match snapshot {
            None => Ok(Found::Fresh),
            Some(_) => Err(corrupt(log_path, 0, "log missing next to a snapshot")),
        });
    };
    let log_generation = match parse_log_header(log_path, &log, shard) {
        Ok(g) => g,
        Err(c) => return Ok(Err(c)),
    };
    let snap_generation = snapshot.as_ref().map_or(0, |s| s.generation);
    if snapshot.is_none() && log_generation > 0 {
        return Ok(Err(corrupt(
            log_path,
            16,
            format!("log generation {log_generation} but no snapshot"),
        )));
    }
    if log_generation > snap_generation {
        return Ok(Err(corrupt(
            log_path,
            16,
            format!("log generation {log_generation} newer than snapshot {snap_generation}"),
        )));
    }
    if log_generation < snap_generation {
        if let Some(snapshot) = snapshot {
            return Ok(Ok(Found::StaleLog { snapshot }));
        }
    }
    Ok(
        scan_log(log_path, &log, LOG_HEADER_LEN).map(|scan| Found::Good {
            snapshot,
            log_generation,
            scan,
        }),
    )
}

// ---------------------------------------------------------------------------
// Event seq and guard files
// ---------------------------------------------------------------------------

/// The seq high-water mark to use when `events.seq` cannot be trusted: the
/// current Unix time in microseconds.
pub fn seq_fallback_floor(now_unix_ms: u64) -> u64 {
    now_unix_ms.saturating_mul(1000)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The reserved seq high-water mark in `path` (0 when absent), and why it
/// was not trusted if it was not (the mark then falls back to
/// [`seq_fallback_floor`]).
pub(crate) fn load_seq(path: &Path) -> Result<(u64, Option<String>), FsError> {
    let Some(b) = fs::read_optional(path)? else {
        return Ok((0, None));
    };
    Ok(match decode_seq(path, &b) {
        Ok(hw) => (hw, None),
        Err(c) => {
            let hw = seq_fallback_floor(unix_ms());
            (hw, Some(format!("{c}; numbering resumes above {hw}")))
        }
    })
}

// ---------------------------------------------------------------------------
// Restart recovery (pure)
// ---------------------------------------------------------------------------

/// The initial table content after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub records: Vec<RecoveredRecord>,
    pub presumed_online: usize,
    pub offline: usize,
    /// When the restart grace window ends (wall-clock ms).
    pub deadline_ms: u64,
}

/// Turn loaded records into the initial table: Online and Grace records
/// become presumed online until `now_ms + restart_grace`; Offline records
/// stay offline, unless the agent is in `held` (the guard held its offline,
/// so the platform still sees it online: see
/// [`crate::store::shard_store::load_guard_held`]). Only call it with a
/// trusted load ([`LoadReport::trusted`]); with an untrusted one, start
/// empty (presence unknown).
pub fn recover_with_held(
    records: Vec<PersistedRecord>,
    held: &HashSet<Box<str>>,
    now_ms: u64,
    restart_grace: Duration,
) -> Recovery {
    let deadline_ms = now_ms.saturating_add(restart_grace.as_millis() as u64);
    let mut out = Recovery {
        records: Vec::with_capacity(records.len()),
        deadline_ms,
        ..Recovery::default()
    };
    for r in records {
        let presumed_online = match r.state {
            State::Online | State::Grace => true,
            State::Offline => held.contains(&r.agent),
        };
        if presumed_online {
            out.presumed_online += 1;
        } else {
            out.offline += 1;
        }
        out.records.push(RecoveredRecord {
            agent: r.agent,
            presumed_online,
            since_ms: r.since_ms,
            last_seen_ms: r.last_seen_ms,
            session: r.session,
            offline_reason: if presumed_online {
                None
            } else {
                r.offline_reason
            },
        });
    }
    out
}

/// The set of presumed-online agents of one owner shard and their common
/// deadline, for a presence table that keeps its own three states: load the
/// presumed agents as `Online` with no connection (a HELLO then takes the
/// "new session" path and publishes nothing), call [`Self::on_hello`] from
/// `hello`, and [`Self::expire`] from the tick; for each agent it returns,
/// set the record Offline (reason `not_reconnected`) and publish the
/// transition.
#[derive(Debug, Clone, Default)]
pub struct RestartWindow {
    deadline_ms: u64,
    presumed: HashSet<Box<str>>,
}

impl RestartWindow {
    pub fn new(recovery: &Recovery) -> Self {
        Self {
            deadline_ms: recovery.deadline_ms,
            presumed: recovery
                .records
                .iter()
                .filter(|r| r.presumed_online)
                .map(|r| r.agent.clone())
                .collect(),
        }
    }

    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Presumed agents that have not reconnected yet.
    pub fn remaining(&self) -> usize {
        self.presumed.len()
    }

    /// A HELLO for `agent`: true if it was presumed online, so the HELLO
    /// must publish no event.
    pub fn on_hello(&mut self, agent: &str) -> bool {
        self.presumed.remove(agent)
    }

    /// Once the deadline has passed: an offline `not_reconnected` transition
    /// for every agent still presumed (each returned once).
    pub fn expire(&mut self, now_ms: u64) -> Vec<Transition> {
        if now_ms < self.deadline_ms || self.presumed.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<Transition> = self
            .presumed
            .drain()
            .map(|agent| Transition {
                agent,
                online: false,
                reason: OfflineReason::NotReconnected.as_str(),
                ts_ms: now_ms,
            })
            .collect();
        out.sort_unstable_by(|a, b| a.agent.cmp(&b.agent));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(agent: &str, state: State, t: u64) -> PersistedRecord {
        PersistedRecord {
            agent: agent.into(),
            state,
            since_ms: t,
            last_seen_ms: t + 1,
            session: t * 10,
            offline_reason: (state == State::Offline).then_some(OfflineReason::Bye),
        }
    }

    #[test]
    fn recovery_presumes_online_then_silent_hello_or_not_reconnected() {
        let records = vec![
            rec("on", State::Online, 1),
            rec("gr", State::Grace, 2),
            rec("off", State::Offline, 3),
        ];
        let r = recover_with_held(records, &HashSet::new(), 1_000, Duration::from_secs(60));
        assert_eq!(
            (r.presumed_online, r.offline, r.deadline_ms),
            (2, 1, 61_000)
        );
        assert!(r.records[0].presumed_online && r.records[1].presumed_online);
        assert!(!r.records[2].presumed_online);
        assert_eq!(r.records[2].offline_reason, Some(OfflineReason::Bye));

        let mut w = RestartWindow::new(&r);
        assert_eq!(w.remaining(), 2);
        assert!(w.on_hello("on"), "presumed: the HELLO is silent");
        assert!(!w.on_hello("off"), "offline: an ordinary online event");
        assert!(w.expire(60_000).is_empty(), "nothing before the deadline");
        let ev = w.expire(61_000);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (&*ev[0].agent, ev[0].online, ev[0].reason, ev[0].ts_ms),
            ("gr", false, "not_reconnected", 61_000)
        );
        assert!(w.expire(70_000).is_empty(), "only once");
    }

    #[test]
    fn held_agents_are_presumed_online_after_restart() {
        let records = vec![rec("h", State::Offline, 1)];
        let held: HashSet<Box<str>> = ["h".into()].into_iter().collect();
        let r = recover_with_held(records, &held, 0, Duration::from_secs(1));
        assert!(r.records[0].presumed_online);
        assert_eq!(r.records[0].offline_reason, None);
    }

    #[test]
    fn garbage_never_panics() {
        let path = Path::new("x");
        let mut seed = 0x9e3779b97f4a7c15u64;
        for n in 0..300 {
            let mut b = Vec::new();
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.push(seed as u8);
            }
            let _ = decode_snapshot(path, &b, 0);
            let _ = scan_log(path, &b, 0);
            let _ = parse_log_header(path, &b, 0);
            let _ = decode_seq(path, &b);
            let _ = crate::store::record::decode_held(path, &b);
            let _ = decode_entry(&b);
        }
    }
}
