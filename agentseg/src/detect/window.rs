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

fn threshold(rule: &RateRule) -> usize {
    usize::try_from(rule.threshold).unwrap_or(usize::MAX).max(1)
}

/// Rough heap bytes of a hash table: buckets plus one control byte each.
fn table_bytes<T>(capacity: usize) -> usize {
    capacity * (size_of::<T>() + 1)
}

/// Timestamps of the events in the current window, plus the cooldown after a firing.
#[derive(Debug, Default)]
pub(super) struct RateWindow {
    events: VecDeque<u64>,
    cooldown_until: u64,
}

impl RateWindow {
    /// Records one event; returns the count in the window if that makes the detector fire.
    pub fn hit(&mut self, now: u64, rule: &RateRule) -> Option<usize> {
        let window = window_ms(rule);
        while self
            .events
            .front()
            .is_some_and(|&t| expired(t, now, window))
        {
            self.events.pop_front();
        }
        // Never more than `threshold` entries: the count only needs to reach it.
        if self.events.len() >= threshold(rule) {
            self.events.pop_front();
        }
        self.events.push_back(now);
        if self.events.len() < threshold(rule) || now < self.cooldown_until {
            return None;
        }
        let count = self.events.len();
        self.events.clear();
        self.cooldown_until = now.saturating_add(window);
        Some(count)
    }

    /// Applies a new rule to existing state: keeps at most `threshold` newest entries.
    pub fn fit(&mut self, rule: &RateRule) {
        while self.events.len() > threshold(rule) {
            self.events.pop_front();
        }
    }

    pub fn bytes(&self) -> usize {
        self.events.capacity() * size_of::<u64>()
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
    pub fn hit(&mut self, now: u64, peer: IpAddr, rule: &RateRule, cap: usize) -> Option<usize> {
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
        self.new_peers.hit(now, rule)
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
    ) -> Option<usize> {
        let window = window_ms(rule);
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= cap.max(1)
                && let Some(old) = self.order.pop_front()
            {
                self.peers.remove(&old);
            }
            self.order.push_back(peer);
        }
        let ports = self.peers.entry(peer).or_default();
        let count = ports.hit(now, port, window, threshold(rule));
        if count < threshold(rule) || now < self.cooldown_until {
            return None;
        }
        ports.clear();
        self.cooldown_until = now.saturating_add(window);
        Some(count)
    }

    pub fn fit(&mut self, rule: &RateRule) {
        for ports in self.peers.values_mut() {
            ports.fit(threshold(rule));
        }
    }

    pub fn bytes(&self) -> usize {
        table_bytes::<(IpAddr, Ports)>(self.peers.capacity())
            + self.order.capacity() * size_of::<IpAddr>()
            + self.peers.values().map(Ports::bytes).sum::<usize>()
    }
}
