//! `agentseg learn`: what a segment's members actually did, from the audit log, as a proposed
//! segment. Pure: records in, TOML out.
//!
//! The flows are the segment's `audit_deny` records (what enforce mode would refuse: an
//! audit-mode segment's whole traffic when it has no rules yet) and its sampled `allow`
//! records (`--sample-allows`). They are grouped by direction, protocol and peer, then peers
//! with the same ports into one rule; a peer the resolver learned for a name (the record's
//! `domain`) becomes an `fqdns` entry with that exact name. Each peer is commented with its
//! hits and first and last time seen.
//!
//! Never proposed (listed as left out): link-local addresses (169.254.0.0/16, fe80::/10), the
//! cloud metadata addresses (169.254.169.254, fd00:ec2::254), the unspecified address,
//! multicast; wildcards (only names seen are written); prefixes wider than /32 (/128) unless
//! asked (`--aggregate /N`, at most /17 wide for IPv4 and /48 for IPv6, so that a whole
//! private range is never proposed on its own).
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

use crate::policy::{Members, PortRange};

/// One direction of traffic, seen from the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    Egress,
    Ingress,
}

/// A flow as the log recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub way: Way,
    pub peer: IpAddr,
    /// The peer's port (egress) or the member's own (ingress); None without ports.
    pub port: Option<u16>,
    /// As a policy writes it: tcp, udp, icmp, udplite, or a number.
    pub protocol: String,
    /// The name the resolver learned the peer for.
    pub domain: Option<String>,
    /// Decisions the record stands for.
    pub count: u64,
    pub ts_ms: u64,
}

/// What the log held for one segment.
#[derive(Debug, Default)]
pub struct Seen {
    pub flows: Vec<Observation>,
    /// Names asked of the resolver (its `dns` records), with how often.
    pub names: BTreeMap<String, u64>,
    /// Records of the segment read (flows, names, and others).
    pub records: usize,
    /// AF_UNIX flows seen (not proposed: `[[unix]]` rules are written by hand).
    pub unix: BTreeSet<String>,
}

/// Read the records of `segment` at or after `since_ms`.
pub fn read(records: impl Iterator<Item = Value>, segment: &str, since_ms: u64) -> Seen {
    let mut seen = Seen::default();
    for r in records {
        if r["segment"].as_str() != Some(segment) || r["ts_ms"].as_u64().unwrap_or(0) < since_ms {
            continue;
        }
        seen.records += 1;
        let kind = r["kind"].as_str().unwrap_or_default();
        if kind != "audit_deny" && kind != "allow" {
            continue;
        }
        let count = r["count"].as_u64().unwrap_or(1).max(1);
        if r["hook"].as_str() == Some("dns") {
            if let Some(q) = r["query"].as_str() {
                *seen
                    .names
                    .entry(q.trim_end_matches('.').to_ascii_lowercase())
                    .or_default() += count;
            }
            continue;
        }
        let protocol = r["protocol"].as_str().unwrap_or_default();
        if protocol == "unix" {
            if let Some(p) = r["path"].as_str() {
                seen.unix.insert(p.to_owned());
            }
            continue;
        }
        let way = match r["direction"].as_str() {
            Some("ingress") => Way::Ingress,
            _ => Way::Egress,
        };
        let peer_field = if way == Way::Egress { "dst" } else { "src" };
        let Some(peer) = r[peer_field]
            .as_str()
            .and_then(|a| a.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let Some(protocol) = policy_protocol(protocol) else {
            continue;
        };
        let port = match r["dport"].as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p != 0 && ported(&protocol) => Some(p),
            _ => None,
        };
        seen.flows.push(Observation {
            way,
            peer: canonical(peer),
            port,
            protocol,
            domain: r["domain"].as_str().map(str::to_owned),
            count,
            ts_ms: r["ts_ms"].as_u64().unwrap_or(0),
        });
    }
    seen
}

/// The record's protocol as a policy names it.
fn policy_protocol(p: &str) -> Option<String> {
    match p {
        "tcp" | "udp" | "icmp" | "udplite" => Some(p.to_owned()),
        other => other
            .strip_prefix("ip:")
            .and_then(|n| n.parse::<u8>().ok())
            .map(|n| crate::policy::Protocol::Number(n).to_string()),
    }
}

/// Whether a protocol, by the name a policy gives it, has ports (the kernel's own test).
fn ported(protocol: &str) -> bool {
    crate::explain::protocol_number(protocol)
        .is_some_and(|n| agentseg_common::has_ports(u32::from(n)))
}

fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a peer is never proposed, or None.
pub fn refused(peer: IpAddr) -> Option<&'static str> {
    const METADATA4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    const METADATA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match peer {
        IpAddr::V4(a) if a == METADATA4 => Some("cloud metadata address"),
        IpAddr::V6(a) if a == METADATA6 => Some("cloud metadata address"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local"),
        a if a.is_unspecified() => Some("unspecified address"),
        a if a.is_multicast() => Some("multicast"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        _ => None,
    }
}

/// How wide proposed prefixes may be.
#[derive(Debug, Clone, Copy)]
pub struct Aggregate {
    pub v4: u8,
    pub v6: u8,
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate { v4: 32, v6: 128 }
    }
}

impl Aggregate {
    /// `--aggregate /N` (IPv4) and `--aggregate6 /M`: never wider than /17 and /48.
    pub fn parse(v4: Option<&str>, v6: Option<&str>) -> Result<Aggregate, String> {
        let len = |s: Option<&str>, min: u8, max: u8, flag: &str| -> Result<u8, String> {
            let Some(s) = s else { return Ok(max) };
            let n: u8 = s
                .trim_start_matches('/')
                .parse()
                .map_err(|_| format!("{flag} {s:?}: expected a prefix length like /24"))?;
            if n < min || n > max {
                return Err(format!(
                    "{flag} /{n}: between /{min} and /{max} (wider would propose whole private \
                     ranges)"
                ));
            }
            Ok(n)
        };
        Ok(Aggregate {
            v4: len(v4, 17, 32, "--aggregate")?,
            v6: len(v6, 48, 128, "--aggregate6")?,
        })
    }

    fn of(&self, a: IpAddr) -> IpNet {
        let len = if a.is_ipv4() { self.v4 } else { self.v6 };
        IpNet::new(a, len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(a))
    }
}

/// Hits of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub hits: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

impl Stats {
    fn add(&mut self, o: &Observation) {
        self.hits += o.count;
        self.first_ms = self.first_ms.min(o.ts_ms);
        self.last_ms = self.last_ms.max(o.ts_ms);
    }

    fn none() -> Stats {
        Stats {
            hits: 0,
            first_ms: u64::MAX,
            last_ms: 0,
        }
    }
}

/// A peer of a proposed rule: a prefix or an exact name (as text in JSON).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Net(IpNet),
    Name(String),
}

impl Serialize for Peer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Net(n) => write!(f, "{n}"),
            Peer::Name(n) => f.write_str(n),
        }
    }
}

/// One proposed rule: peers with the same direction, protocol and ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProposedRule {
    pub way: Way,
    pub protocol: String,
    /// Empty for protocols without ports.
    #[serde(serialize_with = "port_texts")]
    pub ports: Vec<PortRange>,
    pub peers: Vec<(Peer, Stats)>,
}

fn port_texts<S: serde::Serializer>(ports: &[PortRange], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ports.iter().map(|p| {
        if p.lo == p.hi {
            p.lo.to_string()
        } else {
            format!("{}-{}", p.lo, p.hi)
        }
    }))
}

/// A peer seen and never proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeftOut {
    pub peer: IpAddr,
    pub why: &'static str,
    pub hits: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Proposal {
    pub rules: Vec<ProposedRule>,
    pub left_out: Vec<LeftOut>,
    /// Names asked of the resolver with no flow to an address learned for them.
    pub names_without_flows: Vec<String>,
    pub unix: Vec<String>,
    pub flows: usize,
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
}

/// Group what was seen into rules.
pub fn propose(seen: &Seen, aggregate: Aggregate) -> Proposal {
    let mut out = Proposal {
        flows: seen.flows.len(),
        unix: seen.unix.iter().cloned().collect(),
        ..Proposal::default()
    };
    // (way, protocol, peer) → ports and stats.
    type Key = (Way, String, Peer);
    let mut by_peer: BTreeMap<Key, (BTreeSet<u16>, Stats)> = BTreeMap::new();
    let mut left: BTreeMap<IpAddr, (&'static str, u64)> = BTreeMap::new();
    let mut named = BTreeSet::new();
    for o in &seen.flows {
        out.first_ms = Some(out.first_ms.map_or(o.ts_ms, |f| f.min(o.ts_ms)));
        out.last_ms = Some(out.last_ms.map_or(o.ts_ms, |l| l.max(o.ts_ms)));
        if let Some(why) = refused(o.peer) {
            left.entry(o.peer).or_insert((why, 0)).1 += o.count;
            continue;
        }
        let peer = match (&o.domain, o.way) {
            (Some(name), Way::Egress) if !name.contains('*') => {
                named.insert(name.clone());
                Peer::Name(name.clone())
            }
            _ => Peer::Net(aggregate.of(o.peer)),
        };
        let entry = by_peer
            .entry((o.way, o.protocol.clone(), peer))
            .or_insert_with(|| (BTreeSet::new(), Stats::none()));
        if let Some(p) = o.port {
            entry.0.insert(p);
        }
        entry.1.add(o);
    }
    // (way, protocol, ports) → peers.
    type RuleKey = (Way, String, Vec<PortRange>);
    let mut rules: BTreeMap<RuleKey, Vec<(Peer, Stats)>> = BTreeMap::new();
    for ((way, protocol, peer), (ports, stats)) in by_peer {
        rules
            .entry((way, protocol, ranges(&ports)))
            .or_default()
            .push((peer, stats));
    }
    out.rules = rules
        .into_iter()
        .map(|((way, protocol, ports), peers)| ProposedRule {
            way,
            protocol,
            ports,
            peers,
        })
        .collect();
    out.left_out = left
        .into_iter()
        .map(|(peer, (why, hits))| LeftOut { peer, why, hits })
        .collect();
    out.names_without_flows = seen
        .names
        .keys()
        .filter(|n| !named.contains(*n))
        .cloned()
        .collect();
    out
}

/// Sorted ports as ranges of consecutive ports.
fn ranges(ports: &BTreeSet<u16>) -> Vec<PortRange> {
    let mut out: Vec<PortRange> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some(r) if r.hi.checked_add(1) == Some(p) => r.hi = p,
            _ => out.push(PortRange { lo: p, hi: p }),
        }
    }
    out
}

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What the header of the proposal says about where it comes from.
pub struct Origin<'a> {
    pub segment: &'a str,
    pub log: &'a str,
    pub since: Option<&'a str>,
    /// The segment's current `[members]`, carried over.
    pub members: Option<&'a Members>,
}

/// The proposal as a segment file `agentseg check` accepts (mode enforce).
pub fn to_toml(p: &Proposal, o: &Origin) -> String {
    let mut t = String::new();
    let span = match (p.first_ms, p.last_ms) {
        (Some(a), Some(b)) => format!(", {} to {}", rfc3339(a), rfc3339(b)),
        _ => String::new(),
    };
    let _ = writeln!(
        t,
        "# Proposed by `agentseg learn` for segment {} from {} flow record(s) of {}{}{span}.",
        o.segment,
        p.flows,
        o.log,
        o.since.map(|s| format!(" (last {s})")).unwrap_or_default()
    );
    let _ = writeln!(
        t,
        "# Review it before use: it allows what the members did, no more. Tables of the current\n\
         # segment file other than [members] (quarantine, monitor, sandbox, unix) are not carried\n\
         # over."
    );
    let _ = writeln!(t, "name = {}", quote(o.segment));
    let _ = writeln!(t, "mode = \"enforce\"");
    if let Some(m) = o.members
        && (!m.cgroups.is_empty() || !m.units.is_empty())
    {
        let _ = writeln!(t, "\n[members]");
        if !m.cgroups.is_empty() {
            let _ = writeln!(
                t,
                "cgroups = [{}]",
                list(m.cgroups.iter().map(|c| quote(c)))
            );
        }
        if !m.units.is_empty() {
            let _ = writeln!(t, "units = [{}]", list(m.units.iter().map(|c| quote(c))));
        }
    }
    for r in &p.rules {
        let _ = writeln!(t);
        for (peer, s) in &r.peers {
            let _ = writeln!(
                t,
                "# {peer}: {} hit(s), first seen {}, last seen {}",
                s.hits,
                rfc3339(s.first_ms),
                rfc3339(s.last_ms)
            );
        }
        let table = match r.way {
            Way::Egress => "[[egress]]",
            Way::Ingress => "[[ingress]]",
        };
        let _ = writeln!(t, "{table}");
        let nets: Vec<String> = r
            .peers
            .iter()
            .filter_map(|(p, _)| match p {
                Peer::Net(n) => Some(quote(&n.to_string())),
                Peer::Name(_) => None,
            })
            .collect();
        let names: Vec<String> = r
            .peers
            .iter()
            .filter_map(|(p, _)| match p {
                Peer::Name(n) => Some(quote(n)),
                Peer::Net(_) => None,
            })
            .collect();
        if !nets.is_empty() {
            let _ = writeln!(t, "cidrs = [{}]", nets.join(", "));
        }
        if !names.is_empty() {
            let _ = writeln!(t, "fqdns = [{}]", names.join(", "));
        }
        if !r.ports.is_empty() {
            let ports = r.ports.iter().map(|p| {
                if p.lo == p.hi {
                    p.lo.to_string()
                } else {
                    format!("\"{}-{}\"", p.lo, p.hi)
                }
            });
            let _ = writeln!(t, "ports = [{}]", list(ports));
        }
        let _ = writeln!(t, "protocol = {}", quote(&r.protocol));
    }
    if !p.left_out.is_empty() {
        let _ = writeln!(t, "\n# Seen and left out (never proposed):");
        for l in &p.left_out {
            let _ = writeln!(t, "#   {} ({}): {} hit(s)", l.peer, l.why, l.hits);
        }
    }
    if !p.names_without_flows.is_empty() {
        let _ = writeln!(
            t,
            "\n# Names asked of the resolver with no flow to an address learned for them (add an\n\
             # fqdns rule with the ports they need, if they are needed):"
        );
        for n in &p.names_without_flows {
            let _ = writeln!(t, "#   {n}");
        }
    }
    if !p.unix.is_empty() {
        let _ = writeln!(t, "\n# AF_UNIX peers used (write [[unix]] rules by hand):");
        for u in &p.unix {
            let _ = writeln!(t, "#   {u}");
        }
    }
    t
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Every (way, peer, protocol, port) the proposal's flows used, for `--diff`: the first port
/// of each range stands for the range.
pub fn flows_of(p: &Proposal) -> Vec<(Way, Peer, String, Option<u16>)> {
    let mut out = Vec::new();
    for r in &p.rules {
        for (peer, _) in &r.peers {
            if r.ports.is_empty() {
                out.push((r.way, peer.clone(), r.protocol.clone(), None));
            }
            for range in &r.ports {
                for port in range.lo..=range.hi {
                    out.push((r.way, peer.clone(), r.protocol.clone(), Some(port)));
                }
            }
        }
    }
    out
}
