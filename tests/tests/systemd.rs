//! The systemd unit (issue 14.1): `systemd-analyze verify` accepts it, its exposure score is
//! reported and bounded, and the daemon speaks the notify protocol the unit relies on
//! (`Type=notify` READY=1, `WatchdogSec=` WATCHDOG=1 with every heartbeat). A systemd booted
//! in namespaces of the test's own starts, reloads and stops the packaged unit as it is, and
//! every capability in its bounding set is shown needed by removing it.
use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use agentseg_tests::{
    CgroupTree, Daemon, Proc, agentseg_bin, boot::Booted, kernel_ready, unit_capabilities,
    wait_until,
};

fn unit_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agentseg.service")
}

/// The unit with its commands pointing at the binary under test.
fn unit_copy(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(unit_file()).expect("unit");
    let bin = agentseg_bin();
    let text = text.replace("/usr/local/bin/agentseg", bin.to_str().expect("utf8"));
    let path = dir.join("agentseg.service");
    std::fs::write(&path, text).expect("write unit");
    path
}

#[test]
fn the_unit_verifies_and_its_exposure_is_bounded() {
    if !kernel_ready() {
        return;
    }
    let Ok(_) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is missing (systemd is part of this machine's image)");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze verify");
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for agentseg.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!(
        "systemd-analyze security: agentseg.service exposure {score} (0 = locked down, 10 = exposed)"
    );
    assert!(score <= 4.5, "exposure {score} grew past 4.5:\n{text}");
    // The directives the daemon needs are there.
    let unit_text = std::fs::read_to_string(unit_file()).expect("unit");
    for needed in [
        "LogsDirectory=agentseg",
        "ExecReload=/usr/local/bin/agentseg reload",
        "WatchdogSec=",
        "LimitMEMLOCK=infinity",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=",
    ] {
        assert!(unit_text.contains(needed), "the unit lacks {needed}");
    }
}

#[test]
fn the_daemon_notifies_ready_and_feeds_the_watchdog() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let seg = "name = \"sd.test.web\"\n[[egress]]\ncidrs = [\"127.0.0.1\"]\nports = [80]\nprotocol = \"tcp\"\n";
    let mut d = Daemon::prepare(&tree, &[("web.toml", seg)], &[]);
    let sock_path = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    d.env.push((
        "NOTIFY_SOCKET".into(),
        sock_path.to_str().expect("utf8").into(),
    ));
    d.env.push(("WATCHDOG_USEC".into(), "30000000".into()));
    d.launch().expect("daemon");
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    while said.len() < 3 {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(said[0], "READY=1", "{said:?}");
    assert!(said[1..].iter().all(|s| s == "WATCHDOG=1"), "{said:?}");
}

/// A segment whose member lives in a cgroup delegated to uid 4242 (mode 0700, as a delegated
/// subtree may be) and in a network namespace of its own: what the daemon's capabilities are
/// for, besides loading and attaching its programs.
const MEMBER_SEGMENT: &str = r#"name = "boot.test.member"
[[egress]]
fqdns = ["allowed.example"]
ports = [443]
protocol = "tcp"
[members]
cgroups = ["boot/member"]
"#;
const MEMBER_CGROUP: &str = "/sys/fs/cgroup/boot/member";

fn start_member(boot: &Booted) -> Proc {
    let script = format!(
        "mkdir -p {MEMBER_CGROUP} && chown 4242:4242 {MEMBER_CGROUP} && chmod 0700 {MEMBER_CGROUP} \
         && echo $$ > {MEMBER_CGROUP}/cgroup.procs && exec unshare --net sh -c \
         'ip link set lo up && exec setpriv --reuid 4242 --regid 4242 --clear-groups sleep 3600'"
    );
    let member = Proc(
        boot.command(&["sh", "-c", &script])
            .spawn()
            .expect("member"),
    );
    let procs = boot
        .root()
        .join(MEMBER_CGROUP.trim_start_matches('/'))
        .join("cgroup.procs");
    wait_until(Duration::from_secs(10), "the member's start", || {
        !std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .trim()
            .is_empty()
    });
    member
}

/// A lookup of a name the segment does not allow, from inside the member's cgroup and network
/// namespace: "rcode=REFUSED ..." when the daemon's resolver serves that namespace.
fn member_lookup(boot: &Booted) -> String {
    let script = format!(
        "m=$(head -1 {MEMBER_CGROUP}/cgroup.procs) && echo $$ > {MEMBER_CGROUP}/cgroup.procs && \
         exec nsenter -t $m -n setpriv --reuid 4242 --regid 4242 --clear-groups \
         agentseg-probe resolve --timeout-ms 700 denied.example 127.0.0.53:53"
    );
    let out = boot.exec(&["sh", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Cold start, DNS in the member's namespace, `agentseg run`, restart adopting the pins: what
/// failed, each with what it said.
fn exercise(boot: &Booted) -> Vec<String> {
    let mut failed = Vec::new();
    let _ = boot.systemctl(&["stop", "agentseg"]);
    let _ = boot.exec(&["agentseg", "uninstall"]);
    let _ = boot.systemctl(&["reset-failed", "agentseg"]);
    let since = boot.exec(&["date", "+@%s"]);
    let since = String::from_utf8_lossy(&since.stdout).trim().to_owned();
    let (ok, said) = boot.systemctl(&["start", "agentseg"]);
    if !ok {
        let journal = boot.journal("agentseg", &since);
        let why = journal
            .lines()
            .rfind(|l| l.starts_with("agentseg:"))
            .unwrap_or(said.trim());
        failed.push(format!("start ({why})"));
        return failed;
    }
    let start = Instant::now();
    let mut answer = member_lookup(boot);
    while !answer.starts_with("rcode=REFUSED") && start.elapsed() < Duration::from_secs(4) {
        answer = member_lookup(boot);
    }
    if !answer.starts_with("rcode=REFUSED") {
        let journal = boot.journal("agentseg", &since);
        let why = journal
            .lines()
            .rfind(|l| l.contains("WARN") && !l.contains("detector="))
            .unwrap_or(&answer);
        failed.push(format!("DNS in the member's namespace ({})", why.trim()));
    }
    let out = boot.exec(&[
        "timeout",
        "20",
        "agentseg",
        "run",
        "--segment",
        "boot.test.member",
        "--",
        "/bin/true",
    ]);
    if !out.status.success() {
        failed.push(format!(
            "agentseg run ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (ok, said) = boot.systemctl(&["restart", "agentseg"]);
    if !ok {
        failed.push(format!("restart on its pins ({})", said.trim()));
    }
    let _ = boot.systemctl(&["stop", "agentseg"]);
    failed
}

/// Bound the service to `caps` (a drop-in, as an administrator would write it).
fn bound_to(boot: &Booted, caps: &[String]) {
    boot.write(
        "/etc/systemd/system/agentseg.service.d/caps.conf",
        &format!(
            "[Service]\nCapabilityBoundingSet=\nCapabilityBoundingSet={}\nRestart=no\n",
            caps.join(" ")
        ),
    );
    let (ok, said) = boot.systemctl(&["daemon-reload"]);
    assert!(ok, "daemon-reload: {said}");
}

#[test]
fn systemd_starts_reloads_and_stops_the_unit_and_needs_each_capability() {
    if !kernel_ready() {
        return;
    }
    let boot = Booted::boot();
    // The README's install lines, run as written (but the first, which builds and installs
    // the binary: the one under test is in place). `systemctl enable --now` returns once the
    // daemon said READY=1 (Type=notify).
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README");
    let block: Vec<&str> = readme
        .split("Without the package, to install on a host")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the README's install block")
        .lines()
        .collect();
    assert!(
        block[0].ends_with("install -m 0755 target/release/agentseg /usr/local/bin/agentseg"),
        "the README's install block changed: {block:?}"
    );
    let script = format!("set -e\ncd /src\n{}", block[1..].join("\n"));
    let out = boot.exec(&["sh", "-c", &script]);
    assert!(
        out.status.success(),
        "the README's install lines: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        boot.journal("agentseg", "-1h")
    );
    let (_, state) = boot.systemctl(&["is-active", "agentseg"]);
    assert_eq!(state.trim(), "active");
    let _member = start_member(&boot);

    // The watchdog is fed: systemd records each WATCHDOG=1 it accepts.
    let fed = || {
        boot.systemctl(&[
            "show",
            "agentseg",
            "-p",
            "WatchdogTimestampMonotonic",
            "--value",
        ])
        .1
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
    };
    let first = fed();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        first > 0 && fed() > first,
        "systemd saw no WATCHDOG=1 within 2.5 s (first at {first})"
    );

    // Reload: a good policy is applied, a bad one fails `systemctl reload` and changes nothing.
    boot.write("/etc/agentseg/policies/zz-member.toml", MEMBER_SEGMENT);
    let (ok, said) = boot.systemctl(&["reload", "agentseg"]);
    assert!(ok, "systemctl reload: {said}");
    let status = boot.exec(&["agentseg", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(
        status["segments"].as_array().map(Vec::len),
        Some(6),
        "{status}"
    );
    boot.write("/etc/agentseg/policies/zz-bad.toml", "name = \"bad\n");
    let (ok, said) = boot.systemctl(&["reload", "agentseg"]);
    assert!(!ok, "a refused policy must fail systemctl reload: {said}");
    let journal = boot.journal("agentseg", "-1h");
    assert!(
        journal.contains("zz-bad.toml:1:") && journal.contains("reload refused"),
        "{journal}"
    );
    let (_, state) = boot.systemctl(&["is-active", "agentseg"]);
    assert_eq!(
        state.trim(),
        "active",
        "a refused reload stopped the service"
    );
    boot.remove("/etc/agentseg/policies/zz-bad.toml");

    // Stop: the service goes, enforcement stays pinned; a start adopts it.
    let (ok, said) = boot.systemctl(&["stop", "agentseg"]);
    assert!(ok, "systemctl stop: {said}");
    let (_, state) = boot.systemctl(&["is-active", "agentseg"]);
    assert_eq!(state.trim(), "inactive");
    assert!(
        boot.exists("/sys/fs/bpf/agentseg"),
        "stopping removed the pins"
    );
    let (ok, said) = boot.systemctl(&["start", "agentseg"]);
    assert!(ok, "systemctl start on the pins: {said}");
    assert!(
        boot.journal("agentseg", "-1h")
            .contains("adopting pinned state"),
        "the second start did not adopt the pins"
    );

    // Every capability in the bounding set is needed: with all of them everything works,
    // without any one of them something fails.
    let caps = unit_capabilities();
    let mut table = vec![format!("{:<22} what fails without it", "capability")];
    let failed = exercise(&boot);
    assert!(
        failed.is_empty(),
        "with the unit's capabilities: {failed:?}"
    );
    for cap in &caps {
        let rest: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        bound_to(&boot, &rest);
        let failed = exercise(&boot);
        assert!(
            !failed.is_empty(),
            "{cap} is in the unit's bounding set but nothing fails without it"
        );
        table.push(format!("{cap:<22} {}", failed.join("; ")));
    }
    // The documented variant for hosts whose agents share the daemon's network namespace:
    // CAP_SYS_ADMIN (setns) swapped for the three it implies for bpf(); each of them needed,
    // and members in namespaces of their own get no resolver.
    let variant: Vec<String> = caps
        .iter()
        .filter(|c| *c != "CAP_SYS_ADMIN")
        .cloned()
        .chain(["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"].map(String::from))
        .collect();
    bound_to(&boot, &variant);
    let failed = exercise(&boot);
    assert!(
        failed.len() == 1 && failed[0].starts_with("DNS in the member's namespace"),
        "without CAP_SYS_ADMIN only member namespaces lose the resolver: {failed:?}"
    );
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        let rest: Vec<String> = variant.iter().filter(|c| *c != cap).cloned().collect();
        bound_to(&boot, &rest);
        let failed = exercise(&boot);
        assert!(
            failed.iter().any(|f| f.starts_with("start")),
            "{cap}: without CAP_SYS_ADMIN the daemon should need it to start: {failed:?}"
        );
        table.push(format!(
            "{cap:<22} (variant without CAP_SYS_ADMIN) {}",
            failed.join("; ")
        ));
    }
    eprintln!("{}", table.join("\n"));
}
