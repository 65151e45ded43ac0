//! Warnings about DNS around agentseg's resolver: members' queries to port 53 are steered to
//! the daemon's resolver, which answers only the names the segment's `fqdns` rules allow. DNS
//! over TLS (853) and over HTTPS (443, to a known endpoint) are ordinary connections: a rule
//! that allows them lets an agent resolve, and carry data in its queries, unjudged.

use std::net::IpAddr;

use super::warnings::PolicyWarning;
use super::{Fqdn, Position, Protocol, Rule, Segment};

/// The reason every DoT/DoH warning ends with.
const AROUND: &str = "DNS over TLS/HTTPS goes around agentseg's resolver: queries to it are not \
                      judged";

/// Well-known DNS-over-HTTPS endpoints: (name, who runs it).
pub const DOH_ENDPOINTS: &[(&str, &str)] = &[
    ("dns.google", "Google Public DNS"),
    ("cloudflare-dns.com", "Cloudflare"),
    ("mozilla.cloudflare-dns.com", "Cloudflare for Firefox"),
    ("dns.quad9.net", "Quad9"),
    ("doh.opendns.com", "OpenDNS"),
];

/// Addresses of the same public resolvers: they answer DNS over TLS on 853 and over HTTPS on
/// 443 by address too (`https://1.1.1.1/dns-query`).
pub const PUBLIC_RESOLVERS: &[(&str, &str)] = &[
    ("8.8.8.8", "Google Public DNS"),
    ("8.8.4.4", "Google Public DNS"),
    ("2001:4860:4860::8888", "Google Public DNS"),
    ("1.1.1.1", "Cloudflare"),
    ("1.0.0.1", "Cloudflare"),
    ("2606:4700:4700::1111", "Cloudflare"),
    ("9.9.9.9", "Quad9"),
    ("149.112.112.112", "Quad9"),
    ("2620:fe::fe", "Quad9"),
    ("208.67.222.222", "OpenDNS"),
    ("208.67.220.220", "OpenDNS"),
];

const DNS: u16 = 53;
const DOT: u16 = 853;
const HTTPS: u16 = 443;

/// Whether `rule` allows TCP or UDP to `port` (listed, or every port).
fn allows_port(rule: &Rule, port: u16) -> bool {
    matches!(rule.protocol, Protocol::Tcp | Protocol::Udp | Protocol::Any)
        && (rule.ports.is_empty() || rule.ports.iter().any(|r| r.lo <= port && port <= r.hi))
}

/// "port 443", "ports 443 and 853", or `None` when the rule allows neither (853 is left out
/// when `ports` lists it: that entry has a warning of its own).
fn doh_ports(rule: &Rule, dot_listed: bool) -> Option<&'static str> {
    match (
        allows_port(rule, HTTPS),
        allows_port(rule, DOT) && !dot_listed,
    ) {
        (true, true) => Some("ports 443 and 853"),
        (true, false) => Some("port 443"),
        (false, true) => Some("port 853"),
        (false, false) => None,
    }
}

/// The DoH endpoints `pattern` matches, as "name (who)": the well-known ones, and those the
/// daemon config lists (`[dns] doh_endpoints`).
fn doh_reached(pattern: &Fqdn, extra: &[String]) -> Vec<String> {
    let known = DOH_ENDPOINTS
        .iter()
        .filter(|(name, _)| pattern.matches(name))
        .map(|(name, who)| format!("{name} ({who})"));
    let listed = extra
        .iter()
        .filter(|name| !DOH_ENDPOINTS.iter().any(|(k, _)| k == name) && pattern.matches(name))
        .map(|name| format!("{name} ([dns] doh_endpoints)"));
    known.chain(listed).collect()
}

/// The public resolvers the rule's cidrs (minus its excepts) contain, one address per
/// provider, as "who address".
fn resolvers_reached(rule: &Rule) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (addr, who) in PUBLIC_RESOLVERS {
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        let inside = rule.cidrs.iter().any(|c| c.contains(&ip))
            && !rule.except.iter().any(|e| e.contains(&ip));
        if inside && !seen.contains(who) {
            seen.push(who);
            out.push(format!("{who} {addr}"));
        }
    }
    out
}

impl Segment {
    pub(super) fn dns_warnings(&self, out: &mut Vec<PolicyWarning>, doh: &[String]) {
        let name = &self.name;
        let at = |pos: Option<&Position>, line: usize, message: String| PolicyWarning {
            file: self.origin.file.clone(),
            line: pos.map_or(line, |p| p.line),
            column: pos.map(|p| p.column),
            message,
        };
        let has_names = self.egress.iter().any(|r| !r.fqdns.is_empty());
        for (i, rule) in self.egress.iter().enumerate() {
            let line = rule.origin.line;
            let ports = self.positions.egress_ports.get(i);
            let names = self.positions.egress_fqdns.get(i);
            let mut dot_listed = false;
            for (j, range) in rule.ports.iter().enumerate() {
                let pos = ports.and_then(|p| p.get(j));
                let listed = |port: u16| {
                    matches!(rule.protocol, Protocol::Tcp | Protocol::Udp | Protocol::Any)
                        && range.lo <= port
                        && port <= range.hi
                };
                if listed(DOT) {
                    dot_listed = true;
                    let m = format!(
                        "segment {name}: egress to port 853 (DNS over TLS) is allowed: {AROUND}"
                    );
                    out.push(at(pos, line, m));
                }
                if listed(DNS) {
                    let names = if has_names {
                        "the names of its fqdns rules resolve through agentseg"
                    } else {
                        "the segment has no fqdns rule, so no name resolves"
                    };
                    let m = format!(
                        "segment {name}: port 53 is steered to agentseg's resolver whatever \
                         server is asked: this rule never reaches that server on port 53 \
                         ({names}; unless the daemon's [dns] port = 0)"
                    );
                    out.push(at(pos, line, m));
                }
            }
            let Some(via) = doh_ports(rule, dot_listed) else {
                continue;
            };
            for (j, pattern) in rule.fqdns.iter().enumerate() {
                let reached = doh_reached(pattern, doh);
                if !reached.is_empty() {
                    let m = format!(
                        "segment {name}: fqdns {:?} on {via} reaches the DNS-over-HTTPS \
                         endpoint {}: {AROUND}",
                        pattern.as_str(),
                        reached.join(", ")
                    );
                    out.push(at(names.and_then(|p| p.get(j)), line, m));
                }
            }
            let reached = resolvers_reached(rule);
            if !reached.is_empty() {
                let m = format!(
                    "segment {name}: egress rule reaches public DNS resolvers ({}) on {via}: \
                     {AROUND}",
                    reached.join(", ")
                );
                out.push(at(None, line, m));
            }
        }
    }
}
