//! Quarantine and packet-level enforcement against the real kernel: established flows cut,
//! ingress rules, ICMP and raw sockets, persistence, TTLs, and who may ask.
use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use agentseg_tests::{
    CgroupTree, Daemon, Listeners, Netns, Proc, Server, TcpCount, agentseg_bin, expect_line,
    kernel_ready, probe, probe_bin, wait_flowing, wait_silent, wait_until,
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

/// A child process killed on drop (its leftovers die with the test's cgroup tree).
/// An established flow between an agent of `segment` and a plain peer on `peer` (both ends
/// write every 10 ms and log what they receive), optionally with a connect loop in the same
/// agent to `looping` (address, stop file).
struct Flow {
    agent_log: PathBuf,
    peer_log: PathBuf,
    /// The agent (its launcher) and the peer.
    procs: Vec<Proc>,
}

impl Flow {
    fn start(
        d: &Daemon,
        ns: &Netns,
        segment: &str,
        tag: &str,
        peer: &str,
        looping: Option<(&str, &std::path::Path)>,
    ) -> Self {
        let peer_log = d.scratch().join(format!("peer-{tag}.log"));
        let agent_log = d.scratch().join(format!("agent-{tag}.log"));
        let mut peer_proc = Command::new(probe_bin())
            .args(["--netns", &ns.name, "stream-serve", peer])
            .arg(&peer_log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("peer");
        expect_line(&mut peer_proc, "ready");
        let log = agent_log.to_str().expect("utf8");
        let mut cmd = match looping {
            None => d.agent_command(segment, ns, &["stream", peer, log]),
            Some((addr, stop)) => {
                let script = format!(
                    "{p} loop {addr} {stop} 10 & exec {p} stream {peer} {log}",
                    p = probe_bin().display(),
                    stop = stop.display(),
                );
                let mut cmd = Command::new(agentseg_bin());
                cmd.arg("--socket").arg(&d.socket).args([
                    "run",
                    "--segment",
                    segment,
                    "--",
                    "sh",
                    "-c",
                    &script,
                ]);
                ns.enter_on_exec(&mut cmd);
                cmd
            }
        };
        let mut agent = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent");
        expect_line(&mut agent, "connected");
        let flow = Self {
            agent_log,
            peer_log,
            procs: vec![Proc(peer_proc), Proc(agent)],
        };
        flow.assert_flowing(&format!("flow {tag} at its start"));
        flow
    }

    /// The next line the agent prints.
    fn next_line(&mut self) -> String {
        let mut line = String::new();
        BufReader::new(self.procs[1].0.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        line.trim().to_owned()
    }

    /// Both ends receive (within one quiet period each).
    fn assert_flowing(&self, what: &str) {
        wait_flowing(&self.peer_log, &format!("{what}, agent to peer"));
        wait_flowing(&self.agent_log, &format!("{what}, peer to agent"));
    }

    /// Neither end hears the other any more (one quiet period each).
    fn assert_cut(&self, what: &str) {
        wait_silent(&self.peer_log, &format!("{what}, agent to peer"));
        wait_silent(&self.agent_log, &format!("{what}, peer to agent"));
    }
}

/// `agentseg ARGS` must succeed.
fn cli_ok(d: &Daemon, args: &[&str]) {
    let out = d.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Agent ids in `status`.
fn agent_ids(d: &Daemon) -> Vec<String> {
    d.status_json()["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["agent_id"].as_str().expect("agent id").to_owned())
        .collect()
}

#[test]
fn quarantining_an_agent_cuts_its_established_flow_and_release_restores_it() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    // The quarantined agent's connect loop goes to 8081; fresh agents' connects to 8080.
    let looped = TcpCount::bind_deep(&ns, "127.0.0.1:8081");
    let l = Listeners::bind(&ns, &["127.0.0.1:8080"], &[]);
    let d = Daemon::start(&tree, &[("a.toml", &policy("bot.test.quar", None))]);
    let stop = d.scratch().join("stop-a");
    // Agent A (to be quarantined): a stream and a connect loop. Agent B: a stream, the control
    // under the same conditions.
    let mut a = Flow::start(
        &d,
        &ns,
        "bot.test.quar",
        "a",
        "127.0.0.1:8090",
        Some(("127.0.0.1:8081", &stop)),
    );
    let id = agent_ids(&d).pop().expect("agent A");
    let b = Flow::start(&d, &ns, "bot.test.quar", "b", "127.0.0.1:8091", None);
    let mut accepted = 0;
    let mut more = |n: usize, what: &str| {
        let want = accepted + n;
        wait_until(Duration::from_secs(5), what, || {
            accepted += looped.count();
            accepted >= want
        });
    };
    more(5, "A's connects before the quarantine");
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let asked = unix_now();
    cli_ok(
        &d,
        &["quarantine", "--agent", &id, "--reason", "exfil suspected"],
    );
    a.assert_cut("A's flow after its quarantine");
    // A's new connects are refused, by the quarantine.
    let is_a_loop_denial = |r: &serde_json::Value| {
        r["kind"] == "deny" && r["agent_id"] == id.as_str() && r["dport"] == 8081
    };
    let denial = d.wait_records(1, is_a_loop_denial);
    assert_eq!(denial[0]["rule"], "quarantine", "{:?}", denial[0]);
    // B, same segment, same peer address: its flow runs on, and new agents connect.
    b.assert_flowing("B's flow while A is quarantined");
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.1:8080",
            d.run_probe("bot.test.quar", &ns, &["connect", "tcp", "127.0.0.1:8080"])
        ),
        "ok"
    );
    // The status names what, why, who and since when.
    let status = d.status_json();
    let agents = status["agents"].as_array().expect("agents");
    let qa: Vec<_> = agents
        .iter()
        .filter(|a| !a["quarantine"].is_null())
        .collect();
    assert_eq!(qa.len(), 1, "{status}");
    assert_eq!(qa[0]["agent_id"], id.as_str());
    let q = &qa[0]["quarantine"];
    assert_eq!(q["reason"], "exfil suspected");
    assert_eq!(q["by_uid"], 0);
    let since = q["since_unix"].as_u64().unwrap_or(0);
    assert!(
        (asked..=unix_now()).contains(&since),
        "since {since}, asked at {asked}"
    );
    assert_eq!(status["quarantines"].as_array().map(Vec::len), Some(1));
    // Released: A's own traffic goes through again, new connects and its established flow.
    cli_ok(&d, &["release", "--agent", &id]);
    more(5, "A's connects after the release");
    a.assert_flowing("A's flow after the release");
    assert!(
        d.status_json()["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .all(|a| a["quarantine"].is_null())
    );
    // Every connect of A's loop is accounted for: successes reached the listener, failures
    // are the quarantine's recorded denials, and the last ones (after the release) succeed.
    std::fs::write(&stop, b"").expect("stop");
    let summary = a.next_line();
    drop(a);
    let field = |k: &str| {
        summary
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {summary:?}"))
            .to_owned()
    };
    let (ok, err): (usize, usize) = (
        field("ok=").parse().expect("ok"),
        field("err=").parse().expect("err"),
    );
    accepted += looped.count();
    // Refused by connect4: one decision per failed connect (the kernel folds the loop's
    // repeats into records with counts; the last ones come with the daemon's sweep, within a
    // second or two). A connect on its way when the quarantine came is cut on the wire
    // instead: its packets (SYN and retransmissions, or the FIN of one that got through) are
    // records of one source port, and the connect may have failed or not.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (loop_denials, at_connect, on_the_wire) = loop {
        let records = d.audit_records();
        let loop_denials: Vec<_> = records.into_iter().filter(is_a_loop_denial).collect();
        let at_connect: u64 = loop_denials
            .iter()
            .filter(|r| r["hook"] == "connect4")
            .map(agentseg_tests::decisions)
            .sum();
        let on_the_wire: std::collections::BTreeSet<_> = loop_denials
            .iter()
            .filter(|r| r["hook"] == "skb_egress")
            .map(|r| r["sport"].as_u64())
            .collect();
        if at_connect + on_the_wire.len() as u64 >= err as u64
            || std::time::Instant::now() > deadline
        {
            break (loop_denials, at_connect as usize, on_the_wire);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let hooks: std::collections::BTreeMap<String, u64> =
        loop_denials.iter().fold(Default::default(), |mut m, r| {
            *m.entry(format!("{}/{}", r["hook"], r["rule"])).or_default() +=
                agentseg_tests::decisions(r);
            m
        });
    assert_eq!(
        ok, accepted,
        "A's successful connects vs the listener: {summary}"
    );
    assert!(
        (at_connect..=at_connect + on_the_wire.len()).contains(&err),
        "A's failed connects vs the recorded denials: {summary}; decisions by hook: {hooks:?}"
    );
    let wire_records = loop_denials
        .iter()
        .filter(|r| r["hook"] == "skb_egress")
        .count();
    let connect_records = loop_denials
        .iter()
        .filter(|r| r["hook"] == "connect4")
        .count();
    assert_eq!(
        loop_denials.len(),
        connect_records + wire_records,
        "denials of A's loop from another hook: {hooks:?}"
    );
    assert_eq!(field("last="), "EPERM", "{summary}");
    // The history names both events with the caller's uid.
    let log = std::fs::read_to_string(d.dir.path().join("state/quarantine.log")).expect("log");
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("\"action\":\"quarantine\"") && log.contains("\"action\":\"release\""));
    assert!(log.contains("\"by_uid\":0"));
    drop(b);
}

#[test]
fn quarantining_a_segment_cuts_flows_and_keeps_only_its_allow_list() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(
        &ns,
        &["127.0.0.1:8080", "127.0.0.5:8080"],
        &["127.0.0.1:8080"],
    );
    let d = Daemon::start(&tree, &[("a.toml", &policy("bot.test.segq", None))]);
    let run = |args: &[&str]| d.run_probe("bot.test.segq", &ns, args);
    // Two agents of the segment: a flow to a peer only its rules allow, and one to a peer on
    // its quarantine allow list (the control under the same conditions).
    let cut = Flow::start(&d, &ns, "bot.test.segq", "cut", "127.0.0.1:8090", None);
    let kept = Flow::start(&d, &ns, "bot.test.segq", "kept", "127.0.0.5:8090", None);
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.1:8080",
            run(&["connect", "tcp", "127.0.0.1:8080"])
        ),
        "ok"
    );
    cli_ok(
        &d,
        &[
            "quarantine",
            "--segment",
            "bot.test.segq",
            "--reason",
            "incident 42",
        ],
    );
    cut.assert_cut("the flow to 127.0.0.1 after the quarantine");
    kept.assert_flowing("the flow to the allow-listed 127.0.0.5 during the quarantine");
    // New connects and sends fail with EPERM, except to the quarantine allow list.
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.1:8080",
            run(&["connect", "tcp", "127.0.0.1:8080"])
        ),
        "EPERM"
    );
    assert_eq!(
        l.judged("udp", "127.0.0.1:8080", run(&["sendto", "127.0.0.1:8080"])),
        "EPERM"
    );
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.5:8080",
            run(&["connect", "tcp", "127.0.0.5:8080"])
        ),
        "ok"
    );
    assert_eq!(
        d.status_json()["segments"][0]["quarantine"]["reason"],
        "incident 42"
    );
    cli_ok(&d, &["release", "--segment", "bot.test.segq"]);
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.1:8080",
            run(&["connect", "tcp", "127.0.0.1:8080"])
        ),
        "ok"
    );
    cut.assert_flowing("the cut flow after the release");
    l.assert_silent("at the end");
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

/// Counts the ICMP echo requests the namespace receives for one address: a raw ICMP socket
/// outside any segment gets a copy of every ICMP packet that arrives (the proof that a denied
/// echo never left).
struct EchoRequests {
    sock: OwnedFd,
    dst: Ipv4Addr,
}

impl EchoRequests {
    fn bind(ns: &Netns, dst: &str) -> Self {
        let dst: Ipv4Addr = dst.parse().expect("address");
        let sock = ns.within(|| {
            // SAFETY: plain socket(2), owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        Self { sock, dst }
    }

    /// Echo requests to the address since the last look.
    fn count(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        loop {
            // SAFETY: a valid buffer of its length.
            let got =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 {
                return n;
            }
            let pkt = &buf[..got as usize];
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if pkt.len() > ihl && pkt[16..20] == self.dst.octets() && pkt[ihl] == 8 {
                n += 1;
            }
        }
    }
}

#[test]
fn icmp_echo_from_ping_and_raw_sockets_follows_the_rules() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let (to_allowed, to_denied) = (
        EchoRequests::bind(&ns, "127.0.0.1"),
        EchoRequests::bind(&ns, "127.0.0.2"),
    );
    let d = Daemon::start(&tree, &[("a.toml", &policy("ops.test.icmp", None))]);
    for kind in ["ping", "rawping"] {
        // Outside a segment the denied peer answers: the counter sees its request.
        assert_eq!(
            probe(&ns, None, &[kind, "127.0.0.2:0"]),
            "ok",
            "{kind} outside a segment"
        );
        assert_eq!(to_denied.count(), 1, "{kind} outside a segment");
        assert_eq!(
            d.run_probe("ops.test.icmp", &ns, &[kind, "127.0.0.1:0"]),
            "ok",
            "{kind} to an allowed peer"
        );
        assert_eq!(to_allowed.count(), 1, "{kind} to an allowed peer");
        assert_eq!(
            d.run_probe("ops.test.icmp", &ns, &[kind, "127.0.0.2:0"]),
            "EPERM",
            "{kind} to a denied peer"
        );
        assert_eq!(to_denied.count(), 0, "{kind}: a denied echo request left");
    }
}

#[test]
fn quarantine_survives_kill_9_and_restart_and_a_ttl_lifts_itself() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.1:8080", "127.0.0.5:8080"], &[]);
    std::fs::create_dir_all(tree.abs("m")).expect("mkdir");
    let mut d = Daemon::start(
        &tree,
        &[("a.toml", &policy("job.test.persist", Some(&tree.rel("m"))))],
    );
    let m = tree.abs("m");
    let tcp = |dst: &str| l.judged("tcp", dst, probe(&ns, Some(&m), &["connect", "tcp", dst]));
    // Quarantined: only the allow list (127.0.0.5) is reachable, whatever happens to the daemon.
    let held = |when: &str| {
        assert_eq!(tcp("127.0.0.1:8080"), "EPERM", "lifted {when}");
        assert_eq!(tcp("127.0.0.5:8080"), "ok", "allow list {when}");
    };
    assert_eq!(tcp("127.0.0.1:8080"), "ok");
    cli_ok(
        &d,
        &[
            "quarantine",
            "--segment",
            "job.test.persist",
            "--reason",
            "held",
        ],
    );
    held("by nothing");
    d.kill9();
    held("by the crash");
    d.launch().expect("restart");
    held("by the restart");
    assert_eq!(
        d.status_json()["segments"][0]["quarantine"]["reason"],
        "held"
    );
    cli_ok(&d, &["release", "--segment", "job.test.persist"]);
    assert_eq!(tcp("127.0.0.1:8080"), "ok", "after the release");
    // A TTL quarantine lifts itself.
    cli_ok(
        &d,
        &[
            "quarantine",
            "--segment",
            "job.test.persist",
            "--reason",
            "cool-off",
            "--ttl",
            "1s",
        ],
    );
    held("at once by a TTL quarantine");
    wait_until(
        Duration::from_secs(5),
        "the TTL lifts the quarantine",
        || tcp("127.0.0.1:8080") == "ok",
    );
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
    // The controls: the same requests from root outside any segment are carried out.
    cli_ok(&d, &q);
    let status = d.status_json();
    assert_eq!(
        status["segments"][0]["quarantine"]["reason"], "nobody",
        "{status}"
    );
    cli_ok(&d, &["release", "--segment", "bot.test.ctl"]);
    assert!(
        d.status_json()["quarantines"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    drop(ns);
}
