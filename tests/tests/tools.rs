//! The policy tools against the real kernel. Every connect and send the kernel tests make
//! through `Daemon::run_probe` is already replayed through `agentseg explain` on the live
//! daemon (the fixture asserts the same verdict); this file adds what the replay does not
//! reach: the offline answer (`--policies`) equal to the live one, an agent's own quarantine
//! through `--agent`, the command's refusals and exit statuses, and `agentseg prove`'s
//! witnesses let through by the kernel.
use agentseg_tests::{CgroupTree, Daemon, Listeners, Netns, Proc, expect_line, kernel_ready};

/// Overlapping rules, an except, IPv6, a quarantine allow list.
const SEG: &str = r#"
name = "ex.test.web"

[[egress]]
cidrs = ["127.0.0.1/32", "::1"]
ports = [8080, "8000-8100"]
protocol = "tcp"

[[egress]]
cidrs = ["127.0.0.0/24"]
except = ["127.0.0.3/32"]
ports = [9090]
protocol = "tcp"

[quarantine]
allow = ["127.0.0.5"]
"#;

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn offline_and_live_answers_agree_and_an_agents_quarantine_is_its_own() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["[::]:8080", "[::]:9090"], &[]);
    let d = Daemon::start(&tree, &[("web.toml", SEG)]);
    let policies = d.policies.to_str().expect("utf8").to_owned();
    let flows = [
        ("127.0.0.1:8080", "ok"),
        ("127.0.0.2:9090", "ok"),
        ("127.0.0.3:9090", "EPERM"),
        ("127.0.0.2:8080", "EPERM"),
        ("[::1]:8080", "ok"),
        ("[::1]:9090", "EPERM"),
    ];
    for (dst, kernel) in flows {
        let got = d.run_probe("ex.test.web", &ns, &["connect", "tcp", dst]);
        assert_eq!(l.judged("tcp", dst, got), kernel, "{dst}");
        let spec = format!("{dst}/tcp");
        let live = json(&d.cli(&[
            "explain",
            "--segment",
            "ex.test.web",
            "--to",
            &spec,
            "--json",
        ]));
        let offline = json(&d.cli(&[
            "explain",
            "--segment",
            "ex.test.web",
            "--to",
            &spec,
            "--policies",
            &policies,
            "--json",
        ]));
        assert_eq!(
            live, offline,
            "{dst}: the live and the offline answers differ"
        );
    }
    let except = json(&d.cli(&[
        "explain",
        "--segment",
        "ex.test.web",
        "--to",
        "127.0.0.3:9090",
        "--json",
    ]));
    assert_eq!(except["decided_by"]["kind"], "except", "{except:#}");
    assert_eq!(except["decided_by"]["rule"]["line"], 9, "{except:#}");

    // One agent quarantined: `--agent` answers for it, the segment's other agents are as
    // before.
    let mut agent = d
        .agent_command("ex.test.web", &ns, &["serve", "127.0.0.7:7000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    expect_line(&mut agent, "ready");
    let _agent = Proc(agent);
    let id = d.status_json()["agents"][0]["agent_id"]
        .as_str()
        .expect("agent listed")
        .to_owned();
    let q = d.cli(&["quarantine", "--agent", &id, "--reason", "explain test"]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let cut = d.cli(&[
        "explain",
        "--agent",
        &id,
        "--to",
        "127.0.0.1:8080",
        "--json",
    ]);
    assert_eq!(cut.status.code(), Some(1));
    let cut = json(&cut);
    assert_eq!(cut["decided_by"]["kind"], "quarantine", "{cut:#}");
    let kept = json(&d.cli(&[
        "explain",
        "--agent",
        &id,
        "--to",
        "127.0.0.5:8080",
        "--json",
    ]));
    assert_eq!(kept["verdict"], "allow", "{kept:#}");
    // A new agent of the segment is not quarantined: the replay checks it against the kernel.
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.1:8080",
            d.run_probe("ex.test.web", &ns, &["connect", "tcp", "127.0.0.1:8080"])
        ),
        "ok"
    );
    l.assert_silent("at the end");
}

#[test]
fn refusals_name_the_problem_and_exit_2_or_3_without_a_daemon() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let d = Daemon::start(&tree, &[("web.toml", SEG)]);
    for (args, says) in [
        (
            vec![
                "explain",
                "--segment",
                "nope.test.x",
                "--to",
                "127.0.0.1:80",
            ],
            "no segment named \"nope.test.x\"",
        ),
        (
            vec!["explain", "--segment", "ex.test.web", "--to", "127.0.0.1"],
            "tcp needs a port",
        ),
        (
            vec!["explain", "--segment", "ex.test.web", "--to", "10.0.0.0/8"],
            "reads as a prefix length",
        ),
        (
            vec![
                "explain",
                "--agent",
                "00000000000000000000000000000000",
                "--to",
                "127.0.0.1:80",
            ],
            "no agent",
        ),
    ] {
        let out = d.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // No daemon: the answer says so and points at --policies.
    let out = std::process::Command::new(agentseg_tests::agentseg_bin())
        .args([
            "--socket",
            "/nonexistent/agentseg.sock",
            "explain",
            "--segment",
            "x.y.z",
        ])
        .args(["--to", "127.0.0.1:80"])
        .output()
        .expect("agentseg");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policies"));
}

/// `prove` on the daemon's own policy directory: a planted violation's witness is a flow the
/// kernel lets through, a ceiling the policy keeps (an except) passes, and the kernel refuses
/// what it protects.
#[test]
fn prove_witnesses_are_flows_the_kernel_lets_through() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["[::]:8080", "[::]:9090"], &[]);
    let d = Daemon::start(&tree, &[("web.toml", SEG)]);
    let ceiling = d.scratch().join("ceiling.toml");
    let prove = |text: &str| {
        std::fs::write(&ceiling, text).expect("write ceiling");
        d.cli(&[
            "prove",
            "--ceiling",
            ceiling.to_str().expect("utf8"),
            "--policies",
            d.policies.to_str().expect("utf8"),
            "--json",
        ])
    };
    let out = prove(
        "[[forbid]]\nsegments = [\"ex.*\"]\npeers = [\"127.0.0.4/30\"]\nreason = \"planted\"\n",
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    // The /24 rule (127.0.0.4 on 9090), and the quarantine allow list (127.0.0.5, every
    // port, while quarantined).
    let kinds: Vec<&str> = report["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter_map(|v| v["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["rule", "quarantine"], "{report:#}");
    assert_eq!(report["violations"][1]["witness"]["peer"], "127.0.0.5");
    let v = &report["violations"][0];
    assert_eq!(v["rule"]["line"], 9, "{report:#}");
    let w = &v["witness"];
    let dst = format!("{}:{}", w["peer"].as_str().expect("peer"), w["port"]);
    assert_eq!(dst, "127.0.0.4:9090", "{report:#}");
    assert_eq!(w["protocol"], 6);
    assert_eq!(
        l.judged(
            "tcp",
            &dst,
            d.run_probe("ex.test.web", &ns, &["connect", "tcp", &dst])
        ),
        "ok",
        "the witness is refused by the kernel"
    );
    // The except keeps 127.0.0.3 out: a ceiling on it holds, and the kernel refuses it.
    let out = prove(
        "[[forbid]]\nsegments = [\"ex.*\"]\npeers = [\"127.0.0.3\"]\nprotocol = \"tcp\"\nports = [9090]\n",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.3:9090",
            d.run_probe("ex.test.web", &ns, &["connect", "tcp", "127.0.0.3:9090"])
        ),
        "EPERM"
    );
    // A broken ceiling: exit 2, file:line:column.
    let out = prove("[[forbid]]\nsegments = [\"*\"]\npeers = [\"127.0.0.1/8\"]\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ceiling.toml:3:10: host bits set"), "{err}");
    l.assert_silent("at the end");
}

/// An audit-mode segment with no rules, whose agents make a known set of flows (and one to
/// the cloud metadata address).
const LEARNER: &str = r#"
name = "lrn.test.audit"
mode = "audit"
"#;

/// `learn` on an audit-mode segment: the proposal, applied in enforce mode, lets exactly the
/// flows the agents made through again and refuses one they never made; the metadata address
/// seen is left out and listed as such.
#[test]
fn a_learned_policy_allows_what_the_agents_did_and_nothing_else() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(
        &ns,
        &["[::]:8080", "[::]:9090"],
        &["[::]:5353", "[::]:5354", "[::]:8080"],
    );
    let d = Daemon::start(&tree, &[("lrn.toml", LEARNER)]);
    let run = |args: &[&str]| d.run_probe("lrn.test.audit", &ns, args);
    // A TCP connect or a UDP send to `dst`, checked against the listeners.
    let flow = |proto: &str, dst: &str| {
        let args = if proto == "tcp" {
            vec!["connect", "tcp", dst]
        } else {
            vec!["sendto", dst]
        };
        l.judged(proto, dst, run(&args))
    };
    // What the agents do (audit mode lets it all through).
    let made = [
        ("tcp", "127.0.0.1:8080"),
        ("tcp", "[::1]:8080"),
        ("udp", "127.0.0.2:5353"),
    ];
    for (proto, dst) in made {
        assert_eq!(flow(proto, dst), "ok", "{proto} {dst}");
    }
    // Nothing routes 169.254.0.0/16 in the test's namespace: nothing leaves it. The cloud
    // metadata address and another link-local one.
    assert_ne!(run(&["connect", "tcp", "169.254.169.254:80"]), "EPERM");
    assert_ne!(run(&["connect", "tcp", "169.254.7.7:80"]), "EPERM");
    d.wait_records(5, |r| {
        r["segment"] == "lrn.test.audit" && r["kind"] == "audit_deny"
    });

    // `agentseg learn` on this daemon's log and policy directory, with `extra` flags.
    let (log, policies) = (d.audit_log(), d.policies.clone());
    let learn = |extra: &[&str]| {
        let mut args = vec!["learn", "--segment", "lrn.test.audit"];
        args.extend(["--log", log.to_str().expect("utf8")]);
        args.extend(["--policies", policies.to_str().expect("utf8")]);
        args.extend_from_slice(extra);
        d.cli(&args)
    };
    let out_file = d.scratch().join("learned.toml");
    let out = learn(&["--out", out_file.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let learned = std::fs::read_to_string(&out_file).expect("learned policy");
    assert!(learned.contains("mode = \"enforce\""), "{learned}");
    assert!(
        learned.contains("#   169.254.169.254 (cloud metadata address): 1 hit(s)"),
        "{learned}"
    );
    assert!(
        learned.contains("#   169.254.7.7 (link-local): 1 hit(s)"),
        "{learned}"
    );
    assert!(!learned.contains("169.254.169.254/32"), "{learned}");
    assert!(!learned.contains("169.254.7.7/32"), "{learned}");
    // `agentseg check` accepts it as it is.
    let check_dir = d.scratch().join("check");
    std::fs::create_dir_all(&check_dir).expect("mkdir");
    std::fs::write(check_dir.join("lrn.toml"), &learned).expect("write");
    let check = d.cli(&["check", check_dir.to_str().expect("utf8")]);
    assert!(
        check.status.success(),
        "{}\n{learned}",
        String::from_utf8_lossy(&check.stderr)
    );
    // --diff against the running (rule-less) segment: every flow is new.
    let diff = learn(&["--diff"]);
    let diff = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.contains("+ to 127.0.0.1:8080/tcp: refused now"),
        "{diff}"
    );
    assert!(diff.contains("+ to 127.0.0.2:5353/udp"), "{diff}");

    // Applied in enforce mode.
    std::fs::write(d.policies.join("lrn.toml"), &learned).expect("apply");
    agentseg_tests::wait_until(
        std::time::Duration::from_secs(5),
        "the learned policy",
        || d.status_json()["segments"][0]["mode"] == "enforce",
    );
    for (proto, dst) in made {
        assert_eq!(flow(proto, dst), "ok", "{proto} {dst} after learning");
    }
    // Never made: another port, another peer, another protocol; the metadata address.
    for (proto, dst) in [
        ("tcp", "127.0.0.1:9090"),
        ("udp", "127.0.0.2:5354"),
        ("tcp", "127.0.0.2:8080"),
        ("udp", "127.0.0.1:8080"),
    ] {
        assert_eq!(flow(proto, dst), "EPERM", "{proto} {dst} was never made");
    }
    assert_eq!(run(&["connect", "tcp", "169.254.169.254:80"]), "EPERM");
    assert_eq!(run(&["connect", "tcp", "169.254.7.7:80"]), "EPERM");
    l.assert_silent("at the end");
}
