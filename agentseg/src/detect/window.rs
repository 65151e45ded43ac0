//! Per-agent sliding windows. Each tracker is capped so that no input can grow it without
//! bound, and does O(1) amortized work per event (expired entries are dropped from the front
//! as time moves on, each entry once).

use std::collections::{HashMap, HashSet, VecDeque};
use std::mem::size_of;
use std::net::IpAddr;

use crate::policy::RateRule;

/// Window length in milliseconds (windows are at most 30 days, far below u64::MAX).
pub(super) fn window_ms(rule: &RateRule) -> u64 {
    u64::try_from(rule.window.as_millis()).unwrap_or(u64::MAX)
}

/// An event at `ts` no longer counts at `now` once a full window has passed.
fn expired(ts: u64, now: u64, window: u64) -> bool {
    ts.saturating_add(window) <= now
}

fn threshold(rule: &RateRule) -> u64 {
    u64::from(rule.threshold).max(1)
}

/// Rough heap bytes of a hash table: buckets plus one control byte each.
fn table_bytes<T>(capacity: usize) -> usize {
    capacity * (size_of::<T>() + 1)
}

/// A [`RateWindow`] keeps at most `BUCKETS + 1` buckets whatever the threshold and the
/// input: time is cut in grains of `window / BUCKETS` (rounded up to a whole millisecond), and
/// the events of one grain share a bucket.
pub(super) const BUCKETS: u64 = 1024;

/// Most events one bucket counts (2^53): the sum of `BUCKETS + 1` full ones still fits a u64,
/// so the window's total is exact (and it saturates rather than overflow in any case, e.g.
/// just after a new rule shortened the grain).
const BUCKET_MAX: u64 = 1 << 53;

/// The events of the current window as `(time, count)` buckets, oldest first, plus the
/// cooldown after a firing.
///
/// Bounded whatever the input: a hit of `n` events is one bucket (or none: it joins the newest
/// bucket when that is of the same grain), and buckets no longer needed to reach the
/// threshold are dropped, so there are never more than `min(threshold, BUCKETS + 1)` of them.
/// A bucket carries the time of its newest event, so an event may count for up to one grain
/// (about 0.1% of the window) longer than the window, never shorter: grouping can only make a
/// detector fire sooner, never miss a burst.
#[derive(Debug, Default)]
pub(super) struct RateWindow {
    buckets: VecDeque<(u64, u64)>,
    /// Sum of the buckets' counts (see `BUCKET_MAX`).
    total: u64,
    cooldown_until: u64,
}

impl RateWindow {
    /// Records `n` events at `now` (0 records nothing); returns the count in the window if
    /// that makes the detector fire (at least the threshold; older events the count did not
    /// need may be left out).
    pub fn hit(&mut self, now: u64, n: u64, rule: &RateRule) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let window = window_ms(rule);
        while let Some(&(t, k)) = self.buckets.front() {
            if !expired(t, now, window) {
                break;
            }
            self.buckets.pop_front();
            self.total = self.total.saturating_sub(k);
        }
        let grain = window.div_ceil(BUCKETS).max(1);
        match self.buckets.back_mut() {
            // Same grain, or out of order (records of several CPUs): joins the newest bucket,
            // which keeps the later time.
            Some((t, k)) if now / grain <= *t / grain => {
                let before = *k;
                *t = (*t).max(now);
                *k = k.saturating_add(n).min(BUCKET_MAX);
                self.total = self.total.saturating_add(*k - before);
            }
            _ => {
                let k = n.min(BUCKET_MAX);
                self.buckets.push_back((now, k));
                self.total = self.total.saturating_add(k);
            }
        }
        self.trim(rule);
        if self.total < threshold(rule) || now < self.cooldown_until {
            return None;
        }
        let count = self.total;
        self.buckets.clear();
        self.total = 0;
        self.cooldown_until = now.saturating_add(window);
        Some(count)
    }

    /// Drops the oldest buckets while the rest still reach the threshold: the count only needs
    /// to reach it.
    fn trim(&mut self, rule: &RateRule) {
        let need = threshold(rule);
        while let Some(&(_, k)) = self.buckets.front() {
            if self.buckets.len() < 2 || self.total.saturating_sub(k) < need {
                break;
            }
            self.buckets.pop_front();
            self.total = self.total.saturating_sub(k);
        }
    }

    /// Applies a new rule to existing state: drops what the new threshold does not need.
    pub fn fit(&mut self, rule: &RateRule) {
        self.trim(rule);
    }

    pub fn bytes(&self) -> usize {
        self.buckets.capacity() * size_of::<(u64, u64)>()
    }

    #[cfg(test)]
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }
}

/// Peers an agent has contacted (capped, oldest forgotten first) and the window of new ones.
#[derive(Debug, Default)]
pub(super) struct FanOut {
    known: HashSet<IpAddr>,
    /// Same members as `known`, oldest first.
    order: VecDeque<IpAddr>,
    new_peers: RateWindow,
}

impl FanOut {
    pub fn hit(&mut self, now: u64, peer: IpAddr, rule: &RateRule, cap: usize) -> Option<u64> {
        if self.known.contains(&peer) {
            return None;
        }
        if self.known.len() >= cap.max(1)
            && let Some(old) = self.order.pop_front()
        {
            self.known.remove(&old);
        }
        self.known.insert(peer);
        self.order.push_back(peer);
        self.new_peers.hit(now, 1, rule)
    }

    pub fn fit(&mut self, rule: &RateRule) {
        self.new_peers.fit(rule);
    }

    pub fn bytes(&self) -> usize {
        table_bytes::<IpAddr>(self.known.capacity())
            + self.order.capacity() * size_of::<IpAddr>()
            + self.new_peers.bytes()
    }
}

/// Distinct ports of one peer with the last time each was seen.
#[derive(Debug, Default)]
struct Ports {
    last: HashMap<u16, u64>,
    /// Every recorded (port, time) in time order; an entry is live while it is the port's
    /// latest. Stale entries are dropped when they reach the front or by `compact`.
    order: VecDeque<(u16, u64)>,
}

impl Ports {
    /// Records `port` at `now`; returns the number of distinct ports in the window.
    fn hit(&mut self, now: u64, port: u16, window: u64, cap: usize) -> usize {
        while let Some(&(p, t)) = self.order.front() {
            if !expired(t, now, window) {
                break;
            }
            self.order.pop_front();
            if self.last.get(&p) == Some(&t) {
                self.last.remove(&p);
            }
        }
        if !self.last.contains_key(&port) {
            // At the cap (only during a cooldown): the port seen least recently makes room.
            while self.last.len() >= cap.max(1) {
                let Some((p, t)) = self.order.pop_front() else {
                    break;
                };
                if self.last.get(&p) == Some(&t) {
                    self.last.remove(&p);
                }
            }
        }
        self.last.insert(port, now);
        self.order.push_back((port, now));
        // Repeated ports leave stale entries behind; dropping them whenever they outnumber the
        // live ones keeps `order` bounded at O(1) amortized cost.
        if self.order.len() > 2 * self.last.len() + 16 {
            let last = &self.last;
            self.order.retain(|(p, t)| last.get(p) == Some(t));
        }
        self.last.len()
    }

    fn fit(&mut self, cap: usize) {
        while self.last.len() > cap.max(1) {
            let Some((p, t)) = self.order.pop_front() else {
                break;
            };
            if self.last.get(&p) == Some(&t) {
                self.last.remove(&p);
            }
        }
    }

    fn clear(&mut self) {
        self.last.clear();
        self.order.clear();
    }

    fn bytes(&self) -> usize {
        table_bytes::<(u16, u64)>(self.last.capacity())
            + self.order.capacity() * size_of::<(u16, u64)>()
    }
}

/// Port-scan trackers of one agent, one per peer (capped, oldest tracker evicted first).
#[derive(Debug, Default)]
pub(super) struct PortScan {
    peers: HashMap<IpAddr, Ports>,
    /// Same keys as `peers`, oldest first.
    order: VecDeque<IpAddr>,
    cooldown_until: u64,
}

impl PortScan {
    /// Records a connection to `peer:port`; returns the distinct port count if it fires.
    pub fn hit(
        &mut self,
        now: u64,
        peer: IpAddr,
        port: u16,
        rule: &RateRule,
        cap: usize,
    ) -> Option<u64> {
        let window = window_ms(rule);
        let need = usize::try_from(threshold(rule)).unwrap_or(usize::MAX);
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= cap.max(1)
                && let Some(old) = self.order.pop_front()
            {
                self.peers.remove(&old);
            }
            self.order.push_back(peer);
        }
        let ports = self.peers.entry(peer).or_default();
        let count = ports.hit(now, port, window, need);
        if count < need || now < self.cooldown_until {
            return None;
        }
        ports.clear();
        self.cooldown_until = now.saturating_add(window);
        Some(u64::try_from(count).unwrap_or(u64::MAX))
    }

    pub fn fit(&mut self, rule: &RateRule) {
        for ports in self.peers.values_mut() {
            ports.fit(usize::try_from(threshold(rule)).unwrap_or(usize::MAX));
        }
    }

    pub fn bytes(&self) -> usize {
        table_bytes::<(IpAddr, Ports)>(self.peers.capacity())
            + self.order.capacity() * size_of::<IpAddr>()
            + self.peers.values().map(Ports::bytes).sum::<usize>()
    }
}
