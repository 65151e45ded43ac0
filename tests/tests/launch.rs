//! `agentseg run`, `status` and `check` as an operator uses them.
use std::process::Command;

use agentseg_tests::{CgroupTree, Daemon, Listeners, Netns, agentseg_bin, kernel_ready, probe_bin};

const SEG: &str = r#"
name = "bot.test.none"
[[egress]]
cidrs = ["127.0.0.1"]
ports = [1]
protocol = "tcp"
"#;

#[test]
fn run_refuses_unknown_segment_and_missing_daemon() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    // The control: the same command in a segment that exists runs (and prints its agent id).
    let out = d.run_agent("bot.test.none", &ns, &["env"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 32);
    let out = d.run_agent("no.such.segment", &ns, &["env"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty(), "the command must not have run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no segment named"), "{err}");
    let socket = d.socket.clone();
    drop(d);
    let out = Command::new(agentseg_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["run", "--segment", "bot.test.none", "--"])
        .arg(probe_bin())
        .arg("env")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty(), "the command must not have run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agentseg daemon answers"));
}

#[test]
fn agent_ids_are_fresh_exported_and_printed() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    let a = d.run_agent("bot.test.none", &ns, &["env"]);
    let b = d.run_agent("bot.test.none", &ns, &["env"]);
    let (ida, idb) = (
        String::from_utf8_lossy(&a.stdout).trim().to_owned(),
        String::from_utf8_lossy(&b.stdout).trim().to_owned(),
    );
    assert_eq!(ida.len(), 32, "{ida}");
    assert!(ida.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(ida, idb);
    assert!(
        String::from_utf8_lossy(&a.stderr).contains(&ida),
        "the id is printed"
    );
    // The agent really runs in its own cgroup under the agent root.
    let cg = d.run_probe("bot.test.none", &ns, &["cgroup"]);
    assert!(
        cg.contains(&format!("{}/bot.test.none/", tree.rel("agents"))),
        "{cg}"
    );
    // Its exit code comes back.
    let out = d.cli(&[
        "run",
        "--segment",
        "bot.test.none",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn status_answers_only_with_a_daemon() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let mut d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    let out = d.cli(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bot.test.none"));
    let socket = d.socket.clone();
    let err = d.stop();
    assert!(!err.contains("panicked"), "{err}");
    let out = Command::new(agentseg_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .expect("status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agentseg daemon answers"));
}

#[test]
fn daemon_refuses_a_bad_policy() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let bad = SEG.replace("ports = [1]", "ports = [0]");
    let err = Daemon::try_start(&tree, &[("bot.toml", &bad)])
        .err()
        .expect("must refuse");
    assert!(err.contains("bot.toml:5:"), "{err}");
    // The programs were verified meanwhile (on another thread), but a refused start pins
    // nothing: the fresh pin root is as it was.
    let pin_root = std::path::Path::new("/sys/fs/bpf").join(&tree.rel);
    assert!(
        !pin_root.exists(),
        "a refused start left {}",
        pin_root.display()
    );
}

#[test]
fn check_reports_file_line_column_and_passes_bundled_policies() {
    // Pure CLI, but it uses the built binary, so it runs with the kernel tests.
    if !kernel_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("a.toml"),
        "name = \"Bad.Name\"\n[[egress]]\ncidrs = [\"10.0.0.1/8\"]\nports = [70000]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "name = \"ok.test.x\"\nbogus = 1\n",
    )
    .unwrap();
    let out = Command::new(agentseg_bin())
        .arg("check")
        .arg(dir.path())
        .output()
        .expect("check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in ["a.toml:1:8", "a.toml:3:10", "a.toml:4:10", "b.toml:2:1"] {
        assert!(err.contains(expected), "missing {expected} in:\n{err}");
    }
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let out = Command::new(agentseg_bin())
        .arg("check")
        .arg(&bundled)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_segment_with_100k_prefixes_loads_and_enforces() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.1:8080", "127.0.0.2:8080"], &[]);
    // 100,000 /32s in 10.0.0.0/8 (no route to them in the namespace), plus the one loopback
    // peer, placed last.
    let v4 = |a: u32| std::net::Ipv4Addr::from(a).to_string();
    let listed = |i: u32| v4(0x0a00_0000u32 + i * 3);
    let mut cidrs = String::new();
    for i in 0..100_000u32 {
        cidrs.push_str(&format!("\"{}\",", listed(i)));
    }
    cidrs.push_str("\"127.0.0.1\"");
    let policy = format!(
        "name = \"big.test.load\"\n[[egress]]\ncidrs = [{cidrs}]\nports = [8080]\nprotocol = \"tcp\"\n"
    );
    let d = Daemon::start(&tree, &[("big.toml", &policy)]);
    assert!(
        d.stdout_lines.iter().any(|l| l.contains("100001 prefixes")),
        "{:?}",
        d.stdout_lines
    );
    let tcp = |dst: &str| d.run_probe("big.test.load", &ns, &["connect", "tcp", dst]);
    assert_eq!(
        l.judged("tcp", "127.0.0.1:8080", tcp("127.0.0.1:8080")),
        "ok"
    );
    assert_eq!(
        l.judged("tcp", "127.0.0.2:8080", tcp("127.0.0.2:8080")),
        "EPERM"
    );
    // Prefixes from the start and the middle of the table are allowed (the connect gets as
    // far as routing: no route in the namespace), their unlisted neighbours are denied.
    for i in [0, 50_000] {
        let (inside, beside) = (listed(i), v4(0x0a00_0000u32 + i * 3 + 1));
        assert_eq!(tcp(&format!("{inside}:8080")), "ENETUNREACH", "{inside}");
        assert_eq!(tcp(&format!("{beside}:8080")), "EPERM", "{beside}");
    }
}

#[test]
fn run_as_another_user_cannot_walk_out_of_its_pen() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, &[("bot.toml", SEG)]);
    // The probe must be executable by uid 65534: a copy in a world-readable directory.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let probe = dir.path().join("agentseg-probe");
    std::fs::copy(probe_bin(), &probe).expect("copy");
    let run = |action: &str| {
        let out = d.cli(&[
            "run",
            "--segment",
            "bot.test.none",
            "--user",
            "65534",
            "--",
            probe.to_str().expect("utf8"),
            action,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(run("uid"), "uid=65534 gid=65534 groups=0");
    assert_eq!(
        run("escape"),
        "EACCES",
        "an unprivileged agent moved itself out"
    );
    // Still confined: it joined its cgroup before dropping privileges.
    let cg = run("cgroup");
    assert!(cg.contains("/bot.test.none/"), "{cg}");
    // Without --user an agent gets a uid of its own (never root), and cannot walk out either.
    let own = d.run_probe("bot.test.none", &ns, &["uid"]);
    let uid: u32 = own
        .strip_prefix("uid=")
        .and_then(|r| r.split(' ').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{own}"));
    assert!(uid >= 1_900_000_000, "{own}");
    assert_eq!(d.run_probe("bot.test.none", &ns, &["escape"]), "EACCES");
    // An unknown user starts nothing.
    let out = d.cli(&[
        "run",
        "--segment",
        "bot.test.none",
        "--user",
        "no-such-user-xyz",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
}
