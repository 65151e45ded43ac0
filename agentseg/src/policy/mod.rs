//! Policy directory (TOML) → validated, typed model.
//!
//! Loading never stops at the first problem: every file is parsed, every value checked, and all
//! errors are returned together with file, line and column. The raw serde structs live in `raw`,
//! single-value parsers in `parse`, the checks that turn raw files into the model in
//! `validate` (`[[egress]]`/`[[ingress]]` rules in `rules`), domain-name patterns (`fqdns`) in
//! `fqdn`, and what a valid policy may still do wrong in `warnings` (DNS around agentseg's
//! resolver in `dns_warnings`).

mod dns_warnings;
mod error;
pub mod fqdn;
mod local;
mod monitor;
mod parse;
mod peers;
mod raw;
mod rules;
pub mod sandbox;
pub mod systemd;
pub mod unix;
mod validate;
mod warnings;

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_errors;
#[cfg(test)]
mod tests_fqdn;
#[cfg(test)]
mod tests_local;
#[cfg(test)]
mod tests_monitor;
#[cfg(test)]
mod tests_warnings;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;

pub use dns_warnings::{DOH_ENDPOINTS, PUBLIC_RESOLVERS};
pub use error::{PolicyError, PolicyErrors};
pub use fqdn::Fqdn;
pub use monitor::{Action, IdleRule, Monitor, RateRule};

/// The value parsers of policy files, for other files that take the same values (ceilings).
pub(crate) mod values {
    pub(crate) use super::parse::{cidr, port_entry, protocol};
}
pub use sandbox::{Capability, Family, NetlinkProtocol, Sandbox, Sockets};
pub use unix::{UnixKind, UnixPattern};
pub use warnings::{PolicyWarning, warnings, warnings_with};

/// Everything a policy directory defines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicySet {
    /// Sorted by name.
    pub segments: Vec<Segment>,
    /// Peer groups by name (`@NAME` in `cidrs` and `[quarantine] allow`), already validated.
    pub peers: BTreeMap<String, Vec<IpNet>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: SegmentName,
    pub description: String,
    pub mode: Mode,
    /// What the kernel does with this segment when the daemon's heartbeat stops.
    pub on_daemon_loss: DaemonLoss,
    pub egress: Vec<Rule>,
    pub ingress: Vec<Rule>,
    pub members: Members,
    /// `[quarantine] allow`: peers that stay reachable, on every protocol and port in both
    /// directions, while the segment or one of its agents is quarantined. `@group` references
    /// already expanded, duplicates dropped; empty when the table or key is absent.
    pub quarantine_allow: Vec<IpNet>,
    /// Where `[quarantine]` is defined (its table header, or for an inline table the start of
    /// its value); `None` when absent.
    pub quarantine_origin: Option<Origin>,
    /// `[monitor]`: behaviour detectors; [`Monitor::default`] when the table is absent.
    pub monitor: Monitor,
    /// `[[unix]]`: the AF_UNIX peers members may connect or send to (besides the daemon's
    /// `[unix] allow` baseline). Everything else is refused.
    pub unix: Vec<UnixRule>,
    /// `[quarantine] unix`: AF_UNIX peers that stay reachable while quarantined.
    pub quarantine_unix: Vec<UnixPattern>,
    /// `allow_root`, `capabilities`, `writable`, `[sockets]`: what `agentseg run` gives agents.
    pub sandbox: Sandbox,
    /// Where some values are written, so that [`warnings`] can point at them.
    pub positions: Positions,
    pub origin: Origin,
}

/// 1-based line and column (in characters) of a value in its segment's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where the values [`warnings`] may point at are written; the file is the segment's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Positions {
    /// Per `[[unix]]` rule, per pattern: the same shape as `Segment::unix[i].patterns`.
    pub unix: Vec<Vec<Position>>,
    /// Per `[quarantine] unix` pattern (same order as `Segment::quarantine_unix`).
    pub quarantine_unix: Vec<Position>,
    /// Each listed capability, where it is first written.
    pub capabilities: BTreeMap<Capability, Position>,
    /// Each `[sockets] families` entry, where it is first written.
    pub families: BTreeMap<Family, Position>,
    /// Each `writable` entry (same order as `Sandbox::writable`).
    pub writable: Vec<Position>,
    /// The `io_uring` value, when written.
    pub io_uring: Option<Position>,
    /// Per `[[egress]]` rule, per `ports` entry (same order as `Rule::ports`).
    pub egress_ports: Vec<Vec<Position>>,
    /// Per `[[egress]]` rule, per name (same order as `Rule::fqdns`).
    pub egress_fqdns: Vec<Vec<Position>>,
}

/// One `[[unix]]` rule: `paths = [...]` (see [`UnixPattern`]), duplicates dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixRule {
    pub patterns: Vec<UnixPattern>,
    pub origin: Origin,
}

/// `<function>.<environment>.<access>`, each part 1–32 chars of `[a-z0-9-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName(String);

/// Why a string is not a valid [`SegmentName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SegmentNameError(pub String);

impl FromStr for SegmentName {
    type Err = SegmentNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse::segment_name(s).map_err(SegmentNameError)?;
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SegmentName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Deny what the rules do not allow.
    #[default]
    Enforce,
    /// Allow everything; count what enforce mode would deny.
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

/// `on_daemon_loss`: keep enforcing the last policy (default), or cut the segment off once the
/// daemon's heartbeat is older than the configured bound (dead-man switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DaemonLoss {
    #[default]
    Keep,
    Quarantine,
}

/// One `[[egress]]`/`[[ingress]]` rule: traffic to (egress) or from (ingress) `cidrs` minus
/// `except`, and (egress only) to the addresses agentseg's resolver answered for `fqdns`, on
/// `ports` (empty = all), with `protocol`. A rule has cidrs, fqdns or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `@group` references already expanded; empty for a rule with only `fqdns`.
    pub cidrs: Vec<IpNet>,
    /// Only ever inside `cidrs`.
    pub except: Vec<IpNet>,
    /// Domain-name patterns, duplicates dropped keeping the first; always empty for ingress.
    pub fqdns: Vec<Fqdn>,
    /// Empty = all ports.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub origin: Origin,
}

/// Inclusive port range, `1 <= lo <= hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// A rule's protocol. `any` means TCP, UDP and ICMP; every other protocol (UDP-Lite, SCTP,
/// GRE...) is denied unless a rule names it (`Number`). In a policy file: `"tcp"`, `"udp"`,
/// `"icmp"`, `"any"`, a name from [`Protocol::NAMED`], or a number 0-255 (6, 17, 1 and 58 are
/// read as tcp, udp, icmp, icmp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// IPPROTO_TCP and MPTCP.
    Tcp,
    /// IPPROTO_UDP only.
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
    #[default]
    Any,
    /// One IP protocol number that is not TCP, UDP or ICMP (`"udplite"`, `"sctp"`, `47`).
    Number(u8),
    /// Every IP protocol on every port: not written in policies; what a `[quarantine] allow`
    /// list compiles to.
    All,
}

impl Protocol {
    /// Names accepted for protocols other than tcp/udp/icmp/any.
    pub const NAMED: &[(&str, u8)] = &[
        ("dccp", 33),
        ("gre", 47),
        ("esp", 50),
        ("ah", 51),
        ("sctp", 132),
        ("udplite", 136),
    ];

    /// Whether rules of this protocol may list ports.
    pub fn has_ports(self) -> bool {
        match self {
            Protocol::Tcp | Protocol::Udp | Protocol::Any => true,
            Protocol::Icmp | Protocol::All => false,
            Protocol::Number(n) => agentseg_common::has_ports(u32::from(n)),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Any => f.write_str("any"),
            Protocol::All => f.write_str("all"),
            Protocol::Number(n) => match Protocol::NAMED.iter().find(|(_, v)| v == n) {
                Some((name, _)) => f.write_str(name),
                None => write!(f, "{n}"),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Members {
    /// Relative to the cgroup2 mount; no leading '/', no `.`/`..`, no empty components.
    pub cgroups: Vec<String>,
    /// systemd units (`.service`, `.scope`, `.slice`); the daemon resolves them to cgroups.
    pub units: Vec<String>,
}

/// Where a segment or rule is defined (1-based line of its table header, or for a
/// single-segment file, of its `name` key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Loads every `*.toml` file directly in `dir` (not recursive; hidden files skipped), in file
/// name order.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    PolicyCache::default().load_dir(dir)
}

/// Same as [`load_dir`], from `(path, contents)` pairs (sorted by path here).
pub fn load_files(files: &[(PathBuf, Vec<u8>)]) -> Result<PolicySet, PolicyErrors> {
    PolicyCache::default().load_files(files)
}

/// The policy files of `dir`: every `*.toml` directly in it (not recursive; hidden files
/// skipped; symlinks followed), sorted, and the entries that could not be read.
pub fn policy_paths(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PolicyError>), PolicyErrors> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        PolicyErrors(vec![error::file_error(
            dir,
            format!("cannot read policy directory: {e}"),
        )])
    })?;
    let mut paths = Vec::new();
    let mut errors = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                errors.push(error::file_error(
                    dir,
                    format!("cannot read policy directory: {e}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Editors leave hidden lock/backup files (`.#x.toml`) next to the real ones.
        if name.starts_with('.') || path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        // Follows symlinks on purpose: a policy file may be linked in from elsewhere.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok((paths, errors))
}

/// Remembers what each policy file parsed to, keyed by its path and contents (SHA-256), so
/// that a reload parses only the files that changed (a 100,000-prefix peer-group file takes
/// ~30 ms to parse, hashing it ~1.2 ms; only files with segments keep their text). Only files
/// present in the last load are kept.
#[derive(Debug, Default)]
pub struct PolicyCache {
    /// The last load's files, sorted by path.
    files: Vec<validate::ParsedFile>,
}

impl PolicyCache {
    /// [`load_dir`], reusing the files whose contents did not change since the last call.
    pub fn load_dir(&mut self, dir: &Path) -> Result<PolicySet, PolicyErrors> {
        let (paths, mut errors) = policy_paths(dir)?;
        if paths.is_empty() && errors.is_empty() {
            errors.push(error::file_error(
                dir,
                format!("no *.toml policy files in {}", dir.display()),
            ));
        }
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            match std::fs::read(&path) {
                Ok(bytes) => files.push((path, bytes)),
                Err(e) => errors.push(error::file_error(&path, format!("cannot read file: {e}"))),
            }
        }
        if !errors.is_empty() {
            // Still check the readable files so that one pass shows every problem.
            if !files.is_empty()
                && let Err(PolicyErrors(more)) = self.load_files(&files)
            {
                errors.extend(more);
            }
            return Err(PolicyErrors(errors));
        }
        self.load_files(&files)
    }

    /// [`load_files`], reusing the files whose contents did not change since the last call.
    pub fn load_files(&mut self, files: &[(PathBuf, Vec<u8>)]) -> Result<PolicySet, PolicyErrors> {
        if files.is_empty() {
            return Err(PolicyErrors(vec![error::file_error(
                Path::new(""),
                "no policy files",
            )]));
        }
        let mut sorted: Vec<&(PathBuf, Vec<u8>)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut old = std::mem::take(&mut self.files);
        for (path, bytes) in sorted {
            let parsed = match old.iter().position(|p| p.is_of(path, bytes)) {
                Some(i) => old.swap_remove(i),
                None => validate::ParsedFile::parse(path, bytes),
            };
            self.files.push(parsed);
        }
        let refs: Vec<&validate::ParsedFile> = self.files.iter().collect();
        validate::load(&refs)
    }
}
