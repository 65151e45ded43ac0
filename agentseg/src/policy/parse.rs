//! Parsers for single policy values. Each returns a one-line reason on failure; the caller
//! attaches the position. User text is echoed with `{:?}` so that a newline or quote inside a
//! value cannot break the one-error-per-line output.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};

use super::{DaemonLoss, Mode, PortRange, Protocol};

const NAME_PARTS: [&str; 3] = ["function", "environment", "access"];
const NAME_PART_MAX: usize = 32;

/// Checks `<function>.<environment>.<access>`, each part 1–32 chars of `[a-z0-9-]`.
pub(super) fn segment_name(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != NAME_PARTS.len() {
        return Err(format!(
            "segment name {s:?} must be <function>.<environment>.<access> \
             (three dot-separated parts), found {} part(s)",
            parts.len()
        ));
    }
    for (part, what) in parts.iter().zip(NAME_PARTS) {
        if part.is_empty() {
            return Err(format!("segment name {s:?}: the {what} part is empty"));
        }
        if part.chars().count() > NAME_PART_MAX {
            return Err(format!(
                "segment name {s:?}: the {what} part {part:?} is longer than {NAME_PART_MAX} characters"
            ));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "segment name {s:?}: the {what} part {part:?} contains {c:?}; \
                 only a-z, 0-9 and '-' are allowed"
            ));
        }
    }
    Ok(())
}

/// Peer group names: `[a-z0-9_-]{1,64}`.
pub(super) fn peer_group_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid peer group name {s:?}: use 1-64 characters of a-z, 0-9, '_' and '-'"
        ))
    }
}

/// One entry of `cidrs`/`except`: either `@group` or a prefix.
pub(super) enum CidrEntry<'a> {
    Group(&'a str),
    Net(IpNet),
}

pub(super) fn cidr_entry(s: &str) -> Result<CidrEntry<'_>, String> {
    match s.strip_prefix('@') {
        Some(group) => Ok(CidrEntry::Group(group)),
        None => cidr(s).map(CidrEntry::Net),
    }
}

/// An IPv4/IPv6 prefix; a bare address is a /32 or /128. Host bits must be zero: `10.0.0.1/8`
/// is almost always a typo, and silently truncating it would widen the rule.
pub(crate) fn cidr(s: &str) -> Result<IpNet, String> {
    let invalid = || {
        format!(
            "invalid CIDR {s:?}: expected an address or prefix like 10.0.0.0/8 or 2001:db8::/32"
        )
    };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse::<u8>().map_err(|_| invalid())?
        }
        Some(_) => return Err(invalid()),
    };
    let net = IpNet::new(addr, len)
        .map_err(|_| format!("invalid CIDR {s:?}: prefix length {len} is longer than {max}"))?;
    let trunc = net.trunc();
    if trunc != net {
        return Err(format!("host bits set in {net}; did you mean {trunc}?"));
    }
    if let Some(v4) = ipv4_mapped(&net) {
        return Err(format!(
            "{net} is IPv4-mapped: the kernel judges mapped addresses by the IPv4 rules, \
             write {v4}"
        ));
    }
    Ok(net)
}

/// The IPv4 prefix an IPv6 prefix inside `::ffff:0:0/96` stands for. Prefixes that merely
/// contain that range (`::/0`, `::/64`) are not mapped.
fn ipv4_mapped(net: &IpNet) -> Option<Ipv4Net> {
    let IpNet::V6(v6) = net else { return None };
    let len = v6.prefix_len().checked_sub(96)?;
    Ipv4Net::new(v6.network().to_ipv4_mapped()?, len).ok()
}

/// One entry of `ports`: an integer, `"N"` or `"LO-HI"`.
pub(crate) fn port_entry(v: &toml::Value) -> Result<PortRange, String> {
    match v {
        toml::Value::Integer(n) => {
            let p = port_number(*n, &n.to_string())?;
            Ok(PortRange { lo: p, hi: p })
        }
        toml::Value::String(s) => {
            let num = |t: &str| -> Result<u16, String> {
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "invalid port {s:?}: expected a number like 443 or a range like \"8000-8100\""
                    ));
                }
                // Too many digits for i64 is out of range too.
                port_number(t.parse::<i64>().unwrap_or(i64::MAX), t)
            };
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (num(lo)?, num(hi)?),
                None => {
                    let p = num(s)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!(
                    "reversed port range {s:?}: write it as \"{hi}-{lo}\""
                ));
            }
            Ok(PortRange { lo, hi })
        }
        other => Err(format!(
            "invalid port: expected an integer or a string like \"8000-8100\", found a {}",
            other.type_str()
        )),
    }
}

fn port_number(n: i64, text: &str) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(0) => Err("port 0 is not valid; ports are 1-65535".to_string()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("port {text} is out of range; ports are 1-65535")),
    }
}

const MPTCP: &str = "MPTCP is judged as tcp: use protocol = \"tcp\"";

/// `protocol`: a name, an integer 0-255 or the same number as a string.
pub(crate) fn protocol(v: &toml::Value) -> Result<Protocol, String> {
    let s = match v {
        toml::Value::Integer(n) => return protocol_number(*n, &n.to_string()),
        toml::Value::String(s) => s,
        other => {
            return Err(format!(
                "invalid protocol: expected a name like \"tcp\" or a number 0-255, found a {}",
                other.type_str()
            ));
        }
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for i64 is out of range too.
        return protocol_number(s.parse::<i64>().unwrap_or(i64::MAX), s);
    }
    match s.as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "icmp" => Ok(Protocol::Icmp),
        "any" => Ok(Protocol::Any),
        "mptcp" => Err(MPTCP.to_string()),
        _ => match Protocol::NAMED.iter().find(|(name, _)| name == s) {
            Some(&(_, n)) => Ok(Protocol::Number(n)),
            None => {
                let names: Vec<String> = ["tcp", "udp", "icmp", "any"]
                    .iter()
                    .chain(Protocol::NAMED.iter().map(|(n, _)| n))
                    .map(|n| format!("{n:?}"))
                    .collect();
                Err(format!(
                    "unknown protocol {s:?}; valid protocols are {} or an IP protocol number \
                     0-255",
                    names.join(", ")
                ))
            }
        },
    }
}

/// Whether a rule of `protocol` may list `ports`; the error is the reason.
pub(super) fn ports_allowed(protocol: Protocol) -> Result<(), String> {
    match protocol {
        Protocol::Icmp => {
            Err("ICMP has no ports: remove `ports` or use protocol \"tcp\" or \"udp\"".into())
        }
        Protocol::Number(n) if !protocol.has_ports() => Err(format!(
            "protocol {protocol} (IP protocol {n}) has no ports: remove `ports` (the rule then \
             allows every {protocol} packet to its cidrs)"
        )),
        _ => Ok(()),
    }
}

/// An IP protocol number; the ones with a name of their own become that protocol.
fn protocol_number(n: i64, text: &str) -> Result<Protocol, String> {
    let p = u32::try_from(n).unwrap_or(u32::MAX);
    match p {
        agentseg_common::IPPROTO_TCP => Ok(Protocol::Tcp),
        agentseg_common::IPPROTO_UDP => Ok(Protocol::Udp),
        agentseg_common::IPPROTO_ICMP | agentseg_common::IPPROTO_ICMPV6 => Ok(Protocol::Icmp),
        agentseg_common::IPPROTO_MPTCP => Err(MPTCP.to_string()),
        _ => u8::try_from(p).map(Protocol::Number).map_err(|_| {
            format!("protocol number {text} is out of range; IP protocol numbers are 0-255")
        }),
    }
}

/// One `writable` entry: an absolute, canonical directory path other than `/`.
pub(super) fn writable_dir(s: &str) -> Result<PathBuf, String> {
    if !s.starts_with('/') {
        return Err(format!(
            "writable {s:?} must be an absolute path (start with '/')"
        ));
    }
    if s.contains('\0') {
        return Err(format!("writable {s:?} contains a NUL byte"));
    }
    if s == "/" {
        return Err(
            "writable \"/\" would let a root agent write everywhere; name the directories it \
             needs"
                .to_string(),
        );
    }
    let non_canonical = ["//", "/./", "/../"].iter().any(|p| s.contains(p))
        || ["/.", "/..", "/"].iter().any(|p| s.ends_with(p));
    if non_canonical {
        return Err(format!(
            "writable {s:?}: write the path without `//`, `/./`, `/../` or a trailing '/'"
        ));
    }
    Ok(PathBuf::from(s))
}

pub(super) fn mode(s: &str) -> Result<Mode, String> {
    match s {
        "enforce" => Ok(Mode::Enforce),
        "audit" => Ok(Mode::Audit),
        _ => Err(format!(
            "unknown mode {s:?}; valid modes are \"enforce\" and \"audit\""
        )),
    }
}

pub(super) fn daemon_loss(s: &str) -> Result<DaemonLoss, String> {
    match s {
        "keep" => Ok(DaemonLoss::Keep),
        "quarantine" => Ok(DaemonLoss::Quarantine),
        _ => Err(format!(
            "unknown on_daemon_loss {s:?}; valid values are \"keep\" and \"quarantine\""
        )),
    }
}

/// A member cgroup path relative to the cgroup2 mount: a leading '/' is stripped, and no
/// component may be empty, `.` or `..` (which could escape or alias another path).
pub(super) fn cgroup_path(s: &str) -> Result<String, String> {
    let rel = s.strip_prefix('/').unwrap_or(s);
    if rel.is_empty() {
        return Err(format!(
            "cgroup path {s:?} is empty; the root cgroup cannot be a member"
        ));
    }
    if rel.contains('\0') {
        return Err(format!("cgroup path {s:?} contains a NUL byte"));
    }
    for comp in rel.split('/') {
        match comp {
            "" => return Err(format!("cgroup path {s:?} has an empty component")),
            "." | ".." => {
                return Err(format!(
                    "cgroup path {s:?} contains {comp:?}; use a plain relative path"
                ));
            }
            _ => {}
        }
    }
    Ok(rel.to_string())
}

const UNIT_SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];

/// A systemd unit name whose cgroup becomes a member.
pub(super) fn unit_name(s: &str) -> Result<(), String> {
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ":_.\\@-".contains(*c)))
    {
        return Err(format!(
            "invalid unit name {s:?}: character {c:?} is not allowed (use A-Z a-z 0-9 : _ . \\ @ -)"
        ));
    }
    if s.len() > 255 {
        return Err(format!(
            "invalid unit name {s:?}: longer than 255 characters"
        ));
    }
    let stem_ok = UNIT_SUFFIXES
        .iter()
        .any(|suf| s.strip_suffix(suf).is_some_and(|stem| !stem.is_empty()));
    if !stem_ok {
        return Err(format!(
            "invalid unit name {s:?}: must end in .service, .scope or .slice"
        ));
    }
    Ok(())
}
