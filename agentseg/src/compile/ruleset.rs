//! Rules → kernel port rules, normalization, capacity merging and ruleset interning.

use std::collections::HashMap;

use agentseg_common::{
    PROTO_ALL, PROTO_ICMP, PROTO_NUMBERED, PROTO_TCP, PROTO_UDP, PortRule, RULESET_CAPACITY,
    RULESET_EMPTY, RuleSet,
};

use crate::policy::{Protocol, Rule};

/// The kernel entries one policy rule contributes to every ruleset it is part of.
pub(super) fn port_rules(rule: &Rule, rule_id: u32) -> Vec<PortRule> {
    let numbered = |lo: u16, hi: u16, protocols: u8, proto_num: u8| PortRule {
        port_lo: lo,
        port_hi: hi,
        protocols,
        proto_num,
        _pad: [0; 2],
        rule_id,
    };
    let entry = |lo: u16, hi: u16, protocols: u8| numbered(lo, hi, protocols, 0);
    let ranged = |protocols: u8| -> Vec<PortRule> {
        if rule.ports.is_empty() {
            vec![entry(0, u16::MAX, protocols)]
        } else {
            rule.ports
                .iter()
                .map(|p| entry(p.lo, p.hi, protocols))
                .collect()
        }
    };
    match rule.protocol {
        Protocol::Tcp => ranged(PROTO_TCP),
        Protocol::Udp => ranged(PROTO_UDP),
        // ICMP has no ports; the kernel ignores the range for it.
        Protocol::Icmp => vec![entry(0, u16::MAX, PROTO_ICMP)],
        Protocol::Any if rule.ports.is_empty() => {
            vec![entry(0, u16::MAX, PROTO_TCP | PROTO_UDP | PROTO_ICMP)]
        }
        // "any" with ports only makes sense for the protocols that have ports.
        Protocol::Any => ranged(PROTO_TCP | PROTO_UDP),
        Protocol::All => vec![entry(0, u16::MAX, PROTO_ALL)],
        Protocol::Number(n) if rule.ports.is_empty() || !rule.protocol.has_ports() => {
            vec![numbered(0, u16::MAX, PROTO_NUMBERED, n)]
        }
        Protocol::Number(n) => rule
            .ports
            .iter()
            .map(|p| numbered(p.lo, p.hi, PROTO_NUMBERED, n))
            .collect(),
    }
}

/// Sorts and deduplicates (same protocols and range: the lowest rule id is kept). Over
/// capacity, ranges with the same protocols that overlap or touch are merged first; if that is
/// still too many, returns `Err(count after merging)`.
pub(super) fn normalize(mut rules: Vec<PortRule>) -> Result<Vec<PortRule>, usize> {
    let same = |a: &PortRule, b: &PortRule| {
        (a.port_lo, a.port_hi, a.protocols, a.proto_num)
            == (b.port_lo, b.port_hi, b.protocols, b.proto_num)
    };
    rules.sort_unstable();
    // Sorted with rule_id last, so the first of equal entries has the lowest id.
    rules.dedup_by(|later, first| same(later, first));
    if rules.len() <= RULESET_CAPACITY {
        return Ok(rules);
    }

    rules.sort_unstable_by_key(|r| (r.protocols, r.proto_num, r.port_lo, r.port_hi, r.rule_id));
    let mut merged: Vec<PortRule> = Vec::with_capacity(rules.len());
    for r in rules {
        match merged.last_mut() {
            Some(m)
                if (m.protocols, m.proto_num) == (r.protocols, r.proto_num)
                    && r.port_lo <= m.port_hi.saturating_add(1) =>
            {
                m.port_hi = m.port_hi.max(r.port_hi);
                m.rule_id = m.rule_id.min(r.rule_id);
            }
            _ => merged.push(r),
        }
    }
    merged.sort_unstable();
    if merged.len() > RULESET_CAPACITY {
        return Err(merged.len());
    }
    Ok(merged)
}

/// Identical rulesets share one id; id 0 is always the empty set (deny).
pub(super) struct Interner {
    ids: HashMap<Vec<PortRule>, u32>,
    pub sets: Vec<RuleSet>,
}

impl Interner {
    pub fn new() -> Self {
        let mut ids = HashMap::new();
        ids.insert(Vec::new(), RULESET_EMPTY);
        Self {
            ids,
            sets: vec![RuleSet::default()],
        }
    }

    /// `rules` must be normalized (at most [`RULESET_CAPACITY`] entries).
    pub fn intern(&mut self, rules: Vec<PortRule>) -> u32 {
        if let Some(&id) = self.ids.get(&rules) {
            return id;
        }
        let id = super::to_u32(self.sets.len());
        let mut set = RuleSet::default();
        for (slot, r) in set.rules.iter_mut().zip(&rules) {
            *slot = *r;
        }
        set.len = super::to_u32(rules.len().min(RULESET_CAPACITY));
        self.sets.push(set);
        self.ids.insert(rules, id);
        id
    }
}
