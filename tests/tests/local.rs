//! No way out of the pen, part 2, against the real kernel: local peers (AF_UNIX) judged by the
//! segment's `[[unix]]` list, sockets handed in from outside judged by the member using them,
//! enforcement that repairs itself, and member cgroups judged from their first instant.
use std::{
    io::{BufRead as _, BufReader},
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            fs::PermissionsExt as _,
            net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener},
        },
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentseg_tests::{
    CgroupTree, Daemon, Netns, ROOT_PROGRAMS, UdpSink, attachments, kernel_ready, probe_bin,
    shared_dir,
};

/// An AF_UNIX stream listener any uid may connect to (agents run as uids of their own).
fn listen_path(path: &Path) -> UnixListener {
    let l = UnixListener::bind(path).expect("bind unix listener");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// An abstract AF_UNIX listener in the namespace (the abstract namespace is per netns).
fn listen_abstract(ns: &Netns, name: &str) -> UnixListener {
    let name = name.to_owned();
    let l = ns.within(move || {
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        UnixListener::bind_addr(&addr).expect("bind abstract listener")
    });
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// Connections a listener has accepted (and dropped) so far.
fn accepted(l: &UnixListener) -> usize {
    std::iter::from_fn(|| l.accept().ok()).count()
}

/// A segment allowing UDP to 127.0.0.1:9998 and the given AF_UNIX paths.
fn unix_segment(name: &str, paths: &[String]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("\"{p}\"")).collect();
    let unix = if paths.is_empty() {
        String::new()
    } else {
        format!("[[unix]]\npaths = [{}]\n", quoted.join(", "))
    };
    format!(
        r#"name = "{name}"
[[egress]]
cidrs = ["127.0.0.1"]
ports = [9998]
protocol = "udp"
{unix}"#
    )
}

#[test]
fn unix_peers_are_limited_to_the_segments_list() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let tag = std::process::id();
    let shared = shared_dir();
    let dir = shared.path();
    let allowed = dir.join("allowed.sock");
    let other = dir.join("other.sock");
    let dgram = dir.join("dgram.sock");
    let policy = unix_segment(
        "bot.test.unix",
        &[
            allowed.display().to_string(),
            dgram.display().to_string(),
            format!("@agseg-ok-{tag}"),
            format!("{}/tools/*", dir.display()),
        ],
    );
    let d = Daemon::start(&tree, &[("u.toml", &policy)]);
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).expect("mkdir");
    std::fs::set_permissions(&tools, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let l_allowed = listen_path(&allowed);
    let l_other = listen_path(&other);
    let l_tool = listen_path(&tools.join("t.sock"));
    let l_ok = listen_abstract(&ns, &format!("agseg-ok-{tag}"));
    let l_no = listen_abstract(&ns, &format!("agseg-no-{tag}"));
    let sink = UnixDatagram::bind(&dgram).expect("bind datagram");
    std::fs::set_permissions(&dgram, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    sink.set_nonblocking(true).expect("nonblocking");
    let other_dgram = dir.join("other-dgram.sock");
    let other_sink = UnixDatagram::bind(&other_dgram).expect("bind datagram");
    std::fs::set_permissions(&other_dgram, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    other_sink.set_nonblocking(true).expect("nonblocking");

    let run = |args: &[&str]| d.run_probe("bot.test.unix", &ns, args);
    let p = |path: &Path| path.display().to_string();
    // Listed: a path, an abstract name, a path under a listed prefix, a datagram peer.
    assert_eq!(run(&["unix-connect", &p(&allowed)]), "ok");
    assert_eq!(run(&["unix-connect", &format!("@agseg-ok-{tag}")]), "ok");
    let got = run(&["unix-connect", &p(&tools.join("t.sock"))]);
    assert_eq!(got, "ok", "{:#?}", d.audit_records());
    assert_eq!(run(&["unix-sendto", &p(&dgram)]), "ok");
    // Not listed: refused, and nothing arrives.
    assert_eq!(run(&["unix-connect", &p(&other)]), "EPERM");
    assert_eq!(run(&["unix-connect", &format!("@agseg-no-{tag}")]), "EPERM");
    assert_eq!(run(&["unix-sendto", &p(&other_dgram)]), "EPERM");
    // Another spelling of a path does not get out from under a prefix, nor around a deny.
    let sneaky = format!("{}/tools/../other.sock", dir.display());
    assert_eq!(run(&["unix-connect", &sneaky]), "EPERM");
    let doubled = format!("{}/tools//t.sock", dir.display());
    assert_eq!(run(&["unix-connect", &doubled]), "EPERM");
    // The daemon's own control socket: refused to every member, whatever its list.
    assert_eq!(run(&["unix-connect", &p(&d.socket)]), "EPERM");

    assert_eq!(accepted(&l_allowed), 1);
    assert_eq!(accepted(&l_ok), 1);
    assert_eq!(accepted(&l_tool), 1);
    assert_eq!(accepted(&l_other), 0, "an unlisted path was reached");
    assert_eq!(accepted(&l_no), 0, "an unlisted abstract name was reached");
    let mut buf = [0u8; 8];
    assert!(
        sink.recv(&mut buf).is_ok(),
        "the listed datagram peer got nothing"
    );
    assert!(
        other_sink.recv(&mut buf).is_err(),
        "an unlisted datagram peer was reached"
    );
    // Every refusal is an event naming its hook and the address.
    let refused = d.wait_records(6, |r| {
        r["kind"] == "deny" && (r["hook"] == "connect_unix" || r["hook"] == "sendmsg_unix")
    });
    let paths: Vec<&str> = refused.iter().filter_map(|r| r["path"].as_str()).collect();
    for want in [
        p(&other),
        format!("@agseg-no-{tag}"),
        p(&other_dgram),
        sneaky.clone(),
        p(&d.socket),
    ] {
        assert!(
            paths.contains(&want.as_str()),
            "no event for {want}: {paths:?}"
        );
    }
    assert!(
        refused
            .iter()
            .any(|r| r["hook"] == "sendmsg_unix" && r["rule"] == "default-deny")
    );
    assert!(
        refused
            .iter()
            .any(|r| r["rule"] == "control-socket" && r["path"] == p(&d.socket).as_str())
    );
    assert!(refused.iter().any(|r| r["rule"] == "malformed"));
}

#[test]
fn a_quarantined_agent_cannot_reach_a_denied_peer_through_a_local_relay() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let shared = shared_dir();
    let relay_path = shared.path().join("relay.sock");
    let d = Daemon::start(
        &tree,
        &[(
            "u.toml",
            &unix_segment("bot.test.relay", &[relay_path.display().to_string()]),
        )],
    );
    // The relay: a deputy outside the pen that forwards a datagram to a peer the segment
    // denies (127.0.0.1:9999) for every connection it accepts.
    let relay = listen_path(&relay_path);
    let denied_peer = UdpSink::bind(&ns, "127.0.0.1:9999");
    let forward = ns.within(|| std::net::UdpSocket::bind("127.0.0.1:0").expect("relay socket"));
    let pump = || {
        for _ in 0..accepted(&relay) {
            forward.send_to(b"x", "127.0.0.1:9999").expect("relay send");
        }
    };
    // Control: before the quarantine the relay works (the deputy is outside: that is the
    // operator's risk, and why `check` warns about deputies).
    let run = |args: &[&str]| d.run_probe("bot.test.relay", &ns, args);
    let relay_arg = relay_path.display().to_string();
    assert_eq!(run(&["unix-connect", &relay_arg]), "ok");
    pump();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(denied_peer.count(), 1, "the control relay did not forward");
    // Quarantined: AF_UNIX is cut too; the relay is never reached.
    let out = d.cli(&[
        "quarantine",
        "--segment",
        "bot.test.relay",
        "--reason",
        "relay test",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(run(&["unix-connect", &relay_arg]), "EPERM");
    assert_eq!(run(&["sendto", "127.0.0.1:9998"]), "EPERM");
    pump();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        denied_peer.count(),
        0,
        "a quarantined agent reached the relay"
    );
    d.wait_records(1, |r| {
        r["hook"] == "connect_unix" && r["rule"] == "quarantine" && r["path"] == relay_arg.as_str()
    });
    // Released: the relay answers again (checked with traffic, not with `status`).
    let out = d.cli(&["release", "--segment", "bot.test.relay"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(run(&["unix-connect", &relay_arg]), "ok");
}

/// A segment allowing UDP to 127.0.0.1:9998 only, with `tree/members/m1` as a member cgroup
/// and the given AF_UNIX paths.
fn handoff_segment(tree: &CgroupTree, unix: &[String]) -> String {
    format!(
        "{}[members]\ncgroups = [\"{}\"]\n",
        unix_segment("bot.test.handoff", unix),
        tree.rel("members/m1")
    )
}

/// Run the probe as root from `tree/outside` (a cgroup in no segment, under the enforcement
/// root) with `args`; returns its output line.
fn outside(tree: &CgroupTree, ns: &Netns, args: &[&str]) -> String {
    std::fs::create_dir_all(tree.abs("outside")).expect("mkdir outside");
    agentseg_tests::probe(ns, Some(&tree.abs("outside")), args)
}

#[test]
fn sockets_handed_in_from_outside_are_judged_by_the_member_using_them() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    std::fs::create_dir_all(tree.abs("members/m1")).expect("mkdir member");
    let shared = shared_dir();
    let fd_path = shared.path().join("fd.sock");
    let d = Daemon::start(
        &tree,
        &[(
            "h.toml",
            &handoff_segment(&tree, &[fd_path.display().to_string()]),
        )],
    );
    let denied = UdpSink::bind(&ns, "127.0.0.1:9999");
    let allowed = UdpSink::bind(&ns, "127.0.0.1:9998");
    let probe = probe_bin().display().to_string();
    let member = tree.abs("members/m1").display().to_string();
    // On stdin, to a process put into a declared member cgroup without `agentseg run` (no
    // launcher filters it): connected outside to the denied peer, then used inside.
    let connected = |target: &str| {
        outside(
            &tree,
            &ns,
            &[
                "pass-udp",
                target,
                &member,
                "connect",
                &probe,
                "send-stdin",
                "5",
            ],
        )
    };
    assert_eq!(
        connected("127.0.0.1:9998"),
        "eperm=0 other=0 ok=5",
        "control"
    );
    assert_eq!(connected("127.0.0.1:9999"), "eperm=5 other=0 ok=0");
    // Unconnected, sent to the denied peer by address.
    let unconnected = outside(
        &tree,
        &ns,
        &[
            "pass-udp",
            "127.0.0.1:9999",
            &member,
            "unconnected",
            &probe,
            "send-stdin",
            "5",
            "127.0.0.1:9999",
        ],
    );
    assert_eq!(unconnected, "eperm=5 other=0 ok=0");
    // Over SCM_RIGHTS from a helper outside to an agent (started by `agentseg run`, the
    // helper's path is in its [[unix]] list).
    let mut helper = Command::new(probe_bin())
        .args(["--netns", &ns.name, "--join-cgroup"])
        .arg(tree.abs("outside"))
        .args([
            "serve-fd",
            &fd_path.display().to_string(),
            "127.0.0.1:9999",
            "connect",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("fd helper");
    let mut line = String::new();
    BufReader::new(helper.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("helper ready");
    assert_eq!(line.trim(), "ready");
    let got = d.run_probe(
        "bot.test.handoff",
        &ns,
        &["recv-fd-send", &fd_path.display().to_string(), "5"],
    );
    let _ = helper.wait();
    assert_eq!(got, "eperm=5 other=0 ok=0");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        denied.count(),
        0,
        "a handed-in socket reached a denied peer"
    );
    assert_eq!(allowed.count(), 5, "the control sends did not arrive");
    // Every attempt is an event with the hook that judged it: the packet hook for the
    // connected sockets, sendmsg4 for the unconnected one.
    let events = d.wait_decisions(15, |r| {
        r["kind"] == "deny" && r["dst"] == "127.0.0.1" && r["dport"] == 9999
    });
    let by_hook = |h: &str| {
        events
            .iter()
            .filter(|r| r["hook"] == h)
            .map(agentseg_tests::decisions)
            .sum::<u64>()
    };
    assert_eq!(by_hook("skb_handoff"), 10, "{events:?}");
    assert_eq!(by_hook("sendmsg4"), 5, "{events:?}");
}

/// The link ids of the programs attached to `cgroup_id` (bpftool).
fn link_ids(cgroup_id: u64) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "list"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array()
        .map(|links| {
            links
                .iter()
                .filter(|l| l["type"] == "cgroup" && l["cgroup_id"].as_u64() == Some(cgroup_id))
                .filter_map(|l| l["id"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

fn inode(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"))
}

/// Poll `cond` every 10 ms for at most `within`.
fn eventually(within: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn enforcement_undone_from_outside_is_back_within_a_tick_with_an_alarm() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("u.toml", &unix_segment("bot.test.guard", &[]))]);
    let _sink = UdpSink::bind(&ns, "127.0.0.1:9999");
    assert_eq!(attachments(&tree.path), ROOT_PROGRAMS);
    // Detach every link at the enforcement root, as `bpftool link detach` would.
    let links = link_ids(inode(&tree.path));
    assert_eq!(links.len(), ROOT_PROGRAMS, "{links:?}");
    for id in &links {
        let out = Command::new("bpftool")
            .args(["link", "detach", "id", &id.to_string()])
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Back within a tick (250 ms; allow a second on a loaded machine).
    assert!(
        eventually(Duration::from_secs(1), || attachments(&tree.path)
            == ROOT_PROGRAMS),
        "the detached links were not re-attached"
    );
    assert_eq!(
        d.run_probe("bot.test.guard", &ns, &["sendto", "127.0.0.1:9999"]),
        "EPERM",
        "not enforcing after the repair"
    );
    assert_eq!(
        d.run_probe("bot.test.guard", &ns, &["sendto", "127.0.0.1:9998"]),
        "ok",
        "control"
    );
    let alarms = d.wait_records(ROOT_PROGRAMS, |r| {
        r["kind"] == "alarm" && r["what"] == "link detached" && r["repaired"] == true
    });
    assert!(alarms.len() >= ROOT_PROGRAMS);
    let status = d.status_json();
    assert!(
        status["alarms"].as_u64().unwrap_or(0) >= ROOT_PROGRAMS as u64,
        "{status}"
    );
    // A removed link pin is pinned again (the daemon holds the link, so it never detached).
    let layout = d.layout_dir();
    let pins: Vec<PathBuf> = std::fs::read_dir(layout.join("links"))
        .expect("links dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    let victim = pins.first().expect("a link pin").clone();
    std::fs::remove_file(&victim).expect("rm pin");
    assert!(
        eventually(Duration::from_secs(1), || victim.exists()),
        "a removed pin was not restored"
    );
    d.wait_records(1, |r| {
        r["kind"] == "alarm" && r["what"] == "link pin removed"
    });
}

#[test]
fn a_member_cgroup_used_in_its_first_instant_is_judged() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let policy = format!(
        "{}[members]\ncgroups = [\"{}\"]\n",
        unix_segment("bot.test.race", &[]),
        tree.rel("race/m")
    );
    let d = Daemon::start(&tree, &[("r.toml", &policy)]);
    let denied = UdpSink::bind(&ns, "127.0.0.1:9999");
    let dir = tree.abs("race/m").display().to_string();
    for round in 0..10 {
        // The process makes the cgroup, joins it and sends at once: no time for a rescan.
        let out = agentseg_tests::probe(&ns, None, &["mkcg-flood", &dir, "127.0.0.1:9999", "20"]);
        assert_eq!(out, "eperm=20 other=0 ok=0", "round {round}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(denied.count(), 0, "round {round}: a datagram got through");
        let _ = std::fs::remove_dir(&dir);
        // Let the daemon see it go, so the next round starts from an unregistered cgroup.
        assert!(eventually(Duration::from_secs(2), || {
            d.status_json()["segments"][0]["member_cgroups"]
                .as_array()
                .is_some_and(Vec::is_empty)
        }));
    }
    // Every datagram was refused with an event: pending (before registration) or the
    // segment's default deny (after).
    d.wait_decisions(200, |r| {
        r["kind"] == "deny"
            && r["hook"] == "sendmsg4"
            && r["dport"] == 9999
            && (r["rule"] == "pending-member" || r["rule"] == "default-deny")
    });
    // Control: a cgroup outside the guarded parent is not held, and its datagrams arrive.
    let elsewhere = tree.abs("elsewhere/x").display().to_string();
    let out = agentseg_tests::probe(
        &ns,
        None,
        &["mkcg-flood", &elsewhere, "127.0.0.1:9999", "20"],
    );
    assert_eq!(
        out, "eperm=0 other=0 ok=20",
        "a cgroup outside the pen was held"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(denied.count(), 20);
}
