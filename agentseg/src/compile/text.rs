//! Readable, deterministic dump of [`Compiled`] (one line per entry) for tests and
//! `agentseg check --show`.

use std::fmt::{Display, Write};

use agentseg_common::{
    PROTO_ALL, PROTO_ICMP, PROTO_NUMBERED, PROTO_TCP, PROTO_UDP, PortRule, RULE_CONTROL_SOCKET,
    RuleSet, UNIX_DENY,
};

use super::{Compiled, FqdnEntry, UnixEntry};
use crate::policy::Protocol;

impl Compiled {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            let mode = if s.mode == agentseg_common::MODE_AUDIT {
                "audit"
            } else {
                "enforce"
            };
            line(
                &mut out,
                format_args!("segment {} {} mode={mode}", s.id, s.name),
            );
            for c in &s.member_cgroups {
                line(&mut out, format_args!("segment {} member cgroup {c}", s.id));
            }
            for u in &s.member_units {
                line(&mut out, format_args!("segment {} member unit {u}", s.id));
            }
            entries(&mut out, s.id, "egress", &s.egress_v4);
            entries(&mut out, s.id, "egress", &s.egress_v6);
            self.fqdn_entries(&mut out, s.id, &s.fqdns);
            entries(&mut out, s.id, "ingress", &s.ingress_v4);
            entries(&mut out, s.id, "ingress", &s.ingress_v6);
            entries(&mut out, s.id, "quarantine", &s.quarantine_v4);
            entries(&mut out, s.id, "quarantine", &s.quarantine_v6);
            self.unix_entries(&mut out, s.id, "unix", &s.unix);
            self.unix_entries(&mut out, s.id, "quarantine-unix", &s.quarantine_unix);
        }
        for (id, set) in self.rulesets.iter().enumerate() {
            line(&mut out, format_args!("ruleset {id} {}", ruleset(set)));
        }
        for r in &self.rules {
            line(
                &mut out,
                format_args!(
                    "rule {} {} {} {}:{}",
                    r.id,
                    r.segment,
                    r.direction,
                    r.file.display(),
                    r.line
                ),
            );
        }
        out
    }
}

impl Compiled {
    /// `segment 1 fqdn *.example.org -> ruleset 3 rule 2 (a.toml:7)`.
    fn fqdn_entries(&self, out: &mut String, id: u32, list: &[FqdnEntry]) {
        for e in list {
            let (pattern, set, rule) = (&e.pattern, e.ruleset_id, e.rule_id);
            match self.rules.get(rule as usize) {
                Some(r) => line(
                    out,
                    format_args!(
                        "segment {id} fqdn {pattern} -> ruleset {set} rule {rule} ({}:{})",
                        r.file.display(),
                        r.line
                    ),
                ),
                None => line(
                    out,
                    format_args!("segment {id} fqdn {pattern} -> ruleset {set} rule {rule}"),
                ),
            }
        }
    }

    /// `segment 1 unix "/run/x.sock" -> allow rule 3 (a.toml:7)`; the pattern is quoted so
    /// that any byte in it stays on the line.
    fn unix_entries(&self, out: &mut String, id: u32, table: &str, list: &[UnixEntry]) {
        for e in list {
            let pattern = e.pattern.to_string();
            let verdict = match (e.verdict, e.rule_id) {
                (UNIX_DENY, RULE_CONTROL_SOCKET) => "deny (control socket)".to_owned(),
                (UNIX_DENY, rule) => format!("deny rule {rule}"),
                (_, rule) => match self.rules.get(rule as usize) {
                    Some(r) => format!("allow rule {rule} ({}:{})", r.file.display(), r.line),
                    None => format!("allow rule {rule}"),
                },
            };
            line(
                out,
                format_args!("segment {id} {table} {pattern:?} -> {verdict}"),
            );
        }
    }
}

fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = out.write_fmt(args);
    out.push('\n');
}

fn entries<N: Display>(out: &mut String, id: u32, dir: &str, list: &[(N, u32)]) {
    for (net, set) in list {
        line(
            out,
            format_args!("segment {id} {dir} {net} -> ruleset {set}"),
        );
    }
}

fn ruleset(set: &RuleSet) -> String {
    let len = usize::try_from(set.len).unwrap_or(usize::MAX);
    let rules: Vec<String> = set.rules.iter().take(len).map(port_rule).collect();
    if rules.is_empty() {
        "deny".to_string()
    } else {
        rules.join("; ")
    }
}

fn port_rule(r: &PortRule) -> String {
    if r.protocols & PROTO_ALL != 0 {
        return format!("all rule {}", r.rule_id);
    }
    let mut protos: Vec<String> = [(PROTO_TCP, "tcp"), (PROTO_UDP, "udp"), (PROTO_ICMP, "icmp")]
        .into_iter()
        .filter(|(bit, _)| r.protocols & bit != 0)
        .map(|(_, name)| name.to_owned())
        .collect();
    let numbered = r.protocols & PROTO_NUMBERED != 0;
    if numbered {
        // "udplite", "gre", or the number.
        protos.push(Protocol::Number(r.proto_num).to_string());
    }
    let protos = protos.join("|");
    let with_ports = r.protocols & (PROTO_TCP | PROTO_UDP) != 0
        || (numbered && agentseg_common::has_ports(u32::from(r.proto_num)));
    let ports = if !with_ports {
        String::new()
    } else if r.port_lo == r.port_hi {
        format!(" {}", r.port_lo)
    } else {
        format!(" {}-{}", r.port_lo, r.port_hi)
    };
    format!("{protos}{ports} rule {}", r.rule_id)
}
