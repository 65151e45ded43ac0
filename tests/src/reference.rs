//! The reference-matcher property test's pieces: random policies and their text
//! ([`generate`]), a plain matcher written from the policy's documented meaning (here), and the
//! kernel's verdict read from a daemon's pinned maps, looked up as `agentseg-ebpf/src/policy.rs`
//! `allows()` does ([`pinned`]). No traffic is involved: the maps are read through read-only
//! descriptors.
use std::{fmt::Write as _, net::IpAddr};

use ipnet::IpNet;

pub mod generate;
pub mod pinned;

pub use generate::{PROTOCOLS, address, boundaries, mapped, mutate, policy};
pub use pinned::{KernelVerdict, Pinned, in_generation};

/// SplitMix64: small, seedable, and the same on every machine (the seed reproduces a run).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A rule's `protocol` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// The key left out: `any`.
    Omitted,
    Tcp,
    Udp,
    Icmp,
    Any,
    /// A name (`"udplite"`) or a number, as the integer or as a string.
    Named(&'static str, u8),
    Number(u8),
    NumberText(u8),
}

impl Proto {
    fn text(self) -> Option<String> {
        Some(match self {
            Proto::Omitted => return None,
            Proto::Tcp => "\"tcp\"".into(),
            Proto::Udp => "\"udp\"".into(),
            Proto::Icmp => "\"icmp\"".into(),
            Proto::Any => "\"any\"".into(),
            Proto::Named(name, _) => format!("{name:?}"),
            Proto::Number(n) => n.to_string(),
            Proto::NumberText(n) => format!("\"{n}\""),
        })
    }

    /// The documented meaning: 6, 17, 1 and 58 written as numbers are tcp, udp, icmp, icmp.
    fn meaning(self) -> Proto {
        match self {
            Proto::Omitted => Proto::Any,
            Proto::Named(_, n) | Proto::Number(n) | Proto::NumberText(n) => match n {
                6 => Proto::Tcp,
                17 => Proto::Udp,
                1 | 58 => Proto::Icmp,
                n => Proto::Number(n),
            },
            p => p,
        }
    }
}

/// IP protocols whose packets carry the ports a rule's `ports` bind: TCP, MPTCP, UDP,
/// UDP-Lite, SCTP, DCCP.
pub fn carries_ports(protocol: u32) -> bool {
    matches!(protocol, 6 | 262 | 17 | 136 | 132 | 33)
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub cidrs: Vec<IpNet>,
    pub except: Vec<IpNet>,
    /// Inclusive ranges; empty = all ports.
    pub ports: Vec<(u16, u16)>,
    pub protocol: Proto,
}

impl Rule {
    /// The reference: the rule allows (protocol, port) — `tcp` is TCP and MPTCP, `udp` UDP
    /// only, `icmp` ICMP and ICMPv6, `any` all three (only TCP and UDP when it lists ports), a
    /// number only itself; ports bind only the protocols that carry them.
    pub fn allows_protocol(&self, protocol: u32, port: u16) -> bool {
        let with_ports = !self.ports.is_empty();
        let protocol_ok = match self.protocol.meaning() {
            Proto::Tcp => matches!(protocol, 6 | 262),
            Proto::Udp => protocol == 17,
            Proto::Icmp => matches!(protocol, 1 | 58),
            Proto::Any if with_ports => matches!(protocol, 6 | 262 | 17),
            Proto::Any => matches!(protocol, 6 | 262 | 17 | 1 | 58),
            Proto::Number(n) => protocol == u32::from(n),
            other => unreachable!("meaning() never returns {other:?}"),
        };
        let port_ok = !with_ports
            || !carries_ports(protocol)
            || self.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi);
        protocol_ok && port_ok
    }
}

/// The three tables of a segment in the policy tries (their LPM keys start with the segment
/// id, with `INGRESS_BIT` or `QUARANTINE_BIT` for the last two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Egress,
    Ingress,
    Quarantine,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Egress, Table::Ingress, Table::Quarantine];

    /// The id an LPM key of this table of segment `id` starts with.
    pub fn key(self, id: u32) -> u32 {
        match self {
            Table::Egress => id,
            Table::Ingress => id | agentseg_common::INGRESS_BIT,
            Table::Quarantine => id | agentseg_common::QUARANTINE_BIT,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub egress: Vec<Rule>,
    pub ingress: Vec<Rule>,
    /// `[quarantine] allow`.
    pub quarantine: Vec<IpNet>,
}

impl Segment {
    /// The reference matcher. Egress and ingress: allowed iff some rule of the table has a
    /// cidr holding the address, no except of that same rule holds it, and its protocol and
    /// ports match. Quarantine: allowed iff a listed prefix holds the address, for every
    /// protocol and port (as documented). An IPv4-mapped IPv6 address is judged as its IPv4
    /// address (as the kernel does).
    pub fn allows(&self, table: Table, addr: IpAddr, protocol: u32, port: u16) -> bool {
        let addr = judged_as(addr);
        let rules = match table {
            Table::Egress => &self.egress,
            Table::Ingress => &self.ingress,
            Table::Quarantine => {
                let _ = (protocol, port);
                return self.quarantine.iter().any(|n| n.contains(&addr));
            }
        };
        rules.iter().any(|r| {
            r.cidrs.iter().any(|c| c.contains(&addr))
                && !r.except.iter().any(|e| e.contains(&addr))
                && r.allows_protocol(protocol, port)
        })
    }

    /// The rules of a table (the quarantine list has none: see [`Self::allows`]).
    pub fn rules(&self, table: Table) -> &[Rule] {
        match table {
            Table::Egress => &self.egress,
            Table::Ingress => &self.ingress,
            Table::Quarantine => &[],
        }
    }
}

/// `::ffff:a.b.c.d` → `a.b.c.d`; every other address as it is.
pub fn judged_as(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        a => a,
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub segments: Vec<Segment>,
}

impl Policy {
    /// The policy as one file of `[[segment]]` tables.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let list = |nets: &[IpNet]| {
            let items: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
            items.join(", ")
        };
        for s in &self.segments {
            let _ = writeln!(out, "[[segment]]\nname = \"{}\"", s.name);
            for (table, rules) in [("egress", &s.egress), ("ingress", &s.ingress)] {
                for r in rules {
                    let _ = writeln!(out, "[[segment.{table}]]\ncidrs = [{}]", list(&r.cidrs));
                    if !r.except.is_empty() {
                        let _ = writeln!(out, "except = [{}]", list(&r.except));
                    }
                    if !r.ports.is_empty() {
                        let ports: Vec<String> = r
                            .ports
                            .iter()
                            .map(|&(lo, hi)| match lo == hi {
                                true => lo.to_string(),
                                false => format!("\"{lo}-{hi}\""),
                            })
                            .collect();
                        let _ = writeln!(out, "ports = [{}]", ports.join(", "));
                    }
                    if let Some(p) = r.protocol.text() {
                        let _ = writeln!(out, "protocol = {p}");
                    }
                }
            }
            if !s.quarantine.is_empty() {
                let _ = writeln!(
                    out,
                    "[segment.quarantine]\nallow = [{}]",
                    list(&s.quarantine)
                );
            }
            out.push('\n');
        }
        out
    }

    /// Every cidr, except and quarantine prefix of every segment.
    pub fn prefixes(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .segments
            .iter()
            .flat_map(|s| {
                let rules = s.egress.iter().chain(&s.ingress);
                rules
                    .flat_map(|r| r.cidrs.iter().chain(&r.except))
                    .chain(&s.quarantine)
            })
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }
}
