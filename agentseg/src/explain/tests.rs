use std::path::PathBuf;

use super::*;
use crate::compile::{HostPolicy, compile_with};
use crate::policy;

/// The kernel tests' web segment (tests/tests/segments.rs), an overlap, an except, ingress, a
/// quarantine list and an fqdns rule.
const WEB: &str = r#"
name = "web.test.tcp"

[[egress]]
cidrs = ["127.0.0.1/32", "::1", "fd00:a5::1/128"]
ports = [8080, "8000-8100"]
protocol = "tcp"

[[egress]]
cidrs = ["127.0.0.0/24"]
except = ["127.0.0.3/32"]
ports = [9090]
protocol = "tcp"

[[egress]]
cidrs = ["127.0.0.1", "::1"]
ports = [5353]
protocol = "udp"

[[egress]]
cidrs = ["10.0.0.0/8"]
protocol = "icmp"

[[egress]]
fqdns = ["api.example.com"]
ports = [443]
protocol = "tcp"

[[ingress]]
cidrs = ["192.0.2.0/24"]
ports = [22]
protocol = "tcp"

[quarantine]
allow = ["10.9.9.9/32"]
"#;

const AUDIT: &str = r#"
name = "watch.test.tcp"
mode = "audit"

[[egress]]
cidrs = ["127.0.0.1/32"]
ports = [80]
protocol = "tcp"
"#;

fn compiled() -> Compiled {
    let files = vec![
        (PathBuf::from("web.toml"), WEB.as_bytes().to_vec()),
        (PathBuf::from("watch.toml"), AUDIT.as_bytes().to_vec()),
    ];
    let set = policy::load_files(&files).unwrap_or_else(|e| panic!("{e}"));
    compile_with(&set, &HostPolicy::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn to(spec: &str) -> Flow {
    Flow::parse(Direction::Egress, spec).unwrap_or_else(|e| panic!("{e}"))
}

fn why(seg: &str, flow: Flow) -> Explanation {
    explain(&compiled(), seg, &flow, &State::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn rule_line(d: &Decider) -> usize {
    match d {
        Decider::Rule { rule, .. }
        | Decider::Except { rule, .. }
        | Decider::Learned { rule, .. } => rule.line,
        other => panic!("no rule in {other:?}"),
    }
}

#[test]
fn flow_specs_parse_with_ports_protocols_and_brackets() {
    let f = to("127.0.0.1:8080");
    assert_eq!((f.port, f.protocol), (Some(8080), 6));
    let f = to("[::1]:53/udp");
    assert_eq!(
        (f.peer, f.port, f.protocol),
        ("::1".parse().unwrap(), Some(53), 17)
    );
    let f = to("10.0.0.1/icmp");
    assert_eq!((f.port, f.protocol), (None, 1));
    let f = to("10.0.0.1/gre");
    assert_eq!(f.protocol, 47);
    assert_eq!(to("10.0.0.1/proto-89").protocol, 89);
    // The unspecified address is loopback, as the hooks judge it.
    assert_eq!(
        to("0.0.0.0:80").peer,
        "127.0.0.1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(to("[::]:80").peer, "::1".parse::<IpAddr>().unwrap());
    assert_eq!(
        to("[::ffff:0.0.0.0]:80").peer,
        "127.0.0.1".parse::<IpAddr>().unwrap()
    );
    // A v4-mapped peer is the IPv4 address it carries.
    assert_eq!(
        to("[::ffff:127.0.0.1]:80").peer,
        "127.0.0.1".parse::<IpAddr>().unwrap()
    );
    for (bad, says) in [
        ("127.0.0.1", "needs a port"),
        ("127.0.0.1:0", "not 1-65535"),
        ("127.0.0.1:99999", "not 1-65535"),
        ("10.0.0.1:5/icmp", "has no ports"),
        ("10.0.0.0/8", "reads as a prefix length"),
        ("10.0.0.1/bogus", "unknown protocol"),
        ("example.com:443", "not an IPv4 or IPv6 address"),
        ("[::1:443", "without ']'"),
    ] {
        let e = Flow::parse(Direction::Egress, bad)
            .expect_err(bad)
            .to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn an_allowed_flow_names_its_rule_and_prefix() {
    let e = why("web.test.tcp", to("127.0.0.1:8050"));
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(rule_line(&e.decided_by), 4);
    match &e.decided_by {
        Decider::Rule { rule, prefix } => {
            assert_eq!(prefix, "127.0.0.1/32");
            assert_eq!(rule.allows, "tcp/8000-8100,8080");
            assert_eq!(rule.file, "web.toml");
        }
        other => panic!("{other:?}"),
    }
    // Overlap: 127.0.0.1 is in both tcp rules; 9090 is the /24 rule's.
    let e = why("web.test.tcp", to("127.0.0.1:9090"));
    assert_eq!((e.verdict, rule_line(&e.decided_by)), (Verdict::Allow, 9));
    assert_eq!(
        why("web.test.tcp", to("[::1]:5353/udp")).verdict,
        Verdict::Allow
    );
    assert_eq!(
        why("web.test.tcp", to("10.1.2.3/icmp")).verdict,
        Verdict::Allow
    );
    assert!(e.nearest.is_empty());
}

#[test]
fn a_refused_port_points_at_the_rule_holding_the_peer() {
    let e = why("web.test.tcp", to("127.0.0.1:8101"));
    assert_eq!(
        (e.verdict, &e.decided_by),
        (Verdict::Deny, &Decider::DefaultDeny)
    );
    // No rule allows tcp/8101 anywhere: only the rules holding the peer are near.
    assert_eq!(e.nearest.len(), 1, "{:?}", e.nearest);
    assert_eq!(e.nearest[0].differs, "protocol or port");
    assert_eq!(e.nearest[0].rule.line, 4);
    // UDP to a TCP-only port: the same.
    let e = why("web.test.tcp", to("127.0.0.1:8080/udp"));
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.nearest.len(), 1, "{:?}", e.nearest);
    assert_eq!(e.nearest[0].differs, "protocol or port");
}

#[test]
fn a_refused_address_points_at_the_nearest_prefix_allowing_the_port() {
    let e = why("web.test.tcp", to("127.0.0.2:8080"));
    assert_eq!(e.verdict, Verdict::Deny);
    let n = &e.nearest[0];
    assert_eq!(
        (n.differs.as_str(), n.prefix.as_str()),
        ("address", "127.0.0.1/32")
    );
    assert_eq!(n.rule.line, 4);
    // The /24 rule holds 127.0.0.2, on 9090.
    assert_eq!(
        (e.nearest[1].differs.as_str(), e.nearest[1].rule.line),
        ("protocol or port", 9)
    );
    let e = why("web.test.tcp", to("[fd00:a5::2]:8080"));
    assert_eq!(e.nearest[0].prefix, "fd00:a5::1/128");
}

#[test]
fn an_except_is_named_as_what_refuses() {
    let e = why("web.test.tcp", to("127.0.0.3:9090"));
    assert_eq!(e.verdict, Verdict::Deny);
    match &e.decided_by {
        Decider::Except { rule, prefix } => {
            assert_eq!(rule.line, 9);
            assert_eq!(prefix, "127.0.0.3/32");
        }
        other => panic!("{other:?}"),
    }
    // Its neighbour is allowed by the same rule.
    assert_eq!(
        why("web.test.tcp", to("127.0.0.4:9090")).verdict,
        Verdict::Allow
    );
}

#[test]
fn audit_mode_lets_refusals_through_and_says_so() {
    let e = why("watch.test.tcp", to("127.0.0.1:81"));
    assert_eq!(e.verdict, Verdict::Audit);
    assert_eq!(e.mode, "audit");
    assert_eq!(
        why("watch.test.tcp", to("127.0.0.1:80")).verdict,
        Verdict::Allow
    );
    let quarantined = State {
        quarantine: Some("operator".to_owned()),
        ..State::default()
    };
    // A quarantine refuses even in audit mode.
    let e = explain(
        &compiled(),
        "watch.test.tcp",
        &to("127.0.0.1:80"),
        &quarantined,
    )
    .unwrap();
    assert_eq!(e.verdict, Verdict::Deny);
}

#[test]
fn quarantine_keeps_only_its_allow_list() {
    let q = State {
        quarantine: Some("deny_rate".to_owned()),
        ..State::default()
    };
    let c = compiled();
    let e = explain(&c, "web.test.tcp", &to("127.0.0.1:8080"), &q).unwrap();
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(matches!(
        &e.decided_by,
        Decider::Quarantine { rule: None, .. }
    ));
    let e = explain(&c, "web.test.tcp", &to("10.9.9.9:1234/udp"), &q).unwrap();
    assert_eq!(e.verdict, Verdict::Allow);
    assert!(matches!(
        &e.decided_by,
        Decider::Quarantine { rule: Some(_), .. }
    ));
}

#[test]
fn port_53_goes_to_the_resolver_when_it_is_on() {
    let on = State {
        dns_port: Some(5399),
        ..State::default()
    };
    let c = compiled();
    let e = explain(&c, "web.test.tcp", &to("192.0.2.53:53/udp"), &on).unwrap();
    assert_eq!(
        (e.verdict, &e.decided_by),
        (Verdict::Allow, &Decider::Resolver { port: 5399 })
    );
    // Without the resolver, port 53 is a port like any other.
    assert_eq!(
        why("web.test.tcp", to("192.0.2.53:53/udp")).verdict,
        Verdict::Deny
    );
}

#[test]
fn learned_addresses_allow_through_their_fqdns_rule_until_they_expire() {
    let c = compiled();
    let seg = c
        .segments
        .iter()
        .find(|s| s.name == "web.test.tcp")
        .unwrap();
    let rs = &c.rulesets[seg.fqdns[0].ruleset_id as usize];
    let mut value = LearnedValue::default();
    value.slots[0].rule = rs.rules[0];
    value.slots[0].expires_ns = 1_000;
    let live = State {
        learned: Some((value, vec!["api.example.com".to_owned()], 500)),
        ..State::default()
    };
    let e = explain(&c, "web.test.tcp", &to("203.0.113.7:443"), &live).unwrap();
    assert_eq!(e.verdict, Verdict::Allow);
    assert!(
        matches!(&e.decided_by, Decider::Learned { names, .. } if names == &["api.example.com"])
    );
    // Another port of the same address: refused, and the learned name is mentioned.
    let e = explain(&c, "web.test.tcp", &to("203.0.113.7:80"), &live).unwrap();
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(
        e.notes.iter().any(|n| n.contains("api.example.com")),
        "{:?}",
        e.notes
    );
    let expired = State {
        learned: Some((value, vec!["api.example.com".to_owned()], 2_000)),
        ..State::default()
    };
    let e = explain(&c, "web.test.tcp", &to("203.0.113.7:443"), &expired).unwrap();
    assert_eq!(e.verdict, Verdict::Deny);
    // Offline, the fqdns rule is named as what could allow it.
    let e = why("web.test.tcp", to("203.0.113.7:443"));
    assert!(e.notes.iter().any(|n| n.contains("fqdns")), "{:?}", e.notes);
}

#[test]
fn ingress_is_judged_by_the_peer_and_the_members_port() {
    let from = |s: &str| Flow::parse(Direction::Ingress, s).unwrap();
    assert_eq!(
        why("web.test.tcp", from("192.0.2.9:22")).verdict,
        Verdict::Allow
    );
    let e = why("web.test.tcp", from("192.0.2.9:23"));
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.nearest[0].differs, "protocol or port");
    // The egress rules do not open inbound flows.
    assert_eq!(
        why("web.test.tcp", from("127.0.0.1:8080")).verdict,
        Verdict::Deny
    );
    assert!(
        !why("web.test.tcp", from("198.51.100.1:5000/udp"))
            .notes
            .is_empty()
    );
}

#[test]
fn unknown_segments_are_named_with_the_known_ones() {
    let e = explain(&compiled(), "nope", &to("127.0.0.1:80"), &State::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no segment named \"nope\" (segments: watch.test.tcp, web.test.tcp)"
    );
}

#[test]
fn the_text_and_json_forms_carry_the_decision() {
    let e = why("web.test.tcp", to("127.0.0.3:9090"));
    let text = e.to_string();
    assert!(text.contains("verdict: deny"), "{text}");
    assert!(text.contains("except carves out 127.0.0.3/32"), "{text}");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["verdict"], "deny");
    assert_eq!(json["decided_by"]["kind"], "except");
    assert_eq!(json["decided_by"]["rule"]["line"], 9);
    let back: Explanation = serde_json::from_value(json).unwrap();
    assert_eq!(back, e);
}
