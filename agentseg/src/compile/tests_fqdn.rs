//! `[[egress]] fqdns`: entries, their rulesets, the name lookup and the dump.

use agentseg_common::{IPPROTO_TCP, IPPROTO_UDP, PROTO_TCP, PROTO_UDP};

use super::tests_semantics::{allows, set};
use super::*;

const NAMES: &str = "name = \"a.b.c\"\n\
    [[egress]]\nfqdns = [\"*.example.org\", \"api.example.com\"]\nports = [443]\nprotocol = \"tcp\"\n\
    [[egress]]\ncidrs = [\"192.0.2.0/24\"]\nfqdns = [\"Example.org.\", \"api.example.com\"]\n\
    ports = [80, 8080]\nprotocol = \"tcp\"\n\
    [[egress]]\ncidrs = [\"198.51.100.0/24\"]\nports = [53]\nprotocol = \"udp\"\n\
    [[egress]]\nfqdns = [\"a.example.org\"]\nports = [443]\nprotocol = \"tcp\"\n";

fn listed(s: &CompiledSegment) -> Vec<(&str, u32, u32)> {
    s.fqdns
        .iter()
        .map(|e| (e.pattern.as_str(), e.rule_id, e.ruleset_id))
        .collect()
}

#[test]
fn one_entry_per_rule_and_pattern_sorted_by_pattern_then_rule() {
    let c = compile(&set(NAMES)).expect("compiles");
    let s = &c.segments[0];
    // Prefixes first: 192.0.2.0/24 -> 1 (rule 1), 198.51.100.0/24 -> 2 (rule 2); then the
    // names' rulesets in rule order: rule 0 -> 3, rule 1 -> 1 (identical to its prefix's:
    // shared), rule 3 -> 4 (tcp 443 like rule 0, but its own rule id).
    assert_eq!(s.egress_v4.len(), 2);
    assert_eq!(
        s.egress_v4.iter().map(|e| e.1).collect::<Vec<_>>(),
        [1, 2],
        "a policy's prefix rulesets come first"
    );
    assert_eq!(
        listed(s),
        [
            ("*.example.org", 0, 3),
            ("a.example.org", 3, 4),
            ("api.example.com", 0, 3),
            ("api.example.com", 1, 1),
            ("example.org", 1, 1),
        ]
    );
    assert_eq!(c.fqdn_entry_count(), 5);
    assert_eq!(c.rulesets.len(), 5);
    let rs = |id: usize| &c.rulesets[id];
    // The rule's ports and protocol, under its rule id.
    assert!(allows(rs(3), IPPROTO_TCP, 443));
    assert!(!allows(rs(3), IPPROTO_TCP, 80));
    assert!(!allows(rs(3), IPPROTO_UDP, 443));
    assert_eq!(rs(3).rules[0].rule_id, 0);
    assert_eq!(rs(3).len, 1);
    assert!(allows(rs(1), IPPROTO_TCP, 80) && allows(rs(1), IPPROTO_TCP, 8080));
    assert_eq!(rs(1).rules[0].rule_id, 1, "one rule id for cidrs and fqdns");
    assert_eq!(
        (
            rs(4).rules[0].port_lo,
            rs(4).rules[0].protocols,
            rs(4).rules[0].rule_id
        ),
        (443, PROTO_TCP, 3)
    );
    // One RuleInfo per rule, names or not.
    assert_eq!(c.rules.len(), 4);
    assert!(c.rules.iter().all(|r| r.direction == Direction::Egress));
}

#[test]
fn fqdn_rules_for_follows_the_documented_matching() {
    let c = compile(&set(NAMES)).expect("compiles");
    let s = &c.segments[0];
    let hits = |name: &str| -> Vec<(String, u32)> {
        s.fqdn_rules_for(name)
            .map(|e| (e.pattern.to_string(), e.rule_id))
            .collect()
    };
    let own = |v: &[(&str, u32)]| -> Vec<(String, u32)> {
        v.iter().map(|&(p, r)| (p.to_owned(), r)).collect()
    };
    assert_eq!(hits("example.org"), own(&[("example.org", 1)]));
    assert_eq!(hits("EXAMPLE.ORG."), own(&[("example.org", 1)]));
    assert_eq!(
        hits("a.example.org"),
        own(&[("*.example.org", 0), ("a.example.org", 3)])
    );
    assert_eq!(hits("x.a.Example.org."), own(&[("*.example.org", 0)]));
    assert_eq!(
        hits("api.example.com"),
        own(&[("api.example.com", 0), ("api.example.com", 1)])
    );
    for none in [
        "example.com",
        "x.api.example.com",
        "org",
        "a..example.org",
        "a b.example.org",
        "",
    ] {
        assert!(hits(none).is_empty(), "{none:?}: {:?}", hits(none));
    }
}

#[test]
fn segments_without_names_have_no_entries_and_keep_their_numbers() {
    let c = compile(&set(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nports = [443]\n",
    ))
    .expect("compiles");
    assert!(c.segments[0].fqdns.is_empty());
    assert_eq!(c.segments[0].fqdn_rules_for("a.example.org").count(), 0);
    assert_eq!(c.rulesets.len(), 2);
    assert_eq!(c.fqdn_entry_count(), 0);
}

#[test]
fn entries_are_per_segment_and_deterministic() {
    let text = "[[segment]]\nname = \"b.b.b\"\n\
        [[segment.egress]]\nfqdns = [\"z.example\", \"a.example\"]\nprotocol = \"udp\"\n\
        [[segment]]\nname = \"a.a.a\"\n\
        [[segment.egress]]\nfqdns = [\"m.example\"]\n";
    let c = compile(&set(text)).expect("compiles");
    assert_eq!(listed(&c.segments[0]), [("m.example", 0, 1)]);
    assert_eq!(
        listed(&c.segments[1]),
        [("a.example", 1, 2), ("z.example", 1, 2)]
    );
    // No ports: every port, and the protocol as written.
    assert!(allows(&c.rulesets[2], IPPROTO_UDP, 1));
    assert!(allows(&c.rulesets[2], IPPROTO_UDP, 65535));
    assert!(!allows(&c.rulesets[2], IPPROTO_TCP, 53));
    assert_eq!(c.rulesets[2].rules[0].protocols, PROTO_UDP);
    assert_eq!(Ok(&c), compile(&set(text)).as_ref());
}

#[test]
fn to_text_lists_names_after_the_egress_prefixes() {
    let c = compile(&set(NAMES)).expect("compiles");
    let text = c.to_text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("segment 1 egress ") || l.starts_with("segment 1 fqdn "))
        .collect();
    assert_eq!(
        lines,
        [
            "segment 1 egress 192.0.2.0/24 -> ruleset 1",
            "segment 1 egress 198.51.100.0/24 -> ruleset 2",
            "segment 1 fqdn *.example.org -> ruleset 3 rule 0 (t.toml:2)",
            "segment 1 fqdn a.example.org -> ruleset 4 rule 3 (t.toml:15)",
            "segment 1 fqdn api.example.com -> ruleset 3 rule 0 (t.toml:2)",
            "segment 1 fqdn api.example.com -> ruleset 1 rule 1 (t.toml:6)",
            "segment 1 fqdn example.org -> ruleset 1 rule 1 (t.toml:6)",
        ]
    );
    assert!(text.contains("ruleset 4 tcp 443 rule 3\n"), "{text}");
}

#[test]
fn a_names_rule_with_too_many_ports_is_an_error() {
    let ports: Vec<String> = (0..17).map(|i| (100 * i + 1).to_string()).collect();
    let text = format!(
        "name = \"a.b.c\"\n[[egress]]\nfqdns = [\"a.example\", \"b.example\"]\nports = [{}]\n",
        ports.join(", ")
    );
    let err = compile(&set(&text)).expect_err("over capacity");
    assert_eq!(err.0.len(), 1);
    assert_eq!(
        err.0[0].target,
        Target::Names(vec![
            "a.example".parse().expect("name"),
            "b.example".parse().expect("name")
        ])
    );
    let msg = err.to_string();
    for word in [
        "segment \"a.b.c\" egress fqdns a.example, b.example: 17 port rules",
        "t.toml:2",
    ] {
        assert!(msg.contains(word), "{msg} should mention {word}");
    }
}
