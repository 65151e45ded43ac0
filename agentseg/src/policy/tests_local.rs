//! `[[unix]]`, `[quarantine] unix`, the sandbox keys, protocol names and numbers, and
//! IPv4-mapped CIDRs: the model in both file forms, and every error at its position.

use super::tests::files;
use super::tests_errors::{check, check_one};
use super::*;

fn load_one(text: &str) -> PolicySet {
    load_files(&files(&[("s.toml", text)])).unwrap_or_else(|e| panic!("{e}"))
}

fn pat(s: &str) -> UnixPattern {
    UnixPattern::parse(s).expect("test pattern")
}

fn pos(line: usize, column: usize) -> Position {
    Position { line, column }
}

#[test]
fn unix_rules_top_level_form() {
    let text = r#"name = "a.b.c"

[[unix]]
paths = ["/run/proxy.sock", "/run/tools/*", "@broker", "/run/proxy.sock"]

[[unix]]
paths = ["@tools-*"]

[quarantine]
unix = ["/run/log.sock"]
"#;
    let set = load_one(text);
    let seg = &set.segments[0];
    assert_eq!(seg.unix.len(), 2);
    // Duplicates inside one rule are dropped, keeping the first.
    assert_eq!(
        seg.unix[0].patterns,
        [pat("/run/proxy.sock"), pat("/run/tools/*"), pat("@broker")]
    );
    assert_eq!((seg.unix[0].origin.line, seg.unix[1].origin.line), (3, 6));
    assert_eq!(seg.unix[1].patterns, [pat("@tools-*")]);
    assert_eq!(
        seg.positions.unix,
        [vec![pos(4, 10), pos(4, 29), pos(4, 45)], vec![pos(7, 10)]]
    );
    assert_eq!(seg.quarantine_unix, [pat("/run/log.sock")]);
    assert_eq!(seg.positions.quarantine_unix, [pos(10, 9)]);
    // A [quarantine] with only `unix` allows no IP peer.
    assert!(seg.quarantine_allow.is_empty());
    assert_eq!(seg.quarantine_origin.as_ref().map(|o| o.line), Some(9));
}

#[test]
fn unix_rules_multi_form() {
    let text = r#"
[[segment]]
name = "a.a.a"

[[segment.unix]]
paths = ["/run/a.sock"]

[segment.quarantine]
allow = ["127.0.0.1"]

[[segment]]
name = "b.b.b"
unix = [{ paths = ["@b"] }]
quarantine = { unix = ["@q*"] }
"#;
    let set = load_one(text);
    let a = &set.segments[0];
    assert_eq!(a.unix[0].patterns, [pat("/run/a.sock")]);
    assert_eq!(a.unix[0].origin.line, 5);
    assert!(a.quarantine_unix.is_empty());
    assert_eq!(a.quarantine_allow.len(), 1);
    let b = &set.segments[1];
    assert_eq!(b.unix[0].patterns, [pat("@b")]);
    assert_eq!(b.quarantine_unix, [pat("@q*")]);
}

#[test]
fn unix_errors_are_at_each_entry() {
    check_one(
        "name = \"a.b.c\"\n[[unix]]\npaths = [\"run/x\", \"/ok\", \"/a/*/b\", \"@\"]\n\
         [[unix]]\n[[unix]]\npaths = []\n",
        &[
            (3, 10, "absolute"),
            (3, 26, "trailing `*`"),
            (3, 36, "abstract name after '@' is required"),
            (4, 1, "no `paths`"),
            (6, 9, "`paths` must not be empty"),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n[[unix]]\npath = [\"/x\"]\n",
        &[(3, 1, "`path`")],
    );
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.quarantine]\nunix = []\n\
         [[segment]]\nname = \"d.e.f\"\n[segment.quarantine]\nunix = [\"/x//y\"]\n",
        &[(4, 8, "`unix` must not be empty"), (8, 9, "non-canonical")],
    );
}

#[test]
fn sandbox_keys_top_level_form() {
    let text = r#"name = "a.b.c"
allow_root = true
capabilities = ["CAP_NET_RAW", "net_bind_service", "net_raw"]
writable = ["/srv/agent-work", "/srv/cache", "/srv/agent-work"]

[sockets]
families = ["inet", "AF_PACKET"]
raw = true
netlink = ["route", "NETLINK_SOCK_DIAG"]
io_uring = true
"#;
    let set = load_one(text);
    let seg = &set.segments[0];
    let s = &seg.sandbox;
    assert!(s.allow_root);
    assert_eq!(
        s.capabilities,
        [Capability::NET_RAW, Capability::NET_BIND_SERVICE].into()
    );
    assert_eq!(
        s.writable,
        [
            std::path::PathBuf::from("/srv/agent-work"),
            "/srv/cache".into()
        ]
    );
    assert_eq!(s.sockets.families, [Family::INET, Family::PACKET].into());
    assert!(s.sockets.raw && s.sockets.io_uring);
    assert_eq!(
        s.sockets.netlink,
        [NetlinkProtocol::ROUTE, NetlinkProtocol::SOCK_DIAG].into()
    );
    assert_eq!(seg.positions.capabilities[&Capability::NET_RAW], pos(3, 17));
    assert_eq!(
        seg.positions.capabilities[&Capability::NET_BIND_SERVICE],
        pos(3, 32)
    );
    assert_eq!(seg.positions.writable, [pos(4, 13), pos(4, 32)]);
    assert_eq!(seg.positions.families[&Family::PACKET], pos(7, 21));
    assert_eq!(seg.positions.io_uring, Some(pos(10, 12)));
}

#[test]
fn sandbox_keys_multi_form_and_defaults() {
    let text = r#"
[[segment]]
name = "a.a.a"
capabilities = ["net_raw"]
[segment.sockets]
raw = true

[[segment]]
name = "b.b.b"
sockets = { families = [], netlink = [] }

[[segment]]
name = "c.c.c"
"#;
    let set = load_one(text);
    let a = &set.segments[0].sandbox;
    assert!(!a.allow_root);
    assert_eq!(a.capabilities, [Capability::NET_RAW].into());
    // Absent [sockets] keys keep their defaults.
    assert_eq!(
        a.sockets,
        Sockets {
            raw: true,
            ..Sockets::default()
        }
    );
    let b = &set.segments[1].sandbox;
    assert!(b.sockets.families.is_empty() && b.sockets.netlink.is_empty());
    assert_eq!(set.segments[2].sandbox, Sandbox::default());
    // Sandbox keys alone make a top-level segment.
    let only = load_one("name = \"a.b.c\"\nallow_root = false\n");
    assert_eq!(only.segments[0].sandbox, Sandbox::default());
}

#[test]
fn sandbox_errors() {
    check_one(
        "name = \"a.b.c\"\nallow_root = \"yes\"\n",
        &[(2, 14, "bool")],
    );
    check_one(
        "name = \"a.b.c\"\ncapabilities = [\"cap_fly\", \"net_raw\"]\n\
         writable = [\"srv\", \"/srv//x\", \"/\", \"/srv/x/\", \"/ok\"]\n",
        &[
            (2, 17, "unknown capability \"cap_fly\"; known: chown"),
            (3, 13, "absolute"),
            (3, 20, "without `//`"),
            (3, 31, "write everywhere"),
            (3, 36, "trailing '/'"),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n[sockets]\nfamilies = [\"inet\", \"netlink\", \"AF_NOPE\"]\n\
         netlink = [\"route\", \"bogus\"]\n",
        &[
            (3, 21, "netlink = [\"route\", ...]"),
            (
                3,
                32,
                "unknown socket family \"AF_NOPE\"; known: unix, inet",
            ),
            (4, 21, "unknown netlink protocol \"bogus\"; known: route"),
        ],
    );
    check_one("name = \"a.b.c\"\n[sockets]\nraw = 1\n", &[(3, 7, "bool")]);
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.sockets]\niouring = true\n",
        &[(4, 1, "`iouring`")],
    );
}

#[test]
fn protocol_names_and_numbers() {
    let text = "name = \"a.b.c\"\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = \"udplite\"\nports = [5000]\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = \"gre\"\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = 132\nports = [\"1-9\"]\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = \"47\"\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = 6\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = \"17\"\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = 1\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = 58\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = 0\n\
        [[egress]]\ncidrs = [\"10.0.0.1\"]\nprotocol = \"255\"\n";
    let set = load_one(text);
    let got: Vec<Protocol> = set.segments[0].egress.iter().map(|r| r.protocol).collect();
    assert_eq!(
        got,
        [
            Protocol::Number(136),
            Protocol::Number(47),
            Protocol::Number(132),
            Protocol::Number(47),
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Icmp,
            Protocol::Number(0),
            Protocol::Number(255),
        ]
    );
    assert_eq!(Protocol::Number(47).to_string(), "gre");
    assert_eq!(Protocol::Number(4).to_string(), "4");
}

#[test]
fn protocol_errors() {
    check_one(
        "name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = \"mptcp\"\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = 262\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = 256\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = \"-1\"\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = true\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = \"99999999999999999999\"\n",
        &[
            (4, 12, "MPTCP is judged as tcp: use protocol = \"tcp\""),
            (7, 12, "MPTCP is judged as tcp"),
            (
                10,
                12,
                "protocol number 256 is out of range; IP protocol numbers are 0-255",
            ),
            (
                13,
                12,
                "unknown protocol \"-1\"; valid protocols are \"tcp\", \"udp\"",
            ),
            (16, 12, "found a boolean"),
            (
                19,
                12,
                "protocol number 99999999999999999999 is out of range",
            ),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = \"gre\"\nports = [1]\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = 50\nports = [1]\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = \"sctp\"\nports = [1]\n\
         [[egress]]\ncidrs = [\"::1\"]\nprotocol = \"frob\"\nports = [1]\n",
        &[
            (
                5,
                9,
                "protocol gre (IP protocol 47) has no ports: remove `ports`",
            ),
            (9, 9, "protocol esp (IP protocol 50) has no ports"),
            (16, 12, "\"udplite\" or an IP protocol number 0-255"),
        ],
    );
}

#[test]
fn ipv4_mapped_cidrs_are_refused_everywhere() {
    check(
        &[
            (
                "a.toml",
                b"name = \"a.b.c\"\n[[egress]]\n\
                  cidrs = [\"::ffff:10.0.0.0/104\", \"::/0\", \"::/64\", \"::/80\"]\n\
                  except = [\"::ffff:0:0/96\"]\n\
                  [quarantine]\nallow = [\"::ffff:192.0.2.1\"]\n",
            ),
            ("p.toml", b"[peers.p]\ncidrs = [\"::ffff:a00:0/120\"]\n"),
        ],
        &[
            (
                "a.toml",
                3,
                10,
                "::ffff:10.0.0.0/104 is IPv4-mapped: the kernel judges mapped addresses by \
                 the IPv4 rules, write 10.0.0.0/8",
            ),
            (
                "a.toml",
                4,
                11,
                "::ffff:0.0.0.0/96 is IPv4-mapped: the kernel judges mapped addresses by the \
                 IPv4 rules, write 0.0.0.0/0",
            ),
            ("a.toml", 6, 10, "write 192.0.2.1/32"),
            ("p.toml", 2, 10, "write 10.0.0.0/24"),
        ],
    );
}
