//! The persisted formats: records, log frames, checksummed blobs, the log
//! header and the snapshot. Pure encoding and decoding, no I/O; decoding
//! never panics on bad input and says where and why it stopped.
//!
//! # Formats (all integers little-endian)
//!
//! **Blob** (`shard-N.snap`, `events.seq`, `guard.held`): written whole with
//! [`crate::store::fs::write_private`], so a reader sees the old or the new
//! content, never a mix.
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

use std::borrow::Borrow;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::presence::table::{OfflineReason, Record, State};

/// Largest frame payload accepted (agent ids are at most 128 bytes).
pub const MAX_FRAME: usize = 4096;
/// Format version of every file.
pub const FORMAT_VERSION: u32 = 1;

pub(crate) const SNAP_MAGIC: [u8; 8] = *b"PRSDSNP1";
pub(crate) const LOG_MAGIC: [u8; 8] = *b"PRSDLOG1";
pub(crate) const SEQ_MAGIC: [u8; 8] = *b"PRSDSEQ1";
pub(crate) const HELD_MAGIC: [u8; 8] = *b"PRSDHLD1";
/// Bytes of a log header.
pub(crate) const LOG_HEADER_LEN: usize = 28;
/// Offset of a blob's payload in its file.
pub(crate) const BLOB_PAYLOAD_OFFSET: usize = 8 + 4 + 8;
const BLOB_OVERHEAD: usize = BLOB_PAYLOAD_OFFSET + 4;
const KIND_RECORD: u8 = 1;
const KIND_CLEAN_SHUTDOWN: u8 = 2;
/// Bytes of a record payload besides the agent id.
pub(crate) const RECORD_FIXED: usize = 1 + 1 + 1 + 2 + 8 + 8 + 8;

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// One agent's presence record as persisted. Times are wall-clock ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedRecord {
    pub agent: Box<str>,
    pub state: State,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub session: u64,
    pub offline_reason: Option<OfflineReason>,
}

impl PersistedRecord {
    /// The persisted form of a live presence record.
    pub fn from_presence(agent: &str, rec: &Record) -> Self {
        Self {
            agent: agent.into(),
            state: rec.state,
            since_ms: rec.since_ms,
            last_seen_ms: rec.last_seen_ms,
            session: rec.session,
            offline_reason: rec.offline_reason,
        }
    }
}

fn state_code(s: State) -> u8 {
    match s {
        State::Online => 1,
        State::Grace => 2,
        State::Offline => 3,
    }
}

fn state_from_code(c: u8) -> Option<State> {
    Some(match c {
        1 => State::Online,
        2 => State::Grace,
        3 => State::Offline,
        _ => return None,
    })
}

fn reason_code(r: Option<OfflineReason>) -> u8 {
    match r {
        None => 0,
        Some(OfflineReason::Bye) => 1,
        Some(OfflineReason::Timeout) => 2,
        Some(OfflineReason::Disconnect) => 3,
        Some(OfflineReason::NotReconnected) => 4,
        Some(OfflineReason::Revoked) => 5,
    }
}

fn reason_from_code(c: u8) -> Option<Option<OfflineReason>> {
    Some(match c {
        0 => None,
        1 => Some(OfflineReason::Bye),
        2 => Some(OfflineReason::Timeout),
        3 => Some(OfflineReason::Disconnect),
        4 => Some(OfflineReason::NotReconnected),
        5 => Some(OfflineReason::Revoked),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------

/// Why a file is not trusted: where and what.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path} at offset {offset}: {what}")]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

pub(crate) fn corrupt(path: &Path, offset: usize, what: impl ToString) -> Corruption {
    Corruption {
        path: path.to_path_buf(),
        offset: offset as u64,
        what: what.to_string(),
    }
}

/// Why a frame payload does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EntryError {
    #[error("bad state code")]
    State,
    #[error("bad reason code")]
    Reason,
    #[error("short record")]
    Short,
    #[error("record length {len} for id of {id_len}")]
    Length { len: usize, id_len: usize },
    #[error("agent id not UTF-8")]
    NotUtf8,
    #[error("empty agent id")]
    EmptyId,
    #[error("unknown entry kind {kind} (len {len})")]
    Kind { kind: u8, len: usize },
    #[error("empty entry")]
    Empty,
}

/// Why the bytes at an offset are not a good frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame length {0} out of range")]
    Length(usize),
    #[error("frame checksum mismatch")]
    Checksum,
}

// ---------------------------------------------------------------------------
// Frames and entries
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
pub(crate) fn push_record_frame(out: &mut Vec<u8>, r: &PersistedRecord) -> bool {
    let id = r.agent.as_bytes();
    if RECORD_FIXED + id.len() > MAX_FRAME {
        return false;
    }
    let mut p = Vec::with_capacity(RECORD_FIXED + id.len());
    p.push(KIND_RECORD);
    p.push(state_code(r.state));
    p.push(reason_code(r.offline_reason));
    p.extend_from_slice(&(id.len() as u16).to_le_bytes());
    p.extend_from_slice(id);
    p.extend_from_slice(&r.since_ms.to_le_bytes());
    p.extend_from_slice(&r.last_seen_ms.to_le_bytes());
    p.extend_from_slice(&r.session.to_le_bytes());
    push_frame(out, &p);
    true
}

/// Encode a clean-shutdown frame.
pub(crate) fn push_clean_shutdown_frame(out: &mut Vec<u8>, ts_ms: u64) {
    let mut p = vec![KIND_CLEAN_SHUTDOWN];
    p.extend_from_slice(&ts_ms.to_le_bytes());
    push_frame(out, &p);
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// One decoded frame payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Record(PersistedRecord),
    CleanShutdown,
}

pub(crate) fn decode_entry(p: &[u8]) -> Result<Entry, EntryError> {
    match p.first() {
        Some(&KIND_RECORD) => {
            let state = state_from_code(p.get(1).copied().unwrap_or(0)).ok_or(EntryError::State)?;
            let reason =
                reason_from_code(p.get(2).copied().unwrap_or(255)).ok_or(EntryError::Reason)?;
            let id_len = u16_at(p, 3).ok_or(EntryError::Short)? as usize;
            if p.len() != RECORD_FIXED + id_len {
                return Err(EntryError::Length {
                    len: p.len(),
                    id_len,
                });
            }
            let id = std::str::from_utf8(&p[5..5 + id_len]).map_err(|_| EntryError::NotUtf8)?;
            if id.is_empty() {
                return Err(EntryError::EmptyId);
            }
            let o = 5 + id_len;
            Ok(Entry::Record(PersistedRecord {
                agent: id.into(),
                state,
                offline_reason: reason,
                since_ms: u64_at(p, o).ok_or(EntryError::Short)?,
                last_seen_ms: u64_at(p, o + 8).ok_or(EntryError::Short)?,
                session: u64_at(p, o + 16).ok_or(EntryError::Short)?,
            }))
        }
        Some(&KIND_CLEAN_SHUTDOWN) if p.len() == 9 => Ok(Entry::CleanShutdown),
        Some(&kind) => Err(EntryError::Kind { kind, len: p.len() }),
        None => Err(EntryError::Empty),
    }
}

/// What the bytes at an offset hold.
pub(crate) enum FrameAt<'a> {
    Ok { payload: &'a [u8], next: usize },
    Incomplete,
    Bad(FrameError),
}

pub(crate) fn frame_at(buf: &[u8], off: usize) -> FrameAt<'_> {
    let Some(len) = u32_at(buf, off) else {
        return FrameAt::Incomplete;
    };
    let Some(crc) = u32_at(buf, off + 4) else {
        return FrameAt::Incomplete;
    };
    let len = len as usize;
    if len == 0 || len > MAX_FRAME {
        return FrameAt::Bad(FrameError::Length(len));
    }
    let Some(payload) = buf.get(off + 8..off + 8 + len) else {
        return FrameAt::Incomplete;
    };
    if frame_crc(&buf[off..off + 4], payload) != crc {
        return FrameAt::Bad(FrameError::Checksum);
    }
    FrameAt::Ok {
        payload,
        next: off + 8 + len,
    }
}

// ---------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------

pub(crate) fn encode_blob(magic: [u8; 8], payload: &[u8]) -> Vec<u8> {
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
pub(crate) fn decode_blob<'a>(
    path: &Path,
    magic: [u8; 8],
    b: &'a [u8],
) -> Result<&'a [u8], Corruption> {
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
    Ok(&b[BLOB_PAYLOAD_OFFSET..body_end])
}

/// The `events.seq` blob for high-water mark `hw`.
pub(crate) fn encode_seq(hw: u64) -> Vec<u8> {
    encode_blob(SEQ_MAGIC, &hw.to_le_bytes())
}

/// The high-water mark of an `events.seq` blob.
pub(crate) fn decode_seq(path: &Path, b: &[u8]) -> Result<u64, Corruption> {
    let p = decode_blob(path, SEQ_MAGIC, b)?;
    if p.len() == 8 {
        Ok(u64_at(p, 0).unwrap_or(0))
    } else {
        Err(corrupt(
            path,
            BLOB_PAYLOAD_OFFSET,
            format!("seq payload of {} bytes", p.len()),
        ))
    }
}

/// The `guard.held` blob of `agents`, or `None` when no id is persistable.
pub(crate) fn encode_held<'a>(agents: impl IntoIterator<Item = &'a str>) -> Option<Vec<u8>> {
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
        return None;
    }
    let mut payload = n.to_le_bytes().to_vec();
    payload.extend_from_slice(&body);
    Some(encode_blob(HELD_MAGIC, &payload))
}

/// The agent ids of a `guard.held` blob.
pub(crate) fn decode_held(path: &Path, b: &[u8]) -> Result<Vec<Box<str>>, Corruption> {
    let base = BLOB_PAYLOAD_OFFSET;
    let p = decode_blob(path, HELD_MAGIC, b)?;
    let n = u64_at(p, 0).ok_or_else(|| corrupt(path, base, "short held list"))?;
    let mut out = Vec::new();
    let mut off = 8;
    while off < p.len() {
        let len = u16_at(p, off).ok_or_else(|| corrupt(path, base + off, "short entry"))?;
        let id = p
            .get(off + 2..off + 2 + len as usize)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| corrupt(path, base + off, "bad agent id"))?;
        out.push(id.into());
        off += 2 + len as usize;
    }
    if out.len() as u64 != n {
        return Err(corrupt(
            path,
            base,
            format!("{n} ids announced, {} found", out.len()),
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Log header and snapshot
// ---------------------------------------------------------------------------

pub(crate) fn log_header(shard: usize, generation: u64) -> [u8; LOG_HEADER_LEN] {
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
pub(crate) fn parse_log_header(path: &Path, b: &[u8], shard: usize) -> Result<u64, Corruption> {
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

/// A decoded snapshot.
pub(crate) struct Snapshot {
    pub generation: u64,
    pub records: Vec<PersistedRecord>,
}

/// A snapshot blob of `records` and how many it holds (ids too long to
/// persist are left out).
pub(crate) fn encode_snapshot<I>(shard: usize, generation: u64, records: I) -> (Vec<u8>, u64)
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

pub(crate) fn decode_snapshot(path: &Path, b: &[u8], shard: usize) -> Result<Snapshot, Corruption> {
    let p = decode_blob(path, SNAP_MAGIC, b)?;
    let base = BLOB_PAYLOAD_OFFSET; // for error offsets in the file
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(agent: &str, state: State) -> PersistedRecord {
        PersistedRecord {
            agent: agent.into(),
            state,
            since_ms: 1,
            last_seen_ms: 2,
            session: 3,
            offline_reason: (state == State::Offline).then_some(OfflineReason::NotReconnected),
        }
    }

    #[test]
    fn record_frame_bytes_are_stable() {
        let mut b = Vec::new();
        assert!(push_record_frame(&mut b, &rec("ab", State::Offline)));
        let payload = [
            &[1u8, 3, 4][..],
            &2u16.to_le_bytes(),
            b"ab",
            &1u64.to_le_bytes(),
            &2u64.to_le_bytes(),
            &3u64.to_le_bytes(),
        ]
        .concat();
        assert_eq!(&b[..4], &(payload.len() as u32).to_le_bytes());
        assert_eq!(&b[8..], &payload[..]);
        match frame_at(&b, 0) {
            FrameAt::Ok { payload, next } => {
                assert_eq!(next, b.len());
                assert_eq!(
                    decode_entry(payload),
                    Ok(Entry::Record(rec("ab", State::Offline)))
                );
            }
            _ => panic!("frame does not decode"),
        }
    }

    #[test]
    fn entry_errors_keep_their_messages() {
        assert_eq!(decode_entry(&[]).unwrap_err().to_string(), "empty entry");
        assert_eq!(
            decode_entry(&[7, 0]).unwrap_err().to_string(),
            "unknown entry kind 7 (len 2)"
        );
        assert_eq!(
            decode_entry(&[1, 9]).unwrap_err().to_string(),
            "bad state code"
        );
        let long_id = "x".repeat(MAX_FRAME);
        assert!(!push_record_frame(
            &mut Vec::new(),
            &rec(&long_id, State::Online)
        ));
    }

    #[test]
    fn blobs_round_trip() {
        let p = Path::new("x");
        assert_eq!(decode_seq(p, &encode_seq(77)), Ok(77));
        let held = encode_held(["a", "", "bb"]).unwrap();
        assert_eq!(
            decode_held(p, &held).unwrap(),
            vec!["a".into(), "bb".into()] as Vec<Box<str>>
        );
        assert_eq!(encode_held(std::iter::empty()), None);
        let (snap, n) = encode_snapshot(2, 5, [rec("a", State::Grace)]);
        assert_eq!(n, 1);
        let s = decode_snapshot(p, &snap, 2).unwrap();
        assert_eq!((s.generation, s.records.len()), (5, 1));
        assert!(decode_snapshot(p, &snap, 3).is_err());
    }
}
