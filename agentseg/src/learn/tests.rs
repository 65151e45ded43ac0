use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::policy;

fn rec(kind: &str, dst: &str, dport: u16, protocol: &str, ts: u64) -> Value {
    json!({"segment": "bot.test.learn", "kind": kind, "direction": "egress", "hook": "connect4",
           "dst": dst, "src": "0.0.0.0", "dport": dport, "protocol": protocol, "count": 1,
           "ts_ms": ts})
}

fn seen() -> Seen {
    let mut records = vec![
        rec("audit_deny", "10.0.0.5", 443, "tcp", 1_000),
        rec("audit_deny", "10.0.0.5", 443, "tcp", 5_000),
        rec("audit_deny", "10.0.0.6", 443, "tcp", 2_000),
        rec("audit_deny", "10.0.0.5", 8443, "tcp", 3_000),
        rec("allow", "::1", 9090, "tcp", 3_000),
        rec("audit_deny", "10.0.7.1", 53, "udp", 3_000),
        rec("audit_deny", "10.0.7.1", 54, "udp", 3_000),
        rec("audit_deny", "10.9.9.9", 0, "icmp", 3_000),
        rec("audit_deny", "169.254.169.254", 80, "tcp", 4_000),
        rec("audit_deny", "169.254.1.1", 80, "tcp", 4_000),
        rec("audit_deny", "fd00:ec2::254", 80, "tcp", 4_000),
        rec("audit_deny", "::ffff:10.0.0.6", 443, "tcp", 6_000),
        // Refused in enforce mode: not something the members were let do.
        rec("deny", "10.66.0.1", 443, "tcp", 3_000),
        // Another segment.
        json!({"segment": "other.test.x", "kind": "audit_deny", "direction": "egress",
               "dst": "10.1.1.1", "dport": 1, "protocol": "tcp", "ts_ms": 3_000}),
        // Before --since.
        rec("audit_deny", "10.77.0.1", 443, "tcp", 10),
    ];
    let mut named = rec("audit_deny", "203.0.113.7", 443, "tcp", 3_000);
    named["domain"] = json!("api.example.com");
    records.push(named);
    records.push(
        json!({"segment": "bot.test.learn", "kind": "audit_deny", "hook": "dns",
                        "query": "Other.Example.org.", "protocol": "udp", "ts_ms": 3_000}),
    );
    records.push(
        json!({"segment": "bot.test.learn", "kind": "audit_deny", "hook": "connect_unix",
                        "protocol": "unix", "path": "/run/x.sock", "ts_ms": 3_000}),
    );
    records.push(
        json!({"segment": "bot.test.learn", "kind": "audit_deny", "direction": "ingress",
                        "hook": "skb_ingress", "src": "192.0.2.9", "dst": "127.0.0.1",
                        "dport": 22, "protocol": "tcp", "ts_ms": 3_000}),
    );
    read(records.into_iter(), "bot.test.learn", 100)
}

#[test]
fn flows_are_read_for_the_segment_and_window_only() {
    let s = seen();
    assert_eq!(s.flows.len(), 14, "{:#?}", s.flows);
    assert!(
        s.flows.iter().all(|f| f.peer.to_string() != "10.66.0.1"),
        "a deny is not proposed"
    );
    assert!(
        s.flows.iter().all(|f| f.peer.to_string() != "10.77.0.1"),
        "before --since"
    );
    assert_eq!(s.names.get("other.example.org"), Some(&1));
    assert!(s.unix.contains("/run/x.sock"));
    let icmp = s.flows.iter().find(|f| f.protocol == "icmp").unwrap();
    assert_eq!(icmp.port, None);
}

#[test]
fn peers_group_by_ports_and_protocol_and_hits_are_kept() {
    let p = propose(&seen(), Aggregate::default());
    let text: Vec<String> = p
        .rules
        .iter()
        .map(|r| {
            let peers: Vec<String> = r.peers.iter().map(|(p, _)| p.to_string()).collect();
            let ports: Vec<String> = r
                .ports
                .iter()
                .map(|x| format!("{}-{}", x.lo, x.hi))
                .collect();
            format!(
                "{:?} {} [{}] {}",
                r.way,
                r.protocol,
                ports.join(","),
                peers.join(",")
            )
        })
        .collect();
    assert_eq!(
        text,
        [
            "Egress icmp [] 10.9.9.9/32",
            "Egress tcp [443-443] 10.0.0.6/32,api.example.com",
            "Egress tcp [443-443,8443-8443] 10.0.0.5/32",
            "Egress tcp [9090-9090] ::1/128",
            "Egress udp [53-54] 10.0.7.1/32",
            "Ingress tcp [22-22] 192.0.2.9/32",
        ]
    );
    let five = &p.rules[2].peers[0].1;
    assert_eq!((five.hits, five.first_ms, five.last_ms), (3, 1_000, 5_000));
    // The v4-mapped record is the IPv4 peer's.
    assert_eq!(p.rules[1].peers[0].1.hits, 2);
    let left: Vec<String> = p
        .left_out
        .iter()
        .map(|l| format!("{} {}", l.peer, l.why))
        .collect();
    assert_eq!(
        left,
        [
            "169.254.1.1 link-local",
            "169.254.169.254 cloud metadata address",
            "fd00:ec2::254 cloud metadata address"
        ]
    );
    assert_eq!(p.names_without_flows, ["other.example.org"]);
}

#[test]
fn the_proposal_is_a_segment_file_check_accepts() {
    let p = propose(&seen(), Aggregate::default());
    let members = crate::policy::Members {
        cgroups: vec!["agents/bot".into()],
        units: vec![],
    };
    let text = to_toml(
        &p,
        &Origin {
            segment: "bot.test.learn",
            log: "/var/log/agentseg/audit.jsonl",
            since: Some("1h"),
            members: Some(&members),
        },
    );
    let set = policy::load_files(&[(PathBuf::from("learned.toml"), text.clone().into_bytes())])
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let seg = &set.segments[0];
    assert_eq!(seg.name.as_ref(), "bot.test.learn");
    assert_eq!(seg.mode, policy::Mode::Enforce);
    assert_eq!(seg.members.cgroups, ["agents/bot"]);
    assert_eq!(seg.egress.len(), 5);
    assert_eq!(seg.ingress.len(), 1);
    assert!(text.contains("# 10.0.0.5/32: 3 hit(s), first seen 1970-01-01T00:00:01Z, last seen 1970-01-01T00:00:05Z"), "{text}");
    assert!(
        text.contains("#   169.254.169.254 (cloud metadata address): 1 hit(s)"),
        "{text}"
    );
    assert!(text.contains("fqdns = [\"api.example.com\"]"), "{text}");
    assert!(!text.contains("169.254.169.254/32"), "{text}");
    assert!(!text.contains('*'), "no wildcard: {text}");
}

#[test]
fn aggregation_is_asked_for_and_bounded() {
    let p = propose(&seen(), Aggregate::parse(Some("/24"), Some("/64")).unwrap());
    let peers: Vec<String> = p
        .rules
        .iter()
        .flat_map(|r| r.peers.iter().map(|(p, _)| p.to_string()))
        .collect();
    assert!(peers.contains(&"10.0.0.0/24".to_owned()), "{peers:?}");
    assert!(peers.contains(&"::/64".to_owned()), "{peers:?}");
    for (v4, v6, says) in [
        (Some("/16"), None, "between /17 and /32"),
        (Some("/8"), None, "between /17 and /32"),
        (None, Some("/32"), "between /48 and /128"),
        (Some("24"), Some("x"), "expected a prefix length"),
    ] {
        let e = Aggregate::parse(v4, v6).unwrap_err();
        assert!(e.contains(says), "{v4:?} {v6:?}: {e}");
    }
}

#[test]
fn link_local_and_metadata_are_never_proposed() {
    for a in [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fd00:ec2::254",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
    ] {
        assert!(refused(a.parse().unwrap()).is_some(), "{a}");
    }
    for a in [
        "10.0.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "2001:db8::1",
        "fd00:ec2::253",
    ] {
        assert!(refused(a.parse().unwrap()).is_none(), "{a}");
    }
}
