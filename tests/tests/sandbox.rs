//! The sandbox `agentseg run` builds (issue 9): credentials, seccomp, Landlock, session,
//! descriptors, exit codes, refusal counts. Every agent's launcher runs inside a namespace the
//! test made (only `lo`), so nothing an agent sends can leave the machine.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::fd::OwnedFd,
    process::Stdio,
    time::{Duration, Instant},
};

use agentseg_tests::{
    CgroupTree, Daemon, Netns, cgroup2_mount, kernel_ready,
    sandbox::{
        agent_id, field, files_under, input_queued, on_terminal, openpty, probe, probe_cmd,
        run_cmd, sandbox_refusals, sleeper,
    },
};

/// A default segment: loopback port 2 allowed, everything else denied.
const PLAIN: &str = r#"
name = "sbx.test.plain"
[[egress]]
cidrs = ["127.0.0.1"]
ports = [2]
protocol = "tcp"
"#;

/// Root agents allowed (still without capabilities).
const ROOT: &str = r#"
name = "sbx.test.root"
allow_root = true
[[egress]]
cidrs = ["127.0.0.1"]
ports = [2]
protocol = "tcp"
"#;

/// Every relaxation the sandbox knows.
const RELAXED: &str = r#"
name = "sbx.test.relaxed"
capabilities = ["net_raw"]
[sockets]
families = ["inet", "inet6", "unix", "packet", "vsock"]
raw = true
io_uring = true
[[egress]]
cidrs = ["127.0.0.1"]
ports = [2]
protocol = "tcp"
"#;

const AF_INET: &str = "2";
const AF_PACKET: &str = "17";
const AF_VSOCK: &str = "40";
const SOCK_STREAM: &str = "1";
const SOCK_RAW: &str = "3";
const IPPROTO_ICMP: &str = "1";

fn setup(files: &[(&str, &str)]) -> (CgroupTree, Netns, Daemon) {
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let d = Daemon::start(&tree, files);
    (tree, ns, d)
}

/// The tests, in a module of this name so that `cargo xtask test sandbox` selects them.
mod sandbox {
    use super::*;

    #[test]
    fn plain_agents_get_an_own_uid_and_no_privilege() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN)]);
        let status = probe(&d, &ns, "sbx.test.plain", None, &["status"]);
        assert_ne!(field(&status, "uid"), "0", "{status}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(field(&status, set), "0000000000000000", "{set}: {status}");
        }
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
        assert_eq!(field(&status, "Seccomp"), "2", "{status}");
        // Two agents alive at once have different uids.
        let start = || {
            probe_cmd(&d, &ns, "sbx.test.plain", None, &["status-wait"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn agent")
        };
        let (mut a, mut b) = (start(), start());
        let first_line = |c: &mut std::process::Child| {
            let mut line = String::new();
            BufReader::new(c.stdout.as_mut().expect("stdout"))
                .read_line(&mut line)
                .expect("agent status");
            line
        };
        let (sa, sb) = (first_line(&mut a), first_line(&mut b));
        drop((a.stdin.take(), b.stdin.take()));
        assert!(a.wait().expect("wait").success() && b.wait().expect("wait").success());
        assert_ne!(field(&sa, "uid"), field(&sb, "uid"), "{sa} / {sb}");
        assert_ne!(field(&sa, "uid"), "0");
    }

    #[test]
    fn root_agents_cannot_leave_their_pen_or_touch_agentseg() {
        if !kernel_ready() {
            return;
        }
        let (tree, ns, d) = setup(&[("root.toml", ROOT)]);
        let root = |args: &[&str]| probe(&d, &ns, "sbx.test.root", Some("root"), args);
        assert_eq!(field(&root(&["status"]), "uid"), "0");
        assert_eq!(field(&root(&["status"]), "CapEff"), "0000000000000000");
        // Out of the pen: the cgroup2 root, a sibling, the segment's parent cgroup.
        std::fs::create_dir(tree.abs("sibling")).expect("sibling cgroup");
        let targets = [
            cgroup2_mount().join("cgroup.procs"),
            tree.abs("sibling/cgroup.procs"),
            tree.abs("agents/sbx.test.root/cgroup.procs"),
        ];
        for procs in &targets {
            let got = root(&["join", procs.to_str().expect("utf8")]);
            assert_ne!(
                got,
                "ok",
                "a root agent moved itself to {}",
                procs.display()
            );
        }
        // agentseg's own files.
        let evil = d.policies.join("evil.toml");
        assert_ne!(root(&["write", evil.to_str().expect("utf8")]), "ok");
        assert!(!evil.exists(), "a root agent wrote a policy file");
        assert_eq!(root(&["bpf"]), "EPERM");
        // `agentseg uninstall` from inside removes nothing.
        let pins = files_under(&d.pin_root);
        assert!(
            !pins.is_empty(),
            "the daemon pinned nothing under {}",
            d.pin_root.display()
        );
        let bin = agentseg_tests::agentseg_bin();
        let out = run_cmd(
            &d,
            &ns,
            "sbx.test.root",
            Some("root"),
            &[
                bin.to_str().expect("utf8"),
                "--socket",
                "/nonexistent",
                "uninstall",
                "--pin-root",
                d.pin_root.to_str().expect("utf8"),
            ],
        )
        .output()
        .expect("run uninstall");
        assert_eq!(
            files_under(&d.pin_root),
            pins,
            "uninstall inside a pen removed pins: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Nor by unlinking a pin itself (the pin directories are root's, but under Landlock).
        let pin = d.pin_root.join(&pins[0]);
        assert_ne!(root(&["remove", pin.to_str().expect("utf8")]), "ok");
        assert!(pin.exists(), "a root agent removed {}", pin.display());
        // The segment still applies.
        assert_eq!(root(&["connect", "127.0.0.1:1"]), "EPERM");
        assert_eq!(
            probe(&d, &ns, "sbx.test.root", None, &["connect", "127.0.0.1:1"]),
            "EPERM"
        );
    }

    #[test]
    fn socket_families_raw_sockets_and_io_uring_follow_the_segment() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN), ("relaxed.toml", RELAXED)]);
        let plain = |args: &[&str]| probe(&d, &ns, "sbx.test.plain", None, args);
        assert_eq!(plain(&["socket", AF_PACKET, SOCK_RAW, "0"]), "EPERM");
        assert_eq!(plain(&["socket", AF_VSOCK, SOCK_STREAM, "0"]), "EPERM");
        assert_eq!(plain(&["socket", AF_INET, SOCK_RAW, IPPROTO_ICMP]), "EPERM");
        assert_eq!(plain(&["io-uring"]), "EPERM");
        assert_eq!(plain(&["socket", AF_INET, SOCK_STREAM, "0"]), "ok");
        assert_eq!(plain(&["resolve", "localhost"]), "ok");

        let relaxed = |args: &[&str]| probe(&d, &ns, "sbx.test.relaxed", None, args);
        let status = relaxed(&["status"]);
        assert_ne!(field(&status, "uid"), "0");
        for set in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
            assert_eq!(field(&status, set), "0000000000002000", "{set}: {status}");
        }
        assert_eq!(relaxed(&["socket", AF_PACKET, SOCK_RAW, "0"]), "ok");
        assert_eq!(relaxed(&["socket", AF_INET, SOCK_RAW, IPPROTO_ICMP]), "ok");
        // Past seccomp; the kernel may not have vsock (EAFNOSUPPORT, ENODEV), never EPERM.
        assert_ne!(relaxed(&["socket", AF_VSOCK, SOCK_STREAM, "0"]), "EPERM");
        assert_eq!(relaxed(&["io-uring"]), "ok");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn i386_system_calls_kill_the_agent() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN)]);
        let out = probe_cmd(&d, &ns, "sbx.test.plain", None, &["int80"])
            .output()
            .expect("run");
        // libseccomp's bad-architecture action: the thread dies of SIGSYS (31) before the call.
        assert_eq!(
            out.status.code(),
            Some(128 + 31),
            "stdout {:?} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty());
    }

    #[test]
    fn other_processes_cannot_be_traced_robbed_or_written() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN)]);
        // Same uid as the agent: without the sandbox all of these would succeed.
        const UID: u32 = 65534;
        let outside = sleeper(UID);
        let pid = outside.0.id().to_string();
        let user = UID.to_string();
        let agent = |args: &[&str]| probe(&d, &ns, "sbx.test.plain", Some(&user), args);
        assert_eq!(
            agent(&["status"]).split_whitespace().next(),
            Some("uid=65534")
        );
        assert_eq!(agent(&["ptrace", &pid]), "EPERM");
        assert_eq!(agent(&["pidfd-getfd", &pid]), "EPERM");
        assert_eq!(agent(&["vm-write", &pid]), "EPERM");
        // Signals stay within the agent's Landlock domain.
        assert_eq!(agent(&["kill0", &pid]), "EPERM");
    }

    #[test]
    fn tiocsti_from_a_terminal_reaches_nothing() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN)]);
        let (master, slave) = openpty();
        let mut cmd = probe_cmd(&d, &ns, "sbx.test.plain", None, &["tiocsti"]);
        on_terminal(&mut cmd, &slave);
        let mut launcher = cmd.spawn().expect("spawn agentseg run on a terminal");
        // Drain the terminal while the agent runs (its answer comes back through it).
        let reader = {
            let master: OwnedFd = master.try_clone().expect("dup master");
            std::thread::spawn(move || {
                let mut f = std::fs::File::from(master);
                let mut all = Vec::new();
                let mut buf = [0u8; 1024];
                // EIO once every slave descriptor is closed.
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&all).into_owned()
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = launcher.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "agent on a terminal did not finish"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}");
        assert_eq!(
            input_queued(&slave),
            0,
            "TIOCSTI pushed input into the terminal"
        );
        drop(slave);
        let shown = reader.join().expect("reader");
        let answer = shown
            .lines()
            .map(str::trim)
            .find(|l| !l.starts_with("agentseg:"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            answer == "EPERM",
            "TIOCSTI answered {answer:?}; terminal showed {shown:?}"
        );
        drop(master);
    }

    #[test]
    fn descriptors_exit_codes_and_refusals() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN)]);
        // A socket on the launcher's fd 0 reaches the agent as a pipe; nothing else but 0-2.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let out = probe_cmd(&d, &ns, "sbx.test.plain", None, &["fdkind", "0"])
            .stdin(OwnedFd::from(udp))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pipe");
        assert_eq!(probe(&d, &ns, "sbx.test.plain", None, &["fds"]), "0,1,2");
        // A command that cannot be executed: 126.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("not-executable");
        std::fs::write(&script, "#!/bin/sh\necho ran\n").expect("write");
        let out = run_cmd(
            &d,
            &ns,
            "sbx.test.plain",
            None,
            &[script.to_str().expect("utf8")],
        )
        .output()
        .expect("run");
        assert_eq!(
            out.status.code(),
            Some(126),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot execute"));
        // A refused start: 125, and the command never ran.
        let out = run_cmd(&d, &ns, "no.such.segment", None, &["sh", "-c", "echo ran"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(125));
        assert!(out.stdout.is_empty(), "the command ran");
        // The command's own exit code comes back.
        let out = run_cmd(&d, &ns, "sbx.test.plain", None, &["sh", "-c", "exit 7"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(7));
    }

    #[test]
    fn seccomp_refusals_are_counted_in_the_audit_log() {
        if !kernel_ready() {
            return;
        }
        let (_tree, ns, d) = setup(&[("plain.toml", PLAIN)]);
        let out = probe_cmd(
            &d,
            &ns,
            "sbx.test.plain",
            None,
            &["socket", AF_PACKET, SOCK_RAW, "0", "3"],
        )
        .output()
        .expect("run");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "EPERM,EPERM,EPERM"
        );
        let id = agent_id(&out);
        assert_eq!(
            sandbox_refusals(&d, &id, "socket", 3),
            3,
            "audit log:\n{}",
            std::fs::read_to_string(d.audit_log()).unwrap_or_default()
        );
    }
}
