//! Detectors that a flood cannot blind and that knocks from outside cannot turn against an
//! agent (issue 13), against the real kernel.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use agentseg_tests::{
    CgroupTree, Daemon, Netns, Proc, expect_line, kernel_ready, probe_bin, wait_until,
};

/// The flooder's segment: its own detectors stay quiet (off), so only the victim's can fire.
const NOISE: &str = r#"
name = "flood.test.noise"
[[egress]]
cidrs = ["127.0.0.9"]
ports = [9999]
protocol = "udp"
[monitor]
deny_rate = { action = "off" }
port_scan = { action = "off" }
fan_out = { action = "off" }
"#;

const VICTIM: &str = r#"
name = "flood.test.victim"
[[egress]]
cidrs = ["127.0.0.9"]
ports = [9999]
protocol = "udp"
[monitor]
deny_rate = { threshold = 20, window = "1m", action = "quarantine" }
"#;

/// Tried before: during one agent's flood another segment's agent made 60 denials against a
/// threshold of 20 and was never quarantined (its records were lost with the flood's). The
/// detector now reads the kernel's exact counters.
#[test]
fn a_flood_cannot_blind_another_segments_deny_rate() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("noise.toml", NOISE), ("victim.toml", VICTIM)]);
    const FLOOD: u64 = 3_000_000;
    let flooder = d.spawn_flood("flood.test.noise", &ns, FLOOD);
    std::thread::sleep(Duration::from_millis(300));
    let script = format!(
        "for i in $(seq 60); do {} connect tcp 127.0.0.3:8200; done",
        probe_bin().display()
    );
    let out = d.cli_in(
        &ns,
        &[
            "run",
            "--segment",
            "flood.test.victim",
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
        60
    );
    let victim = agentseg_tests::sandbox::agent_id(&out);
    let out = flooder.wait_with_output().expect("flooder output");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("eperm={FLOOD} other=0"),
        "the flood must overlap the victim's denials"
    );
    let fired = d.wait_records(1, |r| {
        r["kind"] == "detector" && r["detector"] == "deny_rate" && r["agent_id"] == victim.as_str()
    });
    assert_eq!(fired[0]["action"], "quarantine", "{fired:?}");
    d.wait_records(1, |r| {
        r["kind"] == "quarantine"
            && r["target"].to_string().contains(&victim)
            && r["by"].as_str().is_some_and(|b| b.starts_with("detector:"))
    });
    // The flooder's own detectors were off: nothing about it.
    assert!(
        d.audit_records()
            .iter()
            .all(|r| r["kind"] != "detector" || r["agent_id"] == victim.as_str()),
        "a detector fired for the flooder"
    );
}

const KNOCKED: &str = r#"
name = "knock.test.server"
[[egress]]
cidrs = ["127.0.0.9"]
ports = [9999]
protocol = "udp"
[monitor]
deny_rate = { threshold = 20, window = "1m", action = "quarantine" }
port_scan = { threshold = 10, window = "1m", action = "quarantine" }
fan_out = { threshold = 10, window = "1m", action = "quarantine" }
inbound_rate = { threshold = 20, window = "1m", action = "alert" }
"#;

/// Tried before: 30 packets from outside got an innocent agent quarantined (inbound refusals
/// counted as its own denials). Now they feed `inbound_rate` only, which can alert, never
/// quarantine.
#[test]
fn knocks_from_outside_alert_but_never_quarantine_the_agent_knocked_on() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("knock.toml", KNOCKED)]);
    let mut agent = d
        .agent_command("knock.test.server", &ns, &["serve", "127.0.0.5:7000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent server");
    expect_line(&mut agent, "ready");
    let _agent = Proc(agent);
    let id = d.status_json()["agents"][0]["agent_id"]
        .as_str()
        .expect("agent listed")
        .to_owned();
    // 30 connection attempts from outside every pen, each from a port of its own: their SYNs
    // are refused by the agent's (empty) ingress rules.
    ns.within(|| {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 7000u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 5]),
            },
            sin_zero: [0; 8],
        };
        let mut socks = Vec::new();
        for _ in 0..30 {
            // SAFETY: plain socket calls on a descriptor this closure owns.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
                assert!(fd >= 0, "socket");
                let fd = OwnedFd::from_raw_fd(fd);
                libc::connect(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                socks.push(fd);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    let fired = d.wait_records(1, |r| {
        r["kind"] == "detector" && r["detector"] == "inbound_rate" && r["agent_id"] == id.as_str()
    });
    assert_eq!(fired[0]["action"], "alert", "{fired:?}");
    // Give any wrong detector the time a tick takes, then: no quarantine, no other detector.
    let until = Instant::now() + Duration::from_secs(1);
    wait_until(Duration::from_secs(2), "a second", || {
        Instant::now() >= until
    });
    let status = d.status_json();
    assert!(
        status["quarantines"].as_array().is_some_and(Vec::is_empty),
        "the knocked-on agent was quarantined: {status}"
    );
    assert_eq!(
        status["agents"][0]["inbound_denied"]
            .as_u64()
            .map(|n| n >= 30),
        Some(true),
        "{status}"
    );
    assert!(
        d.audit_records()
            .iter()
            .all(|r| r["kind"] != "detector" || r["detector"] == "inbound_rate"),
        "an egress detector fired on knocks"
    );
}
