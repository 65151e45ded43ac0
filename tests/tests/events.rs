//! Events, the tamper-evident audit log, detectors and metrics against the real kernel.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use agentseg_tests::{CgroupTree, Daemon, Netns, Server, agentseg_bin, kernel_ready};

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

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    // A real HTTP response: headers, a blank line, a body of the announced length.
    let (head, body) = out.split_once("\r\n\r\n").expect("header/body separator");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(body.len(), length);
    body.to_owned()
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .map(|v| v.trim().parse::<f64>().unwrap_or(-1.0) as u64)
        })
        .unwrap_or_else(|| panic!("no {name_and_labels} in\n{text}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

#[test]
fn denials_become_attributed_audit_records_allows_count_per_rule_and_metrics_agree() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080", "[::]:8081"]);
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    let agent_id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "agent")
        .nth(1)
        .expect("agent id printed")
        .to_owned();
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
    // `events` shows them too.
    let out = d.cli(&["events", "--json", "--agent", &agent_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn the_audit_log_verifies_and_one_changed_character_is_named() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let mut d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    for _ in 0..5 {
        assert_eq!(
            d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.2:53"]),
            "EPERM"
        );
    }
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
    let n = lines.len();
    assert!(n >= 5);
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

#[test]
fn crossing_a_deny_rate_quarantines_the_agent_and_cuts_its_flow() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080"]);
    let policy = format!(
        "{SEG}\n[monitor]\ndeny_rate = {{ threshold = 5, window = \"1m\", action = \"quarantine\" }}\n"
    );
    let d = Daemon::start(&tree, &[("bot.toml", &policy)]);
    // One agent: a long-lived allowed connection loop, then a burst of denied sends.
    let script = format!(
        "{p} loop 127.0.0.1:8080 {stop} 10 & sleep 0.5; {p} flood 127.0.0.2:53 10; wait",
        p = agentseg_tests::probe_bin().display(),
        stop = d.scratch().join("stop").display()
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
        .stdout(std::process::Stdio::piped());
    ns.enter_on_exec(&mut agent);
    let agent = agent.spawn().expect("agent");
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
    assert!(
        status["agents"][0]["quarantine"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deny_rate"))
    );
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(d.scratch().join("stop"), b"").expect("stop");
    let out = agent.wait_with_output().expect("agent output");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.starts_with("ok="))
        .expect("loop summary");
    let errors: u64 = summary
        .split_whitespace()
        .find_map(|f| f.strip_prefix("err="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(errors > 0, "the open flow did not stop: {summary}");
}

#[test]
fn a_million_denied_sends_keep_the_daemon_up_with_bounded_memory_and_counted_losses() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
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
        &["flood", "127.0.0.2:53", "1000000"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "eperm=1000000 other=0"
    );
    // Every record is either read or counted as lost, and the daemon still answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = d.status_json();
        let accounted =
            s["events_read"].as_u64().unwrap_or(0) + s["events_lost"].as_u64().unwrap_or(0);
        if accounted >= 1_000_000 {
            break s;
        }
        assert!(Instant::now() < deadline, "events unaccounted for: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
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
    assert_eq!(
        metric(&m, "agentseg_events_lost_total"),
        status["events_lost"].as_u64().unwrap_or(u64::MAX)
    );
    eprintln!(
        "flood: read {} lost {} rss {rss_kb} kB",
        status["events_read"], status["events_lost"]
    );
}

#[test]
fn sampled_allows_become_events_when_asked() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let _srv = Server::start(&ns, &["[::]:8080"]);
    let d = Daemon::start_with(&tree, &[("bot.toml", SEG)], &["--sample-allows", "1"]);
    assert_eq!(
        d.run_probe(
            "bot.test.events",
            &ns,
            &["connect", "tcp", "127.0.0.1:8080"]
        ),
        "ok"
    );
    let allows = d.wait_records(1, |r| r["kind"] == "allow");
    assert!(
        allows[0]["rule"]
            .as_str()
            .is_some_and(|r| r.ends_with("bot.toml:3")),
        "{:?}",
        allows[0]
    );
}

#[test]
fn events_follow_streams_live_denials() {
    if !kernel_ready() {
        return;
    }
    use std::io::BufRead as _;
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    let mut follower = Command::new(agentseg_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "events",
            "--follow",
            "--json",
            "--segment",
            "bot.test.events",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("follower");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        d.run_probe("bot.test.events", &ns, &["sendto", "127.0.0.7:53"]),
        "EPERM"
    );
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a live event");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["dst"], "127.0.0.7");
    assert_eq!(v["hook"], "sendmsg4");
    let _ = follower.kill();
    let _ = follower.wait();
}
