//! What a fleet needs from each daemon (issue 14): metrics that prove which build and which
//! policy run and whether the daemon is alive, alert rules that name only real metrics, and an
//! audit log failure that hides nothing from detectors and subscribers.
use std::{io::Read as _, io::Write as _, path::Path, process::Command, time::Duration};

use agentseg_tests::{
    CgroupTree, Daemon, Netns, free_port, kernel_ready, metric, run_ok, scrape, wait_until,
};

const SEG: &str = "name = \"flt.test.web\"\n[[egress]]\ncidrs = [\"127.0.0.1\"]\nports = [8080]\nprotocol = \"tcp\"\n";

/// The rules file of the package.
fn rules_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus-rules.yml")
}

/// The names of the agentseg metrics the rules' expressions use.
fn rule_metrics(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with("expr:")) {
        let mut rest = line;
        while let Some(i) = rest.find("agentseg_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// The raw response of GET /metrics: (head, body).
fn get(port: u16) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("head and body");
    (head.to_owned(), body.to_owned())
}

#[test]
fn metrics_name_the_build_the_policy_and_the_heartbeat_and_the_rules_use_only_them() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&tree, &[("web.toml", SEG)], &["--metrics", &addr]);
    let (head, body) = get(port);
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let status = d.status_json();
    let digest = status["policy_digest"].as_str().expect("digest").to_owned();
    assert_eq!(digest.len(), 64, "{status}");
    assert_eq!(
        metric(
            &body,
            &format!("agentseg_policy_info{{digest=\"{digest}\"}}")
        ),
        1,
        "{body}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        body.lines().any(|l| l.starts_with("agentseg_build_info{")
            && l.contains(&format!("version=\"{version}\""))
            && l.ends_with(" 1")),
        "{body}"
    );
    let age: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("agentseg_heartbeat_age_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("heartbeat age");
    assert!((0.0..10.0).contains(&age), "heartbeat age {age}");
    assert_eq!(metric(&body, "agentseg_audit_write_errors_total"), 0);
    // A refused reload is counted by result.
    std::fs::write(d.policies.join("bad.toml"), "name = \"x\"\n").expect("write");
    assert_eq!(d.cli(&["reload"]).status.code(), Some(1));
    let body = scrape(port);
    // (The watcher may have refused the save too.)
    assert!(metric(&body, "agentseg_policy_reloads_total{result=\"refused\"}") >= 1);
    assert_eq!(
        metric(&body, "agentseg_policy_reloads_total{result=\"applied\"}"),
        1
    );
    assert_eq!(metric(&body, "agentseg_policy_reload_ok"), 0);
    // The same policy elsewhere has the same digest: a second daemon on another tree.
    std::fs::remove_file(d.policies.join("bad.toml")).expect("rm");
    let tree2 = CgroupTree::create();
    let d2 = Daemon::start(&tree2, &[("web.toml", SEG)]);
    assert_eq!(d2.status_json()["policy_digest"], digest.as_str());
    drop(d2);
    // Every metric the alert rules use is one the daemon exports.
    let rules = std::fs::read_to_string(rules_file()).expect("rules file");
    let used = rule_metrics(&rules);
    assert!(used.len() >= 6, "{used:?}");
    for name in &used {
        assert!(
            body.lines()
                .any(|l| l.starts_with(name.as_str()) && l[name.len()..].starts_with(['{', ' '])),
            "the rules use {name}, which the daemon does not export:\n{body}"
        );
    }
    // And promtool accepts the file, where the test command could fetch it.
    match std::env::var_os("AGENTSEG_PROMTOOL") {
        Some(promtool) => {
            run_ok(
                Command::new(promtool)
                    .args(["check", "rules"])
                    .arg(rules_file()),
            );
        }
        None => eprintln!(
            "NOTE: promtool not available; the rules were checked against the scrape only"
        ),
    }
}

/// A tmpfs of 8 KiB mounted over `dir` for the test's life (lazily unmounted on drop).
struct Tiny(std::path::PathBuf);

impl Tiny {
    fn mount(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8k,mode=0700", "agentseg-test"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs on {}", dir.display());
        Tiny(dir.to_owned())
    }
}

impl Drop for Tiny {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_audit_log_hides_nothing_from_subscribers_and_shows_in_status_and_metrics() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::prepare(&tree, &[("web.toml", SEG)], &["--metrics", &addr]);
    let _tiny = Tiny::mount(d.audit_log().parent().expect("log dir"));
    d.launch().expect("daemon");
    // Fill the 8 KiB: a burst of denials of distinct flows (each a record).
    let flood = d.run_probe(
        "flt.test.web",
        &ns,
        &["flood", "127.0.0.2:1", "200", "ports"],
    );
    assert!(flood.starts_with("eperm=200"), "{flood}");
    wait_until(Duration::from_secs(5), "audit write errors", || {
        d.status_json()["audit_errors"].as_u64().unwrap_or(0) > 0
    });
    // A denial made after the log is full still reaches `agentseg events`.
    assert_eq!(
        d.run_probe("flt.test.web", &ns, &["connect", "tcp", "127.0.0.9:4242"]),
        "EPERM"
    );
    wait_until(
        Duration::from_secs(5),
        "the denial among the recent events",
        || {
            let out = d.cli(&["events", "--json"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.contains("\"127.0.0.9\"") && l.contains("4242"))
        },
    );
    assert!(metric(&scrape(port), "agentseg_audit_write_errors_total") > 0);
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("audit log write errors"), "{text}");
}

#[test]
fn every_record_is_forwarded_to_a_syslog_receiver_as_written() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let port = receiver.local_addr().expect("addr").port();
    let conf_dir = tempfile::tempdir().expect("tempdir");
    let conf = conf_dir.path().join("agentseg.toml");
    std::fs::write(
        &conf,
        format!("audit_forward = \"udp://127.0.0.1:{port}\"\n"),
    )
    .expect("config");
    let d = Daemon::start_with(
        &tree,
        &[("web.toml", SEG)],
        &["--config", conf.to_str().expect("utf8")],
    );
    let mut buf = [0u8; 65536];
    let mut next = || {
        let n = receiver
            .recv(&mut buf)
            .expect("a forwarded record within 5 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(
        d.run_probe("flt.test.web", &ns, &["connect", "tcp", "127.0.0.9:4242"]),
        "EPERM"
    );
    let deny = loop {
        let m = next();
        if m.contains("\"kind\":\"deny\"") {
            break m;
        }
    };
    assert!(deny.starts_with("<84>1 "), "{deny}");
    assert!(
        deny.contains(" agentseg ") && deny.contains("\"dst\":\"127.0.0.9\""),
        "{deny}"
    );
    assert!(
        deny.contains("\"hash\":\""),
        "the forwarded copy carries its chain: {deny}"
    );
    // A policy record (notice).
    assert!(d.cli(&["reload"]).status.success());
    let policy = loop {
        let m = next();
        if m.contains("\"kind\":\"policy\"") {
            break m;
        }
    };
    assert!(policy.starts_with("<85>1 "), "{policy}");
    // The same line as in the log.
    let json = deny.splitn(8, ' ').nth(7).expect("MSG");
    let logged = std::fs::read_to_string(d.audit_log()).expect("log");
    assert!(logged.lines().any(|l| l == json), "{json}");
}
