//! Double-buffered policy: generation `g` owns segment ids with [`GEN_BIT`] = g and rulesets
//! `g * RULESETS_PER_GEN ..`. The daemon writes the inactive generation completely, flips
//! `Config::active_gen` (one map write), then clears the old one. Rules in both versions never
//! blink; no connection sees a mix.
use std::collections::BTreeSet;

use agentseg_common::{
    GEN_BIT, INGRESS_BIT, MAX_SEGMENT_ID, PolicyKeyV4, PolicyKeyV6, PolicyValue, QUARANTINE_BIT,
    RULES_PER_GEN, RULESETS_PER_GEN, RuleSet, SEG_QUARANTINED, SEGMENT_NAME_LEN,
    SEGMENT_PREFIX_BITS, SegmentInfo, map_names,
};
use aya::maps::{
    Array, HashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};

use super::{Datapath, DatapathError, map_mut, map_ref};
use crate::compile::Compiled;

/// A segment as the kernel holds it in one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry {
    /// Kernel id (generation bit included).
    pub id: u32,
    pub name: String,
    pub mode: u32,
    pub flags: u32,
}

/// Kernel segment id of compiled segment `compiled_id` in `generation`.
pub fn segment_id(generation: u32, compiled_id: u32) -> u32 {
    if generation & 1 == 1 {
        compiled_id | GEN_BIT
    } else {
        compiled_id & !GEN_BIT
    }
}

pub fn generation_of(id: u32) -> u32 {
    u32::from(id & GEN_BIT != 0)
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Datapath {
    /// The segments of one generation, read back from the kernel.
    pub fn segments(&self, generation: u32) -> Result<Vec<SegmentEntry>, DatapathError> {
        let segments: HashMap<&MapData, u32, SegmentInfo> =
            map_ref!(self, HashMap, map_names::SEGMENTS);
        let mut out = Vec::new();
        for entry in segments.iter() {
            let (id, info) = entry.map_err(map_err(map_names::SEGMENTS))?;
            if generation_of(id) != generation & 1 {
                continue;
            }
            let len = info
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(SEGMENT_NAME_LEN);
            let name = String::from_utf8_lossy(&info.name[..len]).into_owned();
            out.push(SegmentEntry {
                id,
                name,
                mode: info.mode,
                flags: info.flags,
            });
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Write a compiled policy into `generation` (which must not be live). Segments named in
    /// `quarantined` get their quarantine flag set in it.
    pub fn write_generation(
        &mut self,
        generation: u32,
        compiled: &Compiled,
        quarantined: &BTreeSet<String>,
    ) -> Result<(), DatapathError> {
        let generation = generation & 1;
        if compiled.rulesets.len() > RULESETS_PER_GEN as usize {
            return Err(DatapathError::Capacity(format!(
                "the policy needs {} distinct rulesets; the kernel holds {RULESETS_PER_GEN}",
                compiled.rulesets.len()
            )));
        }
        if compiled.rules.len() > RULES_PER_GEN as usize {
            return Err(DatapathError::Capacity(format!(
                "the policy has {} rules; the kernel counts {RULES_PER_GEN}",
                compiled.rules.len()
            )));
        }
        if let Some(seg) = compiled.segments.iter().find(|s| s.id > MAX_SEGMENT_ID) {
            return Err(DatapathError::Capacity(format!(
                "too many segments ({})",
                seg.id
            )));
        }
        let base = generation * RULESETS_PER_GEN;
        {
            let mut rulesets: Array<&mut MapData, RuleSet> =
                map_mut!(self, Array, map_names::RULESETS);
            for (id, rs) in compiled.rulesets.iter().enumerate() {
                // Rule ids are offset per generation so RULE_HITS of the two never mix.
                let mut rs = *rs;
                for r in rs.rules.iter_mut().take(rs.len as usize) {
                    r.rule_id += generation * RULES_PER_GEN;
                }
                rulesets
                    .set(base + id as u32, rs, 0)
                    .map_err(map_err(map_names::RULESETS))?;
            }
        }
        {
            let mut v4: LpmTrie<&mut MapData, PolicyKeyV4, PolicyValue> =
                map_mut!(self, LpmTrie, map_names::POLICY_V4);
            for seg in &compiled.segments {
                let id = segment_id(generation, seg.id);
                for (table, entries) in [
                    (id, &seg.egress_v4),
                    (id | INGRESS_BIT, &seg.ingress_v4),
                    (id | QUARANTINE_BIT, &seg.quarantine_v4),
                ] {
                    for (net, ruleset) in entries {
                        let key = Key::new(
                            SEGMENT_PREFIX_BITS + u32::from(net.prefix_len()),
                            PolicyKeyV4 {
                                segment_id_be: table.to_be_bytes(),
                                addr_be: net.network().octets(),
                            },
                        );
                        v4.insert(
                            &key,
                            PolicyValue {
                                ruleset_id: base + ruleset,
                            },
                            0,
                        )
                        .map_err(map_err(map_names::POLICY_V4))?;
                    }
                }
            }
        }
        {
            let mut v6: LpmTrie<&mut MapData, PolicyKeyV6, PolicyValue> =
                map_mut!(self, LpmTrie, map_names::POLICY_V6);
            for seg in &compiled.segments {
                let id = segment_id(generation, seg.id);
                for (table, entries) in [
                    (id, &seg.egress_v6),
                    (id | INGRESS_BIT, &seg.ingress_v6),
                    (id | QUARANTINE_BIT, &seg.quarantine_v6),
                ] {
                    for (net, ruleset) in entries {
                        let key = Key::new(
                            SEGMENT_PREFIX_BITS + u32::from(net.prefix_len()),
                            PolicyKeyV6 {
                                segment_id_be: table.to_be_bytes(),
                                addr_be: net.network().octets(),
                            },
                        );
                        v6.insert(
                            &key,
                            PolicyValue {
                                ruleset_id: base + ruleset,
                            },
                            0,
                        )
                        .map_err(map_err(map_names::POLICY_V6))?;
                    }
                }
            }
        }
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        for seg in &compiled.segments {
            let mut name = [0u8; SEGMENT_NAME_LEN];
            let bytes = seg.name.as_bytes();
            let n = bytes.len().min(SEGMENT_NAME_LEN);
            name[..n].copy_from_slice(&bytes[..n]);
            let flags = seg.flags
                | if quarantined.contains(&seg.name) {
                    SEG_QUARANTINED
                } else {
                    0
                };
            let info = SegmentInfo {
                mode: seg.mode,
                flags,
                name,
            };
            segments
                .insert(segment_id(generation, seg.id), info, 0)
                .map_err(map_err(map_names::SEGMENTS))?;
        }
        Ok(())
    }

    /// Set or clear a live segment's quarantine flag: one map write, seen by the next packet.
    pub fn set_segment_quarantine(&mut self, id: u32, on: bool) -> Result<(), DatapathError> {
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        let mut info = segments.get(&id, 0).map_err(map_err(map_names::SEGMENTS))?;
        if on {
            info.flags |= SEG_QUARANTINED;
        } else {
            info.flags &= !SEG_QUARANTINED;
        }
        segments
            .insert(id, info, 0)
            .map_err(map_err(map_names::SEGMENTS))
    }

    /// Delete every prefix and segment of `generation` (never the live one).
    pub fn clear_generation(&mut self, generation: u32) -> Result<usize, DatapathError> {
        let generation = generation & 1;
        let mut removed = 0;
        {
            let mut v4: LpmTrie<&mut MapData, PolicyKeyV4, PolicyValue> =
                map_mut!(self, LpmTrie, map_names::POLICY_V4);
            let keys: Vec<Key<PolicyKeyV4>> = v4
                .keys()
                .filter_map(Result::ok)
                .filter(|k| generation_of(u32::from_be_bytes(k.data().segment_id_be)) == generation)
                .collect();
            for k in &keys {
                v4.remove(k).map_err(map_err(map_names::POLICY_V4))?;
            }
            removed += keys.len();
        }
        {
            let mut v6: LpmTrie<&mut MapData, PolicyKeyV6, PolicyValue> =
                map_mut!(self, LpmTrie, map_names::POLICY_V6);
            let keys: Vec<Key<PolicyKeyV6>> = v6
                .keys()
                .filter_map(Result::ok)
                .filter(|k| generation_of(u32::from_be_bytes(k.data().segment_id_be)) == generation)
                .collect();
            for k in &keys {
                v6.remove(k).map_err(map_err(map_names::POLICY_V6))?;
            }
            removed += keys.len();
        }
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        let ids: Vec<u32> = segments
            .keys()
            .filter_map(Result::ok)
            .filter(|id| generation_of(*id) == generation)
            .collect();
        for id in ids {
            segments.remove(&id).map_err(map_err(map_names::SEGMENTS))?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_ids_carry_their_generation() {
        assert_eq!(segment_id(0, 5), 5);
        assert_eq!(segment_id(1, 5), 5 | GEN_BIT);
        assert_eq!(generation_of(segment_id(1, 5)), 1);
        assert_eq!(generation_of(segment_id(0, 5)), 0);
    }
}
