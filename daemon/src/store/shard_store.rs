//! One owner shard's persisted presence: a snapshot plus an append log it
//! writes, and the event shard's `events.seq` reservation and `guard.held`
//! list. Formats are in [`crate::store::record`], reading back in
//! [`crate::store::recovery`], the file primitives in [`crate::store::fs`].
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
//! # Generations
//!
//! Each compaction writes snapshot generation `g + 1`, then replaces the log
//! with an empty log of generation `g + 1`. At open, a log older than the
//! snapshot is a crash between those two steps: the snapshot already holds
//! everything, so the stale log is discarded (reported as
//! `stale_log_discarded`, not as corruption). A log newer than the snapshot,
//! a missing log next to a snapshot, or a missing snapshot next to a log of
//! generation > 0 cannot happen without outside interference and is corrupt.
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
//! ([`crate::store::recovery::seq_fallback_floor`]): above any seq a daemon
//! publishing fewer than a million events per second could have reached,
//! and reported in [`crate::store::recovery::LoadReport::seq_problem`].
//!
//! # Blocking I/O
//!
//! All I/O is blocking `std::fs`. A shard either calls it inline (small
//! flushes) or moves the store into glommio's `spawn_blocking`:
//! [`ShardStore`] is `Send`. Transitions that happen while the store is away
//! go into a [`LogBuffer`] kept on the shard and are handed over with
//! [`ShardStore::append_buffer`] when it is back.

use std::borrow::Borrow;
use std::fs::{self as stdfs, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::presence::events::EVENT_SHARD;
use crate::store::fs::{self, io_err, FsError};
use crate::store::record::{
    decode_held, encode_held, encode_seq, encode_snapshot, log_header, push_clean_shutdown_frame,
    push_record_frame, Corruption, PersistedRecord, LOG_HEADER_LEN,
};
use crate::store::recovery::{load_seq, read_shard, Loaded, Repair};

/// Seqs reserved ahead of the next one to publish.
pub const SEQ_HEADROOM: u64 = 10_000;
/// The event seq reservation, in the state directory.
pub const SEQ_FILE: &str = "events.seq";
/// The agents whose offline the guard holds, in the state directory.
pub const HELD_FILE: &str = "guard.held";

/// An I/O failure of the store. Corruption is not an error: it is reported
/// in [`crate::store::recovery::LoadReport`] and the store still opens.
#[derive(Debug, Error)]
pub enum PersistError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "shard {shard} is not the event shard ({}); only it reserves event seqs",
        EVENT_SHARD
    )]
    NotEventShard { shard: usize },
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
// Event seq
// ---------------------------------------------------------------------------

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
    match encode_held(agents) {
        Some(blob) => fs::write_private(&path, &blob)?,
        None => {
            fs::remove_if_exists(&path)?;
            fs::sync_dir(dir)?;
        }
    }
    Ok(())
}

/// The held agents saved by [`save_guard_held`]: `Ok(Err(_))` if the file
/// is corrupt (report it; treat the set as empty).
pub fn load_guard_held(dir: &Path) -> Result<Result<Vec<Box<str>>, Corruption>, PersistError> {
    let path = dir.join(HELD_FILE);
    let Some(b) = fs::read_optional(&path)? else {
        return Ok(Ok(Vec::new()));
    };
    Ok(decode_held(&path, &b))
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
        push_clean_shutdown_frame(&mut self.bytes, ts_ms);
        self.entries += 1;
    }

    pub fn entries(&self) -> u64 {
        self.entries
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

/// Open `path` for appending.
fn open_append(path: &Path) -> Result<File, FsError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Carry out what reading the files found necessary (see [`Repair`]).
fn repair(shard: usize, snap_path: &Path, log_path: &Path, how: Repair) -> Result<(), FsError> {
    match how {
        Repair::None => {}
        Repair::Truncate { len } => {
            let f = OpenOptions::new()
                .write(true)
                .open(log_path)
                .map_err(io_err("open", log_path))?;
            f.set_len(len).map_err(io_err("truncate", log_path))?;
            f.sync_all().map_err(io_err("fsync", log_path))?;
        }
        Repair::NewLog { generation } => {
            fs::write_private(log_path, &log_header(shard, generation))?;
        }
        Repair::MoveAside => {
            fs::move_aside(snap_path)?;
            fs::move_aside(log_path)?;
            fs::write_private(log_path, &log_header(shard, 0))?;
        }
    }
    Ok(())
}

impl ShardStore {
    /// Open (or create) shard `shard`'s files in `dir`, load and check them.
    /// Corrupt files are reported in the returned [`Loaded::report`], moved aside,
    /// and replaced by an empty log; only I/O failures are errors.
    pub fn open(dir: &Path, shard: usize) -> Result<(ShardStore, Loaded), PersistError> {
        fs::ensure_private_dir(dir)?;
        let snap_path = dir.join(format!("shard-{shard}.snap"));
        let log_path = dir.join(format!("shard-{shard}.log"));
        fs::remove_stale_tmp(&snap_path)?;
        fs::remove_stale_tmp(&log_path)?;

        let read = read_shard(&snap_path, &log_path, shard)?;
        let mut report = read.report;
        match read.repair {
            Repair::MoveAside => tracing::error!(
                shard,
                "{}: persisted presence not trusted",
                report.corrupt.as_deref().unwrap_or_default()
            ),
            Repair::Truncate { .. } => tracing::warn!(
                shard,
                path = %log_path.display(),
                "truncated tail: {} bytes dropped",
                report.truncated_tail_bytes
            ),
            Repair::None | Repair::NewLog { .. } => {}
        }
        repair(shard, &snap_path, &log_path, read.repair)?;

        let log = open_append(&log_path)?;
        log.set_permissions(stdfs::Permissions::from_mode(fs::PRIVATE_FILE_MODE))
            .map_err(io_err("chmod 0600", &log_path))?;

        let mut event_seq_high_water = 0;
        if shard == EVENT_SHARD {
            let (hw, problem) = load_seq(&dir.join(SEQ_FILE))?;
            if let Some(p) = &problem {
                tracing::error!("event seq state not trusted: {p}");
            }
            event_seq_high_water = hw;
            report.seq_problem = problem;
        }

        let store = ShardStore {
            dir: dir.to_path_buf(),
            shard,
            snap_path,
            log_path,
            log,
            log_len: read.log_len,
            log_entries: read.log_entries,
            generation: read.generation,
            pending: LogBuffer::default(),
            seq_reserved: event_seq_high_water,
        };
        let loaded = Loaded {
            records: read.records,
            report,
            event_seq_high_water,
        };
        Ok((store, loaded))
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

    /// Entries in the log since the last compaction (compaction trigger).
    pub fn log_entries(&self) -> u64 {
        self.log_entries
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
                Err(io_err("append to", &self.log_path)(e).into())
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
        fs::write_private(&self.snap_path, &snap)?;
        fs::write_private(&self.log_path, &log_header(self.shard, generation))?;
        self.log = open_append(&self.log_path)?;
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
        fs::write_private(&self.dir.join(SEQ_FILE), &encode_seq(upto))?;
        self.seq_reserved = upto;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::table::{OfflineReason, State};
    use crate::store::record::RECORD_FIXED;
    use crate::store::recovery::recover_with_held;
    use std::collections::HashSet;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

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
        s.compact([rec("a", State::Online, 1), rec("b", State::Online, 2)])
            .unwrap();
        s.append(&rec("a", State::Offline, 3));
        s.append(&rec("c", State::Grace, 4));
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
                rec("a", State::Offline, 3),
                rec("b", State::Online, 2),
                rec("c", State::Grace, 4),
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
            s.append(&rec("a", State::Online, 1));
            s.flush_and_sync().unwrap();
            s.append(&rec("b", State::Online, 2)); // lost: never flushed
        }
        let (mut s, l) = ShardStore::open(d.path(), 0).unwrap();
        assert_eq!(l.records.len(), 1);
        assert!(!l.report.clean_shutdown);
        let mut buf = LogBuffer::default();
        buf.push(&rec("b", State::Online, 2));
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
        assert_eq!(l.records[0].state, State::Offline);
        // The file was cut back, so new appends follow good data.
        s.append(&rec("d", State::Online, 9));
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
        s.append(&rec("x", State::Online, 1));
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
            all[1].state = State::Offline; // b went offline since
            s.compact(&all).unwrap();
        }
        // Simulate the crash: the old log (generation 1) is back.
        fs::write(log_path(d.path(), 1), &old_log).unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert!(l.report.trusted() && l.report.stale_log_discarded);
        assert_eq!(l.records[1].state, State::Offline, "snapshot wins");
        assert_eq!(l.report.log_records, 0);
    }

    #[test]
    fn compaction_keeps_everything_and_shrinks_the_log() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = ShardStore::open(d.path(), 3).unwrap();
        for round in 0..50u64 {
            for i in 0..20 {
                let st = if round % 2 == 0 {
                    State::Online
                } else {
                    State::Offline
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
    fn store_is_send() {
        fn is_send<T: Send>() {}
        is_send::<ShardStore>();
        is_send::<LogBuffer>();
    }

    #[test]
    fn recovery_after_kill_with_hundreds_of_agents() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = ShardStore::open(d.path(), 0).unwrap();
            for i in 0..300 {
                s.append(&rec(&format!("agent-{i:03}"), State::Online, i));
            }
            s.flush_and_sync().unwrap();
            // killed here: no clean-shutdown marker
        }
        let (_s, l) = ShardStore::open(d.path(), 0).unwrap();
        assert!(!l.report.clean_shutdown);
        let r = recover_with_held(l.records, &HashSet::new(), 10_000, Duration::from_secs(30));
        let mut w = crate::store::recovery::RestartWindow::new(&r);
        for i in 0..300 {
            if i != 123 {
                assert!(w.on_hello(&format!("agent-{i:03}")), "silent reconnect");
            }
        }
        let ev = w.expire(40_000);
        assert_eq!(ev.len(), 1);
        assert_eq!(&*ev[0].agent, "agent-123");
        assert_eq!(ev[0].reason, "not_reconnected");
    }

    #[test]
    fn failed_flush_keeps_entries_for_retry() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = ShardStore::open(d.path(), 1).unwrap();
        s.append(&rec("a", State::Online, 1));
        // Make the handle unusable for writing: swap it for a read-only one.
        s.log = File::open(log_path(d.path(), 1)).unwrap();
        assert!(matches!(
            s.flush_and_sync(),
            Err(PersistError::Fs(FsError::Io {
                op: "append to",
                ..
            }))
        ));
        assert_eq!(s.pending.entries(), 1);
        s.log = OpenOptions::new()
            .append(true)
            .open(log_path(d.path(), 1))
            .unwrap();
        s.flush_and_sync().unwrap();
        let (_s, l) = ShardStore::open(d.path(), 1).unwrap();
        assert_eq!(l.records.len(), 1);
    }
}
