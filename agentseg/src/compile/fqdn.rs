//! `[[egress]] fqdns` → one [`FqdnEntry`] per (rule, name pattern).
//!
//! The kernel cannot look names up: the daemon's resolver matches each name a member asks for
//! against its segment's entries ([`CompiledSegment::fqdn_rules_for`]) and writes the answer's
//! addresses into the segment's learned-address state with the entry's ruleset, so the rule's
//! ports and protocol apply to them. The ruleset is interned with the prefix rulesets (same
//! ids, same generation-relative numbering), and holds exactly that rule's port rules under
//! its rule id: a rule with both `cidrs` and `fqdns` has one rule id for both.

use agentseg_common::PortRule;

use super::ruleset::{self, Interner};
use super::{CompileError, CompiledSegment, Direction, Target, to_u32};
use crate::policy::{Fqdn, Rule};

/// One name pattern of one egress rule of a segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FqdnEntry {
    pub pattern: Fqdn,
    /// The rule (index into [`super::Compiled::rules`]); counted, reported and named in events
    /// like a prefix rule.
    pub rule_id: u32,
    /// Index into [`super::Compiled::rulesets`]: the rule's port rules (never 0, the empty
    /// set), for the addresses the resolver learns for a matching name.
    pub ruleset_id: u32,
}

/// The entries of one segment's egress rules (rule ids from `first_id`), sorted by pattern,
/// then rule id. A rule whose port rules do not fit one ruleset even after merging is an error.
pub(super) fn entries(
    segment: &str,
    rules: &[Rule],
    first_id: usize,
    interner: &mut Interner,
    errors: &mut Vec<CompileError>,
) -> Vec<FqdnEntry> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if rule.fqdns.is_empty() {
            continue;
        }
        let rule_id = to_u32(first_id + i);
        let contents: Vec<PortRule> = ruleset::port_rules(rule, rule_id);
        let ruleset_id = match ruleset::normalize(contents) {
            Ok(contents) => interner.intern(contents),
            Err(count) => {
                errors.push(CompileError {
                    segment: segment.to_owned(),
                    direction: Direction::Egress,
                    target: Target::Names(rule.fqdns.clone()),
                    count,
                    rules: vec![rule.origin.clone()],
                });
                continue;
            }
        };
        out.extend(rule.fqdns.iter().map(|pattern| FqdnEntry {
            pattern: pattern.clone(),
            rule_id,
            ruleset_id,
        }));
    }
    out.sort();
    out
}

impl CompiledSegment {
    /// Every entry whose pattern matches `name` (as it comes off the wire: any case, trailing
    /// dot optional), in entry order. None for a name no rule allows, or an oddly formed one.
    pub fn fqdn_rules_for<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a FqdnEntry> {
        self.fqdns.iter().filter(move |e| e.pattern.matches(name))
    }
}
