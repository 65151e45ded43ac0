//! Helpers for the sandbox tests (`tests/tests/sandbox.rs`): start `agentseg run` with the
//! sandbox probe as the agent, the launcher inside the test's network namespace (the agent
//! cannot enter one itself: no capabilities, `setns` refused), and read what it printed.
use std::{
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{Daemon, Netns, agentseg_bin};

/// The sandbox probe, built beside `agentseg` by `cargo xtask test`.
pub fn sandbox_probe_bin() -> PathBuf {
    agentseg_bin().with_file_name("agentseg-sandbox-probe")
}

/// `agentseg run --segment SEG [--user U] -- CMD...` against `d`, started in `ns`.
pub fn run_cmd(d: &Daemon, ns: &Netns, segment: &str, user: Option<&str>, cmd: &[&str]) -> Command {
    let mut c = Command::new(agentseg_bin());
    c.arg("--socket")
        .arg(&d.socket)
        .args(["run", "--segment", segment]);
    if let Some(u) = user {
        c.args(["--user", u]);
    }
    c.arg("--").args(cmd);
    ns.enter_on_exec(&mut c);
    c
}

/// The same with the sandbox probe as CMD.
pub fn probe_cmd(
    d: &Daemon,
    ns: &Netns,
    segment: &str,
    user: Option<&str>,
    args: &[&str],
) -> Command {
    let probe = sandbox_probe_bin();
    let mut cmd = vec![probe.to_str().expect("utf8")];
    cmd.extend_from_slice(args);
    run_cmd(d, ns, segment, user, &cmd)
}

/// Run the probe as an agent; its one-line answer (panics unless the launcher succeeded).
pub fn probe(d: &Daemon, ns: &Netns, segment: &str, user: Option<&str>, args: &[&str]) -> String {
    let out = probe_cmd(d, ns, segment, user, args)
        .stdin(Stdio::null())
        .output()
        .expect("run agentseg");
    assert!(
        out.status.success(),
        "agentseg run {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The agent id in the launcher's start line (`agentseg: agent ID segment ...`).
pub fn agent_id(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| {
            l.strip_prefix("agentseg: agent ")?
                .split_whitespace()
                .next()
        })
        .unwrap_or_else(|| panic!("no start line in {err}"))
        .to_owned()
}

/// `key=value` from the probe's `status` line.
pub fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {status:?}"))
}

/// Every file under `dir` (relative paths, sorted): a snapshot of the daemon's pins.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap_or(&p).to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Sandbox audit records of `agent` for `syscall`, summed; polled until it reaches `want` or
/// the deadline passes (the launcher reports at most once a second).
pub fn sandbox_refusals(d: &Daemon, agent: &str, syscall: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
        let sum: u64 = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "sandbox" && v["agent"] == agent && v["syscall"] == syscall)
            .filter_map(|v| v["count"].as_u64())
            .sum();
        if sum >= want || Instant::now() > deadline {
            return sum;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process the test started (killed and reaped on drop).
pub struct Started(pub Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sleep 60` as `uid`: a process outside every pen.
pub fn sleeper(uid: u32) -> Started {
    Started(
        Command::new("sleep")
            .arg("60")
            .uid(uid)
            .gid(uid)
            .spawn()
            .expect("spawn sleep"),
    )
}

/// A pseudo-terminal pair: (master, slave).
pub fn openpty() -> (OwnedFd, OwnedFd) {
    // SAFETY: the usual posix_openpt sequence; every result is checked and owned.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0, "posix_openpt");
        let master = OwnedFd::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0
        );
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(slave >= 0, "open pty slave");
        (master, OwnedFd::from_raw_fd(slave))
    }
}

/// Make `cmd` start in a new session with `tty` as its controlling terminal and 0-2.
pub fn on_terminal(cmd: &mut Command, tty: &OwnedFd) {
    let fd = tty.as_raw_fd();
    // SAFETY: setsid, ioctl and dup2 are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for target in 0..3 {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Bytes waiting in a terminal's input queue.
pub fn input_queued(tty: &OwnedFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCINQ writes one int.
    assert_eq!(
        unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCINQ, &mut n) },
        0
    );
    n
}
