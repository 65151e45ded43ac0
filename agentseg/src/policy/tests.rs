//! Loading good policy: the model, both file forms, directories, examples.

use std::path::{Path, PathBuf};

use super::*;

pub(super) fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, Vec<u8>)> {
    list.iter()
        .map(|(p, t)| (PathBuf::from(p), t.as_bytes().to_vec()))
        .collect()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn origin(file: &str, line: usize) -> Origin {
    Origin {
        file: PathBuf::from(file),
        line,
    }
}

const SPEC_EXAMPLE: &str = r#"name = "summarizer.prod.web-egress"
description = "LLM summarizer: HTTPS out through the egress proxy only"
mode = "enforce"            # or "audit"; default "enforce"

[[egress]]
cidrs = ["0.0.0.0/0", "::/0", "@proxies"]
except = ["10.0.0.0/8"]
ports = [443, "8000-8100"]
protocol = "tcp"            # tcp | udp | icmp | any; default "any"

[[ingress]]
cidrs = ["@monitoring"]
ports = [9100]
protocol = "tcp"

[members]
cgroups = ["/agents/summarizer"]
units = ["summarizer.service"]

[peers.proxies]
cidrs = ["127.0.0.1/32", "::1"]
"#;

const MONITORING: &str = "[peers.monitoring]\ncidrs = [\"192.0.2.0/28\"]\n";

#[test]
fn spec_example_loads_to_the_expected_model() {
    let set =
        load_files(&files(&[("a.toml", SPEC_EXAMPLE), ("z.toml", MONITORING)])).expect("loads");
    assert_eq!(set.peers.len(), 2);
    assert_eq!(
        set.peers["proxies"],
        vec![net("127.0.0.1/32"), net("::1/128")]
    );
    assert_eq!(set.peers["monitoring"], vec![net("192.0.2.0/28")]);
    let expected = Segment {
        name: "summarizer.prod.web-egress".parse().expect("name"),
        description: "LLM summarizer: HTTPS out through the egress proxy only".into(),
        mode: Mode::Enforce,
        on_daemon_loss: super::DaemonLoss::Keep,
        egress: vec![Rule {
            cidrs: vec![
                net("0.0.0.0/0"),
                net("::/0"),
                net("127.0.0.1/32"),
                net("::1/128"),
            ],
            except: vec![net("10.0.0.0/8")],
            fqdns: vec![],
            ports: vec![
                PortRange { lo: 443, hi: 443 },
                PortRange { lo: 8000, hi: 8100 },
            ],
            protocol: Protocol::Tcp,
            origin: origin("a.toml", 5),
        }],
        ingress: vec![Rule {
            cidrs: vec![net("192.0.2.0/28")],
            except: vec![],
            fqdns: vec![],
            ports: vec![PortRange { lo: 9100, hi: 9100 }],
            protocol: Protocol::Tcp,
            origin: origin("a.toml", 11),
        }],
        members: Members {
            cgroups: vec!["agents/summarizer".into()],
            units: vec!["summarizer.service".into()],
        },
        quarantine_allow: vec![],
        quarantine_origin: None,
        monitor: Monitor::default(),
        unix: vec![],
        quarantine_unix: vec![],
        sandbox: Sandbox::default(),
        // Where the egress rule's ports are written (for warnings); ingress is not recorded.
        positions: Positions {
            egress_ports: vec![vec![
                Position {
                    line: 8,
                    column: 10,
                },
                Position {
                    line: 8,
                    column: 15,
                },
            ]],
            egress_fqdns: vec![vec![]],
            ..Positions::default()
        },
        origin: origin("a.toml", 1),
    };
    assert_eq!(set.segments, vec![expected]);
}

#[test]
fn multi_segment_form_defaults_and_sorting() {
    let text = r#"
[[segment]]
name = "zeta.dev.all"
mode = "audit"

[[segment.egress]]
cidrs = ["10.0.0.0/8"]

[segment.members]
cgroups = ["x/zeta"]

[[segment]]
name = "alpha.dev.none"
egress = [{ cidrs = ["2001:db8::/32"], protocol = "udp" }]
"#;
    let set = load_files(&files(&[("multi.toml", text)])).expect("loads");
    let names: Vec<&str> = set.segments.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(names, ["alpha.dev.none", "zeta.dev.all"]);
    let alpha = &set.segments[0];
    assert_eq!(alpha.origin, origin("multi.toml", 12));
    assert_eq!(alpha.mode, Mode::Enforce);
    assert_eq!(alpha.description, "");
    assert_eq!(alpha.egress[0].protocol, Protocol::Udp);
    assert_eq!(alpha.egress[0].origin.line, 14);
    assert_eq!(alpha.members, Members::default());
    let zeta = &set.segments[1];
    assert_eq!(zeta.origin, origin("multi.toml", 2));
    assert_eq!(zeta.mode, Mode::Audit);
    assert_eq!(zeta.egress[0].protocol, Protocol::Any);
    assert!(zeta.egress[0].ports.is_empty());
    assert_eq!(zeta.egress[0].origin.line, 6);
    assert_eq!(zeta.members.cgroups, ["x/zeta"]);
}

#[test]
fn peer_groups_resolve_across_files_in_any_order() {
    let seg = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"@zz\", \"@zz\"]\n";
    let set = load_files(&files(&[
        ("b.toml", seg),
        ("a.toml", "[peers.zz]\ncidrs = [\"fd00::/8\"]\n"),
    ]))
    .expect("loads");
    // Duplicates from repeated references are dropped.
    assert_eq!(set.segments[0].egress[0].cidrs, vec![net("fd00::/8")]);
}

#[test]
fn segment_name_from_str() {
    let n: SegmentName = "fn-1.prod.web-egress".parse().expect("valid");
    assert_eq!(n.to_string(), "fn-1.prod.web-egress");
    assert_eq!(n.as_ref(), "fn-1.prod.web-egress");
    let long = format!("a.b.{}", "x".repeat(33));
    for (bad, word) in [
        ("a.b", "three"),
        ("a.b.c.d", "three"),
        ("A.b.c", "function"),
        ("a..c", "environment"),
        ("a.b.c_d", "access"),
        (long.as_str(), "access"),
        ("", "three"),
    ] {
        let err = bad.parse::<SegmentName>().expect_err(bad);
        assert!(err.to_string().contains(word), "{bad}: {err}");
    }
}

#[test]
fn load_dir_reads_toml_files_only_sorted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write("b.toml", "name = \"b.b.b\"\n");
    write("a.toml", "name = \"a.a.a\"\n");
    write("notes.md", "not policy");
    write(".#a.toml", "garbage = ");
    std::fs::create_dir(dir.path().join("sub.toml")).expect("mkdir");
    std::fs::write(dir.path().join("sub.toml/c.toml"), "garbage = ").expect("write");
    let set = load_dir(dir.path()).expect("loads");
    let names: Vec<&str> = set.segments.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(names, ["a.a.a", "b.b.b"]);
    assert_eq!(set.segments[0].origin.file, dir.path().join("a.toml"));
}

/// A cache that reuses unchanged files must give what a fresh load gives, after every kind
/// of change: an edit of the group file, of the segment file, a new file, a removed file, a
/// broken file and its repair.
#[test]
fn cached_loads_equal_fresh_loads_after_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    let seg = |port: u16| {
        format!(
            "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"@g\", \"10.9.0.0/16\"]\nports = [{port}]\n"
        )
    };
    let mut cache = PolicyCache::default();
    let mut check = |why: &str| {
        let cached = cache.load_dir(dir.path());
        let fresh = load_dir(dir.path());
        assert_eq!(cached, fresh, "after {why}");
        cached
    };
    write(
        "g.toml",
        "[peers.g]\ncidrs = [\"10.0.0.1\", \"10.0.0.2\"]\n",
    );
    write("s.toml", &seg(443));
    check("the first load").expect("loads");
    write("s.toml", &seg(80));
    let set = check("a segment edit").expect("loads");
    assert_eq!(set.segments[0].egress[0].ports[0].lo, 80);
    write("g.toml", "[peers.g]\ncidrs = [\"10.0.0.3\"]\n");
    let set = check("a group edit").expect("loads");
    assert_eq!(set.segments[0].egress[0].cidrs.len(), 2);
    assert_eq!(
        set.peers["g"],
        vec!["10.0.0.3/32".parse::<IpNet>().expect("net")]
    );
    write("t.toml", "name = \"t.t.t\"\n");
    assert_eq!(check("a new file").expect("loads").segments.len(), 2);
    std::fs::remove_file(dir.path().join("t.toml")).expect("rm");
    assert_eq!(check("a removed file").expect("loads").segments.len(), 1);
    write("g.toml", "[peers.g]\ncidrs = [\"10.0.0.300\"]\n");
    let errs = check("a broken group").expect_err("refused");
    assert!(errs.to_string().contains("g.toml:2"), "{errs}");
    write("s.toml", "name = \"a.b.c\"\n[[egress]\n");
    check("a file that is not TOML").expect_err("refused");
    write("g.toml", "[peers.g]\ncidrs = [\"10.0.0.4\"]\n");
    write("s.toml", &seg(80));
    let set = check("the repair").expect("loads");
    assert_eq!(
        set.segments[0].egress[0].cidrs[0],
        "10.0.0.4/32".parse::<IpNet>().expect("net")
    );
}

#[test]
fn repeated_cidrs_keep_their_first_place() {
    let set = load_files(&files(&[(
        "d.toml",
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.2\", \"@g\", \"10.0.0.2\", \"10.0.0.3\"]\n\
         [peers.g]\ncidrs = [\"10.0.0.1\", \"10.0.0.2\"]\n",
    )]))
    .expect("loads");
    let got: Vec<String> = set.segments[0].egress[0]
        .cidrs
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(got, ["10.0.0.2/32", "10.0.0.1/32", "10.0.0.3/32"]);
}

#[test]
fn empty_dir_is_one_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("README"), "x").expect("write");
    let errs = load_dir(dir.path()).expect_err("empty").0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].file, dir.path());
    assert_eq!((errs[0].line, errs[0].column), (1, 1));
    assert!(errs[0].message.contains("no *.toml"), "{}", errs[0]);

    let missing = dir.path().join("missing");
    let errs = load_dir(&missing).expect_err("missing").0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].file, missing);
}

pub(crate) fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn bundled_examples_load() {
    let set = load_dir(&examples_dir()).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.segments.len() >= 4, "{:?}", set.segments.len());
    assert!(set.segments.iter().any(|s| s.mode == Mode::Audit));
    // summarizer.toml documents [quarantine] with the log-collectors group from peers.toml.
    assert!(
        set.segments
            .iter()
            .any(|s| s.quarantine_allow.contains(&net("192.0.2.50/32")))
    );
    // summarizer.toml documents [monitor]; ci-runners.toml uses [segment.monitor].
    assert!(
        set.segments
            .iter()
            .any(|s| s.monitor.deny_rate.action == Action::Quarantine)
    );
    assert!(
        set.segments
            .iter()
            .any(|s| s.monitor.fan_out.threshold == 300)
    );
    // summarizer.toml documents [[unix]] and [quarantine] unix; netdiag.toml the capabilities
    // and [sockets]; ci-runners.toml allow_root and writable.
    let proxy = UnixPattern::parse("/run/agent-proxy/proxy.sock").expect("pattern");
    assert!(set.segments.iter().any(
        |s| s.unix.iter().any(|r| r.patterns.contains(&proxy)) && !s.quarantine_unix.is_empty()
    ));
    assert!(set.segments.iter().any(|s| {
        s.sandbox.capabilities.contains(&Capability::NET_RAW)
            && s.sandbox.sockets.raw
            && s.sandbox
                .sockets
                .netlink
                .contains(&NetlinkProtocol::SOCK_DIAG)
    }));
    assert!(
        set.segments
            .iter()
            .any(|s| s.sandbox.allow_root && !s.sandbox.writable.is_empty())
    );
    // summarizer.toml documents `fqdns`.
    assert!(set.segments.iter().any(|s| s.egress.iter().any(|r| {
        r.cidrs.is_empty() && r.fqdns.iter().any(Fqdn::is_wildcard) && !r.ports.is_empty()
    })));
    // No bundled example hands an agent a deputy or a capability that opens the pen: the only
    // warnings are netdiag's AF_PACKET, which it explains.
    let warned: Vec<String> = warnings(&set).iter().map(|w| w.message.clone()).collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].contains("socket family packet"), "{warned:#?}");
    for seg in &set.segments {
        for c in &seg.members.cgroups {
            assert!(c.starts_with("agentseg-examples/"), "{c}");
        }
        assert!(
            seg.members.units.is_empty(),
            "examples must not touch host units"
        );
    }
}

#[test]
fn errors_display_one_per_line() {
    let errs = PolicyErrors(vec![
        PolicyError {
            file: "a.toml".into(),
            line: 2,
            column: 3,
            message: "bad".into(),
        },
        PolicyError {
            file: "b.toml".into(),
            line: 1,
            column: 1,
            message: "worse".into(),
        },
    ]);
    assert_eq!(errs.to_string(), "a.toml:2:3: bad\nb.toml:1:1: worse");
}

#[test]
fn quarantine_allow_top_level_form() {
    let text = r#"name = "a.b.c"

[quarantine]
allow = ["@log-collectors", "127.0.0.1/32", "::1", "127.0.0.1", "192.0.2.50", "10.0.0.0/8"]

[peers.log-collectors]
cidrs = ["192.0.2.50/32", "2001:db8::50"]
"#;
    let set = load_files(&files(&[("q.toml", text)])).expect("loads");
    let seg = &set.segments[0];
    // Group expanded in place; bare addresses become /32 and /128; duplicates (also ones
    // coming from the group) dropped keeping the first.
    assert_eq!(
        seg.quarantine_allow,
        vec![
            net("192.0.2.50/32"),
            net("2001:db8::50/128"),
            net("127.0.0.1/32"),
            net("::1/128"),
            net("10.0.0.0/8"),
        ]
    );
    assert_eq!(seg.quarantine_origin, Some(origin("q.toml", 3)));
    // The table alone is a top-level segment key: no rules needed.
    assert!(seg.egress.is_empty() && seg.ingress.is_empty());
}

#[test]
fn quarantine_allow_multi_form_and_defaults() {
    let text = r#"
[[segment]]
name = "a.a.a"

[segment.quarantine]
allow = ["@logs"]

[[segment.egress]]
cidrs = ["10.0.0.0/8"]

[[segment]]
name = "b.b.b"
quarantine = { allow = ["fd00::/8"] }

[[segment]]
name = "c.c.c"

[[segment]]
name = "d.d.d"
[segment.quarantine]
"#;
    let set = load_files(&files(&[
        ("m.toml", text),
        ("p.toml", "[peers.logs]\ncidrs = [\"198.51.100.0/24\"]\n"),
    ]))
    .expect("loads");
    let by_name = |n: &str| {
        set.segments
            .iter()
            .find(|s| s.name.as_ref() == n)
            .expect("segment")
    };
    let a = by_name("a.a.a");
    assert_eq!(a.quarantine_allow, vec![net("198.51.100.0/24")]);
    assert_eq!(a.quarantine_origin, Some(origin("m.toml", 5)));
    assert_eq!(a.egress[0].origin.line, 8);
    let b = by_name("b.b.b");
    assert_eq!(b.quarantine_allow, vec![net("fd00::/8")]);
    assert_eq!(b.quarantine_origin.as_ref().map(|o| o.line), Some(13));
    let c = by_name("c.c.c");
    assert!(c.quarantine_allow.is_empty());
    assert_eq!(c.quarantine_origin, None);
    // A table without `allow` allows nothing.
    let d = by_name("d.d.d");
    assert!(d.quarantine_allow.is_empty());
    assert_eq!(d.quarantine_origin, Some(origin("m.toml", 20)));
}
