//! [`PolicySet`] → the desired contents of the kernel maps. Pure and deterministic: the same
//! policy always gives the same ids and the same [`Compiled::to_text`].
//!
//! Segment id = index + 1 (0 is never used), ruleset 0 = the empty set (deny), rulesets of a
//! segment's `fqdns` rules interned after its egress prefixes' ones (`fqdn.rs`), rule id =
//! index into [`Compiled::rules`] (segments in order; within one: egress then ingress in file
//! order, the quarantine allow list if it has one, `[[unix]]` rules in file order, the host's
//! AF_UNIX baseline if it has one, `[quarantine] unix` if present).

mod cover;
mod digest;
mod fqdn;
mod ruleset;
mod text;
mod unix;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fqdn;
#[cfg(test)]
mod tests_semantics;
#[cfg(test)]
mod tests_unix;

use std::fmt;
use std::path::PathBuf;

use agentseg_common::{MODE_AUDIT, MODE_ENFORCE, PortRule, RULESET_CAPACITY, RuleSet};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::{DaemonLoss, Fqdn, Mode, Origin, PolicySet, Protocol, Rule, Segment};
use cover::{FamRule, Net};
pub use fqdn::FqdnEntry;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Same order as `PolicySet::segments`; `segments[i].id == i + 1`.
    pub segments: Vec<CompiledSegment>,
    /// Ruleset id = index; index 0 is always the empty set (deny).
    pub rulesets: Vec<RuleSet>,
    /// Rule id = index.
    pub rules: Vec<RuleInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledSegment {
    pub id: u32,
    pub name: String,
    /// `agentseg_common::MODE_*`.
    pub mode: u32,
    /// `agentseg_common::SEG_*` flags.
    pub flags: u32,
    /// (prefix, ruleset id), sorted by (address, prefix length).
    pub egress_v4: Vec<(Ipv4Net, u32)>,
    pub egress_v6: Vec<(Ipv6Net, u32)>,
    pub ingress_v4: Vec<(Ipv4Net, u32)>,
    pub ingress_v6: Vec<(Ipv6Net, u32)>,
    /// `[[egress]] fqdns`: one entry per (rule, pattern), sorted by pattern then rule id; for
    /// the resolver ([`CompiledSegment::fqdn_rules_for`]), not a kernel map of its own.
    pub fqdns: Vec<FqdnEntry>,
    /// `[quarantine] allow`: every prefix maps to one ruleset that allows every protocol and
    /// port (its rule id is the quarantine list's [`RuleInfo`]). Applies to both directions
    /// while the segment or one of its agents is quarantined. Sorted like the others; empty
    /// when the segment has no allow list.
    pub quarantine_v4: Vec<(Ipv4Net, u32)>,
    pub quarantine_v6: Vec<(Ipv6Net, u32)>,
    pub member_cgroups: Vec<String>,
    /// Passed through; the daemon resolves them to cgroups.
    pub member_units: Vec<String>,
    /// `[monitor]`, passed through for the daemon's detectors (not a kernel map).
    pub monitor: crate::policy::Monitor,
    /// AF_UNIX entries (`[[unix]]`, the daemon's `[unix] allow` baseline, the always-refused
    /// control socket), sorted by key bytes, one entry per key (a deny wins over an allow).
    pub unix: Vec<UnixEntry>,
    /// `[quarantine] unix`: what stays reachable over AF_UNIX while quarantined.
    pub quarantine_unix: Vec<UnixEntry>,
    /// Passed through for `agentseg run` (sent to the launcher with the agent's uid).
    pub sandbox: crate::policy::Sandbox,
}

/// One AF_UNIX trie entry of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixEntry {
    pub pattern: crate::policy::UnixPattern,
    /// Rule id (index into [`Compiled::rules`]) or a `RULE_*` sentinel for the control socket.
    pub rule_id: u32,
    /// `agentseg_common::UNIX_ALLOW` or `UNIX_DENY`.
    pub verdict: u32,
}

/// What the host (the daemon's config) adds to every segment: the AF_UNIX baseline and the
/// addresses no member may ever reach.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostPolicy {
    /// `[unix] allow` of the daemon config, with where it is defined (rule origin).
    pub unix_allow: Vec<crate::policy::UnixPattern>,
    pub unix_allow_origin: Option<Origin>,
    /// Exact paths refused to every member whatever its rules say (the control socket).
    pub unix_deny: Vec<crate::policy::UnixPattern>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Egress,
    Ingress,
    /// A segment's `[quarantine] allow` list (both directions, during quarantine only).
    Quarantine,
    /// A `[[unix]]` rule, or the daemon's `[unix] allow` baseline.
    Unix,
    /// A segment's `[quarantine] unix` list.
    QuarantineUnix,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::Quarantine => "quarantine",
            Direction::Unix => "unix",
            Direction::QuarantineUnix => "quarantine-unix",
        })
    }
}

/// Where a rule id comes from (for counters, audit logs and `check --show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub id: u32,
    pub segment: String,
    pub direction: Direction,
    pub file: PathBuf,
    pub line: usize,
}

/// A prefix whose covering rules (or an `fqdns` rule whose ports) need more port rules than
/// one kernel ruleset holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "segment \"{segment}\" {direction} {target}: {count} port rules (after merging) exceed the \
     ruleset capacity of {RULESET_CAPACITY}; rules involved: {}",
    origins(.rules)
)]
pub struct CompileError {
    pub segment: String,
    pub direction: Direction,
    pub target: Target,
    pub count: usize,
    /// Every rule covering the prefix (the one rule, for names).
    pub rules: Vec<Origin>,
}

/// What a [`CompileError`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A prefix's LPM entry.
    Prefix(IpNet),
    /// The ruleset of one rule's `fqdns`.
    Names(Vec<Fqdn>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Prefix(net) => write!(f, "{net}"),
            Target::Names(names) => {
                let names: Vec<&str> = names.iter().map(Fqdn::as_str).collect();
                write!(f, "fqdns {}", names.join(", "))
            }
        }
    }
}

fn origins(rules: &[Origin]) -> String {
    rules
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct CompileErrors(pub Vec<CompileError>);

/// Ids are u32 in the kernel; more than 4 billion of anything is far beyond map limits, so
/// saturating keeps this panic-free without a dead error path.
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// [`compile_with`] a host that adds nothing (no AF_UNIX baseline, nothing refused).
pub fn compile(set: &PolicySet) -> Result<Compiled, CompileErrors> {
    compile_with(set, &HostPolicy::default())
}

/// Compiles `set` for a host whose daemon adds `host` to every segment.
pub fn compile_with(set: &PolicySet, host: &HostPolicy) -> Result<Compiled, CompileErrors> {
    let mut interner = ruleset::Interner::new();
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    let mut segments = Vec::with_capacity(set.segments.len());
    for (index, seg) in set.segments.iter().enumerate() {
        let mut out = CompiledSegment {
            id: to_u32(index + 1),
            name: seg.name.to_string(),
            mode: match seg.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            flags: match seg.on_daemon_loss {
                DaemonLoss::Keep => 0,
                DaemonLoss::Quarantine => agentseg_common::SEG_DEADMAN_QUARANTINE,
            },
            egress_v4: Vec::new(),
            egress_v6: Vec::new(),
            ingress_v4: Vec::new(),
            ingress_v6: Vec::new(),
            fqdns: Vec::new(),
            quarantine_v4: Vec::new(),
            quarantine_v6: Vec::new(),
            member_cgroups: seg.members.cgroups.clone(),
            member_units: seg.members.units.clone(),
            monitor: seg.monitor.clone(),
            unix: Vec::new(),
            quarantine_unix: Vec::new(),
            sandbox: seg.sandbox.clone(),
        };
        let quarantine = quarantine_rule(seg);
        for (direction, dir_rules) in [
            (Direction::Egress, seg.egress.as_slice()),
            (Direction::Ingress, seg.ingress.as_slice()),
            (Direction::Quarantine, quarantine.as_slice()),
        ] {
            let first_id = rules.len();
            rules.extend(dir_rules.iter().enumerate().map(|(i, r)| RuleInfo {
                id: to_u32(first_id + i),
                segment: out.name.clone(),
                direction,
                file: r.origin.file.clone(),
                line: r.origin.line,
            }));
            let mut dir = DirCompiler {
                segment: &out.name,
                direction,
                rules: dir_rules,
                port_rules: dir_rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| ruleset::port_rules(r, to_u32(first_id + i)))
                    .collect(),
                interner: &mut interner,
                errors: &mut errors,
            };
            let v4 = dir.family(|n| match n {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            });
            let v6 = dir.family(|n| match n {
                IpNet::V6(n) => Some(*n),
                IpNet::V4(_) => None,
            });
            match direction {
                Direction::Egress => {
                    (out.egress_v4, out.egress_v6) = (v4, v6);
                    // After the prefixes: a policy without names keeps its ruleset numbers.
                    out.fqdns =
                        fqdn::entries(&out.name, dir_rules, first_id, &mut interner, &mut errors);
                }
                Direction::Ingress => (out.ingress_v4, out.ingress_v6) = (v4, v6),
                Direction::Quarantine => (out.quarantine_v4, out.quarantine_v6) = (v4, v6),
                Direction::Unix | Direction::QuarantineUnix => {}
            }
        }
        (out.unix, out.quarantine_unix) = unix::tables(seg, &out.name, host, &mut rules);
        segments.push(out);
    }
    if !errors.is_empty() {
        return Err(CompileErrors(errors));
    }
    Ok(Compiled {
        segments,
        rulesets: interner.sets,
        rules,
    })
}

/// The quarantine allow list as one rule (all protocols, all ports, no excepts), so that it
/// goes through the same cover/normalize/intern path as the other rules; none when the list
/// is empty. Its origin is the `[quarantine]` table.
fn quarantine_rule(seg: &Segment) -> Vec<Rule> {
    if seg.quarantine_allow.is_empty() {
        return Vec::new();
    }
    vec![Rule {
        cidrs: seg.quarantine_allow.clone(),
        except: Vec::new(),
        fqdns: Vec::new(),
        ports: Vec::new(),
        protocol: Protocol::All,
        origin: seg
            .quarantine_origin
            .clone()
            .unwrap_or_else(|| seg.origin.clone()),
    }]
}

/// The rules of one segment and direction.
struct DirCompiler<'a> {
    segment: &'a str,
    direction: Direction,
    rules: &'a [Rule],
    /// Per rule, the kernel entries it contributes.
    port_rules: Vec<Vec<PortRule>>,
    interner: &'a mut ruleset::Interner,
    errors: &'a mut Vec<CompileError>,
}

impl DirCompiler<'_> {
    fn family<N: Net + Into<IpNet>>(
        &mut self,
        pick: impl Fn(&IpNet) -> Option<N>,
    ) -> Vec<(N, u32)> {
        let fam: Vec<FamRule<N>> = self
            .rules
            .iter()
            .map(|r| FamRule {
                cidrs: r.cidrs.iter().filter_map(&pick).collect(),
                excepts: r.except.iter().filter_map(&pick).collect(),
            })
            .collect();
        let cover = cover::cover(&fam);
        // One ruleset per distinct covering set, interned when the set is first met (in
        // prefix order, so ids do not depend on how the sets were found).
        let mut by_set: Vec<Option<Result<u32, usize>>> = vec![None; cover.sets.len()];
        let mut entries = Vec::with_capacity(cover.entries.len());
        for (net, set) in cover.entries {
            let covering = cover.sets.get(set).map_or(&[][..], Vec::as_slice);
            let result = match by_set.get(set).copied().flatten() {
                Some(r) => r,
                None => {
                    let contents: Vec<PortRule> = covering
                        .iter()
                        .filter_map(|&i| self.port_rules.get(i))
                        .flatten()
                        .copied()
                        .collect();
                    let r = ruleset::normalize(contents).map(|c| self.interner.intern(c));
                    if let Some(slot) = by_set.get_mut(set) {
                        *slot = Some(r);
                    }
                    r
                }
            };
            match result {
                Ok(id) => entries.push((net, id)),
                Err(count) => self.errors.push(CompileError {
                    segment: self.segment.to_string(),
                    direction: self.direction,
                    target: Target::Prefix(net.into()),
                    count,
                    rules: covering
                        .iter()
                        .filter_map(|&i| self.rules.get(i))
                        .map(|r| r.origin.clone())
                        .collect(),
                }),
            }
        }
        entries
    }
}

impl Compiled {
    /// Number of LPM entries over all segments, directions (quarantine included) and
    /// families, AF_UNIX entries included.
    pub fn entry_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| {
                s.egress_v4.len()
                    + s.egress_v6.len()
                    + s.ingress_v4.len()
                    + s.ingress_v6.len()
                    + s.quarantine_v4.len()
                    + s.quarantine_v6.len()
            })
            .sum()
    }

    /// Number of [`FqdnEntry`]s over all segments.
    pub fn fqdn_entry_count(&self) -> usize {
        self.segments.iter().map(|s| s.fqdns.len()).sum()
    }

    /// Number of AF_UNIX trie entries over all segments (quarantine lists included).
    pub fn unix_entry_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| s.unix.len() + s.quarantine_unix.len())
            .sum()
    }
}
