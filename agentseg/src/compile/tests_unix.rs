//! AF_UNIX tables: one entry per key, deny wins, first allow wins, baseline, quarantine,
//! order, rule ids and the text dump.

use std::path::{Path, PathBuf};

use agentseg_common::{RULE_CONTROL_SOCKET, UNIX_ALLOW, UNIX_DENY};

use super::tests_semantics::set;
use super::*;
use crate::policy::UnixPattern;

fn pat(s: &str) -> UnixPattern {
    UnixPattern::parse(s).expect("test pattern")
}

/// (pattern, rule id, verdict) of a table.
fn table(entries: &[UnixEntry]) -> Vec<(String, u32, u32)> {
    entries
        .iter()
        .map(|e| (e.pattern.to_string(), e.rule_id, e.verdict))
        .collect()
}

fn host() -> HostPolicy {
    HostPolicy::new(
        vec![pat("/dev/log"), pat("/run/proxy.sock")],
        Some(Origin {
            file: PathBuf::from("/etc/agentseg/agentseg.toml"),
            line: 12,
        }),
        Path::new("/run/agentseg/agentseg.sock"),
    )
    .expect("host policy")
}

const TEXT: &str = "name = \"a.b.c\"\n\
    [[egress]]\ncidrs = [\"10.0.0.0/8\"]\n\
    [[unix]]\npaths = [\"/run/tools/*\", \"@broker\", \"/run/proxy.sock\"]\n\
    [[unix]]\npaths = [\"/run/proxy.sock\", \"/run/agentseg/agentseg.sock\", \"/run/*\"]\n\
    [quarantine]\nunix = [\"/dev/log\", \"/run/agentseg/*\"]\n";

#[test]
fn one_entry_per_key_deny_wins_first_allow_wins() {
    let c = compile_with(&set(TEXT), &host()).expect("compiles");
    let s = &c.segments[0];
    // Sorted by key bytes: abstract names (leading 0) first, then paths.
    assert_eq!(
        table(&s.unix),
        [
            ("@broker".into(), 1, UNIX_ALLOW),
            ("/dev/log".into(), 3, UNIX_ALLOW),
            ("/run/*".into(), 2, UNIX_ALLOW),
            (
                "/run/agentseg/agentseg.sock".into(),
                RULE_CONTROL_SOCKET,
                UNIX_DENY
            ),
            // The first [[unix]] rule lists it before the second and the baseline do.
            ("/run/proxy.sock".into(), 1, UNIX_ALLOW),
            ("/run/tools/*".into(), 1, UNIX_ALLOW),
            (
                "/var/run/agentseg/agentseg.sock".into(),
                RULE_CONTROL_SOCKET,
                UNIX_DENY
            ),
        ]
    );
    let keys: Vec<Vec<u8>> = s.unix.iter().map(|e| e.pattern.key_bytes()).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    // No baseline in quarantine; the control socket stays refused there.
    assert_eq!(
        table(&s.quarantine_unix),
        [
            ("/dev/log".into(), 4, UNIX_ALLOW),
            ("/run/agentseg/*".into(), 4, UNIX_ALLOW),
            (
                "/run/agentseg/agentseg.sock".into(),
                RULE_CONTROL_SOCKET,
                UNIX_DENY
            ),
            (
                "/var/run/agentseg/agentseg.sock".into(),
                RULE_CONTROL_SOCKET,
                UNIX_DENY
            ),
        ]
    );
    assert_eq!(c.entry_count(), 1);
    assert_eq!(c.unix_entry_count(), 7 + 4);
}

#[test]
fn unix_rule_ids_follow_the_ip_rules_and_name_their_origin() {
    let c = compile_with(&set(TEXT), &host()).expect("compiles");
    let infos: Vec<(u32, Direction, &Path, usize)> = c
        .rules
        .iter()
        .map(|r| (r.id, r.direction, r.file.as_path(), r.line))
        .collect();
    let t = Path::new("t.toml");
    assert_eq!(
        infos,
        [
            (0, Direction::Egress, t, 2),
            (1, Direction::Unix, t, 4),
            (2, Direction::Unix, t, 6),
            (
                3,
                Direction::Unix,
                Path::new("/etc/agentseg/agentseg.toml"),
                12
            ),
            (4, Direction::QuarantineUnix, t, 8),
        ]
    );
    assert_eq!(Direction::QuarantineUnix.to_string(), "quarantine-unix");
}

#[test]
fn baseline_without_origin_uses_each_segment_and_skips_empty_lists() {
    let text = "[[segment]]\nname = \"a.a.a\"\n[[segment]]\nname = \"b.b.b\"\n\
                [[segment.unix]]\npaths = [\"@b\"]\n";
    let host = HostPolicy {
        unix_allow: vec![pat("/dev/log")],
        ..HostPolicy::default()
    };
    let c = compile_with(&set(text), &host).expect("compiles");
    let infos: Vec<(u32, &str, usize)> = c
        .rules
        .iter()
        .map(|r| (r.id, r.segment.as_str(), r.line))
        .collect();
    // One baseline rule per segment, at the segment's own origin.
    assert_eq!(infos, [(0, "a.a.a", 1), (1, "b.b.b", 5), (2, "b.b.b", 3)]);
    assert_eq!(
        table(&c.segments[0].unix),
        [("/dev/log".into(), 0, UNIX_ALLOW)]
    );
    assert!(c.segments[0].quarantine_unix.is_empty());

    // compile() adds no host policy at all.
    let bare = compile(&set(text)).expect("compiles");
    assert!(bare.segments[0].unix.is_empty());
    assert_eq!(
        table(&bare.segments[1].unix),
        [("@b".into(), 0, UNIX_ALLOW)]
    );
}

#[test]
fn host_policy_refuses_the_control_socket_under_both_names() {
    let h = HostPolicy::new(vec![], None, Path::new("/run/agentseg/agentseg.sock")).expect("ok");
    let deny: Vec<String> = h.unix_deny.iter().map(ToString::to_string).collect();
    assert_eq!(
        deny,
        [
            "/run/agentseg/agentseg.sock",
            "/var/run/agentseg/agentseg.sock"
        ]
    );
    let h = HostPolicy::new(vec![], None, Path::new("/srv/ctl.sock")).expect("ok");
    assert_eq!(h.unix_deny, [pat("/srv/ctl.sock")]);
    assert!(HostPolicy::new(vec![], None, Path::new("ctl.sock")).is_err());
}

#[test]
fn to_text_shows_unix_entries_and_numbered_protocols() {
    let text = "name = \"a.b.c\"\n\
        [[egress]]\ncidrs = [\"192.0.2.1\"]\nprotocol = \"udplite\"\nports = [\"5000-5001\"]\n\
        [[egress]]\ncidrs = [\"192.0.2.2\"]\nprotocol = \"gre\"\n\
        [[egress]]\ncidrs = [\"192.0.2.3\"]\nprotocol = 99\n\
        [[unix]]\npaths = [\"/run/agent-proxy/proxy.sock\", \"@broker\"]\n\
        [quarantine]\nunix = [\"/dev/log\"]\n";
    let host = HostPolicy::new(vec![], None, Path::new("/srv/ctl.sock")).expect("ok");
    let c = compile_with(&set(text), &host).expect("compiles");
    assert_eq!(
        c.to_text(),
        "segment 1 a.b.c mode=enforce\n\
         segment 1 egress 192.0.2.1/32 -> ruleset 1\n\
         segment 1 egress 192.0.2.2/32 -> ruleset 2\n\
         segment 1 egress 192.0.2.3/32 -> ruleset 3\n\
         segment 1 unix \"@broker\" -> allow rule 3 (t.toml:12)\n\
         segment 1 unix \"/run/agent-proxy/proxy.sock\" -> allow rule 3 (t.toml:12)\n\
         segment 1 unix \"/srv/ctl.sock\" -> deny (control socket)\n\
         segment 1 quarantine-unix \"/dev/log\" -> allow rule 4 (t.toml:14)\n\
         segment 1 quarantine-unix \"/srv/ctl.sock\" -> deny (control socket)\n\
         ruleset 0 deny\n\
         ruleset 1 udplite 5000-5001 rule 0\n\
         ruleset 2 gre rule 1\n\
         ruleset 3 99 rule 2\n\
         rule 0 a.b.c egress t.toml:2\n\
         rule 1 a.b.c egress t.toml:6\n\
         rule 2 a.b.c egress t.toml:9\n\
         rule 3 a.b.c unix t.toml:12\n\
         rule 4 a.b.c quarantine-unix t.toml:14\n"
    );
}
