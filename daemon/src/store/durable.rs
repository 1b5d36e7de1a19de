//! A shard's durability: its presence changes go to the state directory
//! (through [`crate::store::shard_store`]) without blocking the shard, and after an
//! unplanned restart the agents that were online are presumed online for
//! `state.restart_grace` ([`crate::store::recovery::RestartWindow`]).
//!
//! Changes are buffered in memory as they happen (never on heartbeats) and
//! written and fsync'd every `state.flush_interval` on glommio's blocking
//! pool; the store sits behind a mutex only that pool and start/stop touch.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::StateConfig;
use crate::presence::table::{PresenceTable, Record};
use crate::store::record::PersistedRecord;
use crate::store::recovery::{recover_with_held, LoadReport, RestartWindow};
use crate::store::shard_store::{load_guard_held, LogBuffer, PersistError, ShardStore};

/// What `stats` says about the persisted presence of a shard.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DurableStatus {
    /// "restored", "unknown" (files corrupt: presence not trusted), "fresh"
    /// (nothing persisted yet) or "handed_over" (live upgrade).
    pub presence: &'static str,
    pub load_report: Option<String>,
    pub presumed_online: usize,
    pub flushes_total: u64,
    pub flush_failures_total: u64,
    pub compactions_total: u64,
    pub last_flush_error: Option<String>,
}

pub struct Durable {
    store: Arc<Mutex<ShardStore>>,
    buffer: RefCell<LogBuffer>,
    /// A flush is running on the blocking pool.
    busy: Rc<Cell<bool>>,
    next_flush: Cell<Instant>,
    flush_every: Duration,
    compact_after: u64,
    restart: RefCell<Option<RestartWindow>>,
    status: Arc<Mutex<DurableStatus>>,
    /// Event shard: highest seq that may be published (durably reserved).
    seq_reserved: Cell<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Durable {
    /// Open this shard's files (blocking; at start-up) and, unless presence
    /// was handed over by a live upgrade, restore it into `table`.
    /// Returns the durable state and the event seq high-water mark.
    pub fn open(
        cfg: &StateConfig,
        shard: usize,
        table: &mut PresenceTable,
        handed_over: bool,
        now: Instant,
    ) -> Result<(Durable, u64), PersistError> {
        crate::store::fs::ensure_private_dir(&cfg.dir)?;
        let (store, loaded) = ShardStore::open(&cfg.dir, shard)?;
        let report: LoadReport = loaded.report.clone();
        let mut status = DurableStatus {
            load_report: Some(report.to_string()),
            ..Default::default()
        };
        let mut restart = None;
        if handed_over {
            status.presence = "handed_over";
        } else if !report.trusted() {
            // Never trusted blindly: presence is unknown, not offline.
            warn!(
                shard,
                "{report}: starting with presence unknown (no offline events for anyone)"
            );
            status.presence = "unknown";
        } else if loaded.records.is_empty() {
            status.presence = "fresh";
        } else {
            let held = match load_guard_held(&cfg.dir) {
                Ok(Ok(ids)) => ids.into_iter().collect(),
                _ => Default::default(),
            };
            let recovery = recover_with_held(
                loaded.records,
                &held,
                crate::shared::wall_ms(),
                cfg.restart_grace,
            );
            info!(
                shard,
                presumed_online = recovery.presumed_online,
                offline = recovery.offline,
                "restored presence: {report}"
            );
            status.presence = "restored";
            status.presumed_online = recovery.presumed_online;
            let window = RestartWindow::new(&recovery);
            table.restore_recovered(recovery.records);
            restart = Some(window);
        }
        let seq_hw = loaded.event_seq_high_water;
        let d = Durable {
            store: Arc::new(Mutex::new(store)),
            buffer: RefCell::new(LogBuffer::default()),
            busy: Rc::new(Cell::new(false)),
            next_flush: Cell::new(now + cfg.flush_interval),
            flush_every: cfg.flush_interval,
            compact_after: cfg.compact_after_entries,
            restart: RefCell::new(restart),
            status: Arc::new(Mutex::new(status)),
            seq_reserved: Cell::new(0),
        };
        if handed_over {
            // The handed-over table is the truth: make the files say so.
            let records: Vec<PersistedRecord> = table
                .iter()
                .map(|(id, r)| PersistedRecord::from_presence(id, r))
                .collect();
            if let Err(e) = lock(&d.store).compact(records) {
                warn!(shard, "writing the handed-over presence: {e}");
            }
        }
        Ok((d, seq_hw))
    }

    /// A presence record changed: remember it for the next flush.
    pub fn record(&self, id: &str, rec: &Record) {
        self.buffer
            .borrow_mut()
            .push(&PersistedRecord::from_presence(id, rec));
    }

    /// A HELLO was accepted for `id`: it is back if it was presumed online.
    pub fn on_hello(&self, id: &str) {
        if let Some(w) = self.restart.borrow_mut().as_mut() {
            w.on_hello(id);
        }
    }

    /// Agents presumed online whose restart grace ended without a HELLO.
    pub fn expire_presumed(&self, now_wall_ms: u64) -> Vec<crate::presence::table::Transition> {
        let mut slot = self.restart.borrow_mut();
        let Some(w) = slot.as_mut() else {
            return Vec::new();
        };
        let out = w.expire(now_wall_ms);
        if w.remaining() == 0 && now_wall_ms >= w.deadline_ms() {
            *slot = None;
        }
        out
    }

    pub fn presumed_remaining(&self) -> usize {
        self.restart.borrow().as_ref().map_or(0, |w| w.remaining())
    }

    pub fn status(&self) -> DurableStatus {
        lock(&self.status).clone()
    }

    /// Event shard: reserve seqs durably before publishing them.
    pub fn reserve_seq_now(&self, upto: u64) -> bool {
        match lock(&self.store).reserve_seq(upto) {
            Ok(_) => {
                self.seq_reserved.set(upto);
                true
            }
            Err(e) => {
                warn!("reserving event seqs up to {upto}: {e}");
                false
            }
        }
    }

    /// Highest seq durably reserved.
    pub fn seq_reserved(&self) -> u64 {
        self.seq_reserved.get()
    }

    /// On the shard's tick: start a flush (or a compaction) on the blocking
    /// pool when one is due and none is running.
    pub fn tick(&self, table: &PresenceTable, now: Instant) {
        if self.busy.get() || now < self.next_flush.get() {
            return;
        }
        self.next_flush.set(now + self.flush_every);
        let buf = self.buffer.borrow_mut().take();
        let compact = lock(&self.store).log_entries() + buf.entries() > self.compact_after;
        let records: Option<Vec<PersistedRecord>> = compact.then(|| {
            table
                .iter()
                .map(|(id, r)| PersistedRecord::from_presence(id, r))
                .collect()
        });
        if buf.is_empty() && records.is_none() {
            return;
        }
        self.busy.set(true);
        let store = self.store.clone();
        let status = self.status.clone();
        let job = glommio::executor().spawn_blocking(move || {
            let mut st = lock(&store);
            let r = match records {
                // The snapshot holds everything the buffer did.
                Some(all) => st.compact(all).map(|_| true),
                None => {
                    st.append_buffer(buf);
                    st.flush_and_sync().map(|_| false)
                }
            };
            let mut s = lock(&status);
            match r {
                Ok(compacted) => {
                    s.flushes_total += 1;
                    s.compactions_total += u64::from(compacted);
                    s.last_flush_error = None;
                }
                Err(e) => {
                    s.flush_failures_total += 1;
                    s.last_flush_error = Some(e.to_string());
                }
            }
        });
        let busy = self.busy.clone();
        glommio::spawn_local(async move {
            job.await;
            busy.set(false);
        })
        .detach();
    }

    /// Clean shutdown (or a hand-over's end): write everything now, with a
    /// clean-shutdown marker. Blocking.
    pub fn shutdown(&self) {
        let buf = self.buffer.borrow_mut().take();
        let mut st = lock(&self.store);
        st.append_buffer(buf);
        st.append_clean_shutdown(crate::shared::wall_ms());
        if let Err(e) = st.flush_and_sync() {
            warn!("final state flush: {e}");
        }
    }
}
