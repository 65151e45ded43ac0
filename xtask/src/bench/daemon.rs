//! An agentseg daemon started by the bench: stopped (SIGTERM, only our own child) and
//! uninstalled on drop, so no program or pin outlives the run.
use std::{
    ffi::OsStr,
    io::BufRead as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::env::CG_ROOT;

pub struct Daemon {
    child: Option<Child>,
    bin: PathBuf,
    work: PathBuf,
    policies: PathBuf,
    n: u32,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    pub audit_log: PathBuf,
    /// Spawn to the `agentseg: ready:` line.
    pub ready: Duration,
}

/// Children die with the bench (a crashed bench must not leave a daemon enforcing).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        })
    }
}

/// A port free for both UDP and TCP on the resolver's address 127.64.0.1 (in the bench's
/// namespace: the resolver also listens there, and in the namespaces of its members).
fn free_dns_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.64.0.1:0").context("binding 127.64.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.64.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on 127.64.0.1")
}

impl Daemon {
    pub fn start(bin: &Path, work: &Path, policies: &Path, n: u32) -> anyhow::Result<Self> {
        Self::start_with(bin, work, policies, n, &[])
    }

    /// `start` with more daemon flags (`--config FILE`, `--dns-upstream ADDR:PORT`, ...).
    pub fn start_with(
        bin: &Path,
        work: &Path,
        policies: &Path,
        n: u32,
        extra: &[&OsStr],
    ) -> anyhow::Result<Self> {
        let mut d = Daemon {
            child: None,
            bin: bin.to_owned(),
            work: work.to_owned(),
            policies: policies.to_owned(),
            n,
            socket: work.join(format!("agentseg-{n}.sock")),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/{}{n}", super::env::PREFIX)),
            audit_log: work.join(format!("audit-{n}.jsonl")),
            ready: Duration::ZERO,
        };
        d.spawn(extra)?;
        Ok(d)
    }

    /// Stop the daemon the way systemd does (SIGTERM; the pins keep enforcing) and start it
    /// again on the same pins, state and policy with `extra` flags: `ready` is then the
    /// restart's spawn-to-ready time.
    pub fn restart(&mut self, extra: &[&OsStr]) -> anyhow::Result<()> {
        self.terminate();
        self.spawn(extra)
    }

    fn spawn(&mut self, extra: &[&OsStr]) -> anyhow::Result<()> {
        let n = self.n;
        let work = &self.work;
        let state = work.join(format!("state-{n}"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join(format!("daemon-{n}.log")))?;
        let dns_port = free_dns_port()?;
        let start = Instant::now();
        let mut child = die_with_parent(
            Command::new(&self.bin)
                .arg("daemon")
                .arg("--policies")
                .arg(&self.policies)
                .arg("--socket")
                .arg(&self.socket)
                .arg("--agent-root")
                .arg(format!("{CG_ROOT}/agents"))
                // The bench's own tree, not the host's root: nothing outside it is touched.
                .arg("--enforcement-root")
                .arg(CG_ROOT)
                .arg("--pin-root")
                .arg(&self.pin_root)
                .arg("--state-dir")
                .arg(&state)
                .arg("--audit-log")
                .arg(&self.audit_log)
                .args(["--metrics", "off"])
                // The resolver's port of its own, never the default 53 on the host's
                // 127.64.0.1 (a daemon of the host's, or of the tests, may hold it).
                .arg("--dns-port")
                .arg(dns_port.to_string())
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(stderr),
        )
        .spawn()
        .context("starting agentseg daemon")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        // Keep draining stdout after the ready line so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("agentseg: ready:") {
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => self.ready = start.elapsed(),
            Err(_) => bail!(
                "agentseg daemon not ready within 120 s (see {}/daemon-{n}.log)",
                work.display()
            ),
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// User + system CPU time the daemon has used, in seconds (`/proc/PID/stat`).
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = stat.rsplit_once(") ")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (hz > 0.0).then(|| ticks / hz)
    }

    pub fn rss_mb(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        super::env::sh(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
        )
    }

    /// `agentseg prove --ceiling FILE --policies DIR`: its output (exit 1, violations found,
    /// is an answer too).
    pub fn prove(&self, ceiling: &Path, policies: &Path) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .arg("prove")
            .arg("--ceiling")
            .arg(ceiling)
            .arg("--policies")
            .arg(policies)
            .output()
            .context("running agentseg prove")?;
        if !matches!(out.status.code(), Some(0 | 1)) {
            anyhow::bail!(
                "agentseg prove: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.cli(&["status", "--json"])?).context("parsing status --json")
    }

    /// SIGTERM to our own child, SIGKILL after 10 s; the pins stay.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn stop(&mut self) {
        self.terminate();
        let _ = Command::new(&self.bin)
            .arg("uninstall")
            .arg("--pin-root")
            .arg(&self.pin_root)
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
