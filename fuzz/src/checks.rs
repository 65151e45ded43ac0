//! What the `compiler` target checks on a policy that compiled: the tables' structure (ids,
//! order, uniqueness, the control socket refused) and their meaning, against a plain reference
//! matcher written from the policy's documented semantics; for `fqdns`, one entry per (rule,
//! name) whose ruleset is the rule's ports and protocol, and `fqdn_rules_for` against a plain
//! label-by-label name matcher.
use std::net::IpAddr;

use agentseg::compile::{Compiled, CompiledSegment, Direction, HostPolicy, UnixEntry};
use agentseg::policy::{PolicySet, Protocol, Rule, Segment, UnixPattern};
use agentseg_common::{
    RULE_CONTROL_SOCKET, RULE_DEFAULT_DENY, RULESET_CAPACITY, RuleSet, UNIX_ALLOW, UNIX_DENY,
    ruleset_allows,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::grammar::CONTROL_SOCKET;

/// Protocols probed: TCP, MPTCP, UDP, UDP-Lite, SCTP, DCCP, ICMP, ICMPv6, GRE, 0, 255.
const PROBE_PROTOCOLS: &[u32] = &[6, 262, 17, 136, 132, 33, 1, 58, 47, 0, 255];

/// Whether a rule allows (protocol, port), from the policy's documented meaning: `tcp` is TCP
/// and MPTCP, `udp` only UDP, `icmp` ICMP and ICMPv6 (no ports), `any` without ports all
/// three, `any` with ports TCP and UDP on them, a number only itself; ports bind only
/// protocols that have them.
fn reference_proto(rule: &Rule, protocol: u32, port: u16) -> bool {
    let with_ports = matches!(protocol, 6 | 262 | 17 | 136 | 132 | 33);
    let port_ok = !with_ports || rule.ports.is_empty() || {
        rule.ports.iter().any(|r| r.lo <= port && port <= r.hi)
    };
    let proto_ok = match rule.protocol {
        Protocol::Tcp => matches!(protocol, 6 | 262),
        Protocol::Udp => protocol == 17,
        Protocol::Icmp => matches!(protocol, 1 | 58),
        Protocol::Any if rule.ports.is_empty() => matches!(protocol, 6 | 262 | 17 | 1 | 58),
        Protocol::Any => matches!(protocol, 6 | 262 | 17),
        Protocol::Number(n) => protocol == u32::from(n),
        Protocol::All => true,
    };
    proto_ok && port_ok
}

fn reference(rules: &[Rule], addr: IpAddr, protocol: u32, port: u16) -> bool {
    rules.iter().any(|r| {
        r.cidrs.iter().any(|c| c.contains(&addr))
            && !r.except.iter().any(|e| e.contains(&addr))
            && reference_proto(r, protocol, port)
    })
}

/// Longest-prefix match over a compiled table, as the kernel's trie does it.
fn lpm<N: Copy + Into<IpNet>>(table: &[(N, u32)], addr: IpAddr) -> Option<u32> {
    table
        .iter()
        .map(|&(n, id)| (n.into(), id))
        .filter(|(n, _): &(IpNet, u32)| n.contains(&addr))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, id)| id)
}

fn compiled_allows(
    c: &Compiled,
    v4: &[(Ipv4Net, u32)],
    v6: &[(Ipv6Net, u32)],
    addr: IpAddr,
    protocol: u32,
    port: u16,
) -> bool {
    let id = match addr {
        IpAddr::V4(_) => lpm(v4, addr),
        IpAddr::V6(_) => lpm(v6, addr),
    };
    id.is_some_and(|id| {
        ruleset_allows(&c.rulesets[id as usize], protocol, port) != RULE_DEFAULT_DENY
    })
}

/// The boundaries of a prefix: its first and last address and their neighbours outside.
fn boundaries(net: &IpNet, out: &mut Vec<IpAddr>) {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            for a in [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)]
                .into_iter()
                .flatten()
            {
                out.push(IpAddr::V4(a.into()));
            }
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            for a in [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)]
                .into_iter()
                .flatten()
            {
                out.push(IpAddr::V6(a.into()));
            }
        }
    }
}

fn sorted_unique<T: PartialOrd + std::fmt::Debug>(items: &[T], what: &str) {
    for w in items.windows(2) {
        assert!(
            w[0] < w[1],
            "{what} not sorted and unique: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

fn check_ruleset(rs: &RuleSet, rules: usize) {
    assert!(
        rs.len as usize <= RULESET_CAPACITY,
        "ruleset over capacity: {rs:?}"
    );
    for r in &rs.rules[..rs.len as usize] {
        assert!(
            (r.rule_id as usize) < rules,
            "ruleset names rule {} of {rules}",
            r.rule_id
        );
        assert!(r.port_lo <= r.port_hi, "empty port range in {r:?}");
    }
}

pub fn check_structure(c: &Compiled, host: &HostPolicy) {
    assert!(
        !c.rulesets.is_empty() && c.rulesets[0].len == 0,
        "ruleset 0 must be empty"
    );
    for (i, r) in c.rules.iter().enumerate() {
        assert_eq!(r.id as usize, i, "rule ids are indices");
        assert!(r.line >= 1, "rule {i} at line 0");
    }
    for rs in &c.rulesets {
        check_ruleset(rs, c.rules.len());
    }
    let control = UnixPattern::parse(CONTROL_SOCKET).expect("control socket pattern");
    for (i, s) in c.segments.iter().enumerate() {
        assert_eq!(s.id as usize, i + 1, "segment ids are 1..=n");
        let n = c.rulesets.len();
        let ids = s
            .egress_v4
            .iter()
            .map(|e| e.1)
            .chain(s.ingress_v4.iter().map(|e| e.1))
            .chain(s.quarantine_v4.iter().map(|e| e.1))
            .chain(s.egress_v6.iter().map(|e| e.1))
            .chain(s.ingress_v6.iter().map(|e| e.1))
            .chain(s.quarantine_v6.iter().map(|e| e.1));
        for id in ids {
            assert!(
                (id as usize) < n,
                "segment {} names ruleset {id} of {n}",
                s.name
            );
        }
        let key4 = |e: &(Ipv4Net, u32)| (e.0.network(), e.0.prefix_len());
        let key6 = |e: &(Ipv6Net, u32)| (e.0.network(), e.0.prefix_len());
        for t in [&s.egress_v4, &s.ingress_v4, &s.quarantine_v4] {
            sorted_unique(&t.iter().map(key4).collect::<Vec<_>>(), "v4 entries");
        }
        for t in [&s.egress_v6, &s.ingress_v6, &s.quarantine_v6] {
            sorted_unique(&t.iter().map(key6).collect::<Vec<_>>(), "v6 entries");
        }
        for t in [&s.unix, &s.quarantine_unix] {
            let keys: Vec<Vec<u8>> = t.iter().map(|e| e.pattern.key_bytes()).collect();
            sorted_unique(&keys, "unix entries");
            for e in t {
                match e.verdict {
                    UNIX_ALLOW => assert!(
                        (e.rule_id as usize) < c.rules.len(),
                        "unix rule {}",
                        e.rule_id
                    ),
                    UNIX_DENY => assert_eq!(e.rule_id, RULE_CONTROL_SOCKET),
                    v => panic!("unix verdict {v}"),
                }
            }
        }
        if !host.unix_deny.is_empty() {
            let denied = |t: &[UnixEntry]| {
                t.iter()
                    .any(|e| e.pattern == control && e.verdict == UNIX_DENY)
            };
            assert!(
                denied(&s.unix),
                "segment {}: control socket not refused",
                s.name
            );
            assert!(
                s.quarantine_unix.is_empty() || denied(&s.quarantine_unix),
                "segment {}: control socket not refused in quarantine",
                s.name
            );
        }
    }
}

pub fn check_semantics(set: &PolicySet, c: &Compiled, probes: &[(u32, u16)]) {
    for (seg, out) in set.segments.iter().zip(&c.segments) {
        check_fqdns(seg, out, c, probes);
        // `[quarantine] allow`: every protocol and port, as documented.
        let quarantine: Vec<Rule> = if seg.quarantine_allow.is_empty() {
            Vec::new()
        } else {
            vec![Rule {
                cidrs: seg.quarantine_allow.clone(),
                except: Vec::new(),
                fqdns: Vec::new(),
                ports: Vec::new(),
                protocol: Protocol::All,
                origin: seg.origin.clone(),
            }]
        };
        let tables = [
            ("egress", &seg.egress, &out.egress_v4, &out.egress_v6),
            ("ingress", &seg.ingress, &out.ingress_v4, &out.ingress_v6),
            (
                "quarantine",
                &quarantine,
                &out.quarantine_v4,
                &out.quarantine_v6,
            ),
        ];
        for (what, rules, v4, v6) in tables {
            let mut addrs = Vec::new();
            for r in rules.iter() {
                for n in r.cidrs.iter().chain(&r.except) {
                    boundaries(n, &mut addrs);
                }
            }
            for &(seed, _) in probes.iter().take(8) {
                addrs.push(IpAddr::V4(seed.into()));
                addrs.push(IpAddr::V6((u128::from(seed) << 96 | 0xfd00 << 112).into()));
            }
            let ports: Vec<u16> = rules
                .iter()
                .flat_map(|r| {
                    r.ports
                        .iter()
                        .flat_map(|p| [p.lo, p.hi, p.lo.wrapping_sub(1), p.hi.wrapping_add(1)])
                })
                .chain(probes.iter().take(4).map(|p| p.1))
                .chain([1, 53, 443, u16::MAX])
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            let mut ports = ports;
            ports.sort_unstable();
            ports.dedup();
            for &addr in &addrs {
                for &protocol in PROBE_PROTOCOLS {
                    for &port in &ports {
                        let want = reference(rules, addr, protocol, port);
                        let got = compiled_allows(c, v4, v6, addr, protocol, port);
                        assert_eq!(
                            got, want,
                            "segment {} {what}: {addr} protocol {protocol} port {port}: \
                             compiled {got}, reference {want}",
                            seg.name
                        );
                    }
                }
            }
        }
    }
}

/// Whether `pattern` (as `Fqdn` displays it) matches `name`, from the documented meaning: the
/// name lower-cased without one trailing dot must be made of 1-63 character labels of
/// `a-z 0-9 - _`, 253 characters at most; an exact pattern is that name, `*.D` every name with
/// more labels than `D` whose last labels are `D`'s.
fn reference_name(pattern: &str, name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !labels.iter().all(label_ok) {
        return false;
    }
    match pattern.strip_prefix("*.") {
        None => name == pattern,
        Some(domain) => {
            let domain: Vec<&str> = domain.split('.').collect();
            labels.len() > domain.len() && labels[labels.len() - domain.len()..] == domain[..]
        }
    }
}

/// The names probed against a segment's patterns: each domain, names below it, its parent,
/// near misses, in mixed case and with trailing dots.
fn probe_names(seg: &Segment) -> Vec<String> {
    let mut names = vec![String::new(), ".".to_owned(), "example.org".to_owned()];
    for rule in &seg.egress {
        for pattern in &rule.fqdns {
            let d = pattern.domain();
            names.push(d.to_owned());
            names.push(format!("{}.", d.to_ascii_uppercase()));
            names.push(format!("x.{d}"));
            names.push(format!("X.y-1.{d}."));
            names.push(format!("x{d}"));
            names.push(format!("x..{d}"));
            names.push(format!("a b.{d}"));
            names.push(format!("{}.{d}", "a".repeat(64)));
            names.push(pattern.to_string());
            if let Some((_, parent)) = d.split_once('.') {
                names.push(parent.to_owned());
                names.push(format!("x.{parent}"));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// A segment's `fqdns` entries: exactly one per (egress rule, name), sorted, each naming its
/// rule and a ruleset that allows what the rule allows; `fqdn_rules_for` as the reference.
fn check_fqdns(seg: &Segment, out: &CompiledSegment, c: &Compiled, probes: &[(u32, u16)]) {
    let name = &seg.name;
    let keys: Vec<(String, u32)> = out
        .fqdns
        .iter()
        .map(|e| (e.pattern.to_string(), e.rule_id))
        .collect();
    sorted_unique(&keys, "fqdn entries");
    // Egress rules come first among a segment's rule ids, in file order.
    let first = c
        .rules
        .iter()
        .position(|r| r.segment == name.as_ref() && r.direction == Direction::Egress);
    let mut want: Vec<(String, u32)> = Vec::new();
    for (i, rule) in seg.egress.iter().enumerate() {
        let Some(first) = first else {
            panic!("segment {name}: egress rules but no egress rule ids");
        };
        let id = u32::try_from(first + i).expect("rule id");
        want.extend(rule.fqdns.iter().map(|p| (p.to_string(), id)));
    }
    want.sort();
    assert_eq!(keys, want, "segment {name}: fqdn entries");
    assert!(
        seg.ingress.iter().all(|r| r.fqdns.is_empty()),
        "ingress names"
    );

    for e in &out.fqdns {
        assert!(
            e.ruleset_id != 0 && (e.ruleset_id as usize) < c.rulesets.len(),
            "segment {name}: fqdn {} names ruleset {}",
            e.pattern,
            e.ruleset_id
        );
        let first = first.expect("egress rule ids");
        let rule = &seg.egress[e.rule_id as usize - first];
        let rs = &c.rulesets[e.ruleset_id as usize];
        let ports: Vec<u16> = rule
            .ports
            .iter()
            .flat_map(|p| [p.lo, p.hi, p.lo.wrapping_sub(1), p.hi.wrapping_add(1)])
            .chain(probes.iter().take(4).map(|p| p.1))
            .chain([1, 53, 443, 853, u16::MAX])
            .collect();
        for &protocol in PROBE_PROTOCOLS {
            for &port in &ports {
                let want = reference_proto(rule, protocol, port);
                let got = ruleset_allows(rs, protocol, port);
                assert_eq!(
                    got != RULE_DEFAULT_DENY,
                    want,
                    "segment {name}: fqdn {} protocol {protocol} port {port}",
                    e.pattern
                );
                assert!(
                    got == RULE_DEFAULT_DENY || got == e.rule_id,
                    "segment {name}: fqdn {} allowed by rule {got}, not {}",
                    e.pattern,
                    e.rule_id
                );
            }
        }
    }

    for probe in probe_names(seg) {
        let got: Vec<(String, u32)> = out
            .fqdn_rules_for(&probe)
            .map(|e| (e.pattern.to_string(), e.rule_id))
            .collect();
        let want: Vec<(String, u32)> = keys
            .iter()
            .filter(|(p, _)| reference_name(p, &probe))
            .cloned()
            .collect();
        assert_eq!(got, want, "segment {name}: fqdn_rules_for({probe:?})");
    }
}
