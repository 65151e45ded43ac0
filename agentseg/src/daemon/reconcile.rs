//! Policy application and membership tracking: the desired state (compiled policy + member
//! cgroups that exist now) becomes kernel state through one generation switch.
//!
//! Order of a switch (`Engine::apply`):
//! 1. clear leftovers of the inactive generation, write the new policy there;
//! 2. give every member entry its id in the new generation (released cgroups: SEGMENT_NONE,
//!    agents whose segment vanished: SEGMENT_GONE) and register new member cgroups;
//! 3. attach (pin) new member cgroups;
//! 4. flip `active_gen` — one map write;
//! 5. drop released members and their links, stale pins, and the old generation.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use agentseg_common::{MEMBER_AGENT, MEMBER_CGROUP, Member, SEGMENT_GONE, SEGMENT_NONE};
use anyhow::Context as _;
use tracing::{info, warn};

use super::engine::{Engine, MemberCgroup};
use crate::{cgroup, compile::Compiled, datapath::generation_segment_id as segment_id};

impl Engine {
    /// Member cgroup paths of a compiled policy: (segment index, absolute path).
    pub(super) fn desired_paths(&self, compiled: &Compiled) -> Vec<(usize, PathBuf)> {
        let mut out = Vec::new();
        for (index, seg) in compiled.segments.iter().enumerate() {
            for rel in &seg.member_cgroups {
                match cgroup::check_relative(rel) {
                    Ok(rel) => out.push((index, self.cgroup2.join(rel))),
                    Err(e) => warn!("skipping member cgroup: {e}"),
                }
            }
            for unit in &seg.member_units {
                out.push((index, self.cgroup2.join(cgroup::unit_cgroup(unit))));
            }
        }
        out
    }

    /// Make `compiled` the live policy. On error the live generation is untouched.
    pub(super) fn apply(&mut self, compiled: Compiled) -> anyhow::Result<()> {
        let live = self.generation;
        let next = 1 - live;
        self.dp
            .clear_generation(next)
            .context("clearing the inactive policy generation")?;
        self.dp
            .write_generation(next, &compiled, &self.quarantined_segments())
            .context("writing the new policy generation")?;

        let new_ids: BTreeMap<&str, u32> = compiled
            .segments
            .iter()
            .map(|s| (s.name.as_str(), segment_id(next, s.id)))
            .collect();
        let old_ids: BTreeMap<String, u32> = self
            .dp
            .segments(live)?
            .into_iter()
            .map(|s| (s.name, s.id))
            .collect();

        // Which member cgroups exist now, and for which segment.
        let mut desired: BTreeMap<u64, (usize, PathBuf)> = BTreeMap::new();
        for (index, path) in self.desired_paths(&compiled) {
            if let Ok(id) = cgroup::cgroup_id(&path) {
                desired.insert(id, (index, path));
            }
        }
        let agent_segments: BTreeMap<u64, String> = self
            .agents
            .values()
            .map(|a| (a.cgroup_id, a.segment.clone()))
            .collect();

        let mut released = Vec::new();
        let existing = self.dp.members()?;
        let known: BTreeSet<u64> = existing.iter().map(|(id, _)| *id).collect();
        for (id, mut member) in existing {
            let value = if member.kind == MEMBER_AGENT {
                match agent_segments.get(&id) {
                    Some(name) => new_ids.get(name.as_str()).copied().unwrap_or(SEGMENT_GONE),
                    // An agent entry whose cgroup we no longer see: its cgroup is gone.
                    None => {
                        released.push(id);
                        SEGMENT_NONE
                    }
                }
            } else if let Some((index, _)) = desired.get(&id) {
                segment_id(next, compiled.segments[*index].id)
            } else {
                released.push(id);
                SEGMENT_NONE
            };
            member.segment_ids[next as usize] = value;
            self.dp.set_member(id, member)?;
        }
        for (id, (index, path)) in &desired {
            let seg = &compiled.segments[*index];
            if !known.contains(id) {
                let mut segment_ids = [SEGMENT_GONE; 2];
                segment_ids[next as usize] = segment_id(next, seg.id);
                segment_ids[live as usize] =
                    old_ids.get(&seg.name).copied().unwrap_or(SEGMENT_GONE);
                let member = Member {
                    segment_ids,
                    kind: MEMBER_CGROUP,
                    flags: 0,
                    agent_id: [0; 16],
                };
                self.dp.set_member(*id, member)?;
            }
            if !self.attached.contains(id) {
                self.dp
                    .attach(*id, path)
                    .with_context(|| format!("attaching to {}", path.display()))?;
                self.attached.insert(*id);
            }
        }

        // The switch.
        let mut config = self.dp.config()?;
        config.active_gen = next;
        config.deadman_secs = self.deadman_secs;
        config.sample_allows = self.sample_allows;
        config.heartbeat_ns = crate::datapath::boottime_ns();
        self.dp.set_config(config)?;
        self.generation = next;

        for id in released {
            self.forget_member(id);
        }
        let keep: BTreeSet<u64> = desired
            .keys()
            .copied()
            .chain(std::iter::once(self.agent_root_id))
            .collect();
        for id in self.dp.pinned_cgroups() {
            if !keep.contains(&id) {
                self.forget_member(id);
            }
        }
        let removed = self.dp.clear_generation(live)?;
        self.refresh_names(&compiled, next);
        log_changes(self.compiled.as_ref(), &compiled, removed);
        self.members = desired
            .into_iter()
            .map(|(cgroup_id, (segment, path))| (path, MemberCgroup { segment, cgroup_id }))
            .collect();
        self.compiled = Some(compiled);
        Ok(())
    }

    /// Names for events of the new generation (the old one's stay, for records in flight),
    /// and the detectors' configuration.
    fn refresh_names(&mut self, compiled: &Compiled, generation: u32) {
        let names = &mut self.sink.names;
        names
            .segments
            .retain(|id, _| crate::datapath::generation_of(*id) != generation);
        names
            .rules
            .retain(|id, _| id / agentseg_common::RULES_PER_GEN != generation);
        for seg in &compiled.segments {
            names
                .segments
                .insert(segment_id(generation, seg.id), seg.name.clone());
        }
        for rule in &compiled.rules {
            let key = generation * agentseg_common::RULES_PER_GEN + rule.id;
            let origin = format!("{}:{}", rule.file.display(), rule.line);
            names.rules.insert(key, origin);
        }
        self.sink.detectors.configure(
            compiled
                .segments
                .iter()
                .map(|s| (s.name.clone(), s.monitor.clone())),
        );
    }

    fn forget_member(&mut self, id: u64) {
        let segment = self
            .members
            .values()
            .find(|m| m.cgroup_id == id)
            .and_then(|m| {
                self.compiled
                    .as_ref()
                    .and_then(|c| c.segments.get(m.segment))
                    .map(|s| s.name.clone())
            });
        if let Some(segment) = segment {
            self.retire(&segment, id);
        }
        if let Err(e) = self.dp.remove_member(id) {
            warn!(cgroup_id = id, "removing membership: {e}");
        }
        if let Err(e) = self.dp.detach(id) {
            warn!(cgroup_id = id, "detaching: {e:#}");
        }
        self.attached.remove(&id);
    }

    /// Membership tracking: member cgroups that appeared join their segment, ones that went
    /// away (or were recreated under a new id) are forgotten. Runs every tick, no reload.
    pub fn sync_members(&mut self) {
        let Some(compiled) = self.compiled.take() else {
            return;
        };
        let live = self.generation;
        let mut seen = BTreeMap::new();
        for (index, path) in self.desired_paths(&compiled) {
            if let Ok(id) = cgroup::cgroup_id(&path) {
                seen.insert(path, (index, id));
            }
        }
        let gone: Vec<(PathBuf, u64)> = self
            .members
            .iter()
            .filter(|(path, m)| seen.get(*path).is_none_or(|(_, id)| *id != m.cgroup_id))
            .map(|(path, m)| (path.clone(), m.cgroup_id))
            .collect();
        for (path, id) in gone {
            info!(cgroup = %path.display(), "member cgroup gone");
            self.forget_member(id);
            self.members.remove(&path);
        }
        for (path, (index, id)) in seen {
            if self.members.contains_key(&path) {
                continue;
            }
            let seg = &compiled.segments[index];
            let mut segment_ids = [SEGMENT_GONE; 2];
            segment_ids[live as usize] = segment_id(live, seg.id);
            let member = Member {
                segment_ids,
                kind: MEMBER_CGROUP,
                flags: 0,
                agent_id: [0; 16],
            };
            // Membership before attachment: the first judged connect already finds it.
            let result = self
                .dp
                .set_member(id, member)
                .map_err(anyhow::Error::from)
                .and_then(|()| self.dp.attach(id, &path).map_err(anyhow::Error::from));
            match result {
                Ok(()) => {
                    info!(cgroup = %path.display(), segment = %seg.name, "member cgroup joined");
                    self.attached.insert(id);
                    self.members.insert(
                        path,
                        MemberCgroup {
                            segment: index,
                            cgroup_id: id,
                        },
                    );
                }
                Err(e) => warn!(cgroup = %path.display(), "registering member cgroup: {e:#}"),
            }
        }
        self.compiled = Some(compiled);
    }
}

/// Log what a switch changed, per segment: prefixes added and removed.
fn log_changes(old: Option<&Compiled>, new: &Compiled, cleared: usize) {
    let entries = |c: &Compiled| -> BTreeMap<String, BTreeSet<String>> {
        c.segments
            .iter()
            .map(|s| {
                let rs = |id: &u32| {
                    format!(
                        "{:?}",
                        c.rulesets
                            .get(*id as usize)
                            .map(|r| &r.rules[..r.len as usize])
                    )
                };
                let set = s
                    .egress_v4
                    .iter()
                    .map(|(n, r)| format!("{n} {}", rs(r)))
                    .chain(s.egress_v6.iter().map(|(n, r)| format!("{n} {}", rs(r))))
                    .collect();
                (s.name.clone(), set)
            })
            .collect()
    };
    let Some(old) = old else {
        info!(segments = new.segments.len(), "policy applied");
        return;
    };
    let (before, after) = (entries(old), entries(new));
    for name in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let empty = BTreeSet::new();
        let (b, a) = (
            before.get(name).unwrap_or(&empty),
            after.get(name).unwrap_or(&empty),
        );
        let added = a.difference(b).count();
        let removed = b.difference(a).count();
        if added + removed > 0 || !before.contains_key(name) || !after.contains_key(name) {
            info!(segment = %name, added, removed, "segment rules changed");
        }
    }
    info!(
        segments = new.segments.len(),
        old_entries_cleared = cleared,
        "policy switched"
    );
}
