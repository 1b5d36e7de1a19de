//! Crash and restart persistence of the presence table, plus the pure
//! restart-recovery rules that turn what was persisted into the initial
//! table content.
//!
//! # Layout of the state directory
//!
//! Every owner shard persists only the records it owns, so no file is shared
//! between shards and no locking is needed. `N` is the shard index.
//!
//! | file | written by | what |
//! | --- | --- | --- |
//! | `shard-N.snap` | shard N, at compaction | every record the shard owned at compaction time |
//! | `shard-N.log` | shard N, every flush | record changes since that snapshot |
//! | `events.seq` | the event shard ([`EVENT_SHARD`]) | the event seq reservation (high-water mark) |
//! | `guard.held` | the event shard | agents whose offline the mass-offline guard holds |
//! | `*.tmp` | anyone, transiently | removed at open; a leftover is a crash mid-write |
//! | `*.corrupt` | [`ShardStore::open`] | untrusted files moved aside for inspection |
//!
//! The directory is created (and tightened to) mode 0700, every file is
//! created with mode 0600.
//!
//! # Formats (all integers little-endian)
//!
//! **Blob** (`shard-N.snap`, `events.seq`, `guard.held`): written whole to a
//! `.tmp` file, fsync'd, renamed over the old file, then the directory is
//! fsync'd, so a reader sees the old or the new content, never a mix.
//!
//! ```text
//! magic [8] | version u32 | payload_len u64 | payload | crc32 u32 (of everything before it)
//! ```
//!
//! A wrong magic, version, length or checksum makes the whole blob untrusted.
//!
//! - snapshot payload: `shard u32 | generation u64 | count u64 | frame*count`
//! - `events.seq` payload: `high_water u64`
//! - `guard.held` payload: `count u64 | (id_len u16 | id)*count`
//!
//! **Log** (`shard-N.log`): a 28-byte header then frames, appended.
//!
//! ```text
//! header: magic "PRSDLOG1" | version u32 | shard u32 | generation u64 | crc32 u32 (of the 24 bytes before)
//! frame:  len u32 | crc32 u32 (of len bytes + payload) | payload[len]
//! ```
//!
//! **Frame payloads** (`len` is 1..=[`MAX_FRAME`]):
//!
//! ```text
//! record:         kind=1 u8 | state u8 | reason u8 (0 = none) | id_len u16 | id | since_ms u64 | last_seen_ms u64 | session u64
//! clean shutdown: kind=2 u8 | ts_ms u64
//! ```
//!
//! state: 1 online, 2 grace, 3 offline. reason: 1 bye, 2 timeout,
//! 3 disconnect, 4 not_reconnected.
//!
//! **Generations.** Each compaction writes snapshot generation `g + 1`, then
//! replaces the log with an empty log of generation `g + 1`. At open, a log
//! older than the snapshot is a crash between those two steps: the snapshot
//! already holds everything, so the stale log is discarded (reported as
//! `stale_log_discarded`, not as corruption). A log newer than the snapshot,
//! a missing log next to a snapshot, or a missing snapshot next to a log of
//! generation > 0 cannot happen without outside interference and is corrupt.
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
//!   generation mismatches above) makes the shard's whole persisted state
//!   untrusted: [`Loaded::records`] is empty, [`LoadReport::corrupt`] says
//!   why and where, the files are renamed to `*.corrupt`, and a fresh empty
//!   log is started. The caller must treat presence as **unknown** (start
//!   with an empty table and publish no offline events for anyone), and log
//!   and report it. Reading never panics on bad input.
//!
//! # Crash window
//!
//! [`ShardStore::append`] (or [`LogBuffer::push`]) only encodes into memory.
//! The shard calls [`ShardStore::flush_and_sync`] on a schedule (every
//! `flush_interval`, e.g. 1 s); it writes the buffered frames and
//! fdatasyncs the log. A crash (kill -9, power loss) therefore loses at most
//! the transitions of the last `flush_interval` plus the duration of one
//! flush. Their effect after restart:
//!
//! - an agent that went Online→Offline in the window is still persisted as
//!   Online, so it is presumed online and, if it does not reconnect, goes
//!   offline again with reason `not_reconnected` (a duplicate offline, never
//!   a lost one);
//! - an agent that came Online in the window is persisted as Offline or
//!   unknown; if it reconnects it produces an `online` event (a duplicate
//!   online at worst), if not, the platform saw it online and nobody will
//!   send an offline. This is the one lossy case; it is bounded by the flush
//!   interval, and shortening the interval is the remedy.
//!
//! A clean shutdown flushes, appends a clean-shutdown marker and flushes
//! again ([`ShardStore::append_clean_shutdown`]), so it loses nothing.
//!
//! # Event seq reservation
//!
//! The event shard never publishes a seq that is not covered by a durable
//! reservation in `events.seq`. At start it reads the reserved high-water
//! mark `hw` ([`Loaded::event_seq_high_water`]), starts numbering at
//! [`first_seq_after_restart`]`(hw)` = `hw + 1`, and, before publishing
//! anything, reserves up to `hw + SEQ_HEADROOM`. While running it asks
//! [`seq_reservation_needed`] after each publish: once fewer than half of
//! [`SEQ_HEADROOM`] seqs are left, it reserves `next_seq + SEQ_HEADROOM`
//! (one small atomic file write per 5 000 events, can run via
//! `spawn_blocking`). If the reservation is still not durable when the
//! headroom is used up, publishing must wait for it
//! ([`seq_may_publish`]). After a crash, numbering therefore restarts above
//! anything published, leaving a gap of at most `SEQ_HEADROOM` seqs; it
//! never goes backwards. If `events.seq` is corrupt, the high-water mark
//! falls back to the current Unix time in microseconds
//! ([`seq_fallback_floor`]): above any seq a daemon publishing fewer than a
//! million events per second could have reached, and reported in
//! [`LoadReport::seq_problem`].
//!
//! # Blocking I/O
//!
//! All I/O is blocking `std::fs`. A shard either calls it inline (small
//! flushes) or moves the store into glommio's `spawn_blocking`:
//! [`ShardStore`] is `Send`. Transitions that happen while the store is away
//! go into a [`LogBuffer`] kept on the shard and are handed over with
//! [`ShardStore::append_buffer`] when it is back.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thiserror::Error;

use crate::presence::table::{self as presence, Transition};

/// The shard that numbers events and owns `events.seq` and `guard.held`.
pub const EVENT_SHARD: usize = 0;
/// Seqs reserved ahead of the next one to publish.
pub const SEQ_HEADROOM: u64 = 10_000;
/// Largest frame payload accepted (agent ids are at most 128 bytes).
pub const MAX_FRAME: usize = 4096;
/// Format version of every file.
pub const FORMAT_VERSION: u32 = 1;
/// Offline reason of an agent that was online before a restart and did not
/// reconnect within the restart grace window.
pub const NOT_RECONNECTED: &str = "not_reconnected";

const SNAP_MAGIC: [u8; 8] = *b"PRSDSNP1";
const LOG_MAGIC: [u8; 8] = *b"PRSDLOG1";
const SEQ_MAGIC: [u8; 8] = *b"PRSDSEQ1";
const HELD_MAGIC: [u8; 8] = *b"PRSDHLD1";
const LOG_HEADER_LEN: usize = 28;
const BLOB_OVERHEAD: usize = 8 + 4 + 8 + 4;
const KIND_RECORD: u8 = 1;
const KIND_CLEAN_SHUTDOWN: u8 = 2;
const RECORD_FIXED: usize = 1 + 1 + 1 + 2 + 8 + 8 + 8;
const SEQ_FILE: &str = "events.seq";
const HELD_FILE: &str = "guard.held";

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// Persisted presence state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistedState {
    Online,
    Grace,
    Offline,
}

impl PersistedState {
    fn code(self) -> u8 {
        match self {
            PersistedState::Online => 1,
            PersistedState::Grace => 2,
            PersistedState::Offline => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => PersistedState::Online,
            2 => PersistedState::Grace,
            3 => PersistedState::Offline,
            _ => return None,
        })
    }
}

impl From<presence::State> for PersistedState {
    fn from(s: presence::State) -> Self {
        match s {
            presence::State::Online => PersistedState::Online,
            presence::State::Grace => PersistedState::Grace,
            presence::State::Offline => PersistedState::Offline,
        }
    }
}

/// Persisted reason of the last offline transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistedReason {
    Bye,
    Timeout,
    Disconnect,
    NotReconnected,
}

impl PersistedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PersistedReason::Bye => "bye",
            PersistedReason::Timeout => "timeout",
            PersistedReason::Disconnect => "disconnect",
            PersistedReason::NotReconnected => NOT_RECONNECTED,
        }
    }

    /// The reason for an event reason string, if it is an offline reason.
    pub fn from_str_reason(s: &str) -> Option<Self> {
        Some(match s {
            "bye" => PersistedReason::Bye,
            "timeout" => PersistedReason::Timeout,
            "disconnect" => PersistedReason::Disconnect,
            NOT_RECONNECTED => PersistedReason::NotReconnected,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            PersistedReason::Bye => 1,
            PersistedReason::Timeout => 2,
            PersistedReason::Disconnect => 3,
            PersistedReason::NotReconnected => 4,
        }
    }

    fn from_code(c: u8) -> Option<Option<Self>> {
        Some(match c {
            0 => None,
            1 => Some(PersistedReason::Bye),
            2 => Some(PersistedReason::Timeout),
            3 => Some(PersistedReason::Disconnect),
            4 => Some(PersistedReason::NotReconnected),
            _ => return None,
        })
    }
}

impl From<presence::OfflineReason> for PersistedReason {
    fn from(r: presence::OfflineReason) -> Self {
        PersistedReason::from_str_reason(r.as_str()).unwrap_or(PersistedReason::Disconnect)
    }
}

/// One agent's presence record as persisted. Times are wall-clock ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PersistedRecord {
    pub agent: Box<str>,
    pub state: PersistedState,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub session: u64,
    pub offline_reason: Option<PersistedReason>,
}

impl PersistedRecord {
    /// The persisted form of a live presence record.
    pub fn from_presence(agent: &str, rec: &presence::Record) -> Self {
        Self {
            agent: agent.into(),
            state: rec.state.into(),
            since_ms: rec.since_ms,
            last_seen_ms: rec.last_seen_ms,
            session: rec.session,
            offline_reason: rec.offline_reason.map(Into::into),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors and reports
// ---------------------------------------------------------------------------

/// An I/O failure of the store. Corruption is not an error: it is reported
/// in [`LoadReport`] and the store still opens.
#[derive(Debug, Error)]
pub enum PersistError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state directory {path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "shard {shard} is not the event shard ({}); only it reserves event seqs",
        EVENT_SHARD
    )]
    NotEventShard { shard: usize },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Why a file is not trusted: where and what.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path} at offset {offset}: {what}")]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

fn corrupt(path: &Path, offset: usize, what: impl Into<String>) -> Corruption {
    Corruption {
        path: path.to_path_buf(),
        offset: offset as u64,
        what: what.into(),
    }
}

/// What [`ShardStore::open`] found.
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

/// What [`ShardStore::open`] loaded.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The shard's records (empty when the report says corrupt), by agent id.
    pub records: Vec<PersistedRecord>,
    pub report: LoadReport,
    /// Highest seq that may have been published before (0 on non-event shards
    /// and on first start). Numbering resumes at `event_seq_high_water + 1`.
    pub event_seq_high_water: u64,
}

/// Result of one flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Result of one compaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStats {
    pub records: u64,
    pub snapshot_bytes: u64,
    pub generation: u64,
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

fn frame_crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&frame_crc(&len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encode a record frame; false if the id is too long to persist.
fn push_record_frame(out: &mut Vec<u8>, r: &PersistedRecord) -> bool {
    let id = r.agent.as_bytes();
    if RECORD_FIXED + id.len() > MAX_FRAME {
        return false;
    }
    let mut p = Vec::with_capacity(RECORD_FIXED + id.len());
    p.push(KIND_RECORD);
    p.push(r.state.code());
    p.push(r.offline_reason.map_or(0, PersistedReason::code));
    p.extend_from_slice(&(id.len() as u16).to_le_bytes());
    p.extend_from_slice(id);
    p.extend_from_slice(&r.since_ms.to_le_bytes());
    p.extend_from_slice(&r.last_seen_ms.to_le_bytes());
    p.extend_from_slice(&r.session.to_le_bytes());
    push_frame(out, &p);
    true
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Record(PersistedRecord),
    CleanShutdown,
}

fn decode_entry(p: &[u8]) -> Result<Entry, String> {
    match p.first() {
        Some(&KIND_RECORD) => {
            let state = PersistedState::from_code(p.get(1).copied().unwrap_or(0))
                .ok_or("bad state code")?;
            let reason = PersistedReason::from_code(p.get(2).copied().unwrap_or(255))
                .ok_or("bad reason code")?;
            let id_len = u16_at(p, 3).ok_or("short record")? as usize;
            if p.len() != RECORD_FIXED + id_len {
                return Err(format!("record length {} for id of {id_len}", p.len()));
            }
            let id = std::str::from_utf8(&p[5..5 + id_len]).map_err(|_| "agent id not UTF-8")?;
            if id.is_empty() {
                return Err("empty agent id".into());
            }
            let o = 5 + id_len;
            Ok(Entry::Record(PersistedRecord {
                agent: id.into(),
                state,
                offline_reason: reason,
                since_ms: u64_at(p, o).ok_or("short record")?,
                last_seen_ms: u64_at(p, o + 8).ok_or("short record")?,
                session: u64_at(p, o + 16).ok_or("short record")?,
            }))
        }
        Some(&KIND_CLEAN_SHUTDOWN) if p.len() == 9 => Ok(Entry::CleanShutdown),
        Some(k) => Err(format!("unknown entry kind {k} (len {})", p.len())),
        None => Err("empty entry".into()),
    }
}

enum FrameAt<'a> {
    Ok { payload: &'a [u8], next: usize },
    Incomplete,
    Bad(String),
}

fn frame_at(buf: &[u8], off: usize) -> FrameAt<'_> {
    let Some(len) = u32_at(buf, off) else {
        return FrameAt::Incomplete;
    };
    let Some(crc) = u32_at(buf, off + 4) else {
        return FrameAt::Incomplete;
    };
    let len = len as usize;
    if len == 0 || len > MAX_FRAME {
        return FrameAt::Bad(format!("frame length {len} out of range"));
    }
    let Some(payload) = buf.get(off + 8..off + 8 + len) else {
        return FrameAt::Incomplete;
    };
    if frame_crc(&buf[off..off + 4], payload) != crc {
        return FrameAt::Bad("frame checksum mismatch".into());
    }
    FrameAt::Ok {
        payload,
        next: off + 8 + len,
    }
}

/// Is there a frame with a valid checksum and content anywhere after `from`?
fn valid_frame_after(buf: &[u8], from: usize) -> bool {
    (from..buf.len().saturating_sub(8)).any(|off| match frame_at(buf, off) {
        FrameAt::Ok { payload, .. } => decode_entry(payload).is_ok(),
        _ => false,
    })
}

struct LogScan {
    entries: Vec<Entry>,
    /// End of the last good frame.
    valid_end: usize,
    torn_bytes: usize,
}

/// Scan the frames of a log body starting at `start`.
fn scan_log(path: &Path, buf: &[u8], start: usize) -> Result<LogScan, Corruption> {
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

fn encode_blob(magic: [u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOB_OVERHEAD + payload.len());
    b.extend_from_slice(&magic);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(payload);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// The payload of a checksummed blob.
fn decode_blob<'a>(path: &Path, magic: [u8; 8], b: &'a [u8]) -> Result<&'a [u8], Corruption> {
    if b.len() < BLOB_OVERHEAD {
        return Err(corrupt(
            path,
            0,
            format!("file too short ({} bytes)", b.len()),
        ));
    }
    if b[..8] != magic {
        return Err(corrupt(path, 0, "bad magic"));
    }
    let version = u32_at(b, 8).unwrap_or(0);
    if version != FORMAT_VERSION {
        return Err(corrupt(path, 8, format!("unsupported version {version}")));
    }
    let len = u64_at(b, 12).unwrap_or(u64::MAX);
    if len != (b.len() - BLOB_OVERHEAD) as u64 {
        return Err(corrupt(
            path,
            12,
            format!(
                "payload length {len} but file holds {}",
                b.len() - BLOB_OVERHEAD
            ),
        ));
    }
    let body_end = b.len() - 4;
    let stored = u32_at(b, body_end).unwrap_or(0);
    if crc32fast::hash(&b[..body_end]) != stored {
        return Err(corrupt(path, body_end, "file checksum mismatch"));
    }
    Ok(&b[20..body_end])
}

fn log_header(shard: usize, generation: u64) -> [u8; LOG_HEADER_LEN] {
    let mut h = [0u8; LOG_HEADER_LEN];
    h[..8].copy_from_slice(&LOG_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(shard as u32).to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&h[..24]);
    h[24..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The generation of a log header.
fn parse_log_header(path: &Path, b: &[u8], shard: usize) -> Result<u64, Corruption> {
    if b.len() < LOG_HEADER_LEN {
        return Err(corrupt(
            path,
            0,
            format!("log header too short ({} bytes)", b.len()),
        ));
    }
    if b[..8] != LOG_MAGIC {
        return Err(corrupt(path, 0, "bad log magic"));
    }
    if crc32fast::hash(&b[..24]) != u32_at(b, 24).unwrap_or(0) {
        return Err(corrupt(path, 24, "log header checksum mismatch"));
    }
    let version = u32_at(b, 8).unwrap_or(0);
    if version != FORMAT_VERSION {
        return Err(corrupt(path, 8, format!("unsupported version {version}")));
    }
    let s = u32_at(b, 12).unwrap_or(u32::MAX) as usize;
    if s != shard {
        return Err(corrupt(path, 12, format!("log belongs to shard {s}")));
    }
    Ok(u64_at(b, 16).unwrap_or(0))
}

struct Snapshot {
    generation: u64,
    records: Vec<PersistedRecord>,
}

fn encode_snapshot<I>(shard: usize, generation: u64, records: I) -> (Vec<u8>, u64)
where
    I: IntoIterator,
    I::Item: Borrow<PersistedRecord>,
{
    let mut frames = Vec::new();
    let mut count = 0u64;
    for r in records {
        if push_record_frame(&mut frames, r.borrow()) {
            count += 1;
        }
    }
    let mut payload = Vec::with_capacity(20 + frames.len());
    payload.extend_from_slice(&(shard as u32).to_le_bytes());
    payload.extend_from_slice(&generation.to_le_bytes());
    payload.extend_from_slice(&count.to_le_bytes());
    payload.extend_from_slice(&frames);
    (encode_blob(SNAP_MAGIC, &payload), count)
}

fn decode_snapshot(path: &Path, b: &[u8], shard: usize) -> Result<Snapshot, Corruption> {
    let p = decode_blob(path, SNAP_MAGIC, b)?;
    let base = 20; // offset of the payload in the file, for error offsets
    let s = u32_at(p, 0).ok_or_else(|| corrupt(path, base, "short snapshot header"))? as usize;
    if s != shard {
        return Err(corrupt(
            path,
            base,
            format!("snapshot belongs to shard {s}"),
        ));
    }
    let generation = u64_at(p, 4).ok_or_else(|| corrupt(path, base + 4, "short header"))?;
    let count = u64_at(p, 12).ok_or_else(|| corrupt(path, base + 12, "short header"))?;
    let mut records = Vec::new();
    let mut off = 20;
    while off < p.len() {
        let (payload, next) = match frame_at(p, off) {
            FrameAt::Ok { payload, next } => (payload, next),
            FrameAt::Incomplete => return Err(corrupt(path, base + off, "incomplete frame")),
            FrameAt::Bad(w) => return Err(corrupt(path, base + off, w)),
        };
        match decode_entry(payload) {
            Ok(Entry::Record(r)) => records.push(r),
            Ok(Entry::CleanShutdown) => {
                return Err(corrupt(path, base + off, "unexpected entry in snapshot"))
            }
            Err(w) => return Err(corrupt(path, base + off, w)),
        }
        off = next;
    }
    if records.len() as u64 != count {
        return Err(corrupt(
            path,
            base + 12,
            format!("header says {count} records, found {}", records.len()),
        ));
    }
    Ok(Snapshot {
        generation,
        records,
    })
}

// ---------------------------------------------------------------------------
// File helpers
// ---------------------------------------------------------------------------

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PersistError> {
    match File::open(path) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map_err(io_err("read", path))?;
            Ok(Some(b))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("open", path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Write `bytes` to `path` atomically and durably (tmp, fsync, rename, fsync dir).
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let tmp = tmp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    sync_dir(dir)
}

/// Create the state directory (0700) or tighten an existing one to 0700.
pub fn ensure_state_dir(dir: &Path) -> Result<(), PersistError> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(PersistError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(io_err("chmod 0700", dir))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create directory", dir))?;
        }
        Err(e) => return Err(io_err("stat", dir)(e)),
    }
    Ok(())
}

/// Move an untrusted file aside as `<name>.corrupt` (replacing an older one).
fn move_aside(path: &Path) -> Result<(), PersistError> {
    let mut s = path.as_os_str().to_owned();
    s.push(".corrupt");
    match fs::rename(path, PathBuf::from(s)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("move aside", path)(e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), PersistError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

// ---------------------------------------------------------------------------
// Event seq
// ---------------------------------------------------------------------------

/// The seq high-water mark to use when `events.seq` cannot be trusted: the
/// current Unix time in microseconds.
pub fn seq_fallback_floor(now_unix_ms: u64) -> u64 {
    now_unix_ms.saturating_mul(1000)
}

/// The first seq to publish after a start with high-water mark `hw`.
pub fn first_seq_after_restart(hw: u64) -> u64 {
    hw.saturating_add(1)
}

/// After publishing up to `next_seq - 1` with `reserved` durable: the new
/// reservation to request, once less than half the headroom is left.
pub fn seq_reservation_needed(next_seq: u64, reserved: u64) -> Option<u64> {
    (next_seq.saturating_add(SEQ_HEADROOM / 2) > reserved)
        .then(|| next_seq.saturating_add(SEQ_HEADROOM))
}

/// `seq` may be published: it is covered by a durable reservation.
pub fn seq_may_publish(seq: u64, reserved: u64) -> bool {
    seq <= reserved
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn load_seq(dir: &Path) -> Result<(u64, Option<String>), PersistError> {
    let path = dir.join(SEQ_FILE);
    let Some(b) = read_optional(&path)? else {
        return Ok((0, None));
    };
    let parsed = decode_blob(&path, SEQ_MAGIC, &b).and_then(|p| {
        if p.len() == 8 {
            Ok(u64_at(p, 0).unwrap_or(0))
        } else {
            Err(corrupt(
                &path,
                20,
                format!("seq payload of {} bytes", p.len()),
            ))
        }
    });
    Ok(match parsed {
        Ok(hw) => (hw, None),
        Err(c) => {
            let hw = seq_fallback_floor(unix_ms());
            (hw, Some(format!("{c}; numbering resumes above {hw}")))
        }
    })
}

// ---------------------------------------------------------------------------
// Guard held set
// ---------------------------------------------------------------------------

/// Persist the agents whose offline the mass-offline guard holds (event
/// shard, on its flush schedule, when the held set changed). An empty set
/// removes the file.
pub fn save_guard_held<'a>(
    dir: &Path,
    agents: impl IntoIterator<Item = &'a str>,
) -> Result<(), PersistError> {
    let path = dir.join(HELD_FILE);
    let mut body = Vec::new();
    let mut n = 0u64;
    for a in agents {
        let a = a.as_bytes();
        if a.is_empty() || a.len() > MAX_FRAME {
            continue;
        }
        body.extend_from_slice(&(a.len() as u16).to_le_bytes());
        body.extend_from_slice(a);
        n += 1;
    }
    if n == 0 {
        remove_if_exists(&path)?;
        return sync_dir(dir);
    }
    let mut payload = n.to_le_bytes().to_vec();
    payload.extend_from_slice(&body);
    write_atomic(dir, &path, &encode_blob(HELD_MAGIC, &payload))
}

/// The held agents saved by [`save_guard_held`]: `Ok(Err(_))` if the file
/// is corrupt (report it; treat the set as empty).
pub fn load_guard_held(dir: &Path) -> Result<Result<Vec<Box<str>>, Corruption>, PersistError> {
    let path = dir.join(HELD_FILE);
    let Some(b) = read_optional(&path)? else {
        return Ok(Ok(Vec::new()));
    };
    Ok(decode_blob(&path, HELD_MAGIC, &b).and_then(|p| {
        let n = u64_at(p, 0).ok_or_else(|| corrupt(&path, 20, "short held list"))?;
        let mut out = Vec::new();
        let mut off = 8;
        while off < p.len() {
            let len = u16_at(p, off).ok_or_else(|| corrupt(&path, 20 + off, "short entry"))?;
            let id = p
                .get(off + 2..off + 2 + len as usize)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| corrupt(&path, 20 + off, "bad agent id"))?;
            out.push(id.into());
            off += 2 + len as usize;
        }
        if out.len() as u64 != n {
            return Err(corrupt(
                &path,
                20,
                format!("{n} ids announced, {} found", out.len()),
            ));
        }
        Ok(out)
    }))
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

/// Encoded log entries not yet written. Cheap to fill on the shard thread.
#[derive(Debug, Default)]
pub struct LogBuffer {
    bytes: Vec<u8>,
    entries: u64,
}

impl LogBuffer {
    /// Buffer one record change (call on every state transition, never on
    /// heartbeats).
    pub fn push(&mut self, rec: &PersistedRecord) {
        if push_record_frame(&mut self.bytes, rec) {
            self.entries += 1;
        } else {
            tracing::warn!(agent_len = rec.agent.len(), "agent id too long to persist");
        }
    }

    /// Buffer a clean-shutdown marker.
    pub fn push_clean_shutdown(&mut self, ts_ms: u64) {
        let mut p = vec![KIND_CLEAN_SHUTDOWN];
        p.extend_from_slice(&ts_ms.to_le_bytes());
        push_frame(&mut self.bytes, &p);
        self.entries += 1;
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Take the buffered entries, leaving this buffer empty.
    pub fn take(&mut self) -> LogBuffer {
        std::mem::take(self)
    }

    fn extend(&mut self, other: LogBuffer) {
        if self.bytes.is_empty() {
            *self = other;
        } else {
            self.bytes.extend_from_slice(&other.bytes);
            self.entries += other.entries;
        }
    }
}

/// One owner shard's persisted presence: snapshot + append log.
#[derive(Debug)]
pub struct ShardStore {
    dir: PathBuf,
    shard: usize,
    snap_path: PathBuf,
    log_path: PathBuf,
    log: File,
    /// Bytes of the log known to be good (written and synced).
    log_len: u64,
    /// Entries in the log since the last compaction.
    log_entries: u64,
    generation: u64,
    pending: LogBuffer,
    seq_reserved: u64,
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

impl ShardStore {
    /// Open (or create) shard `shard`'s files in `dir`, load and check them.
    /// Corrupt files are reported in the returned [`LoadReport`], moved aside,
    /// and replaced by an empty log; only I/O failures are errors.
    pub fn open(dir: &Path, shard: usize) -> Result<(ShardStore, Loaded), PersistError> {
        ensure_state_dir(dir)?;
        let snap_path = dir.join(format!("shard-{shard}.snap"));
        let log_path = dir.join(format!("shard-{shard}.log"));
        remove_if_exists(&tmp_path(&snap_path))?;
        remove_if_exists(&tmp_path(&log_path))?;

        let mut report = LoadReport::default();
        let found = Self::read(&snap_path, &log_path, shard, &mut report)?;

        let mut records: HashMap<Box<str>, PersistedRecord> = HashMap::new();
        let mut put = |r: PersistedRecord| {
            records.insert(r.agent.clone(), r);
        };
        let generation;
        let mut log_len = LOG_HEADER_LEN as u64;
        let mut log_entries = 0;
        match found {
            Err(c) => {
                tracing::error!(shard, "{c}: persisted presence not trusted");
                report.corrupt = Some(c.to_string());
                report.snapshot_ok = false;
                report.snapshot_records = 0;
                report.log_records = 0;
                report.truncated_tail_bytes = 0;
                report.clean_shutdown = false;
                move_aside(&snap_path)?;
                move_aside(&log_path)?;
                generation = 0;
                write_atomic(dir, &log_path, &log_header(shard, 0))?;
            }
            Ok(Found::Fresh) => {
                generation = 0;
                write_atomic(dir, &log_path, &log_header(shard, 0))?;
            }
            Ok(Found::StaleLog { snapshot }) => {
                report.stale_log_discarded = true;
                generation = snapshot.generation;
                snapshot.records.into_iter().for_each(&mut put);
                write_atomic(dir, &log_path, &log_header(shard, generation))?;
            }
            Ok(Found::Good {
                snapshot,
                log_generation,
                scan,
            }) => {
                generation = log_generation;
                if let Some(s) = snapshot {
                    s.records.into_iter().for_each(&mut put);
                }
                log_entries = scan.entries.len() as u64;
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
                log_len = scan.valid_end as u64;
                if scan.torn_bytes > 0 {
                    report.truncated_tail_bytes = scan.torn_bytes as u64;
                    report.clean_shutdown = false;
                    tracing::warn!(
                        shard,
                        path = %log_path.display(),
                        "truncated tail: {} bytes dropped",
                        scan.torn_bytes
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&log_path)
                        .map_err(io_err("open", &log_path))?;
                    f.set_len(log_len).map_err(io_err("truncate", &log_path))?;
                    f.sync_all().map_err(io_err("fsync", &log_path))?;
                }
            }
        }

        let log = OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        log.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod 0600", &log_path))?;

        let mut event_seq_high_water = 0;
        if shard == EVENT_SHARD {
            let (hw, problem) = load_seq(dir)?;
            if let Some(p) = &problem {
                tracing::error!("event seq state not trusted: {p}");
            }
            event_seq_high_water = hw;
            report.seq_problem = problem;
        }

        let mut records: Vec<PersistedRecord> = records.into_values().collect();
        records.sort_unstable_by(|a, b| a.agent.cmp(&b.agent));
        let store = ShardStore {
            dir: dir.to_path_buf(),
            shard,
            snap_path,
            log_path,
            log,
            log_len,
            log_entries,
            generation,
            pending: LogBuffer::default(),
            seq_reserved: event_seq_high_water,
        };
        Ok((
            store,
            Loaded {
                records,
                report,
                event_seq_high_water,
            },
        ))
    }

    fn read(
        snap_path: &Path,
        log_path: &Path,
        shard: usize,
        report: &mut LoadReport,
    ) -> Result<Result<Found, Corruption>, PersistError> {
        let snap = read_optional(snap_path)?;
        let log = read_optional(log_path)?;
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

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Buffer one record change (memory only; see [`Self::flush_and_sync`]).
    pub fn append(&mut self, change: &PersistedRecord) {
        self.pending.push(change);
    }

    /// Buffer entries collected on the shard while the store was away.
    pub fn append_buffer(&mut self, buf: LogBuffer) {
        self.pending.extend(buf);
    }

    /// Buffer a clean-shutdown marker (then flush).
    pub fn append_clean_shutdown(&mut self, ts_ms: u64) {
        self.pending.push_clean_shutdown(ts_ms);
    }

    /// Entries buffered and not yet written.
    pub fn pending_entries(&self) -> u64 {
        self.pending.entries()
    }

    /// Entries in the log since the last compaction (compaction trigger).
    pub fn log_entries(&self) -> u64 {
        self.log_entries
    }

    /// Bytes in the log (header included).
    pub fn log_bytes(&self) -> u64 {
        self.log_len
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Write the buffered entries and fdatasync the log. On failure the log
    /// is cut back to its last good length and the entries stay buffered for
    /// the next attempt.
    pub fn flush_and_sync(&mut self) -> Result<FlushStats, PersistError> {
        if self.pending.is_empty() {
            return Ok(FlushStats::default());
        }
        let res = self
            .log
            .write_all(&self.pending.bytes)
            .and_then(|()| self.log.sync_data());
        match res {
            Ok(()) => {
                let stats = FlushStats {
                    entries: self.pending.entries,
                    bytes: self.pending.bytes.len() as u64,
                };
                self.log_len += stats.bytes;
                self.log_entries += stats.entries;
                self.pending = LogBuffer::default();
                Ok(stats)
            }
            Err(e) => {
                let _ = self.log.set_len(self.log_len);
                Err(io_err("append to", &self.log_path)(e))
            }
        }
    }

    /// Replace snapshot and log by a snapshot of `all_records`, which must
    /// reflect every change appended so far (buffered entries are dropped:
    /// the snapshot covers them). Crash-safe at every step (see module docs).
    pub fn compact<I>(&mut self, all_records: I) -> Result<CompactStats, PersistError>
    where
        I: IntoIterator,
        I::Item: Borrow<PersistedRecord>,
    {
        let generation = self.generation + 1;
        let (snap, count) = encode_snapshot(self.shard, generation, all_records);
        write_atomic(&self.dir, &self.snap_path, &snap)?;
        write_atomic(
            &self.dir,
            &self.log_path,
            &log_header(self.shard, generation),
        )?;
        self.log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .map_err(io_err("open", &self.log_path))?;
        self.generation = generation;
        self.log_len = LOG_HEADER_LEN as u64;
        self.log_entries = 0;
        self.pending = LogBuffer::default();
        Ok(CompactStats {
            records: count,
            snapshot_bytes: snap.len() as u64,
            generation,
        })
    }

    /// The durable seq reservation (event shard).
    pub fn seq_reserved(&self) -> u64 {
        self.seq_reserved
    }

    /// Durably reserve seqs up to `upto` (event shard only). Never lowers the
    /// reservation; returns whether a write happened.
    pub fn reserve_seq(&mut self, upto: u64) -> Result<bool, PersistError> {
        if self.shard != EVENT_SHARD {
            return Err(PersistError::NotEventShard { shard: self.shard });
        }
        if upto <= self.seq_reserved {
            return Ok(false);
        }
        let path = self.dir.join(SEQ_FILE);
        write_atomic(
            &self.dir,
            &path,
            &encode_blob(SEQ_MAGIC, &upto.to_le_bytes()),
        )?;
        self.seq_reserved = upto;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Restart recovery (pure)
// ---------------------------------------------------------------------------

/// State of a record right after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveredState {
    /// Online or in grace before the restart: reported online until it
    /// reconnects (silently) or `deadline_ms` passes (`not_reconnected`).
    PresumedOnline {
        deadline_ms: u64,
    },
    /// Reconnected since the restart: an ordinary online record.
    Online,
    Offline,
}

/// A record as the presence table should start with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveredRecord {
    pub agent: Box<str>,
    pub state: RecoveredState,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub session: u64,
    pub offline_reason: Option<PersistedReason>,
}

impl RecoveredRecord {
    pub fn is_presumed_online(&self) -> bool {
        matches!(self.state, RecoveredState::PresumedOnline { .. })
    }

    /// A HELLO for this agent was accepted. Presumed online → Online with
    /// **no event** (the platform still sees it online); Offline → Online
    /// with the usual `online`/`hello` event; Online → no event (the caller
    /// handles supersede as usual).
    pub fn hello(&mut self, session: u64, now_ms: u64) -> Option<Transition> {
        let was = self.state;
        self.state = RecoveredState::Online;
        self.session = session;
        self.last_seen_ms = now_ms;
        match was {
            RecoveredState::PresumedOnline { .. } | RecoveredState::Online => None,
            RecoveredState::Offline => {
                self.since_ms = now_ms;
                self.offline_reason = None;
                Some(Transition {
                    agent: self.agent.clone(),
                    online: true,
                    reason: "hello",
                    ts_ms: now_ms,
                })
            }
        }
    }

    /// The restart grace window may have ended: a still-presumed agent goes
    /// offline with reason `not_reconnected`.
    pub fn expire(&mut self, now_ms: u64) -> Option<Transition> {
        match self.state {
            RecoveredState::PresumedOnline { deadline_ms } if now_ms >= deadline_ms => {
                self.state = RecoveredState::Offline;
                self.since_ms = now_ms;
                self.offline_reason = Some(PersistedReason::NotReconnected);
                Some(Transition {
                    agent: self.agent.clone(),
                    online: false,
                    reason: NOT_RECONNECTED,
                    ts_ms: now_ms,
                })
            }
            _ => None,
        }
    }

    /// What to persist for this record. A presumed-online record stays
    /// persisted as Online, so a crash loop presumes it online again (with a
    /// fresh window: it could not reconnect while the daemon was down).
    pub fn to_persisted(&self) -> PersistedRecord {
        let state = match self.state {
            RecoveredState::PresumedOnline { .. } | RecoveredState::Online => {
                PersistedState::Online
            }
            RecoveredState::Offline => PersistedState::Offline,
        };
        PersistedRecord {
            agent: self.agent.clone(),
            state,
            since_ms: self.since_ms,
            last_seen_ms: self.last_seen_ms,
            session: self.session,
            offline_reason: self.offline_reason,
        }
    }
}

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
/// stay offline. Only call it with a trusted load ([`LoadReport::trusted`]);
/// with an untrusted one, start empty (presence unknown).
pub fn recover(records: Vec<PersistedRecord>, now_ms: u64, restart_grace: Duration) -> Recovery {
    recover_with_held(records, &HashSet::new(), now_ms, restart_grace)
}

/// Like [`recover`], and Offline records of agents in `held` (the guard held
/// their offline, so the platform still sees them online: see
/// [`load_guard_held`]) are presumed online too.
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
        let presumed = match r.state {
            PersistedState::Online | PersistedState::Grace => true,
            PersistedState::Offline => held.contains(&r.agent),
        };
        let state = if presumed {
            out.presumed_online += 1;
            RecoveredState::PresumedOnline { deadline_ms }
        } else {
            out.offline += 1;
            RecoveredState::Offline
        };
        out.records.push(RecoveredRecord {
            agent: r.agent,
            state,
            since_ms: r.since_ms,
            last_seen_ms: r.last_seen_ms,
            session: r.session,
            offline_reason: if presumed { None } else { r.offline_reason },
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
                .filter(|r| r.is_presumed_online())
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

    pub fn is_presumed(&self, agent: &str) -> bool {
        self.presumed.contains(agent)
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
                reason: NOT_RECONNECTED,
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
    use std::os::unix::fs::MetadataExt;

    fn rec(agent: &str, state: PersistedState, t: u64) -> PersistedRecord {
        PersistedRecord {
            agent: agent.into(),
            state,
            since_ms: t,
            last_seen_ms: t + 1,
            session: t * 10,
            offline_reason: (state == PersistedState::Offline).then_some(PersistedReason::Bye),
        }
    }

    fn log_path(dir: &Path, shard: usize) -> PathBuf {
        dir.join(format!("shard-{shard}.log"))
    }

    fn snap_path(dir: &Path, shard: usize) -> PathBuf {
        dir.join(format!("shard-{shard}.snap"))
    }

    /// Store with snapshot {a online, b online} and log [a offline, c grace].
    fn populated(dir: &Path) {
        let (mut s, l) = ShardStore::open(dir, 1).unwrap();
        assert!(l.records.is_empty() && l.report.trusted());
        s.compact([
            rec("a", PersistedState::Online, 1),
            rec("b", PersistedState::Online, 2),
        ])
        .unwrap();
        s.append(&rec("a", PersistedState::Offline, 3));
        s.append(&rec("c", PersistedState::Grace, 4));
        assert_eq!(s.flush_and_sync().unwrap().entries, 2);
    }

    #[test]
    fn round_trip_snapshot_plus_log_later_wins() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert_eq!(
            l.records,
            vec![
                rec("a", PersistedState::Offline, 3),
                rec("b", PersistedState::Online, 2),
                rec("c", PersistedState::Grace, 4),
            ]
        );
        assert!(l.report.snapshot_ok && l.report.trusted());
        assert_eq!((l.report.snapshot_records, l.report.log_records), (2, 2));
        assert_eq!(l.report.truncated_tail_bytes, 0);
        assert!(!l.report.clean_shutdown);
    }

    #[test]
    fn unflushed_appends_are_not_persisted_and_clean_shutdown_is_seen() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = ShardStore::open(d.path(), 0).unwrap();
            s.append(&rec("a", PersistedState::Online, 1));
            s.flush_and_sync().unwrap();
            s.append(&rec("b", PersistedState::Online, 2)); // lost: never flushed
        }
        let (mut s, l) = ShardStore::open(d.path(), 0).unwrap();
        assert_eq!(l.records.len(), 1);
        assert!(!l.report.clean_shutdown);
        let mut buf = LogBuffer::default();
        buf.push(&rec("b", PersistedState::Online, 2));
        s.append_buffer(buf);
        s.append_clean_shutdown(5);
        s.flush_and_sync().unwrap();
        let (_s, l) = ShardStore::open(d.path(), 0).unwrap();
        assert_eq!(l.records.len(), 2);
        assert!(l.report.clean_shutdown);
        assert!(l.report.to_string().contains("clean shutdown"));
    }

    #[test]
    fn torn_tail_keeps_earlier_records_and_is_truncated() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        let p = log_path(d.path(), 1);
        let len = fs::metadata(&p).unwrap().len();
        // Cut the last record frame in half.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 10).unwrap();
        drop(f);
        let (mut s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.trusted(), "{}", l.report);
        let frame = (8 + RECORD_FIXED + 1) as u64;
        assert_eq!(l.report.truncated_tail_bytes, frame - 10);
        assert!(l.report.to_string().contains("truncated tail"));
        assert_eq!(l.report.log_records, 1);
        let ids: Vec<_> = l.records.iter().map(|r| &*r.agent).collect();
        assert_eq!(ids, ["a", "b"], "c's frame was torn");
        assert_eq!(l.records[0].state, PersistedState::Offline);
        // The file was cut back, so new appends follow good data.
        s.append(&rec("d", PersistedState::Online, 9));
        s.flush_and_sync().unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert_eq!(l.report.truncated_tail_bytes, 0);
        assert_eq!(l.records.len(), 3);
    }

    #[test]
    fn zero_filled_tail_is_torn_not_corrupt() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        let p = log_path(d.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[0u8; 700]).unwrap();
        drop(f);
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.trusted());
        assert_eq!(l.report.truncated_tail_bytes, 700);
        assert_eq!(l.records.len(), 3);
    }

    #[test]
    fn flipped_byte_mid_log_is_corrupt_and_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        let p = log_path(d.path(), 1);
        let mut b = fs::read(&p).unwrap();
        b[LOG_HEADER_LEN + 8 + 6] ^= 0x40; // inside the first frame's agent id
        fs::write(&p, &b).unwrap();
        let (mut s, l) = ShardStore::open(d.path(), 1).unwrap();
        let why = l.report.corrupt.clone().expect("corrupt reported");
        assert!(
            why.contains("shard-1.log") && why.contains("offset 28"),
            "{why}"
        );
        assert!(l.records.is_empty(), "nothing trusted: presence unknown");
        assert!(l.report.to_string().contains("presence unknown"));
        assert!(d.path().join("shard-1.log.corrupt").exists());
        assert!(d.path().join("shard-1.snap.corrupt").exists());
        // The store works again from scratch.
        s.append(&rec("x", PersistedState::Online, 1));
        s.flush_and_sync().unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.trusted());
        assert_eq!(l.records.len(), 1);
    }

    #[test]
    fn corrupted_snapshot_is_reported_and_presence_unknown() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        let p = snap_path(d.path(), 1);
        let mut b = fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        fs::write(&p, &b).unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.corrupt.as_deref().unwrap().contains("checksum"));
        assert!(!l.report.snapshot_ok);
        assert!(l.records.is_empty());

        // Bad magic and truncation are caught as well.
        for bad in [b"XXXXXXXX".to_vec(), Vec::new()] {
            let d = tempfile::tempdir().unwrap();
            populated(d.path());
            fs::write(snap_path(d.path(), 1), &bad).unwrap();
            let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
            assert!(l.report.corrupt.is_some());
            assert!(l.records.is_empty());
        }
    }

    #[test]
    fn wrong_shard_and_generation_mismatch_are_corrupt() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        fs::rename(snap_path(d.path(), 1), snap_path(d.path(), 2)).unwrap();
        fs::rename(log_path(d.path(), 1), log_path(d.path(), 2)).unwrap();
        let (_s, l) = ShardStore::open(d.path(), 2).unwrap();
        assert!(l.report.corrupt.as_deref().unwrap().contains("shard 1"));

        // Snapshot removed behind our back: log generation 1 has no snapshot.
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        fs::remove_file(snap_path(d.path(), 1)).unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.corrupt.as_deref().unwrap().contains("no snapshot"));
    }

    #[test]
    fn crash_between_snapshot_and_log_replacement_discards_stale_log() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        let old_log = fs::read(log_path(d.path(), 1)).unwrap();
        {
            let (mut s, l) = ShardStore::open(d.path(), 1).unwrap();
            let mut all = l.records.clone();
            all[1].state = PersistedState::Offline; // b went offline since
            s.compact(&all).unwrap();
        }
        // Simulate the crash: the old log (generation 1) is back.
        fs::write(log_path(d.path(), 1), &old_log).unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.trusted() && l.report.stale_log_discarded);
        assert_eq!(l.records[1].state, PersistedState::Offline, "snapshot wins");
        assert_eq!(l.report.log_records, 0);
    }

    #[test]
    fn compaction_keeps_everything_and_shrinks_the_log() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = ShardStore::open(d.path(), 3).unwrap();
        for round in 0..50u64 {
            for i in 0..20 {
                let st = if round % 2 == 0 {
                    PersistedState::Online
                } else {
                    PersistedState::Offline
                };
                s.append(&rec(&format!("agent-{i}"), st, round));
            }
            s.flush_and_sync().unwrap();
        }
        assert_eq!(s.log_entries(), 1000);
        let before = fs::metadata(log_path(d.path(), 3)).unwrap().len();
        let (_, l) = ShardStore::open(d.path(), 3).unwrap();
        assert_eq!(l.records.len(), 20);
        let st = s.compact(&l.records).unwrap();
        assert_eq!(st.records, 20);
        assert_eq!(s.log_entries(), 0);
        let after = fs::metadata(log_path(d.path(), 3)).unwrap().len();
        assert_eq!(after, LOG_HEADER_LEN as u64);
        assert!(after < before);
        let (_s, l2) = ShardStore::open(d.path(), 3).unwrap();
        assert_eq!(l2.records, l.records);
        assert_eq!(l2.report.snapshot_records, 20);
        assert!(l2.records.iter().all(|r| r.since_ms == 49));
    }

    #[test]
    fn seq_high_water_never_goes_backwards() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, l) = ShardStore::open(d.path(), EVENT_SHARD).unwrap();
            assert_eq!(l.event_seq_high_water, 0);
            assert_eq!(first_seq_after_restart(0), 1);
            assert!(s.reserve_seq(SEQ_HEADROOM).unwrap());
            assert!(!s.reserve_seq(5).unwrap(), "never lowered");
        }
        let (mut s, l) = ShardStore::open(d.path(), EVENT_SHARD).unwrap();
        assert_eq!(l.event_seq_high_water, SEQ_HEADROOM);
        assert_eq!(s.seq_reserved(), SEQ_HEADROOM);
        s.reserve_seq(3).unwrap();
        drop(s);
        let (_s, l) = ShardStore::open(d.path(), EVENT_SHARD).unwrap();
        assert_eq!(l.event_seq_high_water, SEQ_HEADROOM);

        // Reservation policy: renew at half headroom, never publish beyond.
        assert_eq!(seq_reservation_needed(1, SEQ_HEADROOM), None);
        assert_eq!(
            seq_reservation_needed(5_001, SEQ_HEADROOM),
            Some(5_001 + SEQ_HEADROOM)
        );
        assert!(seq_may_publish(SEQ_HEADROOM, SEQ_HEADROOM));
        assert!(!seq_may_publish(SEQ_HEADROOM + 1, SEQ_HEADROOM));

        // Only the event shard reserves.
        let (mut other, l) = ShardStore::open(d.path(), 1).unwrap();
        assert_eq!(l.event_seq_high_water, 0);
        assert!(matches!(
            other.reserve_seq(1),
            Err(PersistError::NotEventShard { shard: 1 })
        ));
    }

    #[test]
    fn corrupt_seq_file_falls_back_above_any_plausible_seq() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = ShardStore::open(d.path(), 0).unwrap();
            s.reserve_seq(123_456).unwrap();
        }
        let p = d.path().join(SEQ_FILE);
        let mut b = fs::read(&p).unwrap();
        b[20] ^= 0xff;
        fs::write(&p, &b).unwrap();
        let (_s, l) = ShardStore::open(d.path(), 0).unwrap();
        assert!(l.report.seq_problem.is_some());
        assert!(l.report.trusted(), "presence itself is fine");
        assert!(l.event_seq_high_water > 1_600_000_000_000_000);
    }

    #[test]
    fn file_modes_are_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        populated(&dir);
        {
            let (mut s, _) = ShardStore::open(&dir, 0).unwrap();
            s.reserve_seq(10).unwrap();
        }
        save_guard_held(&dir, ["a"]).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        for f in [
            "shard-1.snap",
            "shard-1.log",
            "shard-0.log",
            SEQ_FILE,
            HELD_FILE,
        ] {
            let m = fs::metadata(dir.join(f)).unwrap().mode() & 0o777;
            assert_eq!(m, 0o600, "{f}");
        }
        // An existing directory that is too open is tightened.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ShardStore::open(&dir, 1).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn leftover_tmp_files_are_removed() {
        let d = tempfile::tempdir().unwrap();
        populated(d.path());
        fs::write(d.path().join("shard-1.snap.tmp"), b"half").unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.trusted());
        assert!(!d.path().join("shard-1.snap.tmp").exists());
    }

    #[test]
    fn guard_held_round_trip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_guard_held(d.path()).unwrap().unwrap().len(), 0);
        save_guard_held(d.path(), ["a", "bb"]).unwrap();
        let got = load_guard_held(d.path()).unwrap().unwrap();
        assert_eq!(got, vec!["a".into(), "bb".into()] as Vec<Box<str>>);
        let p = d.path().join(HELD_FILE);
        let mut b = fs::read(&p).unwrap();
        b[30] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(load_guard_held(d.path()).unwrap().is_err());
        save_guard_held(d.path(), std::iter::empty()).unwrap();
        assert!(!p.exists());
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
            let _ = decode_blob(path, SEQ_MAGIC, &b);
            let _ = decode_entry(&b);
        }
    }

    #[test]
    fn store_is_send() {
        fn is_send<T: Send>() {}
        is_send::<ShardStore>();
        is_send::<LogBuffer>();
    }

    #[test]
    fn recovery_presumes_online_then_silent_hello_or_not_reconnected() {
        let records = vec![
            rec("on", PersistedState::Online, 1),
            rec("gr", PersistedState::Grace, 2),
            rec("off", PersistedState::Offline, 3),
        ];
        let r = recover(records, 1_000, Duration::from_secs(60));
        assert_eq!(
            (r.presumed_online, r.offline, r.deadline_ms),
            (2, 1, 61_000)
        );
        let mut recs = r.records.clone();
        // "on" reconnects within the window: no event at all.
        assert_eq!(recs[0].hello(77, 5_000), None);
        assert_eq!(recs[0].state, RecoveredState::Online);
        assert_eq!(recs[0].session, 77);
        // Nothing happens before the deadline.
        assert_eq!(recs[1].expire(60_999), None);
        let t = recs[1].expire(61_000).unwrap();
        assert_eq!(
            (t.online, t.reason, t.ts_ms),
            (false, NOT_RECONNECTED, 61_000)
        );
        assert_eq!(
            recs[1].offline_reason,
            Some(PersistedReason::NotReconnected)
        );
        assert_eq!(recs[1].expire(62_000), None, "only once");
        assert_eq!(recs[0].expire(62_000), None, "reconnected: never expires");
        // An offline agent: no expiry; its hello is an ordinary online event.
        assert_eq!(recs[2].expire(99_000), None);
        let t = recs[2].hello(5, 99_001).unwrap();
        assert_eq!((t.online, t.reason), (true, "hello"));
        // Persisted forms.
        assert_eq!(r.records[0].to_persisted().state, PersistedState::Online);
        assert_eq!(recs[1].to_persisted().state, PersistedState::Offline);

        // The set-based window gives the same outcome.
        let mut w = RestartWindow::new(&r);
        assert_eq!(w.remaining(), 2);
        assert!(w.on_hello("on"));
        assert!(!w.on_hello("off"));
        assert!(w.expire(60_000).is_empty());
        let ev = w.expire(61_000);
        assert_eq!(ev.len(), 1);
        assert_eq!((&*ev[0].agent, ev[0].reason), ("gr", NOT_RECONNECTED));
        assert!(w.expire(70_000).is_empty());
    }

    #[test]
    fn recovery_after_kill_with_hundreds_of_agents() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = ShardStore::open(d.path(), 0).unwrap();
            for i in 0..300 {
                s.append(&rec(&format!("agent-{i:03}"), PersistedState::Online, i));
            }
            s.flush_and_sync().unwrap();
            // killed here: no clean-shutdown marker
        }
        let (_s, l) = ShardStore::open(d.path(), 0).unwrap();
        assert!(!l.report.clean_shutdown);
        let r = recover(l.records, 10_000, Duration::from_secs(30));
        let mut w = RestartWindow::new(&r);
        for i in 0..300 {
            if i != 123 {
                assert!(w.on_hello(&format!("agent-{i:03}")), "silent reconnect");
            }
        }
        let ev = w.expire(40_000);
        assert_eq!(ev.len(), 1);
        assert_eq!(&*ev[0].agent, "agent-123");
        assert_eq!(ev[0].reason, NOT_RECONNECTED);
    }

    #[test]
    fn held_agents_are_presumed_online_after_restart() {
        let records = vec![rec("h", PersistedState::Offline, 1)];
        let held: HashSet<Box<str>> = ["h".into()].into_iter().collect();
        let r = recover_with_held(records, &held, 0, Duration::from_secs(1));
        assert!(r.records[0].is_presumed_online());
        assert_eq!(r.records[0].offline_reason, None);
    }

    #[test]
    fn failed_flush_keeps_entries_for_retry() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = ShardStore::open(d.path(), 1).unwrap();
        s.append(&rec("a", PersistedState::Online, 1));
        // Make the handle unusable for writing: swap it for a read-only one.
        s.log = File::open(log_path(d.path(), 1)).unwrap();
        assert!(matches!(
            s.flush_and_sync(),
            Err(PersistError::Io {
                op: "append to",
                ..
            })
        ));
        assert_eq!(s.pending_entries(), 1);
        s.log = OpenOptions::new()
            .append(true)
            .open(log_path(d.path(), 1))
            .unwrap();
        s.flush_and_sync().unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert_eq!(l.records.len(), 1);
    }
}
