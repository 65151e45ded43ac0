//! Behaviour detectors over the connection events of each agent: a burst of denials
//! (`deny_rate`), many new peers (`fan_out`), many ports on one peer (`port_scan`), a burst of
//! denied inbound packets (`inbound_rate`) and silence (`inactivity`), configured per segment
//! by `[monitor]`.
//!
//! Not foolable by what others send: an ingress observation (a peer knocking on the agent's
//! ports, denied by its inbound rules) feeds `inbound_rate` only, never the egress detectors
//! that judge the agent's own behaviour, and `inbound_rate` can only alert (validation refuses
//! `quarantine`). A flood cannot hide either: an observation standing for `count` identical
//! denials counts `count` times in `deny_rate` (once in `fan_out` and `port_scan`: one peer,
//! one port), and denials whose records were lost are fed by [`Detectors::observe_denials`].
//!
//! Pure and deterministic: time is passed in (milliseconds), nothing is read from the clock or
//! the system. Memory is bounded whatever the input, counts included: every per-agent structure
//! is capped (a rate window holds at most `min(threshold, 1025)` `(time, count)` buckets), and
//! so is the number of agents (the least recently seen one is forgotten first).

mod window;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::mem::size_of;
use std::net::IpAddr;
use std::sync::Arc;

use crate::policy::{Action, Monitor, RateRule};
use window::{FanOut, PortScan, RateWindow, window_ms};

/// The agent id (or `"cgroup:<id>"` for member cgroups); opaque here.
pub type AgentKey = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
    /// Would have been denied; let through because the segment is in audit mode.
    AuditDeny,
}

/// Which way the connection or packet went, seen from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The agent's own connections and packets: `deny_rate`, `fan_out`, `port_scan`.
    Egress,
    /// Others' connections and packets to the agent: `inbound_rate` only.
    Ingress,
}

/// One connection event of an agent, or `count` identical ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation<'a> {
    pub now_ms: u64,
    pub agent: &'a str,
    pub segment: &'a str,
    pub verdict: Verdict,
    pub direction: Direction,
    /// The remote end: the destination of egress, the source of ingress.
    pub peer: IpAddr,
    /// The destination port (on the peer for egress, on the agent for ingress).
    pub port: u16,
    /// How many identical events this stands for (the kernel folds repeated denials of one
    /// flow into one record). 0 is taken as 1.
    pub count: u32,
}

/// A detector that fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// `"deny_rate"`, `"fan_out"`, `"port_scan"`, `"inbound_rate"` or `"inactivity"`.
    pub detector: &'static str,
    pub agent: AgentKey,
    pub segment: String,
    pub action: Action,
    /// One line with the figures, e.g. `deny_rate: 20 denials in 60s (threshold 20)`.
    pub reason: String,
}

/// Caps on the state kept; fields so that tests can use small ones.
#[derive(Debug, Clone, Copy)]
struct Limits {
    agents: usize,
    known_peers: usize,
    scan_peers: usize,
}

const LIMITS: Limits = Limits {
    agents: 65_536,
    known_peers: 4096,
    scan_peers: 1024,
};

/// Last traffic counter of an agent and since when it has not changed.
#[derive(Debug)]
struct Idle {
    total: u64,
    since: u64,
    fired: bool,
}

#[derive(Debug)]
struct AgentState {
    key: Arc<str>,
    /// State is kept for one segment at a time: an agent that moves starts afresh.
    segment: String,
    /// Sequence number of this agent's live entry in `Detectors::lru`.
    seq: u64,
    deny: RateWindow,
    fan_out: FanOut,
    scan: PortScan,
    inbound: RateWindow,
    idle: Option<Idle>,
}

impl AgentState {
    fn new(key: Arc<str>, segment: &str, seq: u64) -> Self {
        Self {
            key,
            segment: segment.to_string(),
            seq,
            deny: RateWindow::default(),
            fan_out: FanOut::default(),
            scan: PortScan::default(),
            inbound: RateWindow::default(),
            idle: None,
        }
    }

    /// Drops what `m` no longer needs: state of detectors that are off, entries over the cap.
    fn fit(&mut self, m: &Monitor) {
        if m.deny_rate.action == Action::Off {
            self.deny = RateWindow::default();
        }
        if m.fan_out.action == Action::Off {
            self.fan_out = FanOut::default();
        }
        if m.port_scan.action == Action::Off {
            self.scan = PortScan::default();
        }
        if m.inbound_rate.action == Action::Off {
            self.inbound = RateWindow::default();
        }
        if idle_rule(m).is_none() {
            self.idle = None;
        }
        self.deny.fit(&m.deny_rate);
        self.fan_out.fit(&m.fan_out);
        self.scan.fit(&m.port_scan);
        self.inbound.fit(&m.inbound_rate);
    }

    fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.key.len()
            + 2 * size_of::<usize>() // Arc counts
            + self.segment.capacity()
            + self.deny.bytes()
            + self.fan_out.bytes()
            + self.scan.bytes()
            + self.inbound.bytes()
    }
}

/// Whether every detector fed by egress observations is off.
fn egress_off(m: &Monitor) -> bool {
    [&m.deny_rate, &m.fan_out, &m.port_scan]
        .iter()
        .all(|r| r.action == Action::Off)
}

fn idle_rule(m: &Monitor) -> Option<crate::policy::IdleRule> {
    m.inactivity.clone().filter(|r| r.action != Action::Off)
}

fn firing(
    detector: &'static str,
    agent: &str,
    segment: &str,
    rule: &RateRule,
    reason: String,
) -> Firing {
    Firing {
        detector,
        agent: agent.to_string(),
        segment: segment.to_string(),
        action: rule.action,
        reason,
    }
}

fn deny_reason(count: u64, rule: &RateRule) -> String {
    let (w, t) = (show_ms(window_ms(rule)), rule.threshold);
    format!("deny_rate: {count} denials in {w} (threshold {t})")
}

/// Durations in reasons: whole seconds like the policy's usual windows, else milliseconds.
fn show_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// All detectors of all agents.
#[derive(Debug)]
pub struct Detectors {
    monitors: HashMap<String, Monitor>,
    agents: HashMap<Arc<str>, AgentState>,
    /// (seq, agent) in touch order; an entry is live when it matches the agent's `seq`. Stale
    /// entries are skipped on eviction and dropped when they outnumber the live ones.
    lru: VecDeque<(u64, Arc<str>)>,
    seq: u64,
    limits: Limits,
    /// Whether `observe` feeds deny_rate. The daemon turns it off: it feeds deny_rate from the
    /// kernel's exact per-member counters (`observe_denials`), which no flood can thin out,
    /// and counting the records too would count each denial twice.
    denials_from_observations: bool,
}

impl Default for Detectors {
    fn default() -> Self {
        Self::new()
    }
}

impl Detectors {
    pub fn new() -> Self {
        Self::with_limits(LIMITS)
    }

    fn with_limits(limits: Limits) -> Self {
        Self {
            monitors: HashMap::new(),
            agents: HashMap::new(),
            lru: VecDeque::new(),
            seq: 0,
            limits,
            denials_from_observations: true,
        }
    }

    /// deny_rate counts only what [`Detectors::observe_denials`] feeds (exact counters);
    /// observations still feed fan_out, port_scan and inbound_rate.
    pub fn with_exact_denials(mut self) -> Self {
        self.denials_from_observations = false;
        self
    }

    /// (Re)configure from a policy: segment name -> Monitor. Segments not listed use
    /// `Monitor::default()`. Existing state is kept (known peers stay known) but trimmed to
    /// the new rules.
    pub fn configure(&mut self, monitors: impl IntoIterator<Item = (String, Monitor)>) {
        self.monitors = monitors.into_iter().collect();
        for st in self.agents.values_mut() {
            let m = self.monitors.get(&st.segment).cloned().unwrap_or_default();
            st.fit(&m);
        }
    }

    fn monitor(&self, segment: &str) -> Monitor {
        // Plain data without heap parts: cloning is a copy, and frees `self` for `touch`.
        self.monitors.get(segment).cloned().unwrap_or_default()
    }

    /// Feed one event (or `count` identical ones); returns the detectors it made fire
    /// (normally none).
    pub fn observe(&mut self, o: &Observation<'_>) -> Vec<Firing> {
        let m = self.monitor(o.segment);
        let denied = matches!(o.verdict, Verdict::Deny | Verdict::AuditDeny);
        let n = u64::from(o.count.max(1));
        if o.direction == Direction::Ingress {
            // What others send the agent says nothing about the agent's own behaviour: it
            // feeds `inbound_rate` only, and only its denials count.
            let rule = &m.inbound_rate;
            if rule.action == Action::Off || !denied {
                return Vec::new();
            }
            let st = self.touch(o.agent, o.segment);
            let Some(k) = st.inbound.hit(o.now_ms, n, rule) else {
                return Vec::new();
            };
            let (w, t) = (show_ms(window_ms(rule)), rule.threshold);
            let msg = format!("inbound_rate: {k} inbound denials in {w} (threshold {t})");
            return vec![firing("inbound_rate", o.agent, o.segment, rule, msg)];
        }
        // Nothing to count: keep no state (inactivity has its own tick). Detectors that are
        // off are never fed below, and `configure` dropped what they held before.
        if egress_off(&m) {
            return Vec::new();
        }
        let (now, peer, port) = (o.now_ms, o.peer, o.port);
        let (limits, count_denials) = (self.limits, self.denials_from_observations);
        let st = self.touch(o.agent, o.segment);
        let mut fired = Vec::new();
        let mut fire = |detector: &'static str, rule: &RateRule, reason: String| {
            fired.push(firing(detector, o.agent, o.segment, rule, reason));
        };
        let rule = &m.deny_rate;
        if rule.action != Action::Off
            && denied
            && count_denials
            && let Some(k) = st.deny.hit(now, n, rule)
        {
            fire("deny_rate", rule, deny_reason(k, rule));
        }
        // One peer and one port however many events the observation stands for.
        let rule = &m.fan_out;
        if rule.action != Action::Off
            && let Some(k) = st.fan_out.hit(now, peer, rule, limits.known_peers)
        {
            let (w, t) = (show_ms(window_ms(rule)), rule.threshold);
            let msg = format!("fan_out: {k} new peers in {w} (threshold {t}), latest {peer}");
            fire("fan_out", rule, msg);
        }
        let rule = &m.port_scan;
        if rule.action != Action::Off
            && let Some(k) = st.scan.hit(now, peer, port, rule, limits.scan_peers)
        {
            let (w, t) = (show_ms(window_ms(rule)), rule.threshold);
            let msg = format!(
                "port_scan: {k} distinct ports on {peer} in {w} (threshold {t}), latest {port}"
            );
            fire("port_scan", rule, msg);
        }
        fired
    }

    /// Feed `n` egress denials of the agent known only as a number (the kernel counted them,
    /// but their records were lost to a full ring or the member's record budget): they count
    /// in `deny_rate` only, since a flood of denials is itself a sign. `n = 0` does nothing
    /// and keeps no state.
    pub fn observe_denials(
        &mut self,
        now_ms: u64,
        agent: &str,
        segment: &str,
        n: u64,
    ) -> Vec<Firing> {
        let m = self.monitor(segment);
        let rule = &m.deny_rate;
        if n == 0 || rule.action == Action::Off {
            return Vec::new();
        }
        let st = self.touch(agent, segment);
        st.deny
            .hit(now_ms, n, rule)
            .map(|k| firing("deny_rate", agent, segment, rule, deny_reason(k, rule)))
            .into_iter()
            .collect()
    }

    /// Periodic: inactivity. `activity_total` is a counter that grows with any traffic of the
    /// agent (allowed+denied); unchanged for `after` => fire, once until the counter moves
    /// again. The first tick of an agent starts its quiet period.
    pub fn tick_activity(
        &mut self,
        now_ms: u64,
        agent: &str,
        segment: &str,
        activity_total: u64,
    ) -> Option<Firing> {
        let m = self.monitor(segment);
        let Some(rule) = idle_rule(&m) else {
            if let Some(st) = self.agents.get_mut(agent) {
                st.idle = None;
            }
            return None;
        };
        let st = self.touch(agent, segment);
        let idle = st.idle.get_or_insert(Idle {
            total: activity_total,
            since: now_ms,
            fired: false,
        });
        if idle.total != activity_total {
            *idle = Idle {
                total: activity_total,
                since: now_ms,
                fired: false,
            };
            return None;
        }
        let quiet = now_ms.saturating_sub(idle.since);
        let after = u64::try_from(rule.after.as_millis()).unwrap_or(u64::MAX);
        if idle.fired || quiet < after {
            return None;
        }
        idle.fired = true;
        Some(Firing {
            detector: "inactivity",
            agent: agent.to_string(),
            segment: segment.to_string(),
            action: rule.action,
            reason: format!(
                "inactivity: no traffic for {} (after {})",
                show_ms(quiet),
                show_ms(after)
            ),
        })
    }

    pub fn forget(&mut self, agent: &str) {
        // Its `lru` entries become stale and are dropped later.
        self.agents.remove(agent);
    }

    /// Bytes of state held, roughly (for a memory bound test).
    pub fn state_size(&self) -> usize {
        let slot = size_of::<(Arc<str>, AgentState)>() + 1;
        size_of::<Self>()
            + self
                .monitors
                .keys()
                .map(|k| k.capacity() + size_of::<(String, Monitor)>() + 1)
                .sum::<usize>()
            + self.agents.capacity() * slot
            + self.agents.values().map(AgentState::bytes).sum::<usize>()
            + self.lru.capacity() * size_of::<(u64, Arc<str>)>()
    }

    /// The agent's state, created (evicting the least recently seen agent at the cap) or
    /// reset if it moved segment, and marked as seen now.
    fn touch(&mut self, agent: &str, segment: &str) -> &mut AgentState {
        self.seq += 1;
        let seq = self.seq;
        let back = self.lru.back().map(|e| e.0);
        let key = match self.agents.get_mut(agent) {
            Some(st) if st.segment == segment => {
                // Already the most recent entry: its position is unchanged.
                if back != Some(st.seq) {
                    st.seq = seq;
                    self.lru.push_back((seq, st.key.clone()));
                }
                st.key.clone()
            }
            Some(st) => {
                let key = st.key.clone();
                *st = AgentState::new(key.clone(), segment, seq);
                self.lru.push_back((seq, key.clone()));
                key
            }
            None => {
                self.evict_to(self.limits.agents.max(1) - 1);
                let key: Arc<str> = Arc::from(agent);
                self.agents
                    .insert(key.clone(), AgentState::new(key.clone(), segment, seq));
                self.lru.push_back((seq, key.clone()));
                key
            }
        };
        if self.lru.len() > 2 * self.agents.len() + 64 {
            let agents = &self.agents;
            self.lru
                .retain(|(s, k)| agents.get(k).is_some_and(|a| a.seq == *s));
        }
        // Present: inserted or found above. The fallback only avoids a panic path.
        self.agents
            .entry(key.clone())
            .or_insert_with(|| AgentState::new(key, segment, seq))
    }

    /// Forgets least recently seen agents until at most `n` remain.
    fn evict_to(&mut self, n: usize) {
        while self.agents.len() > n {
            let Some((seq, key)) = self.lru.pop_front() else {
                break;
            };
            if self.agents.get(&key).is_some_and(|a| a.seq == seq) {
                self.agents.remove(&key);
            }
        }
    }
}
