//! `agentseg status`: the engine's view of segments, agents, quarantines and counters.
use std::path::Path;

use agentseg_common::MODE_AUDIT;

use super::engine::Engine;
use crate::{
    cgroup,
    control::{AgentStatus, SegmentStatus, Status, Target},
};

/// The kernel's fail-closed counters (`STAT_*`) shown in `status` and the metrics, by name.
const FAIL_CLOSED: [(&str, u32); 8] = [
    ("no_member", agentseg_common::STAT_NO_MEMBER),
    ("no_segment", agentseg_common::STAT_NO_SEGMENT),
    ("no_ruleset", agentseg_common::STAT_NO_RULESET),
    ("deadman", agentseg_common::STAT_DEADMAN),
    ("pending_member", agentseg_common::STAT_PENDING),
    ("malformed", agentseg_common::STAT_MALFORMED),
    ("failed_member", agentseg_common::STAT_FAILED_MEMBER),
    ("ip_options", agentseg_common::STAT_IP_OPTIONS),
];

impl Engine {
    pub fn status(&self) -> Status {
        let live = self.live();
        let mut segments: Vec<SegmentStatus> = live
            .segments
            .iter()
            .map(|s| SegmentStatus {
                name: s.name.clone(),
                id: s.id,
                mode: if s.mode == MODE_AUDIT {
                    "audit"
                } else {
                    "enforce"
                }
                .into(),
                member_cgroups: Vec::new(),
                prefixes: s.egress_v4.len()
                    + s.egress_v6.len()
                    + s.ingress_v4.len()
                    + s.ingress_v6.len()
                    + s.quarantine_v4.len()
                    + s.quarantine_v6.len(),
                quarantine: self.quarantine_of(&Target::Segment(s.name.clone())),
                ..Default::default()
            })
            .collect();
        for s in &mut segments {
            if let Some(t) = self.retired.get(&s.name) {
                add(s, t);
            }
        }
        let learned = self.dns.learned.count_by_segment();
        for s in &mut segments {
            let c = self.dns.counts.get(&s.name).copied().unwrap_or_default();
            s.dns = crate::control::DnsStatus {
                allowed: c.allowed,
                refused: c.refused,
                failed: c.failed,
                learned: learned.get(s.name.as_str()).copied().unwrap_or(0),
            };
        }
        for (path, m) in &self.members {
            let c = self.dp.counters(m.cgroup_id);
            let Some(s) = segments.get_mut(m.segment) else {
                continue;
            };
            s.member_cgroups.push(rel(&self.cgroup2, path));
            add(s, &c);
        }
        let agents = self
            .agents
            .iter()
            .map(|(id, a)| {
                let c = self.dp.counters(a.cgroup_id);
                if let Some(s) = segments.iter_mut().find(|s| s.name == a.segment) {
                    add(s, &c);
                }
                AgentStatus {
                    agent_id: id.to_string(),
                    segment: a.segment.clone(),
                    uid: a.dynamic_uid,
                    cgroup: a.cgroup.clone(),
                    pids: cgroup::procs(&a.cgroup).unwrap_or_default(),
                    allowed: c.allowed,
                    denied: c.denied,
                    audit_denied: c.audit_denied,
                    inbound_denied: c.inbound_denied,
                    records_dropped: c.records_dropped,
                    quarantine: self.quarantine_of(&Target::Agent(id.to_string())),
                }
            })
            .collect();
        let stats = self.dp.stats();
        Status {
            ready: true,
            pid: std::process::id(),
            cgroup2: self.cgroup2.clone(),
            policies: self.policies.clone(),
            generation: self.generation,
            adopted: self.dp.adopted(),
            reload: self.reload.clone(),
            quarantines: self.store.records.values().cloned().collect(),
            events_read: self.sink.read,
            events_lost: stats[agentseg_common::STAT_EVENTS_LOST as usize],
            denials_reported: self.sink.denials_reported,
            audit_errors: self.sink.audit_errors,
            audit_forward_errors: self.sink.forward.as_ref().map_or(0, |f| f.errors),
            policy_digest: self
                .compiled
                .as_ref()
                .map(|c| {
                    self.policy_digest
                        .get_or_init(|| hex::encode(c.policy_digest()))
                        .clone()
                })
                .unwrap_or_default(),
            heartbeat_age_secs: self.last_heartbeat.map(|t| t.elapsed().as_secs_f64()),
            audit_log: self.sink.audit.path().to_owned(),
            segments,
            agents,
            fail_closed: FAIL_CLOSED
                .iter()
                .map(|(name, stat)| ((*name).to_owned(), stats[*stat as usize]))
                .collect(),
            enforcement_root: self.enforcement_root.clone(),
            links: self.dp.link_count(),
            alarms: self.alarms,
            last_alarm: self.last_alarm.clone(),
            failed_members: self.failed.values().cloned().collect(),
            guards: self.guards.keys().cloned().collect(),
            agent_uids: self.uids.held(),
        }
    }
}

fn add(s: &mut SegmentStatus, c: &agentseg_common::Counters) {
    s.allowed += c.allowed;
    s.denied += c.denied;
    s.audit_denied += c.audit_denied;
    s.inbound_denied += c.inbound_denied;
    s.records_dropped += c.records_dropped;
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}
