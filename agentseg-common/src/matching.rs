//! Which entry of a ruleset allows (protocol, port): the one function the kernel programs,
//! the compiler's tests and the reference matcher all call, so they cannot drift apart.
use crate::{
    IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MPTCP, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, IPPROTO_UDPLITE, PROTO_ALL, PROTO_ICMP, PROTO_NUMBERED, PROTO_TCP, PROTO_UDP,
    PortRule, RULE_DEFAULT_DENY, RULESET_CAPACITY, RuleSet,
};

/// Class bit of an IP protocol number: `tcp` is TCP and MPTCP, `udp` is UDP only, `icmp` is
/// ICMP and ICMPv6; 0 for every other protocol (only a rule naming its number allows it).
#[inline(always)]
pub fn proto_class(protocol: u32) -> u8 {
    match protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => PROTO_ICMP,
        _ => 0,
    }
}

/// Whether a protocol's packets carry the ports that rule ranges apply to.
#[inline(always)]
pub fn has_ports(protocol: u32) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP | IPPROTO_MPTCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP
    )
}

/// Whether one ruleset entry allows (protocol, destination port).
#[inline(always)]
pub fn rule_allows(r: &PortRule, protocol: u32, port: u16) -> bool {
    if r.protocols & PROTO_ALL != 0 {
        return true;
    }
    let class = proto_class(protocol);
    let protocol_ok = if class != 0 {
        r.protocols & class != 0
    } else {
        r.protocols & PROTO_NUMBERED != 0 && protocol == u32::from(r.proto_num)
    };
    protocol_ok && (!has_ports(protocol) || (port >= r.port_lo && port <= r.port_hi))
}

/// The rule id of the first entry of `rs` that allows (protocol, port), or
/// [`RULE_DEFAULT_DENY`]. A plain `u32`, not an `Option`: the verifier rejects reads of an
/// `Option` payload LLVM left uninitialised.
#[inline(always)]
pub fn ruleset_allows(rs: &RuleSet, protocol: u32, port: u16) -> u32 {
    let len = if (rs.len as usize) < RULESET_CAPACITY {
        rs.len as usize
    } else {
        RULESET_CAPACITY
    };
    let mut i = 0;
    while i < len {
        let r = &rs.rules[i];
        if rule_allows(r, protocol, port) {
            return r.rule_id;
        }
        i += 1;
    }
    RULE_DEFAULT_DENY
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(lo: u16, hi: u16, protocols: u8, proto_num: u8) -> PortRule {
        PortRule {
            port_lo: lo,
            port_hi: hi,
            protocols,
            proto_num,
            _pad: [0; 2],
            rule_id: 7,
        }
    }

    #[test]
    fn classes_are_exact() {
        let udp = entry(53, 53, PROTO_UDP, 0);
        assert!(rule_allows(&udp, IPPROTO_UDP, 53));
        assert!(
            !rule_allows(&udp, IPPROTO_UDPLITE, 53),
            "UDP-Lite is not udp"
        );
        assert!(!rule_allows(&udp, IPPROTO_UDP, 54));
        let tcp = entry(443, 443, PROTO_TCP, 0);
        assert!(rule_allows(&tcp, IPPROTO_MPTCP, 443), "MPTCP is tcp");
        assert!(!rule_allows(&tcp, IPPROTO_SCTP, 443));
        let icmp = entry(0, 0, PROTO_ICMP, 0);
        assert!(rule_allows(&icmp, IPPROTO_ICMPV6, 9), "ICMP ignores ports");
    }

    #[test]
    fn numbered_protocols_need_their_number() {
        let lite = entry(5000, 5001, PROTO_NUMBERED, IPPROTO_UDPLITE as u8);
        assert!(rule_allows(&lite, IPPROTO_UDPLITE, 5000));
        assert!(!rule_allows(&lite, IPPROTO_UDPLITE, 4999));
        assert!(!rule_allows(&lite, IPPROTO_UDP, 5000));
        let gre = entry(0, 0, PROTO_NUMBERED, 47);
        assert!(rule_allows(&gre, 47, 12345), "no ports for GRE");
        assert!(!rule_allows(
            &entry(0, u16::MAX, PROTO_TCP | PROTO_UDP | PROTO_ICMP, 0),
            47,
            0
        ));
    }

    #[test]
    fn all_means_every_protocol_and_port() {
        let all = entry(0, u16::MAX, PROTO_ALL, 0);
        for p in [
            IPPROTO_TCP,
            IPPROTO_UDP,
            IPPROTO_UDPLITE,
            IPPROTO_SCTP,
            47,
            50,
            255,
        ] {
            assert!(rule_allows(&all, p, 1), "protocol {p}");
        }
    }

    #[test]
    fn ruleset_returns_the_first_allowing_entry() {
        let mut rs = RuleSet {
            len: 2,
            rules: [PortRule::default(); RULESET_CAPACITY],
        };
        rs.rules[0] = PortRule {
            rule_id: 3,
            ..entry(80, 80, PROTO_TCP, 0)
        };
        rs.rules[1] = PortRule {
            rule_id: 4,
            ..entry(1, 65535, PROTO_TCP, 0)
        };
        assert_eq!(ruleset_allows(&rs, IPPROTO_TCP, 80), 3);
        assert_eq!(ruleset_allows(&rs, IPPROTO_TCP, 81), 4);
        assert_eq!(ruleset_allows(&rs, IPPROTO_UDP, 81), RULE_DEFAULT_DENY);
        rs.len = 99; // a corrupt length never reads past the array
        assert_eq!(ruleset_allows(&rs, IPPROTO_UDP, 1), RULE_DEFAULT_DENY);
    }
}
