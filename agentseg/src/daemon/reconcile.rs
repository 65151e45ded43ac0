//! Policy application and membership tracking: the desired state (compiled policy + member
//! cgroups that exist now) becomes kernel state through one generation switch.
//!
//! Order of a switch (`Engine::apply`):
//! 1. clear leftovers of the inactive generation, write the new policy there;
//! 2. give every member entry its id in the new generation (released cgroups: SEGMENT_RELEASED,
//!    agents whose segment vanished: SEGMENT_GONE) and register new member cgroups;
//! 3. attach (pin) new member cgroups;
//! 4. flip `active_gen` — one map write;
//! 5. drop released members and their links, stale pins, and the old generation.
//!
//! A restarted daemon whose live generation was written from the same policy (the record kept
//! after each switch: `generation.json` in the state directory) skips 1 and 4
//! (`Engine::adopt_live`): members, guards and attachments are still reconciled, against the
//! live generation. Once running, the engine copies the live policy into the inactive half
//! (`Engine::prepare_inactive`) so that the first reload already writes only a difference.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use agentseg_common::{
    MEMBER_AGENT, MEMBER_ATTACHED, MEMBER_CGROUP, MEMBER_FAILED, MEMBER_GUARD, MEMBER_OUTSIDER,
    Member, SEGMENT_GONE, SEGMENT_RELEASED,
};
use anyhow::Context as _;
use tracing::{info, warn};

use super::engine::{Engine, MemberCgroup};
use crate::{
    cgroup,
    compile::Compiled,
    datapath::{MEMBER_PROGRAMS, generation_segment_id as segment_id},
};

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
        self.switch(compiled, false)
    }

    /// Start on a live generation that already holds `compiled` (see [`Engine::live_record`]):
    /// nothing of the policy is rewritten, nothing flips.
    pub(super) fn adopt_live(&mut self, compiled: Compiled) -> anyhow::Result<()> {
        self.switch(compiled, true)
    }

    fn switch(&mut self, compiled: Compiled, adopt: bool) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let live = self.generation;
        let next = if adopt { live } else { 1 - live };
        let digest = self.generation_digest(&compiled);
        let previous = self.inactive_policy.take();
        let mut write = crate::datapath::WriteStats::default();
        if !adopt {
            // After a switch of ours the inactive half holds the policy before the live one (we
            // know it: only the difference is written) or nothing; what a predecessor or an
            // interrupted switch left is read back and only the difference written.
            let unknown = previous.is_none() && !self.inactive_clean;
            // Until this write completes the half holds an unknown mix: read back next time
            // if it fails.
            self.inactive_clean = false;
            // The half may hold the hit counts of the policy before last: `audit` counts from
            // here.
            self.dp
                .clear_rule_hits(next, compiled.rules.len())
                .context("resetting the rule counters of the inactive generation")?;
            let quarantined = self.quarantined_segments();
            write = if unknown {
                self.dp.rewrite_generation(next, &compiled, &quarantined)
            } else {
                self.dp
                    .write_generation(next, &compiled, &quarantined, previous.as_ref())
            }
            .context("writing the new policy generation")?;
        }
        let written = started.elapsed();

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
        let declared = self.desired_paths(&compiled);
        let mut desired: BTreeMap<u64, (usize, PathBuf)> = BTreeMap::new();
        for (index, path) in &declared {
            if let Ok(id) = cgroup::cgroup_id(path) {
                desired.insert(id, (*index, path.clone()));
            }
        }
        // Guards first: a member cgroup made while this switch runs is already held.
        let guards = self.wanted_guards(&compiled);
        self.add_guards(&guards, &declared);
        let agent_segments: BTreeMap<u64, String> = self
            .agents
            .values()
            .map(|a| (a.cgroup_id, a.segment.clone()))
            .collect();

        let mut released = Vec::new();
        let existing = self.dp.members()?;
        let known: BTreeSet<u64> = existing.iter().map(|(id, _)| *id).collect();
        for (id, mut member) in existing {
            if member.kind == MEMBER_OUTSIDER {
                continue;
            }
            let value = if member.kind == MEMBER_AGENT {
                match agent_segments.get(&id) {
                    Some(name) => new_ids.get(name.as_str()).copied().unwrap_or(SEGMENT_GONE),
                    // An agent entry whose cgroup we no longer see: its cgroup is gone.
                    None => {
                        released.push(id);
                        SEGMENT_RELEASED
                    }
                }
            } else if let Some((index, _)) = desired.get(&id) {
                segment_id(next, compiled.segments[*index].id)
            } else {
                released.push(id);
                SEGMENT_RELEASED
            };
            member.segment_ids[next as usize] = value;
            member.dns_slot = if value == SEGMENT_RELEASED {
                member.dns_slot
            } else {
                self.dns_slot_for(id, member.dns_slot)
            };
            self.dp.set_member(id, member)?;
        }
        for (id, (index, path)) in &desired {
            let seg = &compiled.segments[*index];
            let outsider = self
                .dp
                .member(*id)
                .is_some_and(|m| m.kind == MEMBER_OUTSIDER);
            if !known.contains(id) || outsider {
                let mut segment_ids = [SEGMENT_GONE; 2];
                segment_ids[next as usize] = segment_id(next, seg.id);
                segment_ids[live as usize] =
                    old_ids.get(&seg.name).copied().unwrap_or(SEGMENT_GONE);
                let member = Member {
                    segment_ids,
                    kind: MEMBER_CGROUP,
                    flags: self.guard_flag(*id),
                    agent_id: [0; 16],
                    dns_slot: self.dns_slot_for(*id, 0),
                    _pad: 0,
                };
                self.dp.set_member(*id, member)?;
            }
            self.attach_member(*id, path);
        }

        // What the resolver learned goes with each segment into the new generation (adopted:
        // it is there already).
        let stale_learned = if adopt {
            Vec::new()
        } else {
            self.dns_prepare_switch(next, &compiled, &old_ids)
        };

        // The switch.
        let mut config = self.dp.config()?;
        config.active_gen = next;
        config.dns_port = self.dns.settings.port;
        config.epoch = config.epoch.wrapping_add(1);
        config.deadman_secs = self.deadman_secs;
        config.sample_allows = self.sample_allows;
        config.flags = self.config_flags(Some(&compiled));
        config.heartbeat_ns = crate::datapath::boottime_ns();
        self.dp.set_config(config)?;
        self.last_heartbeat = Some(std::time::Instant::now());
        self.generation = next;
        self.record_live(next, config.epoch, &digest);

        self.dns_remove_keys(&stale_learned);
        for id in released {
            self.forget_member(id);
        }
        let keep: BTreeSet<u64> = desired
            .keys()
            .copied()
            .chain(std::iter::once(self.agent_root_id))
            .collect();
        for id in self.dp.pinned_cgroups() {
            if !keep.contains(&id) && id != self.enforcement_root_id {
                self.forget_member(id);
            }
        }
        self.retain_guards(&guards);
        self.update_watches(&declared);
        // The old half: kept as it is when this daemon wrote it (the next switch writes only
        // the difference into it; nobody reads it meanwhile). A predecessor's is left as it
        // is too: `prepare_inactive` (once the engine runs) or the next switch reads it back
        // and writes only the difference. On maps this daemon created, before its first
        // switch, the old half is known to hold nothing.
        if !adopt && !self.live_written_here && self.dp.fresh() {
            self.inactive_clean = true;
        }
        let keep_old = self.live_written_here;
        self.live_written_here = true;
        let switched = started.elapsed();
        self.refresh_names(&compiled, next);
        log_changes(self.compiled.as_ref(), &compiled);
        tracing::debug!(
            write_ms = written.as_millis() as u64,
            switch_ms = switched.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            written = write.written,
            deleted = write.deleted,
            incremental = previous.is_some(),
            "generation switch timing"
        );
        self.members = desired
            .into_iter()
            .map(|(cgroup_id, (segment, path))| (path, MemberCgroup { segment, cgroup_id }))
            .collect();
        let old = self.compiled.replace(compiled);
        self.policy_digest = std::cell::OnceCell::new();
        if keep_old {
            self.inactive_policy = old;
        }
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
        // A guard keeps an entry of its own (an outsider with the guard flag).
        let result = if self.is_guard(id) {
            self.dp.set_member(id, Self::outsider(MEMBER_GUARD))
        } else {
            self.dp.remove_member(id)
        };
        if let Err(e) = result {
            warn!(cgroup_id = id, "removing membership: {e}");
        }
        if let Err(e) = self.dp.detach(id) {
            warn!(cgroup_id = id, "detaching: {e:#}");
        }
        self.dns_release_slot(id);
        self.attached.remove(&id);
        self.failed.remove(&id);
    }

    /// Attach a member cgroup's packet hooks and mark its entry attached; a failure marks it
    /// failed instead (everything it does is denied) and is shown in status and metrics.
    pub(super) fn attach_member(&mut self, id: u64, path: &std::path::Path) {
        if self.attached.contains(&id) {
            return;
        }
        let result = self
            .dp
            .attach(id, path, &MEMBER_PROGRAMS)
            .map_err(|e| format!("{e:#}"));
        let flag = match &result {
            Ok(()) => MEMBER_ATTACHED,
            Err(_) => MEMBER_FAILED,
        };
        if let Some(mut m) = self.dp.member(id) {
            m.flags = (m.flags & !(MEMBER_ATTACHED | MEMBER_FAILED)) | flag;
            if let Err(e) = self.dp.set_member(id, m) {
                warn!(cgroup = %path.display(), "marking the member: {e:#}");
            }
        }
        match result {
            Ok(()) => {
                self.attached.insert(id);
                self.failed.remove(&id);
            }
            Err(e) => {
                warn!(cgroup = %path.display(), "attaching failed, the member is denied everything: {e}");
                self.failed.insert(id, format!("{}: {e}", path.display()));
            }
        }
    }

    /// Membership tracking: member cgroups that appeared join their segment, ones that went
    /// away (or were recreated under a new id) are forgotten, children of guards are
    /// classified. Runs every tick and whenever a watched cgroup directory changes; no reload.
    pub fn sync_members(&mut self) {
        let Some(compiled) = self.compiled.take() else {
            return;
        };
        let live = self.generation;
        let declared = self.desired_paths(&compiled);
        let mut seen = BTreeMap::new();
        for (index, path) in &declared {
            if let Ok(id) = cgroup::cgroup_id(path) {
                seen.insert(path.clone(), (*index, id));
            }
        }
        let gone: Vec<(PathBuf, u64)> = self
            .members
            .iter()
            .filter(|(path, m)| seen.get(*path).is_none_or(|(_, id)| *id != m.cgroup_id))
            .map(|(path, m)| (path.clone(), m.cgroup_id))
            .collect();
        let changed = !gone.is_empty();
        for (path, id) in gone {
            info!(cgroup = %path.display(), "member cgroup gone");
            self.forget_member(id);
            self.members.remove(&path);
        }
        let mut joined = false;
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
                flags: self.guard_flag(id),
                agent_id: [0; 16],
                dns_slot: self.dns_slot_for(id, 0),
                _pad: 0,
            };
            // Membership before attachment: the first judged connect already finds it, and
            // until the packet hooks are attached the enforcement root's handoff hook judges
            // its packets.
            match self.dp.set_member(id, member) {
                Ok(()) => {
                    self.attach_member(id, &path);
                    info!(cgroup = %path.display(), segment = %seg.name, "member cgroup joined");
                    self.members.insert(
                        path,
                        MemberCgroup {
                            segment: index,
                            cgroup_id: id,
                        },
                    );
                    joined = true;
                }
                Err(e) => {
                    // Still unregistered: a child of a guard stays denied (pending).
                    warn!(cgroup = %path.display(), "registering member cgroup: {e:#}");
                    self.failed
                        .insert(id, format!("{}: registering: {e:#}", path.display()));
                }
            }
        }
        self.classify_guard_children(&declared);
        self.update_watches(&declared);
        self.compiled = Some(compiled);
        if changed || joined {
            self.bump_epoch();
        }
    }
}

/// Log what a switch changed, per segment: prefixes added and removed.
fn log_changes(old: Option<&Compiled>, new: &Compiled) {
    let Some(old) = old else {
        info!(segments = new.segments.len(), "policy applied");
        return;
    };
    let (old_sigs, new_sigs) = (ruleset_sigs(old), ruleset_sigs(new));
    let names: BTreeSet<&str> = old
        .segments
        .iter()
        .chain(&new.segments)
        .map(|s| s.name.as_str())
        .collect();
    for name in names {
        let before = old.segments.iter().find(|s| s.name == name);
        let after = new.segments.iter().find(|s| s.name == name);
        let (added, removed) = match (before, after) {
            (Some(b), Some(a)) => {
                let (a4, r4) = diff_sorted(&b.egress_v4, &old_sigs, &a.egress_v4, &new_sigs);
                let (a6, r6) = diff_sorted(&b.egress_v6, &old_sigs, &a.egress_v6, &new_sigs);
                (a4 + a6, r4 + r6)
            }
            (None, Some(a)) => (a.egress_v4.len() + a.egress_v6.len(), 0),
            (Some(b), None) => (0, b.egress_v4.len() + b.egress_v6.len()),
            (None, None) => (0, 0),
        };
        if added + removed > 0 || before.is_none() || after.is_none() {
            info!(segment = %name, added, removed, "segment rules changed");
        }
    }
    info!(segments = new.segments.len(), "policy switched");
}

/// A fingerprint of what each ruleset allows, rule ids left out: a rule that only moved in
/// the file is not a change.
fn ruleset_sigs(c: &Compiled) -> Vec<u64> {
    use std::hash::{Hash as _, Hasher as _};
    c.rulesets
        .iter()
        .map(|r| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for p in &r.rules[..(r.len as usize).min(r.rules.len())] {
                (p.port_lo, p.port_hi, p.protocols).hash(&mut h);
            }
            h.finish()
        })
        .collect()
}

/// Entries added and removed between two lists sorted by prefix (the compiler's order):
/// one merge pass, no allocation (a policy may hold 100k prefixes).
fn diff_sorted<N: Ord + Copy>(
    before: &[(N, u32)],
    before_sigs: &[u64],
    after: &[(N, u32)],
    after_sigs: &[u64],
) -> (usize, usize) {
    let sig = |sigs: &[u64], id: u32| sigs.get(id as usize).copied().unwrap_or(0);
    let (mut i, mut j, mut added, mut removed) = (0, 0, 0, 0);
    while i < before.len() && j < after.len() {
        let (b, a) = (before[i], after[j]);
        match b.0.cmp(&a.0) {
            std::cmp::Ordering::Less => {
                removed += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                added += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if sig(before_sigs, b.1) != sig(after_sigs, a.1) {
                    added += 1;
                    removed += 1;
                }
                i += 1;
                j += 1;
            }
        }
    }
    (added + (after.len() - j), removed + (before.len() - i))
}

#[cfg(test)]
mod tests {
    use super::diff_sorted;

    #[test]
    fn sorted_diff_counts_additions_removals_and_changed_rules() {
        let before = [(1u32, 0u32), (2, 0), (4, 0)];
        let after = [(2u32, 1u32), (3, 0), (4, 0)];
        // 1 removed, 3 added, 2 changed its ruleset (counts as one of each), 4 unchanged.
        assert_eq!(diff_sorted(&before, &[10, 20], &after, &[10, 20]), (2, 2));
        assert_eq!(diff_sorted(&before, &[10], &before, &[10]), (0, 0));
        assert_eq!(diff_sorted::<u32>(&[], &[], &after, &[10, 20]), (3, 0));
    }
}
