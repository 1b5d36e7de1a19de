//! A hashed timer wheel of deadlines, one per shard: no timer future per
//! connection. Inserting is O(1); each tick visits one slot. Entries whose
//! deadline lies beyond one turn of the wheel stay in their slot until the
//! turn they are due.
//!
//! Owners use it lazily: a heartbeat only moves the connection's `last_seen`;
//! when the entry fires the owner re-checks the real deadline and re-inserts
//! if it moved. Every live connection is in the wheel exactly once.

use std::time::{Duration, Instant};

pub struct DeadlineWheel<T> {
    origin: Instant,
    tick: Duration,
    slots: Vec<Vec<(u64, T)>>,
    /// Next tick to process.
    cursor: u64,
    len: usize,
}

impl<T> DeadlineWheel<T> {
    /// A wheel with `slots` slots of `tick` each, starting at `origin`.
    pub fn new(origin: Instant, tick: Duration, slots: usize) -> Self {
        assert!(slots > 0 && !tick.is_zero(), "wheel needs slots and a tick");
        Self {
            origin,
            tick,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            cursor: 0,
            len: 0,
        }
    }

    pub fn tick(&self) -> Duration {
        self.tick
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn tick_of(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.origin);
        // Round up: an entry never fires before its deadline.
        d.as_nanos().div_ceil(self.tick.as_nanos()) as u64
    }

    /// The tick `deadline` would be scheduled at.
    pub fn tick_for(&self, deadline: Instant) -> u64 {
        self.tick_of(deadline).max(self.cursor)
    }

    /// Schedule `item` at `deadline` (rounded up to the next tick). Returns
    /// the tick it is scheduled at, which [`Self::expire_with_tick`] reports.
    pub fn insert(&mut self, deadline: Instant, item: T) -> u64 {
        let t = self.tick_of(deadline).max(self.cursor);
        let n = self.slots.len() as u64;
        self.slots[(t % n) as usize].push((t, item));
        self.len += 1;
        t
    }

    /// Remove every entry due at or before `now`, handing each to `fire`.
    pub fn expire(&mut self, now: Instant, mut fire: impl FnMut(T)) {
        self.expire_with_tick(now, |_, item| fire(item))
    }

    /// Like [`Self::expire`], also giving the tick each entry was scheduled at.
    pub fn expire_with_tick(&mut self, now: Instant, mut fire: impl FnMut(u64, T)) {
        let now_tick = now.saturating_duration_since(self.origin).as_nanos() / self.tick.as_nanos();
        let now_tick = now_tick as u64;
        let n = self.slots.len() as u64;
        // Visit at most one full turn: every slot is seen once per turn.
        let start = if now_tick >= self.cursor + n {
            now_tick + 1 - n
        } else {
            self.cursor
        };
        for t in start..=now_tick {
            let slot = &mut self.slots[(t % n) as usize];
            let mut i = 0;
            while i < slot.len() {
                if slot[i].0 <= now_tick {
                    let (tick, item) = slot.swap_remove(i);
                    self.len -= 1;
                    fire(tick, item);
                } else {
                    i += 1;
                }
            }
        }
        if now_tick + 1 > self.cursor {
            self.cursor = now_tick + 1;
        }
    }

    /// Remove everything, returning the items.
    pub fn drain(&mut self) -> Vec<T> {
        self.len = 0;
        self.slots
            .iter_mut()
            .flat_map(|s| s.drain(..).map(|(_, it)| it))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_and_not_before() {
        let o = Instant::now();
        let ms = Duration::from_millis;
        let mut w = DeadlineWheel::new(o, ms(10), 8);
        w.insert(o + ms(25), "a");
        w.insert(o + ms(500), "far"); // several turns ahead
        w.insert(o + ms(5), "b");
        let mut got = vec![];
        w.expire(o + ms(9), |x| got.push(x));
        assert!(got.is_empty(), "nothing due before its tick: {got:?}");
        w.expire(o + ms(10), |x| got.push(x));
        assert_eq!(got, ["b"]);
        w.expire(o + ms(29), |x| got.push(x));
        assert_eq!(got, ["b"]);
        w.expire(o + ms(30), |x| got.push(x));
        assert_eq!(got, ["b", "a"]);
        for step in 4..49 {
            w.expire(o + ms(step * 10), |x| got.push(x));
        }
        assert_eq!(got, ["b", "a"]);
        w.expire(o + ms(500), |x| got.push(x));
        assert_eq!(got, ["b", "a", "far"]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_long_pause_fires_everything_due() {
        let o = Instant::now();
        let ms = Duration::from_millis;
        let mut w = DeadlineWheel::new(o, ms(10), 4);
        for i in 0..100u64 {
            w.insert(o + ms(i * 7), i);
        }
        let mut got = vec![];
        w.expire(o + ms(10_000), |x| got.push(x));
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn past_deadlines_fire_on_next_expire() {
        let o = Instant::now();
        let ms = Duration::from_millis;
        let mut w = DeadlineWheel::new(o, ms(10), 4);
        w.expire(o + ms(100), |_: u8| {});
        w.insert(o + ms(20), 1u8); // already past
        let mut got = vec![];
        w.expire(o + ms(110), |x| got.push(x));
        assert_eq!(got, [1]);
    }
}
