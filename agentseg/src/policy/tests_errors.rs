//! Every kind of bad input: exact file, line and column, and a key word of the reason.

use std::path::PathBuf;

use super::*;

/// Loads `files` and asserts the errors are exactly `expected` (file, line, column, word).
#[track_caller]
pub(super) fn check(files: &[(&str, &[u8])], expected: &[(&str, usize, usize, &str)]) {
    let input: Vec<(PathBuf, Vec<u8>)> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_vec()))
        .collect();
    let errs = match load_files(&input) {
        Ok(set) => panic!("expected errors, loaded {set:?}"),
        Err(e) => e,
    };
    let shown = errs.to_string();
    assert_eq!(errs.0.len(), expected.len(), "errors:\n{shown}");
    for (e, (file, line, column, word)) in errs.0.iter().zip(expected) {
        assert_eq!(
            (e.file.to_str().unwrap_or(""), e.line, e.column),
            (*file, *line, *column),
            "{e}"
        );
        assert!(e.message.contains(word), "{e:?} should mention {word:?}");
        assert!(!e.message.contains('\n'), "multi-line message: {e:?}");
    }
}

#[track_caller]
pub(super) fn check_one(text: &str, expected: &[(usize, usize, &str)]) {
    let expected: Vec<_> = expected
        .iter()
        .map(|(l, c, w)| ("s.toml", *l, *c, *w))
        .collect();
    check(&[("s.toml", text.as_bytes())], &expected);
}

#[test]
fn not_utf8_points_at_the_bad_byte() {
    check(
        &[("s.toml", b"name = \"a.b.c\"\n# caf\xff\n")],
        &[("s.toml", 2, 6, "UTF-8")],
    );
}

#[test]
fn toml_syntax_and_type_errors() {
    check_one(
        "name = \"a.b.c\"\ncidrs = [\"x\"\n",
        &[(2, 13, "unclosed array")],
    );
    check_one("name = 5\n", &[(1, 8, "string")]);
}

#[test]
fn unknown_keys_are_named() {
    check_one("name = \"a.b.c\"\nbogus = 1\n", &[(2, 1, "`bogus`")]);
    check_one(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nport = [1]\n",
        &[(4, 1, "`port`")],
    );
    check_one("[members]\ncgroup = []\n", &[(2, 1, "`cgroup`")]);
}

#[test]
fn mixed_forms_missing_name_and_empty_files() {
    check_one(
        "name = \"a.b.c\"\n\n[[segment]]\nname = \"d.e.f\"\n",
        &[(3, 1, "mixed")],
    );
    check_one("[[segment]]\nmode = \"audit\"\n", &[(1, 1, "no `name`")]);
    check_one("mode = \"audit\"\n", &[(1, 8, "no `name`")]);
    check_one("# nothing here\n", &[(1, 1, "no segment")]);
}

#[test]
fn names() {
    check_one("name = \"a.b\"\n", &[(1, 8, "three")]);
    check_one("name = \"a.B.c\"\n", &[(1, 8, "environment")]);
    let long = format!("name = \"a.b.{}\"\n", "x".repeat(33));
    check_one(&long, &[(1, 8, "access")]);
    check(
        &[
            ("a.toml", b"[[segment]]\nname = \"a.b.c\"\n"),
            ("b.toml", b"\nname = \"a.b.c\"\n"),
        ],
        &[("b.toml", 2, 8, "first defined at a.toml:1")],
    );
}

#[test]
fn mode_and_protocol_list_valid_values() {
    check_one(
        "name = \"a.b.c\"\nmode = \"block\"\n",
        &[(2, 8, "\"audit\"")],
    );
    check_one(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.1/8\"]\nprotocol = \"tcpp\"\n",
        &[
            (
                3,
                10,
                "host bits set in 10.0.0.1/8; did you mean 10.0.0.0/8?",
            ),
            (4, 12, "\"udp\""),
        ],
    );
}

#[test]
fn cidrs() {
    check_one(
        "name = \"a.b.c\"\n[[egress]]\n\
         cidrs = [\"10.0.0.300\", \"@nope\", \"fd00::/129\", \"1.2.3.4/x\"]\n",
        &[
            (3, 10, "invalid CIDR"),
            (3, 24, "unknown peer group \"@nope\""),
            (3, 33, "longer than 128"),
            (3, 47, "invalid CIDR"),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n[[egress]]\nports = [80]\n[[ingress]]\ncidrs = []\n",
        &[(2, 1, "no `cidrs`"), (5, 9, "must not be empty")],
    );
}

#[test]
fn excepts() {
    check_one(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\n\
         except = [\"11.0.0.0/16\", \"@g\", \"fd00::/8\", \"10.1.0.0/16\"]\n",
        &[
            (4, 11, "not inside"),
            (4, 26, "only allowed in `cidrs`"),
            (4, 32, "not inside"),
        ],
    );
}

#[test]
fn ports() {
    check_one(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"0.0.0.0/0\"]\n\
         ports = [0, 70000, \"0\", \"9-3\", \"http\", 1.5, \"80-\", \"99999999999999999999\"]\n",
        &[
            (4, 10, "port 0"),
            (4, 13, "out of range"),
            (4, 20, "port 0"),
            (4, 25, "reversed"),
            (4, 32, "invalid port"),
            (4, 40, "integer"),
            (4, 45, "invalid port"),
            (4, 52, "out of range"),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"0.0.0.0/0\"]\nports = []\n\
         [[egress]]\ncidrs = [\"0.0.0.0/0\"]\nprotocol = \"icmp\"\nports = [8]\n",
        &[(4, 9, "must not be empty"), (8, 9, "ICMP has no ports")],
    );
}

#[test]
fn members() {
    check_one(
        "name = \"a.b.c\"\n[members]\n\
         cgroups = [\"/\", \"a/../b\", \"a//b\", \"/ok/x\", \"./c\"]\n\
         units = [\"foo\", \"foo bar.service\", \"x.scope\"]\n",
        &[
            (3, 12, "empty"),
            (3, 17, "\"..\""),
            (3, 27, "empty component"),
            (3, 44, "\".\""),
            (4, 10, ".service"),
            (4, 17, "character"),
        ],
    );
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.members]\ncgroups = [\"x/y\"]\n\
         units = [\"u.service\"]\n[[segment]]\nname = \"d.e.f\"\n[segment.members]\n\
         cgroups = [\"/x/y\"]\nunits = [\"u.service\", \"u.service\"]\n",
        &[
            (9, 12, "member of segment \"a.b.c\" at s.toml:4"),
            (10, 10, "already a member"),
            (10, 23, "already a member"),
        ],
    );
}

#[test]
fn peer_groups() {
    check(
        &[
            (
                "p1.toml",
                b"[peers.Bad]\ncidrs = [\"10.0.0.0/8\"]\n[peers.ok]\ncidrs = []\n\
                  [peers.ok2]\ncidrs = [\"@ok\"]\n[peers.nocidrs]\n",
            ),
            ("p2.toml", b"[peers.ok2]\ncidrs = [\"10.0.0.0/8\"]\n"),
        ],
        &[
            ("p1.toml", 1, 8, "invalid peer group name"),
            ("p1.toml", 4, 9, "must not be empty"),
            ("p1.toml", 6, 10, "cannot reference"),
            ("p1.toml", 7, 1, "no `cidrs`"),
            (
                "p2.toml",
                1,
                8,
                "duplicate peer group \"ok2\"; first defined at p1.toml:5",
            ),
        ],
    );
}

#[test]
fn every_error_in_a_directory_is_reported() {
    check(
        &[
            ("1.toml", b"\xfe"),
            ("2.toml", b"name = \"a.b.c\"\n[[egress]\n"),
            (
                "3.toml",
                b"name = \"a.b\"\nmode = \"x\"\n[[egress]]\ncidrs = [\"@missing\"]\n",
            ),
            ("4.toml", b"[peers.p]\ncidrs = [\"10.0.0.1/31\"]\n"),
        ],
        &[
            ("1.toml", 1, 1, "UTF-8"),
            ("2.toml", 2, 10, ""),
            ("3.toml", 1, 8, "three"),
            ("3.toml", 2, 8, "mode"),
            ("3.toml", 4, 10, "unknown peer group"),
            ("4.toml", 2, 10, "host bits"),
        ],
    );
}

#[test]
fn column_counts_characters_not_bytes() {
    check_one("description = \"é\"; name = 1\n", &[(1, 18, "")]);
    check_one(
        "description = \"é\"\nname = \"ü.b.c\"\n",
        &[(2, 8, "function")],
    );
}

#[test]
fn quarantine_allow() {
    check_one(
        "name = \"a.b.c\"\n[quarantine]\n\
         allow = [\"10.0.0.300\", \"@nope\", \"10.0.0.1/8\", \"::1\", \"1.2.3.4/x\"]\n",
        &[
            (3, 10, "invalid CIDR"),
            (3, 24, "unknown peer group \"@nope\""),
            (
                3,
                33,
                "host bits set in 10.0.0.1/8; did you mean 10.0.0.0/8?",
            ),
            (3, 54, "invalid CIDR"),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n[quarantine]\nallow = []\n",
        &[(3, 9, "omit it to allow no peer during quarantine")],
    );
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.quarantine]\nallow = []\n\
         [[segment]]\nname = \"d.e.f\"\n[segment.quarantine]\nallow = [\"@x\"]\n",
        &[
            (4, 9, "`allow` must not be empty"),
            (8, 10, "unknown peer group \"@x\""),
        ],
    );
}

#[test]
fn quarantine_unknown_keys_types_and_mixed_forms() {
    check_one(
        "name = \"a.b.c\"\n[quarantine]\nallow = [\"::1\"]\ndeny = [\"::2\"]\n",
        &[(4, 1, "`deny`")],
    );
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.quarantine]\nallows = [\"::1\"]\n",
        &[(4, 1, "`allows`")],
    );
    check_one(
        "name = \"a.b.c\"\n[quarantine]\nallow = \"::1\"\n",
        &[(3, 9, "sequence")],
    );
    check_one(
        "[quarantine]\nallow = [\"::1\"]\n\n[[segment]]\nname = \"d.e.f\"\n",
        &[(4, 1, "mixed")],
    );
    check_one("[quarantine]\nallow = [\"::1\"]\n", &[(1, 1, "no `name`")]);
}

#[test]
fn a_forged_newline_in_a_group_name_stays_on_one_error_line() {
    let text = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"@x\\nrepro/a.toml:1:1: forged\"]\n";
    let errors = crate::policy::load_files(&[(
        std::path::PathBuf::from("a.toml"),
        text.as_bytes().to_vec(),
    )])
    .expect_err("an unknown group");
    let shown = errors.to_string();
    assert_eq!(shown.lines().count(), 1, "{shown}");
    assert!(shown.contains("unknown peer group \"@x\\nrepro"), "{shown}");
}
