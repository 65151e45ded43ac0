//! What the bench creates on the host, behind RAII guards: two network namespaces joined by a
//! veth pair, and a cgroup subtree. Everything is named `asbench-*` so a crashed run's leftovers
//! are recognised and removed by the next one.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

pub const PREFIX: &str = "asbench-";
pub const CLIENT_NS: &str = "asbench-client";
pub const SERVER_NS: &str = "asbench-server";
/// The cgroup subtree, relative to the cgroup2 mount.
pub const CG_ROOT: &str = "asbench-run";
/// RFC 2544 benchmarking space: never routed, and only configured inside our namespaces.
pub const CLIENT_ADDR: &str = "198.18.0.1";
pub const ALLOWED_ADDR: &str = "198.18.0.2";
pub const DENIED_ADDR: &str = "198.18.0.3";
/// IPv6 on the same veth (a unique-local prefix, only inside the bench's namespaces).
pub const CLIENT_ADDR6: &str = "fd00:a5be::1";
pub const ALLOWED_ADDR6: &str = "fd00:a5be::2";
pub const PORT: u16 = 5201;
/// The loopback peer: a second server inside the client namespace, on 127.0.0.1.
pub const LOOPBACK_ADDR: &str = "127.0.0.1";
pub const LOOPBACK_PORT: u16 = 5211;

/// Run a command; fail with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ...` (ip's -n enters the namespace without remounting anything).
fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

/// A command run inside the client namespace with only the network namespace switched (unlike
/// `ip netns exec`, which remounts /sys and hides the cgroup2 mount nft resolves paths in).
/// Make `cmd` start inside the named network namespace (setns between fork and exec; the
/// bench runs as root).
pub fn enter_netns_on_exec(cmd: &mut Command, ns: &str) -> anyhow::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    // SAFETY: setns is async-signal-safe; the descriptor stays open in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

pub fn in_client_ns(tool: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{CLIENT_NS}")).arg(tool);
    cmd
}

pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next()? == "cgroup2")
                .then(|| pre.split(' ').nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

pub struct Netns;

impl Netns {
    pub fn create() -> anyhow::Result<Self> {
        for ns in [CLIENT_NS, SERVER_NS] {
            sh(Command::new("ip").args(["netns", "add", ns]))?;
        }
        let guard = Netns;
        // Created inside the client namespace, peer moved straight to the server's: the host
        // namespace never holds either end.
        ip_in(
            CLIENT_NS,
            &[
                "link", "add", "asb-c0", "type", "veth", "peer", "name", "asb-s0", "netns",
                SERVER_NS,
            ],
        )?;
        ip_in(
            CLIENT_NS,
            &["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "asb-c0"],
        )?;
        for a in [ALLOWED_ADDR, DENIED_ADDR] {
            ip_in(
                SERVER_NS,
                &["addr", "add", &format!("{a}/24"), "dev", "asb-s0"],
            )?;
        }
        // `nodad`: usable at once, no duplicate-address detection delay.
        for (ns, a, dev) in [
            (CLIENT_NS, CLIENT_ADDR6, "asb-c0"),
            (SERVER_NS, ALLOWED_ADDR6, "asb-s0"),
        ] {
            ip_in(
                ns,
                &["-6", "addr", "add", &format!("{a}/64"), "dev", dev, "nodad"],
            )?;
        }
        // Per-namespace sysctls: deep listen queues for the peer, a wide port range for the
        // connect loop.
        for (ns, kv) in [
            (SERVER_NS, "net.core.somaxconn=65535"),
            (SERVER_NS, "net.ipv4.tcp_max_syn_backlog=65535"),
            (CLIENT_NS, "net.ipv4.ip_local_port_range=1024 65000"),
        ] {
            sh(Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["sysctl", "-q", "-w", kv]))?;
        }
        for (ns, dev) in [(CLIENT_NS, "asb-c0"), (SERVER_NS, "asb-s0")] {
            ip_in(ns, &["link", "set", "lo", "up"])?;
            ip_in(ns, &["link", "set", dev, "up"])?;
        }
        // The veth's link-local addresses go through duplicate-address detection (about 1 s);
        // neighbour discovery for the IPv6 peer waits for it, so the first round's IPv6 probe
        // could time out. Wait until no address is tentative (5 s at most).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while [CLIENT_NS, SERVER_NS].iter().any(|ns| {
            sh(Command::new("ip").args(["-n", ns, "-6", "addr", "show", "tentative"]))
                .map_or(true, |out| !out.trim().is_empty())
        }) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("IPv6 addresses of the bench's veth still tentative after 5 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(guard)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace takes its veth end, nft tables, iptables rules and ipsets along.
        for ns in [CLIENT_NS, SERVER_NS] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `<cgroup2>/asbench-run/{none,agentseg,nft,ipt}`: one client cgroup per variant, all at the
/// same depth, so a variant's rules never see another variant's traffic.
pub struct Cgroups {
    pub mount: PathBuf,
}

pub const VARIANT_CGROUPS: &[&str] = &["none", "agentseg", "nft", "ipt"];

impl Cgroups {
    pub fn create() -> anyhow::Result<Self> {
        let mount = cgroup2_mount()?;
        let root = mount.join(CG_ROOT);
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        let guard = Cgroups { mount };
        for v in VARIANT_CGROUPS {
            let d = root.join(v);
            std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(guard)
    }

    pub fn rel(&self, variant: &str) -> String {
        format!("{CG_ROOT}/{variant}")
    }

    /// nft resolves `socket cgroupv2` paths under /sys/fs/cgroup, wherever cgroup2 is mounted
    /// (on a hybrid host it is /sys/fs/cgroup/unified).
    pub fn nft_path(&self, variant: &str) -> anyhow::Result<String> {
        let abs = self.abs(variant);
        abs.strip_prefix("/sys/fs/cgroup")
            .map(|p| p.to_string_lossy().into_owned())
            .with_context(|| {
                format!(
                    "nft cannot name {} (not under /sys/fs/cgroup)",
                    abs.display()
                )
            })
    }

    pub fn abs(&self, variant: &str) -> PathBuf {
        self.mount.join(CG_ROOT).join(variant)
    }
}

/// Remove empty cgroup directories, deepest first (cgroupfs only allows rmdir).
fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("bench: could not remove {}: {e}", dir.display());
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        rmdir_tree(&self.mount.join(CG_ROOT));
    }
}

/// Leftovers of a crashed run: namespaces, the cgroup subtree, pins (uninstalled with the
/// agentseg binary so links are detached, not just unpinned).
pub fn cleanup_leftovers(agentseg: &Path) -> anyhow::Result<()> {
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) {
                crate::step(&format!("removing leftover namespace {name}"));
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(PREFIX) {
                crate::step(&format!(
                    "uninstalling leftover pins {}",
                    e.path().display()
                ));
                let _ = Command::new(agentseg)
                    .arg("uninstall")
                    .arg("--pin-root")
                    .arg(e.path())
                    .status();
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let root = cgroup2_mount()?.join(CG_ROOT);
    if root.exists() {
        crate::step(&format!("removing leftover cgroups {}", root.display()));
        rmdir_tree(&root);
        if root.exists() {
            bail!(
                "{} is left over and not empty (a process of an earlier run is still inside)",
                root.display()
            );
        }
    }
    Ok(())
}
