//! `agentseg explain`: the verdict the kernel gives one flow of one segment, the rule (or the
//! default, the quarantine, the resolver) that decides it, and for a refused flow the nearest
//! rule that would allow it. Pure: computed on the [`Compiled`] policy — the contents of the
//! kernel maps — with the ruleset matcher the hooks themselves call
//! ([`agentseg_common::ruleset_allows`]), so the answer cannot drift from the kernel's.
//!
//! The decision follows the hooks: for egress, port 53 of TCP/UDP goes to agentseg's resolver
//! when it is on (it answers per query by the segment's `fqdns` rules); then the segment's
//! table (its `[quarantine] allow` list while quarantined), longest prefix first, the first
//! entry of the prefix's ruleset that allows (protocol, port); then the addresses the
//! resolver learned for the segment. What no rule allows is refused, or let through and
//! counted in audit mode. Ingress is the table of `[[ingress]]` rules, by the peer's address
//! and the member's own port (a TCP listener's view).
use std::{fmt, net::IpAddr, str::FromStr};

use agentseg_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, LearnedValue, MODE_AUDIT, PROTO_ALL,
    PROTO_ICMP, PROTO_NUMBERED, PROTO_TCP, PROTO_UDP, PortRule, RULE_FIRST_SENTINEL, has_ports,
    rule_allows, ruleset_allows,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::compile::{Compiled, CompiledSegment, Direction as RuleDirection};
use crate::policy::Protocol;

/// Which way the flow goes, seen from the segment's member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The member connects or sends to the peer (`--to`).
    Egress,
    /// The peer connects or sends to the member (`--from`).
    Ingress,
}

/// One flow to explain: the peer, the port (the peer's for egress, the member's own for
/// ingress) and the IP protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub direction: Direction,
    pub peer: IpAddr,
    /// `None` for protocols without ports (ICMP, GRE...).
    pub port: Option<u16>,
    pub protocol: u8,
}

/// A flow spec that cannot be read; the text says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FlowError(String);

/// `ADDR[:PORT][/PROTO]`: `10.0.0.5:443`, `10.0.0.5:53/udp`, `[2001:db8::1]:443/tcp`,
/// `2001:db8::1/icmp`, `10.0.0.5/gre`, `10.0.0.5/proto-89`. The protocol defaults to tcp; a
/// protocol with ports needs one. A bare number after `/` is refused: it reads as a prefix.
impl Flow {
    pub fn parse(direction: Direction, spec: &str) -> Result<Flow, FlowError> {
        let bad = |why: String| FlowError(format!("{spec:?}: {why}"));
        let (addr_port, proto) = match spec.rsplit_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (spec, None),
        };
        let protocol = match proto {
            None => IPPROTO_TCP as u8,
            Some(p) if p.parse::<u8>().is_ok() => {
                return Err(bad(format!(
                    "/{p} reads as a prefix length: a flow has one address (write a protocol \
                     number as proto-{p})"
                )));
            }
            Some(p) => protocol_number(p).ok_or_else(|| {
                bad(format!(
                    "unknown protocol {p:?} (tcp, udp, icmp, icmpv6, {}, or proto-N for a \
                     number 0-255)",
                    Protocol::NAMED
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
        };
        let (addr, port) = split_port(addr_port).map_err(|e| bad(e.to_owned()))?;
        let peer = IpAddr::from_str(addr)
            .map_err(|_| bad(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
        let ported = has_ports(u32::from(protocol));
        let port = match (port, ported) {
            (Some(p), true) => {
                let p: u16 = p
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("port {p:?} is not 1-65535")))?;
                Some(p)
            }
            (None, true) => {
                return Err(bad(format!(
                    "{} needs a port (ADDR:PORT/{})",
                    proto_name(protocol),
                    proto_name(protocol)
                )));
            }
            (Some(_), false) => {
                return Err(bad(format!("{} has no ports", proto_name(protocol))));
            }
            (None, false) => None,
        };
        let mut peer = canonical(peer);
        // A connect or send to the unspecified address reaches loopback: the hooks judge it
        // as loopback.
        if direction == Direction::Egress && peer.is_unspecified() {
            peer = match peer {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            };
        }
        Ok(Flow {
            direction,
            peer,
            port,
            protocol,
        })
    }
}

/// `[v6]:port`, `v4:port`, or the address alone (a bare IPv6 address has colons of its own).
fn split_port(s: &str) -> Result<(&str, Option<&str>), &'static str> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("'[' without ']'")?;
        return match after {
            "" => Ok((addr, None)),
            _ => after
                .strip_prefix(':')
                .map(|p| (addr, Some(p)))
                .ok_or("expected ':PORT' after ']'"),
        };
    }
    match s.split_once(':') {
        Some((a, p)) if !p.contains(':') => Ok((a, Some(p))),
        _ => Ok((s, None)),
    }
}

/// A protocol's number from its name (`tcp`, `icmpv6`, `sctp`, `proto-89`).
pub(crate) fn protocol_number(name: &str) -> Option<u8> {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "tcp" => Some(IPPROTO_TCP as u8),
        "udp" => Some(IPPROTO_UDP as u8),
        "icmp" => Some(IPPROTO_ICMP as u8),
        "icmpv6" | "ipv6-icmp" => Some(IPPROTO_ICMPV6 as u8),
        _ => Protocol::NAMED
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, v)| *v)
            .or_else(|| lower.strip_prefix("proto-")?.parse().ok()),
    }
}

/// A protocol number as flows and policies name it (`tcp`, `icmpv6`, `sctp`, `89`).
pub(crate) fn proto_name(protocol: u8) -> String {
    match u32::from(protocol) {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        IPPROTO_ICMP => "icmp".to_owned(),
        IPPROTO_ICMPV6 => "icmpv6".to_owned(),
        _ => Protocol::Number(protocol).to_string(),
    }
}

/// An IPv4-mapped IPv6 address is judged as the IPv4 address it carries (as the hooks do).
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (way, peer) = match self.direction {
            Direction::Egress => ("to", self.peer),
            Direction::Ingress => ("from", self.peer),
        };
        let proto = proto_name(self.protocol);
        match (self.port, peer) {
            (Some(p), IpAddr::V6(a)) if self.direction == Direction::Egress => {
                write!(f, "{way} [{a}]:{p}/{proto}")
            }
            (Some(p), a) if self.direction == Direction::Egress => {
                write!(f, "{way} {a}:{p}/{proto}")
            }
            (Some(p), a) => write!(f, "{way} {a} to the member's port {p}/{proto}"),
            (None, a) => write!(f, "{way} {a} ({proto})"),
        }
    }
}

/// What the daemon knows besides the policy: the live state the kernel also consults.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// The segment (or the agent asked about) is quarantined: why.
    pub quarantine: Option<String>,
    /// The resolver's port when DNS is steered to agentseg's resolver.
    pub dns_port: Option<u16>,
    /// What the resolver learned for the segment at this address (rule ids not offset for a
    /// generation), the names it learned it from, and the boot-time clock now.
    pub learned: Option<(LearnedValue, Vec<String>, u64)>,
}

/// The outcome, as the member sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Refused by the rules, let through by audit mode (counted as a would-be denial).
    Audit,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "allow (audit mode: enforce mode would deny)",
        })
    }
}

/// A rule of the policy, where it is written and what it allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub id: u32,
    pub direction: String,
    pub file: String,
    pub line: usize,
    /// Its protocols and ports, e.g. `tcp/8080,8000-8100`.
    pub allows: String,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rule at {}:{} ({})",
            self.direction, self.file, self.line, self.allows
        )
    }
}

/// What decides the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decider {
    /// A rule whose cidrs hold the peer allows the protocol and port.
    Rule { rule: RuleRef, prefix: String },
    /// An `fqdns` rule, through an address the resolver learned from an allowed answer.
    Learned { rule: RuleRef, names: Vec<String> },
    /// No rule allows it.
    DefaultDeny,
    /// A rule's cidrs hold the peer but its `except` carves the peer out (`prefix` is the
    /// carved-out entry the kernel finds).
    Except { rule: RuleRef, prefix: String },
    /// Quarantined: only the `[quarantine] allow` list is reachable (`rule`, when it holds the
    /// peer).
    Quarantine {
        reason: String,
        rule: Option<RuleRef>,
    },
    /// Port 53 goes to agentseg's resolver, which answers per query by the `fqdns` rules.
    Resolver { port: u16 },
}

/// The nearest rule that would allow a refused flow, and what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nearest {
    pub rule: RuleRef,
    /// `protocol or port` (the rule holds the peer) or `address` (the rule allows the
    /// protocol and port to other addresses).
    pub differs: String,
    /// The rule's prefix nearest the peer (the longest common prefix).
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub segment: String,
    pub mode: String,
    pub flow: Flow,
    pub verdict: Verdict,
    pub decided_by: Decider,
    /// For a refused flow: the rules nearest to allowing it (by address, by protocol or port).
    pub nearest: Vec<Nearest>,
    /// Other facts that bear on the flow (learned names, a UDP reply path...).
    pub notes: Vec<String>,
}

/// Why a question cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("no segment named {name:?} (segments: {known})")]
    NoSegment { name: String, known: String },
}

/// Explain `flow` for the segment `name` of `compiled`, in `state`.
pub fn explain(
    compiled: &Compiled,
    name: &str,
    flow: &Flow,
    state: &State,
) -> Result<Explanation, ExplainError> {
    let seg = compiled
        .segments
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ExplainError::NoSegment {
            name: name.to_owned(),
            known: compiled
                .segments
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let audit = seg.mode == MODE_AUDIT;
    let port = flow.port.unwrap_or(0);
    let proto = u32::from(flow.protocol);
    let mut notes = Vec::new();
    let mut nearest = Vec::new();
    let decided_by = if let Some(reason) = &state.quarantine {
        let table = table(seg, Table::Quarantine, flow.peer.is_ipv6());
        let rule = lookup(compiled, &table, flow.peer)
            .map(|hit| ruleset_allows(&compiled.rulesets[hit.ruleset], proto, port))
            .filter(|r| *r < RULE_FIRST_SENTINEL)
            .map(|r| rule_ref(compiled, r));
        Decider::Quarantine {
            reason: reason.clone(),
            rule,
        }
    } else if let (Direction::Egress, Some(dns), true) = (
        flow.direction,
        state.dns_port,
        port == 53 && (proto == IPPROTO_TCP || proto == IPPROTO_UDP),
    ) {
        Decider::Resolver { port: dns }
    } else {
        let which = match flow.direction {
            Direction::Egress => Table::Egress,
            Direction::Ingress => Table::Ingress,
        };
        let entries = table(seg, which, flow.peer.is_ipv6());
        let hit = lookup(compiled, &entries, flow.peer);
        let found = hit
            .as_ref()
            .map(|h| ruleset_allows(&compiled.rulesets[h.ruleset], proto, port))
            .filter(|r| *r < RULE_FIRST_SENTINEL);
        match (found, &hit) {
            (Some(rule), Some(h)) => Decider::Rule {
                rule: rule_ref(compiled, rule),
                prefix: h.prefix.to_string(),
            },
            _ => {
                let learned = (flow.direction == Direction::Egress)
                    .then(|| learned_rule(state, proto, port))
                    .flatten();
                match learned {
                    Some((rule, names)) => Decider::Learned {
                        rule: rule_ref(compiled, rule),
                        names,
                    },
                    None => {
                        nearest = nearest_rules(compiled, &entries, flow.peer, proto, port);
                        match excepted(compiled, &entries, flow.peer, proto, port) {
                            Some((rule, prefix)) => Decider::Except {
                                rule: rule_ref(compiled, rule),
                                prefix,
                            },
                            None => Decider::DefaultDeny,
                        }
                    }
                }
            }
        }
    };
    let allowed = match &decided_by {
        Decider::Rule { .. } | Decider::Learned { .. } | Decider::Resolver { .. } => true,
        Decider::Quarantine { rule, .. } => rule.is_some(),
        Decider::DefaultDeny | Decider::Except { .. } => false,
    };
    // Audit mode lets through what the rules refuse, never what a quarantine refuses.
    let verdict = match (&decided_by, allowed) {
        (_, true) => Verdict::Allow,
        (Decider::Quarantine { .. }, false) => Verdict::Deny,
        (_, false) if audit => Verdict::Audit,
        (_, false) => Verdict::Deny,
    };
    if flow.direction == Direction::Ingress && proto == IPPROTO_UDP && !allowed {
        notes.push(
            "an unconnected UDP socket of the member also takes datagrams from a peer its \
             egress rules allow on the datagram's source port (a reply)"
                .to_owned(),
        );
    }
    if flow.direction == Direction::Egress
        && !allowed
        && let Some(fqdn) = fqdn_rule_for(compiled, seg, proto, port)
    {
        notes.push(format!(
            "{fqdn} would allow this peer once agentseg's resolver answers one of its names \
             with this address"
        ));
    }
    if let Some((_, names, _)) = &state.learned
        && !names.is_empty()
        && !matches!(decided_by, Decider::Learned { .. })
    {
        notes.push(format!(
            "the resolver learned this address for the segment from {}",
            names.join(", ")
        ));
    }
    Ok(Explanation {
        segment: seg.name.clone(),
        mode: if audit { "audit" } else { "enforce" }.to_owned(),
        flow: *flow,
        verdict,
        decided_by,
        nearest,
        notes,
    })
}

/// One of a segment's prefix tables (`prove` reads them the same way).
#[derive(Clone, Copy)]
pub(crate) enum Table {
    Egress,
    Ingress,
    Quarantine,
}

/// The segment's (prefix, ruleset) entries of one table in one family, sorted by (address,
/// length) as the compiler leaves them.
pub(crate) fn table(seg: &CompiledSegment, which: Table, v6: bool) -> Vec<(IpNet, u32)> {
    fn widen<N: Into<IpNet> + Copy>(v: &[(N, u32)]) -> Vec<(IpNet, u32)> {
        v.iter().map(|(n, r)| ((*n).into(), *r)).collect()
    }
    match (which, v6) {
        (Table::Egress, false) => widen(&seg.egress_v4),
        (Table::Egress, true) => widen(&seg.egress_v6),
        (Table::Ingress, false) => widen(&seg.ingress_v4),
        (Table::Ingress, true) => widen(&seg.ingress_v6),
        (Table::Quarantine, false) => widen(&seg.quarantine_v4),
        (Table::Quarantine, true) => widen(&seg.quarantine_v6),
    }
}

struct Hit {
    prefix: IpNet,
    ruleset: usize,
}

/// The longest prefix holding `peer` (the LPM trie's answer).
fn lookup(compiled: &Compiled, entries: &[(IpNet, u32)], peer: IpAddr) -> Option<Hit> {
    entries
        .iter()
        .filter(|(net, id)| net.contains(&peer) && (*id as usize) < compiled.rulesets.len())
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(net, id)| Hit {
            prefix: *net,
            ruleset: *id as usize,
        })
}

fn learned_rule(state: &State, proto: u32, port: u16) -> Option<(u32, Vec<String>)> {
    let (value, names, now) = state.learned.as_ref()?;
    value
        .slots
        .iter()
        .find(|s| s.expires_ns > *now && rule_allows(&s.rule, proto, port))
        .map(|s| (s.rule.rule_id, names.clone()))
}

/// A rule allowing (proto, port) in a shorter prefix holding the peer, absent from the
/// longest: its `except` carved the peer out.
fn excepted(
    compiled: &Compiled,
    entries: &[(IpNet, u32)],
    peer: IpAddr,
    proto: u32,
    port: u16,
) -> Option<(u32, String)> {
    let longest = lookup(compiled, entries, peer)?;
    let mut holding: Vec<&(IpNet, u32)> = entries
        .iter()
        .filter(|(net, id)| {
            net.contains(&peer)
                && net.prefix_len() < longest.prefix.prefix_len()
                && (*id as usize) < compiled.rulesets.len()
        })
        .collect();
    holding.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
    holding.iter().find_map(|(_, id)| {
        let rule = ruleset_allows(&compiled.rulesets[*id as usize], proto, port);
        (rule < RULE_FIRST_SENTINEL).then(|| (rule, longest.prefix.to_string()))
    })
}

/// For a refused flow, the rules nearest to allowing it: the rule allowing the protocol and
/// port whose prefix shares the longest prefix with the peer (it differs by address), and a
/// rule holding the peer on other protocols or ports.
fn nearest_rules(
    compiled: &Compiled,
    entries: &[(IpNet, u32)],
    peer: IpAddr,
    proto: u32,
    port: u16,
) -> Vec<Nearest> {
    let mut out: Vec<Nearest> = nearest_address(compiled, entries, peer, proto, port)
        .into_iter()
        .collect();
    if let Some(hit) = lookup(compiled, entries, peer) {
        let rs = &compiled.rulesets[hit.ruleset];
        let rules = &rs.rules[..(rs.len as usize).min(rs.rules.len())];
        // One of the same protocol (only the port differs) if there is one.
        let same_protocol = rules.iter().find(|r| rule_allows(r, proto, r.port_lo));
        if let Some(r) = same_protocol.or(rules.first()) {
            out.push(Nearest {
                rule: rule_ref(compiled, r.rule_id),
                differs: "protocol or port".to_owned(),
                prefix: hit.prefix.to_string(),
            });
        }
    }
    out
}

fn nearest_address(
    compiled: &Compiled,
    entries: &[(IpNet, u32)],
    peer: IpAddr,
    proto: u32,
    port: u16,
) -> Option<Nearest> {
    let mut best: Option<(u8, IpNet, u32)> = None;
    for (net, id) in entries {
        let Some(rs) = compiled.rulesets.get(*id as usize) else {
            continue;
        };
        let rule = ruleset_allows(rs, proto, port);
        if rule >= RULE_FIRST_SENTINEL {
            continue;
        }
        let common = common_prefix(net.network(), peer).min(net.prefix_len());
        if best.is_none_or(|(c, _, _)| common > c) {
            best = Some((common, *net, rule));
        }
    }
    best.map(|(_, net, rule)| Nearest {
        rule: rule_ref(compiled, rule),
        differs: "address".to_owned(),
        prefix: net.to_string(),
    })
}

fn common_prefix(a: IpAddr, b: IpAddr) -> u8 {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros() as u8,
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros() as u8,
        _ => 0,
    }
}

/// An `fqdns` rule of the segment allowing (proto, port), as text.
fn fqdn_rule_for(
    compiled: &Compiled,
    seg: &CompiledSegment,
    proto: u32,
    port: u16,
) -> Option<String> {
    seg.fqdns.iter().find_map(|e| {
        let rs = compiled.rulesets.get(e.ruleset_id as usize)?;
        let rule = ruleset_allows(rs, proto, port);
        (rule < RULE_FIRST_SENTINEL).then(|| {
            format!(
                "{} (fqdns {:?})",
                rule_ref(compiled, rule),
                e.pattern.as_str()
            )
        })
    })
}

/// A rule id as where it is written and what it allows.
pub(crate) fn rule_ref(compiled: &Compiled, id: u32) -> RuleRef {
    let info = compiled.rules.get(id as usize);
    let entries: Vec<PortRule> = compiled
        .rulesets
        .iter()
        .flat_map(|rs| rs.rules.iter().take(rs.len as usize))
        .filter(|r| r.rule_id == id)
        .copied()
        .collect();
    RuleRef {
        id,
        direction: info.map_or_else(|| "?".to_owned(), |i| direction_name(i.direction)),
        file: info.map_or_else(String::new, |i| i.file.display().to_string()),
        line: info.map_or(0, |i| i.line),
        allows: describe(&entries),
    }
}

fn direction_name(d: RuleDirection) -> String {
    d.to_string()
}

/// `tcp/80,8000-8100`, `udp/53`, `icmp`, `any protocol`, `tcp,udp,icmp/443`... from the port
/// rules of one rule (deduplicated: a rule's entries repeat in every ruleset holding it).
fn describe(entries: &[PortRule]) -> String {
    let mut by_proto: Vec<(String, Vec<String>)> = Vec::new();
    for e in entries {
        let proto = if e.protocols & PROTO_ALL != 0 {
            "every protocol".to_owned()
        } else {
            let mut names = Vec::new();
            if e.protocols & PROTO_TCP != 0 {
                names.push("tcp".to_owned());
            }
            if e.protocols & PROTO_UDP != 0 {
                names.push("udp".to_owned());
            }
            if e.protocols & PROTO_ICMP != 0 {
                names.push("icmp".to_owned());
            }
            if e.protocols & PROTO_NUMBERED != 0 {
                names.push(Protocol::Number(e.proto_num).to_string());
            }
            names.join(",")
        };
        let ports = match (e.port_lo, e.port_hi) {
            (0, 65535) | (1, 65535) => None,
            (lo, hi) if lo == hi => Some(lo.to_string()),
            (lo, hi) => Some(format!("{lo}-{hi}")),
        };
        let slot = match by_proto.iter_mut().find(|(p, _)| *p == proto) {
            Some(s) => s,
            None => {
                by_proto.push((proto, Vec::new()));
                by_proto.last_mut().expect("just pushed")
            }
        };
        if let Some(p) = ports
            && !slot.1.contains(&p)
        {
            slot.1.push(p);
        }
    }
    if by_proto.is_empty() {
        return "nothing".to_owned();
    }
    by_proto
        .into_iter()
        .map(|(proto, ports)| match ports.is_empty() {
            true => format!("{proto}, every port"),
            false => format!("{proto}/{}", ports.join(",")),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "segment {} ({} mode), {}",
            self.segment, self.mode, self.flow
        )?;
        writeln!(f, "verdict: {}", self.verdict)?;
        match &self.decided_by {
            Decider::Rule { rule, prefix } => writeln!(f, "decided by: {rule}, prefix {prefix}")?,
            Decider::Learned { rule, names } => writeln!(
                f,
                "decided by: {rule}, through an address the resolver learned from {}",
                names.join(", ")
            )?,
            Decider::DefaultDeny => writeln!(f, "decided by: default deny (no rule allows it)")?,
            Decider::Except { rule, prefix } => writeln!(
                f,
                "decided by: default deny: {rule} holds the peer, but its except carves out {prefix}"
            )?,
            Decider::Quarantine { reason, rule } => match rule {
                Some(rule) => writeln!(
                    f,
                    "decided by: quarantine ({reason}); the [quarantine] allow list keeps the \
                     peer reachable ({rule})"
                )?,
                None => writeln!(
                    f,
                    "decided by: quarantine ({reason}); the peer is not in its [quarantine] allow list"
                )?,
            },
            Decider::Resolver { port } => writeln!(
                f,
                "decided by: DNS is steered to agentseg's resolver (127.64.0.1:{port}), which \
                 answers each query by the segment's fqdns rules"
            )?,
        }
        for n in &self.nearest {
            writeln!(
                f,
                "nearest: {}, differs by {} (prefix {})",
                n.rule, n.differs, n.prefix
            )?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
