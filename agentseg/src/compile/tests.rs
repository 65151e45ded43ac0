//! Ids, port mapping, dedupe, capacity, determinism, examples and scale.

use std::path::PathBuf;

use agentseg_common::{
    MODE_AUDIT, MODE_ENFORCE, PROTO_ICMP, PROTO_TCP, PROTO_UDP, PortRule, RULESET_CAPACITY,
};
use ipnet::IpNet;

use super::tests_semantics::set;
use super::*;
use crate::policy::{self, Members, Origin, PortRange, Protocol, Segment};

fn contents(c: &Compiled, id: u32) -> Vec<(u16, u16, u8, u32)> {
    let rs = &c.rulesets[id as usize];
    rs.rules[..rs.len as usize]
        .iter()
        .map(|r| (r.port_lo, r.port_hi, r.protocols, r.rule_id))
        .collect()
}

#[test]
fn protocols_and_ports_map_to_port_rules() {
    let text = "name = \"a.b.c\"\n\
        [[egress]]\ncidrs = [\"192.0.2.1\"]\nprotocol = \"tcp\"\n\
        [[egress]]\ncidrs = [\"192.0.2.2\"]\nports = [53, \"60-70\"]\nprotocol = \"udp\"\n\
        [[egress]]\ncidrs = [\"192.0.2.3\"]\nprotocol = \"icmp\"\n\
        [[egress]]\ncidrs = [\"192.0.2.4\"]\n\
        [[egress]]\ncidrs = [\"192.0.2.5\"]\nports = [443]\n";
    let c = compile(&set(text)).expect("compiles");
    let e = &c.segments[0].egress_v4;
    let all = PROTO_TCP | PROTO_UDP | PROTO_ICMP;
    assert_eq!(contents(&c, e[0].1), [(0, 65535, PROTO_TCP, 0)]);
    assert_eq!(
        contents(&c, e[1].1),
        [(53, 53, PROTO_UDP, 1), (60, 70, PROTO_UDP, 1)]
    );
    assert_eq!(contents(&c, e[2].1), [(0, 65535, PROTO_ICMP, 2)]);
    assert_eq!(contents(&c, e[3].1), [(0, 65535, all, 3)]);
    assert_eq!(contents(&c, e[4].1), [(443, 443, PROTO_TCP | PROTO_UDP, 4)]);
}

#[test]
fn ids_modes_members_and_rule_infos() {
    let text = "[[segment]]\nname = \"b.b.b\"\nmode = \"audit\"\n\
        [[segment.ingress]]\ncidrs = [\"10.0.0.0/8\"]\n\
        [[segment.egress]]\ncidrs = [\"10.0.0.0/8\"]\n\
        [segment.members]\ncgroups = [\"x/b\"]\nunits = [\"b.service\"]\n\
        [[segment]]\nname = \"a.a.a\"\n[[segment.egress]]\ncidrs = [\"::/0\"]\n";
    let c = compile(&set(text)).expect("compiles");
    assert_eq!(c.rulesets[0].len, 0, "ruleset 0 is the empty set");
    let ids: Vec<(u32, &str, u32)> = c
        .segments
        .iter()
        .map(|s| (s.id, s.name.as_str(), s.mode))
        .collect();
    assert_eq!(ids, [(1, "a.a.a", MODE_ENFORCE), (2, "b.b.b", MODE_AUDIT)]);
    assert_eq!(c.segments[1].member_cgroups, ["x/b"]);
    assert_eq!(c.segments[1].member_units, ["b.service"]);
    let infos: Vec<(u32, &str, Direction, usize)> = c
        .rules
        .iter()
        .map(|r| (r.id, r.segment.as_str(), r.direction, r.line))
        .collect();
    // Segments in order, egress before ingress, file order within.
    assert_eq!(
        infos,
        [
            (0, "a.a.a", Direction::Egress, 13),
            (1, "b.b.b", Direction::Egress, 6),
            (2, "b.b.b", Direction::Ingress, 4),
        ]
    );
    // Identical contents but different rule ids: distinct rulesets.
    assert_ne!(c.segments[1].egress_v4[0].1, c.segments[1].ingress_v4[0].1);
    assert_eq!(c.entry_count(), 3);
}

#[test]
fn identical_rulesets_share_an_id() {
    let text = "name = \"a.b.c\"\n\
        [[egress]]\ncidrs = [\"10.0.0.0/8\", \"192.168.0.0/16\", \"fd00::/8\"]\nports = [443]\n\
        protocol = \"tcp\"\n";
    let c = compile(&set(text)).expect("compiles");
    let s = &c.segments[0];
    let ids: Vec<u32> = s.egress_v4.iter().map(|e| e.1).collect();
    assert_eq!(ids, [1, 1]);
    assert_eq!(s.egress_v6[0].1, 1);
    assert_eq!(c.rulesets.len(), 2);
}

fn rule(cidrs: &[&str], ports: &[(u16, u16)], protocol: Protocol, line: usize) -> policy::Rule {
    policy::Rule {
        cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
        except: vec![],
        fqdns: vec![],
        ports: ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect(),
        protocol,
        origin: Origin {
            file: PathBuf::from("big.toml"),
            line,
        },
    }
}

fn segment(egress: Vec<policy::Rule>) -> PolicySet {
    PolicySet {
        segments: vec![Segment {
            name: "a.b.c".parse().expect("name"),
            description: String::new(),
            mode: policy::Mode::Enforce,
            on_daemon_loss: policy::DaemonLoss::Keep,
            egress,
            ingress: vec![],
            members: Members::default(),
            quarantine_allow: vec![],
            quarantine_origin: None,
            monitor: policy::Monitor::default(),
            unix: vec![],
            quarantine_unix: vec![],
            sandbox: policy::Sandbox::default(),
            positions: policy::Positions::default(),
            origin: Origin {
                file: PathBuf::from("big.toml"),
                line: 1,
            },
        }],
        peers: Default::default(),
    }
}

#[test]
fn over_capacity_merges_then_fails() {
    // 20 touching single ports in two rules: merged into one range per protocol.
    let a: Vec<(u16, u16)> = (1000..1010).map(|p| (p, p)).collect();
    let b: Vec<(u16, u16)> = (1010..1020).map(|p| (p, p)).collect();
    let set1 = segment(vec![
        rule(&["10.0.0.0/8"], &a, Protocol::Tcp, 2),
        rule(&["10.0.0.0/8"], &b, Protocol::Tcp, 7),
    ]);
    let c = compile(&set1).expect("merges");
    assert_eq!(
        contents(&c, c.segments[0].egress_v4[0].1),
        [(1000, 1019, PROTO_TCP, 0)]
    );

    // 17 disjoint ranges cannot be merged.
    let far: Vec<(u16, u16)> = (0..17).map(|i| (100 * i + 1, 100 * i + 1)).collect();
    let set2 = segment(vec![
        rule(&["10.0.0.0/8"], &far[..9], Protocol::Tcp, 2),
        rule(&["10.0.0.0/8"], &far[9..], Protocol::Tcp, 7),
    ]);
    let err = compile(&set2).expect_err("too many");
    assert_eq!(err.0.len(), 1);
    let msg = err.to_string();
    for word in [
        "a.b.c",
        "egress",
        "10.0.0.0/8",
        "17",
        "big.toml:2",
        "big.toml:7",
    ] {
        assert!(msg.contains(word), "{msg} should mention {word}");
    }
}

#[test]
fn normalize_dedupes_keeping_lowest_rule_id() {
    let pr = |lo, hi, rule_id| PortRule {
        port_lo: lo,
        port_hi: hi,
        protocols: PROTO_TCP,
        proto_num: 0,
        _pad: [0; 2],
        rule_id,
    };
    let out = ruleset::normalize(vec![pr(5, 5, 3), pr(1, 2, 9), pr(5, 5, 1)]).expect("fits");
    assert_eq!(out, [pr(1, 2, 9), pr(5, 5, 1)]);
    let many: Vec<PortRule> = (0..=RULESET_CAPACITY as u16)
        .map(|i| pr(i * 3, i * 3 + 1, 0))
        .collect();
    assert_eq!(ruleset::normalize(many), Err(RULESET_CAPACITY + 1));
}

#[test]
fn bundled_examples_compile_deterministically() {
    let set =
        policy::load_dir(&crate::policy::tests::examples_dir()).unwrap_or_else(|e| panic!("{e}"));
    let c = compile(&set).unwrap_or_else(|e| panic!("{e}"));
    let text = c.to_text();
    assert_eq!(text, compile(&set).expect("again").to_text());
    assert_eq!(text.lines().count(), {
        let members: usize = c
            .segments
            .iter()
            .map(|s| 1 + s.member_cgroups.len() + s.member_units.len())
            .sum();
        members
            + c.entry_count()
            + c.fqdn_entry_count()
            + c.unix_entry_count()
            + c.rulesets.len()
            + c.rules.len()
    });
    assert!(text.contains("ruleset 0 deny\n"), "{text}");
}

#[test]
fn to_text_format() {
    let text = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nexcept = [\"10.1.0.0/16\"]\n\
        ports = [443, \"8000-8100\"]\nprotocol = \"tcp\"\n[members]\ncgroups = [\"x/y\"]\n";
    let c = compile(&set(text)).expect("compiles");
    assert_eq!(
        c.to_text(),
        "segment 1 a.b.c mode=enforce\n\
         segment 1 member cgroup x/y\n\
         segment 1 egress 10.0.0.0/8 -> ruleset 1\n\
         segment 1 egress 10.1.0.0/16 -> ruleset 0\n\
         ruleset 0 deny\n\
         ruleset 1 tcp 443 rule 0; tcp 8000-8100 rule 0\n\
         rule 0 a.b.c egress t.toml:2\n"
    );
}

#[test]
fn hundred_thousand_prefixes() {
    let nets: Vec<IpNet> = (0u32..100_000)
        .map(|i| {
            IpNet::new((0x0a00_0000 | (i << 4)).to_be_bytes().into(), 28)
                .expect("len")
                .trunc()
        })
        .collect();
    let mut wide = rule(&["10.0.0.0/8"], &[(80, 80)], Protocol::Tcp, 2);
    wide.except = vec!["10.0.0.0/24".parse().expect("net")];
    let mut many = rule(&[], &[(443, 443)], Protocol::Tcp, 3);
    many.cidrs = nets;
    let big = segment(vec![wide, many]);
    // How long this takes is measured by `cargo xtask bench` (a 100k-rule policy through
    // `agentseg check`), not asserted here.
    let c = compile(&big).expect("compiles");
    assert_eq!(c.entry_count(), 100_002);
    // Contents: empty, {80}, {80, 443}, and {443} for the /28s inside the except.
    assert_eq!(c.rulesets.len(), 4);
}

#[test]
fn quarantine_allow_list_compiles_to_an_allow_all_ruleset() {
    let text = "[[segment]]\nname = \"b.b.b\"\n\
        [[segment.egress]]\ncidrs = [\"10.0.0.0/8\"]\nports = [443]\nprotocol = \"tcp\"\n\
        [segment.quarantine]\n\
        allow = [\"@logs\", \"::1\", \"10.1.0.0/16\", \"127.0.0.1\", \"10.0.0.0/8\"]\n\
        [[segment.ingress]]\ncidrs = [\"192.0.2.0/24\"]\n\
        [[segment]]\nname = \"a.a.a\"\nquarantine = { allow = [\"127.0.0.1\"] }\n\
        [[segment]]\nname = \"c.c.c\"\n[[segment.egress]]\ncidrs = [\"::/0\"]\n\
        [peers.logs]\ncidrs = [\"192.0.2.50\", \"2001:db8::50\"]\n";
    let c = compile(&set(text)).expect("compiles");
    // Every protocol and port, as `[quarantine] allow` is documented.
    let all = agentseg_common::PROTO_ALL;

    // Rule ids: segments in order; egress, ingress, then the quarantine list.
    let infos: Vec<(u32, &str, Direction, usize)> = c
        .rules
        .iter()
        .map(|r| (r.id, r.segment.as_str(), r.direction, r.line))
        .collect();
    assert_eq!(
        infos,
        [
            (0, "a.a.a", Direction::Quarantine, 13),
            (1, "b.b.b", Direction::Egress, 3),
            (2, "b.b.b", Direction::Ingress, 9),
            (3, "b.b.b", Direction::Quarantine, 7),
            (4, "c.c.c", Direction::Egress, 16),
        ]
    );
    assert_eq!(c.rules[3].file, PathBuf::from("t.toml"));

    let a = &c.segments[0];
    assert_eq!(a.quarantine_v4.len(), 1);
    assert!(a.quarantine_v6.is_empty());
    assert_eq!(contents(&c, a.quarantine_v4[0].1), [(0, 65535, all, 0)]);

    let b = &c.segments[1];
    let v4: Vec<String> = b.quarantine_v4.iter().map(|e| e.0.to_string()).collect();
    assert_eq!(
        v4,
        ["10.0.0.0/8", "10.1.0.0/16", "127.0.0.1/32", "192.0.2.50/32"]
    );
    let v6: Vec<String> = b.quarantine_v6.iter().map(|e| e.0.to_string()).collect();
    assert_eq!(v6, ["::1/128", "2001:db8::50/128"]);
    // One interned ruleset for every prefix of the segment, both families.
    let q = b.quarantine_v4[0].1;
    assert!(b.quarantine_v4.iter().all(|e| e.1 == q));
    assert!(b.quarantine_v6.iter().all(|e| e.1 == q));
    assert_eq!(contents(&c, q), [(0, 65535, all, 3)]);
    // Different rule ids: the two segments' quarantine rulesets are distinct.
    assert_ne!(q, a.quarantine_v4[0].1);
    // The allow list adds nothing to egress/ingress.
    assert_eq!(b.egress_v4.len(), 1);
    assert_eq!(b.ingress_v4.len(), 1);
    assert_eq!(b.ingress_v6.len(), 0);
    let c_seg = &c.segments[2];
    assert!(c_seg.quarantine_v4.is_empty() && c_seg.quarantine_v6.is_empty());
    // deny + a's quarantine + b's egress, ingress, quarantine + c's egress.
    assert_eq!(c.rulesets.len(), 6);
    assert_eq!(c.entry_count(), 1 + (1 + 1 + 4 + 2) + 1);
}

#[test]
fn quarantine_lookup_allows_everything_to_listed_peers_only() {
    use super::tests_semantics::{allows, lookup};
    use agentseg_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
    let text = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"0.0.0.0/0\"]\nports = [443]\n\
        protocol = \"tcp\"\n[quarantine]\nallow = [\"10.0.0.0/8\", \"fd00::1\"]\n";
    let c = compile(&set(text)).expect("compiles");
    for (ip, proto, port) in [
        ("10.2.3.4", IPPROTO_UDP, 514),
        ("10.2.3.4", IPPROTO_TCP, 1),
        ("10.2.3.4", IPPROTO_ICMP, 0),
        ("fd00::1", IPPROTO_TCP, 65535),
    ] {
        assert!(
            allows(lookup(&c, 0, Direction::Quarantine, ip), proto, port),
            "{ip} {proto} {port}"
        );
    }
    assert!(!allows(
        lookup(&c, 0, Direction::Quarantine, "11.0.0.1"),
        IPPROTO_TCP,
        443
    ));
    assert!(!allows(
        lookup(&c, 0, Direction::Quarantine, "fd00::2"),
        IPPROTO_UDP,
        53
    ));
    // Outside quarantine the rules are unchanged.
    assert!(!allows(
        lookup(&c, 0, Direction::Egress, "10.2.3.4"),
        IPPROTO_UDP,
        514
    ));
    assert_eq!(Direction::Quarantine.to_string(), "quarantine");
}

#[test]
fn to_text_includes_quarantine_entries() {
    let text = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nprotocol = \"tcp\"\n\
        [quarantine]\nallow = [\"::1\", \"127.0.0.1\"]\n";
    let c = compile(&set(text)).expect("compiles");
    assert_eq!(
        c.to_text(),
        "segment 1 a.b.c mode=enforce\n\
         segment 1 egress 10.0.0.0/8 -> ruleset 1\n\
         segment 1 quarantine 127.0.0.1/32 -> ruleset 2\n\
         segment 1 quarantine ::1/128 -> ruleset 2\n\
         ruleset 0 deny\n\
         ruleset 1 tcp 0-65535 rule 0\n\
         ruleset 2 all rule 1\n\
         rule 0 a.b.c egress t.toml:2\n\
         rule 1 a.b.c quarantine t.toml:5\n"
    );
}
