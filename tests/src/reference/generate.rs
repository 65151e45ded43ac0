//! Random policies built around a few shared prefixes, so that cidrs and excepts nest and
//! overlap within a rule, across rules and across segments; and the addresses they are probed
//! with.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Policy, Proto, Rng, Rule, Segment, carries_ports};

/// Prefixes the policies are built around, so that they nest and overlap (v4, v6).
const V4_ANCHORS: [[u8; 4]; 5] = [
    [10, 0, 0, 0],
    [10, 20, 0, 0],
    [192, 0, 2, 0],
    [198, 51, 100, 64],
    [127, 0, 0, 0],
];
const V6_ANCHORS: [u128; 4] = [
    0xfd00_00a5_0000_0000_0000_0000_0000_0000,
    0xfd00_0020_0000_00ff_0000_0000_0000_0000,
    0x2001_0db8_0000_0000_0000_0000_0000_0000,
    // Right after the IPv4-mapped range (::ffff:0:0/96): short prefixes here contain it.
    0x0000_0000_0000_0000_0001_0000_0000_0000,
];

fn v4_prefix(rng: &mut Rng) -> Ipv4Net {
    let len = match rng.below(20) {
        0 => 0,
        1..=3 => 1 + rng.below(8) as u8,
        _ => 8 + rng.below(25) as u8,
    };
    let base = if rng.chance(80) {
        u32::from_be_bytes(*rng.pick(&V4_ANCHORS)) ^ (rng.u64() as u32 >> 12)
    } else {
        rng.u64() as u32
    };
    Ipv4Net::new(base.into(), len).expect("len <= 32").trunc()
}

fn v6_prefix(rng: &mut Rng) -> Ipv6Net {
    let len = match rng.below(20) {
        0 => 0,
        1..=3 => 1 + rng.below(16) as u8,
        _ => 16 + rng.below(113) as u8,
    };
    let base = if rng.chance(80) {
        *rng.pick(&V6_ANCHORS) ^ (u128::from(rng.u64()) >> 20)
    } else {
        u128::from(rng.u64()) << 64 | u128::from(rng.u64())
    };
    let net = Ipv6Net::new(base.into(), len).expect("len <= 128").trunc();
    // `check` refuses prefixes inside ::ffff:0:0/96 (write the IPv4 form).
    if len >= 96 && net.network().to_ipv4_mapped().is_some() {
        return v6_prefix(rng);
    }
    net
}

/// A prefix inside `outer` (`outer` itself one time in eight).
fn inside(rng: &mut Rng, outer: IpNet) -> IpNet {
    let max = outer.max_prefix_len();
    let extra = if rng.chance(12) {
        0
    } else {
        1 + rng.below(u64::from(max - outer.prefix_len()).min(12) + 1) as u8
    };
    let len = (outer.prefix_len() + extra).min(max);
    let bits = u128::from(rng.u64()) << 64 | u128::from(rng.u64());
    let net = match outer {
        IpNet::V4(o) => {
            let host = (bits as u32)
                .checked_shr(u32::from(o.prefix_len()))
                .unwrap_or(0);
            let addr = u32::from(o.network()) | host;
            IpNet::V4(Ipv4Net::new(addr.into(), len).expect("len").trunc())
        }
        IpNet::V6(o) => {
            let host = bits.checked_shr(u32::from(o.prefix_len())).unwrap_or(0);
            let addr = u128::from(o.network()) | host;
            IpNet::V6(Ipv6Net::new(addr.into(), len).expect("len").trunc())
        }
    };
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some() => outer,
        n => n,
    }
}

const NAMED: [(&str, u8); 5] = [
    ("udplite", 136),
    ("sctp", 132),
    ("dccp", 33),
    ("gre", 47),
    ("esp", 50),
];
const INTERESTING_PORTS: [u16; 8] = [1, 22, 53, 80, 443, 1024, 8080, 65535];

fn rule(rng: &mut Rng, shared: &[IpNet]) -> Rule {
    let mut cidrs = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let net = match rng.below(10) {
            // Reuse (or nest in) a prefix another rule or segment already names.
            0..=3 if !shared.is_empty() => {
                let s = *rng.pick(shared);
                if rng.chance(50) { s } else { inside(rng, s) }
            }
            0..=6 => IpNet::V4(v4_prefix(rng)),
            _ => IpNet::V6(v6_prefix(rng)),
        };
        cidrs.push(net);
    }
    cidrs.sort();
    cidrs.dedup();
    let mut except = Vec::new();
    if rng.chance(60) {
        for _ in 0..1 + rng.below(3) {
            let outer = *rng.pick(&cidrs);
            except.push(inside(rng, outer));
        }
    }
    except.sort();
    except.dedup();
    let protocol = match rng.below(14) {
        0 | 1 => Proto::Tcp,
        2 | 3 => Proto::Udp,
        4 => Proto::Icmp,
        5 | 6 => Proto::Any,
        7 => Proto::Omitted,
        8 | 9 => {
            let (name, n) = *rng.pick(&NAMED);
            Proto::Named(name, n)
        }
        10 => Proto::Number(*rng.pick(&[6, 17, 1, 58, 47, 136, 0, 255])),
        11 => Proto::NumberText(*rng.pick(&[6, 17, 132, 99])),
        _ => Proto::Number(rng.below(256) as u8),
    };
    let portless = match protocol.meaning() {
        Proto::Icmp => true,
        Proto::Number(n) => !carries_ports(u32::from(n)),
        _ => false,
    };
    let mut ports = Vec::new();
    if !portless && rng.chance(65) {
        for _ in 0..1 + rng.below(3) {
            let lo = if rng.chance(50) {
                *rng.pick(&INTERESTING_PORTS)
            } else {
                1 + rng.below(65535) as u16
            };
            let hi = if rng.chance(50) {
                lo
            } else {
                lo.saturating_add(rng.below(2000) as u16)
            };
            ports.push((lo, hi));
        }
    }
    Rule {
        cidrs,
        except,
        ports,
        protocol,
    }
}

/// A random policy: 2-4 segments (named after `tag`) of 1-4 egress rules each, some with
/// ingress rules (0-2) and a quarantine allow list (1-3 prefixes).
pub fn policy(rng: &mut Rng, tag: &str) -> Policy {
    let mut shared: Vec<IpNet> = Vec::new();
    let mut segments = Vec::new();
    for i in 0..2 + rng.below(3) {
        let mut rules = |rng: &mut Rng, count: u64| {
            (0..count)
                .map(|_| {
                    let r = rule(rng, &shared);
                    shared.extend(r.cidrs.iter().chain(&r.except));
                    r
                })
                .collect::<Vec<Rule>>()
        };
        let count = 1 + rng.below(4);
        let egress = rules(rng, count);
        let count = if rng.chance(40) { 1 + rng.below(2) } else { 0 };
        let ingress = rules(rng, count);
        let mut quarantine = Vec::new();
        if rng.chance(40) {
            for _ in 0..1 + rng.below(3) {
                let r = rule(rng, &shared);
                quarantine.push(r.cidrs[0]);
            }
            quarantine.sort();
            quarantine.dedup();
        }
        segments.push(Segment {
            name: format!("{tag}.seg-{i}.prop"),
            egress,
            ingress,
            quarantine,
        });
    }
    Policy { segments }
}

/// A small change of `last`, as an operator makes one: a rule added to, removed from or
/// replaced in one segment's egress or ingress table (the segments stay, so the kernel's
/// difference between the two is small).
pub fn mutate(rng: &mut Rng, last: &Policy) -> Policy {
    let mut next = last.clone();
    let shared: Vec<IpNet> = last
        .segments
        .iter()
        .flat_map(|s| s.egress.iter().chain(&s.ingress))
        .flat_map(|r| r.cidrs.iter().chain(&r.except).copied())
        .collect();
    let i = rng.below(next.segments.len() as u64) as usize;
    let seg = &mut next.segments[i];
    let table = if rng.chance(75) {
        &mut seg.egress
    } else {
        &mut seg.ingress
    };
    match rng.below(3) {
        0 => table.push(rule(rng, &shared)),
        1 if table.len() > 1 => {
            let j = rng.below(table.len() as u64) as usize;
            table.remove(j);
        }
        _ if !table.is_empty() => {
            let j = rng.below(table.len() as u64) as usize;
            table[j] = rule(rng, &shared);
        }
        _ => table.push(rule(rng, &shared)),
    }
    next
}

/// The first and last address of a prefix and their neighbours outside it.
pub fn boundaries(net: &IpNet) -> Vec<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)]
                .into_iter()
                .flatten()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .collect()
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)]
                .into_iter()
                .flatten()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .collect()
        }
    }
}

/// A random address: inside (or right next to) one of `prefixes` most of the time.
pub fn address(rng: &mut Rng, prefixes: &[IpNet]) -> IpAddr {
    if !prefixes.is_empty() && rng.chance(70) {
        let net = *rng.pick(prefixes);
        let bits = u128::from(rng.u64()) << 64 | u128::from(rng.u64());
        return match net {
            IpNet::V4(n) => {
                let host = (bits as u32)
                    .checked_shr(u32::from(n.prefix_len()))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(n.network()) | host).into())
            }
            IpNet::V6(n) => {
                let host = bits.checked_shr(u32::from(n.prefix_len())).unwrap_or(0);
                IpAddr::V6((u128::from(n.network()) | host).into())
            }
        };
    }
    if rng.chance(50) {
        IpAddr::V4((rng.u64() as u32).into())
    } else {
        IpAddr::V6((u128::from(rng.u64()) << 64 | u128::from(rng.u64())).into())
    }
}

/// `a.b.c.d` → `::ffff:a.b.c.d`.
pub fn mapped(addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) => Some(IpAddr::V6(a.to_ipv6_mapped())),
        IpAddr::V6(_) => None,
    }
}

/// Protocols every boundary is judged with: TCP, MPTCP, UDP, UDP-Lite, SCTP, DCCP, ICMP,
/// ICMPv6, GRE, ESP, 0, 255.
pub const PROTOCOLS: [u32; 12] = [6, 262, 17, 136, 132, 33, 1, 58, 47, 50, 0, 255];
