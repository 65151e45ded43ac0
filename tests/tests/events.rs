//! Events, the tamper-evident audit log, detectors and metrics against the real kernel.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentseg_tests::{
    CgroupTree, Daemon, Netns, TcpCount, UdpSink, agentseg_bin, free_port, kernel_ready, metric,
    probe_bin, scrape, wait_flowing, wait_silent, wait_until,
};

const SEG: &str = r#"
name = "bot.test.events"
[[egress]]
cidrs = ["127.0.0.1"]
ports = [8080]
protocol = "tcp"

[[egress]]
cidrs = ["127.0.0.9"]
ports = [9999]
protocol = "udp"
"#;

#[test]
fn denials_become_attributed_audit_records_allows_count_per_rule_and_metrics_agree() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let (allowed_peer, denied_peer) = (
        TcpCount::bind(&ns, "127.0.0.1:8080"),
        TcpCount::bind(&ns, "127.0.0.1:8081"),
    );
    let port = free_port();
    let d = Daemon::start_with(
        &tree,
        &[("bot.toml", SEG)],
        &["--metrics", &format!("127.0.0.1:{port}")],
    );
    // One agent makes three denied connects and one allowed one.
    let out = d.cli_in(&ns, &[
        "run", "--segment", "bot.test.events", "--", "sh", "-c",
        &format!(
            "for i in 1 2 3; do {p} connect tcp 127.0.0.1:8081; done; {p} connect tcp 127.0.0.1:8080",
            p = agentseg_tests::probe_bin().display(),
        ),
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["EPERM", "EPERM", "EPERM", "ok"]
    );
    assert_eq!(allowed_peer.count(), 1, "the allowed connect arrived once");
    assert_eq!(denied_peer.count(), 0, "a denied connect reached its peer");
    let agent_id = agentseg_tests::sandbox::agent_id(&out);
    let denies = d.wait_records(3, |r| r["kind"] == "deny");
    assert_eq!(denies.len(), 3, "{denies:?}");
    let mut pids = std::collections::BTreeSet::new();
    for r in &denies {
        assert_eq!(r["segment"], "bot.test.events");
        assert_eq!(r["agent_id"], agent_id.as_str());
        assert_eq!(r["hook"], "connect4");
        assert_eq!(r["protocol"], "tcp");
        assert_eq!(r["dst"], "127.0.0.1");
        assert_eq!(r["dport"], 8081);
        assert_eq!(r["rule"], "default-deny");
        assert_eq!(r["comm"], "agentseg-probe");
        assert!(r["pid"].as_u64().unwrap_or(0) > 0);
        pids.insert(r["pid"].as_u64());
    }
    assert_eq!(pids.len(), 3, "three processes, three pids");
    assert!(
        d.audit_records().iter().all(|r| r["kind"] != "allow"),
        "allows are not events by default"
    );
    // The allowed connect raised its rule's counter; the UDP rule was never used.
    let out = d.cli(&["audit", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("audit json");
    let rules = report["rules"].as_array().expect("rules");
    let tcp = rules
        .iter()
        .find(|r| {
            r["origin"]
                .as_str()
                .is_some_and(|o| o.ends_with("bot.toml:3"))
        })
        .expect("tcp rule");
    assert_eq!(tcp["hits"], 1, "{report}");
    let unused = report["unused_rules"].as_array().expect("unused");
    assert!(
        unused.iter().any(|r| r["origin"]
            .as_str()
            .is_some_and(|o| o.ends_with("bot.toml:8"))),
        "{report}"
    );
    assert!(!unused.iter().any(|r| {
        r["origin"]
            .as_str()
            .is_some_and(|o| o.ends_with("bot.toml:3"))
    }));
    assert_eq!(report["segments"][0]["allowed"], 1, "{report}");
    assert_eq!(report["segments"][0]["denied"], 3, "{report}");
    let text = String::from_utf8_lossy(&d.cli(&["audit"]).stdout).into_owned();
    assert!(
        text.contains("bot.toml:8"),
        "the text report names the unused rule:\n{text}"
    );
    // The metrics agree with what the test did.
    let m = scrape(port);
    assert_eq!(
        metric(
            &m,
            "agentseg_decisions_total{segment=\"bot.test.events\",verdict=\"deny\"}"
        ),
        3
    );
    assert_eq!(
        metric(
            &m,
            "agentseg_decisions_total{segment=\"bot.test.events\",verdict=\"allow\"}"
        ),
        1
    );
    assert_eq!(metric(&m, "agentseg_events_lost_total"), 0);
    // Hits count from when the policy was applied: two reloads bring the first half back,
    // and it must not carry the old count.
    for _ in 0..2 {
        assert!(d.cli(&["reload"]).status.success());
    }
    let report: serde_json::Value =
        serde_json::from_slice(&d.cli(&["audit", "--json"]).stdout).expect("audit json");
    let tcp = report["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| {
            r["origin"]
                .as_str()
                .is_some_and(|o| o.ends_with("bot.toml:3"))
        })
        .cloned()
        .expect("tcp rule");
    assert_eq!(tcp["hits"], 0, "{report}");
    // `events` shows them too, and only them (read long after the denials: no late duplicate).
    let out = d.cli(&["events", "--json", "--agent", &agent_id]);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["kind"] == "deny" && e["dport"] == 8081 && e["hook"] == "connect4"),
        "{events:?}"
    );
    assert_eq!(
        d.audit_records()
            .iter()
            .filter(|r| r["kind"] == "deny")
            .count(),
        3
    );
}

#[test]
fn the_audit_log_verifies_and_one_changed_character_is_named() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let (denied_peer, allowed_peer) = (
        UdpSink::bind(&ns, "127.0.0.2:9053"),
        UdpSink::bind(&ns, "127.0.0.9:9999"),
    );
    let mut d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    for _ in 0..5 {
        assert_eq!(
            d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.2:9053"]),
            "EPERM"
        );
    }
    // The allowed control: the same agent's send to its allowed peer goes through.
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.9:9999"]),
        "ok"
    );
    wait_until(Duration::from_secs(2), "the allowed datagram", || {
        allowed_peer.count() == 1
    });
    assert_eq!(denied_peer.count(), 0, "a denied send reached its peer");
    d.wait_records(5, |r| r["kind"] == "deny");
    d.stop();
    let log = d.audit_log();
    let verify = |log: &std::path::Path| {
        Command::new(agentseg_bin())
            .args(["audit", "verify", "--log"])
            .arg(log)
            .output()
            .expect("verify")
    };
    let ok = verify(&log);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Change one character of line 3 (a digit of the destination address).
    let text = std::fs::read_to_string(&log).expect("log");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    // Five denials, nothing else (the allowed send is not an event).
    assert_eq!(lines.len(), 5, "{text}");
    let target = lines
        .iter()
        .position(|l| l.contains("\"127.0.0.2\""))
        .expect("a deny line");
    lines[target] = lines[target].replacen("127.0.0.2", "127.0.0.3", 1);
    std::fs::write(&log, lines.join("\n") + "\n").expect("write");
    let bad = verify(&log);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains(&format!("audit.jsonl:{}:", target + 1)),
        "names line {}: {err}",
        target + 1
    );
}

/// A child process killed on drop (its leftovers die with the test's cgroup tree).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fields of the probe's `loop` summary line: (ok, err, last outcome).
fn loop_summary(text: &str) -> (u64, u64, String) {
    let summary = text
        .lines()
        .find(|l| l.starts_with("ok="))
        .unwrap_or_else(|| panic!("no loop summary in {text:?}"));
    let field = |k: &str| {
        summary
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {summary:?}"))
            .to_owned()
    };
    (
        field("ok=").parse().expect("ok"),
        field("err=").parse().expect("err"),
        field("last="),
    )
}

#[test]
fn crossing_a_deny_rate_quarantines_the_agent_and_cuts_its_flow() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    // Allowed: TCP to 127.0.0.1 on 8080 (new connects) and 8090 (an established stream).
    let policy = format!(
        "{}\n[monitor]\ndeny_rate = {{ threshold = 5, window = \"1m\", action = \"quarantine\" }}\n",
        SEG.replace("ports = [8080]", "ports = [8080, 8090]")
    );
    let connects = TcpCount::bind(&ns, "127.0.0.1:8080");
    let denied_peer = UdpSink::bind(&ns, "127.0.0.2:9053");
    let d = Daemon::start(&tree, &[("bot.toml", &policy)]);
    let scratch = d.scratch();
    let (peer_log, agent_log) = (scratch.join("peer.log"), scratch.join("agent.log"));
    let (go, stop) = (scratch.join("go"), scratch.join("stop"));
    let mut peer = Command::new(probe_bin())
        .args(["--netns", &ns.name, "stream-serve", "127.0.0.1:8090"])
        .arg(&peer_log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("peer");
    let mut line = String::new();
    BufReader::new(peer.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("peer output");
    assert_eq!(line.trim(), "ready");
    let _peer = Proc(peer);
    // One agent: an established stream and a loop of allowed connects; once the test has seen
    // both work, a burst of ten denied sends (the threshold is five).
    let script = format!(
        "{p} stream 127.0.0.1:8090 {alog} >/dev/null & S=$!; \
         {p} loop 127.0.0.1:8080 {stop} 10 & L=$!; \
         while [ ! -e {go} ]; do sleep 0.02; done; \
         {p} flood 127.0.0.2:9053 10; wait $L; kill $S",
        p = probe_bin().display(),
        alog = agent_log.display(),
        stop = stop.display(),
        go = go.display(),
    );
    let mut agent = Command::new(agentseg_bin());
    agent
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "run",
            "--segment",
            "bot.test.events",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ns.enter_on_exec(&mut agent);
    let agent = agent.spawn().expect("agent");
    // The allowed controls, before the crossing: new connects arrive, the stream flows both
    // ways, and nothing is quarantined.
    let mut accepted = 0;
    wait_until(
        Duration::from_secs(5),
        "the agent's allowed connects",
        || {
            accepted += connects.count();
            accepted > 0
        },
    );
    wait_flowing(&peer_log, "the agent's stream, before the crossing");
    wait_flowing(&agent_log, "the peer's side, before the crossing");
    let status = d.status_json();
    assert!(
        status["quarantines"].as_array().is_some_and(Vec::is_empty),
        "quarantined before the crossing: {status}"
    );
    std::fs::write(&go, b"").expect("go");
    let q = d.wait_records(1, |r| r["kind"] == "quarantine");
    assert!(
        q[0]["by"]
            .as_str()
            .is_some_and(|b| b == "detector:deny_rate"),
        "{:?}",
        q[0]
    );
    assert!(
        q[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deny_rate") && r.contains('5')),
        "{:?}",
        q[0]
    );
    let status = d.status_json();
    assert_eq!(
        status["quarantines"][0]["by"], "detector:deny_rate",
        "{status}"
    );
    let agent_id = status["agents"][0]["agent_id"]
        .as_str()
        .expect("agent id")
        .to_owned();
    assert!(
        status["agents"][0]["quarantine"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deny_rate"))
    );
    // The cut: the established stream stops both ways, and the loop's new connects are denied
    // (one such denial recorded is the proof that the loop ran on after the quarantine).
    wait_silent(&peer_log, "the agent's stream, after the quarantine");
    wait_silent(&agent_log, "the peer's side, after the quarantine");
    let cut = d.wait_records(1, |r| {
        r["kind"] == "deny" && r["dst"] == "127.0.0.1" && r["dport"] == 8080
    });
    assert_eq!(
        (&cut[0]["agent_id"], &cut[0]["hook"], &cut[0]["rule"]),
        (
            &serde_json::json!(agent_id),
            &serde_json::json!("connect4"),
            &serde_json::json!("quarantine")
        ),
        "{:?}",
        cut[0]
    );
    std::fs::write(&stop, b"").expect("stop");
    let out = agent.wait_with_output().expect("agent output");
    let text = format!(
        "{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("eperm=10 other=0"), "the flood: {text}");
    let (ok, err, last) = loop_summary(&text);
    accepted += connects.count();
    assert!(ok > 0 && err > 0, "loop: {text}");
    assert_eq!(last, "EPERM", "the loop's last connects: {text}");
    assert_eq!(
        accepted, ok as usize,
        "the listener saw other than the loop's successful connects"
    );
    assert_eq!(denied_peer.count(), 0, "a denied send reached its peer");
    // Only the agent was quarantined: a new agent of the segment connects as before.
    assert_eq!(
        d.run_probe(
            "bot.test.events",
            &ns,
            &["connect", "tcp", "127.0.0.1:8080"]
        ),
        "ok"
    );
    assert_eq!(connects.count(), 1);
}

#[test]
fn a_million_denied_sends_are_aggregated_in_the_kernel_and_every_one_is_counted() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let (denied_peer, allowed_peer) = (
        UdpSink::bind(&ns, "127.0.0.2:9053"),
        UdpSink::bind(&ns, "127.0.0.9:9999"),
    );
    let port = free_port();
    let d = Daemon::start_with(
        &tree,
        &[("bot.toml", SEG)],
        &[
            "--audit-max-bytes",
            "16777216",
            "--metrics",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let out = d.run_agent(
        "bot.test.events",
        &ns,
        &["flood", "127.0.0.2:9053", "1000000"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "eperm=1000000 other=0"
    );
    assert_eq!(denied_peer.count(), 0, "a denied send reached its peer");
    // One flow: the kernel counts every denial exactly and writes a record when the flow
    // appears and a summary a second at most (per CPU); the daemon's sweep reports the tail.
    // The records' counts add up to the denials, and the daemon still answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = d.status_json();
        let reported = s["denials_reported"].as_u64().unwrap_or(0);
        if reported >= 1_000_000 {
            assert_eq!(reported, 1_000_000, "more denials reported than made: {s}");
            break s;
        }
        assert!(Instant::now() < deadline, "denials unreported: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["segments"][0]["denied"], 1_000_000, "{status}");
    let read = status["events_read"].as_u64().unwrap_or(u64::MAX);
    assert!(
        read < 200,
        "a million denials of one flow took {read} records"
    );
    assert_eq!(status["events_lost"], 0, "{status}");
    let counted: u64 = d
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "deny" && r["dport"] == 9053)
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, 1_000_000, "the audit log's counts");
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .expect("status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .expect("VmRSS");
    assert!(
        rss_kb < 200 * 1024,
        "daemon RSS {rss_kb} kB after the flood"
    );
    let m = scrape(port);
    assert_eq!(metric(&m, "agentseg_denials_reported_total"), 1_000_000);
    assert_eq!(metric(&m, "agentseg_events_lost_total"), 0);
    let report = d.cli(&["audit", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).expect("audit json");
    assert_eq!(report["segments"][0]["denied"], 1_000_000, "{report}");
    eprintln!("flood: {read} records for 1000000 denials, rss {rss_kb} kB");
    // Still enforcing after the flood: the same segment's allowed send goes through, a denied
    // one is still refused and recorded.
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.9:9999"]),
        "ok"
    );
    wait_until(Duration::from_secs(2), "the allowed datagram", || {
        allowed_peer.count() == 1
    });
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.2:54"]),
        "EPERM"
    );
    d.wait_records(1, |r| r["kind"] == "deny" && r["dport"] == 54);
}

/// Issue 13: one member flooding distinct flows (a new port each datagram, so aggregation
/// cannot fold them) spends its own record budget, never another member's: the second
/// agent's ten denials all reach the audit log with its id, and every denial of both is in
/// the exact counters.
#[test]
fn a_flood_of_distinct_flows_cannot_push_another_agents_denials_out_of_the_log() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    const FLOOD: u64 = 2_000_000;
    let flooder = d.spawn_flood("bot.test.events", &ns, FLOOD);
    // While it floods: ten denied connects of another agent, each to a port of its own.
    std::thread::sleep(Duration::from_millis(300));
    let script = (8101..=8110)
        .map(|port| format!("{} connect tcp 127.0.0.3:{port}", probe_bin().display()))
        .collect::<Vec<_>>()
        .join("; ");
    let out = d.cli_in(
        &ns,
        &[
            "run",
            "--segment",
            "bot.test.events",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("EPERM")
            .count(),
        10
    );
    let second = agentseg_tests::sandbox::agent_id(&out);
    let out = flooder.wait_with_output().expect("flooder output");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("eperm={FLOOD} other=0"),
        "the flood must overlap the ten connects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mine = d.wait_records(10, |r| {
        r["agent_id"] == second.as_str() && r["kind"] == "deny"
    });
    let ports: std::collections::BTreeSet<u64> =
        mine.iter().filter_map(|r| r["dport"].as_u64()).collect();
    assert_eq!(ports, (8101..=8110).collect(), "{mine:?}");
    assert!(mine.iter().all(|r| r["count"] == 1), "{mine:?}");
    // Exact counters: every denial of both; the flooder's records were capped by its budget.
    let s = d.status_json();
    assert_eq!(s["segments"][0]["denied"], FLOOD + 10, "{s}");
    let dropped = s["segments"][0]["records_dropped"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "the flooder's budget never ran out: {s}");
    let flooder_id = agentseg_tests::sandbox::agent_id(&out);
    // Wait for the sweep's last records of the flood (written after the flooder exited)...
    std::thread::sleep(Duration::from_millis(2500));
    let flood: Vec<_> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "deny" && r["dst"] == "127.0.0.2")
        .collect();
    // ... which keep the flooder's id, as every record of it does.
    assert!(
        flood.iter().all(|r| r["agent_id"] == flooder_id.as_str()),
        "a flood record lost its agent: {:?}",
        flood.iter().find(|r| r["agent_id"] != flooder_id.as_str())
    );
    let flood_records = flood.len();
    assert!(
        flood_records < 20_000,
        "{flood_records} records for a flood of {FLOOD} distinct flows"
    );
    eprintln!("distinct-flow flood: {flood_records} records, {dropped} not written");
}

#[test]
fn sampled_allows_become_events_when_asked() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let peer = TcpCount::bind(&ns, "127.0.0.1:8080");
    let d = Daemon::start_with(&tree, &[("bot.toml", SEG)], &["--sample-allows", "1"]);
    assert_eq!(
        d.run_probe(
            "bot.test.events",
            &ns,
            &["connect", "tcp", "127.0.0.1:8080"]
        ),
        "ok"
    );
    assert_eq!(peer.count(), 1);
    // A denial after it as a marker: records come in order, so the allow's are all in by then.
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.2:9053"]),
        "EPERM"
    );
    d.wait_records(1, |r| r["kind"] == "deny");
    let allows: Vec<_> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "allow")
        .collect();
    assert_eq!(
        allows.len(),
        1,
        "one allowed connect, one sampled allow: {allows:?}"
    );
    let a = &allows[0];
    assert!(
        a["rule"]
            .as_str()
            .is_some_and(|r| r.ends_with("bot.toml:3")),
        "{a:?}"
    );
    assert_eq!(
        (&a["hook"], &a["dst"], &a["dport"], &a["segment"]),
        (
            &serde_json::json!("connect4"),
            &serde_json::json!("127.0.0.1"),
            &serde_json::json!(8080),
            &serde_json::json!("bot.test.events")
        ),
        "{a:?}"
    );
}

#[test]
fn events_follow_streams_live_denials() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let other = "name = \"bot.test.other\"\n";
    let d = Daemon::start(&tree, &[("bot.toml", SEG), ("other.toml", other)]);
    // One denial before the follower starts: it comes first, as history.
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.6:9053"]),
        "EPERM"
    );
    d.wait_records(1, |r| r["kind"] == "deny" && r["dst"] == "127.0.0.6");
    let follower = Command::new(agentseg_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "events",
            "--follow",
            "--json",
            "--segment",
            "bot.test.events",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("follower");
    let mut follower = Proc(follower);
    let stdout = follower.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no {what} from `events --follow` within 5 s"));
        serde_json::from_str(&line).expect("json")
    };
    // The history line says the follower is connected, and subscribed: the daemon subscribes a
    // follower before it answers with the history.
    let v = next("history");
    assert_eq!(v["dst"], "127.0.0.6", "{v}");
    // Then, in order: another segment's denial (filtered out), this segment's allowed send (not
    // an event) and this segment's live denial, which must be the next line.
    assert_eq!(
        d.run_probe("bot.test.other", &ns, &["sendto", "127.0.0.8:9053"]),
        "EPERM"
    );
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.9:9999"]),
        "ok"
    );
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.7:9053"]),
        "EPERM"
    );
    let v = next("live event");
    assert_eq!(v["dst"], "127.0.0.7", "{v}");
    assert_eq!(v["hook"], "sendmsg4", "{v}");
    assert_eq!(v["segment"], "bot.test.events", "{v}");
    // The other segment's denial did happen (and was recorded), it just was not streamed.
    d.wait_records(1, |r| r["kind"] == "deny" && r["dst"] == "127.0.0.8");
}
