//! Helpers for the real-kernel tests: RAII guards for network namespaces, cgroups and the
//! daemon, and a runner for the probe. Everything a test makes is removed on drop, failures
//! included. Tests panic with a message rather than return errors (aya's test/README).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod boot;
pub mod dns;
pub mod reference;
pub mod sandbox;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names made by this test process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// The variable that lets kernel tests skip (loudly) where they cannot run.
pub const SKIP_VAR: &str = "AGENTSEG_SKIP_KERNEL_TESTS";

/// Whether kernel tests can run here. When they cannot (not root, `AGENTSEG_BIN` unset), the
/// test fails with the reason: a suite that cannot run must never pass silently. The one way
/// out is `AGENTSEG_SKIP_KERNEL_TESTS=1`, which makes each such test print a SKIPPED line and
/// return; under CI (`CI=true`) even that is refused.
pub fn kernel_ready() -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root".to_owned())
    } else if std::env::var_os("AGENTSEG_BIN").is_none() {
        Some("AGENTSEG_BIN not set (run `cargo xtask test`)".to_owned())
    } else {
        None
    };
    let Some(why) = why else {
        return true;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("kernel test")
        .to_owned();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let skip = std::env::var(SKIP_VAR).is_ok_and(|v| v == "1");
    if ci {
        panic!("{test}: kernel test cannot run under CI: {why} ({SKIP_VAR} is ignored under CI)")
    }
    if !skip {
        panic!(
            "{test}: kernel test cannot run: {why}. Run the suite as root with `cargo xtask \
             test`, or set {SKIP_VAR}=1 to skip the kernel tests on purpose"
        )
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing tests.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED (NOT RUN) kernel test {test}: {why} [{SKIP_VAR}=1]\n").as_bytes(),
    );
    false
}

/// Poll `cond` (every 20 ms) until it holds; panic naming `what` unless it does within
/// `within`. Returns how long it took. The way to wait for something that must happen: never a
/// bare sleep.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Times (Unix ms) at which the probe's `stream`/`stream-serve` logging to `log` received data.
pub fn rx_times(log: &Path) -> Vec<u128> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("rx ").and_then(|t| t.parse().ok()))
        .collect()
}

/// One look at a flow of the probe's `stream` (both ends write every 10 ms): 30 write periods.
/// A running flow receives within it (the positive control, [`wait_flowing`]), so a flow that
/// receives nothing for as long is cut ([`wait_silent`]).
pub const QUIET: Duration = Duration::from_millis(300);

/// Wait (10 s at most) until the end of a flow logging to `log` receives within one [`QUIET`]
/// period: the flow runs, and one quiet period is long enough to see it.
pub fn wait_flowing(log: &Path, what: &str) -> Duration {
    wait_until(
        Duration::from_secs(10),
        &format!("{what}: the flow receives"),
        || {
            let n = rx_times(log).len();
            std::thread::sleep(QUIET);
            rx_times(log).len() > n
        },
    )
}

/// Wait (5 s at most) until the end of a flow logging to `log` has received nothing for one
/// [`QUIET`] period: the flow is cut. Returns the last time it received (Unix ms).
pub fn wait_silent(log: &Path, what: &str) -> u128 {
    wait_until(
        Duration::from_secs(5),
        &format!("{what}: the flow stops"),
        || {
            let n = rx_times(log).len();
            std::thread::sleep(QUIET);
            rx_times(log).len() == n
        },
    );
    rx_times(log).into_iter().max().unwrap_or(0)
}

pub fn agentseg_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("AGENTSEG_BIN").expect("AGENTSEG_BIN"))
}

/// The capabilities `packaging/agentseg.service` bounds the daemon to, as written there.
pub fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agentseg.service");
    std::fs::read_to_string(unit)
        .expect("unit")
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The probe binary, built beside `agentseg` by `cargo xtask test`.
pub fn probe_bin() -> PathBuf {
    agentseg_bin().with_file_name("agentseg-probe")
}

pub fn cgroup2_mount() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("no cgroup2 mount")
}

/// Run `cmd`, which must succeed (the failure names it and shows what it printed); its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with only `lo` (127.0.0.0/8, ::1, and two test-only v6 addresses on
/// lo). Nothing sent inside it can leave the machine: it has no other interface.
pub struct Netns {
    pub name: String,
}

/// Extra IPv6 addresses on the namespace's loopback (unique-local, only inside the netns).
pub const V6_A: &str = "fd00:a5::1";
pub const V6_B: &str = "fd00:a5::2";

impl Netns {
    pub fn create() -> Self {
        let name = unique("agseg");
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        // Ping sockets for every group: agents run as uids of their own.
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ]));
        for a in [V6_A, V6_B] {
            run_ok(Command::new("ip").args([
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ]));
        }
        ns
    }
}

impl Netns {
    /// Make `cmd` start inside this namespace (setns between fork and exec; the caller is
    /// root). The cgroup2 mount stays visible, unlike with `ip netns exec`.
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        // SAFETY: setns is async-signal-safe; the fd stays open in the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Netns {
    /// Run `f` on a thread that entered this namespace: the sockets it makes belong to the
    /// namespace (and stay usable from any thread afterwards).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .expect("thread in the namespace")
    }
}

/// bind(2) of an existing socket to `addr`.
fn bind_to(sock: &std::net::UdpSocket, addr: std::net::SocketAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: a valid sockaddr of `len` bytes.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const storage).cast(),
            len as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP listener inside a test namespace that counts the connections it accepted.
pub struct TcpCount(std::net::TcpListener);

impl TcpCount {
    pub fn bind(ns: &Netns, addr: &str) -> Self {
        let addr = addr.to_owned();
        let l = ns.within(move || std::net::TcpListener::bind(&addr).expect("bind tcp listener"));
        l.set_nonblocking(true).expect("nonblocking");
        Self(l)
    }

    /// The same with a deep accept queue (4096, the namespace's `somaxconn`): for a peer a loop
    /// connects to for seconds between two looks (a full queue drops SYNs: the loop would see
    /// timeouts).
    pub fn bind_deep(ns: &Netns, addr: &str) -> Self {
        use std::os::fd::AsRawFd as _;
        let l = Self::bind(ns, addr);
        // SAFETY: listen(2) again on our own listening socket only changes its backlog.
        let ret = unsafe { libc::listen(l.0.as_raw_fd(), 4096) };
        assert_eq!(ret, 0, "listen: {}", std::io::Error::last_os_error());
        l
    }

    /// Connections accepted so far (drains the backlog).
    pub fn count(&self) -> usize {
        std::iter::from_fn(|| self.0.accept().ok()).count()
    }
}

/// TCP listeners and UDP sinks in a test namespace, counting what reaches them: the proof that
/// an allowed attempt arrived exactly once and a denied one reached nothing. Bind `[::]:PORT` to
/// hear every v4, v6 and v4-mapped address of the namespace on that port (dual-stack), or one
/// address to tell peers apart.
pub struct Listeners {
    tcp: Vec<(std::net::SocketAddr, TcpCount)>,
    udp: Vec<(std::net::SocketAddr, UdpSink)>,
}

impl Listeners {
    /// TCP listeners at `tcp` and UDP sinks at `udp` (`ADDR:PORT` each).
    pub fn bind(ns: &Netns, tcp: &[&str], udp: &[&str]) -> Self {
        let parse = |a: &str| -> std::net::SocketAddr { a.parse().expect("listener address") };
        Self {
            tcp: tcp
                .iter()
                .map(|a| (parse(a), TcpCount::bind(ns, a)))
                .collect(),
            udp: udp
                .iter()
                .map(|a| (parse(a), UdpSink::bind(ns, a)))
                .collect(),
        }
    }

    /// The index of the listener an attempt to `dst` reaches: the one bound to its address, else
    /// a wildcard one on its port.
    fn find(bound: &[std::net::SocketAddr], dst: &str) -> usize {
        let dst: std::net::SocketAddr = dst.parse().expect("destination address");
        let ip = match dst.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        let same_port = |b: &std::net::SocketAddr| b.port() == dst.port();
        bound
            .iter()
            .position(|b| same_port(b) && b.ip() == ip)
            .or_else(|| {
                bound
                    .iter()
                    .position(|b| same_port(b) && b.ip().is_unspecified())
            })
            .unwrap_or_else(|| panic!("no listener for {dst}"))
    }

    /// What reached each listener since the last look (drains them): TCP first, then UDP.
    fn counts(&self) -> Vec<usize> {
        self.tcp
            .iter()
            .map(|(_, l)| l.count())
            .chain(self.udp.iter().map(|(_, s)| s.count()))
            .collect()
    }

    /// Check one attempt (`proto` "tcp" or "udp" to `dst`, with the probe's `outcome`) against
    /// the listeners: `ok` reached the listener of `dst` exactly once, anything else reached
    /// nothing, and no other listener heard anything meanwhile. Returns `outcome`, for the
    /// caller to assert.
    pub fn judged(&self, proto: &str, dst: &str, outcome: String) -> String {
        let bound: Vec<_> = match proto {
            "tcp" => self.tcp.iter().map(|(a, _)| *a).collect(),
            "udp" => self.udp.iter().map(|(a, _)| *a).collect(),
            other => panic!("protocol {other}"),
        };
        let target = Self::find(&bound, dst) + if proto == "udp" { self.tcp.len() } else { 0 };
        let expected = usize::from(outcome == "ok");
        let mut seen = self.counts();
        if expected == 1 {
            // Loopback delivery is done by the time the probe has exited; a short grace all
            // the same before calling it missing.
            let deadline = Instant::now() + Duration::from_secs(2);
            while seen[target] == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                for (s, n) in seen.iter_mut().zip(self.counts()) {
                    *s += n;
                }
            }
        }
        for (i, n) in seen.iter().enumerate() {
            let want = if i == target { expected } else { 0 };
            let name = self.name(i);
            assert_eq!(
                *n, want,
                "{proto} to {dst} said {outcome:?}, and {n} reached the listener at {name}"
            );
        }
        outcome
    }

    /// Nothing reached any listener since the last look.
    pub fn assert_silent(&self, when: &str) {
        for (i, n) in self.counts().into_iter().enumerate() {
            assert_eq!(n, 0, "{when}: {n} reached the listener at {}", self.name(i));
        }
    }

    fn name(&self, i: usize) -> String {
        if i < self.tcp.len() {
            format!("tcp {}", self.tcp[i].0)
        } else {
            format!("udp {}", self.udp[i - self.tcp.len()].0)
        }
    }
}

/// A fresh directory any uid may use (mode 1777), removed on drop: for sockets and files that
/// agents (uids of their own) must reach, and that a policy names before the daemon starts.
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod shared dir");
    dir
}

/// A UDP receiver inside a test namespace: counts what arrives (the proof that a denied send
/// reached nothing).
pub struct UdpSink(std::net::UdpSocket);

impl UdpSink {
    pub fn bind(ns: &Netns, addr: &str) -> Self {
        let addr = addr.to_owned();
        let sock = ns.within(move || std::net::UdpSocket::bind(&addr).expect("bind udp sink"));
        sock.set_nonblocking(true).expect("nonblocking");
        Self(sock)
    }

    /// The same for UDP-Lite (IPPROTO_UDPLITE).
    pub fn bind_udplite(ns: &Netns, addr: &str) -> Self {
        use std::os::fd::FromRawFd as _;
        let addr: std::net::SocketAddr = addr.parse().expect("address");
        let sock = ns.within(move || {
            let family = if addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket(2), owned at once.
            let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 136) };
            assert!(
                fd >= 0,
                "UDP-Lite socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh datagram socket; std's UdpSocket only binds and receives here.
            let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
            let std_sock = bind_to(&sock, addr);
            std_sock.expect("bind UDP-Lite sink");
            sock
        });
        sock.set_nonblocking(true).expect("nonblocking");
        Self(sock)
    }

    /// Datagrams received so far (drains the socket).
    pub fn count(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while self.0.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup tree for one test, under the cgroup2 mount. On drop the processes left in it
/// (all started by this test) are killed and the tree removed.
pub struct CgroupTree {
    pub rel: String,
    pub path: PathBuf,
}

impl CgroupTree {
    pub fn create() -> Self {
        let rel = unique("agentseg-test");
        let path = cgroup2_mount().join(&rel);
        std::fs::create_dir_all(&path).expect("create test cgroup");
        Self { rel, path }
    }

    /// A path (relative to the cgroup2 mount) below this tree.
    pub fn rel(&self, sub: &str) -> String {
        format!("{}/{sub}", self.rel)
    }

    pub fn abs(&self, sub: &str) -> PathBuf {
        self.path.join(sub)
    }
}

fn kill_and_remove(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_and_remove(&e.path());
            }
        }
    }
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove {}", dir.display());
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

/// An `agentseg daemon` on a policy directory, socket, agent root and pin root of the test's
/// own. It can be killed and restarted on the same state; on drop it is stopped and every pin
/// removed (`agentseg uninstall`).
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub policies: PathBuf,
    pub pin_root: PathBuf,
    agent_root: String,
    /// Where the task-judging programs attach: the test's own tree, never the host's root.
    enforcement_root: String,
    extra: Vec<String>,
    /// The resolver's port (on 127.64.0.1 in every namespace it serves): one of its own per
    /// daemon, kept across restarts, so that two daemons of one test never collide.
    pub dns_port: u16,
    pub dir: tempfile::TempDir,
    pub stdout_lines: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Environment variables the daemon is started with (set before [`Daemon::launch`]).
    pub env: Vec<(String, String)>,
}

/// A port free for both UDP and TCP on the resolver's address, in the test's namespace.
fn free_dns_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.64.0.1:0").expect("bind 127.64.0.1");
        let port = udp.local_addr().expect("local addr").port();
        if std::net::TcpListener::bind(("127.64.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.64.0.1");
}

impl Daemon {
    /// Write `files` (name, contents) to a fresh policy dir and start a daemon on it whose agent
    /// cgroups live under `tree`. Panics unless it reports ready within 30 s.
    pub fn start(tree: &CgroupTree, files: &[(&str, &str)]) -> Self {
        Self::start_with(tree, files, &[])
    }

    pub fn start_with(tree: &CgroupTree, files: &[(&str, &str)], extra: &[&str]) -> Self {
        let mut d = Self::prepare(tree, files, extra);
        d.launch()
            .unwrap_or_else(|e| panic!("daemon did not start: {e}"));
        d
    }

    /// Everything ready (policy dir, paths) but not started: for tests that start it themselves
    /// (`launch`), e.g. to see it refuse.
    pub fn prepare_only(tree: &CgroupTree, files: &[(&str, &str)]) -> Self {
        Self::prepare(tree, files, &[])
    }

    pub fn try_start(tree: &CgroupTree, files: &[(&str, &str)]) -> Result<Self, String> {
        let mut d = Self::prepare(tree, files, &[]);
        d.launch()?;
        Ok(d)
    }

    /// A daemon set up (tree, policy, paths) but not started: [`Daemon::launch`] starts it.
    pub fn prepare(tree: &CgroupTree, files: &[(&str, &str)], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Agents (uids of their own) may pass through to `scratch()`, not list or read it.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("chmod tempdir");
        }
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("mkdir");
        for (name, text) in files {
            std::fs::write(policies.join(name), text).expect("write policy");
        }
        Self {
            child: None,
            // In a directory of its own: the daemon protects it (Landlock) from every agent, and
            // agents must still write `scratch()`.
            socket: dir.path().join("run/agentseg.sock"),
            policies,
            pin_root: PathBuf::from("/sys/fs/bpf").join(&tree.rel),
            agent_root: tree.rel("agents"),
            enforcement_root: tree.rel.clone(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dns_port: free_dns_port(),
            dir,
            stdout_lines: Vec::new(),
            stderr: None,
            env: Vec::new(),
        }
    }

    /// Start (again) and wait for the readiness line.
    pub fn launch(&mut self) -> Result<(), String> {
        let mut child = Command::new(agentseg_bin())
            .args(["daemon", "--policies"])
            .arg(&self.policies)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--agent-root")
            .arg(&self.agent_root)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--enforcement-root")
            .arg(&self.enforcement_root)
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--audit-log")
            .arg(self.audit_log())
            .args(if self.extra.iter().any(|a| a == "--metrics") {
                &[][..]
            } else {
                &["--metrics", "off"][..]
            })
            .args(if self.extra.iter().any(|a| a == "--dns-port") {
                vec![]
            } else {
                vec!["--dns-port".to_owned(), self.dns_port.to_string()]
            })
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        self.stderr = Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        self.stdout_lines.clear();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let ready = line.contains("agentseg: ready");
                    self.stdout_lines.push(line);
                    if ready {
                        self.child = Some(child);
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait daemon");
                    let err = self
                        .stderr
                        .take()
                        .map(|h| h.join().unwrap_or_default())
                        .unwrap_or_default();
                    return Err(format!(
                        "status {status}, stdout {:?}, stderr:\n{err}",
                        self.stdout_lines
                    ));
                }
            }
        }
    }

    /// The daemon's audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("log/audit.jsonl")
    }

    /// The pinned layout directory (`<pin root>/l-<hash>`) the daemon made.
    pub fn layout_dir(&self) -> PathBuf {
        std::fs::read_dir(&self.pin_root)
            .expect("pin root")
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("l-"))
            .expect("the layout directory")
            .path()
    }

    /// Every record of the audit log, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait (5 s at most, then panic) until the audit log holds `n` records matching `pred`.
    pub fn wait_records(
        &self,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        self.wait_audit(
            pred,
            |found| found.len() >= n,
            |found| {
                format!(
                    "only {} of {n} matching records appeared in the audit log",
                    found.len()
                )
            },
        )
    }

    /// Wait (5 s at most, then panic) until the records matching `pred` stand for `n`
    /// decisions: the kernel folds a flow's repeated denials into one record and summaries
    /// (`count`), so repeated attempts are counted by their records' counts, not by lines.
    pub fn wait_decisions(
        &self,
        n: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let total = |found: &[serde_json::Value]| found.iter().map(decisions).sum::<u64>();
        let found = self.wait_audit(
            &pred,
            |found| total(found) >= n,
            |found| {
                format!(
                    "only {} of {n} matching decisions appeared in the audit log",
                    total(found)
                )
            },
        );
        assert_eq!(
            total(&found),
            n,
            "more decisions recorded than made: {found:?}"
        );
        found
    }

    /// Poll the audit log's records matching `pred` (5 s at most) until `done` says so, then
    /// return them; panic with `why` otherwise.
    fn wait_audit(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
        done: impl Fn(&[serde_json::Value]) -> bool,
        why: impl Fn(&[serde_json::Value]) -> String,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<_> = self
                .audit_records()
                .into_iter()
                .filter(|r| pred(r))
                .collect();
            if done(&found) {
                return found;
            }
            assert!(Instant::now() < deadline, "{}", why(&found));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `agentseg ARGS` against this daemon's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agentseg_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run agentseg")
    }

    /// `agentseg status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// `agentseg run --segment SEG -- probe --netns NS PROBE_ARGS`: the probe's one-line result.
    ///
    /// Every connect and send a kernel test makes this way is replayed through `agentseg
    /// explain` on the same daemon, which must give the kernel's verdict (issue 15).
    pub fn run_probe(&self, segment: &str, ns: &Netns, probe_args: &[&str]) -> String {
        let result = self.run_probe_unexplained(segment, ns, probe_args);
        if let Some(spec) = probe_flow(probe_args) {
            self.explain_agrees(segment, &spec, &result);
        }
        result
    }

    /// [`Daemon::run_probe`] without the replay through `explain`: for a flow something
    /// rewrites after the hooks judged it (NAT), which is not the flow asked about.
    pub fn run_probe_unexplained(&self, segment: &str, ns: &Netns, probe_args: &[&str]) -> String {
        let out = self.run_agent(segment, ns, probe_args);
        assert!(
            out.status.success(),
            "agentseg run failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `agentseg explain` on this daemon gives the kernel's verdict for the flow `spec` of a
    /// new agent of `segment`: denied exactly when the kernel said EPERM. Returns the
    /// explanation (JSON), or None when no daemon answers (nothing to ask).
    pub fn explain_agrees(
        &self,
        segment: &str,
        spec: &str,
        kernel: &str,
    ) -> Option<serde_json::Value> {
        let out = self.cli(&["explain", "--segment", segment, "--to", spec, "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(3) {
            return None;
        }
        let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "explain {segment} --to {spec}: {err}: {}\n{stderr}",
                out.status
            )
        });
        let denied = e["verdict"] == "deny";
        // An address the resolver learned may expire between the connect and the question
        // (the tests of expiry connect near it): the one disagreement allowed, and only then.
        let expired_since = kernel != "EPERM"
            && denied
            && e["notes"].as_array().is_some_and(|n| {
                n.iter().any(|n| {
                    n.as_str()
                        .is_some_and(|n| n.contains("the resolver learned this address"))
                })
            });
        if expired_since {
            return Some(e);
        }
        assert_eq!(
            denied,
            kernel == "EPERM",
            "explain disagrees with the kernel ({kernel}) on {segment} --to {spec}:\n{e:#}"
        );
        assert_eq!(
            out.status.code(),
            Some(i32::from(denied)),
            "explain's exit status for {e:#}"
        );
        Some(e)
    }

    /// `agentseg run --segment SEG -- probe PROBE_ARGS`, the launcher started inside `ns`
    /// (an agent cannot enter a namespace itself: no capabilities, `setns` refused).
    pub fn run_agent(&self, segment: &str, ns: &Netns, probe_args: &[&str]) -> Output {
        let probe = probe_bin();
        let mut args = vec![
            "run",
            "--segment",
            segment,
            "--",
            probe.to_str().expect("utf8"),
        ];
        args.extend_from_slice(probe_args);
        self.cli_in(ns, &args)
    }

    /// An agent of `segment` sending `count` datagrams to 127.0.0.2, a new port each time
    /// (probe `flood ... ports`: a new flow each datagram), spawned with its output piped.
    pub fn spawn_flood(&self, segment: &str, ns: &Netns, count: u64) -> Child {
        self.agent_command(
            segment,
            ns,
            &["flood", "127.0.0.2:1", &count.to_string(), "ports"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flooder")
    }

    /// The command `run_agent` runs, to spawn instead (a long-running agent).
    pub fn agent_command(&self, segment: &str, ns: &Netns, probe_args: &[&str]) -> Command {
        let mut cmd = Command::new(agentseg_bin());
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(["run", "--segment", segment, "--"])
            .arg(probe_bin())
            .args(probe_args);
        ns.enter_on_exec(&mut cmd);
        cmd
    }

    /// A directory agents can write whatever their uid (the test's own files are root's).
    /// (See also [`shared_dir`] for one a policy can name before the daemon starts.)
    pub fn scratch(&self) -> PathBuf {
        let dir = self.dir.path().join("scratch");
        if !dir.exists() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::create_dir(&dir).expect("scratch dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))
                .expect("chmod scratch");
        }
        dir
    }

    /// `agentseg ARGS` against this daemon's socket, started inside `ns`.
    pub fn cli_in(&self, ns: &Netns, args: &[&str]) -> Output {
        let mut cmd = Command::new(agentseg_bin());
        cmd.arg("--socket").arg(&self.socket).args(args);
        ns.enter_on_exec(&mut cmd);
        cmd.output().expect("run agentseg")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: no cleanup of any kind runs in the daemon.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the daemon's stderr.
    pub fn stop(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        let out = Command::new(agentseg_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(["uninstall", "--pin-root"])
            .arg(&self.pin_root)
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "warning: uninstall failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A TCP server (the probe's `serve`) inside `ns`, listening on every address given.
pub struct Server(Child);

impl Server {
    pub fn start(ns: &Netns, addrs: &[&str]) -> Self {
        let mut child = Command::new(probe_bin())
            .args(["--netns", &ns.name, "serve"])
            .args(addrs)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("server output");
        assert_eq!(line.trim(), "ready", "server did not start");
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The probe run directly (not as an agent): in `ns`, optionally joining a cgroup first.
pub fn probe(ns: &Netns, join: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new(probe_bin());
    cmd.args(["--netns", &ns.name]);
    if let Some(dir) = join {
        cmd.arg("--join-cgroup").arg(dir);
    }
    let out = cmd.args(args).output().expect("run probe");
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Programs agentseg attaches to each member cgroup and the agent root (the packet hooks).
pub const PROGRAMS: usize = 2;
/// Programs agentseg attaches once, at the enforcement root (the test tree's root): connect,
/// sendmsg, recvmsg, getpeername (v4, v6), setsockopt, the handoff packet hook, AF_UNIX
/// connect and sendmsg.
pub const ROOT_PROGRAMS: usize = 12;

/// How many agentseg programs are attached to a cgroup, over every attach type agentseg
/// uses (asked of the kernel directly: bpftool 7.1 does not know the AF_UNIX attach types).
pub fn attachments(cgroup: &Path) -> usize {
    // BPF_CGROUP_INET_INGRESS/EGRESS, INET4/6_CONNECT, UDP4/6_SENDMSG, UDP4/6_RECVMSG,
    // SETSOCKOPT, INET4/6_GETPEERNAME, UNIX_CONNECT, UNIX_SENDMSG.
    const ATTACH_TYPES: [u32; 13] = [0, 1, 10, 11, 14, 15, 19, 20, 22, 29, 30, 49, 50];
    let dir = std::fs::File::open(cgroup).expect("open cgroup");
    ATTACH_TYPES
        .iter()
        .flat_map(|&t| bpf::query_prog_ids(&dir, t))
        .filter(|&id| bpf::prog_name(id).is_some_and(|n| n.starts_with("agentseg_")))
        .count()
}

/// The few bpf(2) queries the tests make themselves.
pub mod bpf {
    use std::os::fd::AsRawFd as _;

    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_PROG_QUERY: libc::c_long = 16;

    fn call(cmd: libc::c_long, attr: &mut [u8; 128]) -> i64 {
        // SAFETY: attr outlives the call; pointers stored in it point at live buffers.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
    }

    /// Ids of the programs attached to `cgroup` with `attach_type` (effective: no).
    pub fn query_prog_ids(cgroup: &std::fs::File, attach_type: u32) -> Vec<u32> {
        let mut ids = [0u32; 64];
        let mut attr = [0u8; 128];
        // query: target_fd(0), attach_type(4), query_flags(8), attach_flags(12),
        // prog_ids(16), prog_cnt(24).
        attr[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        if call(BPF_PROG_QUERY, &mut attr) < 0 {
            return Vec::new();
        }
        let n = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
        ids[..n.min(ids.len())].to_vec()
    }

    /// A program's name.
    pub fn prog_name(id: u32) -> Option<String> {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&id.to_ne_bytes());
        let fd = call(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            return None;
        }
        let mut info = [0u8; 256];
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        let ret = call(BPF_OBJ_GET_INFO_BY_FD, &mut attr);
        // SAFETY: closing the descriptor the kernel gave us.
        unsafe { libc::close(fd as i32) };
        if ret < 0 {
            return None;
        }
        // struct bpf_prog_info: name[16] at offset 64.
        let name = &info[64..80];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        Some(String::from_utf8_lossy(&name[..end]).into_owned())
    }
}

/// GET /metrics from a daemon started with `--metrics 127.0.0.1:PORT`: the body.
pub fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics connect");
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    // A real HTTP response: headers, a blank line, a body of the announced length.
    let (head, body) = out.split_once("\r\n\r\n").expect("header/body separator");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(body.len(), length);
    body.to_owned()
}

pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .map(|v| v.trim().parse::<f64>().unwrap_or(-1.0) as u64)
        })
        .unwrap_or_else(|| panic!("no {name_and_labels} in\n{text}"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// The decisions an audit record stands for (`count`; records without one stand for one).
pub fn decisions(r: &serde_json::Value) -> u64 {
    r["count"].as_u64().unwrap_or(1)
}

/// A child process killed and reaped when dropped (a launcher of a long-running agent).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for one line on a child's stdout.
pub fn expect_line(child: &mut Child, want: &str) {
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), want, "child said {line:?}");
}

/// The flow a probe's arguments attempt (`connect tcp|udp DST`, `sendto DST`, `ping DST`) as `agentseg
/// explain --to` takes it; None for other actions, and for a probe that moves itself to
/// another cgroup (it is then not an agent of the segment it was started in).
pub fn probe_flow(args: &[&str]) -> Option<String> {
    let mut i = 0;
    while let Some(flag) = args.get(i) {
        match *flag {
            "--netns" | "--subcgroup" => i += 2,
            "--thread" | "--fork" => i += 1,
            "--join-cgroup" => return None,
            _ => break,
        }
    }
    match args.get(i..)? {
        ["connect", proto @ ("tcp" | "udp"), dst] => Some(format!("{dst}/{proto}")),
        ["sendto", dst] => Some(format!("{dst}/udp")),
        // The adversarial probe's plain TCP, TCP Fast Open and MPTCP connects (MPTCP is
        // judged as TCP), and UDP-Lite.
        ["tcp" | "tfo" | "mptcp", dst] => Some(format!("{dst}/tcp")),
        ["udplite-connect" | "udplite-sendto", dst] => Some(format!("{dst}/udplite")),
        // ICMP echo (datagram or raw socket): `ADDR:0`, no port.
        ["ping" | "rawping", dst] => {
            let addr: std::net::SocketAddr = dst.parse().ok()?;
            Some(match addr.ip() {
                std::net::IpAddr::V4(a) => format!("{a}/icmp"),
                std::net::IpAddr::V6(a) => format!("{a}/icmpv6"),
            })
        }
        _ => None,
    }
}
