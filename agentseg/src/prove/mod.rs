//! `agentseg prove`: can any segment ever reach what the environment forbids? Every segment
//! of a policy is checked against a ceiling file ([`ceiling`]) on its *compiled* form — the
//! prefixes, rulesets and quarantine lists the kernel maps will hold — with the kernel's own
//! ruleset matcher, so the answer is exact over CIDRs, port ranges and protocols, not sampled.
//!
//! A `[[forbid]]` entry is violated by a segment whose name matches one of its patterns when:
//! - (`reach = "any"`, the default) some address of its peers is allowed on some forbidden
//!   protocol and port: an LPM entry overlapping the peers, whose own region (the entry minus
//!   its more specific entries) meets them, has a ruleset allowing the protocol and port;
//! - (`reach = "all"`) every address of one of its peer prefixes is allowed on one same
//!   forbidden protocol and port;
//! - the segment is in audit mode (it lets every flow through).
//!
//! The segment's `[quarantine] allow` list counts too (it is what stays reachable while
//! quarantined). Addresses learned at run time for `fqdns` rules cannot be known here: a note
//! names the `fqdns` rules that allow a forbidden port.
//!
//! Each violation carries a witness flow: an address, a protocol and a port the kernel would
//! let through, and the rule that allows it (file:line).
pub mod ceiling;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agentseg_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MODE_AUDIT, PROTO_NUMBERED,
    RULE_FIRST_SENTINEL, RuleSet, has_ports, ruleset_allows,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::compile::{Compiled, CompiledSegment};
use crate::explain::{RuleRef, Table, rule_ref, table};
use crate::policy::{PortRange, Protocol};
use ceiling::{Forbid, glob};

/// Which way a forbidden flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// The segment's members reach the peers.
    Egress,
    /// The peers reach the members.
    Ingress,
}

/// What lets the flow through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An `[[egress]]`/`[[ingress]]` rule.
    Rule,
    /// The `[quarantine] allow` list (reachable while quarantined).
    Quarantine,
    /// Audit mode lets every flow through.
    Audit,
}

/// A flow the kernel would let through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witness {
    pub peer: IpAddr,
    pub port: Option<u16>,
    /// IP protocol number.
    pub protocol: u8,
}

impl std::fmt::Display for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = crate::explain::proto_name(self.protocol);
        match (self.peer, self.port) {
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]:{p}/{proto}"),
            (a, Some(p)) => write!(f, "{a}:{p}/{proto}"),
            (a, None) => write!(f, "{a}/{proto}"),
        }
    }
}

/// The ceiling entry a violation breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeilingRef {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub ceiling: CeilingRef,
    pub segment: String,
    pub direction: Way,
    pub kind: Kind,
    /// The rule that allows the witness (none for audit mode).
    pub rule: Option<RuleRef>,
    pub witness: Witness,
    /// Other LPM entries of the same segment, rule and ceiling that also break it.
    pub more_prefixes: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// What could not be proved (fqdns rules) and ceilings that matched no segment.
    pub notes: Vec<String>,
    pub segments: usize,
    pub ceilings: usize,
}

/// Check every segment of `compiled` against `ceilings`.
pub fn prove(compiled: &Compiled, ceilings: &[Forbid]) -> Report {
    let mut report = Report {
        segments: compiled.segments.len(),
        ceilings: ceilings.len(),
        ..Report::default()
    };
    for forbid in ceilings {
        let matched: Vec<&CompiledSegment> = compiled
            .segments
            .iter()
            .filter(|s| forbid.segments.iter().any(|p| glob(p, &s.name)))
            .collect();
        if matched.is_empty() {
            report.notes.push(format!(
                "{}:{}: no segment matches {:?}",
                forbid.file.display(),
                forbid.line,
                forbid.segments
            ));
        }
        for seg in matched {
            check_segment(compiled, seg, forbid, &mut report);
        }
    }
    report
}

fn check_segment(compiled: &Compiled, seg: &CompiledSegment, forbid: &Forbid, report: &mut Report) {
    let ceiling = CeilingRef {
        file: forbid.file.display().to_string(),
        line: forbid.line,
        reason: forbid.reason.clone(),
    };
    let violation = |kind, rule, witness| Violation {
        ceiling: ceiling.clone(),
        segment: seg.name.clone(),
        direction: forbid.way,
        kind,
        rule,
        witness,
        more_prefixes: 0,
    };
    if seg.mode == MODE_AUDIT {
        // Every flow passes: the first forbidden address, protocol and port is a witness.
        if let Some(peer) = forbid.peers.first()
            && let Some((protocol, port)) =
                forbidden_flows(forbid, peer.network().is_ipv6()).first()
        {
            report.violations.push(violation(
                Kind::Audit,
                None,
                Witness {
                    peer: peer.network(),
                    port: *port,
                    protocol: *protocol,
                },
            ));
        }
        return;
    }
    // (kind, rule id) already reported for this ceiling and segment → its index.
    let mut seen: Vec<((Kind, u32), usize)> = Vec::new();
    let tables = match forbid.way {
        Way::Egress => [
            (Kind::Rule, Table::Egress),
            (Kind::Quarantine, Table::Quarantine),
        ],
        Way::Ingress => [
            (Kind::Rule, Table::Ingress),
            (Kind::Quarantine, Table::Quarantine),
        ],
    };
    for (kind, which) in tables {
        for peer in &forbid.peers {
            let entries = Entries::of(seg, which, peer.network().is_ipv6());
            let found = if forbid.all {
                whole_prefix(compiled, &entries, *peer, forbid)
                    .into_iter()
                    .collect()
            } else {
                any_address(compiled, &entries, *peer, forbid)
            };
            for (rule, witness) in found {
                match seen.iter().find(|(k, _)| *k == (kind, rule)) {
                    Some((_, i)) => report.violations[*i].more_prefixes += 1,
                    None => {
                        seen.push(((kind, rule), report.violations.len()));
                        report.violations.push(violation(
                            kind,
                            Some(rule_ref(compiled, rule)),
                            witness,
                        ));
                    }
                }
            }
        }
    }
    if forbid.way == Way::Egress {
        let mut named = BTreeSet::new();
        for e in &seg.fqdns {
            let Some(rs) = compiled.rulesets.get(e.ruleset_id as usize) else {
                continue;
            };
            if let Some((proto, port)) = allowed_by_all(&[rs], forbid, false) {
                let rule = ruleset_allows(rs, u32::from(proto), port.unwrap_or(0));
                if rule < RULE_FIRST_SENTINEL && named.insert(rule) {
                    report.notes.push(format!(
                        "{}:{}: segment {}: {} (fqdns {:?}) allows a forbidden port to \
                         addresses its names resolve to at run time; prove checks addresses, \
                         not names",
                        forbid.file.display(),
                        forbid.line,
                        seg.name,
                        rule_ref(compiled, rule),
                        e.pattern.as_str()
                    ));
                }
            }
        }
    }
}

/// One table of a segment in one family: (prefix, ruleset) sorted by (address, length), as
/// the compiler leaves them, with a set for "is this prefix an entry".
struct Entries {
    list: Vec<(IpNet, u32)>,
    set: HashSet<IpNet>,
}

impl Entries {
    fn of(seg: &CompiledSegment, which: Table, v6: bool) -> Entries {
        let list = table(seg, which, v6);
        let set = list.iter().map(|(n, _)| *n).collect();
        Entries { list, set }
    }

    /// Entries strictly inside `q` (longer prefixes whose address lies in it), in order.
    fn inside(&self, q: IpNet) -> impl Iterator<Item = &(IpNet, u32)> {
        let (lo, hi) = (bits(q.network()), bits(q.broadcast()));
        let start = self.list.partition_point(|(n, _)| bits(n.network()) < lo);
        self.list[start..]
            .iter()
            .take_while(move |(n, _)| bits(n.network()) <= hi)
            .filter(move |(n, _)| n.prefix_len() > q.prefix_len())
    }

    /// Whether an entry longer than `len` holds all of `q` (then an entry of length `len`
    /// decides nothing inside `q`).
    fn overridden(&self, q: IpNet, len: u8) -> bool {
        (len + 1..=q.prefix_len()).any(|l| {
            IpNet::new(q.network(), l)
                .map(|n| self.set.contains(&n.trunc()))
                .unwrap_or(false)
        })
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn addr(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    }
}

/// The first address of `q` no prefix of `subs` (all inside `q`, sorted by address) holds.
fn first_gap<'a>(q: IpNet, subs: impl Iterator<Item = &'a IpNet>) -> Option<IpAddr> {
    let v6 = q.network().is_ipv6();
    let end = bits(q.broadcast());
    let mut cursor = bits(q.network());
    for s in subs {
        let (lo, hi) = (bits(s.network()), bits(s.broadcast()));
        if lo > cursor {
            return Some(addr(cursor, v6));
        }
        if hi >= cursor {
            if hi >= end {
                return None;
            }
            cursor = hi + 1;
        }
    }
    (cursor <= end).then(|| addr(cursor, v6))
}

/// `reach = "any"`: for every entry whose own region meets `peer`, a forbidden flow its
/// ruleset allows, as (rule id, witness).
fn any_address(
    compiled: &Compiled,
    entries: &Entries,
    peer: IpNet,
    forbid: &Forbid,
) -> Vec<(u32, Witness)> {
    let v6 = peer.network().is_ipv6();
    let mut out = Vec::new();
    // Entries holding `peer` (shorter or equal), then entries inside it.
    let holding = (0..=peer.prefix_len()).filter_map(|l| {
        let n = IpNet::new(peer.network(), l).ok()?.trunc();
        entries.set.contains(&n).then_some(n)
    });
    let candidates: Vec<IpNet> = holding
        .chain(entries.inside(peer).map(|(n, _)| *n))
        .collect();
    for e in candidates {
        let Some(ruleset) = entries
            .list
            .binary_search_by(|(n, _)| {
                (bits(n.network()), n.prefix_len()).cmp(&(bits(e.network()), e.prefix_len()))
            })
            .ok()
            .map(|i| entries.list[i].1)
        else {
            continue;
        };
        let Some(rs) = compiled.rulesets.get(ruleset as usize) else {
            continue;
        };
        let Some((protocol, port)) = allowed_by_all(&[rs], forbid, v6) else {
            continue;
        };
        // Where `e` decides inside `peer`: their intersection minus longer entries.
        let q = if e.prefix_len() >= peer.prefix_len() {
            e
        } else {
            peer
        };
        if q != e && entries.overridden(q, e.prefix_len()) {
            continue;
        }
        let Some(witness) = first_gap(
            q,
            entries
                .inside(e)
                .filter(|(n, _)| q.contains(n))
                .map(|(n, _)| n),
        ) else {
            continue;
        };
        let rule = ruleset_allows(rs, u32::from(protocol), port.unwrap_or(0));
        out.push((
            rule,
            Witness {
                peer: witness,
                port,
                protocol,
            },
        ));
    }
    out
}

/// `reach = "all"`: a forbidden flow allowed to every address of `peer`, as (rule id at the
/// prefix's first address, witness).
fn whole_prefix(
    compiled: &Compiled,
    entries: &Entries,
    peer: IpNet,
    forbid: &Forbid,
) -> Option<(u32, Witness)> {
    let v6 = peer.network().is_ipv6();
    // The longest entry holding all of `peer`, and the entries inside it.
    let holder = (0..=peer.prefix_len()).rev().find_map(|l| {
        let n = IpNet::new(peer.network(), l).ok()?.trunc();
        entries.set.contains(&n).then_some(n)
    });
    let inner: Vec<&(IpNet, u32)> = entries.inside(peer).collect();
    let mut rulesets: Vec<&RuleSet> = Vec::new();
    // The holder decides what the inner entries leave uncovered; nothing holding it and a
    // gap is a default deny somewhere in the prefix.
    let gap = first_gap(peer, inner.iter().map(|(n, _)| n)).is_some();
    if gap {
        let h = holder?;
        let i = entries
            .list
            .binary_search_by(|(n, _)| {
                (bits(n.network()), n.prefix_len()).cmp(&(bits(h.network()), h.prefix_len()))
            })
            .ok()?;
        rulesets.push(compiled.rulesets.get(entries.list[i].1 as usize)?);
    }
    for (_, r) in &inner {
        rulesets.push(compiled.rulesets.get(*r as usize)?);
    }
    let (protocol, port) = allowed_by_all(&rulesets, forbid, v6)?;
    let first = peer.network();
    // The rule deciding the first address: the longest entry holding it.
    let decides = (0..=if v6 { 128 } else { 32 }).rev().find_map(|l| {
        let n = IpNet::new(first, l).ok()?.trunc();
        let i = entries
            .list
            .binary_search_by(|(e, _)| {
                (bits(e.network()), e.prefix_len()).cmp(&(bits(n.network()), n.prefix_len()))
            })
            .ok()?;
        Some(entries.list[i].1)
    })?;
    let rule = ruleset_allows(
        compiled.rulesets.get(decides as usize)?,
        u32::from(protocol),
        port.unwrap_or(0),
    );
    (rule < RULE_FIRST_SENTINEL).then_some((
        rule,
        Witness {
            peer: first,
            port,
            protocol,
        },
    ))
}

/// The protocols a ceiling forbids, as IP protocol numbers to try, given the rulesets
/// (numbered protocols they name are tried when the ceiling names none).
fn protocols(forbid: &Forbid, rulesets: &[&RuleSet], v6: bool) -> Vec<u8> {
    let icmp = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP } as u8;
    let (tcp, udp) = (IPPROTO_TCP as u8, IPPROTO_UDP as u8);
    let mut out = match forbid.protocol {
        Some(Protocol::Tcp) => vec![tcp],
        Some(Protocol::Udp) => vec![udp],
        Some(Protocol::Icmp) => vec![icmp],
        Some(Protocol::Any) => vec![tcp, udp, icmp],
        Some(Protocol::Number(n)) => vec![n],
        Some(Protocol::All) | None => {
            let mut v = vec![tcp, udp, icmp];
            for rs in rulesets {
                for r in rs.rules.iter().take(rs.len as usize) {
                    if r.protocols & PROTO_NUMBERED != 0 && !v.contains(&r.proto_num) {
                        v.push(r.proto_num);
                    }
                }
            }
            v
        }
    };
    // A ceiling with ports is about protocols with ports.
    if !forbid.ports.is_empty() {
        out.retain(|p| has_ports(u32::from(*p)));
    }
    out
}

/// The forbidden (protocol, port) pairs to try against nothing (audit mode): one per protocol.
fn forbidden_flows(forbid: &Forbid, v6: bool) -> Vec<(u8, Option<u16>)> {
    protocols(forbid, &[], v6)
        .into_iter()
        .map(|p| {
            let port = has_ports(u32::from(p)).then(|| forbid.ports.first().map_or(1, |r| r.lo));
            (p, port)
        })
        .collect()
}

/// A forbidden (protocol, port) that every ruleset allows. Exact: the ports tried are every
/// boundary of the forbidden ranges and of the rulesets' ranges (between two boundaries
/// every rule answers the same).
fn allowed_by_all(rulesets: &[&RuleSet], forbid: &Forbid, v6: bool) -> Option<(u8, Option<u16>)> {
    if rulesets.is_empty() {
        return None;
    }
    let every = [PortRange { lo: 1, hi: 65535 }];
    let ranges: &[PortRange] = if forbid.ports.is_empty() {
        &every
    } else {
        &forbid.ports
    };
    for protocol in protocols(forbid, rulesets, v6) {
        let allows = |port: u16| {
            rulesets
                .iter()
                .all(|rs| ruleset_allows(rs, u32::from(protocol), port) < RULE_FIRST_SENTINEL)
        };
        if !has_ports(u32::from(protocol)) {
            if allows(0) {
                return Some((protocol, None));
            }
            continue;
        }
        let mut points: BTreeSet<u16> = ranges.iter().map(|r| r.lo).collect();
        for rs in rulesets {
            for r in rs.rules.iter().take(rs.len as usize) {
                points.insert(r.port_lo);
                if let Some(next) = r.port_hi.checked_add(1) {
                    points.insert(next);
                }
            }
        }
        let forbidden = |p: u16| ranges.iter().any(|r| r.lo <= p && p <= r.hi);
        if let Some(port) = points
            .into_iter()
            .find(|&p| p != 0 && forbidden(p) && allows(p))
        {
            return Some((protocol, Some(port)));
        }
    }
    None
}
