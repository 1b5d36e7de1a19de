//! The presence table of one owner shard: the state machine that turns
//! connection facts (HELLO accepted, connection gone) into presence events.
//!
//! Pure logic, no I/O: the shard feeds it messages and publishes the events
//! it returns. Every agent id is owned by exactly one shard
//! ([`owner_shard`]), so the table needs no locks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::conn::wheel::DeadlineWheel;

/// Move a record to Offline for `reason`; the transition to publish.
fn go_offline(rec: &mut Record, id: &str, reason: OfflineReason, now_ms: u64) -> Transition {
    rec.state = State::Offline;
    rec.conn = None;
    rec.since_ms = now_ms;
    rec.offline_reason = Some(reason);
    Transition {
        agent: id.into(),
        online: false,
        reason: reason.as_str(),
        ts_ms: now_ms,
    }
}

/// Tenths of a second from `origin` to `t` (rounded up, saturating).
fn ds_since(origin: Instant, t: Instant) -> u32 {
    let ms = t.saturating_duration_since(origin).as_millis();
    ms.div_ceil(100).min(u32::MAX as u128) as u32
}

pub use crate::presence::owner::owner_shard;

/// Where a session's connection lives: shard, slab key and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnRef {
    pub shard: u16,
    pub key: u32,
    pub gen: u32,
}

/// Why a connection ended, as told by its connection shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneReason {
    /// The agent sent BYE.
    Bye,
    /// No frame within heartbeat_interval * miss_limit.
    Timeout,
    /// The connection dropped without BYE (EOF, reset, protocol error).
    Disconnect,
    /// The daemon is shutting down or handing the connection over: no event.
    Shutdown,
    /// A reload put the agent id on the deny-list: offline now, no grace.
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Connected and heartbeating.
    Online,
    /// Connection lost without BYE; still reported online until grace ends.
    Grace,
    Offline,
}

/// A presence transition to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub agent: Box<str>,
    pub online: bool,
    pub reason: &'static str,
    pub ts_ms: u64,
}

/// Why an agent went offline, kept as one byte per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OfflineReason {
    Bye,
    Timeout,
    Disconnect,
    /// Presumed online after a restart, and not back within restart_grace.
    NotReconnected,
    /// A reload put the agent id on the deny-list (`auth.revoked`).
    Revoked,
}

impl OfflineReason {
    pub fn as_str(self) -> &'static str {
        match self {
            OfflineReason::Bye => "bye",
            OfflineReason::Timeout => "timeout",
            OfflineReason::Disconnect => "disconnect",
            OfflineReason::NotReconnected => "not_reconnected",
            OfflineReason::Revoked => "revoked",
        }
    }
}

/// One agent's presence record (56 bytes; one per agent the shard owns).
#[derive(Debug, Clone)]
pub struct Record {
    /// Wall-clock ms when the current state began.
    pub since_ms: u64,
    /// Wall-clock ms of the last sign of life the owner knows of.
    pub last_seen_ms: u64,
    pub session: u64,
    /// When grace ends, in tenths of a second on the table's clock
    /// (meaningful in Grace; 13 years of range).
    grace_until_ds: u32,
    pub conn: Option<ConnRef>,
    pub state: State,
    /// Reason of the last offline transition.
    pub offline_reason: Option<OfflineReason>,
}

/// A record as the table starts with it after a restart (made by
/// `store::recovery` from what was persisted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredRecord {
    pub agent: Box<str>,
    /// Online (or held offline) before the restart: reported online until it
    /// reconnects (silently) or the restart grace ends (`not_reconnected`).
    pub presumed_online: bool,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub session: u64,
    pub offline_reason: Option<OfflineReason>,
}

/// What a HELLO did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HelloOutcome {
    pub transition: Option<Transition>,
    /// An older session of the same agent that must get ERROR 5 and close.
    pub supersede: Option<ConnRef>,
}

pub struct PresenceTable {
    origin: Instant,
    records: HashMap<Box<str>, Record>,
    grace: DeadlineWheel<(Box<str>, u64)>,
    offline_grace: Duration,
    online: usize,
    in_grace: usize,
}

impl PresenceTable {
    pub fn new(origin: Instant, tick: Duration, offline_grace: Duration) -> Self {
        Self {
            origin,
            records: HashMap::new(),
            grace: DeadlineWheel::new(origin, tick, 1024),
            offline_grace,
            online: 0,
            in_grace: 0,
        }
    }

    /// Tenths of a second since the table's origin (rounded up).
    fn ds_of(&self, t: Instant) -> u32 {
        ds_since(self.origin, t)
    }

    /// Agents reported online (connected or within grace).
    pub fn online(&self) -> usize {
        self.online + self.in_grace
    }

    /// Agents whose connection dropped and who are within grace.
    pub fn in_grace(&self) -> usize {
        self.in_grace
    }

    /// Records held (online, grace and offline).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Record> {
        self.records.get(id)
    }

    /// A HELLO for `id` was accepted on `conn` with a new `session`.
    pub fn hello(&mut self, id: &str, session: u64, conn: ConnRef, now_ms: u64) -> HelloOutcome {
        let mut out = HelloOutcome::default();
        match self.records.get_mut(id) {
            Some(rec) => {
                match rec.state {
                    State::Online => {
                        out.supersede = rec.conn.filter(|c| *c != conn);
                    }
                    State::Grace => {
                        self.in_grace -= 1;
                        self.online += 1;
                    }
                    State::Offline => {
                        self.online += 1;
                        rec.since_ms = now_ms;
                        rec.offline_reason = None;
                        out.transition = Some(Transition {
                            agent: id.into(),
                            online: true,
                            reason: "hello",
                            ts_ms: now_ms,
                        });
                    }
                }
                rec.state = State::Online;
                rec.session = session;
                rec.conn = Some(conn);
                rec.last_seen_ms = now_ms;
            }
            None => {
                self.online += 1;
                self.records.insert(
                    id.into(),
                    Record {
                        state: State::Online,
                        since_ms: now_ms,
                        last_seen_ms: now_ms,
                        session,
                        conn: Some(conn),
                        offline_reason: None,
                        grace_until_ds: 0,
                    },
                );
                out.transition = Some(Transition {
                    agent: id.into(),
                    online: true,
                    reason: "hello",
                    ts_ms: now_ms,
                });
            }
        }
        out
    }

    /// The connection of `session` ended. Stale sessions (superseded) are ignored.
    pub fn gone(
        &mut self,
        id: &str,
        session: u64,
        reason: GoneReason,
        last_seen_ms: u64,
        now_ms: u64,
        now: Instant,
    ) -> Option<Transition> {
        let rec = self.records.get_mut(id)?;
        if rec.session != session || rec.state != State::Online {
            return None;
        }
        rec.last_seen_ms = rec.last_seen_ms.max(last_seen_ms);
        let offline = |rec: &mut Record, reason| Some(go_offline(rec, id, reason, now_ms));
        match reason {
            GoneReason::Bye => {
                self.online -= 1;
                offline(rec, OfflineReason::Bye)
            }
            GoneReason::Timeout => {
                self.online -= 1;
                offline(rec, OfflineReason::Timeout)
            }
            GoneReason::Revoked => {
                self.online -= 1;
                offline(rec, OfflineReason::Revoked)
            }
            GoneReason::Disconnect => {
                self.online -= 1;
                self.in_grace += 1;
                rec.state = State::Grace;
                rec.conn = None;
                let until = now + self.offline_grace;
                rec.grace_until_ds = ds_since(self.origin, until);
                self.grace.insert(until, (id.into(), session));
                None
            }
            GoneReason::Shutdown => None,
        }
    }

    /// Every record, for a live hand-over to a new process.
    pub fn export(&self, now: Instant) -> Vec<crate::upgrade::manifest::PresenceRecordHandoff> {
        let now_rel = self.ds_of(now);
        self.records
            .iter()
            .map(|(id, r)| crate::upgrade::manifest::PresenceRecordHandoff {
                agent: id.to_string(),
                state: match r.state {
                    State::Online => "online",
                    State::Grace => "grace",
                    State::Offline => "offline",
                }
                .into(),
                since_ms: r.since_ms,
                last_seen_ms: r.last_seen_ms,
                session: r.session,
                grace_remaining_ms: (r.state == State::Grace)
                    .then(|| u64::from(r.grace_until_ds.saturating_sub(now_rel)) * 100),
                offline_reason: r.offline_reason.map(|x| x.as_str().to_owned()),
                conn: r.conn.map(|c| (c.shard, c.key, c.gen)),
            })
            .collect()
    }

    /// Take over records exported by [`PresenceTable::export`] (a new
    /// process after a live hand-over): no events, grace timers resumed.
    pub fn restore(
        &mut self,
        records: Vec<crate::upgrade::manifest::PresenceRecordHandoff>,
        now: Instant,
    ) {
        for h in records {
            let state = match h.state.as_str() {
                "online" => State::Online,
                "grace" => State::Grace,
                _ => State::Offline,
            };
            let offline_reason = match h.offline_reason.as_deref() {
                Some("bye") => Some(OfflineReason::Bye),
                Some("timeout") => Some(OfflineReason::Timeout),
                Some("not_reconnected") => Some(OfflineReason::NotReconnected),
                Some("revoked") => Some(OfflineReason::Revoked),
                Some(_) => Some(OfflineReason::Disconnect),
                None => None,
            };
            let mut rec = Record {
                since_ms: h.since_ms,
                last_seen_ms: h.last_seen_ms,
                session: h.session,
                grace_until_ds: 0,
                conn: h.conn.map(|(shard, key, gen)| ConnRef { shard, key, gen }),
                state,
                offline_reason,
            };
            match state {
                State::Online => self.online += 1,
                State::Grace => {
                    self.in_grace += 1;
                    let until = now + Duration::from_millis(h.grace_remaining_ms.unwrap_or(0));
                    rec.grace_until_ds = self.ds_of(until);
                    rec.conn = None;
                    self.grace
                        .insert(until, (h.agent.as_str().into(), h.session));
                }
                State::Offline => {}
            }
            self.records.insert(h.agent.into(), rec);
        }
    }

    /// Every record (for snapshots).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Record)> {
        self.records.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// Start from records recovered after a restart: agents presumed online
    /// are Online with no connection (a HELLO is then silent: nothing to
    /// supersede, no event); the others are Offline.
    pub fn restore_recovered(&mut self, records: Vec<RecoveredRecord>) {
        for r in records {
            let online = r.presumed_online;
            if online {
                self.online += 1;
            }
            self.records.insert(
                r.agent,
                Record {
                    since_ms: r.since_ms,
                    last_seen_ms: r.last_seen_ms,
                    session: r.session,
                    grace_until_ds: 0,
                    conn: None,
                    state: if online {
                        State::Online
                    } else {
                        State::Offline
                    },
                    offline_reason: if online { None } else { r.offline_reason },
                },
            );
        }
    }

    /// A presumed-online agent did not come back: offline with `reason`,
    /// unless it reconnected meanwhile (then it has a connection).
    pub fn force_offline(
        &mut self,
        id: &str,
        reason: OfflineReason,
        now_ms: u64,
    ) -> Option<Transition> {
        let rec = self.records.get_mut(id)?;
        if rec.state != State::Online || rec.conn.is_some() {
            return None;
        }
        self.online -= 1;
        Some(go_offline(rec, id, reason, now_ms))
    }

    /// Grace periods that ended by `now` turn into `offline` (reason `disconnect`).
    pub fn expire(&mut self, now: Instant, now_ms: u64, out: &mut Vec<Transition>) {
        let records = &mut self.records;
        let in_grace = &mut self.in_grace;
        let now_rel = ds_since(self.origin, now);
        self.grace.expire(now, |(id, session)| {
            if let Some(rec) = records.get_mut(&id) {
                let due = rec.grace_until_ds <= now_rel;
                if rec.state == State::Grace && rec.session == session && due {
                    *in_grace -= 1;
                    rec.state = State::Offline;
                    rec.since_ms = now_ms;
                    rec.offline_reason = Some(OfflineReason::Disconnect);
                    out.push(Transition {
                        agent: id,
                        online: false,
                        reason: "disconnect",
                        ts_ms: now_ms,
                    });
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: ConnRef = ConnRef {
        shard: 0,
        key: 1,
        gen: 1,
    };
    const C2: ConnRef = ConnRef {
        shard: 1,
        key: 7,
        gen: 2,
    };

    fn table() -> (PresenceTable, Instant) {
        let o = Instant::now();
        (
            PresenceTable::new(o, Duration::from_millis(10), Duration::from_millis(100)),
            o,
        )
    }

    #[test]
    fn hello_then_bye() {
        let (mut t, o) = table();
        let h = t.hello("a", 1, C1, 1000);
        assert!(h.transition.as_ref().unwrap().online);
        assert_eq!(t.online(), 1);
        let tr = t.gone("a", 1, GoneReason::Bye, 1000, 1001, o).unwrap();
        assert_eq!((tr.online, tr.reason), (false, "bye"));
        assert_eq!(t.online(), 0);
        // Coming back is a new online event.
        assert!(t.hello("a", 2, C1, 1002).transition.is_some());
    }

    #[test]
    fn grace_reconnect_is_silent_and_expiry_is_disconnect() {
        let (mut t, o) = table();
        t.hello("a", 1, C1, 0);
        assert_eq!(t.gone("a", 1, GoneReason::Disconnect, 0, 0, o), None);
        assert_eq!(t.online(), 1, "still online during grace");
        let h = t.hello("a", 2, C2, 5);
        assert_eq!(h, HelloOutcome::default(), "no event, nothing to supersede");
        let mut ev = vec![];
        t.expire(o + Duration::from_secs(1), 1000, &mut ev);
        assert!(ev.is_empty(), "stale grace entry must not fire");

        let later = o + Duration::from_secs(1);
        t.gone("a", 2, GoneReason::Disconnect, 0, 1000, later);
        t.expire(later + Duration::from_millis(50), 1050, &mut ev);
        assert!(ev.is_empty());
        t.expire(later + Duration::from_millis(120), 1120, &mut ev);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].online, ev[0].reason), (false, "disconnect"));
        assert_eq!(t.online(), 0);
    }

    #[test]
    fn supersede_is_silent_and_old_session_gone_is_ignored() {
        let (mut t, o) = table();
        t.hello("a", 1, C1, 0);
        let h = t.hello("a", 2, C2, 1);
        assert_eq!(h.transition, None);
        assert_eq!(h.supersede, Some(C1));
        assert_eq!(t.gone("a", 1, GoneReason::Disconnect, 0, 2, o), None);
        assert_eq!(t.get("a").unwrap().state, State::Online);
        assert_eq!(t.online(), 1);
    }

    #[test]
    fn timeout_is_immediate_and_shutdown_is_silent() {
        let (mut t, o) = table();
        t.hello("a", 1, C1, 0);
        t.hello("b", 1, C2, 0);
        let tr = t.gone("a", 1, GoneReason::Timeout, 0, 90, o).unwrap();
        assert_eq!(tr.reason, "timeout");
        assert_eq!(t.gone("b", 1, GoneReason::Shutdown, 0, 90, o), None);
        assert_eq!(t.get("b").unwrap().state, State::Online);
    }

    #[test]
    fn export_and_restore_keep_state_without_events() {
        let (mut t, o) = table();
        t.hello("on", 1, C1, 10);
        t.hello("gr", 2, C2, 10);
        t.gone("gr", 2, GoneReason::Disconnect, 10, 20, o);
        t.hello("off", 3, C1, 10);
        t.gone("off", 3, GoneReason::Bye, 10, 20, o);
        let exported = t.export(o);
        let (mut u, o2) = table();
        u.restore(exported, o2);
        assert_eq!((u.online(), u.in_grace(), u.len()), (2, 1, 3));
        assert_eq!(u.get("on").unwrap().conn, Some(C1));
        assert_eq!(
            u.get("off").unwrap().offline_reason,
            Some(OfflineReason::Bye)
        );
        // A superseding HELLO still finds the old connection.
        assert_eq!(u.hello("on", 9, C2, 30).supersede, Some(C1));
        // Grace resumes and ends with `disconnect`.
        let mut ev = vec![];
        u.expire(o2 + Duration::from_millis(500), 500, &mut ev);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].agent.as_ref(), ev[0].reason), ("gr", "disconnect"));
    }

    #[test]
    fn owner_is_stable_and_in_range() {
        assert_eq!(owner_shard(b"agent-1", 1), 0);
        for n in 1..8 {
            assert!(owner_shard(b"x", n) < n);
        }
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c: a fixed value, not per-build.
        assert_eq!(
            owner_shard(b"a", 1 << 20),
            (0xaf63dc4c8601ec8cu64 % (1 << 20)) as usize
        );
    }
}
