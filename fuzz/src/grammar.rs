//! A small policy grammar, rendered as policy files. Raw bytes almost never get past the TOML
//! parser and the validator; this gives the compiler real work: several files and segments,
//! overlapping and nested v4/v6 prefixes from a few shared bases, excepts carved inside a
//! rule's cidrs, peer groups, `fqdns` names (exact and wildcard, beside or instead of cidrs),
//! ports, every kind of protocol, `[[unix]]` patterns around the control socket, quarantine
//! lists. About one choice in twenty is a deliberate mistake so that
//! the error paths are fuzzed too without making every policy invalid.
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use ipnet::{Ipv4Net, Ipv6Net};

/// The control socket the `compiler` target's host policy refuses.
pub const CONTROL_SOCKET: &str = "/run/agentseg/agentseg.sock";

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub files: Vec<File>,
    /// Prefixes of the peer groups `@dns`, `@proxies`, `@lab_1` (defined in the first file).
    pub groups: [Vec<Cidr>; 3],
    /// Which host policy `compile_with` gets.
    pub host: u8,
    /// Extra (address seed, port) probes besides the prefix boundaries.
    pub probes: Vec<(u32, u16)>,
}

#[derive(Arbitrary, Debug)]
pub struct File {
    /// `[[segment]]` tables, or one top-level segment (only the first then).
    pub multi: bool,
    pub segments: Vec<Seg>,
}

#[derive(Arbitrary, Debug)]
pub struct Seg {
    /// A [`mistake`]: a bad or duplicate name.
    pub name: u8,
    pub audit: bool,
    pub egress: Vec<RuleSpec>,
    pub ingress: Vec<RuleSpec>,
    pub quarantine: Option<Vec<Cidr>>,
    pub quarantine_unix: Vec<u8>,
    pub unix: Vec<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
pub struct RuleSpec {
    pub cidrs: Vec<Cidr>,
    /// (which cidr it is carved from, extra prefix bits, address bits).
    pub except: Vec<(u8, u8, u128)>,
    /// Indices into [`FQDNS`] (egress only, unless sloppy).
    pub fqdns: Vec<u8>,
    pub ports: Option<Vec<(u16, u16)>>,
    pub protocol: Option<u8>,
    /// A [`mistake`]: keep mistakes (no cidrs and no fqdns, fqdns on ingress, ports on ICMP,
    /// reversed ranges, port 0).
    pub sloppy: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Cidr {
    /// IPv4, IPv6 or a peer group (3:3:2), or a [`mistake`].
    pub kind: u8,
    pub base: u8,
    pub bits: u128,
    pub len: u8,
}

const GROUPS: &[&str] = &["dns", "proxies", "lab_1"];
/// Bases that nest and overlap each other once masked to a length.
const V4_BASES: &[[u8; 4]] = &[
    [10, 0, 0, 0],
    [10, 20, 0, 0],
    [10, 20, 255, 0],
    [192, 0, 2, 0],
    [127, 0, 0, 1],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
];
const V6_BASES: &[u128] = &[
    0xfd00_00a5_0000_0000_0000_0000_0000_0000,
    0xfd00_0020_0000_00ff_0000_0000_0000_0000,
    0x2001_0db8_0000_0000_0000_0000_0000_0053,
    0,
    1,
    u128::MAX,
];
/// Valid protocols first; from [`PROTOCOL_MISTAKES`] on, refused ones.
const PROTOCOLS: &[&str] = &[
    "\"tcp\"",
    "\"udp\"",
    "\"icmp\"",
    "\"any\"",
    "\"udplite\"",
    "\"sctp\"",
    "\"gre\"",
    "\"dccp\"",
    "6",
    "17",
    "58",
    "1",
    "\"132\"",
    "0",
    "255",
    "\"mptcp\"",
    "256",
    "\"icmpv6\"",
];
const PROTOCOL_MISTAKES: usize = 15;
/// Valid patterns first; from [`UNIX_MISTAKES`] on, refused ones.
const UNIX: &[&str] = &[
    CONTROL_SOCKET,
    "/var/run/agentseg/agentseg.sock",
    "/run/*",
    "/run/agentseg/*",
    "/run/tools/*",
    "/run/tools/x.sock",
    "/run/dbus/system_bus_socket",
    "/tmp/a.sock",
    "/*",
    "@agentseg*",
    "@name",
    "@*",
    "relative.sock",
    "/run//x",
    "@",
    "/run/a*b",
];
const UNIX_MISTAKES: usize = 12;

/// Valid name patterns first (nesting and overlapping: a wildcard, names below and at its
/// domain, case and trailing dots, a DoH endpoint, the longest label); from [`FQDN_MISTAKES`]
/// on, refused ones.
pub const FQDNS: &[&str] = &[
    "api.example.com",
    "*.example.org",
    "example.org",
    "a.example.org",
    "*.a.example.org",
    "B.A.Example.ORG.",
    "x_y.example.org",
    "dns.google",
    "*.cloudflare-dns.com",
    "xn--bcher-kva.example",
    "localhost",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example",
    "*",
    "a.*.b",
    "*foo.example.org",
    "a..example.org",
    "-a.example.org",
    "10.0.0.1",
    "bad name.example",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example",
];
pub const FQDN_MISTAKES: usize = 12;

/// Whether a choice byte asks for a deliberate mistake: 5 values in 256, and neither 0 nor
/// 255, which libFuzzer produces far more often than the others.
pub fn mistake(i: u8) -> bool {
    (240..245).contains(&i)
}

/// `list[i]` among the first `valid` entries, or one of the others for a [`mistake`].
fn pick<'a>(list: &[&'a str], valid: usize, i: u8) -> &'a str {
    if mistake(i) {
        list[valid + usize::from(i) % (list.len() - valid)]
    } else {
        list[usize::from(i) % valid]
    }
}

pub fn v4_net(base: u8, bits: u128, len: u8) -> Ipv4Net {
    let len = len % 33;
    let base = u32::from_be_bytes(V4_BASES[usize::from(base) % V4_BASES.len()]);
    let addr = base ^ (bits as u32).checked_shr(u32::from(len)).unwrap_or(0);
    Ipv4Net::new(Ipv4Addr::from(addr), len)
        .expect("len <= 32")
        .trunc()
}

pub fn v6_net(base: u8, bits: u128, len: u8) -> Ipv6Net {
    let len = len % 129;
    let base = V6_BASES[usize::from(base) % V6_BASES.len()];
    let mut addr = base ^ bits.checked_shr(u32::from(len)).unwrap_or(0);
    // Mapped prefixes are refused; move them out of ::ffff:0:0/96 (a mistake does that).
    if len >= 96 && addr >> 32 == 0xffff {
        addr ^= 1 << 120;
    }
    Ipv6Net::new(Ipv6Addr::from(addr), len)
        .expect("len <= 128")
        .trunc()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    V4,
    V6,
    Group,
    Mistake,
}

impl Cidr {
    fn kind(&self) -> Kind {
        match self.kind % 8 {
            _ if mistake(self.kind) => Kind::Mistake,
            0..3 => Kind::V4,
            3..6 => Kind::V6,
            _ => Kind::Group,
        }
    }

    fn text(&self) -> String {
        match self.kind() {
            Kind::V4 => v4_net(self.base, self.bits, self.len).to_string(),
            Kind::V6 => v6_net(self.base, self.bits, self.len).to_string(),
            Kind::Group => format!("@{}", GROUPS[usize::from(self.base) % GROUPS.len()]),
            Kind::Mistake => match self.base % 7 {
                0 => "10.0.0.1/8".to_owned(),
                1 => "::ffff:10.0.0.0/104".to_owned(),
                2 => "10.0.0.0/33".to_owned(),
                3 => "not-a-cidr".to_owned(),
                4 => "@nobody".to_owned(),
                5 => "192.0.2.7".to_owned(),
                _ => "2001:db8::1".to_owned(),
            },
        }
    }

    fn is_prefix(&self) -> bool {
        matches!(self.kind(), Kind::V4 | Kind::V6)
    }
}

/// An except nested in one of the rule's prefixes (a rule without any gets none).
fn except_text(cidrs: &[Cidr], (index, extra, bits): (u8, u8, u128)) -> Option<String> {
    let prefixes: Vec<&Cidr> = cidrs.iter().filter(|c| c.is_prefix()).collect();
    let outer = prefixes.get(usize::from(index) % prefixes.len().max(1))?;
    Some(if outer.kind() == Kind::V4 {
        let o = v4_net(outer.base, outer.bits, outer.len);
        let len = (o.prefix_len() + extra % 9).min(32);
        let inner = (bits as u32)
            .checked_shr(u32::from(o.prefix_len()))
            .unwrap_or(0);
        Ipv4Net::new(Ipv4Addr::from(u32::from(o.network()) | inner), len)
            .expect("len <= 32")
            .trunc()
            .to_string()
    } else {
        let o = v6_net(outer.base, outer.bits, outer.len);
        let len = (o.prefix_len() + extra % 17).min(128);
        let inner = bits.checked_shr(u32::from(o.prefix_len())).unwrap_or(0);
        let net = Ipv6Net::new(Ipv6Addr::from(u128::from(o.network()) | inner), len)
            .expect("len <= 128")
            .trunc();
        net.to_string()
    })
}

fn quoted(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

fn render_rule(out: &mut String, header: &str, egress: bool, r: &RuleSpec) {
    let sloppy = mistake(r.sloppy);
    let cidrs = &r.cidrs[..r.cidrs.len().min(4)];
    // Ingress rules take no names: only a sloppy rule tries.
    let fqdns = if egress || sloppy {
        &r.fqdns[..r.fqdns.len().min(4)]
    } else {
        &[]
    };
    if cidrs.is_empty() && fqdns.is_empty() && !sloppy {
        return;
    }
    let _ = writeln!(out, "[[{header}]]");
    if !cidrs.is_empty() || fqdns.is_empty() {
        let _ = writeln!(out, "cidrs = {}", quoted(cidrs.iter().map(Cidr::text)));
    }
    if !fqdns.is_empty() {
        let names = fqdns
            .iter()
            .map(|&i| pick(FQDNS, FQDN_MISTAKES, i).to_owned());
        let _ = writeln!(out, "fqdns = {}", quoted(names));
    }
    let excepts: Vec<String> = r
        .except
        .iter()
        .take(3)
        .filter_map(|&e| except_text(cidrs, e))
        .collect();
    if !excepts.is_empty() {
        let _ = writeln!(out, "except = {}", quoted(excepts.into_iter()));
    }
    let protocol = r.protocol.map(|p| pick(PROTOCOLS, PROTOCOL_MISTAKES, p));
    let portless = matches!(
        protocol,
        Some("\"icmp\"" | "\"gre\"" | "58" | "1" | "0" | "255")
    );
    if let Some(ports) = &r.ports
        && (sloppy || (!portless && !ports.is_empty()))
    {
        let ports: Vec<String> = ports
            .iter()
            .take(3)
            .map(|&(a, b)| {
                let (a, b) = (a % 2000, b % 2000);
                let (a, b) = if sloppy {
                    (a, b)
                } else {
                    (a.min(b) + 1, a.max(b) + 1)
                };
                if a == b {
                    a.to_string()
                } else {
                    format!("\"{a}-{b}\"")
                }
            })
            .collect();
        let _ = writeln!(out, "ports = [{}]", ports.join(", "));
    }
    if let Some(p) = protocol {
        let _ = writeln!(out, "protocol = {p}");
    }
}

fn render_segment(out: &mut String, multi: bool, name: &str, s: &Seg) {
    let prefix = if multi { "segment." } else { "" };
    if multi {
        let _ = writeln!(out, "[[segment]]");
    }
    let _ = writeln!(out, "name = {name:?}");
    if s.audit {
        let _ = writeln!(out, "mode = \"audit\"");
    }
    for r in s.egress.iter().take(5) {
        render_rule(out, &format!("{prefix}egress"), true, r);
    }
    for r in s.ingress.iter().take(3) {
        render_rule(out, &format!("{prefix}ingress"), false, r);
    }
    for u in s.unix.iter().take(3).filter(|u| !u.is_empty()) {
        let _ = writeln!(out, "[[{prefix}unix]]");
        let paths = u
            .iter()
            .take(4)
            .map(|&i| pick(UNIX, UNIX_MISTAKES, i).to_owned());
        let _ = writeln!(out, "paths = {}", quoted(paths));
    }
    let allow = s.quarantine.as_ref().filter(|a| !a.is_empty());
    if allow.is_some() || !s.quarantine_unix.is_empty() {
        let _ = writeln!(out, "[{prefix}quarantine]");
        if let Some(allow) = allow {
            let _ = writeln!(
                out,
                "allow = {}",
                quoted(allow.iter().take(3).map(Cidr::text))
            );
        }
        if !s.quarantine_unix.is_empty() {
            let unix = s.quarantine_unix.iter().take(3);
            let unix = unix.map(|&i| pick(UNIX, UNIX_MISTAKES, i).to_owned());
            let _ = writeln!(out, "unix = {}", quoted(unix));
        }
    }
}

/// The policy files of `input`: at most three, the peer groups in the first one.
pub fn render(input: &Input) -> Vec<String> {
    let mut files = Vec::new();
    for (f, file) in input.files.iter().take(3).enumerate() {
        let mut out = String::new();
        let count = if file.multi { 3 } else { 1 };
        for (i, s) in file.segments.iter().take(count).enumerate() {
            let name = match s.name {
                240 | 241 => "a.b.c0-0".to_owned(),
                242 => "Bad.name".to_owned(),
                _ => format!("a.b.c{f}-{i}"),
            };
            render_segment(&mut out, file.multi, &name, s);
        }
        if f == 0 {
            for (group, cidrs) in GROUPS.iter().zip(&input.groups) {
                let mut cidrs: Vec<String> = cidrs.iter().take(3).map(Cidr::text).collect();
                // A group may not name another group.
                cidrs.retain(|c| !c.starts_with('@') || c == "@nobody");
                if cidrs.is_empty() {
                    cidrs.push("192.0.2.53".to_owned());
                }
                let _ = writeln!(out, "[peers.{group}]");
                let _ = writeln!(out, "cidrs = {}", quoted(cidrs.into_iter()));
            }
        }
        files.push(out);
    }
    files
}
