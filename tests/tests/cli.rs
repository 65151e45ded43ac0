//! The CLI as one tool among others (issue 14.3): `--json` shapes, exit statuses, completions
//! and the manual page, files as well as directories for `check`, logs without colour off a
//! terminal. The first tests need no kernel; the last start a real daemon.
use std::process::{Command, Output};

use agentseg_tests::{CgroupTree, Daemon, Netns, agentseg_bin, kernel_ready, probe_bin};

/// The CLI with no socket from the environment.
fn agentseg(args: &[&str]) -> Output {
    Command::new(agentseg_bin())
        .args(args)
        .env_remove("AGENTSEG_SOCKET")
        .env_remove("AGENTSEG_CONFIG")
        .output()
        .expect("run agentseg")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const GROUPS: &str = "[peers.proxies]\ncidrs = [\"192.0.2.10\"]\n";
const SEG: &str = "name = \"cli.test.web\"\n[[egress]]\ncidrs = [\"@proxies\"]\nports = [3128]\nprotocol = \"tcp\"\n";

#[test]
fn completions_and_the_manual_page() {
    if std::env::var_os("AGENTSEG_BIN").is_none() && !kernel_ready() {
        return;
    }
    let bash = agentseg(&["completions", "bash"]);
    assert!(bash.status.success());
    let text = String::from_utf8_lossy(&bash.stdout);
    assert!(
        text.contains("_agentseg()") && text.contains("explain"),
        "{text}"
    );
    let zsh = String::from_utf8_lossy(&agentseg(&["completions", "zsh"]).stdout).into_owned();
    assert!(zsh.starts_with("#compdef agentseg"), "{zsh}");
    let fish = String::from_utf8_lossy(&agentseg(&["completions", "fish"]).stdout).into_owned();
    assert!(fish.contains("complete -c agentseg"), "{fish}");
    let man = agentseg(&["manpage"]);
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH agentseg 8"), "{man}");
    assert!(man.contains("quarantine"), "{man}");
}

#[test]
fn check_takes_files_and_directories_and_reports_errors_as_objects() {
    if std::env::var_os("AGENTSEG_BIN").is_none() && !kernel_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (groups, seg) = (dir.path().join("peers.toml"), dir.path().join("web.toml"));
    std::fs::write(&groups, GROUPS).expect("write");
    std::fs::write(&seg, SEG).expect("write");
    let p = |p: &std::path::Path| p.to_str().expect("utf8").to_owned();
    // The directory, and its two files named: the same answer.
    for args in [vec![p(dir.path())], vec![p(&groups), p(&seg)]] {
        let mut a = vec!["check", "--json"];
        a.extend(args.iter().map(String::as_str));
        let out = agentseg(&a);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let v = json(&out);
        assert_eq!(
            (v["ok"].as_bool(), v["segments"].as_u64()),
            (Some(true), Some(1)),
            "{v}"
        );
        assert_eq!(v["errors"], serde_json::json!([]));
    }
    // The segment file alone: its group is unknown, named with file, line and column.
    let out = agentseg(&["check", "--json", &p(&seg)]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert_eq!(e["file"], p(&seg));
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(3), Some(10)),
        "{v}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("proxies"),
        "{v}"
    );
    // Without --json: the same error as text, exit 1.
    let out = agentseg(&["check", &p(&seg)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("web.toml:3:10"));
    // A path that cannot be read: exit 2.
    let out = agentseg(&["check", "--json", "/nonexistent/policy.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["ok"], false);
}

#[test]
fn without_a_daemon_the_commands_exit_3() {
    if std::env::var_os("AGENTSEG_BIN").is_none() && !kernel_ready() {
        return;
    }
    let sock = "/nonexistent/agentseg.sock";
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["reload", "--json"],
        vec!["release", "--segment", "x.y.z", "--json"],
    ] {
        let mut a = vec!["--socket", sock];
        a.extend(args.iter().copied());
        let out = agentseg(&a);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        if args.contains(&"--json") {
            let v = json(&out);
            assert_eq!(v["ok"], false, "{v}");
            assert!(
                v["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("no agentseg daemon"),
                "{v}"
            );
        }
    }
}

#[test]
fn daemon_commands_answer_in_json_and_logs_carry_no_colour() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let mut d = Daemon::start(&tree, &[("web.toml", SEG), ("peers.toml", GROUPS)]);
    let ok = |args: &[&str]| {
        let out = d.cli(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&out)
    };
    assert_eq!(ok(&["reload", "--json"])["ok"], true);
    let q = ok(&[
        "quarantine",
        "--segment",
        "cli.test.web",
        "--reason",
        "drill",
        "--json",
    ]);
    assert_eq!(
        (q["ok"].as_bool(), q["done"].as_str()),
        (Some(true), Some("segment cli.test.web quarantined"))
    );
    let status = ok(&["status", "--json"]);
    assert_eq!(status["segments"][0]["quarantine"]["reason"], "drill");
    assert_eq!(
        ok(&["release", "--segment", "cli.test.web", "--json"])["ok"],
        true
    );
    // Refused: exit 1 with the reason.
    let out = d.cli(&["release", "--segment", "cli.test.web", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        json(&out)["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not quarantined")
    );
    // A reload the daemon refuses: exit 1, the running policy stays.
    std::fs::write(d.policies.join("bad.toml"), "name = \"x\"\n").expect("write");
    let out = d.cli(&["reload", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap_or_default().contains("bad.toml"),
        "{v}"
    );
    std::fs::remove_file(d.policies.join("bad.toml")).expect("rm");
    // `run --json`: the start line is one JSON object on stderr, stdout is the command's.
    let probe = probe_bin();
    let out = d.cli_in(
        &ns,
        &[
            "run",
            "--segment",
            "cli.test.web",
            "--json",
            "--",
            probe.to_str().expect("utf8"),
            "env",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let start: serde_json::Value = stderr
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON start line: {stderr}"));
    let id = start["agent_id"].as_str().expect("agent id");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        id,
        "the agent's env names it"
    );
    assert_eq!(start["segment"], "cli.test.web");
    // The audit log verifies, in JSON; a log that is not there is unreadable (exit 2).
    let log = d.audit_log();
    let v = ok(&[
        "audit",
        "verify",
        "--log",
        log.to_str().expect("utf8"),
        "--json",
    ]);
    assert_eq!(v["status"], "intact", "{v}");
    let out = d.cli(&[
        "audit",
        "verify",
        "--log",
        "/nonexistent/audit.jsonl",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["status"], "unreadable");
    // Every record names its host and the record format's version.
    let records = d.audit_records();
    assert!(!records.is_empty());
    for r in &records {
        assert_eq!(r["schema"], 1, "{r}");
        assert!(!r["host"].as_str().unwrap_or_default().is_empty(), "{r}");
    }
    let logs = d.stop();
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in logs off a terminal:\n{logs}"
    );
    // The chain head the stopped daemon left outside the log.
    let head = d.dir.path().join("state/audit-head.json");
    let (log_s, head_s) = (log.to_str().expect("utf8"), head.to_str().expect("utf8"));
    let verify = |extra: &[&str]| {
        let mut a = vec![
            "audit", "verify", "--log", log_s, "--head", head_s, "--json",
        ];
        a.extend_from_slice(extra);
        agentseg(&a)
    };
    let out = verify(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = json(&out);
    assert_eq!(v["report"]["after_head"], 0, "{v}");
    let original = std::fs::read_to_string(&log).expect("log");
    // Lines cut off the end while the daemon is stopped: the chain alone still holds, the
    // head does not.
    let lines: Vec<&str> = original.lines().collect();
    std::fs::write(&log, lines[..lines.len() - 2].join("\n") + "\n").expect("cut");
    let alone = agentseg(&["audit", "verify", "--log", log_s, "--json"]);
    assert_eq!(
        json(&alone)["status"],
        "intact",
        "without its head the cut is invisible"
    );
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "tampered", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("truncated"),
        "{v}"
    );
    // Rewritten whole: another daemon's log, a valid chain at least as long.
    let tree2 = CgroupTree::create();
    let mut d2 = Daemon::start(&tree2, &[("web.toml", SEG), ("peers.toml", GROUPS)]);
    for _ in 0..lines.len() {
        let q = d2.cli(&["quarantine", "--segment", "cli.test.web", "--reason", "x"]);
        assert!(q.status.success());
        assert!(
            d2.cli(&["release", "--segment", "cli.test.web"])
                .status
                .success()
        );
    }
    d2.stop();
    std::fs::copy(d2.audit_log(), &log).expect("replace the log");
    let alone = agentseg(&["audit", "verify", "--log", log_s, "--json"]);
    assert_eq!(
        json(&alone)["status"],
        "intact",
        "a rewritten log is a valid chain"
    );
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("rewritten"),
        "{v}"
    );
    std::fs::write(&log, &original).expect("restore");
    // An edited line: tampered, exit 1, the line named.
    let text = original;
    std::fs::write(&log, text.replacen("drill", "dri11", 1)).expect("edit");
    let out = agentseg(&[
        "audit",
        "verify",
        "--log",
        log.to_str().expect("utf8"),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "tampered", "{v}");
    assert!(v["line"].as_u64().unwrap_or(0) > 0, "{v}");
}
