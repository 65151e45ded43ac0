//! Quarantine and release: the kernel flag first (the cut takes effect at the next packet),
//! then the disk, then the history log. Lifted only by an operator or its own TTL.
use std::collections::BTreeSet;

use agentseg_common::MEMBER_QUARANTINED;
use tracing::{info, warn};

use super::engine::{Engine, now_unix};
use crate::{
    agent::AgentId,
    control::{QuarantineInfo, Reply, Target},
    datapath::generation_segment_id as segment_id,
};

impl Engine {
    /// Names of the quarantined segments (written into every policy generation).
    pub(super) fn quarantined_segments(&self) -> BTreeSet<String> {
        self.store
            .records
            .keys()
            .filter_map(|t| match t {
                Target::Segment(name) => Some(name.clone()),
                Target::Agent(_) => None,
            })
            .collect()
    }

    pub fn quarantine(
        &mut self,
        target: Target,
        reason: String,
        ttl_secs: Option<u64>,
        by_uid: Option<u32>,
        by: &str,
    ) -> Reply {
        if reason.trim().is_empty() {
            return Reply::Error {
                message: "a quarantine needs a reason".into(),
            };
        }
        // Arm the packet hooks' slow path first, then cut: no packet can slip between.
        self.publish_flags(agentseg_common::CONFIG_ANY_QUARANTINE);
        if let Err(message) = self.set_kernel_quarantine(&target, true) {
            self.publish_flags(0);
            return Reply::Error { message };
        }
        let now = now_unix();
        let q = QuarantineInfo {
            target: target.clone(),
            reason,
            by_uid,
            by: by.into(),
            since_unix: now,
            until_unix: ttl_secs.map(|t| now.saturating_add(t)),
        };
        info!(%target, reason = %q.reason, by, ?by_uid, ttl_secs, "quarantined");
        self.store.records.insert(target, q.clone());
        self.persist("quarantine", &q);
        Reply::Ok
    }

    pub fn release(&mut self, target: &Target, by_uid: Option<u32>, by: &str) -> Reply {
        let Some(mut q) = self.store.records.remove(target) else {
            return Reply::Error {
                message: format!("{target} is not quarantined"),
            };
        };
        // Disk first for a release: a crash in between leaves it quarantined (fail closed).
        q.by_uid = by_uid;
        q.by = by.into();
        self.persist("release", &q);
        if let Err(message) = self.set_kernel_quarantine(target, false) {
            warn!(%target, "release: {message}");
        }
        self.publish_flags(0);
        info!(%target, by, ?by_uid, "released");
        Reply::Ok
    }

    /// Lift the quarantines whose TTL ran out.
    pub fn expire_quarantines(&mut self) {
        let now = now_unix();
        let due: Vec<Target> = self
            .store
            .records
            .values()
            .filter(|q| q.until_unix.is_some_and(|u| u <= now))
            .map(|q| q.target.clone())
            .collect();
        for target in due {
            self.release(&target, None, "ttl");
        }
    }

    fn persist(&mut self, action: &str, q: &QuarantineInfo) {
        let record = serde_json::json!({
            "kind": action,
            "target": q.target,
            "reason": q.reason,
            "by": q.by,
            "by_uid": q.by_uid,
            "until_unix": q.until_unix,
        });
        self.audit(record);
        if let Err(e) = self.store.save() {
            warn!("saving quarantine state: {e}");
        }
        if let Err(e) = self.store.log(action, q, now_unix()) {
            warn!("writing the quarantine log: {e}");
        }
    }

    fn set_kernel_quarantine(&mut self, target: &Target, on: bool) -> Result<(), String> {
        match target {
            Target::Agent(id) => {
                let id: AgentId = id.parse().map_err(|e| format!("{e}"))?;
                let agent = self
                    .agents
                    .get(&id)
                    .ok_or_else(|| format!("no agent {id}"))?;
                let cgroup_id = agent.cgroup_id;
                let members = self.dp.members().map_err(|e| e.to_string())?;
                let (_, mut member) = members
                    .into_iter()
                    .find(|(c, _)| *c == cgroup_id)
                    .ok_or_else(|| format!("agent {id} has no kernel membership"))?;
                if on {
                    member.flags |= MEMBER_QUARANTINED;
                } else {
                    member.flags &= !MEMBER_QUARANTINED;
                }
                self.dp
                    .set_member(cgroup_id, member)
                    .map_err(|e| e.to_string())
            }
            Target::Segment(name) => {
                let seg = self
                    .live()
                    .segments
                    .iter()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| format!("no segment named {name:?}"))?;
                let id = segment_id(self.generation, seg.id);
                self.dp
                    .set_segment_quarantine(id, on)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// After a restart: agents the kernel still flags are quarantined even if the disk lost
    /// the record; records of agents that are gone are dropped.
    pub(super) fn recover_quarantines(&mut self) {
        let members = self.dp.members().unwrap_or_default();
        let flagged: BTreeSet<u64> = members
            .iter()
            .filter(|(_, m)| m.flags & MEMBER_QUARANTINED != 0)
            .map(|(c, _)| *c)
            .collect();
        let agents: Vec<(AgentId, u64)> = self
            .agents
            .iter()
            .map(|(id, a)| (*id, a.cgroup_id))
            .collect();
        for (id, cgroup_id) in &agents {
            let target = Target::Agent(id.to_string());
            let on_disk = self.store.records.contains_key(&target);
            if flagged.contains(cgroup_id) && !on_disk {
                warn!(agent = %id, "kernel holds a quarantine the state file lost; keeping it");
                let reason = "recovered from kernel state".to_string();
                self.quarantine(target, reason, None, None, "recovered");
            } else if on_disk
                && !flagged.contains(cgroup_id)
                && let Err(e) = self.set_kernel_quarantine(&target, true)
            {
                warn!(agent = %id, "re-applying quarantine: {e}");
            }
        }
        let live_agents: BTreeSet<String> = agents.iter().map(|(id, _)| id.to_string()).collect();
        let stale: Vec<Target> = self
            .store
            .records
            .keys()
            .filter(|t| matches!(t, Target::Agent(id) if !live_agents.contains(id)))
            .cloned()
            .collect();
        for target in stale {
            info!(%target, "dropping the quarantine of an agent that is gone");
            self.release(&target, None, "agent-gone");
        }
    }

    pub(super) fn quarantine_of(&self, target: &Target) -> Option<QuarantineInfo> {
        self.store.records.get(target).cloned()
    }
}
