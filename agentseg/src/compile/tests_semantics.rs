//! What the kernel will decide: overlaps, excepts, families, checked against a naive oracle.

use std::net::IpAddr;
use std::path::PathBuf;

use agentseg_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MPTCP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IPPROTO_UDPLITE, RULE_DEFAULT_DENY, RuleSet, ruleset_allows,
};
use ipnet::IpNet;

use super::*;
use crate::policy::{self, PolicySet};

pub(super) fn set(text: &str) -> PolicySet {
    let files = vec![(PathBuf::from("t.toml"), text.as_bytes().to_vec())];
    policy::load_files(&files).unwrap_or_else(|e| panic!("{e}"))
}

/// What the kernel does: longest prefix among the segment's entries, then the ruleset.
pub(super) fn lookup<'c>(c: &'c Compiled, seg: usize, dir: Direction, ip: &str) -> &'c RuleSet {
    let s = &c.segments[seg];
    let addr: IpAddr = ip.parse().expect("test address");
    let entries: Vec<(IpNet, u32)> = match dir {
        Direction::Egress => s
            .egress_v4
            .iter()
            .map(|(n, r)| ((*n).into(), *r))
            .chain(s.egress_v6.iter().map(|(n, r)| ((*n).into(), *r)))
            .collect(),
        Direction::Ingress => s
            .ingress_v4
            .iter()
            .map(|(n, r)| ((*n).into(), *r))
            .chain(s.ingress_v6.iter().map(|(n, r)| ((*n).into(), *r)))
            .collect(),
        Direction::Quarantine => s
            .quarantine_v4
            .iter()
            .map(|(n, r)| ((*n).into(), *r))
            .chain(s.quarantine_v6.iter().map(|(n, r)| ((*n).into(), *r)))
            .collect(),
        Direction::Unix | Direction::QuarantineUnix => panic!("not an IP table: {dir}"),
    };
    let id = entries
        .iter()
        .filter(|(n, _)| n.contains(&addr))
        .max_by_key(|(n, _)| n.prefix_len())
        .map_or(0, |(_, r)| *r);
    &c.rulesets[id as usize]
}

/// The kernel's own match (`agentseg_common::ruleset_allows`) on an IP protocol number.
pub(super) fn allows(rs: &RuleSet, proto: u32, port: u16) -> bool {
    ruleset_allows(rs, proto, port) != RULE_DEFAULT_DENY
}

fn allowed(c: &Compiled, ip: &str, proto: u32, port: u16) -> bool {
    allows(lookup(c, 0, Direction::Egress, ip), proto, port)
}

#[test]
fn overlap_gives_the_union() {
    let c = compile(&set("name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"192.0.2.0/24\"]\nports = [80]\nprotocol = \"tcp\"\n\
         [[egress]]\ncidrs = [\"192.0.2.7\"]\nports = [443]\nprotocol = \"tcp\"\n"))
    .expect("compiles");
    assert!(allowed(&c, "192.0.2.7", IPPROTO_TCP, 80));
    assert!(allowed(&c, "192.0.2.7", IPPROTO_TCP, 443));
    assert!(allowed(&c, "192.0.2.8", IPPROTO_TCP, 80));
    assert!(!allowed(&c, "192.0.2.8", IPPROTO_TCP, 443));
    assert!(!allowed(&c, "192.0.2.7", IPPROTO_UDP, 443));
    assert!(!allowed(&c, "192.0.3.7", IPPROTO_TCP, 80));
    let s = &c.segments[0];
    assert_eq!(s.egress_v4.len(), 2);
    let host = s
        .egress_v4
        .iter()
        .find(|(n, _)| n.prefix_len() == 32)
        .expect("/32 entry");
    assert_eq!(c.rulesets[host.1 as usize].len, 2);
}

#[test]
fn except_carves_a_hole_that_other_rules_can_fill() {
    let text = "name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"10.0.0.0/8\"]\nexcept = [\"10.1.0.0/16\"]\nprotocol = \"tcp\"\n\
         [[egress]]\ncidrs = [\"10.1.2.0/24\"]\nports = [53]\nprotocol = \"udp\"\n";
    let c = compile(&set(text)).expect("compiles");
    assert!(allowed(&c, "10.9.9.9", IPPROTO_TCP, 22));
    assert!(!allowed(&c, "10.1.9.9", IPPROTO_TCP, 22));
    // The other rule still applies inside the hole, and only with its own ports.
    assert!(allowed(&c, "10.1.2.3", IPPROTO_UDP, 53));
    assert!(!allowed(&c, "10.1.2.3", IPPROTO_TCP, 22));
    let hole = c.segments[0]
        .egress_v4
        .iter()
        .find(|(n, _)| n.to_string() == "10.1.0.0/16")
        .expect("except entry");
    assert_eq!(hole.1, 0, "the hole uses the empty ruleset");
}

#[test]
fn v4_and_v6_are_separate_and_both_work() {
    let text = "name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"0.0.0.0/0\", \"::/0\"]\nexcept = [\"fc00::/7\"]\nports = [443]\nprotocol = \"tcp\"\n\
         [[ingress]]\ncidrs = [\"2001:db8::/32\"]\nprotocol = \"icmp\"\n";
    let c = compile(&set(text)).expect("compiles");
    let s = &c.segments[0];
    assert_eq!(s.egress_v4.len(), 1);
    assert_eq!(s.egress_v6.len(), 2);
    assert!(s.ingress_v4.is_empty());
    assert_eq!(s.ingress_v6.len(), 1);
    assert!(allowed(&c, "203.0.113.1", IPPROTO_TCP, 443));
    assert!(allowed(&c, "2001:db8::1", IPPROTO_TCP, 443));
    assert!(!allowed(&c, "fd00::1", IPPROTO_TCP, 443));
    let ing = lookup(&c, 0, Direction::Ingress, "2001:db8::9");
    assert!(allows(ing, IPPROTO_ICMP, 0));
    assert!(!allows(ing, IPPROTO_TCP, 22));
    assert!(!allows(
        lookup(&c, 0, Direction::Ingress, "192.0.2.1"),
        IPPROTO_ICMP,
        0
    ));
}

/// Tiny deterministic PRNG (xorshift) so the oracle test needs no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Protocols whose packets carry ports, written out here rather than shared with the
/// kernel's match, so that the oracle stays independent of it.
const WITH_PORTS: [u32; 6] = [6, 262, 17, 136, 132, 33];

/// Whether a policy rule's protocol (and ports) admit one packet, read straight from the
/// policy's meaning: tcp is TCP and MPTCP, udp only UDP, icmp ICMP and ICMPv6, any the three
/// (only the two with ports when ports are listed), a number only itself.
fn oracle_admits(r: &policy::Rule, proto: u32, port: u16) -> bool {
    let tcp = [IPPROTO_TCP, IPPROTO_MPTCP].contains(&proto);
    let icmp = [IPPROTO_ICMP, IPPROTO_ICMPV6].contains(&proto);
    let proto_ok = match r.protocol {
        policy::Protocol::Tcp => tcp,
        policy::Protocol::Udp => proto == IPPROTO_UDP,
        policy::Protocol::Icmp => icmp,
        policy::Protocol::Any if r.ports.is_empty() => tcp || proto == IPPROTO_UDP || icmp,
        policy::Protocol::Any => tcp || proto == IPPROTO_UDP,
        policy::Protocol::Number(n) => proto == u32::from(n),
        policy::Protocol::All => true,
    };
    proto_ok
        && (r.ports.is_empty()
            || !WITH_PORTS.contains(&proto)
            || r.ports.iter().any(|p| (p.lo..=p.hi).contains(&port)))
}

/// Random nested rules compared with direct evaluation of the policy on random addresses.
#[test]
fn matches_a_naive_oracle() {
    const GRE: u32 = 47;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for round in 0..20 {
        let mut text = String::from("name = \"a.b.c\"\n");
        for _ in 0..6 {
            // Prefixes inside 10.0.0.0/16 at lengths 16..=28 so that they nest often.
            let pick = |rng: &mut Rng| {
                let len = 16 + (rng.next() % 13) as u8;
                let addr = 0x0a00_0000u32 | (rng.next() as u32 & 0xffff);
                ipnet::Ipv4Net::new(addr.into(), len)
                    .expect("len ok")
                    .trunc()
            };
            let cidr = pick(&mut rng);
            let mut except = pick(&mut rng);
            if except.prefix_len() <= cidr.prefix_len() || !cidr.contains(&except) {
                except = ipnet::Ipv4Net::new(cidr.network(), (cidr.prefix_len() + 2).min(32))
                    .expect("len ok");
            }
            let port = 1 + rng.next() % 3;
            let proto = ["tcp", "udp", "any", "udplite", "sctp", "gre", "icmp", "136"]
                [(rng.next() % 8) as usize];
            let ports = if ["gre", "icmp"].contains(&proto) {
                String::new()
            } else {
                format!("ports = [{port}]\n")
            };
            text.push_str(&format!(
                "[[egress]]\ncidrs = [\"{cidr}\"]\nexcept = [\"{except}\"]\n{ports}protocol = \"{proto}\"\n"
            ));
        }
        let policy = set(&text);
        let c = compile(&policy).expect("compiles");
        let rules = &policy.segments[0].egress;
        for _ in 0..300 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 | (rng.next() as u32 & 0xffff));
            for (proto, port) in [
                (IPPROTO_TCP, 1),
                (IPPROTO_UDP, 2),
                (IPPROTO_TCP, 3),
                (IPPROTO_UDP, 9),
                (IPPROTO_MPTCP, 1),
                (IPPROTO_UDPLITE, 2),
                (IPPROTO_SCTP, 3),
                (GRE, 0),
                (IPPROTO_ICMP, 0),
                (IPPROTO_ICMPV6, 0),
            ] {
                let want = rules.iter().any(|r| {
                    let ip = IpAddr::V4(ip);
                    r.cidrs.iter().any(|n| n.contains(&ip))
                        && !r.except.iter().any(|n| n.contains(&ip))
                        && oracle_admits(r, proto, port)
                });
                let got = allowed(&c, &ip.to_string(), proto, port);
                assert_eq!(
                    got, want,
                    "round {round} {ip} proto {proto} port {port}\n{text}"
                );
            }
        }
    }
}

#[test]
fn numbered_protocols_match_only_themselves() {
    let text = "name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"192.0.2.1\"]\nports = [53]\nprotocol = \"udp\"\n\
         [[egress]]\ncidrs = [\"192.0.2.2\"]\nports = [\"5000-5001\"]\nprotocol = \"udplite\"\n\
         [[egress]]\ncidrs = [\"192.0.2.3\"]\nprotocol = 47\n\
         [[egress]]\ncidrs = [\"192.0.2.4\"]\nprotocol = \"132\"\nports = [9]\n\
         [[egress]]\ncidrs = [\"192.0.2.5\"]\nprotocol = 6\nports = [443]\n";
    let c = compile(&set(text)).expect("compiles");
    // UDP-Lite is not udp, and udp is not UDP-Lite.
    assert!(allowed(&c, "192.0.2.1", IPPROTO_UDP, 53));
    assert!(!allowed(&c, "192.0.2.1", IPPROTO_UDPLITE, 53));
    assert!(allowed(&c, "192.0.2.2", IPPROTO_UDPLITE, 5001));
    assert!(!allowed(&c, "192.0.2.2", IPPROTO_UDPLITE, 5002));
    assert!(!allowed(&c, "192.0.2.2", IPPROTO_UDP, 5000));
    // GRE has no ports: every GRE packet, nothing else.
    assert!(allowed(&c, "192.0.2.3", 47, 0));
    assert!(allowed(&c, "192.0.2.3", 47, 4789));
    assert!(!allowed(&c, "192.0.2.3", IPPROTO_TCP, 80));
    assert!(!allowed(&c, "192.0.2.3", 50, 0));
    // SCTP as a numeric string, with its port.
    assert!(allowed(&c, "192.0.2.4", IPPROTO_SCTP, 9));
    assert!(!allowed(&c, "192.0.2.4", IPPROTO_SCTP, 10));
    assert!(!allowed(&c, "192.0.2.4", IPPROTO_TCP, 9));
    // 6 is tcp, MPTCP included.
    assert!(allowed(&c, "192.0.2.5", IPPROTO_MPTCP, 443));
    assert!(!allowed(&c, "192.0.2.5", IPPROTO_UDP, 443));
    // "any" is tcp, udp and icmp only.
    let any = compile(&set(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"0.0.0.0/0\"]\n",
    ))
    .expect("compiles");
    for p in [IPPROTO_TCP, IPPROTO_MPTCP, IPPROTO_UDP, IPPROTO_ICMP] {
        assert!(allowed(&any, "198.51.100.1", p, 1), "{p}");
    }
    for p in [IPPROTO_UDPLITE, IPPROTO_SCTP, 47] {
        assert!(!allowed(&any, "198.51.100.1", p, 1), "{p}");
    }
}

#[test]
fn monitor_is_passed_through_per_segment() {
    let c = compile(&set("[[segment]]\nname = \"a.b.c\"\n\
         [segment.monitor]\ndeny_rate = { threshold = 5, action = \"quarantine\" }\n\
         [[segment]]\nname = \"d.e.f\"\n"))
    .expect("compiles");
    let mut want = policy::Monitor::default();
    want.deny_rate.threshold = 5;
    want.deny_rate.action = policy::Action::Quarantine;
    assert_eq!(c.segments[0].monitor, want);
    assert_eq!(c.segments[1].monitor, policy::Monitor::default());
}
