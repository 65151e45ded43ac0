//! Real-kernel tests of segment enforcement at connect/sendmsg time. Every test loads the real
//! programs through a real daemon, confines real processes in real cgroups, and sends traffic
//! only inside a network namespace it made (loopback addresses there).
//!
//! Every attempt is checked against listeners that count what reaches them: an allowed one
//! arrives exactly once, a denied one reaches nothing.
use agentseg_tests::{CgroupTree, Daemon, Listeners, Netns, V6_A, V6_B, kernel_ready, probe};

/// web.test.tcp: TCP to 127.0.0.1 on 8080 and 8000-8100, ::1 and fd00:a5::1 on 8080,
/// 127.0.0.0/24 on 9090 except 127.0.0.3; UDP to 127.0.0.1:5353 and ::1:5353.
const WEB: &str = r#"
name = "web.test.tcp"
description = "kernel test segment"

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
"#;

const OTHER: &str = r#"
name = "db.test.tcp"
[[egress]]
cidrs = ["127.0.0.1/32"]
ports = [9090]
protocol = "tcp"
"#;

/// Dual-stack listeners (IPv4, IPv6 and v4-mapped clients all reach them) on every port the
/// tests try, TCP and UDP.
fn listen_all(ns: &Netns) -> Listeners {
    Listeners::bind(
        ns,
        &["[::]:8080", "[::]:9090", "[::]:8050", "[::]:8101"],
        &["[::]:5353", "[::]:5354", "[::]:54", "[::]:8080"],
    )
}

/// The probe's `connect tcp|udp DST` or `sendto DST` as `run` does it, checked against `l`.
/// Flags before the action (`--fork`, `--subcgroup NAME`, ...) are passed through.
fn attempt(l: &Listeners, run: &dyn Fn(&[&str]) -> String, args: &[&str]) -> String {
    let action = args
        .iter()
        .position(|a| *a == "connect" || *a == "sendto")
        .unwrap_or_else(|| panic!("not a network attempt: {args:?}"));
    let (proto, dst) = match &args[action..] {
        ["connect", proto, dst] => (*proto, *dst),
        ["sendto", dst] => ("udp", *dst),
        _ => panic!("not a network attempt: {args:?}"),
    };
    l.judged(proto, dst, run(args))
}

#[test]
fn tcp_v4_allowed_and_denied_by_port_address_and_protocol() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    let run = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    let go = |args: &[&str]| attempt(&l, &run, args);
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:8080"]), "ok");
    // Port not allowed.
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:8101"]), "EPERM");
    // Address not allowed (8080 is only allowed to 127.0.0.1).
    assert_eq!(go(&["connect", "tcp", "127.0.0.2:8080"]), "EPERM");
    // Protocol not allowed: UDP to a TCP-only port, next to UDP to a UDP port.
    assert_eq!(go(&["connect", "udp", "127.0.0.1:8080"]), "EPERM");
    assert_eq!(go(&["connect", "udp", "127.0.0.1:5353"]), "ok");
    l.assert_silent("at the end");
}

#[test]
fn tcp_v6_allowed_and_denied() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    let run = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    let go = |args: &[&str]| attempt(&l, &run, args);
    let (a, b) = (format!("[{V6_A}]:8080"), format!("[{V6_B}]:8080"));
    assert_eq!(go(&["connect", "tcp", "[::1]:8080"]), "ok");
    assert_eq!(go(&["connect", "tcp", &a]), "ok");
    assert_eq!(go(&["connect", "tcp", &b]), "EPERM");
    assert_eq!(go(&["connect", "tcp", "[::1]:9090"]), "EPERM");
    assert_eq!(go(&["connect", "udp", "[::1]:8080"]), "EPERM");
    assert_eq!(go(&["sendto", "[::1]:5353"]), "ok");
    assert_eq!(go(&["sendto", "[::1]:5354"]), "EPERM");
    l.assert_silent("at the end");
}

#[test]
fn v4_mapped_v6_is_judged_by_v4_rules() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    let run = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    let go = |args: &[&str]| attempt(&l, &run, args);
    // connect6 with a v4-mapped destination.
    assert_eq!(go(&["connect", "tcp", "[::ffff:127.0.0.1]:8080"]), "ok");
    assert_eq!(go(&["connect", "tcp", "[::ffff:127.0.0.2]:8080"]), "EPERM");
    assert_eq!(go(&["connect", "udp", "[::ffff:127.0.0.1]:5353"]), "ok");
    assert_eq!(go(&["connect", "udp", "[::ffff:127.0.0.2]:5353"]), "EPERM");
    // Unconnected sendto on an AF_INET6 socket to a v4-mapped address runs sendmsg4.
    assert_eq!(go(&["sendto", "[::ffff:127.0.0.1]:5353"]), "ok");
    assert_eq!(go(&["sendto", "[::ffff:127.0.0.2]:5353"]), "EPERM");
    l.assert_silent("at the end");
}

#[test]
fn unconnected_udp_sendto_is_judged_per_message() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    let run = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    let go = |args: &[&str]| attempt(&l, &run, args);
    assert_eq!(go(&["sendto", "127.0.0.1:5353"]), "ok");
    assert_eq!(go(&["sendto", "127.0.0.2:5353"]), "EPERM");
    assert_eq!(go(&["sendto", "127.0.0.1:54"]), "EPERM");
    // Per message: the same peer again after the denials.
    assert_eq!(go(&["sendto", "127.0.0.1:5353"]), "ok");
    l.assert_silent("at the end");
}

#[test]
fn except_carves_out_and_port_ranges_hold() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    let run = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    let go = |args: &[&str]| attempt(&l, &run, args);
    assert_eq!(go(&["connect", "tcp", "127.0.0.4:9090"]), "ok");
    assert_eq!(go(&["connect", "tcp", "127.0.0.3:9090"]), "EPERM");
    // 127.0.0.1/32 is more specific than 127.0.0.0/24: it still carries the /24's port 9090.
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:9090"]), "ok");
    // Inside the range 8000-8100, and just past its end.
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:8050"]), "ok");
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:8101"]), "EPERM");
    l.assert_silent("at the end");
}

#[test]
fn children_threads_and_sub_cgroups_stay_in_the_segment() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    std::fs::create_dir_all(tree.abs("members/web")).expect("mkdir member");
    let policy = format!(
        "{WEB}\n[members]\ncgroups = [\"{}\"]\n",
        tree.rel("members/web")
    );
    let d = Daemon::start(&tree, &[("web.toml", &policy)]);
    let check = |how: &[&str], run: &dyn Fn(&[&str]) -> String| {
        let mut denied: Vec<&str> = how.to_vec();
        denied.extend(["connect", "tcp", "127.0.0.1:8101"]);
        assert_eq!(attempt(&l, run, &denied), "EPERM", "{how:?} escaped");
        let mut allowed: Vec<&str> = how.to_vec();
        allowed.extend(["connect", "tcp", "127.0.0.1:8080"]);
        assert_eq!(attempt(&l, run, &allowed), "ok", "{how:?} over-blocked");
    };
    // An agent's children and threads are judged as the agent.
    for how in [&["--fork"][..], &["--thread"]] {
        check(how, &|args| d.run_probe("web.test.tcp", &ns, args));
    }
    // An agent cannot even make a sub-cgroup (its sandbox keeps it off the cgroup tree)...
    let out = d.run_agent("web.test.tcp", &ns, &["--subcgroup", "escape", "env"]);
    assert!(!out.status.success(), "an agent made a sub-cgroup");
    assert!(
        out.stdout.is_empty(),
        "the probe ran past --subcgroup: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // ...and a root process in a member cgroup that makes one stays in the segment there.
    let member = tree.abs("members/web");
    for how in [
        &["--subcgroup", "escape"][..],
        &["--subcgroup", "a", "--fork"],
        &["--fork"],
        &["--thread"],
    ] {
        check(how, &|args| probe(&ns, Some(&member), args));
    }
    l.assert_silent("at the end");
}

#[test]
fn processes_in_no_segment_are_untouched() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    let outside = |args: &[&str]| probe(&ns, None, args);
    // The daemon enforces these very destinations on its agents...
    let agent = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    assert_eq!(
        attempt(&l, &agent, &["connect", "tcp", "127.0.0.1:8101"]),
        "EPERM"
    );
    assert_eq!(attempt(&l, &agent, &["sendto", "127.0.0.2:5353"]), "EPERM");
    // ...but a process in the same namespace and in no segment reaches them all.
    assert_eq!(
        attempt(&l, &outside, &["connect", "tcp", "127.0.0.1:8101"]),
        "ok"
    );
    assert_eq!(
        attempt(&l, &outside, &["connect", "tcp", "127.0.0.2:8080"]),
        "ok"
    );
    assert_eq!(attempt(&l, &outside, &["sendto", "127.0.0.2:5353"]), "ok");
    l.assert_silent("at the end");
}

#[test]
fn member_cgroups_and_two_segments_are_enforced_at_once() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    std::fs::create_dir_all(tree.abs("web")).expect("mkdir web");
    std::fs::create_dir_all(tree.abs("db")).expect("mkdir db");
    let web = format!("{WEB}\n[members]\ncgroups = [\"{}\"]\n", tree.rel("web"));
    let db = format!("{OTHER}\n[members]\ncgroups = [\"{}\"]\n", tree.rel("db"));
    let d = Daemon::start(&tree, &[("web.toml", &web), ("db.toml", &db)]);
    let (web_cg, db_cg) = (tree.abs("web"), tree.abs("db"));
    let in_web = |args: &[&str]| probe(&ns, Some(&web_cg), args);
    let in_db = |args: &[&str]| probe(&ns, Some(&db_cg), args);
    assert_eq!(
        attempt(&l, &in_web, &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
    assert_eq!(
        attempt(&l, &in_web, &["connect", "tcp", "127.0.0.2:9090"]),
        "ok"
    );
    assert_eq!(
        attempt(&l, &in_db, &["connect", "tcp", "127.0.0.1:9090"]),
        "ok"
    );
    assert_eq!(
        attempt(&l, &in_db, &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        attempt(&l, &in_db, &["connect", "tcp", "127.0.0.2:9090"]),
        "EPERM"
    );
    // And agents of both segments at the same time as the member cgroups.
    let db_agent = |args: &[&str]| d.run_probe("db.test.tcp", &ns, args);
    let web_agent = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    assert_eq!(
        attempt(&l, &db_agent, &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        attempt(&l, &db_agent, &["connect", "tcp", "127.0.0.1:9090"]),
        "ok"
    );
    assert_eq!(
        attempt(&l, &web_agent, &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
    l.assert_silent("at the end");
}

/// The segment's counters in `status --json`: (allowed, denied, audit_denied).
fn counters(d: &Daemon) -> (u64, u64, u64) {
    let status = d.status_json();
    let seg = &status["segments"][0];
    let n = |k: &str| {
        seg[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {status}"))
    };
    (n("allowed"), n("denied"), n("audit_denied"))
}

#[test]
fn audit_mode_denies_nothing_and_counts() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = listen_all(&ns);
    let audit = WEB.replace("description = \"kernel test segment\"", "mode = \"audit\"");
    let d = Daemon::start(&tree, &[("web.toml", &audit)]);
    assert_eq!(d.status_json()["segments"][0]["mode"], "audit");
    let run = |args: &[&str]| d.run_probe("web.test.tcp", &ns, args);
    let go = |args: &[&str]| attempt(&l, &run, args);
    // Allowed traffic first: counted as allowed, never as a would-be denial.
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:8080"]), "ok");
    assert_eq!(go(&["sendto", "127.0.0.1:5353"]), "ok");
    let (allowed, denied, audit_denied) = counters(&d);
    assert_eq!(allowed, 2, "two allowed attempts");
    assert_eq!((denied, audit_denied), (0, 0), "after allowed traffic only");
    // Attempts enforce mode would deny: they all go through, each counted once as a would-be
    // denial and recorded once as an `audit_deny` naming its hook and rule. The last one is also
    // a marker: records come in order, so a duplicate of an earlier one would come before it.
    let would_deny: [(&[&str], &str, &str, &str, u16); 4] = [
        (
            &["connect", "tcp", "127.0.0.1:8101"],
            "connect4",
            "tcp",
            "127.0.0.1",
            8101,
        ),
        (
            &["connect", "tcp", "127.0.0.2:8080"],
            "connect4",
            "tcp",
            "127.0.0.2",
            8080,
        ),
        (
            &["sendto", "127.0.0.2:5353"],
            "sendmsg4",
            "udp",
            "127.0.0.2",
            5353,
        ),
        (
            &["sendto", "127.0.0.1:54"],
            "sendmsg4",
            "udp",
            "127.0.0.1",
            54,
        ),
    ];
    for (args, ..) in &would_deny {
        assert_eq!(go(args), "ok", "{args:?} denied in audit mode");
    }
    // Each attempt is recorded by the hook that judged it, naming the rule that would deny it.
    let marker = |r: &serde_json::Value| r["hook"] == "sendmsg4" && r["dport"] == 54;
    d.wait_records(1, |r| r["kind"] == "audit_deny" && marker(r));
    let records: Vec<_> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "audit_deny")
        .collect();
    for (args, hook, proto, dst, port) in &would_deny {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r["hook"] == *hook && r["dst"] == *dst && r["dport"] == *port)
            .collect();
        assert_eq!(mine.len(), 1, "{args:?}: {mine:#?}");
        let r = mine[0];
        assert_eq!(r["segment"], "web.test.tcp", "{args:?}: {r}");
        assert_eq!(r["protocol"], *proto, "{args:?}: {r}");
        assert_eq!(r["rule"], "default-deny", "{args:?}: {r}");
    }
    assert!(
        d.audit_records().iter().all(|r| r["kind"] != "deny"),
        "audit mode recorded a denial"
    );
    let (allowed_after, denied, audit_denied) = counters(&d);
    assert_eq!(denied, 0, "audit mode counted a denial");
    // Allowed traffic again: the would-be denials do not grow.
    assert_eq!(go(&["connect", "tcp", "127.0.0.1:8080"]), "ok");
    let (allowed_last, denied_last, audit_denied_last) = counters(&d);
    assert_eq!(
        (denied_last, audit_denied_last),
        (0, audit_denied),
        "allowed traffic counted as a (would-be) denial"
    );
    assert_eq!(
        (allowed_after, allowed_last),
        (2, 3),
        "would-be denials are not counted as allowed, one more allowed connect is"
    );
    l.assert_silent("at the end");
    // Exactly once each: as many records and would-be denials as attempts, as enforce mode
    // would count them (records read once the marker's came: a duplicate of an earlier attempt
    // comes before it).
    let sources: Vec<String> = records
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
            format!("{} {}:{}", s("hook"), s("dst"), r["dport"])
        })
        .collect();
    assert_eq!(
        (records.len(), audit_denied),
        (would_deny.len(), would_deny.len() as u64),
        "would-be denials counted more than once: records {sources:?}"
    );
}
