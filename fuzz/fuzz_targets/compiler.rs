//! Structured policies → `policy::load_files` → `compile::compile` / `compile_with`.
//!
//! Raw bytes rarely get past the TOML parser, so the input is a small grammar (segments,
//! overlapping and nested v4/v6 prefixes, excepts inside them, peer groups, ports, protocols,
//! `[[unix]]` paths around the control socket) rendered as policy text, with a few deliberate
//! mistakes mixed in. On success the compiled tables are checked for their structural
//! invariants and, on every prefix boundary of the policy, against a plain reference matcher
//! (union of the rules whose cidr holds the address and whose excepts do not).
#![no_main]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use agentseg::compile::{Compiled, HostPolicy, compile, compile_with};
use agentseg::policy::{PolicySet, Protocol, Rule, UnixPattern};
use agentseg_common::{
    RULE_CONTROL_SOCKET, RULE_DEFAULT_DENY, RULESET_CAPACITY, RuleSet, UNIX_ALLOW, UNIX_DENY,
    ruleset_allows,
};
use arbitrary::Arbitrary;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libfuzzer_sys::fuzz_target;

const CONTROL_SOCKET: &str = "/run/agentseg/agentseg.sock";

// ---------------------------------------------------------------------------------------------
// The grammar.

#[derive(Arbitrary, Debug)]
struct Input {
    files: Vec<File>,
    /// Which host policy `compile_with` gets.
    host: u8,
    /// Extra (address seed, port) probes besides the prefix boundaries.
    probes: Vec<(u32, u16)>,
}

#[derive(Arbitrary, Debug)]
struct File {
    /// `[[segment]]` tables, or one top-level segment (only the first then).
    multi: bool,
    segments: Vec<Seg>,
    peers: Vec<(u8, Vec<Cidr>)>,
}

#[derive(Arbitrary, Debug)]
struct Seg {
    name: u8,
    audit: bool,
    egress: Vec<RuleSpec>,
    ingress: Vec<RuleSpec>,
    quarantine: Option<Vec<Cidr>>,
    quarantine_unix: Vec<u8>,
    unix: Vec<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct RuleSpec {
    cidrs: Vec<Cidr>,
    /// (index of the cidr it is carved from, extra prefix bits, address bits).
    except: Vec<(u8, u8, u128)>,
    ports: Option<Vec<Port>>,
    protocol: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum Cidr {
    V4 { base: u8, bits: u32, len: u8 },
    V6 { base: u8, bits: u128, len: u8 },
    Group(u8),
    /// Host bits left set, a mapped prefix, or garbage: error paths.
    Odd(u8),
}

#[derive(Arbitrary, Debug)]
enum Port {
    One(u16),
    Range(u16, u16),
    Text(u16),
}

const NAMES: &[&str] = &["a.b.c", "a.b.d", "web.prod.out", "x-1.y-2.z-3", "A.b.c"];
const GROUPS: &[&str] = &["dns", "proxies", "lab_1", "Bad"];
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
    "\"132\"",
    "0",
    "255",
    "\"mptcp\"",
    "256",
    "\"icmpv6\"",
];
const UNIX: &[&str] = &[
    CONTROL_SOCKET,
    "/var/run/agentseg/agentseg.sock",
    "/run/*",
    "/run/agentseg/*",
    "/run/tools/*",
    "/run/tools/x.sock",
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

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[usize::from(i) % list.len()]
}

fn v4_net(base: u8, bits: u32, len: u8) -> Ipv4Net {
    let len = len % 33;
    let addr = u32::from_be_bytes(pick(V4_BASES, base)) ^ (bits >> len.min(31));
    Ipv4Net::new(Ipv4Addr::from(addr), len)
        .expect("len <= 32")
        .trunc()
}

fn v6_net(base: u8, bits: u128, len: u8) -> Ipv6Net {
    let len = len % 129;
    let addr = pick(V6_BASES, base) ^ (bits >> len.min(127));
    let net = Ipv6Net::new(Ipv6Addr::from(addr), len)
        .expect("len <= 128")
        .trunc();
    // Mapped prefixes are refused by the parser; keep most inputs valid.
    if net.network().to_ipv4_mapped().is_some() && len >= 96 {
        Ipv6Net::new(Ipv6Addr::from(addr ^ (1 << 120)), len)
            .expect("len <= 128")
            .trunc()
    } else {
        net
    }
}

fn cidr_text(c: &Cidr) -> String {
    match *c {
        Cidr::V4 { base, bits, len } => v4_net(base, bits, len).to_string(),
        Cidr::V6 { base, bits, len } => v6_net(base, bits, len).to_string(),
        Cidr::Group(g) => format!("@{}", pick(GROUPS, g)),
        Cidr::Odd(i) => match i % 6 {
            0 => "10.0.0.1/8".to_owned(),
            1 => "::ffff:10.0.0.0/104".to_owned(),
            2 => "10.0.0.0/33".to_owned(),
            3 => "not-a-cidr".to_owned(),
            4 => "192.0.2.7".to_owned(),
            _ => "2001:db8::1".to_owned(),
        },
    }
}

/// An except nested in one of the rule's cidrs (or, when the index misses, a stray prefix).
fn except_text(cidrs: &[Cidr], (index, extra, bits): (u8, u8, u128)) -> String {
    match cidrs.get(usize::from(index) % cidrs.len().max(1)) {
        Some(Cidr::V4 { base, bits: b, len }) => {
            let outer = v4_net(*base, *b, *len);
            let len = (outer.prefix_len() + extra % 9).min(32);
            let addr = u32::from(outer.network()) | (bits as u32 >> outer.prefix_len().min(31));
            Ipv4Net::new(Ipv4Addr::from(addr), len)
                .expect("len <= 32")
                .trunc()
                .to_string()
        }
        Some(Cidr::V6 { base, bits: b, len }) => {
            let outer = v6_net(*base, *b, *len);
            let len = (outer.prefix_len() + extra % 17).min(128);
            let addr = u128::from(outer.network()) | (bits >> outer.prefix_len().min(127));
            let net = Ipv6Net::new(Ipv6Addr::from(addr), len)
                .expect("len <= 128")
                .trunc();
            net.to_string()
        }
        _ => v4_net(extra, bits as u32, extra).to_string(),
    }
}

fn port_text(p: &Port) -> String {
    match *p {
        Port::One(n) => (n % 2000).to_string(),
        Port::Range(a, b) => format!("\"{}-{}\"", a % 2000, b % 2000),
        Port::Text(n) => format!("\"{n}\""),
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    format!("[{}]", items.join(", "))
}

fn quoted(items: impl Iterator<Item = String>) -> String {
    list(items.map(|s| format!("{s:?}")))
}

fn render_rule(out: &mut String, header: &str, r: &RuleSpec) {
    let _ = writeln!(out, "[[{header}]]");
    let cidrs = &r.cidrs[..r.cidrs.len().min(4)];
    let _ = writeln!(out, "cidrs = {}", quoted(cidrs.iter().map(cidr_text)));
    if !r.except.is_empty() {
        let excepts = r.except.iter().take(3).map(|&e| except_text(cidrs, e));
        let _ = writeln!(out, "except = {}", quoted(excepts));
    }
    if let Some(ports) = &r.ports {
        let _ = writeln!(out, "ports = {}", list(ports.iter().take(3).map(port_text)));
    }
    if let Some(p) = r.protocol {
        let _ = writeln!(out, "protocol = {}", pick(PROTOCOLS, p));
    }
}

fn render_segment(out: &mut String, prefix: &str, table: &str, s: &Seg) {
    if !table.is_empty() {
        let _ = writeln!(out, "[[{table}]]");
    }
    let _ = writeln!(out, "name = {:?}", pick(NAMES, s.name));
    if s.audit {
        let _ = writeln!(out, "mode = \"audit\"");
    }
    for r in s.egress.iter().take(5) {
        render_rule(out, &format!("{prefix}egress"), r);
    }
    for r in s.ingress.iter().take(3) {
        render_rule(out, &format!("{prefix}ingress"), r);
    }
    for u in s.unix.iter().take(3) {
        let _ = writeln!(out, "[[{prefix}unix]]");
        let paths = u.iter().take(4).map(|&i| pick(UNIX, i).to_owned());
        let _ = writeln!(out, "paths = {}", quoted(paths));
    }
    if s.quarantine.is_some() || !s.quarantine_unix.is_empty() {
        let _ = writeln!(out, "[{prefix}quarantine]");
        if let Some(allow) = &s.quarantine {
            let allow = allow.iter().take(3).map(cidr_text);
            let _ = writeln!(out, "allow = {}", quoted(allow));
        }
        if !s.quarantine_unix.is_empty() {
            let unix = s.quarantine_unix.iter().take(3).map(|&i| pick(UNIX, i).to_owned());
            let _ = writeln!(out, "unix = {}", quoted(unix));
        }
    }
}

fn render(f: &File) -> String {
    let mut out = String::new();
    if f.multi {
        for s in f.segments.iter().take(3) {
            render_segment(&mut out, "segment.", "segment", s);
        }
    } else if let Some(s) = f.segments.first() {
        render_segment(&mut out, "", "", s);
    }
    for (g, cidrs) in f.peers.iter().take(2) {
        let _ = writeln!(out, "[peers.{}]", pick(GROUPS, *g));
        let cidrs = cidrs.iter().take(3).map(cidr_text);
        let _ = writeln!(out, "cidrs = {}", quoted(cidrs));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The reference matcher and the checks.

/// Protocols probed: TCP, MPTCP, UDP, UDP-Lite, SCTP, DCCP, ICMP, ICMPv6, GRE, 0, 255.
const PROBE_PROTOCOLS: &[u32] = &[6, 262, 17, 136, 132, 33, 1, 58, 47, 0, 255];

/// Whether a rule allows (protocol, port), from the policy's documented meaning: `tcp` is TCP
/// and MPTCP, `udp` only UDP, `icmp` ICMP and ICMPv6 (no ports), `any` without ports all
/// three, `any` with ports TCP and UDP on them, a number only itself; ports bind only
/// protocols that have them.
fn reference_proto(rule: &Rule, protocol: u32, port: u16) -> bool {
    let with_ports = matches!(protocol, 6 | 262 | 17 | 136 | 132 | 33);
    let port_ok = !with_ports || rule.ports.is_empty() || {
        rule.ports.iter().any(|r| r.lo <= port && port <= r.hi)
    };
    let proto_ok = match rule.protocol {
        Protocol::Tcp => matches!(protocol, 6 | 262),
        Protocol::Udp => protocol == 17,
        Protocol::Icmp => matches!(protocol, 1 | 58),
        Protocol::Any if rule.ports.is_empty() => matches!(protocol, 6 | 262 | 17 | 1 | 58),
        Protocol::Any => matches!(protocol, 6 | 262 | 17),
        Protocol::Number(n) => protocol == u32::from(n),
    };
    proto_ok && port_ok
}

fn reference(rules: &[Rule], addr: IpAddr, protocol: u32, port: u16) -> bool {
    rules.iter().any(|r| {
        r.cidrs.iter().any(|c| c.contains(&addr))
            && !r.except.iter().any(|e| e.contains(&addr))
            && reference_proto(r, protocol, port)
    })
}

/// Longest-prefix match over a compiled table, as the kernel's trie does it.
fn lpm<N: Copy + Into<IpNet>>(table: &[(N, u32)], addr: IpAddr) -> Option<u32> {
    table
        .iter()
        .map(|&(n, id)| (n.into(), id))
        .filter(|(n, _): &(IpNet, u32)| n.contains(&addr))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, id)| id)
}

fn compiled_allows(c: &Compiled, v4: &[(Ipv4Net, u32)], v6: &[(Ipv6Net, u32)], addr: IpAddr, protocol: u32, port: u16) -> bool {
    let id = match addr {
        IpAddr::V4(_) => lpm(v4, addr),
        IpAddr::V6(_) => lpm(v6, addr),
    };
    id.is_some_and(|id| ruleset_allows(&c.rulesets[id as usize], protocol, port) != RULE_DEFAULT_DENY)
}

/// The boundaries of a prefix: its first and last address and their neighbours outside.
fn boundaries(net: &IpNet, out: &mut Vec<IpAddr>) {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            for a in [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)].into_iter().flatten() {
                out.push(IpAddr::V4(a.into()));
            }
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            for a in [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)].into_iter().flatten() {
                out.push(IpAddr::V6(a.into()));
            }
        }
    }
}

fn sorted_unique<T: PartialOrd + std::fmt::Debug>(items: &[T], what: &str) {
    for w in items.windows(2) {
        assert!(w[0] < w[1], "{what} not sorted and unique: {:?} then {:?}", w[0], w[1]);
    }
}

fn check_ruleset(rs: &RuleSet, rules: usize) {
    assert!(rs.len as usize <= RULESET_CAPACITY, "ruleset over capacity: {rs:?}");
    for r in &rs.rules[..rs.len as usize] {
        assert!((r.rule_id as usize) < rules, "ruleset names rule {} of {rules}", r.rule_id);
        assert!(r.port_lo <= r.port_hi, "empty port range in {r:?}");
    }
}

fn check_structure(c: &Compiled, host: &HostPolicy) {
    assert!(!c.rulesets.is_empty() && c.rulesets[0].len == 0, "ruleset 0 must be empty");
    for (i, r) in c.rules.iter().enumerate() {
        assert_eq!(r.id as usize, i, "rule ids are indices");
        assert!(r.line >= 1, "rule {i} at line 0");
    }
    for rs in &c.rulesets {
        check_ruleset(rs, c.rules.len());
    }
    let control = UnixPattern::parse(CONTROL_SOCKET).expect("control socket pattern");
    for (i, s) in c.segments.iter().enumerate() {
        assert_eq!(s.id as usize, i + 1, "segment ids are 1..=n");
        let n = c.rulesets.len();
        let ids = s.egress_v4.iter().map(|e| e.1)
            .chain(s.ingress_v4.iter().map(|e| e.1))
            .chain(s.quarantine_v4.iter().map(|e| e.1))
            .chain(s.egress_v6.iter().map(|e| e.1))
            .chain(s.ingress_v6.iter().map(|e| e.1))
            .chain(s.quarantine_v6.iter().map(|e| e.1));
        for id in ids {
            assert!((id as usize) < n, "segment {} names ruleset {id} of {n}", s.name);
        }
        let key4 = |e: &(Ipv4Net, u32)| (e.0.network(), e.0.prefix_len());
        let key6 = |e: &(Ipv6Net, u32)| (e.0.network(), e.0.prefix_len());
        for t in [&s.egress_v4, &s.ingress_v4, &s.quarantine_v4] {
            sorted_unique(&t.iter().map(key4).collect::<Vec<_>>(), "v4 entries");
        }
        for t in [&s.egress_v6, &s.ingress_v6, &s.quarantine_v6] {
            sorted_unique(&t.iter().map(key6).collect::<Vec<_>>(), "v6 entries");
        }
        for t in [&s.unix, &s.quarantine_unix] {
            let keys: Vec<Vec<u8>> = t.iter().map(|e| e.pattern.key_bytes()).collect();
            sorted_unique(&keys, "unix entries");
            for e in t {
                match e.verdict {
                    UNIX_ALLOW => assert!((e.rule_id as usize) < c.rules.len(), "unix rule {}", e.rule_id),
                    UNIX_DENY => assert_eq!(e.rule_id, RULE_CONTROL_SOCKET),
                    v => panic!("unix verdict {v}"),
                }
            }
        }
        if !host.unix_deny.is_empty() {
            let denied = |t: &[agentseg::compile::UnixEntry]| {
                t.iter().any(|e| e.pattern == control && e.verdict == UNIX_DENY)
            };
            assert!(denied(&s.unix), "segment {}: control socket not refused", s.name);
            assert!(
                s.quarantine_unix.is_empty() || denied(&s.quarantine_unix),
                "segment {}: control socket not refused in quarantine",
                s.name
            );
        }
    }
}

fn check_semantics(set: &PolicySet, c: &Compiled, probes: &[(u32, u16)]) {
    for (seg, out) in set.segments.iter().zip(&c.segments) {
        let quarantine: Vec<Rule> = if seg.quarantine_allow.is_empty() {
            Vec::new()
        } else {
            vec![Rule {
                cidrs: seg.quarantine_allow.clone(),
                except: Vec::new(),
                ports: Vec::new(),
                protocol: Protocol::Any,
                origin: seg.origin.clone(),
            }]
        };
        let tables = [
            ("egress", &seg.egress, &out.egress_v4, &out.egress_v6),
            ("ingress", &seg.ingress, &out.ingress_v4, &out.ingress_v6),
            ("quarantine", &quarantine, &out.quarantine_v4, &out.quarantine_v6),
        ];
        for (what, rules, v4, v6) in tables {
            let mut addrs = Vec::new();
            for r in rules.iter() {
                for n in r.cidrs.iter().chain(&r.except) {
                    boundaries(n, &mut addrs);
                }
            }
            for &(seed, _) in probes.iter().take(8) {
                addrs.push(IpAddr::V4(seed.into()));
                addrs.push(IpAddr::V6((u128::from(seed) << 96 | 0xfd00 << 112).into()));
            }
            let ports: Vec<u16> = rules
                .iter()
                .flat_map(|r| r.ports.iter().flat_map(|p| [p.lo, p.hi, p.lo.wrapping_sub(1), p.hi.wrapping_add(1)]))
                .chain(probes.iter().take(4).map(|p| p.1))
                .chain([1, 53, 443, u16::MAX])
                .collect();
            for &addr in &addrs {
                for &protocol in PROBE_PROTOCOLS {
                    for &port in &ports {
                        let want = reference(rules, addr, protocol, port);
                        let got = compiled_allows(c, v4, v6, addr, protocol, port);
                        assert_eq!(
                            got, want,
                            "segment {} {what}: {addr} protocol {protocol} port {port}: \
                             compiled {got}, reference {want}",
                            seg.name
                        );
                    }
                }
            }
        }
    }
}

fn host_policy(choice: u8) -> HostPolicy {
    let allow: &[&str] = match choice % 3 {
        0 => return HostPolicy::default(),
        1 => &["/run/dbus/system_bus_socket", "/run/*"],
        _ => &["@agentseg*", "/run/tools/x.sock"],
    };
    let allow = allow.iter().map(|p| UnixPattern::parse(p).expect("fixed pattern")).collect();
    HostPolicy::new(allow, None, Path::new(CONTROL_SOCKET)).expect("host policy")
}

fuzz_target!(|input: Input| {
    let files: Vec<(PathBuf, Vec<u8>)> = input
        .files
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, f)| (PathBuf::from(format!("f{i}.toml")), render(f).into_bytes()))
        .collect();
    let Ok(set) = agentseg::policy::load_files(&files) else {
        return;
    };
    let plain = compile(&set);
    let host = host_policy(input.host);
    let with_host = compile_with(&set, &host);
    assert_eq!(
        plain.is_ok(),
        with_host.is_ok(),
        "the host policy changed whether the policy compiles"
    );
    if let Ok(c) = &plain {
        check_structure(c, &HostPolicy::default());
        check_semantics(&set, c, &input.probes);
        let _ = c.to_text();
    }
    if let Ok(c) = &with_host {
        check_structure(c, &host);
        check_semantics(&set, c, &input.probes);
        assert_eq!(compile_with(&set, &host).as_ref(), Ok(c), "compile is not deterministic");
        let _ = c.to_text();
    }
});
