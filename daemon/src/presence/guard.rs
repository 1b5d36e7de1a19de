//! The mass-offline guard: when offline transitions within a sliding window
//! exceed a share of the online fleet, further offline events are held as
//! `suspect` instead of being published, and released later only for agents
//! that are still absent once the surge has passed.
//!
//! Pure logic, no I/O, no clock: every call takes `now_ms` (use the same
//! wall-clock ms as `Transition::ts_ms`; a clock step only shifts the
//! window, arithmetic saturates).
//!
//! # Where it runs and how it interacts with the owner shards
//!
//! Offline transitions are decided on the owner shards (several), but the
//! guard needs a fleet-wide view. It therefore lives on the **event shard**
//! (shard 0), which already receives every transition (`ShardMsg::Publish`)
//! before numbering it:
//!
//! 1. Owner shard `k` decides `Online → Offline` (BYE, timeout, grace expiry,
//!    `not_reconnected`), updates and persists its record, and sends
//!    `Publish(transition)` to shard 0 as today. The owner does not know or
//!    care whether the event will be held.
//! 2. Shard 0, for an **offline** transition, calls
//!    [`MassOfflineGuard::on_offline`] with its current fleet count. On
//!    [`Verdict::Publish`] it publishes as usual; on [`Verdict::Hold`] it
//!    publishes nothing: the guard keeps the event as `suspect`.
//! 3. Shard 0, for an **online** transition, calls
//!    [`MassOfflineGuard::on_online`] first. If the agent's offline is held,
//!    the held offline is dropped and the online event must be
//!    **suppressed** too ([`OnlineVerdict::Suppress`]): the platform never
//!    saw the agent go offline, so it must not see it come back either. The
//!    owner shard's record is Online again, which matches what the platform
//!    believes.
//! 4. Shard 0's ticker calls [`MassOfflineGuard::tick`]. Once the offline
//!    rate has stayed at or below the threshold for `release_quiet`, the
//!    guard deactivates and returns the held events; shard 0 publishes them
//!    (original `ts_ms` and reason). Every returned agent is still absent:
//!    any that came back were removed by step 3, and all transitions of one
//!    agent come from its single owner shard over one FIFO channel, so an
//!    online can never overtake the offline it cancels.
//!    Each held event is at least `release_quiet` old when released, so with
//!    `release_quiet >= presence.offline_grace` its agent had at least a full
//!    grace period to return.
//! 5. The operator (`presencectl guard`) sees [`MassOfflineGuard::status`]
//!    and [`MassOfflineGuard::held_list`], and can release everything
//!    ([`MassOfflineGuard::release_all`]) or one agent
//!    ([`MassOfflineGuard::release_agent`]); shard 0 publishes what they
//!    return.
//!
//! While an offline is held, the owner shard's record says Offline (`agent
//! <id>` shows it) while the platform still believes the agent is online;
//! `presencectl guard` shows the difference.
//!
//! **Fleet count.** Shard 0 passes the number of agents the daemon sees
//! online: the baseline sent by the owner shards at start (their online and
//! presumed-online counts after recovery), plus every online transition it
//! receives (published or suppressed), minus every offline transition it
//! receives (published or held); a release changes nothing (already
//! counted). Agents in grace count as online. The threshold is compared
//! with the share of the fleet that was online at the start of the window,
//! approximated as `online_fleet + window_offline`.
//!
//! **Early warning from drops.** Offline events of dropped connections only
//! appear when their grace expires, so a guard that counted only offline
//! events would publish the first `threshold_share` of a mass drop before
//! activating. The owner shards therefore also report, once per tick, how
//! many sessions entered grace ([`MassOfflineGuard::on_drops`]); a surge of
//! drops activates the guard at once, and the offline events that follow
//! when grace expires are all held (with `window + release_quiet >
//! offline_grace`, true for the defaults, the guard is still active then).
//! With the drop feed on ([`MassOfflineGuard::set_drop_feed`]), grace-expiry
//! offlines (`disconnect`) are not counted a second time, so steady churn
//! below the threshold never trips the guard; `bye`, `timeout` and
//! `not_reconnected` offlines are always counted.
//!
//! **Restart.** The held set is persisted by shard 0 (see
//! `store::shard_store::save_guard_held`); after a restart, held agents whose records
//! are Offline are presumed online (`store::recovery::recover_with_held`), so they
//! either reconnect silently or go offline as `not_reconnected`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::config::GuardConfig;
use crate::presence::table::Transition;

/// Buckets per sliding window.
const BUCKETS: u64 = 60;

/// What to do with an offline transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Publish,
    /// Held as suspect: publish nothing now.
    Hold,
}

/// What to do with an online transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnlineVerdict {
    Publish,
    /// The agent's offline was held and is now dropped: publish nothing.
    Suppress,
}

/// A held (suspect) offline event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    pub agent: Box<str>,
    pub reason: &'static str,
    /// When the agent went offline (the transition's ts_ms).
    pub ts_ms: u64,
    pub session: u64,
    /// When the guard held it.
    pub held_at_ms: u64,
}

impl Held {
    /// The offline transition to publish on release.
    pub fn to_transition(&self) -> Transition {
        Transition {
            agent: self.agent.clone(),
            online: false,
            reason: self.reason,
            ts_ms: self.ts_ms,
        }
    }
}

/// Guard state for `stats`, metrics and `presencectl guard`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardStatus {
    /// `disabled`, `inactive` or `active`.
    pub state: &'static str,
    pub enabled: bool,
    pub active: bool,
    pub held: usize,
    /// When the guard activated (None while inactive).
    pub since_ms: Option<u64>,
    /// When the rate fell to the threshold while active (None otherwise).
    pub quiet_since_ms: Option<u64>,
    /// Offline transitions in the current window.
    pub window_offline: u32,
    pub window_ms: u64,
    /// Online fleet as last reported.
    pub online_fleet: u64,
    /// window_offline / (online_fleet + window_offline).
    pub share: f64,
    pub threshold_share: f64,
    pub min_offline: u32,
    pub release_quiet_ms: u64,
    pub activations_total: u64,
    pub held_total: u64,
    pub released_total: u64,
    /// Held offlines dropped because the agent came back.
    pub suppressed_total: u64,
}

/// Offline transitions counted in `BUCKETS` buckets over the window.
#[derive(Debug, Clone)]
struct SlidingCount {
    bucket_ms: u64,
    buckets: VecDeque<(u64, u32)>,
}

impl SlidingCount {
    fn new(window: Duration) -> Self {
        let w = (window.as_millis() as u64).max(1);
        Self {
            bucket_ms: w.div_ceil(BUCKETS).max(1),
            buckets: VecDeque::new(),
        }
    }

    fn bucket(&self, now_ms: u64) -> u64 {
        now_ms / self.bucket_ms
    }

    /// Oldest bucket still inside the window at `now_ms`.
    fn first_live(&self, now_ms: u64) -> u64 {
        (self.bucket(now_ms) + 1).saturating_sub(BUCKETS)
    }

    fn add(&mut self, now_ms: u64, k: u32) {
        let b = self.bucket(now_ms);
        match self.buckets.back_mut() {
            Some((last, n)) if *last >= b => *n = n.saturating_add(k),
            _ => self.buckets.push_back((b, k)),
        }
        let first = self.first_live(now_ms);
        while self.buckets.front().is_some_and(|(i, _)| *i < first) {
            self.buckets.pop_front();
        }
    }

    fn count(&self, now_ms: u64) -> u32 {
        let first = self.first_live(now_ms);
        self.buckets
            .iter()
            .filter(|(i, _)| *i >= first)
            .fold(0u32, |a, (_, n)| a.saturating_add(*n))
    }

    fn clear(&mut self) {
        self.buckets.clear();
    }
}

pub struct MassOfflineGuard {
    cfg: GuardConfig,
    window: SlidingCount,
    active_since_ms: Option<u64>,
    quiet_since_ms: Option<u64>,
    /// Held events in hold order.
    held: BTreeMap<u64, Held>,
    by_agent: HashMap<Box<str>, u64>,
    next_hold: u64,
    online_fleet: u64,
    drop_feed: bool,
    activations: u64,
    held_total: u64,
    released_total: u64,
    suppressed_total: u64,
}

impl MassOfflineGuard {
    pub fn new(cfg: GuardConfig) -> Self {
        Self {
            window: SlidingCount::new(cfg.window),
            cfg,
            active_since_ms: None,
            quiet_since_ms: None,
            held: BTreeMap::new(),
            by_agent: HashMap::new(),
            next_hold: 0,
            online_fleet: 0,
            drop_feed: false,
            activations: 0,
            held_total: 0,
            released_total: 0,
            suppressed_total: 0,
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    pub fn is_active(&self) -> bool {
        self.active_since_ms.is_some()
    }

    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Held agents, in hold order (to persist them).
    pub fn held_agents(&self) -> impl Iterator<Item = &str> {
        self.held.values().map(|h| &*h.agent)
    }

    /// Declare that the owner shards report connection drops
    /// ([`Self::on_drops`]). Grace-expiry offlines (reason `disconnect`) are
    /// then not counted again: their drop was counted when it happened.
    pub fn set_drop_feed(&mut self, on: bool) {
        self.drop_feed = on;
    }

    /// `n` sessions dropped without BYE at `now_ms` and entered grace (the
    /// agents still count as online). Counted in the window, so a surge of
    /// drops activates the guard *before* their grace expires and the first
    /// offline events are produced; nothing is held by this call.
    pub fn on_drops(&mut self, now_ms: u64, n: u32, online_fleet: u64) {
        self.online_fleet = online_fleet;
        if n == 0 {
            return;
        }
        self.window.add(now_ms, n);
        let count = self.window.count(now_ms);
        if !self.cfg.enabled || !self.exceeds(count, online_fleet) {
            return;
        }
        self.quiet_since_ms = None;
        if !self.is_active() {
            self.activate(now_ms, count, online_fleet, "connection drops");
        }
    }

    fn activate(&mut self, now_ms: u64, n: u32, online_fleet: u64, cause: &'static str) {
        self.active_since_ms = Some(now_ms);
        self.activations += 1;
        tracing::warn!(
            window_offline = n,
            online_fleet,
            threshold_share = self.cfg.threshold_share,
            cause,
            "guard: active: offline surge, holding further offline events as suspect"
        );
    }

    fn exceeds(&self, n: u32, online_fleet: u64) -> bool {
        n >= self.cfg.min_offline
            && f64::from(n) > self.cfg.threshold_share * (online_fleet + u64::from(n)) as f64
    }

    /// An offline transition `t` (of `session`) reached the event shard;
    /// `online_fleet` is the fleet count after it. Publish or hold it.
    pub fn on_offline(
        &mut self,
        now_ms: u64,
        t: &Transition,
        session: u64,
        online_fleet: u64,
    ) -> Verdict {
        self.online_fleet = online_fleet;
        if t.reason == "bye" && !self.cfg.hold_bye {
            return Verdict::Publish;
        }
        // A revocation is the operator's decision, never a network artefact.
        if t.reason == "revoked" {
            return Verdict::Publish;
        }
        if !(self.drop_feed && t.reason == "disconnect") {
            self.window.add(now_ms, 1);
        }
        if !self.cfg.enabled {
            return Verdict::Publish;
        }
        let n = self.window.count(now_ms);
        let exceeds = self.exceeds(n, online_fleet);
        if !self.is_active() {
            if !exceeds {
                return Verdict::Publish;
            }
            self.activate(now_ms, n, online_fleet, "offline transitions");
        }
        if exceeds {
            self.quiet_since_ms = None;
        }
        self.hold(now_ms, t, session);
        Verdict::Hold
    }

    /// A process that took over by a live upgrade: hold again the offline
    /// events the previous one held (ids from the state directory), still
    /// active, so they are released only once the surge has passed.
    pub fn restore_held(&mut self, now_ms: u64, agents: impl IntoIterator<Item = Box<str>>) {
        let mut any = false;
        for agent in agents {
            let t = Transition {
                agent,
                online: false,
                reason: "disconnect",
                ts_ms: now_ms,
            };
            self.hold(now_ms, &t, 0);
            any = true;
        }
        if any && !self.is_active() {
            self.activate(now_ms, 0, self.online_fleet, "held events handed over");
        }
    }

    fn hold(&mut self, now_ms: u64, t: &Transition, session: u64) {
        let h = Held {
            agent: t.agent.clone(),
            reason: t.reason,
            ts_ms: t.ts_ms,
            session,
            held_at_ms: now_ms,
        };
        if let Some(old) = self.by_agent.get(&t.agent) {
            // Cannot happen with a consistent owner; keep the newest event.
            if let Some(slot) = self.held.get_mut(old) {
                *slot = h;
                return;
            }
        }
        let k = self.next_hold;
        self.next_hold += 1;
        self.by_agent.insert(h.agent.clone(), k);
        self.held.insert(k, h);
        self.held_total += 1;
    }

    /// An online transition for `agent` reached the event shard. If its
    /// offline is held, both are dropped: suppress the online event.
    pub fn on_online(&mut self, agent: &str) -> OnlineVerdict {
        match self.by_agent.remove(agent) {
            Some(k) => {
                self.held.remove(&k);
                self.suppressed_total += 1;
                OnlineVerdict::Suppress
            }
            None => OnlineVerdict::Publish,
        }
    }

    /// Periodic check (shard 0 ticker). Once the rate has stayed at or below
    /// the threshold for `release_quiet`, deactivate and return the held
    /// events (all of still-absent agents) to publish, in hold order.
    pub fn tick(&mut self, now_ms: u64, online_fleet: u64) -> Vec<Held> {
        self.online_fleet = online_fleet;
        if !self.is_active() {
            return Vec::new();
        }
        let n = self.window.count(now_ms);
        if self.exceeds(n, online_fleet) {
            self.quiet_since_ms = None;
            return Vec::new();
        }
        let quiet = *self.quiet_since_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(quiet) < self.cfg.release_quiet.as_millis() as u64 {
            return Vec::new();
        }
        let out = self.drain();
        tracing::info!(
            released = out.len(),
            suppressed_total = self.suppressed_total,
            "guard: inactive: surge over, releasing held offline events of agents still absent"
        );
        out
    }

    fn drain(&mut self) -> Vec<Held> {
        self.active_since_ms = None;
        self.quiet_since_ms = None;
        self.by_agent.clear();
        let out: Vec<Held> = std::mem::take(&mut self.held).into_values().collect();
        self.released_total += out.len() as u64;
        out
    }

    /// Operator release (`presencectl guard release`): return every held
    /// event to publish, deactivate, and restart counting from an empty
    /// window (a continuing surge re-activates the guard afresh).
    pub fn release_all(&mut self, now_ms: u64) -> Vec<Held> {
        let out = self.drain();
        self.window.clear();
        tracing::warn!(
            released = out.len(),
            now_ms,
            "guard: inactive: operator released held offline events"
        );
        out
    }

    /// Operator release of one agent's held offline event.
    pub fn release_agent(&mut self, agent: &str) -> Option<Held> {
        let k = self.by_agent.remove(agent)?;
        let h = self.held.remove(&k)?;
        self.released_total += 1;
        Some(h)
    }

    pub fn status(&self, now_ms: u64) -> GuardStatus {
        let n = self.window.count(now_ms);
        let base = self.online_fleet + u64::from(n);
        GuardStatus {
            state: match (self.cfg.enabled, self.is_active()) {
                (false, _) => "disabled",
                (true, false) => "inactive",
                (true, true) => "active",
            },
            enabled: self.cfg.enabled,
            active: self.is_active(),
            held: self.held.len(),
            since_ms: self.active_since_ms,
            quiet_since_ms: self.quiet_since_ms,
            window_offline: n,
            window_ms: self.cfg.window.as_millis() as u64,
            online_fleet: self.online_fleet,
            share: if base == 0 {
                0.0
            } else {
                f64::from(n) / base as f64
            },
            threshold_share: self.cfg.threshold_share,
            min_offline: self.cfg.min_offline,
            release_quiet_ms: self.cfg.release_quiet.as_millis() as u64,
            activations_total: self.activations,
            held_total: self.held_total,
            released_total: self.released_total,
            suppressed_total: self.suppressed_total,
        }
    }

    /// Up to `limit` held events, oldest hold first.
    pub fn held_list(&self, limit: usize) -> Vec<Held> {
        self.held.values().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off(agent: &str, ts: u64) -> Transition {
        Transition {
            agent: agent.into(),
            online: false,
            reason: "disconnect",
            ts_ms: ts,
        }
    }

    fn cfg() -> GuardConfig {
        GuardConfig {
            min_offline: 5,
            ..GuardConfig::default()
        }
    }

    /// Drop `n` agents of a fleet of `fleet` at time `t`; verdicts.
    fn drop_n(g: &mut MassOfflineGuard, n: u64, fleet: u64, t: u64) -> Vec<Verdict> {
        (0..n)
            .map(|i| g.on_offline(t, &off(&format!("a{i}"), t), i, fleet - i - 1))
            .collect()
    }

    #[test]
    fn under_threshold_publishes() {
        let mut g = MassOfflineGuard::new(cfg());
        // 1000 agents, 50 offline in a minute = exactly 5 %: not above.
        let v = drop_n(&mut g, 50, 1000, 1_000);
        assert!(v.iter().all(|v| *v == Verdict::Publish));
        assert!(!g.is_active());
        assert_eq!(g.status(1_000).window_offline, 50);
        assert_eq!(g.status(1_000).state, "inactive");
        // Spread out over time, the window slides and nothing trips.
        let mut g = MassOfflineGuard::new(cfg());
        for i in 0..500u64 {
            let t = i * 2_000; // one per 2 s: 30 per minute of 1000
            assert_eq!(
                g.on_offline(t, &off(&format!("s{i}"), t), 0, 1000),
                Verdict::Publish
            );
        }
    }

    #[test]
    fn surge_holds_and_reports_active() {
        let mut g = MassOfflineGuard::new(cfg());
        let v = drop_n(&mut g, 500, 1000, 1_000);
        assert_eq!(v.iter().filter(|v| **v == Verdict::Publish).count(), 50);
        assert!(v[..50].iter().all(|v| *v == Verdict::Publish));
        assert!(v[50..].iter().all(|v| *v == Verdict::Hold));
        let s = g.status(1_000);
        assert_eq!((s.state, s.active, s.held), ("active", true, 450));
        assert_eq!(s.since_ms, Some(1_000));
        assert_eq!(s.activations_total, 1);
        let l = g.held_list(2);
        assert_eq!((&*l[0].agent, l[0].session), ("a50", 50));
        assert_eq!(l[0].reason, "disconnect");
        serde_json::to_string(&s).unwrap();
        serde_json::to_string(&l).unwrap();
    }

    #[test]
    fn half_the_fleet_dropping_and_returning_publishes_nothing_more() {
        // 50 % connection drop where everybody comes back.
        let mut g = MassOfflineGuard::new(GuardConfig {
            min_offline: 1,
            ..GuardConfig::default()
        });
        let mut published = 0;
        let mut fleet = 400u64;
        for i in 0..200 {
            fleet -= 1;
            if g.on_offline(10, &off(&format!("a{i}"), 10), 0, fleet) == Verdict::Publish {
                published += 1;
            }
        }
        // min_offline 1 with 5 %: the first 20 (5 % of 400) get out.
        assert_eq!(published, 20);
        let held = g.held_len();
        assert_eq!(held, 180);
        // Everybody reconnects: the published ones produce an online event,
        // the held ones produce nothing at all.
        let suppressed = (0..200)
            .filter(|i| g.on_online(&format!("a{i}")) == OnlineVerdict::Suppress)
            .count();
        assert_eq!(suppressed, held);
        assert_eq!(g.held_len(), 0);
        assert!(g.tick(200_000, 400).is_empty(), "nothing left to release");
        assert_eq!(g.status(200_000).suppressed_total, 180);
    }

    #[test]
    fn mass_drop_seen_early_publishes_zero_offline_events() {
        // 1000 agents, 500 connections drop at t=0 and enter grace (60 s).
        let mut g = MassOfflineGuard::new(GuardConfig::default());
        g.set_drop_feed(true);
        g.on_drops(0, 500, 1000);
        assert_eq!(g.status(0).state, "active");
        // 300 reconnect within grace: no transitions at all. The other 200
        // expire at 60 s: every one of them is held.
        let mut fleet = 1000;
        for i in 0..200 {
            fleet -= 1;
            let v = g.on_offline(60_000, &off(&format!("a{i}"), 60_000), 0, fleet);
            assert_eq!(v, Verdict::Hold, "offline #{i} must not be published");
        }
        // 150 of them come back later: nothing published either way.
        for i in 0..150 {
            assert_eq!(g.on_online(&format!("a{i}")), OnlineVerdict::Suppress);
        }
        // Quiet from 60 s (drops left the window, expiries not counted).
        assert!(g.tick(61_000, 950).is_empty());
        let rel = g.tick(121_000, 950);
        assert_eq!(rel.len(), 50, "only the still absent are released");
        assert!(rel.iter().all(|h| h.agent.as_ref() >= "a150"));
    }

    #[test]
    fn steady_churn_with_drop_feed_never_trips() {
        // 3 % of 1000 drop every minute and all expire 60 s later: without
        // the drop feed's de-duplication that would count as 6 %.
        let mut g = MassOfflineGuard::new(GuardConfig::default());
        g.set_drop_feed(true);
        for minute in 0..10u64 {
            let t = minute * 60_000;
            g.on_drops(t, 30, 1000);
            for i in 0..30 {
                let v = g.on_offline(t + 1, &off(&format!("m{minute}-{i}"), t), 0, 970);
                assert_eq!(v, Verdict::Publish);
            }
            assert!(g.tick(t + 2, 970).is_empty());
        }
        assert_eq!(g.status(600_000).activations_total, 0);
        // A drop surge below min_offline does nothing either.
        g.on_drops(700_000, 19, 20);
        assert!(!g.is_active());
    }

    #[test]
    fn comeback_during_hold_suppresses_both() {
        let mut g = MassOfflineGuard::new(cfg());
        drop_n(&mut g, 200, 1000, 0);
        assert!(g.held_agents().any(|a| a == "a150"));
        assert_eq!(g.on_online("a150"), OnlineVerdict::Suppress);
        assert!(!g.held_agents().any(|a| a == "a150"));
        // Its offline will never be released.
        let rel = g.release_all(1);
        assert!(rel.iter().all(|h| &*h.agent != "a150"));
        // A published offline is followed by a published online.
        assert_eq!(g.on_online("a1"), OnlineVerdict::Publish);
    }

    #[test]
    fn quiet_period_releases_only_still_absent() {
        let mut g = MassOfflineGuard::new(cfg());
        drop_n(&mut g, 200, 1000, 0);
        let held = g.held_len();
        g.on_online("a100");
        g.on_online("a199");
        // Still within the window: the surge is still counted.
        assert!(g.tick(30_000, 800).is_empty());
        // The surge leaves the window at 60 s; quiet starts.
        assert!(g.tick(61_000, 800).is_empty());
        assert_eq!(g.status(61_000).quiet_since_ms, Some(61_000));
        assert!(g.tick(120_999, 800).is_empty(), "quiet not long enough");
        let rel = g.tick(121_000, 800);
        assert_eq!(rel.len(), held - 2);
        assert!(rel
            .iter()
            .all(|h| &*h.agent != "a100" && &*h.agent != "a199"));
        assert_eq!(&*rel[0].agent, "a50", "hold order");
        let t = rel[0].to_transition();
        assert_eq!((t.online, t.reason, t.ts_ms), (false, "disconnect", 0));
        let s = g.status(121_000);
        assert_eq!(
            (s.active, s.held, s.released_total),
            (false, 0, (held - 2) as u64)
        );
        // Back to normal: offlines publish again.
        assert_eq!(
            g.on_offline(130_000, &off("z", 1), 0, 800),
            Verdict::Publish
        );
    }

    #[test]
    fn renewed_surge_resets_quiet() {
        let mut g = MassOfflineGuard::new(cfg());
        drop_n(&mut g, 200, 1000, 0);
        assert!(g.tick(61_000, 800).is_empty());
        assert!(g.status(61_000).quiet_since_ms.is_some());
        // A second wave before the quiet period ends.
        for i in 0..100 {
            let v = g.on_offline(70_000, &off(&format!("b{i}"), 70_000), 0, 800 - i);
            assert_eq!(v, Verdict::Hold);
        }
        assert_eq!(g.status(70_000).quiet_since_ms, None);
        assert!(g.tick(125_000, 700).is_empty());
        assert!(
            g.tick(131_000, 700).is_empty(),
            "wave 2 left window: quiet starts"
        );
        assert_eq!(g.tick(191_000, 700).len(), 250);
    }

    #[test]
    fn operator_release() {
        let mut g = MassOfflineGuard::new(cfg());
        drop_n(&mut g, 200, 1000, 0);
        let one = g.release_agent("a60").unwrap();
        assert_eq!(&*one.agent, "a60");
        assert!(g.release_agent("a60").is_none());
        assert!(g.is_active(), "releasing one does not deactivate");
        let all = g.release_all(5);
        assert_eq!(all.len(), 149);
        let s = g.status(5);
        assert_eq!((s.active, s.held, s.window_offline), (false, 0, 0));
        // Counting starts afresh: the next few offlines publish.
        assert_eq!(g.on_offline(6, &off("n", 6), 0, 800), Verdict::Publish);
    }

    #[test]
    fn disabled_always_publishes() {
        let mut g = MassOfflineGuard::new(GuardConfig {
            enabled: false,
            ..cfg()
        });
        assert!(drop_n(&mut g, 900, 1000, 0)
            .iter()
            .all(|v| *v == Verdict::Publish));
        assert_eq!(g.on_online("a1"), OnlineVerdict::Publish);
        assert!(g.tick(100_000, 100).is_empty());
        assert_eq!(g.status(0).state, "disabled");
    }

    #[test]
    fn min_offline_protects_small_fleets() {
        let mut g = MassOfflineGuard::new(GuardConfig::default()); // min 20
                                                                   // 10 agents all dropping: 100 %, but under min_offline.
        assert!(drop_n(&mut g, 10, 10, 0)
            .iter()
            .all(|v| *v == Verdict::Publish));
        assert!(!g.is_active());
        // 40 agents: the 20th offline trips it.
        let mut g = MassOfflineGuard::new(GuardConfig::default());
        let v = drop_n(&mut g, 40, 40, 0);
        assert!(v[..19].iter().all(|v| *v == Verdict::Publish));
        assert!(v[19..].iter().all(|v| *v == Verdict::Hold));
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: GuardConfig = toml::from_str("window = \"30s\"\nthreshold_share = 0.1").unwrap();
        assert!(c.enabled);
        assert_eq!(c.window, Duration::from_secs(30));
        assert_eq!(c.release_quiet, Duration::from_secs(60));
        assert_eq!(c.min_offline, 20);
        assert!(c.validate().is_ok());
        let bad = GuardConfig {
            threshold_share: 0.0,
            ..GuardConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<GuardConfig>("typo = 1").is_err());
    }

    #[test]
    fn window_slides() {
        let mut w = SlidingCount::new(Duration::from_secs(60));
        w.add(0, 1);
        w.add(30_000, 1);
        assert_eq!(w.count(59_999), 2);
        assert_eq!(w.count(60_000), 1);
        assert_eq!(w.count(90_000), 0);
        w.add(200_000, 1);
        assert_eq!(w.buckets.len(), 1, "old buckets dropped");
    }
}
