//! Real-kernel tests of segment enforcement at connect/sendmsg time. Every test loads the real
//! programs through a real daemon, confines real processes in real cgroups, and sends traffic
//! only inside a network namespace it made (loopback addresses there).
use agentseg_tests::{CgroupTree, Daemon, Netns, Server, V6_A, V6_B, kernel_ready, probe};

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

fn serve_all(ns: &Netns) -> Server {
    // Dual-stack listeners: IPv4, IPv6 and v4-mapped clients all reach them.
    Server::start(ns, &["[::]:8080", "[::]:9090", "[::]:8050", "[::]:8101"])
}

#[test]
fn tcp_v4_allowed_and_denied_by_port_address_and_protocol() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
    // Port not allowed.
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8101"]),
        "EPERM"
    );
    // Address not allowed (8080 is only allowed to 127.0.0.1).
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.2:8080"]),
        "EPERM"
    );
    // Protocol not allowed: UDP to a TCP-only port.
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "udp", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "udp", "127.0.0.1:5353"]),
        "ok"
    );
}

#[test]
fn tcp_v6_allowed_and_denied() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "[::1]:8080"]),
        "ok"
    );
    assert_eq!(
        d.run_probe(
            "web.test.tcp",
            &ns,
            &["connect", "tcp", &format!("[{V6_A}]:8080")]
        ),
        "ok"
    );
    assert_eq!(
        d.run_probe(
            "web.test.tcp",
            &ns,
            &["connect", "tcp", &format!("[{V6_B}]:8080")]
        ),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "[::1]:9090"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "udp", "[::1]:8080"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "[::1]:5353"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "[::1]:5354"]),
        "EPERM"
    );
}

#[test]
fn v4_mapped_v6_is_judged_by_v4_rules() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    // connect6 with a v4-mapped destination.
    assert_eq!(
        d.run_probe(
            "web.test.tcp",
            &ns,
            &["connect", "tcp", "[::ffff:127.0.0.1]:8080"]
        ),
        "ok"
    );
    assert_eq!(
        d.run_probe(
            "web.test.tcp",
            &ns,
            &["connect", "tcp", "[::ffff:127.0.0.2]:8080"]
        ),
        "EPERM"
    );
    assert_eq!(
        d.run_probe(
            "web.test.tcp",
            &ns,
            &["connect", "udp", "[::ffff:127.0.0.2]:5353"]
        ),
        "EPERM"
    );
    // Unconnected sendto on an AF_INET6 socket to a v4-mapped address runs sendmsg4.
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "[::ffff:127.0.0.1]:5353"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "[::ffff:127.0.0.2]:5353"]),
        "EPERM"
    );
}

#[test]
fn unconnected_udp_sendto_is_judged_per_message() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "127.0.0.1:5353"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "127.0.0.2:5353"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["sendto", "127.0.0.1:53"]),
        "EPERM"
    );
}

#[test]
fn except_carves_out_and_port_ranges_hold() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.4:9090"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.3:9090"]),
        "EPERM"
    );
    // 127.0.0.1/32 is more specific than 127.0.0.0/24: it still carries the /24's port 9090.
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:9090"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8050"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8101"]),
        "EPERM"
    );
}

#[test]
fn children_threads_and_sub_cgroups_stay_in_the_segment() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    std::fs::create_dir_all(tree.abs("members/web")).expect("mkdir member");
    let policy = format!(
        "{WEB}\n[members]\ncgroups = [\"{}\"]\n",
        tree.rel("members/web")
    );
    let d = Daemon::start(&tree, &[("web.toml", &policy)]);
    let check = |how: &[&str], run: &dyn Fn(&[&str]) -> String| {
        let mut denied: Vec<&str> = how.to_vec();
        denied.extend(["connect", "tcp", "127.0.0.1:8101"]);
        assert_eq!(run(&denied), "EPERM", "{how:?} escaped");
        let mut allowed: Vec<&str> = how.to_vec();
        allowed.extend(["connect", "tcp", "127.0.0.1:8080"]);
        assert_eq!(run(&allowed), "ok", "{how:?} over-blocked");
    };
    // An agent's children and threads are judged as the agent.
    for how in [&["--fork"][..], &["--thread"]] {
        check(how, &|args| d.run_probe("web.test.tcp", &ns, args));
    }
    // An agent cannot even make a sub-cgroup (its sandbox keeps it off the cgroup tree)...
    let out = d.run_agent("web.test.tcp", &ns, &["--subcgroup", "escape", "env"]);
    assert!(!out.status.success(), "an agent made a sub-cgroup");
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
}

#[test]
fn processes_in_no_segment_are_untouched() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    let d = Daemon::start(&tree, &[("web.toml", WEB)]);
    // Same namespace, same daemon, but not in a segment: the denied destinations connect.
    assert_eq!(
        probe(&ns, None, &["connect", "tcp", "127.0.0.1:8101"]),
        "ok"
    );
    assert_eq!(
        probe(&ns, None, &["connect", "tcp", "127.0.0.2:8080"]),
        "ok"
    );
    assert_eq!(probe(&ns, None, &["sendto", "127.0.0.2:5353"]), "ok");
    drop(d);
}

#[test]
fn member_cgroups_and_two_segments_are_enforced_at_once() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    std::fs::create_dir_all(tree.abs("web")).expect("mkdir web");
    std::fs::create_dir_all(tree.abs("db")).expect("mkdir db");
    let web = format!("{WEB}\n[members]\ncgroups = [\"{}\"]\n", tree.rel("web"));
    let db = format!("{OTHER}\n[members]\ncgroups = [\"{}\"]\n", tree.rel("db"));
    let d = Daemon::start(&tree, &[("web.toml", &web), ("db.toml", &db)]);
    let (web_cg, db_cg) = (tree.abs("web"), tree.abs("db"));
    assert_eq!(
        probe(&ns, Some(&web_cg), &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
    assert_eq!(
        probe(&ns, Some(&web_cg), &["connect", "tcp", "127.0.0.2:9090"]),
        "ok"
    );
    assert_eq!(
        probe(&ns, Some(&db_cg), &["connect", "tcp", "127.0.0.1:9090"]),
        "ok"
    );
    assert_eq!(
        probe(&ns, Some(&db_cg), &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        probe(&ns, Some(&db_cg), &["connect", "tcp", "127.0.0.2:9090"]),
        "EPERM"
    );
    // And agents of both segments at the same time as the member cgroups.
    assert_eq!(
        d.run_probe("db.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
}

#[test]
fn audit_mode_denies_nothing_and_counts() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = serve_all(&ns);
    let audit = WEB.replace("description = \"kernel test segment\"", "mode = \"audit\"");
    let d = Daemon::start(&tree, &[("web.toml", &audit)]);
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.1:8101"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("web.test.tcp", &ns, &["connect", "tcp", "127.0.0.2:8080"]),
        "ok"
    );
    let out = d.cli(&["status", "--json"]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let seg = &status["segments"][0];
    assert_eq!(seg["mode"], "audit");
    // The agents are gone from the list once they exit, but their counts were taken while
    // they ran; what is left must at least not show denials.
    assert_eq!(seg["denied"], 0);
}
