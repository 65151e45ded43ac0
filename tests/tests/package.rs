//! The Debian package (issue 14.2), installed on this machine with `dpkg -i` and removed again
//! (`dpkg --purge`, also when the test fails): its files are where a host expects them, the
//! config is a conffile, the unit verifies with the packaged path, and the packaged binary (its
//! kernel objects embedded) checks the bundled examples and runs the daemon on them.
//!
//! `cargo xtask test` builds the package first and names it in `AGENTSEG_DEB`; without it the
//! test says so and passes only outside CI.
use std::{path::Path, process::Command, time::Duration};

use agentseg_tests::{CgroupTree, kernel_ready, run_ok, wait_until};

/// `dpkg --purge agentseg` on drop.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "agentseg"]).status();
    }
}

#[test]
fn the_package_installs_verifies_and_runs_the_daemon() {
    if !kernel_ready() {
        return;
    }
    let Some(deb) = std::env::var_os("AGENTSEG_DEB") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "AGENTSEG_DEB unset under CI: `cargo xtask test` builds the package"
        );
        eprintln!("SKIPPED: AGENTSEG_DEB unset (cargo xtask deb builds the package)");
        return;
    };
    // Nothing of ours may be there already: the test removes what it installs.
    let before = Command::new("dpkg")
        .args(["-s", "agentseg"])
        .output()
        .expect("dpkg");
    assert!(
        !before.status.success(),
        "agentseg is installed on this machine already"
    );
    let _installed = Installed;
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    for f in [
        "/usr/bin/agentseg",
        "/lib/systemd/system/agentseg.service",
        "/etc/agentseg/agentseg.toml",
        "/usr/share/doc/agentseg/README.md",
        "/usr/share/doc/agentseg/prometheus-rules.yml",
        "/usr/share/bash-completion/completions/agentseg",
        "/usr/share/zsh/vendor-completions/_agentseg",
        "/usr/share/fish/vendor_completions.d/agentseg.fish",
        "/usr/share/man/man8/agentseg.8.gz",
    ] {
        assert!(Path::new(f).is_file(), "{f} missing");
    }
    let conffiles =
        run_ok(Command::new("dpkg-query").args(["--control-show", "agentseg", "conffiles"]));
    assert!(
        conffiles.contains("/etc/agentseg/agentseg.toml"),
        "{conffiles}"
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/agentseg.service").expect("unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/agentseg daemon"),
        "{unit}"
    );
    run_ok(
        Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/agentseg.service"]),
    );
    let examples = "/usr/share/doc/agentseg/examples";
    run_ok(Command::new("/usr/bin/agentseg").args(["check", examples]));
    // The packaged daemon, on the packaged examples, in the test's own cgroup tree and paths.
    let tree = CgroupTree::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agentseg.sock");
    let root = tree.rel("");
    let root = root.trim_end_matches('/').to_owned();
    let pin_root = format!("/sys/fs/bpf/{root}");
    let mut daemon = Command::new("/usr/bin/agentseg")
        .args([
            "daemon",
            "--policies",
            examples,
            "--metrics",
            "off",
            "--dns-port",
            "0",
        ])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--audit-log")
        .arg(dir.path().join("log/audit.jsonl"))
        .args(["--pin-root", &pin_root])
        .args(["--enforcement-root", &root])
        .args(["--agent-root", &tree.rel("agents")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the packaged daemon");
    let status = |s: &Path| {
        Command::new("/usr/bin/agentseg")
            .arg("--socket")
            .arg(s)
            .arg("status")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    wait_until(Duration::from_secs(20), "the packaged daemon ready", || {
        status(&socket)
    });
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    let _ = Command::new("/usr/bin/agentseg")
        .args(["uninstall", "--pin-root", &pin_root])
        .arg("--socket")
        .arg(&socket)
        .status();
}
