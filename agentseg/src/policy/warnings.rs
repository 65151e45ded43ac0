//! Things a valid policy may do that weaken the pen: reported by `agentseg check` (and
//! loggable by the daemon) but never refused, since each can be the user's deliberate call.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Family, PolicySet, Position, Segment, UnixKind, UnixPattern};

/// One warning, printed like a [`super::PolicyError`] with `warning:` before the message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyWarning {
    pub file: PathBuf,
    pub line: usize,
    /// `None` when only the line is known.
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.file.display(), self.line)?;
        if let Some(column) = self.column {
            write!(f, "{column}:")?;
        }
        write!(f, " warning: {}", self.message)
    }
}

/// Local services that act for whoever reaches their socket, with far more reach than any
/// agent should have: (path, what it is).
pub const DEPUTIES: &[(&str, &str)] = &[
    ("/run/docker.sock", "the Docker daemon"),
    ("/var/run/docker.sock", "the Docker daemon"),
    ("/run/containerd/containerd.sock", "containerd"),
    ("/run/podman/podman.sock", "Podman"),
    ("/run/systemd/private", "systemd's private socket"),
    ("/run/dbus/system_bus_socket", "the D-Bus system bus"),
    ("/var/run/dbus/system_bus_socket", "the D-Bus system bus"),
];

/// Directories any agent can create files in: an allowed AF_UNIX path there can be a symlink
/// the agent made to any socket (the kernel hooks see the address, not what it resolves to).
const SHARED_WRITABLE: &[&str] = &["/tmp/", "/var/tmp/", "/dev/shm/"];

/// Places a root agent must not be able to write: (directory, what writing there gives it).
const SENSITIVE_DIRS: &[(&str, &str)] = &[
    ("/sys", "cgroups, BPF pins and kernel settings"),
    ("/proc", "kernel settings and other processes"),
    ("/etc", "the host's configuration and credentials"),
    ("/boot", "what the host boots"),
    ("/usr", "the programs the host runs"),
    ("/dev", "device nodes"),
    ("/run/agentseg", "the agentseg daemon's control socket"),
    ("/var/lib/agentseg", "the agentseg quarantine state"),
    ("/var/log/agentseg", "the agentseg audit log"),
];

/// Every warning for `set`, in file, line and column order.
pub fn warnings(set: &PolicySet) -> Vec<PolicyWarning> {
    warnings_with(set, &[])
}

/// [`warnings`], with DNS-over-HTTPS endpoints of the daemon config (`[dns] doh_endpoints`)
/// besides the well-known ones.
pub fn warnings_with(set: &PolicySet, doh_endpoints: &[String]) -> Vec<PolicyWarning> {
    let mut out = Vec::new();
    for seg in &set.segments {
        seg.warnings(&mut out, doh_endpoints);
    }
    out.sort();
    out
}

impl Segment {
    fn warnings(&self, out: &mut Vec<PolicyWarning>, doh_endpoints: &[String]) {
        self.dns_warnings(out, doh_endpoints);
        let at = |pos: Option<&Position>, line: usize, message: String| PolicyWarning {
            file: self.origin.file.clone(),
            line: pos.map_or(line, |p| p.line),
            column: pos.map(|p| p.column),
            message,
        };
        let name = &self.name;
        for (i, rule) in self.unix.iter().enumerate() {
            for (j, pattern) in rule.patterns.iter().enumerate() {
                let pos = self.positions.unix.get(i).and_then(|p| p.get(j));
                for m in self.unix_concerns(pattern, "[[unix]]") {
                    out.push(at(pos, rule.origin.line, m));
                }
            }
        }
        let q_line = self.quarantine_origin.as_ref().map_or(0, |o| o.line);
        for (j, pattern) in self.quarantine_unix.iter().enumerate() {
            let pos = self.positions.quarantine_unix.get(j);
            for m in self.unix_concerns(pattern, "[quarantine] unix") {
                out.push(at(pos, q_line, m));
            }
        }
        let sandbox = &self.sandbox;
        for cap in sandbox.capabilities.iter().filter(|c| c.opens_the_pen()) {
            let pos = self.positions.capabilities.get(cap);
            let m = format!(
                "segment {name}: capability {} lets an agent open its own pen (leave its cgroup, \
                 load BPF, trace or signal other processes, change credentials or files it does \
                 not own...)",
                cap.upper()
            );
            out.push(at(pos, self.origin.line, m));
        }
        for fam in &sandbox.sockets.families {
            if [Family::UNIX, Family::INET, Family::INET6].contains(fam) {
                continue;
            }
            let pos = self.positions.families.get(fam);
            let m = format!(
                "segment {name}: socket family {fam} is not judged by agentseg's hooks: what an \
                 agent sends or receives over it bypasses the segment's rules"
            );
            out.push(at(pos, self.origin.line, m));
        }
        if sandbox.sockets.io_uring {
            let m = format!(
                "segment {name}: io_uring = true lets agents create sockets without socket(), \
                 around the [sockets] family filter (connects are still judged)"
            );
            out.push(at(self.positions.io_uring.as_ref(), self.origin.line, m));
        }
        for (k, dir) in sandbox.writable.iter().enumerate() {
            let pos = self.positions.writable.get(k);
            if !sandbox.allow_root {
                let m = format!(
                    "segment {name}: writable {} has no effect without allow_root = true \
                     (agents with their own uid are held by file permissions)",
                    dir.display()
                );
                out.push(at(pos, self.origin.line, m));
            }
            if let Some((sensitive, what)) = sensitive(dir) {
                let m = format!(
                    "segment {name}: writable {} lets a root agent write {sensitive}: {what}",
                    dir.display()
                );
                out.push(at(pos, self.origin.line, m));
            }
        }
    }

    /// Why allowing `pattern` may let an agent out of its pen (deputies, planted symlinks).
    fn unix_concerns(&self, pattern: &UnixPattern, list: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut reached: Vec<String> = Vec::new();
        for (path, what) in DEPUTIES {
            if pattern.matches(path.as_bytes()) && !reached.iter().any(|r| r.starts_with(what)) {
                reached.push(format!("{what} ({path})"));
            }
        }
        if !reached.is_empty() {
            out.push(format!(
                "segment {}: {list} {:?} reaches {}: the agent could hand work to a deputy \
                 outside its pen",
                self.name,
                pattern.to_string(),
                reached.join(", ")
            ));
        }
        if pattern.kind == UnixKind::Path {
            let literal = String::from_utf8_lossy(&pattern.literal);
            let shared = SHARED_WRITABLE.iter().map(|d| d.to_string()).chain(
                self.sandbox
                    .writable
                    .iter()
                    .filter(|_| self.sandbox.allow_root)
                    .map(|d| format!("{}/", d.display())),
            );
            for dir in shared {
                // The pattern names something inside `dir`, or covers it.
                if literal.starts_with(&dir) || (pattern.prefix && dir.starts_with(&*literal)) {
                    out.push(format!(
                        "segment {}: {list} {:?} reaches into {dir}, where agents can create \
                         files: a symlink planted there leads to any socket (the hooks judge the \
                         address, not its target)",
                        self.name,
                        pattern.to_string()
                    ));
                    break;
                }
            }
        }
        out
    }
}

/// The sensitive directory `dir` is, is inside, or contains.
fn sensitive(dir: &Path) -> Option<(&'static str, &'static str)> {
    // Shared memory is writable for every agent anyway.
    if dir.starts_with("/dev/shm") {
        return None;
    }
    SENSITIVE_DIRS
        .iter()
        .find(|(s, _)| dir.starts_with(s) || Path::new(s).starts_with(dir))
        .copied()
}
