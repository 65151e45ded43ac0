//! The reference-matcher property test's pieces: random policies and their text
//! ([`generate`]), a plain matcher written from the policy's documented meaning (here), and the
//! kernel's verdict read from a daemon's pinned maps, looked up as `agentseg-ebpf/src/policy.rs`
//! `allows()` does ([`pinned`]). No traffic is involved: the maps are read through read-only
//! descriptors.
use std::{fmt::Write as _, net::IpAddr};

use ipnet::IpNet;

pub mod generate;
pub mod pinned;

pub use generate::{PROTOCOLS, address, boundaries, mapped, policy};
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

#[derive(Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub egress: Vec<Rule>,
}

impl Segment {
    /// The reference matcher: allowed iff some egress rule has a cidr holding the address, no
    /// except of that same rule holds it, and its protocol and ports match. An IPv4-mapped
    /// IPv6 address is judged as its IPv4 address (as the kernel does).
    pub fn allows(&self, addr: IpAddr, protocol: u32, port: u16) -> bool {
        let addr = judged_as(addr);
        self.egress.iter().any(|r| {
            r.cidrs.iter().any(|c| c.contains(&addr))
                && !r.except.iter().any(|e| e.contains(&addr))
                && r.allows_protocol(protocol, port)
        })
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
            for r in &s.egress {
                let _ = writeln!(out, "[[segment.egress]]\ncidrs = [{}]", list(&r.cidrs));
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
            out.push('\n');
        }
        out
    }

    /// Every cidr and except of every segment.
    pub fn prefixes(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .segments
            .iter()
            .flat_map(|s| &s.egress)
            .flat_map(|r| r.cidrs.iter().chain(&r.except))
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }
}
