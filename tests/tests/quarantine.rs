//! Quarantine and packet-level enforcement against the real kernel: established flows cut,
//! ingress rules, ICMP and raw sockets, persistence, TTLs, and who may ask.
use std::{
    io::{BufRead as _, BufReader},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agentseg_tests::{
    CgroupTree, Daemon, Netns, Server, agentseg_bin, kernel_ready, probe, probe_bin,
};

/// A segment: TCP to 127.0.0.1 and 127.0.0.5 on 8080-8099, ICMP to 127.0.0.1, TCP in from
/// 127.0.0.1 on 9000, and 127.0.0.5 stays reachable during quarantine.
fn policy(name: &str, members: Option<&str>) -> String {
    let members = members
        .map(|m| format!("[members]\ncgroups = [\"{m}\"]\n"))
        .unwrap_or_default();
    format!(
        r#"name = "{name}"
# Raw ICMP needs a raw socket and CAP_NET_RAW: the agents get exactly that.
capabilities = ["net_raw"]
[[egress]]
cidrs = ["127.0.0.1", "127.0.0.5"]
ports = ["8080-8099"]
protocol = "tcp"
[[egress]]
cidrs = ["127.0.0.1"]
protocol = "icmp"
[[ingress]]
cidrs = ["127.0.0.1"]
ports = [9000]
protocol = "tcp"
[quarantine]
allow = ["127.0.0.5"]
[sockets]
raw = true
{members}"#
    )
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A child process killed on drop (its leftovers die with the test's cgroup tree).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for one line on a child's stdout.
fn expect_line(child: &mut Child, want: &str) {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), want, "child said {line:?}");
}

fn rx_times(log: &Path) -> Vec<u128> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("rx ").and_then(|t| t.parse().ok()))
        .collect()
}

/// An established flow between an agent of `segment` and a plain peer on 127.0.0.1:8090, both
/// writing every 10 ms; returns (agent log, peer log, processes).
fn flow(d: &Daemon, ns: &Netns, segment: &str, tag: &str) -> (PathBuf, PathBuf, Vec<Proc>) {
    let peer_log = d.scratch().join(format!("peer-{tag}.log"));
    let agent_log = d.scratch().join(format!("agent-{tag}.log"));
    let mut peer = Command::new(probe_bin())
        .args(["--netns", &ns.name, "stream-serve", "127.0.0.1:8090"])
        .arg(&peer_log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("peer");
    expect_line(&mut peer, "ready");
    let mut agent = d
        .agent_command(
            segment,
            ns,
            &[
                "stream",
                "127.0.0.1:8090",
                agent_log.to_str().expect("utf8"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    expect_line(&mut agent, "connected");
    (agent_log, peer_log, vec![Proc(peer), Proc(agent)])
}

/// Quarantine `args`, then check that neither end of the flow hears the other 100 ms later.
fn assert_flow_cut(d: &Daemon, agent_log: &Path, peer_log: &Path, args: &[&str]) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !rx_times(agent_log).is_empty() && !rx_times(peer_log).is_empty(),
        "the flow never ran"
    );
    let out = d.cli(args);
    assert!(
        out.status.success(),
        "quarantine: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = now_ms();
    std::thread::sleep(Duration::from_millis(600));
    for (side, log) in [("agent", agent_log), ("peer", peer_log)] {
        let last = rx_times(log).into_iter().max().unwrap_or(0);
        assert!(
            last <= done + 100,
            "the {side} still received {} ms after the quarantine",
            last - done
        );
    }
}

#[test]
fn quarantining_an_agent_cuts_its_established_flow_and_release_restores_it() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080"]);
    let d = Daemon::start(&tree, &[("a.toml", &policy("bot.test.quar", None))]);
    let (agent_log, peer_log, _procs) = flow(&d, &ns, "bot.test.quar", "agent");
    let status = d.status_json();
    let id = status["agents"][0]["agent_id"]
        .as_str()
        .expect("agent id")
        .to_owned();
    assert_flow_cut(
        &d,
        &agent_log,
        &peer_log,
        &["quarantine", "--agent", &id, "--reason", "exfil suspected"],
    );
    // The status names what, why, who and since when.
    let status = d.status_json();
    let q = &status["agents"][0]["quarantine"];
    assert_eq!(q["reason"], "exfil suspected");
    assert_eq!(q["by_uid"], 0);
    assert!(q["since_unix"].as_u64().unwrap_or(0) > 0);
    assert_eq!(status["quarantines"].as_array().map(Vec::len), Some(1));
    // Other agents of the segment are not affected.
    assert_eq!(
        d.run_probe("bot.test.quar", &ns, &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
    let out = d.cli(&["release", "--agent", &id]);
    assert!(
        out.status.success(),
        "release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.status_json()["agents"][0]["quarantine"].is_null());
    // The history names both events with the caller's uid.
    let log = std::fs::read_to_string(d.dir.path().join("state/quarantine.log")).expect("log");
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("\"action\":\"quarantine\"") && log.contains("\"action\":\"release\""));
    assert!(log.contains("\"by_uid\":0"));
}

#[test]
fn quarantining_a_segment_cuts_flows_and_keeps_only_its_allow_list() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080"]);
    let d = Daemon::start(&tree, &[("a.toml", &policy("bot.test.segq", None))]);
    let (agent_log, peer_log, _procs) = flow(&d, &ns, "bot.test.segq", "seg");
    assert_flow_cut(
        &d,
        &agent_log,
        &peer_log,
        &[
            "quarantine",
            "--segment",
            "bot.test.segq",
            "--reason",
            "incident 42",
        ],
    );
    // New connects fail with EPERM, except to the quarantine allow list.
    assert_eq!(
        d.run_probe("bot.test.segq", &ns, &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("bot.test.segq", &ns, &["sendto", "127.0.0.1:8080"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("bot.test.segq", &ns, &["connect", "tcp", "127.0.0.5:8080"]),
        "ok"
    );
    assert_eq!(
        d.status_json()["segments"][0]["quarantine"]["reason"],
        "incident 42"
    );
    let out = d.cli(&["release", "--segment", "bot.test.segq"]);
    assert!(out.status.success());
    assert_eq!(
        d.run_probe("bot.test.segq", &ns, &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
}

#[test]
fn ingress_rules_admit_allowed_peers_only() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080"]);
    let d = Daemon::start(&tree, &[("a.toml", &policy("web.test.ingress", None))]);
    let mut agent = d
        .agent_command(
            "web.test.ingress",
            &ns,
            &["serve", "0.0.0.0:9000", "0.0.0.0:9001"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent server");
    expect_line(&mut agent, "ready");
    let _agent = Proc(agent);
    // From outside any segment: 127.0.0.1 may reach 9000, 127.0.0.2 gets nothing, and no one
    // reaches 9001.
    assert_eq!(
        probe(
            &ns,
            None,
            &["connect-from", "127.0.0.1:0", "127.0.0.1:9000"]
        ),
        "ok"
    );
    assert_eq!(
        probe(
            &ns,
            None,
            &["connect-from", "127.0.0.2:0", "127.0.0.1:9000"]
        ),
        "ETIMEDOUT"
    );
    assert_eq!(
        probe(
            &ns,
            None,
            &["connect-from", "127.0.0.1:0", "127.0.0.1:9001"]
        ),
        "ETIMEDOUT"
    );
    // The replies of the agent's own outbound flows are not judged by its ingress rules
    // (which admit nothing from port 8080).
    assert_eq!(
        d.run_probe(
            "web.test.ingress",
            &ns,
            &["connect", "tcp", "127.0.0.1:8080"]
        ),
        "ok"
    );
}

#[test]
fn icmp_echo_from_ping_and_raw_sockets_follows_the_rules() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("a.toml", &policy("ops.test.icmp", None))]);
    for kind in ["ping", "rawping"] {
        assert_eq!(
            probe(&ns, None, &[kind, "127.0.0.2:0"]),
            "ok",
            "{kind} outside a segment"
        );
        assert_eq!(
            d.run_probe("ops.test.icmp", &ns, &[kind, "127.0.0.1:0"]),
            "ok",
            "{kind} to an allowed peer"
        );
        let denied = d.run_probe("ops.test.icmp", &ns, &[kind, "127.0.0.2:0"]);
        assert!(
            denied == "EPERM" || denied == "ETIMEDOUT",
            "{kind} to a denied peer: {denied}"
        );
    }
}

#[test]
fn quarantine_survives_kill_9_and_restart_and_a_ttl_lifts_itself() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080"]);
    std::fs::create_dir_all(tree.abs("m")).expect("mkdir");
    let mut d = Daemon::start(
        &tree,
        &[("a.toml", &policy("job.test.persist", Some(&tree.rel("m"))))],
    );
    let m = tree.abs("m");
    let out = d.cli(&[
        "quarantine",
        "--segment",
        "job.test.persist",
        "--reason",
        "held",
    ]);
    assert!(out.status.success());
    assert_eq!(
        probe(&ns, Some(&m), &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    d.kill9();
    assert_eq!(
        probe(&ns, Some(&m), &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM",
        "lifted by the crash"
    );
    d.launch().expect("restart");
    assert_eq!(
        probe(&ns, Some(&m), &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM",
        "lifted by the restart"
    );
    assert_eq!(
        d.status_json()["segments"][0]["quarantine"]["reason"],
        "held"
    );
    let out = d.cli(&["release", "--segment", "job.test.persist"]);
    assert!(out.status.success());
    assert_eq!(
        probe(&ns, Some(&m), &["connect", "tcp", "127.0.0.1:8080"]),
        "ok"
    );
    // A TTL quarantine lifts itself.
    let out = d.cli(&[
        "quarantine",
        "--segment",
        "job.test.persist",
        "--reason",
        "cool-off",
        "--ttl",
        "1s",
    ]);
    assert!(out.status.success());
    assert_eq!(
        probe(&ns, Some(&m), &["connect", "tcp", "127.0.0.1:8080"]),
        "EPERM"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe(&ns, Some(&m), &["connect", "tcp", "127.0.0.1:8080"]) != "ok" {
        assert!(
            Instant::now() < deadline,
            "the TTL never lifted the quarantine"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.status_json()["quarantines"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
}

#[test]
fn the_control_socket_refuses_non_root_and_callers_inside_a_segment() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("a.toml", &policy("bot.test.ctl", None))]);
    // A copy of the binary that uid 65534 may execute.
    let bin_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let bin = bin_dir.path().join("agentseg");
    std::fs::copy(agentseg_bin(), &bin).expect("copy");
    let as_nobody = |args: &[&str]| {
        Command::new(&bin)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run")
    };
    let q = [
        "quarantine",
        "--segment",
        "bot.test.ctl",
        "--reason",
        "nobody",
    ];
    // The socket is root-only on disk...
    let out = as_nobody(&q);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and the daemon checks the caller's credentials even when it can be reached.
    for dir in [d.dir.path(), d.socket.parent().expect("socket dir")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    }
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody(&q);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("not root"),
        "{err}"
    );
    // Root, but from inside a segment: the kernel refuses the connect itself (the control
    // socket is refused to every member, whatever its rules), and says so in the audit log.
    std::fs::write(
        d.policies.join("a.toml"),
        policy("bot.test.ctl", None).replace(
            "name = \"bot.test.ctl\"",
            "name = \"bot.test.ctl\"\nallow_root = true",
        ),
    )
    .expect("write policy");
    let reload = d.cli(&["reload"]);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let inside = d.cli(&[
        "run",
        "--segment",
        "bot.test.ctl",
        "--user",
        "root",
        "--",
        agentseg_bin().to_str().expect("utf8"),
        "--socket",
        d.socket.to_str().expect("utf8"),
        "release",
        "--segment",
        "bot.test.ctl",
    ]);
    assert!(!inside.status.success());
    assert!(
        String::from_utf8_lossy(&inside.stderr)
            .contains("closed to every process inside a segment"),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    d.wait_records(1, |r| {
        r["hook"] == "connect_unix" && r["rule"] == "control-socket"
    });
    // Nothing changed.
    assert!(
        d.status_json()["quarantines"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    drop(ns);
}
