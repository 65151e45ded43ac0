//! The engine's side of the event pipeline: naming who a record is about (agents, member
//! cgroups, agents that just left), feeding the detectors (deny_rate from the kernel's exact
//! counters), acting on their firings, the sweep of quiet aggregated flows, and the `audit`
//! report. What a record becomes (audit line, subscribers) is `events.rs`'s, which knows
//! nothing of the engine.
use std::{collections::HashMap, rc::Rc};

use agentseg_common::{HOOK_DNS, HOOK_SKB_INGRESS, VERDICT_AUDIT, VERDICT_DENY};
use serde_json::{Value, json};
use tracing::warn;

use super::{
    engine::Engine,
    events::{Record, Who, addr},
};
/// How long a member stays hot after its last record.
const HOT_MS: u64 = 5_000;

use crate::{
    control::Target,
    detect::{Firing, Observation, Verdict},
    policy::Action,
};

impl Engine {
    /// Enrich, log, publish and judge a batch of kernel records.
    pub fn on_events(&mut self, batch: Vec<Record>) {
        let mut firings = Vec::new();
        // A batch nearly always comes from a few members: name each once. Membership cannot
        // change within a batch (this thread owns it), so the memo cannot go stale.
        let mut who: HashMap<(u64, u32), Rc<Who>> = HashMap::new();
        // Kernel timestamps are CLOCK_BOOTTIME: wall time = now - age, both read once.
        let boot_now = crate::datapath::boottime_ns();
        let wall_now = super::engine::now_unix_ms();
        for r in &batch {
            let e = &r.event;
            let count = self.sink.count_of(r);
            if count == 0 {
                // Everything it reports was counted already (by a sweep).
                continue;
            }
            let w = who
                .entry((e.cgroup_id, e.segment_id))
                .or_insert_with(|| {
                    let (segment, agent_id, cgroup) = self.identify(e.cgroup_id, e.segment_id);
                    let agent_key = agent_id
                        .clone()
                        .unwrap_or_else(|| format!("cgroup:{}", e.cgroup_id));
                    Rc::new(Who {
                        segment,
                        agent_id,
                        cgroup,
                        agent_key,
                    })
                })
                .clone();
            let egress = e.hook != HOOK_SKB_INGRESS;
            let domain = if egress && e.hook != HOOK_DNS {
                let peer = addr(e.family, e.daddr);
                self.dns
                    .learned
                    .name_for(&w.segment, peer)
                    .or_else(|| self.dns.seen.name_for(&w.segment, peer, boot_now))
                    .map(str::to_owned)
            } else {
                None
            };
            if r.dns.is_none() {
                self.sink.read += 1;
                if e.verdict != agentseg_common::VERDICT_ALLOW {
                    self.sink.denials_reported += count;
                }
            }
            // Kernel timestamps are CLOCK_BOOTTIME: wall time = now - age.
            let ts_ms = wall_now.saturating_sub(boot_now.saturating_sub(e.ts_ns) / 1_000_000);
            self.sink.publish(r, &w, count, domain.as_deref(), ts_ms);
            let segment = &w.segment;
            let (src, dst) = (addr(e.family, e.saddr), addr(e.family, e.daddr));
            let agent_key = &w.agent_key;
            let (peer, port) = if egress {
                (dst, e.dport)
            } else {
                (src, e.dport)
            };
            let verdict = match e.verdict {
                VERDICT_DENY => Verdict::Deny,
                VERDICT_AUDIT => Verdict::AuditDeny,
                _ => Verdict::Allow,
            };
            let obs = Observation {
                now_ms: ts_ms,
                agent: agent_key,
                segment,
                verdict,
                direction: if egress {
                    crate::detect::Direction::Egress
                } else {
                    crate::detect::Direction::Ingress
                },
                peer,
                port,
                count: u32::try_from(count).unwrap_or(u32::MAX),
            };
            firings.extend(self.sink.detectors.observe(&obs));
        }
        if let Err(err) = self.sink.audit.flush() {
            self.sink.audit_errors += 1;
            warn!("audit log: {err}");
        }
        // deny_rate reads the kernel's exact counters of the members this batch is about, not
        // the records: a flood whose records were aggregated or dropped still counts in full.
        // The members named stay *hot* for a few seconds: their counters are polled every
        // DENY_POLL (the kernel writes a record when a flow starts, not at each denial, so
        // a threshold crossed between two records is seen by the poll within milliseconds).
        let now_ms = super::engine::now_unix_ms();
        for ((cgroup_id, _), w) in &who {
            firings.extend(self.exact_denials(*cgroup_id, &w.agent_key, &w.segment, now_ms));
            self.sink.hot.insert(
                *cgroup_id,
                (w.agent_key.clone(), w.segment.clone(), now_ms + HOT_MS),
            );
        }
        for f in firings {
            self.act_on(f);
        }
    }

    /// The hot members' exact denials (every DENY_POLL): deny_rate fires within milliseconds
    /// of the threshold even while the kernel folds the denials into one record a second.
    pub fn poll_hot_denials(&mut self) {
        if self.sink.hot.is_empty() {
            return;
        }
        let now_ms = super::engine::now_unix_ms();
        self.sink.hot.retain(|_, (_, _, until)| *until > now_ms);
        let hot: Vec<(u64, String, String)> = self
            .sink
            .hot
            .iter()
            .map(|(c, (k, s, _))| (*c, k.clone(), s.clone()))
            .collect();
        let mut firings = Vec::new();
        for (cgroup_id, key, segment) in &hot {
            firings.extend(self.exact_denials(*cgroup_id, key, segment, now_ms));
        }
        for f in firings {
            self.act_on(f);
        }
    }

    /// Feed deny_rate the member's egress denials (and would-be denials) the kernel counted
    /// since the last look. Inbound refusals are not the member's doing and are left out.
    fn exact_denials(
        &mut self,
        cgroup_id: u64,
        agent_key: &str,
        segment: &str,
        now_ms: u64,
    ) -> Vec<Firing> {
        let egress = self.egress_denials(cgroup_id);
        self.feed_denials(cgroup_id, egress, agent_key, segment, now_ms)
    }

    /// Feed deny_rate what a member's egress denial count (`egress`) grew since the last look.
    fn feed_denials(
        &mut self,
        cgroup_id: u64,
        egress: u64,
        agent_key: &str,
        segment: &str,
        now_ms: u64,
    ) -> Vec<Firing> {
        let last = self.sink.exact.insert(cgroup_id, egress).unwrap_or(0);
        // A counter that went back is a new entry (the member was removed and re-made).
        let n = if egress >= last {
            egress - last
        } else {
            egress
        };
        self.sink
            .detectors
            .observe_denials(now_ms, agent_key, segment, n)
    }

    /// Every member's exact denials, from the tick: a member whose records were all dropped
    /// or aggregated is judged on its counters too. Members gone are forgotten.
    pub fn exact_denials_all(&mut self) {
        let now_ms = super::engine::now_unix_ms();
        let mut seen: Vec<(u64, String, String)> = Vec::new();
        for (id, a) in &self.agents {
            seen.push((a.cgroup_id, id.to_string(), a.segment.clone()));
        }
        if let Some(compiled) = self.compiled.as_ref() {
            for m in self.members.values() {
                if let Some(s) = compiled.segments.get(m.segment) {
                    seen.push((
                        m.cgroup_id,
                        format!("cgroup:{}", m.cgroup_id),
                        s.name.clone(),
                    ));
                }
            }
        }
        // One batched read of every member's counters; a member without an entry has made no
        // decision yet (0), as a single lookup would say.
        let counters = match self.dp.all_counters() {
            Ok(c) => c,
            Err(e) => return warn!("reading the decision counters: {e}"),
        };
        let mut firings = Vec::new();
        for (cgroup_id, key, segment) in &seen {
            let egress = counters.get(cgroup_id).map_or(0, egress_of);
            firings.extend(self.feed_denials(*cgroup_id, egress, key, segment, now_ms));
        }
        let keep: std::collections::HashSet<u64> = seen.iter().map(|s| s.0).collect();
        self.sink.exact.retain(|c, _| keep.contains(c));
        for f in firings {
            self.act_on(f);
        }
    }

    /// A member's own refusals (and would-be refusals) so far: inbound ones are not its doing.
    fn egress_denials(&self, cgroup_id: u64) -> u64 {
        egress_of(&self.dp.counters(cgroup_id))
    }

    /// After a restart that adopted the pins: what members denied before is history, not a
    /// burst to judge now.
    pub(super) fn seed_exact_denials(&mut self) {
        for (cgroup_id, _) in self.dp.members().unwrap_or_default() {
            let egress = self.egress_denials(cgroup_id);
            self.sink.exact.insert(cgroup_id, egress);
        }
    }

    /// (segment name, agent id, cgroup path relative to the cgroup2 mount) of a member.
    fn identify(&self, cgroup_id: u64, segment_id: u32) -> (String, Option<String>, String) {
        // A refusal before any segment applied (a pending or failed member) carries id 0: the
        // segment is the one the cgroup is declared in, once known.
        let declared = || {
            let m = self.members.values().find(|m| m.cgroup_id == cgroup_id)?;
            Some(
                self.compiled
                    .as_ref()?
                    .segments
                    .get(m.segment)?
                    .name
                    .clone(),
            )
        };
        let segment = self
            .sink
            .names
            .segments
            .get(&segment_id)
            .cloned()
            .or_else(declared)
            .unwrap_or_else(|| {
                if segment_id == 0 {
                    "-".to_owned()
                } else {
                    format!("segment#{segment_id}")
                }
            });
        if let Some((id, a)) = self.agents.iter().find(|(_, a)| a.cgroup_id == cgroup_id) {
            let rel = a
                .cgroup
                .strip_prefix(&self.cgroup2)
                .unwrap_or(&a.cgroup)
                .display()
                .to_string();
            return (segment, Some(id.to_string()), rel);
        }
        if let Some((_, id, seg, path)) = self.sink.departed.iter().find(|d| d.0 == cgroup_id) {
            let segment = if segment_id == 0 {
                seg.clone()
            } else {
                segment
            };
            return (segment, Some(id.clone()), path.clone());
        }
        let path = self
            .members
            .iter()
            .find(|(_, m)| m.cgroup_id == cgroup_id)
            .map(|(p, _)| {
                p.strip_prefix(&self.cgroup2)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            })
            .unwrap_or_else(|| format!("cgroup#{cgroup_id}"));
        (segment, None, path)
    }

    /// Report what flows that went quiet left unreported in the kernel's aggregation map
    /// (every second, from the tick).
    pub fn sweep_deny_flows(&mut self) {
        let flows = match self.dp.deny_flows() {
            Ok(f) => f,
            Err(e) => return warn!("reading the aggregated denials: {e}"),
        };
        let now_ns = crate::datapath::boottime_ns();
        let batch = self.sink.swept(&flows, now_ns);
        if !batch.is_empty() {
            self.on_events(batch);
        }
    }

    /// Remember a departing agent's names for its records still in the ring.
    pub(super) fn remember_departed(&mut self, cgroup_id: u64, id: String, segment: String) {
        let path = self.identify(cgroup_id, 0).2;
        self.sink.remember_departed(cgroup_id, id, segment, path);
    }

    /// A detector fired: record it, and quarantine the agent when its action says so.
    pub(super) fn act_on(&mut self, f: Firing) {
        *self
            .sink
            .firings
            .entry((f.detector.to_owned(), f.action.to_string()))
            .or_default() += 1;
        let agent_id = f
            .agent
            .strip_prefix("cgroup:")
            .is_none()
            .then(|| f.agent.clone());
        self.audit(json!({
            "kind": "detector",
            "detector": f.detector,
            "segment": f.segment,
            "agent_id": agent_id,
            "action": f.action.to_string(),
            "reason": f.reason,
        }));
        warn!(detector = f.detector, segment = %f.segment, agent = %f.agent, action = %f.action, "{}", f.reason);
        if f.action == Action::Quarantine {
            match agent_id {
                Some(id) => {
                    let target = Target::Agent(id);
                    if !self.store.records.contains_key(&target) {
                        self.quarantine(
                            target,
                            f.reason.clone(),
                            None,
                            None,
                            &format!("detector:{}", f.detector),
                        );
                    }
                }
                // A plain member cgroup is not an agent: its firing stays an alert.
                None => {
                    warn!(segment = %f.segment, "detector wants a quarantine of a member cgroup; only agents are quarantined automatically")
                }
            }
        }
    }

    /// Append a non-event record (policy, quarantine, detector) with a timestamp.
    pub(super) fn audit(&mut self, mut record: Value) {
        let ts_ms = super::engine::now_unix_ms();
        if let Value::Object(map) = &mut record {
            map.insert("ts_ms".into(), json!(ts_ms));
            map.insert("host".into(), json!(self.sink.host));
            map.insert("schema".into(), json!(super::events::SCHEMA));
        }
        let result = self.sink.audit.append(record).and_then(|line| {
            if let Some(f) = self.sink.forward.as_mut() {
                f.send(&line, ts_ms, false);
            }
            self.sink.audit.flush()
        });
        if let Err(err) = result {
            self.sink.audit_errors += 1;
            warn!("audit log: {err}");
        }
    }
}

impl Engine {
    /// The recent events, filtered.
    pub fn recent_events(&self, segment: Option<&str>, agent: Option<&str>) -> Vec<String> {
        self.sink.recent_events(segment, agent)
    }

    /// `agentseg audit`: the log's records in the window plus the kernel's per-rule counts.
    pub fn audit_report(&mut self, since_secs: Option<u64>) -> crate::control::Reply {
        use crate::control::Reply;
        // A log that can take no more still holds what it took: report on that.
        if let Err(e) = self.sink.audit.flush() {
            warn!("audit log: {e}; the report covers what the log holds");
        }
        let since_ms = since_secs.map_or(0, |s| {
            super::engine::now_unix_ms().saturating_sub(s.saturating_mul(1000))
        });
        let live = self.live();
        let hits = self.dp.rule_hits(self.generation, live.rules.len());
        let rules = live
            .rules
            .iter()
            .map(|r| crate::auditlog::RuleHits {
                id: r.id,
                segment: r.segment.clone(),
                direction: r.direction.to_string(),
                origin: format!("{}:{}", r.file.display(), r.line),
                hits: hits.get(r.id as usize).copied().unwrap_or(0),
            })
            .collect();
        let records = crate::auditlog::read_records(self.sink.audit.path()).filter_map(Result::ok);
        let mut report = crate::auditlog::report(records, since_ms, rules, 10);
        // Allows are counted in the kernel, not logged: take them from the counters, and list
        // every segment and agent, not only those with denials.
        let status = self.status();
        for seg in &status.segments {
            let idx = match report.segments.iter().position(|r| r.name == seg.name) {
                Some(i) => i,
                None => {
                    report.segments.push(crate::auditlog::SegmentReport {
                        name: seg.name.clone(),
                        allowed: 0,
                        denied: 0,
                        audit_denied: 0,
                        top_denied_peers: Vec::new(),
                        agents: Vec::new(),
                    });
                    report.segments.len() - 1
                }
            };
            report.segments[idx].allowed = seg.allowed;
        }
        for agent in &status.agents {
            let Some(seg) = report.segments.iter_mut().find(|r| r.name == agent.segment) else {
                continue;
            };
            match seg.agents.iter_mut().find(|a| a.agent_id == agent.agent_id) {
                Some(a) => a.allowed = agent.allowed,
                None => seg.agents.push(crate::auditlog::AgentReport {
                    agent_id: agent.agent_id.clone(),
                    allowed: agent.allowed,
                    denied: 0,
                    audit_denied: 0,
                    top_denied_peers: Vec::new(),
                }),
            }
        }
        report.segments.sort_by(|a, b| a.name.cmp(&b.name));
        match serde_json::to_value(&report) {
            Ok(value) => Reply::Audit {
                report: value,
                text: report.to_text(),
            },
            Err(e) => Reply::Error {
                message: format!("audit report: {e}"),
            },
        }
    }
}

/// A member's own refusals (and would-be refusals) in its counters: inbound ones are not its
/// doing.
fn egress_of(c: &agentseg_common::Counters) -> u64 {
    (c.denied + c.audit_denied).saturating_sub(c.inbound_denied)
}
