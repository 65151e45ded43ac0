use serde_json::{Value, json};

use super::report::fmt_ts;
use super::*;

fn deny(
    kind: &str,
    ts: u64,
    seg: &str,
    agent: Option<&str>,
    dir: &str,
    peer: (&str, u16),
) -> Value {
    let (src, dst) = if dir == "ingress" {
        (peer.0, "10.0.0.1")
    } else {
        ("10.0.0.1", peer.0)
    };
    json!({"kind": kind, "ts_ms": ts, "segment": seg, "agent_id": agent, "cgroup": "/a",
           "pid": 1, "comm": "python", "hook": "connect4", "direction": dir, "protocol": "tcp",
           "src": src, "sport": 40000, "dst": dst, "dport": peer.1, "rule": "default"})
}

fn rule(id: u32, segment: &str, hits: u64) -> RuleHits {
    RuleHits {
        id,
        segment: segment.into(),
        direction: "egress".into(),
        origin: format!("{segment}.toml:{id}"),
        hits,
    }
}

fn sample() -> Vec<Value> {
    vec![
        deny("deny", 50, "web", Some("a1"), "egress", ("1.1.1.1", 443)), // before window
        deny("deny", 100, "web", Some("a1"), "egress", ("1.1.1.1", 443)),
        deny("deny", 101, "web", Some("a1"), "egress", ("1.1.1.1", 443)),
        deny(
            "audit_deny",
            102,
            "web",
            Some("a2"),
            "egress",
            ("2.2.2.2", 80),
        ),
        deny("deny", 103, "web", None, "egress", ("2001:db8::1", 53)),
        deny("deny", 104, "web", Some("a2"), "ingress", ("9.9.9.9", 22)),
        deny(
            "audit_deny",
            105,
            "db",
            Some("b1"),
            "egress",
            ("3.3.3.3", 5432),
        ),
        json!({"kind": "quarantine", "ts_ms": 10, "target": {"agent": "old"}, "reason": "x",
               "by": "cli", "by_uid": 0, "until_unix": null}),
        json!({"kind": "quarantine", "ts_ms": 106, "target": {"agent": "a1"}, "reason": "exfil",
               "by": "cli", "by_uid": 0, "until_unix": null}),
        json!({"kind": "detector", "ts_ms": 107, "detector": "scan", "segment": "web",
               "agent_id": "a2", "action": "quarantine", "reason": "port scan"}),
        json!({"kind": "release", "ts_ms": 108, "target": {"segment": "web"}, "reason": "ok",
               "by": "cli", "by_uid": null, "until_unix": null}),
        json!({"kind": "lost", "ts_ms": 109, "count": 7}),
        json!({"kind": "lost", "ts_ms": 1, "count": 100}),
        json!({"kind": "lost", "ts_ms": 110, "count": 3}),
        json!({"kind": "policy", "ts_ms": 111, "segments": 2}),
        json!({"kind": "something_new", "ts_ms": 112}),
    ]
}

#[test]
fn counts_peers_window_and_quarantines() {
    let rules = vec![rule(2, "web", 0), rule(1, "web", 5), rule(1, "db", 0)];
    let r = report(sample(), 100, rules, 2);
    assert_eq!(r.since_ms, 100);
    let names: Vec<&str> = r.segments.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db", "web"]);
    let web = &r.segments[1];
    assert_eq!((web.denied, web.audit_denied), (4, 1));
    // 1.1.1.1 twice; then ties broken by peer ascending, truncated to `top`.
    assert_eq!(
        web.top_denied_peers,
        vec![
            ("1.1.1.1:443".to_string(), 2),
            ("2.2.2.2:80".to_string(), 1)
        ]
    );
    let agents: Vec<(&str, u64, u64)> = (web.agents.iter())
        .map(|a| (a.agent_id.as_str(), a.denied, a.audit_denied))
        .collect();
    assert_eq!(agents, [("a1", 2, 0), ("a2", 1, 1)]);
    // Ingress peer is the source address.
    assert_eq!(
        web.agents[1].top_denied_peers,
        vec![("2.2.2.2:80".to_string(), 1), ("9.9.9.9".to_string(), 1)]
    );
    let rule_keys: Vec<(&str, u32)> = r.rules.iter().map(|r| (r.segment.as_str(), r.id)).collect();
    assert_eq!(rule_keys, [("db", 1), ("web", 1), ("web", 2)]);
    assert_eq!(r.unused_rules, vec![rule(1, "db", 0), rule(2, "web", 0)]);
    let kinds: Vec<&str> = r
        .quarantines
        .iter()
        .map(|q| q["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["quarantine", "detector", "release"]);
    assert_eq!(r.events_lost, 10);
    serde_json::to_string(&r).unwrap();
}

#[test]
fn ipv6_peer_bracketed_and_top_zero() {
    let r = report(sample(), 0, vec![], 10);
    let web = &r.segments[1];
    assert!(
        web.top_denied_peers
            .contains(&("[2001:db8::1]:53".to_string(), 1))
    );
    assert_eq!(web.denied, 5);
    assert_eq!(r.events_lost, 110);
    let r = report(sample(), 0, vec![], 0);
    assert!(r.segments.iter().all(|s| s.top_denied_peers.is_empty()));
}

#[test]
fn hostile_shapes_do_not_panic() {
    let junk = vec![
        json!(null),
        json!([1, 2]),
        json!({"kind": 5}),
        json!({"kind": "deny"}),
        json!({"kind": "deny", "ts_ms": "soon", "segment": ["x"], "dport": -1}),
        json!({"kind": "lost", "count": u64::MAX}),
        json!({"kind": "lost", "count": 5}),
        json!({"kind": "quarantine", "target": "weird", "reason": {"a": [1]}, "until_unix": 1.5}),
        json!({"kind": "deny", "segment": "s\u{1b}[31m", "agent_id": "a\u{202e}b", "dst": "x"}),
    ];
    let r = report(junk, 0, vec![rule(1, "s\u{7}", 0)], 3);
    assert_eq!(r.events_lost, u64::MAX);
    let unknown = r.segments.iter().find(|s| s.name == "(unknown)").unwrap();
    assert_eq!(unknown.denied, 2);
    assert_eq!(unknown.top_denied_peers, vec![("?:?".to_string(), 2)]);
    let text = r.to_text();
    assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}') && !text.contains('\u{7}'));
    assert!(text.contains("s\\u{1b}[31m"), "{text}");
}

#[test]
fn text_has_all_sections() {
    let r = report(sample(), 100, vec![rule(1, "web", 5), rule(2, "web", 0)], 3);
    let text = r.to_text();
    for needle in [
        "Audit report since 1970-01-01T00:00:00.100Z",
        "SEGMENT",
        "web",
        "1.1.1.1:443 (2)",
        "a2",
        "web.toml:2",
        "Unused rules",
        "agent:a1",
        "segment:web",
        "port scan",
        "Events lost (ring buffer overflow): 10",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn timestamps() {
    assert_eq!(fmt_ts(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(fmt_ts(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    assert_eq!(fmt_ts(951_782_400_000), "2000-02-29T00:00:00.000Z");
    fmt_ts(u64::MAX);
}

#[test]
fn report_from_log_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path, 700, 20).unwrap();
    for rec in sample() {
        log.append(rec).unwrap();
    }
    drop(log);
    let records = read_records(&path).filter_map(Result::ok);
    let r = report(records, 100, vec![], 5);
    assert_eq!(r.segments[1].denied, 4);
    assert_eq!(r.events_lost, 10);
}
