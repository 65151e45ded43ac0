use std::{collections::BTreeMap, path::PathBuf};

use super::*;
use crate::compile::{HostPolicy, compile_with};
use crate::policy;

const PROD: &str = r#"
name = "web.prod.tcp"

[[egress]]
cidrs = ["10.0.0.0/8"]
except = ["10.99.0.0/16"]
ports = [443]
protocol = "tcp"

[[egress]]
cidrs = ["10.99.3.0/24"]
ports = ["8000-8100"]
protocol = "tcp"

[[egress]]
cidrs = ["192.0.2.10"]
ports = [22]
protocol = "tcp"

[quarantine]
allow = ["10.99.7.7"]
"#;

const STAGING: &str = r#"
name = "web.staging.tcp"

[[egress]]
cidrs = ["@prod"]
ports = [5432]
protocol = "tcp"

[[egress]]
cidrs = ["0.0.0.0/0"]
except = ["10.0.0.0/8"]
ports = [22]
protocol = "tcp"
"#;

const CLEAN: &str = r#"
name = "docs.prod.tcp"

[[egress]]
cidrs = ["10.1.0.0/16"]
ports = [443]
protocol = "tcp"
"#;

const AUDIT: &str = r#"
name = "new.prod.tcp"
mode = "audit"

[[egress]]
cidrs = ["10.1.0.0/16"]
ports = [443]
protocol = "tcp"
"#;

const GROUPS: &str = r#"
[peers.prod]
cidrs = ["10.50.0.0/16", "2001:db8:50::/48"]
"#;

fn policy(files: &[(&str, &str)]) -> (Compiled, BTreeMap<String, Vec<IpNet>>) {
    let files: Vec<(PathBuf, Vec<u8>)> = files
        .iter()
        .map(|(n, t)| (PathBuf::from(n), t.as_bytes().to_vec()))
        .collect();
    let set = policy::load_files(&files).unwrap_or_else(|e| panic!("{e}"));
    let compiled = compile_with(&set, &HostPolicy::default()).unwrap_or_else(|e| panic!("{e}"));
    (compiled, set.peers)
}

fn ceilings(text: &str, groups: &BTreeMap<String, Vec<IpNet>>) -> Vec<Forbid> {
    ceiling::parse(std::path::Path::new("ceiling.toml"), text, groups)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn all() -> (Compiled, BTreeMap<String, Vec<IpNet>>) {
    policy(&[
        ("prod.toml", PROD),
        ("staging.toml", STAGING),
        ("clean.toml", CLEAN),
        ("audit.toml", AUDIT),
        ("groups.toml", GROUPS),
    ])
}

#[test]
fn a_planted_violation_is_found_with_a_witness_the_kernel_would_allow() {
    let (c, groups) = all();
    let f = ceilings(
        r#"
[[forbid]]
segments = ["web.prod.*"]
peers = ["10.99.0.0/16"]
reason = "prod never reaches the backup network"
"#,
        &groups,
    );
    let r = prove(&c, &f);
    // The /8 rule's except keeps 10.99/16 out; the /24 rule and the quarantine list do not.
    let rule: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.kind == Kind::Rule)
        .collect();
    assert_eq!(rule.len(), 1, "{r:#?}");
    let v = rule[0];
    assert_eq!(v.segment, "web.prod.tcp");
    assert_eq!(v.rule.as_ref().unwrap().line, 10);
    assert_eq!(v.witness.to_string(), "10.99.3.0:8000/tcp");
    assert_eq!(
        (v.ceiling.line, v.ceiling.reason.as_str()),
        (2, "prod never reaches the backup network")
    );
    let q: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.kind == Kind::Quarantine)
        .collect();
    assert_eq!(q.len(), 1, "{r:#?}");
    assert_eq!(q[0].witness.peer.to_string(), "10.99.7.7");
    // The witness is what explain (the kernel's lookup) allows.
    let flow =
        crate::explain::Flow::parse(crate::explain::Direction::Egress, &v.witness.to_string())
            .unwrap();
    let e = crate::explain::explain(&c, "web.prod.tcp", &flow, &Default::default()).unwrap();
    assert_eq!(e.verdict, crate::explain::Verdict::Allow);
}

#[test]
fn a_clean_directory_passes_and_excepts_are_honoured() {
    let (c, groups) = all();
    // The /8 rule allows 443 everywhere in 10/8 but 10.99/16: no violation on 443 there.
    let f = ceilings(
        r#"
[[forbid]]
segments = ["*.prod.*"]
peers = ["10.99.0.0/16"]
ports = [443]
"#,
        &groups,
    );
    let r = prove(&c, &f);
    let kinds: Vec<_> = r
        .violations
        .iter()
        .map(|v| (v.segment.as_str(), v.kind))
        .collect();
    // Only the quarantine list (every port) and the audit-mode segment break it.
    assert_eq!(
        kinds,
        [
            ("new.prod.tcp", Kind::Audit),
            ("web.prod.tcp", Kind::Quarantine)
        ],
        "{r:#?}"
    );
    let only_clean = ceilings(
        "[[forbid]]\nsegments = [\"docs.prod.tcp\"]\npeers = [\"10.99.0.0/16\", \"::/0\"]\n",
        &groups,
    );
    let r = prove(&c, &only_clean);
    assert!(r.violations.is_empty(), "{r:#?}");
}

#[test]
fn groups_ports_and_protocols_narrow_the_ceiling() {
    let (c, groups) = all();
    let f = ceilings(
        r#"
[[forbid]]
segments = ["*.staging.*"]
peers = ["@prod"]
"#,
        &groups,
    );
    let r = prove(&c, &f);
    assert_eq!(r.violations.len(), 1, "{r:#?}");
    assert_eq!(r.violations[0].witness.to_string(), "10.50.0.0:5432/tcp");
    // UDP only: the TCP rules do not break it.
    let f = ceilings(
        "[[forbid]]\nsegments = [\"*.staging.*\"]\npeers = [\"@prod\"]\nprotocol = \"udp\"\n",
        &groups,
    );
    assert!(prove(&c, &f).violations.is_empty());
    // Ports outside the rule's: none.
    let f = ceilings(
        "[[forbid]]\nsegments = [\"*.staging.*\"]\npeers = [\"@prod\"]\nports = [\"1-5431\", \"5433-65535\"]\n",
        &groups,
    );
    assert!(prove(&c, &f).violations.is_empty());
}

#[test]
fn reach_all_flags_only_segments_opening_a_whole_prefix() {
    let (c, groups) = all();
    let f = ceilings(
        r#"
[[forbid]]
segments = ["*"]
peers = ["0.0.0.0/0"]
ports = [22]
protocol = "tcp"
reach = "all"
"#,
        &groups,
    );
    // staging allows 22 to 0/0 but not to 10/8 (except): not the whole of 0/0. The audit
    // segment lets everything through.
    let r = prove(&c, &f);
    let segs: Vec<_> = r.violations.iter().map(|v| v.segment.as_str()).collect();
    assert_eq!(segs, ["new.prod.tcp"], "{r:#?}");
    // The same ceiling with reach = "any" flags both 22 rules.
    let f = ceilings(
        "[[forbid]]\nsegments = [\"*\"]\npeers = [\"0.0.0.0/0\"]\nports = [22]\nprotocol = \"tcp\"\n",
        &groups,
    );
    let r = prove(&c, &f);
    let mut segs: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.kind == Kind::Rule)
        .map(|v| v.segment.as_str())
        .collect();
    segs.sort();
    assert_eq!(segs, ["web.prod.tcp", "web.staging.tcp"], "{r:#?}");
    // A prefix the rule opens whole: 192.0.2.0/25 is not, 11.0.0.0/8 is (staging's 0/0).
    let f = ceilings(
        "[[forbid]]\nsegments = [\"web.staging.tcp\"]\npeers = [\"11.0.0.0/8\"]\nports = [22]\nreach = \"all\"\n",
        &groups,
    );
    let r = prove(&c, &f);
    assert_eq!(r.violations.len(), 1, "{r:#?}");
    assert_eq!(r.violations[0].witness.to_string(), "11.0.0.0:22/tcp");
}

#[test]
fn ingress_ceilings_read_the_ingress_tables() {
    let (c, groups) = policy(&[(
        "in.toml",
        "name = \"db.prod.in\"\n[[ingress]]\ncidrs = [\"10.20.0.0/16\"]\nports = [5432]\nprotocol = \"tcp\"\n",
    )]);
    let f = ceilings(
        "[[forbid]]\nsegments = [\"db.prod.in\"]\npeers = [\"10.20.30.0/24\"]\ndirection = \"ingress\"\n",
        &groups,
    );
    let r = prove(&c, &f);
    assert_eq!(r.violations.len(), 1, "{r:#?}");
    assert_eq!(r.violations[0].direction, Way::Ingress);
    let egress = ceilings(
        "[[forbid]]\nsegments = [\"db.prod.in\"]\npeers = [\"10.20.30.0/24\"]\n",
        &groups,
    );
    assert!(prove(&c, &egress).violations.is_empty());
}

#[test]
fn many_prefixes_of_one_rule_make_one_violation_with_a_count() {
    let cidrs: Vec<String> = (0..200).map(|i| format!("\"10.99.{i}.1\"")).collect();
    let text = format!(
        "name = \"big.prod.tcp\"\n[[egress]]\ncidrs = [{}]\nports = [443]\nprotocol = \"tcp\"\n",
        cidrs.join(", ")
    );
    let (c, groups) = policy(&[("big.toml", &text)]);
    let f = ceilings(
        "[[forbid]]\nsegments = [\"*\"]\npeers = [\"10.99.0.0/16\"]\n",
        &groups,
    );
    let r = prove(&c, &f);
    assert_eq!(r.violations.len(), 1, "{r:#?}");
    assert_eq!(r.violations[0].more_prefixes, 199);
}

#[test]
fn fqdns_rules_and_unmatched_ceilings_are_noted() {
    let (c, groups) = policy(&[(
        "f.toml",
        "name = \"api.prod.tcp\"\n[[egress]]\nfqdns = [\"api.example.com\"]\nports = [443]\nprotocol = \"tcp\"\n",
    )]);
    let f = ceilings(
        "[[forbid]]\nsegments = [\"api.*\"]\npeers = [\"0.0.0.0/0\"]\n\n[[forbid]]\nsegments = [\"nothing.*\"]\npeers = [\"10.0.0.0/8\"]\n",
        &groups,
    );
    let r = prove(&c, &f);
    assert!(r.violations.is_empty(), "{r:#?}");
    assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
    assert!(
        r.notes[0].contains("fqdns \"api.example.com\""),
        "{:?}",
        r.notes
    );
    assert!(r.notes[1].contains("no segment matches"), "{:?}", r.notes);
}

#[test]
fn ceiling_errors_name_file_line_and_column() {
    let groups = BTreeMap::new();
    let err = |text: &str| {
        ceiling::parse(std::path::Path::new("c.toml"), text, &groups)
            .expect_err(text)
            .to_string()
    };
    assert_eq!(
        err("[[forbid]]\nsegments = [\"*\"]\npeers = [\"10.0.0.1/8\"]\n"),
        "c.toml:3:10: host bits set in 10.0.0.1/8; did you mean 10.0.0.0/8?"
    );
    assert!(
        err("[[forbid]]\nsegments = [\"*\"]\npeers = [\"@nope\"]\n")
            .starts_with("c.toml:3:10: unknown peer group @nope")
    );
    assert!(
        err("[[forbid]]\nsegments = [\"*\"]\npeers = [\"10.0.0.0/8\"]\nreach = \"most\"\n")
            .starts_with("c.toml:4:9: reach = \"most\"")
    );
    assert!(
        err("[[forbid]]\nsegments = [\"*\"]\npeers = [\"10.0.0.0/8\"]\nports = [0]\n")
            .starts_with("c.toml:4:10: port 0")
    );
    assert!(err("[[forbid]]\nsegments = [\"*\"]\n").contains("missing field `peers`"));
    assert!(
        err("[[forbid]]\nsegments = [\"*\"]\npeers = [\"10.0.0.0/8\"]\nportz = [1]\n")
            .contains("unknown field `portz`")
    );
    assert!(err("").contains("no [[forbid]] entries"));
}

#[test]
fn globs_match_segment_names() {
    for (p, n, m) in [
        ("*", "a.b.c", true),
        ("*.prod.*", "web.prod.tcp", true),
        ("*.prod.*", "web.staging.tcp", false),
        ("web.*", "web.prod.tcp", true),
        ("*.tcp", "web.prod.tcp", true),
        ("web.prod.tcp", "web.prod.tcp", true),
        ("web.prod", "web.prod.tcp", false),
        ("*prod*", "web.prod.tcp", true),
    ] {
        assert_eq!(glob(p, n), m, "{p} {n}");
    }
}

/// Random nested rules and ceilings, checked against brute force: every address of the
/// forbidden prefix, every protocol and port, through `explain` (the kernel's lookup).
#[test]
fn agrees_with_brute_force_on_random_policies() {
    use crate::explain::{Direction, Flow, State, Verdict, explain};
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let protos: [(u8, &str); 5] = [
        (6, "tcp"),
        (17, "udp"),
        (136, "udplite"),
        (47, "gre"),
        (1, "icmp"),
    ];
    for round in 0..60 {
        let mut text = String::from("name = \"r.prod.x\"\n");
        for _ in 0..5 {
            let len = 20 + (next() % 9) as u8;
            let a = 0x0a00_0000u32 | (next() as u32 & 0x0fff);
            let cidr = ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc();
            let except =
                ipnet::Ipv4Net::new(cidr.network(), (len + 1 + (next() % 3) as u8).min(32))
                    .unwrap();
            let (_, proto) = protos[(next() % 5) as usize];
            let ports = if ["gre", "icmp"].contains(&proto) {
                String::new()
            } else {
                let lo = 1 + next() % 4;
                format!("ports = [\"{lo}-{}\"]\n", lo + next() % 3)
            };
            text.push_str(&format!(
                "[[egress]]\ncidrs = [\"{cidr}\"]\nexcept = [\"{except}\"]\n{ports}protocol = \"{proto}\"\n"
            ));
        }
        let (c, groups) = policy(&[("r.toml", &text)]);
        let plen = 22 + (next() % 7) as u8;
        let pa = 0x0a00_0000u32 | (next() as u32 & 0x0fff);
        let peer = ipnet::Ipv4Net::new(pa.into(), plen).unwrap().trunc();
        let (fproto, fname) = match next() % 3 {
            0 => (None, String::new()),
            1 => (Some(6u8), "protocol = \"tcp\"\n".to_owned()),
            _ => (Some(17u8), "protocol = \"udp\"\n".to_owned()),
        };
        let flo = 1 + next() % 5;
        let fhi = flo + next() % 4;
        for all in [false, true] {
            let reach = if all { "reach = \"all\"\n" } else { "" };
            let ceiling = format!(
                "[[forbid]]\nsegments = [\"*\"]\npeers = [\"{peer}\"]\nports = [\"{flo}-{fhi}\"]\n{fname}{reach}"
            );
            let f = ceilings(&ceiling, &groups);
            let r = prove(&c, &f);
            // Brute force over the forbidden flows (protocols with ports only: the ceiling
            // has ports).
            let mut any = false;
            let mut whole = false;
            for (p, _) in protos.iter().filter(|(p, _)| [6, 17, 136].contains(p)) {
                if fproto.is_some_and(|fp| fp != *p) {
                    continue;
                }
                for port in flo as u16..=fhi as u16 {
                    let mut every = true;
                    for host in peer.hosts().chain([peer.network(), peer.broadcast()]) {
                        let flow = Flow {
                            direction: Direction::Egress,
                            peer: host.into(),
                            port: Some(port),
                            protocol: *p,
                        };
                        let ok = explain(&c, "r.prod.x", &flow, &State::default())
                            .unwrap()
                            .verdict
                            == Verdict::Allow;
                        any |= ok;
                        every &= ok;
                    }
                    whole |= every;
                }
            }
            let want = if all { whole } else { any };
            assert_eq!(
                !r.violations.is_empty(),
                want,
                "round {round} reach all={all}\n{text}\n{ceiling}\n{r:#?}"
            );
            for v in &r.violations {
                let w = &v.witness;
                assert!(IpNet::from(peer).contains(&w.peer), "{w} outside {peer}");
                let flow = Flow {
                    direction: Direction::Egress,
                    peer: w.peer,
                    port: w.port,
                    protocol: w.protocol,
                };
                let e = explain(&c, "r.prod.x", &flow, &State::default()).unwrap();
                assert_eq!(
                    e.verdict,
                    Verdict::Allow,
                    "round {round}: witness {w} is refused\n{text}\n{ceiling}"
                );
                assert_eq!(
                    e.decided_by,
                    crate::explain::Decider::Rule {
                        rule: v.rule.clone().unwrap(),
                        prefix: match &e.decided_by {
                            crate::explain::Decider::Rule { prefix, .. } => prefix.clone(),
                            _ => String::new(),
                        }
                    },
                    "round {round}: the rule named is not the one deciding {w}"
                );
            }
        }
    }
}
