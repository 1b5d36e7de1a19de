//! The event log: presence transitions numbered by a monotonically increasing
//! `seq`, kept in a bounded ring so a consumer that reconnects can resume
//! from the last seq it saw. Lives on shard 0, the event shard; owner shards
//! send it their transitions.

use std::collections::VecDeque;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use serde::Serialize;

use crate::presence::table::Transition;

/// The shard that numbers events (it holds the [`EventLog`]) and owns the
/// event shard's files (`events.seq`, `guard.held`).
pub const EVENT_SHARD: usize = 0;

/// Reasons an event can carry, by their one-byte code (new reasons are
/// appended: codes never change).
const REASONS: [&str; 7] = [
    "hello",
    "bye",
    "timeout",
    "disconnect",
    "not_reconnected",
    "unknown",
    "revoked",
];

/// The code of `"unknown"`.
const UNKNOWN: u8 = 5;

fn reason_code(r: &str) -> u8 {
    REASONS
        .iter()
        .position(|x| *x == r)
        .map_or(UNKNOWN, |i| i as u8)
}

/// One presence event as the ring keeps it (40 bytes + the agent id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub ts_ms: u64,
    pub agent: Box<str>,
    pub online: bool,
    reason: u8,
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Event", 5)?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("ts_ms", &self.ts_ms)?;
        st.serialize_field("agent", &self.agent)?;
        st.serialize_field("state", self.state())?;
        st.serialize_field("reason", self.reason())?;
        st.end()
    }
}

impl Event {
    pub fn state(&self) -> &'static str {
        if self.online {
            "online"
        } else {
            "offline"
        }
    }

    pub fn reason(&self) -> &'static str {
        REASONS
            .get(usize::from(self.reason))
            .copied()
            .unwrap_or(REASONS[usize::from(UNKNOWN)])
    }

    /// One JSON line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Why `events from <seq>` cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// The seq has already left the ring.
    Gone { oldest: u64 },
    /// The seq has not been issued yet (e.g. numbering restarted).
    Future { next: u64 },
}

pub struct EventLog {
    ring: VecDeque<Event>,
    capacity: usize,
    next_seq: u64,
    doorbells: Vec<LocalSender<()>>,
    by_reason: std::collections::BTreeMap<(bool, &'static str), u64>,
}

impl EventLog {
    pub fn new(capacity: usize, first_seq: u64) -> Self {
        Self {
            // Bounded: allocated once, never grown or shrunk.
            ring: VecDeque::with_capacity(capacity.min(1 << 22)),
            capacity,
            next_seq: first_seq.max(1),
            doorbells: Vec::new(),
            by_reason: Default::default(),
        }
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Events published since start, by (online, reason).
    pub fn by_reason(&self) -> &std::collections::BTreeMap<(bool, &'static str), u64> {
        &self.by_reason
    }

    /// Oldest seq still held (== next_seq when empty).
    pub fn oldest_seq(&self) -> u64 {
        self.ring.front().map_or(self.next_seq, |e| e.seq)
    }

    /// Number the transition, keep it, wake subscribers.
    pub fn publish(&mut self, t: Transition) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        *self.by_reason.entry((t.online, t.reason)).or_insert(0) += 1;
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(Event {
            seq,
            ts_ms: t.ts_ms,
            agent: t.agent,
            online: t.online,
            reason: reason_code(t.reason),
        });
        self.doorbells.retain(|d| match d.try_send(()) {
            Ok(()) => true,
            Err(glommio::GlommioError::Closed(_)) => false,
            Err(_) => true, // full: already rung
        });
        seq
    }

    /// Up to `max` events from `from` on. `from == 0` means the oldest held.
    /// Err if `from` has left the ring or lies beyond the next seq.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Event>, Gap> {
        let oldest = self.oldest_seq();
        let from = if from == 0 { oldest } else { from };
        if from < oldest {
            return Err(Gap::Gone { oldest });
        }
        if from > self.next_seq {
            return Err(Gap::Future {
                next: self.next_seq,
            });
        }
        let skip = (from - oldest) as usize;
        Ok(self.ring.iter().skip(skip).take(max).cloned().collect())
    }

    /// The ring, for a live hand-over.
    pub fn export(&self) -> Vec<crate::upgrade::manifest::EventHandoff> {
        self.ring
            .iter()
            .map(|e| crate::upgrade::manifest::EventHandoff {
                seq: e.seq,
                ts_ms: e.ts_ms,
                agent: e.agent.to_string(),
                state: e.state().to_owned(),
                reason: e.reason().to_owned(),
            })
            .collect()
    }

    /// Take over an exported ring and its next seq (numbering continues).
    pub fn restore(&mut self, events: Vec<crate::upgrade::manifest::EventHandoff>, next_seq: u64) {
        for e in events {
            if self.ring.len() == self.capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(Event {
                seq: e.seq,
                ts_ms: e.ts_ms,
                agent: e.agent.into(),
                online: e.state == "online",
                reason: reason_code(&e.reason),
            });
        }
        self.next_seq = next_seq.max(self.next_seq);
    }

    /// A doorbell rung after every publish (coalesced).
    pub fn subscribe(&mut self) -> LocalReceiver<()> {
        let (tx, rx) = local_channel::new_bounded(1);
        self.doorbells.push(tx);
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u64) -> Transition {
        Transition {
            agent: format!("a{n}").into(),
            online: n.is_multiple_of(2),
            reason: "hello",
            ts_ms: n,
        }
    }

    #[test]
    fn resume_and_gap() {
        let mut log = EventLog::new(3, 1);
        for n in 0..5 {
            log.publish(t(n));
        }
        assert_eq!(log.next_seq(), 6);
        assert_eq!(log.oldest_seq(), 3);
        let got = log.read_from(4, 10).unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(log.read_from(2, 10), Err(Gap::Gone { oldest: 3 }));
        assert!(log.read_from(6, 10).unwrap().is_empty());
        assert_eq!(log.read_from(7, 10), Err(Gap::Future { next: 6 }));
        assert_eq!(log.read_from(0, 1).unwrap()[0].seq, 3);
    }

    #[test]
    fn line_format() {
        let mut log = EventLog::new(3, 41);
        log.publish(t(2));
        let line = log.read_from(41, 1).unwrap()[0].to_line();
        assert_eq!(
            line,
            "{\"seq\":41,\"ts_ms\":2,\"agent\":\"a2\",\"state\":\"online\",\"reason\":\"hello\"}\n"
        );
    }
}
